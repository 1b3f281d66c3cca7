"""What the Serve deployments share, without Ray: the loaded model, the catalogue, event tensors.

Kept apart from the deployment classes so that the pieces a request goes through can be
tested (and benchmarked in-process) without starting Serve.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from models.nn import checkpoint
from models.data.batching import BatchBuilder
from models.files import sha256_file as file_sha256
from models.nn.decomposer import InterestDecomposer
from ray_app.serve.item_catalogue import ServingSetupError, vocabulary_index


def resolve_checkpoint(path: str | Path) -> Path:
    """A `model.pt` file, a checkpoint folder holding one, or a Ray Train run folder -> model.pt."""
    path = Path(path).expanduser()
    if path.is_dir():
        best = path / checkpoint.BEST_FILE
        if best.is_file():
            try:
                model = Path(checkpoint.BestCheckpoint.read(best).model).expanduser()
            except ValueError as e:
                raise ServingSetupError(str(e)) from None
            return model if model.is_absolute() else best.parent / model
        if (path / "model.pt").is_file():
            return path / "model.pt"
        raise ServingSetupError(f"{path}: a folder without {checkpoint.BEST_FILE} or model.pt")
    if not path.is_file():
        raise ServingSetupError(f"{path}: no such checkpoint file or run folder")
    return path


def file_version(path: Path) -> str:
    """model_version: the short sha256 of the checkpoint file's bytes."""
    return file_sha256(path)[:12]


@dataclass
class ServedModel:
    """A decomposer checkpoint ready to serve: model, version and the source-id vocabulary."""

    model: InterestDecomposer
    version: str
    path: Path
    item_source_ids: np.ndarray  # (N+1,) model index -> source id (str); [0] = "" (padding)
    device: torch.device = torch.device("cpu")
    # Item indexes built over item_vecs for this version, by their settings (ray_app/serve/ann.py).
    indexes: dict = field(default_factory=dict, repr=False)
    # Items added while serving grow the catalogue beyond the trained n_trained (ray_app/serve/catalogue.py).
    n_trained: int = field(init=False)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self):
        self.n_trained = self.model.cfg.n_items

    @cached_property
    def index_of(self) -> dict[str, int]:
        """Source item id (the API's `item_id`) -> model index."""
        return vocabulary_index(self.item_source_ids)

    @cached_property
    def item_vecs(self) -> torch.Tensor:
        """(N+1, D[+1]) every item's output vector (its bias too, when the model has one), computed once."""
        with torch.no_grad():
            return self.model.eval().items.output()

    @property
    def dim_names(self) -> list[str]:
        return list(self.model.cfg.member_names)

    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Sizes of a stored state's parts: (h, c) and, with a profile, its decayed sums and weights."""
        return self.model.state_sizes()

    def interest(self, state: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """A stored state's parts (each 1-D) -> the interest state z (U[+R·D],); zeros for a new user."""
        if state is None:
            return torch.zeros(self.model.state_dim)
        return self.model.interest_state(tuple(x[None, None] for x in state))[0]

    @classmethod
    def load(cls, path: str | Path, catalogue_ids: np.ndarray | None = None, sha256: str | None = None) -> ServedModel:
        """`sha256`, when given, is the checkpoint file's digest: another file is refused, so that
        every replica of a swap serves the bytes the swap named."""
        file = resolve_checkpoint(path)
        if sha256 is not None:
            got = file_sha256(file)
            if got != sha256.lower():
                raise ServingSetupError(
                    f"{file}: sha256 {got} is not the {sha256} the configuration names; "
                    "the file changed after the swap was made"
                )
        try:
            model, meta = checkpoint.load(file)
        except checkpoint.CheckpointError as e:
            raise ServingSetupError(str(e)) from e
        if not isinstance(model, InterestDecomposer):
            raise ServingSetupError(
                f"{file}: a {checkpoint.model_type(model)!r} checkpoint; serving needs a "
                "'decomposer' (the baselines have no dimensions or gates)"
            )
        ids = checkpoint.item_vocabulary(meta)
        if ids is None:
            if catalogue_ids is None:
                raise ServingSetupError(f"{file}: no item vocabulary in the checkpoint and no dataset given")
            ids = catalogue_ids
        if len(ids) != model.cfg.n_items + 1:
            raise ServingSetupError(f"{file}: item vocabulary has {len(ids) - 1} items, the model {model.cfg.n_items}")
        if catalogue_ids is not None and not np.array_equal(ids, catalogue_ids):
            raise ServingSetupError(f"{file}: its item vocabulary differs from the dataset's items")
        # A replica given a GPU (ray_actor_options num_gpus) sees it; others see none.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), file_version(file), file, ids, device)  # version: digest of the same bytes


def event_tensors(
    items: np.ndarray, ratings: np.ndarray, timestamps: np.ndarray, first: int, next_ts: float
) -> dict[str, torch.Tensor]:
    """Model inputs for events [first, len) of one user, with the training code's features.

    `items` are model indices; events before `first` only provide the gap of event `first`.
    `next_ts` is the moment after the last event (the request), so ctx_feats[:, t] is the
    context at which the state after event t is read: the next event's moment, as in training.
    """
    n = len(items)
    builder = BatchBuilder(np.append(items, 0), np.append(ratings, 1.0), np.append(timestamps, next_ts))
    return builder(np.array([first]), np.array([n]), np.array([0]), supervise_all=False)


def pack_state(*parts: torch.Tensor) -> bytes:
    """A state's parts (each 1-D: h, c[, profile sums, weights]) -> float32 bytes, concatenated."""
    return np.concatenate([p.numpy() for p in parts]).astype(np.float32).tobytes()


def unpack_state(blob: bytes, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
    """float32 bytes -> the parts of `sizes`; None for a state of another shape (rebuilt, not misread)."""
    arr = np.frombuffer(blob, dtype=np.float32)
    if arr.size != sum(sizes):
        return None
    return tuple(torch.from_numpy(arr.copy()).split(list(sizes)))
