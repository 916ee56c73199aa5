"""Targets: the Linear layers an adapter attaches to, found by name in a loaded model.

Target modules are matched by name suffix, as PEFT does: `query` matches `...attention.self.query`,
`attention.output.dense` matches only the attention output projection, while `output.dense` matches
both BERT output projections. The index of the transformer block is parsed from the module path.
The task head (classifier, score) is never a target: it is trained whole (train.train_head).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from torch import nn

from lrft.errors import LrftError

# Targets when a recipe names none: the attention query and value projections, as the papers.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}

HEAD_NAMES = ("classifier", "score")  # task heads trained with train.train_head, as PEFT's modules_to_save


@dataclass
class Target:
    """One Linear layer chosen by `adapter.target_modules`."""

    name: str  # dotted module path in the model, e.g. bert.encoder.layer.0.attention.self.query
    module: nn.Linear
    kind: str  # the target_modules entry it matched, e.g. "query"
    layer: int | None  # index of the transformer block it sits in, parsed from the name

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), the shape of W0 and ΔW."""
        return self.module.out_features, self.module.in_features


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
