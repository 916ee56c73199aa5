"""The task registry: what each task is (problem, labels, metrics, splits) and the containers of its examples.

A task names where its examples come from (a local GLUE-layout dir, users' own files, the hub), what
its model predicts (classification, regression, a causal LM's response) and how it is scored. Adding
a task is one entry in TASKS (and, for a new file layout, a reader in this package).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from lrft.data.answers import NUMBERS, AnswerFormat
from lrft.errors import unknown_choice

DATA_DIR_ENV = "LRFT_DATA_DIR"
HUB_SOURCE = "hub:"  # TaskData.source of examples from the hub: "hub:<dataset id>/<config>"


@dataclass(frozen=True)
class EvalSplit:
    suffix: str  # appended to metric names: "" for the main split, "_mm" for MNLI mismatched
    local_file: str  # file stem in a local task dir
    hub_split: str


@dataclass(frozen=True)
class Columns:
    """Candidate column names, first match wins, for the two texts and the label."""

    text: tuple[str, ...]
    pair: tuple[str, ...] = ()
    label: tuple[str, ...] = ("label",)


@dataclass(frozen=True)
class Task:
    name: str
    problem: str  # "classification", "regression", "causal_lm" or "preference" (pairs for a causal LM)
    label_names: tuple[str, ...] | None  # None: regression, or learned from the data
    metrics: tuple[str, ...]
    main_metric: str  # what best-checkpoint tracking maximises
    hub: tuple[str, str] | None = None  # (dataset id, config name)
    hub_columns: Columns | None = None
    local_columns: Columns | None = None
    headerless: tuple[int, int | None, int] | None = None  # (text, pair, label) positions (CoLA)
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit("", "dev", "validation"),)
    generate: bool = False  # scored on greedy generations (exact match) besides the response loss
    generation_metric: str = "exact_match"  # the name of the share of generations answering correctly
    # A suite (lrft.data.suites): its evaluation splits are the test sets found in its dir, each reported
    # under its name ("boolq/accuracy"), with the unweighted mean of their accuracies and the pooled loss
    suite: bool = False
    executes_code: bool = False  # scored by running the generated programs (lrft.sandbox), only if allowed
    max_new_tokens: int = 256  # tokens generated per answer when nothing says otherwise (`lrft eval` of a model)
    # data.format text-to-text (lrft.data.text_to_text): the classification task this one renders as
    # prompts and answer words, scored by rank classification with that task's metrics
    rendered: Task | None = None
    # A regex a completion matches once its answer is written (GSM8K: the `#### N` line): generation of
    # that sequence stops there instead of running on to EOS or max_new_tokens
    answer_written: str | None = None
    max_length: int = 128  # tokens per example when nothing says otherwise (`lrft eval` of a plain model)

    @property
    def causal(self) -> bool:
        """Whether the task's model is a causal LM (causal_lm and preference tasks)."""
        return self.problem in ("causal_lm", "preference")

    def reported_metrics(self) -> list[str]:
        """The metric names every evaluation of the task reports, whatever its data (a suite's per-set
        names depend on the sets found, so only their aggregates are listed)."""
        splits = [""] if self.suite else [s.suffix for s in self.eval_splits]
        return [metric_name(m, s) for m in (*self.metrics, "loss") for s in splits]

    @property
    def num_labels(self) -> int:
        return 1 if self.problem == "regression" else len(self.label_names or ())


def metric_name(metric: str, split: str) -> str:
    """A split's metric as reported: as is for the main split, suffixed for a task's extra split
    ("accuracy_mm"), under the set's name for a suite's test set ("boolq/accuracy")."""
    return f"{metric}{split}" if not split or split.startswith("_") else f"{split}/{metric}"


def split_label(split: str) -> str:
    """How messages name an evaluation split: "eval", "eval_mm", or a suite's set ("boolq")."""
    return f"eval{split}" if not split or split.startswith("_") else split


def _glue(name, problem, labels, metrics, main, hub_cols, local_cols, **kw) -> Task:
    return Task(f"glue/{name}", problem, labels, metrics, main, ("nyu-mll/glue", name), hub_cols, local_cols, **kw)


ENTAIL2 = ("entailment", "not_entailment")
PREFERENCE_METRICS = (
    "rewards/accuracy",
    "rewards/margin",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "logps/accuracy",
)
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _glue(
            "cola",
            "classification",
            ("unacceptable", "acceptable"),
            ("matthews_correlation", "accuracy"),
            "matthews_correlation",
            Columns(("sentence",)),
            Columns(("sentence",)),
            headerless=(3, None, 1),
        ),
        _glue(
            "sst2",
            "classification",
            ("negative", "positive"),
            ("accuracy",),
            "accuracy",
            Columns(("sentence",)),
            Columns(("sentence",)),
        ),
        _glue(
            "mrpc",
            "classification",
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            "accuracy",
            Columns(("sentence1",), ("sentence2",)),
            Columns(("#1 String", "sentence1"), ("#2 String", "sentence2"), ("Quality", "label")),
        ),
        _glue(
            "stsb",
            "regression",
            None,
            ("pearson", "spearman"),
            "pearson",
            Columns(("sentence1",), ("sentence2",)),
            Columns(("sentence1",), ("sentence2",), ("score", "label")),
        ),
        _glue(
            "qqp",
            "classification",
            ("not_duplicate", "duplicate"),
            ("accuracy", "f1"),
            "accuracy",
            Columns(("question1",), ("question2",)),
            Columns(("question1",), ("question2",), ("is_duplicate", "label")),
        ),
        _glue(
            "mnli",
            "classification",
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            Columns(("premise",), ("hypothesis",)),
            Columns(("sentence1", "premise"), ("sentence2", "hypothesis"), ("gold_label", "label")),
            eval_splits=(
                EvalSplit("", "dev_matched", "validation_matched"),
                EvalSplit("_mm", "dev_mismatched", "validation_mismatched"),
            ),
        ),
        _glue(
            "qnli",
            "classification",
            ENTAIL2,
            ("accuracy",),
            "accuracy",
            Columns(("question",), ("sentence",)),
            Columns(("question",), ("sentence",)),
        ),
        _glue(
            "rte",
            "classification",
            ENTAIL2,
            ("accuracy",),
            "accuracy",
            Columns(("sentence1",), ("sentence2",)),
            Columns(("sentence1",), ("sentence2",)),
        ),
        _glue(
            "wnli",
            "classification",
            ("not_entailment", "entailment"),
            ("accuracy",),
            "accuracy",
            Columns(("sentence1",), ("sentence2",)),
            Columns(("sentence1",), ("sentence2",)),
        ),
        # Users' own data: data.path is a dir with train.{jsonl,json,csv,tsv} and dev (or validation) files.
        Task("text-classification", "classification", None, ("accuracy", "f1_macro"), "accuracy"),
        # Causal LMs (lrft.data.causal): the response loss is tracked during training, generations are scored at the end.
        # max_length: that of the shipped recipes (recipes/gsm8k_*.yaml, instruction_alpaca.yaml), so a base
        # model's `lrft eval` compares with a trained run's
        Task(
            "gsm8k",
            "causal_lm",
            None,
            ("exact_match", "perplexity"),
            "loss",
            eval_splits=(EvalSplit("", "test", "test"),),
            generate=True,
            answer_written=r"####[^\n]*\d[^\n]*\n",
            max_length=320,
        ),
        Task("instruction", "causal_lm", None, ("perplexity",), "loss", max_length=512),
        # The LLM-Adapters suites (lrft.data.suites): train on the mix, score each test set's greedy answers
        *(
            Task(
                name,
                "causal_lm",
                None,
                ("accuracy", "perplexity"),
                "loss",
                eval_splits=(),
                generate=True,
                generation_metric="accuracy",
                suite=True,
                max_length=length,
                max_new_tokens=new_tokens,
            )
            # the answer of a commonsense set is a word after "the correct answer is"; math's a worked solution
            for name, length, new_tokens in (("commonsense", 256, 32), ("arithmetic", 384, 256))
        ),
        # Code (lrft.data.code): greedy programs run against each problem's tests in lrft.sandbox
        Task(
            "humaneval",
            "causal_lm",
            None,
            ("pass@1", "perplexity"),
            "loss",
            eval_splits=(EvalSplit("", "test", "test"),),
            generate=True,
            generation_metric="pass@1",
            executes_code=True,
            max_length=1024,
            max_new_tokens=384,
        ),
        # Preference pairs (lrft.data.preference) for the DPO family (lrft.preference): scored by the
        # implicit rewards of the policy against its reference on held-out pairs.
        Task(
            "preference",
            "preference",
            None,
            PREFERENCE_METRICS,
            "rewards/accuracy",
            eval_splits=(EvalSplit("", "test", "test"),),
            max_length=512,
        ),
    ]
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise unknown_choice("data.task", name, TASKS) from None


@dataclass
class Split:
    """Column-oriented examples: the texts, the optional second texts, the labels."""

    text: list[str]
    pair: list[str] | None
    label: list[Any]

    def __len__(self) -> int:
        return len(self.text)

    def head(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        return Split(self.text[:n], None if self.pair is None else self.pair[:n], self.label[:n])


@dataclass
class PromptSplit:
    """Causal-LM examples: the prompt as chat messages, the response to learn, the gold answer if any
    and its format (lrft.data.answers; None: numbers, as GSM8K's), and what the answer is read with."""

    prompts: list[list[dict]]
    responses: list[str]
    answers: list[str | None]
    formats: list[AnswerFormat] | None = None
    contexts: list[str] | None = None  # what an answer is read with, not shown to the model (HumanEval's code)

    def __len__(self) -> int:
        return len(self.prompts)

    PER_SPLIT: ClassVar[tuple[str, ...]] = ()  # fields holding one value for the whole split, not one per example

    def head(self, n: int | None) -> PromptSplit:
        return self if n is None or n >= len(self) else self.pick(range(n))

    def with_responses(self) -> PromptSplit:
        """The examples that have a response to score the loss of (a test set may give answers only)."""
        keep = [i for i, r in enumerate(self.responses) if r.strip()]
        return self if len(keep) == len(self) else self.pick(keep)

    def pick(self, keep) -> PromptSplit:
        """The split of the examples at indices `keep` (a subclass's own type and per-split fields kept)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(
            self,
            **{k: v if v is None or k in self.PER_SPLIT else [v[i] for i in keep] for k, v in values.items()},
        )

    def answer_format(self, i: int) -> AnswerFormat:
        return NUMBERS if self.formats is None else self.formats[i]


@dataclass
class PreferenceSplit:
    """Preference pairs: the shared prompt as chat messages, the preferred and the dispreferred response."""

    prompts: list[list[dict]]
    chosen: list[str]
    rejected: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int | None) -> PreferenceSplit:
        if n is None or n >= len(self):
            return self
        return PreferenceSplit(self.prompts[:n], self.chosen[:n], self.rejected[:n])

    def chosen_examples(self) -> PromptSplit:
        """The pairs as causal-LM examples of their chosen responses (calibration, merge parity)."""
        return PromptSplit(self.prompts, self.chosen, [None] * len(self))


AnySplit = Split | PromptSplit | PreferenceSplit


@dataclass
class TaskData:
    task: Task
    train: AnySplit
    evals: dict[str, AnySplit]  # metric-name suffix → split
    label_names: list[str] | None
    source: str  # where the examples came from: an absolute dir (a file of pairs), or HUB_SOURCE + the dataset; runs record it


def local_source(source: str | None) -> str | None:
    """The dir (or, for preference pairs, the file) a recorded data source names, if it is still there
    (None for the hub)."""
    if not source or source.startswith(HUB_SOURCE):
        return None
    return source if Path(source).exists() else None
