"""LoRA (Hu et al. 2021), the baseline: ΔW = (α/r)·B·A, B zero at init.

A ∈ R^{r×in} is Kaiming-uniform (a=√5) and B ∈ R^{out×r} zero, exactly as PEFT, so given the same
A and B the outputs equal PEFT's. Dropout acts on the branch input. rsLoRA scales by α/√r.
Trainable per module: r·(in + out). The layer also serves talora, whose A is given and may be frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lrft.methods.base import Adapter, BuildContext, Built, Dropout, Method, MethodParams, seeded_generator
from lrft.targets import Target


class LoRAParams(MethodParams):
    alpha: float = Field(16.0, gt=0, description="scale numerator: ΔW = (alpha / rank)·B·A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the branch input, as PEFT")
    rslora: bool = Field(False, description="scale by alpha / sqrt(rank) instead (rsLoRA)")


class LoRA(Adapter):
    """Δh = scale · Dropout(x) Aᵀ Bᵀ with A (r×in) given, B (out×r) zero; A is a buffer unless train_a."""

    def __init__(self, A: torch.Tensor, out_features: int, scale: float, dropout: float, train_a: bool = True):
        super().__init__()
        if train_a:
            self.A = nn.Parameter(A)
        else:
            self.register_buffer("A", A)
        self.B = nn.Parameter(torch.zeros(out_features, A.shape[0]))
        self.scale = scale
        self.dropout = Dropout(dropout)

    def forward(self, x):
        # the scale goes on the small out×r factor, not on the large output: one full pass fewer
        return F.linear(F.linear(self.dropout(x), self.A), self.B * self.scale)

    def lora_factors(self):
        return self.A.float(), self.B.float() * self.scale


def kaiming_a(rank: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """LoRA's A (r×in): Kaiming-uniform with a=√5, the init of nn.Linear and of PEFT."""
    A = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def build(targets: list[Target], p: LoRAParams, ctx: BuildContext) -> Built:
    gen = seeded_generator(ctx.seed)
    scale = lora_scale(p.alpha, p.rank, p.rslora)
    adapters = {}
    for t in targets:
        out_f, in_f = t.shape
        adapters[t.name] = LoRA(kaiming_a(p.rank, in_f, gen), out_f, scale, p.dropout)
    return Built(adapters)


def count(targets: list[Target], p: LoRAParams, ctx: BuildContext) -> int:
    return sum(p.rank * (t.shape[0] + t.shape[1]) for t in targets)


METHOD = Method(
    name="lora",
    summary="LoRA: ΔW = (α/r)·B·A, A and B trained",
    params=LoRAParams,
    build=build,
    count=count,
    suggested_lr=1e-3,  # the best of sweeps/mrpc_lora_r8_3ep.yaml (docs/RESULTS.md, tuned comparison)
)
