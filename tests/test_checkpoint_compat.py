"""A checkpoint written by the flat `models/` layout (commit f03490d, before the stage sub-packages)
loads with today's code as the model it was, with every weight it held.

The checkpoint is written by that commit's own code, taken from the repository's history with
`git archive` and run in a process of its own, so no model file is kept in the repository.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from models.nn import checkpoint

ROOT = Path(__file__).resolve().parents[1]
FLAT_LAYOUT = "f03490d"
SAVE = """
import sys, torch
from models.checkpoint import build, save
torch.manual_seed(0)
model = build("decomposer", {"n_items": 149, "n_genres": 8, "item_dim": 8, "lstm_units": 8, "dim_size": 4,
                             "context_dim": 4, "residual": True, "profile_decays": [1.0, 0.98, 0.9]})
save(sys.argv[1], model, {"saved_by": "f03490d"})
"""


@pytest.fixture(scope="module")
def flat_layout_checkpoint(tmp_path_factory) -> Path:
    """The decomposer checkpoint that commit FLAT_LAYOUT's code writes."""
    have = subprocess.run(["git", "cat-file", "-e", f"{FLAT_LAYOUT}^{{commit}}"], cwd=ROOT, capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {FLAT_LAYOUT} is not in this clone's history (a shallow clone)")
    old = tmp_path_factory.mktemp("flat-layout")
    archive = subprocess.run(["git", "archive", FLAT_LAYOUT, "models"], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(old, filter="data")
    out = old / "decomposer.pt"
    env = {**os.environ, "PYTHONPATH": str(old)}  # the old `models` first (today's has no models.checkpoint)
    subprocess.run([sys.executable, "-c", SAVE, str(out)], cwd=old, env=env, check=True, capture_output=True)
    return out


def test_a_checkpoint_of_the_flat_layout_loads_whole(flat_layout_checkpoint):
    model, meta = checkpoint.load(flat_layout_checkpoint)
    raw = torch.load(flat_layout_checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint.model_type(model) == "decomposer" and meta.get("saved_by") == "f03490d"
    assert model.cfg.lstm_units == 8 and model.cfg.n_items == 149
    state = model.state_dict()
    stored = raw["state_dict"] if "state_dict" in raw else raw["model"]
    stored = checkpoint._moved("decomposer", stored)  # weights that moved into a part of their own
    assert len(stored) > 5 and set(stored) <= set(state)
    for name, tensor in stored.items():
        torch.testing.assert_close(state[name], tensor, msg=name)
