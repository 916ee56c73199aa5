"""The bad-input catalogue: every user mistake gets one clear line, exit code 2, and changes no file.

Each case builds its own bad input under a scratch dir, runs the CLI, and checks: exit code 2; a
single `error:` line that contains the expected words (the field or file, the value, the fix); no
traceback; every file that existed before is byte-identical afterwards and no new file appeared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import MRPC_HEADER, make_problems, save_tiny_llama, snapshot, tiny_bert


@pytest.fixture
def world(finished_runs):
    """The shared finished runs (lora "good", talora "ta") and copies of the tiny inputs."""
    return finished_runs


def recipe(world: Path, **changes) -> dict:
    r = yaml.safe_load((world / "good.yaml").read_text())
    r["name"] = "new"
    for dotted, value in changes.items():
        node = r
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return r


# Each case: (args, the words its error line must contain, a setup(world, scratch) writing its inputs).
def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _recipe_file(scratch: Path, world: Path, **changes) -> Path:
    return _write(scratch / "r.yaml", yaml.safe_dump(recipe(world, **changes)))


def _data_dir(
    scratch: Path, train: str, dev: str = '{"text": "good film", "label": 1}\n', suffix=".jsonl", eval_stem: str = "dev"
) -> Path:
    _write(scratch / "d" / f"train{suffix}", train)
    _write(scratch / "d" / f"{eval_stem}{suffix}", dev)
    return scratch / "d"


PAIR = '{"prompt": "what is 1 plus 2?", "chosen": "1 plus 2 is 3", "rejected": "1 plus 2 is 4"}\n'


def _preference_train(w: Path, s: Path, train: str, **changes) -> list:
    """`lrft train` of a preference recipe on the tiny Llama, its pairs' train.jsonl `train`."""
    data = _data_dir(s, train, PAIR, eval_stem="test")
    changes = {"data.task": "preference", "data.max_length": 32, "data.path": str(data), **changes}
    changes.setdefault("adapter.target_modules", ["q_proj", "v_proj"])
    return ["train", _recipe_file(s, w, **changes), "model.name=" + str(s / "llama")]


def _suite_train(w: Path, s: Path, test: str) -> list:
    """`lrft train` of a commonsense recipe on the tiny Llama, its one set's test.json `test`."""
    train = '[{"instruction": "is 1 plus 2 3?", "output": "the answer is true", "answer": "true"}]'
    _write(s / "cs" / "yesno" / "train.json", train)
    _write(s / "cs" / "yesno" / "test.json", test)
    changes = {"data.task": "commonsense", "data.max_length": 32, "data.path": str(s / "cs")}
    return [
        "train",
        _recipe_file(s, w, **changes, **{"adapter.target_modules": ["q_proj"]}),
        "model.name=" + str(s / "llama"),
    ]


CASES = {
    # ------------------------------------------------------------------------------------ recipes
    "recipe missing": (lambda w, s: ["train", s / "none.yaml"], ["recipe: no file at", "lrft init"]),
    "yaml syntax": (lambda w, s: ["train", _write(s / "r.yaml", "model: [\n")], ["YAML syntax error at line"]),
    "recipe not a mapping": (
        lambda w, s: ["train", _write(s / "r.yaml", "- a\n- b\n")],
        ["a recipe is a YAML mapping"],
    ),
    "unknown top key": (
        lambda w, s: ["train", _recipe_file(s, w, trian={"lr": 1})],
        ["trian: unknown key", "did you mean 'train'"],
    ),
    "unknown nested key": (
        lambda w, s: ["train", _recipe_file(s, w, **{"train.learning_rate": 1e-3})],
        ["train.learning_rate: unknown key", "known keys here"],
    ),
    "wrong type": (
        lambda w, s: ["train", _recipe_file(s, w, **{"train.lr": "fast"})],
        ["train.lr", "valid number", "'fast'"],
    ),
    "zero epochs": (
        lambda w, s: ["train", _recipe_file(s, w, **{"train.epochs": 0})],
        ["train.epochs", "greater than 0"],
    ),
    "warmup ratio 1": (
        lambda w, s: ["train", _recipe_file(s, w, **{"train.warmup_ratio": 1.0})],
        ["train.warmup_ratio", "less than 1"],
    ),
    "warmup twice": (
        lambda w, s: ["train", _recipe_file(s, w, **{"train.warmup_steps": 5, "train.warmup_ratio": 0.1})],
        ["set train.warmup_steps or train.warmup_ratio, not both"],
    ),
    "batch vs accumulation": (
        lambda w, s: ["train", _recipe_file(s, w, **{"train.grad_accum": 3})],
        ["train.batch_size (16) must be a multiple of train.grad_accum (3)"],
    ),
    "unknown precision": (
        lambda w, s: ["train", _recipe_file(s, w, **{"train.precision": "fp8"})],
        ["train.precision", "'fp8'"],
    ),
    "unknown method": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.method": "loar"})],
        ["adapter.method: unknown method 'loar'", "did you mean 'lora'"],
    ),
    "unknown task": (
        lambda w, s: ["train", _recipe_file(s, w, **{"data.task": "glue/mprc"})],
        ["data.task: unknown task 'glue/mprc'", "did you mean 'glue/mrpc'"],
    ),
    "escaping run name": (
        lambda w, s: ["train", _recipe_file(s, w, name="../../etc")],
        ["name: '../../etc' is not a plain run name"],
    ),
    "rank zero": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.params.rank": 0})],
        ["adapter.params.rank", "greater than 0"],
    ),
    "rank too large": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.params.rank": 99})],
        ["adapter.params.rank: 99 is larger than the targeted layer", "use a rank ≤ 32"],
    ),
    "unknown method param": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.params.dropuot": 0.1})],
        ["adapter.params.dropuot: unknown key", "did you mean 'dropout'"],
    ),
    "dropout out of range": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.params.dropout": 1.5})],
        ["adapter.params.dropout", "less than 1"],
    ),
    "talora ablation typo": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.method": "talora", "adapter.params.init": "svd"})],
        ["adapter.params.init", "'task-aware', 'weight-svd' or 'random'"],
    ),
    "targets match nothing": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.target_modules": ["qkv"]})],
        ["'qkv' matched no Linear layer", "Linear layers end with"],
    ),
    "lorta outside attention": (
        lambda w, s: [
            "train",
            _recipe_file(s, w, **{"adapter.method": "lorta", "adapter.target_modules": ["intermediate.dense"]}),
        ],
        ["lorta adapts attention projections only", "supported kinds"],
    ),
    "model type vs task": (
        lambda w, s: ["train", _recipe_file(s, w, **{"model.type": "causal_lm"})],
        ["model.type: causal_lm does not fit data.task text-classification"],
    ),
    "metric for best": (
        lambda w, s: ["train", _recipe_file(s, w, **{"train.metric_for_best": "bleu"})],
        ["train.metric_for_best", "not 'bleu'"],
    ),
    "override syntax": (
        lambda w, s: ["train", w / "good.yaml", "train.lr"],
        ["override 'train.lr': expected key=value"],
    ),
    "override typo": (
        lambda w, s: ["train", w / "good.yaml", "train.lrr=1"],
        ["override 'train.lrr=1': train.lrr: unknown key", "did you mean 'lr'"],
    ),
    "override into a value": (
        lambda w, s: ["train", w / "good.yaml", "seed.x=1"],
        ["'seed' is not a section", "set seed=... itself"],
    ),
    "changed recipe on resume": (
        lambda w, s: ["train", w / "good.yaml", "adapter.params.rank=2", "train.max_steps=3"],
        ["holds a checkpoint of another recipe", "adapter.params.rank changed", "--restart"],
    ),
    "calibration samples": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.method": "talora", "calibration.samples": 500})],
        ["calibration.samples: 500 is more than the 64 training examples"],
    ),
    "budget too small": (
        lambda w, s: [
            "train",
            _recipe_file(s, w, **{"adapter.method": "talora", "adapter.params.rank": 2, "adapter.params.min_rank": 3}),
        ],
        ["adapter.params.min_rank: 3 × 4 modules exceeds the budget 8"],
    ),
    "calibration cache of another setup": (
        lambda w, s: [
            "train",
            _recipe_file(
                s, w, **{"adapter.method": "talora", "calibration.seed": 9, "calibration.cache": str(w / "runs" / "ta")}
            ),
        ],
        ["calibration.cache:", "was computed for another setup (examples differ)"],
    ),
    # -------------------------------------------------------------------------------- CLI arguments
    "count-params rank": (
        lambda w, s: ["count-params", "--method", "lora", "--rank", "0"],
        ["--rank: 0 is not a positive rank"],
    ),
    "count-params method": (lambda w, s: ["count-params", "--method", "dora"], ["adapter.method: unknown 'dora'"]),
    "count-params model": (
        lambda w, s: ["count-params", "--method", "lora", "--model", str(s / "nowhere")],
        ["model.name: no directory at"],
    ),
    "count-params calibrated": (
        lambda w, s: ["count-params", "--method", "talora", "--calibrated", w / "runs" / "good"],
        ["--calibrated:", "is a lora run, not talora", "give the run dir of a talora run"],
    ),
    "merge format": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", s / "m", "--format", "gguf"],
        ["--format: unknown 'gguf'"],
    ),
    "merge dtype": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", s / "m", "--dtype", "int4"],
        ["--dtype: unknown 'int4'"],
    ),
    "merge out exists": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", _write(s / "taken" / "keep.txt", "mine").parent],
        ["--out:", "already exists", "--force"],
    ),
    "init exists": (
        lambda w, s: ["init", "--method", "lora", "-o", _write(s / "my.yaml", "# mine\n")],
        ["--output:", "already exists", "--force"],
    ),
    "init method": (lambda w, s: ["init", "--method", "qlora"], ["adapter.method: unknown 'qlora'"]),
    "eval model without task": (lambda w, s: ["eval", w / "model"], ["--task:", "is not an lrft run dir"]),
    "eval missing run dir": (
        lambda w, s: ["eval", _runs_here(s) / "does_not_exist", "--task", "glue/mrpc"],
        ["runs/does_not_exist: no such directory", "give a run dir"],
    ),
    "merge missing run dir": (lambda w, s: ["merge", "./nowhere", "--out", s / "m"], ["./nowhere: no such directory"]),
    "eval wrong task": (
        lambda w, s: ["eval", w / "runs" / "good", "--task", "glue/rte"],
        ["--task: the run was trained on text-classification, not glue/rte", "leave out --task"],
    ),
    "analyze unknown module": (
        lambda w, s: ["analyze", w / "runs" / "good", "--out", s / "a", "--module", "nope"],
        ["--module", "nope"],
    ),
    # ----------------------------------------------------------------------------------- data files
    "data path missing": (
        lambda w, s: ["train", _recipe_file(s, w, **{"data.path": str(s / "nodata")})],
        ["data.path: no directory at"],
    ),
    "glue dir without files": (
        lambda w, s: [
            "train",
            _recipe_file(s, w, **{"data.task": "glue/mrpc", "data.path": str(_write(s / "g" / "x.txt", "").parent)}),
        ],
        ["data: missing", "train.tsv", "a local glue/mrpc dir needs"],
    ),
    "glue missing column": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{"data.task": "glue/mrpc", "data.path": str(_data_dir(s, "a\tb\n1\t2\n", "a\tb\n", suffix=".tsv"))},
            ),
        ],
        ["no column '#1 String' or 'sentence1'", "with its header line"],
    ),
    "glue wrong label": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{
                    "data.task": "glue/mrpc",
                    "data.path": str(_data_dir(s, MRPC_HEADER + "7\t1\t2\ta\tb\n", MRPC_HEADER, suffix=".tsv")),
                },
            ),
        ],
        ["train.tsv:2: label '7' is not one of 0..1"],
    ),
    "glue wrong field count": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{
                    "data.task": "glue/mrpc",
                    "data.path": str(_data_dir(s, MRPC_HEADER + "1\t1\t2\tonly four\n", MRPC_HEADER, suffix=".tsv")),
                },
            ),
        ],
        ["train.tsv:2: expected 5 tab-separated fields, found 4"],
    ),
    "empty training file": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{
                    "data.task": "glue/sst2",
                    "data.path": str(_data_dir(s, "sentence\tlabel\n", "sentence\tlabel\nok\t1\n", suffix=".tsv")),
                },
            ),
        ],
        ["the training split of glue/sst2", "is empty", "add training examples"],
    ),
    "not utf-8": (
        lambda w, s: [
            "train",
            _recipe_file(s, w, **{"data.path": str(_data_dir(s, b'{"text": "\xff\xfe", "label": 1}\n'))}),
        ],
        ["train.jsonl: not UTF-8 text", "convert the file to UTF-8"],
    ),
    "malformed jsonl line": (
        lambda w, s: [
            "train",
            _recipe_file(
                s, w, **{"data.path": str(_data_dir(s, '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n'))}
            ),
        ],
        ["train.jsonl:2: not valid JSON"],
    ),
    "jsonl missing field": (
        lambda w, s: ["train", _recipe_file(s, w, **{"data.path": str(_data_dir(s, '{"txt": "a", "label": 1}\n'))})],
        ["train.jsonl:1: no field 'text'", "data.text_column"],
    ),
    "label not in label names": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{
                    "data.label_names": ["0", "1"],
                    "data.path": str(_data_dir(s, '{"text": "a", "label": 1}\n{"text": "b", "label": 5}\n')),
                },
            ),
        ],
        ["train.jsonl:2: label 5 is not one of data.label_names"],
    ),
    "gsm8k line without answer": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{
                    "data.task": "gsm8k",
                    "data.path": str(
                        _data_dir(
                            s,
                            '{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n',
                            '{"question": "q", "answer": "#### 1"}\n',
                            eval_stem="test",
                        )
                    ),
                },
            ),
            "model.name=" + str(s / "llama"),
        ],
        ["train.jsonl:2: no text field 'answer'", "every line needs question, answer"],
    ),
    "instruction layout": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{"data.task": "instruction", "data.path": str(_data_dir(s, '{"prompt": "a", "completion": "b"}\n'))},
            ),
            "model.name=" + str(s / "llama"),
        ],
        ["train.jsonl:1: expected the alpaca layout"],
    ),
    "nothing left to learn": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{
                    "data.task": "gsm8k",
                    "data.max_length": 8,
                    "data.path": str(
                        _data_dir(
                            s,
                            "".join(json.dumps(r) + "\n" for r in make_problems(4, 0)),
                            "".join(json.dumps(r) + "\n" for r in make_problems(2, 1)),
                            eval_stem="test",
                        )
                    ),
                },
            ),
            "model.name=" + str(s / "llama"),
        ],
        ["data.max_length: 8 tokens leave no response token to learn"],
    ),
    # ------------------------------------------------------------------------------- preference pairs
    "pair without rejected": (
        lambda w, s: _preference_train(w, s, '{"prompt": "what is 1 plus 2?", "chosen": "3"}\n'),
        ["train.jsonl:1: no field 'rejected'", "a pair needs chosen and rejected"],
    ),
    "pairs all identical": (
        lambda w, s: _preference_train(w, s, '{"prompt": "what is 1 plus 2?", "chosen": "3", "rejected": "3"}\n'),
        ["train.jsonl: no usable preference pair"],
    ),
    "prompt leaves no room": (
        lambda w, s: _preference_train(w, s, PAIR, **{"data.max_prompt_length": 32}),
        ["data.max_prompt_length: 32 tokens of prompt leave no room", "data.max_length=32"],
    ),
    "dpo on a classifier": (
        lambda w, s: ["train", _recipe_file(s, w, **{"train.objective": "dpo"})],
        ["train.objective: dpo trains preference pairs", "data.task text-classification is classification"],
    ),
    "init_from another method": (
        lambda w, s: _preference_train(w, s, PAIR, **{"adapter.init_from": str(w / "runs" / "ta")}),
        ["adapter.init_from:", "was trained with method 'talora' and this recipe has 'lora'"],
    ),
    "init_from another base": (
        lambda w, s: _preference_train(w, s, PAIR, **{"adapter.init_from": str(w / "runs" / "good")}),
        ["adapter.init_from:", "was trained with targets", "same base model"],
    ),
    # -------------------------------------------------------------------------------- text-to-text
    "text-to-text of a causal task": (
        lambda w, s: ["train", _recipe_file(s, w, **{"data.task": "gsm8k", "data.format": "text-to-text"})],
        ["data.format: text-to-text renders a classification or regression task", "gsm8k is causal_lm"],
    ),
    "label words miscounted": (
        lambda w, s: [
            "train",
            _recipe_file(s, w, **{"data.format": "text-to-text", "data.label_words": ["yes"]}),
            "model.name=" + str(s / "llama"),
            "adapter.target_modules=[q_proj]",
        ],
        ["data.label_words: ['yes'] are not 2 distinct words", "one word for each, in label order"],
    ),
    # ------------------------------------------------------------------------------- evaluation suites
    "suite test set without answer": (
        lambda w, s: _suite_train(w, s, '[{"instruction": "is 1 plus 2 3?\\n\\nAnswer format: true/false"}]'),
        ["yesno/test.json:1: no 'answer'", "every test record needs the gold answer"],
    ),
    "unknown harness task": (
        lambda w, s: ["eval", str(s / "llama"), "--harness", "arc_esy"],
        ["--harness: 'arc_esy' is not a task of lm-eval", "did you mean 'arc_easy'"],
    ),
    "code execution not allowed": (
        lambda w, s: ["eval", str(s / "llama"), "--task", "humaneval"],
        ["humaneval runs the code the model generates", "--allow-code-execution", "LRFT_ALLOW_CODE_EXECUTION=1"],
    ),
    # ------------------------------------------------------------------------------------ model dirs
    "model dir without config": (
        lambda w, s: ["train", _recipe_file(s, w, **{"model.name": str(_write(s / "m" / "x.txt", "").parent)})],
        ["has no config.json"],
    ),
    "corrupt safetensors": (
        lambda w, s: ["train", _recipe_file(s, w, **{"model.name": str(_broken_model(w, s, b"garbage"))})],
        ["model.name:", "model.safetensors is damaged (cut short: 7 bytes", "download or save the model again"],
    ),
    "pickle weights only": (
        lambda w, s: ["train", _recipe_file(s, w, **{"model.name": str(_broken_model(w, s, None))})],
        ["lrft loads safetensors weights only, never pickle files"],
    ),
    "no tokenizer": (
        lambda w, s: ["train", _recipe_file(s, w, **{"model.name": str(_model_without_tokenizer(w, s))})],
        ["has no usable tokenizer", "add its tokenizer files"],
    ),
    "gguf missing": (
        lambda w, s: ["train", _recipe_file(s, w, **{"model.name": str(s), "model.gguf_file": "none.gguf"})],
        ["model.gguf_file: no file", "name a .gguf file"],
    ),
    "not a gguf": (
        lambda w, s: [
            "train",
            _recipe_file(
                s, w, **{"model.name": str(_write(s / "f.gguf", b"PK\x03\x04").parent), "model.gguf_file": "f.gguf"}
            ),
        ],
        ["is not a GGUF file"],
    ),
    # -------------------------------------------------------------------------------------- run dirs
    "run without adapter": (
        lambda w, s: ["eval", _unfinished_run(w, s)],
        ["no trained adapter in", "rerun `lrft train`"],
    ),
    "foreign adapter": (
        lambda w, s: ["merge", _foreign_run(w, s), "--out", s / "m"],
        ["adapter of method 'talora' but the run's recipe says 'lora'"],
    ),
    "corrupt adapter file": (
        lambda w, s: ["eval", _corrupt_adapter_run(w, s)],
        ["adapter.safetensors: not a readable safetensors file"],
    ),
    "adapter for another base": (
        lambda w, s: ["eval", _run_on_changed_base(w, s)],
        ["target weights differ", "--force"],
    ),
    "not a run dir": (
        lambda w, s: ["merge", w / "data", "--out", s / "m"],
        ["neither an lrft run dir (recipe.yaml) nor a PEFT LoRA adapter dir"],
    ),
    "analyze another base": (
        lambda w, s: ["analyze", w / "runs" / "good", "--against", _run_on_renamed_base(w, s), "--out", s / "a"],
        ["base model"],
    ),
    # ------------------------------------------------ recipes a run cannot use, YAML keys given twice
    "seed beyond numpy": (lambda w, s: ["train", _recipe_file(s, w, seed=2**32)], ["seed", "less than 4294967296"]),
    "negative calibration seed": (
        lambda w, s: ["train", _recipe_file(s, w, **{"calibration.seed": -1})],
        ["calibration.seed", "greater than or equal to 0", "-1"],
    ),
    "infinite learning rate": (
        lambda w, s: ["train", w / "good.yaml", "train.lr=.inf"],
        ["train.lr", "finite number", "inf"],
    ),
    "nan dropout": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.params.dropout": float("nan")})],
        ["adapter.params.dropout", "finite number", "nan"],
    ),
    "empty target modules": (
        lambda w, s: ["train", _recipe_file(s, w, **{"adapter.target_modules": []})],
        ["adapter.target_modules: [] adapts no layer", "leave the key out"],
    ),
    "target module twice": (
        lambda w, s: ["train", w / "good.yaml", "adapter.target_modules=[query,query]"],
        ["adapter.target_modules: 'query' is listed twice"],
    ),
    "empty target module name": (
        lambda w, s: ["train", w / "good.yaml", "adapter.target_modules=['']"],
        ["adapter.target_modules: [''] holds an empty name"],
    ),
    "label names twice": (
        lambda w, s: ["train", _recipe_file(s, w, **{"data.label_names": ["a", "a"]})],
        ["data.label_names: 'a' is listed twice"],
    ),
    "one label name": (
        lambda w, s: ["train", _recipe_file(s, w, **{"data.label_names": ["good"]})],
        ["data.label_names: ['good'] is one label", "two or more"],
    ),
    "repeated key": (
        lambda w, s: ["train", _write(s / "r.yaml", (w / "good.yaml").read_text() + "seed: 7\n")],
        ["key 'seed' is given twice in one mapping, at line", "keep one of the two"],
    ),
    "repeated nested key": (
        lambda w, s: ["train", _write(s / "r.yaml", "train:\n  lr: 1.0e-3\n  epochs: 1\n  lr: 2.0e-3\n")],
        ["key 'lr' is given twice in one mapping, at line 2, column 3 and at line 4, column 3"],
    ),
    "repeated key in an override": (
        lambda w, s: ["train", w / "good.yaml", "train={lr: 1, lr: 2}"],
        ["override 'train={lr: 1, lr: 2}'", "key 'lr' is given twice"],
    ),
    "recipe not utf-8": (
        lambda w, s: ["train", _write(s / "r.yaml", b"seed: 1\nname: caf\xe9\n")],
        ["r.yaml: not UTF-8 text", "a recipe is a UTF-8 YAML file"],
    ),
    "yaml nested too deeply": (
        lambda w, s: ["train", _write(s / "r.yaml", "seed: " + "[" * 3000 + "]" * 3000 + "\n")],
        ["YAML nested too deeply"],
    ),
    "run name too long": (
        lambda w, s: ["train", w / "good.yaml", "name=" + "x" * 201],
        ["name: 'xxxxxxxxxxxxxxxxxxxxxxxx'… is 201 characters long", "at most 200"],
    ),
    "run recipe not utf-8": (
        lambda w, s: ["eval", _damaged_run(w, s, "recipe.yaml", b"seed: \xff\n")],
        ["recipe.yaml: not UTF-8 text (byte 6)"],
    ),
    "run recipe with a repeated key": (
        lambda w, s: ["eval", _damaged_run(w, s, "recipe.yaml", None, append="seed: 1\n")],
        ["recipe.yaml: key 'seed' is given twice in one mapping"],
    ),
    # --------------- outputs: where no command writes, whatever the flags (lrft.guard), and what it cannot write
    "output dir is a file": (
        lambda w, s: ["train", w / "good.yaml", "name=new", f"output.dir={_write(s / 'f', '')}"],
        ["output.dir:", "is a file, so", "cannot be created under it"],
    ),
    "output dir not writable": (
        lambda w, s: ["train", w / "good.yaml", "name=new", "output.dir=/proc/lrft-none"],
        ["output.dir: cannot write in /proc", "give a path in a dir you can write to"],
    ),
    "output dir inside a run": (
        lambda w, s: ["train", w / "good.yaml", "name=new", f"output.dir={w / 'runs' / 'good'}"],
        ["is inside the lrft run dir", "a run dir never goes inside another run"],
    ),
    "predictions into the run": (
        lambda w, s: ["eval", w / "runs" / "good", "--predictions", w / "runs" / "good" / "recipe.yaml"],
        ["--predictions:", "recipe.yaml is inside", "what this command evaluates"],
    ),
    "predictions path is a dir": (
        lambda w, s: ["eval", w / "runs" / "good", "--predictions", _write(s / "d" / "x", "").parent],
        ["--predictions:", "is a dir, not a file"],
    ),
    "init over a run's recipe": (
        lambda w, s: ["init", "-o", w / "runs" / "good" / "recipe.yaml", "--force"],
        ["--output:", "recipe.yaml is inside the lrft run dir", "whatever the flags"],
    ),
    "init output is a dir": (
        lambda w, s: ["init", "-o", _write(s / "d" / "x", "").parent, "--force"],
        ["--output:", "is a dir, not a file"],
    ),
    "merge over its own run": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", w / "runs" / "good", "--force"],
        ["--out:", "runs/good is the run or adapter dir this command reads", "whatever the flags"],
    ),
    "merge into its run": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", w / "runs" / "good" / "adapter", "--force"],
        ["--out:", "adapter is inside", "runs/good, the run or adapter dir this command reads"],
    ),
    "merge over the runs dir": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", w / "runs", "--force"],
        ["--out:", "runs holds", "runs/good, the run or adapter dir this command reads"],
    ),
    "merge over another run": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", w / "runs" / "ta", "--force"],
        ["--out:", "runs/ta is an lrft run dir (recipe.yaml, the run's adapter, checkpoints"],
    ),
    "merge over the current dir": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", ".", "--force"],
        ["--out: . is the current dir", "whatever the flags", "give --out a new path"],
    ),
    "merge over the home dir": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", Path.home(), "--force"],
        ["--out:", "is your home dir"],
    ),
    "merge over the root dir": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", "/", "--force"],
        ["--out: / is the root dir"],
    ),
    "merge over its base model": (
        lambda w, s: ["merge", w / "runs" / "good", "--out", w / "model", "--force"],
        ["--out:", "model is the base model dir of the adapter this command reads"],
    ),
    "export over its own run": (
        lambda w, s: ["merge", w / "runs" / "good", "--format", "peft", "--out", w / "runs" / "good", "--force"],
        ["--out:", "runs/good is the run dir this command reads"],
    ),
    "merge over its PEFT dir": (
        lambda w, s: ["merge", _peft_files(s), "--out", _peft_files(s), "--force"],
        ["--out:", "peft is the run or adapter dir this command reads"],
    ),
    "analyze into the run": (
        lambda w, s: ["analyze", w / "runs" / "good", "--out", w / "runs" / "good" / "checkpoints"],
        ["--out:", "checkpoints is inside", "the run dir this command reads"],
    ),
    "analyze over the other run": (
        lambda w, s: ["analyze", w / "runs" / "good", "--against", w / "runs" / "ta", "--out", w / "runs" / "ta"],
        ["--out:", "the run dir --against names"],
    ),
    "restart with files of yours": (
        lambda w, s: ["train", _own_run(w, s, extra="notes.txt"), "--restart"],
        ["--restart:", "holds notes.txt besides the run's own files", "move those out first"],
    ),
    "restart of the current dir": (
        lambda w, s: [
            "train",
            _recipe_file(s, w, name=s.parent.name, **{"output.dir": str(s.parent.parent)}),
            "--restart",
        ],
        ["--restart: the run dir", "is the current dir", "lrft never deletes it"],
    ),
    "damaged run recipe on resume": (
        lambda w, s: ["train", _own_run(w, s, damage=b"model: [\n")],
        ["recipe.yaml: YAML syntax error", "the run dir's recipe is damaged", "--restart"],
    ),
    # ------------------------ found by fuzzing (tests/test_fuzz.py): data, command lines, damaged run and PEFT dirs
    "max length beyond any tokenizer": (
        lambda w, s: ["train", w / "good.yaml", f"data.max_length={2**64}"],
        ["data.max_length", "less than or equal to 1048576", str(2**64)],
    ),
    "data with one label": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{
                    "data.path": str(
                        _data_dir(s, '{"text": "good film", "label": 1}\n{"text": "a plot", "label": 1}\n')
                    )
                },
            ),
        ],
        ["every example in", "has the label '1'", "two or more labels"],
    ),
    "null text": (
        lambda w, s: [
            "train",
            _recipe_file(
                s,
                w,
                **{"data.path": str(_data_dir(s, '{"text": "good film", "label": 1}\n{"text": null, "label": 0}\n'))},
            ),
        ],
        ["train.jsonl:2: field 'text' is null, not a text or a label"],
    ),
    "eval data with another label": (
        lambda w, s: [
            "eval",
            w / "runs" / "good",
            "--data-path",
            str(_data_dir(s, '{"text": "a", "label": 1}\n', '{"text": "good film", "label": 0.5}\n')),
        ],
        ["dev.jsonl:1: label 0.5 is not one of data.label_names (0, 1)"],
    ),
    "missing option": (
        lambda w, s: ["count-params", "--rank", "4"],
        ["missing option '--method'", "lrft count-params --help"],
    ),
    "not an integer": (
        lambda w, s: ["count-params", "--method", "lora", "--rank", "abc"],
        ["invalid value for '--rank'", "(got 'abc')", "lrft count-params --help"],
    ),
    "unknown command": (
        lambda w, s: ["trian", "r.yaml"],
        ["no such command 'trian'", "Did you mean 'train'", "lrft --help"],
    ),
    "too many labels": (
        lambda w, s: ["count-params", "--method", "lora", "--num-labels", str(2**31)],
        ["invalid value for '--num-labels'", "less than or equal to 100000", "(got '2147483648')"],
    ),
    "path name too long": (
        lambda w, s: ["eval", s / ("x" * 300)],
        ["xxxxxxxx", "a name in it is longer than the file system"],
    ),
    "adapter config emptied to {}": (
        lambda w, s: ["eval", _damaged_run(w, s, "adapter/adapter_config.json", b"{}")],
        ["adapter_config.json: method: missing", "the adapter config is damaged"],
    ),
    "adapter config not an object": (
        lambda w, s: [
            "count-params",
            "--method",
            "lora",
            "--calibrated",
            _damaged_run(w, s, "adapter/adapter_config.json", b"[1, 2]"),
        ],
        ["the adapter config is a JSON list, not an object"],
    ),
    "damaged checkpoint": (
        lambda w, s: ["train", _own_run(w, s, checkpoint=b"{}"), "train.max_steps=3"],
        ["a damaged checkpoint (no valid model, optimizer, scheduler, rng, progress)", "--restart"],
    ),
    "damaged calibration record": (
        lambda w, s: ["analyze", _damaged_run(w, s, "calibration/calibration.json", b"[]", run="ta"), "--out", s / "a"],
        ["calibration.json: the calibration is a JSON list"],
    ),
    "damaged PEFT weights": (
        lambda w, s: [
            "eval",
            _peft_files(s, weights=_unrelated_tensors()),
            "--task",
            "text-classification",
            "--base",
            w / "model",
        ],
        ["adapter_model.safetensors: not the weights of a PEFT LoRA adapter", "no lora_A / lora_B"],
    ),
    "PEFT config without peft_type": (
        lambda w, s: ["merge", _peft_files(s, config="{}"), "--out", s / "m"],
        ["adapter_config.json: no peft_type, so not a PEFT adapter config"],
    ),
}


def _runs_here(scratch: Path) -> Path:
    """`runs`, relative, with a runs/ dir in the working dir: a path by its look, never a hub id."""
    (scratch.parent / "runs").mkdir(exist_ok=True)
    return Path("runs")


def _broken_model(world: Path, scratch: Path, weights: bytes | None) -> Path:
    d = scratch / "broken"
    shutil.copytree(world / "model", d)
    if weights is None:
        (d / "model.safetensors").unlink()
        torch.save({}, d / "pytorch_model.bin")  # what lrft must refuse to unpickle
    else:
        (d / "model.safetensors").write_bytes(weights)
    return d


def _model_without_tokenizer(world: Path, scratch: Path) -> Path:
    d = scratch / "notok"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(world / "model" / name, d / name)
    return d


def _copy_run(world: Path, scratch: Path, name: str = "good") -> Path:
    d = scratch / "run"
    shutil.copytree(world / "runs" / name, d, ignore=shutil.ignore_patterns("checkpoints"))
    return d


def _unfinished_run(world: Path, scratch: Path) -> Path:
    d = _copy_run(world, scratch)
    shutil.rmtree(d / "adapter")
    return d


def _foreign_run(world: Path, scratch: Path) -> Path:
    d = _copy_run(world, scratch)
    shutil.rmtree(d / "adapter")
    shutil.copytree(world / "runs" / "ta" / "adapter", d / "adapter")
    return d


def _corrupt_adapter_run(world: Path, scratch: Path) -> Path:
    d = _copy_run(world, scratch)
    (d / "adapter" / "adapter.safetensors").write_bytes(b"\x00" * 64)
    return d


def _run_on_changed_base(world: Path, scratch: Path) -> Path:
    d = _copy_run(world, scratch)
    shutil.copytree(world / "model", scratch / "other")
    tiny_bert(seed=3).save_pretrained(scratch / "other")
    r = yaml.safe_load((d / "recipe.yaml").read_text())
    r["model"]["name"] = str(scratch / "other")
    (d / "recipe.yaml").write_text(yaml.safe_dump(r))
    return d


def _run_on_renamed_base(world: Path, scratch: Path) -> Path:
    d = _copy_run(world, scratch)
    config = json.loads((d / "adapter" / "adapter_config.json").read_text())
    config["base_model"]["name"] = "FacebookAI/roberta-base"
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    return d


def _damaged_run(
    world: Path, scratch: Path, file: str, content: bytes | None, append: str = "", run: str = "good"
) -> Path:
    """A copy of a finished run with `file` replaced by `content` (or `append` added to it)."""
    d = _copy_run(world, scratch, run)
    (d / file).write_bytes(content if content is not None else (d / file).read_bytes() + append.encode())
    return d


def _own_run(
    world: Path, scratch: Path, extra: str | None = None, damage: bytes | None = None, checkpoint: bytes | None = None
) -> Path:
    """A recipe whose run dir is a scratch copy of the finished run (checkpoints kept); that run gets a
    file of the user's (`extra`), a damaged recipe.yaml or a damaged checkpoint state."""
    d = scratch / "runs" / "own"
    shutil.copytree(world / "runs" / "good", d)
    r = yaml.safe_load((d / "recipe.yaml").read_text())
    r["name"], r["output"]["dir"] = "own", str(scratch / "runs")
    (d / "recipe.yaml").write_text(yaml.safe_dump(r))
    if extra:
        (d / extra).write_text("the user's own notes\n")
    if damage is not None:
        (d / "recipe.yaml").write_bytes(damage)
    if checkpoint is not None:
        next((d / "checkpoints").iterdir()).joinpath("state.json").write_bytes(checkpoint)
    return _write(scratch / "own.yaml", yaml.safe_dump(r))


def _peft_files(scratch: Path, config: str = '{"peft_type": "LORA", "r": 4}', weights: bytes = b"") -> Path:
    """A dir with a PEFT adapter's two files (what they hold is up to the case)."""
    d = scratch / "peft"
    _write(d / "adapter_config.json", config)
    _write(d / "adapter_model.safetensors", weights)
    return d


def _unrelated_tensors() -> bytes:
    from safetensors.torch import save

    return save({"unrelated": torch.zeros(3)})


CAUSAL_CASES = {  # on a tiny Llama
    "label words miscounted",
    "suite test set without answer",
    "unknown harness task",
    "code execution not allowed",
    "gsm8k line without answer",
    "instruction layout",
    "nothing left to learn",
    "pair without rejected",
    "pairs all identical",
    "prompt leaves no room",
    "init_from another method",
    "init_from another base",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(case, world, tmp_path, cli, monkeypatch):
    make_args, expected = CASES[case]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if case in CAUSAL_CASES:
        (scratch / "llama").mkdir()
        save_tiny_llama(scratch / "llama")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(_write(tmp_path / "home" / "notes.txt", "mine").parent))
    args = make_args(world, scratch)
    before_world, before_scratch = snapshot(world), snapshot(scratch)
    code, out, err = cli(*args)
    assert code == 2, f"{case}: exit {code}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"{case}: {err}"
    message = err[err.index("error:") :]
    print(f"{case}: {message.strip()}")  # `pytest tests/test_bad_input.py -rP` lists what every case says
    for words in expected:
        assert words in message, f"{case}: {words!r} not in {message!r}"
    assert "Traceback" not in err and out == ""
    assert snapshot(world) == before_world, f"{case}: the shared runs or inputs changed"
    assert snapshot(scratch) == before_scratch, f"{case}: files were written or changed"
