"""Recommendations for every user at once, on Ray Data: a nightly top-k table beside the online API.

    python -m ray_app.batch --checkpoint runs/ray/ml-small --data runs/data/ml-latest-small --k 100 --out recs.parquet
    python -m ray_app.batch --checkpoint runs/ray/ml-small --data my-log/ --out recs.parquet --overwrite
    ray job submit --working-dir . -- python -m ray_app.batch --checkpoint /shared/runs/ml-small \\
        --data /shared/data/ml-latest-small --out /shared/recs.parquet

Ray Data reads the users' events (`ray_app/batch/inputs.py`: a prepared dataset by ranges of users,
an event log grouped per user) and a pool of model actors (`--workers`, one CPU each, or GPUs with
`--num-gpus`) scores them with the Combiner's ranking (`ray_app/batch/scoring.py`), so a user gets
the same top-k as `/recommend` gives at the same moment without words. Ray Data writes the rows as
Parquet shards into a folder beside `--out` that replaces it once complete (`ray_app/batch/output.py`);
`--out` holds them and `_manifest.json`. Progress is Ray Data's. On a cluster (RAY_ADDRESS, or
`ray job submit`) the actors spread over its nodes: more nodes, more actors, nothing else to change;
`--data`, `--checkpoint` and `--out` must then be on storage every node reads.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from models.data.errors import DataError
from models.files import write_json
from ray_app.batch.added import read_added_items
from ray_app.batch.inputs import PreparedInput, open_input
from ray_app.batch.output import MANIFEST, check_target, publish, staging
from ray_app.batch.scoring import ScoreSettings, Scorer
from ray_app.batch.settings import BatchSettings, parse_args
from ray_app.serve.catalogue import extend
from ray_app.serve.served_model import ServedModel, ServingSetupError, resolve_checkpoint
from ray_app.train.data import SetupError
from ray_app.train.preflight import connect

ROWS_PER_FILE = 1_000_000  # a shard holds at least this many rows (the last one fewer)
LOG_USERS_PER_BATCH = 1024  # an event log's grouped users handed to a model actor at a time


@dataclass
class BatchResult:
    out: Path
    users: int
    rows: int
    workers: int
    seconds: float  # from the start of the reading to the output in place
    model_version: str

    @property
    def users_per_s(self) -> float:
        return self.users / max(self.seconds, 1e-9)


def data_error(e: BaseException) -> DataError | None:
    """The DataError behind an exception raised in a Ray task (its cause, or the cause's cause)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DataError) and "RayTaskError" not in type(e).__name__:
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def pool_size(s: BatchSettings) -> int:
    """--workers, or as many actors as the cluster holds now; SetupError when it cannot hold them."""
    import ray

    total = ray.cluster_resources()
    asks = [("CPU", s.cpus_per_worker)] + ([("GPU", s.num_gpus)] if s.num_gpus else [])
    fits = min(int(total.get(res, 0.0) // per) for res, per in asks)
    workers = s.workers or fits
    for res, per in asks:
        have = total.get(res, 0.0)
        if workers * per > have or per > have:
            raise SetupError(
                f"{max(workers, 1)} model actor(s) × {per:g} {res} need {max(workers, 1) * per:g} {res}, "
                f"the cluster has {have:g}"
            )
    return workers


def run(s: BatchSettings, num_cpus: int | None = None) -> BatchResult:
    """Check the inputs, rank every user on Ray Data, put the output in place -> what was written."""
    import ray.data

    out = check_target(s.out, s.overwrite)
    try:
        source = open_input(s.data)
        checkpoint = resolve_checkpoint(s.checkpoint)
        catalogue = source.item_ids() if isinstance(source, PreparedInput) else None
        served = ServedModel.load(checkpoint, catalogue)  # refuses what the actors would refuse, now
        genre_names = source.genre_names() if isinstance(source, PreparedInput) else []
    except (DataError, ServingSetupError, OSError) as e:
        raise SetupError(str(e)) from None
    added = read_added_items(s.store_url, served.item_source_ids, served.model.cfg.use_text) if s.store_url else []
    extend(served, added, genre_names)  # an event log's events on added items are then known
    version, max_len, vocabulary = served.version, served.model.cfg.max_len, served.item_source_ids
    del served
    connect(num_cpus, s.verbose)
    # A check that fails in a task (a malformed event log) reaches here as its own error, not a wrapper.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    workers = pool_size(s)
    at = time.time() if s.at is None else s.at
    settings = ScoreSettings(
        str(checkpoint),
        s.k,
        s.exclude_seen,
        at,
        s.users_per_call,
        max(1, int(s.cpus_per_worker)),
        tuple(added),
        tuple(genre_names),
    )
    when = datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")
    extra = f" and {len(added)} added item(s)" if added else ""
    print(f"batch: top {s.k} of version {version}{extra} at {when} by {workers} model actor(s) -> {out}", flush=True)
    t0 = time.perf_counter()
    tmp = staging(out)
    try:
        if isinstance(source, PreparedInput):
            ranges = source.ranges(s.events_per_task)
            users, n_users, per_call = ray.data.from_items(ranges, override_num_blocks=len(ranges)), source.n_users, 1
        else:
            users = source.users(vocabulary, max_len)
            n_users, per_call = users.count(), LOG_USERS_PER_BATCH
        recs = users.map_batches(
            Scorer,
            fn_constructor_kwargs={
                "settings": settings,
                "prepared": source if isinstance(source, PreparedInput) else None,
            },
            batch_size=per_call,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=s.cpus_per_worker,
            num_gpus=s.num_gpus or None,
        )
        # The writing tasks take no CPU: the actors hold them all, and a write is mostly I/O.
        recs.write_parquet(str(tmp), min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": 0})
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in tmp.glob("*.parquet"))
        manifest = {
            "model_version": version,
            "checkpoint": str(checkpoint),
            "data": str(Path(s.data).expanduser().resolve()),
            "k": s.k,
            "exclude_seen": s.exclude_seen,
            "at": at,
            "added_items": len(added),
            "users": n_users,
            "rows": rows,
            "workers": workers,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(tmp / MANIFEST, manifest, indent=1)
        publish(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        found = data_error(e)
        if found is not None:
            raise SetupError(str(found)) from None
        raise
    result = BatchResult(out, n_users, rows, workers, time.perf_counter() - t0, version)
    print(
        f"batch: {result.users} users, {result.rows} rows in {result.seconds:.1f} s "
        f"({result.users_per_s:.0f} users/s) -> {out}",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    """`python -m ray_app.batch` -> its exit status (2 after a one-line error about the input)."""
    s, a = parse_args(argv, __doc__)
    try:
        run(s, num_cpus=a.num_cpus)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
