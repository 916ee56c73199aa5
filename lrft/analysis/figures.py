"""The figures of `lrft analyze`, drawn with matplotlib's object API (`Figure`, no pyplot), so importing
lrft never changes a notebook's backend or global state. Each figure is saved as PNG with a caption."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.patheffects
import numpy as np
from matplotlib.figure import Figure

from lrft import console
from lrft.analysis.extract import ModuleUpdate, RunData
from lrft.analysis.numeric import block_mean_abs, difference_stats, nonzero_eigenvalues, strided_indices, update_entries

HEATMAP_MAX_SIDE = 512  # an element-wise heatmap draws at most this many rows and columns
HEATMAP_BLOCKS = 48  # the |ΔW| map averages over at most this many blocks a side
STAT_KEYS = ("alpha", "B_norm", "delta_norm")  # adapter_stats.jsonl fields plotted over epochs
STAT_TITLES = {"alpha": "scale α", "B_norm": "‖B‖_F", "delta_norm": "‖ΔW‖_F"}


@dataclass
class Plot:
    """A figure saved in the analysis dir: its file name and caption."""

    file: str
    caption: str


class Grid:
    """Modules placed on a (layer block × kind) grid, rows and columns in model order."""

    def __init__(self, modules: dict[str, ModuleUpdate]):
        self.place = {n: (row_of(n), m.kind) for n, m in modules.items()}
        self.rows = list(dict.fromkeys(r for r, _ in self.place.values()))
        self.cols = list(dict.fromkeys(c for _, c in self.place.values()))
        stem = common_stem(self.rows)
        self.row_labels = [r[len(stem) :] or r for r in self.rows]

    def matrix(self, values: dict[str, float | None]) -> np.ndarray:
        out = np.full((len(self.rows), len(self.cols)), np.nan)
        for n, v in values.items():
            if n in self.place and v is not None:
                r, c = self.place[n]
                out[self.rows.index(r), self.cols.index(c)] = v
        return out

    def label(self, name: str) -> str:
        """'L3 query' (or the layer block's own name where it is not a number)."""
        r, c = self.place[name]
        row = self.row_labels[self.rows.index(r)]
        return f"{'L' if row.isdigit() else ''}{row} {c}"


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


def subplots(*args, figsize, layout: str | None = None, **kwargs):
    """A new figure and its axes, as pyplot.subplots returns them, without pyplot's global state
    (`layout="constrained"` for figures with a colour bar shared by several axes)."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*args, **kwargs)


def save(fig, out_dir: Path, file: str, caption: str, figures: list[Plot]) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(out_dir / file, dpi=100, bbox_inches="tight")  # long rotated module names: never clipped
    figures.append(Plot(file, caption))


def module_colours(n: int) -> list:
    """n different colours: tab20's up to 20 modules, else evenly spaced on turbo."""
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](x) for x in np.linspace(0.02, 0.98, n)]


def titled(fig, run: RunData, what: str) -> None:
    """A per-run figure names its run (the against_ figures are the other run's)."""
    fig.suptitle(f"{run.label} ({run.method}): {what}", fontsize=11)


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
                ax.text(
                    j,
                    i,
                    f"{v:.3g}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="k",
                    path_effects=[matplotlib.patheffects.withStroke(linewidth=2, foreground="w")],
                )
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def layer_lines(ax, grid: Grid, series: dict[str, dict], ylabel: str) -> None:
    """One line per (series, kind) over the layer rows."""
    for (label, values), style in zip(series.items(), ("-o", "--s", ":^")):
        mat = grid.matrix(values)
        for j, kind in enumerate(grid.cols):
            if np.isfinite(mat[:, j]).any():
                ax.plot(
                    range(len(grid.rows)),
                    mat[:, j],
                    style,
                    ms=3,
                    label=f"{kind} ({label})" if len(series) > 1 else kind,
                )
    step = max(1, len(grid.rows) // 16)
    ax.set_xticks(range(0, len(grid.rows), step), grid.row_labels[::step], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def fig_layer_metric(
    out_dir, figures, grid, series: dict[str, dict], file, title, caption, runs: str | None = None, **heat
) -> None:
    """Heatmap (layer × module kind) of the first series and per-layer lines of all series; `runs` names
    the runs compared above the panels."""
    fig, (ax_heat, ax_line) = subplots(1, 2, figsize=(12, max(3.5, 0.22 * len(grid.rows) + 1.5)))
    first = next(iter(series))
    heatmap(ax_heat, grid, series[first], f"{title}, {first}" if len(series) > 1 else title, **heat)
    layer_lines(ax_line, grid, series, title)
    if runs:
        fig.suptitle(runs, fontsize=11)
    save(fig, out_dir, file, caption, figures)


def series_of(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a number under `key`."""
    kept = [r for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [r["step"] for r in kept], [float(r[key]) for r in kept]


def eval_keys(evals: list[dict]) -> list[str]:
    return sorted(
        {k for r in evals for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        - {"step", "epoch"}
    )


def fig_loss(out_dir, figures, runs: list[RunData]) -> None:
    fig, (ax_loss, ax_metric) = subplots(1, 2, figsize=(12, 4))
    for run, color in zip(runs, ("tab:blue", "tab:orange")):
        steps, losses = series_of([r for r in run.metrics if r.get("type") == "train"], "loss")
        if steps:
            ax_loss.plot(steps, losses, color=color, alpha=0.6, label=f"train ({run.label})")
        evals = [r for r in run.metrics if r.get("type") == "eval"]
        for key in eval_keys(evals):  # validation losses (one per eval set) left, task metrics right
            ax = ax_loss if "loss" in key else ax_metric
            ax.plot(
                *series_of(evals, key),
                "o--" if ax is ax_loss else "o-",
                ms=4,
                color=color if key == "loss" else None,
                label=f"validation {key} ({run.label})",
            )
    if not ax_loss.get_legend_handles_labels()[0] and not ax_metric.get_legend_handles_labels()[0]:
        return  # a run without metrics.jsonl: no figure rather than empty axes
    ax_loss.set(xlabel="step", ylabel="loss", title="training and validation loss")
    ax_metric.set(xlabel="step", title="validation metrics")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save(
        fig,
        out_dir,
        "loss.png",
        "Training loss per logged step and validation loss and metrics per evaluation "
        "(metrics.jsonl), for " + " and ".join(r.label for r in runs) + ".",
        figures,
    )


def fig_singular_values(out_dir, figures, runs: list[RunData], grid: Grid) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    fig, axes = subplots(1, len(grid.cols), squeeze=False, figsize=(5 * len(grid.cols) + 1.5, 4), layout="constrained")
    cmap, styles = matplotlib.colormaps["viridis"], ("-", "--")
    norm = Normalize(0, max(1, len(grid.rows) - 1))
    for j, kind in enumerate(grid.cols):
        ax = axes[0, j]
        for run, style in zip(runs, styles):
            for name, m in run.modules.items():
                if m.kind != kind or name not in grid.place:
                    continue
                s = run.svds[name].s
                if s.size and s[0] > 0:
                    shade = cmap(norm(grid.rows.index(grid.place[name][0])))
                    ax.semilogy(
                        np.arange(1, s.size + 1), np.maximum(s, s[0] * 1e-12), style, color=shade, lw=1, marker="."
                    )
        ax.set(xlabel="index k", ylabel="σ_k", title=f"singular values of ΔW: {kind}")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0, 0].legend(
            [Line2D([], [], color="k", ls=style) for style in styles], [r.label for r in runs], fontsize=8
        )
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[0]), fraction=0.03, pad=0.01)
    step = max(1, len(grid.rows) // 12)
    bar.set_ticks(range(0, len(grid.rows), step), labels=grid.row_labels[::step], fontsize=7)
    bar.set_label("layer")
    styles_note = f" (solid: {runs[0].label}, dashed: {runs[1].label})" if len(runs) > 1 else ""
    save(
        fig,
        out_dir,
        "singular_values.png",
        "Singular values σ_k of each update ΔW, one line per layer "
        "(colour: the layer, on the colour bar), one panel per module kind" + styles_note + ".",
        figures,
    )


def fig_eigenvalues(out_dir, figures, runs: list[RunData]) -> None:
    eigs = {}
    for run in runs:
        vals = [nonzero_eigenvalues(m.lora_A, m.lora_B) for m in run.modules.values() if m.shape[0] == m.shape[1]]
        if vals:
            eigs[run.label] = np.concatenate(vals)
    if not eigs:
        return
    fig, (ax_c, ax_re, ax_abs) = subplots(1, 3, figsize=(15, 4))
    bins = np.histogram_bin_edges(np.concatenate([ev.real for ev in eigs.values()]), bins=40)  # shared by both runs
    for (label, ev), color in zip(eigs.items(), ("tab:blue", "tab:orange")):
        ax_c.scatter(ev.real, ev.imag, s=8, alpha=0.6, color=color, label=label)
        ax_re.hist(ev.real, bins=bins, alpha=0.5, color=color, label=label)
        for part, style in ((ev.real[ev.real > 0], "-"), (-ev.real[ev.real < 0], "--")):
            if part.size:
                ax_abs.semilogy(
                    np.sort(part)[::-1], style, color=color, label=f"{label}: Re λ {'> 0' if style == '-' else '< 0'}"
                )
    ax_c.set(xlabel="Re λ", ylabel="Im λ", title="eigenvalues of ΔW (complex plane)")
    ax_re.set(xlabel="Re λ", ylabel="count", title="real parts")
    ax_abs.set(xlabel="rank", ylabel="|Re λ|", title="|Re λ| of positive and negative real parts")
    for ax in (ax_c, ax_re, ax_abs):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(
        fig,
        out_dir,
        "eigenvalues.png",
        "Eigenvalues λ of the square updates ΔW over all selected modules "
        "(the r possibly nonzero ones, from the r×r matrix A·B): complex plane, histogram of real parts, and "
        "sorted |Re λ| of eigenvalues with positive and negative real part on a log scale.",
        figures,
    )


def fig_histograms(out_dir, figures, run: RunData, prefix: str) -> None:
    hists = run.histograms
    if not hists:
        return
    cols = min(4, len(hists))
    rows = math.ceil(len(hists) / cols)
    fig, axes = subplots(rows, cols, squeeze=False, figsize=(4 * cols, 3 * rows))
    for ax, (name, h) in zip(axes.flat, hists.items()):
        ax.stairs(h.counts, h.edges, fill=True, alpha=0.7)
        ax.set_yscale("log")
        ax.set(title=f"{name} ({h.total:,} values)", xlabel="value", ylabel="count")
    for ax in list(axes.flat)[len(hists) :]:
        ax.axis("off")
    titled(fig, run, "weight histograms")
    save(
        fig,
        out_dir,
        f"{prefix}histograms.png",
        f"{run.label}: histograms (log counts) of the frozen base "
        f"weights W0 of the adapted modules and of each adapter tensor ({run.method}), pooled over modules.",
        figures,
    )


def fig_factor_norms(out_dir, figures, run: RunData, grid: Grid, prefix: str) -> None:
    names = list(dict.fromkeys(k for m in run.modules.values() for k in m.tensor_norms))
    panels = [("‖ΔW‖_F", {n: float(np.sqrt(np.sum(run.svds[n].s ** 2))) for n in run.modules})]
    panels += [(f"‖{t}‖_F", {n: m.tensor_norms.get(t) for n, m in run.modules.items()}) for t in names]
    fig, axes = subplots(
        1, len(panels), figsize=(4.2 * len(panels), max(3.5, 0.22 * len(grid.rows) + 1.5)), squeeze=False
    )
    for ax, (title, values) in zip(axes[0], panels):
        heatmap(ax, grid, values, title)
    extra = "" if names else " (its factors are shared by all modules: see the histograms)"
    titled(fig, run, "norms of the update and of the adapter tensors")
    save(
        fig,
        out_dir,
        f"{prefix}factor_norms.png",
        f"{run.label}: Frobenius norm of the update ΔW and of each "
        f"adapter tensor per layer (rows) and module (columns){extra}.",
        figures,
    )


def fig_effective_rank(out_dir, figures, runs: list[RunData], grid: Grid, numbers: list[dict]) -> None:
    series = {run.label: {n: v["effective_rank"] for n, v in num["modules"].items()} for run, num in zip(runs, numbers)}
    fig_layer_metric(
        out_dir,
        figures,
        grid,
        series,
        "effective_rank.png",
        "effective rank of ΔW",
        "Effective rank exp(H(σ/Σσ)) of each update per layer and module: heatmap for "
        f"{runs[0].label}, lines per module kind for " + " and ".join(series) + ".",
    )


def stats_table(records: list[dict], key: str) -> tuple[list[str], list[int], np.ndarray]:
    """(modules, steps, matrix modules × steps) of one adapter_stats key; the last record of a step wins."""
    steps = sorted({r["step"] for r in records if key in r})
    modules = list(dict.fromkeys(r["module"] for r in records if key in r))
    mat = np.full((len(modules), len(steps)), np.nan)
    for r in records:
        if key in r:
            mat[modules.index(r["module"]), steps.index(r["step"])] = r[key]
    return modules, steps, mat


def fig_adapter_stats(out_dir, figures, run: RunData, grid: Grid, prefix: str) -> None:
    keys = [k for k in STAT_KEYS if any(k in r for r in run.adapter_stats)]
    if not keys:
        return
    fig, axes = subplots(2, len(keys), squeeze=False, figsize=(5.5 * len(keys) + 2, 8), layout="constrained")
    markers = dict(zip(grid.cols, "os^vD<>ph*"))
    for j, key in enumerate(keys):
        modules, steps, mat = stats_table(run.adapter_stats, key)
        labels = [grid.label(m) if m in grid.place else m for m in modules]
        for i, (label, colour) in enumerate(zip(labels, module_colours(len(labels)))):
            kind = grid.place[modules[i]][1] if modules[i] in grid.place else None
            axes[0, j].plot(steps, mat[i], "-", marker=markers.get(kind, "o"), ms=3, lw=1, color=colour, label=label)
        axes[0, j].set(xlabel="step", title=f"{STAT_TITLES[key]} per module")
        axes[0, j].grid(alpha=0.3)
        im = axes[1, j].imshow(mat, aspect="auto", interpolation="nearest", cmap="magma")
        ticks = range(0, len(steps), max(1, len(steps) // 12))
        axes[1, j].set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        step = max(1, len(labels) // 24)
        axes[1, j].set_yticks(range(0, len(labels), step), labels[::step], fontsize=7)
        axes[1, j].set(xlabel="step", title=f"{STAT_TITLES[key]}: module × step")
        fig.colorbar(im, ax=axes[1, j], fraction=0.046)
    if len(modules) <= 24:
        axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(modules) // 13)
    what = ", ".join(STAT_TITLES[k] for k in keys)
    titled(fig, run, f"{what} during training")
    save(
        fig,
        out_dir,
        f"{prefix}adapter_stats.png",
        f"{run.label}: {what} of every module during training "
        f"(adapter_stats.jsonl: step 0 is the initial adapter, then every train.log_every steps and each epoch's "
        f"end), as curves (a colour per module, a marker per module kind) and as a heatmap.",
        figures,
    )


def fig_calibration(out_dir, figures, run: RunData, grid: Grid, prefix: str) -> None:
    plan = run.calibration
    if not plan:
        return
    names = [n for n in run.modules if n in plan]
    panels = [
        (k, t)
        for k, t in (
            ("importance", "importance S_i"),
            ("rank", "rank r_i"),
            ("alpha", "α_i"),
            ("scale", "scale s_i = α_i / r_i"),
        )
        if all(k in plan[n] for n in names)
    ]
    if not names or not panels:
        return
    fig, axes = subplots(
        len(panels), 1, figsize=(max(6, 0.3 * len(names) + 2), 2.3 * len(panels)), sharex=True, squeeze=False
    )
    for ax, (key, title) in zip(axes[:, 0], panels):
        ax.bar(range(len(names)), [plan[n][key] for n in names], color="tab:blue")
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xticks(range(len(names)), [grid.label(n) for n in names], rotation=90, fontsize=7)
    titled(fig, run, "calibration")
    save(
        fig,
        out_dir,
        f"{prefix}calibration.png",
        f"{run.label}: calibration importance S_i and the rank r_i, "
        f"α_i and update scale s_i it allocated to each module (adapter config / calibration.json).",
        figures,
    )


def fig_update_heatmap(out_dir, figures, runs: list[RunData], module: str) -> dict:
    """One module's update, two ways: its entries with rows and columns ordered by the update's own top
    singular vectors u₁, v₁ (a low-rank update then shows its structure instead of looking like noise;
    strided when large), and mean |ΔW| over blocks in the model's own order (where the update is
    large). With two runs also their difference, ordered by the first run's vectors."""
    mods = [run.modules[module] for run in runs]
    out_f, in_f = mods[0].shape
    panels = [
        (f"ΔW {run.label}", run, lambda r, c, m=m: update_entries(m.lora_A, m.lora_B, r, c))
        for run, m in zip(runs, mods)
    ]
    info = {"module": module}
    if len(runs) == 2:
        first, second = panels[0][2], panels[1][2]
        panels.append((f"ΔW {runs[0].label} − ΔW {runs[1].label}", runs[0], lambda r, c: first(r, c) - second(r, c)))
        info.update(difference_stats(mods[0].lora_A, mods[0].lora_B, mods[1].lora_A, mods[1].lora_B))
    fig, axes = subplots(2, len(panels), squeeze=False, figsize=(5.2 * len(panels) + 0.5, 9), layout="constrained")
    for j, (title, by, entries) in enumerate(panels):
        rows, cols = ordered_indices(by.svds[module], out_f, in_f)
        ordered = entries(rows, cols)
        bound = float(np.max(np.abs(ordered))) or 1.0
        im = axes[0, j].imshow(ordered, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest", aspect="auto")
        axes[0, j].set(
            title=f"{title}\nordered by u₁ and v₁ of ΔW {by.label}",
            xticks=[],
            yticks=[],
            xlabel="input features, by v₁",
            ylabel="output features, by u₁",
        )
        fig.colorbar(im, ax=axes[0, j], fraction=0.046)
        im = axes[1, j].imshow(
            block_mean_abs(entries, out_f, in_f, HEATMAP_BLOCKS),
            cmap="magma",
            aspect="auto",
            interpolation="nearest",
            extent=(0, in_f, out_f, 0),
        )
        axes[1, j].set(title=f"mean |{title}| per block", xlabel="input feature", ylabel="output feature")
        fig.colorbar(im, ax=axes[1, j], fraction=0.046)
    sampled = (
        "" if max(out_f, in_f) <= HEATMAP_MAX_SIDE else f"; at most {HEATMAP_MAX_SIDE} rows and columns, evenly sampled"
    )
    what = ", and the element-wise difference of the two updates" if len(runs) == 2 else ""
    save(
        fig,
        out_dir,
        "update_heatmap.png",
        f"Update ΔW of {module} ({out_f}×{in_f}) per run{what}. Top: the "
        f"entries, rows and columns ordered by the update's top left and right singular vectors (the "
        f"difference's by the first run's), on a symmetric colour scale: a rank-r update is a sum of r such "
        f"patterns, the first one smooth in this order{sampled}. Bottom: mean |entry| over blocks of at most "
        f"{HEATMAP_BLOCKS}×{HEATMAP_BLOCKS}, in the model's feature order: where the update is large.",
        figures,
    )
    return info


def ordered_indices(svd, out_f: int, in_f: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns to draw (strided when large), ordered by the top singular vectors u₁ and v₁."""
    rows, cols = strided_indices(out_f, HEATMAP_MAX_SIDE), strided_indices(in_f, HEATMAP_MAX_SIDE)
    if svd.s.size and svd.s[0] > 0:
        rows, cols = rows[np.argsort(svd.U[rows, 0], kind="stable")], cols[np.argsort(svd.V[cols, 0], kind="stable")]
    return rows, cols


def write_figures(
    out_dir: Path, runs: list[RunData], numbers: list[dict], result: dict, chosen: str | None
) -> tuple[list[Plot], dict | None]:
    figures: list[Plot] = []
    all_modules = {**(runs[1].modules if len(runs) > 1 else {}), **runs[0].modules}
    grid = Grid(all_modules)
    steps = [
        lambda: fig_loss(out_dir, figures, runs),
        lambda: fig_singular_values(out_dir, figures, runs, grid),
        lambda: fig_eigenvalues(out_dir, figures, runs),
        lambda: fig_effective_rank(out_dir, figures, runs, grid, numbers),
    ]
    for run, prefix in zip(runs, ("", "against_")):
        steps += [
            lambda r=run, p=prefix: fig_histograms(out_dir, figures, r, p),
            lambda r=run, p=prefix: fig_factor_norms(out_dir, figures, r, grid, p),
            lambda r=run, p=prefix: fig_adapter_stats(out_dir, figures, r, grid, p),
            lambda r=run, p=prefix: fig_calibration(out_dir, figures, r, grid, p),
        ]
    if len(runs) == 2 and result["cosine"]["per_module"]:
        steps.append(lambda: fig_comparisons(out_dir, figures, runs, grid, result))
    heat: list[dict] = []
    if chosen:
        steps.append(lambda: heat.append(fig_update_heatmap(out_dir, figures, runs, chosen)))
    for draw in console.track(steps, "figures", "figures"):
        draw()
    return figures, heat[0] if heat else None


def fig_comparisons(out_dir, figures, runs: list[RunData], grid: Grid, result: dict) -> None:
    """Cosine similarity, subspace similarity and relative distance of the two runs' updates per module."""
    a, b = runs[0].label, runs[1].label
    named = f"{a} ({runs[0].method}) vs {b} ({runs[1].method})"
    fig_layer_metric(
        out_dir,
        figures,
        grid,
        {"cosine": result["cosine"]["per_module"]},
        "cosine.png",
        "cosine similarity",
        f"Cosine similarity of the flattened updates ΔW of {a} and {b} per "
        "layer and module (1: same direction, 0: orthogonal, −1: opposite).",
        runs=named,
        cmap="RdBu_r",
        vmin=-1,
        vmax=1,
    )
    fig_layer_metric(
        out_dir,
        figures,
        grid,
        {"left (U)": result["subspace"]["left"]["per_module"], "right (V)": result["subspace"]["right"]["per_module"]},
        "subspace.png",
        "subspace similarity φ",
        f"Subspace similarity φ = ‖U₁ᵀU₂‖²_F / r of the top-r singular vectors of the updates of "
        f"{a} and {b}: heatmap of the left (output-side) φ, lines of left and right φ per layer.",
        runs=named,
        vmin=0,
        vmax=1,
    )
    fig_layer_metric(
        out_dir,
        figures,
        grid,
        {"relative distance": result["rel_frobenius"]["per_module"]},
        "rel_frobenius.png",
        "‖ΔW₁−ΔW₂‖_F / ‖ΔW₂‖_F",
        f"Relative Frobenius distance ‖ΔW({a}) − ΔW({b})‖_F / ‖ΔW({b})‖_F per layer and module.",
        runs=named,
    )
