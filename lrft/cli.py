"""The `lrft` command line: thin Typer commands over the library.

Results go to stdout (`--json` for pipelines), logs to stderr. Exit codes: 0 ok, 1 a bug (with its
traceback), 2 a user mistake (one clear message, no traceback): an LrftError, or a command line
Click cannot parse (a missing option, a value of the wrong type), both as one `error:` line; 74 the
disk failed under a write (full, over quota, read-only, an I/O error: one `error:` line too; nothing
half-written is left, so the same command reruns once the disk is fixed); 75 a run stopped on request.
"""

from __future__ import annotations

import errno
import functools
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from lrft import console
from lrft.errors import DISK_ERRORS, EXIT_DISK, DiskError, LrftError

# Click's exception classes, taken from Typer's public BadParameter: Typer ships its own copy of Click.
_CLICK = {c.__name__: c for c in typer.BadParameter.__mro__}
UsageError, ClickException = _CLICK["UsageError"], _CLICK["ClickException"]


class UsageLine(ClickException):
    """A usage error shown as lrft shows every user mistake: one `error:` line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        console.err.print(f"error: {self.message}", markup=False, style="red")


@contextmanager
def usage_in_one_line():
    """Click's usage errors (which print a usage block and `Error: ...`) as a UsageLine naming the
    option, the value and where to look; errors that show something else (help) pass unchanged."""
    try:
        yield
    except UsageError as e:
        if type(e).show is not UsageError.show:
            raise
        text = " ".join(e.format_message().split()).rstrip(".")
        # Typer converts values with pydantic, whose error (the cause) holds the value the message leaves out
        errors = e.__cause__.errors() if hasattr(e.__cause__, "errors") else []
        got = f" (got {errors[0]['input']!r})" if errors and "input" in errors[0] else ""
        where = e.ctx.command_path if e.ctx is not None else "lrft"
        raise UsageLine(f"{text[:1].lower()}{text[1:]}{got}; see `{where} --help`") from None


class LrftGroup(TyperGroup):
    """The `lrft` group, parsing its own and its commands' arguments under `usage_in_one_line`."""

    def make_context(self, *args, **kwargs):
        with usage_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with usage_in_one_line():
            return super().invoke(ctx)


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


# OS errors that say what is wrong with a path the user gave (its name, its links, its permissions),
# whichever check first touched it; any other OSError is a bug and keeps its traceback.
PATH_ERRORS = {
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows; give a shorter path",
    errno.ELOOP: "it goes through a loop of symbolic links; fix the links or give another path",
    errno.EACCES: "permission denied; give a path you may use, or change its permissions",
    errno.EPERM: "operation not permitted; give a path you may use, or change its permissions",
    errno.EROFS: "it is on a read-only file system; give a path on a writable one",
}


def version(value: bool) -> None:
    """--version: lrft's version and those of the libraries a bug report needs, then exit."""
    if value:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        from lrft import __version__

        def of(package: str) -> str:
            try:
                return installed(package)
            except PackageNotFoundError:
                return "not installed"

        typer.echo(f"lrft {__version__} (python {sys.version.split()[0]}, torch {of('torch')}, "
                   f"transformers {of('transformers')}, peft {of('peft')})")
        raise typer.Exit()


@app.callback()
def options(
    show_version: Annotated[bool, typer.Option("--version", callback=version, is_eager=True,
                                               help="print lrft's version (and torch's, transformers', peft's)")] = False,
):
    """Options of `lrft` itself, before the command (its help is the app's)."""


class PlainHelp(TyperCommand):
    """Help that reads like other command lines': `lrft train [OPTIONS] RECIPE [KEY=VALUE]...` and
    arguments by their metavar, where typer writes `{recipe}`, `[overrides]...` and `<list[str]>`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def format_options(self, ctx, formatter) -> None:
        params = self.get_params(ctx)
        arguments = [(self.argument_name(p), p.help or "") for p in params if p.param_type_name == "argument"]
        options = [record for p in params if p.param_type_name == "option" and (record := p.get_help_record(ctx))]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    @staticmethod
    def argument_name(param) -> str:
        return (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")


def user_errors(fn):
    """LrftError, and an OSError about a user's path, → one line on stderr and exit code 2; a disk that
    failed under a write → one line and exit code 74 (EXIT_DISK)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        code = 2
        try:
            return fn(*args, **kwargs)
        except DiskError as e:
            message, code = str(e), EXIT_DISK
        except LrftError as e:
            message = str(e)
        except OSError as e:
            if e.errno in PATH_ERRORS and e.filename is not None:
                message = f"{e.filename}: {PATH_ERRORS[e.errno]}"
            elif (message := unwrapped_disk_failure(e)) is not None:
                code = EXIT_DISK
            else:
                raise
        except Exception as e:
            if (message := unwrapped_disk_failure(e)) is None:
                raise
            code = EXIT_DISK
        console.err.print(f"error: {message}", markup=False, style="red")
        raise typer.Exit(code) from None

    return wrapper


def unwrapped_disk_failure(error: Exception) -> str | None:
    """The line for a disk failure that no lrft writer named (a library's own write), else None."""
    from lrft.files import disk_errno

    code = disk_errno(error)
    if code is None:
        return None
    reason, fix = DISK_ERRORS[code]
    where = getattr(error, "filename", None)
    return (f"{where or 'a write'}: {reason} ({type(error).__name__}); {fix} and rerun the same command "
            f"(exit code {EXIT_DISK})")


@contextmanager
def training_stops():
    """A run stopped on request (the trainer says where) → exit code 75: a scheduler requeues on it,
    rerunning resumes; a second Ctrl-C → exit 130."""
    from lrft.train import EXIT_STOPPED, Stopped

    try:
        yield
    except Stopped:  # pre-empted: the trainer said where; a scheduler requeues on this code
        raise typer.Exit(EXIT_STOPPED) from None
    except KeyboardInterrupt:
        console.err.print("interrupted (a second Ctrl-C): stopped at once; rerun the same command to resume from "
                          "the last checkpoint", markup=False)
        raise typer.Exit(130) from None


@app.command(cls=PlainHelp, context_settings={"allow_extra_args": False},
             short_help="train an adapter from a recipe (resumes by itself)")
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="recipe YAML file")],
    overrides: Annotated[list[str] | None, typer.Argument(
        metavar="KEY=VALUE", help="overrides of recipe keys, e.g. train.lr=1e-3 adapter.params.rank=16")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="delete the run dir's checkpoints and start over")] = False,
    json_out: JsonOpt = False,
):
    """Train an adapter: load → (calibrate) → inject → train → evaluate → save. Resumes by itself."""
    started = time.perf_counter()
    from lrft.recipe import load_recipe
    from lrft.train import summary_lines
    from lrft.train import train as run_training

    r = load_recipe(recipe, overrides or [])
    console.log(f"run {r.name}: {r.adapter.method} on {r.data.task} with {r.model.name} → {r.run_dir}")
    with training_stops():
        summary = run_training(r, restart=restart, started=started)
    if json_out:
        console.emit_json(summary)
    else:
        console.emit_lines(summary_lines(summary, r.run_dir))


@app.command("eval", cls=PlainHelp, short_help="evaluate a run, a PEFT adapter or a model on a task")
@user_errors
def eval_cmd(
    target: Annotated[str, typer.Argument(
        metavar="TARGET", help="a run dir of `lrft train`, a PEFT adapter dir, or a model: merged dir, alias or hub id")],
    task: Annotated[str | None, typer.Option(
        metavar="TASK", help="task to evaluate on (needed for a model), e.g. glue/mrpc, gsm8k")] = None,
    data_path: Annotated[str | None, typer.Option(
        "--data-path", metavar="DIR", help="dir with the task's files (default: the data the run trained on)")] = None,
    max_samples: Annotated[int | None, typer.Option(
        "--max-samples", metavar="N", min=1, help="evaluate the first N examples")] = None,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", metavar="N", min=8, help="cut examples to N tokens (default: the run's data.max_length; for a "
                                                 "model, the task's: 128, gsm8k 320, instruction 512)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", min=1, help="examples per batch")] = 64,
    best: Annotated[bool, typer.Option("--best", help="use the run's best checkpoint instead of the final adapter")] = False,
    predictions: Annotated[Path | None, typer.Option(metavar="FILE", help=(
        "generation tasks: write the generations here (default for a run dir: RUN_DIR/predictions.jsonl)"))] = None,
    base: Annotated[str | None, typer.Option(
        metavar="MODEL", help="PEFT adapter dirs: the base model (default: the one it names)")] = None,
    force: Annotated[bool, typer.Option("--force", help="use a base model whose weights differ from the adapter's")] = False,
    json_out: JsonOpt = False,
):
    """Evaluate a trained run or PEFT LoRA dir (rebuilt on its base model), or a model (merged dir, alias, hub id)."""
    from lrft.evaluate_run import evaluate_target

    metrics = evaluate_target(target, task_name=task, data_path=data_path, max_samples=max_samples,
                              max_length=max_length, batch_size=batch_size, best=best, predictions_path=predictions,
                              base=base, force=force)
    if json_out:
        console.emit_json(metrics)
    else:
        for k, v in metrics.items():
            typer.echo(f"{k}\t{v:.4f}" if isinstance(v, float) else f"{k}\t{v}")


@app.command(cls=PlainHelp, short_help="merge an adapter into its base model, or export it as a PEFT LoRA")
@user_errors
def merge(
    run_dir: Annotated[str, typer.Argument(metavar="RUN_DIR", help="a run dir of `lrft train`, or a PEFT LoRA adapter dir")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="where to write the merged model (or PEFT adapter)")],
    format: Annotated[str, typer.Option(
        metavar="hf|peft", help="hf: a merged model dir; peft: the adapter as a standard PEFT LoRA dir")] = "hf",
    dtype: Annotated[str | None, typer.Option(
        metavar="DTYPE", help="float32, bfloat16 or float16 (default: the base model's)")] = None,
    task: Annotated[str | None, typer.Option(
        metavar="TASK", help="PEFT adapter dirs: the task of its parity data, e.g. glue/mrpc")] = None,
    base: Annotated[str | None, typer.Option(
        metavar="MODEL", help="PEFT adapter dirs: the base model (default: the one it names)")] = None,
    data_path: Annotated[str | None, typer.Option(
        "--data-path", metavar="DIR", help="dir with the parity data (default: the data the run trained on)")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="replace --out if it exists; use a base model whose weights differ from the adapter's")] = False,
    json_out: JsonOpt = False,
):
    """Fold the adapter into the base weights (an HF model dir, parity checked) or export it in PEFT's format."""
    if format not in ("hf", "peft"):
        raise LrftError(f"--format: unknown {format!r}; choose hf (a merged model) or peft (a PEFT LoRA adapter)")
    from lrft.merge import export_run, merge_run, parity_lines
    from lrft.peft_format import export_lines

    if format == "peft":
        if dtype is not None:
            raise LrftError("--dtype: a PEFT export keeps the adapter in float32; drop --dtype or use --format hf")
        report = export_run(run_dir, out, force=force)
    else:
        report = merge_run(run_dir, out, dtype=dtype, force=force, task=task, base=base, data_path=data_path)
    if json_out:
        console.emit_json(report)
    else:
        console.emit_lines(export_lines(report) if format == "peft" else parity_lines(report))


@app.command("count-params", cls=PlainHelp, short_help="count a method's trainable parameters from a model's config")
@user_errors
def count_params_cmd(
    method: Annotated[str, typer.Option(metavar="METHOD", help="lora, tlora, talora, lorta, or full (full fine-tuning)")],
    rank: Annotated[int, typer.Option(metavar="R", help="rank r")] = 8,
    model: Annotated[str, typer.Option(
        metavar="MODEL", help="preset (roberta-base, roberta-large, llama2-7b, t5-base), model dir or hub id")] = "roberta-large",
    targets: Annotated[str | None, typer.Option(metavar="NAMES", help=(
        "comma-separated target module names (default: the model family's query and value projections)"))] = None,
    num_labels: Annotated[int, typer.Option("--num-labels", metavar="N", min=1, max=MAX_LABELS,
                                            help="classification labels of the head")] = 2,
    calibrated: Annotated[Path | None, typer.Option("--calibrated", metavar="RUN_DIR", help=(
        "a finished run dir: its exact count (talora's calibrated per-module ranks)"))] = None,
    json_out: JsonOpt = False,
):
    """Count trainable parameters of a method on a model, from its config alone (no weights)."""
    from lrft import methods
    from lrft.params import count_params, count_run, render

    if method != "full":
        methods.get(method)
    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    if calibrated is not None:
        counts = count_run(calibrated)
        if counts["method"] != method:
            raise LrftError(f"--calibrated: {calibrated} is a {counts['method']} run, not {method}; give the run dir of a "
                         f"{method} run")
    else:
        counts = count_params(method, rank, model, names, num_labels)
    if json_out:
        console.emit_json(counts)
    else:
        typer.echo(render(counts))


@app.command(cls=PlainHelp, short_help="write a commented recipe")
@user_errors
def init(
    method: Annotated[str, typer.Option(metavar="METHOD", help="lora, tlora, talora or lorta")] = "tlora",
    task: Annotated[str, typer.Option(metavar="TASK", help="task, e.g. glue/mrpc, gsm8k")] = "glue/mrpc",
    model: Annotated[str, typer.Option(metavar="MODEL", help="model alias, dir or hub id")] = "minilm",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE", help="file to write (default: stdout)")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
):
    """Write a commented recipe for a method, task and model."""
    from lrft import methods
    from lrft.data import get_task
    from lrft.files import atomic_write_text, check_writable
    from lrft.guard import check_output
    from lrft.recipe import commented_yaml, validate

    m = methods.get(method)
    if output is not None:
        check_output(output, "--output")
        check_writable(output, "--output", kind="file")
    if output is not None and output.exists() and not force:
        raise LrftError(f"--output: {output} already exists; pass --force to overwrite it")
    name = output.stem if output is not None else f"{task.replace('/', '_')}_{method}"
    recipe = validate({"name": name, "model": {"name": model}, "data": {"task": task},
                       "adapter": {"method": method, "params": {}}, "train": {"lr": m.suggested_lr}})
    if get_task(task).problem != "causal_lm":  # the head's own lr, written out so a changed lr leaves it be
        recipe.train.head_lr = recipe.train.head_learning_rate
    text = commented_yaml(recipe, [
        f"lrft recipe: {m.summary}",
        f"run:       lrft train {output or 'recipe.yaml'}",
        f"override:  lrft train {output or 'recipe.yaml'} train.lr=1e-3 adapter.params.rank=16",
    ])
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)
        console.emit_lines([f"wrote {output}"])


@app.command(cls=PlainHelp, short_help="spectra, norms and plots of a run's updates; compare two runs")
@user_errors
def analyze(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run dir of `lrft train`")],
    against: Annotated[Path | None, typer.Option(
        "--against", metavar="RUN_DIR", help="another run on the same base model to compare with")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="DIR", help="where to write the analysis (default: RUN_DIR/analysis)")] = None,
    module: Annotated[str | None, typer.Option("--module", metavar="NAME", help=(
        "module for the element-wise ΔW (difference) heatmap (default: the first in common)"))] = None,
    modules: Annotated[str | None, typer.Option("--modules", metavar="SUBSTRINGS", help=(
        "analyse only modules whose name contains one of these comma-separated substrings"))] = None,
    json_out: JsonOpt = False,
):
    """Spectra, norms, histograms and training curves of a run's updates ΔW; similarities against another run."""
    from lrft.analysis import analyze as run_analysis

    result = run_analysis(run_dir, against, out, module, modules)
    if json_out:
        console.emit_json(result)
        return
    typer.echo(f"report\t{Path(result['out']) / 'report.html'}")
    for name, m in result["run"]["modules"].items():
        typer.echo(f"{name}\t‖ΔW‖_F {m['fro_norm']:.4g}\teffective rank {m['effective_rank']:.3g}")
    if against is not None:
        for key, value in (("cosine", result["cosine"]["mean"]), ("subspace φ left", result["subspace"]["left"]["mean"]),
                           ("subspace φ right", result["subspace"]["right"]["mean"]),
                           ("relative Frobenius distance", result["rel_frobenius"]["mean"])):
            typer.echo(f"mean {key}\t{'—' if value is None else f'{value:.4f}'}")


@app.command(cls=PlainHelp, short_help="search recipe settings for the smallest adapter that still works")
@user_errors
def sweep(
    specs: Annotated[list[Path], typer.Argument(metavar="SPEC", help="sweep spec YAML file(s); several run one after "
                                                                     "another and report together")],
    plan: Annotated[bool, typer.Option("--plan", help="print one `lrft train` command per run (for a job array or "
                                                      "xargs -P) and train nothing")] = False,
    report: Annotated[bool, typer.Option("--report", help="train nothing: report the run dirs there are")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the report as a Markdown section")] = False,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", metavar="POINTS", min=0, help="the smallest adapter within this many points of the best (metric × 100; loss "
                                   "and perplexity as they are)")] = 1.0,
    plot: Annotated[Path | None, typer.Option(
        "--plot", metavar="FILE", help="where to write the Pareto plot (default: pareto.png in the sweep dir)")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", metavar="N", min=1, help="start this many worker processes on the sweep (they split its trials)")] = 1,
    json_out: JsonOpt = False,
):
    """Search recipe settings (optuna: grid or TPE, pruning on per-epoch evaluations) for the smallest adapter
    that still works; rerunning resumes it."""
    from lrft.sweep import load_sweeps, plan_commands, run_sweeps, run_workers
    from lrft.sweep.report import build, render_markdown, render_text

    if plan and (report or markdown or json_out or workers > 1):
        raise LrftError("--plan prints commands only; drop --report, --markdown, --json and --workers with it")
    if report and workers > 1:
        raise LrftError("--workers trains a sweep; drop it with --report")
    if markdown and json_out:
        raise LrftError("--markdown and --json: choose one")
    sweeps = load_sweeps(specs)
    if plan:
        for command in plan_commands(sweeps):
            typer.echo(command)
        return
    if not (report or markdown):
        if workers > 1:
            code = run_workers(specs, workers)
            if code != 0:
                raise typer.Exit(code)
        else:
            with training_stops():
                run_sweeps(sweeps)
    result = build(sweeps, tolerance, plot)
    if json_out:
        console.emit_json(result)
    else:
        sys.stdout.write(render_markdown(result, [str(s) for s in specs]) if markdown else render_text(result))


def main() -> None:
    app(prog_name="lrft")
