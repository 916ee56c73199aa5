"""The chunked causal-LM loss (lrft.loss) against transformers' own: values and gradients, in chunks
smaller than the batch, with soft-capped logits (Gemma 2), a Conv1D model (GPT-2), and in evaluation."""

from __future__ import annotations

import pytest
import torch

import lrft.loss
from lrft.loss import batch_loss, chunkable
from tests.helpers import batch, build, randomize, tiny_bert, tiny_llama


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=80,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=30.0,
        )
    ).eval()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=80,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()


MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gemma2": (gemma2, ["q_proj", "v_proj"]),
    "gpt2": (gpt2, ["c_attn"]),
}


def prompt_and_response(n: int = 3, length: int = 11) -> dict:
    b = batch(n=n, length=length)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    labels[:, :4] = -100  # the prompt
    return {**b, "labels": labels}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunked_loss_equals_transformers_loss_with_its_gradients(name, monkeypatch):
    monkeypatch.setattr(lrft.loss, "CHUNK_TOKENS", 5)  # several chunks in one batch
    factory, targets = MODELS[name]
    model, *_ = build("lora", model=factory(), targets=targets)
    randomize(model)
    b = prompt_and_response()
    assert chunkable(model, b)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    theirs, their_grads = loss_and_grads(lambda: model(**b).loss)
    ours, our_grads = loss_and_grads(lambda: batch_loss(model, model, b))
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)
    assert our_grads.keys() == their_grads.keys() and our_grads
    for k in our_grads:
        scale = float(their_grads[k].abs().max())
        torch.testing.assert_close(our_grads[k], their_grads[k], atol=1e-6 * max(scale, 1e-3), rtol=1e-5, msg=k)
    assert (
        model.get_output_embeddings() is not None and type(model.get_output_embeddings()).__name__ != "ChunkedLossHead"
    )  # the output layer is back


def test_evaluation_loss_is_chunked_and_unchanged():
    from lrft.data import get_task
    from lrft.evaluation import EvalSet, evaluate

    model = tiny_llama()
    feats = [{k: v[i].tolist() for k, v in prompt_and_response(n=4).items()} for i in range(4)]
    for f in feats:  # unpadded features, as evaluation gets them
        keep = sum(f["attention_mask"])
        f.update({k: f[k][:keep] for k in f})

    def collate(fs: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in fs)
        pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
        return {k: torch.tensor([f[k] + [v] * (width - len(f[k])) for f in fs]) for k, v in pad.items()}

    metrics, _ = evaluate(model, {"": EvalSet(feats)}, get_task("instruction"), collate, batch_size=3)
    whole = collate(feats)
    with torch.no_grad():
        expected = model(**whole).loss  # one batch of all four: the token-weighted mean
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-6)


def test_classifiers_keep_their_own_loss():
    model = tiny_bert()
    b = {**batch(), "labels": torch.tensor([0, 1, 1])}
    assert not chunkable(model, b)
    with torch.no_grad():
        assert float(batch_loss(model, model, b)) == float(model(**b).loss)
