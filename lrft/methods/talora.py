"""Task-aware TLoRA (Lin et al. 2026): a LoRA whose ranks, scales and frozen A come from calibration.

For the L target modules with importance S_i and input covariance C_i (lrft.calibrate):
  budget R = L·r and α_total = L·α;
  r_i = R·S_i/ΣS rounded by largest remainder so Σr_i = R, clamped to [min_rank, min(m, n)];
  α_i = r_i·(α_total/r)·S_i/ΣS (eq. 7), update scale s_i = α_i/r_i;
  A_i = top-r_i right singular vectors of W0_i·C_i (frozen), B_i = 0;  ΔW_i = s_i·B_i·A_i.
Ablations (paper Tables 4, 5, 12): init weight-svd (SVD of W0 alone) or random (LoRA's Kaiming A);
uniform ranks (r_i = r) or uniform alphas (α_i = α); freeze_a false trains A too.
Trainable per module: r_i·m, plus r_i·n when A trains. The resolved r_i, α_i, s_i are saved in the
adapter config, so eval and merge rebuild the adapter without recalibrating.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from lrft.errors import LrftError
from lrft.methods.base import BuildContext, Built, Method, MethodParams, seeded_generator
from lrft.methods.lora import LoRA, kaiming_a
from lrft.targets import Target


class TaLoRAParams(MethodParams):
    alpha: float = Field(
        16.0, gt=0, description="per-module α before allocation; α_total = modules × alpha (paper: 32)"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the branch input")
    min_rank: int = Field(1, ge=1, description="smallest rank a module may be given")
    init: Literal["task-aware", "weight-svd", "random"] = Field(
        "task-aware", description="A from the SVD of W0·C (task-aware), of W0 (weight-svd), or Kaiming (random)"
    )
    rank_allocation: Literal["importance", "uniform"] = Field("importance", description="ranks ∝ importance, or r each")
    alpha_allocation: Literal["importance", "uniform"] = Field("importance", description="α_i by eq. 7, or α each")
    freeze_a: bool = Field(True, description="keep A fixed (the paper); false trains A as well")


def largest_remainder(weights: list[float], total: int, lo: list[int], hi: list[int]) -> list[int]:
    """Integers r_i in [lo_i, hi_i] summing to `total`, proportional to `weights` where the bounds allow.

    Real shares clamp(λ·w_i, lo_i, hi_i) with λ found by bisection so they sum to `total`, then rounded
    down, and the units left go to the largest remainders. A zero weight gets an infinitesimal share:
    it takes only what the bounds leave no one else to take.
    """
    assert sum(lo) <= total <= sum(hi), (lo, total, hi)
    eps = 1e-9 * (max(weights, default=0.0) or 1.0)
    w = [x + eps for x in weights]

    def shares(lam: float) -> list[float]:
        return [min(max(lam * wi, l), h) for wi, l, h in zip(w, lo, hi)]

    low, high = 0.0, 1.0
    while sum(shares(high)) < total:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(shares(mid)) < total else (low, mid)
    ideal = shares(high)
    ranks = [max(l, min(h, math.floor(x + 1e-9))) for x, l, h in zip(ideal, lo, hi)]
    for _ in range(total - sum(ranks)):
        i = max((i for i in range(len(ranks)) if ranks[i] < hi[i]), key=lambda i: ideal[i] - ranks[i])
        ranks[i] += 1
    return ranks


def allocate(targets: list[Target], importance: dict[str, float] | None, p: TaLoRAParams) -> dict[str, dict]:
    """Per module: importance share, rank r_i, α_i and scale s_i."""
    n = len(targets)
    budget, alpha_total = n * p.rank, n * p.alpha
    caps = [min(t.shape) for t in targets]
    if budget < n * p.min_rank:
        raise LrftError(
            f"adapter.params.min_rank: {p.min_rank} × {n} modules exceeds the budget {budget} "
            f"(rank {p.rank} × {n}); lower min_rank or raise rank"
        )
    scores = [float(importance[t.name]) for t in targets] if importance else [1.0] * n
    total = sum(scores)
    shares = [s / total for s in scores] if total > 0 else [1 / n] * n
    if p.rank_allocation == "uniform":
        ranks = [min(p.rank, c) for c in caps]
    else:
        ranks = largest_remainder(shares, budget, [min(p.min_rank, c) for c in caps], caps)
    out = {}
    for t, share, score, r in zip(targets, shares, scores, ranks):
        alpha = p.alpha if p.alpha_allocation == "uniform" else r * (alpha_total / p.rank) * share
        out[t.name] = {"importance": score, "share": share, "rank": r, "alpha": alpha, "scale": alpha / r}
    return out


def initial_a(t: Target, rank: int, p: TaLoRAParams, covariance: torch.Tensor | None, gen) -> torch.Tensor:
    if p.init == "random":
        return kaiming_a(rank, t.shape[1], gen)
    W = t.weight.detach().cpu()  # (out, in) whatever the layer stores
    M = W.to(covariance.dtype) @ covariance if p.init == "task-aware" else W.double()
    return torch.linalg.svd(M, full_matrices=False).Vh[:rank].float().contiguous()


def needs(p: TaLoRAParams) -> frozenset[str]:
    wanted = set()
    if p.init == "task-aware":
        wanted.add("covariance")
    if "importance" in (p.rank_allocation, p.alpha_allocation):
        wanted.add("importance")
    return frozenset(wanted)


def build(targets: list[Target], p: TaLoRAParams, ctx: BuildContext) -> Built:
    gen = seeded_generator(ctx.seed)
    if ctx.saved_meta is not None:  # A is loaded from the adapter file; only the shapes and scales matter
        plan = ctx.saved_meta["modules"]
        missing = [t.name for t in targets if t.name not in plan]
        if missing:
            raise LrftError(
                f"adapter config: no rank recorded for {missing[0]}; the adapter was saved for other targets"
            )
    else:
        stats = ctx.calibration
        plan = allocate(targets, stats.importance if stats is not None and "importance" in needs(p) else None, p)
    adapters = {}
    for t in targets:
        r, scale = plan[t.name]["rank"], plan[t.name]["scale"]
        if ctx.saved_meta is not None:
            A = torch.zeros(r, t.shape[1])
        else:
            A = initial_a(t, r, p, ctx.calibration.covariance[t.name] if p.init == "task-aware" else None, gen)
        adapters[t.name] = LoRA(A, t.shape[0], scale, p.dropout, train_a=not p.freeze_a)
    return Built(adapters, meta={"modules": plan})


def count(targets: list[Target], p: TaLoRAParams, ctx: BuildContext) -> int:
    """Exact for a calibrated plan (saved meta); otherwise the uniform budget, r per module."""
    ranks = (
        {t.name: ctx.saved_meta["modules"][t.name]["rank"] for t in targets}
        if ctx.saved_meta
        else {t.name: min(p.rank, *t.shape) for t in targets}
    )
    return sum(ranks[t.name] * (t.shape[0] + (0 if p.freeze_a else t.shape[1])) for t in targets)


METHOD = Method(
    name="talora",
    summary="task-aware TLoRA: calibrated ranks and scales, frozen A from the SVD of W0·C, B trained",
    params=TaLoRAParams,
    build=build,
    count=count,
    suggested_lr=3e-4,
    calibration=needs,
)
