"""Pretrained CNN descriptors: ``cnn`` (pooled embeddings of the last stages) and ``cnn-hist``
(per-channel statistics of feature maps at several depths).

Both run EfficientNet-Lite (``_backbone``) in batches, on the process's inference engine
(``_engines``: OpenVINO, ONNX Runtime or PyTorch; the vectors mean the same on each). What
``cnn`` does by default is what measured best on real data (docs/deep.md): the last three
stages of the network, each
average-pooled and L2-normalised, centred on the collection's mean and concatenated, then
augmented with its nearest neighbours in the collection. Both steps are learned from the
collection, so a collection stores the raw vectors too and derives the final ones from them;
``pca=`` and ``whiten=`` reduce and whiten the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, ClassVar

import cv2
import numpy as np
from scipy import sparse

from cbir.features import _backbone, _engines
from cbir.features.base import DerivedDescriptor, Descriptor
from cbir.features.inputs import as_rgb_uint8, check_positive_int
from cbir.features.registry import create_descriptor, register_descriptor
from cbir.images import InputSpec

POOLINGS = ("gap", "gem", "max")
#: Images whose longer side is below this fraction of ``size`` are not enlarged to ``size``
#: but to ``small_scale`` times their side (see :func:`target_side`).
_SMALL_FRACTION = 0.5


#: Channels after each stage (0-6: the MBConv stages, 7: the head) of each model.
STAGE_CHANNELS = {
    "lite0": (16, 24, 40, 80, 112, 192, 320, 1280),
    "lite1": (16, 24, 40, 80, 112, 192, 320, 1280),
    "lite2": (16, 24, 48, 88, 120, 208, 352, 1280),
}
#: GeM raises activations to the power p: those below this are raised to it first.
_GEM_FLOOR = 1e-6
#: Images per forward pass (it changes the speed, not the vectors, so it is no parameter).
BATCH = 32
#: Neighbourhood augmentation looks for neighbours among at most this many collection images
#: (a random sample beyond it), so its cost per image stays bounded on big collections: at
#: most ~0.2 GFLOP, 1.4 ms here, against ~20 ms for the network on a photo (docs/deep.md).
AUGMENT_REFERENCE_MAX = 50_000
#: Vectors augmented at a time (bounds the query x reference similarity block in memory).
_AUGMENT_ROWS = 1024
#: A reference vector this similar (cosine) to the one being augmented is the image itself.
_SELF_COSINE = 1.0 - 1e-4


def _check_common(model: str, size: int, precision: str) -> None:
    if model not in _backbone.MODELS:
        raise ValueError(f"model must be one of {', '.join(_backbone.MODELS)}, got {model!r}")
    check_positive_int("size", size, 32, 1024)
    if precision not in _backbone.PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(_backbone.PRECISIONS)}, got {precision!r}"
        )


def _check_layers(layers: tuple[int, ...]) -> tuple[int, ...]:
    layers = tuple(int(s) for s in layers)
    if not layers or any(s < 0 or s > 7 for s in layers) or len(set(layers)) != len(layers):
        raise ValueError(
            f"layers must be distinct stage numbers 0..7 (7 is the 1280-channel head, 0-6 the "
            f"MBConv stages), e.g. 5x6x7; got {layers!r}"
        )
    return layers


def target_side(height: int, width: int, size: int, small_scale: int) -> int:
    """The square side an image is resized to before the network.

    Photos go to ``size``. Tiny images (CIFAR's 32 px) are enlarged ``small_scale`` times
    instead, to a multiple of 32 (the network's stride), never past ``size``: enlarging 32 px
    to 224 px costs 12x the compute for no better retrieval (docs/deep.md).
    """
    side = max(height, width)
    if side >= _SMALL_FRACTION * size or small_scale <= 0:
        return size
    return int(min(size, max(64, -(-side * small_scale // 32) * 32)))


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class _DeepBase(Descriptor):
    """Shared by the CNN descriptors: the batched, size-grouped forward pass."""

    nonnegative: ClassVar[bool] = False

    model: str
    size: int
    precision: str
    small_scale: int
    layers: tuple[int, ...]

    @classmethod
    def missing_requirements(cls, params: dict[str, Any]) -> str | None:
        return _backbone.missing_requirements(params.get("model", "lite0"))

    @property
    def input_spec(self) -> InputSpec:
        # the longer side at most ``size``; each image is squared to its target side later
        return InputSpec(mode="RGB", max_side=self.size)

    def _stage_outputs(self, images: Sequence[np.ndarray], readout: _engines.Readout) -> Any:
        """Yield ``(indices, the readout's float32 outputs)`` per group of images that share a
        target side, ``BATCH`` images at a time, from the process's inference engine
        (``_engines``: which one does not change the vectors' meaning)."""
        arrays = [as_rgb_uint8(a) for a in images]
        sides = [target_side(a.shape[0], a.shape[1], self.size, self.small_scale) for a in arrays]
        for side in sorted(set(sides)):
            net = _engines.network(self.model, side, self.precision, readout)
            members = [i for i, s in enumerate(sides) if s == side]
            for lo in range(0, len(members), BATCH):
                idx = members[lo : lo + BATCH]
                batch = np.stack([_square(arrays[i], side) for i in idx])
                yield idx, net.features(batch)

    def spatial_maps(
        self, images: Sequence[np.ndarray], stages: Sequence[int] | None = None
    ) -> list[list[np.ndarray]]:
        """Per image, the ``(channels, h, w)`` feature map after each of ``stages`` (default:
        the descriptor's own ``layers``), before pooling: where in the image each feature is
        (for explanations). The image is squared as for its vector, so the map covers all of
        it, stretched."""
        wanted = tuple(stages if stages is not None else self.layers)
        out: list[list[np.ndarray]] = [[] for _ in images]
        for idx, maps in self._stage_outputs(images, _engines.Readout(wanted)):
            for j, i in enumerate(idx):
                out[i] = [np.asarray(m[j]) for m in maps]
        return out


def _square(image: np.ndarray, side: int) -> np.ndarray:
    if image.shape[0] == side and image.shape[1] == side:
        return image
    enlarge = side > max(image.shape[:2])
    interpolation = cv2.INTER_CUBIC if enlarge else cv2.INTER_AREA
    return cv2.resize(image, (side, side), interpolation=interpolation)


@register_descriptor
class CNNEmbedding(_DeepBase, DerivedDescriptor):
    """Pretrained EfficientNet-Lite embedding: pooled features of its last stages (semantics).

    ``layers`` are the stages pooled and concatenated (7 is the 1280-channel head); each block
    is L2-normalised. With ``center`` (the default), each block is centred on the collection's
    mean and normalised again, learned when the collection is indexed; ``pca`` keeps that many
    principal components of the collection and ``whiten`` divides them by their spread.

    ``augment=K`` (neighbourhood augmentation, "database-side augmentation" in Arandjelović &
    Zisserman 2012, Gordo et al. 2017) adds to each vector its ``K`` nearest neighbours among
    the collection's vectors, weighted by their cosine similarity to the power ``alpha``
    (Radenović et al.'s alpha-weighting, which keeps the far ones from counting much). Images
    of one kind then share their neighbours' features and move together; queries get the same
    step, against the same fitted neighbours. It lifts class-level retrieval and costs a little
    where an image has only one or two of its kind in the collection (the figures are in
    docs/deep.md; ``augment=0`` turns it off).
    """

    name = "cnn"
    aliases = ("cnn-embedding",)
    default_metric = "cosine"

    def __init__(
        self,
        model: str = "lite0",
        size: int = 288,
        layers: tuple[int, ...] = (5, 6, 7),
        pool: str = "gap",
        p: float = 3.0,
        center: bool = True,
        pca: int = 0,
        whiten: bool = False,
        precision: str = "bf16",
        small_scale: int = 5,
        augment: int = 20,
        alpha: float = 3.0,
    ) -> None:
        _check_common(model, size, precision)
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {', '.join(POOLINGS)}, got {pool!r}")
        if not 1.0 <= float(p) <= 16.0:
            raise ValueError(f"p (the GeM exponent) must be in 1..16, got {p!r}")
        check_positive_int("pca", pca, 0, 4096)
        check_positive_int("small_scale", small_scale, 0, 32)
        if whiten and not pca:
            raise ValueError("whiten needs pca=N (the number of components to keep and whiten)")
        check_positive_int("augment", augment, 0, 1000)
        if not 0.0 <= float(alpha) <= 16.0:
            raise ValueError(
                f"alpha (the neighbour weight exponent) must be in 0..16, got {alpha!r}"
            )
        self.model = model
        self.size = int(size)
        self.layers = _check_layers(layers)
        self.pool = pool
        self.p = float(p)
        self.center = bool(center)
        self.pca = int(pca)
        self.whiten = bool(whiten)
        self.precision = precision
        self.small_scale = int(small_scale)
        self.augment = int(augment)
        self.alpha = float(alpha)
        self._mean: list[np.ndarray] | None = None
        self._components: np.ndarray | None = None
        self._offset: np.ndarray | None = None
        self._scale: np.ndarray | None = None
        self._reference: np.ndarray | None = None
        self._reference_norm: np.ndarray | None = None

    # -- what it produces ---------------------------------------------------------------------
    @property
    def block_dims(self) -> list[int]:
        return [STAGE_CHANNELS[self.model][s] for s in self.layers]

    @property
    def raw_dim(self) -> int:
        return sum(self.block_dims)

    @property
    def dim(self) -> int:
        return self.pca or self.raw_dim

    @property
    def requires_fit(self) -> bool:  # type: ignore[override]
        return self.center or self.pca > 0 or self.augment > 0

    @property
    def base_spec(self) -> str:
        params = {**self.get_params(), "center": False, "pca": 0, "whiten": False, "augment": 0}
        return create_descriptor(self.name, **params).spec

    # -- raw vectors ----------------------------------------------------------------------------
    def transform_raw(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Pooled, per-block L2-normalised features, before any collection-fitted step."""
        out = np.empty((len(images), self.raw_dim), dtype=np.float32)
        # average pooling happens inside the network; the others on its maps
        readout = _engines.Readout(self.layers, "mean" if self.pool == "gap" else "maps")
        for idx, outputs in self._stage_outputs(images, readout):
            blocks = [_l2(o if self.pool == "gap" else self._pool(o)) for o in outputs]
            out[idx] = np.concatenate(blocks, axis=1)
        return out

    def _pool(self, fmap: np.ndarray) -> np.ndarray:
        if self.pool == "max":
            return fmap.max((2, 3))
        # GeM (Radenović et al.): a learned-free middle ground between average and max.
        return (np.maximum(fmap, _GEM_FLOOR) ** self.p).mean((2, 3)) ** (1.0 / self.p)

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not self.requires_fit:
            return self.transform_raw(images)
        if not self.fitted:
            raise ValueError(f"descriptor {self.spec} must be fitted on a collection first")
        return self.transform_vectors(self.transform_raw(images))

    @property
    def base(self) -> Descriptor:
        if not self.requires_fit:
            return self
        return super().base

    # -- learned from the collection ---------------------------------------------------------------
    def _split(self, vectors: np.ndarray) -> list[np.ndarray]:
        edges = np.cumsum([0, *self.block_dims])
        return [vectors[:, a:b] for a, b in itertools.pairwise(edges)]

    def _centred(self, vectors: np.ndarray) -> np.ndarray:
        blocks = self._split(np.asarray(vectors, dtype=np.float32))
        if self.center and self._mean is not None:
            blocks = [_l2(b - m) for b, m in zip(blocks, self._mean, strict=True)]
        return np.concatenate(blocks, axis=1)

    def fit_vectors(
        self, vectors: np.ndarray, labels: Sequence[str | None] | None = None
    ) -> CNNEmbedding:
        vectors = np.asarray(vectors, dtype=np.float32)
        self.fit_report_ = {"images": len(vectors)}
        self._mean = [b.mean(0) for b in self._split(vectors)] if self.center else None
        self._components = self._reference = self._reference_norm = None
        if self.pca:
            x = self._centred(vectors).astype(np.float64)
            if self.pca > min(x.shape):
                raise ValueError(
                    f"pca={self.pca} needs at least {self.pca} images and dimensions; the "
                    f"collection has {x.shape[0]} images of {x.shape[1]} dimensions"
                )
            mu = x.mean(0)
            _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
            self._components = vt[: self.pca].astype(np.float32)
            self._offset = mu.astype(np.float32)
            spread = s[: self.pca] / np.sqrt(max(len(x) - 1, 1))
            self._scale = (1.0 / np.maximum(spread, 1e-6 * spread[0])).astype(np.float32)
        if self.augment:
            if len(vectors) > AUGMENT_REFERENCE_MAX:
                rng = np.random.default_rng(0)
                keep = np.sort(rng.choice(len(vectors), AUGMENT_REFERENCE_MAX, replace=False))
                vectors = vectors[keep]
            # half precision: the neighbours and their weights change by ~1e-3, the file halves
            self._reference = self._reduced(vectors).astype(np.float16)
            self.fit_report_["neighbour_pool"] = len(self._reference)
        return self

    def _reduced(self, vectors: np.ndarray) -> np.ndarray:
        """Centred (and PCA-reduced, whitened) vectors: everything but the augmentation."""
        x = self._centred(vectors)
        if self.pca and self._components is not None:
            x = (x - self._offset) @ self._components.T
            if self.whiten:
                x = x * self._scale
            x = _l2(x)
        return x.astype(np.float32)

    def _normalised(self, x: np.ndarray) -> np.ndarray:
        """Unit blocks (unit vector after PCA), as the vectors were before augmenting."""
        if self.pca:
            return _l2(x)
        return np.concatenate([_l2(b) for b in self._split(x)], axis=1)

    def _augmented(self, x: np.ndarray) -> np.ndarray:
        """``x`` plus its ``augment`` nearest reference vectors, each weighted by its cosine
        similarity to the power ``alpha``; the image itself, when it is in the reference set,
        is counted once (as ``x``), not twice."""
        if self._reference is None or not len(self._reference):
            return x
        if self._reference_norm is None:  # once per loaded state, not per call
            self._reference = self._reference.astype(np.float32)
            norm = np.linalg.norm(self._reference, axis=1)
            self._reference_norm = np.maximum(norm, 1e-12)
        reference, norm = self._reference, self._reference_norm
        k = min(self.augment + 1, len(reference))
        out = np.empty_like(x)
        for lo in range(0, len(x), _AUGMENT_ROWS):
            part = x[lo : lo + _AUGMENT_ROWS]
            # Plain float32 inner products of unit rows and a partial sort: the general
            # ExactIndex computes exact float64 distances, 3x slower, and only the nearest few
            # and rough weights matter here (the reference set is capped, so this is bounded).
            cosine = _l2(part) @ reference.T
            cosine /= norm
            idx = np.argpartition(-cosine, k - 1, axis=1)[:, :k]
            cosine = np.take_along_axis(cosine, idx, axis=1)
            order = np.argsort(-cosine, axis=1, kind="stable")
            idx = np.take_along_axis(idx, order, axis=1)
            cosine = np.take_along_axis(cosine, order, axis=1)
            itself = cosine > _SELF_COSINE
            weight = np.maximum(cosine, 0.0) ** self.alpha
            weight[itself] = 0.0
            # K neighbours besides the image itself: the (K+1)-th only when it was not found
            weight[np.cumsum(~itself, axis=1) > self.augment] = 0.0
            rows = np.repeat(np.arange(len(part)), k)
            mix = sparse.csr_matrix(
                (weight.ravel(), (rows, idx.ravel())), shape=(len(part), len(reference))
            )
            out[lo : lo + len(part)] = part + mix @ reference
        return self._normalised(out)

    def transform_vectors(self, vectors: np.ndarray) -> np.ndarray:
        x = self._reduced(vectors)
        if self.augment:
            x = self._augmented(x)
        return x.astype(np.float32)

    @property
    def fitted(self) -> bool:
        # what ``bool(get_state())`` says, without converting the neighbour pool (tens of MB)
        # at every ``transform``
        return not self.requires_fit or any(
            part is not None for part in (self._mean, self._components, self._reference)
        )

    def get_state(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        if self._mean is not None:
            state["mean"] = np.concatenate(self._mean)
        if self._components is not None:
            state.update(components=self._components, offset=self._offset, scale=self._scale)
        if self._reference is not None:
            state["reference"] = self._reference.astype(np.float16)
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        def misfit() -> ValueError:
            return ValueError(
                f"saved state does not fit descriptor {self.spec}; refit it: "
                f"cbir fit -d '{self.short_spec}'"
            )

        if self.center:
            if "mean" not in state or state["mean"].shape != (self.raw_dim,):
                raise misfit()
            self._mean = [m[0] for m in self._split(state["mean"][None, :])]
        if self.pca:
            if "components" not in state:
                raise misfit()
            self._components = state["components"]
            self._offset = state["offset"]
            self._scale = state["scale"]
        if self.augment:
            reference = state.get("reference")
            if reference is None or reference.ndim != 2 or reference.shape[1] != self.dim:
                raise misfit()
            self._reference, self._reference_norm = reference, None


@register_descriptor
class CNNStatistics(_DeepBase):
    """Multi-level CNN fusion: per-channel mean and spread of feature maps from early (texture,
    colour) to late (semantic) stages, each block normalised, concatenated."""

    name = "cnn-hist"
    aliases = ("cnn-multilevel",)
    default_metric = "cosine"

    def __init__(
        self,
        model: str = "lite0",
        size: int = 224,
        layers: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7),
        precision: str = "bf16",
        small_scale: int = 5,
    ) -> None:
        _check_common(model, size, precision)
        check_positive_int("small_scale", small_scale, 0, 32)
        self.model = model
        self.size = int(size)
        self.layers = _check_layers(layers)
        self.precision = precision
        self.small_scale = int(small_scale)

    @property
    def dim(self) -> int:
        return sum(2 * STAGE_CHANNELS[self.model][s] for s in self.layers)

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        n_blocks = 2 * len(self.layers)
        readout = _engines.Readout(self.layers, "mean_std")  # the sample deviation
        for idx, outputs in self._stage_outputs(images, readout):
            # every statistic of every stage counts equally, whatever its channel count
            blocks = [_l2(o) for o in outputs]
            out[idx] = np.concatenate(blocks, axis=1) / np.sqrt(n_blocks)
        return out
