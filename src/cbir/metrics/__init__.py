"""Distances between vectors: a registry of vectorised ``(m, d) x (n, d) -> (m, n)`` functions."""

from cbir.metrics.base import (
    Metric,
    as_matrix,
    describe_metrics,
    get_metric,
    metric_names,
    pairwise_distances,
    register_metric,
    take_rows,
)

__all__ = [
    "Metric",
    "as_matrix",
    "describe_metrics",
    "get_metric",
    "metric_names",
    "pairwise_distances",
    "register_metric",
    "take_rows",
]
