"""Targets: the Linear layers an adapter attaches to, found by name in a loaded model, and what lrft
knows about each model family: its default targets and how its attention projections are laid out.

Target modules are matched by name suffix, as PEFT does: `query` matches `...attention.self.query`,
`attention.output.dense` matches only the attention output projection, while `output.dense` matches
both BERT output projections. The index of the transformer block is parsed from the module path.
The task head (classifier, score, ...: HEAD_NAMES) is never a target: it is trained whole (train.train_head).
A Linear layer is an `nn.Linear` or transformers' `Conv1D` (GPT-2), which stores its weight
transposed (in × out); `Target.shape` and `Target.weight` give the (out, in) view either way.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from lrft import quantize
from lrft.errors import LrftError

QKV = ("q", "k", "v")
# Module-name suffixes of the separate attention projections, by kind, in the families lrft knows
# (BERT, RoBERTa, DeBERTa, DistilBERT, ESM, ModernBERT, GPT-2, GPT-NeoX, OPT, Llama-style, T5).
ATTENTION_NAMES = {
    "q": ("query", "q_proj", "q", "query_proj", "q_lin"),
    "k": ("key", "k_proj", "k", "key_proj", "k_lin"),
    "v": ("value", "v_proj", "v", "value_proj", "v_lin"),
    "o": ("attention.output.dense", "o_proj", "o", "out_proj", "out_lin", "attn.c_proj", "attention.dense", "attn.Wo"),
}


@dataclass(frozen=True)
class Family:
    """What lrft knows about one model family (a `config.model_type`)."""

    defaults: tuple[str, ...]  # target_modules when a recipe names none
    fused: str | None = None  # suffix of the projection computing q, k and v at once, if the family has one
    # How that projection packs its output rows, as read in transformers' attention code:
    #   "blocks": [q; k; v], each kind's heads in order (GPT-2 c_attn .split(d, dim=2); Phi-3 qkv_proj
    #             sliced at H·d_h and (H + H_kv)·d_h; ModernBERT Wqkv .view(3, H, d_h));
    #   "heads":  per head [q_h; k_h; v_h] (GPT-NeoX query_key_value .view(H, 3·d_h).chunk(3); DeBERTa v1
    #             in_proj, its scores' heads .chunk(3, dim=-1)).
    packing: str | None = None


# The one table of model families, keyed by config.model_type. Defaults are the papers' and PEFT's:
# the query and value projections, or the fused projection that holds them.
FAMILIES: dict[str, Family] = {
    "bert": Family(("query", "value")),
    "roberta": Family(("query", "value")),
    "deberta": Family(("in_proj",), fused="in_proj", packing="heads"),  # DeBERTa v1: .chunk(3) per head
    "deberta-v2": Family(("query_proj", "value_proj")),
    "esm": Family(("query", "value")),
    "distilbert": Family(("q_lin", "v_lin")),
    "modernbert": Family(("Wqkv",), fused="Wqkv", packing="blocks"),
    "gpt2": Family(("c_attn",), fused="c_attn", packing="blocks"),
    "gpt_neox": Family(("query_key_value",), fused="query_key_value", packing="heads"),
    "opt": Family(("q_proj", "v_proj")),
    "phi3": Family(("qkv_proj",), fused="qkv_proj", packing="blocks"),
    "llama": Family(("q_proj", "v_proj")),
    "mistral": Family(("q_proj", "v_proj")),
    "qwen2": Family(("q_proj", "v_proj")),
    "qwen3": Family(("q_proj", "v_proj")),
    "gemma2": Family(("q_proj", "v_proj")),
    "gemma3_text": Family(("q_proj", "v_proj")),
    "t5": Family(("q", "v")),  # T5, T5 v1.1 and Flan-T5 (their gated feed-forward: wi_0, wi_1, wo)
    "bart": Family(("q_proj", "v_proj")),
}
UNKNOWN_FAMILY = Family(("query", "value"))

# Task heads, trained whole with train.train_head (PEFT's modules_to_save): the output layer, and the
# layers made for the task that feed it (DistilBERT's pre_classifier, DeBERTa's pooler), which a base
# checkpoint does not hold either. PEFT's suffix match wraps pre_classifier as "classifier" too.
OUTPUT_HEADS = ("classifier", "score")
HEAD_NAMES = (*OUTPUT_HEADS, "pre_classifier", "pooler")


def _conv1d() -> type:
    """transformers' Conv1D, imported when a model exists: importing transformers costs ~0.7 s at start-up."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


@dataclass
class Target:
    """One Linear layer chosen by `adapter.target_modules`."""

    name: str  # dotted module path in the model, e.g. bert.encoder.layer.0.attention.self.query
    module: nn.Module  # an nn.Linear or a Conv1D
    kind: str  # the target_modules entry it matched, e.g. "query"
    layer: int | None  # index of the transformer block it sits in, parsed from the name

    @property
    def transposed(self) -> bool:
        """Whether the module stores W0ᵀ (in × out), as Conv1D does."""
        return isinstance(self.module, _conv1d())

    @property
    def weight(self) -> torch.Tensor:
        """W0 as (out, in): a view of the module's weight, or a quantized layer's dequantized weight."""
        if quantize.is_quantized(self.module):
            return quantize.dequantized_weight(self.module)
        return self.module.weight.T if self.transposed else self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), the shape of W0 and ΔW."""
        if self.transposed:
            return self.module.nf, self.module.nx  # Conv1D's names for out and in
        return self.module.out_features, self.module.in_features


_LAYER_RE = re.compile(r"\.(\d+)\.")


def family(config) -> Family:
    return FAMILIES.get(getattr(config, "model_type", ""), UNKNOWN_FAMILY)


def default_targets(config) -> list[str]:
    return list(family(config).defaults)


def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def attention_kinds(name: str, config) -> tuple[str, ...] | None:
    """The attention matrices module `name` computes: one kind (q, k, v or o), QKV for the family's
    fused projection, or None when it is no attention projection lrft knows."""
    fam = family(config)
    if fam.fused and _ends_with(name, fam.fused):
        return QKV
    return next(((kind,) for kind, names in ATTENTION_NAMES.items() if any(_ends_with(name, n) for n in names)), None)


# The attention modules of an encoder-decoder model's decoder that read the encoder's output (T5, BART)
CROSS_ATTENTION = ("EncDecAttention", "encoder_attn", "crossattention")


def is_encoder_decoder(model_or_config) -> bool:
    """Whether a model (or its config) is an encoder-decoder: the prompt in its encoder, the answer from its decoder."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def stack_layers(config) -> tuple[int, int]:
    """(encoder layers, decoder layers) of an encoder-decoder config; (layers, 0) for any other model."""
    if not is_encoder_decoder(config):
        return getattr(config, "num_hidden_layers", 0) or 0, 0
    encoder = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", 0)
    decoder = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or encoder
    return encoder, decoder


def attention_block(name: str, config) -> str:
    """Which attention module `name` sits in: "" for self-attention of an encoder or a decoder-only
    model, "decoder" for an encoder-decoder's decoder self-attention, "cross" for its cross-attention."""
    if not is_encoder_decoder(config) or not _in_decoder(name):
        return ""
    return "cross" if any(f".{c}." in f".{name}." for c in CROSS_ATTENTION) else "decoder"


def _in_decoder(name: str) -> bool:
    return re.search(r"(^|\.)decoder\.", name) is not None


def stack_layer(t: Target, config) -> int | None:
    """The target's layer counted over the whole model: an encoder-decoder's decoder layers come after
    its encoder layers."""
    if t.layer is None or not is_encoder_decoder(config):
        return t.layer
    return t.layer + (stack_layers(config)[0] if _in_decoder(t.name) else 0)


def fused_rows(packing: str, heads: list[int], head_dim: int) -> torch.Tensor | None:
    """A fused projection's output rows as indices into [q; k; v], the kinds' per-head rows stacked
    kind after kind (kind i has heads[i] heads of head_dim rows); None when already in that order."""
    if packing == "blocks":
        return None
    # "heads" (every kind has the same heads): output row (h, kind, i) is row (kind, h, i) of [q; k; v]
    return torch.arange(sum(heads) * head_dim).view(len(heads), heads[0], head_dim).transpose(0, 1).reshape(-1)


def find_targets(model: nn.Module, patterns: list[str]) -> list[Target]:
    """Every Linear (or Conv1D) whose dotted name ends with one of `patterns`, in model order."""
    layer_types = (nn.Linear, _conv1d())
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, layer_types)]
    targets, matched = [], set()
    for name, module in linears:
        if any(name == h or name.startswith(h + ".") for h in HEAD_NAMES):
            continue  # the task head is trained whole (train.train_head), never adapted
        for pattern in patterns:
            if _ends_with(name, pattern):
                m = _LAYER_RE.search(name)
                targets.append(Target(name, module, pattern, int(m.group(1)) if m else None))
                matched.add(pattern)
                break
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        suffixes = sorted({_LAYER_RE.split(n)[-1] for n, _ in linears})
        raise LrftError(
            f"adapter.target_modules: {', '.join(repr(p) for p in unmatched)} matched no Linear layer; "
            f"this model's Linear layers end with: {', '.join(suffixes)}"
        )
    return targets


def weights_checksum(targets: list[Target]) -> str:
    """A cheap content checksum of the target weights: names, shapes, sums and a strided sample."""
    h = hashlib.sha256()
    for t in targets:
        w = t.module.weight.detach()
        flat = w.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        h.update(f"{t.name}{tuple(w.shape)}{float(w.double().sum()):.6e}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The task head(s) by name (classifier for BERT/RoBERTa, score for Llama; see HEAD_NAMES)."""
    return {n: m for n, m in model.named_children() if n in HEAD_NAMES}


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The Linear that gives the task head's outputs (BERT's classifier, RoBERTa's classifier.out_proj,
    Llama's score), or None when the model has no such head."""
    for name in OUTPUT_HEADS:
        head = getattr(model, name, None)
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
        if linears:
            return linears[-1]
    return None


@torch.no_grad()
def start_regression_head_at(model: nn.Module, mean: float) -> bool:
    """Set a fresh regression head's bias to the training labels' mean, so its first predictions are the
    best constant guess rather than 0 (STS-B's labels average 2.7 on a 0-5 scale): the head's few
    epochs then go into learning the deviations, not into walking the bias over. False when the
    output layer has no bias (Llama's score), which then starts where transformers put it."""
    layer = output_layer(model)
    if layer is None or layer.bias is None or layer.out_features != 1:
        return False
    layer.bias.fill_(mean)
    return True
