"""lrft.guard: what no command deletes or replaces, whatever the flags, and what `--restart` and `--force`
still may do (the refusals themselves, one line each, are rows of the bad-input catalogue)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lrft.atomic_files import atomic_dir
from lrft.errors import LrftError
from lrft.guard import check_output, check_replaceable, check_restartable, is_temporary
from lrft.run_layout import LAYOUT
from tests.helpers import snapshot


def make_run(path: Path) -> Path:
    """A dir that looks like a finished run to the guard."""
    (path / "adapter").mkdir(parents=True)
    (path / "recipe.yaml").write_text("name: x\n")
    (path / "adapter" / "adapter.safetensors").write_bytes(b"weights")
    return path


def test_atomic_dir_never_replaces_a_run_dir_or_a_dir_holding_one(tmp_path):
    run = make_run(tmp_path / "runs" / "x")
    before = snapshot(tmp_path)
    for target in (run, tmp_path / "runs"):
        with pytest.raises(LrftError, match="lrft never replaces it, whatever the flags"):
            with atomic_dir(target, overwrite=True, flag="--out") as tmp:
                (tmp / "merged.bin").write_bytes(b"merged")
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_atomic_dir_still_replaces_a_dir_of_its_own(tmp_path):
    with atomic_dir(tmp_path / "merged") as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "merged") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["b"]


def test_a_link_does_not_smuggle_a_run_dir_past_the_guard(tmp_path):
    run = make_run(tmp_path / "runs" / "x")
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(LrftError, match="is an lrft run dir"):
        check_output(tmp_path / "link", "--out")
    with pytest.raises(LrftError, match="is an lrft run dir"):
        check_replaceable(tmp_path / "link", "--out")


def test_sources_are_refused_but_the_commands_own_place_in_them_is_not(tmp_path):
    run = make_run(tmp_path / "runs" / "x")
    sources = {run: "the run dir this command reads"}
    for target, reason in (
        (run, "is the run dir this command reads"),
        (run / "adapter", "is inside"),
        (tmp_path / "runs", "holds"),
    ):
        with pytest.raises(LrftError, match=reason):
            check_output(target, "--out", sources=sources)
    check_output(run / "analysis", "--out", sources=sources, own=[run / "analysis"])
    check_output(tmp_path / "elsewhere", "--out", sources=sources)


def test_the_current_its_parents_home_and_root_are_never_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(make_run(tmp_path / "cwd").parent)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for target, reason in (
        (".", "is the current dir"),
        ("..", "holds the current dir"),
        (tmp_path / "home", "home dir"),
        ("/", "root dir"),
    ):
        with pytest.raises(LrftError, match=reason):
            check_replaceable(Path(target), "--out")


def test_restart_deletes_only_a_dir_of_the_runs_own_files(tmp_path):
    run = make_run(tmp_path / "run")
    (run / ".adapter.tmp-4242").mkdir()  # what a killed writer left: the run's own
    check_restartable(run, LAYOUT)
    (run / "analysis" / "nested").mkdir(parents=True)
    (run / "analysis" / "nested" / "recipe.yaml").write_text("name: y\n")
    with pytest.raises(LrftError, match="holds another lrft run dir"):
        check_restartable(run, LAYOUT)


@pytest.mark.parametrize(
    "name, temporary",
    [
        (".adapter.tmp-12", True),
        (".m.old-3", True),
        ("adapter.tmp-12", False),
        (".x.tmp-", False),
        ("notes.txt", False),
    ],
)
def test_temporary_names(name, temporary):
    assert is_temporary(name) == temporary


def test_restart_still_deletes_and_retrains_its_own_run(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe("lora", name="again", train={"max_steps": 1})
    assert cli("train", recipe)[0] == 0
    run = tmp_path / "runs" / "again"
    stale = run / ".summary.json.tmp-4194305"  # a killed writer's leftover (no pid is above 2**22) is the run's own
    stale.write_text("{}")
    (run / "metrics.jsonl").write_text("")
    code, _, err = cli("train", recipe, "--restart")
    assert code == 0, err
    assert not stale.exists() and (run / "metrics.jsonl").read_text()


def test_a_restart_refused_late_deletes_nothing(cli, tiny_recipe, tmp_path):
    """--restart deletes the old run only once the whole recipe is known to work: a recipe whose model
    cannot load leaves the old run as it was."""
    recipe = tiny_recipe("lora", name="kept", train={"max_steps": 1})
    assert cli("train", recipe)[0] == 0
    run = tmp_path / "runs" / "kept"
    before = snapshot(run)
    code, _, err = cli("train", recipe, "--restart", f"model.name={tmp_path / 'no-model'}")
    assert code == 2 and "model.name: no directory at" in err
    assert snapshot(run) == before


def test_force_still_replaces_an_earlier_merge(cli, finished_runs, tmp_path):
    out = tmp_path / "merged"
    for flags in ([], ["--force"]):
        code, _, err = cli("merge", finished_runs / "runs" / "good", "--out", out, *flags)
        assert code == 0, err
    shutil.rmtree(out)
