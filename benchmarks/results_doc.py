"""The tables of docs/results.md, generated from the result files in benchmarks/results/.

    python benchmarks/results_doc.py           rewrite every table of docs/results.md from the JSON
    python benchmarks/results_doc.py --check   change nothing; exit 1 naming each table that differs

The prose of docs/results.md is written by hand; each table in it stands between two markers,

    <!-- table: VIEW FILE[,FILE...] [key="value" ...] -->
    | ... the table, as this script writes it ... |
    <!-- end table -->

and is rewritten from FILE by the view VIEW (the functions of `VIEWS` below), so a table cannot say
other than its file. A figure quoted in prose, in docs/results.md, the README or any docs/ page, is
marked the same way, inline:

    <!-- fig: FILE PATH [FORMAT [mean|min|max]] -->0.0741<!-- /fig -->

PATH is a '/'-separated path of keys into FILE's JSON (`*` matches every key at its level, and the
values found are reduced by mean, min or max); FORMAT a Python format spec (default `.4f`). So a
number in the prose cannot say other than its file either. tests/test_results_doc.py runs `--check`.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from models.evaluation.metrics import seed_user_bootstrap
from models.data.batching import INTENT_REGIMES
from quality_tables import cold_table, intent_table, table_rows
from quality_variants import intent_name
from results_systems import (
    ann,
    floor,
    incremental,
    multinode,
    newcomer,
    ray_train,
    scale,
    scale_ray,
    serve_load,
    table,
    tuning,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "results.md"
MARKER = re.compile(r"<!-- table: (?P<spec>.+?) -->\n(?P<body>.*?)<!-- end table -->", re.S)
FIGURE = re.compile(r"<!-- fig: (?P<spec>.+?) -->(?P<body>.*?)<!-- /fig -->")
PAGES = (HERE.parent / "README.md", *sorted((HERE.parent / "docs").glob("*.md")))  # where figures are checked
QUALITY_COLUMNS = {
    "model": "model",
    "seeds": "seeds",
    "ndcg@10": "NDCG@10",
    "hr@10": "HR@10",
    "mrr": "MRR",
    "ndcg@10 unmasked": "NDCG@10 unmasked",
    "valid ndcg@10": "valid NDCG@10",
}


def names(value: str | None) -> list[str]:
    """`"a;b;c"` -> ["a", "b", "c"]."""
    return [v.strip() for v in (value or "").split(";") if v.strip()]


def quality(records: list[dict], protocol: str, rows: str | None = None, bold: str = "", columns: str = "") -> str:
    """The quality benchmark's table for `protocol`: mean ± std over seeds (all rows, or `rows` in order,
    each a variant or `variant -> label`); `bold` names the rows to stress, `columns` chooses columns."""
    by_name = {r["model"]: r for r in table_rows(records[0]["runs"], protocol)}
    chosen = list(by_name.values())
    if rows:  # "variant" or "variant -> label"
        pairs = [(n.split(" -> ")[0].strip(), n.split(" -> ")[-1].strip()) for n in names(rows)]
        chosen = [{**by_name[n], "model": label} for n, label in pairs]
    cols = names(columns) or list(QUALITY_COLUMNS)
    strong = set(names(bold))
    body = []
    for r in chosen:
        cells = [r[c] for c in cols]
        if r["model"] in strong:
            cells = [f"**{c}**" if i == 0 else c for i, c in enumerate(cells)]
        body.append(cells)
    return table([QUALITY_COLUMNS.get(c, c) for c in cols], body)


def seed_means(runs: dict, protocol: str, name: str, key: str) -> list[float]:
    return [
        r[key] if key in r else r["masked"][key] for k, r in runs.items() if k.rsplit("/", 1)[0] == f"{protocol}/{name}"
    ]


def cells(records: list[dict], protocol: str, rows: str) -> str:
    """Chosen variants as `label=variant` pairs: seeds, test NDCG@10 (validation NDCG@10), means over seeds."""
    runs = records[0]["runs"]
    body = []
    for pair in names(rows):
        label, _, name = pair.rpartition("=")
        test = seed_means(runs, protocol, name.strip(), "ndcg@10")
        valid = seed_means(runs, protocol, name.strip(), "valid_ndcg@10")
        body.append([label.strip(), len(test), f"{np.mean(test):.4f} ({np.mean(valid):.4f})"])
    return table([f"{protocol}: test (valid)", "seeds", "NDCG@10"], body)


def differences(records: list[dict], pairs: str, protocols: str) -> str:
    """NDCG@10 differences `a − b`, 95% bootstrap over seeds and users, one column per protocol."""
    runs = records[0]["runs"]

    def users(protocol: str, name: str) -> np.ndarray:
        return np.array([r["user_ndcg@10"] for k, r in runs.items() if k.rsplit("/", 1)[0] == f"{protocol}/{name}"])

    body = []
    for pair in names(pairs):
        a, b = (s.strip() for s in pair.split(" − "))
        row = [pair]
        for protocol in names(protocols):
            ua, ub = users(protocol, a), users(protocol, b)
            if not len(ua) or not len(ub):
                row.append("")
                continue
            d = seed_user_bootstrap(ua, ub)
            row.append(f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
        body.append(row)
    return table(["difference", *names(protocols)], body)


def primary(records: list[dict]) -> str:
    """The declared comparison as the benchmark recorded it."""
    p = records[0]["primary"]
    return table(
        ["model", "NDCG@10", "baseline", "its NDCG@10", "ratio", "difference [95%]", "seeds", "users"],
        [
            [
                f"**{p['model']}**",
                f"{p['model_mean']:.4f}",
                p["baseline"],
                f"{p['baseline_mean']:.4f}",
                f"{p['ratio']:.3f}",
                f"{p['difference']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]",
                f"{p['seeds'][0]} / {p['seeds'][1]}",
                p["users"],
            ]
        ],
    )


def intent(records: list[dict], protocol: str) -> str:
    """Per regime: the decomposer with the words against the strongest baseline given the same words."""
    body = [
        [
            regime,
            f"{r['model']:.4f}",
            r["baseline_name"],
            f"{r['baseline']:.4f}",
            f"{r['ratio']:.2f}",
            f"{r.get('model_without_words', float('nan')):.4f}",
        ]
        for regime, r in intent_table(records[0]["runs"], protocol).items()
    ]
    header = ["regime", "decomposer with the words", "strongest baseline with the same words", "its NDCG@10"]
    return table([*header, "ratio", "decomposer without words"], body)


def cold(records: list[dict], protocol: str) -> str:
    """NDCG@10 and HR@10 on the targets no training event holds."""
    rows = sorted(cold_table(records[0]["runs"], protocol).items(), key=lambda kv: -kv[1]["ndcg@10"])
    body = [[n, f"{c['ndcg@10']:.4f}", f"{c['hr@10']:.4f}", c["seeds"], c["targets"]] for n, c in rows]
    return table(["model", "NDCG@10", "HR@10", "seeds", "targets"], body)


def regimes(records: list[dict], protocol: str, rows: str, seeds: str = "") -> str:
    """Per variant (`label=variant`, runs looked up in every file, the first holding it counts):
    NDCG@10 without words and in each intent regime, means over `seeds` (all when empty), and how
    far the wrong phrase takes it from its score without words."""
    runs: dict = {}
    for record in records:
        for key, r in record["runs"].items():
            runs.setdefault(key, r)
    wanted = set(seeds.split(",")) if seeds else None
    body = []
    for pair in names(rows):
        label, _, name = pair.rpartition("=")

        def mean(variant: str, key: str = "ndcg@10") -> tuple[float, int]:
            got = [
                r[key] if key in r else r["masked"][key]
                for k, r in runs.items()
                if k.rsplit("/", 1)[0] == f"{protocol}/{variant}" and (wanted is None or k.rsplit("/", 1)[1] in wanted)
            ]
            return (float(np.mean(got)) if got else float("nan")), len(got)

        base, n = mean(name.strip())
        by = {regime: mean(intent_name(name.strip(), regime))[0] for regime in INTENT_REGIMES}
        change = (by["wrong"] - base) / base if "wrong" in by else float("nan")
        body.append(
            [
                label.strip() or name.strip(),
                n,
                f"{base:.4f}",
                *(f"{by[x]:.4f}" for x in INTENT_REGIMES),
                f"{change:+.0%}",
            ]
            + [f"{mean(name.strip(), 'valid_ndcg@10')[0]:.4f}"]
        )
    header = ["model", "seeds", "no words", *INTENT_REGIMES, "wrong vs no words", "valid NDCG@10"]
    return table(header, body)


def _params(p: dict) -> str:
    shown = {k: v for k, v in p.items() if k not in ("model", "mask_seen", "ema_decay", "use_text", "use_events")}
    return ", ".join(f"{k} {round(v, 4) if isinstance(v, float) else v}" for k, v in shown.items())


def search(records: list[dict]) -> str:
    """Per model of the equal-budget search: trials, epochs, best validation NDCG@10 and its configuration."""
    body = [
        [name, s["trials"], s["epochs_run"], f"{s['best_value']:.4f}", _params(s["best_params"])]
        for name, s in records[0]["searches"].items()
    ]
    return table(["model", "trials", "epochs run in the search", "best validation NDCG@10", "its configuration"], body)


def _reads(model: dict) -> str:
    """A model of the equal-budget record ({kind, fixed}) -> the information it reads: its config's
    `use_text` / `use_events` defaults, as the search's fixed settings leave them (an event encoder,
    the decomposer's and the LSTM's, always reads ratings and times; GRU4Rec reads ids only)."""
    from models.nn.baselines import LSTMConfig, SASRecConfig
    from models.nn.decomposer import DecomposerConfig

    configs = {"decomposer": DecomposerConfig, "lstm": LSTMConfig, "sasrec": SASRecConfig, "gru4rec": None}
    if model["kind"] not in configs:
        return "?"
    cfg = configs[model["kind"]]
    if cfg is None:
        return "ids"
    flags = {"use_text": cfg.use_text, "use_events": getattr(cfg, "use_events", True)}
    for setting in model.get("fixed", []):
        key, _, value = setting.partition("=")
        if key in flags:
            flags[key] = value.strip().lower() == "true"
    return ", ".join(
        ["ids", *(["text"] if flags["use_text"] else []), *(["ratings, times"] if flags["use_events"] else [])]
    )


def retrain(records: list[dict]) -> str:
    """The best configuration of each search retrained per seed, and the popularity baseline; the
    declared primary pair in bold."""
    r = records[0]
    primary = {r.get("declared_primary", {}).get(k) for k in ("model", "baseline")}
    body = []
    for name, seeds in r["retrain"].items():
        runs = [seeds[k] for k in sorted(seeds)]
        test = [x["test_ndcg@10"] for x in runs]
        b = "**" if name in primary else ""
        body.append(
            [
                f"{b}{name}{b}",
                _reads(r["models"][name]) if name in r.get("models", {}) else "?",
                " / ".join(f"{t:.4f}" for t in test),
                f"{b}{np.mean(test):.4f}{b}",
                " / ".join(str(x["best_epoch"]) for x in runs),
                " / ".join(f"{x['valid_ndcg@10']:.4f}" for x in runs),
            ]
        )
    pop = r["popular"]["test_ndcg@10"]
    body.append(["popular", "counts", f"{pop:.4f}", f"{pop:.4f}", "–", "–"])
    seeds = " / ".join(sorted(next(iter(r["retrain"].values()))))
    return table(
        ["model (retrained)", "reads", f"test NDCG@10, seeds {seeds}", "mean", "best epoch", "valid NDCG@10"], body
    )


def gates(records: list[dict]) -> str:
    """Gate recovery per setting: trained seeds, the random-gate null, seeds above its 95th percentile."""
    body = []
    for r in records:
        seeds = r["per_seed"]
        stat = r["statistic"]
        n = r["null"]
        body.append(
            [
                r["setting"],
                " / ".join(f"{seeds[s][stat]:.2f}" for s in sorted(seeds)),
                f"{n['median']:.2f} / {n['p95']:.2f} / {n['max']:.2f}",
                f"{r['recovered_seeds']} of {len(seeds)}",
                f"{r['context_linear_fit']['mean']:.2f}",
            ]
        )
    header = ["setting", "trained, per seed", "random gates: median, 95th pct, max", "above the 95th pct"]
    return table([*header, "context-only linear fit"], body)


VIEWS = {
    f.__name__: f
    for f in (
        quality,
        cells,
        differences,
        primary,
        intent,
        cold,
        regimes,
        search,
        retrain,
        gates,
        ray_train,
        serve_load,
        floor,
        incremental,
        tuning,
        newcomer,
        scale,
        ann,
        multinode,
        scale_ray,
    )
}


# Views whose tables hold timings: each is followed by the machine its file recorded.
TIMED = (
    "ray_train",
    "scale",
    "scale_ray",
    "ann",
    "multinode",
    "serve_load",
    "floor",
    "incremental",
    "tuning",
    "newcomer",
)


def machine_line(files: list[str], records: list[dict]) -> str:
    """'Machine: …' naming the CPU, cores and GPU each file recorded."""
    parts = []
    for name, r in zip(files, records):
        m = r.get("machine") or {}
        what = f"{m.get('cpu', 'unrecorded CPU')}, {m.get('cpus', '?')} cores" + (
            f", {m['gpu']}" if m.get("gpu") else ""
        )
        parts.append(f"{what} (`{name}`)")
    return "Machine: " + "; ".join(parts) + ".\n"


def render(spec: str, results: Path) -> str:
    """The table a marker's `VIEW FILE[,FILE...] key="value" ...` names."""
    view, files, *options = shlex.split(spec)
    if view not in VIEWS:
        raise SystemExit(f"docs table '{spec}': unknown view {view!r}; views: {', '.join(VIEWS)}")
    names_ = files.split(",")
    records = [json.loads((results / f).read_text()) for f in names_]
    kwargs = dict(o.split("=", 1) for o in options)
    body = VIEWS[view](records, **kwargs) + "\n"
    return body + "\n" + machine_line(names_, records) if view in TIMED else body


def lookup(node, keys: list[str]) -> list:
    """The values at a '/'-path of keys (`*`: every key at that level; a key that holds '/' itself,
    such as a run's "name/seed", is matched whole, the longest such key first)."""
    if not keys:
        return [node]
    head, rest = keys[0], keys[1:]
    if isinstance(node, dict) and head != "*":
        j = next((j for j in range(len(keys), 1, -1) if "/".join(keys[:j]) in node), 1)
        head, rest = "/".join(keys[:j]), keys[j:]
    if isinstance(node, list):
        children = node if head == "*" else [node[int(head)]]
    elif head == "*":
        children = list(node.values())
    else:
        children = [node[head]]
    return [v for child in children for v in lookup(child, rest)]


def figure(spec: str, results: Path) -> str:
    """The number a figure marker's `FILE PATH [FORMAT [REDUCE]]` names."""
    file, path, *rest = shlex.split(spec)
    fmt = rest[0] if rest else ".4f"
    reduce = {"mean": np.mean, "min": np.min, "max": np.max}[rest[1] if len(rest) > 1 else "mean"]
    try:
        values = lookup(json.loads((results / file).read_text()), path.split("/"))
    except (KeyError, IndexError, ValueError, OSError) as e:
        raise SystemExit(f"docs figure '{spec}': {type(e).__name__}: {e}") from None
    value = values[0] if len(values) == 1 else float(reduce(values))
    return format(value, fmt)


def regenerate(text: str, results: Path) -> tuple[str, list[str]]:
    """`text` with every table and figure rewritten, and the specs of those that changed."""
    changed = []

    def one(m: re.Match) -> str:
        body = render(m["spec"], results)
        if body != m["body"]:
            changed.append(m["spec"])
        return f"<!-- table: {m['spec']} -->\n{body}<!-- end table -->"

    def fig(m: re.Match) -> str:
        body = figure(m["spec"], results)
        if body != m["body"]:
            changed.append(m["spec"])
        return f"<!-- fig: {m['spec']} -->{body}<!-- /fig -->"

    return FIGURE.sub(fig, MARKER.sub(one, text)), changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its file")
    p.add_argument("--doc", type=Path, action="append", help="a page (default: docs/results.md, README, docs/*.md)")
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from models.files import atomic_path

    stale = 0
    for doc in a.doc or sorted({DOC, *PAGES}):
        text = doc.read_text()
        new, changed = regenerate(text, a.results)
        stale += len(changed)
        if a.check:
            for spec in changed:
                what = "figure" if spec in {m["spec"] for m in FIGURE.finditer(text)} else "table"
                print(f"{doc}: the {what} '{spec}' differs from its results file", file=sys.stderr)
            continue
        if changed:
            with atomic_path(doc) as tmp:
                tmp.write_text(new)
        n_tables, n_figures = len(MARKER.findall(text)), len(FIGURE.findall(text))
        if n_tables or n_figures:
            print(f"{doc}: {n_tables} tables, {n_figures} figures, {len(changed)} rewritten")
    if a.check and stale:
        print("regenerate with: python benchmarks/results_doc.py", file=sys.stderr)
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
