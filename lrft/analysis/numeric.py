"""The numeric core of `lrft analyze`: pure functions on an update's LoRA factors, never a dense ΔW.

ΔW = lora_B·lora_A (out × in). Singular values through QR of both factors and an SVD of the small
core; the nonzero eigenvalues of a square ΔW as those of the r × r matrix A·B; inner products, norms,
cosine and relative distance from r₁ × r₂ products; subspace similarity of the top singular vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

FP32_EPS = float(np.finfo(np.float32).eps)  # the factors are stored and trained in fp32
ROW_BLOCK = 1024  # rows of a dense difference held at once for its statistics


@dataclass
class LowRankSVD:
    """Thin SVD of ΔW = B·A from its factors: ΔW = U·diag(s)·Vᵀ with U out×k, V in×k, s descending."""

    U: np.ndarray
    s: np.ndarray
    V: np.ndarray


def low_rank_svd(lora_A: np.ndarray, lora_B: np.ndarray) -> LowRankSVD:
    """SVD of lora_B (out×r) @ lora_A (r×in) in O((out + in)·r²): B = Q_B R_B, Aᵀ = Q_A R_A, SVD of R_B R_Aᵀ."""
    Q_B, R_B = thin_qr(np.asarray(lora_B, np.float64))
    Q_A, R_A = thin_qr(np.asarray(lora_A, np.float64).T)
    U_core, s, Vt_core = np.linalg.svd(R_B @ R_A.T)
    return LowRankSVD(Q_B @ U_core, s, Q_A @ Vt_core.T)


def thin_qr(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduced QR through torch's LAPACK: NumPy's OpenBLAS QR of a tall thin matrix slows down 100-fold on
    busy cores (4096×16: 173 ms against 2 ms for torch, measured on the 2-core development machine)."""
    Q, R = torch.linalg.qr(torch.from_numpy(np.ascontiguousarray(M)))
    return Q.numpy(), R.numpy()


def numerical_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """Singular values above σ₁·max(m, n)·ε_fp32 (NumPy's matrix_rank rule for fp32 data)."""
    if s.size == 0 or s[0] == 0:
        return 0
    return int(np.sum(s > s[0] * max(shape) * FP32_EPS))


def effective_rank(s: np.ndarray) -> float:
    """exp of the entropy of the L1-normalised singular values (Roy & Vetterli 2007); 0 for a zero update."""
    total = float(np.sum(s))
    if total <= 0:
        return 0.0
    p = np.asarray(s, np.float64) / total
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def update_inner(A1: np.ndarray, B1: np.ndarray, A2: np.ndarray, B2: np.ndarray) -> float:
    """⟨B₁A₁, B₂A₂⟩_F = trace((B₁ᵀB₂)(A₂A₁ᵀ)) = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ), from r₁ × r₂ products only."""
    A1, B1, A2, B2 = (np.asarray(x, np.float64) for x in (A1, B1, A2, B2))
    return float(np.sum((B1.T @ B2) * (A1 @ A2.T)))


def update_norm(A: np.ndarray, B: np.ndarray) -> float:
    """‖B·A‖_F from the factors."""
    return math.sqrt(max(update_inner(A, B, A, B), 0.0))


def cosine_similarity(A1, B1, A2, B2) -> float | None:
    """Cosine of the flattened updates ⟨ΔW₁, ΔW₂⟩ / (‖ΔW₁‖‖ΔW₂‖); None when either update is zero."""
    n1, n2 = update_norm(A1, B1), update_norm(A2, B2)
    if n1 == 0 or n2 == 0:
        return None
    return float(np.clip(update_inner(A1, B1, A2, B2) / (n1 * n2), -1.0, 1.0))


def relative_frobenius(A1, B1, A2, B2) -> float | None:
    """‖ΔW₁ − ΔW₂‖_F / ‖ΔW₂‖_F, expanded through the inner products; None when ΔW₂ is zero."""
    n1_sq, n2_sq = update_inner(A1, B1, A1, B1), update_inner(A2, B2, A2, B2)
    if n2_sq <= 0:
        return None
    diff_sq = n1_sq + n2_sq - 2 * update_inner(A1, B1, A2, B2)
    return math.sqrt(max(diff_sq, 0.0) / n2_sq)  # cancellation can leave a tiny negative for equal updates


def subspace_similarity(svd1: LowRankSVD, svd2: LowRankSVD, shape: tuple[int, int]) -> dict | None:
    """φ = ‖U₁ᵀU₂‖²_F / r of the top-r left and right singular vectors, r = min of the numerical ranks."""
    r = min(numerical_rank(svd1.s, shape), numerical_rank(svd2.s, shape))
    if r == 0:
        return None
    left = float(np.sum((svd1.U[:, :r].T @ svd2.U[:, :r]) ** 2) / r)
    right = float(np.sum((svd1.V[:, :r].T @ svd2.V[:, :r]) ** 2) / r)
    return {"left": min(left, 1.0), "right": min(right, 1.0), "rank": r}


def nonzero_eigenvalues(lora_A: np.ndarray, lora_B: np.ndarray) -> np.ndarray:
    """Eigenvalues of the r × r matrix A·B: the possibly nonzero eigenvalues of the square ΔW = B·A.

    B·A and A·B share their nonzero eigenvalues with multiplicity; the other n − r eigenvalues of ΔW are
    exactly 0. Sorted by decreasing magnitude.
    """
    ev = np.linalg.eigvals(np.asarray(lora_A, np.float64) @ np.asarray(lora_B, np.float64))
    return ev[np.argsort(-np.abs(ev), kind="stable")]


def strided_indices(n: int, max_side: int) -> np.ndarray:
    """Evenly spaced indices, at most max_side of them (all when n ≤ max_side)."""
    return np.arange(n) if n <= max_side else np.linspace(0, n - 1, max_side).round().astype(int)


def update_entries(A: np.ndarray, B: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """ΔW[rows][:, cols] without forming ΔW."""
    return np.asarray(B, np.float64)[rows] @ np.asarray(A, np.float64)[:, cols]


def block_mean_abs(entries, out_f: int, in_f: int, side: int) -> np.ndarray:
    """Mean |x| over a grid of at most side × side blocks of an out_f × in_f matrix whose dense rows
    `entries(rows, cols)` gives; one block row is dense at a time."""
    row_groups = np.array_split(np.arange(out_f), min(side, out_f))
    col_starts = np.array([g[0] for g in np.array_split(np.arange(in_f), min(side, in_f))])
    widths = np.diff(np.append(col_starts, in_f))
    cols = np.arange(in_f)
    means = np.empty((len(row_groups), len(col_starts)))
    for i, rows in enumerate(row_groups):
        means[i] = np.add.reduceat(np.abs(entries(rows, cols)).sum(axis=0), col_starts) / (len(rows) * widths)
    return means


def difference_stats(A1, B1, A2, B2) -> dict:
    """max and mean of |ΔW₁ − ΔW₂| element-wise, ROW_BLOCK rows of the dense difference at a time."""
    out_f, in_f = B1.shape[0], A1.shape[1]
    cols = np.arange(in_f)
    max_abs, total = 0.0, 0.0
    for start in range(0, out_f, ROW_BLOCK):
        rows = np.arange(start, min(start + ROW_BLOCK, out_f))
        diff = np.abs(update_entries(A1, B1, rows, cols) - update_entries(A2, B2, rows, cols))
        max_abs, total = max(max_abs, float(diff.max())), total + float(diff.sum())
    return {"max_abs": max_abs, "mean_abs": total / (out_f * in_f)}


def mean_of(values) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None
