"""A checkpoint written by the flat `models/` layout (commit f03490d, before the stage sub-packages)
loads with today's code as the model it was, with every weight it held."""

from __future__ import annotations

from pathlib import Path

import torch

from models.nn import checkpoint

SAVED = Path(__file__).resolve().parent / "data" / "decomposer_flat_layout.pt"


def test_a_checkpoint_of_the_flat_layout_loads_whole():
    model, meta = checkpoint.load(SAVED)
    raw = torch.load(SAVED, map_location="cpu", weights_only=False)
    assert checkpoint.model_type(model) == "decomposer" and meta.get("saved_by") == "f03490d"
    assert model.cfg.lstm_units == 8 and model.cfg.n_items == 149
    state = model.state_dict()
    stored = raw["state_dict"] if "state_dict" in raw else raw["model"]
    assert len(stored) > 5 and set(stored) <= set(state)
    for name, tensor in stored.items():
        torch.testing.assert_close(state[name], tensor, msg=name)
