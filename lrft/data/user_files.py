"""Reading users' data files: UTF-8 text, JSON Lines / JSON / CSV / TSV records with their line numbers.

Every problem names the file and line and says what to do, so a bad file is one clear error line.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

from lrft.errors import LrftError

TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def read_text(path: Path) -> str:
    """A file's UTF-8 text; a `.gz` file decompressed first."""
    try:
        if path.suffix == ".gz":
            return gzip.decompress(path.read_bytes()).decode("utf-8-sig")
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LrftError(f"{path}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise LrftError(f"{path}: not a readable gzip file ({e}); decompress or replace it") from None


def record_format(path: Path) -> str:
    """A data file's format suffix, a `.gz` compression set aside: data.jsonl.gz → .jsonl."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def find_split_file(path: Path, stems: tuple[str, ...], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> Path | None:
    """The first `<stem><suffix>` file in `path`, stems and suffixes in order of preference."""
    for stem in stems:
        for suffix in suffixes:
            if (path / f"{stem}{suffix}").is_file():
                return path / f"{stem}{suffix}"
    return None


def field(record: dict, column: str, path: Path, line_no: int):
    if column not in record:
        raise LrftError(
            f"{path}:{line_no}: no field '{column}' (fields: {', '.join(record)}); "
            f"set data.text_column / data.text_pair_column / data.label_column"
        )
    return record[column]


def scalar_field(record: dict, column: str, path: Path, line_no: int):
    """A field holding one text, number or label (not null, a list or an object)."""
    value = field(record, column, path, line_no)
    if value is None or isinstance(value, (list, dict)):
        raise LrftError(
            f"{path}:{line_no}: field '{column}' is {json.dumps(value)[:40]}, not a text or a label; "
            f"give every example a plain value there"
        )
    return value


def read_records(path: Path) -> list[tuple[int, dict, Path]]:
    """(line number, record, file) for each example of a jsonl/json/csv/tsv file."""
    text, suffix = read_text(path), record_format(path)
    if suffix == ".jsonl":
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
    if suffix == ".json":
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise LrftError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
            raise LrftError(f"{path}: expected a JSON list of objects")
        return [(i + 1, r, path) for i, r in enumerate(recs)]
    delimiter = "\t" if suffix == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    return [(n + 2, dict(r), path) for n, r in enumerate(reader)]
