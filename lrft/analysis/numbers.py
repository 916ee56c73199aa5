"""The numbers of analysis.json: per module spectra, norms and effective rank of a run; per module
similarities of two runs' updates; the module drawn element-wise."""

from __future__ import annotations

import numpy as np

from lrft import console
from lrft.analysis.extract import ModuleUpdate, RunData
from lrft.analysis.numeric import (
    LowRankSVD,
    cosine_similarity,
    effective_rank,
    low_rank_svd,
    mean_of,
    nonzero_eigenvalues,
    numerical_rank,
    relative_frobenius,
    subspace_similarity,
)
from lrft.errors import LrftError


def module_numbers(m: ModuleUpdate, svd: LowRankSVD) -> dict:
    entry = {
        "kind": m.kind,
        "layer": m.layer,
        "shape": list(m.shape),
        "rank": int(m.lora_A.shape[0]),
        "numerical_rank": numerical_rank(svd.s, m.shape),
        "fro_norm": float(np.sqrt(np.sum(svd.s**2))),
        "effective_rank": effective_rank(svd.s),
        "singular_values": [float(x) for x in svd.s],
        "tensor_norms": m.tensor_norms,
    }
    if m.scalars:
        entry["scalars"] = m.scalars
    if m.shape[0] == m.shape[1]:
        ev = nonzero_eigenvalues(m.lora_A, m.lora_B)
        entry["eigenvalues"] = {"real": [float(x) for x in ev.real], "imag": [float(x) for x in ev.imag]}
    return entry


def run_numbers(run: RunData) -> dict:
    for name, m in console.track(run.modules.items(), f"{run.label}: spectra", "modules", total=len(run.modules)):
        run.svds[name] = low_rank_svd(m.lora_A, m.lora_B)
    modules = {name: module_numbers(m, run.svds[name]) for name, m in run.modules.items()}
    out = {
        "dir": str(run.dir),
        "label": run.label,
        "method": run.method,
        "params": run.config.get("params"),
        "base_model": run.config.get("base_model"),
        "modules": modules,
        "mean_fro_norm": mean_of(v["fro_norm"] for v in modules.values()),
        "mean_effective_rank": mean_of(v["effective_rank"] for v in modules.values()),
    }
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
    return {
        "per_module": values,
        "mean": mean_of(values.values()),
        "per_kind": {k: mean_of(vs) for k, vs in by_kind.items()},
    }


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
    subspace = {"left": per_module_metric(left, kinds), "right": per_module_metric(right, kinds), "rank": ranks}
    return {
        "common": common,
        "cosine": per_module_metric(cosine, kinds),
        "subspace": subspace,
        "rel_frobenius": per_module_metric(rel, kinds),
        "unmatched": sorted(only_run + only_other),
        "unmatched_detail": {"only_in_run": only_run, "only_in_against": only_other},
    }


def choose_module(wanted: str | None, candidates: list[str]) -> str | None:
    """--module: an exact name, or a substring naming exactly one module; default the first."""
    if not candidates:
        if wanted is not None:
            raise LrftError(
                f"--module: {wanted!r}: the two runs adapt no module in common, so there is nothing to compare"
            )
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
