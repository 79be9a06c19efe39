"""The search service through FastAPI's test client: what each route answers, and every way a
request can be wrong, each with its status and a message. Only in-process (ASGI) traffic."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cbir import Collection
from cbir.config import ServerSettings, Settings
from cbir.server import create_app
from tests.conftest import COLOURS, colour_image, write_colour_set

KEY = "test-key-0123456789"
PER_CLASS = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("server")
    paths = write_colour_set(root / "images", per_class=PER_CLASS)
    extra = root / "later"
    extra.mkdir()
    rng = np.random.default_rng(7)
    for i in range(3):
        colour_image(COLOURS["green"], rng).save(extra / f"g{i}.png")
    settings = Settings(
        collection=root / "col",
        workers=1,
        default_descriptors=("color-hist", "phash", "fusion:parts=color-hist+lbp"),
        server=ServerSettings(api_key=KEY, roots=(root,), max_request_bytes=400_000),
    )
    col = Collection(settings.collection, settings=settings)
    col.add(root / "images", labels="folder")
    col.close()
    return root, settings, paths


@pytest.fixture(scope="module")
def client(world):
    _, settings, _ = world
    with TestClient(create_app(settings)) as c:
        yield c


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _two_colour(left: str, right: str) -> bytes:
    a = np.empty((64, 128, 3), np.uint8)
    a[:, :64] = COLOURS[left]
    a[:, 64:] = COLOURS[right]
    return _png(Image.fromarray(a))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG whose header claims ``width x height`` pixels (its data is one pixel)."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _upload(data: bytes, name: str = "q.png") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "image/png"))]


def _labels(answer: dict) -> list[str]:
    return [h["label"] for h in answer["hits"]]


# -- searching ---------------------------------------------------------------------------------
def test_search_by_upload_answers_the_search_result(client, world):
    _, _, paths = world
    r = client.post("/api/search", files=_upload(paths["red"][0].read_bytes()), data={"k": "5"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert _labels(answer) == ["red"] * 5
    assert answer["descriptors"] == ["color-hist"] and answer["metrics"] == ["hellinger"]
    assert answer["score"] == "distance" and answer["seconds"] > 0
    assert answer["server_seconds"] >= answer["seconds"]
    hit = answer["hits"][0]
    assert set(hit) == {"id", "name", "label", "score", "rank", "thumbnail_url", "image_url"}
    assert hit["name"] == "red/00.png" and hit["score"] == pytest.approx(0.0, abs=1e-6)
    assert "path" not in r.text and str(world[0]) not in r.text  # no server path anywhere


def test_the_hit_urls_serve_the_thumbnail_and_the_file(client, world):
    hit = client.get("/api/search", params={"id": 1, "k": 1}).json()["hits"][0]
    thumb = client.get(hit["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    again = client.get(hit["thumbnail_url"])
    assert again.content == thumb.content  # made once, kept
    file = client.get(hit["image_url"])
    name = hit["name"].split("/")
    assert file.content == (world[0] / "images" / name[0] / name[1]).read_bytes()
    assert file.headers["content-type"] in ("image/png", "image/jpeg")
    assert file.headers["x-content-type-options"] == "nosniff"


def test_search_by_ids_region_pages_filters_and_fusion(client):
    by_id = client.get("/api/search", params={"id": 1, "k": 4}).json()
    assert by_id["hits"][0]["id"] == 1 and len(set(_labels(by_id))) == 1
    both = client.get("/api/search", params={"id": [1, 2], "k": 4}).json()
    assert both["queries"] == 2
    page = client.get("/api/search", params={"id": 1, "k": 2, "offset": 2}).json()
    deeper = client.get("/api/search", params={"id": 1, "k": 4}).json()
    assert [h["id"] for h in page["hits"]] == [h["id"] for h in deeper["hits"]][2:4]
    assert [h["rank"] for h in page["hits"]] == [3, 4]
    only = client.get("/api/search", params={"id": 1, "k": 50, "label": "yellow"}).json()
    assert _labels(only) == ["yellow"] * PER_CLASS
    folder = client.get("/api/search", params={"id": 1, "k": 50, "folder": "blue"}).json()
    assert _labels(folder) == ["blue"] * PER_CLASS
    query = _two_colour("green", "yellow")
    left = client.post("/api/search", files=_upload(query), data={"box": "0,0,0.45,1", "k": 5})
    right = client.post("/api/search", files=_upload(query), data={"box": "0.55,0,1,1", "k": 5})
    assert _labels(left.json()) == ["green"] * 5 and _labels(right.json()) == ["yellow"] * 5
    fused = client.get(
        "/api/search", params={"id": 1, "k": 3, "descriptor": ["color-hist", "fusion"]}
    ).json()
    assert fused["fusion"] == "rrf" and fused["score"] == "rrf"


def test_feedback_refines_the_ranking(client):
    query = _two_colour("red", "blue")
    before = client.post("/api/search", files=_upload(query), data={"k": 10}).json()
    first = before["hits"][0]["label"]
    (other,) = {"red", "blue"} - {first}
    liked = [h["id"] for h in before["hits"] if h["label"] == other]
    assert liked, "the other colour is further down the first ranking"
    data = {"k": 5, "like": liked, "unlike": [before["hits"][0]["id"]]}
    after = client.post("/api/search", files=_upload(query), data=data).json()
    assert _labels(after) == [other] * 5
    assert after["feedback"] == {"like": len(liked), "unlike": 1}
    by_id = client.get("/api/search", params={"id": liked[0], "k": 5, "like": liked}).json()
    assert _labels(by_id) == [other] * 5


def test_explain_colours_and_blocks(client, world):
    _, _, paths = world
    hits = client.get("/api/search", params={"id": 1, "k": 2}).json()["hits"]
    colours = client.post("/api/explain", data={"id": 1, "hit": hits[1]["id"]}).json()
    assert colours["kind"] == "colours" and colours["colours"]
    top = colours["colours"][0]
    assert top["hex"].startswith("#") and len(top["hex"]) == 7
    assert 0 < colours["overlap"] <= 1 and top["shared"] <= min(top["query"], top["hit"]) + 1e-9
    blocks = client.post(
        "/api/explain", data={"id": 1, "hit": hits[1]["id"], "descriptor": "fusion"}
    ).json()
    assert blocks["kind"] == "blocks"
    assert [b["part"] for b in blocks["blocks"]] == ["color-hist", "lbp"]
    assert sum(b["share"] for b in blocks["blocks"]) == pytest.approx(1.0)
    upload = client.post(
        "/api/explain", files=_upload(paths["red"][0].read_bytes()), data={"hit": hits[0]["id"]}
    )
    assert upload.status_code == 200 and upload.json()["distance"] >= 0


def test_duplicates_by_a_hash(client):
    red = client.get("/api/images", params={"label": "red", "limit": 1}).json()["images"][0]
    answer = client.get(f"/api/images/{red['id']}/duplicates").json()
    assert answer["descriptors"] == ["phash"] and answer["metrics"] == ["hamming"]
    assert all(h["id"] != red["id"] for h in answer["hits"])
    assert all(h["score"] <= 6 for h in answer["hits"])
    none = client.get(f"/api/images/{red['id']}/duplicates", params={"descriptor": "color-hist"})
    assert none.status_code == 400 and "binary hash" in none.json()["message"]


def test_stats_and_listing(client):
    stats = client.get("/api/stats").json()
    assert stats["images"] >= 4 * PER_CLASS
    assert {"red", "green", "blue", "yellow"} <= set(stats["labels"])
    d = {x["label"]: x for x in stats["descriptors"]}
    assert d["phash"]["hash"] and not d["color-hist"]["hash"]
    assert "hellinger" in d["color-hist"]["metrics"] and stats["writes"] is True
    first = client.get("/api/images", params={"limit": 3}).json()
    second = client.get("/api/images", params={"limit": 3, "offset": 3}).json()
    assert first["total"] == stats["images"] and len(first["images"]) == 3
    assert {i["id"] for i in first["images"]}.isdisjoint(i["id"] for i in second["images"])


def test_the_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<html" in r.text.lower()
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/openapi.json").json()["paths"]["/api/search"]


# -- every error path ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "words"),
    [
        ("get", "/api/search", {"params": {"id": 1, "descriptor": "nope"}}, 400, "unknown"),
        ("get", "/api/search", {"params": {"id": 1, "metric": "nope"}}, 400, "unknown metric"),
        ("get", "/api/search", {"params": {"id": 1, "metric": "hamming"}}, 400, "hash bits"),
        ("get", "/api/search", {"params": {"id": "abc"}}, 422, "integer"),
        ("get", "/api/search", {"params": {"id": 987654}}, 404, "987654"),
        ("get", "/api/search", {"params": {"id": 1, "box": "0,0,2,1"}}, 400, "box"),
        ("get", "/api/search", {"params": {"id": 1, "box": "1,2,3"}}, 400, "box"),
        ("get", "/api/search", {"params": {"id": [1, 2], "box": "0,0,1,1"}}, 400, "one query"),
        ("get", "/api/search", {"params": {"id": 1, "k": 0}}, 400, "k must"),
        ("get", "/api/search", {"params": {"id": 1, "k": 10**9}}, 400, "k must"),
        ("get", "/api/search", {"params": {"id": 1, "offset": -1}}, 400, "offset"),
        ("get", "/api/search", {"params": {"id": 1, "combine": "max"}}, 400, "combine"),
        ("get", "/api/search", {"params": {"id": 1, "like": 1, "unlike": 1}}, 400, "both"),
        ("get", "/api/search", {"params": {"id": 1, "like": 987654}}, 404, "987654"),
        ("get", "/api/search", {"params": {"id": 1, "gamma": -1}}, 400, "gamma"),
        ("get", "/api/search", {"params": {}}, 400, "give a query"),
        ("get", "/api/images/987654", {}, 404, "987654"),
        ("get", "/api/images/987654/file", {}, 404, "987654"),
        ("get", "/api/images/987654/thumbnail", {}, 404, "987654"),
        ("get", "/api/images/1/thumbnail", {"params": {"side": 100000}}, 400, "side"),
        ("get", "/api/images/..%2F..%2Fetc%2Fpasswd/file", {}, 404, "not found"),
        ("get", "/api/images", {"params": {"limit": 100000}}, 422, "limit"),
        ("get", "/api/jobs/nope", {}, 404, "no job"),
        ("post", "/api/explain", {"data": {"id": 1, "hit": 987654}}, 404, "987654"),
        ("post", "/api/explain", {"data": {"id": 1}}, 422, "hit"),
    ],
)
def test_bad_requests(client, method, url, kwargs, status, words):
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "message"} and words.lower() in body["message"].lower()


def test_bad_uploads(client, world):
    _, settings, _ = world
    cap = settings.server.max_request_bytes
    not_image = client.post("/api/search", files=_upload(b"GIF89a but not really", "cat.png"))
    assert not_image.status_code == 400 and "not an image" in not_image.json()["message"]
    empty = client.post("/api/search", files=_upload(b""))
    assert empty.status_code == 400
    bomb = client.post("/api/search", files=_upload(_bomb_png(40_000, 40_000)))
    assert bomb.status_code == 413 and "megapixels" in bomb.json()["message"]
    big = client.post("/api/search", files=_upload(b"\x89PNG" + b"0" * cap))
    assert big.status_code == 413 and "limit" in big.json()["message"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield (
            b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        for _ in range(cap // 10_000 + 2):
            yield b"0" * 10_000

    chunked = client.post(
        "/api/search",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert chunked.status_code == 413, chunked.text
    many = client.post(
        "/api/search", files=[("files", ("a.png", b"x", "image/png"))] * 17, data={"k": 1}
    )
    assert many.status_code == 400 and "at most 16" in many.json()["message"]
    wrong_type = client.post("/api/search", content=b"{}", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 400 and "give a query" in wrong_type.json()["message"]


def test_writes_need_the_key(client, world):
    _, settings, _ = world
    no_key = client.delete("/api/images/1")
    assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["message"]
    wrong = client.delete("/api/images/1", headers={"x-api-key": KEY + "x"})
    assert wrong.status_code == 403 and wrong.json()["message"] == "wrong API key"
    up = client.post("/api/images", files=_upload(_png(Image.new("RGB", (8, 8)))))
    assert up.status_code == 401
    closed = replace(settings, server=replace(settings.server, api_key=None))
    with TestClient(create_app(closed)) as c:
        r = c.delete("/api/images/1", headers={"x-api-key": KEY})
        assert r.status_code == 403 and "CBIR_API_KEY" in r.json()["message"]
        assert c.get("/api/stats").json()["writes"] is False


def _wait(client, job: dict) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = client.get(job["url"]).json()
        if state["state"] in ("done", "failed"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job['id']} did not finish")


def test_add_folder_upload_and_delete(client, world):
    key = {"x-api-key": KEY}
    for bad in ("../..", "/etc", "red/../../..", "nope"):
        r = client.post("/api/images/folder", json={"folder": bad}, headers=key)
        assert r.status_code == 400 and "below one of the server's roots" in r.json()["message"]
    job = client.post("/api/images/folder", json={"folder": "later", "labels": None}, headers=key)
    assert job.status_code == 202
    done = _wait(client, job.json())
    assert done["state"] == "done" and done["report"]["added"] == 3
    found = client.get("/api/images", params={"folder": "later"}).json()
    assert found["total"] == 3
    # an upload, labelled, found by searching with itself
    image = _png(colour_image(COLOURS["yellow"], np.random.default_rng(3)))
    not_image = client.post("/api/images", files=_upload(b"no image"), headers=key)
    assert not_image.status_code == 400 and "upload 1" in not_image.json()["message"]
    job = client.post("/api/images", files=_upload(image), data={"label": "mine"}, headers=key)
    assert job.status_code == 202 and _wait(client, job.json())["report"]["added"] == 1
    hit = client.post("/api/search", files=_upload(image), data={"k": 1}).json()["hits"][0]
    assert hit["label"] == "mine" and hit["score"] == pytest.approx(0.0, abs=1e-6)
    gone = client.delete(f"/api/images/{hit['id']}", headers=key)
    assert gone.status_code == 200 and gone.json() == {"removed": 1}
    assert client.get(f"/api/images/{hit['id']}").status_code == 404
    again = client.delete(f"/api/images/{hit['id']}", headers=key)
    assert again.status_code == 404


def test_images_added_by_another_process_are_searchable(client, world, tmp_path):
    _, settings, _ = world
    before = client.get("/api/stats").json()["images"]
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    colour_image((250, 250, 250), np.random.default_rng(1)).save(folder / "white.png")
    with Collection(settings.collection, settings=settings) as other:  # as `cbir index` would
        other.add(folder, labels={str((folder / "white.png").resolve()): "white"})
    assert client.get("/api/stats").json()["images"] == before + 1
    white = _png(colour_image((250, 250, 250), np.random.default_rng(1)))
    hit = client.post("/api/search", files=_upload(white), data={"k": 1}).json()["hits"][0]
    assert hit["label"] == "white"


def test_uploads_arriving_together_are_described_in_batches(world):
    _, settings, paths = world
    app = create_app(replace(settings, server=replace(settings.server, batch_window=0.05)))
    service = app.state.service
    queries = [p.read_bytes() for c in COLOURS for p in paths[c][:3]]

    async def run() -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            answers = await asyncio.gather(
                *(c.post("/api/search", files=_upload(q), data={"k": 3}) for q in queries)
            )
        return [a.json() for a in answers]

    together = asyncio.run(run())
    assert service.batcher.images == len(queries)
    assert service.batcher.batches < len(queries) / 2
    with TestClient(app) as c:
        alone = [c.post("/api/search", files=_upload(q), data={"k": 3}).json() for q in queries]
    assert [[h["id"] for h in a["hits"]] for a in together] == [
        [h["id"] for h in a["hits"]] for a in alone
    ]


def test_a_bad_upload_in_a_batch_fails_alone(world):
    _, settings, paths = world
    app = create_app(replace(settings, server=replace(settings.server, batch_window=0.05)))
    good = paths["blue"][0].read_bytes()

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(
                c.post("/api/search", files=_upload(good), data={"k": 1}),
                c.post("/api/search", files=_upload(b"broken"), data={"k": 1}),
                c.post("/api/search", files=_upload(good), data={"k": 1}),
            )

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200, 400, 200]
    assert app.state.service.batcher.batches >= 1
    app.state.service.close()


def test_serve_without_the_extra_says_what_to_install(monkeypatch):
    import importlib.util

    from cbir.errors import UnavailableError
    from cbir.server import require_serve_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name)
    )
    with pytest.raises(UnavailableError, match=r"cbir\[serve\]"):
        require_serve_extra()


def test_a_path_is_never_taken_from_the_request(client, world):
    root, _, _ = world
    for probe in ("/api/images/0/file", "/static/../../../etc/passwd", "/static/%2e%2e/app.py"):
        r = client.get(probe)
        assert r.status_code in (404, 400, 422), probe
        assert "root:" not in r.text
    assert Path(root / "col").exists()
