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
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
from torch import nn


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (distributed_type: FSDP) says so in the environment."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


class Parallel:
    """One process, DDP or FSDP2 for a model and its optimizer."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.fsdp = fsdp_requested() and accelerator.num_processes > 1
        self.kind = "fsdp" if self.fsdp else ("ddp" if accelerator.num_processes > 1 else "single")

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
        """Average the gradients over processes where no wrapper did (FSDP), clip the total norm, return it."""
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
