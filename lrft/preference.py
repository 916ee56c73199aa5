"""Preference optimisation: the DPO family of losses, each on one screen, and its training objective.

A pair's policy log-probs `π_c`, `π_r` are summed over its chosen and rejected response tokens, its
reference's `ρ_c`, `ρ_r` likewise (the same model with its adapters switched off, or the policy an
`adapter.init_from` run started from); `h_c = π_c − ρ_c`, `h_r = π_r − ρ_r`, `Δ = h_c − h_r`, `n_c`,
`n_r` the response token counts, `ε` train.dpo.label_smoothing, `σ` the logistic function:

| loss | per pair | reward of a side |
| --- | --- | --- |
| sigmoid (DPO; cDPO with ε > 0) | −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) | β·h |
| robust (Chowdhury et al.) | [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1−2ε) | β·h |
| hinge (SLiC) | max(0, 1 − βΔ) | β·h |
| ipo | (h_c/n_c − h_r/n_r − 1/(2β))² | β·h |
| simpo (no reference; ε as sigmoid's) | −log σ(β(π_c/n_c − π_r/n_r) − γ) | β·π/n |
| orpo (no reference) | −π_c/n_c − β·log σ(log odds(π_c/n_c) − log odds(π_r/n_r)) | β·π/n |

with log odds(p) = p − log(1 − eᵖ) and γ train.dpo.simpo_gamma. These are TRL's formulas (sigmoid,
robust, hinge, ipo: DPOTrainer; simpo: CPOTrainer with cpo_alpha 0; orpo: ORPOTrainer, β its λ), but
orpo's SFT term is the mean over the chosen response's tokens per pair, as the ORPO paper writes it
(TRL's covers the prompt too and averages over the batch's tokens). A step's loss is the mean over its
pairs, whatever the micro-batches and processes (each pair weighs 1). A new loss is a function and a
line of LOSSES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lrft.inject import adapters_off
from lrft.loss import Objective, sequence_logps


@dataclass(frozen=True)
class Logps:
    """Per-pair summed response log-probs and token counts of the chosen and the rejected side."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def of_batch(cls, sums: torch.Tensor, tokens: torch.Tensor) -> Logps:
        """From a pair batch's rows: the chosen rows first, then the rejected (PairCollator)."""
        n = len(sums) // 2
        return cls(sums[:n], sums[n:], tokens[:n], tokens[n:])


Loss = Callable[[Logps, Logps | None, "DPOSettings"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DPOSettings:
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5


def _margin(pi: Logps, ref: Logps, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(βΔ, chosen reward β·h_c, rejected reward β·h_r)."""
    chosen, rejected = beta * (pi.chosen - ref.chosen), beta * (pi.rejected - ref.rejected)
    return chosen - rejected, chosen, rejected


def sigmoid(pi: Logps, ref: Logps, s: DPOSettings):
    z, rc, rr = _margin(pi, ref, s.beta)
    return -(1 - s.label_smoothing) * F.logsigmoid(z) - s.label_smoothing * F.logsigmoid(-z), rc, rr


def robust(pi: Logps, ref: Logps, s: DPOSettings):
    z, rc, rr = _margin(pi, ref, s.beta)
    eps = s.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), rc, rr


def hinge(pi: Logps, ref: Logps, s: DPOSettings):
    z, rc, rr = _margin(pi, ref, s.beta)
    return torch.relu(1 - z), rc, rr


def ipo(pi: Logps, ref: Logps, s: DPOSettings):
    _, rc, rr = _margin(pi, ref, s.beta)
    h = (pi.chosen - ref.chosen) / pi.chosen_tokens - (pi.rejected - ref.rejected) / pi.rejected_tokens
    return (h - 1 / (2 * s.beta)) ** 2, rc, rr


def simpo(pi: Logps, ref: None, s: DPOSettings):
    rc, rr = s.beta * pi.chosen / pi.chosen_tokens, s.beta * pi.rejected / pi.rejected_tokens
    z = rc - rr - s.simpo_gamma
    return -(1 - s.label_smoothing) * F.logsigmoid(z) - s.label_smoothing * F.logsigmoid(-z), rc, rr


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate near 0 too (where 1 − eˣ would round to 0 in fp32)."""
    near = x > -0.6931  # −ln 2: below it 1 − eˣ ≥ ½ and log1p is exact; each branch sees safe inputs only,
    # so neither puts an Inf (and a NaN gradient) into the branch torch.where does not take
    return torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near, -1.0, x))),
    )


def orpo(pi: Logps, ref: None, s: DPOSettings):
    pc, pr = pi.chosen / pi.chosen_tokens, pi.rejected / pi.rejected_tokens
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    return -pc - s.beta * F.logsigmoid(log_odds), s.beta * pc, s.beta * pr


LOSSES: dict[str, Loss] = {
    "sigmoid": sigmoid,
    "robust": robust,
    "hinge": hinge,
    "ipo": ipo,
    "simpo": simpo,
    "orpo": orpo,
}
REFERENCE_FREE = frozenset({"simpo", "orpo"})


# --------------------------------------------------------------------------------- the objective


def pair_sums(pi: Logps, ref: Logps | None, rewards: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Sums over a batch's pairs of the rewards and the policy's log-probs, the same log-prob numbers of the
    reference (`ref/logps/...`: before and after side by side), and the pair count under "pairs"."""
    rc, rr = (r.detach().double() for r in rewards)
    sums = {"rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(), "rewards/margin": (rc - rr).sum()}
    sums["rewards/accuracy"] = (rc > rr).sum()
    for prefix, logps in (("", pi), ("ref/", ref)):
        if logps is not None:
            sums[f"{prefix}logps/chosen"] = logps.chosen.detach().double().sum()
            sums[f"{prefix}logps/rejected"] = logps.rejected.detach().double().sum()
            sums[f"{prefix}logps/accuracy"] = (logps.chosen > logps.rejected).sum()
    return {**{k: float(v) for k, v in sums.items()}, "pairs": float(len(rc))}


class PreferenceLoss(Objective):
    """A DPO-family loss over batches of pairs (lrft.data.preference.PairCollator): each pair weighs 1;
    the reference's log-probs come with the batch (precomputed, `ref_logps`) or are computed here with
    the adapters switched off. `batch_sums` holds the last batch's metric sums (pair_sums)."""

    def __init__(self, settings: DPOSettings):
        self.settings, self.loss_fn = settings, LOSSES[settings.loss]
        self.needs_reference = settings.loss not in REFERENCE_FREE
        self.last_sums: dict[str, float] = {}

    def example_weight(self, feature: dict) -> int:
        return 1

    def loss(self, model: nn.Module, core: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pair_losses(model, core, batch)[0].mean()

    def pair_losses(self, model: nn.Module, core: nn.Module, batch: dict[str, torch.Tensor]):
        """(each pair's loss, the policy's Logps); records the batch's metric sums."""
        pi = Logps.of_batch(*sequence_logps(model, core, batch))
        ref = self.reference(model, core, batch, pi) if self.needs_reference else None
        losses, chosen_reward, rejected_reward = self.loss_fn(pi, ref, self.settings)
        self.last_sums = pair_sums(pi, ref, (chosen_reward, rejected_reward))
        return losses, pi

    def reference(self, model: nn.Module, core: nn.Module, batch: dict[str, torch.Tensor], pi: Logps) -> Logps:
        """The reference's Logps of the batch (its token counts are the policy's: the same rows)."""
        if "ref_logps" in batch:
            sums = batch["ref_logps"].to(pi.chosen.device, torch.float32)
        else:
            was_training = model.training
            model.eval()  # as a precomputed reference: no dropout
            with torch.no_grad(), adapters_off(core):
                sums, _ = sequence_logps(model, core, batch)
            model.train(was_training)
        n = len(sums) // 2
        return Logps(sums[:n], sums[n:], pi.chosen_tokens, pi.rejected_tokens)

    def batch_sums(self) -> dict[str, float]:
        return self.last_sums
