"""Fuzzing the service's upload and search routes with Hypothesis, for a bounded number of
requests: malformed multipart bodies, wrong content types, random bytes as images, absurd k,
offsets, ids and boxes, large headers. Whatever comes in, the answer is a 4xx with a message or
a 200, never a 5xx, and comes back promptly."""

from __future__ import annotations

import io
import time
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cbir import Collection
from cbir.config import ServerSettings, Settings
from cbir.server import create_app
from tests.conftest import write_colour_set

#: Examples per fuzzed route: bounded so CI stays quick.
EXAMPLES = 150
#: The slowest answer allowed to any one request (a hang fails the test long before CI's cap).
PROMPT_SECONDS = 10.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    write_colour_set(root / "images", per_class=2)
    config = Settings(
        collection=root / "col",
        workers=1,
        default_descriptors=("color-hist",),
        server=ServerSettings(api_key="k", max_request_bytes=200_000, max_upload_pixels=4_000_000),
    )
    with Collection(config.collection, settings=config) as col:
        col.add(root / "images", labels="folder")
    with TestClient(create_app(config)) as c:
        yield c


def _valid_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _check(response, started: float) -> None:
    assert time.monotonic() - started < PROMPT_SECONDS
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert body["error"] and body["message"]


numbers = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.sampled_from(["", "nan", "inf", "-1", "1e9", "0x10", "abc", "1.5", " 3 "]),
)
boxes = st.one_of(
    st.none(),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=6).map(
        lambda v: ",".join(map(str, v))
    ),
    st.text(max_size=30),
)
images = st.one_of(
    st.binary(max_size=2000),
    st.integers(0, 1000).map(_valid_png),
    st.integers(0, 1000).map(lambda s: _valid_png(s)[: 20 + s % 60]),  # truncated
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff\xe0"]),
)


@FUZZ
@given(
    files=st.lists(
        st.tuples(st.text(max_size=20), images, st.sampled_from(["image/png", "text/html", ""])),
        max_size=3,
    ),
    k=numbers,
    offset=numbers,
    box=boxes,
    ids=st.lists(numbers, max_size=3),
    like=st.lists(numbers, max_size=3),
    descriptor=st.one_of(st.none(), st.sampled_from(["color-hist", "nope", "fusion:x=1", ""])),
    metric=st.one_of(st.none(), st.sampled_from(["chi2", "hamming", "nope", ""])),
)
def test_fuzz_search_by_upload(client, files, k, offset, box, ids, like, descriptor, metric):
    data: dict = {"k": str(k), "offset": str(offset), "id": [str(i) for i in ids]}
    data["like"] = [str(i) for i in like]
    if box is not None:
        data["box"] = box
    if descriptor is not None:
        data["descriptor"] = descriptor
    if metric is not None:
        data["metric"] = metric
    upload = [("files", (name or "f", content, ctype)) for name, content, ctype in files]
    started = time.monotonic()
    _check(client.post("/api/search", data=data, files=upload or None), started)


@FUZZ
@given(
    body=st.binary(max_size=3000),
    content_type=st.sampled_from(
        [
            "multipart/form-data; boundary=xyz",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "application/json",
            "application/x-www-form-urlencoded",
            "text/plain",
            "image/png",
            "",
        ]
    ),
    header=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=8000),
)
def test_fuzz_malformed_bodies(client, body, content_type, header):
    headers = {"x-fuzz": header}
    if content_type:
        headers["content-type"] = content_type
    started = time.monotonic()
    _check(client.post("/api/search", content=body, headers=headers), started)
    started = time.monotonic()
    _check(client.post("/api/explain", content=body, headers=headers), started)
    started = time.monotonic()
    _check(client.post("/api/images", content=body, headers={**headers, "x-api-key": "k"}), started)


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(["id", "k", "offset", "box", "label", "folder", "like", "unlike", "alpha"]),
        st.one_of(numbers.map(str), st.text(max_size=40)),
        max_size=6,
    ),
    image_id=st.one_of(st.integers(-(10**18), 10**18), st.text(max_size=20)),
)
def test_fuzz_query_strings(client, params, image_id):
    started = time.monotonic()
    _check(client.get("/api/search", params=params), started)
    for route in ("", "/thumbnail", "/file", "/duplicates"):
        started = time.monotonic()
        _check(client.get(f"/api/images/{quote(str(image_id), safe='')}{route}"), started)
