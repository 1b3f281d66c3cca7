"""A dataset that cannot be had ends every entry point in one line with its fix, not a traceback:
`--dataset ml-1m` without network, and a `--data-dir` that does not exist."""

from __future__ import annotations

import importlib
import socket

import pytest

DOWNLOAD = importlib.import_module("models.data.download")  # the module (models.data.download is also a function)

# A closed port on this machine: the download fails at once, with the same transport error as
# a machine without network (no name resolution) gives after its timeout.
UNREACHABLE = "http://127.0.0.1:9/{name}.zip"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_job(argv: list[str]) -> int:
    from main_job.main import main

    return main([*argv, "--no-demo", "--port", str(free_port())])


def ray_train(argv: list[str]) -> int:
    from ray_app.train.driver import main

    return main([*argv, "--storage-path", "runs/ray"])


def tuning_search(argv: list[str]) -> int:
    from tuning.search import main

    return main([*argv, "--storage-path", "runs/tune"])


def training_run(argv: list[str]) -> int:
    from models.training.run import main

    return main(argv)


ENTRY_POINTS = [main_job, ray_train, tuning_search, training_run]


@pytest.fixture
def offline(monkeypatch, tmp_path, encoder_cache):
    """No MovieLens download can succeed; the working folder (runs/...) is a temporary one; the
    main job's choice of Serve mode is undone afterwards."""
    monkeypatch.setattr(DOWNLOAD, "MOVIELENS_URL", UNREACHABLE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    return tmp_path


def the_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_a_download_without_network_is_one_line_with_its_fix(entry, offline, capsys):
    assert entry(["--dataset", "ml-1m"]) == 2
    line = the_error_line(capsys.readouterr().err)
    assert "cannot download ml-1m from http://127.0.0.1:9/ml-1m.zip" in line
    assert "without network, pass a local copy: --data-dir path/to/ml-1m.zip or its unpacked folder" in line
    assert not (offline / "runs" / "data" / "ml-1m").exists()


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "dataset, fix",
    [
        ("ml-1m", "pass a MovieLens release: its unpacked folder or its .zip (ml-1m.zip)"),
        ("events", "pass a folder with events.csv or events.parquet and items.csv or items.parquet"),
        ("movietweetings-100k", "pass the MovieTweetings folder that holds ratings.dat and movies.dat"),
    ],
)
def test_a_data_dir_that_does_not_exist_is_one_line_with_its_fix(entry, dataset, fix, offline, capsys):
    assert entry(["--dataset", dataset, "--data-dir", str(offline / "nowhere")]) == 2
    line = the_error_line(capsys.readouterr().err)
    assert f"--data-dir {offline / 'nowhere'}: no such folder or file; {fix}" in line


def test_the_main_job_prepares_a_dataset_whose_item_ids_are_text(offline):
    """The API names items by their source ids as strings, so the main job takes any id."""
    from main_job.settings import MainSettings
    from main_job.stages import prepare
    from models.data import load_prepared

    log = offline / "log"
    log.mkdir()
    (log / "items.csv").write_text("item_id,title\nsku-1,a\n0133093,b\n")
    rows = "".join(f"u{u},{('sku-1', '0133093')[j % 2]},{1_600_000_000 + 60 * j}\n" for u in range(3) for j in range(4))
    (log / "events.csv").write_text("user_id,item_id,timestamp\n" + rows)
    prepared = prepare(MainSettings(dataset="events", data_dir=log, runs_dir=offline / "elsewhere"))
    assert prepared == offline / "elsewhere" / "data" / "events"
    assert sorted(load_prepared(prepared).item_source_ids[1:]) == ["0133093", "sku-1"]
