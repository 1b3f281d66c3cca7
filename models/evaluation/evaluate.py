"""Full-ranking evaluation of a model on a split: the rank of every target, history-masked and
unmasked in one pass, and the metrics of each target.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.data.batching import Split, batch_builder, eval_samples, flat_ranges
from models.evaluation.metrics import rank_metrics, target_ranks

HEADLINE = "ndcg@10"


def history_mask(items: np.ndarray, user_starts: np.ndarray, targets: np.ndarray, n_items: int) -> torch.Tensor:
    """(B, N+1) bool: the items each user interacted with before its target."""
    rows, pos = flat_ranges(user_starts, targets - user_starts)
    mask = torch.zeros(len(targets), n_items + 1, dtype=torch.bool)
    mask[torch.from_numpy(rows), torch.from_numpy(items[pos])] = True
    return mask


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    split: Split,
    which: str = "test",
    with_intent: bool = False,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    rows: np.ndarray | None = None,
    intent: str = "oracle",
) -> dict:
    """Full-ranking metrics of each target -> {"masked": {...}, "unmasked": {...}, "users": (M,),
    "repeat": (M,) bool}.

    `repeat` marks the targets the user had interacted with before: under the history mask such a
    target is the only seen item left, which hands it to any rule that ranks seen items first, so
    where histories repeat items (the synthetic data) the masked figure is read on the other
    targets (`masked_new` in the quality benchmark).

    `rows` restricts evaluation to a subset of targets (a worker's shard); with `with_intent`,
    `intent` (one of `models.data.batching.INTENT_REGIMES`) says how the request's words relate to
    the target.
    """
    if which == "valid":
        targets, users = split.valid_targets, split.valid_user
    elif which == "test":
        targets, users = split.test_pos, split.test_user
    else:
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    if rows is not None:
        targets, users = targets[rows], users[rows]
    max_len = model.cfg.max_len if hasattr(model.cfg, "max_len") else 200
    starts, ends = eval_samples(split, targets, users, max_len)
    builder = batch_builder(data)
    rng = np.random.default_rng(12345)
    model.eval()
    masked, unmasked, repeat = [], [], []
    for lo in range(0, len(targets), batch_size):
        sl = slice(lo, lo + batch_size)
        ustart = split.user_start[users[sl]]
        batch = builder(
            starts[sl],
            ends[sl],
            ustart,
            supervise_all=False,
            intent_rate=1.0 if with_intent else 0.0,
            rng=rng,
            intent=intent,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = model.score(batch).float().cpu()  # (B, N+1)
        tgt = torch.from_numpy(data.items[targets[sl]])
        seen = history_mask(data.items, ustart, targets[sl], data.n_items)
        unmasked.append(target_ranks(scores, tgt))
        masked.append(target_ranks(scores, tgt, seen))
        repeat.append(seen[torch.arange(len(tgt)), tgt])
    return {
        "masked": rank_metrics(torch.cat(masked)),
        "unmasked": rank_metrics(torch.cat(unmasked)),
        "users": users,
        "repeat": torch.cat(repeat).numpy(),
    }
