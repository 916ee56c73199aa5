"""The GSM8K recipe's evaluation (response loss plus greedy generation of its 50 test problems), timed
whole, as it was and as it is: `model.generate` in batches of eval_batch_size (every row computed until
the batch's last one stops, the cache concatenated anew each step), lrft.decoding in the same batches
(finished rows leave the batch, the cache filled in place), and lrft.decoding in the recipe's
generation_batch_size, at fp32 (the eval_precision default) and under bf16 autocast (eval_precision
auto where the device computes bf16, or bf16). Paths alternate round by round; seconds of each,
ratios to the first, and how many completions are identical to its.

    LRFT_DATA_DIR=../shared/data python bench/eval_speed.py [--recipe recipes/gsm8k_lora.yaml] [--rounds 2] [--json]

Everything else is the recipe's: model, problems, max_length, up to max_new_tokens new tokens, stopping at
EOS or once the `#### N` answer line is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "gsm8k_lora.yaml"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from lrft import decoding
    from lrft.data import collator, get_task, load_task_data
    from lrft.evaluation import eval_sets, evaluate
    from lrft.models import load_for_causal_lm
    from lrft.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    train = recipe.train
    task = get_task(recipe.data.task)
    data = load_task_data(task, recipe.data, need_train=False)
    model, tokenizer = load_for_causal_lm(recipe.model)
    evals = eval_sets(task, data.evals, tokenizer, recipe.data.max_length)
    shrinks = decoding.shrinks
    generation_batch = train.generation_batch_size or train.eval_batch_size
    paths = {  # name: (decoder, generation batch, bf16 autocast)
        "generate": (lambda model: False, train.eval_batch_size, False),
        "decoding": (shrinks, train.eval_batch_size, False),
        "decoding_recipe_batch": (shrinks, generation_batch, False),
        "decoding_recipe_batch_bf16": (shrinks, generation_batch, True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    outputs = {}
    for _ in range(args.rounds):
        for name, (decoder, batch, bf16) in paths.items():
            decoding.shrinks = decoder
            t0 = time.perf_counter()
            outputs[name] = evaluate(
                model,
                evals,
                task,
                collator(task, tokenizer),
                batch_size=train.eval_batch_size,
                generation_batch_size=batch,
                autocast=(lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None,
                tokenizer=tokenizer,
                max_new_tokens=recipe.data.max_new_tokens,
                generation=True,
            )
            seconds[name].append(time.perf_counter() - t0)
    decoding.shrinks = shrinks
    median = {k: statistics.median(v) for k, v in seconds.items()}
    before_metrics, before_records = outputs["generate"]
    result = {
        "model": recipe.model.name,
        "recipe": Path(args.recipe).name,
        "problems": len(before_records),
        "batches": {name: batch for name, (_, batch, _) in paths.items()},
        "bf16": {name: bf16 for name, (_, _, bf16) in paths.items()},
        "seconds": seconds,
        "median_s": median,
        "ratio": {k: v / median["generate"] for k, v in median.items()},
        "identical_completions": {
            name: sum(a["completion"] == b["completion"] for a, b in zip(before_records, records))
            for name, (_, records) in outputs.items()
        },
        "metrics": {name: metrics for name, (metrics, _) in outputs.items()},
        "completion_tokens": sum(len(tokenizer(r["completion"])["input_ids"]) for r in before_records),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in paths:
            print(
                f"{name} (batch {result['batches'][name]}): {median[name]:.1f} s (×{result['ratio'][name]:.2f}), "
                f"identical completions {result['identical_completions'][name]}/{result['problems']}, "
                f"{result['metrics'][name]}"
            )
    return result


if __name__ == "__main__":
    main()
