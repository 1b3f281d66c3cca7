"""The Serve graph's model stages: Encoder (text -> vector), Decomposer (events / stored state ->
LSTM state and the K dimension vectors), Combiner (context + dimensions -> gates, scores, top-k).

The model-holding stages take their checkpoint through `user_config` ({"checkpoint": file,
"sha256": digest}; the app always sends both, and the digest is checked before the swap),
so a new checkpoint is swapped in by `reconfigure` without restarting replicas. Every result
carries the model version it came from; the Combiner loads that version on demand, so a
request caught between two replicas' swaps is still answered consistently.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from ray import serve

from models.data.encoder import TextEncoder
from ray_app.serve.ann import HNSWIndex, IndexSettings, check_servable, item_index
from ray_app.serve.catalogue import Follower
from ray_app.serve.metrics import AppMetrics
from ray_app.serve.ranking import rank
from ray_app.serve.records import RankJob, Ranking, UserState
from ray_app.serve.served_model import ServedModel, event_tensors, pack_state, unpack_state
from ray_app.store.base import StoredState
from ray_app.store.opener import open_store

log = logging.getLogger("ray.serve")


def _configure_batching(method, max_batch_size: int, batch_wait_s: float) -> None:
    method.set_max_batch_size(max_batch_size)
    method.set_batch_wait_timeout_s(batch_wait_s)


def _checkpoint_of(config: dict) -> tuple[str, str | None]:
    """user_config -> (checkpoint FILE, its sha256). build_app always gives both, so every replica,
    autoscaled or not, loads the bytes the configuration names; a run folder, which each replica
    would resolve when it starts, is refused."""
    if not isinstance(config, dict) or not config.get("checkpoint") or set(config) - {"checkpoint", "sha256"}:
        raise ValueError(f"user_config must be {{'checkpoint': FILE, 'sha256': HEX}}, got {config!r}")
    sha256 = config.get("sha256")
    if (sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", str(sha256))) or Path(
        config["checkpoint"]
    ).is_dir():
        raise ValueError(f"user_config must name a checkpoint file and its 64-hex sha256, got {config!r}")
    if sha256 is None:  # only a direct, in-process call: the app always names the digest
        log.warning("serving %s without a digest: nothing checks that it is the file meant", config["checkpoint"])
    return str(config["checkpoint"]), sha256


@serve.deployment
class Encoder:
    """all-MiniLM-L6-v2 over a batch of texts (intent phrases, search queries)."""

    def __init__(self, max_batch_size: int = 16, batch_wait_s: float = 0.005, cache_size: int = 10_000):
        # User text is arbitrary: keep it off the disk cache, in an LRU of `cache_size` vectors
        # (1.5 kB each). A GPU is used when the replica has one.
        self.encoder = TextEncoder(
            cache=False, max_cached=cache_size, device="cuda" if torch.cuda.is_available() else "cpu"
        )
        self.encoder.encode(["warm up"])  # load the model now, not on the first request
        self.metrics = AppMetrics()
        _configure_batching(self.encode, max_batch_size, batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode(self, texts: list[str]) -> list[np.ndarray]:
        emb = self.encoder.encode(texts)  # (B, 384), one forward pass for the batch
        self.metrics.text_cache.set(self.encoder.cached)
        return list(emb)


@serve.deployment
class Decomposer:
    """Per user: a stored state ((h, c)[, profile]) advanced by one LSTM step per event it has not consumed yet."""

    def __init__(
        self, store_url: str, data_dir: str | None = None, max_batch_size: int = 16, batch_wait_s: float = 0.002
    ):
        self.store = open_store(store_url)
        self.added = Follower.open(self.store, data_dir)  # the items added while serving
        self.served: ServedModel | None = None
        self.metrics = AppMetrics()
        _configure_batching(self.user_state, max_batch_size, batch_wait_s)

    def reconfigure(self, config: dict) -> None:
        path, sha256 = _checkpoint_of(config)
        served = ServedModel.load(path, self.added.catalogue_ids, sha256)
        if self.served is None or served.version != self.served.version:
            # States written by the old version are rebuilt lazily, on each user's next request.
            self.added.quietly(served, "Decomposer swap")  # the added items, placed by this model
            self.served = served
            log.info("Decomposer serving %s (version %s)", served.path, served.version)

    def info(self) -> dict:
        s = self.served
        return {
            "model_version": s.version,
            "checkpoint": str(s.path),
            "dimensions": s.dim_names,
            "n_items": s.model.cfg.n_items,
            "places_by_text": bool(s.model.cfg.use_text),  # an added item has a vector of its own
        }

    # ---- a stored user -------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def user_state(self, requests: list[tuple[str, bool]]) -> list[UserState]:
        """(user_id, with_seen) -> UserState; the one-step advances of a batch run together,
        in a thread: the store calls never block the replica's event loop."""
        with self.metrics.store_errors_in("user_state"):
            return await asyncio.to_thread(self._advance_users, requests)

    @torch.no_grad()
    def _advance_users(self, requests: list[tuple[str, bool]]) -> list[UserState]:
        served = self.served  # one model for the whole batch even if reconfigure runs meanwhile
        self.added(served)  # the items added since the last batch (one read of their count)
        sizes = served.state_sizes
        out: list[UserState | None] = [None] * len(requests)
        groups: dict[tuple[bool, int], list] = defaultdict(list)  # (has state, new events) -> jobs
        for j, (user_id, with_seen) in enumerate(requests):
            snap = self.store.snapshot(user_id, with_seen)  # state, log length, last event, seen: one call
            stored, n = snap.state, snap.n_events
            state = None
            if stored is not None and stored.model_version == served.version and stored.n_events <= n:
                state = unpack_state(stored.blob, sizes)  # (a state ahead of the log: only if the log was reset)
            # A rebuild reads the window the model ranks from (its max_len), not the whole log.
            start = stored.n_events if state is not None else max(n - served.model.cfg.max_len, 0)
            first = max(start - 1, 0)
            events = [snap.last_event] if n == start and n else []
            if n > start:  # one more read: the event before `start` (for its gap) and everything after it
                events = self.store.events(user_id, first)
                n = first + len(events)  # events appended since the snapshot are consumed too
                if n < start:  # the log was reset between the two reads
                    state, start = None, max(n - served.model.cfg.max_len, 0)
                    first = max(start - 1, 0)
                    events = self.store.events(user_id, first)
                    n = first + len(events)
            if state is None and n > 0:
                self.metrics.state_rebuilds.inc()
            seen = snap.seen
            if seen is not None and n > snap.n_events:  # the items of events appended since the snapshot
                seen = seen + list({e.item_id for e in events[snap.n_events - first :]} - set(seen))
            job = {
                "j": j,
                "user_id": user_id,
                "n": n,
                "start": start,
                "state": state,
                "events": events,
                "first": first,
                "seen": seen,
            }
            if n == start:
                self._finish(out, job, served, state)
            else:
                groups[(state is not None, n - start)].append(job)
        for (has_state, _), jobs in groups.items():
            tensors = [self._tensors(served, job) for job in jobs]
            dev = served.device
            cat = {k: torch.cat([t[k] for t in tensors]).to(dev) for k in ("items", "ratings", "event_feats")}
            init = None
            if has_state:  # each part (1, B, size): h, c[, profile sums, weights]
                init = tuple(
                    torch.stack([job["state"][p] for job in jobs]).unsqueeze(0).to(dev) for p in range(len(sizes))
                )
            parts = [x.cpu() for x in served.model.advance(init, cat["items"], cat["ratings"], cat["event_feats"])]
            for b, job in enumerate(jobs):
                new = tuple(x[0, b] for x in parts)
                self.store.put_state(job["user_id"], StoredState(served.version, job["n"], pack_state(*new)))
                self._finish(out, job, served, new)
        return out

    def _tensors(self, served: ServedModel, job: dict) -> dict[str, torch.Tensor]:
        ev = job["events"]
        items = np.array([served.index_of.get(e.item_id, 0) for e in ev], np.int64)
        ratings = np.array([e.rating for e in ev], np.float32)
        ts = np.array([e.timestamp for e in ev], np.float64)
        within = job["start"] - job["first"]  # events before it only give the first new event its gap
        return event_tensors(items, ratings, ts, within, ts[-1])

    def _finish(self, out: list, job: dict, served: ServedModel, state) -> None:
        h = served.interest(state)  # (U[+R·D],) interest state z
        seen, ids = None, job["seen"]
        if ids is not None:  # the store's seen set, not a read of the whole log
            # The store's ids are distinct, so their indices are too, but for 0 (an id outside this
            # version's catalogue), which is excluded anyway: no np.unique on the request path.
            seen = np.fromiter(map(served.index_of.get, ids, repeat(0, len(ids))), np.int64, len(ids))
        out[job["j"]] = self._result(served, h, job["n"], job["events"][-1].timestamp if job["events"] else None, seen)

    @staticmethod
    def _result(
        served: ServedModel, h: torch.Tensor, n: int, last_ts: float | None, seen: np.ndarray | None
    ) -> UserState:
        return UserState(served.version, str(served.path), h.cpu().numpy(), n, last_ts, seen, served.model.cfg.n_items)

    async def advance(self, user_id: str) -> int:
        """Bring a user's stored state up to date (after new events); -> events consumed."""
        return (await self.user_state((user_id, False))).n_events

    # ---- an inline history ---------------------------------------------------------------
    @torch.no_grad()
    def history_state(self, events: list[tuple[str, float, float]]) -> UserState:
        """Source-id events (any order; sorted by time, stably, as in training) -> UserState; nothing stored."""
        served = self.served
        self.added.quietly(served, "inline history")  # an inline history needs no store otherwise
        events = sorted(events, key=lambda e: e[2])
        if not events:
            return self._result(served, served.interest(None), 0, None, np.zeros(0, np.int64))
        items = np.array([served.index_of[e[0]] for e in events], np.int64)
        ratings = np.array([e[1] for e in events], np.float32)
        ts = np.array([e[2] for e in events], np.float64)
        t = {k: v.to(served.device) for k, v in event_tensors(items, ratings, ts, 0, ts[-1]).items()}
        z = served.model.interest_state(served.model.advance(None, t["items"], t["ratings"], t["event_feats"]))
        return self._result(served, z[0].cpu(), len(events), float(ts[-1]), np.unique(items))

    # ---- gates step by step ----------------------------------------------------------------
    async def interests(self, user_id: str, last: int, now: float | None = None) -> dict:
        """α after each of the user's last `last` events, read at the moment of the next event."""
        with self.metrics.store_errors_in("interests"):
            return await asyncio.to_thread(self._interests, user_id, last, now)

    @torch.no_grad()
    def _interests(self, user_id: str, last: int, now: float | None) -> dict:
        served = self.served
        self.added(served)
        events = self.store.events(user_id)
        window = getattr(served.model.encoder, "max_len", None)  # a transformer attends to its last max_len events
        n_before = max(len(events) - window, 0) if window is not None else 0
        events = events[n_before:]
        if not events:
            return {"dimensions": served.dim_names, "steps": []}
        now = time.time() if now is None else now
        items = np.array([served.index_of.get(e.item_id, 0) for e in events], np.int64)
        ts = np.array([e.timestamp for e in events], np.float64)
        batch = event_tensors(items, np.array([e.rating for e in events], np.float32), ts, 0, max(now, ts[-1]))
        batch = {k: v.to(served.device) for k, v in batch.items()}
        m = served.model
        h = m.states(batch)[0]  # (T, U[+R·D])
        lo = max(len(events) - last, 0)
        alpha = m.gates(h[lo:], batch["ctx_feats"][0, lo:]).cpu()  # (L, M)
        names = served.dim_names
        steps = [
            {
                "index": n_before + lo + j,
                "item_id": events[lo + j].item_id,
                "timestamp": events[lo + j].timestamp,
                "gates": dict(zip(names, map(float, a))),
            }
            for j, a in enumerate(alpha)
        ]
        return {"dimensions": names, "steps": steps}


@serve.deployment
class Combiner:
    """Context + dimensions -> gates α, scores over the catalogue, top-k, explanation.

    `index` chooses how the top-k is found: exact (a matmul over the catalogue) or an HNSW graph
    (ray_app/serve/ann.py), built when a version is configured (in a thread, ranking exactly
    meanwhile, for a version a request brings first); explanations are exact either way.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.002,
        keep_versions: int = 2,
        index: IndexSettings | dict | None = None,
        store_url: str | None = None,
    ):
        # The dataset's vocabulary serves checkpoints that carry none (those of models.training.run);
        # the store holds the items added while serving (None: none are).
        self.added = Follower.open(store_url, data_dir)
        self.index = IndexSettings.model_validate(index or {})
        self.models: OrderedDict[str, ServedModel] = OrderedDict()
        self.keep_versions = keep_versions
        self.current: ServedModel | None = None
        # Graphs of versions that a request brought before this replica's own swap, built off the event loop.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="item-index")
        self._building: dict[str, Future] = {}
        _configure_batching(self._rank_batch, max_batch_size, batch_wait_s)

    def reconfigure(self, config: dict) -> None:
        path, sha256 = _checkpoint_of(config)
        served = ServedModel.load(path, self.added.catalogue_ids, sha256)
        self.added.quietly(served, "Combiner swap")  # before the graph is built: it holds them too
        building = self._building.get(served.version)
        if building is not None:  # a request brought this version first: its graph, not a second build
            wait([building])
            held = self.models.get(served.version)
            if held is not None:
                served.indexes.update(held.indexes)
        # Built now (unless adopted), before the swap; refuses a checkpoint the index cannot serve.
        item_index(served, self.index)
        self.current = self._remember(served)

    def _remember(self, served: ServedModel) -> ServedModel:
        self.models[served.version] = served
        self.models.move_to_end(served.version)
        while len(self.models) > self.keep_versions:
            old = self._building.pop(self.models.popitem(last=False)[0], None)
            if old is not None:
                old.cancel()  # a build that has not started never starts
        return served

    def _model_for(self, version: str, path: str) -> ServedModel:
        # One lookup, and the loaded model itself returned: a swap in reconfigure's thread may evict meanwhile.
        served = self.models.get(version)
        if served is None:
            served = ServedModel.load(path, self.added.catalogue_ids)
            if served.version != version:
                raise RuntimeError(f"checkpoint {path} changed on disk (version {served.version}, wanted {version})")
            check_servable(served, self.index)
            self._remember(served)
        return served

    def _index_for(self, served: ServedModel) -> HNSWIndex | None:
        """The index that ranks this version, or None for the exact matmul. A version that a request
        brought before this replica's own swap gets its graph built in a thread; until then, and for
        good if that build fails (logged), the matmul ranks it: no request waits for a graph."""
        if self.index.kind == "exact":
            return None
        built = served.indexes.get(self.index)
        if built is None and served.version not in self._building:
            self._building[served.version] = self._builder.submit(self._build, served)
        return built

    def _build(self, served: ServedModel) -> None:
        try:
            item_index(served, self.index)
            log.info("Combiner: the item graph of version %s is built", served.version)
        except Exception:
            log.exception(
                "Combiner: building the item graph of version %s failed; it is ranked exactly", served.version
            )

    async def rank(
        self,
        state: UserState,
        intent: np.ndarray | None,
        k: int,
        exclude_seen: bool,
        explain: bool,
        timestamp: float | None,
    ) -> Ranking:
        """One request; batched with others in `_rank_batch` (one catalogue matmul per batch)."""
        now = time.time() if timestamp is None else timestamp
        return await self._rank_batch(RankJob(state, intent, k, exclude_seen, explain, now))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, jobs: list[RankJob]) -> list[Ranking]:
        out: list[Ranking | None] = [None] * len(jobs)
        by_version = defaultdict(list)
        for j, job in enumerate(jobs):
            by_version[(job.state.model_version, job.state.checkpoint)].append(j)
        for (version, path), rows in by_version.items():
            served = self._model_for(version, path)
            knew = max(jobs[j].state.n_items for j in rows)  # the catalogue the Decomposer ranked with
            if knew > served.model.cfg.n_items:  # items added since: read off the event loop
                await asyncio.to_thread(self.added, served, knew)
            for j, res in zip(rows, self._rank(served, [jobs[j] for j in rows])):
                out[j] = res
        return out

    def _rank(self, served: ServedModel, jobs: list[RankJob]) -> list[Ranking]:
        """The ranking the batch job shares (`ray_app.serve.ranking.rank`), with this replica's index;
        under the model's lock, so that items appended by a search's catch-up (in Serve's thread
        pool) never change the catalogue in the middle of a ranking."""
        index = self._index_for(served)
        with served.lock:
            return rank(served, jobs, index)

    @torch.no_grad()
    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Items whose text embedding is closest (cosine) to the query's."""
        self.added.quietly(self.current, "search")
        text = self.current.model.items.text  # (N+1, 384), normalised
        sims = text[1:] @ torch.tensor(np.asarray(query), dtype=torch.float32, device=text.device)  # (N,)
        top = sims.topk(min(k, len(sims)))
        top = (top.indices.cpu(), top.values.cpu())
        return [(int(i) + 1, float(v)) for i, v in zip(*top)]
