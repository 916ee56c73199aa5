"""QLoRA's frozen base: `model.quantize` (nf4, fp4, int8) as transformers' BitsAndBytesConfig, the
dequantized W0 of a quantized Linear (what talora's SVD and a merge use), and what the weights take in
memory at each setting (`lrft count-params --quantize`)."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from lrft.errors import LrftError

KINDS = ("nf4", "fp4", "int8")
BLOCK = 64  # bitsandbytes' 4-bit blocksize: one fp32 absmax per 64 weights
FOUR_BIT = 4 + 32 / BLOCK  # bits a 4-bit Linear weight takes, its block's absmax included


def require_bitsandbytes(kind: str) -> None:
    """One line, before anything loads, where bitsandbytes is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LrftError(
            f"model.quantize: {kind} needs bitsandbytes, which is not installed; "
            f"pip install 'lrft[qlora]' (or drop model.quantize)"
        )


def quantization_config(kind: str, compute_dtype: torch.dtype, skip: tuple[str, ...] = ()):
    """transformers' BitsAndBytesConfig of `kind`; quantized layers compute in `compute_dtype` (the
    base's dtype: autocast lowers it further), `skip` modules (task heads) stay as they are."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(kind)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip) or None)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip) or None,  # bitsandbytes' name for the modules any quantization skips
    )


def load_options(kind: str | None, compute_dtype: torch.dtype, skip: tuple[str, ...] = ()) -> dict:
    """from_pretrained's extra options for `model.quantize` (none without it): the config, and the
    device the quantized weights are made on (this process's GPU, else the CPU)."""
    if kind is None:
        return {}
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization_config(kind, compute_dtype, skip), "device_map": {"": device}}


def prepare(model: nn.Module) -> None:
    """Every 4-bit layer of a loaded model kept in the layout it was quantized in (bitsandbytes repacks
    its weights on the first no-grad forward on a CPU with AVX-512 BF16, a layout its dequantization
    does not read back and layers narrower than a block of 64 inputs cannot take), and computing in
    the autocast dtype where autocast is on, as an nn.Linear does (follow_autocast), else in the dtype
    it was loaded with."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        if hasattr(module, "compute_dtype") and is_quantized(module):
            module.register_forward_pre_hook(follow_autocast(module.compute_dtype))


def follow_autocast(loaded: torch.dtype | None):
    """A forward pre-hook: under autocast the layer computes in, and returns, the autocast dtype (its
    output cast back to a float32 input's dtype would keep float32 activations), else its loaded dtype."""

    def hook(module: nn.Module, args):
        device = args[0].device.type
        module.compute_type_is_set = True
        if not torch.is_autocast_enabled(device):
            module.compute_dtype = loaded
            return None
        module.compute_dtype = torch.get_autocast_dtype(device)
        return (args[0].to(module.compute_dtype), *args[1:])

    return hook


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is one of bitsandbytes' quantized Linear layers."""
    return type(module).__module__.startswith("bitsandbytes") and hasattr(module, "in_features")


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """W0 (out, in) of a quantized Linear, as the layer computes with it, in float32."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, getattr(module, "state", None)).float()


def model_quantization(model: nn.Module) -> dict | None:
    """The quantization a loaded model carries (its BitsAndBytesConfig as a dict), or None."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def dequantize(model: nn.Module) -> nn.Module:
    """Every quantized Linear replaced by a float32 nn.Linear of its dequantized weights, and the
    quantization dropped from the config: a plain model a merge folds ΔW into and saves."""
    if model_quantization(model) is None:
        return model
    model.dequantize(dtype=torch.float32)
    return model


def weight_bytes(shapes: list[tuple[int, int]], kind: str | None, dtype_bytes: int = 4) -> int:
    """Bytes the Linear weights of `shapes` (out, in) take at `kind` (None: `dtype_bytes` each)."""
    if kind is None:
        return sum(o * i * dtype_bytes for o, i in shapes)
    if kind == "int8":
        return sum(o * i + 4 * o for o, i in shapes)  # int8 weights and one fp32 scale per row
    return sum(int(o * i * FOUR_BIT / 8) for o, i in shapes)
