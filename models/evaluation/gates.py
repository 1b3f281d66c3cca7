"""Gate weights over whole histories, and how well they recover the synthetic data's planted truth."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from models.nn.decomposer import InterestDecomposer
from models.data.batching import batch_builder

# The setting in which gate recovery is measured (benchmarks/gate_recovery.py, tests/test_gate_recovery.py):
# the mixture mode, whose α_k is the share of the next event explained by dimension k, as the synthetic
# data plants it. Seen items stay in the softmax: the data plants re-consumption (about a fifth of
# events repeat an item), which a dimension must stay free to predict. The rest is the decomposer as
# the recorded figure was made (dropout 0.2, the LSTM state alone, the last weights); with today's
# ml-latest-small defaults the gates still match the planted sources, under permuted names.
RECOVERY_MODEL = {"combine": "mixture", "mask_seen": False, "dropout": 0.2, "profile_decays": (), "residual": False}
RECOVERY_TRAIN = {"lr": 5e-3, "ema_decay": None}
# The headline model's own settings (the decomposer's defaults): its figure is read on |r|,
# since in concat mode a gate can act through a negative preference (r's sign is not fixed).
SETTINGS = {"mixture": (RECOVERY_MODEL, RECOVERY_TRAIN, "matched"), "default": ({}, {}, "matched_abs")}


@torch.no_grad()
def gates_over_history(
    model: InterestDecomposer, data, users: np.ndarray | None = None, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """α for predicting every event but each user's first, from the events before it.

    -> (alpha (M, K), target event index (M,)). Histories longer than the model's max_len are
    read in their last max_len events.
    """
    users = np.arange(data.n_users) if users is None else np.asarray(users)
    starts_all, ends_all = data.user_offsets[users], data.user_offsets[users + 1] - 1  # inputs [s, e)
    starts_all = np.maximum(starts_all, ends_all - model.cfg.max_len)
    user_starts = data.user_offsets[users]
    builder = batch_builder(data)
    model.eval()
    alphas, targets = [], []
    for lo in range(0, len(users), batch_size):
        sl = slice(lo, lo + batch_size)
        batch = builder(starts_all[sl], ends_all[sl], user_starts[sl])
        h = model.states(batch)  # (B, T, U[+R·D])
        sup = batch["targets"] > 0
        alpha = model.gates(h[sup], batch["ctx_feats"][sup])[:, : model.K]  # (P, K): the dimensions' weights
        T = h.shape[1]
        idx = starts_all[sl, None] + np.arange(T)[None, :] + 1  # target of each position
        alphas.append(alpha.numpy())
        targets.append(idx[sup.numpy()])
    return np.concatenate(alphas), np.concatenate(targets)


def planted_weights(data) -> np.ndarray:
    """(E, 3) planted (topic, sentiment, time) weights aligned with the prepared event arrays."""
    truth = pq.read_table(Path(data.path) / "truth.parquet").to_pandas()
    truth = truth.set_index(["user", "seq"])[["pi_topic", "pi_sentiment", "pi_time"]]
    user_idx = np.repeat(np.arange(1, data.n_users + 1), np.diff(data.user_offsets))
    seq = np.arange(len(user_idx)) - data.user_offsets[user_idx - 1]
    keys = list(zip(data.user_source_ids[user_idx].tolist(), seq.tolist()))
    return truth.loc[keys].to_numpy()


def correlation_matrix(planted: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """planted (M, 3), alpha (M, K) -> (3, K) Pearson correlation of each source with each gate."""
    return np.corrcoef(np.concatenate([planted, alpha], 1).T)[:3, 3:]


def gate_recovery(
    model: InterestDecomposer, data, gates: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, float]:
    """Correlation between planted and learned weight of each named dimension, and `matched`:
    the mean correlation under the best one-to-one assignment of sources to dimensions, i.e.
    how well the gates recover the context dependence whatever names the dimensions took.
    `gates` = a `gates_over_history` result already computed for this model."""
    alpha, targets = gates if gates is not None else gates_over_history(model, data)
    r = correlation_matrix(planted_weights(data)[targets], alpha)
    names = model.cfg.dim_names
    out = {
        name: float(r[j, names.index(name)]) for j, name in enumerate(("topic", "sentiment", "time")) if name in names
    }
    out["matched"] = best_assignment(r)
    out["matched_abs"] = best_assignment(np.abs(r))
    return out


def best_assignment(r: np.ndarray) -> float:
    """(3, K) correlations -> the mean under the best one-to-one assignment of sources to gates."""
    return float(
        max(np.mean([r[j, k] for j, k in enumerate(perm)]) for perm in itertools.permutations(range(r.shape[1]), 3))
    )


def randomize_gates(model: InterestDecomposer) -> InterestDecomposer:
    """Draw the gates' output weights v like their other weights (they start at zero, which
    makes an untrained model's α constant): an untrained model with random gates."""
    with torch.no_grad():
        c = model.interests.gate_v.shape[-1]
        model.interests.gate_v.normal_(0.0, c**-0.5)
    return model


def random_gate_null(new_untrained, data, n: int, statistic: str = "matched") -> np.ndarray:
    """(n,) the recovery statistic of untrained models with random gates (`new_untrained(i)`
    builds the i-th): the figure random gates reach by chance, through the context alone."""
    from tqdm.auto import tqdm

    return np.array(
        [
            gate_recovery(randomize_gates(new_untrained(i)), data)[statistic]
            for i in tqdm(range(n), desc="random gates", unit="model", leave=False)
        ]
    )


def context_linear_fit(data, targets: np.ndarray) -> dict[str, float]:
    """Correlation of each planted weight with its least-squares fit on the request context
    (the features the gates read: hour and weekday on the circle, log gap), over the same events.

    The reference from above: how much of the planted dependence a linear map of the context
    explains; the gates are a learned map of that context (among other inputs).
    """
    from models.data.features import moment_features

    prev = np.maximum(targets - 1, 0)
    x = moment_features(data.timestamps[targets], data.timestamps[targets] - data.timestamps[prev])
    x = np.concatenate([x, np.ones((len(x), 1), np.float32)], 1).astype(np.float64)  # (M, 6)
    planted = planted_weights(data)[targets]  # (M, 3)
    coef, *_ = np.linalg.lstsq(x, planted, rcond=None)
    fit = x @ coef
    out = {
        name: float(np.corrcoef(fit[:, j], planted[:, j])[0, 1])
        for j, name in enumerate(("topic", "sentiment", "time"))
    }
    out["mean"] = float(np.mean(list(out.values())))
    return out
