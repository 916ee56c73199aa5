"""Task data: GLUE tsv layouts and their quoting, users' own files, labels, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lrft.data import compute_metrics, get_task, load_task_data
from lrft.errors import LrftError
from lrft.recipe import DataConfig
from tests.helpers import MRPC_HEADER

BOM = "\ufeff"


def glue_dir(tmp_path, task: str, files: dict[str, str]):
    d = tmp_path / task
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def test_mrpc_layout_keeps_literal_quotes_and_strips_bom(tmp_path):
    rows = '1\t1\t2\tHe said "yes\tshe said no"\n0\t3\t4\tA "quoted" word\tplain\n'
    d = glue_dir(tmp_path, "mrpc", {"train.tsv": BOM + MRPC_HEADER + rows, "dev.tsv": BOM + MRPC_HEADER + rows})
    data = load_task_data(get_task("glue/mrpc"), DataConfig(task="glue/mrpc", path=str(d)))
    assert data.train.text == ['He said "yes', 'A "quoted" word']
    assert data.train.pair == ['she said no"', "plain"] and data.train.label == [1, 0]


def test_hub_export_layout_uses_csv_quoting(tmp_path):
    text = 'sentence1\tsentence2\tlabel\tidx\n"He said ""hi"""\tplain\t1\t0\nx\ty\t0\t1\n'
    d = glue_dir(tmp_path, "rte", {"train.tsv": text, "dev.tsv": text})
    data = load_task_data(get_task("glue/rte"), DataConfig(task="glue/rte", path=str(d)))
    assert data.train.text == ['He said "hi"', "x"] and data.train.label == [1, 0]


def test_text_labels_and_headerless_cola(tmp_path):
    rte = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n"
    d = glue_dir(tmp_path, "rte", {"train.tsv": rte, "dev.tsv": rte})
    assert load_task_data(get_task("glue/rte"), DataConfig(task="glue/rte", path=str(d))).train.label == [1, 0]
    cola = "gj04\t1\t\tThe book is red .\ngj04\t0\t*\tBook the red is .\n"
    d = glue_dir(tmp_path, "cola", {"train.tsv": cola, "dev.tsv": cola})
    data = load_task_data(get_task("glue/cola"), DataConfig(task="glue/cola", path=str(d)))
    assert data.train.text == ["The book is red .", "Book the red is ."] and data.train.label == [1, 0]


def test_mnli_has_matched_and_mismatched(tmp_path):
    h = "index\tsentence1\tsentence2\tgold_label\n"
    files = {
        "train.tsv": h + "0\ta\tb\tneutral\n",
        "dev_matched.tsv": h + "0\ta\tb\tcontradiction\n",
        "dev_mismatched.tsv": h + "0\ta\tb\tentailment\n",
    }
    data = load_task_data(
        get_task("glue/mnli"), DataConfig(task="glue/mnli", path=str(glue_dir(tmp_path, "mnli", files)))
    )
    assert data.train.label == [1] and data.evals[""].label == [2] and data.evals["_mm"].label == [0]


@pytest.mark.parametrize(
    "body, match",
    [
        ("1\t1\t2\tonly four fields\n", r"train.tsv:2: expected 5 tab-separated fields, found 4"),
        ("7\t1\t2\ta\tb\n", r"train.tsv:2: label '7' is not one of 0..1 or not_equivalent, equivalent"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, body, match):
    d = glue_dir(tmp_path, "mrpc", {"train.tsv": MRPC_HEADER + body, "dev.tsv": MRPC_HEADER})
    with pytest.raises(LrftError, match=match):
        load_task_data(get_task("glue/mrpc"), DataConfig(task="glue/mrpc", path=str(d)))


def test_missing_files_and_columns(tmp_path, monkeypatch):
    d = glue_dir(tmp_path, "mrpc", {"train.tsv": MRPC_HEADER})
    with pytest.raises(LrftError, match=r"missing .*dev.tsv"):
        load_task_data(get_task("glue/mrpc"), DataConfig(task="glue/mrpc", path=str(d)))
    d2 = glue_dir(tmp_path / "x", "mrpc", {"train.tsv": "a\tb\n1\t2\n", "dev.tsv": "a\tb\n"})
    with pytest.raises(LrftError, match=r"no column '#1 String' or 'sentence1'"):
        load_task_data(get_task("glue/mrpc"), DataConfig(task="glue/mrpc", path=str(d2)))
    monkeypatch.setenv("LRFT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(LrftError, match=r"LRFT_DATA_DIR: no directory .*glue/rte"):
        load_task_data(get_task("glue/rte"), DataConfig(task="glue/rte"))


def test_not_utf8_is_a_clear_error(tmp_path):
    d = glue_dir(tmp_path, "sst2", {"dev.tsv": "sentence\tlabel\n"})
    (d / "train.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe bad\t1\n")
    with pytest.raises(LrftError, match="not UTF-8"):
        load_task_data(get_task("glue/sst2"), DataConfig(task="glue/sst2", path=str(d)))


def test_text_classification_files(tmp_path):
    rows = [{"sentence": "a", "y": "pos"}, {"sentence": "b", "y": "neg"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "validation.csv").write_text("sentence,y\nc,neg\n")
    cfg = DataConfig(task="text-classification", path=str(tmp_path), text_column="sentence", label_column="y")
    data = load_task_data(get_task("text-classification"), cfg)
    assert data.label_names == ["neg", "pos"] and data.train.label == [1, 0] and data.evals[""].label == [0]


def test_text_classification_errors(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\nnot json\n')
    (tmp_path / "dev.jsonl").write_text('{"text": "a", "label": 0}\n')
    cfg = DataConfig(task="text-classification", path=str(tmp_path))
    with pytest.raises(LrftError, match=r"train.jsonl:2: not valid JSON"):
        load_task_data(get_task("text-classification"), cfg)
    (tmp_path / "train.jsonl").write_text('{"txt": "a", "label": 0}\n')
    with pytest.raises(LrftError, match=r"train.jsonl:1: no field 'text'"):
        load_task_data(get_task("text-classification"), cfg)
    with pytest.raises(LrftError, match="set data.path"):
        load_task_data(get_task("text-classification"), DataConfig(task="text-classification"))


def test_max_samples_take_the_first_rows(tmp_path):
    body = "".join(f"{i % 2}\t1\t2\ts{i}\tt{i}\n" for i in range(10))
    d = glue_dir(tmp_path, "mrpc", {"train.tsv": MRPC_HEADER + body, "dev.tsv": MRPC_HEADER + body})
    data = load_task_data(
        get_task("glue/mrpc"), DataConfig(task="glue/mrpc", path=str(d), max_train_samples=3, max_eval_samples=2)
    )
    assert data.train.text == ["s0", "s1", "s2"] and len(data.evals[""]) == 2


def test_metrics():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([0, 1, 0, 1])
    m = compute_metrics(get_task("glue/mrpc"), logits, labels)
    assert m == {"accuracy": 0.5, "f1": 0.5}
    assert compute_metrics(get_task("glue/cola"), logits, labels)["matthews_correlation"] == 0.0
    s = compute_metrics(get_task("glue/stsb"), np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 3.5]))
    assert s["spearman"] == pytest.approx(1.0) and s["pearson"] == pytest.approx(0.9933, abs=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize(
    "task, train, dev, labels",
    [
        ("mrpc", 3668, 408, {0: 129, 1: 279}),
        ("rte", 2490, 277, {0: 146, 1: 131}),
        ("sst2", 67349, 872, {0: 428, 1: 444}),
    ],
)
def test_real_glue_files(data_dir, monkeypatch, task, train, dev, labels):
    """Row and label counts of ../shared/data/glue as its README states them."""
    monkeypatch.setenv("LRFT_DATA_DIR", str(data_dir))
    data = load_task_data(get_task(f"glue/{task}"), DataConfig(task=f"glue/{task}"))
    assert len(data.train) == train and len(data.evals[""]) == dev
    assert {k: data.evals[""].label.count(k) for k in labels} == labels
    assert all(t.strip() for t in data.train.text[:100])
