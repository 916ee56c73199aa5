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

The run is loaded once (`lrft.open_runs.load_run`), its low-rank factors and statistics are extracted, and
the model is released before the second run is loaded, so two 7B-sized runs never sit in memory
together. Layout: `numeric` (pure functions on factors) → `extract` (from run dirs) → `numbers` (the
analysis dict) → `figures` (matplotlib's object API) → `report` (HTML with embedded figures,
Markdown) → `analyze()` here.
"""

from __future__ import annotations

import json
from pathlib import Path

from lrft import __version__, console
from lrft.analysis.extract import check_same_base, name_filter, read_run, select_targets
from lrft.analysis.figures import write_figures
from lrft.analysis.numbers import choose_module, compare_numbers, run_numbers
from lrft.analysis.report import ANALYSIS_FILE, render_html, render_markdown
from lrft.atomic_files import atomic_dir, check_writable
from lrft.errors import LrftError
from lrft.guard import check_output
from lrft.open_runs import trained_adapter_config
from lrft.run_layout import RunDir
from lrft.run_lock import writer_lock

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
        raise LrftError(
            f"--out: {out} exists and is not an lrft analysis dir (no {ANALYSIS_FILE}); it would be "
            f"replaced whole, so give a new or empty dir"
        )


def label_for(path: Path, other: Path | None) -> str:
    name = Path(path).resolve().name
    return name if other is None or Path(other).resolve().name != name else str(path)


def analyze(
    run_dir: Path,
    against: Path | None = None,
    out: Path | None = None,
    module: str | None = None,
    modules: str | None = None,
) -> dict:
    """Analyse a run (and compare it with `against`); write figures, analysis.json and the reports to `out`,
    by default the run's analysis/ (comparisons/<against's name>/ with `against`: a comparison never
    replaces the run's own analysis)."""
    run_dir, against = Path(run_dir), Path(against) if against is not None else None
    out = checked_out(run_dir, against, out)
    # Every argument is checked against the adapter configs before a model is loaded.
    config = trained_adapter_config(run_dir)
    other_config = trained_adapter_config(against) if against is not None else None
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
            console.warn(
                f"{len(cmp['unmatched'])} modules are adapted by only one run and not compared: "
                + ", ".join(cmp["unmatched"][:4])
                + (" ..." if len(cmp["unmatched"]) > 4 else "")
            )
    result["out"] = str(out)
    written = run_dir if out.resolve().is_relative_to(run_dir.resolve()) else out  # not while `lrft train` writes it
    with writer_lock(written), atomic_dir(out, flag="--out") as tmp:
        figures, heat = write_figures(tmp, runs, numbers, result, chosen)
        if heat:
            result["element_difference" if against is not None else "update_heatmap"] = heat
        result["figures"] = [{"file": f.file, "caption": f.caption} for f in figures]
        (tmp / ANALYSIS_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(render_html(result, figures, tmp), encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(result, figures), encoding="utf-8")
    console.log(f"analysis written to {out} ({len(figures)} figures, report.html, report.md, {ANALYSIS_FILE})")
    return result


def checked_out(run_dir: Path, against: Path | None, out: Path | None) -> Path:
    """Where the analysis goes (`out`, else the run's analysis/ or comparisons/<against's name>/), checked
    to replace nothing it must not and to be writable."""
    own = RunDir(run_dir).analysis if against is None else RunDir(run_dir).comparison(against)
    out = Path(out) if out is not None else own
    sources = {run_dir: "the run dir this command reads"}
    if against is not None:
        sources[against] = "the run dir --against names"
    check_output(out, "--out", sources=sources, own=[own])
    check_out_dir(out)
    check_writable(out, "--out")
    return out


def report_lines(result: dict) -> list[str]:
    """`lrft analyze`'s lines on stdout: the report, a line per module, the comparison's means."""
    lines = [f"report\t{Path(result['out']) / 'report.html'}"]
    for name, m in result["run"]["modules"].items():
        lines.append(f"{name}\t‖ΔW‖_F {m['fro_norm']:.4g}\teffective rank {m['effective_rank']:.3g}")
    if "against" in result:
        for key, value in (
            ("cosine", result["cosine"]["mean"]),
            ("subspace φ left", result["subspace"]["left"]["mean"]),
            ("subspace φ right", result["subspace"]["right"]["mean"]),
            ("relative Frobenius distance", result["rel_frobenius"]["mean"]),
        ):
            lines.append(f"mean {key}\t{'—' if value is None else f'{value:.4f}'}")
    return lines
