"""Crash safety and scale-out: SIGKILL mid-epoch and mid-checkpoint-write, numerical guards, 2 processes.

The kill tests run `lrft train` in a real subprocess that SIGKILLs itself at a chosen point (after the
Nth optimizer step, or after a checkpoint's files are written but before the dir is renamed); the
same command then resumes and must end with the adapter and metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, assert_same_adapter, launch, lrft, read_jsonl, train_lines


@pytest.mark.parametrize(
    "method, killer, resumed_from",
    [
        ("tlora", ("sigkill", 7), "step-000000006"),  # mid-epoch: after step 7, checkpoints every 2 steps
        ("talora", ("checkpoint", 3), "step-000000004"),  # mid-write of the step-6 checkpoint
    ],
)
def test_sigkill_then_the_same_command_resumes_to_the_same_result(tiny_recipe, tmp_path, method, killer, resumed_from):
    sections = {
        "train": {"epochs": 3, "save_every": 2, "lr": 2e-2, "batch_size": 16, "log_every": 1},
        "calibration": {"samples": 16, "batch_size": 8},
    }
    straight = tiny_recipe(method, name="straight", **sections)
    assert lrft("train", straight).returncode == 0
    recipe = tiny_recipe(method, name="killed", **sections)
    run = tmp_path / "runs" / "killed"
    died = lrft("train", recipe, patch=killer)
    assert died.returncode == -9, died.stderr[-2000:]  # SIGKILL: no cleanup ran
    assert not (run / "summary.json").exists() and not (run / "adapter").exists()
    if killer[0] == "checkpoint":
        assert any(p.name.startswith(".step-000000006.tmp-") for p in (run / "checkpoints").iterdir())
    resumed = lrft("train", recipe)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {resumed_from}" in resumed.stderr
    assert_same_adapter(run, tmp_path / "runs" / "straight")
    assert train_lines(run) == train_lines(tmp_path / "runs" / "straight")  # nothing lost, nothing twice
    stats, straight_stats = (read_jsonl(d / "adapter_stats.jsonl") for d in (run, tmp_path / "runs" / "straight"))
    assert [(r["step"], r["module"]) for r in stats] == [(r["step"], r["module"]) for r in straight_stats]
    assert [r["delta_norm"] for r in stats] == pytest.approx([r["delta_norm"] for r in straight_stats], rel=1e-5)
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]  # the dead write is gone
    assert (
        json.loads((run / "summary.json").read_text())["final"]
        == json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())["final"]
    )


def test_keep_last_prunes_checkpoints(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe("lora", name="prune", train={"epochs": 2, "save_every": 1, "keep_last": 2})
    assert cli("train", recipe)[0] == 0
    names = sorted(p.name for p in (tmp_path / "runs" / "prune" / "checkpoints").iterdir())
    assert names == ["step-000000007", "step-000000008"]


@pytest.fixture
def nan_at_step(monkeypatch):
    """Make the training loss NaN at the given optimizer steps (counted over calls of the loss)."""
    import torch.nn.functional as F

    def arm(*steps: int):
        real = F.cross_entropy
        calls = [0]

        def poisoned(*a, **k):
            out = real(*a, **k)
            if out.requires_grad:  # training forward passes only (evaluation runs under no_grad)
                calls[0] += 1
                if calls[0] in steps:
                    return out * float("nan")
            return out

        monkeypatch.setattr(F, "cross_entropy", poisoned)

    return arm


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(cli, tiny_recipe, tmp_path, nan_at_step):
    nan_at_step(3)
    code, _, err = cli("train", tiny_recipe("lora", name="nan", train={"save_every": 2}))
    assert code == 2
    assert "train: the loss became nan at step 3; stopped, the last good checkpoint is step-000000002" in err
    assert "train.skip_nonfinite=true" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "runs" / "nan" / "checkpoints").iterdir()] == ["step-000000002"]


def test_skip_nonfinite_skips_and_counts(cli, tiny_recipe, tmp_path, nan_at_step):
    nan_at_step(2, 3)
    code, out, err = cli("train", tiny_recipe("lora", name="skip", train={"skip_nonfinite": True}), "--json")
    assert code == 0, err
    assert json.loads(out)["skipped_nonfinite"] == 2 and err.count("batch skipped") == 2
    state = load_file(tmp_path / "runs" / "skip" / "adapter" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_nonfinite_gradients_are_caught_too(cli, tiny_recipe, monkeypatch):
    from accelerate import Accelerator

    clip = Accelerator.clip_grad_norm_
    calls = [0]

    def inf_norm(self, params, max_norm, *a, **k):
        calls[0] += 1
        norm = clip(self, params, max_norm, *a, **k)
        return norm * float("inf") if calls[0] == 2 else norm

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", inf_norm)
    code, _, err = cli("train", tiny_recipe("lora", name="grad"))
    assert code == 2 and "train: the gradient norm became inf at step 2" in err


# ------------------------------------------------------------------------------------ 2 processes


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU/gloo path; GPUs are exercised on a cluster")
@pytest.mark.parametrize("method", ["lora", "talora"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_recipe, tmp_path, method):
    sections = {"train": {"epochs": 2, "batch_size": 16, "lr": 2e-2}, "calibration": {"samples": 16, "batch_size": 8}}
    assert lrft("train", tiny_recipe(method, name="one", **sections)).returncode == 0
    two = launch("train", str(tiny_recipe(method, name="two", **sections)))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes (ddp over MULTI_CPU), 8 examples of each batch per process" in two.stderr
    assert_same_adapter(tmp_path / "runs" / "two", tmp_path / "runs" / "one", tol=1e-5)
    if method == "talora":  # statistics all-reduced: the same plan on every rank and as one process
        plan = [
            json.loads((tmp_path / "runs" / n / "calibration" / "calibration.json").read_text())["modules"]
            for n in ("one", "two")
        ]
        assert {k: v["rank"] for k, v in plan[0].items()} == {k: v["rank"] for k, v in plan[1].items()}
    one_eval = [l for l in train_lines(tmp_path / "runs" / "one") if l["type"] == "eval"]
    two_eval = [l for l in train_lines(tmp_path / "runs" / "two") if l["type"] == "eval"]
    assert [e["accuracy"] for e in one_eval] == [e["accuracy"] for e in two_eval]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU/gloo path; GPUs are exercised on a cluster")
def test_two_processes_resume(tiny_recipe, tmp_path):
    sections = {"train": {"batch_size": 16, "scheduler": "constant", "warmup_ratio": 0.0}}
    straight = tiny_recipe("tlora", name="straight", **sections)
    assert launch("train", str(straight), "train.epochs=2").returncode == 0
    split = tiny_recipe("tlora", name="split", **sections)
    assert launch("train", str(split), "train.epochs=1").returncode == 0
    resumed = launch("train", str(split), "train.epochs=2")
    assert resumed.returncode == 0 and "resuming from step-000000004" in resumed.stderr, resumed.stderr[-2000:]
    assert_same_adapter(tmp_path / "runs" / "split", tmp_path / "runs" / "straight")


# ---------------------------------------------------------------------------------- bugs, security


def test_a_bug_keeps_its_traceback_and_exit_code_1(tiny_recipe):
    code = (
        "import lrft.training as t; t.train = lambda *a, **k: 1 / 0\nimport sys; sys.argv = ['lrft'] + sys.argv[1:]\n"
        "from lrft.cli import main; main()"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, "train", str(tiny_recipe("lora", name="bug"))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" in run.stderr and "ZeroDivisionError" in run.stderr


def test_no_pickle_and_safe_yaml_anywhere():
    import yaml

    from lrft.config.yaml_files import StrictLoader

    assert issubclass(StrictLoader, yaml.SafeLoader)  # yaml.load with it is safe_load, made strict
    sources = {p: p.read_text() for p in (ROOT / "lrft").rglob("*.py")}
    for path, text in sources.items():
        assert not re.search(
            r"\bimport pickle|\bpickle\.|torch\.load\(|yaml\.load\((?![^)]*Loader=StrictLoader\))|"
            r"yaml\.unsafe_load",
            text,
        ), path
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path


def test_trust_remote_code_is_announced(cli, tiny_recipe):
    code, _, err = cli(
        "train", tiny_recipe("lora", name="remote", model={"trust_remote_code": True}), "train.max_steps=1"
    )
    assert code == 0 and "warning: model.trust_remote_code is true: running Python code" in err
