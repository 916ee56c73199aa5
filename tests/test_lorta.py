"""LoRTA specifics: one CP tensor stored once, the per-head formulas, GQA, d_h apart from d, fused q/k/v
projections in each family's layout, paper counts, bad targets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lrft.errors import LrftError
from lrft.inject import adapted, adapter_parameters, saved_state
from lrft.methods.lorta import METHOD, Branch
from lrft.targets import find_targets
from tests.helpers import (
    FAMILIES,
    assert_close_scaled,
    assert_merge_parity,
    batch,
    build,
    labeled,
    randomize,
    tiny_bert,
    tiny_family,
    tiny_llama,
)

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


@pytest.mark.parametrize(
    "factory, targets",
    [
        (tiny_bert, BERT_QKVO),
        (tiny_llama, LLAMA_QKVO),
        (lambda: tiny_llama(head_dim=16), LLAMA_QKVO),  # 4 heads × 16 = 64 ≠ hidden 32, as Gemma 3 and Qwen 3
    ],
)
def test_delta_weight_matches_per_head_formula(factory, targets):
    model, *_ = build("lorta", model=factory(), targets=targets)
    randomize(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for name, w in adapted(model).items():
        with torch.no_grad():
            want = reference_delta(w.adapter, cfg.num_attention_heads, head_dim)
            assert_close_scaled(w.adapter.delta_weight(), want, 1e-5, msg=name)
            x = torch.randn(3, 4, w.in_features)
            assert_close_scaled(w.adapter(x), x @ want.T, 1e-5, msg=name)


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
        assert t.abs().max() <= 1 / 8**0.5 and t.abs().max() > 0.5 / 8**0.5, name
    assert all(w.adapter.scale == pytest.approx(1 / 8) for w in adapted(model).values())  # α 1 / r 8


@pytest.mark.parametrize(
    "targets, match",
    [
        (["query", "intermediate.dense"], "lorta adapts attention projections only.*intermediate.dense"),
        (["value", "output.dense"], "lorta adapts attention projections only"),
    ],
)
def test_non_attention_targets_are_refused(targets, match):
    with pytest.raises(LrftError, match=match):
        build("lorta", model=tiny_bert(), targets=targets)


def test_head_dim_is_sized_apart_from_the_hidden_size():
    """d = 32 and d_h = 16 with 4 heads: the model-dimension and head-dimension factors differ in size."""
    model, *_, built = build("lorta", model=tiny_llama(head_dim=16), targets=LLAMA_QKVO)
    f = model.lrft_shared
    assert f.A.shape == (32, 4) and f.B.shape == (16, 4) and built.meta["head_dim"] == 16
    shapes = {w.adapter.kind: tuple(w.adapter.delta_weight().shape) for w in adapted(model).values()}
    assert shapes == {"q": (64, 32), "k": (32, 32), "v": (32, 32), "o": (32, 64)}
    assert sum(t.numel() for t in adapter_parameters(model)) == (32 + 16 + 4 + 2 + 4 + 2) * 4


def split_qkv(delta: torch.Tensor, family: str, cfg) -> dict[str, torch.Tensor]:
    """q, k, v of a fused projection's ΔW (out × d) as (heads, d_h, d), split as transformers' attention
    code splits the projection's output (its last dim, ΔW's rows)."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim, kv = d // heads, getattr(cfg, "num_key_value_heads", None) or heads
    if family == "gpt2":  # c_attn(x).split(d, dim=2)
        q, k, v = delta.split(d, dim=0)
    elif family == "phi3":  # qkv[..., :H·d_h], then H_kv·d_h for k, the rest for v
        q, k, v = (
            delta[: heads * head_dim],
            delta[heads * head_dim : (heads + kv) * head_dim],
            delta[(heads + kv) * head_dim :],
        )
    elif family == "modernbert":  # qkv.view(..., 3, -1, d_h).unbind(dim=-3)
        q, k, v = delta.view(3, -1, d).unbind(0)
    else:  # gpt_neox: qkv.view(..., H, 3·d_h) per head, then .chunk(3, dim=-1); DeBERTa v1's in_proj too
        # (transpose_for_scores(qp) views (…, H, 3·d_h), then .chunk(3, dim=-1))
        q, k, v = (part.reshape(-1, d) for part in delta.view(heads, 3 * head_dim, d).chunk(3, dim=1))
    return {kind: m.view(-1, head_dim, d) for kind, m in zip("qkv", (q, k, v))}


@pytest.mark.parametrize("family", ["gpt2", "phi3", "modernbert", "gpt_neox", "deberta"])
def test_fused_projection_holds_each_kinds_per_head_formula(family):
    """Every head's q, k and v rows of a fused projection, found as the model's own code finds them,
    are B diag(C_H[h] ⊙ C_L[l] ⊙ C_M[kind]) Aᵀ (C_KV for k, v under GQA, as Phi-3 here)."""
    model, *_ = build("lorta", model=tiny_family(family), targets=FAMILIES[family][3])
    randomize(model)
    f = model.lrft_shared
    assert f.kinds == ["q", "k", "v", "o"]
    for name, w in adapted(model).items():
        if w.adapter.kind != "qkv":
            continue
        with torch.no_grad():
            parts = split_qkv(w.adapter.delta_weight(), family, model.config)
            for kind, blocks in parts.items():
                head_factor = f.C_KV if kind in "kv" and f.C_KV is not None else f.C_H
                assert blocks.shape[0] == head_factor.shape[0], (name, kind)
                for h, block in enumerate(blocks):
                    c = head_factor[h] * f.C_L[w.adapter.layer] * f.C_M[f.kinds.index(kind)]
                    want = w.adapter.scale * f.B @ torch.diag(c) @ f.A.T
                    assert_close_scaled(block, want, 1e-5, msg=f"{name} {kind} head {h}")


def test_fused_layout_is_recorded_and_a_saved_record_rebuilds_it():
    model, _, p, ctx, built = build("lorta", model=tiny_family("gpt_neox"), targets=["query_key_value"])
    assert built.meta["fused"] == {"module": "query_key_value", "kinds": ["q", "k", "v"], "packing": "heads"}
    assert all(b.rows is not None for b in built.adapters.values())  # per head [q_h; k_h; v_h]
    assert "rows" not in saved_state(model, include_head=False)  # derived from the record, never saved
    gpt2 = tiny_family("gpt2")
    found = find_targets(gpt2, ["c_attn"])
    fresh = METHOD.build(found, p, dataclasses.replace(ctx, model_config=gpt2.config))
    assert all(b.rows is None for b in fresh.adapters.values())  # [q; k; v] blocks: already in order
    recorded = {**fresh.meta, "fused": {**fresh.meta["fused"], "packing": "heads"}}
    rebuilt = METHOD.build(found, p, dataclasses.replace(ctx, model_config=gpt2.config, saved_meta=recorded))
    assert rebuilt.meta == recorded and all(b.rows is not None for b in rebuilt.adapters.values())


@pytest.mark.parametrize(
    "args, trainable, lora",
    [
        (["--rank", "4", "--model", "llama2-7b", "--targets", "q_proj,v_proj"], 17_160, 2_097_152),
        (["--rank", "64", "--model", "llama2-7b", "--targets", "q_proj,v_proj"], 274_560, 33_554_432),
        (["--rank", "8"], 9_040, 786_432),
    ],
)
def test_count_params_reproduces_lorta_table_1(cli, args, trainable, lora):
    code, out, err = cli("count-params", "--method", "lorta", *args, "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["trainable"] == trainable and counts["lora"] == lora


def test_lorta_trains_through_the_cli_and_merges(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe(
        "lorta",
        name="lorta_e2e",
        adapter={"method": "lorta", "target_modules": BERT_QKVO, "params": {"rank": 4, "alpha": 1.0}},
    )
    code, out, err = cli("train", recipe, "train.max_steps=3", "train.lr=3e-2", "--json")
    assert code == 0, err
    run = tmp_path / "runs" / "lorta_e2e"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["meta"]["kinds"] == ["q", "k", "v", "o"] and config["meta"]["heads"] == 4
    assert json.loads(out)["trainable_params"] == (32 + 8 + 4 + 2 + 4) * 4
    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    assert_merge_parity(json.loads(out))


@pytest.mark.parametrize("factory, targets", [(tiny_bert, BERT_QKVO), (tiny_llama, LLAMA_QKVO)])
def test_q_k_v_share_one_input_pass_with_the_same_gradients(factory, targets):
    """The layer's q, k, v branches compute x·A once (SharedInput); outputs and gradients are those of
    three separate branches."""
    model, *_ = build("lorta", model=factory(), targets=targets)
    randomize(model)
    branches = [w.adapter for w in adapted(model).values()]
    assert all((b.shared_input is not None) == (b.kind != "o") for b in branches)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**labeled(model, batch(n=3, length=7))).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared_loss, shared = loss_and_grads()
    for b in branches:
        object.__setattr__(b, "shared_input", None)
    separate_loss, separate = loss_and_grads()
    torch.testing.assert_close(shared_loss, separate_loss, atol=0, rtol=1e-6)
    assert shared.keys() == separate.keys() and any(k.startswith("lrft_shared.") for k in shared)
    for k in shared:
        assert_close_scaled(shared[k], separate[k], 1e-5, msg=k)
