// cbir's page: plain JavaScript over the REST API (no build step, no libraries).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  files: [],          // uploaded query images (File objects)
  id: null,           // or: the id of an indexed image to search by
  queryName: "",
  box: null,          // [left, top, right, bottom] as fractions of the query image
  image: null,        // the query image, drawn on the canvas
  stats: null,
  marks: new Map(),   // id -> "like" | "unlike"
  applied: null,      // the marks the shown ranking was refined with
  offset: 0,
  browseOffset: 0,
  busy: false,
};
const PAGE = 48;
const KEY_STEP = 0.05;
const HEAT_DIM = 0.8;   // how dark the worst-matching places of a heat map are drawn  // how far an arrow key moves or grows the box (fraction of the image)

// -- talking to the server -------------------------------------------------------------------
async function api(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error("the server cannot be reached: is cbir serve still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.message ? body.message : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}
function clearError() { $("error").hidden = true; }

function setBusy(busy, text = "Searching…") {
  state.busy = busy;
  $("progress").hidden = !busy;
  $("progress").lastChild.textContent = " " + text;
  $("search-button").disabled = busy;
  $("refine").disabled = busy || state.marks.size === 0;
  document.body.setAttribute("aria-busy", busy ? "true" : "false");
}

// -- the collection's descriptors, metrics and labels ----------------------------------------
async function loadStats() {
  const stats = await api("/api/stats");
  state.stats = stats;
  const labels = Object.keys(stats.labels);
  $("summary").textContent = `${stats.images.toLocaleString()} images` +
    (labels.length ? `, ${labels.length} labels` : "") +
    (stats.skipped ? `, ${stats.skipped} skipped` : "");
  const descriptor = $("descriptor");
  descriptor.replaceChildren(...stats.descriptors.map((d, i) => {
    const o = new Option(`${d.label} (${d.vectors})`, d.label, i === 0, i === 0);
    return o;
  }));
  fillMetrics();
  for (const select of [$("label"), $("browse-label")]) {
    select.replaceChildren(new Option("any", ""),
      ...labels.map((l) => new Option(`${l} (${stats.labels[l]})`, l)));
  }
  $("k").max = stats.limits.max_k;
}

function currentDescriptor() {
  return state.stats.descriptors.find((d) => d.label === $("descriptor").value);
}
function hashDescriptor() {
  return state.stats ? state.stats.descriptors.find((d) => d.hash) : null;
}

function fillMetrics() {
  const d = currentDescriptor();
  if (!d) return;
  $("metric").replaceChildren(...d.metrics.map((m) =>
    new Option(m === d.default_metric ? `${m} (default)` : m, m, m === d.default_metric,
      m === d.default_metric)));
}

// -- the query -------------------------------------------------------------------------------
function setFiles(fileList) {
  const files = [...fileList];
  if (!files.length) return;
  if (state.stats && files.length > state.stats.limits.max_files) {
    showError(`at most ${state.stats.limits.max_files} query images at once; you gave ${files.length}`);
    return;
  }
  state.files = files;
  state.id = null;
  state.queryName = files.length === 1 ? files[0].name || "pasted image" : `${files.length} images, combined`;
  resetMarks();
  showQuery(URL.createObjectURL(files[0]));
}

function setQueryId(id, name) {
  state.files = [];
  state.id = id;
  state.queryName = name;
  resetMarks();
  showQuery(`/api/images/${id}/thumbnail?side=512`);
}

function showQuery(src) {
  state.box = null;
  const img = new Image();
  img.onload = () => { state.image = img; drawQuery(); };
  img.onerror = () => {  // a format the browser cannot show (TIFF...): the server may still read it
    state.image = null;
    $("query-text").textContent = `${state.queryName} (no preview in this browser)`;
  };
  img.src = src;
  $("query").hidden = false;
  $("query-text").textContent = state.queryName;
  $("clear-box").disabled = true;
}

function drawQuery() {
  const canvas = $("query-canvas");
  const img = state.image;
  if (!img) return;
  const scale = Math.min(1, 360 / Math.max(img.naturalWidth, img.naturalHeight));
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  if (state.box) {
    const [l, t, r, b] = state.box;
    const W = canvas.width, H = canvas.height;
    ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
    ctx.fillRect(0, 0, W, t * H);
    ctx.fillRect(0, b * H, W, (1 - b) * H);
    ctx.fillRect(0, t * H, l * W, (b - t) * H);
    ctx.fillRect(r * W, t * H, (1 - r) * W, (b - t) * H);
    ctx.strokeStyle = "#ffbf47";
    ctx.lineWidth = 2;
    ctx.strokeRect(l * W, t * H, (r - l) * W, (b - t) * H);
  }
  $("query-text").textContent = state.queryName +
    (state.box ? " — searching by the boxed part only" : " — drag on the image to search by a part");
}

function setBox(box) {
  const clamp = (v) => Math.min(1, Math.max(0, v));
  let [l, t, r, b] = box.map(clamp);
  if (r < l) [l, r] = [r, l];
  if (b < t) [t, b] = [b, t];
  state.box = (r - l > 0.02 && b - t > 0.02) ? [l, t, r, b] : null;
  $("clear-box").disabled = !state.box;
  drawQuery();
}

function canvasPoint(event) {
  const rect = $("query-canvas").getBoundingClientRect();
  return [(event.clientX - rect.left) / rect.width, (event.clientY - rect.top) / rect.height];
}

function wireBoxDrawing() {
  const canvas = $("query-canvas");
  let start = null;
  canvas.addEventListener("pointerdown", (e) => {
    start = canvasPoint(e);
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!start) return;
    const p = canvasPoint(e);
    setBox([start[0], start[1], p[0], p[1]]);
  });
  canvas.addEventListener("pointerup", (e) => {
    if (!start) return;
    const p = canvasPoint(e);
    setBox([start[0], start[1], p[0], p[1]]);
    start = null;
    if (state.box) search();
  });
  // the keyboard: arrows move the box (one appears at the centre), Shift+arrows resize it
  canvas.addEventListener("keydown", (e) => {
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (e.key === "Enter") { e.preventDefault(); search(); return; }
    if (e.key === "Escape") { setBox([0, 0, 0, 0]); return; }
    const m = moves[e.key];
    if (!m) return;
    e.preventDefault();
    let [l, t, r, b] = state.box || [0.25, 0.25, 0.75, 0.75];
    const dx = m[0] * KEY_STEP, dy = m[1] * KEY_STEP;
    if (e.shiftKey) { r += dx; b += dy; } else if (state.box) {
      const w = r - l, h = b - t;
      l = Math.min(1 - w, Math.max(0, l + dx)); t = Math.min(1 - h, Math.max(0, t + dy));
      r = l + w; b = t + h;
    }
    setBox([l, t, r, b]);
  });
}

// -- searching -------------------------------------------------------------------------------
function queryForm() {
  const form = new FormData();
  for (const f of state.files) form.append("files", f, f.name || "pasted.png");
  if (state.id !== null) form.append("id", state.id);
  if (state.box) form.append("box", state.box.map((v) => v.toFixed(4)).join(","));
  return form;
}

async function search({ append = false, refine = false } = {}) {
  if (state.busy) return;
  if (!state.files.length && state.id === null) {
    showError("choose, drop or paste a query image first (or click an image while browsing)");
    return;
  }
  clearError();
  const k = parseInt($("k").value, 10);
  if (!(k >= 1)) { showError("the number of results must be a whole number, 1 or more"); return; }
  state.offset = append ? state.offset + k : 0;
  const form = queryForm();
  form.append("descriptor", $("descriptor").value);
  form.append("metric", $("metric").value);
  form.append("k", k);
  form.append("offset", state.offset);
  if ($("label").value) form.append("label", $("label").value);
  // a refined ranking's next page is of the same refined ranking
  if (refine) state.applied = new Map(state.marks);
  else if (!append) state.applied = null;
  for (const [id, mark] of state.applied || []) form.append(mark, id);
  setBusy(true, refine ? "Refining…" : "Searching…");
  try {
    const result = await api("/api/search", { method: "POST", body: form });
    renderResult(result, append);
  } catch (e) {
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

function renderResult(result, append) {
  const pairs = result.descriptors.map((d, i) => `${d} | ${result.metrics[i]}`).join(" + ");
  const fb = result.feedback.like + result.feedback.unlike
    ? ` · refined by ${result.feedback.like} relevant, ${result.feedback.unlike} not relevant` : "";
  $("result-title").textContent = result.hits.length
    ? `${pairs} · ${result.score} · ${result.offset + result.hits.length} results in ` +
      `${(result.server_seconds * 1000).toFixed(0)} ms${fb}`
    : "No results (the filter may leave nothing, or this descriptor has no vectors yet).";
  const list = $("results");
  const cards = result.hits.map((hit) => resultCard(hit, result.score));
  if (append) list.append(...cards); else list.replaceChildren(...cards);
  $("more").hidden = result.hits.length < parseInt($("k").value, 10);
  // how many answers the page has shown (tests and scripts wait on it)
  document.body.dataset.answers = String(Number(document.body.dataset.answers || 0) + 1);
}

function card(image) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  node.dataset.id = image.id;
  const img = node.querySelector("img");
  img.src = image.thumbnail_url;
  img.alt = image.name;
  node.querySelector(".label").textContent = image.label || "";
  node.querySelector(".label").hidden = !image.label;
  node.querySelector(".name").textContent = image.name;
  node.querySelector(".name").title = image.name;
  node.querySelector(".thumb").setAttribute("aria-label", `Search by ${image.name}`);
  node.querySelector(".thumb").addEventListener("click", () => {
    showView("search");
    setQueryId(image.id, image.name);
    search();
  });
  const dups = node.querySelector(".dups");
  if (hashDescriptor()) {
    dups.hidden = false;
    dups.addEventListener("click", () => copies(image));
  }
  return node;
}

function resultCard(hit, scoreKind) {
  const node = card(hit);
  node.querySelector(".rank").textContent = `#${hit.rank}`;
  node.querySelector(".score").textContent = `${scoreKind === "distance" ? "d" : "s"} ${hit.score.toPrecision(3)}`;
  const like = node.querySelector(".like"), unlike = node.querySelector(".unlike");
  const paint = () => {
    const mark = state.marks.get(hit.id);
    like.setAttribute("aria-pressed", mark === "like" ? "true" : "false");
    unlike.setAttribute("aria-pressed", mark === "unlike" ? "true" : "false");
    node.classList.toggle("liked", mark === "like");
    node.classList.toggle("unliked", mark === "unlike");
    $("refine").disabled = state.busy || state.marks.size === 0;
  };
  const toggle = (mark) => {
    if (state.marks.get(hit.id) === mark) state.marks.delete(hit.id); else state.marks.set(hit.id, mark);
    paint();
  };
  like.setAttribute("aria-label", `${hit.name} is relevant`);
  unlike.setAttribute("aria-label", `${hit.name} is not relevant`);
  like.addEventListener("click", () => toggle("like"));
  unlike.addEventListener("click", () => toggle("unlike"));
  node.querySelector(".explain").setAttribute("aria-label", `Why ${hit.name} matched`);
  node.querySelector(".explain").addEventListener("click", () => why(hit));
  paint();
  return node;
}

function resetMarks() {
  state.marks.clear();
  $("refine").disabled = true;
}

async function copies(image) {
  const hash = hashDescriptor();
  clearError();
  setBusy(true, "Looking for copies…");
  try {
    const result = await api(`/api/images/${image.id}/duplicates?descriptor=${encodeURIComponent(hash.label)}`);
    showView("search");
    setQueryId(image.id, image.name);
    renderResult(result, false);
    $("result-title").textContent = result.hits.length
      ? `${result.hits.length} near copies of ${image.name} (${hash.label}, differing bits)`
      : `No near copies of ${image.name} (${hash.label})`;
    $("more").hidden = true;
  } catch (e) {
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

// -- why it matched --------------------------------------------------------------------------
async function why(hit) {
  clearError();
  const form = queryForm();
  form.append("hit", hit.id);
  form.append("descriptor", $("descriptor").value);
  form.append("metric", $("metric").value);
  setBusy(true, "Explaining…");
  let answer;
  try {
    answer = await api("/api/explain", { method: "POST", body: form });
  } catch (e) {
    showError(e.message);
    return;
  } finally {
    setBusy(false);
  }
  const body = $("why-body");
  body.replaceChildren();
  const p = (text, cls) => { const e = document.createElement("p"); e.textContent = text; if (cls) e.className = cls; return e; };
  body.append(p(`${hit.name}: ${answer.metric} distance ${answer.distance.toPrecision(4)} under ${answer.descriptor}.`));
  if (answer.kind === "blocks") {
    body.append(p("Each part's share of the distance (a small share: that part looks alike)."));
    const grid = document.createElement("div");
    grid.className = "bars";
    for (const b of answer.blocks) {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(b.share * 100).toFixed(1)}%`;
      const track = document.createElement("div");
      track.append(bar);
      grid.append(Object.assign(document.createElement("span"), { textContent: b.part }), track,
        Object.assign(document.createElement("span"), { textContent: `${(b.share * 100).toFixed(0)}%` }));
    }
    body.append(grid);
  } else if (answer.kind === "colours") {
    body.append(p(answer.colours.length
      ? `The colours both share most (together ${(answer.overlap * 100).toFixed(0)}% of each image in common):`
      : "The two share no colour bins."));
    const list = document.createElement("ul");
    list.className = "swatches";
    for (const c of answer.colours) {
      const li = document.createElement("li");
      li.className = "swatch";
      const chip = document.createElement("div");
      chip.className = "chip";
      chip.style.background = c.hex;
      li.append(chip, `${c.hex} · ${(c.shared * 100).toFixed(1)}%`);
      li.title = `query ${(c.query * 100).toFixed(1)}%, result ${(c.hit * 100).toFixed(1)}%`;
      list.append(li);
    }
    body.append(list);
  } else if (answer.kind === "heatmap") {
    body.append(p("Where the two images' features match best (bright: a close match in the other image)."));
    const wrap = document.createElement("div");
    wrap.className = "heat";
    const querySrc = state.files.length ? URL.createObjectURL(state.files[0]) : `/api/images/${state.id}/thumbnail?side=512`;
    wrap.append(heatFigure(querySrc, answer.heatmaps.query, state.box ? "query (the boxed part)" : "query", state.box),
      heatFigure(hit.thumbnail_url + "?side=512", answer.heatmaps.hit, hit.name, null));
    body.append(wrap);
  }
  for (const note of answer.notes) body.append(p(note, "muted small"));
  $("why").showModal();
  $("why-close").focus();
}

function heatFigure(src, grid, caption, box) {
  const figure = document.createElement("figure");
  const canvas = document.createElement("canvas");
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `heat map over ${caption}`);
  const img = new Image();
  img.onload = () => {
    // the map covers the part searched by: the box, or the whole image
    const [l, t, r, b] = box || [0, 0, 1, 1];
    const sw = (r - l) * img.naturalWidth, sh = (b - t) * img.naturalHeight;
    const scale = 320 / Math.max(sw, sh);
    canvas.width = Math.round(sw * scale);
    canvas.height = Math.round(sh * scale);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, l * img.naturalWidth, t * img.naturalHeight, sw, sh, 0, 0, canvas.width, canvas.height);
    const rows = grid.length, cols = grid[0].length;
    const cells = document.createElement("canvas");
    cells.width = cols; cells.height = rows;
    const cctx = cells.getContext("2d");
    const data = cctx.createImageData(cols, rows);
    for (let y = 0; y < rows; y++) for (let x = 0; x < cols; x++) {
      // places that match poorly are dimmed, those that match well left bright
      const v = grid[y][x], i = 4 * (y * cols + x);
      data.data[i] = 0; data.data[i + 1] = 0; data.data[i + 2] = 0;
      data.data[i + 3] = Math.round(HEAT_DIM * 255 * (1 - v));
    }
    cctx.putImageData(data, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(cells, 0, 0, canvas.width, canvas.height);
  };
  img.src = src;
  const cap = document.createElement("figcaption");
  cap.className = "small muted";
  cap.textContent = caption;
  figure.append(canvas, cap);
  return figure;
}

// -- browsing --------------------------------------------------------------------------------
async function browse(offset = 0) {
  clearError();
  const label = $("browse-label").value;
  try {
    const url = `/api/images?offset=${offset}&limit=${PAGE}` + (label ? `&label=${encodeURIComponent(label)}` : "");
    const page = await api(url);
    state.browseOffset = offset;
    $("browse").replaceChildren(...page.images.map((image) => {
      const node = card(image);
      node.querySelector(".like").remove();
      node.querySelector(".unlike").remove();
      node.querySelector(".explain").remove();
      return node;
    }));
    const last = Math.min(page.total, offset + page.images.length);
    $("page-text").textContent = page.total ? `${offset + 1}–${last} of ${page.total}` : "no images";
    $("prev").disabled = offset === 0;
    $("next").disabled = last >= page.total;
  } catch (e) {
    showError(e.message);
  }
}

function showView(name) {
  $("search-view").hidden = name !== "search";
  $("browse-view").hidden = name !== "browse";
  $("tab-search").setAttribute("aria-pressed", name === "search");
  $("tab-browse").setAttribute("aria-pressed", name === "browse");
}

// -- wiring ----------------------------------------------------------------------------------
function wire() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { setFiles(e.target.files); if (state.files.length) search(); });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("files").click(); }
  });
  for (const target of [drop, document.body]) {
    target.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    target.addEventListener("dragleave", () => drop.classList.remove("over"));
    target.addEventListener("drop", (e) => {
      e.preventDefault();
      e.stopPropagation();
      drop.classList.remove("over");
      if (e.dataTransfer.files.length) { setFiles(e.dataTransfer.files); search(); }
    });
  }
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (!files.length) return;
    e.preventDefault();
    setFiles(files);
    search();
  });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  $("refine").addEventListener("click", () => search({ refine: true }));
  $("more").addEventListener("click", () => search({ append: true }));
  $("descriptor").addEventListener("change", fillMetrics);
  $("clear-box").addEventListener("click", () => { setBox([0, 0, 0, 0]); search(); });
  $("clear-query").addEventListener("click", () => {
    state.files = []; state.id = null; state.image = null; state.box = null;
    $("query").hidden = true; $("results").replaceChildren(); $("result-title").textContent = "";
    resetMarks(); $("files").value = ""; drop.focus();
  });
  $("error-close").addEventListener("click", clearError);
  $("tab-search").addEventListener("click", () => showView("search"));
  $("tab-browse").addEventListener("click", () => { showView("browse"); browse(state.browseOffset); });
  $("browse-label").addEventListener("change", () => browse(0));
  $("prev").addEventListener("click", () => browse(Math.max(0, state.browseOffset - PAGE)));
  $("next").addEventListener("click", () => browse(state.browseOffset + PAGE));
  wireBoxDrawing();
}

wire();
loadStats().catch((e) => showError(`cannot read the collection: ${e.message}`));
