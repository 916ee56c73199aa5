"""`lrft count-params`: trainable and total parameter counts from a model config, without weights.

The model is instantiated on the meta device (no memory, no download for the built-in presets), its
target Linears are found as in training, and each method's closed-form count is applied to them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lrft import methods
from lrft import quantize as quantize_weights  # `quantize` is the argument naming the kind
from lrft.errors import LrftError
from lrft.methods import BuildContext
from lrft.models import quiet_transformers, resolve
from lrft.open_runs import read_run_recipe, trained_adapter_config
from lrft.targets import HEAD_NAMES, default_targets, find_targets

# Public config values of the papers' models (../shared/DESIGN.md §5), so counts work offline.
PRESETS: dict[str, tuple[str, str, dict]] = {
    "roberta-base": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(
            vocab_size=50265,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=514,
            type_vocab_size=1,
        ),
    ),
    "roberta-large": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
            type_vocab_size=1,
        ),
    ),
    "llama2-7b": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    "t5-base": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=32128,
            d_model=768,
            d_kv=64,
            d_ff=3072,
            num_layers=12,
            num_decoder_layers=12,
            num_heads=12,
            feed_forward_proj="relu",
            tie_word_embeddings=True,
        ),
    ),
}
DEFAULT_MODEL = "roberta-large"


def meta_model(model: str, num_labels: int):
    """The model built from its config on the meta device: shapes only, no weights."""
    import transformers

    quiet_transformers()
    if model in PRESETS:
        config_cls, model_cls, values = PRESETS[model]
        config = getattr(transformers, config_cls)(**values, num_labels=num_labels)
        cls = getattr(transformers, model_cls)
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(resolve(model), num_labels=num_labels)
        except (OSError, ValueError) as e:
            raise LrftError(
                f"--model: no config for {model!r} ({str(e).splitlines()[0]}); use a local model dir, "
                f"a hub id, or one of the presets: {', '.join(PRESETS)}"
            ) from None
        arch = (getattr(config, "architectures", None) or [""])[0]
        cls = getattr(transformers, arch, None) or transformers.AutoModel
        if cls.__name__.endswith("Model") and config.model_type in ("bert", "roberta"):
            cls = transformers.AutoModelForSequenceClassification
    with torch.device("meta"):
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)


def count_params(
    method: str,
    rank: int,
    model: str = DEFAULT_MODEL,
    targets: list[str] | None = None,
    num_labels: int = 2,
    params: dict | None = None,
    saved_meta: dict | None = None,
    quantize: str | None = None,
) -> dict:
    """Counts of the method, of LoRA at the same rank, and of full fine-tuning (and with `quantize`, the
    base weights' memory quantized so and in float32).

    `params` are the method's other parameters; `saved_meta` a trained adapter's meta (talora's
    calibrated per-module ranks), which makes the count exact for that run.
    """
    if rank <= 0:
        raise LrftError(f"--rank: {rank} is not a positive rank; use e.g. --rank 8")
    net = meta_model(model, num_labels)
    total = sum(p.numel() for p in net.parameters())
    patterns = targets or default_targets(net.config)
    found = find_targets(net, patterns)
    lora = methods.get("lora")
    lora_count = lora.count(found, lora.params(rank=rank), BuildContext(model_config=net.config))
    if method == "full":
        trainable = total
    else:
        m = methods.get(method)
        ctx = BuildContext(model_config=net.config, saved_meta=saved_meta)
        trainable = m.count(found, m.params(**{**(params or {}), "rank": rank}), ctx)
    return {
        "method": method,
        "rank": rank,
        "model": model,
        "architecture": type(net).__name__,
        "targets": patterns,
        "modules": len(found),
        "trainable": trainable,
        "lora": lora_count,
        "full": total,
        **({"weights_memory": weights_memory(net, quantize, trainable)} if quantize else {}),
    }


def weights_memory(net, kind: str, trainable: int) -> dict:
    """Bytes of the base's weights with its Linear layers quantized to `kind` (bitsandbytes leaves the
    output layer and task heads as they are; everything else stays float32), next to float32 and bf16,
    and of the float32 adapter."""
    skipped = ("lm_head", *HEAD_NAMES)
    linears = [
        (m.out_features, m.in_features)
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(part in skipped for part in name.split("."))
    ]
    total = sum(p.numel() for p in net.parameters())
    rest = total - sum(o * i for o, i in linears)
    return {
        "quantize": kind,
        "bytes": quantize_weights.weight_bytes(linears, kind) + 4 * rest,
        "float32_bytes": 4 * total,
        "bfloat16_bytes": 2 * total,
        "adapter_bytes": 4 * trainable,
    }


def count_command(
    method: str,
    rank: int,
    model: str,
    targets: str | None,
    num_labels: int,
    calibrated: Path | None,
    quantize: str | None = None,
) -> dict:
    """`lrft count-params`: the counts of a method on a model (`targets` comma-separated), or with
    `calibrated` the exact count of that finished run, which must be of `method`; with `quantize`, the
    weights' memory too."""
    if method != "full":
        methods.get(method)
    if quantize is not None and quantize not in quantize_weights.KINDS:
        raise LrftError(f"--quantize: unknown {quantize!r}; choose one of: {', '.join(quantize_weights.KINDS)}")
    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    if calibrated is None:
        return count_params(method, rank, model, names, num_labels, quantize=quantize)
    counts = count_run(calibrated)
    if counts["method"] != method:
        raise LrftError(
            f"--calibrated: {calibrated} is a {counts['method']} run, not {method}; give the run dir of a {method} run"
        )
    return counts


def count_run(run_dir: Path) -> dict:
    """The exact count of a trained run (`--calibrated`): its base model, targets, params and saved meta."""
    recipe = read_run_recipe(run_dir)
    config = trained_adapter_config(run_dir)
    labels = config.get("label_names")
    counts = count_params(
        config["method"],
        config["params"]["rank"],
        recipe.model.name,
        config["target_modules"],
        1 if config.get("problem") == "regression" else len(labels or [0, 1]),
        config["params"],
        config.get("meta"),
    )
    counts["run"] = str(run_dir)
    counts["per_module"] = {k: v["rank"] for k, v in (config.get("meta") or {}).get("modules", {}).items()}
    return counts


def render(counts: dict) -> str:
    """`lrft count-params`' table on stdout: the model, its targets, and the counts side by side."""
    full, lora, n = counts["full"], counts["lora"], counts["trainable"]

    def vs(other: int, what: str) -> str:
        if n == other:
            return f"same as {what}"
        return f"{other / n:,.1f}× fewer than {what}" if n < other else f"{n / other:,.1f}× more than {what}"

    lines = [
        f"model    {counts['model']} ({counts['architecture']}), {full:,} parameters",
        f"targets  {', '.join(counts['targets'])} ({counts['modules']} modules)",
        f"full FT  {full:>14,}",
        f"lora     {lora:>14,}  (rank {counts['rank']})",
        f"{counts['method']:<8} {n:>14,}  ({100 * n / full:.4f} % of the model; {vs(lora, 'LoRA')}; {vs(full, 'full FT')})",
    ]
    if memory := counts.get("weights_memory"):
        mib = 2**20
        lines.append(
            f"weights  {memory['bytes'] / mib:>11,.1f} MiB {memory['quantize']} base "
            f"(float32 {memory['float32_bytes'] / mib:,.1f} MiB, {memory['float32_bytes'] / memory['bytes']:.1f}× more; "
            f"bf16 {memory['bfloat16_bytes'] / mib:,.1f} MiB) + {memory['adapter_bytes'] / mib:,.2f} MiB float32 adapter"
        )
    return "\n".join(lines)
