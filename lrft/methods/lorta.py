"""LoRTA (Hounie et al.): every attention update of every layer, head and matrix is one CP tensor.

Factors, all trainable and owned once by `Factors` (registered on the model as lrft_shared):
A ∈ R^{d×r} over the model dimension, B ∈ R^{d_h×r} over the head dimension, C_H ∈ R^{H×r},
C_L ∈ R^{L×r}, C_M ∈ R^{M×r} (M = targeted kinds among q, k, v, o). d and d_h are sized apart, so
models with H·d_h ≠ d (Gemma 3, Qwen 3) need nothing special. With c = C_H[h] ⊙ C_L[l] ⊙ C_M[m] and
s = α/r, for layer l, kind m, head h:
  q, k, v (heads split the output, ΔW is H_m·d_h × d):  ΔW[h·d_h:(h+1)·d_h, :] = s · B diag(c) Aᵀ
  o       (heads split the input,  ΔW is d × H·d_h):    ΔW[:, h·d_h:(h+1)·d_h] = s · A diag(c) Bᵀ
Grouped-query attention (k, v with H_kv < H heads): k and v take their head factor from a second
C_KV ∈ R^{H_kv×r}, one row per kv head; q and o keep C_H. No head of k/v is tied to a query head.
Either way ΔW = U·Vᵀ with A on one side and S_lm = [B diag(c_h)]_h, the (H_m·d_h × r) stack over
heads, on the other; S_lm costs O(d_h·H·r) to build, so the forward is two thin matmuls, as LoRA's.
A fused projection computing q, k and v at once (GPT-2 c_attn, Phi-3 qkv_proj, ModernBERT Wqkv,
GPT-NeoX query_key_value) gets [S_q; S_k; S_v] in its own row order (lrft.targets.fused_rows): each
slice is exactly the update of a separate projection of that kind, and the forward stays two matmuls.
Separate q, k and v projections of a layer read the same input and share A: the first of them to run
computes x·A once and all their outputs in one matmul against [S_q; S_k; S_v] (`SharedInput`); the
others take their part (unless branch dropout gives each its own input).
Encoder-decoder models (T5, BART) hold three attention blocks: the encoder's, the decoder's and the
decoder's cross-attention. C_L indexes the encoder's layers then the decoder's (L = L_enc + L_dec) and
C_M each block's kinds (encoder q, k, v, o, then decoder.q …, then cross.q …), so every projection has
its own (layer, kind) slice and count-params is the same formula; A, B and C_H stay shared by all.
Init as the official PEFT LoRTA code: A and every C Kaiming-uniform (a=√5), B zero (model unchanged).
Trainable: (d + d_h + H + L + M)·r, plus H_kv·r when k or v is targeted under GQA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lrft.errors import LrftError
from lrft.methods.base import Adapter, BuildContext, Built, Dropout, Method, MethodParams, seeded_generator
from lrft.targets import (
    ATTENTION_NAMES,
    FAMILIES,
    QKV,
    Target,
    attention_block,
    attention_kinds,
    family,
    fused_rows,
    stack_layer,
    stack_layers,
)

KINDS = ("q", "k", "v", "o")
BLOCKS = ("", "decoder", "cross")  # attention blocks: self (encoder, decoder-only), decoder self, cross
SUPPORTED = "; ".join(f"{k}: {', '.join(v)}" for k, v in ATTENTION_NAMES.items())
FUSED = ", ".join(f"{t} {f.fused}" for t, f in FAMILIES.items() if f.fused)


class LoRTAParams(MethodParams):
    alpha: float = Field(1.0, gt=0, description="scale numerator: ΔW = (alpha / rank)·CP tensor slice (paper GLUE: 1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the branch input")


def _kaiming(rows: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.empty(rows, rank)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
    return t


class Factors(nn.Module):
    """The CP factors, stored once for the whole model."""

    def __init__(
        self,
        d: int,
        head_dim: int,
        heads: int,
        kv_heads: int | None,
        layers: int,
        kinds: list[str],
        rank: int,
        gen: torch.Generator,
    ):
        super().__init__()
        self.kinds = kinds
        self.A = nn.Parameter(_kaiming(d, rank, gen))
        self.B = nn.Parameter(torch.zeros(head_dim, rank))
        self.C_H = nn.Parameter(_kaiming(heads, rank, gen))
        self.C_L = nn.Parameter(_kaiming(layers, rank, gen))
        self.C_M = nn.Parameter(_kaiming(len(kinds), rank, gen))
        self.C_KV = nn.Parameter(_kaiming(kv_heads, rank, gen)) if kv_heads else None

    def head_stack(self, layer: int, kind: str) -> torch.Tensor:
        """S_lm (heads·d_h × r): row h·d_h + i is B[i] ⊙ C_H[h] ⊙ C_L[l] ⊙ C_M[m]."""
        heads = self.C_KV if matrix_of(kind) in ("k", "v") and self.C_KV is not None else self.C_H
        c = heads * (self.C_L[layer] * self.C_M[self.kinds.index(kind)])
        return (c[:, None, :] * self.B[None, :, :]).reshape(-1, self.B.shape[1])


class Branch(Adapter):
    """One adapted projection: its (layer, kinds) slice of the shared tensor, applied without a dense ΔW."""

    def __init__(
        self,
        factors: Factors,
        layer: int,
        kinds: tuple[str, ...],
        rows: torch.Tensor | None,
        scale: float,
        dropout: float,
    ):
        super().__init__()
        object.__setattr__(self, "factors", factors)  # a reference, not a submodule: lrft_shared owns it
        self.layer, self.kinds, self.scale = layer, kinds, scale
        self.kind = "".join(kinds)  # "q", "k", "v", "o", "qkv" for a fused projection; "cross.q" …
        self.matrix = "".join(matrix_of(k) for k in kinds)  # the kind without its attention block
        self.register_buffer("rows", rows, persistent=False)  # a fused projection's row order (None: as stacked)
        self.dropout = Dropout(dropout)
        object.__setattr__(self, "shared_input", None)  # the layer's SharedInput, if q/k/v share x·A

    def stack(self) -> torch.Tensor:
        """S (out × r for q/k/v, in × r for o): the head stacks of this module's kinds, in its row order."""
        S = torch.cat([self.factors.head_stack(self.layer, k) for k in self.kinds])
        return S if self.rows is None else S[self.rows]

    def forward(self, x):
        if self.shared_input is not None and not self.dropout.active:
            return self.shared_input.output(self, x)
        f, x, S = self.factors, self.dropout(x), self.stack()
        if self.matrix == "o":  # ΔW = s·A Sᵀ; the scale rides on a small d×r factor, not on the output
            return F.linear(F.linear(x, S.T), f.A * self.scale)
        return F.linear(F.linear(x, f.A.T), S * self.scale)  # ΔW = s·S Aᵀ

    def lora_factors(self):
        A, S = self.factors.A.float(), self.stack().float()
        return (S.T, A * self.scale) if self.matrix == "o" else (A.T, S * self.scale)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kind={self.kind}, scale={self.scale:g}"


class SharedInput:
    """The separate q, k and v branches of one layer, which read the same x: one pass computes x·A and
    every member's output at once; each member then takes its own part, once."""

    def __init__(self, members: list[Branch]):
        self.members = members
        self.x: torch.Tensor | None = None
        self.parts: dict[int, torch.Tensor] = {}

    def output(self, branch: Branch, x: torch.Tensor) -> torch.Tensor:
        if x is not self.x or id(branch) not in self.parts:  # a new input: the layer's first projection
            stacks = [m.stack() for m in self.members]
            y = F.linear(F.linear(x, branch.factors.A.T), torch.cat(stacks) * branch.scale)
            parts = y.split([S.shape[0] for S in stacks], dim=-1)
            self.x, self.parts = x, {id(m): part for m, part in zip(self.members, parts)}
        part = self.parts.pop(id(branch))
        if not self.parts:
            self.x = None  # every member has its part: hold no tensor past this layer
        return part


def matrix_of(kind: str) -> str:
    """q, k, v or o of a kind, without the attention block it may name ("cross.k" → "k")."""
    return kind.rsplit(".", 1)[-1]


def kinds_of(t: Target, config) -> tuple[str, ...]:
    """The target's kinds: q, k, v, o (or all three of a fused projection), prefixed with the attention
    block for an encoder-decoder's decoder ("decoder.q", "cross.q"; the encoder's are plain)."""
    kinds = attention_kinds(t.name, config)
    if kinds is None:
        raise LrftError(
            f"adapter.target_modules: lorta adapts attention projections only, and {t.name} is not one; "
            f"supported kinds ({SUPPORTED}), fused q,k,v in {FUSED}; lora, tlora and talora adapt any "
            f"Linear layer"
        )
    block = attention_block(t.name, config)
    return tuple(f"{block}.{k}" if block else k for k in kinds)


def geometry(targets: list[Target], config, saved: dict | None = None) -> dict:
    """Layer, head and kind layout of the targets, checked against the model config. A fused projection's
    packing is a saved adapter's record (`saved`, its meta) when there is one, else the family table's.
    An encoder-decoder's layers are its encoder's then its decoder's (C_L has a row for each), and its
    kinds are those of each attention block (C_M: encoder q, k, v, o, then the decoder's, then the
    cross-attention's), so no two projections share a slice of the tensor."""
    heads = getattr(config, "num_attention_heads", None)
    layers = sum(stack_layers(config))
    if not heads or not layers:
        raise LrftError("adapter.method: lorta needs num_attention_heads and num_hidden_layers in the model config")
    if getattr(config, "decoder_attention_heads", heads) != heads:
        raise LrftError(
            f"adapter.method: lorta shares one head factor across the model, and this encoder has {heads} "
            f"heads, its decoder {config.decoder_attention_heads}; use lora, tlora or talora"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // heads
    seen: dict[tuple[int, str], str] = {}
    fused = False
    for t in targets:
        kinds, layer = kinds_of(t, config), stack_layer(t, config)
        fused |= len(kinds) > 1
        if layer is None or layer >= layers:
            raise LrftError(
                f"adapter.target_modules: {t.name} is not inside one of the model's {layers} numbered layers"
            )
        for kind in kinds:
            if (layer, kind) in seen:
                raise LrftError(
                    f"adapter.target_modules: {seen[(layer, kind)]} and {t.name} are both layer {layer} "
                    f"kind {kind}; lorta needs one projection of each kind per attention block"
                )
            seen[(layer, kind)] = t.name
        _check_shape(t, [matrix_of(k) for k in kinds], d, heads, kv_heads, head_dim)
    kinds = [
        k
        for block in BLOCKS
        for k in (f"{block}.{m}" if block else m for m in KINDS)
        if any(k == key[1] for key in seen)
    ]
    gqa = kv_heads != heads and any(matrix_of(k) in ("k", "v") for k in kinds)
    fam = family(config)
    recorded = (saved or {}).get("fused") or {}
    return {
        "hidden": d,
        "head_dim": head_dim,
        "heads": heads,
        "kv_heads": kv_heads if gqa else None,
        "layers": layers,
        "kinds": kinds,
        "head_mapping": "k, v use their own head factor C_KV (one row per kv head)" if gqa else "C_H for every kind",
        "fused": {"module": fam.fused, "kinds": list(QKV), "packing": recorded.get("packing", fam.packing)}
        if fused
        else None,
    }


def _check_shape(t: Target, matrices: list[str], d: int, heads: int, kv_heads: int, head_dim: int) -> None:
    out_rows = sum(kv_heads if m in ("k", "v") else heads for m in matrices) * head_dim
    want = (d, heads * head_dim) if matrices == ["o"] else (out_rows, d)
    if t.shape != want:
        raise LrftError(
            f"adapter.target_modules: {t.name} is {t.shape[0]}×{t.shape[1]}, but the config's {heads} "
            f"heads ({kv_heads} for k and v) × {head_dim} dims and hidden size {d} say {want[0]}×{want[1]}"
        )


def build(targets: list[Target], p: LoRTAParams, ctx: BuildContext) -> Built:
    g = geometry(targets, ctx.model_config, ctx.saved_meta)
    factors = Factors(
        g["hidden"],
        g["head_dim"],
        g["heads"],
        g["kv_heads"],
        g["layers"],
        g["kinds"],
        p.rank,
        seeded_generator(ctx.seed),
    )
    adapters = {}
    for t in targets:
        kinds = kinds_of(t, ctx.model_config)
        heads = [g["kv_heads"] or g["heads"] if matrix_of(k) in ("k", "v") else g["heads"] for k in kinds]
        rows = fused_rows(g["fused"]["packing"], heads, g["head_dim"]) if len(kinds) > 1 else None
        layer = stack_layer(t, ctx.model_config)
        adapters[t.name] = Branch(factors, layer, kinds, rows, p.alpha / p.rank, p.dropout)
    # the separate projections of one attention block that read the same input: q, k, v of
    # self-attention; only k and v of cross-attention (its q reads the decoder, k and v the encoder)
    groups: dict[tuple[int, str], list[Branch]] = {}
    for b in adapters.values():
        block = b.kinds[0].rpartition(".")[0]
        if b.matrix in ("k", "v") or (b.matrix == "q" and block != "cross"):
            groups.setdefault((b.layer, block), []).append(b)
    for readers in groups.values():
        if len(readers) > 1:
            group = SharedInput(readers)
            for b in readers:
                object.__setattr__(b, "shared_input", group)
    return Built(adapters, shared=factors, meta=g)


def count(targets: list[Target], p: LoRTAParams, ctx: BuildContext) -> int:
    g = geometry(targets, ctx.model_config)
    return (g["hidden"] + g["head_dim"] + g["heads"] + g["layers"] + len(g["kinds"]) + (g["kv_heads"] or 0)) * p.rank


METHOD = Method(
    name="lorta",
    summary="LoRTA: one low-rank CP tensor (A, B, C_heads, C_layers, C_matrices) for all attention updates",
    params=LoRTAParams,
    build=build,
    count=count,
    suggested_lr=3e-2,
)
