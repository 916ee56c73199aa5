"""Greedy decoding of a decoder-only LM that lets each finished sequence leave its batch: the KV cache
keeps the rows still generating, so the steps after most answers are written cost what the few
unfinished completions need, not the whole batch's (`model.generate` computes every row until the
last one stops). The tokens are those `model.generate` picks greedily, row by row."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch


def shrinks(model) -> bool:
    """Whether `greedy_completions` decodes for `model`: a decoder-only LM whose forward can keep the
    last position's logits alone (encoder-decoders go through `model.generate`)."""
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    return not encoder_decoder and "logits_to_keep" in inspect.signature(model.forward).parameters


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
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # positions count real tokens only, as generate derives them from the mask of a left-padded batch
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    rows, completions = list(range(input_ids.shape[0])), [[] for _ in range(input_ids.shape[0])]
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        tokens = out.logits[:, -1].argmax(-1)
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
        out = model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            cache=cache,
            use_cache=True,
        )
        next_position = next_position + 1
    return completions
