"""`lrft sweep` on the tiny BERT: grid and TPE sweeps, pruning, resuming a killed sweep, --plan, --report of
runs trained elsewhere, two workers on one storage, the smallest-adapter answer, bad specs, the shipped specs.

The sweeps train on one-class data (every sentence labelled 0, as its dev set) and search the eval loss:
gradient descent on the task's own objective lowers it faster the larger the learning rate (1e-2 <
3e-2 at these step counts) and not at all at 1e-9, whatever the adapter's rank, so which point is
best, worse than the median or smallest-within-tolerance holds by construction, with wide margins.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
import time
from pathlib import Path

import optuna
import pytest
import yaml

from lrft.sweep.report import Row, smallest_within
from lrft.sweep.spec import display_path, load_sweep
from lrft.sweep.study import counted, grid_order, open_study
from tests.helpers import ROOT, lrft, make_sentences, recipe_dict, write_recipe, write_splits

GOOD, BETTER, STUCK = 1e-2, 3e-2, 1e-9  # learning rates
# a killed worker's trial is stale 4 s after its last beat; a live one beats every second, loaded or not
QUICK_HEARTBEAT = {"interval": 1, "grace": 4}
VOLATILE = ("minutes", "command", "run_dir")  # report fields that differ between two copies of a sweep


def one_class(n: int, seed: int) -> list[dict]:
    return [{**r, "label": 0} for r in make_sentences(n, seed)]


@pytest.fixture(scope="module")
def base_recipe(tmp_path_factory, tiny_model_dir) -> Path:
    return write_base_recipe(tmp_path_factory.mktemp("sweep"), tiny_model_dir)


def write_base_recipe(root: Path, tiny_model_dir: Path) -> Path:
    """The tiny lora recipe on one-class data: 4 steps an epoch, 2 epochs, runs under <root>/runs."""
    data = write_splits(root / "data", one_class, (("train", 64, 1), ("dev", 16, 2)))
    recipe = recipe_dict(
        tiny_model_dir,
        data,
        root / "runs",
        "lora",
        "base",
        data={"label_names": ["0", "1"]},
        train={"epochs": 2, "log_every": 100},
    )
    return write_recipe(root / "base.yaml", recipe)


def write_spec(path: Path, base: Path, **fields) -> Path:
    spec = {"recipe": str(base), "objective": "loss", **fields}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def report(cli, *args) -> dict:
    code, out, err = cli("sweep", *args, "--report", "--json")
    assert code == 0, err
    return json.loads(out)


def snapshot(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def stable(rows: list[dict]) -> list[dict]:
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items() if k not in VOLATILE} for r in rows]


def trained(err: str) -> list[str]:
    """The points a sweep's log says it trained (their first seed), in order."""
    return re.findall(r"trial \d+ \((\S+)\): training seed", err)


def trials(spec: Path, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    """Every trial of the spec's study, as lrft opens it (the sweep dir's SQLite, or `storage`)."""
    study = open_study(load_sweep(spec, storage), create=False)
    assert study is not None, f"{spec}: no study"
    return study.get_trials()


def ordered_spec(path: Path, base: Path, last: str, **fields) -> Path:
    """A grid spec over (GOOD, BETTER, STUCK) with a sampler seed that makes the point `last` run third."""
    for seed in range(100):
        spec = write_spec(path, base, search={"train.lr": [GOOD, BETTER, STUCK]}, sampler={"seed": seed}, **fields)
        if grid_order(load_sweep(spec))[-1].name == last:
            return spec
    raise AssertionError("no sampler seed puts it last")


def sweep_in_process(spec: Path) -> str:
    """`lrft sweep SPEC` for module fixtures (the `cli` fixture is per test); its log."""
    from typer.testing import CliRunner

    from lrft.cli import app

    result = CliRunner().invoke(app, ["sweep", str(spec)])
    assert result.exit_code == 0, result.stderr
    return result.stderr


PRUNED_GRID = {"pruner": {"type": "median", "startup_trials": 2}}


@pytest.fixture(scope="module")
def pruned_sweep(base_recipe) -> tuple[Path, str]:
    """A finished grid sweep whose third point (lr 1e-9) the median pruner stops at epoch 1: (spec, log)."""
    spec = ordered_spec(base_recipe.parent / "pruned.yaml", base_recipe, "lr1e-9", **PRUNED_GRID)
    return spec, sweep_in_process(spec)


@pytest.fixture(scope="module")
def grid_sweep(base_recipe) -> Path:
    """A finished 2 × 2 grid (lr × rank) of 1-epoch runs."""
    spec = write_spec(
        base_recipe.parent / "grid.yaml",
        base_recipe,
        overrides={"train.epochs": 1},
        search={"train.lr": [GOOD, BETTER], "adapter.params.rank": [1, 4]},
    )
    sweep_in_process(spec)
    return spec


# ------------------------------------------------------------------------------------------ grid


def test_a_grid_sweep_trains_every_point_into_an_ordinary_run_dir(cli, grid_sweep):
    sweep_dir = grid_sweep.parent / "runs" / "grid"
    names = ["lr1e-2_rank1", "lr1e-2_rank4", "lr3e-2_rank1", "lr3e-2_rank4"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [f"{n}_s0" for n in names]
    result = report(cli, grid_sweep)
    assert [r["point"] for r in result["rows"]] == names  # the order the spec lists them
    for row in result["rows"]:
        summary = json.loads((sweep_dir / f"{row['point']}_s0" / "summary.json").read_text())
        assert row["status"] == "done" and row["seeds"] == [0] and row["values"] == [summary["final"]["loss"]]
        assert row["trainable"] == summary["trainable_params"] == 4 * 64 * row["settings"]["adapter.params.rank"]
        assert summary["steps"] == 4 and summary["best"]["step"] == 4
    assert [t.state.name for t in trials(grid_sweep)] == ["COMPLETE"] * 4
    assert result["best"]["settings"]["train.lr"] == BETTER
    code, out, err = cli("eval", sweep_dir / "lr3e-2_rank1_s0", "--json")  # an ordinary run dir
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(result["rows"][2]["values"][0], rel=1e-5)
    code, _, err = cli("sweep", grid_sweep)  # done: nothing trains again
    assert code == 0 and trained(err) == [] and "sweep grid: no new trial" in err, err


def test_the_report_renders_as_text_markdown_and_a_pareto_plot(cli, grid_sweep, tmp_path):
    code, out, _ = cli("sweep", grid_sweep, "--report")
    assert code == 0 and out.splitlines()[0].split() == ["settings", "trainable", "loss", "seeds", "status", "min/run"]
    assert "smallest adapter within 1 of the best: lr=3e-2 rank=1, 256 trainable parameters" in out
    assert "lrft train " in out and "name=lr3e-2_rank1_s0" in out
    plot = tmp_path / "docs" / "pareto.png"
    code, out, _ = cli("sweep", grid_sweep, "--report", "--markdown", "--plot", plot)
    assert code == 0 and out.startswith("### Sweep grid: loss on text-classification")
    assert "| settings | trainable | loss | seeds | status | min/run |" in out
    assert f"![loss against trainable parameters]({display_path(plot)})" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------- the answer


def test_the_smallest_adapter_within_the_tolerance(cli, grid_sweep):
    """lr 3e-2 beats 1e-2 by far; rank hardly matters (the loss is the head's): within 0.05 the smallest
    is rank 1 at lr 3e-2; with no tolerance, the best itself."""
    close = report(cli, grid_sweep, "--tolerance", "0.05")
    assert close["smallest"]["point"] == "lr3e-2_rank1"
    exact = report(cli, grid_sweep, "--tolerance", "0")
    assert exact["smallest"]["point"] == exact["best"]["point"]
    assert exact["best"]["values"][0] == min(r["values"][0] for r in exact["rows"])


def row(point: str, trainable: int, mean: float) -> Row:
    return Row("s", point, {}, point, "done", "", [0], [mean], trainable, [trainable] * 2, None, "", "")


@pytest.mark.parametrize(
    ("tolerance", "direction", "scale", "expected"),
    [
        (1.0, "max", 100, "mid"),  # 79.5 is within 1 point of 80.0, 70.0 is not
        (0.4, "max", 100, "big"),
        (10.0, "max", 100, "small"),  # exactly 10 points below counts as within
        (0.06, "min", 1, "mid"),  # loss: 0.55 within 0.06 of 0.5
    ],
)
def test_smallest_within_picks_the_fewest_parameters_near_the_best(tolerance, direction, scale, expected):
    rows = [row("big", 1000, 0.80), row("mid", 100, 0.795), row("small", 10, 0.70)]
    if direction == "min":
        rows = [row("big", 1000, 0.5), row("mid", 100, 0.55), row("small", 10, 0.9)]
    assert smallest_within(rows, tolerance, direction, scale).point == expected


# ------------------------------------------------------------------------------------- pruning


def test_a_point_worse_than_the_median_at_epoch_1_is_pruned_and_stays_pruned(cli, pruned_sweep):
    spec, log = pruned_sweep
    sweep_dir = spec.parent / "runs" / "pruned"
    assert trained(log)[-1] == "lr1e-9" and "trial 2 (lr1e-9): pruned at epoch 1" in log
    states = {t.user_attrs["point"]: t for t in trials(spec)}
    assert {p: t.state.name for p, t in states.items()} == {
        "lr1e-2": "COMPLETE",
        "lr3e-2": "COMPLETE",
        "lr1e-9": "PRUNED",
    }
    assert list(states["lr1e-9"].intermediate_values) == [1] and list(states["lr1e-2"].intermediate_values) == [1, 2]
    pruned = sweep_dir / "lr1e-9_s0"
    assert json.loads((pruned / "pruned.json").read_text())["epoch"] == 1
    assert [p.name for p in (pruned / "checkpoints").iterdir()] == ["step-000000004"]  # kept, resumable
    assert not (pruned / "summary.json").exists() and not (pruned / "adapter").exists()
    rows = {r["point"]: r for r in report(cli, spec)["rows"]}
    # the note is the epoch-1 value the pruner judged (the head, at train.head_lr's floor, learns even here)
    assert rows["lr1e-9"]["status"] == "pruned"
    assert rows["lr1e-9"]["note"] == f"epoch 1: {states['lr1e-9'].intermediate_values[1]:.4f}"
    before = {p: p.read_bytes() for p in pruned.rglob("*") if p.is_file()}
    code, _, err = cli("sweep", spec)
    assert code == 0 and trained(err) == [], err
    assert {p: p.read_bytes() for p in pruned.rglob("*") if p.is_file()} == before
    assert [t.state.name for t in trials(spec)][-1] == "PRUNED"


def test_no_point_is_pruned_at_its_last_epoch(cli, base_recipe, tmp_path):
    """The point the two-epoch sweep prunes at epoch 1 trains to the end when epoch 1 is its last."""
    spec = ordered_spec(tmp_path / "short.yaml", base_recipe, "lr1e-9", overrides={"train.epochs": 1}, **PRUNED_GRID)
    code, _, err = cli("sweep", spec)
    assert code == 0 and "pruned" not in err, err
    assert [t.state.name for t in trials(spec)] == ["COMPLETE"] * 3


def test_a_sweep_begun_with_another_spec_is_refused(cli, pruned_sweep, tmp_path):
    spec, _ = pruned_sweep
    changed = yaml.safe_load(spec.read_text())
    changed["search"]["train.lr"] = [GOOD, BETTER]
    other = tmp_path / "pruned.yaml"
    other.write_text(yaml.safe_dump(changed))
    code, _, err = cli("sweep", other)
    assert code == 2 and "was begun with another spec or base recipe (spec.search.train.lr" in err, err


def test_a_base_recipe_changed_only_where_every_run_sets_its_own_value_still_resumes(cli, base_recipe, tmp_path):
    """The base lr of an lr sweep, its seed and name reach no run: retuning them keeps the sweep; any other
    change of the base recipe is refused."""
    recipe = yaml.safe_load(base_recipe.read_text())
    base = write_recipe(tmp_path / "base.yaml", recipe)
    spec = write_spec(
        tmp_path / "one.yaml",
        base,
        overrides={"train.epochs": 1, "output.dir": str(tmp_path / "runs")},
        search={"train.lr": [GOOD]},
    )
    code, _, err = cli("sweep", spec)
    assert code == 0 and trained(err) == ["lr1e-2"], err
    write_recipe(base, {**recipe, "seed": 7, "name": "retuned", "train": {**recipe["train"], "lr": 0.5}})
    code, _, err = cli("sweep", spec)
    assert code == 0 and trained(err) == [], err
    write_recipe(base, {**recipe, "train": {**recipe["train"], "batch_size": 2}})
    code, _, err = cli("sweep", spec)
    assert code == 2 and "another spec or base recipe (recipe.train.batch_size changed)" in err, err


# -------------------------------------------------------------------------------------- resume


def test_a_killed_sweep_resumes_to_the_table_of_an_uninterrupted_one(cli, pruned_sweep, base_recipe, tmp_path):
    spec, _ = pruned_sweep
    raw = yaml.safe_load(spec.read_text())
    raw["overrides"] = {"output.dir": str(tmp_path / "runs")}
    raw["heartbeat"] = QUICK_HEARTBEAT
    killed = tmp_path / "pruned.yaml"
    killed.write_text(yaml.safe_dump(raw))
    died = lrft("sweep", killed, patch=("sigkill", 14))  # trial 0: steps 1-8; trial 1: killed after its 6th
    assert died.returncode == -9, died.stderr[-2000:]
    assert trained(died.stderr) == trained(pruned_sweep[1])[:2]
    time.sleep(QUICK_HEARTBEAT["grace"] + 1)  # its heartbeat is stale: the rerun's first ask retries it
    code, _, err = cli("sweep", killed)
    assert code == 0, err
    interrupted = trained(pruned_sweep[1])[1]
    assert f"({interrupted}): trial 1 again (its worker stopped)" in err and "resuming from step-000000004" in err
    assert trained(err) == trained(pruned_sweep[1])[1:]  # the finished trial is kept
    assert stable(report(cli, killed)["rows"]) == stable(report(cli, spec)["rows"])


def test_a_sweep_stopped_by_a_signal_queues_its_trial_for_the_rerun_at_once(cli, base_recipe, tmp_path):
    """SIGTERM (a scheduler's pre-emption) checkpoints the run and queues the trial again, so the rerun
    trains it first without waiting for its heartbeat to go stale (default grace: 60 s)."""
    spec = write_spec(
        tmp_path / "term.yaml",
        base_recipe,
        overrides={"output.dir": str(tmp_path / "runs")},
        search={"train.lr": [GOOD, BETTER]},
    )
    stopped = lrft("sweep", spec, patch=("sigterm", 6))
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert [t.state.name for t in trials(spec)] == ["FAIL", "WAITING"]
    point = trained(stopped.stderr)[0]
    code, _, err = cli("sweep", spec)
    assert code == 0, err
    assert f"trial 1 ({point}): trial 0 again" in err and "resuming from step-000000006" in err, err
    assert trained(err)[0] == point and len(trained(err)) == 2
    assert [t.state.name for t in trials(spec)] == ["FAIL", "COMPLETE", "COMPLETE"]


# --------------------------------------------------------------------------------------- sampling


def test_a_tpe_sweep_is_deterministic_in_its_seed(cli, base_recipe, tmp_path):
    fields = dict(
        search={"train.lr": {"low": 1e-3, "high": 1e-1, "log": True}, "adapter.params.rank": {"low": 1, "high": 4}},
        sampler={"type": "tpe", "seed": 7, "startup_trials": 2},
        budget={"trials": 3},
    )
    points = []
    for copy in ("a", "b"):
        spec = write_spec(
            tmp_path / "tpe.yaml",
            base_recipe,
            overrides={"train.epochs": 1, "output.dir": str(tmp_path / copy)},
            **fields,
        )
        code, _, err = cli("sweep", spec)
        assert code == 0, err
        points.append(trained(err))
        rows = report(cli, spec)["rows"]
        assert len(rows) == 3 and all(r["status"] == "done" for r in rows)
        for r in rows:
            lr, rank = r["settings"]["train.lr"], r["settings"]["adapter.params.rank"]
            assert 1e-3 <= lr <= 1e-1 and float(f"{lr:.3g}") == lr and rank in (1, 2, 3, 4)
    assert points[0] == points[1] and len(set(points[0])) == 3


# ---------------------------------------------------------------------------------- plan, report


def test_plan_prints_each_run_and_the_report_reads_runs_trained_elsewhere(cli, base_recipe, tmp_path):
    spec = write_spec(
        tmp_path / "planned.yaml",
        base_recipe,
        overrides={"train.epochs": 1},
        search={"train.lr": [GOOD, BETTER]},
        seeds=[0, 1],
        confirm={"top": 1, "seeds": [2]},
    )
    code, out, err = cli("sweep", spec, "--plan")
    commands = out.splitlines()
    assert code == 0 and len(commands) == 4 and "once these runs are done, --plan again adds the best 1" in err
    assert all(shlex.split(c)[:3] == ["lrft", "train", display_path(base_recipe)] for c in commands)
    assert sorted(re.search(r"name=(\S+)", c)[1] for c in commands) == [
        "lr1e-2_s0",
        "lr1e-2_s1",
        "lr3e-2_s0",
        "lr3e-2_s1",
    ]
    sweep_dir = tmp_path / "runs" / "planned"
    assert not sweep_dir.exists()  # a grid's plan needs no storage
    for command in commands:  # a job array, here in turn
        code, _, err = cli(*shlex.split(command)[1:])
        assert code == 0, err
    rows = report(cli, spec)["rows"]
    assert [(r["point"], r["seeds"], r["status"]) for r in rows] == [
        ("lr1e-2", [0, 1], "done"),
        ("lr3e-2", [0, 1], "done"),
    ]
    assert rows[1]["sd"] is not None and not (sweep_dir / "sweep.db").exists()
    code, out, _ = cli("sweep", spec, "--plan")
    confirm = out.splitlines()[4:]
    assert code == 0 and len(confirm) == 1 and "seed=2 name=lr3e-2_s2" in confirm[0]  # the best point, seed 2
    code, _, err = cli("sweep", spec)  # the worker finds the runs done and confirms the best
    assert code == 0 and "is complete" in err and "confirm lr3e-2: training seed 2" in err, err
    assert [r["seeds"] for r in report(cli, spec)["rows"]] == [[0, 1], [0, 1, 2]]


def test_a_tpe_plan_records_its_suggestions_for_the_workers(cli, base_recipe, tmp_path):
    spec = write_spec(
        tmp_path / "tpeplan.yaml",
        base_recipe,
        overrides={"train.epochs": 1},
        search={"train.lr": {"low": 1e-3, "high": 1e-1, "log": True}},
        sampler={"type": "tpe", "seed": 3},
        budget={"trials": 2},
    )
    code, out, _ = cli("sweep", spec, "--plan")
    assert code == 0 and len(out.splitlines()) == 2
    assert [t.state.name for t in trials(spec)] == ["FAIL", "FAIL", "WAITING", "WAITING"]  # asked, queued
    assert cli("sweep", spec, "--plan")[1] == out  # the same suggestions, not new ones
    code, _, err = cli("sweep", spec)
    planned = [re.search(r"name=(\S+)_s0", c)[1] for c in out.splitlines()]
    assert code == 0 and trained(err) == planned, err
    assert [t.state.name for t in trials(spec)] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]


# -------------------------------------------------------------------------------------- workers


def test_two_workers_on_one_storage_run_each_trial_once(base_recipe, tmp_path):
    spec = write_spec(
        tmp_path / "shared.yaml",
        base_recipe,
        overrides={"train.epochs": 1},
        search={"train.lr": [GOOD, BETTER], "adapter.params.rank": [1, 4]},
    )
    done = lrft("sweep", spec, "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 workers done: exit codes [0, 0]" in done.stderr
    points = [p.name for p in load_sweep(spec).grid_points()]
    assert sorted(trained(done.stderr)) == sorted(points)  # each once, by one worker or the other
    assert "is complete" not in done.stderr and "resuming" not in done.stderr
    # a worker asking while the other's last trial runs gets an over-budget trial, left untrained
    search = counted(trials(spec))
    assert sorted(t.user_attrs["point"] for t in search) == sorted(points)
    assert {t.state.name for t in search} == {"COMPLETE"}


def test_a_diverging_point_fails_and_the_sweep_goes_on(cli, base_recipe, tmp_path):
    spec = write_spec(
        tmp_path / "wild.yaml", base_recipe, overrides={"train.epochs": 1}, search={"train.lr": [GOOD, 1e30]}
    )
    code, _, err = cli("sweep", spec)
    assert code == 0 and "failed: train: the loss became nan" in err, err
    rows = {r["point"]: r for r in report(cli, spec)["rows"]}
    assert rows["lr1e30"]["status"] == "failed" and "the loss became nan" in rows["lr1e30"]["note"]
    assert rows["lr1e-2"]["status"] == "done"


# ------------------------------------------------------------------------------------- bad specs

BAD_SPECS = {
    "unknown key": ({"serch": {}}, ["serch: unknown key", "did you mean 'search'"]),
    "unknown range key": (
        {"search": {"train.lr": {"low": 1e-3, "hgh": 1e-1}}},
        ["search.train.lr.hgh: unknown key", "did you mean 'high'"],
    ),
    "low above high": (
        {"search": {"train.lr": {"low": 1e-1, "high": 1e-3}}, "budget": {"trials": 2}},
        ["search.train.lr: low (0.1) must be below high (0.001)"],
    ),
    "range on a grid": (
        {"search": {"train.lr": {"low": 1e-3, "high": 1e-1}}, "sampler": "grid"},
        ["search.train.lr: the grid sampler tries listed values", "sampler: tpe"],
    ),
    "tpe without a budget": (
        {"search": {"train.lr": [1e-3]}, "sampler": "tpe"},
        ["budget: a tpe sampler needs budget.trials or budget.minutes"],
    ),
    "range without a budget": (
        {"search": {"train.lr": {"low": 1e-3, "high": 1e-1}}},
        ["budget: a tpe sampler needs budget.trials or budget.minutes"],
    ),
    "unknown recipe key": (
        {"search": {"train.lrr": [1e-3]}},
        ["point lrr=1e-3", "train.lrr: unknown key", "did you mean 'lr'"],
    ),
    "bad value for the recipe": (
        {"search": {"train.epochs": [0]}},
        ["point epochs=0", "train.epochs", "greater than 0"],
    ),
    "unknown metric": (
        {"objective": "acuracy"},
        ["objective.metric: text-classification reports", "not 'acuracy'", "did you mean 'accuracy'"],
    ),
    "seed searched": ({"search": {"seed": [1, 2]}}, ["search.seed: a sweep sets seed itself", "seeds:"]),
    "name overridden": ({"overrides": {"name": "x"}}, ["overrides.name: a sweep sets it itself"]),
    "same label twice": (
        {"search": {"train.lr": [0.01, 0.0100001]}},
        ["search.train.lr:", "would both name runs '1e-2'"],
    ),
    "pruner field of another pruner": (
        {"pruner": {"type": "median", "min_epochs": 2}},
        ["pruner.min_epochs: applies to a successive-halving pruner, not median"],
    ),
    "missing recipe": ({"recipe": "nowhere.yaml"}, ["recipe: no file at", "nowhere.yaml", "relative to the spec file"]),
    "not a mapping": ("- a\n", ["a sweep spec is a YAML mapping"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_spec_is_one_error_line_and_writes_nothing(cli, base_recipe, tmp_path, case):
    fields, words = BAD_SPECS[case]
    spec = tmp_path / "bad.yaml"
    if isinstance(fields, str):
        spec.write_text(fields)
    else:
        spec.write_text(yaml.safe_dump({"recipe": str(base_recipe), "objective": "loss", **fields}))
    before = snapshot(tmp_path, base_recipe.parent)
    code, out, err = cli("sweep", spec)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), lines[0]
    assert snapshot(tmp_path, base_recipe.parent) == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--plan", "--report"], "--plan prints commands only"),
        (["--report", "--workers", "2"], "--workers trains a sweep"),
        (["--markdown", "--json"], "--markdown and --json: choose one"),
        (["--report", "--plot", "."], "--plot: . is a directory"),
    ],
)
def test_conflicting_options_are_one_error_line(cli, base_recipe, tmp_path, args, words):
    spec = write_spec(tmp_path / "ok.yaml", base_recipe, search={"train.lr": [GOOD]})
    code, _, err = cli("sweep", spec, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


def test_sweeps_given_together_share_a_task_and_a_metric(cli, base_recipe, tmp_path):
    first = write_spec(tmp_path / "a.yaml", base_recipe, search={"train.lr": [GOOD]})
    second = write_spec(tmp_path / "b.yaml", base_recipe, search={"train.lr": [GOOD]}, objective="accuracy")
    code, _, err = cli("sweep", first, second)
    assert code == 2 and "sweeps given together are reported together" in err and "separate commands" in err, err
    assert not (tmp_path / "runs").exists() and not (base_recipe.parent / "runs" / "a").exists()


# --------------------------------------------------------------------------------- shipped specs

SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))


def test_there_are_shipped_specs():
    assert len(SHIPPED) >= 24


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_spec_validates_and_states_its_cost(path):
    sweep = load_sweep(path)
    assert sweep.base.model.name == "minilm" and sweep.task.name in ("glue/mrpc", "glue/sst2")
    assert "cost:" in path.read_text() and "min" in path.read_text()
    if sweep.task.name == "glue/sst2":
        assert sweep.base.data.max_train_samples is not None  # subsampled, as its comment says


# --------------------------------------------------------------------- the claims in RESULTS.md


def point(values: list[float], trainable: int) -> dict:
    """A point as the report gives it (report.as_json): its values, their mean and sample sd."""
    return {
        "values": values,
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "trainable": trainable,
    }


LORA = point([0.77, 0.78, 0.76], 73_728)  # 77.0 ± 1.0: two standard errors of a 3-seed difference ≈ 1.6 points


@pytest.mark.parametrize(
    ("values", "trainable", "least", "share", "expected"),
    [
        ([0.77, 0.78, 0.76], 780, -2.0, 1.0, "holds"),  # as good as LoRA: 2 points clear of the bound
        ([0.71, 0.72, 0.70], 780, -2.0, 1.0, "does not hold"),  # 6 points under
        ([0.75, 0.76, 0.74], 780, -2.0, 1.0, "not settled by 3 seeds"),  # 2 points under: the bound itself
        ([0.80, 0.80, 0.80], 73_728, -2.0, 0.1, "does not hold: too many parameters"),
        ([0.80], 780, -2.0, 1.0, "not settled: one seed"),
        ([0.79, 0.80, 0.81], 30_000, 0.0, 0.5, "holds"),  # talora's: 3 points over at 0.41× the parameters
    ],
)
def test_a_claim_holds_fails_or_is_not_settled_by_two_standard_errors(values, trainable, least, share, expected):
    import runpy

    results = runpy.run_path(str(ROOT / "bench" / "results.py"), run_name="bench")
    said, difference = results["verdict"](point(values, trainable), LORA, least, share, 100)
    assert said.startswith(expected)
    assert difference == pytest.approx((point(values, trainable)["mean"] - LORA["mean"]) * 100)


def test_the_head_defaults_table_pairs_before_and_after_runs(tmp_path):
    import runpy

    results = runpy.run_path(str(ROOT / "bench" / "results.py"), run_name="bench")
    for name, metric, value in [
        ("stsb_lora_1ep_before_s42", "pearson", -0.0334),
        ("stsb_lora_1ep_after_s42", "pearson", 0.7372),
        ("stsb_lora_1ep_after_s1", "pearson", 0.7128),
        ("mrpc_lora_3ep_after_s42", "accuracy", 0.7721),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"final": {metric: value}}))
    rows = [line for line in results["heads_section"](tmp_path) if line.startswith("| ")][2:]
    assert [row.split(" | ")[:7] for row in rows] == [
        ["| mrpc lora", "3", "accuracy (%)", "—", "—", "77.2", "42"],
        ["| stsb lora", "1", "Pearson", "-0.033", "42", "0.725 ± 0.017", "1, 42"],
    ]
    assert "data.task=glue/stsb" in rows[1] and "train.epochs=1" in rows[1]
