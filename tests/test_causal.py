"""Causal LMs: gsm8k and instruction data, response-only labels, generation eval, merge, GGUF input."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from lrft.data import PromptSplit, get_task, load_task_data
from lrft.data.answers import NUMBERS
from lrft.data.causal import IGNORE, encode_prompts, gold_answer, render
from lrft.errors import LrftError
from lrft.recipe import DataConfig
from tests.helpers import METHODS, assert_merge_parity, save_tiny_llama, tiny_family, tiny_llama


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


# --------------------------------------------------------------------------------------------- data


def test_gsm8k_from_a_local_dir(tiny_gsm8k_dir):
    data = load_task_data(get_task("gsm8k"), DataConfig(task="gsm8k", path=str(tiny_gsm8k_dir)))
    assert len(data.train) == 48 and len(data.evals[""]) == 12
    assert data.train.prompts[0] == [{"role": "user", "content": data.train.prompts[0][0]["content"]}]
    assert data.train.answers[0] == data.train.responses[0].split("####")[-1].strip()


@pytest.mark.integration
def test_real_gsm8k_files(data_dir, monkeypatch):
    monkeypatch.setenv("LRFT_DATA_DIR", str(data_dir))
    data = load_task_data(get_task("gsm8k"), DataConfig(task="gsm8k"))
    assert len(data.train) == 7473 and len(data.evals[""]) == 1319
    assert data.train.answers[0] == "72" and all(a is not None for a in data.evals[""].answers)


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"question": "q"}', r"train.jsonl:2: no text field 'answer'"),
        ("not json", r"train.jsonl:2: not valid JSON"),
    ],
)
def test_gsm8k_bad_lines_name_file_and_line(tmp_path, line, match):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n' + line + "\n")
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(LrftError, match=match):
        load_task_data(get_task("gsm8k"), DataConfig(task="gsm8k", path=str(tmp_path)))


def test_instruction_alpaca_and_chat_layouts(tmp_path):
    rows = [
        {"instruction": "say hi", "input": "", "output": "hi"},
        {"instruction": "add", "input": "1 and 2", "output": "3"},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hey"},
            ]
        },
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.json").write_text(json.dumps(rows[:1]))
    data = load_task_data(get_task("instruction"), DataConfig(task="instruction", path=str(tmp_path)))
    assert data.train.prompts[1] == [{"role": "user", "content": "add\n\n1 and 2"}]
    assert data.train.prompts[2][0]["role"] == "system" and data.train.responses[2] == "hey"
    assert len(data.evals[""]) == 1


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "x", "completion": "y"}, r"train.jsonl:1: expected the alpaca layout .* or the chat layout"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"train.jsonl:1: 'messages' must be a list .* ending with"),
    ],
)
def test_instruction_bad_records(tmp_path, row, match):
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(LrftError, match=match):
        load_task_data(get_task("instruction"), DataConfig(task="instruction", path=str(tmp_path)))


def test_labels_cover_the_response_only(tokenizer):
    split = PromptSplit([[{"role": "user", "content": "what is 1 plus 2?"}]], ["1 plus 2 is 3. #### 3"], ["3"])
    (f,) = encode_prompts(split, tokenizer, max_length=128)
    prompt_len = len(tokenizer(render(tokenizer, split.prompts[0], None), add_special_tokens=False)["input_ids"])
    assert f["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert f["labels"][prompt_len:] == f["input_ids"][prompt_len:]
    response = tokenizer.decode(f["input_ids"][prompt_len:])
    assert "1 plus 2 is 3" in response and response.strip().endswith("[SEP]")  # the turn's end is learned


def test_plain_prompt_format_without_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path, chat=False))
    text = render(tok, [{"role": "user", "content": "what is 1 plus 2?"}], "3")
    assert text.startswith("### Instruction:\nwhat is 1 plus 2?\n\n### Response:\n3") and text.endswith("[SEP]")
    (f,) = encode_prompts(PromptSplit([[{"role": "user", "content": "a"}]], ["b"], [None]), tok, 64)
    assert f["labels"].count(IGNORE) < len(f["labels"])


def test_truncation_is_counted_and_empty_examples_left_out(tokenizer, capsys):
    long = PromptSplit(
        [[{"role": "user", "content": "the film " * 30}], [{"role": "user", "content": "a"}]],
        ["good", "bad " * 40],
        [None, None],
    )
    feats = encode_prompts(long, tokenizer, max_length=24, what="training examples")
    assert len(feats) == 1 and len(feats[0]["input_ids"]) == 24
    err = capsys.readouterr().err
    assert "2 of 2 training examples were cut to data.max_length=24 tokens; 1 kept no response token" in err
    with pytest.raises(LrftError, match=r"data.max_length: 8 tokens leave no response token to learn"):
        encode_prompts(long.head(1), tokenizer, max_length=8)


@pytest.mark.parametrize(
    "text, gold",
    [
        ("so 48 + 24 = 72\n#### 72", "72"),
        ("It costs $1,200.", "1200"),
        ("#### 3.50", "3.5"),
        ("first 3 then 7", "7"),
        ("#### -4", "-4"),
        ("#### 5\nthen 9 more", "5"),  # the number after the last marker, not the last number
    ],
)
def test_gsm8k_completions_are_read_by_the_shared_scorer(text, gold):
    assert NUMBERS.correct(NUMBERS.extract(text), gold)
    assert NUMBERS.extract("no number here") is None and not NUMBERS.correct(None, gold)


def test_gold_answer():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gold_answer("#### 1,000") == "1000" and gold_answer("no marker 5") is None


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_causal_lm(cli, causal_recipe, tmp_path, method):
    recipe = causal_recipe(method, name=f"lm_{method}")
    code, out, err = cli("train", recipe, "train.max_steps=2", "--json")
    assert code == 0, err
    final = json.loads(out)["final"]
    assert {"exact_match", "perplexity", "loss"} <= set(final)
    predictions = [json.loads(line) for line in (tmp_path / "runs" / f"lm_{method}" / "predictions.jsonl").open()]
    assert len(predictions) == 12 and final["exact_match"] == sum(p["correct"] for p in predictions) / 12
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))


def test_gsm8k_train_eval_merge_end_to_end(cli, causal_recipe, tmp_path, tiny_gsm8k_dir):
    from transformers import AutoModelForCausalLM

    recipe = causal_recipe("lora", train={"eval_on_start": True})
    code, out, err = cli("train", recipe, "train.epochs=2", "--json")
    assert code == 0, err
    summary = json.loads(out)
    run = tmp_path / "runs" / "lm"
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert "exact_match" in evals[0] and "exact_match" not in evals[1] and "exact_match" in evals[2]
    preds = [json.loads(l) for l in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and {"prompt", "completion", "answer", "gold", "correct"} <= set(preds[0])
    assert (run / "predictions_step0.jsonl").is_file()
    assert summary["final"]["exact_match"] == sum(p["correct"] for p in preds) / 12

    code, out, err = cli("eval", run, "--max-samples", "6", "--json")
    assert code == 0, err
    assert json.loads(out)["examples"] == 6 and "exact_match" in json.loads(out)

    merged = tmp_path / "merged"
    code, out, err = cli("merge", run, "--out", merged, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert_merge_parity(report)
    assert report["generation_identical"] and report["tied_embeddings"]
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    code, out, err = cli("eval", merged, "--task", "gsm8k", "--data-path", tiny_gsm8k_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["exact_match"] == pytest.approx(summary["final"]["exact_match"])

    code, out, err = cli("merge", run, "--out", tmp_path / "bf16", "--dtype", "bfloat16", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["dtype"] == "bfloat16" and 0 < report["max_abs_logit_diff_vs_fp32_merge"] < 0.5
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_eval_cuts_examples_as_the_run_or_the_task_does(cli, causal_recipe, tmp_path, tiny_llama_dir, tiny_gsm8k_dir):
    """A run is evaluated at its own data.max_length, a plain model at the task's (gsm8k: 320, the
    shipped recipes'), and --max-length sets it: before/after numbers are taken alike."""
    assert cli("train", causal_recipe("lora", name="cut"), "train.max_steps=1", "data.max_length=40")[0] == 0
    runs = {}
    for name, args in {
        "run": [tmp_path / "runs" / "cut"],
        "run, 16": [tmp_path / "runs" / "cut", "--max-length", "16"],
        "model": [tiny_llama_dir, "--task", "gsm8k", "--data-path", tiny_gsm8k_dir],
        "model, 16": [tiny_llama_dir, "--task", "gsm8k", "--data-path", tiny_gsm8k_dir, "--max-length", "16"],
    }.items():
        code, out, err = cli("eval", *args, "--max-samples", "4", "--json")
        assert code == 0, err
        runs[name] = (json.loads(out), err)
    assert [r["max_length"] for r, _ in runs.values()] == [40, 16, 320, 16]
    assert "were cut to data.max_length=16 tokens" in runs["model, 16"][1] and "were cut" not in runs["model"][1]
    assert runs["model, 16"][0]["loss"] != pytest.approx(runs["model"][0]["loss"])  # cut answers score otherwise


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "model.gguf_file: no file"),
        ("not_gguf", "is not a GGUF file (it does not start with 'GGUF')"),
        ("type", "model.type: classification does not fit data.task gsm8k, which needs causal_lm"),
    ],
)
def test_bad_causal_inputs(cli, causal_recipe, tmp_path, case, expect):
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    model = {
        "missing": {"name": str(tmp_path), "gguf_file": "none.gguf"},
        "not_gguf": {"name": str(tmp_path), "gguf_file": "fake.gguf"},
        "type": {"type": "classification"},
    }[case]
    recipe = causal_recipe("lora", name="bad", model=model)
    code, _, err = cli("train", recipe, "train.max_steps=1")
    assert code == 2 and expect in err and err.count("error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_gguf_dequantisation_bar_is_lrfts_own(capfd):
    """transformers' GGUF loader calls its module's `tqdm`; under lrft that is lrft's progress, which
    writes nothing off a terminal (here: pytest's captured stderr), and the loader's own comes back after."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from lrft.models import gguf_progress

    original = gguf_utils.tqdm
    with gguf_progress():
        assert list(gguf_utils.tqdm([1, 2, 3], desc="Converting and de-quantizing GGUF tensors...")) == [1, 2, 3]
    assert capfd.readouterr().err == "" and gguf_utils.tqdm is original


def test_generation_stops_each_sequence_once_its_answer_is_written(tmp_path):
    """A sequence stops where its completion first matches the task's answer pattern, another one of the
    same batch runs on; greedy decoding makes the same tokens up to there, so each stopped completion
    is a prefix of the one generated without the pattern."""
    from transformers import AutoTokenizer

    from lrft.evaluation import generate, stop_when_written

    tok = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path / "lm"))
    rows = tok(["what is 9 plus 9 18 is", "what is 9 plus 9"], padding=True, return_tensors="pt")["input_ids"]
    width = 1  # [CLS] is the prompt
    stops = stop_when_written(r"\b18\b", tok, width)(rows, None)
    assert stops.tolist() == [True, False]

    model = tiny_llama(seed=3, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
    prompts = [{"prompt_ids": tok(p)["input_ids"][:-1], "prompt": p, "gold": "18"} for p in ("what is", "9 plus 9 is")]
    full = generate(model, prompts, tok, max_new_tokens=8, batch_size=2, device="cpu")
    first_word = r"\w+ "  # the first whole word of each completion
    stopped = generate(model, prompts, tok, max_new_tokens=8, batch_size=2, device="cpu", answer_written=first_word)
    for f, s in zip(full, stopped):
        assert f["index"] == s["index"] and f["completion"].startswith(s["completion"])
        assert re.search(first_word, s["completion"]) and len(s["completion"]) < len(f["completion"]), (f, s)


def test_gsm8k_generation_stops_after_the_answer_line():
    pattern = re.compile(get_task("gsm8k").answer_written)
    assert pattern.search("3 + 4 = 7\n#### 7\n") and pattern.search("so $1,250.\n#### $1,250\n")
    assert not pattern.search("3 + 4 = 7\n#### 7") and not pattern.search("#### \n") and not pattern.search("7\n")


def scrambled(model, seed: int = 1):
    """The model with every matrix drawn at std 0.5: varied greedy tokens (a fresh tiny model repeats one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.mark.parametrize(
    ("family", "lengths"), [("llama", (3, 7, 5, 9, 4)), ("gpt2", (3, 7, 5, 9, 4)), ("llama", (4, 4, 4, 5, 9, 9, 10))]
)
def test_greedy_decoding_drops_finished_rows_and_makes_generates_tokens(family, lengths):
    """Rows finishing at other steps (their answer written, or EOS) leave the batch; every row's tokens
    are model.generate's greedy ones up to where it stopped, EOS included, whether the prompts are read
    one by one or in groups with padding of their own (sorted lengths: [4, 4, 4], [5], [9, 9, 10])."""
    from lrft import decoding

    model = scrambled(tiny_llama(seed=3) if family == "llama" else tiny_family("gpt2"))
    assert decoding.shrinks(model)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in lengths]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = None  # generate runs every row 12 tokens; `eos` is the test's
    full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    full = full[:, width:].tolist()
    eos = full[2][4]  # a token row 2 makes: it (and any row making it earlier) ends there
    got = decoding.greedy_completions(model, ids, mask, 12, eos, lambda row, tokens: len(tokens) >= 3 + 2 * row)
    for row, (want, tokens) in enumerate(zip(full, got)):
        end = min(3 + 2 * row, want.index(eos) + 1 if eos in want else 12)
        assert tokens == want[:end], (row, tokens, want)
    assert len(got[2]) <= 5  # EOS at its fifth token at the latest


def test_prompts_are_read_in_groups_that_waste_little_padding():
    from lrft.decoding import length_groups

    assert length_groups([4, 4, 4, 5, 9, 9, 10]) == [slice(0, 3), slice(3, 4), slice(4, 7)]
    assert length_groups([90] * 5) == [slice(0, 5)]
    assert length_groups([3, 7]) == [slice(0, 1), slice(1, 2)]  # 2 × 7 = 14 > 1.1 × 10
    assert length_groups([10, 11]) == [slice(0, 2)]  # 22 ≤ 1.1 × 21


def test_preallocated_cache_holds_what_dynamic_cache_holds():
    """Filled in place, the cache's keys and values are DynamicCache's concatenations, after a prefill,
    decoding steps and rows leaving; a write past its capacity is refused."""
    from transformers import DynamicCache

    from lrft import decoding

    model = scrambled(tiny_llama(seed=3))
    ids = torch.randint(3, 60, (4, 6), generator=torch.Generator().manual_seed(0))
    filled, grown = decoding.preallocated_cache(model.config, 9), DynamicCache(config=model.config)
    assert all(isinstance(layer, decoding.PreallocatedLayer) for layer in filled.layers)
    with torch.no_grad():
        for cache in (filled, grown):
            model(input_ids=ids, cache=cache, use_cache=True)
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)
            cache.batch_select_indices(torch.tensor([0, 2]))
            model(input_ids=ids[[0, 2], :2], cache=cache, use_cache=True)
    for a, b in zip(filled.layers, grown.layers):
        assert a.keys.shape == b.keys.shape == (2, a.keys.shape[1], 9, a.keys.shape[3])
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
    with pytest.raises(ValueError, match="cache of 9 positions"), torch.no_grad():
        model(input_ids=ids[[0, 2], :1], cache=filled, use_cache=True)


def test_generations_come_in_batches_of_generation_batch_size(tmp_path, monkeypatch):
    """The loss is computed in batches of batch_size, the generations in generation_batch_size's."""
    from transformers import AutoTokenizer

    from lrft import evaluation
    from lrft.data import collator
    from lrft.evaluation import EvalSet, evaluate

    tok = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path / "lm"))
    model = scrambled(tiny_llama(seed=3, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id))
    prompts = [{"prompt_ids": tok(f"{n} plus {n}")["input_ids"][:-1], "prompt": "", "gold": "2"} for n in range(7)]
    feats = [{"input_ids": p["prompt_ids"], "labels": p["prompt_ids"]} for p in prompts]
    widths = []
    batch_completions = evaluation.batch_completions
    monkeypatch.setattr(
        evaluation,
        "batch_completions",
        lambda m, b, *a: widths.append(len(b["input_ids"])) or batch_completions(m, b, *a),
    )
    gsm8k = get_task("gsm8k")
    kw = {"tokenizer": tok, "max_new_tokens": 3, "generation": True}
    evaluate(
        model, {"": EvalSet(feats, prompts)}, gsm8k, collator(gsm8k, tok), batch_size=2, generation_batch_size=5, **kw
    )
    assert widths == [5, 2]
    widths.clear()
    evaluate(model, {"": EvalSet(feats, prompts)}, gsm8k, collator(gsm8k, tok), batch_size=3, **kw)
    assert widths == [3, 3, 1]


def test_generation_is_the_same_through_generate_and_the_shrinking_batch(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from lrft import decoding
    from lrft.evaluation import generate

    tok = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path / "lm"))
    model = scrambled(tiny_llama(seed=3, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id))
    texts = ("what is", "9 plus 9 is", "what is 9 plus", "is")
    prompts = [{"prompt_ids": tok(p)["input_ids"][:-1], "prompt": p, "gold": "18"} for p in texts]
    kw = {"max_new_tokens": 10, "batch_size": 3, "device": "cpu", "answer_written": r"\w+ \w+ "}
    shrinking = generate(model, prompts, tok, **kw)
    monkeypatch.setattr(decoding, "shrinks", lambda model: False)  # model.generate and its stopping criterion
    assert generate(model, prompts, tok, **kw) == shrinking
    assert len({r["completion"] for r in shrinking}) > 1
