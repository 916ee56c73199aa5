"""QLoRA (`model.quantize`): every method on a tiny Llama whose frozen base is bitsandbytes' 4-bit or
8-bit layers, resume after a kill, two processes, the merge onto the dequantized weights with its
parity report, the PEFT export, talora's importance without weight gradients, and the memory count."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lrft import calibrate, quantize
from lrft.merge import parity_lines
from lrft.models import load_for_causal_lm
from lrft.recipe import CalibrationConfig, ModelConfig
from lrft.targets import find_targets
from tests.helpers import (
    assert_killed_run_resumes_exactly,
    assert_same_adapter,
    calibration_features,
    launch,
    lrft,
    pad_collate,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs lrft[qlora]")
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture
def quantized_recipe(causal_recipe):
    def write(method: str = "lora", name: str = "q", kind: str = "nf4", **sections):
        return causal_recipe(method, name=name, model={"quantize": kind}, **sections)

    return write


def quantized_model(model_dir, kind: str = "nf4"):
    return load_for_causal_lm(ModelConfig(name=str(model_dir), quantize=kind))[0]


@pytest.mark.parametrize("method", ["lora", "tlora", "talora", "lorta"])
def test_every_method_trains_on_an_nf4_base(cli, quantized_recipe, tmp_path, method):
    code, out, err = cli("train", quantized_recipe(method, name=method), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["trainable_params"] > 0 and torch.isfinite(torch.tensor(summary["final"]["loss"]))
    config = json.loads((tmp_path / "runs" / method / "adapter" / "adapter_config.json").read_text())
    assert config["base_model"]["quantize"] == "nf4"
    from safetensors.torch import load_file

    state = load_file(tmp_path / "runs" / method / "adapter" / "adapter.safetensors")
    assert state and all(v.dtype == torch.float32 for v in state.values())  # adapters stay float32


def test_a_classifier_trains_on_a_quantized_base_with_its_head_whole(cli, tiny_recipe, tmp_path):
    import bitsandbytes as bnb

    code, _, err = cli("train", tiny_recipe("talora", name="cls", model={"quantize": "nf4"}))
    assert code == 0, err
    from lrft.open_runs import load_run

    model = load_run(tmp_path / "runs" / "cls").adapted.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.classifier.modules())  # the head trains
    code, out, err = cli("merge", tmp_path / "runs" / "cls", "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    assert json.loads(out)["verdict"] == "ok"


@pytest.mark.parametrize("kind", ["fp4", "int8"])
def test_fp4_and_int8_bases_train(cli, quantized_recipe, kind):
    code, out, err = cli("train", quantized_recipe("lora", name=kind, kind=kind), "--json")
    assert code == 0, err
    assert torch.isfinite(torch.tensor(json.loads(out)["final"]["loss"]))


def test_the_base_is_quantized_and_w0_is_its_dequantized_weight(tiny_llama_dir):
    import bitsandbytes as bnb

    model = quantized_model(tiny_llama_dir)
    targets = find_targets(model, QKVO)
    assert all(isinstance(t.module, bnb.nn.Linear4bit) for t in targets)
    x = torch.randn(5, targets[0].shape[1])
    t = targets[0]
    # what the layer computes is x W0ᵀ with the W0 lrft reads (talora's SVD, a merge)
    assert torch.allclose(t.module(x), x @ t.weight.T, atol=1e-5 * float(x.abs().max() * t.weight.abs().max()))
    assert t.weight.shape == t.shape and t.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as an nn.Linear: bf16 in and out under autocast
        assert t.module(x).dtype == torch.bfloat16 and t.module.compute_dtype == torch.bfloat16
    assert t.module(x).dtype == torch.float32 and t.module.compute_dtype == torch.float32


def test_importance_of_a_quantized_layer_is_that_of_its_dequantized_weights(tiny_llama_dir):
    """No gradient exists for packed weights: the hook's Σ (∂L/∂y)ᵀ x gives the importance autograd gives
    the float model with the same (dequantized) weights."""
    quantized = quantized_model(tiny_llama_dir)
    plain = quantize.dequantize(quantized_model(tiny_llama_dir))
    needs, stats = frozenset({"importance", "covariance"}), {}
    for label, model in (("quantized", quantized), ("plain", plain)):
        targets = find_targets(model, QKVO)
        batches = [[0, 1, 2], [3, 4, 5]]
        stats[label] = calibrate.run(
            model, targets, calibration_features(), batches, causal_collate, needs, CalibrationConfig()
        )
    for name, value in stats["plain"].importance.items():
        assert value > 0 and stats["quantized"].importance[name] == pytest.approx(value, rel=1e-4)
        want = stats["plain"].covariance[name]
        assert torch.allclose(stats["quantized"].covariance[name], want, atol=1e-6 * float(want.abs().max()))


def causal_collate(features):
    return pad_collate(features, causal=True)


def test_a_killed_quantized_run_resumes_to_the_same_adapter(quantized_recipe, tmp_path):
    assert_killed_run_resumes_exactly(quantized_recipe, tmp_path / "runs", {"train": {"save_every": 2, "epochs": 2}})


def test_two_processes_train_a_quantized_base_as_one(quantized_recipe, tmp_path):
    sections = {"train": {"max_steps": 3, "lr": 2e-2, "scheduler": "constant", "warmup_ratio": 0.0}}
    assert lrft("train", quantized_recipe("lora", name="one", **sections)).returncode == 0
    done = launch("train", quantized_recipe("lora", name="two", **sections))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 processes (ddp" in done.stderr
    assert_same_adapter(tmp_path / "runs" / "two", tmp_path / "runs" / "one", tol=1e-5)


@pytest.mark.parametrize("method", ["talora", "lorta"])
def test_merge_folds_onto_the_dequantized_weights_and_reports_both_gaps(cli, quantized_recipe, tmp_path, method):
    code, _, err = cli("train", quantized_recipe(method, name=method))
    assert code == 0, err
    code, out, err = cli("merge", tmp_path / "runs" / method, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    report = json.loads(out)
    q = report["quantization"]
    assert q["base"] == "nf4" and q["config"]["bnb_4bit_quant_type"] == "nf4"
    # onto the dequantized weights the merge is the adapted model, up to float32 rounding ...
    assert report["verdict"] == "ok" and report["max_abs_logit_diff"] <= report["parity_tolerance"]
    assert report["generation_identical"] and report["reload_matches_memory"]
    # ... while onto the original weights it would differ by the quantization error
    assert q["max_abs_logit_diff_merged_onto_original_weights"] > 100 * report["parity_tolerance"]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain float32 model
    assert "nf4 base: merged onto its dequantized weights" in "\n".join(parity_lines(report))


def test_the_peft_export_records_the_quantization_and_reopens_quantized(cli, quantized_recipe, tmp_path):
    code, _, err = cli("train", quantized_recipe("lora", name="peft"))
    assert code == 0, err
    code, _, err = cli("merge", tmp_path / "runs" / "peft", "--format", "peft", "--out", tmp_path / "exported")
    assert code == 0, err
    assert "trained on a nf4 base" in err + _
    provenance = json.loads((tmp_path / "exported" / "lrft_export.json").read_text())
    assert provenance["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert provenance["base_model"]["quantize"] == "nf4"
    _, run_out, _ = cli("eval", tmp_path / "runs" / "peft", "--json")
    code, peft_out, err = cli("eval", tmp_path / "exported", "--json")
    assert code == 0, err
    assert json.loads(peft_out)["loss"] == pytest.approx(json.loads(run_out)["loss"], rel=1e-6)


def test_a_missing_bitsandbytes_is_one_line(cli, quantized_recipe, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    code, _, err = cli("train", quantized_recipe("lora", name="nobnb"))
    assert code == 2 and "model.quantize: nf4 needs bitsandbytes" in err and "pip install 'lrft[qlora]'" in err
    assert "Traceback" not in err


def test_count_params_prints_the_quantized_weights_memory(cli):
    code, out, err = cli(
        "count-params", "--method", "lora", "--rank", "8", "--model", "llama2-7b", "--quantize", "nf4", "--json"
    )
    assert code == 0, err
    memory = json.loads(out)["weights_memory"]
    # 4.5 bits per Linear weight (4 + a float32 absmax per 64), embeddings and lm_head float32
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rest = 6_738_415_616 - linear
    assert memory["bytes"] == linear * 4.5 / 8 + 4 * rest and memory["float32_bytes"] == 4 * 6_738_415_616
    assert memory["adapter_bytes"] == 4 * 4_194_304
    code, out, _ = cli("count-params", "--method", "lora", "--rank", "8", "--model", "llama2-7b", "--quantize", "nf4")
    assert code == 0 and "MiB nf4 base (float32 25,705.0 MiB" in out
    code, _, err = cli("count-params", "--method", "lora", "--quantize", "nf3")
    assert code == 2 and "--quantize: unknown 'nf3'; choose one of: nf4, fp4, int8" in err
