"""The search budget the search benchmarks share (`equal_budget.py`, `tuning_search.py`): trials,
epochs per trial, TPE's random start, the retraining after the search, where the runs and the
results go. Each flag and its help is written here once; a benchmark's settings subclass it, give
some of these settings another default (`redefault`) and add its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from models.cli import add_settings, setting, settings_from


@dataclass
class SearchBudget:
    """What every search of a comparison gets, and the retraining of the configuration it found
    (the defaults are the equal-budget comparison's)."""

    dataset: str = setting("ml-latest-small")
    trials: int = setting(6, "trial budget of every search")
    epochs: int = setting(10, "epochs per trial at most (ASHA max_t)")
    startup_trials: int = setting(3, "TPE's random start")
    retrain_epochs: int = setting(80)
    retrain_patience: int = setting(6)
    storage: Path = setting(Path("runs/bench-equal-budget"))
    out: Path | None = setting(None)

    def record(self, leave_out: tuple[str, ...] = ()) -> dict:
        """The settings as the results JSON records them (paths as text), less `leave_out`."""
        return {
            f.name: str(v) if isinstance(v, Path) else v
            for f in dataclasses.fields(self)
            if f.name not in leave_out
            for v in [getattr(self, f.name)]
        }


def redefault(cls: type, name: str, default):
    """A subclass's field for setting `name` of `cls`: the same flag and help, another default."""
    base = {f.name: f for f in dataclasses.fields(cls)}[name]
    return dataclasses.field(default=default, metadata=base.metadata)


def parse_budget(cls: type, description: str, argv=None):
    """The settings `cls` from the command line, with the storage folder made absolute (Ray Tune
    and Train want one); Ray's usage report off unless the environment says otherwise."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, cls)
    s = settings_from(cls, p.parse_args(argv))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return dataclasses.replace(s, storage=s.storage.resolve())
