"""Ray Tune + Optuna search: the space and its overrides, bad input, a real search with a crashing trial, resume."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
from conftest import local_ray

from models.nn import checkpoint
from tuning.results import random_param_space
from tuning.search import main
from tuning.space import SearchSpace, SpaceError, trial_settings

# Tiny models; seed 1 makes the first trial crash (its worker dies before epoch 1) and the second train.
SEARCH = (
    "--num-samples",
    "2",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--seed",
    "1",
    "--num-cpus",
    "2",
    "--space-override",
    "lstm_units=[8, 16]",
    "--space-override",
    "dim_size=8",
    "--space-override",
    "max_len=8",
    "--space-override",
    "fail_at_epoch=[null, 1]",
)


@pytest.fixture(scope="module")
def cluster():
    with local_ray():
        yield


def study(run_dir) -> optuna.Study:
    return optuna.load_study(study_name=run_dir.name, storage=f"sqlite:///{run_dir / 'optuna.db'}")


# ---- the space ----------------------------------------------------------------------------------


def draw(space: SearchSpace, seed: int = 0) -> dict:
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    fixed = space.suggest(trial)
    return {**trial.params, **fixed}


def test_conditional_parameters_exist_only_where_they_mean_something():
    none_named = SearchSpace.from_overrides(["use_topic=false", "use_sentiment=false", "use_time=false"])
    for seed in range(5):
        p = draw(none_named, seed)
        assert "aux_weight" not in p and "n_latent" not in p and 1 <= p["n_latent_alone"] <= 4
        model_args, _ = trial_settings(p)
        assert model_args["dims"] == () and model_args["aux_weight"] == 0.0
    topic = SearchSpace.from_overrides(["use_topic=true"])
    p = draw(topic)
    assert "aux_weight" in p and 0 <= p["n_latent"] <= 4 and "n_latent_alone" not in p
    assert trial_settings(p)[0]["dims"][0] == "topic"


def test_overrides_from_flags_and_files(tmp_path):
    (tmp_path / "s.yaml").write_text("lstm_units: {low: 16, high: 64, log: true}\ncombine: sum\n")
    (tmp_path / "s.json").write_text(json.dumps({"dim_size": [4, 8]}))
    space = SearchSpace.from_overrides(["max_len=30"], [tmp_path / "s.yaml", tmp_path / "s.json"])
    for seed in range(5):
        p = draw(space, seed)
        assert 16 <= p["lstm_units"] <= 64 and p["combine"] == "sum" and p["dim_size"] in (4, 8) and p["max_len"] == 30
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpaceError, match="list.yaml: expected a mapping"):
        SearchSpace.from_overrides([], [tmp_path / "list.yaml"])


def test_random_search_draws_from_the_same_conditional_space():
    space = SearchSpace.from_overrides(["use_topic=false", "use_sentiment=false", "use_time=false", "lr=0.01"])
    draw_a, draw_b = (random_param_space(space, seed=7)["params"].func for _ in range(2))
    first = [draw_a(None) for _ in range(4)]
    assert first == [draw_b(None) for _ in range(4)]  # seeded
    assert len({p["lstm_units"] for p in first}) > 1  # and random
    for p in first:
        assert "aux_weight" not in p and p["n_latent_alone"] >= 1 and p["lr"] == 0.01


def test_every_model_searches_with_the_same_recipe_fixed():
    decomposer = draw(SearchSpace.from_overrides())
    sasrec = draw(SearchSpace.from_overrides(["use_text=true", "use_events=true"], model="sasrec"), seed=3)
    assert decomposer["model"] == "decomposer" and sasrec["model"] == "sasrec"
    assert decomposer["ema_decay"] == sasrec["ema_decay"] == 0.98 and sasrec["mask_seen"] is True
    model_args, train = trial_settings(sasrec)
    assert model_args["use_text"] is True and model_args["mask_seen"] is True and model_args["blocks"] in (1, 2, 3)
    assert "lr" not in model_args and "ema_decay" not in model_args and train["ema_decay"] == 0.98
    assert isinstance(model_args["max_len"], int) and 3e-4 <= train["lr"] <= 1e-2
    assert trial_settings(decomposer)[1]["ema_decay"] == 0.98


@pytest.mark.parametrize(
    "model, override, message",
    [
        ("sasrec", "dim_size=8", "dim_size: not a search-space parameter of sasrec; choose from blocks"),
        ("sasrec", "blocks=0", "blocks=0: must be a positive integer"),
        ("gru4rec", "ema_decay=1.5", "ema_decay=1.5: must be in \\[0, 1\\)"),
        ("lstm", "use_text=maybe", "use_text='maybe': Input should be a valid boolean"),
        ("knn", "lr=0.1", "model 'knn': no search space"),
    ],
)
def test_bad_baseline_spaces_are_named(model, override, message):
    with pytest.raises(SpaceError, match=message):
        SearchSpace.from_overrides([override], model=model)


@pytest.mark.parametrize(
    "override, message",
    [
        ("units=64", "units: not a search-space parameter; choose from backbone, lstm_units"),
        ("lstm_units={low: 64, high: 32}", "low 64 is above high 32"),
        ("lr={low: 0, high: 0.1, log: true}", "a log range needs low > 0"),
        ("combine=[concat, maximum]", "combine must be one of max, concat, sum, mixture"),
        ("dropout=1.5", "dropout=1.5: must be in \\[0, 1\\)"),
        ("dim_size=0", "dim_size=0: must be a positive integer"),
        ("use_time=sometimes", "use_time='sometimes': expected true or false"),
        ("max_latent=0", "max_latent is 0 but every named dimension can be off"),
        ("lstm_units", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(SpaceError, match=message):
        SearchSpace.from_overrides([override])


# ---- bad input stops before any trial --------------------------------------------------------------


def test_bad_input_fails_before_trials(tiny_data, tmp_path, capsys):
    base = ["--dataset", str(tiny_data.path), "--storage-path", str(tmp_path)]
    assert main([*base, "--name", "zero", "--num-samples", "0"]) == 2
    assert "--num-samples must be at least 1, got 0" in capsys.readouterr().err
    assert main([*base, "--name", "bad", "--space-override", "lstm_units=many"]) == 2
    assert "space lstm_units='many'" in capsys.readouterr().err
    assert main([*base, "--name", "db", "--optuna-storage", f"sqlite:///{tmp_path}/no/such/dir/x.db"]) == 2
    assert "--optuna-storage sqlite:///" in (err := capsys.readouterr().err) and "cannot open it" in err
    assert main([*base, "--name", "pw", "--optuna-storage", "postgresql://tuner:secret@127.0.0.1:1/optuna"]) == 2
    assert "cannot open it" in (err := capsys.readouterr().err) and "secret" not in err
    assert main([*base, "--name", "rnd", "--sampler", "random", "--optuna-storage", "sqlite:///x.db"]) == 2
    assert "only --sampler tpe keeps an Optuna study" in capsys.readouterr().err
    assert main(["--dataset", str(tmp_path / "nowhere"), "--storage-path", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not list(tmp_path.glob("*/trials")) and not list(tmp_path.glob("*/session-*"))  # nothing ran


# ---- a real search ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searched(cluster, tiny_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("tune")
    assert main(["--dataset", str(tiny_data.path), "--storage-path", str(storage), "--name", "s", *SEARCH]) == 0
    return storage / "s"


def test_search_writes_every_output_and_survives_a_crashed_trial(searched):
    table = pd.read_parquet(searched / "results.parquet")
    assert len(table) == 2 and sorted(table["status"]) == ["failed", "ok"]
    failed, ok = table[table["status"] == "failed"].iloc[0], table[table["status"] == "ok"].iloc[0]
    assert failed["error"] and failed["param_fail_at_epoch"] == 1
    assert ok["epochs"] >= 1 and 0 < ok["best_valid_ndcg@10"] <= 1
    assert len(pd.read_csv(searched / "results.csv")) == 2
    states = sorted(t.state.name for t in study(searched).trials)
    assert states == ["COMPLETE", "FAIL"]  # the crash is recorded in the study too

    best = json.loads((searched / "best_config.json").read_text())
    assert best["trial_id"] == ok["trial_id"] and best["value"] == pytest.approx(ok["best_valid_ndcg@10"])
    model, meta = checkpoint.load(best["model"])  # what serving loads
    assert model.cfg.lstm_units == best["model_args"]["lstm_units"] == best["params"]["lstm_units"]
    assert meta["metrics"]["valid_ndcg@10"] == pytest.approx(best["value"])
    for png in ("optimization_history", "dimension_sets"):
        assert (searched / "plots" / f"{png}.png").stat().st_size > 1000


def test_resume_continues_the_same_study(searched, tiny_data, capsys):
    before = pd.read_parquet(searched / "results.parquet")
    study(searched).ask()  # a trial left RUNNING, as by an interrupted session
    args = ["--dataset", str(tiny_data.path), "--storage-path", str(searched.parent), "--name", "s", *SEARCH]
    assert main([*args, "--num-samples", "4"]) == 0
    assert "3 trial(s) done before, 1 to run" in capsys.readouterr().out
    after = pd.read_parquet(searched / "results.parquet")
    assert len(after) == 3 and set(before["trial_id"]) < set(after["trial_id"])
    trials = study(searched).trials
    assert [t.number for t in trials] == [0, 1, 2, 3] and trials[2].state.name == "FAIL"  # interrupted -> failed
    assert after["optuna_trial"].tolist()[-1] == 3
    assert main([*args, "--num-samples", "4"]) == 0  # the study is complete: nothing runs
    assert "4 trial(s) done before, 0 to run" in capsys.readouterr().out
    assert len(pd.read_parquet(searched / "results.parquet")) == 3


def test_a_baseline_is_searched_the_same_way(cluster, tiny_data, tmp_path):
    args = [
        "--dataset",
        str(tiny_data.path),
        "--storage-path",
        str(tmp_path),
        "--name",
        "g",
        "--model",
        "gru4rec",
        "--protocol",
        "last10",
        "--num-samples",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--num-cpus",
        "2",
        "--space-override",
        "hidden=8",
        "--space-override",
        "item_dim=8",
        "--space-override",
        "max_len=8",
    ]
    assert main(args) == 0
    best = json.loads((tmp_path / "g" / "best_config.json").read_text())
    assert best["model_kind"] == "gru4rec" and best["train"]["protocol"] == "last10"
    assert best["model_args"]["hidden"] == 8 and best["model_args"]["mask_seen"] is True
    model, meta = checkpoint.load(best["model"])
    assert type(model).__name__ == "GRU4Rec" and model.cfg.hidden == 8 and model.cfg.mask_seen
    assert meta["protocol"] == "last10"
