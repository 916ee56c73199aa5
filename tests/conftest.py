"""Fixtures: saved tiny models and data (tests/helpers.py builds them), the tiny-recipe writers, one
shared set of finished runs for tests that only read them, the real data dir, the in-process CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import (
    make_choice_problems,
    make_math_problems,
    make_pairs,
    make_problems,
    make_sentences,
    recipe_dict,
    save_tiny_bert,
    save_tiny_llama,
    write_recipe,
    write_splits,
    write_suite,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("tiny-data"), make_sentences, (("train", 64, 1), ("dev", 32, 2)))


@pytest.fixture(scope="session")
def tiny_gsm8k_dir(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("tiny-gsm8k"), make_problems, (("train", 48, 3), ("test", 12, 4)))


@pytest.fixture(scope="session")
def tiny_pairs_dir(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("tiny-pairs"), make_pairs, (("train", 32, 1), ("test", 16, 2)))


@pytest.fixture(scope="session")
def tiny_commonsense_dir(tmp_path_factory) -> Path:
    """A commonsense suite: `yesno` (true/false; test and train) and `pick` (answer1..3; test only)."""
    pick = make_choice_problems(8, 3, ("answer1", "answer2", "answer3"))
    sets = {"yesno": (make_choice_problems(8, 1), make_choice_problems(40, 2)), "pick": (pick, None)}
    return write_suite(tmp_path_factory.mktemp("tiny-commonsense"), sets)


@pytest.fixture(scope="session")
def tiny_arithmetic_dir(tmp_path_factory) -> Path:
    """An arithmetic suite: one test set `add`, the training file math_data.json at the top."""
    return write_suite(
        tmp_path_factory.mktemp("tiny-arithmetic"),
        {"add": (make_math_problems(8, 1), None)},
        {"math_data.json": make_math_problems(40, 2)},
    )


@pytest.fixture
def suite_recipe(tmp_path, tiny_llama_dir, tiny_commonsense_dir, tiny_arithmetic_dir):
    """Writes a tiny commonsense (or arithmetic) recipe on the tiny Llama, like `tiny_recipe`."""

    def write(method: str = "lora", task: str = "commonsense", name: str = "suite", **sections) -> Path:
        data_dir = tiny_commonsense_dir if task == "commonsense" else tiny_arithmetic_dir
        data = {"task": task, "max_length": 96, "max_new_tokens": 12, **sections.pop("data", {})}
        recipe = recipe_dict(
            tiny_llama_dir, data_dir, tmp_path / "runs", method, name, causal=True, data=data, **sections
        )
        return write_recipe(tmp_path / f"{name}.yaml", recipe)

    return write


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir, tiny_data_dir):
    """Writes the tiny classification recipe (runs under tmp_path/runs); a function of method, name and
    section overrides, returning the recipe file."""

    def write(method: str = "lora", name: str = "tiny", **sections) -> Path:
        recipe = recipe_dict(tiny_model_dir, tiny_data_dir, tmp_path / "runs", method, name, **sections)
        return write_recipe(tmp_path / f"{name}.yaml", recipe)

    return write


@pytest.fixture
def causal_recipe(tmp_path, tiny_llama_dir, tiny_gsm8k_dir):
    """Writes the tiny gsm8k recipe on the tiny Llama, like `tiny_recipe`."""

    def write(method: str = "lora", name: str = "lm", **sections) -> Path:
        recipe = recipe_dict(tiny_llama_dir, tiny_gsm8k_dir, tmp_path / "runs", method, name, causal=True, **sections)
        return write_recipe(tmp_path / f"{name}.yaml", recipe)

    return write


@pytest.fixture
def preference_recipe(tmp_path, tiny_llama_dir, tiny_pairs_dir):
    """Writes the tiny preference recipe (DPO on the tiny Llama), like `tiny_recipe`."""

    def write(method: str = "lora", name: str = "dpo", **sections) -> Path:
        recipe = recipe_dict(
            tiny_llama_dir, tiny_pairs_dir, tmp_path / "runs", method, name, causal="preference", **sections
        )
        return write_recipe(tmp_path / f"{name}.yaml", recipe)

    return write


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """A dir holding copies of the tiny model ("model") and data ("data"), their recipes and two
    finished runs, runs/good (lora) and runs/ta (talora), 2 steps each; for tests that only read them
    (refusals, the bad-input catalogue). Tests must not change it."""
    from typer.testing import CliRunner

    from lrft.cli import app

    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(tiny_model_dir, root / "model")
    shutil.copytree(tiny_data_dir, root / "data")
    for name, method in (("good", "lora"), ("ta", "talora")):
        recipe = recipe_dict(
            root / "model",
            root / "data",
            root / "runs",
            method,
            name,
            train={"max_steps": 2, "batch_size": 16, "log_every": 10, "epochs": 3, "lr": 5e-4},
            calibration={"samples": 16, "batch_size": 8},
        )
        result = CliRunner().invoke(app, ["train", str(write_recipe(root / f"{name}.yaml", recipe))])
        assert result.exit_code == 0, result.stderr
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data (GLUE, GSM8K) named by $LRFT_DATA_DIR; integration tests skip without it."""
    env = os.environ.get("LRFT_DATA_DIR")
    if not env or not (Path(env) / "glue").is_dir():
        pytest.skip("LRFT_DATA_DIR is not set to a dir holding glue/ (set LRFT_DATA_DIR=../shared/data)")
    return Path(env)


@pytest.fixture
def cli():
    """Run the lrft CLI in-process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from lrft.cli import app

    def run(*args: str):
        result = CliRunner().invoke(app, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return run
