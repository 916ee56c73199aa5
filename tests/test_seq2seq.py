"""Encoder-decoder models (T5, BART): the prompt in the encoder, the response the decoder's labels.

Every method trains, evaluates (loss and greedy generation), merges with parity and exports to PEFT
(SEQ_2_SEQ_LM, loaded by PEFT alone) on tiny T5 and BART models; LoRTA's tensor indexes the encoder's
then the decoder's layers and each attention block's kinds; LoRA's count on T5-base's q, k, v, o, wi,
wo is the task-aware paper's 12,976,128 and the closed form that gives it matches a built tiny T5.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lrft.count_params import count_params
from lrft.inject import adapted, adapter_parameters
from tests.helpers import (
    FAMILIES,
    METHODS,
    assert_close_scaled,
    assert_merge_parity,
    batch,
    build,
    labeled,
    randomize,
    recipe_dict,
    save_tiny_family,
    tiny_family,
    write_recipe,
)

TARGETS = {"t5": ["q", "k", "v", "o"], "bart": ["q_proj", "k_proj", "v_proj", "out_proj"]}


@pytest.fixture(scope="module")
def seq2seq_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    return {family: save_tiny_family(root / family, family) for family in TARGETS}


@pytest.mark.parametrize("family", sorted(TARGETS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_evaluates_merges_and_exports_an_encoder_decoder(
    cli, seq2seq_dirs, tiny_gsm8k_dir, tmp_path, family, method
):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    name = f"{family}_{method}"
    recipe = recipe_dict(
        seq2seq_dirs[family], tiny_gsm8k_dir, tmp_path / "runs", method, name, causal=True,
        adapter={"target_modules": TARGETS[family]}, train={"eval_on_start": True},
    )  # fmt: skip
    code, out, err = cli("train", write_recipe(tmp_path / "r.yaml", recipe), "--json")
    assert code == 0, err
    summary, run = json.loads(out), tmp_path / "runs" / name
    evals = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"eval"' in line]
    assert evals[-1]["loss"] < evals[0]["loss"] and {"exact_match", "loss"} <= set(summary["final"])
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 12

    code, out, err = cli("eval", run, "--json")  # the run rebuilt: the same loss, the encoder-decoder's features
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)

    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert_merge_parity(report)
    assert report["generation_identical"]
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").config.is_encoder_decoder

    code, out, err = cli("merge", run, "--format", "peft", "--out", tmp_path / "peft", "--json")
    assert code == 0, err
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    served = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(seq2seq_dirs[family]), tmp_path / "peft")
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged")
    b = labeled(merged, batch())
    with torch.no_grad():
        want, got = merged.eval()(**b).logits, served.eval()(**b).logits
    assert_close_scaled(got, want, 1e-5, msg="PEFT's SEQ_2_SEQ_LM load of the export")


def test_lorta_indexes_encoder_then_decoder_layers_and_each_attention_blocks_kinds():
    """C_L has the encoder's 2 and the decoder's 2 layers, C_M the 4 kinds of each of the three attention
    blocks; each projection's update is the per-head formula of its own (layer, kind) slice."""
    model, found, p, ctx, built = build("lorta", model=tiny_family("t5"), targets=["q", "k", "v", "o"])
    f = model.lrft_shared
    blocks = ("", "decoder.", "cross.")
    assert f.kinds == [f"{b}{k}" for b in blocks for k in "qkvo"] and f.C_L.shape[0] == 4
    assert sum(t.numel() for t in adapter_parameters(model)) == (32 + 8 + 4 + 4 + 12) * p.rank
    randomize(model)
    wrappers = adapted(model)
    cross_q = wrappers["decoder.block.1.layer.1.EncDecAttention.q"].adapter
    assert (cross_q.layer, cross_q.kind) == (3, "cross.q") and cross_q.shared_input is None  # q reads the decoder
    cross_k = wrappers["decoder.block.1.layer.1.EncDecAttention.k"].adapter
    assert cross_k.shared_input is not None and cross_q not in cross_k.shared_input.members
    for name, w in wrappers.items():
        b = w.adapter
        with torch.no_grad():
            delta = b.delta_weight()
            heads = delta.view(4, 8, 32) if b.matrix != "o" else delta.T.reshape(4, 8, 32)
            for h, block in enumerate(heads):
                c = f.C_H[h] * f.C_L[b.layer] * f.C_M[f.kinds.index(b.kind)]
                want = b.scale * f.B @ torch.diag(c) @ f.A.T
                assert_close_scaled(block, want, 1e-5, msg=f"{name} head {h}")


def lora_closed_form(d: int, d_ff: int, layers: int, rank: int, gated: bool = False) -> int:
    """LoRA's count on T5's q, k, v, o, wi (wi_0, wi_1 gated) and wo: r·(in + out) per Linear; an encoder
    layer has one attention block, a decoder layer two."""
    attention = 4 * 2 * d
    ffn = (3 if gated else 2) * (d + d_ff)
    return rank * layers * ((attention + ffn) + (2 * attention + ffn))


def test_t5_base_lora_count_is_the_papers_and_the_closed_form_matches_a_built_t5(tmp_path):
    targets = ["q", "k", "v", "o", "wi", "wo"]
    assert count_params("lora", 32, model="t5-base", targets=targets)["trainable"] == 12_976_128
    assert lora_closed_form(768, 3072, 12, 32) == 12_976_128
    for family, gated, kinds in (("t5", False, targets), ("t5-gated", True, [*targets[:4], "wi_0", "wi_1", "wo"])):
        model, *_ = build("lora", model=tiny_family(family), targets=kinds)
        built = sum(t.numel() for t in adapter_parameters(model))
        assert built == lora_closed_form(32, 64, 2, 4, gated), family
        config_dir = tmp_path / family
        copy.deepcopy(model.config).save_pretrained(config_dir)
        assert count_params("lora", 4, model=str(config_dir), targets=kinds)["trainable"] == built
    assert FAMILIES["t5-gated"][2]["feed_forward_proj"] == "gated-gelu"


def test_model_type_seq2seq_lm_fits_prompt_tasks_only(tmp_path, tiny_model_dir, tiny_data_dir):
    from lrft.errors import LrftError
    from lrft.recipe import load_recipe

    ok = recipe_dict(tiny_model_dir, tiny_data_dir, tmp_path, causal=True, model={"type": "seq2seq_lm"})
    assert load_recipe(write_recipe(tmp_path / "ok.yaml", ok)).model.type == "seq2seq_lm"
    bad = recipe_dict(tiny_model_dir, tiny_data_dir, tmp_path, model={"type": "seq2seq_lm"})
    with pytest.raises(LrftError, match="model.type: seq2seq_lm does not fit data.task text-classification"):
        load_recipe(write_recipe(tmp_path / "bad.yaml", bad))


def test_a_peft_seq2seq_adapter_made_elsewhere_opens_with_peft_outputs(tmp_path, seq2seq_dirs):
    import peft
    from transformers import AutoModelForSeq2SeqLM

    from lrft.peft_format import load_peft

    base = seq2seq_dirs["t5"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wi"], task_type="SEQ_2_SEQ_LM")
    theirs = peft.get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(base), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_peft(tmp_path / "adapter", "gsm8k", str(base)).adapted
    # q and v of 6 attention blocks (2 encoder self, 2 decoder self, 2 cross), wi of 4 layers
    assert ours.model.config.is_encoder_decoder and len(adapted(ours.model)) == 2 * 6 + 4
    b = labeled(ours.model, batch())
    with torch.no_grad():
        want, got = theirs.eval()(**b).logits, ours.model.eval()(**b).logits
    assert_close_scaled(got, want, 1e-5, msg="PEFT's T5 LoRA read by lrft")
