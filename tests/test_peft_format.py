"""Serving: every method exported exactly as a PEFT LoRA, PEFT dirs read back, base fingerprint, atomic merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers import METHODS, tiny_bert

peft = pytest.importorskip("peft")
BERT_TARGETS = ["query", "key", "value", "attention.output.dense"]


def train_tiny(cli, tiny_recipe, method, name, **sections):
    params = {"rank": 4, **({"alpha": 2.0} if method == "lorta" else {})}
    recipe = tiny_recipe(method, name=name, adapter={"method": method, "target_modules": BERT_TARGETS, "params": params},
                         calibration={"samples": 16, "batch_size": 8}, **sections)
    code, _, err = cli("train", recipe, "train.max_steps=3", "train.lr=5e-2")
    assert code == 0, err
    return recipe


def lrft_logits(run, batch):
    from lrft.rundir import load_run

    a = load_run(run).adapted
    with torch.no_grad():
        return a.model(**batch).logits


def batch_of(tokenizer_dir, texts):
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(tokenizer_dir)(texts, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("method", METHODS)
def test_encoder_export_loads_in_peft_with_identical_outputs(cli, tiny_recipe, tmp_path, tiny_model_dir, method):
    from transformers import AutoModelForSequenceClassification

    train_tiny(cli, tiny_recipe, method, f"enc_{method}")
    run, out = tmp_path / "runs" / f"enc_{method}", tmp_path / "served"
    code, stdout, err = cli("merge", run, "--format", "peft", "--out", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["max_abs_branch_diff"] <= 1e-5 and report["modules_to_save"] == ["classifier"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] and config["task_type"] == "SEQ_CLS"
    if method == "talora":
        assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    served = peft.PeftModel.from_pretrained(base, out).eval()  # PEFT alone: no lrft code on this path
    b = batch_of(tiny_model_dir, ["the film was good", "a very bad plot and it was awful", "movie"])
    with torch.no_grad():
        theirs = served(**b).logits
    torch.testing.assert_close(theirs, lrft_logits(run, b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_causal_export_loads_in_peft_with_identical_outputs(cli, causal_recipe, tmp_path, tiny_llama_dir, method):
    from transformers import AutoModelForCausalLM

    recipe = causal_recipe(method, name=f"lm_{method}")
    assert cli("train", recipe, "train.max_steps=2", "train.lr=5e-2")[0] == 0
    run, out = tmp_path / "runs" / f"lm_{method}", tmp_path / "served"
    code, _, err = cli("merge", run, "--format", "peft", "--out", out)
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    served = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    b = batch_of(tiny_llama_dir, ["what is 1 plus 2?", "the film"])
    with torch.no_grad():
        theirs = served(**b).logits
    torch.testing.assert_close(theirs, lrft_logits(run, b), atol=1e-5, rtol=0)


def test_peft_lora_dirs_are_read_for_eval_and_merge(cli, tmp_path, tiny_model_dir, tiny_data_dir):
    """An adapter trained elsewhere (here: made by PEFT) evaluates and merges through lrft."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", use_rslora=True,
                          rank_pattern={"bert.encoder.layer.0.attention.self.query": 2},
                          alpha_pattern={"bert.encoder.layer.0.attention.self.query": 3.0})
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "classifier" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    model.base_model.model.config._name_or_path = str(tiny_model_dir)
    adapter_dir = tmp_path / "peft_adapter"
    model.save_pretrained(adapter_dir)
    code, out, err = cli("eval", adapter_dir, "--task", "text-classification", "--data-path", tiny_data_dir, "--json")
    assert code == 0, err
    ours = json.loads(out)
    from lrft.peft_format import load_peft

    a = load_peft(adapter_dir, "text-classification", str(tiny_model_dir)).adapted
    b = batch_of(tiny_model_dir, ["the film was good", "bad"])
    with torch.no_grad():
        torch.testing.assert_close(a.model(**b).logits, model.eval()(**b).logits, atol=1e-5, rtol=0)
    dev = [json.loads(line) for line in (tiny_data_dir / "dev.jsonl").read_text().splitlines()]
    with torch.no_grad():
        predicted = model(**batch_of(tiny_model_dir, [r["text"] for r in dev])).logits.argmax(-1).tolist()
    assert ours["accuracy"] == pytest.approx(sum(p == r["label"] for p, r in zip(predicted, dev)) / len(dev))
    code, out, err = cli("merge", adapter_dir, "--out", tmp_path / "merged", "--task", "text-classification",
                         "--base", tiny_model_dir, "--data-path", tiny_data_dir, "--json")
    assert code == 0 and json.loads(out)["max_abs_logit_diff"] <= 1e-4, err


def test_a_different_base_is_refused_unless_forced(cli, tiny_recipe, tmp_path, tiny_model_dir):
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    recipe = tiny_recipe("lora", name="fp", model={"name": str(model_dir)})
    assert cli("train", recipe, "train.max_steps=1")[0] == 0
    run = tmp_path / "runs" / "fp"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model"]["fingerprint"]
    tiny_bert(seed=7).save_pretrained(model_dir)  # the base model changed since training
    for args in (["eval", run], ["merge", run, "--out", tmp_path / "m"], ["merge", run, "--format", "peft", "--out",
                                                                          tmp_path / "p"]):
        code, _, err = cli(*args)
        assert code == 2 and "target weights differ" in err and "--force" in err, args
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()
    code, _, err = cli("eval", run, "--force")
    assert code == 0 and "warning:" in err and "going on because of --force" in err


def test_an_interrupted_merge_leaves_nothing_behind(cli, tiny_recipe, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    assert cli("train", tiny_recipe("lora", name="atomic"), "train.max_steps=1")[0] == 0

    def crash(self, path, *a, **k):
        (path / "model.safetensors").write_bytes(b"half")  # a partly written dir...
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):  # not a user error: it keeps its traceback
        cli("merge", tmp_path / "runs" / "atomic", "--out", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary dir either


def test_bf16_merge_reports_the_diff_against_the_fp32_merge(cli, tiny_recipe, tmp_path):
    assert cli("train", tiny_recipe("tlora", name="bf"), "train.max_steps=2")[0] == 0
    code, out, err = cli("merge", tmp_path / "runs" / "bf", "--out", tmp_path / "m16", "--dtype", "bfloat16", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["dtype"] == "bfloat16" and "max_abs_logit_diff_vs_fp32_merge" in report
    saved = json.loads((tmp_path / "m16" / "merge_report.json").read_text())
    assert saved == report


@pytest.mark.parametrize("args, expect", [
    (["--format", "onnx"], "--format: unknown 'onnx'"),
    (["--format", "peft", "--dtype", "bfloat16"], "--dtype: a PEFT export keeps the adapter in float32"),
])
def test_bad_merge_arguments(cli, tiny_recipe, tmp_path, args, expect):
    assert cli("train", tiny_recipe("lora", name="args"), "train.max_steps=1")[0] == 0
    code, _, err = cli("merge", tmp_path / "runs" / "args", "--out", tmp_path / "x", *args)
    assert code == 2 and expect in err


def test_foreign_peft_types_are_refused(cli, tmp_path):
    d = tmp_path / "ia3"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": "x"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(d / "adapter_model.safetensors"))
    code, _, err = cli("eval", d, "--task", "glue/mrpc")
    assert code == 2 and "a PEFT IA3 adapter; lrft reads LoRA adapters only" in err
