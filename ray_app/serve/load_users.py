"""Load a prepared dataset's training users into the state store: a one-off step before serving,
not the work of any replica (so that no replica's start, restart or scale-up waits for the store).

    python -m ray_app.serve.load_users --data runs/data/NAME --store-url sqlite:///runs/serve/state.db

Idempotent: a user already in the store keeps its log (possibly longer than the dataset's), so
running it again, or after the API has taken events, changes nothing. The main job runs it before
it deploys the app; on Kubernetes the training RayJob runs it once training is done.

A store belongs to one dataset: the first load records it (its name and digests of its users'
events and of its items), and a load of another dataset into it is refused, writing nothing. A
store loaded before stores recorded their dataset is refused too, unless `--adopt` records this
dataset for it (for a store known to hold this dataset's users).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from models.cli import add_settings, setting, settings_from


@dataclass
class LoadSettings:
    data: Path | None = setting(None, "the prepared dataset folder whose training users are loaded (required)")
    store_url: str = setting(
        "sqlite:///runs/serve/state.db",
        "the state store: sqlite:///PATH or redis://host:port/db (`${NAME}` read from the environment)",
    )
    adopt: bool = setting(
        False, "record this dataset for a store that holds users but records none (loaded before stores recorded it)"
    )


def load_training_users(data_dir: str | Path, store_url: str, adopt: bool = False) -> int:
    """Bulk-load the dataset's users into the store -> how many users the dataset has."""
    from models.data import load_prepared

    return load_users(load_prepared(Path(data_dir)), store_url, adopt)


def load_users(data, store_url: str, adopt: bool = False) -> int:
    """`load_training_users` for a loaded dataset (an `InteractionData`): StoreMismatch, writing
    nothing, for a store of another dataset -> how many users the dataset has."""
    from ray_app.serve.item_catalogue import dataset_record, training_user_events
    from ray_app.store.opener import open_store

    store = open_store(store_url)
    try:
        store.ping()  # StoreUnavailable, naming the store, before any work
        if getattr(store, "durable", None) is False:
            logging.getLogger(__name__).warning("the store does not fsync every write: see the warning above")
        store.claim_dataset(dataset_record(data), adopt)
        for users in training_user_events(data):
            store.bulk_load(users)
    finally:
        store.close()
    return data.n_users


def main(argv=None) -> int:
    from ray_app.store.base import StoreUnavailable

    p = argparse.ArgumentParser(prog="python -m ray_app.serve.load_users", description=__doc__.splitlines()[0])
    add_settings(p, LoadSettings)
    s = settings_from(LoadSettings, p.parse_args(argv))
    if s.data is None:
        p.error("--data is required")
    logging.basicConfig(level=logging.WARNING)
    try:
        n = load_training_users(s.data, s.store_url, s.adopt)
    except (StoreUnavailable, ValueError, FileNotFoundError) as e:  # StoreMismatch is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} training users of {s.data} are in the store")
    return 0


if __name__ == "__main__":
    sys.exit(main())
