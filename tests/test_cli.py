"""Command lines derived from settings dataclasses: every field once, old flag names kept."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from models.cli import add_settings, setting, settings_from


@dataclass
class Demo:
    epochs: int = setting(200, "epochs at most")
    lr: float | None = setting(None, "learning rate")
    data_dir: Path | None = setting(None)
    time_budget_s: float | None = setting(None, flag="--time-budget")
    check_resources: bool = setting(True, "do not check", flag="--skip-resource-check")
    verbose: bool = setting(False)
    fast: bool | None = setting(None, "on, off or the environment's")
    kind: str = setting("a", choices=("a", "b"))
    overrides: list[str] = setting(help="repeatable", flag="--set", metavar="KEY=VALUE", factory=list)
    derived: int = 7  # not on the command line


def parse(argv: list[str]) -> Demo:
    p = argparse.ArgumentParser()
    add_settings(p, Demo)
    return settings_from(Demo, p.parse_args(argv))


def test_defaults_come_from_the_fields():
    assert parse([]) == Demo()


def test_flags_types_and_names():
    s = parse(
        [
            "--epochs",
            "3",
            "--lr",
            "0.5",
            "--data-dir",
            "x",
            "--time-budget",
            "9",
            "--skip-resource-check",
            "--verbose",
            "--no-fast",
            "--kind",
            "b",
            "--set",
            "a=1",
            "--set",
            "b=2",
        ]
    )
    assert (s.epochs, s.lr, s.data_dir, s.time_budget_s) == (3, 0.5, Path("x"), 9.0)
    assert s.check_resources is False and s.verbose is True and s.fast is False and s.kind == "b"
    assert s.overrides == ["a=1", "b=2"] and s.derived == 7
    assert parse(["--fast"]).fast is True and parse([]).overrides == []  # a fresh list every parse


def test_bad_values_name_the_flag(capsys):
    for argv, flag in ((["--epochs", "many"], "--epochs"), (["--kind", "c"], "--kind"), (["--derived", "1"], "")):
        with pytest.raises(SystemExit):
            parse(argv)
        assert flag in capsys.readouterr().err


def test_the_entry_points_keep_their_flags():
    from main_job.main import MainSettings, parse_args as main_args
    from ray_app.train.settings import RayTrainSettings, parse_args as train_args
    from tuning.search import SearchSettings, parse_args as search_args

    s, _ = train_args(["--keep", "2", "--skip-resource-check", "--time-budget", "5", "--set", "lstm_units=8"])
    assert s.num_to_keep == 2 and not s.check_resources and s.time_budget_s == 5 and s.model_args == {"lstm_units": 8}
    assert train_args([])[0] == RayTrainSettings()
    t, _ = search_args(["--space-override", "lstm_units=8", "--space-file", "s.yaml", "--time-budget", "60"])
    assert t.space_overrides == ["lstm_units=8"] and t.space_files == [Path("s.yaml")] and t.time_budget_s == 60
    assert search_args([])[0] == SearchSettings()
    m = main_args(["--tune", "4", "--no-demo", "--set", "dims=topic"])
    assert m.tune_samples == 4 and not m.demo and m.model_args == ["dims=topic"]
    assert main_args([]) == MainSettings()
    runs = main_args(["--runs-dir", "/tmp/elsewhere"])
    assert runs.runs == Path("/tmp/elsewhere/main") and runs.data_root == Path("/tmp/elsewhere/data")
