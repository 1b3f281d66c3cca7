"""On the synthetic default, the learned gates follow the planted context dependence beyond chance.

Random gates read the context too, and the planted weights are a function of the context (hour,
gap), so an untrained model with random gates already correlates with them (median matched
correlation about 0.5 in the mixture mode). The test therefore compares the trained gates with a
null of untrained models with random gates, built in the test, and requires them above its
largest value. The full figure (three seeds, a null of 50, both settings, a context-only linear
fit) is benchmarks/gate_recovery.py; there the mixture mode recovers the sources on all three
seeds and the decomposer's default settings on one of three (docs/results.md).

The data plants a mixture of sources, so the model runs in its "mixture" combine mode, where α_k
is the share of the next event explained by dimension k. Which dimension takes which source is
not fixed by the auxiliary losses alone: across seeds the benchmark finds the planted names on
some seeds and a permutation on others, so the robust check is `matched` (best one-to-one
assignment); the names are checked on the default seed.
"""

from __future__ import annotations

import numpy as np
import torch

from models.evaluation.gates import RECOVERY_MODEL, RECOVERY_TRAIN, gate_recovery, random_gate_null, randomize_gates
from models.data.batching import make_split
from models.data import load_prepared, prepare_source
from models.data.synthetic import SyntheticConfig
from models.data.encoder import TextEncoder
from models.training.defaults import train_config
from models.training.loop import fit, new_model

NULL_MODELS = 20


def test_gates_recover_planted_context_dependence_beyond_random_gates(tmp_path, encoder_cache):
    out = prepare_source(
        "synthetic",
        tmp_path / "syn",
        synthetic_config=SyntheticConfig(),
        encoder=TextEncoder(cache_path=encoder_cache),
        progress=False,
    )
    data = load_prepared(out)
    split = make_split(data.user_offsets, 1)

    def untrained(i: int):
        torch.manual_seed(10_000 + i)
        return new_model("decomposer", data, split, **RECOVERY_MODEL)

    null = random_gate_null(untrained, data, NULL_MODELS, "matched")
    assert np.isfinite(null).all() and null.std() > 0  # random gates vary with the context
    torch.manual_seed(0)
    model = new_model("decomposer", data, split, **RECOVERY_MODEL)
    # 10 epochs: trained on seeds 0 and 1, matched is 0.87 and 0.83 against a null maximum of 0.72
    # (0.83-0.86 at 15 and 20 epochs); the benchmark trains to convergence.
    fit(model, data, split, train_config("decomposer", epochs=10, patience=10, **RECOVERY_TRAIN), progress=False)
    r = gate_recovery(model, data)
    assert r["matched"] > null.max(), (r, np.sort(null))  # above every one of the random gates


def test_random_gates_are_not_constant(tiny_data):
    """Untrained gates start with v = 0 (α constant); the null draws v so that α moves."""
    from models.evaluation.gates import gates_over_history

    split = make_split(tiny_data.user_offsets, 1)
    torch.manual_seed(0)
    model = new_model("decomposer", tiny_data, split)
    flat, _ = gates_over_history(model, tiny_data)
    assert np.allclose(flat, flat[0])
    moved, _ = gates_over_history(randomize_gates(model), tiny_data)
    assert moved.std(0).min() > 1e-4
