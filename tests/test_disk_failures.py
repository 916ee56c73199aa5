"""A disk that fails under a write (full, over quota, read-only, an I/O error) is the environment's
failure, not a bug: one `error:` line naming the dir, what was being written and (for a run) the last
complete checkpoint, exit code 74, nothing half-written left and nothing already on disk lost; the same
command, rerun once the disk is fixed, does the work (a run resumes and ends as an uninterrupted one).

The disk is filled for real on a small tmpfs where this process may mount one (root); everywhere
else the atomic writer's file system calls are made to fail with the errno a full disk gives.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from lrft.atomic_files import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, disk_errno, disk_failures
from lrft.checkpoint import list_checkpoints, load_tree
from lrft.errors import DISK_ERRORS, EXIT_DISK, DiskError
from tests.helpers import ROOT, assert_same_adapter, lrft, snapshot, train_lines

# 8 steps, a checkpoint after each one, all kept: most of what a run writes is checkpoints
SECTIONS = {"train": {"epochs": 2, "save_every": 1, "keep_last": 100, "lr": 2e-2, "batch_size": 16}}
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors says


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def leftovers(root: Path) -> list[Path]:
    """What a write that did not finish would leave: temporary files and dirs (`.NAME.tmp-PID`, `.old-`)."""
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def assert_whole_checkpoints(run: Path) -> list[str]:
    """Every checkpoint left loads; their names."""
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    for name in names:
        load_tree(run / "checkpoints" / name)
    return names


# ------------------------------------------------------------------------------ a real, full tmpfs


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, kib) → a fresh tmpfs of that size under tmp_path; resize(dir, kib); all unmounted after.
    Skips where this process may not mount one (not root, a container without CAP_SYS_ADMIN)."""
    mounted = []

    def mount(name: str, kib: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here; test_a_full_disk_mid_checkpoint_* fakes the same failure")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(d)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}; it needs root with "
                f"CAP_SYS_ADMIN); test_a_full_disk_mid_checkpoint_* fakes the same failure"
            )
        mounted.append(d)
        return d

    def resize(d: Path, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(d)], check=True, capture_output=True)

    yield mount, resize
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_tmpfs_stops_the_run_in_one_line_and_the_rerun_resumes_to_the_same_adapter(tiny_recipe, tmpfs):
    mount, resize = tmpfs
    # logs and evaluations (the best adapter) at the end only: what fills the disk is a checkpoint
    sections = {"train": {**SECTIONS["train"], "log_every": 100, "eval_every": 100}}
    roomy = mount("roomy", 64 * 1024)
    straight = lrft("train", tiny_recipe("lora", name="straight", output={"dir": str(roomy)}, **sections))
    assert straight.returncode == 0, straight.stderr[-2000:]
    needed = used_bytes(roomy)
    small = mount("small", needed // 2 // 1024)  # room for about half of what the run writes
    recipe = tiny_recipe("lora", name="full", output={"dir": str(small)}, **sections)
    run = small / "full"

    full = lrft("train", recipe)
    assert full.returncode == EXIT_DISK, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and len(error_lines(full.stderr)) == 1, full.stderr[-3000:]
    line = error_lines(full.stderr)[0]
    print(line)  # `pytest -rP` shows what filled the disk
    kept = assert_whole_checkpoints(run)
    assert kept, line  # the disk filled up after some checkpoints, not at once
    step = int(kept[-1].removeprefix("step-")) + 1
    assert line == (
        f"error: {run / 'checkpoints'}: no space left on device while writing checkpoint step-{step:09d}; "
        f"nothing half-written is left, and the last complete checkpoint is {kept[-1]}; free space and "
        f"rerun the same command to resume from it (exit code 74)"
    )
    assert not leftovers(small) and not (run / "adapter").exists() and not (run / "summary.json").exists()

    resize(small, 64 * 1024)
    resumed = lrft("train", recipe)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {kept[-1]}" in resumed.stderr
    assert_same_adapter(run, roomy / "straight", tol=0.0)  # the very adapter of the uninterrupted run
    # the evaluations too (the logged training loss is a mean over the steps since the last log line, which a
    # resumed run only has since its checkpoint: log_every > save_every; the faked test below logs every step)
    evals = [[r for r in train_lines(d) if r["type"] == "eval"] for d in (run, roomy / "straight")]
    assert evals[0] == evals[1] and len(evals[0]) == 1


# ------------------------------------------------------------------------ the same failure, faked


@pytest.fixture
def full_disk_at(monkeypatch):
    """full_disk_at(part): safetensors' write of a checkpoint whose path holds `part` writes half a file and
    fails as on a full disk (what it raises there: SafetensorError, `os error 28`)."""
    from lrft import checkpoint

    real = checkpoint.save_file

    def arm(part: str) -> None:
        def full(tensors, path, *a, **k):
            if part in str(path):
                Path(path).write_bytes(b"half a file")
                raise SafetensorError(FULL)
            return real(tensors, path, *a, **k)

        monkeypatch.setattr(checkpoint, "save_file", full)

    return arm


def test_a_full_disk_mid_checkpoint_is_one_line_and_the_rerun_resumes_to_the_same_adapter(
    cli, tiny_recipe, tmp_path, full_disk_at, monkeypatch
):
    assert cli("train", tiny_recipe("lora", name="straight", **SECTIONS))[0] == 0
    recipe = tiny_recipe("lora", name="full", **SECTIONS)
    run = tmp_path / "runs" / "full"
    full_disk_at(".step-000000006.tmp-")
    code, out, err = cli("train", recipe)
    assert code == EXIT_DISK and out == "" and "Traceback" not in err
    assert error_lines(err) == [
        f"error: {run / 'checkpoints'}: no space left on device while writing checkpoint step-000000006; nothing "
        f"half-written is left, and the last complete checkpoint is step-000000005; free space and rerun the same "
        f"command to resume from it (exit code 74)"
    ], err
    assert assert_whole_checkpoints(run)[-1] == "step-000000005" and not leftovers(tmp_path)
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()

    monkeypatch.undo()  # space freed
    code, _, err = cli("train", recipe)
    assert code == 0 and "resuming from step-000000005" in err, err
    assert_same_adapter(run, tmp_path / "runs" / "straight", tol=0.0)
    assert train_lines(run) == train_lines(tmp_path / "runs" / "straight")


@pytest.fixture
def failing_fsync(monkeypatch):
    """failing_fsync(part, code): fsync of a file whose path holds `part` fails with `code`: where a real
    file system reports a full disk, a quota or an I/O error it could not say at write time."""
    real = os.fsync

    def arm(part: str, code: int = errno.ENOSPC) -> None:
        def fsync(fd):
            if part in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(code, os.strerror(code))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    return arm


@pytest.mark.parametrize(
    "command, again",
    [
        (["merge", "{run}", "--out", "{out}"], ["--force"]),  # a merged model
        (["merge", "{run}", "--format", "peft", "--out", "{out}"], ["--force"]),  # a PEFT export
        (["analyze", "{run}", "--out", "{out}"], []),  # an analysis replaces the earlier one by itself
    ],
)
def test_merge_export_and_analyze_on_a_full_disk_keep_what_was_there(
    cli, finished_runs, tmp_path, failing_fsync, command, again
):
    run = tmp_path / "good"
    shutil.copytree(finished_runs / "runs" / "good", run)
    out = tmp_path / "out" / "result"
    args = [a.format(run=run, out=out) for a in command]
    assert cli(*args)[0] == 0
    before = snapshot(tmp_path)
    failing_fsync(f".{out.name}.tmp-")
    code, _, err = cli(*args, *again)
    assert code == EXIT_DISK and "Traceback" not in err, err
    assert error_lines(err) == [
        f"error: {out.parent}: no space left on device while writing result/; nothing "
        f"half-written is left; free space and rerun the same command (exit code 74)"
    ], err
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)  # the earlier output is whole, and all there is


@pytest.mark.parametrize("code", sorted(DISK_ERRORS))
def test_every_disk_failure_of_an_atomic_write_names_its_fix_and_keeps_the_old_file(tmp_path, failing_fsync, code):
    path = tmp_path / "summary.json"
    path.write_text("old\n")
    failing_fsync(".summary.json.tmp-", code)
    with pytest.raises(DiskError) as caught:
        atomic_write_text(path, "new\n", what="the summary")
    reason, fix = DISK_ERRORS[code]
    assert str(caught.value) == (
        f"{tmp_path}: {reason} while writing the summary; nothing half-written is left; "
        f"{fix} and rerun the same command (exit code 74)"
    )
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_file_written_inside_an_atomic_dir_is_named_by_the_dir(tmp_path, failing_fsync):
    """calibration/ (and any dir of files) writes its JSON with the atomic file writer: a failure there names
    the dir being written, never its temporary twin."""
    failing_fsync(".calibration.json.tmp-")
    with pytest.raises(DiskError) as caught, atomic_dir(tmp_path / "calibration", what="the calibration") as tmp:
        atomic_write_json(tmp / "calibration.json", {"modules": {}})
    assert caught.value.where == tmp_path and caught.value.what == "the calibration"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full (the device that is always full)")
def test_a_line_appended_to_a_full_device_is_a_disk_error():
    with pytest.raises(DiskError) as caught:
        append_jsonl(Path("/dev/full"), {"step": 1})
    assert caught.value.code == errno.ENOSPC and "/dev: no space left on device while writing full" in str(caught.value)


def test_sqlite_full_through_sqlalchemy_is_a_disk_error(tmp_path):
    """What optuna's storage raises when the disk fills under sweep.db: its own error, from SQLAlchemy's,
    from SQLite's "database or disk is full" (here: SQLite's own page limit, which says the same)."""
    import sqlalchemy
    from optuna.exceptions import StorageInternalError

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'sweep.db'}")
    with pytest.raises(DiskError) as caught, disk_failures(tmp_path, "sweep.db (the sweep's storage)"):
        try:
            with engine.begin() as db:
                db.exec_driver_sql("PRAGMA max_page_count = 2")
                db.exec_driver_sql("CREATE TABLE t (x TEXT)")
                for _ in range(100):
                    db.exec_driver_sql("INSERT INTO t VALUES (?)", ("x" * 1000,))
        except sqlalchemy.exc.OperationalError as e:
            raise StorageInternalError("An exception is raised during the commit.") from e
    assert caught.value.code == errno.ENOSPC
    assert str(caught.value).startswith(f"{tmp_path}: no space left on device while writing sweep.db (the sweep's")
    assert disk_errno(sqlite3.OperationalError("no such table: t")) is None  # SQLite's other errors are not the disk's


def test_a_full_sweep_storage_names_it_and_a_runs_own_failure_passes_unchanged(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import lrft.sweep
    from lrft.sweep import run_sweeps

    db = tmp_path / "sweep" / "sweep.db"
    sweep = SimpleNamespace(dir=db.parent, storage=f"sqlite:///{db}", local_storage=db)
    failures = iter(
        [
            sqlite3.OperationalError("database or disk is full"),
            DiskError(errno.ENOSPC, sweep.dir / "p0" / "checkpoints", "checkpoint step-000000002"),
        ]
    )

    def work(_):
        raise next(failures)

    monkeypatch.setattr(lrft.sweep, "work", work)
    with pytest.raises(DiskError, match=r"sweep: no space left on device while writing sweep.db \(the sweep's"):
        run_sweeps([sweep])
    with pytest.raises(DiskError, match=r"p0/checkpoints: no space left on device while writing checkpoint step-"):
        run_sweeps([sweep])


def test_a_disk_failure_no_lrft_writer_named_is_one_line_too(cli, tiny_recipe, monkeypatch):
    import lrft.training

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/.tiny.lock.json")

    monkeypatch.setattr(lrft.training, "train", full)
    code, _, err = cli("train", tiny_recipe("lora"))
    assert code == EXIT_DISK and error_lines(err) == [
        "error: /data/runs/.tiny.lock.json: no space left on device (OSError); free space and rerun the same command "
        "(exit code 74)"
    ], err


def test_other_os_errors_stay_bugs(cli, tiny_recipe, monkeypatch):
    import lrft.training

    def broken(*a, **k):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(lrft.training, "train", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        cli("train", tiny_recipe("lora"))


# ------------------------------------------------------------------------------------ 2 processes

ENOSPC_LRFT = f"""
import sys
from pathlib import Path
from safetensors import SafetensorError
from lrft import checkpoint
part, sys.argv = sys.argv[1], ["lrft"] + sys.argv[2:]
real = checkpoint.save_file
def full(tensors, path, *a, **k):
    if part in str(path):
        Path(path).write_bytes(b"half a file")
        raise SafetensorError({FULL!r})
    return real(tensors, path, *a, **k)
checkpoint.save_file = full
from lrft.cli import main
main()
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU/gloo path; GPUs are exercised on a cluster")
def test_a_full_disk_under_the_main_process_stops_both_processes_at_once(tiny_recipe, tmp_path):
    """Only the main process writes checkpoints; the other one must learn that it failed and stop with it,
    not wait at the next collective."""
    script = tmp_path / "enospc_lrft.py"
    script.write_text(ENOSPC_LRFT)
    recipe = tiny_recipe("lora", name="two", train={"epochs": 2, "save_every": 2, "batch_size": 16, "log_every": 1})
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        "0",
        str(script),
        ".step-000000004.tmp-",
        "train",
        str(recipe),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    run = tmp_path / "runs" / "two"
    print(f"the launcher's exit code: {done.returncode}")  # its own: it reports each process's in its log
    line = (
        f"error: {run / 'checkpoints'}: no space left on device while writing checkpoint step-000000004; "
        f"nothing half-written is left, and the last complete checkpoint is step-000000002; free space and rerun "
        f"the same command to resume from it (exit code 74)"
    )
    assert done.returncode != 0 and error_lines(done.stderr) == [line, line], done.stderr[-4000:]  # one per process
    assert "exitcode  : 74" in done.stderr, done.stderr[-4000:]  # the launcher's report of its processes
    assert assert_whole_checkpoints(run) == ["step-000000002"] and not leftovers(tmp_path)
