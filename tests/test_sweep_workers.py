"""`lrft sweep` workers on shared storages: a real PostgreSQL server and optuna's journal file.

Each worker is a separate `lrft sweep` process (its own process group and working dir) that shares
only the storage URL and the output dir with the others, as a job array's tasks on a cluster do.
Checked on both storages: two workers finish a 6-point grid with pruning, each point trained once,
to the table one worker makes; a worker SIGKILLed mid-trial has its trial retried by the other
(heartbeats), which resumes the run; TPE with two workers loses and duplicates no trial; a report
from the storage alone (no run dir here) equals the one from the run dirs, and no run dir or log holds
the password. `--workers 2 --storage URL` shares one study; the URL's source order (flag, environment,
spec, the sweep dir); bad storage URLs are one line each, the password masked.

The PostgreSQL tests need a server: `.ci/postgres start DIR` prints a URL for $LRFT_TEST_POSTGRES
(CI does this and sets LRFT_REQUIRE_POSTGRES=1, so there they fail rather than skip).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from lrft.sweep.spec import load_sweep
from lrft.sweep.storage import masked
from lrft.sweep.study import OVER_BUDGET, counted, grid_order
from tests.helpers import lrft_command
from tests.test_sweep import (
    BETTER,
    GOOD,
    QUICK_HEARTBEAT,
    STUCK,
    report,
    stable,
    trained,
    trials,
    write_base_recipe,
    write_spec,
)

PG_ENV = "LRFT_TEST_POSTGRES"
PASSWORD = "lrft-test-password"  # .ci/postgres's; never in an lrft message


@pytest.fixture(scope="module")
def base_recipe(tmp_path_factory, tiny_model_dir) -> Path:
    return write_base_recipe(tmp_path_factory.mktemp("workers"), tiny_model_dir)


def server_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("LRFT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"LRFT_REQUIRE_POSTGRES=1 but ${PG_ENV} is not set: .ci/postgres start DIR prints it")
        pytest.skip(f"no PostgreSQL server: start one with `.ci/postgres start DIR` and set ${PG_ENV} to its URL")
    return url


@pytest.fixture
def pg_url():
    """A fresh database on the test server (dropped afterwards), as a storage URL."""
    import psycopg

    url = server_url()
    name = f"sweep_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        yield url.rsplit("/", 1)[0] + f"/{name}"
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["postgresql", "journal"])
def storage(request, tmp_path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    (tmp_path / "shared").mkdir()
    return f"journal:{tmp_path / 'shared' / 'studies.log'}"


def start_worker(spec: Path, storage: str, home: Path, patch: tuple[str, int] | None = None) -> subprocess.Popen:
    """One `lrft sweep SPEC --storage URL` in its own process group and working dir, one thread."""
    home.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (home / "stderr.log").open("w")
    return subprocess.Popen(
        lrft_command("sweep", spec, "--storage", storage, patch=patch),
        cwd=home,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )


def finish(*workers: subprocess.Popen, timeout: float = 300) -> list[int]:
    return [w.wait(timeout=timeout) for w in workers]


def log_of(home: Path) -> str:
    return (home / "stderr.log").read_text()


def shared_fields(runs: Path) -> dict:
    """A spec's fields for workers sharing a storage: runs under `runs`, a dead worker found in seconds."""
    return {"overrides": {"output.dir": str(runs)}, "heartbeat": QUICK_HEARTBEAT}


def one_workers_rows(cli, spec: Path, runs: Path) -> list[dict]:
    """The report rows of the same spec swept by one worker, in its own sweep dir and SQLite storage."""
    alone = runs.parent / "alone" / spec.name
    alone.parent.mkdir()
    alone.write_text(spec.read_text().replace(str(runs), str(runs.parent / "alone" / "runs")))
    code, _, err = cli("sweep", alone)
    assert code == 0, err
    return stable(report(cli, alone)["rows"])


def grid_with_stuck_last(path: Path, base: Path, **fields) -> Path:
    """A 6-point grid whose lr 1e-9 points are tried last, and whose other key (log_every) changes no
    number: the three lr 1e-2 points train alike, so none is worse than their median and none is ever
    pruned, and each lr 1e-9 point is judged once two trials have finished (of the three asked before
    it, at most one still runs) against a median of lr 1e-2 values, and pruned, however the workers
    interleave."""
    for seed in range(200):
        spec = write_spec(
            path,
            base,
            search={"train.lr": [GOOD, STUCK], "train.log_every": [100, 101, 102]},
            sampler={"seed": seed},
            **fields,
        )
        if all(p.name.startswith("lr1e-9") for p in grid_order(load_sweep(spec))[3:]):
            return spec
    raise AssertionError("no sampler seed puts lr 1e-9 last")


# ------------------------------------------------------------------------------------------ grid


def test_two_workers_finish_a_pruned_grid_to_the_table_of_one(cli, base_recipe, tmp_path, storage):
    runs = tmp_path / "runs"
    spec = grid_with_stuck_last(
        tmp_path / "grid6.yaml", base_recipe, pruner={"type": "median", "startup_trials": 2}, **shared_fields(runs)
    )
    a, b = start_worker(spec, storage, tmp_path / "a"), start_worker(spec, storage, tmp_path / "b")
    assert finish(a, b) == [0, 0], log_of(tmp_path / "a")[-3000:] + log_of(tmp_path / "b")[-3000:]
    logs = [log_of(tmp_path / "a"), log_of(tmp_path / "b")]
    both = trained(logs[0]) + trained(logs[1])
    assert sorted(both) == sorted(p.name for p in load_sweep(spec).grid_points()), logs  # each point once
    assert all(trained(log) for log in logs), "one worker trained everything"
    shared = report(cli, spec, "--storage", storage)
    assert {r["point"]: r["status"] for r in shared["rows"]} == {
        f"lr{lr}_log_every{n}": status for lr, status in (("1e-2", "done"), ("1e-9", "pruned")) for n in (100, 101, 102)
    }
    assert stable(shared["rows"]) == one_workers_rows(cli, spec, runs)
    written = [f for d in (runs, tmp_path / "a", tmp_path / "b") for f in d.rglob("*") if f.is_file()]
    assert not [f for f in written if PASSWORD.encode() in f.read_bytes()]  # no credential in a run dir or log
    # the storage alone reports the same table: the run dirs moved where this machine cannot see them
    shutil.move(runs, tmp_path / "elsewhere")
    assert stable(report(cli, spec, "--storage", storage)["rows"]) == stable(shared["rows"])


# -------------------------------------------------------------------------------------- a kill


def test_a_killed_workers_trial_is_retried_by_the_other_which_resumes_it(cli, base_recipe, tmp_path, storage):
    runs = tmp_path / "runs"
    spec = write_spec(
        tmp_path / "kill.yaml", base_recipe, search={"train.lr": [GOOD, BETTER, 2e-2, 5e-3]}, **shared_fields(runs)
    )
    # a: killed after its 6th step (its first trial: epoch 1 checkpointed at step 4); b: the rest, then a's
    a = start_worker(spec, storage, tmp_path / "a", patch=("sigkill", 6))
    b = start_worker(spec, storage, tmp_path / "b")
    assert finish(a, b) == [-9, 0], log_of(tmp_path / "b")[-3000:]
    killed = trained(log_of(tmp_path / "a"))
    assert len(killed) == 1, log_of(tmp_path / "a")
    log = log_of(tmp_path / "b")
    retry = re.search(rf"trial (\d+) \({killed[0]}\): trial \d+ again \(its worker stopped\)", log)
    assert retry and "resuming from step-000000004" in log, log
    assert sorted(trained(log)) == sorted(p.name for p in load_sweep(spec).grid_points())  # a's point again
    states = [t.state.name for t in counted(trials(spec, storage))]
    assert states == ["COMPLETE"] * 4, states
    assert stable(report(cli, spec, "--storage", storage)["rows"]) == one_workers_rows(cli, spec, runs)


def test_workers_started_together_share_the_storage_given_on_the_command_line(tmp_path, base_recipe):
    """`--workers 2 --storage URL`: the workers get the URL through the environment (not in `ps`)."""
    spec = write_spec(
        tmp_path / "pair.yaml",
        base_recipe,
        search={"train.lr": [GOOD, BETTER]},
        **{**shared_fields(tmp_path / "runs"), "overrides": {"output.dir": str(tmp_path / "runs"), "train.epochs": 1}},
    )
    journal = f"journal:{tmp_path / 'pair.log'}"
    done = subprocess.run(
        lrft_command("sweep", spec, "--workers", "2", "--storage", journal), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "2 workers done: exit codes [0, 0]" in done.stderr, done.stderr[-3000:]
    assert sorted(t.user_attrs["point"] for t in trials(spec, journal)) == ["lr1e-2", "lr3e-2"]
    assert not (tmp_path / "runs" / "pair" / "sweep.db").exists()


# --------------------------------------------------------------------------------------- TPE


def test_tpe_with_two_workers_loses_and_duplicates_no_trial(cli, base_recipe, tmp_path, storage):
    spec = write_spec(
        tmp_path / "tpe8.yaml",
        base_recipe,
        overrides={"train.epochs": 1, "output.dir": str(tmp_path / "runs")},
        search={"train.lr": {"low": 1e-3, "high": 1e-1, "log": True}},
        sampler={"type": "tpe", "seed": 5, "startup_trials": 3},
        budget={"trials": 8},
        heartbeat=QUICK_HEARTBEAT,
    )
    a, b = start_worker(spec, storage, tmp_path / "a"), start_worker(spec, storage, tmp_path / "b")
    assert finish(a, b) == [0, 0], log_of(tmp_path / "a")[-3000:] + log_of(tmp_path / "b")[-3000:]
    everything = trials(spec, storage)
    search = counted(everything)
    assert len(search) == 8 and {t.state.name for t in search} == {"COMPLETE"}, [t.state for t in everything]
    # asked past the budget by two workers at once: left untrained, never run
    assert all(OVER_BUDGET in t.user_attrs for t in everything if t not in search)
    points = [t.user_attrs["point"] for t in search]
    both = trained(log_of(tmp_path / "a")) + trained(log_of(tmp_path / "b"))
    assert len(set(points)) == 8 and sorted(both) == sorted(points)
    rows = report(cli, spec, "--storage", storage)["rows"]
    assert len(rows) == 8 and {r["status"] for r in rows} == {"done"}


# ------------------------------------------------------------------------------------ bad input


def bad_storage_cases(tmp_path: Path) -> dict[str, tuple[str, list[str]]]:
    return {
        "unknown scheme": ("redis://localhost:6379/0", ["is not a storage lrft knows", "postgresql://USER"]),
        "unreachable server": (
            f"postgresql://lrft:{PASSWORD}@127.0.0.1:1/lrft",
            ["storage postgresql://lrft:***@127.0.0.1:1/lrft: cannot open it", "check the host, port"],
        ),
        "journal in no directory": (f"journal:{tmp_path / 'nowhere' / 'j.log'}", ["no directory", "create it first"]),
    }


@pytest.mark.parametrize("case", ["unknown scheme", "unreachable server", "journal in no directory"])
def test_a_bad_storage_is_one_error_line_with_the_password_masked(cli, base_recipe, tmp_path, case):
    url, words = bad_storage_cases(tmp_path)[case]
    spec = write_spec(
        tmp_path / "s.yaml", base_recipe, overrides={"output.dir": str(tmp_path / "runs")}, search={"train.lr": [GOOD]}
    )
    assert_one_line(cli, tmp_path, ["sweep", spec, "--storage", url], words)


def test_wrong_credentials_and_another_spec_are_one_error_line(cli, base_recipe, tmp_path, pg_url):
    spec = write_spec(
        tmp_path / "s.yaml",
        base_recipe,
        overrides={"train.epochs": 1, "output.dir": str(tmp_path / "runs")},
        search={"train.lr": [GOOD]},
    )
    wrong = pg_url.replace(f":{PASSWORD}@", ":not-the-password@")
    assert_one_line(
        cli,
        tmp_path,
        ["sweep", spec, "--storage", wrong],
        ["storage postgresql://lrft:***@", "password authentication failed", "check the host"],
    )
    code, _, err = cli("sweep", spec, "--storage", pg_url)
    assert code == 0, err
    (tmp_path / "other").mkdir()
    other = write_spec(  # the same sweep name (s), another search
        tmp_path / "other" / "s.yaml",
        base_recipe,
        overrides={"train.epochs": 1, "output.dir": str(tmp_path / "runs")},
        search={"train.lr": [BETTER]},
    )
    assert_one_line(
        cli,
        tmp_path,
        ["sweep", other, "--storage", pg_url],
        ["the sweep s in postgresql://lrft:***@", "was begun with another spec", "spec.search.train.lr"],
    )


def assert_one_line(cli, root: Path, args: list, words: list[str]) -> None:
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    code, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words) and PASSWORD not in err and "not-the-password" not in err, lines[0]
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before


def test_the_storage_is_the_flag_else_the_environment_else_the_spec_else_sqlite_in_the_sweep_dir(
    base_recipe, tmp_path, monkeypatch
):
    spec = write_spec(
        tmp_path / "where.yaml",
        base_recipe,
        overrides={"output.dir": str(tmp_path / "runs")},
        search={"train.lr": [GOOD]},
        storage="journal:from-the-spec.log",
    )
    monkeypatch.delenv("LRFT_SWEEP_STORAGE", raising=False)
    assert load_sweep(spec, "journal:from-the-flag.log").storage == "journal:from-the-flag.log"
    assert load_sweep(spec).storage == "journal:from-the-spec.log"
    monkeypatch.setenv("LRFT_SWEEP_STORAGE", "postgresql://u:pw@db:5432/sweeps")
    assert load_sweep(spec).storage == "postgresql://u:pw@db:5432/sweeps"
    spec.write_text(spec.read_text().replace("storage: journal:from-the-spec.log\n", ""))
    monkeypatch.delenv("LRFT_SWEEP_STORAGE")
    assert load_sweep(spec).storage == f"sqlite:///{(tmp_path / 'runs' / 'where' / 'sweep.db').resolve()}"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://lrft:s3cret@db:5432/x", "postgresql://lrft:***@db:5432/x"),
        ("mysql+pymysql://u:p:q@h/x and more", "mysql+pymysql://u:***@h/x and more"),
        ("postgresql://lrft@db/x", "postgresql://lrft@db/x"),  # no password
        ("sqlite:////tmp/a:b/sweep.db", "sqlite:////tmp/a:b/sweep.db"),
    ],
)
def test_a_urls_password_is_masked(text, shown):
    assert masked(text) == shown
