"""Tasks: where their examples come from, how they are tokenized and batched, how they are scored.

A task is read from `data.path`, else from `$LRFT_DATA_DIR/glue/<task>/` (the layout of GLUE's own
download script), else from the Hugging Face hub (`nyu-mll/glue`). GLUE tsv files are read the way
GLUE's readers do, with quoting disabled; files in the column layout of the hub export (they have an
`idx` column, as ../shared/data/glue/rte) were written by pandas with standard CSV quoting.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrft.errors import LrftError, unknown_choice

DATA_DIR_ENV = "LRFT_DATA_DIR"


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
    problem: str  # "classification", "regression" or "causal_lm"
    label_names: tuple[str, ...] | None  # None: regression, or learned from the data
    metrics: tuple[str, ...]
    main_metric: str  # what best-checkpoint tracking maximises
    hub: tuple[str, str] | None = None  # (dataset id, config name)
    hub_columns: Columns | None = None
    local_columns: Columns | None = None
    headerless: tuple[int, int | None, int] | None = None  # (text, pair, label) positions (CoLA)
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit("", "dev", "validation"),)
    generate: bool = False  # scored on greedy generations (exact match) besides the response loss

    @property
    def num_labels(self) -> int:
        return 1 if self.problem == "regression" else len(self.label_names or ())


def _glue(name, problem, labels, metrics, main, hub_cols, local_cols, **kw) -> Task:
    return Task(f"glue/{name}", problem, labels, metrics, main, ("nyu-mll/glue", name), hub_cols, local_cols, **kw)


ENTAIL2 = ("entailment", "not_entailment")
TASKS: dict[str, Task] = {t.name: t for t in [
    _glue("cola", "classification", ("unacceptable", "acceptable"), ("matthews_correlation", "accuracy"),
          "matthews_correlation", Columns(("sentence",)), Columns(("sentence",)), headerless=(3, None, 1)),
    _glue("sst2", "classification", ("negative", "positive"), ("accuracy",), "accuracy",
          Columns(("sentence",)), Columns(("sentence",))),
    _glue("mrpc", "classification", ("not_equivalent", "equivalent"), ("accuracy", "f1"), "accuracy",
          Columns(("sentence1",), ("sentence2",)), Columns(("#1 String", "sentence1"), ("#2 String", "sentence2"), ("Quality", "label"))),
    _glue("stsb", "regression", None, ("pearson", "spearman"), "pearson",
          Columns(("sentence1",), ("sentence2",)), Columns(("sentence1",), ("sentence2",), ("score", "label"))),
    _glue("qqp", "classification", ("not_duplicate", "duplicate"), ("accuracy", "f1"), "accuracy",
          Columns(("question1",), ("question2",)), Columns(("question1",), ("question2",), ("is_duplicate", "label"))),
    _glue("mnli", "classification", ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
          Columns(("premise",), ("hypothesis",)), Columns(("sentence1", "premise"), ("sentence2", "hypothesis"), ("gold_label", "label")),
          eval_splits=(EvalSplit("", "dev_matched", "validation_matched"), EvalSplit("_mm", "dev_mismatched", "validation_mismatched"))),
    _glue("qnli", "classification", ENTAIL2, ("accuracy",), "accuracy",
          Columns(("question",), ("sentence",)), Columns(("question",), ("sentence",))),
    _glue("rte", "classification", ENTAIL2, ("accuracy",), "accuracy",
          Columns(("sentence1",), ("sentence2",)), Columns(("sentence1",), ("sentence2",))),
    _glue("wnli", "classification", ("not_entailment", "entailment"), ("accuracy",), "accuracy",
          Columns(("sentence1",), ("sentence2",)), Columns(("sentence1",), ("sentence2",))),
    # Users' own data: data.path is a dir with train.{jsonl,json,csv,tsv} and dev (or validation) files.
    Task("text-classification", "classification", None, ("accuracy", "f1_macro"), "accuracy"),
    # Causal LMs (lrft.lm_data): the response loss is tracked during training, generations are scored at the end.
    Task("gsm8k", "causal_lm", None, ("exact_match", "perplexity"), "loss", eval_splits=(EvalSplit("", "test", "test"),),
         generate=True),
    Task("instruction", "causal_lm", None, ("perplexity",), "loss"),
]}


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
class TaskData:
    task: Task
    train: Split
    evals: dict[str, Split]  # metric-name suffix → split
    label_names: list[str] | None
    source: str  # where the examples came from, for logs and the summary
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- loading

def load_task_data(task: Task, data_cfg, need_train: bool = True) -> TaskData:
    """Examples of `task` per the recipe's `data` section, from a local dir or the hub."""
    if task.problem == "causal_lm":
        from lrft import lm_data

        data = lm_data.load(task, data_cfg, need_train)
    elif task.name == "text-classification":
        if not data_cfg.path:
            raise LrftError("data.path: the text-classification task reads your files; set data.path to a "
                            "dir with train.jsonl (or .json/.csv/.tsv) and dev.jsonl")
        data = _load_text_classification(Path(data_cfg.path), data_cfg, need_train)
    else:
        local = _local_task_dir(task, data_cfg)
        data = _load_glue_local(task, local, need_train) if local else _load_hub(task, need_train)
    data.train = data.train.head(data_cfg.max_train_samples)
    data.evals = {k: v.head(data_cfg.max_eval_samples) for k, v in data.evals.items()}
    if need_train and len(data.train) == 0:
        raise LrftError(f"data: the training split of {task.name} from {data.source} is empty; "
                        "add training examples (or check data.max_train_samples)")
    for suffix, split in data.evals.items():
        if len(split) == 0:
            raise LrftError(f"data: the evaluation split{suffix or ''} of {task.name} from {data.source} is empty; "
                            "add evaluation examples (or check data.max_eval_samples)")
    return data


def _local_task_dir(task: Task, data_cfg) -> Path | None:
    if data_cfg.path:
        path = Path(data_cfg.path)
        if not path.is_dir():
            raise LrftError(f"data.path: no directory at {path}; point it at a dir holding {task.name}'s "
                            f"{_expected_files(task)}")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env) / task.name
        if not path.is_dir():
            raise LrftError(f"{DATA_DIR_ENV}: no directory {path} (expected {_expected_files(task)} there); "
                            f"add the files or unset {DATA_DIR_ENV} to download {task.name} from the hub")
        return path
    return None


def _expected_files(task: Task) -> str:
    return ", ".join(["train.tsv"] + [f"{s.local_file}.tsv" for s in task.eval_splits])


def _load_glue_local(task: Task, path: Path, need_train: bool) -> TaskData:
    files = {"train": path / "train.tsv"} if need_train else {}
    files.update({s.suffix: path / f"{s.local_file}.tsv" for s in task.eval_splits})
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise LrftError(f"data: missing {', '.join(missing)}; a local {task.name} dir needs {_expected_files(task)}")
    splits = {key: _read_glue_tsv(task, f) for key, f in files.items()}
    train = splits.pop("train", Split([], None, []))
    return TaskData(task, train, splits, list(task.label_names) if task.label_names else None, str(path))


def _read_glue_tsv(task: Task, path: Path) -> Split:
    header_line = _read_text(path).split("\n", 1)[0]
    header = header_line.rstrip("\r").split("\t")
    # Files in the hub's column layout were written by pandas (standard quoting); GLUE's own files
    # hold literal quote characters and are read with quoting disabled, as GLUE's readers do.
    quoting = csv.QUOTE_MINIMAL if "idx" in header else csv.QUOTE_NONE
    headerless = task.headerless is not None and not _find_column(header, task.local_columns.text)
    if headerless:
        t_i, p_i, l_i = task.headerless
        n_fields = len(header)
    else:
        cols = task.local_columns
        t_i = _require_column(header, cols.text, path)
        p_i = _require_column(header, cols.pair, path) if cols.pair else None
        l_i = _require_column(header, cols.label, path)
        n_fields = len(header)
    text, pair, label = [], [] if p_i is not None else None, []
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=quoting)
        for line_no, row in enumerate(rows, start=1):
            if line_no == 1 and not headerless:
                continue
            if not row:
                continue
            if len(row) != n_fields:
                raise LrftError(f"{path}:{line_no}: expected {n_fields} tab-separated fields, found {len(row)}; "
                                f"is this {task.name}'s GLUE tsv?")
            text.append(row[t_i])
            if pair is not None:
                pair.append(row[p_i])
            label.append(_parse_label(task, row[l_i], path, line_no))
    return Split(text, pair, label)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LrftError(f"{path}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None


def _find_column(header: list[str], candidates: tuple[str, ...]) -> int | None:
    for c in candidates:
        if c in header:
            return header.index(c)
    return None


def _require_column(header: list[str], candidates: tuple[str, ...], path: Path) -> int:
    i = _find_column(header, candidates)
    if i is None:
        raise LrftError(f"{path}: no column {' or '.join(repr(c) for c in candidates)} in the header "
                        f"({', '.join(header)}); is this the task's own file, with its header line?")
    return i


def _parse_label(task: Task, raw: str, path: Path, line_no: int):
    raw = raw.strip()
    if task.problem == "regression":
        try:
            return float(raw)
        except ValueError:
            raise LrftError(f"{path}:{line_no}: label {raw!r} is not a number ({task.name} is a regression task)") from None
    names = task.label_names
    if raw.lstrip("-").isdigit() and 0 <= int(raw) < len(names):
        return int(raw)
    if raw in names:
        return names.index(raw)
    raise LrftError(f"{path}:{line_no}: label {raw!r} is not one of 0..{len(names) - 1} or {', '.join(names)}")


def _load_hub(task: Task, need_train: bool) -> TaskData:
    import datasets

    hub_id, config = task.hub
    try:
        ds = datasets.load_dataset(hub_id, config)
    except Exception as e:  # offline, unknown dataset, ...: say what to do instead
        raise LrftError(f"data: could not load {task.name} from the hub ({hub_id}, {config}): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}; set {DATA_DIR_ENV} to a dir holding "
                        f"glue/<task>/train.tsv and dev.tsv, or data.path") from None
    cols = task.hub_columns

    def split(name: str) -> Split:
        d = ds[name]
        return Split(list(d[cols.text[0]]), list(d[cols.pair[0]]) if cols.pair else None, list(d[cols.label[0]]))

    train = split("train") if need_train else Split([], None, [])
    evals = {s.suffix: split(s.hub_split) for s in task.eval_splits}
    return TaskData(task, train, evals, list(task.label_names) if task.label_names else None, f"hub:{hub_id}/{config}")


# Users' own text classification data --------------------------------------------------------------

_TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def _find_split_file(path: Path, stems: tuple[str, ...], suffixes: tuple[str, ...] = _TEXT_SUFFIXES) -> Path | None:
    for stem in stems:
        for suffix in suffixes:
            if (path / f"{stem}{suffix}").is_file():
                return path / f"{stem}{suffix}"
    return None


def _load_text_classification(path: Path, data_cfg, need_train: bool) -> TaskData:
    if not path.is_dir():
        raise LrftError(f"data.path: no directory at {path}; it should hold train.jsonl and dev.jsonl "
                        f"(or .json/.csv/.tsv)")
    train_file = _find_split_file(path, ("train",))
    eval_file = _find_split_file(path, ("dev", "validation", "test"))
    if (need_train and train_file is None) or eval_file is None:
        raise LrftError(f"data.path: {path} needs train and dev (or validation) files, as .jsonl/.json/.csv/.tsv")
    rows = {"train": _read_records(train_file)} if need_train else {}
    rows[""] = _read_records(eval_file)
    pair_col = data_cfg.text_pair_column
    if pair_col is None and rows[""] and "text_pair" in rows[""][0][1]:
        pair_col = "text_pair"
    raw_labels = {k: [_field(r, data_cfg.label_column, f, n) for n, r, f in v] for k, v in rows.items()}
    label_names = data_cfg.label_names or sorted({str(x) for v in raw_labels.values() for x in v}, key=_natural)
    index = {name: i for i, name in enumerate(label_names)}
    splits = {}
    for key, recs in rows.items():
        labels = []
        for (n, _, f), raw in zip(recs, raw_labels[key]):
            if str(raw) not in index:
                raise LrftError(f"{f}:{n}: label {raw!r} is not one of data.label_names ({', '.join(label_names)})")
            labels.append(index[str(raw)])
        texts = [str(_field(r, data_cfg.text_column, f, n)) for n, r, f in recs]
        pairs = [str(_field(r, pair_col, f, n)) for n, r, f in recs] if pair_col else None
        splits[key] = Split(texts, pairs, labels)
    train = splits.pop("train", Split([], None, []))
    return TaskData(get_task("text-classification"), train, splits, label_names, str(path))


def _natural(label: str):
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def _field(record: dict, column: str, path: Path, line_no: int):
    if column not in record:
        raise LrftError(f"{path}:{line_no}: no field '{column}' (fields: {', '.join(record)}); "
                        f"set data.text_column / data.text_pair_column / data.label_column")
    return record[column]


def _read_records(path: Path) -> list[tuple[int, dict, Path]]:
    """(line number, record, file) for each example of a jsonl/json/csv/tsv file."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LrftError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise LrftError(f"{path}:{n}: expected a JSON object per line")
            out.append((n, rec, path))
        return out
    if path.suffix == ".json":
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise LrftError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
            raise LrftError(f"{path}: expected a JSON list of objects")
        return [(i + 1, r, path) for i, r in enumerate(recs)]
    delimiter = "\t" if path.suffix == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    return [(n + 2, dict(r), path) for n, r in enumerate(reader)]


# ----------------------------------------------------------------------------------- tokenization

def features(task: Task, split, tokenizer, max_length: int, what: str = "examples") -> list[dict]:
    """Tokenized, unpadded features of a split for the task's model (the collator pads each batch)."""
    if task.problem == "causal_lm":
        from lrft.lm_data import encode_prompts

        return encode_prompts(split, tokenizer, max_length, what)
    return encode(split, tokenizer, max_length)


def collator(task: Task, tokenizer):
    """Pads a list of features into a batch of tensors."""
    if task.problem == "causal_lm":
        from lrft.lm_data import CausalCollator

        return CausalCollator(tokenizer.pad_token_id)
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def encode(split: Split, tokenizer, max_length: int) -> list[dict]:
    """Tokenized classification features per example (unpadded)."""
    if len(split) == 0:
        return []
    enc = tokenizer(split.text, split.pair, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": split.label[i]} for i in range(len(split))]


# ---------------------------------------------------------------------------------------- metrics

def compute_metrics(task: Task, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's official metrics from model outputs and gold labels."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task.problem == "regression":
        preds = logits.reshape(len(logits), -1)[:, 0]
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearman": float(spearmanr(preds, labels)[0])}
    preds = logits.argmax(-1)
    fns = {
        "accuracy": lambda: accuracy_score(labels, preds),
        "f1": lambda: f1_score(labels, preds),
        "f1_macro": lambda: f1_score(labels, preds, average="macro"),
        "matthews_correlation": lambda: matthews_corrcoef(labels, preds),
    }
    return {name: float(fns[name]()) for name in task.metrics}
