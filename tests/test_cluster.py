"""Cluster-grade training: pre-emption, one writer per run dir, FSDP, token-correct loss, trackers,
memory levers and precision, on tiny models and on the CPU (2 processes over gloo where it matters).

Pre-emption tests signal a real `lrft train` process after a chosen optimizer step (tests/helpers.py
PATCHED_LRFT); the same command then resumes and must end with the adapter and metrics of a run that
was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lrft import precision
from lrft.checkpoint import list_checkpoints, load_tree
from tests.helpers import (
    ROOT,
    assert_close_scaled,
    assert_killed_run_resumes_exactly,
    assert_merge_parity,
    assert_same_adapter,
    launch,
    lrft,
    read_jsonl,
    train_lines,
)

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU/gloo path; GPUs are exercised on a cluster")
FSDP_CONFIG = ROOT / "docs" / "accelerate_fsdp.yaml"


# ------------------------------------------------------------------------------------ pre-emption


def test_sigterm_mid_epoch_checkpoints_that_step_and_the_rerun_matches(tiny_recipe, tmp_path):
    sections = {"train": {"epochs": 2, "save_every": 100, "lr": 2e-2, "batch_size": 16, "log_every": 1}}
    assert lrft("train", tiny_recipe("tlora", name="straight", **sections)).returncode == 0
    recipe = tiny_recipe("tlora", name="stopped", **sections)
    run = tmp_path / "runs" / "stopped"
    stopped = lrft("train", recipe, patch=("sigterm", 3))
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert "stopped on SIGTERM at step 3/8 (epoch 0, batch 3); checkpoint step-000000003 holds it" in stopped.stderr
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000000003"]
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    resumed = lrft("train", recipe)
    assert resumed.returncode == 0 and "resuming from step-000000003" in resumed.stderr, resumed.stderr[-2000:]
    assert_same_adapter(run, tmp_path / "runs" / "straight")
    assert train_lines(run) == train_lines(tmp_path / "runs" / "straight")


@CPU_ONLY
def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(tiny_recipe, tmp_path):
    sections = {"train": {"epochs": 2, "save_every": 100, "lr": 2e-2, "batch_size": 16, "log_every": 1}}
    assert launch("train", tiny_recipe("lora", name="straight", **sections)).returncode == 0
    recipe = tiny_recipe("lora", name="stopped", **sections)
    run = tmp_path / "runs" / "stopped"
    stopped = launch("train", recipe, patch=("sigterm", 5, 1), script_dir=tmp_path)  # only rank 1 is signalled
    assert stopped.returncode != 0 and "stopped on another process's stop request at step 5/8" in stopped.stderr, (
        stopped.stderr[-3000:]
    )
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000000005"]
    resumed = launch("train", recipe)
    assert resumed.returncode == 0 and "resuming from step-000000005" in resumed.stderr, resumed.stderr[-2000:]
    assert_same_adapter(run, tmp_path / "runs" / "straight")
    assert train_lines(run) == train_lines(tmp_path / "runs" / "straight")


def test_a_second_ctrl_c_stops_at_once_and_leaves_nothing_half_written(tiny_recipe, tmp_path):
    sections = {"train": {"epochs": 2, "save_every": 2, "lr": 2e-2, "batch_size": 16}}
    recipe = tiny_recipe("lora", name="ctrlc", **sections)
    run = tmp_path / "runs" / "ctrlc"
    interrupted = lrft("train", recipe, patch=("sigint2", 3))
    assert interrupted.returncode == 130 and "interrupted (a second Ctrl-C)" in interrupted.stderr, interrupted.stderr[
        -2000:
    ]
    assert "Traceback" not in interrupted.stderr
    leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers and [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000000002"]
    load_tree(run / "checkpoints" / "step-000000002")  # the checkpoint there is whole
    assert lrft("train", recipe).returncode == 0


def test_the_epoch_end_checkpoint_comes_before_its_evaluation(tiny_recipe, tmp_path):
    """A run killed during the evaluation at an epoch's end resumes with that evaluation first."""
    sections = {"train": {"epochs": 2, "lr": 2e-2, "batch_size": 16}}
    assert lrft("train", tiny_recipe("lora", name="straight", **sections)).returncode == 0
    recipe = tiny_recipe("lora", name="killed", **sections)
    run = tmp_path / "runs" / "killed"
    code = (
        "import os, signal, sys, lrft.evaluation as e\nreal = e.evaluate\n"
        "def dying(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "import lrft.training.loop as t\nt.evaluate = dying\nsys.argv = ['lrft'] + sys.argv[1:]\nfrom lrft.cli import main\nmain()"
    )
    died = subprocess.run(
        [sys.executable, "-c", code, "train", str(recipe)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert died.returncode == -9
    progress = load_tree(run / "checkpoints" / "step-000000004")["progress"]
    assert progress["step"] == 4 and progress["last_eval_step"] is None  # written before the evaluation
    resumed = lrft("train", recipe)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert train_lines(run) == train_lines(tmp_path / "runs" / "straight")
    assert_same_adapter(run, tmp_path / "runs" / "straight")


def test_save_every_minutes_checkpoints_on_time(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe("lora", name="timed", train={"epochs": 1, "save_every_minutes": 1e-6, "keep_last": 10})
    assert cli("train", recipe)[0] == 0
    names = [p.name for p in list_checkpoints(tmp_path / "runs" / "timed" / "checkpoints")]
    assert names == [f"step-{s:09d}" for s in (1, 2, 3, 4)]  # every step is past the deadline


def test_rerunning_a_finished_run_changes_nothing(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe("lora", name="done")
    assert cli("train", recipe)[0] == 0
    run = tmp_path / "runs" / "done"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = cli("train", recipe, "train.log_every=2", "--json")
    assert code == 0 and "is complete (4 steps; accuracy" in err and "resuming" not in err, err
    assert json.loads(out) == json.loads((run / "summary.json").read_text())
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    code, _, err = cli("train", recipe, "train.epochs=2")  # longer training continues it
    assert code == 0 and "resuming from step-000000004" in err


# ---------------------------------------------------------------------------- one writer per run dir

HOLDER = """
import sys, time
from pathlib import Path
from lrft.run_lock import writer_lock
with writer_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(directory: Path, seconds: float = 60) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_holder(cli, tiny_recipe, tmp_path, finished_runs):
    recipe = tiny_recipe("lora", name="busy")
    holder = hold_lock(tmp_path / "runs" / "busy")
    try:
        code, _, err = cli("train", recipe)
        assert code == 2 and f"runs/busy: process {holder.pid} on " in err and "is writing it" in err, err
        assert not (tmp_path / "runs" / "busy").exists()
        out = tmp_path / "merged"
        holder2 = hold_lock(out)
        try:
            code, _, err = cli("merge", finished_runs / "runs" / "good", "--out", out)
            assert code == 2 and f"process {holder2.pid}" in err and not out.exists()
        finally:
            holder2.kill()
    finally:
        holder.kill()


def test_a_lock_left_by_a_dead_process_is_taken_over(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe("lora", name="orphan")
    holder = hold_lock(tmp_path / "runs" / "orphan")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, _, err = cli("train", recipe)
    assert code == 0 and f"taking over from process {holder.pid} on" in err and "which is gone" in err


# ---------------------------------------------------------------------------------------------- FSDP


@CPU_ONLY
@pytest.mark.parametrize("method", ["lora", "lorta"])
def test_fsdp_two_processes_match_one(causal_recipe, cli, tmp_path, method):
    """FSDP2 over gloo (the shipped accelerate config): the same adapter as one process, resumable,
    and the adapter serves through lrft eval and merge."""
    sections = {
        "train": {
            "epochs": 1,
            "batch_size": 8,
            "lr": 2e-2,
            "max_steps": 4,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
        }
    }
    assert lrft("train", causal_recipe(method, name="one", **sections)).returncode == 0
    recipe = causal_recipe(method, name="fsdp", **sections)
    first = launch("train", recipe, "train.max_steps=2", config=FSDP_CONFIG)
    assert first.returncode == 0 and "2 processes (fsdp over" in first.stderr, first.stderr[-3000:]
    resumed = launch("train", recipe, config=FSDP_CONFIG)
    assert resumed.returncode == 0 and "resuming from step-000000002" in resumed.stderr, resumed.stderr[-3000:]
    # Adam divides each entry's gradient by its own running size, so a near-zero entry whose reduction order
    # differs moves by far more than float32 rounding: 1.3e-5 on weights of 0.2 with one thread per
    # process. A wrong gradient (a rank without the other's half-batch) moves entries by about lr = 2e-2.
    assert_same_adapter(tmp_path / "runs" / "fsdp", tmp_path / "runs" / "one", tol=1e-4)
    code, out, err = cli("eval", tmp_path / "runs" / "fsdp", "--json")
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(
        read_jsonl(tmp_path / "runs" / "one" / "metrics.jsonl")[-1]["loss"], rel=1e-4
    ), err
    code, out, err = cli("merge", tmp_path / "runs" / "fsdp", "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    assert_merge_parity(json.loads(out))


# ------------------------------------------------------------------------------- token-correct loss


def uneven_problems(n: int, seed: int) -> list[dict]:
    """Problems whose responses differ in length by up to 10×."""
    return [
        {
            "question": f"what is {i % 5} plus {seed % 5}?",
            "answer": " ".join(["it is"] * (1 + 9 * (i % 3 == 0))) + f" {i % 5 + seed % 5}.\n#### {i % 5 + seed % 5}",
        }
        for i in range(n)
    ]


@pytest.fixture
def uneven_recipe(tmp_path, tiny_llama_dir):
    from tests.helpers import recipe_dict, write_recipe, write_splits

    data = write_splits(tmp_path / "uneven", uneven_problems, (("train", 8, 1), ("test", 8, 1)))

    def write(name: str, **sections) -> Path:
        r = recipe_dict(tiny_llama_dir, data, tmp_path / "runs", "lora", name, causal=True, **sections)
        return write_recipe(tmp_path / f"{name}.yaml", r)

    return write


def step_gradients(recipe: Path) -> dict[str, torch.Tensor]:
    from lrft.recipe import load_recipe
    from lrft.training import Trainer

    trainer = Trainer(load_recipe(recipe))
    trainer.setup()
    trainer.plan.model.train()
    trainer.train_step(list(range(8)))
    return {n: p.grad.clone() for n, p in trainer.plan.model.named_parameters() if p.grad is not None}


def test_grad_accum_gives_the_gradients_of_the_whole_batch(uneven_recipe):
    whole = step_gradients(uneven_recipe("ga1", train={"batch_size": 8, "grad_accum": 1}))
    split = step_gradients(uneven_recipe("ga4", train={"batch_size": 8, "grad_accum": 4}))
    assert whole.keys() == split.keys() and whole
    for k in whole:
        assert_close_scaled(split[k], whole[k], 1e-5, msg=k)


@CPU_ONLY
def test_two_processes_give_the_training_of_one_on_uneven_responses(uneven_recipe, tmp_path):
    sections = {"train": {"batch_size": 8, "max_steps": 3, "lr": 2e-2, "scheduler": "constant", "warmup_ratio": 0.0}}
    assert lrft("train", uneven_recipe("one", **sections)).returncode == 0
    assert launch("train", uneven_recipe("two", **sections)).returncode == 0
    assert launch("train", uneven_recipe("two_ga", **sections), "train.grad_accum=2").returncode == 0
    for other in ("two", "two_ga"):
        assert_same_adapter(tmp_path / "runs" / other, tmp_path / "runs" / "one", tol=1e-6)
        losses = [r["loss"] for r in train_lines(tmp_path / "runs" / other) if r["type"] == "train"]
        assert losses == pytest.approx(
            [r["loss"] for r in train_lines(tmp_path / "runs" / "one") if r["type"] == "train"], rel=1e-5
        )


def test_the_logged_loss_is_the_token_weighted_loss_of_the_evaluation(cli, uneven_recipe, tmp_path):
    """Train on the evaluation data itself: the loss logged at step 1 (before the update) equals the
    evaluation loss at step 0, both token-weighted over the whole data."""
    recipe = uneven_recipe(
        "same",
        train={"batch_size": 8, "max_steps": 1, "grad_accum": 4, "eval_on_start": True, "eval_batch_size": 3},
        data={"max_new_tokens": 2},
    )
    assert cli("train", recipe)[0] == 0
    records = read_jsonl(tmp_path / "runs" / "same" / "metrics.jsonl")
    first_eval = next(r for r in records if r["type"] == "eval")
    first_train = next(r for r in records if r["type"] == "train")
    assert first_eval["step"] == 0 and first_train["loss"] == pytest.approx(first_eval["loss"], rel=1e-5)


# ----------------------------------------------------------------------------------------- trackers


def test_tensorboard_gets_every_metrics_record_and_continues_after_a_resume(tiny_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sections = {"train": {"epochs": 2, "save_every": 100, "report_to": ["tensorboard"], "log_every": 1}}
    recipe = tiny_recipe("lora", name="tb", **sections)
    assert lrft("train", recipe, patch=("sigterm", 5)).returncode == 75
    assert lrft("train", recipe).returncode == 0
    run = tmp_path / "runs" / "tb"
    events = EventAccumulator(str(run / "trackers" / "tb"), size_guidance={"scalars": 0}).Reload()
    for kind, key in (("train", "loss"), ("train", "lr"), ("eval", "accuracy"), ("eval", "loss")):
        logged = {e.step: e.value for e in events.Scalars(f"{kind}/{key}")}
        expected = {r["step"]: r[key] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == kind}
        assert logged.keys() == expected.keys(), (kind, key)
        assert all(logged[s] == pytest.approx(v, rel=1e-6) for s, v in expected.items()), (kind, key)


def test_mlflow_file_store_gets_the_recipe_and_the_metrics_in_one_run(tiny_recipe, tmp_path):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    env = {"MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    sections = {"train": {"epochs": 2, "save_every": 100, "report_to": ["mlflow"], "log_every": 1}}
    recipe = tiny_recipe("lora", name="ml", **sections)
    assert lrft("train", recipe, patch=("sigterm", 5), env=env).returncode == 75
    assert lrft("train", recipe, env=env).returncode == 0
    run = tmp_path / "runs" / "ml"
    run_id = json.loads((run / "trackers" / "ids.json").read_text())["mlflow"]
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=store.as_uri())
    assert len(client.search_runs([client.get_experiment_by_name("ml").experiment_id])) == 1  # resumed, not new
    assert client.get_run(run_id).data.params["adapter.params.rank"] == "4"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "eval/accuracy")}
    assert history == {
        r["step"]: pytest.approx(r["accuracy"]) for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval"
    }


def test_a_tracker_that_is_not_installed_is_one_line(cli, tiny_recipe, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    code, _, err = cli("train", tiny_recipe("lora", name="notb", train={"report_to": ["wandb"]}))
    assert code == 2 and "train.report_to: wandb is not installed; install it with `pip install wandb`" in err


# ---------------------------------------------------------------------------------- memory levers


def test_gradient_checkpointing_gives_the_same_gradients(causal_recipe):
    plain = step_gradients(causal_recipe("lora", name="plain", train={"batch_size": 8}))
    recomputed = step_gradients(
        causal_recipe("lora", name="ckpt", train={"batch_size": 8, "gradient_checkpointing": True})
    )
    assert plain.keys() == recomputed.keys() and plain
    for k in plain:
        assert_close_scaled(recomputed[k], plain[k], 1e-5, msg=k)


def test_length_grouped_batches_are_deterministic_and_cover_the_epoch():
    from lrft.training.batches import epoch_order, length_grouped_batches

    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    make = lambda epoch: length_grouped_batches(epoch_order(1000, 3, epoch), lengths, 8, 3, epoch)  # noqa: E731
    batches = make(0)
    assert batches == make(0) and batches != make(1)
    assert sorted(i for b in batches for i in b) == list(range(1000)) and all(len(b) == 8 for b in batches)
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the largest batch first
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa: E731
    plain = epoch_order(1000, 3, 0)
    assert padding(batches) < padding([plain[i : i + 8] for i in range(0, 1000, 8)]) / 5


def test_group_by_length_trains_and_resumes_exactly(tiny_recipe, tmp_path):
    sections = {"train": {"epochs": 2, "save_every": 3, "lr": 2e-2, "batch_size": 8, "group_by_length": True}}
    assert_killed_run_resumes_exactly(tiny_recipe, tmp_path / "runs", sections)


# -------------------------------------------------------------------------------------- precision


def test_fp16_on_the_cpu_is_refused(cli, tiny_recipe):
    code, _, err = cli("train", tiny_recipe("lora", name="fp16", train={"precision": "fp16", "device": "cpu"}))
    assert code == 2 and "train.precision: fp16 needs a GPU and this run is on the CPU; use bf16" in err


def fake_cpuinfo(monkeypatch, tmp_path, flags: str | None) -> None:
    path = tmp_path / "cpuinfo"
    if flags is not None:
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(precision, "CPUINFO", path)


@pytest.mark.parametrize(
    "flags, want, why",
    [
        ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", "bf16", "the CPU has avx512_bf16"),
        ("fpu sse avx2 amx_tile amx_bf16 amx_int8", "bf16", "the CPU has amx_bf16"),
        ("fpu sse avx2 avx512f avx512_vnni", "fp32", "no AVX-512 BF16 or AMX"),  # AVX-512 without BF16
        (None, "fp32", "no AVX-512 BF16 or AMX"),  # no /proc/cpuinfo (macOS)
    ],
)
def test_auto_precision_on_the_cpu_follows_its_bf16_flags(monkeypatch, tmp_path, flags, want, why):
    fake_cpuinfo(monkeypatch, tmp_path, flags)
    chosen = precision.resolve("auto", "fp32", "cpu")
    assert (chosen.train, chosen.eval) == (want, "fp32") and why in chosen.reason  # evaluation fp32 unless asked
    assert precision.resolve("auto", "auto", "cpu").eval == want
    assert precision.resolve("fp32", "bf16", "cpu") == precision.Precision("fp32", "bf16", "")  # nothing auto


@pytest.mark.parametrize("supported, want", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch, supported, want):
    asked = []
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(including_emulation) or supported
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    chosen = precision.resolve("auto", "fp32", "cuda")
    assert chosen.train == want and "Fake GPU" in chosen.reason
    assert asked == [False]  # emulated bf16 (a V100's) is slower than fp32: native only
    assert precision.resolve("auto", "fp32", "mps").train == "fp32"


def test_the_default_precision_is_auto_and_recorded(tiny_recipe, tmp_path):
    recipe = yaml.safe_load(tiny_recipe("lora", name="auto").read_text())
    del recipe["train"]["precision"]  # the default
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(recipe))
    done = lrft("train", tmp_path / "auto.yaml", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    want = "bf16" if precision.cpu_bf16_flags() else "fp32"  # this machine's CPU, both branches faked above
    assert json.loads(done.stdout)["precision"]["train"] == want
    assert json.loads((tmp_path / "runs" / "auto" / "summary.json").read_text())["precision"]["eval"] == "fp32"
    assert f"precision: training {want}, evaluation fp32 (auto: the CPU has" in done.stderr


def test_fp16_evaluation_on_the_cpu_is_refused(cli, tiny_recipe):
    code, _, err = cli("train", tiny_recipe("lora", name="fp16e", train={"eval_precision": "fp16", "device": "cpu"}))
    assert code == 2 and "train.eval_precision: fp16 needs a GPU and this run is on the CPU" in err


def test_runs_at_other_precisions_follow_each_other_in_one_process(cli, tiny_recipe, tmp_path):
    # accelerate keeps one precision per process: a sweep's trials or a Python caller's runs must not
    # inherit (or be refused) the previous run's
    for name, chosen in (("p32", "fp32"), ("p16", "bf16"), ("p32b", "fp32")):
        code, out, err = cli("train", tiny_recipe("lora", name=name, train={"precision": chosen}), "--json")
        assert code == 0, err
        assert json.loads(out)["precision"]["train"] == chosen
    assert_same_adapter(tmp_path / "runs" / "p32", tmp_path / "runs" / "p32b", tol=0.0)  # fp32 again, not bf16


def test_bf16_on_the_cpu_trains(tiny_recipe, tmp_path):
    done = lrft("train", tiny_recipe("lora", name="bf16", train={"precision": "bf16", "device": "cpu"}), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    losses = [r["loss"] for r in read_jsonl(tmp_path / "runs" / "bf16" / "metrics.jsonl") if r["type"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses))) and json.loads(out)["skipped_nonfinite"] == 0
    from safetensors.torch import load_file

    state = load_file(tmp_path / "runs" / "bf16" / "adapter" / "adapter.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())  # adapters train in fp32 under bf16 autocast
    assert any(k.endswith(".B") and v.abs().max() > 0 for k, v in state.items())  # and they trained


def test_evaluation_computes_at_its_own_precision_after_bf16_training(cli, tiny_recipe, tmp_path):
    # accelerate wraps the prepared model's forward in the training precision's autocast: the run's
    # evaluations at fp32 must give what a fresh fp32 evaluation of the saved adapter gives, not bf16's
    train = {"precision": "bf16", "eval_precision": "fp32", "device": "cpu"}
    code, out, err = cli("train", tiny_recipe("lora", name="bf16t", train=train), "--json")
    assert code == 0, err
    final = json.loads(out)["final"]
    code, out, err = cli("eval", tmp_path / "runs" / "bf16t", "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(final["loss"], rel=1e-6)


def test_own_autocast_runs_the_forward_accelerate_wrapped():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        fp32 = model(input_ids=ids).logits
        AcceleratorState._reset_state()
        try:
            prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
            wrapped = prepared.forward
            in_bf16 = prepared(input_ids=ids).logits
            with precision.own_autocast(prepared):
                own = prepared(input_ids=ids).logits
        finally:
            AcceleratorState._reset_state()
    assert torch.equal(own, fp32)
    assert not torch.allclose(in_bf16, fp32, rtol=1e-4, atol=1e-4 * fp32.abs().max())  # what it did before
    assert prepared.forward == wrapped  # the training autocast back after the block
