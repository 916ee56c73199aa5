"""The `lrft` command line: thin Typer commands over the library.

Each command parses its arguments and hands its work, and the lines it prints, to its module; what
the commands share (the help's shape, errors and exit codes, `--version`, `--json`) is
lrft.cli_support's. Results go to stdout (`--json` for pipelines), logs to stderr. Exit codes: 0 ok,
1 a bug (with its traceback), 2 a user mistake (one `error:` line), 74 the disk failed under a write,
75 a run stopped on request (lrft.cli_support says each).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from lrft import console
from lrft.cli_support import LrftGroup, PlainHelp, emit, training_stops, user_errors, version

app = typer.Typer(
    cls=LrftGroup,
    name="lrft",
    help="Fine-tune transformers with low-rank adapters: lora, tlora (tri-matrix), talora (task-aware), lorta.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a bug prints its plain traceback
    rich_markup_mode=None,  # plain help: it reads the same in a terminal, a pager and a log
    context_settings={"max_content_width": 110, "help_option_names": ["-h", "--help"]},
)

MAX_LABELS = 100_000  # a model config lists every label by name: 2**31 of them would fill the memory
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
DataPathOpt = Annotated[
    str | None,
    typer.Option("--data-path", metavar="DIR", help="dir with the task's files (default: the data the run trained on)"),
]
BaseOpt = Annotated[
    str | None, typer.Option(metavar="MODEL", help="PEFT adapter dirs: the base model (default: the one it names)")
]


@app.callback()
def options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=version,
            is_eager=True,
            help="print lrft's version (and torch's, transformers', peft's)",
        ),
    ] = False,
):
    """Options of `lrft` itself, before the command (its help is the app's)."""


@app.command(
    cls=PlainHelp,
    context_settings={"allow_extra_args": False},
    short_help="train an adapter from a recipe (resumes by itself)",
)
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="recipe YAML file")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="KEY=VALUE", help="overrides of recipe keys, e.g. train.lr=1e-3 adapter.params.rank=16"),
    ] = None,
    restart: Annotated[bool, typer.Option("--restart", help="delete the run dir's checkpoints and start over")] = False,
    json_out: JsonOpt = False,
):
    """Train an adapter: load → (calibrate) → inject → train → evaluate → save. Resumes by itself."""
    started = time.perf_counter()
    from lrft.recipe import load_recipe
    from lrft.training import summary_lines
    from lrft.training import train as run_training

    r = load_recipe(recipe, overrides or [])
    console.log(f"run {r.name}: {r.adapter.method} on {r.data.task} with {r.model.name} → {r.run_dir}")
    with training_stops():
        summary = run_training(r, restart=restart, started=started)
    emit(summary, json_out, lambda s: summary_lines(s, r.run_dir))


# `lrft eval`'s options beyond the shared ones
MaxLengthOpt = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        metavar="N",
        min=8,
        help="cut examples to N tokens (default: the run's data.max_length; for a "
        "model, the task's: 128, gsm8k 320, instruction 512)",
    ),
]
PredictionsOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help=("generation tasks: write the generations here (default for a run dir: RUN_DIR/predictions.jsonl)"),
    ),
]
AllowCodeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-code-execution",
        help="humaneval: run the generated programs (each in a sandboxed subprocess); also LRFT_ALLOW_CODE_EXECUTION=1",
    ),
]
SamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--samples",
        metavar="N",
        min=1,
        help="humaneval: sample N programs per problem for pass@k (default 1: greedy)",
    ),
]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", metavar="T", min=0.01, max=2.0, help="--samples: the sampling temperature")
]
TextToTextOpt = Annotated[
    bool,
    typer.Option("--text-to-text", help="a model on a classification task: as prompts and answer words, rank-scored"),
]
HarnessOpt = Annotated[
    str | None,
    typer.Option(
        "--harness",
        metavar="TASKS",
        help="run EleutherAI lm-eval's tasks (comma-separated, e.g. arc_easy,piqa) on the model in memory",
    ),
]
FewshotOpt = Annotated[
    int | None, typer.Option("--num-fewshot", metavar="N", min=0, help="--harness: few-shot examples per task")
]
HarnessIncludeOpt = Annotated[
    Path | None,
    typer.Option("--harness-include", metavar="DIR", help="--harness: a dir of local lm-eval task YAML files"),
]
ChatTemplateOpt = Annotated[
    bool,
    typer.Option(
        "--chat-template/--no-chat-template", help="--harness: render requests with the tokenizer's chat template"
    ),
]


@app.command("eval", cls=PlainHelp, short_help="evaluate a run, a PEFT adapter or a model on a task")
@user_errors
def eval_cmd(
    target: Annotated[
        str,
        typer.Argument(
            metavar="TARGET",
            help="a run dir of `lrft train`, a PEFT adapter dir, or a model: merged dir, alias or hub id",
        ),
    ],
    task: Annotated[
        str | None, typer.Option(metavar="TASK", help="task to evaluate on (needed for a model), e.g. glue/mrpc, gsm8k")
    ] = None,
    data_path: DataPathOpt = None,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", metavar="N", min=1, help="evaluate the first N examples")
    ] = None,
    max_length: MaxLengthOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", min=1, help="examples per batch")] = 64,
    best: Annotated[
        bool, typer.Option("--best", help="use the run's best checkpoint instead of the final adapter")
    ] = False,
    predictions: PredictionsOpt = None,
    base: BaseOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="use a base model whose weights differ from the adapter's")
    ] = False,
    allow_code_execution: AllowCodeOpt = False,
    samples: SamplesOpt = None,
    temperature: TemperatureOpt = 0.8,
    text_to_text: TextToTextOpt = False,
    harness: HarnessOpt = None,
    num_fewshot: FewshotOpt = None,
    harness_include: HarnessIncludeOpt = None,
    chat_template: ChatTemplateOpt = True,
    json_out: JsonOpt = False,
):
    """Evaluate a trained run or PEFT LoRA dir (rebuilt on its base model), or a model (merged dir, alias, hub id)."""
    from lrft.eval_command import Scoring, evaluate_target, harness_target, metric_lines

    if harness is not None:
        options = dict(num_fewshot=num_fewshot, include=harness_include, chat_template=chat_template)
        common = dict(max_samples=max_samples, batch_size=batch_size, base=base, force=force, best=best)
        result = harness_target(target, harness, **options, **common)
        table = result.pop("table")
        return emit(result, json_out, lambda _: [table])
    metrics = evaluate_target(
        target,
        task_name=task,
        data_path=data_path,
        max_samples=max_samples,
        max_length=max_length,
        batch_size=batch_size,
        best=best,
        predictions_path=predictions,
        base=base,
        force=force,
        scoring=Scoring(allow_code_execution, samples, temperature, text_to_text),
    )
    emit(metrics, json_out, metric_lines)


@app.command(cls=PlainHelp, short_help="merge an adapter into its base model, or export it as a PEFT LoRA")
@user_errors
def merge(
    run_dir: Annotated[
        str, typer.Argument(metavar="RUN_DIR", help="a run dir of `lrft train`, or a PEFT LoRA adapter dir")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="where to write the merged model (or PEFT adapter)")
    ],
    format: Annotated[
        str,
        typer.Option(metavar="hf|peft", help="hf: a merged model dir; peft: the adapter as a standard PEFT LoRA dir"),
    ] = "hf",
    dtype: Annotated[
        str | None, typer.Option(metavar="DTYPE", help="float32, bfloat16 or float16 (default: the base model's)")
    ] = None,
    task: Annotated[
        str | None, typer.Option(metavar="TASK", help="PEFT adapter dirs: the task of its parity data, e.g. glue/mrpc")
    ] = None,
    base: BaseOpt = None,
    data_path: DataPathOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="replace --out if it exists; use a base model whose weights differ from the adapter's"
        ),
    ] = False,
    json_out: JsonOpt = False,
):
    """Fold the adapter into the base weights (an HF model dir, parity checked) or export it in PEFT's format."""
    from lrft.merge import merge_command, report_lines

    report = merge_command(
        run_dir, out, format=format, dtype=dtype, force=force, task=task, base=base, data_path=data_path
    )
    emit(report, json_out, lambda r: report_lines(r, format))


@app.command("count-params", cls=PlainHelp, short_help="count a method's trainable parameters from a model's config")
@user_errors
def count_params_cmd(
    method: Annotated[
        str, typer.Option(metavar="METHOD", help="lora, tlora, talora, lorta, or full (full fine-tuning)")
    ],
    rank: Annotated[int, typer.Option(metavar="R", help="rank r")] = 8,
    model: Annotated[
        str,
        typer.Option(
            metavar="MODEL", help="preset (roberta-base, roberta-large, llama2-7b, t5-base), model dir or hub id"
        ),
    ] = "roberta-large",
    targets: Annotated[
        str | None,
        typer.Option(
            metavar="NAMES",
            help=("comma-separated target module names (default: the model family's query and value projections)"),
        ),
    ] = None,
    num_labels: Annotated[
        int, typer.Option("--num-labels", metavar="N", min=1, max=MAX_LABELS, help="classification labels of the head")
    ] = 2,
    calibrated: Annotated[
        Path | None,
        typer.Option(
            "--calibrated",
            metavar="RUN_DIR",
            help=("a finished run dir: its exact count (talora's calibrated per-module ranks)"),
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize", metavar="KIND", help="nf4, fp4 or int8: also the base weights' memory quantized so (QLoRA)"
        ),
    ] = None,
    json_out: JsonOpt = False,
):
    """Count trainable parameters of a method on a model, from its config alone (no weights)."""
    from lrft.count_params import count_command, render

    counts = count_command(method, rank, model, targets, num_labels, calibrated, quantize)
    emit(counts, json_out, lambda c: [render(c)])


@app.command(cls=PlainHelp, short_help="write a commented recipe")
@user_errors
def init(
    method: Annotated[str, typer.Option(metavar="METHOD", help="lora, tlora, talora or lorta")] = "tlora",
    task: Annotated[str, typer.Option(metavar="TASK", help="task, e.g. glue/mrpc, gsm8k")] = "glue/mrpc",
    model: Annotated[str, typer.Option(metavar="MODEL", help="model alias, dir or hub id")] = "minilm",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="file to write (default: stdout)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
):
    """Write a commented recipe for a method, task and model."""
    from lrft.init_recipe import init_recipe

    sys.stdout.write(init_recipe(method, task, model, output, force))


@app.command(cls=PlainHelp, short_help="spectra, norms and plots of a run's updates; compare two runs")
@user_errors
def analyze(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run dir of `lrft train`")],
    against: Annotated[
        Path | None,
        typer.Option("--against", metavar="RUN_DIR", help="another run on the same base model to compare with"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="DIR",
            help=(
                "where to write the analysis (default: RUN_DIR/analysis; with --against, "
                "RUN_DIR/comparisons/<the other run's dir name>)"
            ),
        ),
    ] = None,
    module: Annotated[
        str | None,
        typer.Option(
            "--module",
            metavar="NAME",
            help=("module for the element-wise ΔW (difference) heatmap (default: the first in common)"),
        ),
    ] = None,
    modules: Annotated[
        str | None,
        typer.Option(
            "--modules",
            metavar="SUBSTRINGS",
            help=("analyse only modules whose name contains one of these comma-separated substrings"),
        ),
    ] = None,
    json_out: JsonOpt = False,
):
    """Spectra, norms, histograms and training curves of a run's updates ΔW; similarities against another run."""
    from lrft.analysis import analyze as run_analysis
    from lrft.analysis import report_lines

    result = run_analysis(run_dir, against, out, module, modules)
    emit(result, json_out, report_lines)


TOLERANCE_HELP = (
    "the smallest adapter within this many points of the best (metric × 100; loss and perplexity as they are)"
)


StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        metavar="URL",
        help="the study: postgresql://USER:PASSWORD@HOST:PORT/DB, mysql+pymysql://..., sqlite:///PATH or "
        "journal:PATH, shared by workers on any machines (default: $LRFT_SWEEP_STORAGE, the spec's storage:, "
        "else SQLite in the sweep dir)",
    ),
]


@app.command(cls=PlainHelp, short_help="search recipe settings for the smallest adapter that still works")
@user_errors
def sweep(
    specs: Annotated[
        list[Path],
        typer.Argument(
            metavar="SPEC", help="sweep spec YAML file(s); several run one after another and report together"
        ),
    ],
    plan: Annotated[
        bool,
        typer.Option(
            "--plan", help="print one `lrft train` command per run (for a job array or xargs -P) and train nothing"
        ),
    ] = False,
    report: Annotated[bool, typer.Option("--report", help="train nothing: report the run dirs there are")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the report as a Markdown section")] = False,
    tolerance: Annotated[float, typer.Option("--tolerance", metavar="POINTS", min=0, help=TOLERANCE_HELP)] = 1.0,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", metavar="FILE", help="where to write the Pareto plot (default: pareto.png in the sweep dir)"
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            metavar="N",
            min=1,
            help="start this many worker processes on the sweep (they split its trials)",
        ),
    ] = 1,
    storage: StorageOpt = None,
    json_out: JsonOpt = False,
):
    """Search recipe settings (optuna: grid or TPE, pruning on per-epoch evaluations) for the smallest adapter
    that still works; rerunning resumes it."""
    from lrft.sweep import check_flags, load_sweeps, plan_commands, run_sweeps, run_workers
    from lrft.sweep.report import build, print_report

    check_flags(plan=plan, report=report, markdown=markdown, json_out=json_out, workers=workers)
    sweeps = load_sweeps(specs, storage)
    if plan:
        console.emit_lines(plan_commands(sweeps))
        return
    if not (report or markdown):
        if workers > 1:
            code = run_workers(specs, workers, storage)
            if code != 0:
                raise typer.Exit(code)
        else:
            with training_stops():
                run_sweeps(sweeps)
    print_report(build(sweeps, tolerance, plot), specs, markdown=markdown, json_out=json_out)


def main() -> None:
    app(prog_name="lrft")
