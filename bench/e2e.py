"""Whole jobs, lrft against what users run instead (HF Trainer + PEFT), with the same hyperparameters.

    LRFT_DATA_DIR=../shared/data python bench/e2e.py                        # every job, 2 alternating rounds
    LRFT_DATA_DIR=../shared/data python bench/e2e.py --job mrpc --rounds 3 --json
    LRFT_DATA_DIR=../shared/data python bench/e2e.py --smoke                # a few steps of each: does it run

A job is everything from the command to its outputs: loading the model and the data, tokenization,
training, the evaluations, checkpoints and saving. Each run is a process of its own (its peak RSS is
its own), runs alternate lrft / Trainer round by round so that drifts of a shared machine hit both,
and the report gives each side's median wall-clock, quality and peak RSS, and the ratios lrft/Trainer.

- mrpc: MiniLM, LoRA r 8 (α 16) on query and value, lr 5e-4, batch 32, 3 epochs, linear schedule
  with 6 % warmup, max length 128, an evaluation on the dev set after every epoch, a checkpoint per
  epoch; accuracy.
- mrpc-grouped: the same with batches of similar lengths on both sides (lrft `train.group_by_length`,
  Trainer `group_by_length`): what padding costs.
- gsm8k: the recipe recipes/gsm8k_lora.yaml (SmolLM2-135M, LoRA r 8 on every projection, 256 problems,
  batch 8, length 320, cosine schedule), evaluated before and after (response perplexity on the first
  50 test problems, greedy generation with exact match); the Trainer side evaluates with
  `trainer.evaluate` and generates with `model.generate`, batch 25, left padding.

Time to accuracy: each side prints a line per evaluation (lrft's `eval step N: ...` log, a Trainer
callback's line of the same form), timed as it arrives; a classification job reports the minutes until
the dev accuracy first reaches `--target-accuracy` (default 0.734: LoRA r8's 3-epoch fp32 mean over
seeds 42, 1, 2 in docs/RESULTS.md's GLUE table), or that it never does.

Each job runs in comparisons (`--compare`): both sides at their defaults (lrft's `train.precision:
auto`, bf16 autocast on hardware that computes it, and fp32 evaluation, against the Trainer's fp32),
both at bf16 (the Trainer's `bf16=True`, which evaluates under bf16 autocast too; lrft's
`train.eval_precision=bf16` as well), or both at fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOBS = {
    "mrpc": {
        "recipe": "recipes/quickstart.yaml",
        "overrides": [
            "adapter.method=lora",
            "adapter.params={rank: 8, alpha: 16}",
            "train.lr=5e-4",
            "train.batch_size=32",
            "train.eval_batch_size=64",
            "train.epochs=3",
            "seed=42",
        ],
    },
    "gsm8k": {"recipe": "recipes/gsm8k_lora.yaml", "overrides": ["seed=42"]},
}
JOBS["mrpc-grouped"] = {**JOBS["mrpc"], "overrides": [*JOBS["mrpc"]["overrides"], "train.group_by_length=true"]}
SMOKE = {
    "mrpc": ["train.max_steps=3", "data.max_eval_samples=64"],
    "gsm8k": ["train.max_steps=2", "data.max_train_samples=16", "data.max_eval_samples=4", "data.max_new_tokens=8"],
}
SMOKE["mrpc-grouped"] = SMOKE["mrpc"]
# (lrft's overrides, the Trainer's bf16) of each comparison: both at their defaults (lrft's precision
# auto: bf16 autocast where the hardware computes it; the Trainer's fp32), both bf16, both fp32
COMPARISONS = {
    "defaults": ([], False),
    # the Trainer's bf16=True evaluates under bf16 autocast too (accelerate wraps its model's forward)
    "bf16": (["train.precision=bf16", "train.eval_precision=bf16"], True),
    "fp32": (["train.precision=fp32"], False),
}


EVAL_LINE = re.compile(r"eval step (\d+): .*?\baccuracy ([0-9.]+)")


def timed_run(command: list[str]) -> tuple[subprocess.CompletedProcess, float, list[dict]]:
    """(the finished process, its wall seconds, its evaluations: the seconds since the start at which
    each `eval step N: ... accuracy A` line reached its stderr, with N and A)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    err_lines, evals = [], []

    def read_stderr() -> None:
        for line in proc.stderr:
            err_lines.append(line)
            if m := EVAL_LINE.search(line):
                evals.append({"s": time.perf_counter() - t0, "step": int(m[1]), "accuracy": float(m[2])})

    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    wall = time.perf_counter() - t0
    return subprocess.CompletedProcess(command, proc.returncode, stdout, "".join(err_lines)), wall, evals


def lrft_job(job: str, work: Path, smoke: bool, compare: str) -> dict:
    """`lrft train` of the job in a process of its own; its summary gives quality and peak RSS."""
    overrides = [*JOBS[job]["overrides"], *(SMOKE[job] if smoke else []), f"output.dir={work}", f"name=lrft_{job}"]
    overrides += COMPARISONS[compare][0]
    done, wall, evals = timed_run([sys.executable, "-m", "lrft", "train", JOBS[job]["recipe"], *overrides, "--json"])
    if done.returncode != 0:
        raise SystemExit(f"lrft {job} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    out = {
        "side": "lrft",
        "job": f"{job} [{compare}]",
        "precision": summary["precision"]["train"],
        "wall_s": wall,
        "evals": evals,
        "peak_rss_mib": summary["peak_rss_mib"],
        **summary["final"],
        "phases_s": summary.get("seconds"),
    }  # where lrft's own wall time went (loading, training, evaluation, ...)
    if job == "gsm8k":
        first = json.loads((work / f"lrft_{job}" / "metrics.jsonl").read_text().splitlines()[0])
        out["exact_match_before"] = first.get("exact_match")
    return out


def trainer_job(job: str, work: Path, smoke: bool, compare: str) -> dict:
    """The same job with HF Trainer + PEFT, in a process of its own (this file with --trainer)."""
    bf16 = COMPARISONS[compare][1]
    done, wall, evals = timed_run(
        [sys.executable, __file__, "--trainer", job, "--work", str(work)]
        + (["--smoke"] if smoke else [])
        + (["--bf16"] if bf16 else [])
    )
    if done.returncode != 0:
        raise SystemExit(f"Trainer {job} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "side": "trainer",
        "job": f"{job} [{compare}]",
        "precision": "bf16" if bf16 else "fp32",
        "wall_s": wall,
        "evals": evals,
        **result,
    }


# ------------------------------------------------------------------------- the Trainer + PEFT side


def settings(job: str, smoke: bool):
    """The job's recipe as lrft reads it: the Trainer side takes its hyperparameters and data from it."""
    from lrft.recipe import load_recipe

    return load_recipe(ROOT / JOBS[job]["recipe"], [*JOBS[job]["overrides"], *(SMOKE[job] if smoke else [])])


def run_trainer(job: str, work: Path, smoke: bool, bf16: bool) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lrft.data import collator, features, get_task, load_task_data
    from lrft.models import load_model

    recipe = settings(job, smoke)
    task = get_task(recipe.data.task)
    data = load_task_data(task, recipe.data)
    model, tokenizer = load_model(recipe.model, task, data.label_names)
    causal = task.problem == "causal_lm"
    params = recipe.adapter.params
    model = get_peft_model(
        model,
        LoraConfig(
            r=params.rank,
            lora_alpha=params.alpha,
            lora_dropout=0.0,
            target_modules=recipe.adapter.target_modules,
            task_type="CAUSAL_LM" if causal else "SEQ_CLS",
        ),
    )
    train = features(data.train, tokenizer, recipe.data.max_length, "training examples")
    dev = features(data.evals[""], tokenizer, recipe.data.max_length, "evaluation examples")
    cfg = recipe.train
    steps = cfg.max_steps or cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    args = TrainingArguments(
        output_dir=str(work / f"trainer_{job}"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=math.ceil(cfg.warmup_ratio * steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.log_every,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        # as lrft: a classifier is evaluated after every epoch; the causal job before and after training
        eval_strategy="no" if causal else "epoch",
        save_strategy="epoch",
        save_total_limit=1,
        seed=recipe.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,  # autocast, as lrft's train.precision bf16
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
    )

    def accuracy(pred) -> dict:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    class EvalLines(TrainerCallback):
        """A line per evaluation on stderr, as lrft logs it: the bench times each as it arrives."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in (metrics or {}).items())
            print(f"eval step {state.global_step}: {shown}", file=sys.stderr, flush=True)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=collator(task, tokenizer),
        compute_metrics=None if causal else accuracy,
        callbacks=[EvalLines()],
    )
    out = {}
    if causal:
        trainer.evaluate()
        out["exact_match_before"] = exact_match(
            model, tokenizer, data.evals[""], cfg.eval_batch_size, recipe.data.max_new_tokens
        )
        trainer.train()
        out["loss"] = trainer.evaluate()["eval_loss"]
        out["perplexity"] = math.exp(out["loss"])
        out["exact_match"] = exact_match(
            model, tokenizer, data.evals[""], cfg.eval_batch_size, recipe.data.max_new_tokens
        )
    else:
        trainer.train()
        last = [r for r in trainer.state.log_history if "eval_loss" in r][-1]  # the evaluation after the last epoch
        out.update(loss=last["eval_loss"], accuracy=last["eval_accuracy"])
    trainer.save_model(str(work / f"trainer_{job}" / "final"))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def exact_match(model, tokenizer, split, batch_size: int, max_new_tokens: int) -> float:
    """Greedy answers to the split's problems, batched and left-padded, scored on the final number."""
    import torch

    from lrft.data.causal import prompt_features

    prompts = prompt_features(split, tokenizer)
    model.eval()
    correct = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [p["prompt_ids"] for p in chunk]}, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        texts = tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(p["format"].correct(p["format"].extract(t), p["gold"]) for t, p in zip(texts, chunk))
    model.train()
    return correct / len(prompts)


# --------------------------------------------------------------------------------------- the report


def time_to_accuracy(evals: list[dict], target: float) -> float | None:
    """Seconds until the first evaluation at or above `target` (None: none reached it)."""
    return next((e["s"] for e in evals if e["accuracy"] >= target), None)


def summarise(rows: list[dict], target: float) -> list[dict]:
    out = []
    for job in dict.fromkeys(r["job"] for r in rows):
        sides = {side: [r for r in rows if r["job"] == job and r["side"] == side] for side in ("lrft", "trainer")}
        med = {
            side: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_mib")}
            for side, rs in sides.items()
        }
        quality = "perplexity" if job.startswith("gsm8k") else "accuracy"
        out.append(
            {
                "job": job,
                "runs": len(sides["lrft"]),
                "precision": {side: rs[0]["precision"] for side, rs in sides.items()},
                "quality": quality,
                "lrft": {**med["lrft"], quality: statistics.median(r[quality] for r in sides["lrft"])},
                "trainer": {**med["trainer"], quality: statistics.median(r[quality] for r in sides["trainer"])},
                "wall_ratio": med["lrft"]["wall_s"] / med["trainer"]["wall_s"],
                "rss_ratio": med["lrft"]["peak_rss_mib"] / med["trainer"]["peak_rss_mib"],
            }
        )
        if quality == "perplexity":  # and the answers' exact match, before and after training
            for side, rs in sides.items():
                for key in ("exact_match_before", "exact_match"):
                    out[-1][side][key] = statistics.median(r[key] for r in rs)
        if quality == "accuracy":  # each round's time to the target (None: never reached), per side
            out[-1]["target_accuracy"] = target
            for side, rs in sides.items():
                out[-1][side]["time_to_accuracy_s"] = [time_to_accuracy(r["evals"], target) for r in rs]
    return out


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", choices=list(JOBS), help="one job (default: all)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of lrft and Trainer per job")
    ap.add_argument("--smoke", action="store_true", help="a few steps of each job on small subsets")
    ap.add_argument(
        "--compare",
        action="append",
        choices=list(COMPARISONS),
        help="defaults (each at its own), bf16 or fp32 (both so); repeatable (default: defaults and bf16)",
    )
    ap.add_argument(
        "--target-accuracy", type=float, default=0.734, help="time-to-accuracy target (LoRA r8's 3-epoch fp32 mean)"
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trainer", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trainer:
        print(json.dumps(run_trainer(args.trainer, Path(args.work), args.smoke, args.bf16)))
        return {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in [args.job] if args.job else list(JOBS):
            for compare in args.compare or ["defaults", "bf16"]:
                for rnd in range(args.rounds):
                    for side, run in (("lrft", lrft_job), ("trainer", trainer_job)):
                        rows.append(run(job, Path(tmp) / f"{side}{rnd}{compare}", args.smoke, compare))
                        print(
                            f"[e2e] {job} [{compare}] round {rnd} {side} ({rows[-1]['precision']}): "
                            f"{rows[-1]['wall_s']:.0f} s, "
                            f"{rows[-1]['peak_rss_mib']:.0f} MiB",
                            file=sys.stderr,
                            flush=True,
                        )
    result = {"smoke": args.smoke, "rows": rows, "summary": summarise(rows, args.target_accuracy)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for s in result["summary"]:
            q = s["quality"]
            print(
                f"{s['job']}: lrft {s['lrft']['wall_s']:.0f} s, {s['lrft']['peak_rss_mib']:.0f} MiB, {q} "
                f"{s['lrft'][q]:.4f} | Trainer+PEFT {s['trainer']['wall_s']:.0f} s, {s['trainer']['peak_rss_mib']:.0f} "
                f"MiB, {q} {s['trainer'][q]:.4f} | wall ×{s['wall_ratio']:.2f}, memory ×{s['rss_ratio']:.2f}"
            )
            if "target_accuracy" in s:
                shown = {
                    side: ", ".join("never" if t is None else f"{t:.0f} s" for t in s[side]["time_to_accuracy_s"])
                    for side in ("lrft", "trainer")
                }
                print(
                    f"  to {s['target_accuracy']:.3f} accuracy: lrft {shown['lrft']} | Trainer+PEFT {shown['trainer']}"
                )
    return result


if __name__ == "__main__":
    main()
