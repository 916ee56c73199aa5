"""`lrft sweep --report`: a table of a sweep's points (several sweeps' together), the Pareto plot of the
metric against trainable parameters, and the answer users ask for: the smallest adapter (fewest
trainable parameters) within `--tolerance` points of the best, with its `lrft train` command; as
text, JSON or a Markdown section. Everything comes from the runs (lrft.sweep.results: the run dirs
here, and what the storage recorded of runs on other machines' disks), so the report of a sweep
trained anywhere is the same; the storage also says why a trial failed.
"""

from __future__ import annotations

import io
import os
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lrft import console
from lrft.atomic_files import atomic_write_bytes
from lrft.errors import LrftError
from lrft.sweep.results import PointResult, collect
from lrft.sweep.spec import Sweep, display_path
from lrft.sweep.study import recorded

EPSILON = 1e-9  # a difference of exactly --tolerance points counts as within it, whatever the float rounding


@dataclass
class Row:
    """One point of one sweep, over the seeds it has finished."""

    sweep: str
    point: str
    settings: dict
    shown: str  # 'lr=1e-2 rank=8'
    status: str  # done (every search seed finished), pruned, failed or incomplete
    note: str
    seeds: list[int]  # the finished seeds
    values: list[float]  # the metric of each
    trainable: int | None  # the mean over seeds (talora's calibrated ranks differ a little by seed)
    trainable_range: list[int] | None
    minutes: float | None  # train time per run
    command: str  # of the first seed's run
    run_dir: str

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values) if self.values else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def point_row(sweep: Sweep, result: PointResult, failure: str | None) -> Row:
    finished, pruned = result.finished(), result.pruned()
    counts = sorted(r.trainable for r in result.runs if r.trainable is not None)
    seconds = [r.seconds for r in (finished or result.runs) if r.seconds is not None]
    if failure is not None:
        status, note = "failed", failure.split(";")[0]  # what happened; the fix is in the run's log
    elif pruned is not None:
        status, note = "pruned", f"epoch {pruned.epoch}: {fmt(pruned.value, sweep.scale)}"
    elif result.searched(sweep):
        status, note = "done", ""
    else:
        status, note = "incomplete", f"{len(result.finished(sweep.seeds))} of {len(sweep.seeds)} seeds done"
    return Row(
        sweep.name,
        result.point.name,
        result.point.settings,
        result.point.shown(sweep.labels),
        status,
        note,
        [r.seed for r in finished],
        [r.value for r in finished],
        round(statistics.mean(counts)) if counts else None,
        [counts[0], counts[-1]] if counts else None,
        statistics.mean(seconds) / 60 if seconds else None,
        sweep.command(result.point, sweep.seeds[0]),
        display_path(sweep.run_dir(result.point, sweep.seeds[0])),
    )


def sweep_rows(sweep: Sweep) -> list[Row]:
    """The sweep's points with run dirs (and failed trials without one), in the order the spec lists them."""
    failed, stored = recorded(sweep)
    results = collect(sweep, stored)
    rows = [point_row(sweep, r, failed.get(r.point.name)) for r in results]
    have = {r.point.name for r in results}
    rows += [
        Row(sweep.name, name, {}, name, "failed", why.split(";")[0], [], [], None, None, None, "", "")
        for name, why in failed.items()
        if name not in have
    ]
    order = {p.name: i for i, p in enumerate(sweep.grid_points())} if sweep.finite else {}
    return sorted(rows, key=lambda r: (order.get(r.point, len(order)), r.point))


def best_row(rows: list[Row], direction: str) -> Row | None:
    """The best metric; among equals, the fewest trainable parameters."""
    sign = -1 if direction == "max" else 1
    return min(rows, key=lambda r: (sign * r.mean, r.trainable, r.sweep, r.point), default=None)


def smallest_within(rows: list[Row], tolerance: float, direction: str, scale: float) -> Row | None:
    """The fewest trainable parameters among the rows within `tolerance` points (metric × scale) of the
    best; among equals, the better metric."""
    best = best_row(rows, direction)
    if best is None:
        return None
    close = [r for r in rows if abs(r.mean - best.mean) * scale <= tolerance + EPSILON]
    sign = -1 if direction == "max" else 1
    return min(close, key=lambda r: (r.trainable, sign * r.mean, r.sweep, r.point))


def pareto_front(rows: list[Row], direction: str) -> list[Row]:
    """The rows no other row beats with as few trainable parameters or fewer, by trainable parameters."""
    sign = -1 if direction == "max" else 1
    front: list[Row] = []
    for row in sorted(rows, key=lambda r: (r.trainable, sign * r.mean)):
        if not front or sign * row.mean < sign * front[-1].mean:
            front.append(row)
    return front


def build(sweeps: list[Sweep], tolerance: float, plot: Path | None = None) -> dict:
    """The report of these sweeps (one task and metric: lrft.sweep.load_sweeps), with the Pareto plot
    written to `plot` (default: pareto.png in the sweep dir, or in the sweep dirs' common parent)."""
    first = sweeps[0]
    rows = [row for sweep in sweeps for row in sweep_rows(sweep)]
    done = [r for r in rows if r.status == "done"]
    best, smallest = best_row(done, first.direction), smallest_within(done, tolerance, first.direction, first.scale)
    plot = plot or Path(os.path.commonpath([s.dir.resolve() for s in sweeps])) / "pareto.png"
    if plot.is_dir():
        raise LrftError(f"--plot: {plot} is a directory; give a file, e.g. --plot {plot / 'pareto.png'}")
    report = {
        "task": first.task.name,
        "metric": first.metric,
        "direction": first.direction,
        "scale": first.scale,
        "tolerance": tolerance,
        "sweeps": [{"name": s.name, "spec": display_path(s.path), "dir": display_path(s.dir)} for s in sweeps],
        "rows": [as_json(r) for r in rows],
        "best": as_json(best),
        "smallest": as_json(smallest),
        "front": [(r.sweep, r.point) for r in pareto_front(done, first.direction)],
        "plot": None,
    }
    if done:
        atomic_write_bytes(plot, pareto_png(done, best, smallest, report))
        report["plot"] = display_path(plot)
    return report


def as_json(row: Row | None) -> dict | None:
    return None if row is None else {**asdict(row), "mean": row.mean, "sd": row.sd}


# ---------------------------------------------------------------------------------------- rendering


def fmt(value: float | None, scale: float) -> str:
    if value is None:
        return "—"
    return f"{value * scale:.1f}" if scale != 1.0 else f"{value:.4f}"


def mean_sd(row: dict, scale: float) -> str:
    if row["mean"] is None:
        return "—"
    return fmt(row["mean"], scale) + ("" if row["sd"] is None else f" ± {fmt(row['sd'], scale)}")


def trainable(row: dict) -> str:
    low, high = row["trainable_range"] or (None, None)
    return "—" if low is None else f"{low:,}" + (f"–{high:,}" if high != low else "")


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    several = len(report["sweeps"]) > 1
    head = ["sweep"] * several + ["settings", "trainable", report["metric"], "seeds", "status", "min/run"]
    body = [
        [r["sweep"]] * several
        + [
            r["shown"],
            trainable(r),
            mean_sd(r, report["scale"]),
            ", ".join(map(str, r["seeds"])) or "—",
            r["status"] + (f" ({r['note']})" if r["note"] else ""),
            "—" if r["minutes"] is None else f"{r['minutes']:.1f}",
        ]
        for r in report["rows"]
    ]
    return head, body


def answer(report: dict, code: str = "") -> list[str]:
    """The best point and the smallest adapter within the tolerance of it, with its command."""
    best, small, scale = report["best"], report["smallest"], report["scale"]
    if best is None:
        return ["no point has finished every seed yet: nothing to compare"]
    tolerance = report["tolerance"]
    within = (f"{tolerance:g} point{'s' * (tolerance != 1)}" if scale != 1.0 else f"{tolerance:g}") + " of the best"

    def where(row: dict) -> str:
        return f"{row['shown']} ({row['sweep']})" if len(report["sweeps"]) > 1 else row["shown"]

    return [
        f"best: {report['metric']} {mean_sd(best, scale)} with {where(best)}, {trainable(best)} trainable parameters",
        f"smallest adapter within {within}: {where(small)}, {trainable(small)} "
        f"trainable parameters, {report['metric']} {mean_sd(small, scale)} over seeds "
        f"{', '.join(map(str, small['seeds']))}",
        f"  {code}{small['command']}{code}",
        f"  its run dir: {small['run_dir']}",
    ]


def print_report(report: dict, specs: list[Path], *, markdown: bool = False, json_out: bool = False) -> None:
    """`lrft sweep`'s result on stdout: JSON, a Markdown section (for docs/RESULTS.md) or the text table."""
    if json_out:
        console.emit_json(report)
    else:
        sys.stdout.write(render_markdown(report, [str(s) for s in specs]) if markdown else render_text(report))


def render_text(report: dict) -> str:
    head, body = table(report)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    lines += ["", *answer(report)]
    if report["plot"]:
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines) + "\n"


def render_markdown(report: dict, specs: list[str], plot_link: str | None = None) -> str:
    """A section for docs (RESULTS.md): what was swept, the table, the answer, the plot (linked as
    `plot_link`, default its path from here)."""
    head, body = table(report)
    names = ", ".join(s["name"] for s in report["sweeps"])
    spec_files = ", ".join(f"`{s['spec']}`" for s in report["sweeps"])
    lines = [
        f"### Sweep {names}: {report['metric']} on {report['task']}",
        "",
        f"<!-- generated by `lrft sweep {shlex.join(specs)} --report --markdown`; do not edit -->",
        "",
        f"Every row is a point of the sweep spec(s) {spec_files}; "
        f"{report['metric']} at the end of training, mean ± sample standard deviation over the seeds listed; "
        "a pruned point stopped at the epoch shown. Rerun with `lrft sweep SPEC` (it resumes), print every "
        "run's command with `--plan`.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---:" if h in ("trainable", "min/run", report["metric"]) else "---" for h in head) + " |",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    best, small = answer(report, code="`")[:2], answer(report, code="`")[2:3]
    lines += ["", *(f"- {line}" for line in best), *small]
    if report["plot"]:
        lines += ["", f"![{report['metric']} against trainable parameters]({plot_link or report['plot']})"]
    return "\n".join(lines) + "\n"


def pareto_png(rows: list[Row], best: Row, smallest: Row, report: dict) -> bytes:
    """Metric (mean ± sd over seeds) against trainable parameters (log), a colour per sweep, the Pareto
    front as a step line, the tolerance below the best dotted, the smallest adapter within it ringed."""
    from matplotlib.figure import Figure

    scale = report["scale"]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for sweep in dict.fromkeys(r.sweep for r in rows):
        mine = [r for r in rows if r.sweep == sweep]
        ax.errorbar(
            [r.trainable for r in mine],
            [r.mean * scale for r in mine],
            yerr=[(r.sd or 0.0) * scale for r in mine],
            fmt="o",
            capsize=3,
            label=sweep,
        )
    front = pareto_front(rows, report["direction"])
    ax.step(
        [r.trainable for r in front],
        [r.mean * scale for r in front],
        where="post",
        color="0.5",
        linestyle="--",
        linewidth=1,
        label="Pareto front",
    )
    sign = -1 if report["direction"] == "max" else 1
    ax.axhline(
        best.mean * scale + sign * report["tolerance"],
        color="0.5",
        linestyle=":",
        linewidth=1,
        label=f"best {'−' if sign < 0 else '+'} {report['tolerance']:g}",
    )
    ax.scatter(
        [smallest.trainable],
        [smallest.mean * scale],
        s=220,
        facecolors="none",
        edgecolors="red",
        linewidths=1.5,
        label=f"smallest within: {smallest.shown}",
    )
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (log)")
    ax.set_ylabel(report["metric"] + (" (%)" if scale != 1.0 else ""))
    ax.set_title(f"{report['task']}: {report['metric']} against trainable parameters", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
