"""The results table: which runs it needs, running them, and docs/RESULTS.md generated from their run dirs.

    python bench/results.py plan                      # every row's `lrft train` command
    LRFT_DATA_DIR=../shared/data python bench/results.py run [--only mrpc] [--seeds 42]   # finished runs are skipped
    python bench/results.py report                    # docs/RESULTS.md + docs/results_params_accuracy.png
    python bench/results.py update [--section NAME]   # only the sections below, in the RESULTS.md there is

The report also renders results/bench/*.json (bench/speed.py --json) and results/serving_parity.jsonl
(bench/serving_parity.py's output) when they exist, and these sections, each between its own markers
(`update` rewrites just them, leaving the rest of RESULTS.md as it is):
- tuned: the `lrft sweep` reports of sweeps/*.yaml whose run dirs exist under results/sweeps;
- e2e: whole jobs against HF Trainer + PEFT (`python bench/e2e.py --json > results/e2e.json`);
- memory: the memory levers (`python bench/memory.py --json > results/memory.json`);
- heads: the task head's defaults before and after issue 27 (run dirs under results/heads);
- preference: DPO runs on the HH pairs (run dirs under results/runs) and `bench/dpo.py --json > results/dpo.json`;
- precision: MRPC at fp32 and at train.precision auto, every method, three seeds (`run --only 1ep_`).

Every number in RESULTS.md comes from a run dir's summary.json, metrics.jsonl and recipe.yaml (or a
bench/speed.py JSON), never from hand edits; each row lists the command that regenerates it.
Observations that need judgement live in docs/results_notes.md, which the report includes as is.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = Path("results/runs")  # relative to the repository root; not committed
BENCH = Path("results/bench")
PARITY = Path("results/serving_parity.jsonl")
DOCS = ROOT / "docs"
SEEDS = (42, 1, 2)

LORA_MINILM = ["adapter.method=lora", "adapter.params={rank: 8, alpha: 16}", "train.lr=5e-4"]


@dataclass(frozen=True)
class Row:
    task: str  # glue/mrpc, glue/rte, glue/sst2, gsm8k
    method: str
    rank: int
    seed: int | str  # "N" stands for every seed in a report's command column
    recipe: str
    overrides: tuple[str, ...]
    variant: str = ""  # tells apart rows of one method with other targets/settings, e.g. "6" for six kinds

    @property
    def label(self) -> str:
        return self.method + (f" ({self.variant} kinds)" if self.variant else "")

    @property
    def name(self) -> str:
        return f"{self.task.split('/')[-1]}_{self.method}{self.variant}_r{self.rank}_s{self.seed}"

    def command(self) -> list[str]:
        return [
            "lrft",
            "train",
            self.recipe,
            *self.overrides,
            f"seed={self.seed}",
            f"name={self.name}",
            f"output.dir={RUNS}",
        ]


def plan(seeds: tuple[int, ...] = SEEDS) -> list[Row]:
    """MiniLM on MRPC, RTE, SST-2 (8,000 training sentences) for the four methods at the papers' ranks
    and rank 8; SmolLM2 on GSM8K at equal rank. Seeds beyond the first run on MRPC only."""
    rows = []
    for task in ("glue/mrpc", "glue/rte", "glue/sst2"):
        t = task.split("/")[-1]
        talora = f"recipes/glue_{t}_talora.yaml"
        configs = glue_configs(task)
        # LoRA at talora's budget: its recipe (six kinds of Linear, α/r = 1, lr, schedule), only the method differs
        same_budget = [
            ("lora", r, talora, ("adapter.method=lora", f"adapter.params={{rank: {r}, alpha: {r}}}")) for r in (8, 32)
        ]
        for seed in seeds if t == "mrpc" else seeds[:1]:
            rows += [Row(task, m, r, seed, recipe, tuple(o)) for m, r, recipe, o in configs]
            rows += [Row(task, m, r, seed, recipe, tuple(o), variant="6") for m, r, recipe, o in same_budget]
    rows += [Row("gsm8k", m, 8, seeds[0], f"recipes/gsm8k_{m}.yaml", ()) for m in ("lora", "talora", "lorta", "tlora")]
    rows += [Row("preference", m, 8, seeds[0], f"recipes/dpo_hh_{m}.yaml", ()) for m in ("lora", "lorta")]
    rows += [
        Row("commonsense", m, 8, seeds[0], f"recipes/commonsense_{m}.yaml", ()) for m in SUITE_METHODS["commonsense"]
    ]
    rows += [Row("arithmetic", m, 8, seeds[0], f"recipes/arithmetic_{m}.yaml", ()) for m in SUITE_METHODS["arithmetic"]]
    return rows + precision_rows(seeds)


def glue_configs(task: str) -> list[tuple[str, int, str, tuple[str, ...]]]:
    """(method, rank, recipe, overrides) of each MiniLM row of a GLUE task."""
    t = task.split("/")[-1]
    sub = ("data.max_train_samples=8000",) if t == "sst2" else ()
    quick = ("recipes/quickstart.yaml", (f"data.task={task}", *sub))
    talora = f"recipes/glue_{t}_talora.yaml"
    return [
        ("lora", 8, quick[0], (*quick[1], *LORA_MINILM)),
        ("tlora", 8, quick[0], (*quick[1], "train.lr=3e-2")),  # the quickstart's lr when these rows ran
        ("tlora", 32, quick[0], (*quick[1], "adapter.params.rank=32", "train.lr=1e-2")),
        ("talora", 8, talora, ("adapter.params.rank=8", "adapter.params.alpha=8")),
        ("talora", 32, talora, ()),
        ("lorta", 4, f"recipes/glue_{t}_lorta.yaml", ("adapter.params.rank=4",)),
        ("lorta", 8, f"recipes/glue_{t}_lorta.yaml", ()),
    ]


PRECISIONS = ("fp32", "auto")


def precision_rows(seeds: tuple[int, ...]) -> list[Row]:
    """MRPC, every method at rank 8, one epoch, each seed at fp32 and at train.precision auto (bf16 on
    a CPU with AVX-512 BF16): the quality check of the auto default."""
    return [
        Row(f"mrpc_1ep_{precision}", m, r, seed, recipe, (*o, "train.epochs=1", f"train.precision={precision}"))
        for seed in seeds
        for m, r, recipe, o in glue_configs("glue/mrpc")
        if r == 8
        for precision in PRECISIONS
    ]


def run(rows: list[Row]) -> None:
    for row in rows:
        if (ROOT / RUNS / row.name / "summary.json").is_file():
            continue
        print(f"[results] {shlex.join(row.command())}", flush=True)
        done = subprocess.run(row.command(), cwd=ROOT)
        if done.returncode != 0:
            print(f"[results] {row.name} failed with exit code {done.returncode}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- report


def load(row: Row) -> dict | None:
    run = ROOT / RUNS / row.name
    if not (run / "summary.json").is_file():
        return None
    summary = json.loads((run / "summary.json").read_text())
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"type": "eval"' in l]
    return {"summary": summary, "evals": evals}


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "—"
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def glue_table(task: str, rows: list[Row]) -> tuple[list[str], list[dict]]:
    """Markdown rows and plot points of one GLUE task, one line per (method, rank) over its seeds."""
    metric = {"glue/mrpc": ("accuracy", "f1"), "glue/rte": ("accuracy",), "glue/sst2": ("accuracy",)}[task]
    lines = [
        f"| method | rank | trainable | {' | '.join(m for m in metric)} | seeds | train time (min) | command |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in metric) + " | ---: | ---: | --- |",
    ]
    points = []
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        if row.task == task:
            groups.setdefault((row.label, row.rank), []).append(row)
    for (label, rank), group in groups.items():
        done = [(r, d) for r in group if (d := load(r))]
        if not done:
            continue
        finals = [d["summary"]["final"] for _, d in done]
        values = {m: [f[m] for f in finals] for m in metric}
        minutes = statistics.mean(d["summary"]["train_seconds"] for _, d in done) / 60
        counts = sorted({d["summary"]["trainable_params"] for _, d in done})
        trainable = counts[0]  # talora's allocation follows each seed's calibration sample, so counts may differ
        shown = f"{counts[0]:,}" + (f"–{counts[-1]:,}" if len(counts) > 1 else "")
        cmd = shlex.join(replace(done[0][0], seed="N").command())  # one command for all seeds
        lines.append(
            f"| {label} | {rank} | {shown} | "
            + " | ".join(mean_std(values[m]) for m in metric)
            + f" | {', '.join(str(r.seed) for r, _ in done)} | {minutes:.1f} | `{cmd}` |"
        )
        points.append(
            {
                "task": task,
                "method": label,
                "rank": rank,
                "trainable": trainable,
                "mean": statistics.mean(values["accuracy"]),
                "std": statistics.stdev(values["accuracy"]) if len(done) > 1 else 0.0,
            }
        )
    return lines, points


def gsm8k_table(rows: list[Row]) -> list[str]:
    lines = [
        "| method | rank | trainable | exact match before | exact match after | perplexity after | train time (min) "
        "| command |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if row.task != "gsm8k" or not (d := load(row)):
            continue
        summary = d["summary"]
        before = next((e["exact_match"] for e in d["evals"] if e["step"] == 0 and "exact_match" in e), None)
        after = summary["final"]
        lines.append(
            f"| {row.method} | {row.rank} | {summary['trainable_params']:,} | "
            f"{'—' if before is None else f'{100 * before:.0f} %'} | {100 * after['exact_match']:.0f} % | "
            f"{after['perplexity']:.3f} | {summary['train_seconds'] / 60:.1f} | `{shlex.join(row.command())}` |"
        )
    return lines


def speed_tables() -> list[str]:
    out = []
    for path in sorted((ROOT / BENCH).glob("*.json")):
        b = json.loads(path.read_text())
        out += [
            f"**{b['model']}, {b['task']} batches**, rank {b['rank']}, targets {', '.join(b['targets'])}, batch "
            f"{b['batch_size']}, {b['device']} with {b['threads']} threads, {b['rounds']}×{b['steps_per_round']} "
            f"timed steps per variant (`{b.get('command', 'python bench/speed.py')}`):",
            "",
            "| variant | median s/step | tokens/s | saved for backward (MiB) | trainable | × PEFT LoRA (IQR) | "
            "× lrft lora | calibration |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in b["rows"]:
            calib = (
                f"{r['calibration_s']} s = {100 * r['calibration_fraction_of_epoch']:.2f} % of an epoch"
                if "calibration_s" in r
                else ""
            )
            iqr = "–".join(f"{x:.3f}" for x in r["ratio_to_peft_lora_iqr"])
            out.append(
                f"| {r['variant']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                f"{r['saved_for_backward_mib']:.0f} | {r['trainable']:,} | {r['ratio_to_peft_lora']:.3f} ({iqr}) | "
                f"{r['ratio_to_lrft_lora']:.3f} | {calib} |"
            )
        out.append("")
    return out


def parity_table() -> list[str]:
    path = ROOT / PARITY
    if not path.is_file():
        return ["(not measured yet)"]
    lines = [
        "| run | method | PEFT-loaded vs lrft | merged fp32 vs lrft | merged bf16 vs lrft | bf16 vs fp32 merge | "
        "modules with their own rank in PEFT's rank_pattern | other base refused |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in map(json.loads, path.read_text().splitlines()):
        lines.append(
            f"| {r['run']} | {r['method']} | {r['peft_max_abs_logit_diff']:.1e} | "
            f"{r['merged_float32_max_abs_logit_diff']:.1e} | {r['merged_bfloat16_max_abs_logit_diff']:.1e} | "
            f"{r['bf16_vs_fp32_merge']:.1e} | {r['peft_rank_pattern']} | {'yes' if r['other_base_refused'] else 'NO'} |"
        )
    return lines


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("glue/mrpc", "glue/rte", "glue/sst2") if any(p["task"] == t for p in points)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    colors = {
        "lora": "tab:blue",
        "lora (6 kinds)": "tab:purple",
        "tlora": "tab:orange",
        "talora": "tab:green",
        "lorta": "tab:red",
    }
    for ax, task in zip(axes[0], tasks):
        for p in (p for p in points if p["task"] == task):
            ax.errorbar(
                p["trainable"],
                100 * p["mean"],
                yerr=100 * p["std"],
                fmt="o",
                color=colors[p["method"]],
                capsize=3,
                label=p["method"],
            )
            ax.annotate(
                f"r{p['rank']}",
                (p["trainable"], 100 * p["mean"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable adapter parameters (log)")
        ax.set_ylabel("dev accuracy (%)")
        ax.set_title(f"MiniLM-L6, {task}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    cpu = (
        next(
            (
                l.split(":", 1)[1].strip()
                for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    # no thread count: this process renders the report, the runs it reads trained in other processes
    return f"{cpu}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, torch {importlib.metadata.version('torch')}"


def tuned_section() -> list[str]:
    """The sweeps of sweeps/*.yaml that have run (their dirs under results/sweeps), grouped by task and
    epochs as their spec names say (<task>_<method>_r<rank>_<epochs>ep), one `lrft sweep` report each,
    then the papers' claims judged on them."""
    from lrft.sweep import load_sweeps
    from lrft.sweep.report import build, render_markdown

    groups: dict[str, list[Path]] = {}
    for spec in sorted((ROOT / "sweeps").glob("*.yaml")):
        task, *_, epochs = spec.stem.split("_")
        if (ROOT / "results" / "sweeps" / spec.stem).is_dir():
            groups.setdefault(f"{task}_{epochs}", []).append(spec)
    lines, reports = [], {}
    for group, specs in sorted(groups.items()):
        cwd = os.getcwd()
        os.chdir(ROOT)  # the specs' output.dir (results/sweeps) is relative to the repository root
        try:
            plot = DOCS / f"sweep_{group}.png"
            reports[group] = build(load_sweeps([s.relative_to(ROOT) for s in specs]), tolerance=1.0, plot=plot)
            lines += [
                render_markdown(reports[group], [str(s.relative_to(ROOT)) for s in specs], plot_link=plot.name),
                "",
            ]
        finally:
            os.chdir(cwd)
    waiting = [
        spec.stem
        for spec in sorted((ROOT / "sweeps").glob("*.yaml"))
        if not (ROOT / "results" / "sweeps" / spec.stem).is_dir()
    ]
    if waiting:  # say which of the comparison's sweeps these tables do not hold yet
        lines += [
            f"Not run yet ({len(waiting)} of the {len(waiting) + sum(map(len, groups.values()))} specs in "
            f"sweeps/, each states its cost): {', '.join(waiting)}.",
            "",
        ]
    if reports:
        lines += claims_section(reports)
    return lines or ["(no sweep has run yet: `lrft sweep sweeps/mrpc_*_3ep.yaml`)", ""]


# The papers' claims, each against LoRA r8 tuned the same way: (method, the claim, the least difference
# in points it allows, the largest share of LoRA's trainable parameters it allows).
CLAIMS = (
    ("tlora", "tri-matrix TLoRA within 2 points of LoRA", -2.0, 1.0),
    ("lorta", "LoRTA within 2 points of LoRA with ≥ 10× fewer parameters", -2.0, 0.1),
    ("talora", "task-aware TLoRA ≥ LoRA with half its parameters or fewer", 0.0, 0.5),
)


def reference(rows: list[dict], sweep: str) -> dict | None:
    """A sweep's point to compare: of its finished points, the one with the most seeds (the confirmed
    best), the better mean among equals."""
    done = [r for r in rows if r["sweep"] == sweep and r["status"] == "done"]
    return max(done, key=lambda r: (len(r["values"]), r["mean"]), default=None)


def verdict(method: dict, lora: dict, least_difference: float, most_share: float, scale: float) -> tuple[str, float]:
    """Whether the claim holds for these two points, and the difference in points. The difference of
    the means must clear the claim's bound by two standard errors either way to decide; with one seed
    on a side, or closer than that, the seeds do not settle it."""
    difference = (method["mean"] - lora["mean"]) * scale
    if method["trainable"] > most_share * lora["trainable"]:
        return "does not hold: too many parameters", difference
    if len(method["values"]) < 2 or len(lora["values"]) < 2:
        return "not settled: one seed", difference
    se = scale * (method["sd"] ** 2 / len(method["values"]) + lora["sd"] ** 2 / len(lora["values"])) ** 0.5
    if difference - least_difference >= 2 * se:
        return "holds", difference
    if least_difference - difference >= 2 * se:
        return "does not hold", difference
    return f"not settled by {min(len(method['values']), len(lora['values']))} seeds (± {2 * se:.1f} points)", difference


def claims_section(reports: dict[str, dict]) -> list[str]:
    """Claim by claim, per task and training length: each method's best tuned point against LoRA r8's."""
    lines = [
        "### The papers' claims at this scale",
        "",
        "Each method at its best swept point (the one confirmed over three seeds) against LoRA r8 at "
        "its own; a claim holds or fails when the difference of the means clears its bound by two "
        "standard errors, else the seeds do not settle it. Parameters are the adapters' (heads "
        "excluded, as the papers count).",
        "",
        "| task, epochs | claim | method (sweep, point) | its accuracy | LoRA r8 | difference | "
        "parameters (× LoRA) | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for group, report in sorted(reports.items()):
        task, epochs = group.split("_")
        rows, scale = report["rows"], report["scale"]
        lora, where = reference(rows, f"{task}_lora_r8_{epochs}"), f"{task}, {epochs.removesuffix('ep')}"
        for method, claim, least, share in CLAIMS:
            swept = sorted({r["sweep"] for r in rows if r["sweep"].split("_")[1] == method})
            if not swept:
                lines.append(f"| {where} | {claim} | — | — | — | — | — | not run: no {method} sweep |")
            for sweep in swept:
                point = reference(rows, sweep)
                if point is None or lora is None:
                    missing = "LoRA r8's sweep" if lora is None else "its sweep"
                    lines.append(
                        f"| {where} | {claim} | {sweep} | — | — | — | — | "
                        f"no result yet: {missing} has no finished point |"
                    )
                    continue
                said, difference = verdict(point, lora, least, share, scale)
                lines.append(
                    f"| {where} | {claim} | {sweep}, {point['shown']} | "
                    f"{point['mean'] * scale:.1f} ± {(point['sd'] or 0) * scale:.1f} | "
                    f"{lora['mean'] * scale:.1f} ± {(lora['sd'] or 0) * scale:.1f} | {difference:+.1f} | "
                    f"{point['trainable']:,} ({point['trainable'] / lora['trainable']:.3f}) | {said} |"
                )
    return lines + [""]


def e2e_section(file: str = "e2e.json", command: str = "python bench/e2e.py --json") -> list[str]:
    """bench/e2e.py's whole jobs, lrft against HF Trainer + PEFT: wall time, peak RSS, quality, ratios."""
    path = ROOT / "results" / file
    if not path.is_file():
        return [f"(not measured yet: `{command} > results/{file}`)", ""]
    data = json.loads(path.read_text())
    lines = [
        f"`{command}`",
        "",
        "| job | precision lrft / Trainer | runs | lrft wall (s) | Trainer + PEFT wall (s) | lrft / Trainer | "
        "lrft peak RSS (MiB) | Trainer peak RSS (MiB) | lrft / Trainer | quality lrft | quality Trainer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in data["summary"]:
        q, precision = s["quality"], s.get("precision", {"lrft": "fp32", "trainer": "fp32"})
        lines.append(
            f"| {s['job']} | {precision['lrft']} / {precision['trainer']} | {s['runs']} | {s['lrft']['wall_s']:.0f} | "
            f"{s['trainer']['wall_s']:.0f} | {s['wall_ratio']:.2f} | {s['lrft']['peak_rss_mib']:,.0f} | "
            f"{s['trainer']['peak_rss_mib']:,.0f} | {s['rss_ratio']:.2f} | {q} {s['lrft'][q]:.4f} | "
            f"{q} {s['trainer'][q]:.4f} |"
        )
    lines += [
        "",
        "Where lrft's wall time went (its summary.json `seconds`, the first run of each job): "
        + "; ".join(
            f"{r['job']}: " + ", ".join(f"{phase} {sec:.0f} s" for phase, sec in r["phases_s"].items() if sec >= 0.5)
            for r in data["rows"]
            if r["side"] == "lrft" and r.get("phases_s")
        )
        + ".",
    ]
    answered = [s for s in data["summary"] if "exact_match" in s["lrft"]]
    if answered:
        lines += ["", "Exact match of the greedy answers before → after training (median of rounds):", ""]
        lines += [
            f"- {s['job']}: lrft {100 * s['lrft']['exact_match_before']:.0f} % → {100 * s['lrft']['exact_match']:.0f} %, "
            f"Trainer + PEFT {100 * s['trainer']['exact_match_before']:.0f} % → {100 * s['trainer']['exact_match']:.0f} %"
            for s in answered
        ]
    timed = [s for s in data["summary"] if "target_accuracy" in s]
    if timed:
        lines += [
            "",
            f"Time to accuracy: minutes from the command until the first dev evaluation (after each epoch) at or "
            f"above {100 * timed[0]['target_accuracy']:.1f} % accuracy, LoRA r8's 3-epoch fp32 mean (GLUE table), "
            "each round; — never reached.",
            "",
            "| job | lrft (min) | Trainer + PEFT (min) |",
            "| --- | ---: | ---: |",
        ]
        for s in timed:
            shown = {
                side: ", ".join("—" if t is None else f"{t / 60:.1f}" for t in s[side]["time_to_accuracy_s"])
                for side in ("lrft", "trainer")
            }
            lines.append(f"| {s['job']} | {shown['lrft']} | {shown['trainer']} |")
    return lines + [""]


def e2e_gsm8k_section() -> list[str]:
    """The whole GSM8K recipe at each side's defaults (lrft auto, Trainer fp32)."""
    return e2e_section("e2e_gsm8k.json", "python bench/e2e.py --job gsm8k --rounds 1 --compare defaults --json")


def e2e_precision_section() -> list[str]:
    """The whole MRPC job at each side's defaults (lrft auto, Trainer fp32) and both at bf16."""
    return e2e_section("e2e_precision.json", "python bench/e2e.py --job mrpc --rounds 1 --json")


def preference_section() -> list[str]:
    """DPO on the HH pairs: held-out rewards and log-probs before (step 0: the reference) and after, and
    bench/dpo.py's step against TRL's (results/dpo.json) when measured."""
    lines = [
        "SmolLM2-135M-Instruct, sigmoid DPO (β 0.1) on 256 training pairs of `../shared/data/preference/hh_harmless`",
        "(32 steps of 8), 128 held-out pairs, pairs cut to 256 tokens; 'before' is step 0, where the policy is its",
        "reference (rewards 0 by definition: its log-prob accuracy is the comparable number).",
        "",
        "| method | rank | trainable | reward accuracy after | reward margin after | log-prob accuracy before → after "
        "| chosen log-prob before → after | train time (min) | command |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in plan():
        if row.task != "preference" or not (d := load(row)):
            continue
        summary, before = d["summary"], next(e for e in d["evals"] if e["step"] == 0)
        after = summary["final"]
        lines.append(
            f"| {row.method} | {row.rank} | {summary['trainable_params']:,} | {100 * after['rewards/accuracy']:.1f} % | "
            f"{after['rewards/margin']:.4f} | {100 * before['logps/accuracy']:.1f} % → {100 * after['logps/accuracy']:.1f} % | "
            f"{before['logps/chosen']:.2f} → {after['logps/chosen']:.2f} | {summary['train_seconds'] / 60:.1f} | "
            f"`{shlex.join(row.command())}` |"
        )
    bench = ROOT / "results" / "dpo.json"
    if bench.is_file():
        data = json.loads(bench.read_text())
        lines += [
            "",
            "A DPO step against TRL's DPOTrainer + PEFT (`python bench/dpo.py --json > results/dpo.json`: the same "
            "SmolLM2 batches, LoRA r8 on the seven projections, fp32, each variant in its own process):",
            "",
            "| variant | pairs per step | median step (s) | peak RSS (MiB) | first loss | step vs TRL | peak RSS vs TRL |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in data.items():
            ratio = f"{r['step_vs_trl']:.2f}" if "step_vs_trl" in r else "—"
            rss = f"{r['peak_rss_vs_trl']:.2f}" if "peak_rss_vs_trl" in r else "—"
            lines.append(
                f"| {name} | {r['pairs_per_step']} | {r['median_step_s']:.2f} | {r['peak_rss_mib']:,.0f} | "
                f"{r['first_loss']:.6f} | {ratio} | {rss} |"
            )
        if "step_vs_trl_on_the_fly" in data.get("lrft_precomputed", {}):
            lines += [
                "",
                f"lrft with the precomputed reference against TRL with its reference each step: "
                f"{data['lrft_precomputed']['step_vs_trl_on_the_fly']:.2f}× the step time.",
            ]
    return lines + [""]


SUITES = Path("results/suites")  # `lrft eval` of the base model per suite (the "before" rows), not committed
SUITE_METHODS = {"commonsense": ("lora", "talora", "lorta"), "arithmetic": ("talora",)}
BASE_EVALS = {  # suite: the command whose --json output is results/suites/<suite>_base.json
    "commonsense": "lrft eval smollm2 --task commonsense --max-samples 100 --batch-size 50",
    "arithmetic": "lrft eval smollm2 --task arithmetic --max-samples 50 --batch-size 25",
    "humaneval": "lrft eval smollm2 --task humaneval --allow-code-execution --batch-size 16",
}


def suites_section() -> list[str]:
    """The commonsense and arithmetic suites as the papers lay them out (a column per test set and their
    average), before (the base model) and after each method; HumanEval pass@1 of the base model."""
    lines = []
    for suite, intro in (
        ("commonsense", "trained on 512 examples of the mix (64 steps of 8), the first 100 test problems per set"),
        ("arithmetic", "trained on 384 worked solutions of math_data.json (48 steps of 8), 50 test problems per set"),
    ):
        base_file = ROOT / SUITES / f"{suite}_base.json"
        base = json.loads(base_file.read_text()) if base_file.is_file() else None
        after = [(row, d) for row in plan() if row.task == suite and (d := load(row))]
        if base is None and not after:
            continue
        first = base or after[0][1]["summary"]["final"]
        sets = sorted(k.split("/")[0] for k in first if k.endswith("/accuracy"))
        lines += [
            f"**{suite}**: SmolLM2-135M-Instruct, {intro}; greedy answers, accuracy in % "
            "(in brackets: generations with no valid answer). Before: "
            f"`LRFT_DATA_DIR=../shared/data {BASE_EVALS[suite]}`.",
            "",
            f"| | trainable | {' | '.join(sets)} | avg | train (min) | command |",
            f"| --- | ---: | {' | '.join('---:' for _ in sets)} | ---: | ---: | --- |",
        ]
        if base is not None:
            lines.append(f"| before | — | {_set_cells(base, sets)} | {100 * base['accuracy']:.1f} | — | — |")
        for row, d in after:
            final, summary = d["summary"]["final"], d["summary"]
            lines.append(
                f"| {row.method} r{row.rank} | {summary['trainable_params']:,} | {_set_cells(final, sets)} | "
                f"{100 * final['accuracy']:.1f} | {summary['train_seconds'] / 60:.1f} | `{shlex.join(row.command())}` |"
            )
        lines.append("")
    code = ROOT / SUITES / "humaneval_base.json"
    if code.is_file():
        result = json.loads(code.read_text())
        lines += [
            f"**HumanEval**: SmolLM2-135M-Instruct, greedy, the {result['examples']} problems: pass@1 "
            f"{100 * result['pass@1']:.1f} % (`{BASE_EVALS['humaneval']}`; every program in lrft's sandbox).",
            "",
        ]
    return lines


TEXT_TO_TEXT_RUN = "mrpc_text_to_text_lora_r8_s42"
TEXT_TO_TEXT_COMMANDS = {
    "before": "lrft eval smollm2 --task glue/mrpc --text-to-text --batch-size 32",
    "after": f"lrft train recipes/glue_mrpc_text_to_text.yaml seed=42 name={TEXT_TO_TEXT_RUN} output.dir={RUNS}",
}


def text_to_text_section() -> list[str]:
    """GLUE MRPC as text on SmolLM2: rank-classification accuracy before (the base model) and after LoRA."""
    base_file, run = ROOT / SUITES / "mrpc_text_to_text_base.json", ROOT / RUNS / TEXT_TO_TEXT_RUN / "summary.json"
    if not base_file.is_file() and not run.is_file():
        return []
    lines = [
        "SmolLM2-135M-Instruct on GLUE MRPC's 408 dev pairs as T5's prompts (\"mrpc sentence1: … sentence2: …\"),",
        "scored by rank classification over the label words equivalent / not_equivalent (always answering the",
        "majority class: 68.4 %). The loss is the mean over the gold word's tokens (and the end of the turn).",
        "",
        "| | trainable | accuracy | F1 | loss of the gold word | command |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, path in (("before", base_file), ("after (LoRA r8, 64 steps)", run)):
        if path.is_file():
            data = json.loads(path.read_text())
            m, trainable = data.get("final", data), data.get("trainable_params")
            command = TEXT_TO_TEXT_COMMANDS["after" if "final" in data else "before"]
            lines.append(
                f"| {label} | {f'{trainable:,}' if trainable else '—'} | {100 * m['accuracy']:.1f} % | "
                f"{100 * m['f1']:.1f} | {m['loss']:.3f} | `{command}` |"
            )
    return lines + [""]


def precision_section() -> list[str]:
    """MRPC at fp32 and at train.precision auto, every method, three seeds: the quality of the default."""
    rows = precision_rows(SEEDS)
    done = {r.name: d for r in rows if (d := load(r))}
    if not done:
        return ["(not run yet: `python bench/results.py run --only 1ep_`)", ""]
    auto = next((d["summary"]["precision"] for r in rows if r.task.endswith("auto") and (d := done.get(r.name))), {})
    lines = [
        "MiniLM on MRPC (408 dev pairs), one epoch, seeds 42, 1, 2; the same recipe once with "
        f"`train.precision=fp32` and once with `auto` (here: {auto.get('train', '?')}, {auto.get('auto', '')}). "
        "Evaluation is fp32 in both (`train.eval_precision` default). Accuracy and F1 in %, mean ± sample std; "
        "the verdict compares the difference of the means with the larger of the two spreads.",
        "",
        "| method | trainable | fp32 accuracy | auto accuracy | difference | fp32 F1 | auto F1 | fp32 loss | auto loss "
        "| median step fp32 (s) | auto (s) | auto / fp32 | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for method in ("lora", "tlora", "talora", "lorta"):
        runs = {
            p: [done[r.name]["summary"] for r in rows if r.method == method and r.task.endswith(p) and r.name in done]
            for p in PRECISIONS
        }
        if not all(runs.values()):
            continue
        acc = {p: [s["final"]["accuracy"] for s in runs[p]] for p in PRECISIONS}
        spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in acc.values())
        diff = statistics.mean(acc["auto"]) - statistics.mean(acc["fp32"])
        step = {p: statistics.median(s["median_step_time_s"] for s in runs[p]) for p in PRECISIONS}
        cells = [
            f"{runs['fp32'][0]['trainable_params']:,}",
            mean_std(acc["fp32"]),
            mean_std(acc["auto"]),
            f"{100 * diff:+.1f}",
            *(mean_std([s["final"]["f1"] for s in runs[p]]) for p in PRECISIONS),
            *(mean_std([s["final"]["loss"] for s in runs[p]], scale=1, digits=4) for p in PRECISIONS),
            f"{step['fp32']:.3f}",
            f"{step['auto']:.3f}",
            f"{step['auto'] / step['fp32']:.2f}",
            "within the seeds' spread" if abs(diff) <= spread else f"outside the spread ({100 * spread:.1f})",
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    command = shlex.join(replace(rows[1], seed="N").command())
    return lines + ["", f"Command of a row (auto; fp32 with `train.precision=fp32`): `{command}`", ""]


def _set_cells(metrics: dict, sets: list[str]) -> str:
    """A suite row's cells: each set's accuracy in % and, in brackets, its count of missing answers."""
    return " | ".join(f"{100 * metrics[f'{s}/accuracy']:.0f} ({metrics[f'{s}/no_answer']})" for s in sets)


def memory_section(file: str = "memory.json", command: str = "python bench/memory.py --json") -> list[str]:
    path = ROOT / "results" / file
    if not path.is_file():
        return [f"(not measured yet: `{command} > results/{file}`)", ""]
    data = json.loads(path.read_text())
    lines = [
        "| workload | variant | peak RSS (MiB) | × plain | median step (s) | × plain | padding share of the batches |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['workload']} | {r['variant']} | {r['peak_rss_mib']:,.0f} | {r['rss_ratio_to_plain']:.2f} | "
        f"{r['median_step_s']:.2f} | {r['step_time_ratio_to_plain']:.2f} | {r['padding_share']:.1%} |"
        for r in data["rows"]
    ]
    return lines + [""]


def eval_speed_section() -> list[str]:
    """bench/eval_speed.py: the GSM8K recipe's whole evaluation as it was (model.generate) and as it is."""
    command = "python bench/eval_speed.py --rounds 2 --json"
    path = ROOT / "results" / "eval_speed.json"
    if not path.is_file():
        return [f"(not measured yet: `{command} > results/eval_speed.json`)", ""]
    d = json.loads(path.read_text())
    what = {
        "generate": "model.generate (every row until the batch's last stops; the cache concatenated each step)",
        "decoding": "lrft.decoding (finished rows leave the batch; the cache filled in place)",
        "decoding_recipe_batch": "lrft.decoding, the recipe's generation_batch_size",
        "decoding_recipe_batch_bf16": "the same under bf16 autocast (`train.eval_precision: auto` on this CPU)",
    }
    lines = [
        f"{d['recipe']}'s evaluation of {d['model']} before training, timed whole (response loss over "
        f"the {d['problems']} test problems, then their greedy generations, up to 256 new tokens, stopping at EOS "
        f"or the `#### N` line; fp32, the eval_precision default, unless the row says bf16); rounds alternate "
        f"the paths; completions compared with model.generate's; `{command}`. "
        f"Completions of model.generate: {d['completion_tokens']:,} tokens.",
        "",
        "| path | generation batch | seconds (median of rounds) | each round | ratio | identical completions | "
        "exact match | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in what.items():
        if name not in d["metrics"]:
            continue
        m = d["metrics"][name]
        lines.append(
            f"| {label} | {d['batches'][name]} | {d['median_s'][name]:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in d['seconds'][name])} | {d['ratio'][name]:.2f} | "
            f"{d['identical_completions'][name]}/{d['problems']} | {100 * m['exact_match']:.0f} % | {m['loss']:.4f} |"
        )
    return [*lines, ""]


def speed_precision_section() -> list[str]:
    """bench/speed.py at fp32 and under bf16 autocast: step times against PEFT and the share of the
    matmul peak at the steps' dtype."""
    paths = sorted((ROOT / "results" / "speed_precision").glob("*.json"))
    if not paths:
        return [
            "(not measured yet: `python bench/speed.py --precision fp32|bf16 --json > results/speed_precision/NAME.json`)",
            "",
        ]
    lines = [
        "Every variant's training steps on the same real batches (forward, backward, AdamW), at fp32 and "
        "under bf16 autocast; FLOPs counted by torch's FlopCounterMode; the peak is the best of a few 2048² "
        "matmuls at the steps' dtype, measured in the same run.",
        "",
        "| job (command) | variant | median s/step | × PEFT LoRA | GFLOP/step | GFLOP/s | share of the matmul peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in paths:
        b = json.loads(path.read_text())
        job = (
            f"{b['model']}, {b['task']} batch {b['batch_size']}, {b['precision']} (`{b['command']}`; peak "
            f"{b['matmul_peak_gflops']:.0f} GFLOP/s {b['matmul_peak_dtype']})"
        )
        for r in b["rows"]:
            lines.append(
                f"| {job} | {r['variant']} | {r['median_step_s']:.3f} | {r['ratio_to_peft_lora']:.3f} | "
                f"{r['gflop_per_step']:.1f} | {r['achieved_gflops']:.1f} | {100 * r['share_of_peak']:.1f} % |"
            )
            job = ""
    return [*lines, ""]


def qlora_section() -> list[str]:
    """The GSM8K recipe's training steps at fp32, auto, and on an nf4 base: peak RSS and step time."""
    command = (
        "python bench/memory.py --only smollm2-gsm8k --steps 4 --variant plain --variant fp32 --variant nf4 "
        "--variant nf4_fp32 --variant nf4_checkpointing --json"
    )
    lines = memory_section("memory_qlora.json", command)
    if len(lines) > 2:
        lines = [
            "recipes/gsm8k_lora.yaml (SmolLM2-135M, LoRA r8 on all seven projections, batch 8, length 320), "
            "each variant in a process of its own, its first optimizer steps timed; `plain` is the defaults "
            "(precision auto), the ratios are against it.",
            "",
            f"`{command}`",
            "",
            *lines,
        ]
    return lines


# The task head's defaults (issue 27): the same jobs on lrft before the change (2c9738f: the head at the
# adapter's lr, a regression bias at 0) and after it (the head at max(lr, 1e-2), a regression bias at the
# training labels' mean). Run names: <job>_<epochs>ep_<before|after>_s<seed>, under results/heads.
HEADS = Path("results/heads")
HEAD_JOBS = {  # job: (task, recipe, overrides); LoRA r8 on query, value at the sweep's lr 1e-3
    "stsb_lora": (
        "glue/stsb",
        "recipes/quickstart.yaml",
        ("data.task=glue/stsb", "data.max_train_samples=3000", *LORA_MINILM[:2], "train.lr=1e-3"),
    ),
    "mrpc_lora": ("glue/mrpc", "recipes/quickstart.yaml", (*LORA_MINILM[:2], "train.lr=1e-3")),
    "rte_lora": ("glue/rte", "recipes/quickstart.yaml", ("data.task=glue/rte", *LORA_MINILM[:2], "train.lr=1e-3")),
    "sst2_lora": (
        "glue/sst2",
        "recipes/quickstart.yaml",
        ("data.task=glue/sst2", "data.max_train_samples=8000", *LORA_MINILM[:2], "train.lr=1e-3"),
    ),
    "mrpc_talora": ("glue/mrpc", "recipes/glue_mrpc_talora.yaml", ()),
}


def heads_section(runs: Path = ROOT / HEADS) -> list[str]:
    """Before/after rows of the head defaults from the run dirs in `runs` (mean ± sd over seeds)."""
    found: dict[tuple[str, int], dict[str, list[tuple[int, float]]]] = {}
    for summary in sorted(runs.glob("*/summary.json")):
        job, epochs, phase, seed = summary.parent.name.rsplit("_", 3)
        task = HEAD_JOBS[job][0]
        metric = "pearson" if task == "glue/stsb" else "accuracy"
        value = json.loads(summary.read_text())["final"][metric]
        found.setdefault((job, int(epochs.removesuffix("ep"))), {}).setdefault(phase, []).append((int(seed[1:]), value))
    if not found:
        return [f"(not measured yet: the commands below, with output.dir={HEADS})", ""]
    lines = [
        "| job | epochs | metric | before (lrft 2c9738f) | seeds | after | seeds | command (after) |",
        "| --- | ---: | --- | ---: | --- | ---: | --- | --- |",
    ]
    for (job, epochs), phases in sorted(found.items()):
        task, recipe, overrides = HEAD_JOBS[job]
        metric = "Pearson" if task == "glue/stsb" else "accuracy (%)"
        scale = 1.0 if task == "glue/stsb" else 100.0
        cells = []
        for phase in ("before", "after"):
            runs = sorted(phases.get(phase, []))
            cells += [
                mean_std([v for _, v in runs], scale, 3 if scale == 1.0 else 1),
                ", ".join(str(seed) for seed, _ in runs) or "—",
            ]
        command = shlex.join(
            [
                "lrft",
                "train",
                recipe,
                *overrides,
                f"train.epochs={epochs}",
                "seed=N",
                f"name={job}_{epochs}ep_after_sN",
                f"output.dir={HEADS}",
            ]
        )
        lines.append(f"| {job.replace('_', ' ')} | {epochs} | {metric} | {' | '.join(cells)} | `{command}` |")
    return lines + [""]


SECTIONS = {
    "heads": ("## Task-head defaults: before and after", heads_section),
    "tuned": ("## Tuned comparison (`lrft sweep`)", tuned_section),
    "e2e": ("## Whole jobs against HF Trainer + PEFT (`bench/e2e.py`)", e2e_section),
    "e2e_precision": (
        "## Whole jobs at each side's defaults, and both at bf16 (`bench/e2e.py`)",
        e2e_precision_section,
    ),
    "e2e_gsm8k": ("## The GSM8K recipe whole, at each side's defaults (`bench/e2e.py`)", e2e_gsm8k_section),
    "memory": ("## Memory levers (`bench/memory.py`)", memory_section),
    "qlora": ("## QLoRA: the GSM8K recipe on an nf4 base (`bench/memory.py`)", qlora_section),
    "eval_speed": ("## Evaluation of the GSM8K recipe (`bench/eval_speed.py`)", eval_speed_section),
    "speed_precision": (
        "## Step time and the hardware's limit, fp32 and bf16 (`bench/speed.py`)",
        speed_precision_section,
    ),
    "preference": ("## Preference optimization (DPO on Anthropic HH pairs)", preference_section),
    "suites": ("## Evaluation suites: commonsense, arithmetic, HumanEval", suites_section),
    "text_to_text": ("## Text-to-text classification (rank classification)", text_to_text_section),
    "precision": ("## Precision: fp32 against the auto default (bf16 where the CPU computes it)", precision_section),
}


def section(name: str) -> list[str]:
    title, render = SECTIONS[name]
    return [
        f"<!-- begin {name}: generated by `python bench/results.py update`; do not edit -->",
        title,
        "",
        *render(),
        f"<!-- end {name} -->",
        "",
    ]


def update(names: list[str] | None = None) -> Path:
    """Rewrite the generated sections of docs/RESULTS.md in place (added before the observations when new);
    `names`: only these (the others' run dirs may be on another machine)."""
    path = DOCS / "RESULTS.md"
    text = path.read_text()
    for name in names or SECTIONS:
        block = "\n".join(section(name))
        begin, end = f"<!-- begin {name}:", f"<!-- end {name} -->\n"
        if begin in text:
            a, b = text.index(begin), text.index(end) + len(end)
            text = text[:a] + block + text[b:].lstrip("\n")
        else:
            at = text.index("## Observations") if "## Observations" in text else len(text)
            text = text[:at] + block + "\n" + text[at:]
    path.write_text(text)
    return path


def report(rows: list[Row]) -> Path:
    DOCS.mkdir(exist_ok=True)
    sections, points = [], []
    for task, title in (
        ("glue/mrpc", "GLUE MRPC (full dev set, 408 pairs)"),
        ("glue/rte", "GLUE RTE (full dev set, 277 pairs)"),
        (
            "glue/sst2",
            "GLUE SST-2 (full dev set, 872 sentences; training subsampled to the first 8,000 of 67,349 sentences)",
        ),
    ):
        lines, pts = glue_table(task, rows)
        points += pts
        sections += [f"### {title}", "", *lines, ""]
    plot(points, DOCS / "results_params_accuracy.png")
    notes = DOCS / "results_notes.md"
    text = "\n".join(
        [
            "# Results",
            "",
            "<!-- generated by `python bench/results.py report` from the run dirs under results/runs; do not edit -->",
            "",
            f"Measured on {machine()}. Every row is a real run of the command it lists (`seed=N` for the seeds "
            "averaged, mean ± sample standard deviation); train time is the wall-clock of the training loop (the "
            "evaluations during it included) on the same shared 2-core machine, so it is indicative only. MiniLM is the packaged `minilm` "
            "(sentence-transformers/all-MiniLM-L6-v2, 22.7 M parameters), trained 3 epochs with each method's recipe "
            "(the papers' models need a GPU: see each recipe's comments). Trainable counts are adapter parameters; "
            "every method also trains the 770-parameter classifier head. The GLUE and GSM8K quality rows ran at "
            "fp32, lrft's default precision until `train.precision: auto` (see the Precision section for what "
            "auto changes).",
            "",
            "## Quality",
            "",
            *sections,
            "![dev accuracy against trainable parameters](results_params_accuracy.png)",
            "",
            "### GSM8K with SmolLM2-135M-Instruct (test subset: the first 50 problems)",
            "",
            "256 training problems (32 steps of 8), greedy decoding, exact match of the final number; "
            "'before' is the same adapter-free model evaluated at step 0.",
            "",
            *gsm8k_table(rows),
            "",
            "## Speed",
            "",
            "Measured with `bench/speed.py`: the same real batches for every variant in one process, "
            "variants alternating round by round; ratios are medians of paired steps (same batch, same round).",
            "",
            *speed_tables(),
            "## Serving parity",
            "",
            (
                "Max |logit diff| over the first 128 validation examples of each run: the "
                "`lrft merge --format peft` export loaded by PEFT's `PeftModel.from_pretrained`, and `lrft merge` dirs "
                "(fp32, bf16) loaded by plain transformers, each against the lrft adapter; then the run pointed at a base "
                f"with other weights (`python bench/serving_parity.py RUN_DIR ... > {PARITY}`)."
            ),
            "",
            *parity_table(),
            "",
            *(line for name in SECTIONS for line in section(name)),
            "## Observations",
            "",
            notes.read_text().strip() if notes.is_file() else "(none yet)",
            "",
        ]
    )
    (DOCS / "RESULTS.md").write_text(text)
    return DOCS / "RESULTS.md"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["plan", "run", "report", "update"])
    ap.add_argument("--only", default=None, help="rows whose run name contains this")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: 42,1,2)")
    ap.add_argument("--section", action="append", choices=list(SECTIONS), help="update: only this section (repeatable)")
    args = ap.parse_args(argv)
    rows = plan(tuple(int(s) for s in args.seeds.split(",")) if args.seeds else SEEDS)
    if args.only:
        rows = [r for r in rows if args.only in r.name]
    if args.action == "plan":
        for row in rows:
            print(shlex.join(row.command()))
    elif args.action == "run":
        run(rows)
    elif args.action == "update":
        print(update(args.section))
    else:
        print(report(plan()))


if __name__ == "__main__":
    main()
