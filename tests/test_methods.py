"""The invariant matrix: every registered method on a tiny BERT built from a config.

At init the adapted model equals the base model; a step changes only adapter (and head) params;
the branch equals x·ΔWᵀ; merging equals the adapted model; save/load round-trips; the built adapter
has exactly the closed-form count that count-params reports.
"""

from __future__ import annotations

import pytest
import torch

from lrft import methods
from lrft.inject import AdaptedLinear, adapted, adapter_modules, inject, load_saved_state, merge, saved_state, set_head_trainable
from lrft.methods.base import BuildContext
from lrft.models import find_targets
from tests.conftest import tiny_bert

METHODS = sorted(methods.REGISTRY)
TARGETS = ["query", "value"]


def build(method: str, seed: int = 0, model=None, targets=TARGETS, **params):
    model = model if model is not None else tiny_bert()
    m = methods.get(method)
    found = find_targets(model, list(targets))
    p = m.params(**{"rank": 4, **params})
    ctx = BuildContext(seed=seed, model_config=model.config)
    built = m.build(found, p, ctx)
    inject(model, found, built)
    set_head_trainable(model, True)
    return model, found, p, ctx


def batch(seed: int = 0, n: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0  # padding in one example
    return {"input_ids": ids, "attention_mask": mask}


def randomize(model, seed: int = 1):
    """Give every trainable adapter param a non-zero value, so ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_modules(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("method", METHODS)
def test_output_unchanged_at_init(method):
    base = tiny_bert()
    model, *_ = build(method)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, base(**batch()).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_step_changes_only_adapter_and_head(method):
    model, *_ = build(method)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or n.startswith(("classifier", "lrft_shared")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps: a zero-initialised factor only gets a gradient after the first
        out = model(**batch(), labels=torch.tensor([0, 1, 1]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= trainable, f"frozen tensors changed: {changed - trainable}"
    assert any(".adapter." in k or k.startswith("lrft_shared") for k in changed), "no adapter parameter moved"


@pytest.mark.parametrize("method", METHODS)
def test_branch_equals_x_delta_weight(method):
    model, *_ = build(method)
    randomize(model)
    model.eval()
    for name, wrapper in adapted(model).items():
        x = torch.randn(2, 5, wrapper.in_features, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            got = wrapper.adapter(x)
            want = x @ wrapper.adapter.delta_weight().T
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
        assert wrapper.adapter.delta_weight().shape == wrapper.base.weight.shape


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_adapted(method):
    model, *_ = build(method)
    randomize(model)
    model.eval()
    with torch.no_grad():
        adapted_logits = model(**batch()).logits
        merge(model)
        merged_logits = model(**batch()).logits
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert not hasattr(model, "lrft_shared")
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method):
    model, *_ = build(method)
    randomize(model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    model.eval()
    state = saved_state(model, include_head=True)
    fresh, *_ = build(method, seed=123)  # another seed: everything must come from the file
    load_saved_state(fresh, state, "test")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch()).logits, model(**batch()).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_counted_equals_closed_form(method):
    model, found, p, ctx = build(method)
    counted = sum(t.numel() for t in adapter_modules(model))
    assert counted == methods.get(method).count(found, p, ctx)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_adapter(method):
    a, *_ = build(method, seed=5)
    b, *_ = build(method, seed=5)
    sa, sb = saved_state(a, False), saved_state(b, False)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_base_trains_fp32_adapter(method):
    model, *_ = build(method, model=tiny_bert().to(torch.bfloat16))
    model.train()
    out = model(**batch(), labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    params = list(adapter_modules(model))
    assert all(p.dtype == torch.float32 for p in params)
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
