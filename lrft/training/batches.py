"""Which examples make each training step, and what each weighs in it.

An epoch's batches are a function of the seed and the epoch alone (`epoch_batches`), so a resumed run
and any number of processes see the same; train.group_by_length groups similar lengths
(`length_grouped_batches`). A batch is split into train.grad_accum micro-batches and over the
processes (`micro_batches`), each part weighted by its share of the step's loss weight (an example
weighs what its objective says: 1, or its response tokens), counted from the batch's indices, which
every process knows.
"""

from __future__ import annotations

import torch

from lrft.data import example_length


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a function of seed and epoch alone, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def epoch_batches(
    features: list[dict], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The batches of an epoch (example indices), in the epoch's order or grouped by length."""
    order = epoch_order(len(features), seed, epoch)
    if group_by_length:
        lengths = [example_length(f) for f in features]
        return length_grouped_batches(order, lengths, batch_size, seed, epoch)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def length_grouped_batches(
    order: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of similar lengths: the epoch's order cut into mega-batches of 50 batches, each sorted by
    length (longest first) and cut into batches; the batches then shuffled, the one holding the longest
    example first (an out-of-memory shows at once). Deterministic in (seed, epoch), as HF's
    LengthGroupedSampler but over whole batches, so every process count sees the same batches."""
    mega = 50 * batch_size
    sorted_runs = [sorted(order[i : i + mega], key=lambda k: -lengths[k]) for i in range(0, len(order), mega)]
    flat = [k for run in sorted_runs for k in run]
    batches = [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    longest = max(range(len(batches)), key=lambda i: max(lengths[k] for k in batches[i]))
    batches.insert(0, batches.pop(longest))
    return batches


def micro_batches(
    batch: list[int], size: int, weights: list[int], rank: int, world: int
) -> list[tuple[list[int], float]]:
    """(examples, share) of this process in each micro-batch of `size` examples: every world-th example
    from its rank on, and their weight's share of the whole batch's, times the process count that the
    gradient all-reduce averages over. A process with nothing left in a micro-batch gets its first
    example with a share of 0, so that it joins every collective."""
    batch_weight = sum(weights[i] for i in batch)
    parts = []
    for start in range(0, len(batch), size):
        chunk = batch[start : start + size]
        mine = chunk[rank::world]
        share = sum(weights[i] for i in mine) / batch_weight * world
        parts.append((mine or chunk[:1], share))
    return parts
