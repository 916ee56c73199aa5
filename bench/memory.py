"""Memory levers measured: peak memory and step time with and without `train.gradient_checkpointing`
and `train.group_by_length`, each variant in a process of its own (peak RSS is per process).

    LRFT_DATA_DIR=../shared/data python bench/memory.py                 # MiniLM on MRPC, SmolLM2 at 1024 tokens
    LRFT_DATA_DIR=../shared/data python bench/memory.py --only minilm --steps 8 --json
    LRFT_DATA_DIR=../shared/data python bench/memory.py --only smollm2-gsm8k --variant plain --variant fp32 \
        --variant nf4 --variant nf4_fp32 --json          # precision and QLoRA on the GSM8K recipe

Each variant runs lrft's own training path (`Trainer.setup`, then `optimizer_step` on the first
batches of an epoch) and reports its peak RSS (on a GPU also the peak allocated memory), the median
step time, and the padding share of its batches (the tokens a step computes that are padding).
SmolLM2 trains on sequences of 1024 tokens: real GSM8K problems joined into one long instruction.
Checkpointing acts on the activations kept for backward; the LM head's logits (49,152 per token) are
not among them and are the other large share of a causal LM's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKLOADS = {
    # name: (recipe, overrides)
    "minilm": ("recipes/quickstart.yaml", ["adapter.method=lora", "adapter.params={rank: 8}", "train.batch_size=32"]),
    "smollm2-1024": (
        "recipes/gsm8k_lora.yaml",
        ["data.task=instruction", "data.max_length=1024", "train.batch_size=2", "train.eval_on_start=false"],
    ),
}
WORKLOADS["smollm2-gsm8k"] = ("recipes/gsm8k_lora.yaml", ["train.eval_on_start=false"])  # the recipe as it is
LEVERS = {
    "plain": [],
    "gradient_checkpointing": ["train.gradient_checkpointing=true"],
    "group_by_length": ["train.group_by_length=true"],
    # precision and QLoRA (`--variant fp32 --variant nf4 ...`); "plain" is train.precision's default, auto
    "fp32": ["train.precision=fp32"],
    "nf4": ["model.quantize=nf4"],
    "nf4_fp32": ["model.quantize=nf4", "train.precision=fp32"],
    "nf4_checkpointing": ["model.quantize=nf4", "train.gradient_checkpointing=true"],
}
DEFAULT_VARIANTS = ("plain", "gradient_checkpointing", "group_by_length")


def long_instructions(directory: Path, examples: int = 64, per_example: int = 6) -> Path:
    """Instruction data of ~1024-token examples: `per_example` real GSM8K problems and their worked
    answers per example, the last answer as the response to learn."""
    data_dir = Path(os.environ["LRFT_DATA_DIR"]) / "gsm8k"
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    out = []
    for i in range(examples):
        chunk = rows[i * per_example : (i + 1) * per_example]
        context = "\n\n".join(f"Q: {r['question']}\nA: {r['answer']}" for r in chunk[:-1])
        out.append({"instruction": f"{context}\n\nQ: {chunk[-1]['question']}", "output": chunk[-1]["answer"]})
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    return directory


def child(spec: dict) -> dict:
    """One variant, in this process: set up lrft's trainer and time its first optimizer steps."""
    import torch

    from lrft.recipe import load_recipe
    from lrft.training import Trainer

    recipe = load_recipe(ROOT / spec["recipe"], spec["overrides"])
    trainer = Trainer(recipe)
    trainer.setup()
    trainer.plan.model.train()
    batches = trainer.epoch_batches(0)[: spec["steps"]]
    lengths = [len(f["input_ids"]) for f in trainer.plan.features]
    padding = [1 - sum(lengths[i] for i in b) / (max(lengths[i] for i in b) * len(b)) for b in trainer.epoch_batches(0)]
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        trainer.optimizer_step(batch)
        times.append(time.perf_counter() - t0)
    out = {
        "variant": spec["variant"],
        "workload": spec["workload"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "median_step_s": statistics.median(times[1:] or times),
        "steps": len(times),
        "padding_share": statistics.mean(padding),
        "tokens_per_batch": statistics.mean(max(lengths[i] for i in b) * len(b) for b in batches),
    }
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_variant(workload: str, variant: str, steps: int, work: Path) -> dict:
    recipe, overrides = WORKLOADS[workload]
    overrides = [*overrides, *LEVERS[variant], f"output.dir={work / 'runs'}", f"name={workload}_{variant}"]
    if workload == "smollm2-1024":
        overrides.append(f"data.path={long_instructions(work / 'long')}")
    spec = {"workload": workload, "variant": variant, "recipe": recipe, "overrides": overrides, "steps": steps}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if done.returncode != 0:
        raise SystemExit(f"{workload}/{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=list(WORKLOADS), help="one workload")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant (the first is warm-up)")
    ap.add_argument(
        "--variant", action="append", choices=list(LEVERS), help=f"repeatable (default: {', '.join(DEFAULT_VARIANTS)})"
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in [args.only] if args.only else list(WORKLOADS):
            for variant in args.variant or DEFAULT_VARIANTS:
                rows.append(run_variant(workload, variant, args.steps, Path(tmp)))
                print(
                    f"[memory] {workload} {variant}: {rows[-1]['peak_rss_mib']:.0f} MiB, "
                    f"{rows[-1]['median_step_s']:.2f} s/step",
                    file=sys.stderr,
                    flush=True,
                )
    for row in rows:
        same = [r for r in rows if r["workload"] == row["workload"]]
        plain = next((r for r in same if r["variant"] == "plain"), same[0])  # the ratios' reference
        row["rss_ratio_to_plain"] = row["peak_rss_mib"] / plain["peak_rss_mib"]
        row["step_time_ratio_to_plain"] = row["median_step_s"] / plain["median_step_s"]
    result = {"threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("| workload | variant | peak RSS (MiB) | × plain | median step (s) | × plain | padding share |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(
                f"| {r['workload']} | {r['variant']} | {r['peak_rss_mib']:,.0f} | {r['rss_ratio_to_plain']:.2f} | "
                f"{r['median_step_s']:.2f} | {r['step_time_ratio_to_plain']:.2f} | {r['padding_share']:.1%} |"
            )
    return result


if __name__ == "__main__":
    main()
