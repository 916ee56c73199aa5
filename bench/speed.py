"""Training step time of every lrft method against PEFT LoRA, on the same real batches, in one process.

    LRFT_DATA_DIR=../shared/data python bench/speed.py                            # MiniLM, MRPC batches, rank 8
    LRFT_DATA_DIR=../shared/data python bench/speed.py --model smollm2 --task gsm8k --batch-size 8 --rounds 3
    python bench/speed.py --methods lora,tlora --rank 8 --rounds 5 --steps 4 --json
    LRFT_DATA_DIR=../shared/data python bench/speed.py --precision bf16           # the steps under bf16 autocast

Each variant gets its own copy of the base model and an AdamW optimizer over its trainable params.
Variants run in rounds, alternating, so drifts of the machine (thermal, other load) hit all alike.
Reported per variant: median step time (forward + backward + optimizer step), tokens/s, memory
saved for backward (the activations a method keeps: the part of memory that differs between
methods), trainable params, and the step time relative to PEFT LoRA (and to lrft lora): each timed
step is paired with the reference's step on the same batch in the same round, and the ratio is the
median of those paired ratios, with its interquartile range (machine noise of a few % between
moments cancels in the pairs; a ratio of medians over different moments does not). talora's calibration pass is timed on the same batches and reported as a fraction of an
epoch of its own training. Peak RSS is the whole process's (all variants); on a GPU the peak GPU
memory of each variant's steps is reported too.

The distance to the hardware's limit: each variant's FLOPs per step (forward + backward, counted by
torch's FlopCounterMode once per timed batch shape: matmuls and attention, the work that dominates),
the FLOP/s its timed steps achieve, and that as a share of the peak this device reaches on one large
matmul at the steps' dtype (measured here, the best of a few; a practical peak, below the data
sheet's). `--precision bf16` runs every variant's forward under bf16 autocast (what train.precision
auto picks where the device computes bf16 natively) and measures the peak on a bf16 matmul.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrft import calibrate, methods  # noqa: E402
from lrft.data import collator, features, get_task, load_task_data  # noqa: E402
from lrft.inject import inject, set_head_trainable  # noqa: E402
from lrft.methods.base import BuildContext  # noqa: E402
from lrft.models import load_model  # noqa: E402
from lrft.precision import autocast_for  # noqa: E402
from lrft.recipe import CalibrationConfig, DataConfig, ModelConfig  # noqa: E402
from lrft.targets import find_targets  # noqa: E402

ATTENTION = {"bert": "query,key,value,attention.output.dense", "llama": "q_proj,k_proj,v_proj,o_proj"}


def real_batches(task, tokenizer, n_batches: int, batch_size: int, max_length: int):
    """The first n_batches·batch_size training examples, tokenized and collated as training does."""
    data = load_task_data(task, DataConfig(task=task.name))
    feats = features(data.train.head(n_batches * batch_size), tokenizer, max_length, "benchmark examples")
    collate = collator(task, tokenizer)
    batches = [collate(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)][:n_batches]
    return batches, feats, collate, len(data.train)


def parse_variant(spec: str) -> tuple[str, dict]:
    """'tlora:dropout=0;alpha_init=2' → ('tlora', {'dropout': 0, 'alpha_init': 2}); values parsed as YAML."""
    import yaml

    method, _, rest = spec.partition(":")
    params = dict(kv.split("=", 1) for kv in rest.split(";") if kv)
    return method, {k: yaml.safe_load(v) for k, v in params.items()}


def lrft_variant(base, method: str, params: dict, rank: int, targets: list[str], feats, collate) -> tuple:
    """An adapted copy of the base model; talora (and task-aware tlora) calibrate first, timed."""
    model = copy.deepcopy(base)
    m = methods.get(method)
    found = find_targets(model, targets)
    p = m.params(rank=rank, **params)
    stats, seconds = None, None
    if m.calibration(p):
        cfg = CalibrationConfig()
        order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))[: cfg.samples].tolist()
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        t0 = time.perf_counter()
        stats = calibrate.run(model, found, feats, batches, collate, m.calibration(p), cfg)
        seconds = time.perf_counter() - t0
    inject(model, found, m.build(found, p, BuildContext(seed=0, model_config=model.config, calibration=stats)))
    set_head_trainable(model, True)
    return model, seconds


def peft_variant(base, rank: int, targets: list[str], causal: bool):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        lora_dropout=0.0,
        task_type="CAUSAL_LM" if causal else "SEQ_CLS",
    )
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


def paired_ratio(times: list[float], reference: list[float]) -> tuple[float, list[float]]:
    """Median and interquartile range of times[i] / reference[i] (the same batch, the same round)."""
    ratios = sorted(t / r for t, r in zip(times, reference))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return round(statistics.median(ratios), 3), [round(q[0], 3), round(q[2], 3)]


def step(model, opt, batch, autocast) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def step_flops(model, batch, autocast) -> int:
    """FLOPs of one forward + backward on `batch` (matmuls, convolutions, attention: FlopCounterMode's ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with autocast():
            loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n×n matmuls at `dtype`: what this device reaches on the easiest work."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up: kernels, caches, the thread pool
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--task", default="glue/mrpc")
    ap.add_argument(
        "--methods",
        default=",".join(methods.REGISTRY),
        help="lrft variants to compare with PEFT LoRA, e.g. lora,tlora:dropout=0;alpha_init=2",
    )
    ap.add_argument("--targets", default=None, help="comma-separated (default: the attention q, k, v, o)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over all variants")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast of every variant's forward")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.precision == "bf16"
    autocast = autocast_for(args.precision, device.type)  # what a run at this train.precision computes under
    task = get_task(args.task)
    causal = task.problem == "causal_lm"
    base, tok = load_model(ModelConfig(name=args.model), task, list(task.label_names or ["0", "1"]))
    targets = (args.targets or ATTENTION.get(base.config.model_type, "query,value")).split(",")
    n_batches = args.rounds * args.steps + args.warmup
    batches, feats, collate, train_size = real_batches(task, tok, n_batches, args.batch_size, args.max_length)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    base.to(device).train()
    variants, calibration = {"peft-lora": peft_variant(base, args.rank, targets, causal)}, {}
    for spec in args.methods.split(","):
        model, seconds = lrft_variant(base, *parse_variant(spec), args.rank, targets, feats, collate)
        variants[spec] = model.to(device)
        if seconds is not None:
            calibration[spec] = seconds
    opts = {k: torch.optim.AdamW([p for p in v.parameters() if p.requires_grad], lr=1e-4) for k, v in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    peak_gpu: dict[str, int] = {k: 0 for k in variants}
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    timed_tokens: dict[str, int] = {k: 0 for k in variants}
    for name, model in variants.items():  # warm-up: allocator, kernels, optimizer state
        for b in batches[: args.warmup]:
            step(model, opts[name], b, autocast)
    cursor = args.warmup
    for _ in range(args.rounds):
        for name, model in variants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for j in range(args.steps):
                times[name].append(step(model, opts[name], batches[cursor + j], autocast))
                timed_tokens[name] += tokens[cursor + j]
            if device.type == "cuda":
                peak_gpu[name] = max(peak_gpu[name], torch.cuda.max_memory_allocated())
        cursor += args.steps
    saved, flops = {}, {}
    for name, model in variants.items():
        with SavedBytes() as s:
            with autocast():
                loss = model(**batches[0]).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
        saved[name] = s.bytes
        by_shape: dict[tuple, int] = {}  # batches are padded to their longest: one count per shape
        for b in batches[args.warmup : cursor]:
            shape = tuple(b["input_ids"].shape)
            if shape not in by_shape:
                by_shape[shape] = step_flops(model, b, autocast)
            flops[name] = flops.get(name, 0) + by_shape[shape]
    dtype = torch.bfloat16 if bf16 else next(base.parameters()).dtype
    peak = matmul_peak(dtype, device)
    steps_per_epoch = math.ceil(train_size / args.batch_size)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        to_peft = paired_ratio(ts, times["peft-lora"])
        row = {
            "variant": name,
            "median_step_s": round(med, 4),
            "tokens_per_s": round(timed_tokens[name] / sum(ts), 1),
            "saved_for_backward_mib": round(saved[name] / 2**20, 1),
            "trainable": sum(p.numel() for p in variants[name].parameters() if p.requires_grad),
            "ratio_to_peft_lora": to_peft[0],
            "ratio_to_peft_lora_iqr": to_peft[1],
            "ratio_to_lrft_lora": paired_ratio(ts, times["lora"])[0] if "lora" in times else None,
            "gflop_per_step": round(flops[name] / len(ts) / 1e9, 2),
            "achieved_gflops": round(flops[name] / sum(ts) / 1e9, 1),
            "share_of_peak": round(flops[name] / sum(ts) / peak, 3),
        }
        if name in calibration:
            row["calibration_s"] = round(calibration[name], 2)
            row["calibration_fraction_of_epoch"] = round(calibration[name] / (med * steps_per_epoch), 4)
        if device.type == "cuda":
            row["peak_gpu_mib"] = round(peak_gpu[name] / 2**20, 1)
        rows.append(row)
    result = {
        "command": "python bench/speed.py " + " ".join(a for a in (argv or sys.argv[1:]) if a != "--json"),
        "model": args.model,
        "task": args.task,
        "rank": args.rank,
        "targets": targets,
        "batch_size": args.batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "steps_per_epoch": steps_per_epoch,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.model} on {args.task}, rank {args.rank}, targets {','.join(targets)}, batch {args.batch_size}, "
            f"{device}, {torch.get_num_threads()} threads, {args.precision}, {args.rounds}×{args.steps} timed steps "
            "per variant"
        )
        print(
            f"{'variant':<18}{'median s/step':>14}{'tokens/s':>10}{'saved MiB':>10}{'trainable':>11}"
            f"{'× PEFT':>8}{'(IQR)':>14}{'× lora':>8}{'GFLOP/step':>11}{'GFLOP/s':>9}{'of peak':>8}"
        )
        for r in rows:
            iqr = "{:.3f}-{:.3f}".format(*r["ratio_to_peft_lora_iqr"])
            print(
                f"{r['variant']:<18}{r['median_step_s']:>14.4f}{r['tokens_per_s']:>10.1f}{r['saved_for_backward_mib']:>10.1f}"
                f"{r['trainable']:>11,}{r['ratio_to_peft_lora']:>8.3f}{iqr:>14}{r['ratio_to_lrft_lora'] or float('nan'):>8.3f}"
                f"{r['gflop_per_step']:>11.2f}{r['achieved_gflops']:>9.1f}{100 * r['share_of_peak']:>7.1f}%"
                + (
                    f"   calibration {r['calibration_s']} s = {100 * r['calibration_fraction_of_epoch']:.2f} % of an "
                    f"epoch"
                    if "calibration_s" in r
                    else ""
                )
            )
        print(
            f"peak: {result['matmul_peak_gflops']} GFLOP/s on a 2048² {result['matmul_peak_dtype']} matmul here; "
            f"peak RSS of the process: {result['peak_rss_mib']} MiB"
        )
    return result


if __name__ == "__main__":
    main()
