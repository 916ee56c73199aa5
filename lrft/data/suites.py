"""`commonsense` and `arithmetic`: the LLM-Adapters evaluation suites, a dir of test sets in its instruction format.

data.path (default `$LRFT_DATA_DIR/<task>`) holds one dir per set with its `test.json` (and perhaps a
`train.json`), and perhaps top-level training files (arithmetic's `math_data.json`). Training is on the
mix of every training file there, ordered by a hash of each example so that data.max_train_samples
takes a mix whatever the file order, or on the one file data.train_file names. Evaluation is on every
set's test file (data.eval_sets: some of them), each reported under its own name (`boolq/accuracy`),
and on their unweighted average (`accuracy`), as the papers' tables report them.

A record has `instruction`, `input` (optional, appended to the instruction), `output` (the response
learned: "the correct answer is X", or a worked solution) and `answer` (the gold one, scored on a
greedy generation; its format, lrft.data.answers, is read from the instruction and the answers).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from lrft import console
from lrft.data.answers import answer_format
from lrft.data.tasks import DATA_DIR_ENV, PromptSplit, TaskData
from lrft.data.user_files import read_records
from lrft.errors import LrftError, did_you_mean


def load(task, data_cfg, need_train: bool) -> TaskData:
    """TaskData of a suite: the training mix (or file) and every selected test set."""
    root = _suite_dir(task, data_cfg)
    sets = {p.parent.name: p for p in sorted(root.glob("*/test.json*")) if p.is_file()}
    if not sets:
        raise LrftError(
            f"data.path: {root} holds no <set>/test.json; a {task.name} dir has one dir per test set "
            f"(e.g. {'boolq/test.json' if task.name == 'commonsense' else 'gsm8k/test.json'})"
        )
    chosen = data_cfg.eval_sets or list(sets)
    unknown = [s for s in chosen if s not in sets]
    if unknown:
        raise LrftError(
            f"data.eval_sets: {unknown[0]!r} is not a test set in {root}{did_you_mean(unknown[0], list(sets))}; "
            f"the sets there: {', '.join(sets)}"
        )
    evals = {name: _split(sets[name], test=True) for name in chosen}
    if need_train and not any(r.strip() for split in evals.values() for r in split.responses):
        raise LrftError(
            f"data.path: no test record in {root} has an 'output'; training tracks the suite's loss on the "
            f"worked answers of its test sets, so give some of them one (scoring needs only 'answer')"
        )
    train = _train_mix(root, data_cfg) if need_train else PromptSplit([], [], [])
    return TaskData(task, train, evals, None, str(root))


def _suite_dir(task, data_cfg) -> Path:
    if data_cfg.path:
        root, where = Path(data_cfg.path), "data.path"
    elif os.environ.get(DATA_DIR_ENV):
        root, where = Path(os.environ[DATA_DIR_ENV]) / task.name, DATA_DIR_ENV
    else:
        raise LrftError(
            f"data.path: {task.name} reads a local dir of test sets (the hub has no copy of the suite); set "
            f"data.path to it, or {DATA_DIR_ENV} to a dir holding {task.name}/"
        )
    if not root.is_dir():
        raise LrftError(f"{where}: no directory at {root}; it should hold one dir per test set (<set>/test.json)")
    return root


def _train_mix(root: Path, data_cfg) -> PromptSplit:
    if data_cfg.train_file:
        files = [Path(data_cfg.train_file)]
        if not files[0].is_file():
            raise LrftError(f"data.train_file: no file at {files[0]}; name a JSON list (or jsonl) of training records")
    else:
        files = sorted(p for p in [*root.glob("*/train.json*"), *root.glob("*.json*")] if p.is_file())
        if not files:
            raise LrftError(
                f"data.path: {root} has no training file (<set>/train.json or a top-level .json); add one, "
                f"or name one with data.train_file"
            )
    records = [r for f in files for r in _records(f, test=False)]
    records.sort(key=lambda r: hashlib.sha256(repr((r.prompt, r.output)).encode()).digest())
    return PromptSplit([r.prompt for r in records], [r.output for r in records], [r.gold for r in records])


def _split(path: Path, test: bool) -> PromptSplit:
    records = _records(path, test)
    golds = [r.gold for r in records]
    formats = [answer_format(r.instruction, golds) for r in records]
    for r, fmt in zip(records, formats):
        if fmt.kind != "numbers" and r.gold is not None and r.gold.lower() not in {c.lower() for c in fmt.choices}:
            raise LrftError(
                f"{path}:{r.line_no}: answer {r.gold!r} is not one of the instruction's answer format "
                f"({'/'.join(fmt.choices)}); fix the record's answer or its 'Answer format:' line"
            )
    return PromptSplit([r.prompt for r in records], [r.output for r in records], golds, formats)


class _Record(NamedTuple):
    line_no: int
    instruction: str
    prompt: list[dict]
    output: str
    gold: str | None


def _records(path: Path, test: bool) -> list[_Record]:
    """The file's records; training records without an output are left out."""
    out, empty = [], 0
    for line_no, rec, _ in read_records(path):
        instruction, answer = rec.get("instruction"), rec.get("answer")
        if not isinstance(instruction, str) or not instruction.strip():
            raise LrftError(f"{path}:{line_no}: no text field 'instruction'; every record needs one")
        if test and (answer is None or isinstance(answer, (list, dict)) or not str(answer).strip()):
            raise LrftError(
                f"{path}:{line_no}: no 'answer' (fields: {', '.join(rec)}); every test record needs the gold "
                f"answer it is scored against"
            )
        output = rec.get("output") if isinstance(rec.get("output"), str) else ""
        if not test and not output.strip():
            empty += 1
            continue
        extra = rec.get("input") or ""
        prompt = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")}]
        out.append(_Record(line_no, instruction, prompt, output, None if answer is None else str(answer).strip()))
    if empty:
        console.warn(f"{path}: {empty} training records have no 'output' to learn and were left out")
    if not out:
        raise LrftError(f"{path}: no records in the file")
    return out
