"""Bag of visual words: local keypoint descriptors quantised against a learned vocabulary.

Sivic & Zisserman's "Video Google" recipe: detect keypoints (ORB or SIFT, from OpenCV), learn a
vocabulary of ``words`` visual words by k-means on the descriptors of a sample of the collection,
and describe an image by how often each word occurs, weighted by tf-idf and L2-normalised, so
cosine similarity ranks images as a text search engine ranks documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from cbir.features.base import Descriptor
from cbir.features.inputs import as_gray_uint8, check_positive_int
from cbir.features.registry import register_descriptor
from cbir.images import InputSpec

DETECTORS = ("orb", "sift")
#: Length of one descriptor as clustered: ORB's 256 bits unpacked, SIFT's 128 bins.
FEATURE_DIMS = {"orb": 256, "sift": 128}
#: Descriptors k-means sees at most: enough for a few hundred words, and bounds fit time and
#: memory (100k x 256 float32 = 100 MB) however large the sample of images is.
MAX_TRAIN_DESCRIPTORS = 100_000
#: Images with a shorter side are described by no keypoint: ORB's pyramid asserts on images of a
#: pixel or two, and neither detector finds anything worth counting in so few pixels.
MIN_SIDE = 16
#: ORB's FAST corner threshold. OpenCV's default (20) finds no corner at all in soft or
#: low-contrast textures (grass at 128 px); the ``max_keypoints`` strongest corners (Harris
#: score) are kept either way, so a lower threshold only adds candidates where corners are scarce.
FAST_THRESHOLD = 10
_SEED = 0


@register_descriptor
class BoVW(Descriptor):
    """Local structure: tf-idf histogram of ORB or SIFT keypoints quantised to learned visual words.

    ``detector``: ``orb`` (fast binary descriptors) or ``sift`` (slower, more distinctive; used
    as RootSIFT). At most ``max_keypoints`` keypoints are kept per image, detected on the grey
    image shrunk to ``max_side`` pixels. ``fit`` learns ``words`` visual words by mini-batch
    k-means on (at most 100,000 of) the descriptors of a sample of the collection, and each
    word's idf from how many sample images contain it. A vector is the tf-idf of the image's
    word counts, L2-normalised; an image without keypoints (flat, blank, tiny) gives the zero
    vector. The keypoints' layout is ignored, so the vector tolerates rotation, translation,
    cropping, moderate scale changes and lighting.
    """

    name = "bovw"
    default_metric = "cosine"  # tf-idf vectors of unit length: cosine is the classic choice
    nonnegative = True  # weighted counts: histogram metrics (hellinger, chi2) apply too
    requires_fit = True
    fit_sample = 1000

    def __init__(
        self,
        detector: str = "orb",
        words: int = 500,
        max_keypoints: int = 500,
        max_side: int = 320,
    ) -> None:
        if not isinstance(detector, str) or detector.lower() not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        self.detector = detector.lower()
        self.words = check_positive_int("words", words, 2, 100_000)
        self.max_keypoints = check_positive_int("max_keypoints", max_keypoints, 1, 100_000)
        # below 64 px ORB (31 px border and patch) finds no keypoint at all
        self.max_side = check_positive_int("max_side", max_side, 64, 4096)
        self._vocabulary: np.ndarray | None = None
        self._sq_norms: np.ndarray | None = None
        self._idf: np.ndarray | None = None
        self.fit_report_: dict[str, Any] = {}

    @property
    def dim(self) -> int:
        """One entry per visual word."""
        return self.words

    @property
    def input_spec(self) -> InputSpec:
        """Grayscale, at most ``max_side`` pixels a side (the detectors' scales are in pixels)."""
        return InputSpec(mode="L", max_side=self.max_side)

    # -- local descriptors ------------------------------------------------------------------------
    def _make_detector(self) -> Any:
        # one per call, not kept on the instance: OpenCV detectors are not safe to share between
        # threads, and creating one costs microseconds
        if self.detector == "orb":
            return cv2.ORB_create(nfeatures=self.max_keypoints, fastThreshold=FAST_THRESHOLD)
        return cv2.SIFT_create(nfeatures=self.max_keypoints)

    def _raw_descriptors(self, image: np.ndarray, detector: Any) -> np.ndarray:
        """(k, bytes) uint8 descriptors of one image's keypoints (k may be 0)."""
        gray = as_gray_uint8(image)
        h, w = gray.shape
        if max(h, w) > self.max_side:  # the pipeline already shrinks; direct callers may not
            scale = self.max_side / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        width = FEATURE_DIMS[self.detector] // (8 if self.detector == "orb" else 1)
        if min(gray.shape) < MIN_SIDE:
            return np.empty((0, width), dtype=np.uint8)
        keypoints, desc = detector.detectAndCompute(gray, None)
        if desc is None or len(keypoints) == 0:
            return np.empty((0, width), dtype=np.uint8)
        if len(desc) > self.max_keypoints:  # SIFT keeps every keypoint tied at the cut-off
            response = np.array([k.response for k in keypoints])
            keep = np.sort(np.argsort(-response, kind="stable")[: self.max_keypoints])
            desc = desc[keep]
        # OpenCV's SIFT values are whole numbers 0..255 held in float32: as bytes they are exact
        # and 4x smaller while a fit holds the descriptors of a thousand images
        return np.ascontiguousarray(np.clip(desc, 0, 255), dtype=np.uint8)

    def _features(self, raw: np.ndarray) -> np.ndarray:
        """(k, FEATURE_DIMS) float32 rows in the space the vocabulary lives in."""
        if self.detector == "orb":
            # ORB descriptors are 256-bit strings compared by Hamming distance. Unpacked to 0/1
            # floats, the squared euclidean distance of two rows IS their Hamming distance, so
            # k-means and nearest-word assignment group them as ORB matching would; raw byte
            # values would weigh the high bit of each byte 128 times the low one.
            return np.unpackbits(raw, axis=1).astype(np.float32)
        # RootSIFT (Arandjelovic & Zisserman 2012): euclidean distance on square-rooted,
        # L1-normalised SIFT is the Hellinger kernel, which matches and quantises SIFT better.
        x = raw.astype(np.float32)
        x /= np.maximum(x.sum(axis=1, keepdims=True), 1.0)
        return np.sqrt(x)

    def _assign(self, features: np.ndarray) -> np.ndarray:
        """Nearest visual word of each row: argmin ||c||^2 - 2 x.c, one matrix product."""
        assert self._vocabulary is not None and self._sq_norms is not None
        scores = features @ self._vocabulary.T
        scores *= -2.0
        scores += self._sq_norms
        return scores.argmin(axis=1)

    def _counts(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, words) word counts of each image."""
        detector = self._make_detector()
        counts = np.zeros((len(images), self.words), dtype=np.float64)
        for i, image in enumerate(images):
            raw = self._raw_descriptors(image, detector)
            if len(raw):
                counts[i] = np.bincount(self._assign(self._features(raw)), minlength=self.words)
        return counts

    # -- learning the vocabulary ------------------------------------------------------------------
    def fit(self, images: Sequence[np.ndarray], labels: Sequence[str | None] | None = None) -> BoVW:
        """Learn the vocabulary (k-means) and the idf weights from a sample of images."""
        from sklearn.cluster import MiniBatchKMeans  # a slow import: only when fitting
        from threadpoolctl import threadpool_limits

        detector = self._make_detector()
        per_image = [self._raw_descriptors(image, detector) for image in images]
        found = np.array([len(r) for r in per_image], dtype=np.int64)
        total = int(found.sum())
        blank = int((found == 0).sum())
        if total < self.words:
            n = len(per_image)
            what = f"found {total} keypoints in {n} image{'' if n == 1 else 's'}"
            if blank:
                what += f" ({blank} without any)"
            if total < 2:
                raise ValueError(
                    f"descriptor {self.spec} cannot learn a vocabulary: it {what}; the images "
                    "are blank, flat or too small"
                )
            raise ValueError(
                f"descriptor {self.spec} needs at least words={self.words} keypoints to learn "
                f"its vocabulary but {what}; use a smaller vocabulary (e.g. words="
                f"{max(2, total // 10)}) or fit on more images"
            )
        pooled = np.concatenate(per_image)
        if len(pooled) > MAX_TRAIN_DESCRIPTORS:
            rng = np.random.default_rng(_SEED)
            pooled = pooled[np.sort(rng.choice(len(pooled), MAX_TRAIN_DESCRIPTORS, replace=False))]
        kmeans = MiniBatchKMeans(
            n_clusters=self.words,
            random_state=_SEED,
            # k-means++ seeding of hundreds of centres costs more than the whole fit of a small
            # sample (4x at 4k descriptors) for ~2% lower inertia: the best of 3 random seedings
            init="random",
            n_init=3,
            batch_size=max(1024, 4 * self.words),  # small batches leave many words unvisited
        )
        # Mini-batch k-means synchronises its OpenMP threads after every small batch: on a busy
        # machine the spinning threads made it 3x (100k descriptors) to 10x (4k) slower than
        # one thread, which is fast enough next to detecting the keypoints of the sample.
        with threadpool_limits(limits=1):
            kmeans.fit(self._features(pooled))
        self._set_vocabulary(kmeans.cluster_centers_)

        # document frequency over the whole sample (not only the clustered descriptors)
        df = np.zeros(self.words, dtype=np.float64)
        for raw in per_image:
            if len(raw):
                df[np.unique(self._assign(self._features(raw)))] += 1
        # smoothed idf (scikit-learn's): finite for words no sample image contains, and >= 1, so
        # a word in every image still counts a little instead of vanishing
        n = len(per_image)
        self._idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        self.fit_report_ = {
            "images": n,
            "images_without_keypoints": blank,
            "keypoints": total,
            "keypoints_clustered": len(pooled),
        }
        return self

    def _set_vocabulary(self, centres: np.ndarray) -> None:
        self._vocabulary = np.ascontiguousarray(centres, dtype=np.float32)
        self._sq_norms = np.einsum("ij,ij->i", self._vocabulary, self._vocabulary)

    def get_state(self) -> dict[str, np.ndarray]:
        """``vocabulary`` (words, 256 for ORB / 128 for SIFT) and ``idf`` (words,), float32."""
        if self._vocabulary is None or self._idf is None:
            return {}
        return {"vocabulary": self._vocabulary, "idf": self._idf}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        want = (self.words, FEATURE_DIMS[self.detector])
        vocabulary, idf = state.get("vocabulary"), state.get("idf")
        if (
            vocabulary is None
            or idf is None
            or np.shape(vocabulary) != want
            or np.shape(idf) != (self.words,)
            or not (np.isfinite(vocabulary).all() and np.isfinite(idf).all())
        ):
            got = {k: np.shape(v) for k, v in state.items()}
            raise ValueError(
                f"saved state does not fit descriptor {self.spec}: expected vocabulary {want} "
                f"and idf ({self.words},), got {got}"
            )
        self._set_vocabulary(vocabulary)
        self._idf = np.ascontiguousarray(idf, dtype=np.float32)

    # -- extraction -------------------------------------------------------------------------------
    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """tf-idf of each image's word counts, L2-normalised (zero without keypoints)."""
        if not self.fitted:
            raise ValueError(
                f"descriptor {self.spec} must be fitted on a collection first (its vocabulary "
                "is learned from the images: cbir index or cbir fit does it)"
            )
        assert self._idf is not None
        counts = self._counts(images)
        total = counts.sum(axis=1, keepdims=True)
        tfidf = counts / np.maximum(total, 1.0) * self._idf
        norms = np.linalg.norm(tfidf, axis=1, keepdims=True)
        # an image without keypoints stays all zero: cosine puts it at distance 1 from every
        # image (0 from another blank one) and the histogram metrics read it as uniform
        return (tfidf / np.where(norms > 0, norms, 1.0)).astype(np.float32)

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        """The vector of one image (a batch of one, so it equals the rows of ``transform``)."""
        return self.transform([image])[0]
