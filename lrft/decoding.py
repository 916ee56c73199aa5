"""Greedy decoding of a decoder-only LM that lets each finished sequence leave its batch: the KV cache
keeps the rows still generating, so the steps after most answers are written cost what the few
unfinished completions need, not the whole batch's (`model.generate` computes every row until the
last one stops). The cache's keys and values are written into tensors sized for the whole
completion once, not concatenated anew at every step (a copy of the whole cache per token, DynamicCache's
way). The prompts are read in groups of similar lengths, so a batch's padding is not computed (its
longest prompt would set every row's width), and their caches laid side by side, left-padded to the
batch's width. The tokens are those `model.generate` picks greedily, row by row."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def shrinks(model) -> bool:
    """Whether `greedy_completions` decodes for `model`: a decoder-only LM whose forward can keep the
    last position's logits alone (encoder-decoders go through `model.generate`)."""
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    return not encoder_decoder and "logits_to_keep" in inspect.signature(model.forward).parameters


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers of `capacity` positions, filled in
    place: a decoding step writes its one position instead of copying the cache into a longer tensor."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.place(slice(None), self.get_seq_length(), key_states, value_states, key_states.shape[0])
        return self.keys, self.values

    def place(self, rows: slice, start: int, keys: torch.Tensor, values: torch.Tensor, batch_size: int) -> None:
        """Write `keys` and `values` of `rows` from position `start` (a decoding step: every row at the
        end; a prefill group: its rows after their padding, zeros the attention mask hides)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
            shape = (batch_size, keys.shape[1], self.capacity, keys.shape[3])
            self.key_buffer, self.value_buffer = keys.new_zeros(shape), values.new_zeros(shape)
        end = start + keys.shape[-2]
        if end > self.capacity:  # a caller's bug: more positions than the completion was sized for
            raise ValueError(f"cache of {self.capacity} positions asked for {end}")
        self.key_buffer[rows, :, start:end] = keys
        self.value_buffer[rows, :, start:end] = values
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        end = self.get_seq_length()
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """The model's DynamicCache with its full-attention layers preallocated for `capacity` positions
    (sliding-window and other layer kinds keep their own)."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


PADDING_WASTE = 1.1  # a prefill group computes at most this many padded positions per prompt token


def length_groups(lengths: list[int]) -> list[slice]:
    """Consecutive rows in groups whose padded width wastes little: a row joins the group while the
    group's rows × its longest length stay within PADDING_WASTE × their tokens (sorted lengths group best)."""
    groups, start, tokens, longest = [], 0, 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, n) > PADDING_WASTE * (tokens + n):
            groups.append(slice(start, i))
            start, tokens, longest = i, 0, 0
        tokens, longest = tokens + n, max(longest, n)
    return [*groups, slice(start, len(lengths))]


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, capacity: int):
    """(cache of `capacity` positions, logits of each row's last position) of a left-padded batch, read
    in length_groups: each group from where its longest prompt starts, into the one cache."""
    cache = preallocated_cache(model.config, capacity)
    lengths = attention_mask.sum(-1).tolist()
    groups = length_groups(lengths)
    if len(groups) == 1 or not all(isinstance(layer, PreallocatedLayer) for layer in cache.layers):
        groups = [slice(0, len(lengths))]  # one pass (other layer kinds keep their own cache)
    width, logits = input_ids.shape[1], []
    for rows in groups:
        start = 0 if len(groups) == 1 else width - max(lengths[rows])
        part = cache if len(groups) == 1 else DynamicCache(config=model.config)
        out = model(
            input_ids=input_ids[rows, start:],
            attention_mask=attention_mask[rows, start:],
            position_ids=positions[rows, start:],
            cache=part,
            use_cache=True,
            logits_to_keep=1,
        )
        logits.append(out.logits[:, -1])
        if part is not cache:
            for layer, filled in zip(cache.layers, part.layers):
                layer.place(rows, start, filled.keys, filled.values, len(lengths))
    return cache, torch.cat(logits)


@torch.no_grad()
def greedy_completions(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    finished: Callable[[int, list[int]], bool],
    on_step: Callable[[], None] = lambda: None,
) -> list[list[int]]:
    """The greedy completion tokens of each row of a left-padded batch, up to `max_new_tokens`, ended
    by EOS (kept, as `model.generate` keeps it) or once `finished(row, tokens)` says its answer is written."""
    # positions count real tokens only, as generate derives them from the mask of a left-padded batch
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache, logits = prefill(model, input_ids, attention_mask, positions, input_ids.shape[1] + max_new_tokens)
    rows, completions = list(range(input_ids.shape[0])), [[] for _ in range(input_ids.shape[0])]
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        on_step()
        keep = []
        for j, (row, token) in enumerate(zip(rows, tokens.tolist())):
            completions[row].append(token)
            if token != eos_token_id and not finished(row, completions[row]):
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # the finished rows leave the batch, and their cache with them
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            attention_mask, next_position, tokens = attention_mask[index], next_position[index], tokens[index]
            rows = [rows[j] for j in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
        next_position = next_position + 1
    return completions
