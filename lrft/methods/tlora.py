"""Tri-matrix TLoRA (Islam 2025): ΔW = α·(A B C)ᵀ with A, C fixed and only B and α trained.

A ∈ R^{in×r} and C ∈ R^{r×out} are fixed and saved with the adapter as buffers. B ∈ R^{r×r} starts
at zero so the model starts unchanged; α is one trainable scalar per module, init 1.0.
Branch: Δh = Dropout(α · x A B C), dropout on the branch output (paper default p = 0.5).
Trainable per module: r² + 1. As a LoRA: lora_A = Aᵀ, lora_B = α·Cᵀ Bᵀ.

init: random (the paper) draws A and C with kaiming_normal_(a=√5) on those shapes (PyTorch takes
fan_in = size(1)) from a seeded generator. task-aware (lrft's own; no published system has it) takes
A from the top-r right and C from the top-r left singular vectors of W0·C_cov (C_cov the calibration
input covariance), each scaled to the Frobenius norm the random init has in expectation, so learning
rates tuned for the random init carry over.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lrft.methods.base import Adapter, BuildContext, Built, Dropout, Method, MethodParams, seeded_generator
from lrft.targets import Target

KAIMING_GAIN = math.sqrt(2 / (1 + 5))  # kaiming_normal_ with a=√5: std = gain / sqrt(fan_in)


class TLoRAParams(MethodParams):
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout on the branch output (paper: 0.5)")
    alpha_init: float = Field(1.0, description="initial value of the trainable scale α")
    init: Literal["random", "task-aware"] = Field(
        "random",
        description="fixed A, C: random (paper) or task-aware (top singular vectors of W0·C, needs calibration)",
    )


class TriMatrix(Adapter):
    def __init__(self, A: torch.Tensor, C: torch.Tensor, dropout: float, alpha_init: float):
        super().__init__()
        self.register_buffer("A", A)  # in × r
        self.register_buffer("C", C)  # r × out
        self.B = nn.Parameter(torch.zeros(A.shape[1], A.shape[1]))
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.dropout = Dropout(dropout)

    def forward(self, x):
        # (αB)C is r×out: folding it first leaves two large matmuls, as in LoRA. Dropout's 1/(1-p)
        # rescale goes into that small core too, so the large output only takes the 0/1 mask.
        core = (self.alpha * self.B) @ self.C
        if not self.dropout.active or x.device.type != "cpu":
            return self.dropout((x @ self.A) @ core)
        y = (x @ self.A) @ (core * self.dropout.scale)
        return y * self.dropout.keep_mask(y)

    def lora_factors(self):
        return self.A.float().T, self.alpha.float() * (self.B.float() @ self.C.float()).T

    def stats(self):
        return {"alpha": float(self.alpha), "B_norm": float(self.B.norm()), "delta_norm": self.delta_norm()}


def random_factors(in_f: int, out_f: int, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    A, C = torch.empty(in_f, rank), torch.empty(rank, out_f)
    nn.init.kaiming_normal_(A, a=math.sqrt(5), generator=gen)
    nn.init.kaiming_normal_(C, a=math.sqrt(5), generator=gen)
    return A, C


def task_aware_factors(weight: torch.Tensor, covariance: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = V_r·‖A_random‖, C = U_rᵀ·‖C_random‖ from the SVD of W0·C_cov (Frobenius norms in expectation)."""
    out_f, in_f = weight.shape
    U, _, Vh = torch.linalg.svd(weight.to(covariance.dtype) @ covariance, full_matrices=False)
    # E‖A‖_F² = in·r·gain²/r and E‖C‖_F² = r·out·gain²/out; singular vectors have ‖·‖_F² = r.
    a_scale = KAIMING_GAIN * math.sqrt(in_f / rank)
    c_scale = KAIMING_GAIN
    return (Vh[:rank].T * a_scale).float().contiguous(), (U[:, :rank].T * c_scale).float().contiguous()


def build(targets: list[Target], p: TLoRAParams, ctx: BuildContext) -> Built:
    gen = seeded_generator(ctx.seed)
    adapters = {}
    for t in targets:
        out_f, in_f = t.shape
        if p.init == "task-aware" and ctx.saved_meta is None:
            A, C = task_aware_factors(t.weight.detach().cpu(), ctx.calibration.covariance[t.name], p.rank)
        else:  # random, or a saved adapter whose A and C are loaded from its file
            A, C = random_factors(in_f, out_f, p.rank, gen)
        adapters[t.name] = TriMatrix(A, C, p.dropout, p.alpha_init)
    return Built(adapters)


def count(targets: list[Target], p: TLoRAParams, ctx: BuildContext) -> int:
    return len(targets) * (p.rank * p.rank + 1)


METHOD = Method(
    name="tlora",
    summary="tri-matrix TLoRA: ΔW = α·(A B C)ᵀ, A and C fixed, B and α trained",
    params=TLoRAParams,
    build=build,
    count=count,
    suggested_lr=2e-2,  # the best of sweeps/mrpc_tlora_r8_3ep.yaml (docs/RESULTS.md, tuned comparison)
    calibration=lambda p: frozenset({"covariance"}) if p.init == "task-aware" else frozenset(),
)
