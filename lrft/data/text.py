"""`text-classification`: users' own labelled texts (jsonl / json / csv / tsv files in data.path).

data.path holds train and dev (or validation, or test) files; the columns of the text, the optional
second text and the label are set in the recipe. Label names are data.label_names, else the labels
found in the files, sorted naturally (2 before 10).
"""

from __future__ import annotations

from pathlib import Path

from lrft.data.tasks import Split, TaskData, get_task
from lrft.data.user_files import find_split_file, read_records, scalar_field
from lrft.errors import LrftError


def load(data_cfg, need_train: bool) -> TaskData:
    if not data_cfg.path:
        raise LrftError(
            "data.path: the text-classification task reads your files; set data.path to a "
            "dir with train.jsonl (or .json/.csv/.tsv) and dev.jsonl"
        )
    return _load(Path(data_cfg.path), data_cfg, need_train)


def _load(path: Path, data_cfg, need_train: bool) -> TaskData:
    if not path.is_dir():
        raise LrftError(
            f"data.path: no directory at {path}; it should hold train.jsonl and dev.jsonl (or .json/.csv/.tsv)"
        )
    train_file = find_split_file(path, ("train",))
    eval_file = find_split_file(path, ("dev", "validation", "test"))
    if (need_train and train_file is None) or eval_file is None:
        raise LrftError(f"data.path: {path} needs train and dev (or validation) files, as .jsonl/.json/.csv/.tsv")
    rows = {"train": read_records(train_file)} if need_train else {}
    rows[""] = read_records(eval_file)
    pair_col = data_cfg.text_pair_column
    if pair_col is None and rows[""] and "text_pair" in rows[""][0][1]:
        pair_col = "text_pair"
    raw_labels = {k: [scalar_field(r, data_cfg.label_column, f, n) for n, r, f in v] for k, v in rows.items()}
    label_names = data_cfg.label_names or sorted({str(x) for v in raw_labels.values() for x in v}, key=_natural)
    index = {name: i for i, name in enumerate(label_names)}
    splits = {}
    for key, recs in rows.items():
        labels = []
        for (n, _, f), raw in zip(recs, raw_labels[key]):
            if str(raw) not in index:
                raise LrftError(f"{f}:{n}: label {raw!r} is not one of data.label_names ({', '.join(label_names)})")
            labels.append(index[str(raw)])
        texts = [str(scalar_field(r, data_cfg.text_column, f, n)) for n, r, f in recs]
        pairs = [str(scalar_field(r, pair_col, f, n)) for n, r, f in recs] if pair_col else None
        splits[key] = Split(texts, pairs, labels)
    if need_train and len(label_names) == 1:  # none at all: the empty split is reported as such
        raise LrftError(
            f"data: every example in {path} has the label {label_names[0]!r}; a classifier learns from "
            f"two or more labels, so add examples of the others (or list them in data.label_names)"
        )
    train = splits.pop("train", Split([], None, []))
    return TaskData(get_task("text-classification"), train, splits, label_names, str(path))


def _natural(label: str):
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)
