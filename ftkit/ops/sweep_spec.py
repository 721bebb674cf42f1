"""The `[sweep]` file: its schema (pydantic, like the recipe's), reading it with its base recipe, and
errors that name the sweep file and the key.


```toml
[sweep]
recipe = "quickstart.toml"    # the base recipe (or put its sections in this file)
method = "grid"               # grid | random
trials = 8                    # random: how many points
seed = 0                      # random: the draw
metric = "valid.loss"         # <kind>.<key> of the run's metrics.jsonl: valid.loss, train.loss, valid.<task metric>
goal = "minimize"             # or maximize
summary = "last"              # last | best: the metric's last value in each run, or its best
parallel = 1                  # trials at a time; on a machine with GPUs each trial is pinned to one
output_dir = "runs/lr-sweep"  # trial-000/, trial-001/ ... (each a run folder) and results.csv / results.json

[sweep.parameters]
"train.lr" = [1e-4, 3e-4, 1e-3]                               # values (grid or random)
"train.warmup" = { min = 0.0, max = 0.1 }                      # random only: uniform, log_uniform or int_uniform
[[sweep.paired]]                                               # values that vary together, position by position
"method.rank" = [4, 8, 16]
"method.alpha" = [8, 16, 32]
```
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ftkit.common.errors import FtkitError, RecipeError
from ftkit.common.suggest import did_you_mean
from ftkit.recipe.load import resolve_paths

Distribution = Literal["uniform", "log_uniform", "int_uniform"]


def _recipe_key(name: str) -> str:
    if "." not in name:
        raise PydanticCustomError("recipe_key", 'name a recipe key as SECTION.KEY, e.g. "train.lr"')
    return name


class _Table(BaseModel):
    # TOML gives typed values: "8" is not a count, true is not a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class Range(_Table):
    """A random sweep's parameter drawn between two numbers: { min, max, distribution }."""

    min: float
    max: float
    distribution: Distribution = "uniform"

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise PydanticCustomError("range", "needs min <= max")
        if self.distribution == "log_uniform" and self.min <= 0:
            raise PydanticCustomError("range", "log_uniform needs min > 0")
        return self

    def draw(self, rng: random.Random) -> float | int:
        if self.distribution == "log_uniform":
            return math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
        if self.distribution == "int_uniform":
            return rng.randint(int(self.min), int(self.max))
        return rng.uniform(self.min, self.max)


class Values(_Table):
    """{ values = [...] }: the same as the bare list."""

    values: list[Any] = Field(min_length=1)


SPEC_KEYS = ("values", *Range.model_fields)


def _spec_kind(value: Any) -> str | None:
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "values-table" if "values" in value else "range-table"
    return None


# Parts of an error's location that name a union member or a dict key, not a key the user wrote.
_LOC_NOISE = {"[key]", "list", "values-table", "range-table"}


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`"train.lr" = [...]` or `[sweep.parameters.train] lr = [...]`, both as {"train.lr": spec}."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and value and not set(SPEC_KEYS) & set(value):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


RecipeKey = Annotated[str, AfterValidator(_recipe_key)]


ParamSpec = Annotated[
    Annotated[list[Any], Field(min_length=1), Tag("list")] | Annotated[Values, Tag("values-table")]
    | Annotated[Range, Tag("range-table")],
    Discriminator(_spec_kind, custom_error_type="param_spec",
                  custom_error_message="give a list of values, or a { min, max } range (random only)"),
]


class SweepSection(_Table):
    """[sweep]: the base recipe, the search space, how to pick its points and how to rank the trials."""

    recipe: str | None = None
    method: Literal["grid", "random"] = "grid"
    trials: int | None = Field(None, ge=1)
    seed: int = 0
    metric: str = "valid.loss"
    goal: Literal["minimize", "maximize"] = "minimize"
    summary: Literal["last", "best"] = "last"
    parallel: int = Field(1, ge=1)
    gpus: list[str] | None = None
    output_dir: str | None = None
    backend: Literal["auto", "torch", "mlx"] = "auto"
    parameters: dict[RecipeKey, ParamSpec] = Field(default_factory=dict)
    paired: list[dict[RecipeKey, list[Any]]] = Field(default_factory=list)

    @field_validator("parameters", mode="before")
    @classmethod
    def _nested_parameters(cls, v: Any) -> Any:
        return _flatten(v) if isinstance(v, dict) else v

    @field_validator("paired", mode="before")
    @classmethod
    def _groups(cls, v: Any) -> Any:
        groups = [v] if isinstance(v, dict) else v  # one [sweep.paired] table, or [[sweep.paired]] tables
        return [_flatten(g) if isinstance(g, dict) else g for g in groups] if isinstance(groups, list) else v

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_ids(cls, v: Any) -> Any:
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            v = str(v).split(",")  # gpus = "0,1" or gpus = 3, as CUDA_VISIBLE_DEVICES writes them
        return [str(g).strip() for g in v] if isinstance(v, list) else v

    @field_validator("metric")
    @classmethod
    def _kind_key(cls, v: str) -> str:
        if "." not in v:
            raise PydanticCustomError("metric", 'name it KIND.KEY, e.g. "valid.loss"')
        return v


SWEEP_KEYS = tuple(SweepSection.model_fields)


@dataclass
class Sweep:
    name: str
    file: Path
    base: dict[str, Any]      # the base recipe's data, paths resolved
    base_where: str
    method: str
    parameters: dict[str, list[Any] | Range]   # a list of values, or a range to draw from
    paired: list[dict[str, list[Any]]]
    trials_n: int | None
    seed: int
    metric: str
    goal: str
    summary: str
    parallel: int
    gpus: list[str] | None
    output_dir: Path
    backend: str

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "minimize" else a > b


# Where a value given on the command line came from, for its error message.
_FLAGS = {"parallel": "--parallel", "output_dir": "--out", "backend": "--backend"}


_HINTS = {"method": " For W&B's bayes: ftkit sweep --wandb-agent."}


def _key(loc: list[Any]) -> str:
    """sweep.method, sweep.parameters."train.lr".min, sweep.paired group 2."method.rank"."""
    out = "sweep"
    for part in loc:
        if isinstance(part, int):
            out += f" group {part + 1}"
        else:
            out += "." + (json.dumps(part, ensure_ascii=False) if "." in part else part)
    return out


def _problem(e: Any, where: str, given: dict[str, Any]) -> str:
    """One pydantic error as a sentence naming the sweep file (or the option that gave the value) and the key."""
    loc = [p for p in e["loc"] if p not in _LOC_NOISE]
    key = _key(loc)
    place = f"{where} ({_FLAGS[loc[0]]})" if loc and loc[0] in given and loc[0] in _FLAGS else where
    if e["type"] == "extra_forbidden":
        options = SWEEP_KEYS if len(loc) == 1 else SPEC_KEYS
        return f"{place}: unknown key {key}.{did_you_mean(str(loc[-1]), options)} Allowed: {', '.join(options)}."
    if e["type"] == "missing":
        return f"{place}: {key}: required key is missing."
    return f"{place}: {key}: {e['msg']} (got {e.get('input')!r}).{_HINTS.get(str(loc[0]) if loc else '', '')}"


def _problems(err: ValidationError, where: str, given: dict[str, Any]) -> list[str]:
    return [_problem(e, where, given) for e in err.errors()]


def _space_problems(s: SweepSection, where: str, need_space: bool) -> list[str]:
    """What no single key shows: ranges in a grid, a random draw without a count, paired lists of different lengths."""
    problems = []
    if s.method == "grid":
        problems += [f"{where}: {_key(['parameters', name])}: a grid needs a list of values; min/max ranges are for "
                     'method = "random".' for name, spec in s.parameters.items() if isinstance(spec, Range)]
    if s.method == "random" and s.trials is None:
        problems.append(f'{where}: method = "random" needs sweep.trials, the number of points to draw (e.g. trials = 8).')
    for i, group in enumerate(s.paired):
        lengths = {len(v) for v in group.values()}
        if len(lengths) != 1 or 0 in lengths:  # an empty group too: it has no position to pair
            problems.append(f"{where}: sweep.paired group {i + 1}: every key needs a list of values, all of one length "
                            f"(got {', '.join(f'{k}: {len(v)}' for k, v in group.items()) or 'no keys'}).")
        problems += [f"{where}: {k} is both in sweep.parameters and in sweep.paired; keep one." for k in group if k in s.parameters]
    if not s.parameters and not s.paired and need_space:
        problems.append(f"{where}: the sweep has no parameters: add [sweep.parameters] (or [[sweep.paired]]).")
    return problems


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FtkitError(f"{path}: no such {what}.")
    try:  # TOML is UTF-8 whatever the locale says
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FtkitError(f"{path}: not valid TOML: {e}") from None


def _base_recipe(path: Path, recipe: str | None, inline: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The base recipe's data (paths resolved, the sweep file's own sections over its keys) and its file."""
    resolve_paths(inline, path.parent.resolve())
    if recipe is None:
        inline.setdefault("name", path.stem)
        return inline, str(path)
    base_file = (path.parent / recipe).resolve()
    if not base_file.is_file():
        raise FtkitError(f"{path}: sweep.recipe: {base_file} does not exist; name a recipe file, relative to the sweep file.")
    base = _read_toml(base_file, "recipe file")
    resolve_paths(base, base_file.parent)
    for section, values in inline.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section].update(values)
        else:
            base[section] = values
    base.setdefault("name", base_file.stem)
    return base, str(base_file)


def load_sweep(path: Path, overrides: dict[str, Any] | None = None, need_space: bool = True) -> Sweep:
    """The sweep file, checked whole. `need_space` False: a W&B sweep gives the values (--wandb-agent)."""

    path = Path(path)
    where = str(path)
    data = _read_toml(path, "sweep file")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    raw = data.pop("sweep", {})
    if not isinstance(raw, dict):
        raise RecipeError([f"{where}: sweep = {raw!r}; the sweep's settings are a [sweep] table."])
    try:
        s = SweepSection.model_validate({**raw, **given})
    except ValidationError as e:
        raise RecipeError(_problems(e, where, given)) from None
    base, base_where = _base_recipe(path, s.recipe, data)
    problems = _space_problems(s, where, need_space)
    if problems:
        raise RecipeError(problems)
    name = path.stem
    out = Path(s.output_dir) if s.output_dir else Path("runs") / name
    if s.output_dir and not out.is_absolute() and "output_dir" not in given:
        out = path.parent / out  # relative to the sweep file; --out to the working directory
    params = {k: spec.values if isinstance(spec, Values) else spec for k, spec in s.parameters.items()}
    return Sweep(name=name, file=path, base=base, base_where=base_where, method=s.method, parameters=params, paired=s.paired,
                 trials_n=s.trials, seed=s.seed, metric=s.metric, goal=s.goal, summary=s.summary, parallel=s.parallel,
                 gpus=s.gpus, output_dir=out.resolve(), backend=s.backend)
