"""Early fusion: one descriptor made of several others, each block normalised and weighted.

A descriptor spec is ``name:k=v,k=v`` and :func:`~cbir.features.registry.parse_spec` splits it
on ``,``, so the parts are written in a nested syntax that contains no comma: parts separated
by ``+``, a part's own parameters in square brackets separated by ``;``::

    fusion:parts=color-hist+lbp[P=16;R=2],weights=1x2

Every block is embedded so that the Euclidean distance suits the part (Hellinger for
histograms) and has unit length, then scaled by ``sqrt(weight / sum(weights))``. The squared
Euclidean distance between two fusion vectors is therefore the weighted mean of the parts'
squared block distances: each part counts as much as its weight says, whatever its dimension.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from cbir.features.base import Descriptor
from cbir.features.registry import (
    create_descriptor,
    descriptor_names,
    format_spec,
    get_descriptor_class,
    register_descriptor,
)
from cbir.images import ImageError, InputSpec, from_array, prepare_arrays
from cbir.metrics import get_metric
from cbir.metrics.vector import unit_rows

#: How each block is embedded (see :class:`Fusion`).
NORMS = ("auto", "l2")

_PART = re.compile(r"^([^\s\[\]:;,=+]+)\s*(?:\[([^\[\]]*)\])?$")
#: Characters of the nested syntax, which a part's own parameter values must not contain.
_SYNTAX = set("+[];")
_SYNTAX_HELP = (
    "parts are separated by '+', a part's parameters go in square brackets separated by ';', "
    "e.g. parts=color-hist+lbp[P=16;R=2]"
)


def split_parts(text: str) -> list[str]:
    """``"a+b[k=v;k=w]+c"`` to ``["a", "b[k=v;k=w]", "c"]``: split on ``+`` outside brackets."""
    items: list[str] = []
    depth = start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"parts {text!r}: brackets cannot nest; {_SYNTAX_HELP}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"parts {text!r}: ']' without '['; {_SYNTAX_HELP}")
        elif ch == "+" and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise ValueError(f"parts {text!r}: '[' is never closed; {_SYNTAX_HELP}")
    items.append(text[start:].strip())
    if any(not item for item in items):
        raise ValueError(f"parts {text!r} has an empty part; {_SYNTAX_HELP}")
    return items


def part_spec(item: str) -> str:
    """One part of the nested syntax (``lbp[P=16;R=2]``) as an ordinary spec (``lbp:P=16,R=2``)."""
    match = _PART.match(item)
    if not match:
        raise ValueError(f"part {item!r} is not of the form name or name[k=v;k=v]; {_SYNTAX_HELP}")
    name, inner = match.groups()
    # "," is accepted too inside brackets, for parts given from Python rather than a spec string
    params = [p.strip() for p in re.split(r"[;,]", inner or "") if p.strip()]
    return f"{name}:{','.join(params)}" if params else name


def nested_text(descriptor: Descriptor, *, short: bool = False) -> str:
    """A descriptor's canonical spec in the nested syntax: ``name[k=v;k=v]`` (with ``short``,
    only the parameters that differ from their defaults, as in :attr:`Descriptor.short_spec`)."""
    name, _, rest = (descriptor.short_spec if short else descriptor.spec).partition(":")
    if _SYNTAX & set(rest):
        raise ValueError(
            f"descriptor {descriptor.spec!r} cannot be a fusion part: its parameter values "
            f"contain one of {' '.join(sorted(_SYNTAX))}, which the parts syntax uses"
        )
    return f"{name}[{rest.replace(',', ';')}]" if rest else name


def _fit_free_names() -> list[str]:
    """Descriptors that can be parts with their defaults: no fitting, and not fusion itself."""
    names = []
    for name in descriptor_names():
        cls = get_descriptor_class(name)
        try:
            needs_fit = cls().requires_fit
        except Exception:  # a plug-in that cannot even be built with its defaults is no option
            continue
        if cls is not Fusion and not needs_fit:
            names.append(name)
    return names


def _build_part(item: str | Descriptor) -> Descriptor:
    """Create one part (from nested text, an ordinary spec or a descriptor) and check it."""
    if isinstance(item, Descriptor):
        spec = item.spec
    elif isinstance(item, str):
        # "name:k=v,..." is an ordinary spec (Python callers); anything else is nested text
        spec = item.strip() if ":" in item else part_spec(item.strip())
    else:
        raise ValueError(f"a fusion part must be a descriptor spec (text), got {item!r}")
    try:
        if get_descriptor_class(spec.partition(":")[0].strip()) is Fusion:
            raise ValueError(
                f"a fusion part cannot be a fusion ({item!r}); list all the parts in one fusion"
            )
        part = create_descriptor(spec)
    except ValueError as exc:
        raise ValueError(f"fusion part {item!r}: {exc}") from exc
    if part.requires_fit:
        raise ValueError(
            f"fusion part {part.spec!r} must first be fitted on a collection (requires_fit), "
            "which fusion does not support yet; parts that need no fitting: "
            f"{', '.join(_fit_free_names())} (or switch the part's fitted steps off, e.g. "
            "cnn[center=false;augment=0])"
        )
    return part


def _check_weights(weights: Any, n_parts: int, parts: str) -> tuple[float, ...]:
    """One weight per part (a single weight applies to every part), each >= 0, not all 0,
    divided by the largest so weights that differ only by a factor give the same spec."""
    values = (weights,) if isinstance(weights, int | float | np.number) else weights
    try:
        values = tuple(float(w) for w in values)
    except (TypeError, ValueError):
        raise ValueError(
            f"weights must be numbers, one per part, written like 1x0.5x2; got {weights!r}"
        ) from None
    if len(values) == 1:
        values = values * n_parts
    if len(values) != n_parts:
        raise ValueError(
            f"weights has {len(values)} values but there are {n_parts} parts ({parts}); "
            "give one weight per part (e.g. weights=" + "x".join(["1"] * n_parts) + ") or one "
            "weight for all"
        )
    if not all(math.isfinite(w) and w >= 0 for w in values) or max(values) == 0:
        raise ValueError(
            f"weights must be finite numbers >= 0, at least one of them > 0; got "
            f"{'x'.join(f'{w:g}' for w in values)}"
        )
    top = max(values)
    # 6 significant digits keep the spec readable (1/3 -> 0.333333) and are stable on re-parsing
    return tuple(float(f"{w / top:.6g}") for w in values)


def block_kind(part: Descriptor, norm: str = "auto") -> str:
    """How a part's block is embedded: "hellinger", "sign" or "l2" (see :class:`Fusion`)."""
    if norm == "l2":
        return "l2"
    cls = type(part)
    if cls.binary:
        return "sign"
    if cls.nonnegative and get_metric(cls.default_metric).nonnegative:
        return "hellinger"
    return "l2"


#: The metric whose index embedding (its route, :class:`cbir.metrics.base.Route`) embeds each
#: kind of block: one mechanism for early fusion and for approximate indexes.
BLOCK_METRICS = {"hellinger": "hellinger", "sign": "hamming", "l2": "cosine"}


def embed_block(vectors: np.ndarray, kind: str) -> np.ndarray:
    """``(n, d)`` part vectors to unit-length rows (float64) for the given ``kind``: the
    index embedding of the block's metric, scaled to unit length."""
    X = np.asarray(vectors, dtype=np.float64)
    if kind == "hellinger":
        X = np.maximum(X, 0.0)  # a part's rounding just below zero is not a negative bin
    return unit_rows(get_metric(BLOCK_METRICS[kind]).route.embed(X))


@register_descriptor
class Fusion(Descriptor):
    """Early fusion of several descriptors (e.g. colour + texture + shape), each weighted.

    ``parts``: descriptors separated by ``+``, each with its parameters in brackets separated
    by ``;`` (``color-hist+lbp[P=16;R=2]``); stored as the parts' full canonical specs.
    ``weights``: one per part (``2x1``), or one for all; stored divided by the largest.
    ``norm``: ``auto`` embeds each block so Euclidean distance suits the part: histograms (a
    non-negative part whose default metric is a distribution metric) become the square root
    of the L1-normalised histogram (Hellinger embedding), hash bits become +-1/sqrt(d), and
    anything else is L2-normalised; ``l2`` L2-normalises every block as it is.

    Each block u_i has unit length (a zero L2 block stays zero) and is scaled by
    sqrt(w_i / sum w), so ``||f(x) - f(y)||^2 = sum_i (w_i / sum w) ||u_i(x) - u_i(y)||^2``
    where ``||u_i(x) - u_i(y)||^2`` is ``2 * hellinger^2`` for histograms, ``4 * hamming / d``
    for bits and ``2 * cosine distance`` otherwise. Parts that must be fitted on a collection
    cannot be used yet.
    """

    name = "fusion"
    # Euclidean distance is exactly the weighted combination above. The vector has unit length
    # (unless a block is zero), so cosine would rank the same; euclidean keeps it exact.
    default_metric = "euclidean"
    # a part may be signed (glcm, fotf) and auto-embedded bits are +-1; the registry reads this
    # from the class, so it must hold for every fusion
    nonnegative: ClassVar[bool] = False
    binary: ClassVar[bool] = False

    def __init__(
        self,
        parts: str = "color-regional+lbp+hog",
        weights: tuple[float, ...] = (1.0,),
        norm: str = "auto",
    ) -> None:
        if isinstance(parts, str):
            items: Sequence[str | Descriptor] = split_parts(parts)
        elif isinstance(parts, Sequence) and all(isinstance(p, str | Descriptor) for p in parts):
            items = parts
        else:
            raise ValueError(f"parts must be text like color-hist+lbp[P=16;R=2], got {parts!r}")
        if len(items) < 2:
            raise ValueError(
                f"fusion needs at least 2 parts, got {len(items)} ({parts!r}); use a single "
                f"descriptor's own spec instead, or add parts: {_SYNTAX_HELP}"
            )
        self._parts = tuple(_build_part(item) for item in items)
        texts = [nested_text(p) for p in self._parts]
        repeated = sorted({t for t in texts if texts.count(t) > 1})
        if repeated:
            raise ValueError(
                f"fusion part {repeated[0]!r} is listed twice; list it once and give it a "
                "larger weight instead"
            )
        self.parts = "+".join(texts)
        self.weights = _check_weights(weights, len(self._parts), self.parts)
        if not isinstance(norm, str) or norm.lower() not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.norm = norm.lower()

    @property
    def short_spec(self) -> str:
        params: dict[str, Any] = {}
        if self.parts != Fusion().parts:
            params["parts"] = "+".join(nested_text(p, short=True) for p in self._parts)
        if len(set(self.weights)) > 1:
            params["weights"] = self.weights
        if self.norm != "auto":
            params["norm"] = self.norm
        return format_spec(self.name, params)

    # -- structure ------------------------------------------------------------------------------
    @property
    def part_descriptors(self) -> tuple[Descriptor, ...]:
        """The part descriptors, in order."""
        return self._parts

    @property
    def block_slices(self) -> list[slice]:
        """Where each part's block lies in the fused vector."""
        ends = itertools.accumulate((p.dim for p in self._parts), initial=0)
        return [slice(a, b) for a, b in itertools.pairwise(ends)]

    @property
    def block_kinds(self) -> list[str]:
        """How each block is embedded: "hellinger", "sign" or "l2"."""
        return [block_kind(p, self.norm) for p in self._parts]

    @property
    def scales(self) -> list[float]:
        """sqrt(w_i / sum w): the factor of each unit-length block."""
        total = sum(self.weights)
        return [math.sqrt(w / total) for w in self.weights]

    @property
    def dim(self) -> int:
        """Sum of the parts' dimensions."""
        return sum(p.dim for p in self._parts)

    @property
    def input_spec(self) -> InputSpec:
        """One array per image, from which each part's own array is derived as the pipeline
        would: grey only if every part wants grey, shrunk to the largest side any part needs
        (full size if one needs it). A part with an exact ``size`` counts its longer side, the
        same side the pipeline decodes for it alone."""
        specs = [p.input_spec for p in self._parts]
        mode = "L" if all(s.mode == "L" for s in specs) else "RGB"
        sides = [s.decode_side for s in specs]
        max_side = None if any(s is None for s in sides) else max(s for s in sides if s)
        return InputSpec(mode=mode, max_side=max_side)

    # -- extraction -----------------------------------------------------------------------------
    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Each part's array is made from the image with ``prepare_arrays`` (as the pipeline
        makes it from a decode), each part runs once over the batch, then blocks are embedded,
        scaled and concatenated."""
        out = np.zeros((len(images), self.dim), dtype=self.dtype)
        if len(images) == 0:
            return out
        # a zero-weight block is zero whatever the image: skip the work
        active = [i for i, w in enumerate(self.weights) if w > 0]
        specs = [self._parts[i].input_spec for i in active]
        arrays: list[list[np.ndarray]] = [[] for _ in active]
        for image in images:
            for j, array in enumerate(prepare_arrays(_as_image(image), specs)):
                arrays[j].append(array)
        slices, kinds, scales = self.block_slices, self.block_kinds, self.scales
        for j, i in enumerate(active):
            block = embed_block(self._parts[i].transform(arrays[j]), kinds[i])
            out[:, slices[i]] = block * scales[i]
        return out

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """The fused vector of one image (a batch of one, so it equals ``transform``'s rows)."""
        return self.transform([image])[0]


def _as_image(image: np.ndarray) -> Any:
    """A uint8 grey or RGB(A) array as the Pillow image ``prepare_arrays`` starts from."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {a.dtype}")
    try:
        return from_array(a)
    except ImageError as exc:
        raise ValueError(
            f"expected a non-empty (H, W) grey or (H, W, 3) RGB image: {exc.reason}"
        ) from None
