"""On the synthetic default, the learned gates follow the planted context dependence.

The full figure (three seeds, the planted × learned matrix) is benchmarks/gate_recovery.py.
The data plants a mixture of sources, so the model runs in its "mixture" combine mode, where
α_k is the share of the next event explained by dimension k (in concat mode a gate can act
through a negative preference, so |r| is large but its sign is not fixed; the benchmark
shows both). Which dimension takes which source is not fixed by the auxiliary losses alone:
across seeds the benchmark finds the planted names on some seeds and a permutation on others,
so the robust check is `matched` (best one-to-one assignment); the names are checked on the
default seed.
"""
from __future__ import annotations

import torch

from models.analysis import RECOVERY_MODEL, RECOVERY_TRAIN, gate_recovery
from models.batching import make_split
from models.data import load_prepared, prepare_source
from models.data.synthetic import SyntheticConfig
from models.encoder import TextEncoder
from models.run import train_config
from models.training import fit, new_model


def test_gates_recover_planted_context_dependence(tmp_path, encoder_cache):
    out = prepare_source("synthetic", tmp_path / "syn", synthetic_config=SyntheticConfig(),
                         encoder=TextEncoder(cache_path=encoder_cache), progress=False)
    data = load_prepared(out)
    split = make_split(data.user_offsets, 1)
    torch.manual_seed(0)
    model = new_model("decomposer", data, split, **RECOVERY_MODEL)
    fit(model, data, split, train_config("decomposer", epochs=30, patience=30, **RECOVERY_TRAIN), progress=False)
    r = gate_recovery(model, data)
    assert r["matched"] > 0.5, r           # the gates follow the planted context dependence
    for name in ("topic", "sentiment", "time"):
        assert r[name] > 0.4, r            # and, on this seed, under the planted names
