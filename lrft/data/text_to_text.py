"""`data.format: text-to-text`: a classification (or regression) task as prompts and answer words, for a
causal LM or an encoder-decoder, scored by rank classification.

An example becomes a prompt rendered from the task's template, T5's way ("mrpc sentence1: … sentence2:
…"; `data.prompt` sets another, with {text} and {pair}), and its label a word: the task's label names
(equivalent / not_equivalent, acceptable / unacceptable, …) or `data.label_words`. STS-B's score is
written as a number rounded to the nearest 0.2, as T5 was trained ("3.8"). Training learns the answer
word (its tokens only, as any response); evaluation scores every candidate word's summed log-likelihood
given the prompt and takes the best one (never an answer outside the label set), then the task's own
metrics (accuracy, F1, Matthews correlation; Pearson and Spearman of the chosen numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from lrft.data.tasks import PromptSplit, Split, Task, TaskData, get_task
from lrft.errors import LrftError

FORMATS = ("classifier", "text-to-text")
STSB_VALUES = tuple(f"{i / 5:.1f}" for i in range(26))  # 0.0, 0.2, …, 5.0


@dataclass
class ChoiceSplit(PromptSplit):
    """Text-to-text examples: prompts and answer words, the candidate words, and each example's gold
    class (its index among the candidates, or a regression's value)."""

    choices: tuple[str, ...] = ()
    gold: list = field(default_factory=list)
    PER_SPLIT: ClassVar[tuple[str, ...]] = ("choices",)


def task_for(name: str, fmt: str = "classifier") -> Task:
    """The task a recipe's data.task and data.format name: as registered, or rendered as text."""
    task = get_task(name)
    return text_to_text(task) if fmt == "text-to-text" else task


def text_to_text(task: Task) -> Task:
    if task.problem not in ("classification", "regression"):
        raise LrftError(
            f"data.format: text-to-text renders a classification or regression task, and {task.name} is "
            f"{task.problem}; leave data.format out (it is text already)"
        )
    return replace(task, problem="causal_lm", generate=False, rendered=task, max_length=max(task.max_length, 256))


def convert(data: TaskData, task: Task, data_cfg) -> TaskData:
    """The classification data's splits as ChoiceSplits of `task` (text_to_text of data.task)."""
    source = task.rendered
    words = _label_words(source, data.label_names, data_cfg.label_words)
    has_pair = any(s.pair is not None for s in (data.train, *data.evals.values()))
    template = data_cfg.prompt or default_prompt(source, has_pair)
    splits = {k: _choices(v, template, words, source) for k, v in data.evals.items()}
    train = _choices(data.train, template, words, source)
    return TaskData(task, train, splits, data.label_names, data.source)


def default_prompt(task: Task, has_pair: bool) -> str:
    """T5's rendering: the task's short name, then each text under its column's name."""
    short = task.name.split("/")[-1]
    cols = task.hub_columns
    first, second = (cols.text[0], cols.pair[0] if cols.pair else None) if cols else ("text", "text_pair")
    return f"{short} {first}: {{text}}" + (f" {second}: {{pair}}" if has_pair and second else "")


def _label_words(task: Task, label_names, given) -> tuple[str, ...]:
    if task.problem == "regression":
        return STSB_VALUES
    labels = tuple(label_names or task.label_names or ())
    words = tuple(given or labels)
    if len(words) != len(labels) or len(set(words)) != len(words):
        raise LrftError(
            f"data.label_words: {list(words)} are not {len(labels)} distinct words, one per label "
            f"({', '.join(labels)}); give one word for each, in label order"
        )
    return words


def _choices(split: Split, template: str, words: tuple[str, ...], task: Task) -> ChoiceSplit:
    pairs = split.pair or [""] * len(split)
    try:
        texts = [template.format(text=t, pair=p) for t, p in zip(split.text, pairs)]
    except (KeyError, IndexError, ValueError) as e:
        raise LrftError(
            f"data.prompt: {template!r} is not a template of {{text}} and {{pair}} ({e}); write e.g. "
            f"'mrpc sentence1: {{text}} sentence2: {{pair}}'"
        ) from None
    if task.problem == "regression":
        gold = [float(x) for x in split.label]
        answers = [f"{round(float(x) * 5) / 5:.1f}" for x in split.label]
    else:
        gold = [int(x) for x in split.label]
        answers = [words[int(x)] for x in split.label]
    prompts = [[{"role": "user", "content": t}] for t in texts]
    return ChoiceSplit(prompts, answers, list(answers), choices=words, gold=gold)
