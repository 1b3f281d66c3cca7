"""Numeric features of events and of the moment of a request (DESIGN §2, φ and C_t).

Pure numpy so that batching, serving and tests share one definition.
"""

from __future__ import annotations

import numpy as np

N_RATING_BUCKETS = 12  # bucket 0 = padding; ratings 0.5..5.0 in half steps -> 1..10, 11 spare
N_HOUR_BUCKETS = 8  # 3-hour buckets for the `time` dimension's auxiliary target
EVENT_FEATURES = 5  # sin/cos hour, sin/cos weekday, log gap since previous event
CONTEXT_FEATURES = 5  # the same, for the moment of prediction


# What the data path reads ratings as: stars, 0.5..5 (MovieLens's scale and the API's). Other sources map
# onto it when read: an event with no rating (a view, a click: an implicit event) is IMPLICIT_RATING, the
# most common MovieLens rating and the API's reading of an event without one; a weight w in 0..1 (an
# implicit event's strength) is 0.5 + 4.5·w, buckets 1..10; a rating r on a 0..10 scale (MovieTweetings)
# is r / 2, with 0 joining 1 in the lowest bucket.
IMPLICIT_RATING = 4.0


def stars_from_weight(weight: np.ndarray) -> np.ndarray:
    """Weights in 0..1 -> stars 0.5..5, linearly (rating buckets 1..10)."""
    return 0.5 + 4.5 * np.asarray(weight, dtype=np.float64)


def stars_from_ten(rating: np.ndarray) -> np.ndarray:
    """Ratings on a 0..10 scale -> stars: half of it, at least 0.5 (0 and 1 share the lowest bucket)."""
    return np.maximum(np.asarray(rating, dtype=np.float64) / 2.0, 0.5)


def rating_bucket(rating: np.ndarray) -> np.ndarray:
    """Ratings on a 0.5-step scale up to 5 -> integer buckets 1..11 (0 is padding)."""
    return np.clip(np.rint(np.asarray(rating, dtype=np.float64) * 2.0), 1, N_RATING_BUCKETS - 1).astype(np.int64)


def log_gap_hours(gap_seconds: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(gap_seconds, dtype=np.float64), 0.0) / 3600.0).astype(np.float32)


def hour_bucket(ts: np.ndarray) -> np.ndarray:
    hour = (np.asarray(ts, dtype=np.int64) % 86400) // 3600
    return (hour * N_HOUR_BUCKETS // 24).astype(np.int64)


def moment_features(ts: np.ndarray, gap_seconds: np.ndarray) -> np.ndarray:
    """(…,) timestamps (UTC seconds) and gaps -> (…, 5) float32 [sin h, cos h, sin wd, cos wd, log gap]."""
    ts = np.asarray(ts, dtype=np.int64)
    hour = (ts % 86400) / 3600.0
    weekday = ((ts // 86400) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    h = 2 * np.pi * hour / 24.0
    w = 2 * np.pi * weekday / 7.0
    out = np.stack([np.sin(h), np.cos(h), np.sin(w), np.cos(w), log_gap_hours(gap_seconds)], axis=-1)
    return out.astype(np.float32)
