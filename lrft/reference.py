"""A preference run's reference log-probs, computed once before training and cached in the run dir.

The reference of a DPO-family loss is the model the policy starts from: the base with its adapters
switched off, or the policy as `adapter.init_from` loaded it. With `train.dpo.reference: precomputed`
its summed response log-probs of every training and evaluation pair are computed once, in evaluation
mode (no dropout) and at the training precision, and every later step runs the policy alone. They
are kept in `reference/` (one safetensors file per split, [chosen, rejected] per pair, float64, with
the fingerprint in its metadata: the model, the pairs' tokens, the starting adapter, the precision),
so a resumed run reuses them; anything else in the fingerprint recomputes them. Under several
processes each computes every world-th pair and the results are gathered; a sharded model (FSDP)
needs every process to run the same forward passes, so each computes them all.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lrft.atomic_files import atomic_dir
from lrft.evaluation import shard_batches
from lrft.inject import adapters_off
from lrft.loss import sequence_logps

LOGPS = "logps"  # the tensor of a split's file: (pairs × 2) summed log-probs, chosen then rejected


def split_file(directory: Path, split: str) -> Path:
    return directory / f"{split}.safetensors"


def fingerprint(model_id: dict, features: dict[str, list[dict]], start: str | None, precision: str) -> str:
    """What the reference log-probs depend on: the model, every pair's tokens, the adapter the policy
    starts from (its file's checksum) and the precision they are computed at."""
    h = hashlib.sha256(json.dumps([model_id, start, precision], sort_keys=True).encode())
    for split in sorted(features):
        h.update(split.encode())
        for f in features[split]:
            h.update(
                json.dumps(
                    [f["chosen_input_ids"], f["chosen_labels"], f["rejected_input_ids"], f["rejected_labels"]]
                ).encode()
            )
    return h.hexdigest()[:32]


def cached(directory: Path, splits: list[str], expected: str) -> dict[str, torch.Tensor] | None:
    """The cached log-probs of every split if they are all there under the expected fingerprint."""
    out = {}
    for split in splits:
        try:
            with safe_open(str(split_file(directory, split)), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") != expected:
                    return None
                out[split] = f.get_tensor(LOGPS)
        except (OSError, SafetensorError):
            return None
    return out


def save(directory: Path, logps: dict[str, torch.Tensor], stamp: str) -> None:
    """Every split's log-probs, with the fingerprint `stamp` they were computed under, in one atomic dir."""
    with atomic_dir(directory) as tmp:
        for split, values in logps.items():
            save_file({LOGPS: values.contiguous()}, str(split_file(tmp, split)), metadata={"fingerprint": stamp})


@torch.no_grad()
def compute(
    model,
    core,
    features: list[dict],
    collate,
    *,
    batch_size: int,
    device,
    autocast,
    with_adapters: bool,
    rank: int,
    world: int,
) -> tuple[list[int], torch.Tensor]:
    """(pair indices, their [chosen, rejected] log-probs) of this process's share of `features`."""
    mine, out = [], []
    with nullcontext() if with_adapters else adapters_off(core):
        for idx, batch in shard_batches(
            model, features, collate, batch_size, device, rank, world, "reference log-probs"
        ):
            with autocast():
                sums, _ = sequence_logps(model, core, batch)
            n = len(sums) // 2
            mine += idx
            out.append(torch.stack([sums[:n], sums[n:]], dim=1).double().cpu())
    return mine, torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64)


def attach(features: list[dict], logps: torch.Tensor) -> None:
    """Each pair carries its reference log-probs from here on (PairCollator batches them)."""
    for f, (chosen, rejected) in zip(features, logps.tolist()):
        f["ref_chosen"], f["ref_rejected"] = chosen, rejected
