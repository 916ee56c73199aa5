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
from lrft.inject import AdaptedLinear, adapted, adapter_modules, inject, load_saved_state, merge, saved_state, set_head_trainable
from lrft.methods.base import BuildContext
from lrft.models import find_targets, head_modules
from tests.conftest import tiny_bert, tiny_llama

METHODS = sorted(methods.REGISTRY)
ARCHS = {  # model factory, targets
    "bert": (tiny_bert, ["query", "value"]),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}
MATRIX = [(m, a) for m in METHODS for a in ARCHS]
TARGETS = ARCHS["bert"][1]


def calibration_features(n: int = 6, length: int = 7, seed: int = 11) -> list[dict]:
    """Tokenized examples with labels and some padding, as the calibration stage gets them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        real = length - (i % 3)
        ids = torch.randint(5, 60, (real,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * real, "labels": i % 2})
    return out


def pad_collate(features: list[dict], causal: bool = False) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    mask = torch.tensor([f["attention_mask"] + [0] * (width - len(f["attention_mask"])) for f in features])
    labels = ids.masked_fill(mask == 0, -100) if causal else torch.tensor([f["labels"] for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def is_causal(model) -> bool:
    return model.config.model_type == "llama"


def calibration_for(model, targets, needs):
    """Statistics for methods that calibrate (talora, task-aware tlora); None for the others."""
    if not needs:
        return None
    from lrft.calibrate import run
    from lrft.recipe import CalibrationConfig

    causal = is_causal(model)
    return run(model, targets, calibration_features(), [[0, 1, 2], [3, 4, 5]], lambda f: pad_collate(f, causal),
               needs, CalibrationConfig())


def build(method: str, seed: int = 0, model=None, targets=TARGETS, **params):
    model = model if model is not None else tiny_bert()
    m = methods.get(method)
    found = find_targets(model, list(targets))
    p = m.params(**{"rank": 4, **params})
    ctx = BuildContext(seed=seed, model_config=model.config, calibration=calibration_for(model, found, m.calibration(p)))
    built = m.build(found, p, ctx)
    inject(model, found, built)
    set_head_trainable(model, True)
    return model, found, p, ctx, built


def build_arch(method: str, arch: str, seed: int = 0, **params):
    factory, targets = ARCHS[arch]
    return build(method, seed=seed, model=factory(), targets=targets, **params)


def batch(seed: int = 0, n: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0  # padding in one example
    return {"input_ids": ids, "attention_mask": mask}


def labeled(model, b: dict) -> dict:
    if is_causal(model):
        return {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
    return {**b, "labels": torch.tensor([0, 1, 1])}


def randomize(model, seed: int = 1):
    """Give every trainable adapter param a non-zero value, so ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_modules(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("method, arch", MATRIX)
def test_output_unchanged_at_init(method, arch):
    base = ARCHS[arch][0]()
    model, *_ = build_arch(method, arch)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, base(**batch()).logits, atol=1e-6, rtol=0)


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
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
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
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)


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
        torch.testing.assert_close(fresh(**batch()).logits, model(**batch()).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, arch", MATRIX)
def test_counted_equals_closed_form(method, arch):
    """The count of the built adapter; for talora the exact one from its calibrated plan (saved meta)."""
    model, found, p, ctx, built = build_arch(method, arch)
    counted = sum(t.numel() for t in adapter_modules(model))
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
    params = list(adapter_modules(model))
    assert all(p.dtype == torch.float32 for p in params)
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


@pytest.mark.parametrize("method, arch", MATRIX)
def test_delta_norm_from_factors_equals_dense(method, arch):
    model, *_ = build_arch(method, arch)
    randomize(model)
    for wrapper in adapted(model).values():
        with torch.no_grad():
            assert wrapper.adapter.delta_norm() == pytest.approx(float(wrapper.adapter.delta_weight().norm()), rel=1e-4)
