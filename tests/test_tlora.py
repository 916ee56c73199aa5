"""Tri-matrix TLoRA specifics: fixed A and C, the r×r B and the scalar α train, paper counts."""

from __future__ import annotations

import math

import pytest
import torch

from lrft.inject import adapted, adapter_parameters
from tests.helpers import assert_close_scaled, batch, build


def test_only_b_and_alpha_train():
    model, found, p, *_ = build("tlora")
    names = {n for n, t in model.named_parameters() if t.requires_grad and ".adapter." in n}
    assert names == {f"{t.name}.adapter.{k}" for t in found for k in ("B", "alpha")}
    assert sum(t.numel() for t in adapter_parameters(model)) == len(found) * (p.rank**2 + 1)


def test_fixed_factors_are_saved_buffers_and_never_move():
    model, *_ = build("tlora")
    model.train()
    wrappers = adapted(model)
    fixed = {n: (w.adapter.A.clone(), w.adapter.C.clone()) for n, w in wrappers.items()}
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=1e-1)
    for _ in range(3):
        model(**batch(), labels=torch.tensor([0, 1, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, w in wrappers.items():
        assert torch.equal(w.adapter.A, fixed[n][0]) and torch.equal(w.adapter.C, fixed[n][1])
        assert {"A", "C"} <= set(w.adapter.state_dict())
        assert w.adapter.B.abs().sum() > 0


def test_init_follows_kaiming_normal_on_paper_shapes():
    """A (in×r) and C (r×out), kaiming_normal_(a=√5): std = sqrt(2/6)/sqrt(size(1))."""
    model, *_ = build("tlora", model=None, rank=16)
    A = torch.cat([w.adapter.A.flatten() for w in adapted(model).values()])
    C = torch.cat([w.adapter.C.flatten() for w in adapted(model).values()])
    gain = math.sqrt(2 / (1 + 5))
    assert abs(A.std().item() - gain / math.sqrt(16)) < 0.1 * gain / math.sqrt(16)
    assert abs(C.std().item() - gain / math.sqrt(32)) < 0.1 * gain / math.sqrt(32)
    for w in adapted(model).values():
        assert w.adapter.alpha.item() == 1.0 and torch.count_nonzero(w.adapter.B) == 0


def test_delta_weight_is_alpha_abc_transposed():
    model, *_ = build("tlora")
    w = next(iter(adapted(model).values())).adapter
    with torch.no_grad():
        w.B.normal_()
        w.alpha.fill_(2.5)
    torch.testing.assert_close(w.delta_weight(), 2.5 * (w.A @ w.B @ w.C).T)


def test_branch_dropout_is_on_the_output():
    model, *_ = build("tlora", dropout=0.5)
    w = next(iter(adapted(model).values()))
    with torch.no_grad():
        w.adapter.B.normal_()
    w.adapter.train()
    torch.manual_seed(0)
    x = torch.randn(64, w.in_features)
    out = w.adapter(x)
    zero_frac = (out == 0).float().mean().item()
    assert 0.4 < zero_frac < 0.6  # whole output elements are dropped
    kept = out != 0
    full = x @ w.adapter.delta_weight().T
    assert_close_scaled(out[kept], 2 * full[kept], 1e-5)


@pytest.mark.parametrize("p", [0.5, 0.1, 0.3])
def test_dropout_masks_keep_1_minus_p_and_rescale(p):
    """The CPU bit mask (p = 0.5) and the uniform threshold (other p): fair bits, right rate and scale."""
    from lrft.methods.base import Dropout

    drop = Dropout(p).train()
    torch.manual_seed(0)
    mask = drop.keep_mask(torch.empty(4096, 32))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - (1 - p)) < 0.01
    column_rates = mask.mean(0)  # with the bit mask, column j holds bit j of every word
    assert (column_rates - (1 - p)).abs().max() < 0.04
    x = torch.ones(1000, 100)
    out = drop(x)
    values = out.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / (1 - p))
    assert abs(out.mean().item() - 1) < 0.02
    assert torch.equal(drop.eval()(x), x)
