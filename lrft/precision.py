"""The floating-point precision a run computes in: `train.precision: auto` resolved from what the device
computes natively (bf16 autocast on a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX; fp32
elsewhere), and the autocast of evaluation, its own setting (`train.eval_precision`), which the
training autocast accelerate wraps around a prepared model's forward must not override."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

# oneDNN keeps a primitive, with its reordered weights, per matmul shape it has run in bf16; training
# batches of many lengths filled its default cache (1024) with 1.3 GB more than fp32 on MiniLM/MRPC.
# 64 keeps the step time (measured) and most of that memory off; an explicit setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of bf16 matmuls in hardware
CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16_flags() -> list[str]:
    """The CPU's flags among CPU_BF16_FLAGS (none where /proc/cpuinfo is not there: macOS, Windows)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in CPU_BF16_FLAGS if f in flags]


def native_bf16(device_type: str) -> tuple[bool, str]:
    """Whether the device computes bf16 natively, and what says so."""
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name()} computes bf16"
        return False, f"{torch.cuda.get_device_name()} has no native bf16"
    if device_type == "cpu":
        flags = cpu_bf16_flags()
        return (True, f"the CPU has {' and '.join(flags)}") if flags else (False, "the CPU has no AVX-512 BF16 or AMX")
    return False, f"bf16 autocast is not used on {device_type}"


@dataclass(frozen=True)
class Precision:
    """What a run computes in: training's autocast and evaluation's, each fp32, bf16 or fp16."""

    train: str
    eval: str
    reason: str  # why auto chose what it did ("" when nothing was auto)

    def record(self) -> dict:
        """The summary.json entry."""
        return {"train": self.train, "eval": self.eval} | ({"auto": self.reason} if self.reason else {})

    def describe(self) -> str:
        auto = f" (auto: {self.reason})" if self.reason else ""
        return f"precision: training {self.train}, evaluation {self.eval}{auto}"


def resolve(train: str, evaluation: str, device_type: str) -> Precision:
    """The run's precisions on `device_type`: auto is bf16 where the device computes it natively."""
    native, why = native_bf16(device_type) if "auto" in (train, evaluation) else (False, "")
    auto = "bf16" if native else "fp32"
    return Precision(
        train=auto if train == "auto" else train, eval=auto if evaluation == "auto" else evaluation, reason=why
    )


def autocast_for(precision: str, device_type: str) -> Callable[[], AbstractContextManager]:
    """A factory of the autocast context of `precision` (nothing to do for fp32); adapters and the
    loss's reduction stay fp32 under it, as autocast keeps parameters and reductions in fp32."""
    if precision == "fp32":
        return nullcontext
    return lambda: torch.autocast(device_type, dtype=DTYPES[precision])


@contextmanager
def own_autocast(model: torch.nn.Module) -> Iterator[None]:
    """For the block, `model` (or the module inside its DDP wrapper) runs the forward accelerate's
    `prepare` wrapped in the training precision's autocast: evaluation then computes in its own
    precision, as its caller's autocast (or none, fp32) says. An autocast disabled around the call
    would not do: the wrapped forward enters its own inside."""
    core = getattr(model, "module", model)
    unwrapped = core.__dict__.get("_original_forward")  # where accelerate keeps the forward it wrapped
    if unwrapped is None:  # not prepared, or prepared at fp32
        yield
        return
    wrapped = core.__dict__["forward"]
    core.forward = unwrapped
    try:
        yield
    finally:
        core.forward = wrapped
