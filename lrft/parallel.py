"""How the model is spread over processes, behind one interface the training loop uses: one process,
DDP (accelerate), or FSDP2 (`fully_shard`, when `accelerate launch` runs with an FSDP config).

Under FSDP only the frozen base is sharded: each transformer block (the model's `_no_split_modules`)
and then the whole model become FSDP units, while everything that trains (adapters, a method's
shared factors, the task head) is left out of the units (`ignored_params`) and replicated, as small as
it is; its gradients are averaged over processes once per optimizer step, as DDP does. So the
adapter, its optimizer state and its statistics are plain tensors on every process, and checkpoints
and adapters are the same files whatever the launcher. lrft shards with FSDP2 itself rather than
through `accelerator.prepare`, so the same code runs on GPUs and, over gloo, on CPU-only machines
(accelerate has no FSDP on the CPU), where the tests exercise it.

Every call that synchronises the processes is a method of `Parallel` (`barrier`, `broadcast`,
`all_gather`, `any_rank`, `mean`, and `clip_grad_norm`, which all-reduces under FSDP): each process
must reach each of them, in the same order, or the others wait forever. So a branch that only the
main process takes (`if parallel.main:`) never holds one, and never returns early before one.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (distributed_type: FSDP) says so in the environment."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


class Parallel:
    """One process, DDP or FSDP2 for a model and its optimizer."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.main = accelerator.is_main_process
        self.fsdp = fsdp_requested() and self.world > 1
        self.kind = "fsdp" if self.fsdp else ("ddp" if self.world > 1 else "single")

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model wrapped (DDP) or its frozen base sharded (FSDP), and the optimizer."""
        if not self.fsdp:
            return self.accelerator.prepare(model, optimizer)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.accelerator.device.type, (self.accelerator.num_processes,))
        trained = {p for p in model.parameters() if p.requires_grad}
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh, ignored_params=trained)
        fully_shard(model, mesh=mesh, ignored_params=trained)
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model if self.fsdp else self.accelerator.unwrap_model(model)

    def gradient_sync(self, model: nn.Module, sync: bool):
        """A context for a backward pass: DDP synchronises gradients only where `sync` (the last
        micro-batch of an accumulated step); FSDP's trained parameters are averaged in `clip_grad_norm`."""
        return nullcontext() if sync or self.fsdp else self.accelerator.no_sync(model)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
        """Average the gradients over processes where no wrapper did (FSDP), clip the total norm, return it.
        Every process must call it (under FSDP it all-reduces the gradients)."""
        if not self.fsdp:
            return self.accelerator.clip_grad_norm_(params, max_norm or math.inf)
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one all-reduce for all of them: they are small
        dist.all_reduce(flat)
        flat /= self.accelerator.num_processes
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
        return torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)

    # ---------------------------------------------------------------- collectives: every process calls them

    def barrier(self) -> None:
        """Wait until every process is here. Every process must call it."""
        self.accelerator.wait_for_everyone()

    def leave(self) -> None:
        """Every process, together, at the end of a run: the process group is torn down while all of them
        are still there. Left to each interpreter's exit, gloo's threads can be destroyed while still
        joinable, and a process whose work is done aborts ("terminate called without an active
        exception", SIGABRT), failing the launcher's run."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()

    def broadcast(self, obj: T) -> T:
        """The main process's `obj` (picklable), on every process. Every process must call it."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every process's `obj` (picklable), in rank order, on every process. Every process must call it."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true wherever it is true on any process: so every process takes the same decision.
        Every process must call it, with as many flags."""
        if self.world == 1:
            return tuple(bool(flag) for flag in flags)
        import torch.distributed as dist

        reduced = torch.tensor([float(flag) for flag in flags], dtype=torch.float32, device=self.accelerator.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return tuple(bool(flag) for flag in reduced.tolist())

    def mean(self, value: float) -> float:
        """The mean of `value` over the processes (reduced as a float32 tensor). Every process must call it."""
        if self.world == 1:
            return value
        return float(self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), "mean"))
