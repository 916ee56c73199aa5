"""`lrft analyze`: what a trained adapter changed, and how two runs' updates compare.

Everything is computed on the updates ΔW themselves (out × in, every scale applied, as merged), not on
W0 + ΔW: the full weights are dominated by W0, so their spectra and similarities say nothing about the
update (the official tri-matrix code compares full weights, adds ΔW transposed, leaves out LoRA's α/r
and looks at layer 0 only). Every adapter is per module a rank-r LoRA, ΔW = lora_B·lora_A
(`Adapter.lora_factors()`), so each quantity is taken through the factors and never needs a dense ΔW:

- singular values: QR of both factors, SVD of the small core R_B·R_Aᵀ;
- eigenvalues of a square ΔW = B·A: its nonzero eigenvalues are those of the r × r matrix A·B (the
  other n − r are exactly 0);
- ⟨ΔW₁, ΔW₂⟩_F = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ), which gives the cosine similarity of the flattened updates and
  the relative Frobenius distance ‖ΔW₁ − ΔW₂‖_F / ‖ΔW₂‖_F;
- the element-wise heatmap of one module computes only the rows and columns it draws.

Definitions. Effective rank (Roy & Vetterli 2007): exp(−Σ pₖ log pₖ) with pₖ = σₖ / Σσ, between 1 and
the rank; 0 for a zero update. Subspace similarity (Hu et al. 2021, the task-aware TLoRA paper):
φ = ‖U₁ᵀU₂‖²_F / r over the top-r left (and, with V, right) singular vectors, with r = min(r₁, r₂) and
rᵢ the numerical rank of update i (singular values above σ₁·max(m, n)·ε_fp32, NumPy's matrix_rank rule
for fp32 data). That is the adapter rank for any trained update, and it never counts directions a
zero or rank-deficient update leaves arbitrary. φ is 1 for updates equal up to scale and 0 for
updates with orthogonal column (row) spaces. Quantities that are undefined (cosine or φ of a zero
update) are null in analysis.json and left out of the means.

The run is loaded once (`lrft.run.load_run`), its low-rank factors and statistics are extracted, and
the model is released before the second run is loaded, so two 7B-sized runs never sit in memory
together. Layout: numeric core (pure functions on factors) → extraction from runs → analysis dict →
figures (matplotlib, Agg) → report (HTML with embedded figures, Markdown) → `analyze()`.
"""

from __future__ import annotations

import base64
import gc
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.patheffects  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lrft import __version__, console  # noqa: E402
from lrft.checkpoint import atomic_dir, read_json, read_jsonl  # noqa: E402
from lrft.errors import LrftError  # noqa: E402

ANALYSIS_DIR = "analysis"
ANALYSIS_FILE = "analysis.json"
FP32_EPS = float(np.finfo(np.float32).eps)  # the factors are stored and trained in fp32
HEATMAP_MAX_SIDE = 512  # an element-wise heatmap draws at most this many rows and columns
ROW_BLOCK = 1024  # rows of a dense difference held at once for its statistics
HIST_BINS = 120
STAT_KEYS = ("alpha", "B_norm", "delta_norm")  # adapter_stats.jsonl fields plotted over epochs
STAT_TITLES = {"alpha": "scale α", "B_norm": "‖B‖_F", "delta_norm": "‖ΔW‖_F"}


# ===================================================================================== numeric core

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


# ============================================================================ extraction from runs

@dataclass
class ModuleUpdate:
    """One adapted Linear of a run: where it sits, its LoRA factors (fp32) and its own tensors' norms."""

    name: str
    kind: str
    layer: int | None
    shape: tuple[int, int]  # (out, in) of W0 and ΔW
    lora_A: np.ndarray  # r × in
    lora_B: np.ndarray  # out × r, every scale folded in
    tensor_norms: dict[str, float]  # ‖X‖_F of the adapter's own (non-scalar) tensors: A, B, C, ...
    scalars: dict[str, float]  # scalar tensors (tlora's α)


@dataclass
class Histogram:
    edges: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())


@dataclass
class RunData:
    """Everything analyze needs from one run dir, with the model already released."""

    dir: Path
    label: str
    config: dict
    modules: dict[str, ModuleUpdate]
    histograms: dict[str, Histogram]  # "W0" and each adapter tensor name, over the selected modules
    metrics: list[dict]
    adapter_stats: list[dict]
    calibration: dict | None  # per module importance, rank, alpha, scale (talora)
    summary: dict | None
    svds: dict[str, LowRankSVD] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.get("method", "?")


def adapter_config_of(run_dir: Path) -> dict:
    """adapter/adapter_config.json, read without loading any model (for the base-model check)."""
    from lrft.run import ADAPTER_DIR, read_recipe

    read_recipe(run_dir)  # a clear error for a dir that is not a run dir
    path = Path(run_dir) / ADAPTER_DIR / "adapter_config.json"
    if not path.is_file():
        raise LrftError(f"{run_dir}: no trained adapter in {path.parent}; the run has not finished "
                        f"(rerun `lrft train` on its recipe to resume it)")
    return read_json(path, "adapter config")


def check_same_base(config: dict, other: dict, run_dir: Path, against: Path) -> None:
    """Refuse to compare updates made on different base models: their ΔW live in unrelated spaces."""
    keys = ("name", "revision", "model_type")
    a, b = config.get("base_model", {}), other.get("base_model", {})
    differ = [k for k in keys if a.get(k) != b.get(k)]
    if differ:
        detail = ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in differ)
        raise LrftError(f"--against: {against} was trained on another base model than {run_dir} ({detail}); "
                        f"compare runs of the same base model")


def name_filter(spec: str | None) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()] if spec else []


def select_targets(names: list[str], patterns: list[str], run_dir: Path) -> list[str]:
    """Target names containing any of the --modules substrings (all when none is given)."""
    if not patterns:
        return names
    kept = [n for n in names if any(p in n for p in patterns)]
    if not kept:
        raise LrftError(f"--modules: {','.join(patterns)} matches none of the {len(names)} adapted modules of "
                        f"{run_dir}; they are named like {', '.join(names[:3])}")
    return kept


@torch.no_grad()
def module_update(target, adapter) -> ModuleUpdate:
    lora_A, lora_B = adapter.lora_factors()
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise LrftError(f"{target.name}: its adapter holds NaN or Inf; the run diverged (check its metrics.jsonl) "
                        f"and has no update to analyse")
    norms, scalars = {}, {}
    for tname, tensor in [*adapter.named_parameters(), *adapter.named_buffers()]:
        if tensor.numel() == 1:
            scalars[tname] = float(tensor)
        else:
            norms[tname] = float(tensor.detach().float().norm())
    return ModuleUpdate(target.name, target.kind, target.layer, tuple(target.shape),
                        lora_A.detach().cpu().float().numpy().copy(), lora_B.detach().cpu().float().numpy().copy(),
                        norms, scalars)


@torch.no_grad()
def streaming_histogram(tensors, bins: int = HIST_BINS) -> Histogram | None:
    """Histogram over a sequence of tensors: one pass for the range, one for the counts, one tensor at a time."""
    lo, hi = math.inf, -math.inf
    for t in tensors():
        lo, hi = min(lo, float(t.min())), max(hi, float(t.max()))
    if not math.isfinite(lo) or not math.isfinite(hi):
        return None
    if lo == hi:  # a constant tensor (B at its zero init): one visible bar around the value
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.zeros(bins, dtype=torch.float64)
    for t in tensors():
        counts += torch.histc(t.detach().float().cpu(), bins=bins, min=lo, max=hi).double()
    return Histogram(np.linspace(lo, hi, bins + 1), counts.numpy())


def adapter_tensor_groups(wrappers: dict, model) -> dict[str, list[torch.Tensor]]:
    """Adapter tensors by name (A, B, C, ...) over the selected modules; shared factors (lorta) once each."""
    from lrft.inject import SHARED_NAME

    groups: dict[str, list[torch.Tensor]] = {}
    for wrapper in wrappers.values():
        for tname, tensor in [*wrapper.adapter.named_parameters(), *wrapper.adapter.named_buffers()]:
            if tensor.numel() > 1:
                groups.setdefault(tname, []).append(tensor)
    shared = getattr(model, SHARED_NAME, None)
    if shared is not None:
        for tname, tensor in [*shared.named_parameters(), *shared.named_buffers()]:
            groups.setdefault(f"{tname} (shared)", []).append(tensor)
    return groups


def weight_histograms(targets: list, wrappers: dict, model) -> dict[str, Histogram]:
    hists = {"W0": streaming_histogram(lambda: (t.module.weight for t in targets))}
    for tname, tensors in adapter_tensor_groups(wrappers, model).items():
        hists[tname] = streaming_histogram(lambda ts=tensors: iter(ts))
    return {k: v for k, v in hists.items() if v is not None}


def calibration_plan(run_dir: Path, config: dict) -> dict | None:
    """Per module importance, rank, alpha, scale: the adapter config's plan (talora), tokens from calibration/."""
    plan = (config.get("meta") or {}).get("modules")
    if not isinstance(plan, dict):
        return None
    calib_file = Path(run_dir) / "calibration" / "calibration.json"
    calib = read_json(calib_file, "calibration") if calib_file.is_file() else {}
    return {name: {**(calib.get("modules") or {}).get(name, {}), **entry} for name, entry in plan.items()}


def read_run(run_dir: Path, selected: set[str], label: str) -> RunData:
    """Load a run, take the factors, norms and histograms of the selected modules, release the model."""
    from lrft.inject import adapted
    from lrft.run import load_run

    run_dir = Path(run_dir)
    console.log(f"loading {run_dir}")
    _, model_run, config = load_run(run_dir)
    targets = [t for t in model_run.targets if t.name in selected]
    wrappers = {n: w for n, w in adapted(model_run.model).items() if n in selected}
    modules = {t.name: module_update(t, wrappers[t.name].adapter) for t in targets}
    histograms = weight_histograms(targets, wrappers, model_run.model)
    del model_run, wrappers, targets
    gc.collect()  # the base model goes before the next run is loaded
    stats = [r for r in read_jsonl(run_dir / "adapter_stats.jsonl") if r.get("module") in selected]
    plan = calibration_plan(run_dir, config)
    summary_file = run_dir / "summary.json"
    return RunData(run_dir, label, config, modules, histograms, read_jsonl(run_dir / "metrics.jsonl"), stats,
                   {k: v for k, v in plan.items() if k in selected} if plan else None,
                   read_json(summary_file, "summary") if summary_file.is_file() else None)


# =================================================================================== analysis dict

def module_numbers(m: ModuleUpdate, svd: LowRankSVD) -> dict:
    entry = {"kind": m.kind, "layer": m.layer, "shape": list(m.shape), "rank": int(m.lora_A.shape[0]),
             "numerical_rank": numerical_rank(svd.s, m.shape),
             "fro_norm": float(np.sqrt(np.sum(svd.s ** 2))), "effective_rank": effective_rank(svd.s),
             "singular_values": [float(x) for x in svd.s], "tensor_norms": m.tensor_norms}
    if m.scalars:
        entry["scalars"] = m.scalars
    if m.shape[0] == m.shape[1]:
        ev = nonzero_eigenvalues(m.lora_A, m.lora_B)
        entry["eigenvalues"] = {"real": [float(x) for x in ev.real], "imag": [float(x) for x in ev.imag]}
    return entry


def run_numbers(run: RunData) -> dict:
    for name, m in run.modules.items():
        run.svds[name] = low_rank_svd(m.lora_A, m.lora_B)
    modules = {name: module_numbers(m, run.svds[name]) for name, m in run.modules.items()}
    out = {"dir": str(run.dir), "label": run.label, "method": run.method, "params": run.config.get("params"),
           "base_model": run.config.get("base_model"), "modules": modules,
           "mean_fro_norm": mean_of(v["fro_norm"] for v in modules.values()),
           "mean_effective_rank": mean_of(v["effective_rank"] for v in modules.values())}
    if run.calibration:
        out["calibration"] = run.calibration
    if run.summary:
        out["summary"] = {k: run.summary.get(k) for k in ("final", "best", "steps", "trainable_params")}
    return out


def per_module_metric(values: dict[str, float | None], kinds: dict[str, str]) -> dict:
    """{per_module, mean, per_kind}: the mean over modules where the value is defined, also per kind."""
    by_kind: dict[str, list] = {}
    for name, v in values.items():
        by_kind.setdefault(kinds[name], []).append(v)
    return {"per_module": values, "mean": mean_of(values.values()),
            "per_kind": {k: mean_of(vs) for k, vs in by_kind.items()}}


def compare_numbers(run: RunData, other: RunData) -> dict:
    """Similarities of the updates of the modules both runs adapt; the others are listed as unmatched."""
    common = [n for n in run.modules if n in other.modules and run.modules[n].shape == other.modules[n].shape]
    only_run = [n for n in run.modules if n not in common]
    only_other = [n for n in other.modules if n not in common]
    cosine, rel, left, right, ranks = {}, {}, {}, {}, {}
    for n in common:
        a, b = run.modules[n], other.modules[n]
        cosine[n] = cosine_similarity(a.lora_A, a.lora_B, b.lora_A, b.lora_B)
        rel[n] = relative_frobenius(a.lora_A, a.lora_B, b.lora_A, b.lora_B)
        phi = subspace_similarity(run.svds[n], other.svds[n], a.shape)
        left[n], right[n], ranks[n] = (phi["left"], phi["right"], phi["rank"]) if phi else (None, None, 0)
    kinds = {n: run.modules[n].kind for n in common}
    subspace = {"left": per_module_metric(left, kinds), "right": per_module_metric(right, kinds),
                "rank": ranks}
    return {"common": common, "cosine": per_module_metric(cosine, kinds), "subspace": subspace,
            "rel_frobenius": per_module_metric(rel, kinds), "unmatched": sorted(only_run + only_other),
            "unmatched_detail": {"only_in_run": only_run, "only_in_against": only_other}}


def choose_module(wanted: str | None, candidates: list[str]) -> str | None:
    """--module: an exact name, or a substring naming exactly one module; default the first."""
    if not candidates:
        if wanted is not None:
            raise LrftError(f"--module: {wanted!r}: the two runs adapt no module in common, so there is nothing to compare")
        return None
    if wanted is None:
        return candidates[0]
    if wanted in candidates:
        return wanted
    hits = [n for n in candidates if wanted in n]
    if len(hits) == 1:
        return hits[0]
    some = ", ".join((hits or candidates)[:5])
    why = f"matches {len(hits)} modules" if hits else "is not an analysed module"
    raise LrftError(f"--module: {wanted!r} {why}; give one full name, e.g. {some}")


# ========================================================================================== figures

@dataclass
class Figure:
    file: str
    caption: str


class Grid:
    """Modules placed on a (layer block × kind) grid, rows and columns in model order."""

    def __init__(self, modules: dict[str, ModuleUpdate]):
        self.place = {n: (row_of(n), m.kind) for n, m in modules.items()}
        self.rows = list(dict.fromkeys(r for r, _ in self.place.values()))
        self.cols = list(dict.fromkeys(c for _, c in self.place.values()))
        stem = common_stem(self.rows)
        self.row_labels = [r[len(stem):] or r for r in self.rows]

    def matrix(self, values: dict[str, float | None]) -> np.ndarray:
        out = np.full((len(self.rows), len(self.cols)), np.nan)
        for n, v in values.items():
            if n in self.place and v is not None:
                r, c = self.place[n]
                out[self.rows.index(r), self.cols.index(c)] = v
        return out

    def label(self, name: str) -> str:
        r, c = self.place[name]
        return f"{self.row_labels[self.rows.index(r)]} {c}"


def row_of(name: str) -> str:
    """The module's layer block: its name up to the first numeric component ('bert.encoder.layer.3')."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else "(no layer)"


def common_stem(rows: list[str]) -> str:
    """The longest common prefix of the row names ending at a dot ('bert.encoder.layer.')."""
    if len(rows) < 2:
        return re.sub(r"[^.]*$", "", rows[0]) if rows else ""
    prefix = rows[0]
    for r in rows[1:]:
        while not r.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind(".") + 1]


def save(fig, out_dir: Path, file: str, caption: str, figures: list[Figure]) -> None:
    fig.tight_layout()
    fig.savefig(out_dir / file, dpi=100)
    plt.close(fig)
    figures.append(Figure(file, caption))


def heatmap(ax, grid: Grid, values: dict, title: str, cmap: str = "viridis", vmin=None, vmax=None) -> None:
    mat = grid.matrix(values)
    im = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(grid.cols)), grid.cols, rotation=30, ha="right", fontsize=8)
    step = max(1, len(grid.rows) // 24)
    ax.set_yticks(range(0, len(grid.rows), step), grid.row_labels[::step], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    if mat.size <= 64:  # small grids carry their numbers
        for (i, j), v in np.ndenumerate(mat):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="k",
                        path_effects=[matplotlib.patheffects.withStroke(linewidth=2, foreground="w")])
    plt.colorbar(im, ax=ax, fraction=0.046)


def layer_lines(ax, grid: Grid, series: dict[str, dict], ylabel: str) -> None:
    """One line per (series, kind) over the layer rows."""
    for (label, values), style in zip(series.items(), ("-o", "--s", ":^")):
        mat = grid.matrix(values)
        for j, kind in enumerate(grid.cols):
            if np.isfinite(mat[:, j]).any():
                ax.plot(range(len(grid.rows)), mat[:, j], style, ms=3, label=f"{kind} ({label})" if len(series) > 1 else kind)
    step = max(1, len(grid.rows) // 16)
    ax.set_xticks(range(0, len(grid.rows), step), grid.row_labels[::step], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def fig_layer_metric(out_dir, figures, grid, series: dict[str, dict], file, title, caption, **heat) -> None:
    """Heatmap (layer × module kind) of the first series and per-layer lines of all series."""
    fig, (ax_heat, ax_line) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.22 * len(grid.rows) + 1.5)))
    first = next(iter(series))
    heatmap(ax_heat, grid, series[first], f"{title}, {first}" if len(series) > 1 else title, **heat)
    layer_lines(ax_line, grid, series, title)
    save(fig, out_dir, file, caption, figures)


def series_of(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a number under `key`."""
    kept = [r for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [r["step"] for r in kept], [float(r[key]) for r in kept]


def eval_keys(evals: list[dict]) -> list[str]:
    return sorted({k for r in evals for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                  - {"step", "epoch"})


def fig_loss(out_dir, figures, runs: list[RunData]) -> None:
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4))
    for run, color in zip(runs, ("tab:blue", "tab:orange")):
        steps, losses = series_of([r for r in run.metrics if r.get("type") == "train"], "loss")
        if steps:
            ax_loss.plot(steps, losses, color=color, alpha=0.6, label=f"train ({run.label})")
        evals = [r for r in run.metrics if r.get("type") == "eval"]
        for key in eval_keys(evals):  # validation losses (one per eval set) left, task metrics right
            ax = ax_loss if "loss" in key else ax_metric
            ax.plot(*series_of(evals, key), "o--" if ax is ax_loss else "o-", ms=4,
                    color=color if key == "loss" else None, label=f"validation {key} ({run.label})")
    if not ax_loss.get_legend_handles_labels()[0] and not ax_metric.get_legend_handles_labels()[0]:
        plt.close(fig)  # a run without metrics.jsonl: no figure rather than empty axes
        return
    ax_loss.set(xlabel="step", ylabel="loss", title="training and validation loss")
    ax_metric.set(xlabel="step", title="validation metrics")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save(fig, out_dir, "loss.png", "Training loss per logged step and validation loss and metrics per evaluation "
         "(metrics.jsonl), for " + " and ".join(r.label for r in runs) + ".", figures)


def fig_singular_values(out_dir, figures, runs: list[RunData], grid: Grid) -> None:
    fig, axes = plt.subplots(1, len(grid.cols), figsize=(5 * len(grid.cols), 4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for j, kind in enumerate(grid.cols):
        ax = axes[0, j]
        for run, style in zip(runs, ("-", "--")):
            for name, m in run.modules.items():
                if m.kind != kind or name not in grid.place:
                    continue
                s = run.svds[name].s
                if s.size and s[0] > 0:
                    shade = cmap(grid.rows.index(grid.place[name][0]) / max(1, len(grid.rows) - 1))
                    ax.semilogy(np.arange(1, s.size + 1), np.maximum(s, s[0] * 1e-12), style, color=shade, lw=1,
                                marker=".")
        ax.set(xlabel="index k", ylabel="σ_k", title=f"singular values of ΔW: {kind}")
        ax.grid(alpha=0.3)
    styles = " (solid: " + runs[0].label + ", dashed: " + runs[1].label + ")" if len(runs) > 1 else ""
    save(fig, out_dir, "singular_values.png", "Singular values σ_k of each update ΔW, one line per layer "
         "(colour from first layer, purple, to last, yellow), one panel per module kind" + styles + ".", figures)


def fig_eigenvalues(out_dir, figures, runs: list[RunData]) -> None:
    eigs = {}
    for run in runs:
        vals = [nonzero_eigenvalues(m.lora_A, m.lora_B) for m in run.modules.values() if m.shape[0] == m.shape[1]]
        if vals:
            eigs[run.label] = np.concatenate(vals)
    if not eigs:
        return
    fig, (ax_c, ax_re, ax_abs) = plt.subplots(1, 3, figsize=(15, 4))
    bins = np.histogram_bin_edges(np.concatenate([ev.real for ev in eigs.values()]), bins=40)  # shared by both runs
    for (label, ev), color in zip(eigs.items(), ("tab:blue", "tab:orange")):
        ax_c.scatter(ev.real, ev.imag, s=8, alpha=0.6, color=color, label=label)
        ax_re.hist(ev.real, bins=bins, alpha=0.5, color=color, label=label)
        for part, style in ((ev.real[ev.real > 0], "-"), (-ev.real[ev.real < 0], "--")):
            if part.size:
                ax_abs.semilogy(np.sort(part)[::-1], style, color=color,
                                label=f"{label}: Re λ {'> 0' if style == '-' else '< 0'}")
    ax_c.set(xlabel="Re λ", ylabel="Im λ", title="eigenvalues of ΔW (complex plane)")
    ax_re.set(xlabel="Re λ", ylabel="count", title="real parts")
    ax_abs.set(xlabel="rank", ylabel="|Re λ|", title="|Re λ| of positive and negative real parts")
    for ax in (ax_c, ax_re, ax_abs):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, out_dir, "eigenvalues.png", "Eigenvalues λ of the square updates ΔW over all selected modules "
         "(the r possibly nonzero ones, from the r×r matrix A·B): complex plane, histogram of real parts, and "
         "sorted |Re λ| of eigenvalues with positive and negative real part on a log scale.", figures)


def fig_histograms(out_dir, figures, run: RunData, prefix: str) -> None:
    hists = run.histograms
    if not hists:
        return
    cols = min(4, len(hists))
    rows = math.ceil(len(hists) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, h) in zip(axes.flat, hists.items()):
        ax.stairs(h.counts, h.edges, fill=True, alpha=0.7)
        ax.set_yscale("log")
        ax.set(title=f"{name} ({h.total:,} values)", xlabel="value", ylabel="count")
    for ax in list(axes.flat)[len(hists):]:
        ax.axis("off")
    save(fig, out_dir, f"{prefix}histograms.png", f"{run.label}: histograms (log counts) of the frozen base "
         f"weights W0 of the adapted modules and of each adapter tensor ({run.method}), pooled over modules.",
         figures)


def fig_factor_norms(out_dir, figures, run: RunData, grid: Grid, prefix: str) -> None:
    names = list(dict.fromkeys(k for m in run.modules.values() for k in m.tensor_norms))
    panels = [("‖ΔW‖_F", {n: float(np.sqrt(np.sum(run.svds[n].s ** 2))) for n in run.modules})]
    panels += [(f"‖{t}‖_F", {n: m.tensor_norms.get(t) for n, m in run.modules.items()}) for t in names]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), max(3.5, 0.22 * len(grid.rows) + 1.5)),
                             squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        heatmap(ax, grid, values, title)
    extra = "" if names else " (its factors are shared by all modules: see the histograms)"
    save(fig, out_dir, f"{prefix}factor_norms.png", f"{run.label}: Frobenius norm of the update ΔW and of each "
         f"adapter tensor per layer (rows) and module (columns){extra}.", figures)


def fig_effective_rank(out_dir, figures, runs: list[RunData], grid: Grid, numbers: list[dict]) -> None:
    series = {run.label: {n: v["effective_rank"] for n, v in num["modules"].items()} for run, num in zip(runs, numbers)}
    fig_layer_metric(out_dir, figures, grid, series, "effective_rank.png", "effective rank of ΔW",
                     "Effective rank exp(H(σ/Σσ)) of each update per layer and module: heatmap for "
                     f"{runs[0].label}, lines per module kind for " + " and ".join(series) + ".")


def stats_table(records: list[dict], key: str) -> tuple[list[str], list[float], np.ndarray]:
    """(modules, epochs, matrix modules × epochs) of one adapter_stats key; the last record of an epoch wins."""
    epochs = sorted({r["epoch"] for r in records if key in r})
    modules = list(dict.fromkeys(r["module"] for r in records if key in r))
    mat = np.full((len(modules), len(epochs)), np.nan)
    for r in records:
        if key in r:
            mat[modules.index(r["module"]), epochs.index(r["epoch"])] = r[key]
    return modules, epochs, mat


def fig_adapter_stats(out_dir, figures, run: RunData, grid: Grid, prefix: str) -> None:
    keys = [k for k in STAT_KEYS if any(k in r for r in run.adapter_stats)]
    if not keys:
        return
    fig, axes = plt.subplots(2, len(keys), figsize=(5 * len(keys), 8), squeeze=False)
    for j, key in enumerate(keys):
        modules, epochs, mat = stats_table(run.adapter_stats, key)
        labels = [grid.label(m) if m in grid.place else m for m in modules]
        for i, label in enumerate(labels):
            axes[0, j].plot(epochs, mat[i], "o-", ms=3, lw=1, label=label)
        axes[0, j].set(xlabel="epoch", title=f"{STAT_TITLES[key]} per module over epochs")
        axes[0, j].grid(alpha=0.3)
        if len(labels) <= 12:
            axes[0, j].legend(fontsize=6)
        im = axes[1, j].imshow(mat, aspect="auto", interpolation="nearest", cmap="magma")
        axes[1, j].set_xticks(range(len(epochs)), [f"{e:g}" for e in epochs], fontsize=7)
        step = max(1, len(labels) // 24)
        axes[1, j].set_yticks(range(0, len(labels), step), labels[::step], fontsize=7)
        axes[1, j].set(xlabel="epoch", title=f"{STAT_TITLES[key]}: module × epoch")
        plt.colorbar(im, ax=axes[1, j], fraction=0.046)
    what = ", ".join(STAT_TITLES[k] for k in keys)
    save(fig, out_dir, f"{prefix}adapter_stats.png", f"{run.label}: {what} of every module over training "
         f"epochs (adapter_stats.jsonl; epoch 0 is the initial adapter), as curves and as a heatmap.", figures)


def fig_calibration(out_dir, figures, run: RunData, grid: Grid, prefix: str) -> None:
    plan = run.calibration
    if not plan:
        return
    names = [n for n in run.modules if n in plan]
    panels = [(k, t) for k, t in (("importance", "importance S_i"), ("rank", "rank r_i"), ("alpha", "α_i"),
                                  ("scale", "scale s_i = α_i / r_i")) if all(k in plan[n] for n in names)]
    if not names or not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.3 * len(names) + 2), 2.3 * len(panels)),
                             sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        ax.bar(range(len(names)), [plan[n][key] for n in names], color="tab:blue")
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xticks(range(len(names)), [grid.label(n) for n in names], rotation=90, fontsize=7)
    save(fig, out_dir, f"{prefix}calibration.png", f"{run.label}: calibration importance S_i and the rank r_i, "
         f"α_i and update scale s_i it allocated to each module (adapter config / calibration.json).", figures)


def fig_update_heatmap(out_dir, figures, runs: list[RunData], module: str) -> dict:
    """ΔW of one module element-wise (strided when large); with two runs also their difference."""
    mods = [run.modules[module] for run in runs]
    rows = strided_indices(mods[0].shape[0], HEATMAP_MAX_SIDE)
    cols = strided_indices(mods[0].shape[1], HEATMAP_MAX_SIDE)
    panels = [(f"ΔW {run.label}", update_entries(m.lora_A, m.lora_B, rows, cols)) for run, m in zip(runs, mods)]
    info = {"module": module}
    if len(runs) == 2:
        panels.append((f"ΔW {runs[0].label} − ΔW {runs[1].label}", panels[0][1] - panels[1][1]))
        info.update(difference_stats(mods[0].lora_A, mods[0].lora_B, mods[1].lora_A, mods[1].lora_B))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, mat) in zip(axes[0], panels):
        bound = float(np.max(np.abs(mat))) or 1.0
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest", aspect="auto")
        ax.set(title=title, xlabel="input feature", ylabel="output feature")
        plt.colorbar(im, ax=ax, fraction=0.046)
    out_f, in_f = mods[0].shape
    strided = "" if (len(rows), len(cols)) == (out_f, in_f) else f", {len(rows)} rows and {len(cols)} columns evenly sampled"
    what = "the element-wise difference of the two updates" if len(runs) == 2 else "its entries"
    save(fig, out_dir, "update_heatmap.png", f"Update ΔW of {module} ({out_f}×{in_f}{strided}) "
         f"per run and {what}, on a symmetric colour scale.", figures)
    return info


# =========================================================================================== report

def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def module_rows(numbers: dict) -> tuple[list[str], list[list[str]]]:
    head = ["module", "shape", "rank", "‖ΔW‖_F", "effective rank", "σ₁"]
    rows = [[name, "×".join(map(str, v["shape"])), str(v["rank"]), fmt(v["fro_norm"]), fmt(v["effective_rank"]),
             fmt(v["singular_values"][0] if v["singular_values"] else None)] for name, v in numbers["modules"].items()]
    return head, rows


def compare_rows(cmp: dict) -> tuple[list[str], list[list[str]]]:
    head = ["module", "cosine", "φ left", "φ right", "φ rank r", "‖ΔW₁−ΔW₂‖/‖ΔW₂‖"]
    rows = [[n, fmt(cmp["cosine"]["per_module"][n]), fmt(cmp["subspace"]["left"]["per_module"][n]),
             fmt(cmp["subspace"]["right"]["per_module"][n]), str(cmp["subspace"]["rank"][n]),
             fmt(cmp["rel_frobenius"]["per_module"][n])] for n in cmp["cosine"]["per_module"]]
    rows.append(["mean", fmt(cmp["cosine"]["mean"]), fmt(cmp["subspace"]["left"]["mean"]),
                 fmt(cmp["subspace"]["right"]["mean"]), "", fmt(cmp["rel_frobenius"]["mean"])])
    return head, rows


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    out = [(f"Updates of {result['run']['label']} ({result['run']['method']})", *module_rows(result["run"]))]
    if "against" in result:
        out.append((f"Updates of {result['against']['label']} ({result['against']['method']})",
                    *module_rows(result["against"])))
        out.append(("Similarity per module", *compare_rows(result)))
    return out


def intro_lines(result: dict) -> list[str]:
    run = result["run"]
    base = run.get("base_model") or {}
    lines = [f"Run {run['label']} ({run['dir']}): method {run['method']}, base model {base.get('name')} "
             f"({base.get('model_type')}), {len(run['modules'])} modules analysed."]
    if "against" in result:
        other = result["against"]
        lines.append(f"Compared against {other['label']} ({other['dir']}): method {other['method']}; "
                     f"{len(result['cosine']['per_module'])} modules in common. Mean cosine "
                     f"{fmt(result['cosine']['mean'])}, mean φ left {fmt(result['subspace']['left']['mean'])}, "
                     f"right {fmt(result['subspace']['right']['mean'])}, mean relative Frobenius distance "
                     f"{fmt(result['rel_frobenius']['mean'])}.")
        if result["unmatched"]:
            lines.append("Modules adapted by only one run (not compared): " + ", ".join(result["unmatched"]) + ".")
    lines.append("All quantities are taken on the updates ΔW (out × in, every scale applied), not on W0 + ΔW.")
    return lines


def render_html(result: dict, figures: list[Figure], out_dir: Path) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>lrft analyze: {e(result['run']['label'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
             "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}"
             "figure{margin:2em 0}figcaption{color:#333}</style></head><body>",
             f"<h1>lrft analyze: {e(result['run']['label'])}</h1>"]
    parts += [f"<p>{e(line)}</p>" for line in intro_lines(result)]
    parts.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode((out_dir / f.file).read_bytes()).decode("ascii")
        parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{e(f.file)}\">"
                     f"<figcaption><b>{e(f.file)}</b>: {e(f.caption)}</figcaption></figure>")
    parts.append("<h2>Tables</h2>")
    for title, head, rows in tables(result):
        parts.append(f"<h3>{e(title)}</h3><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append(f"<p>Numbers: {ANALYSIS_FILE}. Definitions: {e(result['definitions']['effective_rank'])} "
                 f"{e(result['definitions']['subspace_similarity'])}</p></body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(result: dict, figures: list[Figure]) -> str:
    lines = [f"# lrft analyze: {result['run']['label']}", ""] + [line + "\n" for line in intro_lines(result)]
    lines += ["## Figures", ""]
    for f in figures:
        lines += [f"![{f.file}]({f.file})", "", f"*{f.caption}*", ""]
    lines += ["## Tables", ""]
    for title, head, rows in tables(result):
        lines += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += [f"Numbers: `{ANALYSIS_FILE}`. {result['definitions']['effective_rank']} "
              f"{result['definitions']['subspace_similarity']}", ""]
    return "\n".join(lines)


# ===================================================================================== entry point

DEFINITIONS = {
    "update": "ΔW = lora_B·lora_A (out × in, every scale applied), the update merged into W0",
    "effective_rank": "Effective rank = exp(−Σ p_k log p_k), p_k = σ_k/Σσ (Roy & Vetterli 2007).",
    "subspace_similarity": "φ = ‖U₁ᵀU₂‖²_F / r over the top-r left (right: V) singular vectors, r = the smaller "
                           "numerical rank of the two updates.",
    "eigenvalues": "the r eigenvalues of A·B, which are the possibly nonzero eigenvalues of a square ΔW = B·A",
    "rel_frobenius": "‖ΔW_run − ΔW_against‖_F / ‖ΔW_against‖_F",
}


def check_out_dir(out: Path) -> None:
    """The output dir is replaced whole: refuse a non-empty dir that is not an earlier analysis."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ANALYSIS_FILE).is_file())):
        raise LrftError(f"--out: {out} exists and is not an lrft analysis dir (no {ANALYSIS_FILE}); it would be "
                        f"replaced whole, so give a new or empty dir")


def label_for(path: Path, other: Path | None) -> str:
    name = Path(path).resolve().name
    return name if other is None or Path(other).resolve().name != name else str(path)


def analyze(run_dir: Path, against: Path | None = None, out: Path | None = None, module: str | None = None,
            modules: str | None = None) -> dict:
    """Analyse a run (and compare it with `against`); write figures, analysis.json and the reports to `out`."""
    run_dir, against = Path(run_dir), Path(against) if against is not None else None
    out = Path(out) if out is not None else run_dir / ANALYSIS_DIR
    check_out_dir(out)
    # Every argument is checked against the adapter configs before a model is loaded.
    config = adapter_config_of(run_dir)
    other_config = adapter_config_of(against) if against is not None else None
    if other_config is not None:
        check_same_base(config, other_config, run_dir, against)
    patterns = name_filter(modules)
    selected = select_targets(config["targets"], patterns, run_dir)
    candidates = selected
    if other_config is not None:
        other_selected = select_targets(other_config["targets"], patterns, against)
        candidates = [n for n in selected if n in other_selected]
    chosen = choose_module(module, candidates)

    runs = [read_run(run_dir, set(selected), label_for(run_dir, against))]
    if against is not None:
        runs.append(read_run(against, set(other_selected), label_for(against, run_dir)))
    numbers = [run_numbers(run) for run in runs]
    result = {"lrft_version": __version__, "definitions": DEFINITIONS, "run": numbers[0]}
    if against is not None:
        result["against"] = numbers[1]
        cmp = compare_numbers(*runs)
        result.update({k: cmp[k] for k in ("cosine", "subspace", "rel_frobenius", "unmatched", "unmatched_detail")})
        if chosen not in cmp["common"]:
            chosen = None  # same name but another shape: nothing element-wise to draw
        if cmp["unmatched"]:
            console.warn(f"{len(cmp['unmatched'])} modules are adapted by only one run and not compared: "
                         + ", ".join(cmp["unmatched"][:4]) + (" ..." if len(cmp["unmatched"]) > 4 else ""))
    result["out"] = str(out)
    with atomic_dir(out) as tmp:
        figures, heat = write_figures(tmp, runs, numbers, result, chosen)
        if heat:
            result["element_difference" if against is not None else "update_heatmap"] = heat
        result["figures"] = [{"file": f.file, "caption": f.caption} for f in figures]
        (tmp / ANALYSIS_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(render_html(result, figures, tmp), encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(result, figures), encoding="utf-8")
    console.log(f"analysis written to {out} ({len(figures)} figures, report.html, report.md, {ANALYSIS_FILE})")
    return result


def write_figures(out_dir: Path, runs: list[RunData], numbers: list[dict], result: dict,
                  chosen: str | None) -> tuple[list[Figure], dict | None]:
    figures: list[Figure] = []
    all_modules = {**(runs[1].modules if len(runs) > 1 else {}), **runs[0].modules}
    grid = Grid(all_modules)
    fig_loss(out_dir, figures, runs)
    fig_singular_values(out_dir, figures, runs, grid)
    fig_eigenvalues(out_dir, figures, runs)
    fig_effective_rank(out_dir, figures, runs, grid, numbers)
    for run, prefix in zip(runs, ("", "against_")):
        fig_histograms(out_dir, figures, run, prefix)
        fig_factor_norms(out_dir, figures, run, grid, prefix)
        fig_adapter_stats(out_dir, figures, run, grid, prefix)
        fig_calibration(out_dir, figures, run, grid, prefix)
    if len(runs) == 2 and result["cosine"]["per_module"]:
        a, b = runs[0].label, runs[1].label
        fig_layer_metric(out_dir, figures, grid, {"cosine": result["cosine"]["per_module"]}, "cosine.png",
                         "cosine similarity", f"Cosine similarity of the flattened updates ΔW of {a} and {b} per "
                         "layer and module (1: same direction, 0: orthogonal, −1: opposite).",
                         cmap="RdBu_r", vmin=-1, vmax=1)
        fig_layer_metric(out_dir, figures, grid, {"left (U)": result["subspace"]["left"]["per_module"],
                                                  "right (V)": result["subspace"]["right"]["per_module"]},
                         "subspace.png", "subspace similarity φ",
                         f"Subspace similarity φ = ‖U₁ᵀU₂‖²_F / r of the top-r singular vectors of the updates of "
                         f"{a} and {b}: heatmap of the left (output-side) φ, lines of left and right φ per layer.",
                         vmin=0, vmax=1)
        fig_layer_metric(out_dir, figures, grid, {"relative distance": result["rel_frobenius"]["per_module"]},
                         "rel_frobenius.png", "‖ΔW₁−ΔW₂‖_F / ‖ΔW₂‖_F",
                         f"Relative Frobenius distance ‖ΔW({a}) − ΔW({b})‖_F / ‖ΔW({b})‖_F per layer and module.")
    heat = fig_update_heatmap(out_dir, figures, runs, chosen) if chosen else None
    return figures, heat
