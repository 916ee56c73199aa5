"""What every adapter method provides: a params schema, adapters for the targeted Linears, a count.

An adapter is the branch added to one frozen Linear (y = x W0ᵀ + b + Δh). It never builds the dense
ΔW in its forward pass. Every method is, per module, exactly a rank-r LoRA: `lora_factors()` gives
(lora_A r×in, lora_B out×r) with every scale folded into lora_B, so ΔW = lora_B·lora_A. Merge,
analysis (low-rank SVD through the factors), PEFT export and tests all start from there.
A method builds the adapters of all targets at once, which serves per-module methods (lora, tlora),
budgeted ones (talora) and shared-factor ones (lorta) with one signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lrft.targets import Target


class MethodParams(BaseModel):
    """`adapter.params` of a recipe; each method extends it with its own fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN and Inf are no scale or dropout

    rank: int = Field(8, gt=0, description="rank r of the low-rank update")


@dataclass
class BuildContext:
    """What a method may need beyond the targets and its params."""

    seed: int = 0
    model_config: Any = None  # the transformers config: layer and head counts (lorta)
    calibration: Any = None  # lrft.calibrate.Statistics, for methods whose `calibration(params)` asks for it
    saved_meta: dict | None = None  # `meta` of a saved adapter: rebuild shapes without calibrating


class Adapter(nn.Module):
    """The trainable branch of one Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Δh for input x (..., in) → (..., out), without materialising ΔW."""
        raise NotImplementedError

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """(lora_A r×in, lora_B out×r) in fp32 with every scale folded into lora_B: ΔW = lora_B·lora_A."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW of shape (out, in) in fp32, with every scale applied."""
        lora_A, lora_B = self.lora_factors()
        return lora_B @ lora_A

    def delta_norm(self) -> float:
        """‖ΔW‖_F from the factors: ‖B·A‖²_F = Σ (BᵀB) ⊙ (AAᵀ), two r×r products instead of a dense ΔW."""
        lora_A, lora_B = self.lora_factors()
        return float(((lora_B.T @ lora_B) * (lora_A @ lora_A.T)).sum().clamp_min(0).sqrt())

    def stats(self) -> dict[str, float]:
        """Numbers logged per epoch to adapter_stats.jsonl (later analyses read them)."""
        return {"delta_norm": self.delta_norm()}


@dataclass
class Built:
    """A method's adapters for all targets, the module owning shared factors, and saved meta."""

    adapters: dict[str, Adapter]
    shared: nn.Module | None = None  # registered once on the model, so each factor is saved once
    meta: dict = field(default_factory=dict)  # resolved per-module settings, saved in adapter_config


@dataclass(frozen=True)
class Method:
    """A registry entry: the single extension point for adding a method."""

    name: str
    summary: str
    params: type[MethodParams]
    build: Callable[[list[Target], Any, BuildContext], Built]
    # closed-form trainable count for these targets (the count-params answer, checked against
    # the built adapters in the tests)
    count: Callable[[list[Target], Any, BuildContext], int]
    suggested_lr: float = 5e-4  # what `lrft init` writes into train.lr
    # the statistics ("covariance", "importance") the method needs from lrft.calibrate for these params
    calibration: Callable[[Any], frozenset[str]] = lambda params: frozenset()


class Dropout(nn.Module):
    """Dropout for adapter branches, with a CPU path that avoids drawing one random float per element.

    An element is kept with probability 1 - p and kept elements are scaled by 1/(1 - p), as F.dropout.
    On the CPU, the mask for p = 0.5 (tri-matrix TLoRA's default) unpacks the bits of one random
    32-bit word per 32 elements; other p threshold a uniform draw (cheaper than bernoulli_ there).
    Measured on 2 CPU cores, forward + backward of the tlora branch at (32, 64, 384): 6.7 ms with a
    float uniform per element, 3.0 ms with the bit mask and the scale folded into the r×out core.
    GPUs keep F.dropout, a fused kernel there.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.scale = 1.0 / (1.0 - p)

    @property
    def active(self) -> bool:
        return self.training and self.p > 0

    def keep_mask(self, like: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask of like's shape and dtype, 1 with probability 1 - p (not scaled)."""
        if like.device.type == "cpu" and self.p == 0.5:
            words = torch.randint(-(2**31), 2**31, (-(-like.numel() // 32),), dtype=torch.int32)
            bits = (words.unsqueeze(1) >> _BIT_SHIFTS) & 1
            return bits.view(-1)[: like.numel()].view(like.shape).to(like.dtype)
        return (torch.rand_like(like) >= self.p).to(like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, True)
        return x * self.keep_mask(x) * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator so adapter init does not depend on (or disturb) the global RNG."""
    return torch.Generator().manual_seed(seed)
