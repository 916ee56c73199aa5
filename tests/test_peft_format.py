"""Serving: every method exported exactly as a PEFT LoRA, PEFT dirs read back, base fingerprint, atomic merge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    METHODS,
    assert_close_scaled,
    assert_merge_parity,
    markdown_block,
    recipe_dict,
    tiny_bert,
    write_recipe,
)

peft = pytest.importorskip("peft")
BERT_TARGETS = ["query", "key", "value", "attention.output.dense"]


def train_tiny(cli, tiny_recipe, method, name, **sections):
    params = {"rank": 4, **({"alpha": 2.0} if method == "lorta" else {})}
    recipe = tiny_recipe(
        method,
        name=name,
        adapter={"method": method, "target_modules": BERT_TARGETS, "params": params},
        calibration={"samples": 16, "batch_size": 8},
        **sections,
    )
    code, _, err = cli("train", recipe, "train.max_steps=3", "train.lr=5e-2")
    assert code == 0, err
    return recipe


def lrft_logits(run, batch):
    from lrft.open_runs import load_run

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
    assert_close_scaled(theirs, lrft_logits(run, b), 1e-5)


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
    assert_close_scaled(theirs, lrft_logits(run, b), 1e-5)


def test_peft_lora_dirs_are_read_for_eval_and_merge(cli, tmp_path, tiny_model_dir, tiny_data_dir):
    """An adapter trained elsewhere (here: made by PEFT) evaluates and merges through lrft."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        task_type="SEQ_CLS",
        use_rslora=True,
        rank_pattern={"bert.encoder.layer.0.attention.self.query": 2},
        alpha_pattern={"bert.encoder.layer.0.attention.self.query": 3.0},
    )
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
        assert_close_scaled(a.model(**b).logits, model.eval()(**b).logits, 1e-5)
    dev = [json.loads(line) for line in (tiny_data_dir / "dev.jsonl").read_text().splitlines()]
    with torch.no_grad():
        predicted = model(**batch_of(tiny_model_dir, [r["text"] for r in dev])).logits.argmax(-1).tolist()
    assert ours["accuracy"] == pytest.approx(sum(p == r["label"] for p, r in zip(predicted, dev)) / len(dev))
    code, out, err = cli(
        "merge",
        adapter_dir,
        "--out",
        tmp_path / "merged",
        "--task",
        "text-classification",
        "--base",
        tiny_model_dir,
        "--data-path",
        tiny_data_dir,
        "--json",
    )
    assert code == 0, err
    assert_merge_parity(json.loads(out))


def test_a_different_base_is_refused_unless_forced(cli, tiny_recipe, tmp_path, tiny_model_dir):
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    recipe = tiny_recipe("lora", name="fp", model={"name": str(model_dir)})
    assert cli("train", recipe, "train.max_steps=1")[0] == 0
    run = tmp_path / "runs" / "fp"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model"]["fingerprint"]
    tiny_bert(seed=7).save_pretrained(model_dir)  # the base model changed since training
    for args in (
        ["eval", run],
        ["merge", run, "--out", tmp_path / "m"],
        ["merge", run, "--format", "peft", "--out", tmp_path / "p"],
    ):
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
    assert report["reload_matches_memory"] and report["verdict"] == "ok" and report["update_kept_min"] > 0.5
    saved = json.loads((tmp_path / "m16" / "merge_report.json").read_text())
    assert saved == report
    code, out, err = cli("merge", tmp_path / "runs" / "bf", "--out", tmp_path / "m16b", "--dtype", "bfloat16")
    assert code == 0 and out.splitlines()[0] == f"merged model written to {tmp_path / 'm16b'} (bfloat16)"
    assert "against the float32 merge: within bfloat16 rounding of the float32 merge (every module keeps ≥" in out


def test_a_causal_bf16_merge_writes_what_it_checked(cli, causal_recipe, tmp_path):
    """The merged model in memory is cast as from_pretrained(dtype=...) loads it (rotary inv_freq stays
    fp32), so the written files give bit-identical logits; a plain .to(bfloat16) did not."""
    assert cli("train", causal_recipe("lora", name="lm16"), "train.max_steps=2", "train.lr=5e-2")[0] == 0
    code, out, err = cli("merge", tmp_path / "runs" / "lm16", "--out", tmp_path / "m", "--dtype", "bfloat16", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["reload_matches_memory"] and report["max_abs_logit_diff_reload_vs_memory"] == 0.0
    assert report["verdict"] == "ok" and report["tied_embeddings"]


def test_a_merge_that_rounds_the_update_away_says_so(cli, tiny_recipe, tmp_path):
    """An update far below the resolution of bf16 weights: the merge warns and its verdict says so."""
    from safetensors.torch import load_file, save_file

    assert cli("train", tiny_recipe("lora", name="faint"), "train.max_steps=2")[0] == 0
    adapter = tmp_path / "runs" / "faint" / "adapter" / "adapter.safetensors"
    tensors = {k: (v * 1e-6 if ".lora_B" in k or k.endswith(".B") else v) for k, v in load_file(adapter).items()}
    save_file(tensors, str(adapter))
    code, out, err = cli("merge", tmp_path / "runs" / "faint", "--out", tmp_path / "m", "--dtype", "bfloat16")
    assert code == 0, err
    assert "warning:" in err and "keep less than 50% of their update in bfloat16" in err and "--format peft" in err
    assert "bfloat16 rounding loses part of the update (see the warning)" in out
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["verdict"] == "update_lost_in_rounding"


def test_outputs_are_portable(cli, tiny_recipe, tmp_path, tiny_model_dir):
    """A PEFT export names no path of this machine as its base (lrft's provenance keeps it), prints its
    result once on stdout, and reads back without --base here; every file lrft writes gets the same
    permissions as a plain file (safetensors writes 0600)."""
    from lrft.atomic_files import plain_file_mode

    train_tiny(cli, tiny_recipe, "tlora", "portable")
    run, out = tmp_path / "runs" / "portable", tmp_path / "served"
    code, stdout, err = cli("merge", run, "--format", "peft", "--out", out)
    assert code == 0, err
    assert stdout.count("written to") == 1 and "written to" not in err
    name = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert name == tiny_model_dir.name and not any(
        str(tmp_path) in f.read_text() for f in [out / "adapter_config.json"]
    )
    provenance = json.loads((out / "lrft_export.json").read_text())
    assert provenance["base_model"]["resolved_path"] == str(tiny_model_dir)
    code, stdout, err = cli("eval", out, "--json")
    assert code == 0 and json.loads(stdout)["task"] == "text-classification", err
    assert cli("merge", run, "--out", tmp_path / "merged")[0] == 0
    mode = plain_file_mode(tmp_path)
    written = [f for d in (run, out, tmp_path / "merged") for f in d.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in written)
    assert {
        str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777) for f in written if f.stat().st_mode & 0o777 != mode
    } == {}


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--format", "onnx"], "--format: unknown 'onnx'"),
        (["--format", "peft", "--dtype", "bfloat16"], "--dtype: a PEFT export keeps the adapter in float32"),
    ],
)
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


def test_the_serving_page_snippet_runs_as_written(cli, tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    """docs/serving.md's PEFT snippet, verbatim, in a fresh process without lrft, on an export of a run whose
    recipe names its base model by a relative dir: it loads without transformers' MISSING report, and
    the served model computes what lrft's does."""
    shutil.copytree(tiny_model_dir, tmp_path / "tiny-bert")
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(
        tmp_path / "snippet.yaml",
        recipe_dict(
            Path("tiny-bert"), tiny_data_dir, Path("runs"), "tlora", "snippet", train={"max_steps": 3, "lr": 5e-2}
        ),
    )
    assert cli("train", recipe)[0] == 0
    code, _, err = cli("merge", "runs/snippet", "--format", "peft", "--out", "served/adapter")
    assert code == 0, err
    texts = ["the film was good", "a very bad plot"]
    script = markdown_block("docs/serving.md", "## Loading an export with PEFT", "python") + (
        "import json, torch\nfrom transformers import AutoTokenizer\n"
        f"batch = AutoTokenizer.from_pretrained(base_name)({texts!r}, padding=True, return_tensors='pt')\n"
        "with torch.no_grad():\n    print(json.dumps(model.eval()(**batch).logits.tolist()))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "MISSING" not in run.stderr and "LOAD REPORT" not in run.stderr, run.stderr
    future = [line for line in run.stderr.splitlines() if "FutureWarning" in line]
    assert all("is_gradient_checkpointing" in line for line in future), future  # the one docs/serving.md explains
    served = torch.tensor(json.loads(run.stdout.splitlines()[-1]))
    assert_close_scaled(
        served, lrft_logits(tmp_path / "runs" / "snippet", batch_of(tmp_path / "tiny-bert", texts)), 1e-5
    )
