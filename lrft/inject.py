"""Put adapters into a model, choose what trains, collect what is saved, and merge them back out.

Each targeted Linear is replaced by an AdaptedLinear(base, adapter) computing base(x) + adapter(x);
a Conv1D (GPT-2) too, whose weight is stored transposed, so its merge adds ΔWᵀ.
A method's shared factors (LoRTA) live in one module registered on the model as `lrft_shared`, so
they train under DDP like any parameter and are saved once.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lrft import console
from lrft.errors import LrftError
from lrft.methods.base import Adapter, Built
from lrft.targets import Target, head_modules

SHARED_NAME = "lrft_shared"
ADAPTER_DTYPE = torch.float32  # adapters train in fp32 whatever the base dtype, as PEFT does


class AdaptedLinear(nn.Module):
    """A frozen Linear (or Conv1D) plus its low-rank branch."""

    def __init__(self, base: nn.Module, adapter: Adapter, transposed: bool = False):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.transposed = transposed  # the base stores W0ᵀ (in × out), as Conv1D does
        self.enabled = True  # False: the base layer alone (adapters_off)

    # Some model code reads these off its Linear layers.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.nx if self.transposed else self.base.in_features  # Conv1D: nx in, nf out

    @property
    def out_features(self) -> int:
        return self.base.nf if self.transposed else self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        if x.dtype == ADAPTER_DTYPE:
            return out + self.adapter(x)
        return out + self.adapter(x.to(ADAPTER_DTYPE)).to(out.dtype)


@contextmanager
def adapters_off(model: nn.Module):
    """The model without its adapters for the block: every AdaptedLinear computes its base layer alone
    (a DPO reference at no memory cost: no second copy of the model)."""
    wrappers = list(adapted(model).values())
    for w in wrappers:
        w.enabled = False
    try:
        yield model
    finally:
        for w in wrappers:
            w.enabled = True


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, targets: list[Target], built: Built) -> None:
    """Wrap every target with its adapter, register shared factors, and freeze everything else."""
    for t in targets:
        _set_submodule(model, t.name, AdaptedLinear(t.module, built.adapters[t.name], t.transposed))
    if built.shared is not None:
        model.add_module(SHARED_NAME, built.shared)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model):
        p.requires_grad_(True)


def adapter_parameters(model: nn.Module):
    """Trainable adapter parameters (frozen factors are buffers and never show up here)."""
    seen = set()
    for m in model.modules():
        if isinstance(m, AdaptedLinear) or m is getattr(model, SHARED_NAME, None):
            source = m.adapter if isinstance(m, AdaptedLinear) else m
            for p in source.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def set_head_trainable(model: nn.Module, trainable: bool) -> list[nn.Parameter]:
    params = [p for m in head_modules(model).values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(trainable)
    return params


def adapted(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def saved_state(model: nn.Module, include_head: bool) -> dict[str, torch.Tensor]:
    """What an adapter file holds: adapter params and buffers, shared factors, the head if trained."""
    keep = [n + ".adapter." for n in adapted(model)] + [SHARED_NAME + "."]
    if include_head:
        keep += [n + "." for n in head_modules(model)]
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(tuple(keep))}


def load_saved_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load an adapter file's tensors; every adapter tensor of the model must be there, nothing else."""
    own = model.state_dict()
    expected = set(saved_state(model, include_head=False))
    unexpected = [k for k in state if k not in own]
    missing = [k for k in expected if k not in state]
    if unexpected or missing:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LrftError(
            f"{source}: the adapter does not fit this model ({detail}); was it trained on another base "
            f"model or with other target_modules?"
        )
    wrong = [k for k, v in state.items() if own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise LrftError(
            f"{source}: tensor {k} has shape {tuple(state[k].shape)} but the model expects "
            f"{tuple(own[k].shape)}; the adapter was trained on another base model"
        )
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its base weight and remove the adapters, one module at a time.

    The sum is formed in fp32 and cast back to the weight's dtype; a non-finite result stops the merge
    before anything is written (the weights are left half-merged in memory only).
    """
    for name, wrapper in console.track(list(adapted(model).items()), "merging", "modules"):
        w = wrapper.base.weight
        delta = wrapper.adapter.delta_weight().to(w.device)
        merged = w.float() + (delta.T if wrapper.transposed else delta)
        if not torch.isfinite(merged).all():
            raise LrftError(
                f"merge: {name} holds NaN or Inf after adding its update; the adapter is broken "
                f"(check the run's metrics.jsonl for a diverged loss)"
            )
        w.copy_(merged.to(w.dtype))
        _set_submodule(model, name, wrapper.base)
    if hasattr(model, SHARED_NAME):
        delattr(model, SHARED_NAME)
    return model
