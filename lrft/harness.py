"""`lrft eval --harness`: EleutherAI's lm-evaluation-harness run on the model lrft opened, in memory.

The adapted model (a run's or a PEFT dir's adapters on their base, any method) or a plain model is
handed to the harness's Hugging Face wrapper as it is, with its tokenizer: nothing is merged or written
to disk, so what is scored is exactly what `lrft eval` scores. Tasks are the harness's own (they fetch
their datasets from the hub) or those of local task YAML files (`--harness-include DIR`), which is how
the harness runs offline on files such as ../shared/data/commonsense (docs/evaluation.md shows one).
"""

from __future__ import annotations

from pathlib import Path

from lrft import console
from lrft.errors import LrftError, did_you_mean


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    include: Path | None = None,
    limit: int | None = None,
    chat_template: bool = False,
    seed: int = 0,
) -> dict:
    """The harness's results (its `results`, `versions`, `n-shot` and `configs` keys) of `tasks` on the model."""
    harness, task_manager = _harness(include)
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" or in {include}" if include else " (local task YAMLs: --harness-include DIR)"
        raise LrftError(f"--harness: {unknown[0]!r} is not a task of lm-eval{where}{did_you_mean(unknown[0], known)}")
    from lm_eval.models.huggingface import HFLM

    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    console.log(f"harness: lm-eval on {', '.join(tasks)}" + (f", {num_fewshot}-shot" if num_fewshot else ""))
    results = harness.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        apply_chat_template=chat_template,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return results


def metrics(results: dict) -> dict[str, float]:
    """The harness's numbers flat, as `lrft eval --json` prints them: "<task>/<metric>" (its filter
    named after a comma, "acc,none" → "acc"), standard errors left out."""
    out = {}
    for task, values in results["results"].items():
        reported = results.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if metric in reported and isinstance(value, (int, float)):
                out[f"{task}/{metric if filt in ('', 'none') else f'{metric}[{filt}]'}"] = float(value)
    return out


def table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def _harness(include: Path | None):
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LrftError("--harness: lm-eval is not installed; pip install lm-eval") from None
    if include is not None and not Path(include).is_dir():
        raise LrftError(f"--harness-include: no directory at {include}; name a dir of lm-eval task YAML files")
    return lm_eval, TaskManager(include_path=str(include) if include else None, verbosity="ERROR")
