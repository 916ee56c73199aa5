"""Training step time of lrft methods against PEFT LoRA, on the same real batches, in one process.

    LRFT_DATA_DIR=../shared/data python bench/speed.py                      # MiniLM on MRPC, rank 8
    python bench/speed.py --methods lora,tlora --rank 8 --rounds 5 --steps 4 --json

Each variant gets its own copy of the base model and an AdamW optimizer over its trainable params.
Variants run in rounds, alternating, so drifts of the machine (thermal, other load) hit all alike.
Reported per variant: median step time (forward + backward + optimizer step), tokens/s, memory
saved for backward (the activations a method keeps; the part of memory that differs between
methods), trainable params, and the ratio of the median step time to PEFT LoRA's.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrft import methods  # noqa: E402
from lrft.data import encode, get_task, load_task_data  # noqa: E402
from lrft.inject import adapter_modules, inject, set_head_trainable  # noqa: E402
from lrft.methods.base import BuildContext  # noqa: E402
from lrft.models import find_targets, load_for_classification  # noqa: E402
from lrft.recipe import DataConfig, ModelConfig  # noqa: E402


def real_batches(tokenizer, task_name: str, n_batches: int, batch_size: int, max_length: int):
    from transformers import DataCollatorWithPadding

    task = get_task(task_name)
    data = load_task_data(task, DataConfig(task=task_name, max_train_samples=n_batches * batch_size))
    feats = encode(data.train, tokenizer, max_length)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return [collate(feats[i:i + batch_size]) for i in range(0, len(feats), batch_size)][:n_batches]


def parse_variant(spec: str) -> tuple[str, dict]:
    """'tlora:dropout=0,alpha_init=2' → ('tlora', {'dropout': 0.0, ...}); values parsed as YAML."""
    import yaml

    method, _, rest = spec.partition(":")
    params = dict(kv.split("=", 1) for kv in rest.split(";") if kv)
    return method, {k: yaml.safe_load(v) for k, v in params.items()}


def lrft_variant(base, method: str, params: dict, rank: int, targets: list[str]):
    model = copy.deepcopy(base)
    m = methods.get(method)
    found = find_targets(model, targets)
    inject(model, found, m.build(found, m.params(rank=rank, **params), BuildContext(seed=0, model_config=model.config)))
    set_head_trainable(model, True)
    return model


def peft_variant(base, rank: int, targets: list[str], alpha: float):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="SEQ_CLS")
    return get_peft_model(copy.deepcopy(base), cfg)


class SavedBytes:
    """Bytes autograd keeps for backward during one forward pass."""

    def __init__(self):
        self.bytes = 0
        self.seen = set()

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def step(model, opt, batch) -> float:
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--task", default="glue/mrpc")
    ap.add_argument("--methods", default="lora,tlora",
                    help="lrft variants to compare with PEFT LoRA, e.g. lora,tlora,tlora:dropout=0;alpha_init=2")
    ap.add_argument("--targets", default="query,value")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over all variants")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    targets = args.targets.split(",")
    base, tok = load_for_classification(ModelConfig(name=args.model), 2, None, False)
    base.train()
    n_batches = args.rounds * args.steps + args.warmup
    batches = real_batches(tok, args.task, n_batches, args.batch_size, args.max_length)
    variants = {"peft-lora": peft_variant(base, args.rank, targets, alpha=16.0)}
    for spec in args.methods.split(","):
        variants[spec] = lrft_variant(base, *parse_variant(spec), args.rank, targets)
    opts = {k: torch.optim.AdamW([p for p in v.parameters() if p.requires_grad], lr=1e-4) for k, v in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    timed_tokens: dict[str, int] = {k: 0 for k in variants}
    for name, model in variants.items():  # warm-up: allocator, kernels, optimizer state
        for b in batches[:args.warmup]:
            step(model, opts[name], b)
    cursor = args.warmup
    for _ in range(args.rounds):
        for name, model in variants.items():
            for j in range(args.steps):
                times[name].append(step(model, opts[name], batches[cursor + j]))
                timed_tokens[name] += tokens[cursor + j]
        cursor += args.steps
    saved = {}
    for name, model in variants.items():
        with SavedBytes() as s:
            model(**batches[0]).loss.backward()
        model.zero_grad(set_to_none=True)
        saved[name] = s.bytes
    ref = statistics.median(times["peft-lora"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "median_step_s": round(med, 4), "tokens_per_s": round(timed_tokens[name] / sum(ts), 1),
                     "saved_for_backward_mib": round(saved[name] / 2**20, 1),
                     "trainable": sum(p.numel() for p in variants[name].parameters() if p.requires_grad),
                     "ratio_to_peft_lora": round(med / ref, 3)})
    result = {"model": args.model, "task": args.task, "rank": args.rank, "targets": targets, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "steps_per_round": args.steps,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model} on {args.task}, rank {args.rank}, targets {args.targets}, batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads, {args.rounds}×{args.steps} timed steps per variant")
        print(f"{'variant':<20}{'median s/step':>15}{'tokens/s':>11}{'saved MiB':>11}{'trainable':>11}{'× PEFT':>9}")
        for r in rows:
            print(f"{r['variant']:<20}{r['median_step_s']:>15.4f}{r['tokens_per_s']:>11.1f}{r['saved_for_backward_mib']:>11.1f}"
                  f"{r['trainable']:>11,}{r['ratio_to_peft_lora']:>9.3f}")
        print(f"peak RSS of the process: {result['peak_rss_mib']} MiB")
    return result


if __name__ == "__main__":
    main()
