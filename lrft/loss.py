"""What training minimises: an `Objective` per kind of task, and the loss of a batch without a causal
LM's full logits.

The trainer asks its objective (chosen once, from the task's problem: `objective_for`) two things: what
an example weighs in a step's mean loss, and the mean loss of a batch. Classifiers and regressors
take their model's own loss (`ExampleLoss`); causal LMs the cross-entropy of their response tokens
(`ResponseTokenLoss`); preference pairs a DPO-family loss (lrft.preference, from `sequence_logps`).

A causal LM's output layer turns every position into a vocabulary-sized row of logits (SmolLM2:
49,152 per token, 0.5 GB in fp32 for a training batch of 8 × 320 tokens, copied again by the
upcast and the log-softmax). Only the positions with a label to predict (the response tokens) need
them, and never all at once: for the duration of one forward pass the output layer is replaced by
`ChunkedLossHead`, which takes the final hidden states, keeps the labelled positions, and sums the
cross-entropy over chunks of CHUNK_TOKENS positions, each chunk's logits recomputed in the backward
pass instead of kept (what Liger's fused linear cross-entropy does on GPUs, in plain torch). The
result is the mean over labelled tokens, as transformers' own loss. Models whose logits are more
than `lm_head(hidden)` (and Gemma's final soft-capping) keep transformers' own loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lrft.targets import is_encoder_decoder

IGNORE = -100
CHUNK_TOKENS = 512  # positions whose logits exist at once: 512 × 49,152 fp32 = 100 MB for SmolLM2
# causal LMs whose logits are exactly lm_head(final hidden states), soft-capped where the config says
PLAIN_LOGITS = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "smollm3",
    "olmo",
    "olmo2",
}


class Objective(ABC):
    """What training minimises for one kind of task."""

    @abstractmethod
    def example_weight(self, feature: dict) -> int:
        """What a training example weighs in the mean loss of its step."""

    @abstractmethod
    def loss(self, model: nn.Module, core: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss of `batch` through `model` (which may wrap `core`, e.g. in DDP)."""

    def batch_sums(self) -> dict[str, float]:
        """Sums over the last `loss` batch's pairs of what training logs besides the loss (their count
        under "pairs"); none but the loss by default."""
        return {}


class ExampleLoss(Objective):
    """Classification and regression: the model's own loss from its task head (cross-entropy, or the
    squared error of a regression head), the mean over the batch's examples, each weighing 1."""

    def example_weight(self, feature: dict) -> int:
        return 1

    def loss(self, model: nn.Module, core: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss


class ResponseTokenLoss(Objective):
    """Causal LMs (and encoder-decoders): the cross-entropy of the tokens the model predicts (the labelled
    ones, the response), their mean (`batch_loss`); an example weighs its response tokens."""

    def example_weight(self, feature: dict) -> int:
        # every labelled token is predicted: a causal LM's first position is prompt (never labelled), an
        # encoder-decoder's labels are its decoder's targets
        return sum(t != IGNORE for t in feature["labels"])

    def loss(self, model: nn.Module, core: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch_loss(model, core, batch)


OBJECTIVES: dict[str, Objective] = {
    "classification": ExampleLoss(),
    "regression": ExampleLoss(),
    "causal_lm": ResponseTokenLoss(),
}


def objective_for(problem: str) -> Objective:
    """The objective of a task's problem ("classification", "regression" or "causal_lm")."""
    return OBJECTIVES[problem]


def batch_loss(model: nn.Module, core: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean loss of `batch` through `model` (which may wrap `core`, e.g. in DDP): chunked for a
    causal LM with plain logits, transformers' own otherwise."""
    if not chunkable(core, batch):
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with loss_head(core, batch["labels"]) as head:
        model(**inputs, use_cache=False)
    return head.loss


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # what a batch of pairs hands the model


def sequence_logps(
    model: nn.Module, core: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) of each row's labelled tokens (a response), in fp32: what
    preference losses compare. Chunked as `batch_loss` is, so the vocabulary-sized logits never exist whole."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if chunkable(core, batch):
        with loss_head(core, labels, per_sequence=True) as head:
            model(**inputs, use_cache=False)
        return head.sequence_logps, head.sequence_tokens
    if is_encoder_decoder(core):  # the decoder reads the labels shifted right itself
        inputs["decoder_input_ids"] = core.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(**inputs, use_cache=False).logits.float()
        targets = labels.to(logits.device)
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
    keep = targets != IGNORE
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * keep).sum(-1), keep.sum(-1)


def chunkable(core: nn.Module, batch: dict) -> bool:
    labels = batch.get("labels")
    return (
        labels is not None
        and labels.dim() == 2
        and getattr(core.config, "model_type", None) in PLAIN_LOGITS
        and isinstance(core.get_output_embeddings(), nn.Linear)
    )


@contextmanager
def loss_head(core: nn.Module, labels: torch.Tensor, per_sequence: bool = False):
    """`core`'s output layer replaced by a ChunkedLossHead for the block."""
    head = core.get_output_embeddings()
    stand_in = ChunkedLossHead(head, labels, getattr(core.config, "final_logit_softcapping", None), per_sequence)
    core.set_output_embeddings(stand_in)
    try:
        yield stand_in
    finally:
        core.set_output_embeddings(head)


class ChunkedLossHead(nn.Module):
    """Stands in for a causal LM's output layer: computes the loss (the mean over labelled tokens, or with
    `per_sequence` each row's summed log-probs and token count), returns a placeholder for the logits."""

    def __init__(self, head: nn.Linear, labels: torch.Tensor, softcap: float | None, per_sequence: bool = False):
        super().__init__()
        object.__setattr__(self, "head", head)  # a reference: the model keeps owning its output layer
        self.labels, self.softcap, self.per_sequence = labels, softcap, per_sequence
        self.loss: torch.Tensor | None = None
        self.sequence_logps: torch.Tensor | None = None
        self.sequence_tokens: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        targets = self.labels[:, 1:].to(hidden.device)  # position t predicts token t + 1
        keep = targets != IGNORE
        states, targets = hidden[:, :-1][keep], targets[keep]
        chunks = []
        for start in range(0, len(targets), CHUNK_TOKENS):
            chunk = (states[start : start + CHUNK_TOKENS], targets[start : start + CHUNK_TOKENS])
            if torch.is_grad_enabled():
                chunks.append(checkpoint(self.token_logps, *chunk, use_reentrant=False))
            else:
                chunks.append(self.token_logps(*chunk))
        token_logps = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
        if self.per_sequence:
            rows = keep.nonzero()[:, 0]
            self.sequence_logps = token_logps.new_zeros(len(keep)).index_add(0, rows, token_logps)
            self.sequence_tokens = keep.sum(-1)
        self.loss = -token_logps.sum() / max(len(targets), 1)
        return hidden.new_zeros(hidden.shape[0], hidden.shape[1], 1)  # what the model returns as logits

    def token_logps(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(states, self.head.weight, self.head.bias).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return -F.cross_entropy(logits, targets, reduction="none")
