"""Sweep specs: what `lrft sweep SPEC.yaml` searches, and the names, overrides and commands of its points.

A spec names a base recipe (a path relative to the spec) and overrides of it, a search space over
dotted recipe keys (a list: a grid of values; `{low, high[, log][, step]}`: a range to sample), the
objective (a metric of the task and its direction), the sampler, the seeds each point trains with, a
budget, a pruner and an optional confirmation of the best points with more seeds. It is validated
like a recipe (every problem at once, did-you-mean on unknown keys), then resolved into a `Sweep`:
the base recipe, the sweep dir `<output.dir>/<name>/`, and for each point (a value of every searched
key) its plain name (`lr1e-2_rank8`), one run dir per seed (`lr1e-2_rank8_s42`) and the `lrft train`
command of each run, which is exactly what the sweep trains itself.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lrft.config.names import is_plain_name, plain_name_problem
from lrft.config.overrides import dotted_pop
from lrft.config.problems import validated
from lrft.config.sections import Section
from lrft.config.yaml_files import flow_yaml, parse_yaml
from lrft.data import DATA_DIR_ENV, get_task
from lrft.errors import ConfigError, LrftError, did_you_mean
from lrft.recipe import Recipe, load_recipe
from lrft.sweep.storage import DEFAULT_FILE, STORAGE_ENV, check_url

# Recipe keys a sweep sets itself for every run, and where a spec says what they should be.
OWN_KEYS = {
    "seed": "list the seeds under seeds:",
    "name": "the sweep names its runs <point>_s<seed>",
    "output.dir": "set output.dir under overrides: (runs go to <output.dir>/<sweep name>/)",
}
MINIMISED = ("loss", "perplexity")  # the metrics a sweep minimises by default; the others it maximises
# metrics shown as they are; the others (fractions) in points, ×100
SCALELESS = (*MINIMISED, "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "logps/rejected")
RANGE_POINTS = 64  # how many points of a sampled space `check` validates (its corners)


class SearchDim(Section):
    """One searched key: a list of values (a grid), or a range to sample from."""

    values: list[Any] | None = Field(None, min_length=1, description="the values to try")
    low: int | float | None = Field(None, description="a range's lower end")
    high: int | float | None = Field(None, description="a range's upper end")
    log: bool = Field(False, description="sample the range on a log scale")
    step: int | float | None = Field(None, gt=0, description="sample the range on a grid of this step")

    @model_validator(mode="before")
    @classmethod
    def _a_list_is_a_grid(cls, data):
        return {"values": data} if isinstance(data, list) else data

    @field_validator("values")
    @classmethod
    def _yaml11_numbers(cls, values):
        return None if values is None else [yaml11_number(v) for v in values]

    @property
    def integer(self) -> bool:
        """An int range: its ends (and step) are whole numbers."""
        return all(isinstance(v, int) for v in (self.low, self.high, self.step) if v is not None)

    def labels(self) -> list[str]:
        """The names of a grid's values, as they appear in run names; optuna's categorical choices."""
        return [value_label(v) for v in self.values or ()]


class Objective(Section):
    metric: str = Field(description="an evaluation metric of the task (accuracy, f1, loss, ...) at the end of training")
    direction: Literal["max", "min"] | None = Field(
        None, description="max or min (default: min for loss and perplexity, max for the others)"
    )


class Sampler(Section):
    type: Literal["grid", "tpe"] | None = Field(
        None,
        description="grid: every listed value; tpe: optuna's TPE over lists and ranges (default: grid if every "
        "searched key is a list)",
    )
    seed: int = Field(0, description="the order of a grid's points; TPE's draws")
    startup_trials: int = Field(5, gt=0, description="tpe: trials drawn at random before TPE models the results")


class Pruner(Section):
    type: Literal["none", "median", "successive-halving"] = Field(
        "none", description="stop trials early on their per-epoch evaluations: median or successive-halving"
    )
    startup_trials: int = Field(2, ge=0, description="median: trials finished before any is pruned")
    warmup_epochs: int = Field(0, ge=0, description="median: epochs a trial trains before it may be pruned")
    min_epochs: int = Field(1, gt=0, description="successive-halving: epochs before the first rung")
    reduction_factor: int = Field(3, ge=2, description="successive-halving: 1 trial in this many goes on at each rung")


PRUNER_FIELDS = {
    "none": set(),
    "median": {"startup_trials", "warmup_epochs"},
    "successive-halving": {"min_epochs", "reduction_factor"},
}


class Budget(Section):
    trials: int | None = Field(None, gt=0, description="at most this many trials (default for a grid: all its points)")
    minutes: float | None = Field(
        None, gt=0, description="start no trial after this many minutes (each lrft sweep process)"
    )


class Confirm(Section):
    top: int = Field(1, gt=0, description="how many of the best points to train again")
    seeds: list[int] = Field(min_length=1, description="the seeds they train with besides the search's")


class Heartbeat(Section):
    interval: int = Field(10, gt=0, description="seconds between a worker's heartbeats while it trains a trial")
    grace: int = Field(
        60, gt=0, description="a trial whose last heartbeat is older than this is its dead worker's: it is retried"
    )


class SweepSpec(Section):
    name: str | None = Field(None, description="the sweep dir is <output.dir>/<name>/ (default: the spec file's stem)")
    recipe: str = Field(description="the base recipe, a path relative to the spec file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted recipe keys set for every run")
    search: dict[str, SearchDim] = Field(default_factory=dict, description="dotted recipe keys to search")
    objective: Objective
    sampler: Sampler = Field(default_factory=Sampler)
    pruner: Pruner = Field(default_factory=Pruner)
    seeds: list[int] | None = Field(
        None, min_length=1, description="each point trains once per seed (default: the recipe's)"
    )
    budget: Budget = Field(default_factory=Budget)
    confirm: Confirm | None = Field(None, description="after the search: the best points again with more seeds")
    storage: str | None = Field(
        None,
        description="the study's URL: postgresql://..., mysql+pymysql://..., sqlite:///PATH or journal:PATH "
        f"(default: ${STORAGE_ENV}, else sqlite in the sweep dir)",
    )
    heartbeat: Heartbeat = Field(default_factory=Heartbeat, description="how a dead worker's trial is found")

    @field_validator("objective", "sampler", "pruner", mode="before")
    @classmethod
    def _shorthand(cls, value, info):
        """`objective: accuracy`, `sampler: tpe`, `pruner: median` stand for the mapping."""
        return {"metric" if info.field_name == "objective" else "type": value} if isinstance(value, str) else value

    @field_validator("overrides")
    @classmethod
    def _yaml11_numbers(cls, overrides):
        return {k: yaml11_number(v) for k, v in overrides.items()}

    @field_validator("name")
    @classmethod
    def _plain(cls, name):
        if name is not None and (problem := plain_name_problem(name, "name")):
            raise ValueError(f"name: {problem}")
        return name

    @property
    def sampler_type(self) -> str:
        """The sampler's type: as given, else grid when every searched key is a list, else tpe."""
        return self.sampler.type or ("grid" if all(d.values is not None for d in self.search.values()) else "tpe")

    def problems(self) -> list[str]:
        """What is wrong across fields (pydantic checked each field alone)."""
        out = []
        for key in self.overrides:
            if key in OWN_KEYS and key != "output.dir":
                out.append(f"overrides.{key}: a sweep sets it itself; {OWN_KEYS[key]}")
        for key, dim in self.search.items():
            out += dim_problems(key, dim, self)
        keys = sorted(self.search)
        out += [
            f"search: {a} and {b} overlap; search one of them" for a, b in zip(keys, keys[1:]) if b.startswith(a + ".")
        ]
        if len(set(self.seeds or ())) != len(self.seeds or ()):
            out.append(f"seeds: {self.seeds} lists a seed twice; list each once")
        if self.sampler_type == "tpe" and not (self.budget.trials or self.budget.minutes):
            out.append("budget: a tpe sampler needs budget.trials or budget.minutes (when to stop)")
        misplaced = (self.pruner.model_fields_set - {"type"}) - PRUNER_FIELDS[self.pruner.type]
        out += [
            f"pruner.{f}: applies to a {'median' if f in PRUNER_FIELDS['median'] else 'successive-halving'} "
            f"pruner, not {self.pruner.type}; drop it or change pruner.type"
            for f in sorted(misplaced)
        ]
        return out


def dim_problems(key: str, dim: SearchDim, spec: SweepSpec) -> list[str]:
    """What is wrong with one searched key (its first problem)."""
    where = f"search.{key}"
    for own, how in OWN_KEYS.items():
        if key == own or key.startswith(own + ".") or own.startswith(key + "."):
            return [f"{where}: a sweep sets {own} itself; {how}"]
    if key in spec.overrides:
        return [f"{where}: also set under overrides; keep {key} in one place"]
    if dim.values is not None:
        if dim.low is not None or dim.high is not None:
            return [f"{where}: a list of values or a range (low, high), not both"]
        seen: dict[str, Any] = {}
        for value, label in zip(dim.values, dim.labels()):
            if label in seen:
                return [
                    f"{where}: {seen[label]!r} and {value!r} would both name runs '{label}'; list each value once "
                    "(numbers are named by 3 significant digits)"
                ]
            seen[label] = value
        return []
    if dim.low is None or dim.high is None:
        return [f"{where}: a list of values (a grid) or a range {{low: .., high: ..}} (log: true, step: ..)"]
    problems = []
    if dim.low >= dim.high:
        problems.append(f"{where}: low ({dim.low}) must be below high ({dim.high})")
    if dim.log and (dim.low <= 0 or dim.step is not None):
        problems.append(f"{where}: a log range needs low > 0 and no step (got low {dim.low}, step {dim.step})")
    if spec.sampler.type == "grid":
        problems.append(f"{where}: the grid sampler tries listed values; list them, or use sampler: tpe for a range")
    return problems


# ---------------------------------------------------------------------------------------- names


def yaml11_number(value):
    """'1e-3' → 0.001: PyYAML reads an exponent without a dot as a string; a spec means the number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


def number_label(v: float) -> str:
    """0.01 → '1e-2', 0.025 → '2.5e-2', 0.5 → '0.5', 16.0 → '16': 3 significant digits, plain characters."""
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e4:
        return str(int(v))
    if 0.1 <= abs(v) < 1e4:
        return f"{v:.3g}"
    mantissa, exponent = f"{v:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def value_label(value) -> str:
    """A value as it appears in a run name: letters, digits, '.', '_', '-' only."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return number_label(value)
    if isinstance(value, (list, tuple)):
        return "-".join(value_label(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}{value_label(v)}" for k, v in value.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-")


def three_digits(value: float) -> float:
    """A sampled float rounded to 3 significant digits: the value a point trains with and is named by."""
    return float(f"{value:.3g}")


def key_labels(keys: list[str]) -> dict[str, str]:
    """What names each searched key in run names: its last part ('lr', 'rank'); the method by its value
    alone; the last two parts where two keys share the last one ('params.alpha')."""
    last = {k: "" if k == "adapter.method" else k.rsplit(".", 1)[-1] for k in keys}
    shared = Counter(last.values())
    return {k: ".".join(k.split(".")[-2:]) if label and shared[label] > 1 else label for k, label in last.items()}


def display_path(path: Path) -> str:
    """A path as said from here (commands are run from here too): relative below here, else absolute."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return os.path.abspath(path)
    return os.path.abspath(path) if relative.startswith("..") else relative


# ---------------------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Point:
    """A value of every searched key; its name is the prefix of its run dirs' names."""

    name: str
    settings: dict[str, Any]

    def shown(self, labels: dict[str, str]) -> str:
        """'lr=1e-2 rank=8' (the method as 'method=lora')."""
        return (
            " ".join(f"{labels.get(k) or k.rsplit('.', 1)[-1]}={value_label(v)}" for k, v in self.settings.items())
            or "(base recipe)"
        )


class Sweep:
    """A validated spec resolved against its base recipe: its dir, points, overrides and commands."""

    def __init__(self, spec: SweepSpec, path: Path, storage: str | None = None):
        self.spec, self.path = spec, Path(path)
        self.name = spec.name or self.path.stem
        self.recipe_path = self.path.parent / spec.recipe
        if not self.recipe_path.is_file():
            raise LrftError(
                f"{self.path}: recipe: no file at {self.recipe_path} (a path relative to the spec file); "
                f"fix the path or write one with `lrft init -o {self.recipe_path}`"
            )
        self.base_overrides = [f"{k}={flow_yaml(v)}" for k, v in spec.overrides.items()]
        self.base = self.load(self.base_overrides)
        # a run's own overrides set output.dir to the sweep dir, which the spec's output.dir only places
        self.run_base_overrides = [o for k, o in zip(spec.overrides, self.base_overrides) if k != "output.dir"]
        self.dir = Path(self.base.output.dir) / self.name
        self.seeds = spec.seeds or [self.base.seed]
        self.task = get_task(self.base.data.task)
        self.metric = spec.objective.metric
        base_metric = self.metric.split("_")[0]
        self.scale = 1.0 if base_metric in SCALELESS else 100.0
        self.direction = spec.objective.direction or ("min" if base_metric in MINIMISED else "max")
        self.sampler = spec.sampler_type
        self.labels = key_labels(list(spec.search))
        self.finite = all(d.values is not None for d in spec.search.values())  # every point can be listed
        self.max_trials = spec.budget.trials or (len(self.grid_points()) if self.sampler == "grid" else None)
        self.storage = self.storage_url(storage)

    def storage_url(self, given: str | None) -> str:
        """The study's URL: --storage, else $LRFT_SWEEP_STORAGE, else the spec's, else SQLite in the sweep dir."""
        for url, where in (
            (given, "--storage"),
            (os.environ.get(STORAGE_ENV), STORAGE_ENV),
            (self.spec.storage, f"{self.path}: storage"),
        ):
            if url:
                check_url(url, where)
                return url
        return f"sqlite:///{(self.dir / DEFAULT_FILE).resolve()}"

    @property
    def local_storage(self) -> Path | None:
        """The file of a SQLite or journal storage (None for a server)."""
        if self.storage.startswith("sqlite:///"):
            return Path(self.storage[len("sqlite:///") :])
        return Path(self.storage[len("journal:") :]) if self.storage.startswith("journal:") else None

    def load(self, overrides: list[str]) -> Recipe:
        """The base recipe with these overrides; a problem is the spec's, named with its file."""
        try:
            return load_recipe(self.recipe_path, overrides)
        except LrftError as e:
            raise LrftError(f"{self.path}: {e}") from None

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "max" else a < b

    # ---------------------------------------------------------------------------------- points

    def point(self, settings: dict[str, Any]) -> Point:
        """The point of these settings (dotted key → value), named by its values in the spec's key order."""
        ordered = {k: settings[k] for k in self.spec.search}
        name = "_".join(f"{self.labels[k]}{value_label(v)}" for k, v in ordered.items()) or "base"
        return Point(name, ordered)

    def grid_points(self) -> list[Point]:
        """Every combination of the listed values, in the order the spec lists them (finite spaces only)."""
        keys = list(self.spec.search)
        return [
            self.point(dict(zip(keys, combo)))
            for combo in itertools.product(*(self.spec.search[k].values or () for k in keys))
        ]

    def corner_points(self) -> list[Point]:
        """A sampled space's corners (ranges at low and high, lists at every value): enough to validate it."""
        axes = [dim.values if dim.values is not None else [dim.low, dim.high] for dim in self.spec.search.values()]
        keys = list(self.spec.search)
        return [
            self.point(dict(zip(keys, combo))) for combo in itertools.islice(itertools.product(*axes), RANGE_POINTS)
        ]

    def run_name(self, point: Point, seed: int) -> str:
        return f"{point.name}_s{seed}"

    def run_dir(self, point: Point, seed: int) -> Path:
        return self.dir / self.run_name(point, seed)

    def overrides(self, point: Point, seed: int) -> list[str]:
        """The `key=value` overrides of one run: the spec's, the point's, the seed, the name, the sweep dir."""
        return [
            *self.run_base_overrides,
            *(f"{k}={flow_yaml(v)}" for k, v in point.settings.items()),
            f"seed={seed}",
            f"name={self.run_name(point, seed)}",
            f"output.dir={self.dir}",
        ]

    def recipe(self, point: Point, seed: int) -> Recipe:
        return self.load(self.overrides(point, seed))

    def command(self, point: Point, seed: int) -> str:
        """The `lrft train` command of one run: the very recipe the sweep trains."""
        return shlex.join(["lrft", "train", display_path(self.recipe_path), *self.overrides(point, seed)])

    def job_command(self, point: Point, seed: int) -> str:
        """`command` as `--plan` prints it for a job array: where the recipe names no data dir, led by
        the $LRFT_DATA_DIR this process reads the task from (absolute), which a job's environment may lack."""
        data_dir = os.environ.get(DATA_DIR_ENV)
        if not data_dir or self.base.data.path:
            return self.command(point, seed)
        return f"{DATA_DIR_ENV}={shlex.quote(os.path.abspath(data_dir))} {self.command(point, seed)}"

    def identity(self, recorded: dict | None = None) -> dict:
        """What makes a sweep this sweep (a rerun with other values is refused): the spec but its budget
        and confirmation, and the base recipe as resolved but for the keys every run sets itself (the
        searched ones, seed, name, output.dir), whose base values reach no run: a base recipe whose
        default lr is retuned still resumes an lr sweep. With `recorded`, that identity (as stored by
        the sweep's first process) reduced the same way."""
        if recorded is None:
            recorded = {
                "spec": self.spec.model_dump(
                    mode="json", exclude={"budget", "confirm", "name", "storage", "heartbeat"}
                ),
                "recipe": self.base.model_dump(mode="json"),
            }
        recipe = copy.deepcopy(recorded["recipe"])  # cut keys from a copy
        for key in [*self.spec.search, "seed", "name", "output.dir"]:
            dotted_pop(recipe, key)
        return {**recorded, "recipe": recipe}

    def check(self) -> None:
        """Every point's recipe is valid (a sampled space: its corners), its name plain; the metric exists."""
        points = self.grid_points() if self.finite else self.corner_points()
        for point in points:
            if not is_plain_name(self.run_name(point, self.seeds[0])):
                raise LrftError(
                    f"{self.path}: point {point.name!r} is not a plain run name; search values that name "
                    "runs with letters, digits, '.', '_', '-'"
                )
            try:
                load_recipe(self.recipe_path, self.overrides(point, self.seeds[0]))
            except LrftError as e:
                raise LrftError(f"{self.path}: point {point.shown(self.labels)}: {e}") from None
        metrics = self.task.reported_metrics()
        if self.metric not in metrics:
            raise LrftError(
                f"{self.path}: objective.metric: {self.task.name} reports {', '.join(metrics)}, not "
                f"{self.metric!r}{did_you_mean(self.metric, metrics)}"
            )


def load_sweep(path: str | Path, storage: str | None = None) -> Sweep:
    """Read, validate and resolve a spec file; every problem at once, as for recipes."""
    path = Path(path)
    if not path.is_file():
        raise LrftError(f"sweep spec: no file at {path}; see the README's Search section for one")
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise LrftError(f"{path}: a sweep spec is a YAML mapping (recipe:, search:, objective:, ...), not {got}")
    spec = validated(SweepSpec, raw, str(path), whole="sweep spec")
    if problems := spec.problems():
        raise ConfigError(problems, str(path))
    sweep = Sweep(spec, path, storage)
    sweep.check()
    return sweep
