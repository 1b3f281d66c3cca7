"""Pure helpers that turn API answers into what the page shows (frames, labels, the moment).

Kept apart from the Blocks so that they can be tested with hand-made values.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone

import pandas as pd

from ray_app.serve.schemas import InterestsResponse, Item, RecommendResponse, UserEvent

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
DAY, HOUR, WEEK = 86400, 3600, 7 * 86400

HISTORY_COLUMNS = ["when (UTC)", "title", "genres", "rating"]
RECS_COLUMNS = ["#", "title", "genres", "score", "item_id"]
SEARCH_COLUMNS = ["title", "genres", "similarity", "item_id"]


def next_moment(after: float, weekday: int, hour: int) -> float:
    """The first moment at `weekday` (Monday = 0) and `hour` (UTC) not before `after`.

    Requests and posted events are placed after the user's last event so that the history stays
    in time order; inside the chosen hour itself the moment is `after` (a second film that evening).
    """
    if not 0 <= weekday < 7 or not 0 <= hour < 24:
        raise ValueError(f"weekday must be 0..6 and hour 0..23, got weekday={weekday}, hour={hour}")
    day0 = (int(after) // DAY) * DAY
    weekday0 = (day0 // DAY + 3) % 7  # 1970-01-01 was a Thursday (models/data/features.py)
    slot = day0 + ((weekday - weekday0) % 7) * DAY + hour * HOUR
    if slot + HOUR <= after:
        slot += WEEK
    return float(max(slot, after))


def anchor(history: Sequence[UserEvent], now: float | None = None) -> float:
    """Where the clock of a request starts: the last event, or a week ago for a user without
    events, so that every weekday and hour of the past week can be chosen (the API refuses events
    dated in the future)."""
    return max(e.timestamp for e in history) if history else (time.time() if now is None else now) - WEEK


def fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%a %Y-%m-%d %H:%M")


def events(n: int) -> str:
    return f"{n} event" if n == 1 else f"{n} events"


def genres(g: Sequence[str]) -> str:
    return ", ".join(g)


def history_frame(history: Sequence[UserEvent]) -> pd.DataFrame:
    """Newest first: the timeline reads from what just happened backwards."""
    rows = [[fmt_time(e.timestamp), e.title, genres(e.genres), e.rating] for e in reversed(history)]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def timeline_frame(history: Sequence[UserEvent]) -> pd.DataFrame:
    """One point per event: when (UTC, naive so the plot does not shift it to the browser's zone), rating."""
    return pd.DataFrame(
        {
            "when": pd.to_datetime([e.timestamp for e in history], unit="s"),
            "rating": [e.rating for e in history],
            "title": [e.title for e in history],
        }
    )


def recs_frame(items: Sequence[Item]) -> pd.DataFrame:
    rows = [[i + 1, it.title, genres(it.genres), round(it.score, 4), it.item_id] for i, it in enumerate(items)]
    return pd.DataFrame(rows, columns=RECS_COLUMNS)


def search_frame(items: Sequence[Item]) -> pd.DataFrame:
    rows = [[it.title, genres(it.genres), round(it.score, 4), it.item_id] for it in items]
    return pd.DataFrame(rows, columns=SEARCH_COLUMNS)


def item_choices(items: Sequence[Item]) -> list[tuple[str, str]]:
    """(label, source item id) pairs for a dropdown."""
    return [(f"{it.title} ({genres(it.genres)})" if it.genres else it.title, it.item_id) for it in items]


def gates_frame(rec: RecommendResponse | None) -> pd.DataFrame:
    gates = rec.gates if rec else {}
    return pd.DataFrame({"dimension": list(gates), "weight": [float(v) for v in gates.values()]})


def interests_frame(interests: InterestsResponse | None) -> pd.DataFrame:
    """Long form (one row per step and dimension), which is what a coloured line plot takes."""
    rows = [
        [s.index, dim, float(s.gates.get(dim, 0.0)), s.title]
        for s in (interests.steps if interests else [])
        for dim in interests.dimensions
    ]
    return pd.DataFrame(rows, columns=["event", "dimension", "weight", "title"])


def dimension_frame(rec: RecommendResponse | None, n: int = 5) -> pd.DataFrame:
    """One row per dimension (with its gate weight): what that dimension alone would put first."""
    explanation = (rec.explanation or {}) if rec else {}
    rows = []
    for dim, items in explanation.items():
        titles = [it.title for it in items[:n]]
        weight = rec.gates.get(dim)
        rows.append([dim if weight is None else f"{dim} ({weight:.0%})", *titles, *[""] * (n - len(titles))])
    return pd.DataFrame(rows, columns=["dimension", *(str(i) for i in range(1, n + 1))])


def gates_summary(rec: RecommendResponse) -> str:
    if not rec.gates:
        return ""
    top = max(rec.gates, key=rec.gates.get)
    return f"leading dimension: **{top}** ({rec.gates[top]:.0%})"
