"""Relevance feedback: the query moved toward the images a user marked relevant and away from
those marked not relevant (Rocchio, 1971), then searched again.

    q' = alpha * q + beta * mean(relevant) - gamma * mean(not relevant)

applied to each query vector of a set (for ``mean`` this is the same as moving the centroid,
since the formula is linear). The defaults are the textbook weights (Manning, Raghavan and
Schütze, *Introduction to Information Retrieval*, 9.1.1): a positive example counts much more
than a negative one, because the images that are *not* wanted rarely lie in one direction.

Histogram metrics (chi-square, Hellinger, ...) need non-negative vectors; when every vector the
formula starts from is non-negative the result is clipped at zero, as Rocchio's negative term
weights are clipped in text retrieval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cbir.errors import InvalidRequestError

#: Rocchio's textbook weights: the query, the relevant centroid, the non-relevant centroid.
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 0.75
DEFAULT_GAMMA = 0.15
#: The most images one round of feedback may name (a page of results, many times over).
MAX_FEEDBACK_IDS = 1000


@dataclass(frozen=True)
class Feedback:
    """Ids a user marked relevant (``like``) and not relevant (``unlike``), and the weights."""

    like: tuple[int, ...] = ()
    unlike: tuple[int, ...] = ()
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    gamma: float = DEFAULT_GAMMA

    def __post_init__(self) -> None:
        object.__setattr__(self, "like", _ids("like", self.like))
        object.__setattr__(self, "unlike", _ids("unlike", self.unlike))
        both = sorted(set(self.like) & set(self.unlike))
        if both:
            raise InvalidRequestError(
                f"image {both[0]} is marked both relevant and not relevant; mark it once"
            )
        if len(self.like) + len(self.unlike) > MAX_FEEDBACK_IDS:
            raise InvalidRequestError(
                f"feedback may name at most {MAX_FEEDBACK_IDS} images, got "
                f"{len(self.like) + len(self.unlike)}"
            )
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise InvalidRequestError(
                    f"feedback weight {name} must be a finite number >= 0, got {value!r}"
                )
        if self.alpha == 0 and not self.like:
            raise InvalidRequestError(
                "with alpha = 0 the query counts for nothing: mark at least one image relevant"
            )

    @classmethod
    def from_weights(
        cls,
        like: Sequence[int] = (),
        unlike: Sequence[int] = (),
        weights: Sequence[float] | None = None,
    ) -> Feedback:
        """From ids and optional ``(alpha, beta, gamma)``."""
        if weights is None:
            return cls(tuple(like), tuple(unlike))
        if len(weights) != 3:
            raise InvalidRequestError(
                f"feedback weights are three numbers alpha,beta,gamma (e.g. 1,0.75,0.15); "
                f"got {len(weights)}"
            )
        alpha, beta, gamma = weights
        return cls(tuple(like), tuple(unlike), alpha, beta, gamma)

    @property
    def ids(self) -> tuple[int, ...]:
        return self.like + self.unlike

    def __bool__(self) -> bool:
        return bool(self.like or self.unlike)


def rocchio(
    queries: np.ndarray, relevant: np.ndarray, nonrelevant: np.ndarray, feedback: Feedback
) -> np.ndarray:
    """Each row of ``queries`` moved by Rocchio's formula (``relevant`` and ``nonrelevant`` are
    the stored vectors of the marked images; either may have no rows)."""
    q = np.atleast_2d(np.asarray(queries, np.float64))
    moved = feedback.alpha * q
    parts = [q]
    if len(relevant):
        moved = moved + feedback.beta * np.asarray(relevant, np.float64).mean(axis=0)
        parts.append(np.asarray(relevant))
    if len(nonrelevant):
        moved = moved - feedback.gamma * np.asarray(nonrelevant, np.float64).mean(axis=0)
        parts.append(np.asarray(nonrelevant))
    if all(p.min(initial=0.0) >= 0 for p in parts):
        moved = np.maximum(moved, 0.0)
    return moved.astype(np.float32)


def _ids(name: str, values: Sequence[int]) -> tuple[int, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise InvalidRequestError(f"{name} takes image ids (integers), got {v!r}")
        out.append(int(v))
    return tuple(dict.fromkeys(out))
