"""Training curves: how fast each model fits the next-item loss, and its validation NDCG@10.

    python benchmarks/fit_curves.py --dataset ml-latest-small --epochs 16

Trains the named variants of the quality benchmark (same seed, same epochs, no early stop) and
records per epoch the training next-item loss and validation NDCG@10 in
benchmarks/results/fit_curves_<dataset>.json, with a plot beside it. It separates a model that
fits more slowly from one that generalises worse.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import RESULTS, machine  # noqa: E402
from quality_variants import VARIANTS, build_variant  # noqa: E402
from models.files import write_json  # noqa: E402

from models.data import load_prepared, prepare_source  # noqa: E402
from models.training.defaults import PROTOCOLS, protocol_split  # noqa: E402
from models.training.loop import fit  # noqa: E402

DEFAULT = "decomposer;decomposer, no gates;lstm (mask seen)"


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, hist in curves.items():
        ep = [h["epoch"] for h in hist]
        a.plot(ep, [h["next_item"] for h in hist], label=name)
        b.plot(ep, [h["valid_ndcg@10"] for h in hist], label=name)
    a.set(xlabel="epoch", ylabel="training next-item loss")
    b.set(xlabel="epoch", ylabel="validation NDCG@10 (history-masked)")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--prepared", type=Path, help="an already prepared folder")
    p.add_argument("--variants", default=DEFAULT, help="';'-separated names of benchmarks/quality.py variants")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", default="loo", choices=sorted(PROTOCOLS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    data = load_prepared(args.prepared or prepare_source(args.dataset, Path("runs/data") / args.dataset))
    split = protocol_split(data.user_offsets, args.protocol)
    out = args.out or RESULTS / f"fit_curves_{args.dataset}.json"
    curves = {}
    for name in variants:
        model, cfg = build_variant(name, data, split, args.seed, epochs=args.epochs, patience=args.epochs)
        fitted = fit(model, data, split, cfg, device=args.device, desc=name)
        curves[name] = [{k: round(float(v), 5) for k, v in h.items()} for h in fitted.history]
        last = curves[name][-1]
        print(
            f"{name}: epoch {last['epoch']} loss {last['next_item']:.4f} valid ndcg@10 {last['valid_ndcg@10']:.4f} "
            f"(best {fitted.best_valid['ndcg@10']:.4f} @ {fitted.best_epoch})",
            flush=True,
        )
        write_json(
            out,
            {
                "benchmark": "fit_curves",
                "dataset": args.dataset,
                "machine": machine(),
                "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                "seed": args.seed,
                "protocol": args.protocol,
                "curves": curves,
            },
        )
    plot(curves, out.with_suffix(".png"))
    print(f"recorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
