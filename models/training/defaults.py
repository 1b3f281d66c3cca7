"""The evaluation protocols and each model's training defaults, shared by every entry point."""

from __future__ import annotations

from models.training.loop import TrainConfig

PROTOCOLS = {"loo": 1, "last10": 10}


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
