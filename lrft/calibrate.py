"""Calibration: per-target statistics from a few training samples, before any optimizer exists.

For every target Linear i, over the calibration samples:
  covariance C_i = (1/T)·Σ x xᵀ over the T non-padding input tokens (attention mask respected;
  `center` subtracts the mean), accumulated on the CPU in float32 or float64 so GPU memory stays flat;
  importance S_i = mean over batches of mean(|W_i ⊙ ∂L/∂W_i|), with gradients enabled for the target
  weights only (the task loss: classification, or the masked response loss of a causal LM).
Samples are drawn from the training split with `calibration.seed`; batches are formed the same way
whatever the number of processes, each process runs every world-th batch, and the sums are
all-reduced, so every rank builds the identical adapter. Statistics are cached (safetensors + JSON)
in the run dir's calibration/ and reused on resume; `calibration.cache` reuses another run's when
the fingerprint (model, target weights, calibration examples, settings) matches. The importance
chart is drawn with matplotlib's object API, so importing lrft changes no global plotting state.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrft import console, quantize
from lrft.atomic_files import atomic_dir, atomic_write_json
from lrft.errors import LrftError
from lrft.loss import batch_loss
from lrft.targets import Target, weights_checksum

STATS_FILE = "statistics.safetensors"
INFO_FILE = "calibration.json"
PLOT_FILE = "importance.png"


@dataclass
class Statistics:
    covariance: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (in × in), on the CPU
    importance: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(k for k, v in (("covariance", self.covariance), ("importance", self.importance)) if v)


def obtain(
    model,
    targets: list[Target],
    features: list[dict],
    collate,
    needs: frozenset[str],
    *,
    cfg,
    seed: int,
    model_id: dict,
    own_dir: Path | None,
    cache_dir: Path | None = None,
    accelerator=None,
) -> Statistics:
    """The statistics `needs` asks for: from `cache_dir` (calibration.cache), the run's own `own_dir`
    (a resumed run; None when restarting), or a fresh pass."""
    if not features:
        raise LrftError(
            "calibration: the method needs training examples to calibrate on, and the training split is empty"
        )
    if cfg.samples > len(features):
        raise LrftError(
            f"calibration.samples: {cfg.samples} is more than the {len(features)} training examples; "
            f"use calibration.samples ≤ {len(features)}"
        )
    cal_seed = seed if cfg.seed is None else cfg.seed
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(cal_seed))[: cfg.samples].tolist()
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    fingerprint = {
        **model_id,
        "targets": {t.name: list(t.shape) for t in targets},
        "weights": weights_checksum(targets),
        "examples": _examples_hash(features, order),
        "samples": cfg.samples,
        "batch_size": cfg.batch_size,
        "center": cfg.center,
        "dtype": cfg.dtype,
    }
    if cache_dir is not None:
        stats = load(cache_dir, "calibration.cache")
        _check(stats, fingerprint, needs, f"calibration.cache: {cfg.cache}")
        console.log(f"calibration: reusing statistics from {cfg.cache}")
        return stats
    if own_dir is not None and (own_dir / STATS_FILE).is_file():
        stats = load(own_dir, str(own_dir))
        if stats.fingerprint == fingerprint and needs <= stats.kinds:
            console.log(f"calibration: reusing the run's statistics in {own_dir}")
            return stats
    stats = run(model, targets, features, batches, collate, needs, cfg, accelerator)
    stats.fingerprint = fingerprint
    return stats


def run(
    model,
    targets: list[Target],
    features: list[dict],
    batches: list[list[int]],
    collate,
    needs: frozenset[str],
    cfg,
    accelerator=None,
) -> Statistics:
    """One pass over the calibration batches with hooks on the targets; hooks are always removed."""
    t0 = time.perf_counter()
    device = accelerator.device if accelerator else next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    sums = Sums(targets, needs, cfg)
    want_grad = "importance" in needs
    mine = batches[rank::world]
    with calibration_mode(model, targets, want_grad, sums):
        for batch_idx in console.track(mine, "calibration", "batches"):
            batch = {k: v.to(device) for k, v in collate([features[i] for i in batch_idx]).items()}
            sums.mask = batch.get("attention_mask")
            with torch.set_grad_enabled(want_grad):
                loss = batch_loss(model, model, batch)
            if want_grad:
                loss.backward()
                sums.add_importance(targets)
    if world > 1:
        sums.all_reduce(targets, device)
    stats = sums.statistics(targets, len(batches), want_grad)
    stats.samples = sum(len(b) for b in batches)
    stats.seconds = time.perf_counter() - t0
    console.log(
        f"calibration: {stats.samples} samples, {max(stats.tokens.values()):,} tokens, "
        f"{', '.join(sorted(needs))} of {len(targets)} modules in {stats.seconds:.1f} s"
    )
    return stats


class Sums:
    """What the calibration pass accumulates per target: Σ x xᵀ (and Σ x) over non-padding input tokens,
    the token counts, and Σ over batches of mean(|W ⊙ ∂L/∂W|)."""

    def __init__(self, targets: list[Target], needs: frozenset[str], cfg):
        self.dtype = getattr(torch, cfg.dtype)
        self.outer = (
            {t.name: torch.zeros(t.shape[1], t.shape[1], dtype=self.dtype) for t in targets}
            if "covariance" in needs
            else {}
        )
        self.first = (
            {t.name: torch.zeros(t.shape[1], dtype=self.dtype) for t in targets} if cfg.center and self.outer else {}
        )
        self.tokens = {t.name: 0 for t in targets}
        self.importance = {t.name: 0.0 for t in targets}
        self.weight_grads: dict[str, torch.Tensor] = {}  # quantized layers' ∂L/∂W of the batch being run
        self.mask: torch.Tensor | None = None  # the attention mask of the batch being run

    def hook(self, name: str):
        def record(module, args):
            rows = args[0].detach()
            rows = rows.reshape(-1, rows.shape[-1])
            if self.mask is not None and self.mask.numel() == rows.shape[0]:  # inputs of a decoder see other lengths
                rows = rows[self.mask.reshape(-1).bool()]
            self.tokens[name] += rows.shape[0]
            if self.outer:
                rows = rows.to(self.dtype)
                self.outer[name] += (rows.T @ rows).cpu()
                if self.first:
                    self.first[name] += rows.sum(0).cpu()

        return record

    def add_importance(self, targets: list[Target]) -> None:
        for t in targets:
            if quantize.is_quantized(t.module):  # no .grad on packed weights: ∂L/∂W from weight_grad_hook
                w = t.weight
                grad = self.weight_grads.pop(t.name, torch.zeros_like(w))
            else:
                w, grad = t.module.weight, t.module.weight.grad
                grad = grad if grad is not None else torch.zeros_like(w)
                t.module.weight.grad = None
            self.importance[t.name] += float((w.detach().float() * grad.float()).abs().mean())

    def weight_grad_hook(self, name: str):
        """A forward hook adding up ∂L/∂W = Σ_tokens (∂L/∂y)ᵀ x of a quantized layer, whose weight has no grad."""

        def record(module, args, output):
            x = args[0].detach()
            if not output.requires_grad:
                return

            def add(grad_out: torch.Tensor) -> None:
                g = grad_out.reshape(-1, grad_out.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                self.weight_grads[name] = self.weight_grads.get(name, 0) + g

            output.register_hook(add)

        return record

    def all_reduce(self, targets: list[Target], device) -> None:
        """Sum over processes, module by module (each tensor visits the accelerator device once)."""
        for name in list(self.outer):
            self.outer[name] = _all_reduce(self.outer[name], device)
            if self.first:
                self.first[name] = _all_reduce(self.first[name], device)
        names = [t.name for t in targets]
        table = torch.tensor([[self.tokens[n], self.importance[n]] for n in names], dtype=torch.float64)
        reduced = _all_reduce(table, device)
        self.tokens = {n: int(reduced[i, 0]) for i, n in enumerate(names)}
        self.importance = {n: float(reduced[i, 1]) for i, n in enumerate(names)}

    def statistics(self, targets: list[Target], n_batches: int, importance: bool) -> Statistics:
        stats = Statistics()
        for t in targets:
            n = self.tokens[t.name]
            if n == 0:
                raise LrftError(f"calibration: no non-padding tokens reached {t.name}; check the data")
            if self.outer:
                cov = self.outer[t.name] / n
                if self.first:
                    mu = self.first[t.name] / n
                    cov = cov - torch.outer(mu, mu)
                stats.covariance[t.name] = cov
            if importance:
                stats.importance[t.name] = self.importance[t.name] / n_batches
            stats.tokens[t.name] = n
            _check_finite(stats, t.name)
        return stats


@contextmanager
def calibration_mode(model, targets: list[Target], want_grad: bool, sums: Sums):
    """The model in eval mode (dropout off: statistics of the model as it is) with gradients only for
    the target weights (when importance is wanted) and `sums`' hooks on the targets; all undone after."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [t.module.register_forward_pre_hook(sums.hook(t.name)) for t in targets]
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        quantized = {t.name for t in targets if quantize.is_quantized(t.module)}
        for t in targets:
            if t.name in quantized:
                handles.append(t.module.register_forward_hook(sums.weight_grad_hook(t.name)))
            else:
                t.module.weight.requires_grad_(want_grad)
        # nothing upstream of a quantized layer needs a gradient: the embeddings' output is made to
        if want_grad and quantized:
            embeddings = model.get_input_embeddings()
            handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _all_reduce(t: torch.Tensor, device) -> torch.Tensor:
    import torch.distributed as dist

    on_device = t.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def _check_finite(stats: Statistics, name: str) -> None:
    bad = []
    if name in stats.covariance and not torch.isfinite(stats.covariance[name]).all():
        bad.append("covariance")
    if name in stats.importance and not math.isfinite(stats.importance[name]):
        bad.append("importance")
    if bad:
        raise LrftError(
            f"calibration: the {' and '.join(bad)} of {name} is not finite (NaN or Inf); the model "
            f"overflows on the calibration data: use model.dtype float32 or fewer/shorter samples"
        )


def _examples_hash(features: list[dict], order: list[int]) -> str:
    h = hashlib.sha256()
    for i in order:
        f = features[i]
        for key in sorted(f):
            h.update(key.encode())
            h.update(json.dumps(f[key]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- files


def save(directory: Path, stats: Statistics, plan: dict | None) -> None:
    """statistics.safetensors, calibration.json (per module S_i, r_i, α_i, s_i, tokens) and the plot."""
    modules = {
        name: {
            "importance": stats.importance.get(name),
            "tokens": stats.tokens[name],
            **{k: v for k, v in (plan or {}).get(name, {}).items() if k != "importance"},
        }
        for name in stats.tokens
    }
    info = {
        "samples": stats.samples,
        "seconds": round(stats.seconds, 3),
        "statistics": sorted(stats.kinds),
        "fingerprint": stats.fingerprint,
        "modules": modules,
    }
    with atomic_dir(directory) as tmp:
        save_file(
            {f"covariance.{k}": v.contiguous() for k, v in stats.covariance.items()} or {"empty": torch.zeros(0)},
            str(tmp / STATS_FILE),
        )
        atomic_write_json(tmp / INFO_FILE, info)
        if stats.importance:
            plot(modules, tmp / PLOT_FILE)


def load(directory: Path, what: str) -> Statistics:
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / STATS_FILE))
        info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
    except (SafetensorError, OSError, ValueError) as e:
        raise LrftError(
            f"{what}: no readable calibration statistics in {directory} ({e}); point it at a run dir "
            f"or its calibration/ dir"
        ) from None
    if not (
        isinstance(info, dict)
        and isinstance(info.get("modules"), dict)
        and isinstance(info.get("fingerprint"), dict)
        and {"samples", "seconds"} <= set(info)
        and all(isinstance(m, dict) and "tokens" in m for m in info["modules"].values())
    ):
        raise LrftError(
            f"{what}: {directory / INFO_FILE} is damaged (not the calibration record lrft writes); "
            f"delete the calibration/ dir to calibrate afresh"
        )
    mods = info["modules"]
    return Statistics(
        covariance={k.removeprefix("covariance."): v for k, v in tensors.items() if k.startswith("covariance.")},
        importance={k: m["importance"] for k, m in mods.items() if m.get("importance") is not None},
        tokens={k: m["tokens"] for k, m in mods.items()},
        fingerprint=info["fingerprint"],
        samples=info["samples"],
        seconds=info["seconds"],
    )


def _check(stats: Statistics, fingerprint: dict, needs: frozenset[str], what: str) -> None:
    differ = [k for k in fingerprint if stats.fingerprint.get(k) != fingerprint[k]]
    if differ:
        raise LrftError(
            f"{what} was computed for another setup ({', '.join(differ)} differ); remove calibration.cache "
            f"to calibrate this run afresh"
        )
    if not needs <= stats.kinds:
        raise LrftError(
            f"{what} holds {', '.join(sorted(stats.kinds)) or 'nothing'} but this method needs "
            f"{', '.join(sorted(needs))}; remove calibration.cache to calibrate afresh"
        )


def plot(modules: dict[str, dict], path: Path) -> None:
    """Bar chart of importance share and allocated rank per module, grouped by layer."""
    from matplotlib.figure import Figure

    names = list(modules)
    labels = module_labels(names)
    total = sum(m["importance"] for m in modules.values()) or 1.0
    has_rank = all("rank" in m for m in modules.values())
    fig = Figure(figsize=(max(6, 0.28 * len(names)), 6 if has_rank else 3.5))
    axes = fig.subplots(2 if has_rank else 1, 1, sharex=True, squeeze=False)
    axes[0, 0].bar(range(len(names)), [modules[n]["importance"] / total for n in names], color="tab:blue")
    axes[0, 0].set_ylabel("importance share S_i/ΣS")
    if has_rank:
        axes[1, 0].bar(range(len(names)), [modules[n]["rank"] for n in names], color="tab:orange")
        axes[1, 0].set_ylabel("allocated rank r_i")
    axes[-1, 0].set_xticks(range(len(names)), labels, rotation=90, fontsize=7)
    axes[0, 0].set_title("calibration: importance and rank per layer and module")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long rotated module names: tight_layout may still clip them


def module_labels(names: list[str]) -> list[str]:
    """'L3 query', 'L3 intermediate.dense', 'L3 attention.output.dense': the layer, and the shortest
    ending of the name after it that no other module of that layer shares ('dense' alone would name
    three modules of a BERT layer)."""
    import re

    parsed = [re.search(r"\.(\d+)\.(.*)$", n) for n in names]
    by_layer: dict[str, list[list[str]]] = {}
    for m in parsed:
        if m:
            by_layer.setdefault(m.group(1), []).append(m.group(2).split("."))
    labels = []
    for name, m in zip(names, parsed):
        if not m:
            labels.append(name)
            continue
        parts, others = m.group(2).split("."), [o for o in by_layer[m.group(1)] if o != m.group(2).split(".")]
        k = next(k for k in range(1, len(parts) + 1) if all(o[-k:] != parts[-k:] for o in others) or k == len(parts))
        labels.append(f"L{m.group(1)} {'.'.join(parts[-k:])}")
    return labels
