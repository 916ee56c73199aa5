"""data.format: text-to-text: a classification task as prompts and answer words on a causal LM or an
encoder-decoder, trained on the answer word and scored by rank classification.

The prompts are T5's renderings, the words the label names; the rank scores are each candidate's
summed log-likelihood (checked against the model's own logits); every method trains on a tiny Llama
and a tiny T5, and the run evaluates, merges and exports as any causal run does.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lrft.data import get_task, load_task_data
from lrft.data.text_to_text import STSB_VALUES, ChoiceSplit, default_prompt, task_for
from lrft.errors import LrftError
from tests.helpers import METHODS, recipe_dict, save_tiny_family, write_glue_mrpc, write_recipe


@pytest.fixture(scope="module")
def mrpc_dir(tmp_path_factory):
    return write_glue_mrpc(tmp_path_factory.mktemp("t2t") / "mrpc")


def cfg(path, **kw):
    values = dict(path=str(path), max_train_samples=None, max_eval_samples=None, prompt=None, label_words=None)
    return SimpleNamespace(**{**values, **kw})


def test_prompts_are_t5s_and_labels_their_names(mrpc_dir):
    assert default_prompt(get_task("glue/mrpc"), True) == "mrpc sentence1: {text} sentence2: {pair}"
    assert default_prompt(get_task("glue/cola"), False) == "cola sentence: {text}"
    assert default_prompt(get_task("glue/qnli"), True) == "qnli question: {text} sentence: {pair}"
    data = load_task_data(task_for("glue/mrpc", "text-to-text"), cfg(mrpc_dir))
    dev = data.evals[""]
    assert isinstance(dev, ChoiceSplit) and dev.choices == ("not_equivalent", "equivalent")
    first = dev.prompts[0][0]["content"]
    assert first.startswith("mrpc sentence1: ") and " sentence2: " in first
    assert all(dev.responses[i] == dev.choices[g] for i, g in enumerate(dev.gold))
    worded = load_task_data(task_for("glue/mrpc", "text-to-text"), cfg(mrpc_dir, label_words=["no", "yes"]))
    assert worded.evals[""].choices == ("no", "yes")
    assert STSB_VALUES[:3] == ("0.0", "0.2", "0.4") and STSB_VALUES[-1] == "5.0" and len(STSB_VALUES) == 26


def test_text_to_text_names_what_is_wrong(mrpc_dir, tmp_path, tiny_llama_dir):
    with pytest.raises(LrftError, match=r"data.label_words: \['yes'\] are not 2 distinct words"):
        load_task_data(task_for("glue/mrpc", "text-to-text"), cfg(mrpc_dir, label_words=["yes"]))
    with pytest.raises(LrftError, match=r"data.prompt: 'mrpc {sentence}' is not a template of \{text\} and \{pair\}"):
        load_task_data(task_for("glue/mrpc", "text-to-text"), cfg(mrpc_dir, prompt="mrpc {sentence}"))
    with pytest.raises(LrftError, match="text-to-text renders a classification or regression task"):
        task_for("gsm8k", "text-to-text")


@torch.no_grad()
def test_rank_scores_are_each_candidates_summed_log_likelihood(cli, mrpc_dir, tiny_llama_dir, tmp_path):
    """lrft eval's accuracy of a plain model is that of the argmax, over the two label words, of the
    log-probabilities the model's own logits give each word's tokens after its prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrft.data.causal import prompt_response_ids

    args = ("eval", tiny_llama_dir, "--task", "glue/mrpc", "--text-to-text", "--data-path", mrpc_dir)
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    result = json.loads(out)
    model, tok = (
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
        AutoTokenizer.from_pretrained(tiny_llama_dir),
    )
    dev = load_task_data(task_for("glue/mrpc", "text-to-text"), cfg(mrpc_dir)).evals[""]
    right = 0
    for prompt, gold in zip(dev.prompts, dev.gold):
        scores = []
        for p_ids, r_ids in prompt_response_ids(tok, [prompt] * 2, list(dev.choices)):
            logits = model(torch.tensor([p_ids + r_ids])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[len(p_ids) + i - 1, t]) for i, t in enumerate(r_ids)))
        right += int(max(range(2), key=lambda k: scores[k]) == gold)
    assert result["accuracy"] == pytest.approx(right / len(dev))
    assert {"accuracy", "f1", "loss", "perplexity"} <= set(result)


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_text_to_text_and_the_run_serves(cli, mrpc_dir, tiny_llama_dir, tmp_path, family, method):
    model_dir = tiny_llama_dir if family == "llama" else save_tiny_family(tmp_path / "t5", "t5")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if family == "llama" else ["q", "k", "v", "o"]
    name = f"t2t_{family}_{method}"
    recipe = recipe_dict(
        model_dir, mrpc_dir, tmp_path / "runs", method, name,
        data={"task": "glue/mrpc", "format": "text-to-text", "max_length": 64},
        adapter={"target_modules": targets}, train={"eval_on_start": True, "epochs": 2, "batch_size": 16},
        calibration={"samples": 8, "batch_size": 4},
    )  # fmt: skip
    code, out, err = cli("train", write_recipe(tmp_path / "r.yaml", recipe), "--json")
    assert code == 0, err
    final, run = json.loads(out)["final"], tmp_path / "runs" / name
    evals = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"eval"' in line]
    assert evals[-1]["loss"] < evals[0]["loss"] and {"accuracy", "f1"} <= set(evals[0])
    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == final["accuracy"]
    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    assert json.loads(out)["verdict"] == "ok"
    args = ("--task", "glue/mrpc", "--text-to-text", "--data-path", mrpc_dir, "--max-length", "64", "--json")
    code, out, err = cli("eval", tmp_path / "merged", *args)
    assert code == 0, err
    assert json.loads(out)["accuracy"] == final["accuracy"]
    code, out, err = cli("merge", run, "--format", "peft", "--out", tmp_path / "peft", "--json")
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "peft", "--data-path", mrpc_dir, "--max-length", "64", "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == final["accuracy"]


def test_stsb_text_to_text_chooses_a_number(cli, tiny_llama_dir, tmp_path):
    stsb = tmp_path / "stsb"
    stsb.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for split, n in (("train", 16), ("dev", 12)):
        rows = [f"{i}\tg\tf\t2012\t{i}\ts\ts\ta good film {i}\tthe plot {i}\t{(i * 0.37) % 5:.3f}\n" for i in range(n)]
        (stsb / f"{split}.tsv").write_text(header + "".join(rows))
    args = ("eval", tiny_llama_dir, "--task", "glue/stsb", "--text-to-text", "--data-path", stsb, "--json")
    code, out, err = cli(*args)
    assert code == 0, err
    result = json.loads(out)
    assert {"pearson", "spearman", "loss"} <= set(result)
    data = load_task_data(task_for("glue/stsb", "text-to-text"), cfg(stsb))
    assert data.evals[""].responses[1] == "0.4" and data.evals[""].gold[1] == pytest.approx(0.37)  # nearest 0.2
