"""Integration: the real packaged MiniLM on the real GLUE MRPC files under $LRFT_DATA_DIR.

Short budgets (a few optimizer steps) keep these to seconds each on 2 CPU cores; they check that the
real model and data go through every stage and that eval and merge agree with training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"


@pytest.fixture
def short_run(cli, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LRFT_DATA_DIR", str(data_dir))

    def run(*overrides: str) -> tuple[Path, dict]:
        args = ["train", QUICKSTART, f"output.dir={tmp_path / 'runs'}", "train.max_steps=6", "train.batch_size=16",
                "data.max_eval_samples=96", "train.log_every=2", *overrides, "--json"]
        code, out, err = cli(*args)
        assert code == 0, err
        return tmp_path / "runs" / "quickstart", json.loads(out)

    return run


@pytest.mark.parametrize("method", ["tlora", "lora"])
def test_minilm_mrpc_train_eval_merge(short_run, cli, tmp_path, method):
    run, summary = short_run(f"adapter.method={method}", "adapter.params={rank: 8}")
    assert summary["task"] == "glue/mrpc" and summary["train_examples"] == 3668 and summary["steps"] == 6
    assert summary["trainable_params"] == {"tlora": 12 * 65, "lora": 12 * 8 * (384 + 384)}[method]
    assert summary["total_params"] > 22_000_000
    assert 0.0 < summary["final"]["accuracy"] < 1.0 and "f1" in summary["final"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model"] == {"name": "minilm", "revision": None, "model_type": "bert", "dtype": "float32"}
    assert config["label_names"] == ["not_equivalent", "equivalent"]

    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(summary["final"]["accuracy"])

    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    assert json.loads(out)["max_abs_logit_diff"] <= 1e-4
    code, out, err = cli("eval", tmp_path / "merged", "--task", "glue/mrpc", "--max-samples", "96", "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(summary["final"]["accuracy"])


def test_quickstart_recipe_is_the_readme_one():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "lrft train recipes/quickstart.yaml" in readme
