"""lrft lora equals PEFT LoRA given the same A and B (PEFT is a test dependency only)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lrft.inject import adapted
from tests.helpers import assert_close_scaled, batch, build, randomize, tiny_bert

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(rslora):
    base = tiny_bert()
    ours, *_ = build("lora", model=copy.deepcopy(base), alpha=8.0, rslora=rslora)
    randomize(ours)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8.0, target_modules=["query", "value"], lora_dropout=0.0, use_rslora=rslora, task_type="SEQ_CLS"
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, wrapper in adapted(ours).items():
            layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(wrapper.adapter.A)
            layer.lora_B["default"].weight.copy_(wrapper.adapter.B)
            assert layer.scaling["default"] == pytest.approx(wrapper.adapter.scale)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert_close_scaled(ours(**batch()).logits, theirs(**batch()).logits, 1e-5)


def test_lora_init_matches_peft_distribution():
    """Kaiming-uniform(a=√5) A: bound 1/sqrt(in); B zero."""
    model, *_ = build("lora")
    for wrapper in adapted(model).values():
        bound = 1 / math.sqrt(wrapper.in_features)
        assert wrapper.adapter.A.abs().max() <= bound
        assert wrapper.adapter.A.abs().max() > 0.8 * bound
        assert torch.count_nonzero(wrapper.adapter.B) == 0
