"""Checkpoints: the round trip, corrupt, mismatched, pickled and missing files, and a checkpoint
from before a field existed."""

from __future__ import annotations

import pytest
import torch

from models.nn import checkpoint
from models.nn.checkpoint import CheckpointError
from models.nn.decomposer import DecomposerConfig
from models.training.loop import new_model
from model_helpers import first_batch


def test_checkpoint_round_trip_and_bad_files(tiny_data, split, tmp_path):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split, lstm_units=48, dims=("topic",), n_latent=2).eval()
    path = checkpoint.save(tmp_path / "best.pt", m, {"valid_ndcg@10": 0.5})
    loaded, meta = checkpoint.load(path)
    assert loaded.cfg == m.cfg and meta == {"valid_ndcg@10": 0.5}
    batch = first_batch(tiny_data, split)
    torch.testing.assert_close(loaded.score(batch), m.score(batch))

    (tmp_path / "corrupt.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "corrupt.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_args"]["lstm_units"] = 64
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        checkpoint.load(tmp_path / "mismatch.pt")
    torch.save({"format": checkpoint.FORMAT, "evil": object()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="corrupt"):  # arbitrary objects are never unpickled
        checkpoint.load(tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="no such"):
        checkpoint.load(tmp_path / "missing.pt")


def test_a_checkpoint_from_before_a_field_existed_loads_as_the_model_it_was(tiny_data, split, tmp_path):
    """Fields added later (the residual readout, the profiles) mean "off" when a checkpoint lacks them."""
    torch.manual_seed(0)
    old = new_model("decomposer", tiny_data, split, residual=False, profile_decays=()).eval()
    ckpt = checkpoint.to_bytes_dict(old)
    for added in checkpoint.ABSENT_MEANS["decomposer"]:
        del ckpt["model_args"][added]
    torch.save(ckpt, tmp_path / "old.pt")
    loaded, _ = checkpoint.load(tmp_path / "old.pt")
    assert loaded.direct is None and loaded.cfg.profile_decays == ()
    assert DecomposerConfig().residual and DecomposerConfig().profile_decays  # today's defaults differ
    batch = first_batch(tiny_data, split)
    torch.testing.assert_close(loaded.score(batch), old.score(batch))


def test_a_checkpoint_from_before_the_cold_item_mask_keeps_every_id_vector(tiny_data, split):
    torch.manual_seed(0)
    m = new_model("decomposer", tiny_data, split).eval()
    m.items.known[3] = 0.0
    ckpt = checkpoint.to_bytes_dict(m)
    loaded, _ = checkpoint.from_dict(ckpt)
    assert loaded.items.known[3] == 0.0  # the mask travels with the checkpoint
    for key in [k for k in ckpt["state_dict"] if k.endswith(".known")]:  # items.known, encoder.items.known
        del ckpt["state_dict"][key]
    loaded, _ = checkpoint.from_dict(ckpt)
    assert bool((loaded.items.known == 1.0).all())
