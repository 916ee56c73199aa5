"""lrft's DPO-family losses equal TRL's (a test dependency only): given the same tiny Llama, the same
LoRA A and B and the same token rows, lrft.preference gives TRL's loss, metrics and adapter gradients.

TRL's side: DPOTrainer (sigmoid, ipo, hinge, robust; a PEFT adapter, its reference the base with the
adapter disabled), CPOTrainer with loss_type simpo and cpo_alpha 0 (simpo), ORPOTrainer (orpo: only its
rewards and odds-ratio term, since its NLL term covers the prompt and lrft's does not). One step on 3
hand-made pairs of different lengths, fp32 throughout, compared within 1e-5 of the size of each quantity.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from lrft import methods
from lrft.data.preference import SIDES, PairCollator
from lrft.inject import adapted, adapters_off, inject
from lrft.loss import IGNORE, sequence_logps
from lrft.methods import BuildContext
from lrft.preference import DPOSettings, Logps, PreferenceLoss
from lrft.targets import find_targets
from tests.helpers import assert_close_scaled, tiny_llama, tiny_lm_vocab

with warnings.catch_warnings():  # trl.experimental says its APIs may change; CPO and ORPO live there
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

PAD, BOS, EOS = 0, 2, 3  # tiny_llama_config's ids: [PAD], [CLS], [SEP] of tiny_lm_vocab
PAIRS = [  # prompt, chosen, rejected token ids: prompts and responses of different lengths
    ([BOS, 10, 11, 12], [20, 21, EOS], [30, EOS]),
    ([BOS, 13], [22, 23, 24, 25, EOS], [31, 32, 33, EOS]),
    ([BOS, 14, 15, 16, 17, 18], [26, EOS], [34, 35, 36, 37, 38, 39, EOS]),
]
TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA = 4, 8.0
TOL = 1e-5  # of each quantity's size (1 for those below 1): fp32 rounding here stays below 1e-6 of it
CASES = {  # lrft's settings; TRL's trainer follows from the loss
    "sigmoid": DPOSettings("sigmoid", beta=0.1),
    "ipo": DPOSettings("ipo", beta=0.1),
    "hinge": DPOSettings("hinge", beta=0.1),
    "robust": DPOSettings("robust", beta=0.1, label_smoothing=0.1),
    "simpo": DPOSettings("simpo", beta=2.0, simpo_gamma=0.5),
}
ORPO = DPOSettings("orpo", beta=0.1)
METRICS = {  # lrft's metric: TRL's
    "rewards/chosen": "rewards/chosen",
    "rewards/rejected": "rewards/rejected",
    "rewards/accuracy": "rewards/accuracies",
    "rewards/margin": "rewards/margins",
    "logps/chosen": "logps/chosen",
    "logps/rejected": "logps/rejected",
}
REWARDS = [k for k in METRICS if k.startswith("rewards/")]


# ----------------------------------------------------------------------------------------- helpers


def features() -> list[dict]:
    """The pairs as lrft tokenizes them: prompt + response, labels -100 on the prompt."""
    return [
        {
            f"{side}_{key}": p + ids if key == "input_ids" else [IGNORE] * len(p) + ids
            for side, ids in zip(SIDES, (c, r))
            for key in ("input_ids", "labels")
        }
        for p, c, r in PAIRS
    ]


def cpo_features() -> list[dict]:
    """The pairs as CPOTrainer and ORPOTrainer take them: lrft's rows, with attention masks and the prompt."""
    out = []
    for (prompt, _, _), f in zip(PAIRS, features()):
        masks = {f"{side}_attention_mask": [1] * len(f[f"{side}_input_ids"]) for side in SIDES}
        out.append({**f, **masks, "prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)})
    return out


def lrft_policy():
    """The tiny Llama with lrft LoRA on TARGETS, B random so that the policy differs from the reference."""
    model = tiny_llama(seed=0, attn_implementation="eager")
    targets = find_targets(model, TARGETS)
    method = methods.get("lora")
    params = method.params(rank=RANK, alpha=ALPHA)
    inject(model, targets, method.build(targets, params, BuildContext(seed=0, model_config=model.config)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for wrapper in adapted(model).values():
            wrapper.adapter.B.copy_(0.3 * torch.randn(wrapper.adapter.B.shape, generator=g))
    return model.train()


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over tiny_lm_vocab: the trainers ask for one, the pairs come as ids."""
    vocab = {token: i for i, token in enumerate(tiny_lm_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]"
    )


def trl_trainer(s: DPOSettings, ours, out_dir):
    """TRL's trainer for the loss, training a PEFT LoRA holding `ours`' A and B."""
    common = dict(
        output_dir=str(out_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=len(PAIRS),
        seed=0,
        save_strategy="no",
        beta=s.beta,
        label_smoothing=s.label_smoothing,
    )
    if s.loss == "simpo":
        trainer, args = CPOTrainer, CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=s.simpo_gamma)
    elif s.loss == "orpo":
        trainer, args = ORPOTrainer, ORPOConfig(**{k: v for k, v in common.items() if k != "label_smoothing"})
    else:
        trainer, args = DPOTrainer, DPOConfig(**common, loss_type=[s.loss])
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    unused = Dataset.from_dict({"prompt": ["the film"], "chosen": [" good"], "rejected": [" bad"]})
    tr = trainer(
        model=tiny_llama(seed=0, attn_implementation="eager"),
        args=args,
        train_dataset=unused,
        processing_class=tokenizer(),
        peft_config=lora,
    )
    with torch.no_grad():
        for name, wrapper in adapted(ours).items():
            layer = tr.model.base_model.model.get_submodule(name)
            assert layer.scaling["default"] == pytest.approx(wrapper.adapter.scale)
            layer.lora_A["default"].weight.copy_(wrapper.adapter.A)
            layer.lora_B["default"].weight.copy_(wrapper.adapter.B)
    tr.model.train()
    return tr


def trl_step(tr) -> tuple[torch.Tensor, dict[str, float], list]:
    """(TRL's loss after its backward pass, its metrics, the token rows: (ids, labels) each) of the pairs."""
    if isinstance(tr, DPOTrainer):
        batch = tr.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS])
        tr._metrics["train"].clear()
        loss = tr.compute_loss(tr.model, batch)
        metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
        rows = unpadded(batch["input_ids"], batch["attention_mask"], labels)
    else:
        batch = tr.data_collator(cpo_features())
        loss, metrics = tr.get_batch_loss_metrics(tr.model, batch)
        rows = [
            row
            for side in SIDES
            for row in unpadded(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"])
        ]
    loss.backward()
    return loss.detach(), metrics, rows


def lrft_step(model, s: DPOSettings, batch: dict):
    """(each pair's loss, the policy's Logps, the metrics: batch sums over pairs) after backward of the mean."""
    objective = PreferenceLoss(s)
    losses, pi = objective.pair_losses(model, model, batch)
    losses.mean().backward()
    sums = objective.batch_sums()
    return losses.detach(), pi, {k: v / sums["pairs"] for k, v in sums.items() if k != "pairs"}


def reference_logps(model, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """Each pair's summed chosen and rejected response log-probs with the adapters off, in eval mode:
    what a precomputed reference holds."""
    with torch.no_grad(), adapters_off(model):
        ref = Logps.of_batch(*sequence_logps(model.eval(), model, PairCollator(PAD)(pairs)))
    model.train()
    return ref.chosen.tolist(), ref.rejected.tolist()


def unpadded(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> list:
    """A batch's rows without their padding: (ids, labels) each."""
    return [(i[m.bool()].tolist(), lab[m.bool()].tolist()) for i, m, lab in zip(ids, mask, labels)]


def assert_scalar_close(ours, theirs, what: str) -> None:
    """Within TOL of the number's size (of 1 for numbers below 1: differences of large log-probs)."""
    theirs = torch.as_tensor(theirs, dtype=torch.float64)
    ours = torch.as_tensor(ours, dtype=torch.float64)
    atol = TOL * max(1.0, float(theirs.abs()))
    torch.testing.assert_close(ours, theirs, rtol=TOL, atol=atol, msg=lambda m: f"{what}: {m}")


def gradients(ours, tr):
    """(name, lrft's gradient, TRL's) of every adapted module's A and B."""
    for name, wrapper in adapted(ours).items():
        layer = tr.model.base_model.model.get_submodule(name)
        yield f"{name} A", wrapper.adapter.A.grad, layer.lora_A["default"].weight.grad
        yield f"{name} B", wrapper.adapter.B.grad, layer.lora_B["default"].weight.grad


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("loss", list(CASES))
def test_loss_metrics_and_gradients_equal_trls(loss, tmp_path):
    s = CASES[loss]
    ours = lrft_policy()
    tr = trl_trainer(s, ours, tmp_path)
    batch = PairCollator(PAD)(features())
    losses, pi, metrics = lrft_step(ours, s, batch)
    trl_loss, trl_metrics, trl_rows = trl_step(tr)

    assert trl_rows == unpadded(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert_scalar_close(losses.mean(), trl_loss, "loss")
    if loss == "simpo":  # CPOTrainer logs the per-token mean log-probs, lrft the sums (as DPOTrainer)
        metrics["logps/chosen"] = float((pi.chosen / pi.chosen_tokens).detach().mean())
        metrics["logps/rejected"] = float((pi.rejected / pi.rejected_tokens).detach().mean())
    for ours_name, trl_name in METRICS.items():
        assert_scalar_close(metrics[ours_name], trl_metrics[trl_name], ours_name)
    for name, got, want in gradients(ours, tr):
        assert got is not None and want is not None, name
        assert_close_scaled(got, want, TOL, name)
        assert want.abs().max() > 0, name


def test_orpo_rewards_and_odds_ratio_equal_trls(tmp_path):
    """ORPO's SFT term differs on purpose (lrft's: the chosen response's mean NLL per pair); the rest is TRL's:
    lrft's loss less that term is −β·log σ(log odds) per pair, TRL's log_odds_ratio the mean of log σ(log odds)."""
    ours = lrft_policy()
    tr = trl_trainer(ORPO, ours, tmp_path)
    batch = PairCollator(PAD)(features())
    losses, pi, metrics = lrft_step(ours, ORPO, batch)
    _, trl_metrics, trl_rows = trl_step(tr)

    assert trl_rows == unpadded(batch["input_ids"], batch["attention_mask"], batch["labels"])
    for name in REWARDS:
        assert_scalar_close(metrics[name], trl_metrics[METRICS[name]], name)
    sft = -(pi.chosen / pi.chosen_tokens).detach()
    assert_scalar_close((losses - sft).mean(), -ORPO.beta * trl_metrics["log_odds_ratio"], "odds-ratio term")


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust"])
def test_precomputed_reference_equals_reference_on_the_fly(loss):
    """A batch carrying `ref_logps` (computed once with the adapters off) trains as one whose reference
    PreferenceLoss computes itself: the same loss, metrics and gradients."""
    s = CASES[loss]
    fly, pre = lrft_policy(), lrft_policy()
    pairs = features()
    for f, chosen, rejected in zip(pairs, *reference_logps(pre, pairs)):
        f["ref_chosen"], f["ref_rejected"] = chosen, rejected
    fly_batch, pre_batch = PairCollator(PAD)(features()), PairCollator(PAD)(pairs)
    assert "ref_logps" not in fly_batch and "ref_logps" in pre_batch
    losses, _, metrics = lrft_step(fly, s, fly_batch)
    pre_losses, _, pre_metrics = lrft_step(pre, s, pre_batch)

    assert_close_scaled(pre_losses, losses, TOL, "pair losses")
    assert pre_metrics.keys() == metrics.keys()
    for name, value in metrics.items():
        assert_scalar_close(pre_metrics[name], value, name)
    for (name, a), b in zip(adapted(fly).items(), adapted(pre).values()):
        assert_close_scaled(b.adapter.A.grad, a.adapter.A.grad, TOL, f"{name} A")
        assert_close_scaled(b.adapter.B.grad, a.adapter.B.grad, TOL, f"{name} B")
