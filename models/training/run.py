"""Local entry point: prepare data, train every model on one split, evaluate, print a table.

python -m models.training.run                                   # embedded synthetic data
python -m models.training.run --dataset ml-latest-small         # ../shared copy, or --data-dir PATH
python -m models.training.run --dataset events --data-dir DIR    # your event log (docs/data-and-evaluation.md)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.cli import add_settings, setting, settings_from
from models.data import DataError, load_prepared, prepare_source
from models.data.sources import DATA_DIR_HELP, DATASETS, MIN_USER_EVENTS_HELP
from models.evaluation.evaluate import evaluate
from models.evaluation.metrics import summarize
from models.evaluation.report import TABLE_METRICS, format_table, table_row
from models.files import write_json
from models.nn import checkpoint
from models.training.defaults import PROTOCOLS, protocol_split, train_config
from models.training.loop import fit, new_model

MODEL_KINDS = (
    "decomposer",
    "lstm",
    "gru4rec",
    "sasrec",
    "popular",
    "seen-popular",
    "intent-text",
    "intent-popular",
    "history-text",
)


@dataclass
class RunSettings:
    dataset: str = setting("synthetic", " | ".join(DATASETS))
    data_dir: Path | None = setting(None, DATA_DIR_HELP)
    min_user_events: int | None = setting(None, MIN_USER_EVENTS_HELP)
    prepared_dir: Path | None = setting(None, "where prepared Parquet goes (default runs/data/DATASET)")
    out: Path = setting(Path("runs/local"), "checkpoints and results")
    models: str = setting(",".join(MODEL_KINDS), "comma-separated subset of " + ",".join(MODEL_KINDS))
    protocol: str = setting("loo", "loo: last event; last10: last 10 events", choices=sorted(PROTOCOLS))
    epochs: int = setting(200)
    patience: int = setting(10, "epochs without a better validation NDCG@10")
    time_budget: float | None = setting(None, "seconds of training per model")
    seed: int = setting(0)
    kinds: list[str] = field(default_factory=list)  # the models named by `models`, checked


def parse_args(argv=None) -> RunSettings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, RunSettings)
    ns = p.parse_args(argv)
    kinds = [k.strip() for k in ns.models.split(",") if k.strip()]
    bad = [k for k in kinds if k not in MODEL_KINDS]
    if bad or not kinds:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODEL_KINDS)}")
    return settings_from(RunSettings, ns, kinds=kinds)


def main(argv=None) -> int:
    """`python -m models.training.run` -> its exit status (2: a data error, printed as one line)."""
    args = parse_args(argv)
    try:
        prepared = prepare_source(
            args.dataset,
            args.prepared_dir or Path("runs/data") / args.dataset,
            data_dir=args.data_dir,
            min_user_events=args.min_user_events,
        )
    except (DataError, FileExistsError) as e:  # a missing, malformed or unreachable dataset: its message has the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = load_prepared(prepared)
    split = protocol_split(data.user_offsets, args.protocol)
    print(
        f"{args.dataset}: {data.n_users} users, {data.n_items} items, {len(data.items)} events; "
        f"protocol {args.protocol} ({len(split.test_pos)} test targets)"
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, results = [], {}
    for kind in args.kinds:
        torch.manual_seed(args.seed)
        model = new_model(kind, data, split)
        cfg = train_config(
            kind, epochs=args.epochs, patience=args.patience, seed=args.seed, time_budget_s=args.time_budget
        )
        t0 = time.perf_counter()
        fitted = fit(model, data, split, cfg, desc=kind)
        seconds = time.perf_counter() - t0
        checkpoint.save(
            args.out / f"{kind}.pt",
            model,
            {
                "dataset": args.dataset,
                "protocol": args.protocol,
                "best_epoch": fitted.best_epoch,
                "valid": fitted.best_valid,
            },
        )
        variants = [(kind, False)] + ([(f"{kind} + intent text", True)] if kind == "decomposer" else [])
        for name, intent in variants:
            ev = evaluate(model, data, split, "test", with_intent=intent)
            masked, unmasked = summarize(ev["masked"]), summarize(ev["unmasked"])
            results[name] = {
                "masked": masked,
                "unmasked": unmasked,
                "best_epoch": fitted.best_epoch,
                "train_seconds": round(seconds, 1),
            }
            rows.append({**table_row(name, masked, unmasked), "epochs": fitted.best_epoch, "train s": f"{seconds:.0f}"})
    print()
    print(format_table(rows, ["model", *TABLE_METRICS, "ndcg@10 unmasked", "epochs", "train s"]))
    record = {"dataset": args.dataset, "protocol": args.protocol, "seed": args.seed, "results": results}
    write_json(args.out / "results.json", record, indent=2)
    print(f"\ncheckpoints and results.json in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
