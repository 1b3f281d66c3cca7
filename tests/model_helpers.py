"""What the model tests share (the `split` of the tiny dataset is a fixture in conftest.py)."""

from __future__ import annotations

import numpy as np

from models.data.batching import batch_builder, training_windows


def first_batch(data, split, n=8, intent_rate=0.0):
    starts, ends, rows = training_windows(split, 200)
    return batch_builder(data)(
        starts[:n], ends[:n], split.user_start[rows[:n]], intent_rate=intent_rate, rng=np.random.default_rng(0)
    )
