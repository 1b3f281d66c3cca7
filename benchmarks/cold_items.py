"""Items placed by their text: the item tower's levers (models/nn/items.py) on the targets whose item
no training event holds (cold targets), with the warm targets beside them.

    nice python benchmarks/cold_items.py --dataset ml-latest-small        # last 10
    nice python benchmarks/cold_items.py --dataset movietweetings-100k    # leave-one-out
    python benchmarks/cold_items.py --dataset ml-latest-small --device cuda  # the same on a GPU

writes benchmarks/results/cold_items_<dataset>.json. Two steps:
1. Screening (seed 0): the decomposer with each lever of `LEVERS` (none: the model before this
   work), scored on the validation targets whose item has no training event. The lever kept is
   the one with the best validation cold NDCG@10 whose validation warm NDCG@10 is within one
   standard error of the model without levers (no test figure chooses).
2. The kept lever and no lever, for the decomposer and for the text-aware SASRec (the same item
   tower), retrained on every seed; text similarity to the history (the content-based rule), the
   same rule with a bonus for the items new at the moment (the information the new-item bias
   gives a model, the bonus chosen as the levers are), popularity, and GRU4Rec (item ids only: a
   cold item has no vector it could be ranked by). A kept lever with the new-item bias is held to
   the rule with the bonus.
Every item of a prepared catalogue is taken by someone, so an item no training event holds is some
user's held-out target, and a flag for new items carries that: each run with the new-item bias also
records its cold NDCG@10 with that flag taken from those items, and the rule with the bonus records
its own with the bonus kept from them (`cold_ndcg@10_without_held_out_flag`,
`cold_ndcg@10_bonus_on_items_taken_later`): what a catalogue of items nobody takes would leave.
Cold rows: NDCG@10, MRR and median rank of the cold test targets (history-masked, all items), and
NDCG@10 among the long-tail candidates (the items with at most TAIL training events and the target).
`warm_change` is the decomposer's warm-target NDCG@10 with the kept lever minus without it, with an
interval over seeds and users. A recorded run is skipped on a rerun, so an interrupted run resumes
(`complete` is false until every run is recorded; a committed partial file is where a later run,
on this machine or a GPU, takes up). Several processes may share one file: each write takes in the
runs the others recorded meanwhile, under a lock, so the screening can be split among them with
`--lever` (each screens the levers named and stops; a run without it goes on to the retrains):

    OMP_NUM_THREADS=1 nice python benchmarks/cold_items.py --dataset movietweetings-100k \
        --lever "item bias" --lever "bounded residual 0.5" --lever "bounded residual 2" &

and the retrains with `--seeds` (each process retrains its seeds; the summary, over all three, is
written by the process that records the last run).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import machine  # noqa: E402  (sibling script)
from models.data import load_prepared  # noqa: E402
from models.evaluation.evaluate import evaluate  # noqa: E402
from models.evaluation.metrics import per_user_mean, seed_user_bootstrap  # noqa: E402
from models.files import write_json  # noqa: E402
from models.training.defaults import protocol_split, train_config  # noqa: E402
from models.nn.items import NEVER, last_position  # noqa: E402
from models.training.loop import fit, new_model, training_counts, training_first_seen  # noqa: E402
from ray_app.train.data import resolve_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL_OF = {"ml-latest-small": "last10", "movietweetings-100k": "loo"}
TAIL = 5  # a long-tail item: at most this many training events
SEEDS = (0, 1, 2)  # the retrains' seeds: the summary waits until each is recorded
LEVERS = {  # screened in this order: the combined levers first, the single ones after
    "none": {},
    "bias, bounded residual 0.5, cold share 0.2": {"item_bias": True, "residual_radius": 0.5, "cold_share": 0.2},
    "cold share 0.2": {"cold_share": 0.2, "item_bias": True},
    "frozen text, bounded residual 0.5, new-item bias": {
        "freeze_text": True,
        "residual_radius": 0.5,
        "new_item_bias": True,
    },
    "frozen text, bounded residual 0.5": {"freeze_text": True, "residual_radius": 0.5},
    "new-item bias": {"new_item_bias": True},
    "item bias": {"item_bias": True},
    "bounded residual 0.5": {"residual_radius": 0.5},
    "bounded residual 2": {"residual_radius": 2.0},
}


def cold_and_warm(data, split, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the `which` targets whose item has no training event, and of the others."""
    targets = split.valid_targets if which == "valid" else split.test_pos
    cold = training_counts(data, split)[data.items[targets]] == 0
    return np.flatnonzero(cold), np.flatnonzero(~cold)


class TailOnly(torch.nn.Module):
    """A model whose ranking holds the long-tail items only (and the target, which the metric keeps)."""

    def __init__(self, model, head: torch.Tensor):
        super().__init__()
        self.model, self.cfg, self.head = model, model.cfg, head

    @torch.no_grad()
    def score(self, batch):
        return self.model.score(batch).masked_fill(self.head, -torch.inf)


def scores(model, data, split, head: torch.Tensor, device: str = "cpu") -> dict:
    """Cold and warm figures of a model on the test targets (and validation cold/warm NDCG@10)."""
    cold, warm = cold_and_warm(data, split, "test")
    ev_cold = evaluate(model, data, split, "test", rows=cold, device=device)
    ranks = 1.0 / ev_cold["masked"]["mrr"] - 1.0
    tail = evaluate(TailOnly(model, head.to(device)), data, split, "test", rows=cold, device=device)
    ev_warm = evaluate(model, data, split, "test", rows=warm, device=device)
    v_cold, v_warm = cold_and_warm(data, split, "valid")
    valid_warm = evaluate(model, data, split, "valid", rows=v_warm, device=device)["masked"]["ndcg@10"]
    extra = {}
    tower = getattr(model, "items", None)
    if getattr(tower, "new_w", None) is not None:  # what the new-item bias owes to the held-out items
        first = tower.first_seen.clone()
        tower.first_seen[first == NEVER] = -NEVER  # never new: placed by their text, without the bias
        ev = evaluate(model, data, split, "test", rows=cold, device=device)
        tower.first_seen.copy_(first)
        extra["cold_ndcg@10_without_held_out_flag"] = float(ev["masked"]["ndcg@10"].mean())
    return {
        "cold_targets": int(len(cold)),
        "cold_ndcg@10": float(ev_cold["masked"]["ndcg@10"].mean()),
        "cold_mrr": float(ev_cold["masked"]["mrr"].mean()),
        "cold_median_rank": float(np.median(ranks) + 1),
        "cold_tail_ndcg@10": float(tail["masked"]["ndcg@10"].mean()),
        "warm_ndcg@10": float(ev_warm["masked"]["ndcg@10"].mean()),
        "warm_user_ndcg@10": per_user_mean(ev_warm["masked"]["ndcg@10"], ev_warm["users"]).round(6).tolist(),
        "warm_users": np.unique(ev_warm["users"]).tolist(),
        "valid_cold_ndcg@10": float(
            evaluate(model, data, split, "valid", rows=v_cold, device=device)["masked"]["ndcg@10"].mean()
        ),
        "valid_warm_ndcg@10": float(valid_warm.mean()),
        "valid_warm_se": float(valid_warm.std() / np.sqrt(len(valid_warm))),
        **extra,
    }


class NewItemBonus(torch.nn.Module):
    """A rule's scores plus `bonus` for the items no training event held before each row's moment:
    the information the new-item bias gives a model (models/nn/items.py), given to a rule."""

    def __init__(self, model, first_seen: np.ndarray, bonus: float):
        super().__init__()
        self.model, self.cfg, self.bonus = model, model.cfg, bonus
        self.first = torch.as_tensor(first_seen)

    @torch.no_grad()
    def score(self, batch):
        t = last_position(batch["next_time"], batch["lengths"])  # (B,)
        new = self.first.to(t.device)[None, :] >= t[:, None]
        return self.model.score(batch) + self.bonus * new


BONUSES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # text similarity is a cosine: the bonus is on its scale


def with_new_item_bonus(model, data, split, device: str) -> NewItemBonus:
    """The rule with the bonus of BONUSES chosen as the levers are: the best validation cold NDCG@10
    among the bonuses whose validation warm NDCG@10 is within one standard error of no bonus's."""
    first = training_first_seen(data, split)
    v_cold, v_warm = cold_and_warm(data, split, "valid")

    def valid(bonus: float, rows: np.ndarray) -> np.ndarray:
        rule = NewItemBonus(model, first, bonus)
        return evaluate(rule, data, split, "valid", rows=rows, device=device)["masked"]["ndcg@10"]

    warm0 = valid(0.0, v_warm)
    floor = warm0.mean() - warm0.std() / np.sqrt(len(warm0))
    fit_warm = [b for b in BONUSES if b == 0.0 or valid(b, v_warm).mean() >= floor]
    return NewItemBonus(model, first, max(fit_warm, key=lambda b: valid(b, v_cold).mean()))


def held_out_share(rule: NewItemBonus, data, split, device: str) -> float:
    """Cold test NDCG@10 of `rule` with its bonus kept from the items no training event holds at all.

    Every item of a prepared catalogue is taken by someone, so an item no training event holds is a
    held-out (validation or test) target: a flag for new items carries that. The bonus on the
    items first taken later in training alone is what a catalogue of items nobody takes would leave."""
    first = rule.first.clone()
    first[first == NEVER] = -NEVER  # never new
    cold, _ = cold_and_warm(data, split, "test")
    ev = evaluate(NewItemBonus(rule.model, first.numpy(), rule.bonus), data, split, "test", rows=cold, device=device)
    return float(ev["masked"]["ndcg@10"].mean())


def new_at_moments(data, split) -> dict:
    """How many items are new (no training event before it) at each warm test target's moment, and
    how many warm test targets are new then themselves: what the new-item bias acts on."""
    first = training_first_seen(data, split)
    _, warm = cold_and_warm(data, split, "test")
    t = data.timestamps[split.test_pos[warm]]  # (W,) each warm target's moment
    ordered = np.sort(first)
    n_new = len(ordered) - np.searchsorted(ordered, t, side="left")  # (W,) items new then
    never = int((first == NEVER).sum())
    return {
        "items_no_training_event_holds": never,
        "new_items_at_a_warm_target_median": float(np.median(n_new)),
        "first_taken_later_at_a_warm_target_median": float(np.median(n_new - never)),
        "warm_targets_new_at_their_moment_share": float(np.mean(first[data.items[split.test_pos[warm]]] >= t)),
    }


def run(kind: str, over: dict, data, split, seed: int, args, head) -> dict:
    torch.manual_seed(seed)
    if kind == "history-text" and over.get("new_item_bonus"):
        model = with_new_item_bonus(new_model(kind, data, split), data, split, args.device)
        held_out = held_out_share(model, data, split, args.device)
        return {
            "seed": seed,
            "best_epoch": 0,
            "config": {"new_item_bonus": model.bonus},
            "device": args.device,
            **scores(model, data, split, head, args.device),
            "cold_ndcg@10_bonus_on_items_taken_later": held_out,  # `held_out_share`
        }
    model = new_model(kind, data, split, **over)
    recipe = args.train if kind == "decomposer" else {}
    cfg = train_config(kind, seed=seed, epochs=args.epochs, patience=args.patience, intent_rate=0.0, **recipe)
    if kind == "sasrec":
        cfg.ema_decay = 0.98  # the recipe the decomposer trains with, as in the equal-budget search
    fitted = fit(model, data, split, cfg, device=args.device, progress=args.progress, desc=f"{kind} {over} s{seed}")
    return {
        "seed": seed,
        "best_epoch": fitted.best_epoch,
        "config": over,
        "recipe": recipe,
        "device": args.device,
        **scores(model, data, split, head, args.device),
    }


def warm_change(a: list[dict], b: list[dict]) -> dict:
    """Warm-target NDCG@10 of runs a minus runs b, seeds and users resampled (the users both score)."""
    users = sorted(set(a[0]["warm_users"]) & set(b[0]["warm_users"]))

    def matrix(runs):
        return np.array([[dict(zip(r["warm_users"], r["warm_user_ndcg@10"]))[u] for u in users] for r in runs])

    d = seed_user_bootstrap(matrix(a), matrix(b))
    return {"mean": d["mean"], "lo": d["lo"], "hi": d["hi"]}


@contextlib.contextmanager
def locked(out: Path):
    """Holds an exclusive lock beside `out` (one writer at a time among processes sharing the file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def take_in(out: Path, runs: dict) -> None:
    """Adds to `runs` the runs recorded in `out` that it lacks (the caller holds the lock)."""
    if out.is_file():
        theirs = json.loads(out.read_text()).get("runs", {})
        runs.update({k: v for k, v in theirs.items() if k not in runs})


def save(out: Path, report: dict) -> None:
    """Writes `report`, first taking in the runs another process recorded in `out` since."""
    with locked(out):
        take_in(out, report["runs"])
        write_json(out, report, indent=None)  # compact: each run carries a per-user list


LABEL_OF = {"gru4rec": "gru4rec (item ids only)"}  # a run's key -> its row's name, where they differ
RULE_WITH_BONUS = "text similarity to the history, new-item bonus"
SUMMARY = ("cold", "cold_rows", "warm_change", "target")  # what `summary` writes


def retrains(kept: str, base: dict) -> list[tuple[str, str, dict, tuple[int, ...]]]:
    """The runs after the screening: (key, kind, settings, seeds); the models' rows are named by key."""
    text = {"use_text": True, "use_events": True, "mask_seen": True}
    return [
        (f"decomposer, {kept}", "decomposer", {**base, **LEVERS[kept]}, SEEDS),
        ("decomposer, none", "decomposer", base, SEEDS),
        (f"sasrec with text, {kept}", "sasrec", {**text, **LEVERS[kept]}, SEEDS),
        ("sasrec with text, none", "sasrec", text, SEEDS),
        ("text similarity to the history", "history-text", {}, (0,)),
        (RULE_WITH_BONUS, "history-text", {"new_item_bonus": True}, (0,)),
        ("popular", "popular", {}, (0,)),
        ("gru4rec", "gru4rec", {"mask_seen": True}, (0,)),
    ]


def missing(runs: dict, kept: str, base: dict) -> list[str]:
    """The retrains' runs ("key/seed") that `runs` does not hold yet."""
    return [f"{k}/{s}" for k, _, _, ss in retrains(kept, base) for s in ss if f"{k}/{s}" not in runs]


def summary(runs: dict, kept: str, base: dict) -> dict | None:
    """The retrains' rows, `warm_change` and the target from `runs`; None while one is unrecorded."""
    if missing(runs, kept, base):
        return None
    plan = retrains(kept, base)
    final = {LABEL_OF.get(k, k): [runs[f"{k}/{s}"] for s in ss] for k, _, _, ss in plan}
    # Models retrained on every seed under a lever kept before (the file keeps their runs) get rows too.
    for key in sorted({k.rsplit("/", 1)[0] for k in runs} - {k for k, _, _, _ in plan}):
        if all(f"{key}/{s}" in runs for s in SEEDS):
            final[key] = [runs[f"{key}/{s}"] for s in SEEDS]
    cold = {k: float(np.mean([r["cold_ndcg@10"] for r in v])) for k, v in final.items()}
    cold["decomposer"] = cold[f"decomposer, {kept}"]
    change = warm_change(final[f"decomposer, {kept}"], final["decomposer, none"])
    text = cold["text similarity to the history"]
    # The decomposer is held to the rule with the same information: with the new-item bias, the
    # rule with the new-item bonus (the target names text similarity; both ratios recorded).
    same = RULE_WITH_BONUS if LEVERS[kept].get("new_item_bias") else "text similarity to the history"
    return {
        "cold": cold,
        "cold_rows": {
            k: {
                m: float(np.mean([r[m] for r in v]))
                for m in ("cold_mrr", "cold_median_rank", "cold_tail_ndcg@10", "warm_ndcg@10")
            }
            for k, v in final.items()
        },
        "warm_change": change,
        "target": {
            "cold_ratio_to_text_similarity": cold["decomposer"] / max(text, 1e-12),
            "compared_with": same,
            "cold_ratio": cold["decomposer"] / max(cold[same], 1e-12),
            "met": bool(cold["decomposer"] >= 1.5 * max(text, cold[same]) and change["hi"] >= 0),
        },
        "complete": True,
    }


def settings(pairs: list[str]) -> dict:
    """["KEY=VALUE", ...] (each VALUE JSON) -> {KEY: value}."""
    return {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in pairs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-latest-small")
    p.add_argument(
        "--seeds",
        default=",".join(map(str, SEEDS)),
        help="the seeds this process retrains (the summary waits for all of %(default)s, whoever runs them)",
    )
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument(
        "--base", action="append", default=[], metavar="KEY=VALUE", help="decomposer settings every lever starts from"
    )
    p.add_argument(
        "--train", action="append", default=[], metavar="KEY=VALUE", help="the decomposer's training recipe (lr=0.001)"
    )
    p.add_argument(
        "--lever",
        action="append",
        choices=list(LEVERS),
        metavar="LEVER",
        help=f"screen only these levers, then stop (repeatable; one of: {'; '.join(LEVERS)})",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where each run trains and is scored")
    p.add_argument("--progress", action="store_true", help="a progress bar per epoch")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    name = Path(args.dataset).name
    out = args.out or RESULTS / f"cold_items_{name}.json"
    data = load_prepared(resolve_dataset(args.dataset))
    split = protocol_split(data.user_offsets, PROTOCOL_OF.get(name, "loo"))
    head = torch.as_tensor(training_counts(data, split) > TAIL)[None, :]  # (1, N+1)
    base, args.train = settings(args.base), settings(args.train)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.update(
        {
            "benchmark": "cold_items",
            "dataset": name,
            "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "base": base,
            "train": args.train,
            "tail": TAIL,
            "new_at_moments": new_at_moments(data, split),
            "complete": False,  # True once every run below is recorded and summarised
        }
    )
    for k in SUMMARY:  # a summary is written again, from every seed, once the last run is recorded
        report.pop(k, None)
    runs = report.setdefault("runs", {})

    def once(key: str, kind: str, over: dict, seed: int) -> dict:
        if f"{key}/{seed}" not in runs:  # recorded by another process meanwhile?
            with locked(out):
                take_in(out, runs)
        if f"{key}/{seed}" not in runs:
            print(f"{key}, seed {seed}", flush=True)
            runs[f"{key}/{seed}"] = run(kind, over, data, split, seed, args, head)
            save(out, report)
        return runs[f"{key}/{seed}"]

    if args.lever:
        for lever in args.lever:
            once(f"decomposer, {lever}", "decomposer", {**base, **LEVERS[lever]}, 0)
        left = [k for k in LEVERS if f"decomposer, {k}/0" not in runs]
        print(f"screened {len(LEVERS) - len(left)} of {len(LEVERS)} levers; a run without --lever goes on")
        return 0
    screened = {
        lever: once(f"decomposer, {lever}", "decomposer", {**base, **over}, 0) for lever, over in LEVERS.items()
    }
    none = screened["none"]
    fit_warm = [
        k for k, r in screened.items() if r["valid_warm_ndcg@10"] >= none["valid_warm_ndcg@10"] - none["valid_warm_se"]
    ]
    kept = max(fit_warm, key=lambda k: screened[k]["valid_cold_ndcg@10"])
    report["kept_lever"] = kept
    mine = {int(s) for s in args.seeds.split(",")}
    for key, kind, over, seeds in retrains(kept, base):
        for seed in seeds:
            if len(seeds) == 1 or seed in mine:  # a rule's one run is anyone's; a seed is its process's
                once(key, kind, over, seed)
    with locked(out):
        take_in(out, runs)
    done = summary(runs, kept, base)
    if done is None:  # the process that records the last run writes the summary
        left = missing(runs, kept, base)
        print(f"not summarised: {len(left)} runs left ({'; '.join(left)})")
        return 0
    report.update(done)
    save(out, report)
    print(json.dumps({"kept": kept, "cold": report["cold"], "warm_change": report["warm_change"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
