"""The search spaces of the trainable models, in one place, as Optuna define-by-run functions.

Every tunable setting is a `Param`: a fixed value, a list of choices, or an int/float range
(optionally log-scaled). `DEFAULT_SPACE` holds the editable defaults; `--space-override
KEY=VALUE` or a YAML/JSON file replaces entries, and `SearchSpace.from_overrides` checks them
(known key, well-formed range, every value accepted by the model's config) before any trial.

Conditional parameters are expressed the Optuna way: a parameter is only suggested where it
means something, so TPE never models nonsense combinations.
- `n_latent` is drawn from 0..max when a named dimension is on, but as `n_latent_alone` from
  1..max when none is (the model needs at least one dimension);
- `aux_weight` (λ) exists only when a named dimension is on: it weighs their anchors;
- `tau` (the soft maximum's temperature) only with `combine=max`, and `separation` (the penalty
  keeping the dimensions' user vectors apart) only where each dimension has one (max, mixture).
With every named dimension off and `max_latent` 0 (and `combine=max`), the space is the backbone
alone: the decomposer's base readout, the row the dimensions are measured against.
Fixed parameters are not suggested at all; they come back as constants of the trial.

The baselines (`sasrec`, `gru4rec`, `lstm`) have flat spaces of their own in `MODEL_SPACES`. Every
space fixes the same recipe options (`RECIPE`: the seen-item mask and the weight average), so an
equal trial budget buys each model the same kind of search: its size, dropout, lr and window.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator

from models.nn import checkpoint
from models.nn.backbones import BACKBONES
from models.nn.decomposer import COMBINES, NAMED_DIMENSIONS

Scalar = Union[bool, int, float, str, None]


class SpaceError(ValueError):
    """A search-space override that cannot be used; raised before any trial runs."""


class Range(BaseModel):
    """A numeric interval; ints if both ends are ints. `step` only for linear float ranges."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("a log range cannot have a step")
        return self

    def is_int(self) -> bool:
        return float(self.low).is_integer() and float(self.high).is_integer() and self.step in (None, 1)

    def ends(self) -> list:
        return [int(self.low), int(self.high)] if self.is_int() else [self.low, self.high]


Param = Union[Range, list, Scalar]  # a range, a list of choices, or a fixed value

# Editable defaults. Ranges stay where an ml-latest-small epoch remains affordable on CPUs.
DEFAULT_SPACE: dict[str, Param] = {
    "backbone": "lstm",  # the seed's; [lstm, gru, transformer] lets the search choose
    "lstm_units": Range(low=32, high=512, log=True),
    "use_topic": [True, False],
    "use_sentiment": [True, False],
    "use_time": [True, False],
    "max_latent": 4,  # upper end of the latent count (fixed)
    "dim_size": [8, 16, 32, 64],  # d
    "combine": ["max", "mixture", "concat"],  # how the dimensions rank (models/nn/decomposer.py)
    "tau": Range(low=0.25, high=2.0, log=True),  # the soft maximum's temperature, only with combine=max
    "separation": Range(low=0.0, high=1.0, step=0.05),  # only with per-dimension vectors (max, mixture)
    "aux_weight": Range(low=0.0, high=1.0, step=0.05),  # λ, only when a named dimension is on
    "dropout": Range(low=0.0, high=0.5, step=0.05),
    "lr": Range(low=1e-3, high=3e-2, log=True),
    "max_len": [50, 100, 200],
    "fail_at_epoch": None,  # testing only: a trial's training worker dies before reporting this epoch
    "ema_decay": 0.98,  # the weight average (RECIPE), fixed; mask_seen is on in the decomposer's config
}
MODEL_KEYS = ("backbone", "lstm_units", "dim_size", "combine", "tau", "separation", "aux_weight", "dropout", "max_len")
# What every model's search keeps fixed, so no model gets a recipe option another lacks.
RECIPE: dict[str, Param] = {"mask_seen": True, "ema_decay": 0.98}
TRAIN_KEYS = ("lr", "ema_decay", "fail_at_epoch")  # settings of the training run, not of the model
DROPOUT = Range(low=0.0, high=0.5, step=0.05)
WINDOW = [50, 100, 200]
# The baselines: flat spaces over their own configs (models/nn/baselines.py), the same recipe fixed.
MODEL_SPACES: dict[str, dict[str, Param]] = {
    "decomposer": DEFAULT_SPACE,
    "sasrec": {
        "hidden": [32, 64, 128],
        "blocks": [1, 2, 3],
        "dropout": DROPOUT,
        "lr": Range(low=3e-4, high=1e-2, log=True),
        "max_len": WINDOW,
        **RECIPE,
        "fail_at_epoch": None,
    },
    "gru4rec": {
        "hidden": Range(low=32, high=512, log=True),
        "item_dim": [32, 64, 128],
        "dropout": DROPOUT,
        "lr": Range(low=1e-3, high=3e-2, log=True),
        "max_len": WINDOW,
        **RECIPE,
        "fail_at_epoch": None,
    },
    "lstm": {
        "lstm_units": Range(low=32, high=512, log=True),
        "item_dim": [32, 64, 128],
        "dropout": DROPOUT,
        "lr": Range(low=1e-3, high=3e-2, log=True),
        "max_len": WINDOW,
        **RECIPE,
        "fail_at_epoch": None,
    },
}
INT_KEYS = ("lstm_units", "dim_size", "max_len", "hidden", "blocks", "item_dim", "heads")
CHOICE_KEYS = {"combine": COMBINES, "backbone": BACKBONES}  # the decomposer's settings that are names


def parse_param(key: str, raw: Any) -> Param:
    """A YAML/JSON value -> Param: mapping = range, list = choices, anything else = fixed."""
    try:
        if isinstance(raw, dict):
            return Range(**raw)
    except (ValidationError, TypeError) as e:
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise SpaceError(f"space {key}: bad range {raw!r}: {msg}") from None
    if isinstance(raw, list):
        if not raw:
            raise SpaceError(f"space {key}: an empty list of choices")
        if any(isinstance(v, (dict, list)) for v in raw):
            raise SpaceError(f"space {key}: choices must be plain values, got {raw!r}")
        return list(raw)
    return raw


class SearchSpace:
    """The parameters of a search and the define-by-run function over them."""

    def __init__(self, params: dict[str, Param], model: str = "decomposer"):
        if model not in MODEL_SPACES:
            raise SpaceError(f"model {model!r}: no search space; choose from {', '.join(MODEL_SPACES)}")
        self.params, self.model = params, model
        self.check()

    # ---- building from defaults and overrides --------------------------------------------
    @classmethod
    def from_overrides(cls, pairs: list[str] = (), files: list[Path] = (), model: str = "decomposer") -> "SearchSpace":
        """Defaults, then each file (YAML or JSON mapping), then each KEY=VALUE (value read as YAML).

        Keys of the model's config that its default space leaves out may be fixed too (a baseline's
        `use_text=true`); they must be settings the model accepts.
        """
        if model not in MODEL_SPACES:
            raise SpaceError(f"model {model!r}: no search space; choose from {', '.join(MODEL_SPACES)}")
        params = dict(MODEL_SPACES[model])
        for f in files:
            for key, raw in read_override_file(Path(f)).items():
                params[check_key(key, f"{f}: ", model)] = parse_param(key, raw)
        for pair in pairs:
            key, sep, text = pair.partition("=")
            key = key.strip()
            if not sep or not key:
                raise SpaceError(f"--space-override {pair!r}: expected KEY=VALUE")
            try:
                raw = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError as e:
                raise SpaceError(f"--space-override {key}: cannot read {text!r} ({e.problem})") from None
            params[check_key(key, "--space-override ", model)] = parse_param(key, raw)
        return cls(params, model)

    def check(self) -> None:
        """Every value the space can produce is one the model and the trainer accept."""
        from ray_app.train.data import SetupError
        from ray_app.train.settings import check_model_args

        if self.model != "decomposer":
            return self._check_flat()
        for key, p in self.params.items():
            values = p.ends() if isinstance(p, Range) else p if isinstance(p, list) else [p]
            for v in values:
                if key in MODEL_KEYS:
                    try:
                        check_model_args("decomposer", {key: v})
                    except SetupError as e:
                        raise SpaceError(f"space {key}={v!r}: {str(e).removeprefix('--set: ')}") from None
                    if isinstance(v, bool) or (key not in CHOICE_KEYS and not isinstance(v, (int, float))):
                        raise SpaceError(f"space {key}={v!r}: expected a number")
                    if key in CHOICE_KEYS and v not in CHOICE_KEYS[key]:
                        raise SpaceError(f"space {key}={v!r}: choose from {', '.join(CHOICE_KEYS[key])}")
                    if key == "tau" and v <= 0:
                        raise SpaceError(f"space tau={v!r}: must be > 0")
                    if key in ("lstm_units", "dim_size", "max_len") and (v < 1 or int(v) != v):
                        raise SpaceError(f"space {key}={v!r}: must be a positive integer")
                    if key == "dropout" and not 0 <= v < 1:
                        raise SpaceError(f"space dropout={v!r}: must be in [0, 1)")
                    if key in ("aux_weight", "separation") and v < 0:
                        raise SpaceError(f"space {key}={v!r}: must be >= 0")
                elif key.startswith("use_") and not isinstance(v, bool):
                    raise SpaceError(f"space {key}={v!r}: expected true or false")
                elif key == "lr" and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                    raise SpaceError(f"space lr={v!r}: must be a positive number")
                elif key == "max_latent" and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 16):
                    raise SpaceError(f"space max_latent={v!r}: must be an integer in 0..16")
                elif (
                    key == "fail_at_epoch"
                    and v is not None
                    and (isinstance(v, bool) or not isinstance(v, int) or v < 1)
                ):
                    raise SpaceError(f"space fail_at_epoch={v!r}: must be null or an epoch >= 1")
                elif key == "ema_decay" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1):
                    raise SpaceError(f"space ema_decay={v!r}: must be in [0, 1)")
        if isinstance(self.params["max_latent"], (list, Range)):
            raise SpaceError("space max_latent: must be a fixed number (it bounds n_latent)")
        if (
            self.params["max_latent"] == 0
            and any(False in self.values(f"use_{d}") for d in NAMED_DIMENSIONS)
            and self.values("combine") != ["max"]
        ):
            raise SpaceError(
                "space: max_latent is 0 but every named dimension can be off; the model needs a dimension "
                "(fix one use_* to true, raise max_latent, or fix combine=max for the backbone alone)"
            )

    def _check_flat(self) -> None:
        """A baseline's space: model keys are what its config accepts, the rest training settings."""
        from ray_app.train.data import SetupError
        from ray_app.train.settings import check_model_args

        for key, p in self.params.items():
            values = p.ends() if isinstance(p, Range) else p if isinstance(p, list) else [p]
            for v in values:
                if key == "lr" and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                    raise SpaceError(f"space lr={v!r}: must be a positive number")
                elif key == "ema_decay" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1):
                    raise SpaceError(f"space ema_decay={v!r}: must be in [0, 1)")
                elif (
                    key == "fail_at_epoch"
                    and v is not None
                    and (isinstance(v, bool) or not isinstance(v, int) or v < 1)
                ):
                    raise SpaceError(f"space fail_at_epoch={v!r}: must be null or an epoch >= 1")
                elif key not in TRAIN_KEYS:
                    if key in INT_KEYS and (
                        isinstance(v, bool) or not isinstance(v, (int, float)) or v < 1 or int(v) != v
                    ):
                        raise SpaceError(f"space {key}={v!r}: must be a positive integer")
                    hint = typing.get_type_hints(checkpoint.MODELS[self.model][0])[key]
                    try:
                        TypeAdapter(hint).validate_python(v)
                    except ValidationError as e:
                        raise SpaceError(f"space {key}={v!r}: {e.errors()[0]['msg']}") from None
                    try:
                        check_model_args(self.model, {key: int(v) if key in INT_KEYS else v})
                    except SetupError as e:
                        raise SpaceError(f"space {key}={v!r}: {str(e).removeprefix('--set: ')}") from None

    def values(self, key: str) -> list:
        p = self.params[key]
        return p.ends() if isinstance(p, Range) else p if isinstance(p, list) else [p]

    # ---- the define-by-run function ------------------------------------------------------
    def suggest(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: suggest the free parameters on `trial` -> the fixed ones as constants.

        The trial's full parameter set is `trial.params` plus what this returns (OptunaSearch merges them).
        """
        fixed: dict[str, Any] = {"model": self.model}

        def draw(name: str, key: str | None = None) -> Any:
            p = self.params[key or name]
            if isinstance(p, Range):
                if p.is_int():
                    return trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
                return trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
            if isinstance(p, list):
                return p[0] if len(p) == 1 else trial.suggest_categorical(name, p)
            fixed[name] = p
            return p

        if self.model != "decomposer":
            for key in self.params:
                draw(key)
            return fixed
        on = [d for d in NAMED_DIMENSIONS if draw(f"use_{d}")]
        top = self.params["max_latent"]
        low = 0 if on or top == 0 else 1  # no named dimension and no latent one: the backbone alone
        name = "n_latent" if on else "n_latent_alone"  # two names: two different ranges
        if top > low:
            trial.suggest_int(name, low, top)
        else:
            fixed[name] = low
        if on:
            draw("aux_weight")
        combine = draw("combine")
        if combine == "max":
            draw("tau")
        if combine in ("max", "mixture"):
            draw("separation")
        for key in ("backbone", "lstm_units", "dim_size", "dropout", "lr", "max_len", "fail_at_epoch", "ema_decay"):
            draw(key)
        return fixed


def check_key(key: str, where: str, model: str = "decomposer") -> str:
    if key in MODEL_SPACES[model]:
        return key
    if model != "decomposer":
        fields = [f.name for f in dataclasses.fields(checkpoint.MODELS[model][0]) if f.init and f.name != "n_items"]
        if key in fields:
            return key  # a config setting the default space leaves at its default
        choices = sorted(set(MODEL_SPACES[model]) | set(fields))
    else:
        choices = list(DEFAULT_SPACE)
    of = "" if model == "decomposer" else f" of {model}"
    raise SpaceError(f"{where}{key}: not a search-space parameter{of}; choose from {', '.join(choices)}")


def read_override_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise SpaceError(f"--space-file {path}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpaceError(
            f"--space-file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})"
        ) from None
    if not isinstance(data, dict):
        raise SpaceError(f"--space-file {path}: expected a mapping of parameter -> value, got {type(data).__name__}")
    return data


def trial_settings(params: dict[str, Any]) -> tuple[dict, dict]:
    """A trial's flat parameters -> (model config overrides, training overrides).

    `params["model"]` names the model (absent in searches recorded before baselines were searched:
    the decomposer).
    """
    model = params.get("model", "decomposer")
    train = {
        "lr": float(params["lr"]),
        "fail_at_epoch": params.get("fail_at_epoch"),
        "ema_decay": None if params.get("ema_decay") is None else float(params["ema_decay"]),
    }
    if model != "decomposer":
        model_args = {
            k: (int(v) if k in INT_KEYS else v)
            for k, v in params.items()
            if k not in (*TRAIN_KEYS, "model", "optuna_trial")
        }
        return model_args, train
    dims = tuple(d for d in NAMED_DIMENSIONS if params.get(f"use_{d}"))
    model_args = {"dims": dims, "n_latent": int(params.get("n_latent", params.get("n_latent_alone", 0)))}
    for key in MODEL_KEYS:
        if key in params:
            model_args[key] = params[key]
    if not dims:
        model_args["aux_weight"] = 0.0  # nothing to anchor
    for key in ("lstm_units", "dim_size", "max_len"):
        model_args[key] = int(model_args[key])
    return model_args, train


def dimension_set(params: dict[str, Any]) -> str:
    """A label such as 'topic+time+2 latent', for tables and the dimension-set plot (a baseline: its name)."""
    if params.get("model", "decomposer") != "decomposer":
        return params["model"]
    model_args, _ = trial_settings(params)
    parts = list(model_args["dims"]) + ([f"{model_args['n_latent']} latent"] if model_args["n_latent"] else [])
    return "+".join(parts) or "backbone alone"
