"""Preference optimisation: reading pairs in every layout, truncation, the DPO objective through training
(every method and loss), the reference (precomputed = adapters off, reused on resume), grad_accum and
processes, DPO after SFT, merge and PEFT export of a preference run, and the real HH pairs.

TRL parity of the losses, rewards and gradients is tests/test_preference_trl.py.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from lrft.data import features
from lrft.data.preference import PairCollator, read_pairs
from lrft.data.tasks import PreferenceSplit
from lrft.preference import LOSSES
from tests.helpers import (
    METHODS,
    ROOT,
    assert_merge_parity,
    assert_same_adapter,
    launch,
    lrft,
    make_pairs,
    read_jsonl,
    save_lm_tokenizer,
    train_lines,
    write_recipe,
)

HH_CHOSEN = "\n\nHuman: what is 1 plus 2?\n\nAssistant: do you mean numbers?\n\nHuman: yes\n\nAssistant: 1 plus 2 is 3"
HH_REJECTED = (
    "\n\nHuman: what is 1 plus 2?\n\nAssistant: do you mean numbers?\n\nHuman: yes\n\nAssistant: 1 plus 2 is 4"
)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------------------- reading


def test_the_three_layouts_read_to_the_same_kind_of_pair(tmp_path):
    standard = {"prompt": "what is 1 plus 2?", "chosen": "3", "rejected": "4"}
    conversational = {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1 plus 2?"}],
        "chosen": [{"role": "assistant", "content": "3"}],
        "rejected": [{"role": "assistant", "content": "4"}],
    }
    pairs = read_pairs(
        _jsonl(tmp_path / "p.jsonl", [standard, conversational, {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    )
    assert pairs.prompts[0] == [{"role": "user", "content": "what is 1 plus 2?"}]
    assert pairs.prompts[1] == conversational["prompt"]
    assert pairs.prompts[2] == [
        {"role": "user", "content": "what is 1 plus 2?"},
        {"role": "assistant", "content": "do you mean numbers?"},
        {"role": "user", "content": "yes"},
    ]
    assert pairs.chosen == ["3", "3", "1 plus 2 is 3"] and pairs.rejected == ["4", "4", "1 plus 2 is 4"]


def test_unusable_pairs_are_left_out_and_counted(tmp_path, capsys):
    records = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "a", "chosen": "  ", "rejected": "c"},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("Human: yes", "Human: no")},
    ]
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    assert len(read_pairs(gz)) == 1
    err = capsys.readouterr().err
    assert "left out 3 pairs (1 with identical responses, 1 with an empty response, 1 with dialogues that differ" in err


def test_one_file_is_split_by_each_pair_s_content_not_its_place(tmp_path):
    from lrft.data import get_task, load_task_data
    from lrft.recipe import DataConfig

    records = make_pairs(200, 0)
    random.Random(1).shuffle(shuffled := list(records))
    held = []
    for name, recs in (("a", records), ("b", shuffled)):
        path = _jsonl(tmp_path / name / "pairs.jsonl", recs)
        data = load_task_data(get_task("preference"), DataConfig(task="preference", path=str(path.parent)))
        assert len(data.train) + len(data.evals[""]) == 200
        pairs = data.evals[""]
        held.append(sorted(zip(map(repr, pairs.prompts), pairs.chosen, pairs.rejected)))
    assert held[0] == held[1] and 5 < len(held[0]) < 40  # about a tenth, the same pairs


def test_a_run_on_one_file_of_pairs_is_evaluated_on_the_same_held_out_pairs(cli, preference_recipe, tmp_path):
    pairs = _jsonl(tmp_path / "mine" / "pairs.jsonl.gz", [])
    pairs.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in make_pairs(120, 3)).encode()))
    _jsonl(tmp_path / "mine" / "other.jsonl", [{"unrelated": 1}])  # the file is named: other files stay unread
    recipe = preference_recipe(name="file", data={"path": str(pairs)}, train={"max_steps": 2})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    run = tmp_path / "runs" / "file"
    assert json.loads((run / "summary.json").read_text())["data_source"] == str(pairs.resolve())
    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    final, evaluated = json.loads((run / "summary.json").read_text())["final"], json.loads(out)
    assert 0 < evaluated["examples"] < 40  # about a tenth of 120 pairs held out
    assert {k: evaluated[k] for k in final} == pytest.approx(final, rel=1e-5, abs=1e-6)


def test_a_long_pair_keeps_the_end_of_its_prompt_and_the_start_of_its_responses(tmp_path):
    tok = save_lm_tokenizer(tmp_path / "tok")
    prompt = [{"role": "user", "content": " ".join(["good"] * 30) + " what is 1 plus 2?"}]
    split = PreferenceSplit([prompt], ["1 plus 2 is 3 " * 5], ["1 plus 2 is 4 " * 5])
    (pair,) = features(split, tok, max_length=24, what="pairs", max_prompt_length=10)
    for side in ("chosen", "rejected"):
        ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
        assert len(ids) == 24 and labels[:10] == [-100] * 10 and all(t != -100 for t in labels[10:])
        prompt_text = tok.decode(ids[:10])
        assert prompt_text.endswith("assistant :") and "what" in prompt_text  # the prompt's end is kept
        assert tok.decode(ids[10:]).startswith("1 plus 2 is")  # the response's start is kept
    batch = PairCollator(tok.pad_token_id)([pair, pair])
    assert batch["input_ids"].shape == (4, 24) and torch.equal(batch["input_ids"][0], batch["input_ids"][1])


def test_the_real_hh_pairs(data_dir):
    from lrft.data import get_task, load_task_data
    from lrft.recipe import DataConfig

    path = data_dir / "preference" / "hh_harmless"
    data = load_task_data(get_task("preference"), DataConfig(task="preference", path=str(path)))
    # 2,312 pairs in the file: 4 with an empty chosen reply and 5 whose dialogues differ before the last reply
    assert len(data.train) + len(data.evals[""]) == 2312 - 9
    assert (len(data.train), len(data.evals[""])) == (2083, 220)  # the hash split, pinned
    assert all(p[-1]["role"] == "user" for p in data.train.prompts)


# ---------------------------------------------------------------------------------------- training


def _evals(run: Path) -> list[dict]:
    """The evaluations' metrics."""
    return [
        {k: v for k, v in r.items() if k != "type"} for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval"
    ]


LEARN = {"epochs": 4, "lr": 3e-2, "eval_on_start": True, "dpo": {"beta": 0.5}}


@pytest.mark.parametrize("method", METHODS)
def test_dpo_trains_every_method_and_the_held_out_margin_grows(cli, preference_recipe, tmp_path, method):
    lr = {"lorta": 3e-1}.get(method, LEARN["lr"])  # LoRTA's rank-4 tensor holds a few hundred parameters
    code, _, err = cli("train", preference_recipe(method, train={**LEARN, "lr": lr}))
    assert code == 0, err
    run = tmp_path / "runs" / "dpo"
    start, *_, end = _evals(run)
    # step 0: the policy is its reference (every method starts at ΔW = 0)
    assert start["rewards/margin"] == 0 and start["rewards/accuracy"] == 0
    assert start["logps/chosen"] == pytest.approx(start["ref/logps/chosen"], rel=1e-6)
    assert end["rewards/margin"] > 0 and end["loss"] < start["loss"]  # 16 held-out pairs: accuracy is too coarse
    assert end["ref/logps/chosen"] == start["ref/logps/chosen"]  # the reference stays where it was
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]
    assert {"rewards/accuracy", "rewards/margin", "logps/chosen"} <= logged[0].keys()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric_for_best"] == "rewards/accuracy" and summary["reference"] == "precomputed"
    assert (run / "reference" / "train.safetensors").is_file()


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains(cli, preference_recipe, tmp_path, loss):
    beta = {"hinge": 2.0, "simpo": 2.0}.get(loss, 0.5)  # the scale each loss's margin moves on
    code, _, err = cli("train", preference_recipe(train={**LEARN, "epochs": 8, "dpo": {"beta": beta, "loss": loss}}))
    assert code == 0, err
    run = tmp_path / "runs" / "dpo"
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]
    first, last = losses[:4], losses[-4:]  # an epoch each: the same pairs, in other batches
    assert sum(last) < sum(first)
    assert (run / "reference").exists() == (loss not in ("simpo", "orpo"))


def test_the_precomputed_reference_trains_as_the_adapters_off_one(cli, preference_recipe, tmp_path):
    sections = {"train": {"epochs": 2, "lr": 2e-2, "dpo": {"beta": 0.5}}}
    for name, ref in (("pre", "precomputed"), ("off", "adapters_off")):
        recipe = preference_recipe(name=name, **sections)
        code, _, err = cli("train", recipe, f"train.dpo.reference={ref}")
        assert code == 0, err
    assert_same_adapter(tmp_path / "runs" / "pre", tmp_path / "runs" / "off", tol=1e-6)
    assert not (tmp_path / "runs" / "off" / "reference").exists()
    pre, off = (_evals(tmp_path / "runs" / n)[-1] for n in ("pre", "off"))
    assert pre == pytest.approx(off, rel=1e-5, abs=1e-6)


def test_grad_accum_gives_the_step_of_the_whole_batch(cli, preference_recipe, tmp_path):
    sections = {"train": {"max_steps": 2, "lr": 2e-2, "dpo": {"beta": 0.5}}}
    for name, accum in (("one", 1), ("four", 4)):
        code, _, err = cli("train", preference_recipe(name=name, **sections), f"train.grad_accum={accum}")
        assert code == 0, err
    assert_same_adapter(tmp_path / "runs" / "four", tmp_path / "runs" / "one", tol=1e-6)


def test_pairs_group_by_their_longer_side(cli, preference_recipe, tmp_path):
    code, _, err = cli("train", preference_recipe(train={"max_steps": 2, "group_by_length": True}))
    assert code == 0, err


def test_killed_mid_epoch_resumes_to_the_same_adapter_reusing_the_reference(preference_recipe, tmp_path):
    sections = {"train": {"epochs": 2, "save_every": 2, "lr": 2e-2, "log_every": 1}}
    assert lrft("train", preference_recipe(name="straight", **sections)).returncode == 0
    recipe = preference_recipe(name="killed", **sections)
    died = lrft("train", recipe, patch=("sigkill", 3))
    assert died.returncode == -9, died.stderr[-2000:]
    assert "reference: log-probs of 48 pairs under the base model" in died.stderr
    resumed = lrft("train", recipe)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "reference: log-probs of 48 pairs reused from" in resumed.stderr
    assert "resuming from step-000000002" in resumed.stderr
    run, straight = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    assert_same_adapter(run, straight)
    assert train_lines(run) == train_lines(straight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU/gloo path; GPUs are exercised on a cluster")
def test_two_processes_match_one(preference_recipe, tmp_path):
    sections = {"train": {"epochs": 1, "lr": 2e-2, "dpo": {"beta": 0.5}}}
    assert lrft("train", preference_recipe(name="one", **sections)).returncode == 0
    two = launch("train", str(preference_recipe(name="two", **sections)))
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_adapter(tmp_path / "runs" / "two", tmp_path / "runs" / "one", tol=1e-5)
    one, two_ = (_evals(tmp_path / "runs" / n)[-1] for n in ("one", "two"))
    assert one == pytest.approx(two_, rel=1e-5, abs=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU/gloo path; GPUs are exercised on a cluster")
def test_fsdp_two_processes_match_one(preference_recipe, tmp_path):
    """FSDP2 (the shipped accelerate config): each process computes every pair's reference (a sharded
    model runs the same forward passes everywhere) and the adapter equals one process's."""
    sections = {"train": {"epochs": 1, "lr": 2e-2, "dpo": {"beta": 0.5}}}
    assert lrft("train", preference_recipe(name="one", **sections)).returncode == 0
    fsdp = launch(
        "train", str(preference_recipe(name="fsdp", **sections)), config=ROOT / "docs" / "accelerate_fsdp.yaml"
    )
    assert fsdp.returncode == 0 and "2 processes (fsdp over" in fsdp.stderr, fsdp.stderr[-3000:]
    assert_same_adapter(tmp_path / "runs" / "fsdp", tmp_path / "runs" / "one", tol=1e-4)
    one, two = (_evals(tmp_path / "runs" / n)[-1] for n in ("one", "fsdp"))
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)


def test_dpo_after_sft_starts_from_and_refers_to_the_sft_policy(cli, preference_recipe, tmp_path, tiny_pairs_dir):
    sft_data = tmp_path / "sft"
    for split, name in (("train", "train"), ("test", "dev")):
        rows = [json.loads(line) for line in (tiny_pairs_dir / f"{split}.jsonl").read_text().splitlines()]
        _jsonl(sft_data / f"{name}.jsonl", [{"instruction": r["prompt"], "output": r["chosen"]} for r in rows])
    sft = yaml.safe_load(preference_recipe(name="sft").read_text())
    sft["data"] = {"task": "instruction", "path": str(sft_data), "max_length": 32}
    sft["train"].update(epochs=2, lr=3e-2)
    assert cli("train", write_recipe(tmp_path / "sft.yaml", sft))[0] == 0
    code, _, err = cli(
        "train",
        preference_recipe(name="dpo", train={"max_steps": 1, "eval_on_start": True}),
        f"adapter.init_from={tmp_path / 'runs' / 'sft'}",
    )
    assert code == 0, err
    assert "adapter: starts from" in err and "under the adapter.init_from policy" in err
    code, _, err = cli("train", preference_recipe(name="base_ref", train={"max_steps": 1, "eval_on_start": True}))
    start, base_start = _evals(tmp_path / "runs" / "dpo")[0], _evals(tmp_path / "runs" / "base_ref")[0]
    assert start["rewards/margin"] == 0  # the reference is the SFT policy the run starts from
    assert start["ref/logps/chosen"] > base_start["ref/logps/chosen"] + 1  # SFT made the chosen answers likelier


def test_a_preference_run_evaluates_merges_and_exports_to_peft(
    cli, preference_recipe, tmp_path, tiny_llama_dir, tiny_pairs_dir
):
    import peft
    from transformers import AutoModelForCausalLM

    code, _, err = cli("train", preference_recipe(train={"max_steps": 2, "lr": 2e-2}))
    assert code == 0, err
    run = tmp_path / "runs" / "dpo"
    code, out, err = cli("eval", run, "--json")  # its reference on the fly: the run's precomputed numbers
    assert code == 0, err
    final = json.loads((run / "summary.json").read_text())["final"]
    assert {k: v for k, v in json.loads(out).items() if k in final} == pytest.approx(final, rel=1e-5, abs=1e-6)
    code, out, err = cli("eval", tiny_llama_dir, "--task", "preference", "--data-path", tiny_pairs_dir, "--json")
    assert code == 0, err
    before = json.loads(out)  # a plain model is its own reference: "before" numbers
    assert before["rewards/margin"] == 0 and before["logps/chosen"] == before["ref/logps/chosen"]
    assert before["ref/logps/chosen"] == pytest.approx(final["ref/logps/chosen"], rel=1e-6)
    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    assert_merge_parity(json.loads(out))
    code, out, err = cli("merge", run, "--format", "peft", "--out", tmp_path / "peft", "--json")
    assert code == 0, err
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    served = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "peft")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        a, b = served.eval()(ids).logits, merged.eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
