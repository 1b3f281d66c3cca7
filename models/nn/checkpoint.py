"""Checkpoints that carry the config that built the model, loaded without unpickling objects.

Format: a `torch.save` of plain containers — {"format", "model_type", "model_args", "state_dict",
"meta"} — read back with `torch.load(weights_only=True)`, so a checkpoint cannot run code.
Load = `Config(**ckpt["model_args"])`, the same call everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from models.nn.baselines import (
    GRU4Rec,
    GRU4RecConfig,
    LSTMConfig,
    LSTMRec,
    MostPopular,
    PopularityConfig,
    SASRec,
    HistoryText,
    PhrasePopular,
    SASRecConfig,
    SeenThenPopular,
    TextRetrieval,
)
from models.nn.decomposer import DecomposerConfig, InterestDecomposer
from models.files import atomic_path

FORMAT = "dynamic-interest-checkpoint/1"
BEST_FILE = "best_checkpoint.json"  # a training run's record of its best checkpoint, beside its checkpoints
MODELS = {
    "decomposer": (DecomposerConfig, InterestDecomposer),
    "lstm": (LSTMConfig, LSTMRec),
    "sasrec": (SASRecConfig, SASRec),
    "gru4rec": (GRU4RecConfig, GRU4Rec),
    "popular": (PopularityConfig, MostPopular),
    "seen-popular": (PopularityConfig, SeenThenPopular),
    "intent-text": (PopularityConfig, TextRetrieval),
    "intent-popular": (PopularityConfig, PhrasePopular),
    "history-text": (PopularityConfig, HistoryText),
}


# Config fields added after checkpoints of FORMAT were first written, with the value their absence
# means: the model as it was before the field existed (whatever today's default is).
ABSENT_MEANS = {"decomposer": {"residual": False, "profile_decays": (), "scale_gates": False, "use_text": True}}


# Weights that moved into a part of their own after checkpoints of FORMAT were first written:
# model type -> (a name only such an old state has, or None for any; old name prefix -> new prefix).
MOVED = {
    "decomposer": (
        None,
        {
            old: f"interests.{old}"
            for old in ("heads.", "ctx.", "intent.", "gate_a", "gate_b", "gate_v", "log_prior", "aux.")
        },
    ),
    # SASRec with text: its own item vectors became the item tower (`text_proj.` before `text`).
    "sasrec": (
        "text_proj.weight",
        {"item_emb.": "items.emb.", "text_proj.": "items.proj.", "text": "items.text", "known": "items.known"},
    ),
}


def _moved(kind: str, state: dict) -> dict:
    """A state dict with the names of MOVED weights brought up to date."""
    trigger, moves = MOVED.get(kind, (None, {}))
    if trigger is not None and trigger not in state:
        return state
    out = {}
    for name, value in state.items():
        new = next((to + name[len(old) :] for old, to in moves.items() if name.startswith(old)), name)
        out[new] = value
    return out


class CheckpointError(ValueError):
    pass


def model_type(model: nn.Module) -> str:
    for name, (_, cls) in MODELS.items():
        if type(model) is cls:
            return name
    raise CheckpointError(f"unknown model class {type(model).__name__}")


def build(kind: str, args: dict) -> nn.Module:
    if kind not in MODELS:
        raise CheckpointError(f"unknown model_type {kind!r}; expected one of {sorted(MODELS)}")
    cfg_cls, model_cls = MODELS[kind]
    try:
        cfg = cfg_cls(**args)
    except TypeError as e:
        raise CheckpointError(f"model_args do not fit {cfg_cls.__name__}: {e}") from e
    return model_cls(cfg)


def to_bytes_dict(model: nn.Module, meta: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "model_type": model_type(model),
        "model_args": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }


def save(path: str | Path, model: nn.Module, meta: dict | None = None) -> Path:
    """Atomic write: a crash mid-save leaves any previous checkpoint at `path` intact."""
    path = Path(path)
    with atomic_path(path, mode=0o600) as tmp:
        torch.save(to_bytes_dict(model, meta), tmp)
    return path


def from_dict(ckpt: dict, source: str = "checkpoint") -> tuple[nn.Module, dict]:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a {FORMAT} checkpoint")
    for key in ("model_type", "model_args", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{source}: missing {key!r}")
    model = build(ckpt["model_type"], {**ABSENT_MEANS.get(ckpt["model_type"], {}), **ckpt["model_args"]})
    # A checkpoint from before the cold-item mask: every item keeps its id vector, as it was trained.
    saved = _moved(ckpt["model_type"], ckpt["state_dict"])
    state = {**{k: v for k, v in model.state_dict().items() if k.split(".")[-1] == "known"}, **saved}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{source}: weights do not match model_args ({first[0] if first else e})") from e
    model.eval()
    return model, ckpt.get("meta", {})


def load(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """-> (model in eval mode, meta). Raises CheckpointError with the path and reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable or corrupt checkpoint ({type(e).__name__}: {e})") from e
    return from_dict(ckpt, str(path))


def item_vocabulary(meta: dict) -> np.ndarray | None:
    """A checkpoint's item index -> source id (N+1,) as an object array of str, [0] == "" (padding);
    None when its meta has no `item_source_ids`. Training writes them as a list of str; a checkpoint
    from before source ids were strings holds an int64 tensor, read as the numbers' decimal strings."""
    ids = meta.get("item_source_ids")
    if ids is None:
        return None
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return np.array(["", *(str(v) for v in values[1:])], dtype=object)


class BestCheckpoint(BaseModel):
    """`<run>/best_checkpoint.json`: written by `ray_app.train`, read by tuning, serving and the main job."""

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=(), extra="ignore")
    run: str  # the run's name (its folder under the storage path)
    path: str  # the checkpoint folder
    model: str  # its model.pt, what serving loads
    epoch: int
    valid_ndcg10: float = Field(alias="valid_ndcg@10")
    metrics: dict  # everything the epoch reported
    model_type: str
    dataset: str
    protocol: str
    history: list[dict] = []  # every epoch's report, oldest first

    @classmethod
    def read(cls, path: str | Path) -> "BestCheckpoint":
        """The record in `path`; ValueError naming the file and the field when it is not one."""
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "record"
            raise ValueError(f"{path}: not a best-checkpoint record ({field!r}: {err['msg']})") from None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)
