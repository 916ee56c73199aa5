"""GLUE tasks: the tsv files of GLUE's own download layout (a local dir) or the hub's `nyu-mll/glue`.

A task is read from `data.path`, else from `$LRFT_DATA_DIR/glue/<task>/` (the layout of GLUE's own
download script), else from the Hugging Face hub. GLUE tsv files are read the way GLUE's readers do,
with quoting disabled; files in the column layout of the hub export (they have an `idx` column, as
../shared/data/glue/rte) were written by pandas with standard CSV quoting.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lrft import hub
from lrft.data.tasks import DATA_DIR_ENV, HUB_SOURCE, Split, Task, TaskData
from lrft.data.user_files import read_text
from lrft.errors import LrftError


def load(task: Task, data_cfg, need_train: bool) -> TaskData:
    """A GLUE task's splits from a local dir (data.path, $LRFT_DATA_DIR) or the hub."""
    local = _local_task_dir(task, data_cfg)
    return _load_local(task, local, need_train) if local else _load_hub(task, need_train)


def _local_task_dir(task: Task, data_cfg) -> Path | None:
    if data_cfg.path:
        path = Path(data_cfg.path)
        if not path.is_dir():
            raise LrftError(
                f"data.path: no directory at {path}; point it at a dir holding {task.name}'s {_expected_files(task)}"
            )
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env) / task.name
        if not path.is_dir():
            raise LrftError(
                f"{DATA_DIR_ENV}: no directory {path} (expected {_expected_files(task)} there); "
                f"add the files or unset {DATA_DIR_ENV} to download {task.name} from the hub"
            )
        return path
    return None


def _expected_files(task: Task) -> str:
    names = ["train.tsv"] + [f"{s.local_file}.tsv" for s in task.eval_splits]
    return ", ".join(names[:-1]) + f" and {names[-1]}"


def _load_local(task: Task, path: Path, need_train: bool) -> TaskData:
    files = {"train": path / "train.tsv"} if need_train else {}
    files.update({s.suffix: path / f"{s.local_file}.tsv" for s in task.eval_splits})
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise LrftError(f"data: missing {', '.join(missing)}; a local {task.name} dir needs {_expected_files(task)}")
    splits = {key: _read_glue_tsv(task, f) for key, f in files.items()}
    train = splits.pop("train", Split([], None, []))
    return TaskData(task, train, splits, list(task.label_names) if task.label_names else None, str(path))


def _read_glue_tsv(task: Task, path: Path) -> Split:
    header_line = read_text(path).split("\n", 1)[0]
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
                raise LrftError(
                    f"{path}:{line_no}: expected {n_fields} tab-separated fields, found {len(row)}; "
                    f"is this {task.name}'s GLUE tsv?"
                )
            text.append(row[t_i])
            if pair is not None:
                pair.append(row[p_i])
            label.append(_parse_label(task, row[l_i], path, line_no))
    return Split(text, pair, label)


def _find_column(header: list[str], candidates: tuple[str, ...]) -> int | None:
    for c in candidates:
        if c in header:
            return header.index(c)
    return None


def _require_column(header: list[str], candidates: tuple[str, ...], path: Path) -> int:
    i = _find_column(header, candidates)
    if i is None:
        raise LrftError(
            f"{path}: no column {' or '.join(repr(c) for c in candidates)} in the header "
            f"({', '.join(header)}); is this the task's own file, with its header line?"
        )
    return i


def _parse_label(task: Task, raw: str, path: Path, line_no: int):
    raw = raw.strip()
    if task.problem == "regression":
        try:
            return float(raw)
        except ValueError:
            raise LrftError(
                f"{path}:{line_no}: label {raw!r} is not a number ({task.name} is a regression task)"
            ) from None
    names = task.label_names
    if raw.lstrip("-").isdigit() and 0 <= int(raw) < len(names):
        return int(raw)
    if raw in names:
        return names.index(raw)
    raise LrftError(f"{path}:{line_no}: label {raw!r} is not one of 0..{len(names) - 1} or {', '.join(names)}")


def _load_hub(task: Task, need_train: bool) -> TaskData:
    hub_id, config = task.hub
    hub.unreachable_reason()  # an unreachable hub: offline mode before datasets tries it
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config)
    except Exception as e:  # offline, unknown dataset, ...: say what to do instead
        raise LrftError(
            f"data: {task.name} has no local dir and {hub.unavailable(f'{hub_id} ({config})', e)}; "
            f"set {DATA_DIR_ENV} to a dir holding {task.name}/{_expected_files(task)}, or the "
            f"task's dir with data.path (lrft eval and merge: --data-path)"
        ) from None
    cols = task.hub_columns

    def split(name: str) -> Split:
        d = ds[name]
        return Split(list(d[cols.text[0]]), list(d[cols.pair[0]]) if cols.pair else None, list(d[cols.label[0]]))

    train = split("train") if need_train else Split([], None, [])
    evals = {s.suffix: split(s.hub_split) for s in task.eval_splits}
    return TaskData(
        task, train, evals, list(task.label_names) if task.label_names else None, f"{HUB_SOURCE}{hub_id}/{config}"
    )
