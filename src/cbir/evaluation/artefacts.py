"""The files an evaluation leaves behind, so a user can see which combination suits their images.

Everything here takes plain Python / numpy data (the grid computes the numbers) and writes it
out: CSV for programs, Markdown for people, PNG plots and result mosaics for eyes, and TREC
run / qrels files so the numbers can be checked independently with ``trec_eval``.

Plots use matplotlib's ``Figure`` with the Agg canvas directly (never ``pyplot``), so nothing
touches global GUI state and it works headless. matplotlib and Pillow's drawing modules are
imported inside the functions, so ``import cbir`` stays light.
"""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "NOT_RELEVANT_RGB",
    "QUERY_RGB",
    "RELEVANT_RGB",
    "make_mosaic",
    "plot_pr_curves",
    "plot_precision_at_k",
    "read_trec_qrels",
    "read_trec_run",
    "recommend",
    "write_grid_table",
    "write_per_class",
    "write_results_table",
    "write_trec_qrels",
    "write_trec_run",
]

#: Frame colours of the mosaics (public so tests and docs can refer to them).
RELEVANT_RGB = (0, 160, 60)
NOT_RELEVANT_RGB = (215, 25, 30)
QUERY_RGB = (30, 90, 220)
#: Letterbox inside each thumbnail square, canvas around the cells, caption text.
LETTERBOX_RGB = (200, 200, 200)
CANVAS_RGB = (255, 255, 255)
TEXT_RGB = (40, 40, 40)
#: At most this many results per mosaic row.
MOSAIC_COLUMNS = 10

PLOT_DPI = 150
#: tab10, so ~20 lines stay distinguishable when combined with line styles and markers.
_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(float(value))


def _csv_value(value: Any) -> Any:
    """Full precision for numbers (``str(float)`` round-trips), empty for missing."""
    if value is None:
        return ""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if _is_number(value):
        return float(value)
    return str(value)


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_value(value: Any, decimals: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        v = float(value)
        return f"{v:.{decimals}f}" if math.isfinite(v) else str(v)
    return _md_escape(str(value))


def _bold(cell: str) -> str:
    return f"**{cell}**" if cell and cell != "-" else cell


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    """A GitHub-flavoured Markdown table: numbers right-aligned so decimals line up."""
    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The union of the rows' keys in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def write_results_table(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    sort_by: str = "MAP",
    higher_is_better: bool = True,
    decimals: int = 3,
) -> tuple[Path, Path]:
    """Every combination's scores as ``results.csv`` and ``results.md``; returns (csv, md).

    The CSV keeps the rows' order and full precision (for programs); the Markdown table is for
    people: sorted best first by ``sort_by``, rounded to ``decimals``, with the best row (every
    row tied for best) in bold. Rows without a finite ``sort_by`` value are listed last.
    """
    if not rows:
        raise ValueError("no results to write")
    columns = _columns(rows)
    if sort_by not in columns:
        raise ValueError(f"cannot sort by {sort_by!r}: the columns are {', '.join(columns)}")
    out = Path(out_dir)
    csv_path = _write_csv(
        out / "results.csv", columns, ([_csv_value(r.get(c)) for c in columns] for r in rows)
    )

    sign = -1.0 if higher_is_better else 1.0
    scored = [r for r in rows if _finite(r.get(sort_by))]
    unscored = [r for r in rows if not _finite(r.get(sort_by))]
    ordered = sorted(scored, key=lambda r: sign * float(r[sort_by])) + unscored
    best = float(ordered[0][sort_by]) if scored else None
    numeric = [
        all(_is_number(r[c]) for r in rows if r.get(c) is not None)
        and any(r.get(c) is not None for r in rows)
        for c in columns
    ]
    body = []
    for r in ordered:
        cells = [_md_value(r.get(c), decimals) for c in columns]
        if best is not None and _finite(r.get(sort_by)) and float(r[sort_by]) == best:
            cells = [_bold(c) for c in cells]
        body.append(cells)
    direction = "best (highest) first" if higher_is_better else "best (lowest) first"
    note = f"Sorted by {sort_by}, {direction}; the best row is in bold.\n\n"
    md_path = out / "results.md"
    md_path.write_text(note + _md_table(columns, body, numeric), encoding="utf-8")
    return csv_path, md_path


def _write_matrix(
    cells: Mapping[tuple[str, str], float | None],
    out_dir: Path,
    name: str,
    *,
    row_names: Sequence[str] | None = None,
    corner: str,
    note: str,
    higher_is_better: bool,
    decimals: int,
) -> tuple[Path, Path]:
    """A row x column matrix to ``name.csv`` (empty where missing) and ``name.md`` ("-"
    where missing, each row's best cell in bold); rows and columns in first-seen order."""
    if row_names is None:
        row_names = list(dict.fromkeys(r for r, _ in cells))
    col_names = list(dict.fromkeys(c for _, c in cells))
    csv_path = _write_csv(
        out_dir / f"{name}.csv",
        [corner, *col_names],
        ([r, *(_csv_value(cells.get((r, c))) for c in col_names)] for r in row_names),
    )
    pick = max if higher_is_better else min
    body = []
    for r in row_names:
        values = [cells.get((r, c)) for c in col_names]
        finite = [float(v) for v in values if _finite(v)]
        best = pick(finite) if finite else None
        body.append(
            [
                _md_escape(r),
                *(
                    _bold(_md_value(v, decimals))
                    if best is not None and _finite(v) and float(v) == best
                    else _md_value(v, decimals)
                    for v in values
                ),
            ]
        )
    md_path = out_dir / f"{name}.md"
    md_path.write_text(
        note + "\n\n" + _md_table([corner, *col_names], body, [False] + [True] * len(col_names)),
        encoding="utf-8",
    )
    return csv_path, md_path


def write_grid_table(
    values: dict[tuple[str, str], float],
    out_dir: str | Path,
    name: str = "map_grid",
    *,
    value_name: str = "MAP",
    higher_is_better: bool = True,
    decimals: int = 3,
) -> tuple[Path, Path]:
    """``{(descriptor, metric): value}`` as a descriptor x metric matrix; returns (csv, md).

    A matrix shows at a glance whether a descriptor is good under every metric or only one.
    Missing combinations (e.g. histogram metrics on signed descriptors) are "-" in Markdown and
    empty in the CSV; each descriptor's best metric is in bold.
    """
    if not values:
        raise ValueError("no values to write")
    return _write_matrix(
        values,
        Path(out_dir),
        name,
        corner="descriptor",
        note=(
            f"{value_name} by descriptor (rows) and metric (columns); "
            "each descriptor's best metric is in bold."
        ),
        higher_is_better=higher_is_better,
        decimals=decimals,
    )


def write_per_class(
    per_class: dict[str, dict[str, float]],
    out_dir: str | Path,
    *,
    decimals: int = 3,
) -> tuple[Path, Path]:
    """``{class: {"descriptor / metric": AP}}`` to ``per_class_ap.csv`` and ``.md``; returns
    (csv, md).

    One overall number hides that a descriptor may suit some classes and fail others; the
    best combination of each class is in bold.
    """
    if not per_class:
        raise ValueError("no per-class values to write")
    cells = {(cls, combo): ap for cls, aps in per_class.items() for combo, ap in aps.items()}
    return _write_matrix(
        cells,
        Path(out_dir),
        "per_class_ap",
        row_names=list(per_class),  # a class without values still gets its row of "-"
        corner="class",
        note=(
            "Mean average precision of each class's queries (rows) per descriptor / metric "
            "(columns); each class's best combination is in bold."
        ),
        higher_is_better=True,
        decimals=decimals,
    )


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def _new_figure() -> tuple[Figure, Axes]:
    """A figure on the Agg canvas: no pyplot, no GUI, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.0))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _style(i: int) -> dict[str, Any]:
    """Line ``i``'s look: colours cycle fastest, then line style and marker change together,
    so 40 lines stay distinct (and the same position gets the same look in every plot)."""
    group = i // len(_COLOURS)
    return {
        "color": _COLOURS[i % len(_COLOURS)],
        "linestyle": _LINESTYLES[group % len(_LINESTYLES)],
        "marker": _MARKERS[group % len(_MARKERS)],
        "markersize": 4,
        "linewidth": 1.6,
    }


def _finish(fig: Figure, ax: Axes, handles: list[Any], scores: list[float], out_path: Path) -> Path:
    """Legend outside the axes (so it never hides a curve), best line first; save the PNG."""
    order = sorted(
        range(len(handles)),
        key=lambda i: (not math.isfinite(scores[i]), -scores[i] if math.isfinite(scores[i]) else 0),
    )
    n = len(handles)
    ax.legend(
        [handles[i] for i in order],
        [handles[i].get_label() for i in order],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize="small" if n <= 10 else "x-small",
        ncol=1 if n <= 20 else 2,
        title="best first",
        title_fontsize="small",
    )
    ax.grid(True, alpha=0.3)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=PLOT_DPI, format="png", bbox_inches="tight")
    return out_path


def plot_pr_curves(
    curves: dict[str, np.ndarray],
    out_path: str | Path,
    *,
    title: str = "Precision-recall (11-point interpolated, mean over queries)",
) -> Path:
    """One interpolated precision-recall line per label (precision at recall 0, 0.1, ..., 1).

    Lines keep the style of their position in ``curves`` (pass the same order to both plots
    so a combination looks the same in each); the legend lists the largest area first.
    """
    if not curves:
        raise ValueError("no curves to plot")
    recall = np.linspace(0.0, 1.0, 11)
    fig, ax = _new_figure()
    handles, scores = [], []
    for i, (label, precision) in enumerate(curves.items()):
        p = np.asarray(precision, dtype=np.float64).ravel()
        if p.shape != (11,):
            raise ValueError(f"{label}: expected 11 precision values, got {p.size}")
        (line,) = ax.plot(recall, p, label=label, **_style(i))
        handles.append(line)
        scores.append(float(np.nanmean(p)) if np.isfinite(p).any() else math.nan)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(recall)
    ax.set_xlabel("Recall")
    ax.set_ylabel("Interpolated precision")
    ax.set_title(title)
    return _finish(fig, ax, handles, scores, Path(out_path))


def plot_precision_at_k(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    out_path: str | Path,
    *,
    title: str = "Precision at k (mean over queries)",
) -> Path:
    """Mean precision of the first k results against k, one line per label.

    This is what a user browsing results sees: how many of the first k are right. The x axis
    is logarithmic when the ks span more than two decades (1..1000), else linear.
    """
    if not curves:
        raise ValueError("no curves to plot")
    from matplotlib.ticker import FuncFormatter

    fig, ax = _new_figure()
    handles, scores = [], []
    lo, hi = math.inf, 0.0
    for i, (label, (ks, precision)) in enumerate(curves.items()):
        k = np.asarray(ks, dtype=np.float64).ravel()
        p = np.asarray(precision, dtype=np.float64).ravel()
        if k.shape != p.shape or k.size == 0:
            raise ValueError(f"{label}: {k.size} ks but {p.size} precision values")
        if (k <= 0).any():
            raise ValueError(f"{label}: k must be positive")
        lo, hi = min(lo, float(k.min())), max(hi, float(k.max()))
        (line,) = ax.plot(k, p, label=label, **_style(i))
        handles.append(line)
        scores.append(float(np.nanmean(p)) if np.isfinite(p).any() else math.nan)
    if hi / lo > 100:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("k (results examined)")
    ax.set_ylabel("Mean precision at k")
    ax.set_title(title)
    return _finish(fig, ax, handles, scores, Path(out_path))


# --------------------------------------------------------------------------------------------
# Mosaics
# --------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` (no font files); the bitmap font without FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _array_to_image(arr: np.ndarray) -> Image.Image:
    """Gray (H, W), (H, W, 1), RGB or RGBA arrays of any numeric type, to a PIL image.

    uint8 is taken as is, booleans as black / white, floats within [0, 1] are scaled by 255,
    anything else outside 0..255 is stretched from its minimum to its maximum.
    """
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"expected a (H, W), (H, W, 3) or (H, W, 4) array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError("empty image")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        f = np.nan_to_num(a.astype(np.float64))
        lo, hi = float(f.min()), float(f.max())
        if np.issubdtype(a.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
            f = f * 255.0
        elif lo < 0.0 or hi > 255.0:
            f = (f - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(f)
        a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Any image or array as RGB; transparency is flattened onto the letterbox colour."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = _array_to_image(image)
    elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = _array_to_image(np.asarray(image))
    if image.width == 0 or image.height == 0:
        raise ValueError("empty image")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, LETTERBOX_RGB)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _fit(image: Image.Image | np.ndarray, thumb: int) -> Image.Image:
    """The image in a ``thumb`` square, aspect kept, letterboxed.

    Enlarging by 2x or more uses nearest-neighbour so the pixels of small images (32x32
    CIFAR) stay crisp squares instead of a blur; shrinking uses Lanczos.
    """
    from PIL import Image

    img = _to_rgb(image)
    scale = thumb / max(img.width, img.height)
    size = (
        max(1, min(thumb, round(img.width * scale))),
        max(1, min(thumb, round(img.height * scale))),
    )
    if scale >= 2.0:
        resample = Image.Resampling.NEAREST
    elif scale > 1.0:
        resample = Image.Resampling.BICUBIC
    else:
        resample = Image.Resampling.LANCZOS
    if size != img.size:
        img = img.resize(size, resample)
    square = Image.new("RGB", (thumb, thumb), LETTERBOX_RGB)
    square.paste(img, ((thumb - size[0]) // 2, (thumb - size[1]) // 2))
    return square


def _shorten(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """``text`` cut with "..." so it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _mark(draw: ImageDraw.ImageDraw, x: int, y: int, size: int, relevant: bool) -> None:
    """A tick or a cross drawn with lines: relevance readable without telling red from green
    (and without relying on the bundled font's small character set)."""
    colour = RELEVANT_RGB if relevant else NOT_RELEVANT_RGB
    w = max(2, size // 5)
    if relevant:
        draw.line(
            [(x, y + size * 0.55), (x + size * 0.38, y + size * 0.9), (x + size, y + size * 0.1)],
            fill=colour,
            width=w,
        )
    else:
        draw.line([(x, y), (x + size, y + size)], fill=colour, width=w)
        draw.line([(x, y + size), (x + size, y)], fill=colour, width=w)


def make_mosaic(
    query: Image.Image | np.ndarray,
    results: list[tuple[Image.Image | np.ndarray, bool, float]],
    out_path: str | Path,
    *,
    thumb: int = 128,
    title: str | None = None,
    query_caption: str | None = None,
) -> Path:
    """The query and its ranked results in one PNG: the quickest way to see whether a
    combination's numbers match what a person would call similar.

    The query sits in its own column at the left with a blue frame and its caption ("query" by
    default); results follow left to right in rows of at most 10, each in a ``thumb`` square
    (aspect kept, letterboxed) with a thick green (relevant) or red (not relevant) frame, and
    under it a tick or cross, its rank and its score to 4 significant digits. ``results`` is
    ``[(image, relevant, score), ...]`` in rank order; images may be PIL images or gray / RGB
    arrays.
    """
    from PIL import Image, ImageDraw

    if thumb < 16:
        raise ValueError(f"thumb must be at least 16 pixels, got {thumb}")
    border = max(3, round(thumb * 0.05))
    pad = max(4, thumb // 16)
    gap = 3 * pad  # between the query column and the results
    font_size = max(10, round(thumb * 0.1))
    font = _font(font_size)
    caption_h = math.ceil(font_size * 1.5) + pad // 2
    cell_w = thumb + 2 * border
    cell_h = cell_w + caption_h
    title_font = _font(round(font_size * 1.25))
    title_h = math.ceil(font_size * 1.25 * 1.5) + pad if title else 0

    k = len(results)
    cols = min(MOSAIC_COLUMNS, k)
    rows = max(1, math.ceil(k / MOSAIC_COLUMNS))
    width = 2 * pad + cell_w + (gap + cols * cell_w + (cols - 1) * pad if k else 0)
    height = 2 * pad + title_h + rows * cell_h + (rows - 1) * pad
    canvas = Image.new("RGB", (width, height), CANVAS_RGB)
    draw = ImageDraw.Draw(canvas)

    if title:
        text = _shorten(draw, title, title_font, width - 2 * pad)
        draw.text((pad, pad), text, fill=TEXT_RGB, font=title_font)

    def cell(x: int, y: int, image: Image.Image | np.ndarray, colour: tuple[int, int, int]) -> None:
        draw.rectangle([x, y, x + cell_w - 1, y + cell_w - 1], fill=colour)
        canvas.paste(_fit(image, thumb), (x + border, y + border))

    top = pad + title_h
    text_y = top + cell_w + pad // 4
    cell(pad, top, query, QUERY_RGB)
    caption = _shorten(draw, query_caption or "query", font, cell_w)
    tx = pad + (cell_w - draw.textlength(caption, font=font)) / 2
    draw.text((tx, text_y), caption, fill=QUERY_RGB, font=font)
    if k:  # a thin rule between the query and its results
        rule_x = pad + cell_w + gap // 2
        draw.line([(rule_x, top), (rule_x, height - pad)], fill=LETTERBOX_RGB, width=1)

    mark = round(font_size * 0.8)
    for i, (image, relevant, score) in enumerate(results):
        x = pad + cell_w + gap + (i % MOSAIC_COLUMNS) * (cell_w + pad)
        y = top + (i // MOSAIC_COLUMNS) * (cell_h + pad)
        cell(x, y, image, RELEVANT_RGB if relevant else NOT_RELEVANT_RGB)
        text = _shorten(draw, f"#{i + 1}  {float(score):.4g}", font, cell_w - mark - 4)
        line_w = mark + 4 + draw.textlength(text, font=font)
        tx = x + (cell_w - line_w) / 2
        ty = y + cell_w + pad // 4
        _mark(draw, round(tx), round(ty + (font_size - mark) / 2 + 1), mark, bool(relevant))
        draw.text((tx + mark + 4, ty), text, fill=TEXT_RGB, font=font)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


# --------------------------------------------------------------------------------------------
# TREC files
# --------------------------------------------------------------------------------------------
def _check_id(value: Any, what: str) -> str:
    """trec_eval splits lines on whitespace, so an id with a space would shift every column."""
    text = str(value)
    if not text or any(ch.isspace() for ch in text):
        raise ValueError(f"{what} {text!r} is empty or contains whitespace; TREC ids cannot")
    return text


def write_trec_run(
    run: dict[str, list[tuple[str, float]]],
    path: str | Path,
    *,
    tag: str = "cbir",
) -> Path:
    """A TREC run file (``qid Q0 docno rank score tag``), readable by ``trec_eval``.

    ``run`` maps each query id to its results in rank order as ``(docno, score)`` with
    **higher score = better**: trec_eval ranks by score, not by the rank column, so retrieval
    distances must be turned into scores first (e.g. ``-distance``). Scores must therefore not
    increase down a list; a list that does raises ValueError, as do ids with whitespace,
    duplicate documents in one query, and non-finite scores. Equal scores are allowed, but note
    that trec_eval orders ties by docno, not by the order given here.
    """
    tag = _check_id(tag, "run tag")
    lines = []
    for qid, results in run.items():
        q = _check_id(qid, "query id")
        seen: set[str] = set()
        previous = math.inf
        for rank, (docno, score) in enumerate(results, start=1):
            d = _check_id(docno, f"document id (query {q}, rank {rank})")
            if d in seen:
                raise ValueError(f"query {q}: document {d!r} appears twice")
            seen.add(d)
            s = float(score)
            if not math.isfinite(s):
                raise ValueError(f"query {q}, rank {rank}: score {s} is not finite")
            if s > previous:
                raise ValueError(
                    f"query {q}: score rises from {previous!r} to {s!r} at rank {rank}; "
                    "scores must be descending (higher = better; use -distance)"
                )
            previous = s
            lines.append(f"{q} Q0 {d} {rank} {s!r} {tag}\n")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")
    return out


def write_trec_qrels(qrels: dict[str, set[str]], path: str | Path) -> Path:
    """A TREC qrels file (``qid 0 docno 1``, one line per relevant document, sorted).

    Only relevant documents are listed; trec_eval treats every unlisted one as not relevant.
    A query with no relevant documents writes no line (trec_eval then skips it).
    """
    lines = []
    for qid, relevant in qrels.items():
        q = _check_id(qid, "query id")
        docs = sorted(_check_id(d, f"document id (query {q})") for d in relevant)
        lines += [f"{q} 0 {d} 1\n" for d in docs]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")
    return out


def read_trec_run(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """A TREC run file back as ``{qid: [(docno, score), ...]}`` in rank order."""
    ranked: dict[str, list[tuple[int, str, float]]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise ValueError(f"{path}:{n}: expected 6 fields, got {len(fields)}")
            qid, _q0, docno, rank, score, _tag = fields
            ranked.setdefault(qid, []).append((int(rank), docno, float(score)))
    return {q: [(d, s) for _, d, s in sorted(items)] for q, items in ranked.items()}


def read_trec_qrels(path: str | Path) -> dict[str, set[str]]:
    """A TREC qrels file back as ``{qid: {relevant docno, ...}}`` (relevance > 0)."""
    qrels: dict[str, set[str]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4:
                raise ValueError(f"{path}:{n}: expected 4 fields, got {len(fields)}")
            qid, _iteration, docno, rel = fields
            docs = qrels.setdefault(qid, set())
            if int(rel) > 0:
                docs.add(docno)
    return qrels


# --------------------------------------------------------------------------------------------
# Recommendation
# --------------------------------------------------------------------------------------------
def _name(row: Mapping[str, Any]) -> str:
    return f"{row.get('descriptor', '?')} with {row.get('metric', '?')}"


def _speed_clause(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """When two combinations tie, speed decides; say which is faster if the rows know."""
    ta, tb = a.get("query ms"), b.get("query ms")
    if not (_finite(ta) and _finite(tb)) or float(ta) == float(tb):
        return "choose between them on speed or memory"
    fast, tf, ts = (a, ta, tb) if float(ta) < float(tb) else (b, tb, ta)
    return f"{_name(fast)} is the faster choice ({float(tf):.3g} vs {float(ts):.3g} ms per query)"


def recommend(
    rows: list[dict[str, Any]],
    *,
    by: str = "MAP",
    tie_absolute: float = 0.005,
    tie_relative: float = 0.01,
) -> dict[str, Any]:
    """The best (descriptor, metric) by ``by`` (higher = better), the runner-up and the margin.

    Returns ``{"by", "best", "runner_up", "margin", "relative_margin", "tied", "tied_count",
    "text"}``: ``best`` / ``runner_up`` are ``{"descriptor", "metric", "value"}`` (runner-up
    None with one row), ``margin`` is best - runner-up, ``relative_margin`` that divided by
    the runner-up's value (None when it is not positive). The two are "essentially tied" when
    the margin is below ``tie_relative`` (1%) relatively or ``tie_absolute`` (0.005) absolutely:
    differences that small rarely survive another sample of queries, and the text says so
    plainly. ``tied_count`` is how many other combinations are that close to the best.
    """
    scored = [r for r in rows if _finite(r.get(by))]
    if not scored:
        raise ValueError(f"no row has a finite {by!r} value to recommend by")
    ordered = sorted(scored, key=lambda r: -float(r[by]))  # stable: first given wins ties
    best = ordered[0]
    v1 = float(best[by])

    def entry(row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "descriptor": row.get("descriptor"),
            "metric": row.get("metric"),
            "value": float(row[by]),
        }

    def close(value: float) -> bool:
        margin = v1 - value
        eps = 1e-12  # 0.203 - 0.198 is 0.005000000000000004: compare with a little slack
        rel_small = value > 0 and margin / value < tie_relative - eps
        return margin < tie_absolute - eps or rel_small

    result: dict[str, Any] = {
        "by": by,
        "best": entry(best),
        "runner_up": None,
        "margin": None,
        "relative_margin": None,
        "tied": False,
        "tied_count": 0,
    }
    if len(ordered) == 1:
        result["text"] = f"{_name(best)} is the only combination evaluated ({by} {v1:.3f})."
        return result

    runner = ordered[1]
    v2 = float(runner[by])
    margin = v1 - v2
    relative = margin / v2 if v2 > 0 else None
    tied_count = sum(close(float(r[by])) for r in ordered[1:])
    tied = close(v2)
    rel_text = f" ({relative:.1%})" if relative is not None else ""
    if tied:
        others = tied_count - 1
        names = f"{_name(best)} and {_name(runner)}"
        also = (
            f" ({others} other combination{'s' if others > 1 else ''} within the same margin)"
            if others
            else ""
        )
        text = (
            f"{names} are essentially tied here{also} ({by} {v1:.3f} vs {v2:.3f}, "
            f"{margin:.4f}{rel_text} apart), so {_speed_clause(best, runner)}."
        )
    else:
        text = (
            f"{_name(best)} is best here ({by} {v1:.3f}), {margin:.3f}{rel_text} ahead of "
            f"{_name(runner)} ({v2:.3f})."
        )
    result.update(
        runner_up=entry(runner),
        margin=margin,
        relative_margin=relative,
        tied=tied,
        tied_count=tied_count,
        text=text,
    )
    return result
