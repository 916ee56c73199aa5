"""The invariant matrix: every registered method on a tiny BERT and a tiny GQA Llama built from configs.

At init the adapted model equals the base model; a step changes only adapter (and head) params;
the branch equals x·ΔWᵀ; merging equals the adapted model; save/load round-trips; the built adapter
has exactly the closed-form count that count-params reports.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lrft import methods
from lrft.inject import AdaptedLinear, adapted, adapter_parameters, load_saved_state, merge, saved_state
from lrft.merge import check_fp32_parity, logit_parity
from lrft.targets import head_modules
from tests.helpers import ARCHS, METHODS, assert_close_scaled, batch, build, build_arch, labeled, randomize

MATRIX = [(m, a) for m in METHODS for a in ARCHS]


@pytest.mark.parametrize("method, arch", MATRIX)
def test_output_unchanged_at_init(method, arch):
    base = ARCHS[arch][0]()
    model, *_ = build_arch(method, arch)
    with torch.no_grad():
        assert_close_scaled(model(**batch()).logits, base(**batch()).logits, 1e-6)


@pytest.mark.parametrize("method, arch", MATRIX)
def test_step_changes_only_adapter_and_head(method, arch):
    model, *_ = build_arch(method, arch)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = tuple(head_modules(model))
    assert trainable and all(".adapter." in n or n.startswith(heads + ("lrft_shared",)) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps: a zero-initialised factor only gets a gradient after the first
        model(**labeled(model, batch())).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= trainable, f"frozen tensors changed: {changed - trainable}"
    assert any(".adapter." in k or k.startswith("lrft_shared") for k in changed), "no adapter parameter moved"


@pytest.mark.parametrize("method, arch", MATRIX)
def test_branch_equals_x_delta_weight(method, arch):
    model, *_ = build_arch(method, arch)
    randomize(model)
    model.eval()
    for name, wrapper in adapted(model).items():
        x = torch.randn(2, 5, wrapper.in_features, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            got = wrapper.adapter(x)
            want = x @ wrapper.adapter.delta_weight().T
        assert_close_scaled(got, want, 1e-5, msg=name)
        assert wrapper.adapter.delta_weight().shape == wrapper.base.weight.shape


@pytest.mark.parametrize("method, arch", MATRIX)
def test_merge_equals_adapted(method, arch):
    model, *_ = build_arch(method, arch)
    randomize(model)
    model.eval()
    with torch.no_grad():
        adapted_logits = model(**batch()).logits
        merge(model)
        merged_logits = model(**batch()).logits
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert not hasattr(model, "lrft_shared")
    check_fp32_parity(logit_parity(model, adapted_logits, merged_logits))  # what `lrft merge` checks


@pytest.mark.parametrize("method, arch", MATRIX)
def test_save_load_round_trip(method, arch):
    model, *_ = build_arch(method, arch)
    randomize(model)
    with torch.no_grad():
        for head in head_modules(model).values():
            head.weight.add_(0.5)
    model.eval()
    state = saved_state(model, include_head=True)
    fresh, *_ = build_arch(method, arch, seed=123)  # another seed: everything must come from the file
    load_saved_state(fresh, state, "test")
    fresh.eval()
    with torch.no_grad():
        assert_close_scaled(fresh(**batch()).logits, model(**batch()).logits, 1e-6)


@pytest.mark.parametrize("method, arch", MATRIX)
def test_counted_equals_closed_form(method, arch):
    """The count of the built adapter; for talora the exact one from its calibrated plan (saved meta)."""
    model, found, p, ctx, built = build_arch(method, arch)
    counted = sum(t.numel() for t in adapter_parameters(model))
    assert counted == methods.get(method).count(found, p, dataclasses.replace(ctx, saved_meta=built.meta))


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_adapter(method):
    a, *_ = build(method, seed=5)
    b, *_ = build(method, seed=5)
    sa, sb = saved_state(a, False), saved_state(b, False)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method, arch", MATRIX)
def test_bf16_base_trains_fp32_adapter(method, arch):
    model, *_ = build(method, model=ARCHS[arch][0]().to(torch.bfloat16), targets=ARCHS[arch][1])
    model.train()
    model(**labeled(model, batch())).loss.backward()
    params = list(adapter_parameters(model))
    assert all(p.dtype == torch.float32 for p in params)
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


@pytest.mark.parametrize("method, arch", MATRIX)
def test_delta_norm_from_factors_equals_dense(method, arch):
    model, *_ = build_arch(method, arch)
    randomize(model)
    for wrapper in adapted(model).values():
        with torch.no_grad():
            assert wrapper.adapter.delta_norm() == pytest.approx(float(wrapper.adapter.delta_weight().norm()), rel=1e-4)
