"""The model-family matrix: every registered method on a tiny model of every family people fine-tune.

Families (tests/helpers.py FAMILIES): BERT, RoBERTa, DeBERTa (v1), DeBERTa-v2, ESM, DistilBERT,
ModernBERT (sequence classification); GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3,
OPT, GPT-NeoX (causal LM). They cover separate and fused q, k, v projections (GPT-2 c_attn, Phi-3
qkv_proj, ModernBERT Wqkv in [q; k; v] blocks; GPT-NeoX query_key_value and DeBERTa in_proj per head), Conv1D layers (GPT-2), grouped-query attention
and head_dim ≠ hidden / heads (Qwen3, Gemma 3). Per cell, on the family's attention projections: a
few steps lower the loss; the PEFT export, loaded by PEFT alone, and the merged model both equal the
adapted model; the built count is the closed-form one; talora's calibration measures every target.
Per cell on the family's default targets: they resolve, and count-params answers the built count from
the saved config alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from lrft import methods
from lrft.count_params import count_params
from lrft.errors import LrftError
from lrft.inject import adapted, adapter_parameters, merge, set_head_trainable
from lrft.targets import default_targets, head_modules, stack_layers
from tests.helpers import (
    FAMILIES,
    METHODS,
    assert_merge_parity,
    batch,
    build,
    is_seq2seq,
    labeled,
    outputs,
    recipe_dict,
    save_tiny_family,
    tiny_family,
    tiny_family_config,
    visible_update,
    write_recipe,
)

peft = pytest.importorskip("peft")
MATRIX = [(f, m) for f in FAMILIES for m in METHODS]
TOL = 1e-5  # relative to the largest |value| compared (a classifier's random head gives logits of 0.01)


def loss(model, b: dict) -> float:
    with torch.no_grad():
        return float(model.eval()(**b).loss)


def train(model, b: dict, steps: int, lr: float) -> None:
    model.train()
    opt = torch.optim.AdamW(list(adapter_parameters(model)), lr=lr)
    for _ in range(steps):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()


def assert_close(got: dict, want: dict, what: str) -> None:
    for key, value in want.items():
        diff, scale = float((got[key] - value).abs().max()), float(value.abs().max())
        assert diff <= TOL * scale, f"{what}: {key} differ by {diff:.3g}"


def served_by_peft(base, model, tmp_path):
    """The adapted model's export, written as a PEFT dir and loaded on a copy of the base by PEFT alone."""
    from safetensors.torch import save_file

    from lrft.peft_format import CONFIG, WEIGHTS, lora_adapter

    state, config, _ = lora_adapter(model, heads=list(head_modules(model)))  # PEFT's SEQ_CLS loads a head
    task_type = "SEQ_2_SEQ_LM" if is_seq2seq(model) else "CAUSAL_LM" if model.can_generate() else "SEQ_CLS"
    save_file(state, str(tmp_path / WEIGHTS))
    (tmp_path / CONFIG).write_text(json.dumps({"peft_type": "LORA", "task_type": task_type, **config}))
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), config


@pytest.mark.parametrize("family, method", MATRIX)
def test_method_trains_merges_and_exports_on_family(family, method, tmp_path):
    base = tiny_family(family)
    model, found, p, ctx, built = build(method, model=copy.deepcopy(base), targets=FAMILIES[family][3])
    set_head_trainable(model, False)  # the adapters alone must move the loss
    m = methods.get(method)
    assert sum(t.numel() for t in adapter_parameters(model)) == m.count(
        found, p, dataclasses.replace(ctx, saved_meta=built.meta)
    )
    if method == "talora":  # calibration measured every target: its importance and its input covariance
        stats = ctx.calibration
        assert all(stats.importance[t.name] > 0 and stats.covariance[t.name].shape == (t.shape[1],) * 2 for t in found)
        assert sum(v["rank"] for v in built.meta["modules"].values()) == len(found) * p.rank

    b = labeled(model, batch())
    before = loss(model, b)
    # 5 × the recipes' learning rate: the tiny models' random, frozen task heads respond weakly
    train(model, b, steps=5, lr=5 * m.suggested_lr)
    assert loss(model, b) < before * (1 - 1e-5), "five steps on one batch did not lower its loss"

    want = visible_update(model, outputs(base, b)["hidden"], b)
    served, config = served_by_peft(base, model, tmp_path)
    assert config["fan_in_fan_out"] == any(t.transposed for t in found)
    assert_close(outputs(served, b), want, "PEFT export loaded by PEFT")
    merge(model)
    assert not adapted(model)
    assert_close(outputs(model, b), want, "merged model")


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    """Each family's config.json alone, as count-params reads a model dir."""
    root = tmp_path_factory.mktemp("family-configs")
    for family in FAMILIES:
        tiny_family_config(family).save_pretrained(root / family)
    return root


@pytest.mark.parametrize("family, method", MATRIX)
def test_default_targets_resolve_and_count_params_matches(family, method, config_dirs):
    model = tiny_family(family)
    names = default_targets(model.config)
    model, found, *_, built = build(method, model=model, targets=names)
    encoder, decoder = stack_layers(model.config)  # an encoder-decoder's decoder layers hold two attention blocks
    assert {t.kind for t in found} == set(names) and len(found) == len(names) * (encoder + 2 * decoder)
    counts = count_params(method, 4, model=str(config_dirs / family), saved_meta=built.meta)
    assert counts["targets"] == names and counts["modules"] == len(found)
    assert counts["trainable"] == sum(t.numel() for t in adapter_parameters(model))


# ------------------------------------------------------------------------------ where lorta cannot apply


def test_lorta_outside_attention_says_what_to_use():
    with pytest.raises(LrftError) as e:
        build("lorta", model=tiny_family("gpt2"), targets=["mlp.c_fc"])
    assert "\n" not in str(e.value)
    assert "lorta adapts attention projections only, and transformer.h.0.mlp.c_fc is not one" in str(e.value)
    assert "fused q,k,v in" in str(e.value) and "gpt2 c_attn" in str(e.value)
    assert "lora, tlora and talora adapt any Linear layer" in str(e.value)


def test_lorta_refuses_a_fused_projection_of_unknown_layout():
    """Falcon's query_key_value groups heads by kv head: not a layout lrft knows, so no guess is made."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
    )
    model = FalconForCausalLM(config)
    with pytest.raises(LrftError, match="query_key_value is not one.*lora, tlora and talora adapt any Linear layer"):
        build("lorta", model=model, targets=["query_key_value"])
    for method in ("lora", "talora"):  # what the error recommends works there
        build(method, model=FalconForCausalLM(config), targets=["query_key_value"])


# ------------------------------------------------------------------------- Conv1D and count-params


def test_peft_lora_on_conv1d_is_read_back_exactly(tmp_path):
    """A LoRA made by PEFT on GPT-2 (fan_in_fan_out: true) opens in lrft with PEFT's outputs."""
    from lrft.peft_format import load_peft

    base_dir = save_tiny_family(tmp_path / "gpt2", "gpt2")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    theirs = peft.get_peft_model(tiny_family("gpt2"), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_peft(tmp_path / "adapter", "gsm8k", str(base_dir)).adapted
    wrappers = adapted(ours.model)  # attn.c_attn, attn.c_proj and mlp.c_proj of 2 layers, all Conv1D
    assert len(wrappers) == 6 and all(w.transposed for w in wrappers.values())
    assert_close(outputs(ours.model, batch()), outputs(theirs, batch()), "PEFT's GPT-2 LoRA read by lrft")


def test_task_heads_include_the_layers_made_for_the_task():
    """DistilBERT's pre_classifier and DeBERTa's pooler are new at fine-tuning, as the classifier is."""
    assert set(head_modules(tiny_family("distilbert"))) == {"pre_classifier", "classifier"}
    assert set(head_modules(tiny_family("deberta-v2"))) == {"pooler", "classifier"}
    assert set(head_modules(tiny_family("bert"))) == {"classifier"}  # BERT's pooler is pretrained, in bert.pooler


def test_peft_distilbert_classifier_is_read_with_its_heads(tmp_path):
    """PEFT trains DistilBERT's pre_classifier with the classifier (its suffix match); lrft reads both
    back and takes the label count from the classifier, not from pre_classifier."""
    from lrft.peft_format import load_peft

    base_dir = save_tiny_family(tmp_path / "distilbert", "distilbert")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(tiny_family("distilbert"), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:  # lora_B and both heads away from their init
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    theirs.save_pretrained(tmp_path / "adapter")
    opened = load_peft(tmp_path / "adapter", "text-classification", str(base_dir))
    assert opened.adapted.label_names == ["0", "1"]
    assert_close(outputs(opened.adapted.model, batch()), outputs(theirs, batch()), "PEFT's DistilBERT read by lrft")


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_lorta_run_trains_merges_and_serves(cli, tmp_path, tiny_gsm8k_dir, family):
    """Through the CLI: lorta on GPT-2's fused Conv1D c_attn and on Gemma 3's head_dim ≠ hidden / heads;
    merge and the PEFT export rebuild the adapter from its saved config, and PEFT serves the merged model."""
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_family(tmp_path / family, family)
    targets = FAMILIES[family][3]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(
            model_dir,
            tiny_gsm8k_dir,
            tmp_path / "runs",
            "lorta",
            family,
            causal=True,
            adapter={"target_modules": targets},
        ),
    )
    code, out, err = cli("train", recipe, "train.max_steps=2", "train.lr=5e-2", "--json")
    assert code == 0, err
    run = tmp_path / "runs" / family
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())["meta"]
    assert meta["kinds"] == ["q", "k", "v", "o"]
    assert meta["fused"] == (
        {"module": "c_attn", "kinds": ["q", "k", "v"], "packing": "blocks"} if family == "gpt2" else None
    )
    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert_merge_parity(report)
    assert report["generation_identical"]
    code, out, err = cli("merge", run, "--format", "peft", "--out", tmp_path / "served", "--json")
    assert code == 0, err
    config = json.loads((tmp_path / "served" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (family == "gpt2")
    served = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "served")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert_close(outputs(served, batch()), outputs(merged, batch()), "PEFT export against the merged model")


@pytest.mark.parametrize(
    "family, targets, trainable",
    [
        # (d + d_h + H + L + M + H_kv)·r: Gemma 3 hidden 40, 4 heads of 16, 1 kv head; GPT-2's fused c_attn has M = 3
        ("gemma3", "q_proj,k_proj,v_proj,o_proj", (40 + 16 + 4 + 2 + 4 + 1) * 4),
        ("qwen3", "q_proj,v_proj", (32 + 16 + 4 + 2 + 2 + 2) * 4),
        ("gpt2", "c_attn", (32 + 8 + 4 + 2 + 3) * 4),
        ("phi3", "qkv_proj,o_proj", (32 + 8 + 4 + 2 + 4 + 2) * 4),
    ],
)
def test_count_params_cli_answers_from_a_config_dir(cli, config_dirs, family, targets, trainable):
    code, out, err = cli(
        "count-params",
        "--method",
        "lorta",
        "--rank",
        "4",
        "--model",
        config_dirs / family,
        "--targets",
        targets,
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["trainable"] == trainable
