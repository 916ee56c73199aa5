"""Tasks and their data: where examples come from, how they are tokenized and batched, how they are scored.

Layout: `tasks` (the registry and the example containers), `user_files` (reading users' files), one reader
per family of tasks (`glue`, `text` for users' own labelled texts, `causal` for gsm8k and instruction
data, `suites` for the commonsense and arithmetic suites, `code` for HumanEval, `preference` for pairs), `answers` (what a
generation answers), `metrics`. This module is what the rest of lrft uses: load a task's splits, tokenize them,
batch them, score predictions.
"""

from __future__ import annotations

from pathlib import Path

from lrft.data import causal, code, glue, preference, suites, text, text_to_text
from lrft.data.metrics import compute_metrics
from lrft.data.tasks import (
    DATA_DIR_ENV,
    HUB_SOURCE,
    TASKS,
    PreferenceSplit,
    PromptSplit,
    Split,
    Task,
    TaskData,
    get_task,
    local_source,
)
from lrft.errors import LrftError

__all__ = [
    "DATA_DIR_ENV",
    "HUB_SOURCE",
    "TASKS",
    "PreferenceSplit",
    "PromptSplit",
    "Split",
    "Task",
    "TaskData",
    "collator",
    "compute_metrics",
    "encode",
    "example_length",
    "features",
    "get_task",
    "load_task_data",
    "local_source",
]


def load_task_data(task: Task, data_cfg, need_train: bool = True) -> TaskData:
    """Examples of `task` per the recipe's `data` section, from a local dir or the hub."""
    if task.rendered is not None:  # text-to-text: the classification task's examples, as prompts and words
        return text_to_text.convert(load_task_data(task.rendered, data_cfg, need_train), task, data_cfg)
    if task.suite:
        data = suites.load(task, data_cfg, need_train)
    elif task.executes_code:
        data = code.load(task, data_cfg, need_train)
    elif task.problem == "causal_lm":
        data = causal.load(task, data_cfg, need_train)
    elif task.problem == "preference":
        data = preference.load(task, data_cfg, need_train)
    elif task.name == "text-classification":
        data = text.load(data_cfg, need_train)
    else:
        data = glue.load(task, data_cfg, need_train)
    if not data.source.startswith(HUB_SOURCE):
        data.source = str(Path(data.source).resolve())  # what a run records: eval and merge find it from anywhere
    data.train = data.train.head(data_cfg.max_train_samples)
    data.evals = {k: v.head(data_cfg.max_eval_samples) for k, v in data.evals.items()}
    if need_train and len(data.train) == 0:
        raise LrftError(
            f"data: the training split of {task.name} from {data.source} is empty; "
            "add training examples (or check data.max_train_samples)"
        )
    for suffix, split in data.evals.items():
        if len(split) == 0:
            raise LrftError(
                f"data: the evaluation split {suffix or 'eval'} of {task.name} from {data.source} is empty; "
                "add evaluation examples (or check data.max_eval_samples)"
            )
    return data


def features(
    split,
    tokenizer,
    max_length: int,
    what: str = "examples",
    max_prompt_length: int | None = None,
    encoder_decoder: bool = False,
) -> list[dict]:
    """Tokenized, unpadded features of a split (the collator pads each batch): pairs of a preference
    split (prompts cut to max_prompt_length, default half of max_length), prompt/response examples (for
    an `encoder_decoder`: the prompt its encoder's input, the response its labels), or texts to classify."""
    if isinstance(split, PreferenceSplit):
        prompt_room = max_prompt_length if max_prompt_length is not None else max_length // 2
        return preference.encode_pairs(split, tokenizer, max_length, prompt_room, what)
    if isinstance(split, PromptSplit) and encoder_decoder:
        return causal.encode_seq2seq(split, tokenizer, max_length, what)
    if isinstance(split, PromptSplit):
        return causal.encode_prompts(split, tokenizer, max_length, what)
    return encode(split, tokenizer, max_length)


def example_length(feature: dict) -> int:
    """A feature's tokens in a batch (a pair's: its longer side)."""
    return len(feature["input_ids"]) if "input_ids" in feature else preference.pair_length(feature)


def collator(task: Task, tokenizer):
    """Pads a list of features into a batch of tensors (on the tokenizer's padding side, right for
    training); causal-LM labels are padded with -100 so padding never counts in the loss; pairs become
    one batch of their chosen then their rejected sequences."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task.problem == "preference":
        return preference.PairCollator(tokenizer.pad_token_id)
    if task.problem == "causal_lm":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=causal.IGNORE, return_tensors="pt")
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def encode(split: Split, tokenizer, max_length: int) -> list[dict]:
    """Tokenized classification features per example (unpadded)."""
    if len(split) == 0:
        return []
    enc = tokenizer(split.text, split.pair, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": split.label[i]} for i in range(len(split))]
