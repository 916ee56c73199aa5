"""A DPO training step of lrft against TRL's DPOTrainer + PEFT LoRA, on the same real preference batches.

    LRFT_DATA_DIR=../shared/data python bench/dpo.py                      # SmolLM2, HH pairs, LoRA r8, 4 pairs a step
    LRFT_DATA_DIR=../shared/data python bench/dpo.py --steps 6 --batch-size 8 --json

Four variants, each in a process of its own (so each one's peak RSS is its own): lrft with the
reference computed each step with the adapters off, lrft with the reference's log-probs precomputed
(what `train.dpo.reference: auto` picks for a whole epoch), TRL's DPOTrainer with `peft_config` (its
reference: the same model with the adapter disabled) and TRL with the reference's log-probs given in
the batch (what its `precompute_ref_log_probs` does). The same SmolLM2, the same LoRA (rank 8, α 16,
the seven projections, no dropout), the same token ids (pairs tokenized and cut by lrft: prompt ≤ 128,
pair ≤ 256 tokens), sigmoid loss, β 0.1, AdamW, fp32, no gradient checkpointing on both sides (TRL's
own defaults are bf16 and checkpointing; equal settings are compared here). The step is forward,
backward and the optimizer's step; the first step of each variant is a warm-up and not timed. Printed:
median step time, peak RSS, the loss of the first step (the same on every variant: a check that they
compute the same thing), and each lrft variant's ratio to TRL's of the same reference kind.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrft.data import collator, features, get_task, load_task_data  # noqa: E402
from lrft.inject import adapters_off, inject, set_head_trainable  # noqa: E402
from lrft.loss import sequence_logps  # noqa: E402
from lrft.methods import get  # noqa: E402
from lrft.methods.base import BuildContext  # noqa: E402
from lrft.models import load_model  # noqa: E402
from lrft.preference import DPOSettings, PreferenceLoss  # noqa: E402
from lrft.recipe import DataConfig, ModelConfig  # noqa: E402
from lrft.targets import find_targets  # noqa: E402

VARIANTS = ("lrft", "lrft_precomputed", "trl", "trl_precomputed")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, BETA, LR = 8, 16, 0.1, 5e-4


def pair_batches(tokenizer, steps: int, batch_size: int) -> list[list[dict]]:
    """The first steps·batch_size HH training pairs, tokenized and cut as `lrft train` does."""
    task = get_task("preference")
    data = load_task_data(task, DataConfig(task="preference", max_length=256, max_prompt_length=128))
    pairs = features(data.train.head(steps * batch_size), tokenizer, 256, "benchmark pairs", 128)
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)][:steps]


def lrft_step(model, pairs: list[list[dict]], collate, precomputed: bool):
    """lrft's LoRA on the model; returns a step function over batch indices."""
    found = find_targets(model, TARGETS)
    method = get("lora")
    inject(model, found, method.build(found, method.params(rank=RANK, alpha=ALPHA, dropout=0.0), BuildContext(seed=0)))
    set_head_trainable(model, False)
    objective = PreferenceLoss(DPOSettings(beta=BETA))
    batches = [collate(b) for b in pairs]
    if precomputed:  # outside the timing, as `lrft train` does once before its first step
        with torch.no_grad(), adapters_off(model):
            for batch in batches:
                batch["ref_logps"] = sequence_logps(model, model, batch)[0].double()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(i: int) -> float:
        loss = objective.loss(model, model, batches[i])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def trl_step(model, tokenizer, pairs: list[list[dict]], precomputed: bool):
    """TRL's DPOTrainer with the same LoRA (peft_config); returns a step function over batch indices."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir="/tmp/lrft-bench-trl",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        beta=BETA,
        max_length=256,
        learning_rate=LR,
    )
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    dummy = Dataset.from_dict({"prompt": ["hi"], "chosen": [" yes"], "rejected": [" no"]})
    trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tokenizer, peft_config=lora)
    model = trainer.model
    batches = [trainer.data_collator([_trl_feature(p) for p in b]) for b in pairs]
    if precomputed:
        for batch in batches:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = trainer.compute_ref_log_probs(model, batch)
        trainer.precompute_ref_logps = True
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(i: int) -> float:
        loss = trainer.compute_loss(model, batches[i])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _trl_feature(pair: dict) -> dict:
    """An lrft pair as TRL's collator takes it: the prompt's ids and each completion's."""
    prompt_len = next(i for i, t in enumerate(pair["chosen_labels"]) if t != -100)
    return {
        "prompt_ids": pair["chosen_input_ids"][:prompt_len],
        "chosen_ids": pair["chosen_input_ids"][prompt_len:],
        "rejected_ids": pair["rejected_input_ids"][prompt_len:],
    }


def run_variant(name: str, steps: int, batch_size: int) -> dict:
    """One variant in this process: its step times, first loss, peak RSS."""
    torch.manual_seed(0)
    model, tokenizer = load_model(ModelConfig(name="smollm2"), get_task("preference"), None)
    pairs = pair_batches(tokenizer, steps, batch_size)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    precomputed = name.endswith("_precomputed")
    if name.startswith("lrft"):
        step = lrft_step(model, pairs, collator(get_task("preference"), tokenizer), precomputed)
    else:
        step = trl_step(model, tokenizer, pairs, precomputed)
    times, losses = [], []
    for i in range(len(pairs)):
        t0 = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - t0)
    return {
        "variant": name,
        "median_step_s": statistics.median(times[1:]),
        "first_loss": losses[0],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mib": rss_loaded,
        "pairs_per_step": batch_size,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per variant (the first is a warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args.steps, args.batch_size)))
        return
    rows = {}
    for name in args.variants.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for name, row in rows.items():
        twin = "trl" + name.removeprefix("lrft")
        if name.startswith("lrft") and twin in rows:
            row["step_vs_trl"] = row["median_step_s"] / rows[twin]["median_step_s"]
            row["peak_rss_vs_trl"] = row["peak_rss_mib"] / rows[twin]["peak_rss_mib"]
    if "lrft_precomputed" in rows and "trl" in rows:
        rows["lrft_precomputed"]["step_vs_trl_on_the_fly"] = (
            rows["lrft_precomputed"]["median_step_s"] / rows["trl"]["median_step_s"]
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'variant':<18} {'step s':>8} {'peak RSS MiB':>13} {'first loss':>11} {'vs TRL':>7} {'RSS vs TRL':>10}")
    for name, r in rows.items():
        ratio = f"{r['step_vs_trl']:.2f}" if "step_vs_trl" in r else "-"
        rss = f"{r['peak_rss_vs_trl']:.2f}" if "peak_rss_vs_trl" in r else "-"
        print(
            f"{name:<18} {r['median_step_s']:>8.3f} {r['peak_rss_mib']:>13.0f} {r['first_loss']:>11.6f} {ratio:>7} {rss:>10}"
        )
    if "step_vs_trl_on_the_fly" in rows.get("lrft_precomputed", {}):
        print(f"lrft precomputed vs TRL on the fly: {rows['lrft_precomputed']['step_vs_trl_on_the_fly']:.2f}")


if __name__ == "__main__":
    main()
