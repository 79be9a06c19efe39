"""Search: from query vectors to a ranked :class:`SearchResult`.

``request`` checks a search's arguments once for every face, ``combine`` ranks a query set on
any index (mean, min, rrf, expansion, late fusion), ``searcher`` runs a request on a collection,
``result`` is what comes back; ``feedback`` (Rocchio), ``region`` (a box on a query image) and
``explain`` (why a hit matched) refine and explain a search.
"""

from cbir.search.combine import (
    COMBINE_MODES,
    RRF_DEPTH,
    RRF_K,
    expand_each,
    expand_query,
    merge_min,
    ranked_ids,
    rrf_fuse,
)
from cbir.search.feedback import Feedback, rocchio
from cbir.search.region import Box, Region
from cbir.search.request import SearchRequest
from cbir.search.result import SCORE_KINDS, Hit, ScoreKind, SearchResult

__all__ = [
    "COMBINE_MODES",
    "RRF_DEPTH",
    "RRF_K",
    "SCORE_KINDS",
    "Box",
    "Feedback",
    "Hit",
    "Region",
    "ScoreKind",
    "SearchRequest",
    "SearchResult",
    "expand_each",
    "expand_query",
    "merge_min",
    "ranked_ids",
    "rocchio",
    "rrf_fuse",
]
