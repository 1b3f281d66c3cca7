"""The quality benchmark's models: each variant by name, what it changes, and the declared comparison.

A variant is (model kind, model config overrides[, training overrides]); its name keys the runs of
benchmarks/results/quality_*.json as protocol/variant/seed, so a name keeps its meaning once recorded.
"""

from __future__ import annotations

import torch

from models.training.defaults import train_config
from models.training.loop import TrainConfig, new_model

# The variants the recorded tables and today's benchmarks read. The screening that chose today's
# defaults (about sixty candidate changes, from the "plain decomposer" on) lives in the result files it
# produced, each run with its full config (benchmarks/results/quality_*.json), not as code paths here.
VARIANTS = {
    # The defaults (models/nn/decomposer.py and models/nn/baselines.py).
    "decomposer": ("decomposer", {}),
    "lstm": ("lstm", {}),
    "sasrec": ("sasrec", {}),
    "gru4rec": ("gru4rec", {}),
    "popular": ("popular", {}),
    # The trivial rule of repeating histories: the window's items first, then by popularity.
    "seen, then popular": ("seen-popular", {}),
    # Intent-aware rules: with the same words as "<model> + intent text", they are its baselines.
    "text retrieval": ("intent-text", {}),
    "phrase popularity": ("intent-popular", {}),
    # Content-based: the items whose text is nearest the mean text of the window's last items.
    "text similarity to the history": ("history-text", {}),
    # Ablations of the default (ABLATIONS).
    "decomposer, no gates": ("decomposer", {"use_gates": False}),
    "decomposer, no aux losses": ("decomposer", {"aux_weight": 0.0}),
    "decomposer, seen items in the softmax": ("decomposer", {"mask_seen": False}),
    # The sampled softmax (1,024 uniform negatives, log-Q corrected) that large catalogues train with.
    "decomposer, sampled softmax": ("decomposer", {"loss": "sampled"}),
    # The decomposer's recipe options given to the baselines (seen-item mask, averaged weights), so
    # that a difference is the model's, not the recipe's.
    "lstm (mask seen)": ("lstm", {"mask_seen": True}),
    "sasrec (mask seen)": ("sasrec", {"mask_seen": True}),
    "gru4rec (mask seen)": ("gru4rec", {"mask_seen": True}),
    "lstm (mask seen), weights averaged": ("lstm", {"mask_seen": True}, {"ema_decay": 0.98}),
    "sasrec (mask seen), weights averaged": ("sasrec", {"mask_seen": True}, {"ema_decay": 0.98}),
    # Equal information: SASRec with the decomposer's inputs, and the decomposer without text,
    # so that the table separates what the text buys from what the decomposition buys.
    "sasrec, text and event features, mask seen, weights averaged": (
        "sasrec",
        {"mask_seen": True, "use_text": True, "use_events": True},
        {"ema_decay": 0.98},
    ),
    "decomposer, no text": ("decomposer", {"use_text": False}),
    # Wrong words: a fifth of the training phrases unrelated to the target, so that the gates learn
    # not to trust every phrase (a model trained on oracle words alone does).
    "decomposer, wrong words in training 0.2": ("decomposer", {}, {"wrong_intent_rate": 0.2}),
}
TEXT_SASREC = "sasrec, text and event features, mask seen, weights averaged"
# Declared before the runs: the one comparison the headline rests on.
PRIMARY = {"protocol": "last10", "model": "decomposer", "baseline": TEXT_SASREC, "metric": "ndcg@10"}
# Trained baselines that are also evaluated fused with text retrieval, for requests with words.
FUSED = (TEXT_SASREC, "sasrec (mask seen), weights averaged")
FUSION_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)  # chosen on validation, per regime
assert not [v for v in VARIANTS if "/" in v], "a variant name keys runs as protocol/variant/seed: no '/'"
INTENT_EVALUATED = (
    "decomposer",
    "text retrieval",
    "phrase popularity",
    "decomposer, no text",
    "decomposer, wrong words in training 0.2",
)
ABLATIONS = ("decomposer, no gates", "decomposer, no aux losses", "decomposer, seen items in the softmax")
DEFAULT_VARIANTS = ("decomposer", "lstm", "sasrec", "popular", *ABLATIONS)
METRICS = ("hr@10", "ndcg@10", "mrr", "hr@20")


def build_variant(variant: str, data, split, seed: int, **train) -> tuple[torch.nn.Module, TrainConfig]:
    """A fresh model of `variant` (seeded) and its training config; `train` sets epochs, patience, ..."""
    kind, overrides, *train_overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    model = new_model(kind, data, split, **overrides)
    return model, train_config(kind, seed=seed, **train, **(train_overrides[0] if train_overrides else {}))


def intent_name(variant: str, regime: str) -> str:
    return f"{variant} + {regime} intent"


def fused_name(variant: str) -> str:
    return f"{variant}, fused with text retrieval"
