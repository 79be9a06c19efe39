"""CNN class probabilities (``cnnp``): a small classifier head trained on the collection's
labelled images, on top of the pretrained ``cnn`` embedding; an image's descriptor is what the
head says about it: its probability for each class (or, with ``output=hidden``, the head's
hidden layer, an embedding learned jointly with the classifier).

This is the "CNNp" of the retrieval literature: two images are close when the classifier sees the
same classes in them. It needs labels (``cbir index DIR --labels folder``) and is fitted on the
stored raw ``cnn`` vectors of the labelled images, so fitting decodes no image again.

How it trains (all fixed, so a fit is a function of the vectors, the labels and ``seed``):
inputs standardised per dimension; Linear(in, hidden) -> ReLU -> Dropout(0.3) ->
Linear(hidden, classes); cross-entropy, AdamW (weight decay 1e-2), learning rate ``lr`` decayed
along a cosine, minibatches of an eighth of the images (64 to 1024), ``epochs`` passes. A
stratified ``holdout`` of the labelled images is set aside and the head is trained once, on the
rest: the accuracy it reports is that of the head in use (``holdout=0`` trains on every labelled
image and reports none). Held-out and unlabelled images get their vectors like any other.
Inference is plain NumPy; only training needs PyTorch.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from cbir.features import _backbone
from cbir.features.base import DerivedDescriptor, DescriptorUnavailableError
from cbir.features.inputs import check_positive_int, is_int
from cbir.features.registry import get_descriptor_class, register_descriptor

OUTPUTS = ("proba", "hidden")
#: The fewest labelled images (in at least two classes) a head is trained on.
MIN_LABELLED = 10
_DROPOUT = 0.3
_WEIGHT_DECAY = 1e-2
_MAX_BATCH = 1024
_MIN_BATCH = 64
#: Standard deviations below this fraction of the typical one are raised to it: a dimension
#: that barely varies (a dead channel) is not blown up to unit variance.
_SCALE_FLOOR = 1e-2
_STATE_KEYS = ("mean", "scale", "w1", "b1", "w2", "b2", "classes")
_LABEL_HINT = (
    "label the images when indexing them: cbir index DIR --labels folder (one sub-folder per "
    "class), or Collection.add(..., labels={path: label})"
)


def _cnn_base(model: str, size: int, layers: tuple[int, ...]) -> Any:
    """The raw (stateless) ``cnn`` descriptor the head starts from; validates its parameters.
    Built from the class, not ``create_descriptor``, so it works without PyTorch installed."""
    return get_descriptor_class("cnn")(
        model=model, size=size, layers=layers, center=False, pca=0, whiten=False, augment=0
    )


@register_descriptor
class CNNProbabilities(DerivedDescriptor):
    """CNN class probabilities: a classifier head trained on the collection's labels (CNNp).

    A small network (one hidden layer of ``hidden`` units) is trained on the ``cnn`` embeddings
    of the labelled images (``cbir index DIR --labels folder``); an image's vector is its
    probability for each class (``classes_`` names them, in order), or the head's L2-normalised
    hidden layer with ``output=hidden``. ``holdout`` is the fraction of labelled images held out
    to report accuracy; ``epochs``, ``lr`` and ``seed`` drive the training.
    """

    name = "cnnp"
    aliases = ("cnn-proba",)
    # Probability vectors are distributions: the Hellinger distance compares them as such (a
    # true metric, in [0, 1], finite with zero probabilities), weighs the small probabilities
    # more than the Euclidean distance would, and runs as one matrix product. output=hidden
    # gives L2-normalised embeddings, compared by cosine (set per instance in __init__).
    default_metric = "hellinger"
    nonnegative: ClassVar[bool] = True  # softmax outputs and ReLU activations
    needs_labels: ClassVar[bool] = True
    requires_fit: ClassVar[bool] = True

    def __init__(
        self,
        model: str = "lite0",
        size: int = 288,
        layers: tuple[int, ...] = (5, 6, 7),
        output: str = "proba",
        hidden: int = 256,
        epochs: int = 30,
        lr: float = 1e-3,
        holdout: float = 0.1,
        seed: int = 0,
    ) -> None:
        base = _cnn_base(model, size, layers)  # raises for a bad model, size or layers
        if output not in OUTPUTS:
            raise ValueError(
                f"output must be one of {', '.join(OUTPUTS)} (class probabilities or the "
                f"hidden layer), got {output!r}"
            )
        check_positive_int("hidden", hidden, 2, 4096)
        check_positive_int("epochs", epochs, 1, 1000)
        if not _is_real(lr) or not 0 < lr <= 1:
            raise ValueError(f"lr (the learning rate) must be a number in (0, 1], got {lr!r}")
        if not _is_real(holdout) or not 0 <= holdout <= 0.5:
            raise ValueError(f"holdout must be a fraction in [0, 0.5], got {holdout!r}")
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.model = base.model
        self.size = base.size
        self.layers = base.layers
        self.output = output
        self.hidden = int(hidden)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.holdout = float(holdout)
        self.seed = int(seed)
        self._base_dim = int(base.dim)
        self._base_spec = base.spec
        if output == "hidden":
            self.default_metric = "cosine"  # type: ignore[misc]
        self.classes_: tuple[str, ...] = ()
        self._weights: dict[str, np.ndarray] = {}  # float32, as saved
        self._head: dict[str, np.ndarray] = {}  # the same in float64, for inference
        self.fit_report_: dict[str, Any] = {}

    @classmethod
    def missing_requirements(cls, params: dict[str, Any]) -> str | None:
        return _backbone.missing_requirements(params.get("model", "lite0"))

    # -- what it produces ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """``hidden`` for the hidden layer; for probabilities the number of classes, known once
        fitted (0 before: the store records the real one after the fit)."""
        if self.output == "hidden":
            return self.hidden
        return len(self.classes_)

    @property
    def base_spec(self) -> str:
        return self._base_spec

    # -- learning from the collection ---------------------------------------------------------
    def fit_vectors(
        self, vectors: np.ndarray, labels: Sequence[str | None] | None = None
    ) -> CNNProbabilities:
        started = time.perf_counter()
        x_all = self._check_vectors(vectors)
        if labels is None:
            raise ValueError(f"descriptor {self.name} learns from labels; {_LABEL_HINT}")
        if len(labels) != len(x_all):
            raise ValueError(f"got {len(x_all)} vectors but {len(labels)} labels")
        keep = np.array([lab is not None and str(lab) != "" for lab in labels], dtype=bool)
        names = [str(lab) for lab, k in zip(labels, keep, strict=True) if k]
        classes = sorted(set(names))
        if len(classes) < 2 or len(names) < MIN_LABELLED:
            raise ValueError(
                f"descriptor {self.name} trains a classifier on labelled images and needs at "
                f"least {MIN_LABELLED} of them in at least 2 classes; the collection has "
                f"{len(names)} labelled image(s) in {len(classes)} class(es): {_LABEL_HINT}"
            )
        rows = np.flatnonzero(keep)
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[c] for c in names], dtype=np.int64)

        train, held = _stratified_split(y, self.holdout, np.random.default_rng(self.seed))
        # One training, on the training part: the accuracy reported is the accuracy of the
        # head in use (holdout=0 trains on every labelled image and reports none). The held-out
        # images still get their vectors, like every image of the collection.
        self._set_weights(self._train(x_all[rows[train]], y[train], len(classes)))
        accuracy: float | None = None
        if len(held):
            predicted = self._logits(x_all[rows[held]]).argmax(1)
            accuracy = round(float(np.mean(predicted == y[held])), 4)
        self.classes_ = tuple(classes)
        self.fit_report_ = {
            "classes": len(classes),
            "labelled_images": len(rows),
            "train_images": len(train),
            "heldout_images": len(held),
            "heldout_accuracy": accuracy,
            "unlabelled_images": len(x_all) - len(rows),
            "seconds": round(time.perf_counter() - started, 2),
        }
        return self

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self._base_dim:
            raise ValueError(
                f"descriptor {self.name} expects ({self._base_dim},)-long vectors of "
                f"{self.base_spec}, got an array of shape {x.shape}"
            )
        if not np.isfinite(x).all():
            raise ValueError("vectors contain NaN or infinite values")
        return x

    def _train(self, x: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
        """Train a fresh head on ``x`` (standardised here) and ``y``; its weights as arrays."""
        try:
            import torch
            from torch import nn
        except ImportError:
            raise DescriptorUnavailableError(
                f"descriptor {self.name} needs PyTorch to train: {_backbone.INSTALL_HINT}"
            ) from None
        mean = x.mean(0, dtype=np.float64).astype(np.float32)
        standard = x - mean
        std = np.sqrt(np.square(standard).mean(0, dtype=np.float64))
        floor = max(float(np.median(std)), float(std.mean())) * _SCALE_FLOOR + 1e-12
        scale = np.maximum(std, floor).astype(np.float32)
        standard /= scale
        xs = torch.from_numpy(standard)
        ys = torch.from_numpy(y)
        n = len(xs)
        batch = int(np.clip(n // 8, _MIN_BATCH, _MAX_BATCH))
        steps = self.epochs * math.ceil(n / batch)
        # the process's global RNG is left as it was; every draw here follows from ``seed``
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            generator = torch.Generator().manual_seed(self.seed)
            net = nn.Sequential(
                nn.Linear(x.shape[1], self.hidden),
                nn.ReLU(),
                nn.Dropout(_DROPOUT),
                nn.Linear(self.hidden, n_classes),
            )
            optimiser = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=_WEIGHT_DECAY)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
            loss_fn = nn.CrossEntropyLoss()
            net.train()
            for _ in range(self.epochs):
                order = torch.randperm(n, generator=generator)
                for lo in range(0, n, batch):
                    rows = order[lo : lo + batch]
                    loss = loss_fn(net(xs[rows]), ys[rows])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    schedule.step()
        first, last = net[0], net[3]
        return {
            "mean": mean,
            "scale": scale,
            "w1": first.weight.detach().numpy().copy(),
            "b1": first.bias.detach().numpy().copy(),
            "w2": last.weight.detach().numpy().copy(),
            "b2": last.bias.detach().numpy().copy(),
        }

    def _set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self._weights = weights
        self._head = {k: v.astype(np.float64) for k, v in weights.items()}

    # -- the head at inference (NumPy) --------------------------------------------------------
    # In float64: BLAS sums a row's products in an order that depends on the batch (one image
    # or many). In float32 that changes the last bits of an image's vector; in float64 the
    # differences stay far below float32's resolution, so the float32 vectors agree.
    def _hidden(self, x: np.ndarray) -> np.ndarray:
        w = self._head
        h = ((x - w["mean"]) / w["scale"]) @ w["w1"].T
        h += w["b1"]
        return np.maximum(h, 0, out=h)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        w = self._head
        z = self._hidden(x) @ w["w2"].T
        z += w["b2"]
        return z

    def transform_vectors(self, vectors: np.ndarray) -> np.ndarray:
        if not self._weights:
            raise ValueError(f"descriptor {self.spec} must be fitted on a collection first")
        x = self._check_vectors(vectors)
        if self.output == "hidden":
            h = self._hidden(x)
            norm = np.linalg.norm(h, axis=1, keepdims=True)
            return (h / np.maximum(norm, 1e-12)).astype(np.float32)
        z = self._logits(x)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return p.astype(np.float32)

    # -- saved with the collection ------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        if not self._weights:
            return {}
        return {**self._weights, "classes": np.array(self.classes_, dtype=str)}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(
                f"saved state does not fit descriptor {self.spec}: no {', '.join(missing)}"
            )
        classes = tuple(str(c) for c in np.asarray(state["classes"]).reshape(-1))
        n, d, h = len(classes), self._base_dim, self.hidden
        shapes = {
            "mean": (d,),
            "scale": (d,),
            "w1": (h, d),
            "b1": (h,),
            "w2": (n, h),
            "b2": (n,),
        }
        weights = {k: np.asarray(state[k], dtype=np.float32) for k in shapes}
        wrong = [k for k, s in shapes.items() if weights[k].shape != s]
        if n < 2 or wrong:
            raise ValueError(
                f"saved state does not fit descriptor {self.spec} "
                f"({', '.join(wrong) or 'classes'} has the wrong shape)"
            )
        self._set_weights(weights)
        self.classes_ = classes


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _stratified_split(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out parts: about ``fraction`` of the images held out,
    shared among the classes in proportion to their size (largest remainders first), never a
    class's last training image. Both parts sorted."""
    counts = np.bincount(y)
    want = fraction * counts
    take = np.minimum(np.floor(want).astype(np.int64), np.maximum(counts - 1, 0))
    extra = round(fraction * len(y)) - int(take.sum())
    if extra > 0:
        # ties broken at random, so no class is favoured by its position
        order = np.lexsort((rng.random(len(counts)), -(want - np.floor(want))))
        for c in order:
            if extra == 0:
                break
            if take[c] < counts[c] - 1:
                take[c] += 1
                extra -= 1
    held = []
    for c, k in enumerate(take):
        if k:
            members = np.flatnonzero(y == c)
            held.append(rng.choice(members, int(k), replace=False))
    held_idx = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(y)), held_idx)
    return train_idx, held_idx
