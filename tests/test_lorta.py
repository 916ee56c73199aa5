"""LoRTA specifics: one CP tensor stored once, the per-head formulas, GQA, paper counts, bad targets."""

from __future__ import annotations

import json

import pytest
import torch

from lrft.errors import LrftError
from lrft.inject import adapted, adapter_parameters, saved_state
from lrft.methods.lorta import Branch
from tests.helpers import build, randomize, tiny_bert, tiny_llama

BERT_QKVO = ["query", "key", "value", "attention.output.dense"]
LLAMA_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def reference_delta(branch: Branch, heads: int, head_dim: int) -> torch.Tensor:
    """ΔW assembled head by head from the design's formulas, independently of the implementation."""
    f = branch.factors
    kinds = f.kinds
    head_factor = f.C_KV if branch.kind in ("k", "v") and f.C_KV is not None else f.C_H
    blocks = []
    for h in range(head_factor.shape[0]):
        c = head_factor[h] * f.C_L[branch.layer] * f.C_M[kinds.index(branch.kind)]
        if branch.kind == "o":
            blocks.append(f.A @ torch.diag(c) @ f.B.T)  # d × d_h, heads along the input
        else:
            blocks.append(f.B @ torch.diag(c) @ f.A.T)  # d_h × d, heads along the output
    return branch.scale * torch.cat(blocks, dim=1 if branch.kind == "o" else 0)


@pytest.mark.parametrize("factory, targets", [(tiny_bert, BERT_QKVO), (tiny_llama, LLAMA_QKVO)])
def test_delta_weight_matches_per_head_formula(factory, targets):
    model, *_ = build("lorta", model=factory(), targets=targets)
    randomize(model)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for name, w in adapted(model).items():
        with torch.no_grad():
            want = reference_delta(w.adapter, cfg.num_attention_heads, head_dim)
            torch.testing.assert_close(w.adapter.delta_weight(), want, atol=1e-6, rtol=1e-5, msg=name)
            x = torch.randn(3, 4, w.in_features)
            torch.testing.assert_close(w.adapter(x), x @ want.T, atol=1e-5, rtol=1e-5, msg=name)


def test_factors_are_stored_once():
    model, found, *_ = build("lorta", model=tiny_bert(), targets=BERT_QKVO)
    branches = [w.adapter for w in adapted(model).values()]
    assert len(branches) == 8 and all(b.factors is model.lrft_shared for b in branches)
    assert len({b.factors.A.data_ptr() for b in branches}) == 1  # one storage across layers and kinds
    state = saved_state(model, include_head=False)
    assert sorted(state) == ["lrft_shared.A", "lrft_shared.B", "lrft_shared.C_H", "lrft_shared.C_L", "lrft_shared.C_M"]
    assert len(list(adapter_parameters(model))) == 5
    assert {(b.layer, b.kind) for b in branches} == {(l, k) for l in (0, 1) for k in "qkvo"}


def test_gqa_kv_heads_get_their_own_head_factor():
    model, *_ = build("lorta", model=tiny_llama(), targets=["q_proj", "v_proj"])
    f = model.lrft_shared
    assert f.C_H.shape == (4, 4) and f.C_KV.shape == (2, 4) and f.kinds == ["q", "v"]
    v = adapted(model)["model.layers.1.self_attn.v_proj"]
    assert v.adapter.delta_weight().shape == (16, 32)  # 2 kv heads × 8 dims
    # no kv-head factor without GQA, or when neither k nor v is targeted
    assert build("lorta", model=tiny_llama(num_key_value_heads=4), targets=["v_proj"])[0].lrft_shared.C_KV is None
    assert build("lorta", model=tiny_llama(), targets=["q_proj", "o_proj"])[0].lrft_shared.C_KV is None


def test_init_starts_unchanged_and_follows_official_code():
    model, *_ = build("lorta", model=tiny_bert(), targets=BERT_QKVO, rank=8)
    f = model.lrft_shared
    assert torch.count_nonzero(f.B) == 0
    for name in ("A", "C_H", "C_L", "C_M"):  # Kaiming-uniform a=√5 on (rows × r): bound 1/sqrt(r)
        t = getattr(f, name)
        assert t.abs().max() <= 1 / 8 ** 0.5 and t.abs().max() > 0.5 / 8 ** 0.5, name
    assert all(w.adapter.scale == pytest.approx(1 / 8) for w in adapted(model).values())  # α 1 / r 8


@pytest.mark.parametrize("targets, match", [
    (["query", "intermediate.dense"], "lorta adapts attention projections only.*intermediate.dense"),
    (["value", "output.dense"], "lorta adapts attention projections only"),
])
def test_non_attention_targets_are_refused(targets, match):
    with pytest.raises(LrftError, match=match):
        build("lorta", model=tiny_bert(), targets=targets)


def test_hidden_not_heads_times_head_dim_is_refused():
    model = tiny_llama(head_dim=4)  # q_proj becomes 16 × 32 while hidden is 32
    with pytest.raises(LrftError, match="lorta needs hidden_size = heads × head_dim"):
        build("lorta", model=model, targets=["q_proj"])


@pytest.mark.parametrize("args, trainable, lora", [
    (["--rank", "4", "--model", "llama2-7b", "--targets", "q_proj,v_proj"], 17_160, 2_097_152),
    (["--rank", "64", "--model", "llama2-7b", "--targets", "q_proj,v_proj"], 274_560, 33_554_432),
    (["--rank", "8"], 9_040, 786_432),
])
def test_count_params_reproduces_lorta_table_1(cli, args, trainable, lora):
    code, out, err = cli("count-params", "--method", "lorta", *args, "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["trainable"] == trainable and counts["lora"] == lora


def test_lorta_trains_through_the_cli_and_merges(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe("lorta", name="lorta_e2e", adapter={"method": "lorta", "target_modules": BERT_QKVO,
                                                             "params": {"rank": 4, "alpha": 1.0}})
    code, out, err = cli("train", recipe, "train.max_steps=3", "train.lr=3e-2", "--json")
    assert code == 0, err
    run = tmp_path / "runs" / "lorta_e2e"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["meta"]["kinds"] == ["q", "k", "v", "o"] and config["meta"]["heads"] == 4
    assert json.loads(out)["trainable_params"] == (32 + 8 + 4 + 2 + 4) * 4
    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    assert json.loads(out)["max_abs_logit_diff"] <= 1e-4
