"""What crosses the hops between the Serve deployments: plain records (numpy arrays, no tensors),
so that a replica that only reads them, the Ingress, never imports torch to unpickle one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserState:
    """Decomposer -> Combiner, one user: only the interest state z crosses the hop; the Combiner
    derives the dimensions I_{t,k} and gates from it with the same model version."""

    model_version: str
    checkpoint: str  # where the Combiner loads that version if it does not hold it
    h: np.ndarray  # (U[+R·D],) interest state z_t
    n_events: int  # events consumed (0: a new or unknown user)
    last_ts: float | None  # time of the last event (the context's gap), None without events
    seen: np.ndarray | None  # (S,) catalogue indices of the items seen; None when not asked for
    n_items: int = (
        0  # the catalogue (trained and added items) the state was read with: a Combiner holding fewer catches up
    )


@dataclass(frozen=True)
class RankJob:
    """One request as the Combiner batches it."""

    state: UserState
    intent: np.ndarray | None  # (384,) the encoded words, None without
    k: int
    exclude_seen: bool
    explain: bool
    now: float  # the request's moment (seconds since the epoch)


@dataclass(frozen=True)
class Ranking:
    """Combiner -> Ingress: catalogue indices and scores, best first, and how the gates weighed."""

    model_version: str
    n_events: int
    items: list[tuple[int, float]]
    gates: dict[str, float]
    explanation: dict[str, list[tuple[int, float]]] | None  # per dimension: its own top items
