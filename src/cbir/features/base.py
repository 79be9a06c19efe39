"""The descriptor interface: a small estimator-like class that turns images into vectors.

Parameters are keyword arguments of ``__init__`` (as in scikit-learn), stored under the same
names, so ``get_params()`` and the canonical ``spec`` string can be derived from the signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from cbir.errors import UnavailableError
from cbir.images import InputSpec


class DescriptorUnavailableError(UnavailableError, RuntimeError):
    """A descriptor that cannot run here (an optional extra is missing); says what to install."""


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

    @property
    def short_spec(self) -> str:
        """The spec as a user would type it, with only the parameters that differ from their
        defaults: a label for tables and plots that still parses to the same descriptor."""
        from cbir.features.registry import format_spec

        defaults = self.param_defaults()
        changed = {k: v for k, v in self.get_params().items() if v != defaults[k]}
        return format_spec(self.name, changed)

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

    @classmethod
    def missing_requirements(cls, params: dict[str, Any]) -> str | None:
        """Why this descriptor cannot run here (e.g. an optional extra is not installed), with
        the command that fixes it; None when it can."""
        return None

    # -- learning from the collection ---------------------------------------------------------
    #: How many images of the collection ``fit`` sees at most (a random sample).
    fit_sample: ClassVar[int] = 2000
    #: True when ``fit`` needs the images' labels (a supervised descriptor).
    needs_labels: ClassVar[bool] = False

    @property
    def fitted(self) -> bool:
        """Whether ``transform`` can run: always, unless the descriptor ``requires_fit``."""
        return not self.requires_fit or bool(self.get_state())

    def fit(
        self, images: Sequence[np.ndarray], labels: Sequence[str | None] | None = None
    ) -> Descriptor:
        """Learn from a sample of the collection's images (``requires_fit`` descriptors)."""
        return self

    def get_state(self) -> dict[str, np.ndarray]:
        """What ``fit`` learned, as named arrays (saved with the collection, no pickles)."""
        return {}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what ``fit`` learned (the inverse of :meth:`get_state`)."""

    # -- extraction ---------------------------------------------------------------------------

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """One image (as described by ``input_spec``) to a 1-D vector of length ``dim``."""
        if type(self).transform is Descriptor.transform:
            raise NotImplementedError(f"{type(self).__name__} implements neither transform")
        return self.transform([image])[0]

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """A batch of images to an ``(n, dim)`` array of ``dtype``."""
        out = np.empty((len(images), self.dim), dtype=self.dtype)
        for i, image in enumerate(images):
            out[i] = self.transform_one(image)
        return out


class DerivedDescriptor(Descriptor):
    """A descriptor computed from another descriptor's vectors by a step fitted on the
    collection (centring, PCA-whitening, a trained classifier head): PyRetri's "reduce" stage.

    A collection stores the base vectors too, fits on them, and computes the derived vectors from
    them without decoding an image again. ``transform`` on images still works once fitted.
    """

    requires_fit: ClassVar[bool] = True

    @property
    def derives(self) -> bool:
        """True when this instance is computed from its base's vectors (a descriptor whose
        fitted step is switched off by its parameters is a plain one)."""
        return bool(self.requires_fit)

    @property
    def base_spec(self) -> str:
        """The spec of the descriptor whose vectors this one starts from."""
        raise NotImplementedError

    @property
    def base(self) -> Descriptor:
        from cbir.features.registry import create_descriptor

        if getattr(self, "_base", None) is None or self._base.spec != self.base_spec:
            self._base = create_descriptor(self.base_spec)
        return self._base

    @property
    def input_spec(self) -> InputSpec:
        return self.base.input_spec

    def fit(
        self, images: Sequence[np.ndarray], labels: Sequence[str | None] | None = None
    ) -> Descriptor:
        return self.fit_vectors(self.base.transform(images), labels)

    def fit_vectors(
        self, vectors: np.ndarray, labels: Sequence[str | None] | None = None
    ) -> DerivedDescriptor:
        """Learn from the base vectors of the collection (and their labels, if it needs them)."""
        raise NotImplementedError

    def transform_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Base vectors ``(n, base dim)`` to this descriptor's ``(n, dim)``."""
        raise NotImplementedError

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not self.fitted:
            raise ValueError(f"descriptor {self.spec} must be fitted on a collection first")
        return self.transform_vectors(self.base.transform(images))
