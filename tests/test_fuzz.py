"""Property-based fuzzing of bad input (hypothesis): what the bad-input catalogue does not list.

Generated inputs: recipes and `key=value` overrides made by mutating the fields of the tiny recipe
(walked from the schema, so a new field is fuzzed with no change here): wrong types, boundary and
beyond-boundary numbers, NaN/Inf, huge ints, empty and duplicate lists, unicode, keys given twice,
paths that are files, missing, unwritable or inside a run dir; the arguments of every command; a
finished run with one file truncated, emptied, made invalid or removed; damaged data files; a base
model's damaged weight files (safetensors, one file or shards and their index; GGUF).

The property, for each: exit 0, or exit 2 with exactly one `error:` line; never a traceback (any
exception other than a user error fails the test with its traceback); no file that existed before
changes or vanishes, save a successful command's own outputs; and a file inside a run dir, the model
or the data changes only by the command that owns it (a resumed training, analyze's
RUN_DIR/analysis, eval's RUN_DIR/predictions.jsonl), whatever the flags.

Speed: recipe-level examples never load a model: `load_recipe` validates, and a recipe it accepts
goes through `Trainer.run` up to the model load (`stop_at_model_load`): seeds, the run-dir checks,
--restart, the data. The other tests run the CLI end to end on tiny models; `analyze` (seconds per
report, for its figures) is fuzzed up to the model load, and end to end on fewer damaged runs.

Examples are seeded (`derandomize`, no example database): CI runs the same cases on every machine,
the CI_EXAMPLES below, a few hundred in all. `LRFT_FUZZ_EXAMPLES=5000` runs 5000 in all, shared out in
the same proportions (the nightly target in the README).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import json
import os
import shutil
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import annotated_types
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from safetensors.torch import save as safetensors_bytes

from lrft import methods
from lrft.errors import LrftError
from lrft.open_runs import trained_adapter_config
from lrft.recipe import ADAPTER_VARIANTS, Recipe, load_recipe
from lrft.run_layout import RunDir
from tests.helpers import reshaped_tensor, safetensors_header, save_sharded_bert, save_tiny_gguf, snapshot

# Generated cases per test in CI; LRFT_FUZZ_EXAMPLES=N shares N cases out in the same proportions.
CI_EXAMPLES = {
    "recipe": 200,
    "recipe_cli": 20,
    "cli": 60,
    "damaged_run": 50,
    "damaged_analyze": 6,
    "data": 30,
    "weights": 40,
}
TOTAL = int(os.environ.get("LRFT_FUZZ_EXAMPLES") or 0)


def fuzz(test: str):
    share = TOTAL * CI_EXAMPLES[test] // sum(CI_EXAMPLES.values())
    return settings(
        max_examples=max(share, CI_EXAMPLES[test]),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------------ the world


@dataclass(frozen=True)
class P:
    """A path of some kind, made concrete in each example's world (`resolve`)."""

    kind: str


PATHS = {
    "new": lambda w: w / "out" / "new",
    "missing": lambda w: w / "nowhere" / "deeper",
    "file": lambda w: w / "notes.txt",
    "under a file": lambda w: w / "notes.txt" / "x",
    "unwritable": lambda w: Path("/proc/lrft-fuzz/x"),  # Linux's /proc: no one, root included, makes dirs there
    "empty dir": lambda w: w / "empty",
    "dir of yours": lambda w: w / "yours",
    "run dir": lambda w: w / "runs" / "good",
    "talora run": lambda w: w / "runs" / "ta",
    "inside the run": lambda w: w / "runs" / "good" / "adapter",
    "run's checkpoints": lambda w: w / "runs" / "good" / "checkpoints",
    "run's recipe": lambda w: w / "runs" / "good" / "recipe.yaml",
    "run's analysis": lambda w: w / "runs" / "good" / "analysis",
    "run's predictions": lambda w: w / "runs" / "good" / "predictions.jsonl",
    "runs": lambda w: w / "runs",
    "run by a detour": lambda w: w / "runs" / ".." / "runs" / "good",
    "link to the run": lambda w: w / "link",
    "peft dir": lambda w: w / "peft",
    "model dir": lambda w: w / "model",
    "data dir": lambda w: w / "data",
    "current dir": lambda w: Path("."),
    "parent dir": lambda w: Path(".."),
    "home dir": lambda w: w / "home",  # $HOME of every example
    "root dir": lambda w: Path("/"),
    "long name": lambda w: w / ("x" * 300),
}
PATH_KINDS = st.sampled_from(sorted(PATHS)).map(P)


def resolve(value, world: Path):
    """`value` with every P made a concrete path (as a string) in `world`."""
    if isinstance(value, P):
        return str(PATHS[value.kind](world))
    if isinstance(value, list):
        return [resolve(v, world) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, world) for k, v in value.items()}
    if isinstance(value, Repeated):
        return Repeated([resolve(v, world) for v in value.values])
    return value


@pytest.fixture(scope="module")
def template(finished_runs, tmp_path_factory) -> Path:
    """The world each example starts from: copies of the finished runs (recipes pointing at the copy),
    their recipes, a PEFT export, links to the shared tiny model and data, dirs of the user's own."""
    from typer.testing import CliRunner

    from lrft.cli import app

    w = tmp_path_factory.mktemp("fuzz") / "template"
    shutil.copytree(finished_runs / "runs", w / "runs")
    for name in ("good", "ta"):
        recipe = yaml.safe_load((w / "runs" / name / "recipe.yaml").read_text())
        recipe["output"]["dir"] = str(w / "runs")
        text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
        (w / "runs" / name / "recipe.yaml").write_text(text)
        (w / f"{name}.yaml").write_text(text)
    for name in ("empty", "home", "yours", "no-data"):
        (w / name).mkdir()
    for note in ("notes.txt", "home/notes.txt", "yours/notes.txt"):
        (w / note).write_text("the user's own file\n")
    (w / "link").symlink_to(w / "runs" / "good")
    (w / "model").symlink_to(finished_runs / "model")
    (w / "data").symlink_to(finished_runs / "data")
    result = CliRunner().invoke(app, ["merge", str(w / "runs" / "good"), "--format", "peft", "--out", str(w / "peft")])
    assert result.exit_code == 0, result.stderr
    return w


@contextlib.contextmanager
def example_world(template: Path):
    """A fresh copy of the template, as the current dir, $HOME and an empty $LRFT_DATA_DIR (GLUE tasks
    without data.path stop there instead of going to the hub); everything is put back after."""
    with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
        w = Path(scratch) / "w"
        shutil.copytree(template, w, symlinks=True)
        for name in ("good", "ta"):  # the copy's runs are the copy's own
            for path in (w / f"{name}.yaml", w / "runs" / name / "recipe.yaml"):
                path.write_text(path.read_text().replace(str(template), str(w)))
        env = {"HOME": str(w / "home"), "LRFT_DATA_DIR": str(w / "no-data")}
        cwd = os.getcwd()
        os.chdir(w)
        try:
            with mock.patch.dict(os.environ, env):
                yield w
        finally:
            os.chdir(cwd)


# --------------------------------------------------------------------------------- the property


@dataclass
class Outcome:
    code: int
    err: str
    before: dict[Path, str]
    after: dict[Path, str]


def files(world: Path, shared: Path) -> dict[Path, str]:
    """Every file an example could touch: its world's, and the shared finished runs (model, data)."""
    return {
        **{world / k: v for k, v in snapshot(world).items()},
        **{shared / k: v for k, v in snapshot(shared).items()},
    }


def run(cli, world: Path, shared: Path, args: list) -> Outcome:
    before = files(world, shared)
    code, _, err = cli(*args)
    return Outcome(code, err, before, files(world, shared))


def under(path: Path, places) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == p or p in real.parents for p in (Path(os.path.realpath(q)) for q in places))


def check(outcome: Outcome, outputs=(), own=()) -> None:
    """The property. `outputs`: what the command writes when it succeeds; `own`: its places inside a run
    dir (the one training resumes, analyze's default analysis dir, eval's predictions)."""
    o = outcome
    assert "Traceback" not in o.err, o.err
    assert o.code in (0, 2), f"exit {o.code}: {o.err}"
    if o.code == 2:
        assert len([line for line in o.err.splitlines() if line.startswith("error:")]) == 1, o.err
    changed = {p for p in o.before if o.after.get(p) != o.before[p]}
    added = set(o.after) - set(o.before)
    if o.code == 2:
        assert not changed, f"a refused command changed {sorted(changed)[:3]}: {o.err}"
    stray = sorted(p for p in changed | added if not under(p, [*outputs, *own]))
    assert not stray, f"exit {o.code} but {stray[:3]} changed: {o.err}"
    kept = {p.parent for p in o.before if p.name in ("recipe.yaml", "config.json")}  # run dirs, the base model
    protected = sorted(p for p in changed if under(p, kept) and not under(p, own))
    assert not protected, f"exit {o.code} changed {protected[:3]}, files of a run or model it does not own"


# ------------------------------------------------------------------------------- recipe values


@dataclass(frozen=True)
class Repeated:
    """A key given more than once in one YAML mapping, with these values in order."""

    values: list


WRONG_TYPES = [None, True, "", "fast", "ünïcødé ✓ 文字", "a\x00b", "  ", [], {}, ["a", "a"], {"k": 1}, [[]]]
NUMBERS = [
    0,
    -1,
    1,
    2,
    3,
    7,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**53 + 1,
    2**63,
    2**64,
    10**30,
    -(2**63),
    0.0,
    -0.0,
    0.5,
    1.0,
    1.5,
    1e-300,
    5e-324,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "1e3",
    "0x10",
]
NAMES = [
    [],
    [""],
    [" "],
    ["query"],
    ["query", "query"],
    ["query", "value"],
    ["nope"],
    ["ünï"],
    ["query", 3],
    ["dense"],
    ["attention"],
    ["q"] * 40,
    [None],
    "query",
]
PATH_FIELDS = {"model.name", "model.gguf_file", "data.path", "calibration.cache", "output.dir"}
# Fields whose strings a loader might take for a hub id: never a bare word here, so no example reaches
# the network (a local-looking or invalid name fails at once, online or not).
HUB_FIELDS = {"model.name", "model.revision", "model.gguf_file"}


def bounds(info) -> list:
    """Each bound of a field, and the numbers just inside and outside it."""
    out = []
    for m in info.metadata:
        for attr in ("gt", "ge", "lt", "le"):
            b = getattr(m, attr, None) if isinstance(m, annotated_types.BaseMetadata) else None
            if isinstance(b, (int, float)):
                out += [b, b - 1, b + 1, b - 1e-9, b + 1e-9] if isinstance(b, float) else [b, b - 1, b + 1]
    return out


def kinds(annotation) -> list:
    """The types a field accepts (None left out, Literal kept whole)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def invited(key: str, info) -> list:
    """What a field's type invites: numbers at, inside and past its bounds, near-miss choices, names,
    paths; the values that pass validation and break later."""
    out = []
    for kind in kinds(info.annotation):
        if typing.get_origin(kind) is typing.Literal:
            choices = list(typing.get_args(kind))
            out += choices + [str(c).upper() for c in choices] + [str(c)[:-1] for c in choices]
        elif kind in (int, float):
            out += NUMBERS + bounds(info)
        elif kind is bool:
            out += [False, True, "yes", "no", "on", 1, 0, 2, "true"]
        elif typing.get_origin(kind) is list:
            out += NAMES
        elif kind is str:
            out += ["ünïcødé ✓ 文字", "x" * 300, " padded ", "label", "a,b", "-1", "null"]
    return out + ([P(k) for k in sorted(PATHS)] if key in PATH_FIELDS else [])


def values_for(key: str, info):
    """Values to put in a field: what its type invites (drawn most often), wrong types, any text or number."""
    pool = invited(key, info) or WRONG_TYPES
    texts = st.text(max_size=24).map(lambda t: f"./{t}") if key in HUB_FIELDS else st.text(max_size=24)
    return st.one_of(
        st.sampled_from(pool), st.sampled_from(pool), st.sampled_from(WRONG_TYPES), texts, st.integers(), st.floats()
    )


def leaf_fields(model: type[BaseModel], prefix: str = "", method: str = "lora") -> dict:
    """Dotted key → field info of every field of the schema (the adapter section of `method`); a section
    is listed too, to be replaced whole."""
    out = {}
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = ADAPTER_VARIANTS[method] if key == "adapter" else info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out[key] = None
            out.update(leaf_fields(sub, f"{key}.", method))
        else:
            out[key] = info
    return out


# What sets how long a run trains: end to end, a plausible 2**31 here would train for years.
LENGTH_FIELDS = {"train.max_steps"}
SECTION_VALUES = st.sampled_from([None, 3, "train", [], [1, 2], {}, {"lr": 1}, P("file")])


@st.composite
def mutation(draw, method: str, plausible: bool = False):
    """(dotted key, value, how): the value goes into the file, an override, the file twice; or the key is
    deleted or misspelt. `plausible`: a value the field's type invites, in the file or an override."""
    fields = {
        k: v
        for k, v in leaf_fields(Recipe, method=method).items()
        if not plausible or (v is not None and k not in LENGTH_FIELDS)
    }
    key = draw(st.sampled_from(sorted(fields)))
    info = fields[key]
    if plausible:
        return (
            key,
            draw(st.sampled_from(invited(key, info) or WRONG_TYPES)),
            draw(st.sampled_from(["file", "override"])),
        )
    value = draw(SECTION_VALUES if info is None else values_for(key, info))
    how = draw(st.sampled_from(["file", "file", "file", "override", "override", "twice", "delete", "unknown key"]))
    return key, value, how


@dataclass
class RecipeCase:
    method: str
    mutations: list

    def write(self, world: Path, base: dict) -> tuple[Path, list[str]]:
        """The recipe file in `world` and the overrides of this case."""
        recipe = yaml.safe_load(yaml.safe_dump(base))
        recipe["name"] = "fuzzed"
        recipe["adapter"] = {"method": self.method, "params": {"rank": 2}}
        recipe.setdefault("train", {})["max_steps"] = 1
        overrides = []
        for key, value, how in self.mutations:
            value = resolve(value, world)
            if how == "override":
                overrides.append(f"{key}={flow(value)}")
            else:
                put(recipe, key, value, how)
        path = world / "fuzzed.yaml"  # a section per line, each in flow style: YAML that no dumper writes
        path.write_text("".join(f"{flow(k)}: {flow(v)}\n" for k, v in pairs(recipe)))
        return path, overrides


def put(recipe: dict, key: str, value, how: str) -> None:
    node = recipe
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if how == "delete":
        node.pop(last, None)
    elif how == "unknown key":
        node[last + "_"] = value
    elif how == "twice":
        before = node.get(last)
        node[last] = Repeated([*(before.values if isinstance(before, Repeated) else [before]), value])
    else:
        node[last] = value


def pairs(mapping: dict) -> list[tuple]:
    """The (key, value) pairs a mapping is written as: a Repeated key once per value."""
    out = []
    for k, v in mapping.items():
        out += [(k, x) for x in v.values] if isinstance(v, Repeated) else [(k, v)]
    return out


def flow(node) -> str:
    """YAML in flow style, with a Repeated key written once per value (what no YAML dumper writes)."""
    if isinstance(node, dict):
        return "{" + ", ".join(f"{flow(k)}: {flow(v)}" for k, v in pairs(node)) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(flow(v) for v in node) + "]"
    if node is None or isinstance(node, (bool, int)):
        return json.dumps(node)  # JSON's null, true and integers are YAML's too
    # dumped inside a list, so that it is quoted as a flow context needs ("a,b" is two keys there, unquoted)
    return yaml.safe_dump([node], default_flow_style=True, width=1 << 30, allow_unicode=True).strip()[1:-1]


@st.composite
def recipe_case(draw, plausible: bool = False):
    """A method and one mutation (mostly) to three: one bad value at a time reaches past validation."""
    method = draw(st.sampled_from(sorted(methods.REGISTRY)))
    count = 1 if plausible else draw(st.sampled_from([1, 1, 1, 2, 3]))
    return RecipeCase(method, [draw(mutation(method, plausible)) for _ in range(count)])


class ModelLoad(Exception):
    """Raised where a model would load: every check before it has passed."""


@contextlib.contextmanager
def stop_at_model_load():
    def stop(*args, **kwargs):
        raise ModelLoad

    with mock.patch("lrft.adapted_model.load_model", stop), mock.patch("lrft.eval_command.load_model", stop):
        yield


def base_recipe(template: Path, world: Path) -> dict:
    """The recipe of the finished lora run "good", as a mapping (parsed once), writing into `world`."""
    recipe = copy.deepcopy(_parsed(template / "good.yaml"))
    recipe["output"]["dir"] = str(world / "runs")
    return recipe


@functools.cache
def _parsed(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------ recipes


@fuzz("recipe")
@given(case=recipe_case(), restart=st.booleans())
def test_recipes_are_accepted_or_refused_in_one_line(case, restart, template, finished_runs):
    """load_recipe, then the Trainer up to the model load: a Recipe or a user error, no file changed."""
    from lrft.training import Trainer

    with example_world(template) as w:
        path, overrides = case.write(w, base_recipe(template, w))
        before = files(w, finished_runs)
        try:
            recipe = load_recipe(path, overrides)
            with stop_at_model_load():
                Trainer(recipe, restart=restart).run()
        except (LrftError, ModelLoad) as e:
            assert isinstance(e, ModelLoad) or str(e).strip(), "an empty error message"
        assert files(w, finished_runs) == before


@fuzz("recipe_cli")
@given(case=recipe_case(plausible=True))
def test_recipes_train_end_to_end_or_are_refused(case, template, finished_runs, cli):
    """The same recipes through `lrft train`, to the end; a run that succeeds trained an adapter."""
    with example_world(template) as w:
        path, overrides = case.write(w, base_recipe(template, w))
        try:
            run_dir = load_recipe(path, overrides).run_dir
        except LrftError:
            run_dir = None
        outcome = run(cli, w, finished_runs, ["train", path, *overrides])
        check(outcome, outputs=[run_dir] if run_dir else [], own=[run_dir] if run_dir else [])
        if outcome.code == 0:
            config = trained_adapter_config(run_dir)
            assert config["targets"], "a run that adapted no layer reported success"


# ----------------------------------------------------------------------------- CLI arguments

FLAG = "<flag>"  # an option given without a value
ARGV_TEXT = st.text(st.characters(exclude_characters="\x00"), max_size=20)  # what argv can hold
NUMBERS_ARGV = st.one_of(
    st.sampled_from(["0", "-1", "1", "3", "2147483648", str(2**64), "1e3", "1.5", "nan", "", "abc", "٣"]),
    st.integers().map(str),
)
LOCAL_NAMES = st.one_of(PATH_KINDS, ARGV_TEXT.map(lambda t: f"./{t}"), st.just("ünï cødé"))
TASK_NAMES = (
    st.sampled_from(
        ["text-classification", "glue/mrpc", "glue/stsb", "gsm8k", "instruction", "glue/mprc", "", "GLUE/MRPC", "ünï"]
    )
    | ARGV_TEXT
)
OVERRIDES = (
    st.sampled_from(
        [
            "name=other",
            "train.lr=1e-3",
            "train.max_steps=1",
            "seed=7",
            "train.epochs=2",
            "=",
            "train.lr",
            "a..b=1",
            "output.dir=.",
            "train=3",
            "name=good",
            "name=ta",
            "seed=-1",
            "adapter.params.rank=2",
            "train.eval_every=1",
            "adapter.target_modules=[]",
        ]
    )
    | ARGV_TEXT
)


def choices(*good: str):
    return st.sampled_from([*good, "", "ünï", *(g.upper() for g in good)]) | ARGV_TEXT


def runs_of(*good: str):
    """A command's run-dir argument: mostly one of the good ones, else any kind of path."""
    return st.sampled_from([P(g) for g in good]) | PATH_KINDS


# Per command: the arguments it needs (mostly the good ones) and its options' values.
COMMANDS = {
    "train": (
        [runs_of("good recipe", "talora recipe")],
        {"--restart": st.just(FLAG), "--json": st.just(FLAG), "override": OVERRIDES},
    ),
    "eval": (
        [runs_of("run dir", "talora run", "peft dir")],
        {
            "--task": TASK_NAMES,
            "--data-path": PATH_KINDS,
            "--max-samples": NUMBERS_ARGV,
            "--batch-size": NUMBERS_ARGV,
            "--best": st.just(FLAG),
            "--predictions": PATH_KINDS,
            "--base": LOCAL_NAMES,
            "--force": st.just(FLAG),
            "--json": st.just(FLAG),
        },
    ),
    "merge": (
        [runs_of("run dir", "talora run", "peft dir")],
        {
            "--out": PATH_KINDS,
            "--format": choices("hf", "peft"),
            "--dtype": choices("float32", "bfloat16"),
            "--task": TASK_NAMES,
            "--base": LOCAL_NAMES,
            "--data-path": PATH_KINDS,
            "--force": st.just(FLAG),
            "--json": st.just(FLAG),
        },
    ),
    "count-params": (
        [],
        {
            "--method": choices(*methods.REGISTRY, "full"),
            "--rank": NUMBERS_ARGV,
            "--model": st.sampled_from(["roberta-base", "t5-base", "llama2-7b"]) | LOCAL_NAMES,
            "--targets": st.sampled_from(
                ["query", "query,query", ",", "nope", "query,,value", "dense", "q_proj,v_proj"]
            )
            | ARGV_TEXT,
            "--num-labels": NUMBERS_ARGV,
            "--calibrated": runs_of("run dir", "talora run"),
            "--json": st.just(FLAG),
        },
    ),
    "init": (
        [],
        {
            "--method": choices(*methods.REGISTRY),
            "--task": TASK_NAMES,
            "--model": LOCAL_NAMES,
            "--output": PATH_KINDS,
            "--force": st.just(FLAG),
        },
    ),
    "analyze": (
        [runs_of("run dir", "talora run")],
        {
            "--against": runs_of("run dir", "talora run"),
            "--out": PATH_KINDS,
            "--module": st.sampled_from(["bert.encoder.layer.0.attention.self.query", "query"]) | ARGV_TEXT,
            "--modules": st.sampled_from(["query", "layer.1.", ",", "nope"]) | ARGV_TEXT,
            "--json": st.just(FLAG),
        },
    ),
}
PATHS.update({"good recipe": lambda w: w / "good.yaml", "talora recipe": lambda w: w / "ta.yaml"})


@st.composite
def command_line(draw) -> list:
    """A command, its arguments and up to four options (`merge` mostly with a fresh --out)."""
    name = draw(st.sampled_from(sorted(COMMANDS)))
    needed, table = COMMANDS[name]
    args = [name, *(draw(s) for s in needed)]
    if name == "merge" and draw(st.booleans()):
        args += ["--out", P("new")]
    for option in draw(st.lists(st.sampled_from(sorted(table)), max_size=4, unique=True)):
        value = draw(table[option])
        args += [value] if option == "override" else [option] if value == FLAG else [option, value]
    return args


def places(args: list[str], world: Path) -> tuple[list[Path], list[Path]]:
    """(what a command writes when it succeeds, its own places inside a run dir)."""
    name = args[0]
    opts = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
    if name == "train":
        try:
            run_dir = load_recipe(args[1], [a for a in args[2:] if not a.startswith("--")]).run_dir
        except (LrftError, OSError):  # refused: the CLI must say so in one line
            return [], []
        return [run_dir], [run_dir]
    target = Path(args[1]) if len(args) > 1 else None
    if name == "eval":
        own = RunDir(target).predictions()
        written = Path(opts.get("--predictions", own))
        return [written], [own] if written == own else []
    if name == "analyze":
        own = RunDir(target).comparison(Path(opts["--against"])) if "--against" in opts else RunDir(target).analysis
        return [Path(opts.get("--out", own))], [own]
    key = {"merge": "--out", "init": "--output"}.get(name)
    return ([Path(opts[key])] if key in opts else []), []


@fuzz("cli")
@given(args=command_line())
def test_command_lines_succeed_or_are_refused_in_one_line(args, template, finished_runs, cli):
    """Every command with generated arguments; `analyze` stops at the model load (its figures take seconds)."""
    with example_world(template) as w:
        args = resolve(args, w)
        outputs, own = places(args, w)
        stop = stop_at_model_load() if args[0] == "analyze" else contextlib.nullcontext()
        with stop:
            try:
                outcome = run(cli, w, finished_runs, args)
            except ModelLoad:
                return
        check(outcome, outputs, own)


# ------------------------------------------------------------------------------- damaged runs


def wrong_shape(path: Path) -> bytes:
    """Content of the file's own format that lrft never wrote there."""
    if path.suffix == ".safetensors":
        return safetensors_bytes({"unrelated": torch.zeros(3)})
    if path.suffix == ".jsonl":
        return b'{"type": "train", "step": "two", "loss": [1], "module": 3}\n[1, 2]\n{}\n'
    if path.suffix == ".json":
        return b'["not", "an", "object"]'
    if path.suffix == ".yaml":
        return b"- a recipe\n- is a mapping\n"
    return b"\x89PNG\r\n\x1a\n"


DAMAGES = {
    "truncated": lambda path, data: data[: len(data) // 2],
    "emptied": lambda path, data: b"",
    "garbage": lambda path, data: b"\x00\xffgarbage\xfe\x01" * 8,
    "not utf-8": lambda path, data: b"\xff\xfe" + data,
    "wrong shape": lambda path, data: wrong_shape(path),
    "an empty object": lambda path, data: b"{}",
    "removed": None,
}
RESUME = ["train", "{recipe}", "train.max_steps=3"]  # continues the finished run from its checkpoint
RUN_COMMANDS = {  # per run (and the PEFT export): the command lines that read it
    "good": [
        ["eval", "{run}"],
        ["eval", "{run}", "--best"],
        ["merge", "{run}", "--out", "{out}"],
        ["merge", "{run}", "--format", "peft", "--out", "{out}"],
        ["count-params", "--method", "lora", "--calibrated", "{run}"],
        ["train", "{recipe}"],
        RESUME,
    ],
    "ta": [
        ["eval", "{run}"],
        ["merge", "{run}", "--out", "{out}"],
        ["count-params", "--method", "talora", "--calibrated", "{run}"],
        ["train", "{recipe}"],
        RESUME,
    ],
    "peft": [["eval", "{run}"], ["merge", "{run}", "--out", "{out}"]],
}


def damage(path: Path, how: str) -> None:
    if DAMAGES[how] is None:
        path.unlink()
    else:
        path.write_bytes(DAMAGES[how](path, path.read_bytes()))


def run_files(template: Path, names) -> list[tuple[str, str]]:
    """(run, file relative to it) of every file of the named finished runs."""
    return [
        (name, str(p.relative_to(run_path(template, name))))
        for name in sorted(names)
        for p in sorted(run_path(template, name).rglob("*"))
        if p.is_file()
    ]


def run_path(world: Path, name: str) -> Path:
    return world / name if name == "peft" else world / "runs" / name


def damaged_run_case(template: Path, commands: dict):
    return st.sampled_from(run_files(template, commands)).flatmap(
        lambda rf: st.tuples(st.just(rf), st.sampled_from(sorted(DAMAGES)), st.sampled_from(commands[rf[0]]))
    )


def run_damaged(case, template: Path, finished_runs: Path, cli) -> None:
    """One file of a finished run damaged, then a command that reads the run: the property holds."""
    (name, file), how, command = case
    with example_world(template) as w:
        run_dir, out = run_path(w, name), w / "out" / "new"
        damage(run_dir / file, how)
        args = [a.format(run=run_dir, out=out, recipe=w / f"{name}.yaml") for a in command]
        outputs, own = places(args, w)
        check(run(cli, w, finished_runs, args), outputs, own)


@pytest.fixture(scope="module")
def run_cases(template):
    return damaged_run_case(template, RUN_COMMANDS)


def test_damaged_runs_are_used_or_refused_in_one_line(run_cases, template, finished_runs, cli):
    @fuzz("damaged_run")
    @given(case=run_cases)
    def each(case):
        run_damaged(case, template, finished_runs, cli)

    each()


def test_damaged_runs_are_analysed_or_refused_in_one_line(template, finished_runs, cli):
    """`analyze` end to end on damaged runs: it reads every file of a run (fewer examples: figures are slow)."""
    cases = damaged_run_case(
        template, {"good": [["analyze", "{run}", "--out", "{out}"]], "ta": [["analyze", "{run}", "--out", "{out}"]]}
    )

    @fuzz("damaged_analyze")
    @given(case=cases)
    def each(case):
        run_damaged(case, template, finished_runs, cli)

    each()


# ------------------------------------------------------------------------------- damaged data

DATA_LINES = {  # a record of the training file, replaced by one that is not what the task reads
    "label null": {"text": "good film", "label": None},
    "label float": {"text": "good film", "label": 0.5},
    "label list": {"text": "good film", "label": [1]},
    "label huge": {"text": "good film", "label": 10**30},
    "text null": {"text": None, "label": 1},
    "text number": {"text": 3, "label": 1},
    "text empty": {"text": "", "label": 1},
    "text huge": {"text": "good " * 5000, "label": 1},
    "no text": {"label": 1},
    "unicode": {"text": "ünïcødé ✓ 文字 \u202e", "label": "ünï"},
}
FORMATS = [".jsonl", ".json", ".csv", ".tsv"]


def write_records(path: Path, records: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=sorted({k for r in records for k in r}), delimiter="\t" if path.suffix == ".tsv" else ","
            )
            writer.writeheader()
            writer.writerows(records)


@st.composite
def data_case(draw):
    fmt = draw(st.sampled_from(FORMATS))
    split = draw(st.sampled_from(["train", "dev"]))
    change = draw(st.sampled_from(sorted(DAMAGES) + sorted(DATA_LINES) + ["one class", "crlf", "blank lines"]))
    command = draw(st.sampled_from(["train", "eval"]))
    return fmt, split, change, command


def damaged_data(world: Path, fmt: str, split: str, change: str) -> Path:
    """A copy of the tiny data in format `fmt`, with one file damaged or one record changed."""
    d = world / "damaged-data"
    d.mkdir()
    for name in ("train", "dev"):
        records = [json.loads(line) for line in (world / "data" / f"{name}.jsonl").read_text().splitlines()]
        if name == split and change in DATA_LINES:
            records[1] = DATA_LINES[change]
        if name == split and change == "one class":
            records = [{**r, "label": 1} for r in records]
        write_records(d / f"{name}{fmt}", records)
    path = d / f"{split}{fmt}"
    if change in DAMAGES:
        damage(path, change)
    elif change == "crlf":
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    elif change == "blank lines":
        path.write_bytes(path.read_bytes().replace(b"\n", b"\n\n\n"))
    return d


@fuzz("data")
@given(case=data_case())
def test_damaged_data_is_used_or_refused_in_one_line(case, template, finished_runs, cli):
    """A new run trained on damaged data, or the finished run evaluated on it."""
    fmt, split, change, command = case
    with example_world(template) as w:
        data = damaged_data(w, fmt, split, change)
        if command == "train":
            args = ["train", w / "good.yaml", "name=new", f"data.path={data}", "train.max_steps=1"]
        else:
            args = ["eval", w / "runs" / "good", "--data-path", data]
        args = [str(a) for a in args]
        outputs, own = places(args, w)
        check(run(cli, w, finished_runs, args), outputs, own)


# ----------------------------------------------------------------------------- damaged weights


@pytest.fixture(scope="module")
def weight_sources(finished_runs, tmp_path_factory) -> dict[str, Path]:
    """Base models to damage a copy of: the finished runs' tiny BERT (one safetensors file), the same in
    shards with an index, and a tiny Llama as a GGUF file."""
    root = tmp_path_factory.mktemp("weights")
    gguf_dir = root / "gguf"
    gguf_dir.mkdir()
    save_tiny_gguf(gguf_dir / "tiny.gguf")
    return {"single": finished_runs / "model", "sharded": save_sharded_bert(root / "sharded"), "gguf": gguf_dir}


def overwrite(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def header_end(data: bytes) -> int:
    """Where a safetensors file's tensor data starts (its whole length when its header length is not sane)."""
    length = int.from_bytes(data[:8], "little")
    return 8 + length if 8 + length <= len(data) else len(data)


def gguf_header_end(path: Path) -> int:
    """Where a sound GGUF file's tensor data starts: before it, its metadata and tensor table."""
    import gguf

    return gguf.GGUFReader(str(path)).data_offset


def reshape(data: bytes, pick: int, same_size: bool) -> bytes:
    """One tensor (the pick-th of those with two dims) given another shape in the header: its dims swapped
    (the file still consistent, the shape not the config's), or one row more (the header contradicting itself)."""
    header, _ = safetensors_header(data)
    matrices = sorted(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    name = matrices[pick % len(matrices)]
    rows, cols = header[name]["shape"]
    if same_size and rows == cols:
        return reshaped_tensor(data, name, [rows // 2, cols * 2])
    return reshaped_tensor(data, name, [cols, rows] if same_size else [rows + 1, cols])


# A file's bytes damaged: (data, a position in [0, 1), bytes drawn, where the header ends) → the new bytes;
# "header overwritten" places the bytes in a safetensors header, or a GGUF's metadata and tensor table.
FILE_DAMAGES = {
    "truncated": lambda data, at, new, head: data[: int(at * len(data))],
    "emptied": lambda data, at, new, head: b"",
    "header overwritten": lambda data, at, new, head: overwrite(data, int(at * head), new),
    "bytes overwritten": lambda data, at, new, head: overwrite(data, int(at * len(data)), new),
    "bytes appended": lambda data, at, new, head: data + new,
}
SAFETENSORS_DAMAGES = {
    "header json corrupted": lambda data, at, new, head: overwrite(data, 8 + int(at * (head - 8)), new[:1]),
    "tensor reshaped": lambda data, at, new, head: reshape(data, int(at * 1000), same_size=True),
    "tensor resized": lambda data, at, new, head: reshape(data, int(at * 1000), same_size=False),
}
INDEX_DAMAGES = {  # the shard index of a sharded model
    "shard removed": None,
    "index truncated": lambda text, at: text[: int(at * len(text))],
    "index names a missing shard": lambda text, at: text.replace("-00002-of-", "-00007-of-"),
    "index without weight_map": lambda text, at: '{"metadata": {"total_size": 1}}',
    "index not an object": lambda text, at: "[1, 2]",
}
WEIGHT_COMMANDS = {  # what loads the base model: a new run on it; the PEFT export evaluated on it as --base
    "single": [
        ["train", "{recipe}", "name=new", "model.name={model}", "train.max_steps=1"],
        ["eval", "{peft}", "--base", "{model}"],
    ],
    "gguf": [["train", "{recipe}", "name=new", "model.name={model}", "model.gguf_file=tiny.gguf", "train.max_steps=1"]],
}
WEIGHT_COMMANDS["sharded"] = WEIGHT_COMMANDS["single"]


@st.composite
def weights_case(draw):
    layout = draw(st.sampled_from(sorted(WEIGHT_COMMANDS)))
    kinds = sorted(FILE_DAMAGES) + (sorted(SAFETENSORS_DAMAGES) if layout != "gguf" else [])
    kinds += sorted(INDEX_DAMAGES) if layout == "sharded" else []
    how = draw(st.sampled_from(kinds))
    at = draw(st.floats(0, 1, exclude_max=True))
    new = draw(st.binary(min_size=1, max_size=16))
    return layout, how, at, new, draw(st.integers(0, 2)), draw(st.sampled_from(WEIGHT_COMMANDS[layout]))


def damage_weights(model: Path, layout: str, how: str, at: float, new: bytes, shard: int) -> None:
    """One weight file of the model copy damaged: the GGUF, the single file, or the shard-th shard or the index."""
    index = model / "model.safetensors.index.json"
    if how in INDEX_DAMAGES:
        if INDEX_DAMAGES[how] is None:
            sorted(model.glob("model-*.safetensors"))[shard % 3].unlink()
        else:
            index.write_text(INDEX_DAMAGES[how](index.read_text(), at))
        return
    shards = sorted(model.glob("model-*.safetensors"))
    path = {"gguf": model / "tiny.gguf", "single": model / "model.safetensors"}.get(layout) or shards[shard % 3]
    data = path.read_bytes()
    head = gguf_header_end(path) if layout == "gguf" else header_end(data)
    path.write_bytes({**FILE_DAMAGES, **SAFETENSORS_DAMAGES}[how](data, at, new, head))


@fuzz("weights")
@given(case=weights_case())
def test_damaged_weight_files_are_used_or_refused_in_one_line(case, template, finished_runs, weight_sources, cli):
    """A base model whose weight files are damaged, loaded to train on or as an export's base: a model that
    loads (the damage was in tensor data) trains, or the export is refused for its weights; anything else
    is refused in one line naming the file."""
    layout, how, at, new, shard, command = case
    with example_world(template) as w, mock.patch.dict(os.environ, {"LRFT_CACHE_DIR": str(w / "cache")}):
        model = w / "damaged-model"
        shutil.copytree(weight_sources[layout], model)
        damage_weights(model, layout, how, at, new, shard)
        args = [a.format(recipe=w / "good.yaml", model=model, peft=w / "peft") for a in command]
        outputs, own = places(args, w)
        outcome = run(cli, w, finished_runs, args)
        check(outcome, [*outputs, w / "cache"], own)
        if how in INDEX_DAMAGES or how in ("truncated", "emptied", "tensor resized"):
            assert outcome.code == 2, f"{how} {layout} weights were used: {outcome.err}"
