"""Generation in evaluation, before and after lrft.decoding: the same GSM8K problems answered greedily by
`model.generate` (every row of a batch computed until the last one stops) and by the shrinking batch
(finished rows leave it), alternating round by round; seconds of each, their ratio, and whether the
completions are identical.

    LRFT_DATA_DIR=../shared/data python bench/eval_speed.py [--model smollm2] [--problems 50] [--rounds 2] [--json]

The settings are recipes/gsm8k_lora.yaml's: batch 25, up to 256 new tokens, prompts sorted by length,
stopping at EOS or once the `#### N` answer line is written.
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
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--problems", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from lrft import decoding
    from lrft.data import get_task, load_task_data
    from lrft.data.causal import prompt_features
    from lrft.evaluation import generate
    from lrft.models import load_for_causal_lm
    from lrft.recipe import DataConfig, ModelConfig

    task = get_task("gsm8k")
    data = load_task_data(task, DataConfig(task="gsm8k", max_eval_samples=args.problems))
    model, tokenizer = load_for_causal_lm(ModelConfig(name=args.model))
    prompts = prompt_features(data.evals[""], tokenizer)
    shrinks = decoding.shrinks
    seconds: dict[str, list[float]] = {"generate": [], "shrinking": []}
    records = {}
    for _ in range(args.rounds):
        for path in seconds:
            decoding.shrinks = shrinks if path == "shrinking" else (lambda model: False)
            t0 = time.perf_counter()
            records[path] = generate(
                model,
                prompts,
                tokenizer,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                device="cpu",
                answer_written=task.answer_written,
            )
            seconds[path].append(time.perf_counter() - t0)
    same = [a["completion"] == b["completion"] for a, b in zip(records["generate"], records["shrinking"])]
    result = {
        "model": args.model,
        "problems": len(prompts),
        "seconds": seconds,
        "median_s": {k: statistics.median(v) for k, v in seconds.items()},
        "ratio": statistics.median(seconds["shrinking"]) / statistics.median(seconds["generate"]),
        "identical_completions": sum(same),
        "correct": {k: sum(r["correct"] for r in v) for k, v in records.items()},
        "completion_tokens": sum(len(tokenizer(r["completion"])["input_ids"]) for r in records["shrinking"]),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        m = result["median_s"]
        print(
            f"{result['problems']} problems: model.generate {m['generate']:.1f} s, shrinking batch "
            f"{m['shrinking']:.1f} s (×{result['ratio']:.2f}); identical completions "
            f"{result['identical_completions']}/{result['problems']}"
        )
    return result


if __name__ == "__main__":
    main()
