"""Why a hit matched a query: the parts of the two that made them close.

What an explanation holds depends on the descriptor, because "why" means something different
for each:

- a fused descriptor (``fusion``): each block's share of the squared distance. Fusion's blocks
  are unit vectors scaled by sqrt(w_i / sum w), so ``||q - h||^2`` is exactly the sum of the
  blocks' terms: a share says how much that part (colour, texture, shape) kept them apart.
- a colour histogram (``color-hist``, ``color-regional``): the colour bins the two share most
  (the histogram intersection's largest terms), each as the colour at the bin's centre, so a
  page can show them as swatches.
- a CNN descriptor (``cnn``, ``cnn-hist``): a heat map over each image of the places whose
  feature-map vectors match the other image best (each position's best cosine similarity with
  any position of the other image, from the spatial maps of the stages the descriptor pools,
  averaged over those stages on the finest grid).

Every explanation also carries the distance under the metric asked for. Nothing here is fitted
or stored: it is computed for one pair on demand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import cv2
import numpy as np

from cbir import holdings
from cbir.extraction import extract_arrays
from cbir.features import Descriptor
from cbir.features.color import ColorHistogram, RegionalColorHistogram
from cbir.features.fusion import Fusion
from cbir.metrics import get_metric
from cbir.search.region import Region

if TYPE_CHECKING:
    from cbir.search.searcher import Query, Searcher
    from cbir.store import DescriptorRecord

#: Shared colours listed (the rest share less).
TOP_COLOURS = 8
#: Decimals kept in heat-map cells (a page shades them; more is noise in the JSON).
HEAT_DECIMALS = 3


@runtime_checkable
class SpatialDescriptor(Protocol):
    """A descriptor that pools feature maps (the CNN ones) and can show them before pooling."""

    layers: tuple[int, ...]
    input_spec: Any

    def spatial_maps(
        self, images: Sequence[np.ndarray], stages: Sequence[int] | None = None
    ) -> list[list[np.ndarray]]: ...


@dataclass(frozen=True)
class BlockShare:
    """One block of a fused descriptor: its part, weight and share of the squared distance."""

    part: str
    weight: float
    share: float
    squared_distance: float


@dataclass(frozen=True)
class SharedColour:
    """A colour bin both histograms hold: its centre colour and each image's mass in it."""

    hex: str
    rgb: tuple[int, int, int]
    shared: float
    query: float
    hit: float


@dataclass(frozen=True)
class HeatMaps:
    """How well each place of each image matches the other (0..1 on one scale for both)."""

    query: list[list[float]]
    hit: list[list[float]]
    stages: tuple[int, ...]


@dataclass(frozen=True)
class Explanation:
    """Why ``hit`` is close to the query under ``descriptor`` and ``metric``."""

    hit: int
    descriptor: str
    metric: str
    distance: float
    #: "blocks", "colours", "heatmap", or "distance" (a descriptor with nothing more to show)
    kind: str
    blocks: tuple[BlockShare, ...] = ()
    colours: tuple[SharedColour, ...] = ()
    #: for colour histograms: the histogram intersection (1: the same colours)
    overlap: float | None = None
    heatmaps: HeatMaps | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def explain(
    searcher: Searcher, query: Query, hit: int, record: DescriptorRecord, metric: str
) -> Explanation:
    """The explanation of one hit for a query (any query a search takes)."""
    vectors, _ = searcher.query_vectors(query, record)
    q = vectors.mean(axis=0, dtype=np.float64).astype(np.float32)
    h = searcher.stored_vectors(record, [hit])[0]
    distance = float(get_metric(metric).pairwise(q[None], h[None])[0, 0])
    descriptor = searcher.instance(record)
    base = dict(hit=hit, descriptor=holdings.short_label(record.spec), metric=metric)
    if isinstance(descriptor, Fusion):
        blocks = _blocks(descriptor, q, h)
        return Explanation(**base, distance=distance, kind="blocks", blocks=blocks)
    if isinstance(descriptor, ColorHistogram | RegionalColorHistogram):
        colours, overlap = _colours(descriptor, q, h)
        return Explanation(
            **base, distance=distance, kind="colours", colours=colours, overlap=overlap
        )
    if isinstance(descriptor, SpatialDescriptor):
        notes: list[str] = []
        maps = _heatmaps(searcher, descriptor, query, hit, notes)
        return Explanation(
            **base,
            distance=distance,
            kind="heatmap" if maps else "distance",
            heatmaps=maps,
            notes=tuple(notes),
        )
    return Explanation(
        **base,
        distance=distance,
        kind="distance",
        notes=(f"{base['descriptor']} has no parts to show; only the distance",),
    )


def _blocks(fusion: Fusion, q: np.ndarray, h: np.ndarray) -> tuple[BlockShare, ...]:
    terms = [float(np.sum((q[s] - h[s]) ** 2, dtype=np.float64)) for s in fusion.block_slices]
    total = sum(terms)
    top = max(fusion.weights)
    return tuple(
        BlockShare(
            part=holdings.short_label(part.spec),
            weight=w / top,
            share=t / total if total > 0 else 0.0,
            squared_distance=t,
        )
        for part, w, t in zip(fusion.part_descriptors, fusion.weights, terms, strict=True)
    )


#: OpenCV's conversion back to RGB, and each channel's number of uint8 values, by space.
_TO_RGB = {"hsv": cv2.COLOR_HSV2RGB, "lab": cv2.COLOR_LAB2RGB, "rgb": None}
_RANGE = {"hsv": (180, 256, 256), "rgb": (256, 256, 256), "lab": (256, 256, 256)}


def _colours(
    hist: ColorHistogram | RegionalColorHistogram, q: np.ndarray, h: np.ndarray
) -> tuple[tuple[SharedColour, ...], float]:
    """The bins the two histograms share most (a regional histogram's regions summed)."""
    n_bins = int(np.prod(hist.bins))
    qb = q.reshape(-1, n_bins).mean(axis=0, dtype=np.float64)
    hb = h.reshape(-1, n_bins).mean(axis=0, dtype=np.float64)
    shared = np.minimum(qb, hb)
    order = np.argsort(-shared, kind="stable")[:TOP_COLOURS]
    order = order[shared[order] > 0]
    if not len(order):
        return (), 0.0
    centres = np.stack(np.unravel_index(order, hist.bins), axis=1).astype(np.float64)
    ranges = np.asarray(_RANGE[hist.space], np.float64)
    pixels = ((centres + 0.5) * ranges / np.asarray(hist.bins)).astype(np.uint8)[None]
    code = _TO_RGB[hist.space]
    rgb = pixels[0] if code is None else cv2.cvtColor(pixels, code)[0]
    colours = tuple(
        SharedColour(
            hex="#{:02x}{:02x}{:02x}".format(*c),
            rgb=(int(c[0]), int(c[1]), int(c[2])),
            shared=float(shared[b]),
            query=float(qb[b]),
            hit=float(hb[b]),
        )
        for b, c in zip(order.tolist(), rgb.tolist(), strict=True)
    )
    return colours, float(shared.sum())


def _heatmaps(
    searcher: Searcher, descriptor: Descriptor, query: Query, hit: int, notes: list[str]
) -> HeatMaps | None:
    """Heat maps of the query image and the hit; None (with a note) when the query is not an
    image (vectors) or a file cannot be read."""
    items = query if isinstance(query, list | tuple) else [query]
    source = next((i for i in items if not isinstance(i, np.ndarray)), None)
    if source is None:
        notes.append("the query is vectors, not an image: no heat map")
        return None
    if len(items) > 1:
        notes.append("several query images: the heat map is of the first")
    box = None
    if isinstance(source, Region):
        source, box = source.source, source.box
    if isinstance(source, int | np.integer):
        source = searcher.catalogued(int(source)).path
    limits = searcher.settings.limits
    query_image = extract_arrays(source, descriptor, limits=limits, box=box)
    hit_image = extract_arrays(searcher.catalogued(hit).path, descriptor, limits=limits)
    assert isinstance(descriptor, SpatialDescriptor)
    maps = descriptor.spatial_maps([query_image, hit_image])
    return _match_maps(maps[0], maps[1], tuple(descriptor.layers))


def _match_maps(
    qmaps: list[np.ndarray], hmaps: list[np.ndarray], stages: tuple[int, ...]
) -> HeatMaps:
    """Each position's best cosine similarity with any position of the other image, per stage,
    resized to the finest grid and averaged over stages; one 0..1 scale for both images."""
    q_side = max(m.shape[1:] for m in qmaps)
    h_side = max(m.shape[1:] for m in hmaps)
    q_heat = np.zeros(q_side, np.float64)
    h_heat = np.zeros(h_side, np.float64)
    for qm, hm in zip(qmaps, hmaps, strict=True):
        Q = _unit_columns(qm.reshape(qm.shape[0], -1))
        H = _unit_columns(hm.reshape(hm.shape[0], -1))
        S = Q.T @ H  # (query positions, hit positions) cosine similarities
        q_heat += _resized(S.max(axis=1).reshape(qm.shape[1:]), q_side)
        h_heat += _resized(S.max(axis=0).reshape(hm.shape[1:]), h_side)
    lo = min(q_heat.min(), h_heat.min())
    span = max(q_heat.max(), h_heat.max()) - lo
    scale = 1.0 / span if span > 0 else 0.0
    return HeatMaps(
        query=np.round((q_heat - lo) * scale, HEAT_DECIMALS).tolist(),
        hit=np.round((h_heat - lo) * scale, HEAT_DECIMALS).tolist(),
        stages=stages,
    )


def _unit_columns(X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=0, keepdims=True), 1e-12)


def _resized(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if grid.shape == shape:
        return grid
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
