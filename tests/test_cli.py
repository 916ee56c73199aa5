"""The CLI end to end on a tiny model: init, train, eval, merge, count-params, resume, bad input."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.helpers import (
    METHODS,
    assert_merge_parity,
    assert_same_adapter,
    markdown_block,
    read_jsonl,
    readme_commands,
    recipe_dict,
    write_glue_mrpc,
    write_recipe,
)

RUN_FILES = [
    "recipe.yaml",
    "metrics.jsonl",
    "adapter_stats.jsonl",
    "summary.json",
    "adapter/adapter.safetensors",
    "adapter/adapter_config.json",
    "best_adapter/adapter.safetensors",
]


@pytest.mark.parametrize("method", METHODS)
def test_train_eval_merge_end_to_end(cli, tiny_recipe, tmp_path, tiny_data_dir, method):
    recipe = tiny_recipe(method, name=f"e2e_{method}")
    code, out, err = cli("train", recipe, "train.epochs=2", "--json")
    assert code == 0, err
    summary = json.loads(out)
    run = tmp_path / "runs" / f"e2e_{method}"
    for f in RUN_FILES:
        assert (run / f).is_file(), f
    assert summary["steps"] == 8 and summary["epochs"] == 2.0
    assert set(summary) >= {
        "final",
        "best",
        "trainable_params",
        "total_params",
        "train_seconds",
        "median_step_time_s",
        "peak_rss_mib",
    }
    metrics = read_jsonl(run / "metrics.jsonl")
    train_lines = [m for m in metrics if m["type"] == "train"]
    assert [m["step"] for m in train_lines] == list(range(1, 9))
    assert all({"step", "epoch", "loss", "lr", "step_time_s"} <= set(m) for m in train_lines)
    assert [m["step"] for m in metrics if m["type"] == "eval"] == [4, 8]
    stats = read_jsonl(run / "adapter_stats.jsonl")  # step 0, then every log step (train.log_every is 1 here)
    assert [s["step"] for s in stats] == [step for step in range(9) for _ in range(4)]  # 4 targets (q, v × 2 layers)
    assert [s["epoch"] for s in stats[::4]] == [step / 4 for step in range(9)]
    key = "alpha" if method == "tlora" else "delta_norm"
    assert all(key in s for s in stats)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == method and config["base_model"]["model_type"] == "bert"
    assert len(config["targets"]) == 4 and config["label_names"] == ["0", "1"]
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["adapter"]["params"]["rank"] == 4 and saved["train"]["epochs"] == 2  # the resolved recipe

    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    evaluated = json.loads(out)
    assert evaluated["accuracy"] == pytest.approx(summary["final"]["accuracy"])
    assert evaluated["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)

    merged = tmp_path / "merged"
    code, out, err = cli("merge", run, "--out", merged, "--json")
    assert code == 0, err
    assert_merge_parity(json.loads(out))
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(merged)
    assert not any("adapter" in n for n, _ in plain.named_parameters())
    code, out, err = cli("eval", merged, "--task", "text-classification", "--data-path", tiny_data_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(summary["final"]["accuracy"])


@pytest.mark.parametrize(
    "method, lr, golden",
    [
        ("lora", 2e-2, [0.690555, 0.691875, 0.677810, 0.704970, 0.696604, 0.697010, 0.640470, 0.697570]),
        ("tlora", 5e-2, [0.690555, 0.691875, 0.678084, 0.704477, 0.696516, 0.697001, 0.640985, 0.697613]),
    ],
)
def test_golden_loss_from_fixed_seed(cli, tiny_recipe, tmp_path, method, lr, golden):
    """Pins the whole pipeline (tokenization, data order, init, optimizer, schedule) on the tiny model.

    The two methods part from step 3 on by far more than the tolerance.
    """
    code, _, err = cli(
        "train", tiny_recipe(method, name="golden"), "train.max_steps=8", f"train.lr={lr}", "train.head_lr=1e-2"
    )
    assert code == 0, err
    losses = [m["loss"] for m in read_jsonl(tmp_path / "runs" / "golden" / "metrics.jsonl") if m["type"] == "train"]
    assert losses == pytest.approx(golden, rel=2e-5)


def test_rerun_resumes_and_matches_uninterrupted_run(cli, tiny_recipe, tmp_path):
    sched = {"scheduler": "constant", "warmup_ratio": 0.0}
    straight = tiny_recipe("tlora", name="straight", train={"epochs": 2, **sched})
    assert cli("train", straight)[0] == 0
    split = tiny_recipe("tlora", name="split", train={"epochs": 1, **sched})
    assert cli("train", split)[0] == 0
    code, _, err = cli("train", split, "train.epochs=2")
    assert code == 0 and "resuming from step-000000004" in err
    assert_same_adapter(tmp_path / "runs" / "split", tmp_path / "runs" / "straight", tol=1e-6)
    steps = [m["step"] for m in read_jsonl(tmp_path / "runs" / "split" / "metrics.jsonl") if m["type"] == "train"]
    assert steps == list(range(1, 9))  # nothing logged twice


def test_changed_recipe_is_not_resumed_silently(cli, tiny_recipe):
    recipe = tiny_recipe("lora", name="changed")
    assert cli("train", recipe, "train.max_steps=2")[0] == 0
    code, _, err = cli("train", recipe, "train.max_steps=2", "adapter.params.rank=2")
    assert code == 2 and "adapter.params.rank changed" in err and "--restart" in err
    code, _, err = cli("train", recipe, "train.max_steps=2", "adapter.params.rank=2", "--restart")
    assert code == 0, err


def test_a_damaged_summary_is_written_anew_by_the_same_command(cli, tiny_recipe, tmp_path):
    """A finished run whose summary.json is damaged is finished again from its last checkpoint (found
    by tests/test_fuzz.py: the summary was printed as it stood, and `{}` was a KeyError)."""
    recipe = tiny_recipe("lora", name="summed", train={"max_steps": 2})
    assert cli("train", recipe)[0] == 0
    summary = tmp_path / "runs" / "summed" / "summary.json"
    final = json.loads(summary.read_text())["final"]
    summary.write_text("{}")
    code, _, err = cli("train", recipe)
    assert code == 0 and "summary.json is damaged" in err, err
    assert json.loads(summary.read_text())["final"] == final


def test_init_writes_a_valid_commented_recipe(cli, tmp_path):
    out = tmp_path / "my.yaml"
    code, _, err = cli("init", "--method", "tlora", "--task", "glue/rte", "--model", "minilm", "-o", out)
    assert code == 0, err
    text = out.read_text()
    assert text.startswith("# lrft recipe: tri-matrix TLoRA") and "task: glue/rte" in text
    from lrft.recipe import load_recipe

    r = load_recipe(out)
    assert r.adapter.method == "tlora" and r.train.lr == 2e-2 and r.name == "my"
    code, _, err = cli("init", "--method", "lora", "-o", out)
    assert code == 2 and "already exists" in err and out.read_text() == text
    assert cli("init", "--method", "lora", "-o", out, "--force")[0] == 0


@pytest.mark.parametrize(
    "args, rank, trainable, lora",
    [
        (["--method", "tlora", "--rank", "8"], 8, 3120, 786432),
        (["--method", "tlora", "--rank", "16"], 16, 12336, 1572864),
        (["--method", "tlora", "--rank", "32"], 32, 49200, 3145728),
    ],
)
def test_count_params_reproduces_tlora_table_1(cli, args, rank, trainable, lora):
    code, out, _ = cli("count-params", *args, "--json")
    counts = json.loads(out)
    assert code == 0 and counts["trainable"] == trainable and counts["lora"] == lora
    assert counts["model"] == "roberta-large" and counts["targets"] == ["query", "value"]


@pytest.mark.parametrize(
    "args, full",
    [
        (["--method", "full", "--num-labels", "3"], 355_362_819),
        (["--method", "full", "--model", "roberta-base"], 124_647_170),
        (["--method", "full", "--model", "llama2-7b"], 6_738_415_616),
        (["--method", "full", "--model", "t5-base"], 222_903_552),
    ],
)
def test_count_params_preset_totals(cli, args, full):
    code, out, _ = cli("count-params", *args, "--json")
    counts = json.loads(out)
    assert code == 0 and counts["full"] == full and counts["trainable"] == full


def test_count_params_text_output(cli):
    code, out, _ = cli("count-params", "--method", "tlora", "--rank", "8")
    assert code == 0 and "3,120" in out and "786,432" in out and "252.1× fewer than LoRA" in out


def test_merge_and_eval_refusals(cli, finished_runs, tmp_path):
    run = finished_runs / "runs" / "good"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, _, err = cli("merge", run, "--out", tmp_path / "taken")
    assert code == 2 and "already exists" in err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    code, _, err = cli("merge", run, "--out", tmp_path / "x", "--dtype", "float8")
    assert code == 2 and "--dtype: unknown 'float8'" in err
    code, _, err = cli("eval", tmp_path)
    assert code == 2 and "is not an lrft run dir (recipe.yaml); to evaluate it as a model, say which task" in err
    code, _, err = cli("eval", tmp_path, "--task", "glue/mrpc")
    assert code == 2 and "has no config.json" in err
    code, _, err = cli("eval", run, "--task", "glue/rte")
    assert code == 2 and "trained on text-classification" in err


def test_eval_says_on_stderr_what_it_evaluates(cli, finished_runs):
    """The run (its method, base model and adapter), the task, its data and splits, and the result go to
    stderr; stdout holds the metrics alone, a line each."""
    run = finished_runs / "runs" / "good"
    code, out, err = cli("eval", run)
    assert code == 0, err
    metrics = dict(row.split("\t") for row in out.splitlines())
    assert list(metrics)[:3] == ["task", "examples", "max_length"] and "eval" not in out
    assert f"eval the run {run} (lora on " in err and "its final adapter) on text-classification" in err
    assert f"data: text-classification from {(finished_runs / 'data').resolve()}: {metrics['examples']} dev" in err
    assert f"accuracy {float(metrics['accuracy']):.4f}" in err and "eval done in " in err
    code, _, err = cli("eval", run, "--best", "--max-samples", "4")
    assert code == 0 and "its best adapter) on text-classification" in err and ": 4 dev, max_length" in err, err


def test_a_plan_carries_the_data_dir_its_jobs_read(cli, tmp_path, tiny_model_dir, monkeypatch):
    """A recipe that names no data dir reads $LRFT_DATA_DIR: `--plan` puts it (absolute) before each
    command, since a job array's job may run without it; a recipe's own data.path needs nothing."""
    monkeypatch.chdir(tmp_path)
    for name, path in (("hub", None), ("local", str(tmp_path / "data"))):
        recipe = recipe_dict(tiny_model_dir, tmp_path, "runs", "lora", name, data={"task": "glue/mrpc", "path": path})
        write_recipe(tmp_path / f"{name}.yaml", recipe)
        (tmp_path / f"{name}_sweep.yaml").write_text(
            yaml.safe_dump(
                {"recipe": f"{name}.yaml", "search": {"train.lr": [1.0e-2, 2.0e-2]}, "objective": "accuracy"}
            )
        )
    monkeypatch.setenv("LRFT_DATA_DIR", "shared data")  # relative, with a space: quoted, made absolute
    code, out, err = cli("sweep", "hub_sweep.yaml", "--plan")
    assert code == 0 and len(out.splitlines()) == 2, err
    for line in out.splitlines():
        words = shlex.split(line)
        assert words[0] == f"LRFT_DATA_DIR={tmp_path / 'shared data'}" and words[1:4] == ["lrft", "train", "hub.yaml"]
    code, out, _ = cli("sweep", "local_sweep.yaml", "--plan")
    assert code == 0 and all(line.startswith("lrft train local.yaml ") for line in out.splitlines())
    monkeypatch.delenv("LRFT_DATA_DIR")
    code, out, _ = cli("sweep", "hub_sweep.yaml", "--plan")
    assert code == 0 and all(line.startswith("lrft train hub.yaml ") for line in out.splitlines())


def test_a_comparison_leaves_the_runs_own_analysis_in_place(cli, finished_runs, tmp_path, monkeypatch):
    """`analyze RUN` writes RUN/analysis, `analyze RUN --against OTHER` RUN/comparisons/OTHER: neither
    replaces the other, in either order; `--restart` still deletes a run dir holding both."""
    import lrft.analysis

    monkeypatch.setattr(lrft.analysis, "write_figures", lambda out_dir, runs, numbers, result, chosen: ([], {}))
    for name in ("good", "ta"):
        shutil.copytree(finished_runs / "runs" / name, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))
    run, analysis, comparison = (
        tmp_path / "good",
        tmp_path / "good" / "analysis",
        tmp_path / "good" / "comparisons" / "ta",
    )
    code, out, err = cli("analyze", run)
    assert code == 0 and out.splitlines()[0] == f"report\t{analysis / 'report.html'}", err
    alone = (analysis / "analysis.json").read_bytes()
    code, out, err = cli("analyze", run, "--against", tmp_path / "ta")
    assert code == 0 and out.splitlines()[0] == f"report\t{comparison / 'report.html'}", err
    assert "mean cosine\t" in out and (analysis / "analysis.json").read_bytes() == alone
    assert json.loads((comparison / "analysis.json").read_text())["against"]["modules"]
    code, out, err = cli("analyze", run, "--json")
    assert code == 0 and json.loads(out)["out"] == str(analysis) and (comparison / "report.html").is_file(), err
    from lrft.guard import check_restartable
    from lrft.run_layout import LAYOUT

    check_restartable(run, LAYOUT)  # comparisons/ is the run's own


def test_real_process_exit_codes(tmp_path):
    """Outside the test runner: exit 2 and one line for bad input, results on stdout."""
    run = subprocess.run(
        [sys.executable, "-m", "lrft", "train", str(tmp_path / "none.yaml")], capture_output=True, text=True
    )
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "lrft", "count-params", "--method", "tlora", "--rank", "8", "--json"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and json.loads(run.stdout)["trainable"] == 3120


def run_readme_line(cli, monkeypatch, line: str):
    """One README command line as written: `VAR=value` prefixes set for it, `| jq .a.b` applied to its
    JSON output; returns (exit code, stdout, stderr)."""
    words = shlex.split(line, comments=True)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    pipe = words.index("|") if "|" in words else len(words)
    command, jq = words[:pipe], words[pipe + 1 :]
    assert command[0] == "lrft", line
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        code, out, err = cli(*command[1:])
    if jq and code == 0:
        assert jq[0] == "jq", line
        value = json.loads(out)
        for key in jq[1].strip(".").split("."):
            value = value[key]
        out = json.dumps(value)
    return code, out, err


def test_the_readme_commands_run_in_order_without_the_data_dir(cli, tmp_path, tiny_model_dir, monkeypatch):
    """The README's Set-up training, then its Commands block line by line as written, on tiny models
    (recipes of the same names): eval, merge and analyze of a run read the data the run trained on,
    with neither LRFT_DATA_DIR nor the hub."""
    work = tmp_path / "work"
    write_glue_mrpc(tmp_path / "shared" / "data" / "glue" / "mrpc")  # ../shared/data, as the README says
    for name, method in (("quickstart", "tlora"), ("glue_mrpc_talora", "talora")):
        recipe = recipe_dict(
            tiny_model_dir,
            tmp_path,
            "runs",
            method,
            name,
            data={"task": "glue/mrpc", "path": None},
            calibration={"samples": 16, "batch_size": 8},
        )
        (work / "recipes").mkdir(parents=True, exist_ok=True)
        write_recipe(work / "recipes" / f"{name}.yaml", recipe)
    (work / "sweeps").mkdir()  # the Commands block's sweep, on the tiny quickstart: two learning rates, one epoch
    (work / "sweeps" / "mrpc_tlora_r8_3ep.yaml").write_text(
        yaml.safe_dump(
            {
                "recipe": "../recipes/quickstart.yaml",
                "overrides": {"train.epochs": 1, "output.dir": "results/sweeps"},
                "search": {"train.lr": [1.0e-2, 2.0e-2]},
                "objective": "accuracy",
                "seeds": [42],
            }
        )
    )
    monkeypatch.chdir(work)
    monkeypatch.delenv("LRFT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    setup = [line for line in readme_commands("## Set-up") if line.startswith("LRFT_DATA_DIR=")]
    outputs = {}
    for line in setup + readme_commands("## Commands"):
        code, out, err = run_readme_line(cli, monkeypatch, line)
        assert code == 0, f"{line}\n{err}"
        outputs.setdefault(line.split("#")[0].strip(), out)  # a line run twice keeps its first output
    printed = markdown_block("README.md", "## Set-up", "text").splitlines()  # what the README says training prints
    trained = outputs[setup[0].split("#")[0].strip()].splitlines()
    assert [line.split()[0] for line in trained] == [line.split()[0] for line in printed] and trained[-1] == printed[-1]
    final = json.loads((work / "runs" / "glue_mrpc_talora" / "summary.json").read_text())["final"]
    for line in ("lrft eval runs/glue_mrpc_talora", "lrft eval merged/ --task glue/mrpc"):
        got = dict(row.split("\t") for row in outputs[line].splitlines())
        assert float(got["accuracy"]) == pytest.approx(final["accuracy"]), line
    assert -1 <= float(outputs["lrft analyze runs/glue_mrpc_talora --against runs/r8 --json | jq .cosine.mean"]) <= 1
    assert (work / "runs" / "glue_mrpc_talora" / "analysis" / "report.html").is_file() and (work / "my.yaml").is_file()
    assert "talora" in outputs["lrft count-params --method talora --calibrated runs/glue_mrpc_talora"]
    assert {p.name for p in (work / "results" / "sweeps" / "mrpc_tlora_r8_3ep").iterdir()} >= {
        "lr1e-2_s42",
        "lr2e-2_s42",
    }


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"HF_HUB_OFFLINE": "1"}, "the hub is unreachable (HF_HUB_OFFLINE=1)"),
        (
            {"HF_ENDPOINT": "http://127.0.0.1:9"},
            "the hub is unreachable (no connection to 127.0.0.1:9: Connection refused)",
        ),
    ],
)
@pytest.mark.parametrize("what", ["data", "model"])
def test_an_unreachable_hub_is_said_once_without_retries(tiny_model_dir, tmp_path, env, reason, what):
    """Hub data (glue/sst2 without a local dir) or a hub model: one error line saying the hub cannot be
    reached and what to do, with none of the libraries' retry lines."""
    import os

    model = str(tiny_model_dir) if what == "data" else "some-org/some-model"
    clean = {k: v for k, v in os.environ.items() if k not in ("LRFT_DATA_DIR", "HF_HUB_OFFLINE", "HF_ENDPOINT")}
    run = subprocess.run(
        [sys.executable, "-m", "lrft", "eval", model, "--task", "glue/sst2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**clean, "HF_HOME": str(tmp_path / "hf"), **env},
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("error:") == 1 and reason in run.stderr, run.stderr
    assert "Retrying" not in run.stderr and "Traceback" not in run.stderr
    expected = (
        ("nyu-mll/glue (sst2) is not in the local cache", "LRFT_DATA_DIR")
        if what == "data"
        else ("model.name: could not load the config of 'some-org/some-model'", "is not in the local cache")
    )
    assert all(words in run.stderr for words in expected), run.stderr


def test_long_phases_show_progress_off_a_terminal(cli, tiny_recipe, causal_recipe, tmp_path, monkeypatch):
    """Every phase that can take long prints where it stands off a terminal (here at every unit: the
    interval set to 0), on stderr only: stdout keeps the results, and `--json` pure JSON."""
    from lrft import console

    monkeypatch.setattr(console, "PLAIN_EVERY_S", 0.0)
    code, out, err = cli(
        "train",
        tiny_recipe("talora", name="shown", calibration={"samples": 16, "batch_size": 8}),
        "train.max_steps=2",
        "--json",
    )
    assert code == 0 and json.loads(out)["steps"] == 2, err
    assert "calibration: 2/2 batches" in err and "evaluation: 1/1 batches" in err
    run = tmp_path / "runs" / "shown"
    code, out, err = cli("eval", run, "--batch-size", "8")
    assert code == 0 and "evaluation: 4/4 batches" in err and "evaluation:" not in out and out.startswith("task\t")
    code, out, err = cli("merge", run, "--out", tmp_path / "m", "--json")
    assert (
        code == 0 and "merge: 1/6 steps" in err and "merging: 4/4 modules" in err and json.loads(out)["verdict"] == "ok"
    )
    code, out, err = cli("analyze", run, "--json")
    assert code == 0 and "figures: 1/" in err and "shown: spectra: 4/4 modules" in err and json.loads(out)["run"]
    lm = causal_recipe("lora", name="lm_shown")
    code, out, err = cli("train", lm, "train.max_steps=1", "data.max_new_tokens=4", "train.eval_batch_size=6")
    assert code == 0, err
    assert "generation: 4/8 token steps, " in err and "left (batch 1/2)" in err and "left (batch 2/2)" in err
    assert "generation" not in out


def test_progress_bars_on_a_terminal_nest_and_stay_off_stdout(cli, tiny_recipe, monkeypatch):
    """On a terminal the phases share one rich display (training holds its bar while an evaluation adds
    its own); the bars go to stderr, the result lines to stdout."""
    import io

    from rich.console import Console

    from lrft import console

    screen = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=screen, force_terminal=True, width=120))
    monkeypatch.setattr(console, "interactive", lambda: True)
    code, out, err = cli("train", tiny_recipe("lora", name="bars"), "train.eval_every=2", "train.max_steps=4")
    assert code == 0, err
    drawn = screen.getvalue()
    assert "training" in drawn and "evaluation" in drawn and "loss " in drawn
    assert out.splitlines()[0].startswith("done in ") and "training" not in out.splitlines()[1]
    assert console._live == {}  # every bar closed


def test_done_in_is_the_wall_time_with_its_parts(cli, tiny_recipe, tmp_path):
    code, out, err = cli("train", tiny_recipe("lora", name="timed"), "train.max_steps=3")
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "timed" / "summary.json").read_text())
    parts = summary["seconds"]
    assert set(parts) <= {"loading", "calibration", "training", "evaluation", "saving"}
    assert {"loading", "training", "evaluation", "saving"} <= set(parts)
    rounding = 0.005 * (len(parts) + 1)  # each part and the wall time are rounded to 0.01 s
    assert math.fsum(parts.values()) <= summary["wall_seconds"] + rounding
    assert summary["train_seconds"] == parts["training"]
    lines = out.splitlines()
    assert lines[0].startswith("done in ") and lines[1].startswith("final (step 3): accuracy ")
    assert lines[-1] == f"adapter: {tmp_path / 'runs' / 'timed' / 'adapter'}"


def test_the_stopwatch_charges_nested_phases_to_the_inner_one(monkeypatch):
    from lrft.training import state

    ticks = iter([0.0, 1.0, 3.0, 6.0])  # outer starts, inner starts, inner ends, outer ends
    monkeypatch.setattr(state.time, "perf_counter", lambda: next(ticks))
    seconds = {}
    clock = state.Stopwatch(seconds)
    with clock.phase("loading"):
        with clock.phase("calibration"):
            pass
    assert seconds == {"loading": 1.0 + 3.0, "calibration": 2.0}
