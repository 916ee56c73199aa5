"""Tri-matrix TLoRA (Islam 2025): ΔW = α·(A B C)ᵀ with A, C fixed random and only B and α trained.

A ∈ R^{in×r} and C ∈ R^{r×out} are drawn once with kaiming_normal_(a=√5) on those shapes (PyTorch
takes fan_in = size(1)) from a seeded generator, and saved with the adapter as buffers. B ∈ R^{r×r}
starts at zero so the model starts unchanged; α is one trainable scalar per module, init 1.0.
Branch: Δh = Dropout(α · x A B C), dropout on the branch output (paper default p = 0.5).
Trainable per module: r² + 1.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from lrft.methods.base import (Adapter, BuildContext, Built, Dropout, Method, MethodParams, Target,
                               seeded_generator)


class TLoRAParams(MethodParams):
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout on the branch output (paper: 0.5)")
    alpha_init: float = Field(1.0, description="initial value of the trainable scale α")


class TriMatrix(Adapter):
    def __init__(self, in_features: int, out_features: int, rank: int, dropout: float, alpha_init: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        A = torch.empty(in_features, rank)
        C = torch.empty(rank, out_features)
        nn.init.kaiming_normal_(A, a=math.sqrt(5), generator=generator)
        nn.init.kaiming_normal_(C, a=math.sqrt(5), generator=generator)
        self.register_buffer("A", A)
        self.register_buffer("C", C)
        self.B = nn.Parameter(torch.zeros(rank, rank))
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.dropout = Dropout(dropout)

    def forward(self, x):
        # (αB)C is r×out: folding it first leaves two large matmuls, as in LoRA.
        return self.dropout((x @ self.A) @ ((self.alpha * self.B) @ self.C))

    def delta_weight(self):
        return self.alpha.float() * (self.A.float() @ self.B.float() @ self.C.float()).T

    def stats(self):
        return {"alpha": float(self.alpha), "B_norm": float(self.B.norm()), "delta_norm": float(self.delta_weight().norm())}


def build(targets: list[Target], p: TLoRAParams, ctx: BuildContext) -> Built:
    gen = seeded_generator(ctx.seed)
    adapters = {}
    for t in targets:
        out_f, in_f = t.shape
        adapters[t.name] = TriMatrix(in_f, out_f, p.rank, p.dropout, p.alpha_init, gen)
    return Built(adapters)


def count(targets: list[Target], p: TLoRAParams, ctx: BuildContext) -> int:
    return len(targets) * (p.rank * p.rank + 1)


METHOD = Method(
    name="tlora",
    summary="tri-matrix TLoRA: ΔW = α·(A B C)ᵀ, A and C fixed random, B and α trained",
    params=TLoRAParams,
    build=build,
    count=count,
    suggested_lr=1e-2,
)
