"""What the tests share: tiny models built from configs (no downloads), tiny data, the one tiny-recipe
builder, and the method-matrix helpers (build a method on a tiny model, batches, labels).

Fixtures that wrap these live in conftest.py; test modules import from here, never from each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from lrft import methods

METHODS = sorted(methods.REGISTRY)  # every per-method test is parametrised from the registry
ROOT = Path(__file__).parents[1]

# ------------------------------------------------------------------------------------ tiny models

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["good", "bad", "great", "awful", "film", "movie", "plot", "the", "was", "a", "very", "not", "and", "it"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_vocab() -> list[str]:
    letters = list(string.ascii_lowercase + string.digits + ".,!?'\"-")
    return SPECIALS + WORDS + letters + ["##" + c for c in letters]


def tiny_lm_vocab() -> list[str]:
    """The tiny vocabulary plus what chat prompts and worked answers need."""
    return tiny_vocab() + ["#", "+", "=", ":", "$", "plus", "is", "what", "user", "assistant", "system"]


def tiny_bert_config(**kw):
    from transformers import BertConfig

    values = dict(
        vocab_size=len(tiny_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        type_vocab_size=2,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(kw)
    return BertConfig(**values)


def tiny_bert(seed: int = 0, **kw):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**kw)).eval()


def tiny_llama_config(**kw):
    """A tiny Llama with grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=len(tiny_lm_vocab()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    values.update(kw)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


# One tiny model per family people fine-tune (tests/test_families.py): 2 layers, 4 heads, hidden 32
# (Gemma 3: 40), built from a config. Qwen 3 and Gemma 3 have head_dim ≠ hidden / heads, as the real
# ones; the decoders use grouped-query attention where the family has it. Values: transformers
# config class, model class, config values beyond SHARED, and the attention projections q, k, v, o.
SHARED = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64
)
DECODER = dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)
T5_SHAPE = dict(
    d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0
)
LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj"]
FAMILIES = {
    "bert": ("BertConfig", "BertForSequenceClassification", {}, ["query", "key", "value", "attention.output.dense"]),
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(pad_token_id=1),
        ["query", "key", "value", "attention.output.dense"],
    ),
    "deberta-v2": (
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        dict(
            relative_attention=True,
            position_biased_input=False,
            pos_att_type=["p2c", "c2p"],
            share_att_key=True,
            position_buckets=16,
            norm_rel_ebd="layer_norm",
        ),
        ["query_proj", "key_proj", "value_proj", "attention.output.dense"],
    ),
    "deberta": (  # DeBERTa v1 (microsoft/deberta-base): q, k, v fused in in_proj, per head
        "DebertaConfig",
        "DebertaForSequenceClassification",
        dict(relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=16),
        ["in_proj", "attention.output.dense"],
    ),
    "esm": (  # a protein language model (ESM-2), as LoRTA's protein experiment adapts
        "EsmConfig",
        "EsmForSequenceClassification",
        dict(pad_token_id=0, mask_token_id=4, position_embedding_type="rotary"),
        ["query", "key", "value", "attention.output.dense"],
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64),
        ["q_lin", "k_lin", "v_lin", "out_lin"],
    ),
    "modernbert": (
        "ModernBertConfig",
        "ModernBertForSequenceClassification",
        dict(
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
            global_attn_every_n_layers=2,
            local_attention=8,
        ),
        ["Wqkv", "attn.Wo"],
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=3),
        ["c_attn", "attn.c_proj"],
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER, LLAMA_STYLE),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(DECODER, sliding_window=8), LLAMA_STYLE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER, LLAMA_STYLE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, head_dim=16), LLAMA_STYLE),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(DECODER, head_dim=8, sliding_window=8), LLAMA_STYLE),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(DECODER, hidden_size=40, num_key_value_heads=1, head_dim=16, sliding_window=8),
        LLAMA_STYLE,
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", DECODER, ["qkv_proj", "o_proj"]),
    "opt": (  # facebook/opt-125m's family
        "OPTConfig",
        "OPTForCausalLM",
        dict(ffn_dim=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        ["q_proj", "k_proj", "v_proj", "out_proj"],
    ),
    # encoder-decoder (seq2seq LMs): T5 (relu), T5 v1.1 / Flan-T5 (gated-gelu: wi_0, wi_1), BART
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(T5_SHAPE), ["q", "k", "v", "o"]),
    "t5-gated": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(T5_SHAPE, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        ["q", "k", "v", "o"],
    ),
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            decoder_start_token_id=3,
            forced_eos_token_id=None,
        ),
        ["q_proj", "k_proj", "v_proj", "out_proj"],
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(pad_token_id=0, bos_token_id=2, eos_token_id=3),
        ["query_key_value", "attention.dense"],
    ),
}


def tiny_family_config(family: str):
    import transformers

    config_cls, model_cls, values, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**SHARED, "vocab_size": len(tiny_lm_vocab()), **values})
    config.architectures = [model_cls]  # as a saved model's config.json says, for count-params
    return config


def tiny_family(family: str, seed: int = 0):
    """The family's tiny model (sequence classification with 2 labels, or a causal LM), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    return getattr(transformers, FAMILIES[family][1])(tiny_family_config(family)).eval()


def save_tiny_bert(d: Path, seed: int = 0) -> Path:
    """A saved tiny BERT with a real WordPiece tokenizer, loadable by model.name."""
    from transformers import BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
    BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
    tiny_bert(seed=seed).save_pretrained(d)
    return d


def save_lm_tokenizer(d: Path, chat: bool = True):
    """A real WordPiece tokenizer for the tiny LMs ([SEP] ends a turn), saved in d; a chat template if `chat`."""
    from transformers import BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(tiny_lm_vocab()) + "\n")
    tok = BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True, eos_token="[SEP]")
    if chat:
        tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(d)
    return tok


def save_tiny_llama(d: Path, chat: bool = True) -> Path:
    """A saved tiny Llama with the tiny LM tokenizer, loadable by model.name."""
    tok = save_lm_tokenizer(d, chat)
    tiny_llama(
        seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id
    ).save_pretrained(d)
    return d


def save_tiny_family(d: Path, family: str) -> Path:
    """A saved tiny model of `family` with the tiny LM tokenizer (its [PAD], [CLS], [SEP] are the
    decoders' pad 0, bos 2 and eos 3), loadable by model.name."""
    save_lm_tokenizer(d)
    tiny_family(family).save_pretrained(d)
    return d


# -------------------------------------------------------------------------------------- tiny data


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


def make_problems(n: int, seed: int) -> list[dict]:
    """GSM8K-shaped problems: 'what is 2 plus 3?' → '2 plus 3 is 5. #### 5'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        out.append({"question": f"what is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}.\n#### {a + b}"})
    return out


def make_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs in the standard layout: the right sum chosen over a wrong one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        wrong = (a + b + rng.randint(1, 3)) % 10
        out.append(
            {
                "prompt": f"what is {a} plus {b}?",
                "chosen": f"{a} plus {b} is {a + b}",
                "rejected": f"{a} plus {b} is {wrong}",
            }
        )
    return out


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def write_glue_mrpc(d: Path) -> Path:
    """A tiny GLUE MRPC dir in GLUE's own layout (train.tsv, dev.tsv) of make_sentences pairs."""
    d.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 64, 1), ("dev", 32, 2)):
        rows = [
            f"{r['label']}\t{i}\t{i + 1}\t{r['text']}\t{r['text'][::-1]}\n"
            for i, r in enumerate(make_sentences(n, seed))
        ]
        (d / f"{split}.tsv").write_text(MRPC_HEADER + "".join(rows))
    return d


def make_choice_problems(n: int, seed: int, choices: tuple[str, ...] = ("true", "false")) -> list[dict]:
    """LLM-Adapters-shaped commonsense records: a sum, right or wrong, and its answer among `choices`
    (true/false: whether it holds; answer1…: which of the listed sums is right)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        if choices == ("true", "false"):
            shown = a + b + rng.choice((0, 1))
            question, answer = f"is {a} plus {b} {shown}?", "true" if shown == a + b else "false"
        else:
            right = rng.randrange(len(choices))
            sums = [a + b if i == right else a + b + i + 1 for i in range(len(choices))]
            listed = " ".join(f"{c.capitalize()}: {v}" for c, v in zip(choices, sums))
            question, answer = f"what is {a} plus {b}? {listed}", choices[right]
        instruction = f"{question}\n\nAnswer format: {'/'.join(choices)}"
        out.append({"instruction": instruction, "input": "", "output": f"the answer is {answer}", "answer": answer})
    return out


def make_math_problems(n: int, seed: int) -> list[dict]:
    """LLM-Adapters-shaped math records: a worked sum ending "The answer is N.", the gold as "N.0"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        worked = f"{a} plus {b} is {a + b}. The answer is {a + b}."
        out.append({"instruction": f"what is {a} plus {b}?", "input": "", "output": worked, "answer": f"{a + b}.0"})
    return out


def write_suite(d: Path, sets: dict[str, tuple[list[dict], list[dict] | None]], top: dict | None = None) -> Path:
    """A suite dir: <set>/test.json (and train.json where given) per set, and top-level training files."""
    for name, (test, train) in sets.items():
        (d / name).mkdir(parents=True, exist_ok=True)
        (d / name / "test.json").write_text(json.dumps(test))
        if train is not None:
            (d / name / "train.json").write_text(json.dumps(train))
    for file, records in (top or {}).items():
        (d / file).write_text(json.dumps(records))
    return d


def write_splits(d: Path, make, splits) -> Path:
    """`split.jsonl` files of make(n, seed) records, for each (split, n, seed)."""
    d.mkdir(parents=True, exist_ok=True)
    for split, n, seed in splits:
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make(n, seed)))
    return d


# ---------------------------------------------------------------------------------------- recipes

CLASSIFICATION = {
    "data": {"task": "text-classification", "max_length": 16},
    "train": {"epochs": 1, "lr": 1e-2, "batch_size": 16, "log_every": 1, "precision": "fp32"},
}
CAUSAL = {
    "data": {"task": "gsm8k", "max_length": 48, "max_new_tokens": 8},
    "adapter": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8, "log_every": 1, "eval_batch_size": 4, "precision": "fp32"},
    "calibration": {"samples": 8, "batch_size": 4},
}

PREFERENCE = {
    "data": {"task": "preference", "max_length": 32},
    "adapter": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8, "log_every": 1, "eval_batch_size": 4, "precision": "fp32"},
    "calibration": {"samples": 8, "batch_size": 4},
}


def recipe_dict(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    method: str = "lora",
    name: str = "tiny",
    causal: bool | str = False,
    **sections,
) -> dict:
    """The tiny recipe: a classification task on the tiny BERT (or gsm8k on the tiny Llama with
    `causal`, preference pairs with causal="preference"), rank 4, seed 0, fp32 (numbers that do not
    depend on the CPU's bf16); `sections` update its sections key by key (or replace a scalar)."""
    shape = PREFERENCE if causal == "preference" else CAUSAL if causal else CLASSIFICATION
    recipe = {
        "name": name,
        "seed": 0,
        "model": {"name": str(model_dir)},
        "data": {**shape["data"], "path": str(data_dir)},
        "adapter": {"method": method, **shape.get("adapter", {}), "params": {"rank": 4}},
        "train": dict(shape["train"]),
        "output": {"dir": str(out_dir)},
    }
    if "calibration" in shape:
        recipe["calibration"] = dict(shape["calibration"])
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def docs_generator():
    """docs/generate.py as a module (it is a script, not part of the package): the generated pages' code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown_block(page: str, heading: str, language: str = "bash") -> str:
    """The first code block of `language` under a heading of one of the repo's Markdown files
    (`README.md`, `docs/serving.md`, ...), as written there."""
    text = (ROOT / page).read_text(encoding="utf-8")
    section = text[text.index(f"\n{heading}\n") :]
    block = section[section.index(f"```{language}\n") + len(f"```{language}\n") :]
    return block[: block.index("```")]


def readme_commands(heading: str) -> list[str]:
    """The command lines of the first bash block under a README heading."""
    return [line for line in markdown_block("README.md", heading).splitlines() if line.strip()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: what a command must leave as it was."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


# --------------------------------------------------------------------- the method matrix on modules

ARCHS = {  # model factory, targets
    "bert": (tiny_bert, ["query", "value"]),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def calibration_features(n: int = 6, length: int = 7, seed: int = 11) -> list[dict]:
    """Tokenized examples with labels and some padding, as the calibration stage gets them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        real = length - (i % 3)
        ids = torch.randint(5, 60, (real,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * real, "labels": i % 2})
    return out


def pad_collate(features: list[dict], causal: bool = False) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    mask = torch.tensor([f["attention_mask"] + [0] * (width - len(f["attention_mask"])) for f in features])
    labels = ids.masked_fill(mask == 0, -100) if causal else torch.tensor([f["labels"] for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def is_causal(model) -> bool:
    """Whether the model generates text (a causal LM, or an encoder-decoder: is_seq2seq)."""
    return model.can_generate()


def is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def calibration_for(model, targets, needs):
    """Statistics for methods that calibrate (talora, task-aware tlora); None for the others."""
    if not needs:
        return None
    from lrft.calibrate import run
    from lrft.recipe import CalibrationConfig

    causal = is_causal(model)
    return run(
        model,
        targets,
        calibration_features(),
        [[0, 1, 2], [3, 4, 5]],
        lambda f: pad_collate(f, causal),
        needs,
        CalibrationConfig(),
    )


def build(method: str, seed: int = 0, model=None, targets=("query", "value"), **params):
    """A tiny model (BERT by default) with `method`'s adapters on `targets`, head trainable:
    (model, targets found, params, build context, built)."""
    from lrft.inject import inject, set_head_trainable
    from lrft.methods import BuildContext
    from lrft.targets import find_targets

    model = model if model is not None else tiny_bert()
    m = methods.get(method)
    found = find_targets(model, list(targets))
    p = m.params(**{"rank": 4, **params})
    ctx = BuildContext(
        seed=seed, model_config=model.config, calibration=calibration_for(model, found, m.calibration(p))
    )
    built = m.build(found, p, ctx)
    inject(model, found, built)
    set_head_trainable(model, True)
    return model, found, p, ctx, built


def build_arch(method: str, arch: str, seed: int = 0, **params):
    factory, targets = ARCHS[arch]
    return build(method, seed=seed, model=factory(), targets=targets, **params)


def batch(seed: int = 0, n: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0  # padding in one example
    return {"input_ids": ids, "attention_mask": mask}


def labeled(model, b: dict) -> dict:
    """The batch with the labels the model's loss takes: the next tokens (a causal LM), a target text
    for the decoder (an encoder-decoder: the inputs' first 5 tokens), or a class."""
    if is_seq2seq(model):
        target = b["input_ids"][:, :5]
        return {**b, "labels": target.masked_fill(b["attention_mask"][:, :5] == 0, -100)}
    if is_causal(model):
        return {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
    return {**b, "labels": torch.tensor([0, 1, 1])}


def randomize(model, seed: int = 1, std: float = 0.1) -> None:
    """Give every trainable adapter param a non-zero value, so ΔW ≠ 0."""
    from lrft.inject import adapter_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def outputs(model, b: dict) -> dict[str, torch.Tensor]:
    """Logits and the last hidden states: a classifier's random head makes its logits small, so the
    hidden states (layer-normed, of order 1) are what shows a difference of 1e-5."""
    with torch.no_grad():
        out = model.eval()(**b, output_hidden_states=True)
    if is_seq2seq(model):  # the decoder's last states, which every adapted projection feeds
        return {"logits": out.logits, "hidden": out.decoder_hidden_states[-1], "encoder": out.encoder_last_hidden_state}
    return {"logits": out.logits, "hidden": out.hidden_states[-1]}


def visible_update(model, base_hidden: torch.Tensor, b: dict) -> dict[str, torch.Tensor]:
    """Random adapter values, scaled up until the update moves the last hidden states (the base model's:
    base_hidden) by 1e-2 or more: large enough that a wrong merge or export cannot hide under a 1e-5
    tolerance, small enough to keep float error far below it. Returns the adapted model's outputs."""
    for std in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6):
        randomize(model, std=std)
        out = outputs(model, b)
        if float((out["hidden"] - base_hidden).abs().max()) >= 1e-2:
            return out
    raise AssertionError("no adapter values tried moved the hidden states by 1e-2")


# ------------------------------------------------------------------------------------ tolerances


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float, msg: str = "") -> None:
    """got ≈ want entry by entry within `tol` of want's largest |entry|: float error in a tensor is a share
    of the size of the numbers summed into it, so an entry near zero carries the error of the large ones
    and one absolute bound cannot fit tensors of every size. An all-zero `want` asks for exact zeros."""
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=0, msg=(lambda m: f"{msg}: {m}") if msg else None)


def assert_merge_parity(report: dict, rtol: float = 1e-5) -> None:
    """A merge report's fp32 parity, on the report's own numbers: within `lrft merge`'s tolerance and,
    independently of how that is derived, within `rtol` of the adapted model's max |logit| (the tiny
    models' float32 rounding is below 1e-6 of it)."""
    assert report["max_abs_logit_diff"] <= report["parity_tolerance"], report
    assert report["max_abs_logit_diff"] <= rtol * report["max_abs_logit"], report


# ------------------------------------------------------------------------------ real lrft processes

# `lrft` in a real process that hurts itself at a chosen point: after its Nth optimizer step
# (sigkill, sigterm, or sigint2: two Ctrl-C at once), or (checkpoint) after the Nth checkpoint's files
# are written but before the dir is renamed; under several processes only on the given rank.
PATCHED_LRFT = """
import os, signal, sys
import torch
from lrft import checkpoint
mode, n, on_rank = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = [0]
def act():
    calls[0] += 1
    if calls[0] != n or on_rank not in ("any", os.environ.get("RANK", "0")):
        return
    if mode == "sigint2":
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    else:
        os.kill(os.getpid(), {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "checkpoint": signal.SIGKILL}[mode])
if mode == "checkpoint":
    save_tree = checkpoint.save_tree
    def patched_save_tree(d, tree):
        save_tree(d, tree)
        act()
    checkpoint.save_tree = patched_save_tree
else:
    step = torch.optim.AdamW.step
    def patched_step(self, *a, **k):
        out = step(self, *a, **k)
        act()
        return out
    torch.optim.AdamW.step = patched_step
sys.argv = ["lrft"] + sys.argv[4:]
from lrft.cli import main
main()
"""


def lrft_command(*args, patch: tuple[str, int] | None = None) -> list[str]:
    """The command line of `python -m lrft ARGS` (with `patch` = (mode, n): see PATCHED_LRFT)."""
    cmd = (
        [sys.executable, "-c", PATCHED_LRFT, patch[0], str(patch[1]), "any"]
        if patch
        else [sys.executable, "-m", "lrft"]
    )
    return cmd + [str(a) for a in args]


def lrft(*args, patch: tuple[str, int] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m lrft ARGS` in a real process (with `patch` = (mode, n): see PATCHED_LRFT)."""
    return subprocess.run(
        lrft_command(*args, patch=patch),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def launch(
    *args,
    processes: int = 2,
    patch: tuple[str, int, int] | None = None,
    config: Path | None = None,
    script_dir: Path | None = None,
) -> subprocess.CompletedProcess:
    """`lrft ARGS` under accelerate's launcher with `processes` processes (gloo on the CPU); with
    `patch` = (mode, n, rank) the given rank hurts itself (PATCHED_LRFT); `config`: an accelerate config."""
    how = (
        ["--config_file", str(config)]
        if config
        else ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *how,
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--main_process_port",
        "0",
    ]
    if patch:
        script = Path(script_dir) / "patched_lrft.py"
        script.write_text(PATCHED_LRFT)
        cmd += [str(script), patch[0], str(patch[1]), str(patch[2])]
    else:
        cmd += ["-m", "lrft"]
    return subprocess.run(
        cmd + [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def assert_killed_run_resumes_exactly(write, runs: Path, sections: dict, kill_after_step: int = 5) -> None:
    """A run killed (SIGKILL) after an optimizer step and run again ends with the adapter of one never
    killed; `write(method, name=..., **sections)` writes the recipes (a fixture's writer)."""
    assert lrft("train", write("lora", name="straight", **sections)).returncode == 0
    recipe = write("lora", name="killed", **sections)
    assert lrft("train", recipe, patch=("sigkill", kill_after_step)).returncode == -9
    assert lrft("train", recipe).returncode == 0
    assert_same_adapter(runs / "killed", runs / "straight")


def assert_same_adapter(a: Path, b: Path, tol: float = 1e-6) -> None:
    """Two run dirs end with the same adapter tensors, within `tol` of each other: an absolute bound on
    purpose, as two trainings part by rounding amplified through Adam, whose steps are the learning rate's
    size whatever the size of the tensor (a tensor-relative bound fails FSDP against one process)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter" / "adapter.safetensors"), load_file(b / "adapter" / "adapter.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=tol, rtol=0, msg=k)


def train_lines(run: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in read_jsonl(run / "metrics.jsonl")]


# ------------------------------------------------------------------------------ damaged weight files

HEADER_BYTES = 8  # a safetensors file: a little-endian u64, the JSON header's length, then the header


def safetensors_header(data: bytes) -> tuple[dict, bytes]:
    """(the JSON header, the tensor data) of a safetensors file's bytes."""
    length = int.from_bytes(data[:HEADER_BYTES], "little")
    return json.loads(data[HEADER_BYTES : HEADER_BYTES + length]), data[HEADER_BYTES + length :]


def with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(HEADER_BYTES, "little") + raw + body


def reshaped_tensor(data: bytes, name: str, shape: list[int]) -> bytes:
    """A safetensors file with one tensor's shape changed in its header, the rest kept: a consistent file
    when `shape` has the same number of elements, one whose header contradicts itself otherwise."""
    header, body = safetensors_header(data)
    header[name] = {**header[name], "shape": shape}
    return with_header(header, body)


def save_sharded_bert(d: Path) -> Path:
    """The tiny BERT saved in several safetensors shards with model.safetensors.index.json."""
    save_tiny_bert(d)
    (d / "model.safetensors").unlink()
    tiny_bert(seed=0).save_pretrained(d, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 1
    return d


GGUF_TOKENS = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz ", "Ġ", "ab"]


def save_tiny_gguf(path: Path) -> Path:
    """A tiny Llama as a GGUF file (f32 tensors, a byte-level BPE tokenizer of 32 tokens), about 80 KB,
    that transformers loads and lrft dequantises like a real one (a real one is 100 MB)."""
    import gguf
    import numpy as np

    hidden, layers, heads, kv_heads, ff, vocab = 32, 2, 4, 2, 64, len(GGUF_TOKENS)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(GGUF_TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))  # 3: control tokens (unk, bos, eos), 1: normal
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    rng = np.random.default_rng(0)

    def weights(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w.add_tensor("token_embd.weight", weights(vocab, hidden))
    for i in range(layers):
        for name, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv_heads * 8, hidden)),
            ("attn_v", (kv_heads * 8, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ff, hidden)),
            ("ffn_up", (ff, hidden)),
            ("ffn_down", (hidden, ff)),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", weights(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
