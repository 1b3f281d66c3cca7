"""Ray Train: user shards, DDP over two workers, checkpoints, failure recovery, resume, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import local_ray

from models.nn import checkpoint
from models.data.batching import make_split
from models.evaluation.metrics import summarize
from models.evaluation.evaluate import evaluate
from ray_app.train.data import SetupError, item_counts, item_first_seen, load_checked, user_ranges
from models.nn.checkpoint import BEST_FILE
from ray_app.train.settings import METRIC, parse_args, parse_model_args
from ray_app.train.driver import main


@pytest.fixture(scope="module")
def cluster():
    with local_ray():
        yield


def train(data, storage, name, *extra) -> int:
    return main(
        ["--dataset", str(data.path), "--storage-path", str(storage), "--name", name, "--num-cpus", "2", *extra]
    )


def best_record(storage, name) -> dict:
    """The run's best-checkpoint record; written whole (through a temporary file, none left over)."""
    assert not list((storage / name).glob(f"{BEST_FILE}.*.tmp"))
    return json.loads((storage / name / BEST_FILE).read_text())


# ---- no cluster needed ---------------------------------------------------------------------


def _uneven_average(rank: int, world: int, store: str, out: str) -> None:
    """One rank of two (gloo): rank 1 averages one step more, as a rank with a longer shard does."""
    import torch
    import torch.distributed as dist

    from models.training.loop import TrainConfig, weight_average
    from ray_app.train.worker import sync_average

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = weight_average(net, TrainConfig(ema_decay=0.5))
    for step in range(3 if rank == 0 else 4):
        with torch.no_grad():
            net.weight.add_(step + 1.0)
        ema.update_parameters(net)
    sync_average(ema)
    torch.save({"weight": ema.module.weight.detach().clone(), "n": int(ema.n_averaged)}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_ranks_share_the_weight_average_of_the_rank_that_stepped_most(tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_uneven_average, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert r0["n"] == r1["n"] == 4
    torch.testing.assert_close(r0["weight"], r1["weight"])
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)  # rank 1's four steps, by hand
    avg = None
    for step in range(4):
        with torch.no_grad():
            net.weight.add_(step + 1.0)
        avg = net.weight.detach().clone() if avg is None else 0.5 * avg + 0.5 * net.weight.detach()
    torch.testing.assert_close(r0["weight"], avg)


def test_weight_average_is_the_models_default_and_can_be_set_or_turned_off(capsys):
    def decay(*argv):
        return parse_args(list(argv))[0].train_config().ema_decay

    assert decay() == 0.98  # the decomposer's default
    assert decay("--model", "sasrec") is None
    assert decay("--ema-decay", "0.9") == 0.9 and decay("--model", "lstm", "--ema-decay", "0.5") == 0.5
    assert decay("--ema-decay", "0") is None  # off
    with pytest.raises(SystemExit):
        parse_args(["--ema-decay", "1"])
    assert "--ema-decay must be in [0, 1), got 1.0" in capsys.readouterr().err


def test_max_steps_reaches_the_train_config_and_must_be_positive(capsys):
    assert parse_args(["--max-steps", "5"])[0].train_config().max_steps == 5
    assert parse_args([])[0].train_config().max_steps is None
    with pytest.raises(SystemExit):
        parse_args(["--max-steps", "0"])
    assert "--max-steps must be positive, got 0" in capsys.readouterr().err


def test_set_overrides_are_typed_and_checked():
    got = parse_model_args("decomposer", ["lstm_units=32", "dims=topic,time", "use_gates=false", "dropout=0.1"])
    assert got == {"lstm_units": 32, "dims": ("topic", "time"), "use_gates": False, "dropout": 0.1}
    with pytest.raises(SetupError, match="bogus.*choose from.*lstm_units"):
        parse_model_args("decomposer", ["bogus=1"])
    with pytest.raises(SetupError, match="lstm_units=many"):
        parse_model_args("decomposer", ["lstm_units=many"])
    with pytest.raises(SetupError, match="fixed by the dataset"):
        parse_model_args("lstm", ["n_items=5"])
    with pytest.raises(SetupError, match="combine must be one of max, concat, sum, mixture"):
        parse_model_args("decomposer", ["combine=blend"])
    with pytest.raises(SetupError, match="KEY=VALUE"):
        parse_model_args("sasrec", ["hidden"])


def test_unknown_set_key_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "lstm", "--set", "gates=2"])
    assert e.value.code == 2
    assert "--set gates: not a setting of LSTMConfig" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 2, 3])
def test_user_ranges_cover_every_user_once(tiny_data, n):
    split = make_split(tiny_data.user_offsets, 1)
    r = user_ranges(tiny_data.user_offsets, split, 4, n)
    assert r.bounds[0] == 0 and r.bounds[-1] == tiny_data.n_users and np.all(np.diff(r.bounds) > 0)
    assert r.events[-1] == tiny_data.n_events
    assert r.windows.max() - r.windows.min() < 2 * 5  # each cut is off by less than one user (<= 5 windows)


def test_the_driver_plans_from_offsets_and_counts_equal_to_the_loaded_datas(tiny_data):
    from models.training.loop import training_counts, training_first_seen

    index = load_checked(tiny_data.path)
    np.testing.assert_array_equal(index.user_offsets, tiny_data.user_offsets)
    assert (index.n_users, index.n_items, index.n_events) == (tiny_data.n_users, tiny_data.n_items, tiny_data.n_events)
    split = make_split(index.user_offsets, 10, 10)
    np.testing.assert_array_equal(item_counts(index, split, batch_rows=7), training_counts(tiny_data, split))
    np.testing.assert_array_equal(item_first_seen(index, split, batch_rows=7), training_first_seen(tiny_data, split))


PLAN_PEAK = """
import json, sys, tracemalloc
import pyarrow as pa
from models.data.batching import make_split
from ray_app.train.data import item_counts, load_checked

def plan(path):
    index = load_checked(path)
    return index, item_counts(index, make_split(index.user_offsets, 10, 10))


plan(sys.argv[2])  # the tiny dataset first: what its first call imports is not counted
tracemalloc.start()
index, counts = plan(sys.argv[1])
print(json.dumps({"events": index.n_events, "counted": int(counts.sum()),
                  "arrow_peak": pa.default_memory_pool().max_memory(), "numpy_peak": tracemalloc.get_traced_memory()[1]}))
"""


def test_the_driver_never_holds_the_events(tiny_data, tmp_path):
    """Planning a run over 4 M events streams two integer columns: its peak allocation (Arrow's pool
    and numpy's, both tracked, in a process of its own) stays far below the two columns whole (32 MB
    as int32)."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    big = tmp_path / "big"
    shutil.copytree(tiny_data.path, big)
    n_users, per_user = tiny_data.n_users, 100_000
    events = n_users * per_user
    pq.write_table(
        pa.table(
            {
                "user_idx": np.repeat(np.arange(1, n_users + 1, dtype=np.int32), per_user),
                "item_idx": np.random.default_rng(0).integers(1, tiny_data.n_items + 1, events, dtype=np.int32),
                "rating": np.full(events, 4.0, np.float32),
                "timestamp": np.tile(np.arange(per_user, dtype=np.int64), n_users),
            }
        ),
        big / "interactions.parquet",
    )
    manifest = json.loads((big / "manifest.json").read_text())
    manifest["counts"]["interactions"] = events
    (big / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run(
        [sys.executable, "-c", PLAN_PEAK, str(big), str(tiny_data.path)], capture_output=True, text=True, check=True
    )
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["events"] == events and got["counted"] == n_users * (per_user - 20)
    # Arrow decodes a row group's pages and a few batches of 65,536 rows at a time; both columns whole are 32 MB.
    assert got["arrow_peak"] < 8 * 2**20, got
    assert got["numpy_peak"] < 8 * 2**20, got


# ---- bad input: clear errors before training ------------------------------------------------


def test_missing_and_malformed_datasets(cluster, tiny_data, tmp_path, capsys):
    assert main(["--dataset", str(tmp_path / "nowhere"), "--storage-path", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data.path, broken)
    (broken / "interactions.parquet").write_bytes(b"not parquet")
    assert main(["--dataset", str(broken), "--storage-path", str(tmp_path / "runs"), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "not a usable prepared dataset" in err or "unreadable prepared dataset" in err
    (broken / "manifest.json").write_text("{")
    assert main(["--dataset", str(broken), "--storage-path", str(tmp_path / "runs"), "--name", "x"]) == 2
    assert "manifest.json: not valid JSON" in capsys.readouterr().err
    assert not list((tmp_path / "runs" / "x").glob("epoch_*"))


def test_unwritable_storage(cluster, tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train(tiny_data, blocker / "runs", "x") == 2
    assert "cannot write the run folder" in capsys.readouterr().err


def test_impossible_resource_requests(cluster, tiny_data, tmp_path, capsys):
    assert train(tiny_data, tmp_path, "x", "--num-workers", "3") == 2
    assert "3 workers × 1 CPU need 3 CPU, the cluster has 2" in capsys.readouterr().err
    assert train(tiny_data, tmp_path, "y", "--use-gpu") == 2
    assert "the cluster has 0 (no GPU at all)" in capsys.readouterr().err
    assert train(tiny_data, tmp_path, "z", "--cpus-per-worker", "4") == 2
    assert "need 4 CPU" in capsys.readouterr().err


# ---- training ------------------------------------------------------------------------------

ARGS = (
    "--num-workers",
    "2",
    "--epochs",
    "3",
    "--patience",
    "5",
    "--set",
    "lstm_units=16",
    "--set",
    "dim_size=8",
    "--set",
    "max_len=8",
    "--batch-size",
    "8",
)


@pytest.fixture(scope="module")
def faulted(cluster, tiny_data, tmp_path_factory):
    """Two workers; rank 0 dies once in epoch 2 and the group restarts from the last checkpoint."""
    storage = tmp_path_factory.mktemp("ray-runs")
    assert train(tiny_data, storage, "fault", *ARGS, "--fail-at-epoch", "2", "--max-failures", "1") == 0
    return storage


def test_fault_is_recovered_with_the_same_result(faulted, tiny_data, capsys):
    assert (faulted / "fault" / ".fault-injected").is_file()  # the worker really died once
    faulty = best_record(faulted, "fault")
    assert [h["epoch"] for h in faulty["history"]] == [1, 2, 3]
    assert train(tiny_data, faulted, "clean", *ARGS) == 0
    out = capsys.readouterr().out  # the driver's story of the run
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert "valid ndcg@10" in out and "best checkpoint:" in out and "TrainingReport(" not in out
    clean = best_record(faulted, "clean")
    # The resumed run replays the lost epoch with the same batches: the same model comes out.
    np.testing.assert_allclose([h[METRIC] for h in faulty["history"]], [h[METRIC] for h in clean["history"]], rtol=1e-6)


def test_checkpoints_hold_model_vocabulary_metrics_and_optimizer(faulted, tiny_data):
    best = best_record(faulted, "fault")
    assert best[METRIC] == max(h[METRIC] for h in best["history"])
    assert best["metrics"]["valid_targets"] == tiny_data.n_users  # every user, not one worker's shard
    m = best["metrics"]  # each worker's memory, and the events of the larger shard: part of the data only
    assert 0 < m["worker_peak_rss_min"] <= m["worker_peak_rss_max"] < 8 * 2**30
    assert 0 < m["worker_events_max"] < len(tiny_data.items)
    model, meta = checkpoint.load(best["model"])
    assert model.cfg.lstm_units == 16 and meta["epoch"] == best["epoch"]
    np.testing.assert_array_equal(checkpoint.item_vocabulary(meta), tiny_data.item_source_ids)
    folder = faulted / "fault" / f"epoch_{best['epoch']:04d}"
    # model.pt: the averaged weights that were validated (the decomposer's default); live.pt: the ones training resumes from
    assert {p.name for p in folder.iterdir()} >= {"model.pt", "live.pt", "optimizer.pt", "train_state.json"}
    # Gathered shard metrics equal one evaluation over all users with the saved weights.
    local = summarize(evaluate(model, tiny_data, make_split(tiny_data.user_offsets, 1), "valid")["masked"])
    assert local["ndcg@10"] == pytest.approx(best[METRIC], abs=1e-9)


def test_same_name_resumes(faulted, tiny_data, capsys):
    before = best_record(faulted, "fault")["history"]
    assert train(tiny_data, faulted, "fault", *ARGS[:2], "--epochs", "4", *ARGS[4:]) == 0
    out = capsys.readouterr().out
    assert "resumed from the checkpoint of epoch 3" in out and "epoch   4/4" in out and "epoch   1/4" not in out
    after = best_record(faulted, "fault")["history"]
    assert [h["epoch"] for h in after] == [1, 2, 3, 4]
    assert after[:3] == before  # epochs 1-3 were not trained again


def test_single_worker_bf16_cpu_path(cluster, tiny_data, tmp_path, capsys):
    """The --use-gpu code path with use_gpu=False: get_device() is the CPU, autocast runs in bfloat16
    where the CPU supports it; elsewhere (AVX2 without AVX-512 BF16) --bf16 stops before training."""
    from models.training.precision import bf16_problem

    rc = train(
        tiny_data,
        tmp_path,
        "bf16",
        "--model",
        "lstm",
        "--set",
        "lstm_units=8",
        "--bf16",
        "--epochs",
        "1",
        "--cpus-per-worker",
        "2",
    )
    problem = bf16_problem("cpu")
    if problem:
        err = capsys.readouterr().err  # may also hold this module's Ray output
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and "--bf16" in errors[0] and "bfloat16" in errors[0], err
        assert "Traceback" not in err
        assert not (tmp_path / "bf16" / BEST_FILE).exists()
        return
    assert rc == 0
    best = best_record(tmp_path, "bf16")
    assert best["model_type"] == "lstm" and best["metrics"]["world_size"] == 1
    assert np.isfinite(best["metrics"]["loss_next_item"])


def test_bf16_is_refused_on_a_cpu_without_it_and_a_worker_falls_back(cluster, monkeypatch, tiny_data, tmp_path, caplog):
    """Both branches on any CPU: the driver's one-line refusal, a cluster worker's float32 fallback."""
    import torch

    from ray_app.train import preflight, worker
    from ray_app.train.preflight import plan
    from ray_app.train.settings import RayTrainSettings
    from ray_app.train.worker import autocast_dtype, precision_name

    def cannot(device_type):
        return "this CPU cannot run the LSTM in bfloat16"

    for module in (preflight, worker):  # the driver's check and the workers' fallback
        monkeypatch.setattr(module, "bf16_problem", cannot)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SetupError, match="--bf16: this CPU cannot run the LSTM in bfloat16; train without"):
        plan(RayTrainSettings(dataset=str(tiny_data.path), storage_path=str(tmp_path), name="x", bf16=True))
    plan(
        RayTrainSettings(
            dataset=str(tiny_data.path),
            storage_path=str(tmp_path),
            name="y",
            bf16=True,
            model="sasrec",
            check_resources=False,
        )
    )  # no LSTM: nothing to refuse
    with caplog.at_level("WARNING"):
        assert autocast_dtype(True, "cpu") is None
    assert "training in float32" in caplog.text
    assert autocast_dtype(True, "cpu", has_lstm=False) is torch.bfloat16
    assert precision_name(True, None, "cpu") == "float32 (bf16 unsupported: this CPU cannot run the LSTM in bfloat16)"
    monkeypatch.setattr(worker, "bf16_problem", lambda device_type: None)
    assert autocast_dtype(True, "cpu") is torch.bfloat16 and autocast_dtype(False, "cpu") is None
    assert precision_name(True, torch.bfloat16, "cpu") == "bfloat16" and precision_name(False, None, "cpu") == "float32"


def test_the_driver_warns_once_when_a_worker_falls_back_to_float32(cluster, capsys):
    """A cluster worker without bf16 reports float32 in its metrics: the driver prints one warning."""
    from ray_app.train.settings import METRIC
    from ray_app.train.driver import _epoch_lines_callback, printed_epochs

    m = {
        "epoch": 1,
        "loss_next_item": 1.0,
        METRIC: 0.1,
        "valid_targets": 5,
        f"best_{METRIC}": 0.1,
        "best_epoch": 1,
        "sequences_per_s": 10.0,
        "train_seconds": 1.0,
        "precision": "float32 (bf16 unsupported: no AVX-512 BF16)",
    }
    with printed_epochs(2) as callbacks:
        for epoch in (1, 2):
            callbacks[0].after_report(None, [{**m, "epoch": epoch}], None)
    out = capsys.readouterr().out
    assert out.count("warning: --bf16 ignored, training in float32 (bf16 unsupported: no AVX-512 BF16)") == 1
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    # A queue that is gone drops the line, not the run.
    dead = _epoch_lines_callback(None)
    dead.after_report(None, [m], None)
