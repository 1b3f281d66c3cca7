"""Interest dimensions that rank on their own, measured on equal footing (DESIGN §2, §4).

    nice -n 10 python benchmarks/multi_interest.py --dataset ml-latest-small        # last 10
    nice -n 10 python benchmarks/multi_interest.py --dataset movietweetings-100k    # leave-one-out
    python benchmarks/multi_interest.py --dataset ml-latest-small --device cuda     # the same on a GPU

writes benchmarks/results/multi_interest_<dataset>.{json,png}. Every model of `MODELS` is searched
by `tuning.search` (Ray Tune + Optuna TPE + ASHA) with the same budget, split and validation (the
ten events before the test window on ml-latest-small, so that a search's noise is below the
differences it decides), the same recipe (seen-item mask, weight average) and no words taken from
the target in training (`--intent-rate 0`): the decomposer (per-dimension scoring and the other
modes, its dimensions, τ and the separation penalty in its space), its backbone alone (the same
model with no dimension: the base readout), the LSTM (the decomposer's inputs, no dimensions or
gates), GRU4Rec (item ids only) and SASRec with the item text and the event features. Each best
configuration is retrained with Ray Train on every seed and scored on the test targets
(history-masked NDCG@10); popularity is the trivial row.

Declared before the run, the primary comparison: the decomposer against the strongest of the four
other searched models, the one with the best mean *validation* NDCG@10 over its retrained seeds
(so the choice uses no test figure); its interval resamples seeds and users. A search flattens
when the best validation score of its first two thirds of trials is within one standard error
(over the validation targets) of its final best. A finished search or retrain is kept in the JSON
and skipped on a rerun, so an interrupted run resumes; the Optuna studies resume too.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from equal_budget import popularity, search_record  # noqa: E402  (sibling script)
from machine_info import machine  # noqa: E402  (sibling script)
from search_budget import SearchBudget, parse_budget, redefault  # noqa: E402  (sibling script)
from models.cli import setting  # noqa: E402
from models.data import load_prepared  # noqa: E402
from models.evaluation.evaluate import HEADLINE, evaluate  # noqa: E402
from models.evaluation.metrics import per_user_mean, seed_user_bootstrap  # noqa: E402
from models.files import write_json  # noqa: E402
from models.nn import checkpoint  # noqa: E402
from models.training.defaults import protocol_split  # noqa: E402
from ray_app.train.data import resolve_dataset  # noqa: E402
from ray_app.train.driver import run as train_run  # noqa: E402
from ray_app.train.preflight import connect  # noqa: E402
from ray_app.train.settings import RayTrainSettings  # noqa: E402
from tuning import search  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INTENT_TRAINING_RATE = 0.3  # the words model: share of training positions with the target's phrases
WRONG_WORDS_RATE = 0.2  # and the share of those that are a phrase the target does not carry
ADHERENCE_USERS = 500  # users sampled for intent adherence
PROTOCOL_OF = {"ml-latest-small": "last10", "movietweetings-100k": "loo"}
NO_DIMENSIONS = [
    "use_topic=false",
    "use_sentiment=false",
    "use_time=false",
    "max_latent=0",
    "combine=max",
    "tau=1.0",  # one member: the temperature, the separation and the dimensions' size mean nothing
    "separation=0.0",
    "dim_size=8",
]
# name -> (model kind, fixed settings on top of its space). Every space fixes the same recipe.
MODELS = {
    "decomposer": ("decomposer", []),
    "backbone alone": ("decomposer", NO_DIMENSIONS),
    "gru4rec": ("gru4rec", []),
    "lstm": ("lstm", []),
    "sasrec, text and event features": ("sasrec", ["use_text=true", "use_events=true"]),
}
BASELINES = [name for name in MODELS if name != "decomposer"]
PRIMARY = {
    "model": "decomposer",
    "baseline": "the strongest of " + ", ".join(BASELINES) + " by mean validation NDCG@10 over its seeds",
    "metric": "ndcg@10",
    "target_ratio": 1.05,
}
# Kept affordable for 2 CPU cores: the largest recurrent layers are out of every space (the same
# limit for the decomposer's backbone, the LSTM baseline's and GRU4Rec's hidden state).
SPACE_LIMITS = {
    "decomposer": ["lstm_units={low: 32, high: 256, log: true}"],
    "lstm": ["lstm_units={low: 32, high: 256, log: true}"],
    "gru4rec": ["hidden={low: 32, high: 256, log: true}"],
}


# What a recorded search or retrain depends on: a rerun with the same keeps it (the storage folder,
# the device and the threads may differ, e.g. a later session on another machine or a GPU).
BUDGET = (
    "dataset",
    "trials",
    "epochs",
    "startup_trials",
    "retrain_epochs",
    "retrain_patience",
    "grace_period",
    "reduction_factor",
    "trial_patience",
    "intent_rate",
)


@dataclass
class MultiInterestSettings(SearchBudget):
    """The shared search budget (at least a dozen trials, ASHA's cap at the retrained best epochs),
    the retraining seeds, the device."""

    trials: int = redefault(SearchBudget, "trials", 12)
    epochs: int = redefault(SearchBudget, "epochs", 40)
    startup_trials: int = redefault(SearchBudget, "startup_trials", 4)
    retrain_patience: int = redefault(SearchBudget, "retrain_patience", 8)
    storage: Path = redefault(SearchBudget, "storage", Path("runs/bench-multi-interest"))
    grace_period: int = setting(5, "epochs before ASHA may stop a trial")
    reduction_factor: int = setting(3, "ASHA keeps 1/rf of the trials at each rung")
    trial_patience: int = setting(5, "early stopping inside a trial")
    seeds: str = setting("0,1,2,3,4", "retraining seeds of each best configuration")
    device: str = setting("cpu", "cpu | cuda: a GPU per Train worker", choices=("cpu", "cuda"))
    # One thread a trial: on a machine shared with other work, two threads that wait for each other
    # cost more than they give (measured: an epoch 3x slower with two threads on a busy 2-core machine).
    cpus_per_worker: float = setting(1.0)
    intent_rate: float = setting(0.0, "share of training positions with words from the target (0: none)")

    @property
    def protocol(self) -> str:
        return PROTOCOL_OF.get(Path(self.dataset).name, "loo")

    @property
    def runs(self) -> Path:
        """This dataset's searches and retrains: runs of two datasets never share a study."""
        return self.storage / Path(self.dataset).name


def run_name(name: str) -> str:
    return name.split(",")[0].replace(" ", "-")


def run_searches(s: MultiInterestSettings, prepared: Path, report: dict, save) -> None:
    """Every model of `MODELS` searched with the same budget (a recorded search is skipped)."""
    for name, (kind, fixed) in MODELS.items():
        if name in report["searches"]:
            print(f"search {name}: recorded, skipped", flush=True)
            continue
        key = run_name(name)
        settings = search.SearchSettings(
            dataset=str(prepared),
            model=kind,
            protocol=s.protocol,
            storage_path=str(s.runs / "search"),
            name=key,
            num_samples=s.trials,
            seed=0,
            startup_trials=s.startup_trials,
            epochs=s.epochs,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
            patience=s.trial_patience,
            cpus_per_worker=s.cpus_per_worker,
            use_gpu=s.device == "cuda",
            intent_rate=s.intent_rate,
            space_overrides=[*SPACE_LIMITS.get(kind, []), *fixed],
        )
        print(f"search {name}: {s.trials} trials", flush=True)
        t0 = time.perf_counter()
        best = search.run(settings)
        report["searches"][name] = search_record(s.runs / "search" / key, best, time.perf_counter() - t0)
        save()


def scores(model_path: str, data, split) -> dict:
    """Test and validation figures of a checkpoint: means, per-user test NDCG@10, the validation's standard error."""
    model, _ = checkpoint.load(model_path)
    test = evaluate(model, data, split, "test")
    valid = evaluate(model, data, split, "valid")["masked"][HEADLINE]
    return {
        "test_ndcg@10": float(test["masked"][HEADLINE].mean()),
        "test_hr@10": float(test["masked"]["hr@10"].mean()),
        "valid_ndcg@10_se": float(valid.std() / np.sqrt(len(valid))),
        "user_ndcg@10": per_user_mean(test["masked"][HEADLINE], test["users"]).round(6).tolist(),
    }


def retrain(
    kind: str,
    found: dict,
    seed: int,
    prepared: Path,
    data,
    split,
    s: MultiInterestSettings,
    name: str,
    model_args: dict | None = None,
    words: tuple[float, float] | None = None,
):
    """The search's best configuration (`model_args` in its place when given) trained from scratch
    with Ray Train on `seed`, then scored; `words` = (intent rate, wrong-words rate) in training."""
    intent_rate, wrong_rate = words if words is not None else (s.intent_rate, None)
    t = RayTrainSettings(
        dataset=str(prepared),
        model=kind,
        model_args=model_args if model_args is not None else found["best_model_args"],
        protocol=s.protocol,
        lr=found["best_train"]["lr"],
        ema_decay=found["best_train"]["ema_decay"] or 0.0,
        intent_rate=intent_rate,
        wrong_intent_rate=wrong_rate,
        epochs=s.retrain_epochs,
        patience=s.retrain_patience,
        seed=seed,
        cpus_per_worker=s.cpus_per_worker,
        use_gpu=s.device == "cuda",
        storage_path=str(s.runs / "retrain"),
        name=name,
        num_to_keep=1,
    )
    t0 = time.perf_counter()
    best = train_run(t)
    epochs_run = max((h.get("epoch", 0) for h in best.history), default=best.epoch)
    return {
        "seed": seed,
        "best_epoch": best.epoch,
        "epochs_run": epochs_run,
        "best_epoch_below_cap": best.epoch < s.retrain_epochs,
        "valid_ndcg@10": best.valid_ndcg10,
        "model": best.model,
        "wall_s": time.perf_counter() - t0,
        **scores(best.model, data, split),
    }


def run_retrains(s: MultiInterestSettings, prepared: Path, data, split, report: dict, save) -> None:
    """Each search's best configuration retrained on every seed (a recorded seed is skipped)."""
    for seed in [int(x) for x in s.seeds.split(",")]:
        for name, (kind, _) in MODELS.items():
            done = report["retrain"].setdefault(name, {})
            if str(seed) in done:
                continue
            print(f"retrain {name}, seed {seed}", flush=True)
            done[str(seed)] = retrain(
                kind, report["searches"][name], seed, prepared, data, split, s, f"{run_name(name)}-seed{seed}"
            )
            report["primary"] = primary(report)
            save()


def retrain_variant(s, prepared, data, split, report, save, name: str, seeds, **over) -> dict:
    """A named change of the searched decomposer retrained on `seeds` (recorded seeds skipped)."""
    done = report["checks"].setdefault("retrain", {}).setdefault(name, {})
    for seed in seeds:
        if str(seed) not in done:
            print(f"retrain {name}, seed {seed}", flush=True)
            found = report["searches"]["decomposer"]
            done[str(seed)] = retrain(
                "decomposer", found, seed, prepared, data, split, s, f"{run_name(name)}-seed{seed}", **over
            )
            save()
    return done


def run_checks(s: MultiInterestSettings, prepared: Path, data, split, report: dict, save) -> None:
    """The mechanism rows (benchmarks/multi_interest_checks.py), each recorded once."""
    from models.data.encoder import TextEncoder

    import multi_interest_checks as mc

    checks = report.setdefault("checks", {})
    seeds = [int(x) for x in s.seeds.split(",")]
    few = seeds[:3]
    found = report["searches"]["decomposer"]["best_model_args"]
    decomposer = report["retrain"]["decomposer"]  # figures of every seed
    on_disk = {k: r for k, r in decomposer.items() if Path(r["model"]).is_file()}  # models, for what reads one
    if not on_disk:  # retrained in an earlier session whose run folder is gone: one seed again, for the checks
        on_disk = retrain_variant(s, prepared, data, split, report, save, "decomposer, for the checks", few[:1])
    # The decomposition itself: K = 1 (the base readout) widened to the decomposer's parameter count.
    matched = mc.matched_backbone(found, data.n_items, max(1, data.item_genres.shape[1]))
    counts = matched.pop("matched_parameters")
    alone = retrain_variant(
        s, prepared, data, split, report, save, "backbone alone, matched parameters", seeds, model_args=matched
    )
    report["k_ablation"] = {**mc.compare_runs(decomposer, alone), "parameters": counts}
    fixed = retrain_variant(
        s, prepared, data, split, report, save, "constant gates", few, model_args={**found, "use_gates": False}
    )
    checks["constant_gates"] = mc.compare_runs(decomposer, fixed)
    # The other backbones under the searched heads, judged on validation (the LSTM stays unless one wins).
    backbones = {"lstm": [r["valid_ndcg@10"] for r in decomposer.values()]}
    for name in ("gru", "transformer"):
        if name == found.get("backbone", "lstm"):
            continue
        runs = retrain_variant(
            s,
            prepared,
            data,
            split,
            report,
            save,
            f"{name} backbone",
            seeds[:1],
            model_args={**found, "backbone": name},
        )
        backbones[name] = [r["valid_ndcg@10"] for r in runs.values()]
    checks["backbones_valid_ndcg@10"] = {k: float(np.mean(v)) for k, v in backbones.items()}
    if "context_shuffled" not in checks:
        shuffled = mc.context_shuffled({k: r["model"] for k, r in on_disk.items()}, data, split)
        checks["context_shuffled"] = mc.compare_runs(on_disk, shuffled)
        save()
    report["dimension_overlap"] = float(
        np.mean([mc.dimension_overlap(r["model"], data, split) for r in on_disk.values()])
    )
    base = strongest_baseline(report)
    checks["clusters"] = {
        "baseline": base,
        **mc.cluster_gain(decomposer, report["retrain"][base], mc.multi_cluster_users(data, split)),
    }
    save()
    run_intent(s, prepared, data, split, report, save, few, TextEncoder())


def run_intent(s, prepared, data, split, report, save, seeds, encoder) -> None:
    """The decomposer trained with words against the intent-aware baselines given the same words."""
    import multi_interest_checks as mc
    from quality import fusion_weight

    from models.data.batching import INTENT_REGIMES
    from models.nn.baselines import FusedWithText
    from models.training.loop import new_model

    found = report["searches"]["decomposer"]["best_model_args"]
    over = {**found, "intent_member": found.get("combine") == "max"}
    rates = (INTENT_TRAINING_RATE, WRONG_WORDS_RATE)
    name = "decomposer, trained with words"
    words = retrain_variant(s, prepared, data, split, report, save, name, seeds, model_args=over, words=rates)
    text = new_model("intent-text", data, split)
    sasrec = report["retrain"]["sasrec, text and event features"]
    fused_name = "sasrec fused with text retrieval"
    rows: dict[str, dict] = report["checks"].setdefault("intent", {})

    def fused(seed: int, regime: str):
        model, _ = checkpoint.load(sasrec[str(seed)]["model"])
        if regime == "none":
            return model, None
        w, _ = fusion_weight(model, text, data, split, regime, "cpu")
        return FusedWithText(model, text, w), w

    for regime in ("none", *INTENT_REGIMES):
        if regime in rows:
            continue
        kw = {} if regime == "none" else {"with_intent": True, "intent": regime}
        row = {
            name: {},
            fused_name: {},
            "text retrieval": {"0": {"user_ndcg@10": mc.user_ndcg(text, data, split, **kw)}},
        }
        for seed in seeds:
            model, _ = checkpoint.load(words[str(seed)]["model"])
            row[name][str(seed)] = {"user_ndcg@10": mc.user_ndcg(model, data, split, **kw)}
            model, w = fused(seed, regime)
            row[fused_name][str(seed)] = {"user_ndcg@10": mc.user_ndcg(model, data, split, **kw), "weight": w}
        rows[regime] = {
            k: {**runs, "mean": float(np.mean([r["user_ndcg@10"] for r in runs.values()]))} for k, runs in row.items()
        }
        save()
    if "intent_adherence" not in report:
        # Genre words are the oracle regime's kind of words: the fusion weight chosen for it.
        users = np.random.default_rng(0).permutation(len(split.user_start))[:ADHERENCE_USERS]
        model, _ = checkpoint.load(words[str(seeds[0])]["model"])
        by_phrase = {
            name: mc.intent_adherence(model, data, split, encoder, users),
            fused_name: mc.intent_adherence(fused(seeds[0], "oracle")[0], data, split, encoder, users),
            "text retrieval": mc.intent_adherence(text, data, split, encoder, users),
        }
        report["intent_adherence"] = {k: a["all"] for k, a in by_phrase.items()}
        report["checks"]["intent_adherence_by_phrase"] = by_phrase
    report["wrong_words_drop"] = 1.0 - rows["wrong"][name]["mean"] / rows["none"][name]["mean"]
    report["checks"]["intent_ratios"] = {
        regime: rows[regime][name]["mean"] / max(rows[regime][b]["mean"] for b in ("text retrieval", fused_name))
        for regime in INTENT_REGIMES
    }
    save()


def strongest_baseline(report: dict) -> str | None:
    """The baseline with the best mean validation NDCG@10 over its retrained seeds (no test figure)."""
    runs = {b: report["retrain"].get(b) for b in BASELINES}
    if not all(runs.values()):
        return None
    return max(BASELINES, key=lambda b: np.mean([r["valid_ndcg@10"] for r in runs[b].values()]))


def compare(a: dict, b: dict) -> dict:
    """Two retrained models over the seeds both have: means, ratio, the seed-and-user interval of a − b."""
    seeds = sorted(set(a) & set(b), key=int)
    ua = np.array([a[k]["user_ndcg@10"] for k in seeds])
    ub = np.array([b[k]["user_ndcg@10"] for k in seeds])
    diff = seed_user_bootstrap(ua, ub)
    ma, mb = float(ua.mean()), float(ub.mean())
    return {
        "model_mean": ma,
        "baseline_mean": mb,
        "ratio": ma / mb,
        "difference": diff["mean"],
        "lo": diff["lo"],
        "hi": diff["hi"],
        "seeds": len(seeds),
    }


def primary(report: dict) -> dict | None:
    base = strongest_baseline(report)
    if base is None or not report["retrain"].get("decomposer"):
        return None
    out = {**PRIMARY, "baseline": base, "protocol": report["protocol"]}
    out.update(compare(report["retrain"]["decomposer"], report["retrain"][base]))
    out["met"] = bool(out["ratio"] >= PRIMARY["target_ratio"] and out["lo"] > 0)
    return out


def flattened(report: dict) -> dict[str, bool]:
    """Per model: the best validation score of the first two thirds of its trials is within one
    standard error (over the validation targets, of its retrained best configuration) of its final best."""
    out = {}
    for name, run in report["searches"].items():
        curve = [v for v in run["best_so_far"] if v is not None]
        se = [r["valid_ndcg@10_se"] for r in report["retrain"].get(name, {}).values()]
        if not curve or not se:
            continue
        early = curve[max(0, (2 * len(curve)) // 3 - 1)]
        out[name] = bool(curve[-1] - early <= float(np.mean(se)))
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, (name, run) in enumerate(report["searches"].items()):
        ys = [np.nan if v is None else v for v in run["best_so_far"]]
        left.plot(range(1, len(ys) + 1), ys, "-o", color=f"C{i}", label=name, ms=3)
    left.set_xlabel("trials")
    left.set_ylabel("best validation NDCG@10 so far")
    left.set_title(
        f"the same search ({report['settings']['trials']} trials, ASHA to {report['settings']['epochs']} epochs)"
    )
    left.legend(fontsize=8)
    names = list(report["retrain"]) + ["popular"]
    for i, name in enumerate(names):
        vals = (
            [r["test_ndcg@10"] for r in report["retrain"][name].values()]
            if name != "popular"
            else [report["popular"]["test_ndcg@10"]]
        )
        right.bar(i, np.mean(vals), color=f"C{i}", alpha=0.6)
        right.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
    right.set_xticks(range(len(names)), [n.replace(", ", ",\n") for n in names], fontsize=8)
    right.set_ylabel(f"test NDCG@10 ({report['protocol']}, history-masked)")
    right.set_title("best configurations retrained (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan(s: MultiInterestSettings, out: Path) -> dict:
    """The report so far (empty unless `out` holds runs of the same budget), its header refreshed."""
    report = json.loads(out.read_text()) if out.is_file() else {}
    settings = s.record(leave_out=("out", "seeds", "device"))
    if {k: report.get("settings", {}).get(k) for k in BUDGET} != {k: settings[k] for k in BUDGET}:
        report = {"searches": {}, "retrain": {}}  # another budget: start over
    report.update(
        {
            "benchmark": "multi_interest",
            "dataset": Path(s.dataset).name,
            "protocol": s.protocol,
            "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "settings": settings,
            "models": {k: {"kind": v[0], "fixed": v[1]} for k, v in MODELS.items()},
            "space_limits": SPACE_LIMITS,
            "declared_primary": PRIMARY,
        }
    )
    return report


def main(argv=None) -> int:
    s = parse_budget(MultiInterestSettings, __doc__, argv)
    out = s.out or RESULTS / f"multi_interest_{Path(s.dataset).name}.json"
    prepared = resolve_dataset(s.dataset)
    data = load_prepared(prepared)
    split = protocol_split(data.user_offsets, s.protocol)
    report = plan(s, out)

    def save() -> None:
        write_json(out, report, indent=2)

    # A trial's driver holds a sliver of a CPU beside its Train worker: one logical CPU more than
    # the worker's, so a 2-CPU worker fits on a 2-core machine.
    connect(int(np.ceil(s.cpus_per_worker)) + 1)  # a local GPU is found by Ray itself
    run_searches(s, prepared, report, save)
    run_retrains(s, prepared, data, split, report, save)
    run_checks(s, prepared, data, split, report, save)
    report["popular"] = popularity(data, split)
    report["primary"] = primary(report)
    report["flattened"] = flattened(report)
    report["all_best_epochs_below_cap"] = all(
        r["best_epoch_below_cap"] for m in report["retrain"].values() for r in m.values()
    )
    save()
    plot(report, out.with_suffix(".png"))
    summary = {name: [round(r["test_ndcg@10"], 4) for r in runs.values()] for name, runs in report["retrain"].items()}
    print(json.dumps({"test ndcg@10 per seed": summary, "primary": report["primary"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
