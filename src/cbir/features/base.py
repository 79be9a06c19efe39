"""The descriptor interface: a small estimator-like class that turns images into vectors.

Parameters are keyword arguments of ``__init__`` (as in scikit-learn), stored under the same
names, so ``get_params()`` and the canonical ``spec`` string can be derived from the signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from cbir.images import InputSpec


class Descriptor:
    """Base class of every descriptor.

    A subclass sets ``name``, ``default_metric`` and a docstring whose first line says what it
    captures; takes its parameters as keyword arguments with defaults; and implements ``dim``,
    ``input_spec`` and ``transform_one`` (or ``transform`` for a whole batch at once).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    default_metric: ClassVar[str] = "euclidean"
    #: True when every output value is >= 0 (histograms): distribution metrics then apply.
    nonnegative: ClassVar[bool] = True
    #: True when every output value is 0 or 1 (hash bits): bit metrics (hamming) then apply.
    binary: ClassVar[bool] = False
    #: True when the descriptor must learn from the collection (``fit``) before ``transform``.
    requires_fit: ClassVar[bool] = False
    dtype: ClassVar[np.dtype] = np.dtype(np.float32)

    # -- parameters -------------------------------------------------------------------------
    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """The parameters of ``__init__`` and their defaults, in declaration order."""
        sig = inspect.signature(cls.__init__)
        return {
            p.name: p.default
            for p in list(sig.parameters.values())[1:]
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }

    def get_params(self) -> dict[str, Any]:
        """The current parameter values (as passed to ``__init__``)."""
        return {k: getattr(self, k) for k in self.param_defaults()}

    @property
    def spec(self) -> str:
        """Canonical, parseable text of this descriptor and all its parameters."""
        from cbir.features.registry import format_spec

        return format_spec(self.name, self.get_params())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring: what the descriptor captures."""
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    # -- what it needs and produces -----------------------------------------------------------
    @property
    def dim(self) -> int:
        """Length of the output vector."""
        raise NotImplementedError

    @property
    def input_spec(self) -> InputSpec:
        """The mode and size of the arrays ``transform`` expects."""
        return InputSpec()

    # -- extraction ---------------------------------------------------------------------------
    def fit(self, images: Sequence[np.ndarray]) -> Descriptor:
        """Learn from a sample of the collection (only for ``requires_fit`` descriptors)."""
        return self

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """One image (as described by ``input_spec``) to a 1-D vector of length ``dim``."""
        raise NotImplementedError

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """A batch of images to an ``(n, dim)`` array of ``dtype``."""
        out = np.empty((len(images), self.dim), dtype=self.dtype)
        for i, image in enumerate(images):
            out[i] = self.transform_one(image)
        return out
