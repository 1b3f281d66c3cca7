"""The evaluation protocols and each model's training defaults, shared by every entry point."""

from __future__ import annotations

from models.data.batching import Split, make_split
from models.training.loop import TrainConfig

# protocol -> test targets per user (the last events); the validation targets are the events just
# before them: one for leave-one-out, as many as the test's for last10, so that a search is judged
# on ten targets a user (its noise below the differences it decides).
PROTOCOLS = {"loo": 1, "last10": 10}
VALID_TARGETS = {"loo": 1, "last10": 10}


def protocol_split(user_offsets, protocol: str) -> Split:
    """The split a protocol names."""
    return make_split(user_offsets, PROTOCOLS[protocol], VALID_TARGETS[protocol])


# Found on ml-latest-small validation: the LSTM models train faster with a larger step, and the
# decomposer's weights, averaged over the last few epochs' steps, rank better than its last ones.
TRAIN_DEFAULTS = {
    "decomposer": {"lr": 1e-2, "ema_decay": 0.98},
    "lstm": {"lr": 1e-2},
    "gru4rec": {"lr": 1e-2},
    "sasrec": {"lr": 1e-3},
    "popular": {},
    "seen-popular": {},
    "intent-text": {},
    "intent-popular": {},
    "history-text": {},
}


def train_config(kind: str, **overrides) -> TrainConfig:
    return TrainConfig(**{**TRAIN_DEFAULTS[kind], **overrides})
