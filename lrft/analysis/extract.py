"""What `lrft analyze` takes from a run dir: each selected module's LoRA factors and tensor norms,
weight histograms, metrics, adapter statistics, the calibration plan; the model is released after."""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrft import console
from lrft.analysis.numeric import LowRankSVD
from lrft.atomic_files import read_json, read_jsonl
from lrft.calibrate import INFO_FILE
from lrft.errors import LrftError
from lrft.inject import SHARED_NAME, adapted
from lrft.open_runs import load_run
from lrft.run_layout import RunDir

HIST_BINS = 120


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


def check_same_base(config: dict, other: dict, run_dir: Path, against: Path) -> None:
    """Refuse to compare updates made on different base models: their ΔW live in unrelated spaces."""
    keys = ("name", "revision", "model_type")
    a, b = config.get("base_model", {}), other.get("base_model", {})
    differ = [k for k in keys if a.get(k) != b.get(k)]
    if differ:
        detail = ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in differ)
        raise LrftError(
            f"--against: {against} was trained on another base model than {run_dir} ({detail}); "
            f"compare runs of the same base model"
        )


def name_filter(spec: str | None) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()] if spec else []


def select_targets(names: list[str], patterns: list[str], run_dir: Path) -> list[str]:
    """Target names containing any of the --modules substrings (all when none is given)."""
    if not patterns:
        return names
    kept = [n for n in names if any(p in n for p in patterns)]
    if not kept:
        raise LrftError(
            f"--modules: {','.join(patterns)} matches none of the {len(names)} adapted modules of "
            f"{run_dir}; they are named like {', '.join(names[:3])}"
        )
    return kept


@torch.no_grad()
def module_update(target, adapter) -> ModuleUpdate:
    lora_A, lora_B = adapter.lora_factors()
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise LrftError(
            f"{target.name}: its adapter holds NaN or Inf; the run diverged (check its metrics.jsonl) "
            f"and has no update to analyse"
        )
    norms, scalars = {}, {}
    for tname, tensor in adapter.state_dict().items():  # what is saved: not lorta's row order of a fused projection
        if tensor.numel() == 1:
            scalars[tname] = float(tensor)
        else:
            norms[tname] = float(tensor.detach().float().norm())
    return ModuleUpdate(
        target.name,
        target.kind,
        target.layer,
        tuple(target.shape),
        lora_A.detach().cpu().float().numpy().copy(),
        lora_B.detach().cpu().float().numpy().copy(),
        norms,
        scalars,
    )


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
    groups: dict[str, list[torch.Tensor]] = {}
    for wrapper in wrappers.values():
        for tname, tensor in wrapper.adapter.state_dict().items():
            if tensor.numel() > 1:
                groups.setdefault(tname, []).append(tensor)
    shared = getattr(model, SHARED_NAME, None)
    if shared is not None:
        for tname, tensor in [*shared.named_parameters(), *shared.named_buffers()]:
            groups.setdefault(f"{tname} (shared)", []).append(tensor)
    return groups


def weight_histograms(targets: list, wrappers: dict, model) -> dict[str, Histogram]:
    hists = {"W0": streaming_histogram(lambda: (t.weight for t in targets))}
    for tname, tensors in adapter_tensor_groups(wrappers, model).items():
        hists[tname] = streaming_histogram(lambda ts=tensors: iter(ts))
    return {k: v for k, v in hists.items() if v is not None}


def calibration_plan(run_dir: Path, config: dict) -> dict | None:
    """Per module importance, rank, alpha, scale: the adapter config's plan (talora), tokens from calibration/."""
    plan = (config.get("meta") or {}).get("modules")
    if not isinstance(plan, dict):
        return None
    calib_file = RunDir(run_dir).calibration / INFO_FILE
    calib = read_json(calib_file, "calibration") if calib_file.is_file() else {}
    return {name: {**(calib.get("modules") or {}).get(name, {}), **entry} for name, entry in plan.items()}


def read_run(run_dir: Path, selected: set[str], label: str) -> RunData:
    """Load a run, take the factors, norms and histograms of the selected modules, release the model."""
    run = RunDir(run_dir)
    console.log(f"loading {run_dir}")
    opened = load_run(run_dir)
    model_run, config = opened.adapted, opened.config
    targets = [t for t in model_run.targets if t.name in selected]
    wrappers = {n: w for n, w in adapted(model_run.model).items() if n in selected}
    modules = {
        t.name: module_update(t, wrappers[t.name].adapter)
        for t in console.track(targets, f"{label}: factors", "modules")
    }
    histograms = weight_histograms(targets, wrappers, model_run.model)
    del opened, model_run, wrappers, targets
    gc.collect()  # the base model goes before the next run is loaded
    stats = [r for r in read_jsonl(run.adapter_stats) if r.get("module") in selected]
    plan = calibration_plan(run_dir, config)
    return RunData(
        run.path,
        label,
        config,
        modules,
        histograms,
        read_jsonl(run.metrics),
        stats,
        {k: v for k, v in plan.items() if k in selected} if plan else None,
        read_json(run.summary, "summary") if run.summary.is_file() else None,
    )
