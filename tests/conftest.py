"""Shared fixtures: tiny models built from configs (no downloads), tiny data, the real data dir."""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

import pytest
import torch
import yaml

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["good", "bad", "great", "awful", "film", "movie", "plot", "the", "was", "a", "very", "not", "and", "it"]


def tiny_bert_config(**kw):
    from transformers import BertConfig

    vocab = len(tiny_vocab())
    values = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128, type_vocab_size=2, num_labels=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    values.update(kw)
    return BertConfig(**values)


def tiny_vocab() -> list[str]:
    letters = list(string.ascii_lowercase + string.digits + ".,!?'\"-")
    return SPECIALS + WORDS + letters + ["##" + c for c in letters]


def tiny_bert(seed: int = 0, **kw):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**kw)).eval()


def tiny_lm_vocab() -> list[str]:
    """The tiny vocabulary plus what chat prompts and worked answers need."""
    return tiny_vocab() + ["#", "+", "=", ":", "$", "plus", "is", "what", "user", "assistant", "system"]


TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")


def tiny_llama_config(**kw):
    """A tiny Llama with grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig

    values = dict(vocab_size=len(tiny_lm_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    values.update(kw)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


def save_tiny_llama(d: Path, chat: bool = True) -> Path:
    """A saved tiny Llama with a real WordPiece tokenizer ([SEP] ends a turn); a chat template if `chat`."""
    from transformers import BertTokenizerFast

    (d / "vocab.txt").write_text("\n".join(tiny_lm_vocab()) + "\n")
    tok = BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True, eos_token="[SEP]")
    if chat:
        tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(d)
    tiny_llama(seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
               bos_token_id=tok.cls_token_id).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def make_problems(n: int, seed: int) -> list[dict]:
    """GSM8K-shaped problems: 'what is 2 plus 3?' → '2 plus 3 is 5. #### 5'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        out.append({"question": f"what is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}.\n#### {a + b}"})
    return out


def write_splits(d: Path, make, splits) -> Path:
    """`split.jsonl` files of make(n, seed) records, for each (split, n, seed)."""
    for split, n, seed in splits:
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make(n, seed)))
    return d


@pytest.fixture(scope="session")
def tiny_gsm8k_dir(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("tiny-gsm8k"), make_problems, (("train", 48, 3), ("test", 12, 4)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT with a real WordPiece tokenizer, loadable by model.name."""
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    (d / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
    tok = BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(d)
    tiny_bert(seed=0).save_pretrained(d)
    return d


def make_sentences(n: int, seed: int) -> list[dict]:
    """Sentences whose label is 1 iff they contain a positive word: learnable in a few steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(["good", "great"] if label else ["bad", "awful"])
        filler = rng.sample(["the", "film", "movie", "plot", "was", "very", "and", "it"], 4)
        out.append({"text": " ".join(filler[:2] + [word] + filler[2:]), "label": label})
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("tiny-data"), make_sentences, (("train", 64, 1), ("dev", 32, 2)))


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir, tiny_data_dir):
    """Write a recipe for the tiny model and data; returns a function taking section overrides."""

    def write(method: str = "lora", name: str = "tiny", **sections) -> Path:
        recipe = {
            "name": name,
            "seed": 0,
            "model": {"name": str(tiny_model_dir)},
            "data": {"task": "text-classification", "path": str(tiny_data_dir), "max_length": 16},
            "adapter": {"method": method, "params": {"rank": 4}},
            "train": {"epochs": 1, "lr": 1e-2, "batch_size": 16, "log_every": 1},
            "output": {"dir": str(tmp_path / "runs")},
        }
        for key, value in sections.items():
            recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data (GLUE, GSM8K) named by $LRFT_DATA_DIR; integration tests skip without it."""
    env = os.environ.get("LRFT_DATA_DIR")
    if not env or not (Path(env) / "glue").is_dir():
        pytest.skip("LRFT_DATA_DIR is not set to a dir holding glue/ (set LRFT_DATA_DIR=../shared/data)")
    return Path(env)


@pytest.fixture
def cli():
    """Run the lrft CLI in-process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from lrft.cli import app

    def run(*args: str):
        result = CliRunner().invoke(app, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return run
