"""The training and evaluation loop shared by every model, locally and inside Ray Train workers.

`run_epoch` is the epoch code; `evaluate` computes full-ranking metrics (history-masked and
unmasked in one pass); `fit` adds early stopping on validation NDCG@10.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from models.data.batching import (
    BatchBuilder,
    Split,
    batch_builder,
    flat_ranges,
    intent_table,
    length_bucketed_batches,
    training_windows,
)
from models.evaluation.evaluate import HEADLINE, evaluate
from models.evaluation.metrics import summarize
from models.nn.checkpoint import MODELS, build
from models.nn.items import first_seen_times


@dataclass
class TrainConfig:
    epochs: int = 200  # upper bound; early stopping usually ends sooner
    batch_size: int = 64  # training windows per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    lr_decay_patience: int | None = (
        None  # halve lr after more than this many epochs without a better one (`fit` only; Ray Train's loop does not take it)
    )
    ema_decay: float | None = None  # validate and keep an exponential moving average of the weights, updated every step
    intent_rate: float = 0.3  # share of training positions whose context carries intent text
    wrong_intent_rate: float = 0.0  # share of those whose words are a phrase the target does not carry
    grad_clip: float = 5.0
    seed: int = 0
    time_budget_s: float | None = None  # stop after this much training time
    max_steps: int | None = None  # at most this many batches per epoch (benchmarks; None: every window)
    eval_batch_size: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    sequences_per_s: float = 0.0


def training_counts(data, split: Split) -> np.ndarray:
    """(N+1,) number of training events of each item."""
    _, pos = flat_ranges(split.user_start, split.valid_pos - split.user_start)
    return np.bincount(data.items[pos], minlength=data.n_items + 1)


def training_first_seen(data, split: Split) -> np.ndarray:
    """(N+1,) time of each item's first training event (`models.nn.items.first_seen_times`)."""
    _, pos = flat_ranges(split.user_start, split.valid_pos - split.user_start)
    return first_seen_times(data.items[pos], data.timestamps[pos], data.n_items)


# Above this many items a model that has the choice trains with the sampled softmax unless told
# otherwise: the full softmax's (positions × catalogue) logits are what training memory grows with
# (benchmarks/scale.py); on ml-latest-small the sampled one scores within the seed spread of it.
SAMPLED_SOFTMAX_ABOVE = 20_000


def default_loss(kind: str, n_items: int) -> str | None:
    """ "sampled" for a catalogue above SAMPLED_SOFTMAX_ABOVE where `kind` has a `loss` setting, else None."""
    has_loss = kind in MODELS and "loss" in {f.name for f in fields(MODELS[kind][0])}
    return "sampled" if has_loss and n_items > SAMPLED_SOFTMAX_ABOVE else None


def new_model(kind: str, data, split: Split, **overrides) -> nn.Module:
    """A model sized for `data`, carrying its item texts, genres and training popularity."""
    args = {"n_items": data.n_items, **overrides}
    loss = default_loss(kind, data.n_items)
    if loss:
        args.setdefault("loss", loss)
    if kind == "decomposer":
        args.setdefault("n_genres", max(1, data.item_genres.shape[1]))
    model = build(kind, args)
    first = training_first_seen(data, split)
    model.set_item_data(data.item_emb, data.item_genres, training_counts(data, split), first)
    if hasattr(model, "set_intents"):  # the intent-aware rules
        model.set_intents(intent_table(data))
    return model


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    builder: BatchBuilder,
    windows,
    cfg: TrainConfig,
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over the training windows (starts, ends, user_starts) -> mean losses.

    `ema`, when given, takes the new weights after every optimizer step.
    """
    starts, ends, user_starts = windows
    model.train()
    totals: dict[str, float] = {}
    n = 0
    for step, idx in enumerate(length_bucketed_batches(ends - starts, cfg.batch_size, rng)):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        batch = builder(
            starts[idx],
            ends[idx],
            user_starts[idx],
            supervise_all=True,
            intent_rate=cfg.intent_rate,
            wrong_rate=cfg.wrong_intent_rate,
            rng=rng,
        )
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(
            device_type=torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            loss, parts = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v * len(idx)
        n += len(idx)
    return {k: v / max(n, 1) for k, v in totals.items()}


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """Halve the learning rate on a validation plateau (None: constant lr)."""
    if cfg.lr_decay_patience is None:
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, threshold=0.0, patience=cfg.lr_decay_patience
    )  # "better" as for early stopping


def weight_average(model: nn.Module, cfg: TrainConfig) -> AveragedModel | None:
    """θ̄ ← d·θ̄ + (1 − d)·θ after every step (None: validate the live weights).

    At lr 1e-2 the recurrent models' weights jump between epochs and their validation with them;
    the average smooths that noise out the way a decaying learning rate would, without a schedule.
    Only parameters are averaged: the buffers are constant item tables (texts, genres, popularity),
    set before the copy, which a per-step average would only rewrite.
    """
    if cfg.ema_decay is None:
        return None
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {cfg.ema_decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))


def fit(
    model: nn.Module,
    data,
    split: Split,
    cfg: TrainConfig,
    progress: bool = True,
    device: torch.device | str = "cpu",
    desc: str = "train",
) -> FitResult:
    """Train with early stopping on validation NDCG@10 (history-masked); restores the best weights."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(device)
    if not any(p.requires_grad for p in model.parameters()):  # most-popular: nothing to learn
        valid = summarize(evaluate(model, data, split, "valid", device=device)["masked"])
        return FitResult(0, valid, [{"epoch": 0, **valid}])
    max_len = model.cfg.max_len
    starts, ends, rows = training_windows(split, max_len)
    windows = (starts, ends, split.user_start[rows])
    builder = batch_builder(data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = lr_schedule(optimizer, cfg)
    ema = weight_average(model, cfg)
    judged = ema.module if ema is not None else model  # the weights validated and kept
    best, best_state, best_epoch, history = -1.0, None, 0, []
    train_seconds, seqs = 0.0, 0
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, disable=not progress, unit="epoch", leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        losses = run_epoch(model, optimizer, builder, windows, cfg, rng, device, ema=ema)
        train_seconds += time.perf_counter() - t0
        seqs += len(starts)
        valid = summarize(
            evaluate(judged, data, split, "valid", batch_size=cfg.eval_batch_size, device=device)["masked"]
        )
        history.append(
            {
                "epoch": epoch,
                **losses,
                **{f"valid_{k}": v for k, v in valid.items()},
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        if plateau is not None:
            plateau.step(valid[HEADLINE])
        if valid[HEADLINE] > best:
            best, best_epoch, best_valid = valid[HEADLINE], epoch, valid
            best_state = copy.deepcopy(judged.state_dict())
        bar.set_postfix(loss=f"{losses.get('next_item', 0):.3f}", valid_ndcg=f"{valid[HEADLINE]:.4f}", best=best_epoch)
        if epoch - best_epoch >= cfg.patience:
            break
        if cfg.time_budget_s is not None and train_seconds >= cfg.time_budget_s:
            break
    model.load_state_dict(best_state)
    return FitResult(best_epoch, best_valid, history, train_seconds, seqs / max(train_seconds, 1e-9))
