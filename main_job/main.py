"""The main job: prepare → train (Ray Train) → evaluate against the baselines → serve → demo.

    python -m main_job                                   # embedded synthetic data
    python -m main_job --dataset ml-latest-small         # MovieLens (../shared copy, a folder/zip, or a download)
    python -m main_job --checkpoint runs/ray/RUN         # skip training
    python -m main_job --tune 8                          # an 8-trial search; serve its best trial

It keeps serving the API and the demo until Ctrl-C, then shuts everything down.
"""

from __future__ import annotations

import argparse
import logging
import sys

# The job's pieces live in the sibling modules; their names stay importable from here.
from main_job.access import private_write, setup_access
from main_job.preflight import (
    KNOWN_EVENTS,
    KNOWN_SIZES,
    MEMORY_MODEL,
    check_index,
    check_memory,
    memory_need,
    check_port,
    check_ray,
    port_free,
    preflight,
    wait_port_free,
)
from main_job.report import banner, example_ids
from main_job.serving import (
    APP_NAME,
    deploy_app,
    serve_until_stopped,
    shut_down,
    start_demo,
    start_serve_proxy,
    wait_until_up,
)
from main_job.settings import BASELINES, DEFAULT_BASELINES, MainSettings, NewcomerError
from main_job.stages import ORACLE_ROW, evaluate, prepare, resolve_checkpoint, train, tune
from models.cli import add_settings, settings_from

__all__ = [
    "APP_NAME",
    "BASELINES",
    "DEFAULT_BASELINES",
    "KNOWN_EVENTS",
    "KNOWN_SIZES",
    "MEMORY_MODEL",
    "ORACLE_ROW",
    "MainSettings",
    "NewcomerError",
    "banner",
    "check_memory",
    "memory_need",
    "check_port",
    "check_ray",
    "deploy_app",
    "evaluate",
    "example_ids",
    "main",
    "parse_args",
    "port_free",
    "preflight",
    "prepare",
    "private_write",
    "resolve_checkpoint",
    "run",
    "serve_until_stopped",
    "setup_access",
    "shut_down",
    "start_demo",
    "start_serve_proxy",
    "train",
    "tune",
    "wait_port_free",
    "wait_until_up",
]

log = logging.getLogger("dynamic_interest.main")


def run(s: MainSettings) -> int:
    """The whole job: check, prepare, train (or tune, or take --checkpoint), evaluate, serve and
    start the demo, then keep them up until Ctrl-C and shut everything down -> the exit status."""
    from ray_app.train.driver import SetupError
    from ray_app.train.preflight import connect
    from ray_app.train.settings import parse_model_args

    preflight(s)
    try:
        model_args = parse_model_args("decomposer", s.model_args)
    except SetupError as e:
        raise NewcomerError(str(e)) from None
    check_index(s.index, model_args)
    prepared = prepare(s)
    token = setup_access(s)
    connect(s.num_cpus, s.verbose)
    demo = demo_url = None
    try:
        # The demo and Serve's proxy start first, beside the training (which keeps one core busy);
        # the demo waits for the API itself.
        api_url = start_serve_proxy(s)
        if s.demo:
            demo, demo_url = start_demo(s, api_url, token)
        if s.checkpoint is not None:
            checkpoint_path = resolve_checkpoint(s.checkpoint)
        elif s.tune_samples:
            checkpoint_path = tune(s, prepared)
        else:
            checkpoint_path = train(s, prepared, model_args)
        print("\n" + evaluate(s, prepared, checkpoint_path), flush=True)
        deploy_app(s, prepared, checkpoint_path)
        if demo is not None:
            wait_until_up(demo_url, "the demo", 120, demo, log=s.demo_log)
        print(banner(api_url, demo_url, *example_ids(prepared), s), flush=True)
        serve_until_stopped(s, demo)
    finally:
        shut_down(s, demo)
    return 0


def parse_args(argv=None) -> MainSettings:
    """The command line of `python -m main_job` -> its settings (--baselines and --compare resolved)."""
    p = argparse.ArgumentParser(
        prog="python -m main_job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_settings(p, MainSettings)
    p.add_argument(
        "--baselines",
        default=",".join(DEFAULT_BASELINES),
        help=f"comma-separated from {', '.join(BASELINES)}, 'all', or empty for none (default: the "
        "two untrained rules, so that the API is up in minutes; 'all' trains LSTM, GRU4Rec and "
        "SASRec too, with the same epochs and batches: minutes more)",
    )
    p.add_argument("--compare", action="store_true", help="the same as --baselines all")
    a = p.parse_args(argv)
    baselines = tuple(b.strip() for b in a.baselines.split(",") if b.strip())
    if a.compare or baselines == ("all",):
        baselines = BASELINES
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        p.error(f"--baselines: unknown {bad}; choose from {', '.join(BASELINES)}")
    if a.smoke:
        baselines = tuple(b for b in baselines if b in DEFAULT_BASELINES)
    return settings_from(MainSettings, a, baselines=baselines)


def main(argv=None) -> int:
    """`python -m main_job` -> its exit status (2: a NewcomerError, printed as one line; 130: Ctrl-C)."""
    from ray_app.serve import mode as serve_mode

    logging.basicConfig(level=logging.WARNING)
    s = parse_args(argv)
    serve_mode.use(s.throughput_optimized)  # before Ray starts: its processes inherit the choice
    try:
        return run(s)
    except NewcomerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
