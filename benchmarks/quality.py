"""Quality benchmark: every model on the same split, same budget, several seeds.

    python benchmarks/quality.py --dataset ml-latest-small --seeds 0,1,2 --protocols loo,last10
    python benchmarks/quality.py --dataset synthetic
    python benchmarks/quality.py --prepared runs/data/ml-latest-small --device cuda --workers 8

Prints a Markdown table (mean ± std over seeds of HR@10, NDCG@10, MRR, train time), paired
bootstrap intervals over users for the decomposer against each baseline, and records
everything in benchmarks/results/quality_<dataset>.json (finished runs are kept, so an
interrupted benchmark resumes where it stopped). `--workers N` trains N runs at once in
separate processes (on one GPU, or on N CPU cores); `--deadline S` starts no run after S
seconds, for a bounded session on a borrowed machine; `--by-variant` runs every seed of
the first variant before the next (the default runs every variant of the first seed first).

One comparison is declared before any run (`PRIMARY`): the decomposer against SASRec with the
same information (item text, rating and time features) and the same recipe options (seen items
out of the softmax, averaged weights), on last-10. Its interval resamples seeds and users; every
other interval printed is exploratory. Requests with words are evaluated in four regimes
(`models.data.batching.INTENT_REGIMES`); the oracle one is built from the answer and is only ever
compared with baselines given the same words.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from machine_info import machine  # sibling script
from models.cli import add_settings, setting, settings_from
from models.data import load_prepared, prepare_source
from models.data.sources import DATA_DIR_HELP, MIN_USER_EVENTS_HELP
from models.data.batching import INTENT_REGIMES
from models.evaluation.evaluate import evaluate
from models.evaluation.metrics import per_user_mean, summarize
from models.files import write_json
from models.nn.baselines import FusedWithText
from models.training.defaults import PROTOCOLS, protocol_split
from models.training.loop import fit, new_model, training_counts
from quality_tables import plot, report
from quality_variants import (
    ABLATIONS,
    DEFAULT_VARIANTS,
    FUSED,
    FUSION_WEIGHTS,
    INTENT_EVALUATED,
    TEXT_SASREC,
    VARIANTS,
    build_variant,
    fused_name,
    intent_name,
)

__all__ = ["RESULTS", "TEXT_SASREC", "VARIANTS", "build_variant", "cold_rows", "machine", "write_json"]
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class QualitySettings:
    dataset: str = setting("synthetic", "a dataset name (prepared under runs/data/NAME); names the results file")
    data_dir: Path | None = setting(None, DATA_DIR_HELP)
    min_user_events: int | None = setting(None, MIN_USER_EVENTS_HELP)
    prepared: Path | None = setting(None, "an already prepared folder (then --dataset only names the results)")
    seeds: str = setting("0,1,2", "comma-separated")
    protocols: str = setting("loo,last10", "comma-separated, from: " + ", ".join(PROTOCOLS))
    variants: str = setting(";".join(DEFAULT_VARIANTS), "';'-separated, from: " + "; ".join(VARIANTS))
    ablation_protocols: str = setting("loo", "protocols on which the ablations run")
    epochs: int = setting(200)
    patience: int = setting(10, "epochs without a better validation NDCG@10")
    time_budget: float | None = setting(None, "training seconds per model")
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu")
    workers: int = setting(1, "runs trained at once, each in its own process")
    deadline: float | None = setting(None, "start no run after this many seconds")
    by_variant: bool = setting(
        False, "every seed of a variant before the next variant (default: every variant of a seed first)"
    )
    out: Path | None = setting(None, "the results file (default benchmarks/results/quality_DATASET.json)")
    also: list[Path] = setting(
        factory=list, help="another results JSON whose runs join the tables (read only; e.g. runs from another machine)"
    )


def cold_rows(data, split) -> np.ndarray:
    """Test rows whose target item appears in no training event (first seen after training)."""
    return np.nonzero(training_counts(data, split)[data.items[split.test_pos]] == 0)[0]


def fusion_weight(model, text_rule, data, split, regime: str, device: str) -> tuple[float, float]:
    """The fusion weight with the best validation NDCG@10 under `regime` -> (weight, that NDCG@10)."""
    scored = []
    for w in FUSION_WEIGHTS:
        ev = evaluate(
            FusedWithText(model, text_rule, w), data, split, "valid", with_intent=True, intent=regime, device=device
        )
        scored.append((float(np.mean(ev["masked"]["ndcg@10"])), w))
    best, w = max(scored)
    return w, best


def run_one(data, split, variant: str, seed: int, args, device: str = "cpu", progress: bool = True) -> dict:
    model, cfg = build_variant(
        variant, data, split, seed, epochs=args.epochs, patience=args.patience, time_budget_s=args.time_budget
    )
    t0 = time.perf_counter()
    fitted = fit(model, data, split, cfg, progress=progress, device=device, desc=f"{variant} s{seed}")
    seconds = time.perf_counter() - t0
    common = {
        "valid_ndcg@10": round(fitted.best_valid["ndcg@10"], 6),
        "best_epoch": fitted.best_epoch,
        "epochs_run": len(fitted.history),
        "train_seconds": round(seconds, 1),
        "device": device,
        "machine": machine()["gpu"] if device.startswith("cuda") else f"{os.cpu_count()} CPUs",
        "config": {**model.cfg.to_dict(), **cfg.to_dict()},
    }

    def entry(ev: dict, **extra) -> dict:
        new = ~ev["repeat"]  # targets the user had not seen: the mask gives nothing away there
        fresh = (
            {**summarize({k: v[new] for k, v in ev["masked"].items()}), "targets": int(new.sum())}
            if new.any()
            else None
        )
        return {
            "masked": summarize(ev["masked"]),
            "unmasked": summarize(ev["unmasked"]),
            "masked_new": fresh,
            "user_ndcg@10": per_user_mean(ev["masked"]["ndcg@10"], ev["users"]).round(6).tolist(),
            **common,
            **extra,
        }

    out = {variant: entry(evaluate(model, data, split, "test", device=device))}
    cold = cold_rows(data, split)
    if len(cold):  # targets whose item no training event holds: only text can place them
        ev = evaluate(model, data, split, "test", device=device, rows=cold)
        out[variant]["cold_items"] = {
            "targets": int(len(cold)),
            **summarize(ev["masked"]),
            "target_ndcg@10": np.round(ev["masked"]["ndcg@10"], 6).tolist(),
        }
    if variant in INTENT_EVALUATED:
        for regime in INTENT_REGIMES:
            ev = evaluate(model, data, split, "test", with_intent=True, intent=regime, device=device)
            out[intent_name(variant, regime)] = entry(ev, intent=regime)
    if variant in FUSED:
        text_rule = new_model("intent-text", data, split).to(device)
        for regime in INTENT_REGIMES:
            w, valid = fusion_weight(model, text_rule, data, split, regime, device)
            ev = evaluate(
                FusedWithText(model, text_rule, w), data, split, "test", with_intent=True, intent=regime, device=device
            )
            out[intent_name(fused_name(variant), regime)] = entry(
                ev, intent=regime, fusion_weight=w, fusion_valid_ndcg=round(valid, 6)
            )
    return out


_WORKER: dict = {}


def _exit_with_parent(parent: int, every_s: float = 2.0) -> None:
    """A worker ends itself once the benchmark that started it is gone (killed, not only stopped):
    a spawned pool's workers would otherwise train on for hours with nobody to record them."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _worker_init(prepared: str, n_tests: dict, args, device: str, threads: int, parent: int) -> None:
    """Each worker process loads the prepared data once and keeps its splits."""
    _exit_with_parent(parent)
    torch.set_num_threads(threads)
    data = load_prepared(Path(prepared))
    _WORKER.update(
        data=data, args=args, device=device, splits={p: protocol_split(data.user_offsets, p) for p in n_tests}
    )


def _worker_run(protocol: str, variant: str, seed: int) -> dict:
    w = _WORKER
    return run_one(w["data"], w["splits"][protocol], variant, seed, w["args"], w["device"], progress=False)


def parse(argv) -> tuple[QualitySettings, list[int], list[str], list[str]]:
    """The settings, and the seeds, protocols and variants they name (an unknown one exits 2, named)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, QualitySettings)
    s = settings_from(QualitySettings, p.parse_args(argv))
    variants = [v.strip() for v in s.variants.split(";") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    protocols = s.protocols.split(",")
    bad = [x for x in protocols if x not in PROTOCOLS]
    if bad:
        p.error(f"--protocols: unknown {bad}; choose from {list(PROTOCOLS)}")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {s.device}: CUDA is not available on this machine")
    return s, [int(x) for x in s.seeds.split(",")], protocols, variants


def plan_runs(s: QualitySettings, seeds, protocols, variants, done: dict) -> list[tuple[str, str, int]]:
    """(protocol, variant, seed) not yet recorded, most important first, so an interrupted run
    (resumed later) has the headline figures; the ablations last, on their own protocols."""
    if s.by_variant:
        plan = [(p, v, x) for p in protocols for v in variants if v not in ABLATIONS for x in seeds]
    else:
        plan = [(p, v, x) for p in protocols for x in seeds for v in variants if v not in ABLATIONS]
    ablated = [p for p in protocols if p in s.ablation_protocols.split(",")]
    plan += [(p, v, x) for p in ablated for x in seeds for v in variants if v in ABLATIONS]
    return [t for t in plan if "/".join(map(str, t)) not in done]


def run_in_pool(s: QualitySettings, plan, prepared: Path, protocols, save, past_deadline, t_start: float) -> None:
    """`plan` on `s.workers` processes, each with the data loaded once; a failed run is reported, not fatal."""
    threads = max(1, (os.cpu_count() or 1) // s.workers)
    init = (str(prepared), {p: PROTOCOLS[p] for p in protocols}, s, s.device, threads, os.getpid())
    with ProcessPoolExecutor(
        s.workers, mp_context=get_context("spawn"), initializer=_worker_init, initargs=init
    ) as pool:
        todo, running = list(plan), {}
        while todo or running:
            while todo and len(running) < s.workers and not past_deadline():
                task = todo.pop(0)
                running[pool.submit(_worker_run, *task)] = task
            if not running:
                print(f"deadline: {s.deadline:.0f} s passed, {len(todo)} runs not started")
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                protocol, variant, seed = running.pop(fut)
                try:
                    results = fut.result()
                except Exception as e:  # one failed run (e.g. out of memory) must not lose the others
                    print(f"FAILED {protocol}/{variant}/{seed}: {type(e).__name__}: {e}", flush=True)
                    continue
                save(protocol, seed, results)
                r = results[variant]
                print(
                    f"{time.perf_counter() - t_start:6.0f}s {protocol}/{variant}/{seed}: "
                    f"test ndcg@10 {r['masked']['ndcg@10']:.4f} valid {r['valid_ndcg@10']:.4f} "
                    f"epochs {r['epochs_run']} in {r['train_seconds']:.0f}s",
                    flush=True,
                )


def main(argv=None) -> int:
    s, seeds, protocols, variants = parse(argv)
    out = s.out or RESULTS / f"quality_{s.dataset}.json"
    record = json.loads(out.read_text()) if out.exists() else {}
    runs = record.setdefault("runs", {})
    prepared = s.prepared or prepare_source(
        s.dataset, Path("runs/data") / s.dataset, data_dir=s.data_dir, min_user_events=s.min_user_events
    )
    data = load_prepared(prepared)
    splits = {p: protocol_split(data.user_offsets, p) for p in protocols}
    plan = plan_runs(s, seeds, protocols, variants, runs)
    t_start = time.perf_counter()
    record.update(
        benchmark="quality",
        dataset=s.dataset,
        machine=machine(),
        command=" ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        users=data.n_users,
        items=data.n_items,
        events=int(len(data.items)),
    )

    def save(protocol: str, seed: int, results: dict) -> None:
        runs.update({f"{protocol}/{name}/{seed}": r for name, r in results.items()})
        write_json(out, record)

    def past_deadline() -> bool:
        return s.deadline is not None and time.perf_counter() - t_start > s.deadline

    if s.workers <= 1:
        for protocol, variant, seed in plan:
            if past_deadline():
                print(f"deadline: {s.deadline:.0f} s passed, {variant} s{seed} and later runs not started")
                break
            save(protocol, seed, run_one(data, splits[protocol], variant, seed, s, s.device))
    else:
        run_in_pool(s, plan, prepared, protocols, save, past_deadline, t_start)
    shown = dict(runs)
    for extra in s.also:
        for key, r in json.loads(extra.read_text())["runs"].items():
            shown.setdefault(key, r)
    record.update(report(shown, protocols, s.dataset, {p: len(splits[p].test_pos) for p in protocols}))
    write_json(out, record)
    plot(record["summary"], s.dataset, out.with_suffix(".png"))
    print(f"\nrecorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
