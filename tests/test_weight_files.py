"""Damaged base-model weight files, one class at a time: a safetensors file (cut short, its header length
or JSON overwritten, a tensor whose header contradicts itself or whose shape is not the config's), a
sharded model (index broken, a shard missing, cut short or without a tensor the index puts there) and a
GGUF file (cut short, its header overwritten, sizes that disagree with its tensors). Each is refused in
one line that names the file and the fix (lrft/weight_files.py's pre-flight checks, models.check_loaded),
never with a loader's traceback. tests/test_fuzz.py damages the same files at random.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lrft.errors import LrftError
from lrft.models import load_for_causal_lm, load_for_classification, resolve
from lrft.recipe import ModelConfig
from tests.helpers import (
    GGUF_TOKENS,
    recipe_dict,
    reshaped_tensor,
    safetensors_header,
    save_sharded_bert,
    save_tiny_gguf,
    with_header,
    write_recipe,
)

SAVE_AGAIN = "; download or save the model again"
QUERY = "bert.encoder.layer.0.attention.self.query.weight"  # 32 × 32 in the tiny BERT


def classify(d: Path, num_labels: int = 2):
    return load_for_classification(ModelConfig(name=str(d)), num_labels, [f"l{i}" for i in range(num_labels)], False)


def refusal(load, *args) -> str:
    with pytest.raises(LrftError) as e:
        load(*args)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture
def bert_copy(tmp_path, tiny_model_dir) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "bert"))


@pytest.fixture
def sharded(tmp_path) -> Path:
    return save_sharded_bert(tmp_path / "sharded")


@pytest.fixture
def gguf_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LRFT_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache/lrft
    (tmp_path / "gguf").mkdir()
    save_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    return tmp_path / "gguf"


# ------------------------------------------------------------------------------ one safetensors file


def test_a_file_cut_short_is_named_with_both_sizes(bert_copy):
    weights = bert_copy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size - 100])
    assert refusal(classify, bert_copy) == (
        f"model.name: {weights} is damaged (cut short: its header says {size} "
        f"bytes, the file has {size - 100}){SAVE_AGAIN}"
    )


def test_a_file_cut_inside_its_header_length(bert_copy):
    weights = bert_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    assert refusal(classify, bert_copy) == (
        f"model.name: {weights} is damaged (cut short: 5 bytes, fewer than the 8 of its header length){SAVE_AGAIN}"
    )


def test_an_overwritten_header_length(bert_copy):
    weights = bert_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\xff" * 8 + data[8:])
    assert refusal(classify, bert_copy) == (
        f"model.name: {weights} is damaged (cut short or not safetensors: its first 8 bytes announce a "
        f"{2**64 - 1}-byte header, the file has {len(data)} bytes){SAVE_AGAIN}"
    )


def test_a_corrupted_header_json(bert_copy):
    weights = bert_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\x01"
    weights.write_bytes(bytes(data))
    message = refusal(classify, bert_copy)
    assert re.fullmatch(
        rf"model\.name: {re.escape(str(weights))} is damaged \(its header is not valid JSON: .+\)"
        rf"{SAVE_AGAIN}",
        message,
    ), message


def test_a_header_whose_shape_does_not_fill_its_data(bert_copy):
    weights = bert_copy / "model.safetensors"
    weights.write_bytes(reshaped_tensor(weights.read_bytes(), QUERY, [32, 31]))
    assert refusal(classify, bert_copy) == (
        f"model.name: {weights} is damaged (tensor {QUERY}: shape [32, 31] of F32 needs 3968 bytes, its "
        f"data_offsets hold 4096){SAVE_AGAIN}"
    )


def test_bytes_past_the_end_of_the_data(bert_copy):
    weights = bert_copy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes() + b"\x00" * 16)
    assert refusal(classify, bert_copy) == (
        f"model.name: {weights} is damaged (16 bytes past the end its header gives ({size} bytes)){SAVE_AGAIN}"
    )


def test_a_backbone_tensor_of_another_shape_is_refused_not_made_random(bert_copy):
    """A consistent file whose tensor is not the config's shape: ignore_mismatched_sizes (there for a
    head with another label count) would give it random values, silently."""
    weights = bert_copy / "model.safetensors"
    weights.write_bytes(reshaped_tensor(weights.read_bytes(), QUERY, [16, 64]))
    for num_labels in (2, 3):  # with the head's own mismatch too: the backbone's is still the one named
        assert refusal(classify, bert_copy, num_labels) == (
            f"model.name: {weights} is damaged or another model's: its tensor {QUERY} is [16, 64] where the "
            f"model's config needs [32, 32]{SAVE_AGAIN}"
        )


def test_a_head_with_another_label_count_is_made_fresh(tiny_model_dir):
    """The intended mismatch: a checkpoint fine-tuned with 2 labels loads for a task of 3."""
    model, _ = classify(tiny_model_dir, num_labels=3)
    assert model.classifier.out_features == 3


def test_a_causal_lm_tensor_of_another_shape_is_named(tmp_path, tiny_llama_dir):
    d = Path(shutil.copytree(tiny_llama_dir, tmp_path / "llama"))
    weights = d / "model.safetensors"
    weights.write_bytes(reshaped_tensor(weights.read_bytes(), "model.layers.1.mlp.up_proj.weight", [32, 64]))
    assert refusal(load_for_causal_lm, ModelConfig(name=str(d))) == (
        f"model.name: {weights} is damaged or another model's: its tensor model.layers.1.mlp.up_proj.weight is "
        f"[32, 64] where the model's config needs [64, 32]{SAVE_AGAIN}"
    )


def test_a_missing_backbone_tensor_is_warned_about(bert_copy, capsys):
    weights = bert_copy / "model.safetensors"
    header, body = safetensors_header(weights.read_bytes())
    header["bert.encoder.layer.1.output.dense.weight_"] = header.pop("bert.encoder.layer.1.output.dense.weight")
    weights.write_bytes(with_header(header, body))
    classify(bert_copy)
    err = capsys.readouterr().err
    assert f"warning: {weights} lacks bert.encoder.layer.1.output.dense.weight: it starts from random values" in err


# ------------------------------------------------------------------------------------ sharded files


def test_a_sharded_model_loads(sharded):
    model, _ = classify(sharded)
    assert model.classifier.out_features == 2


def test_a_broken_index(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    message = refusal(classify, sharded)
    assert re.fullmatch(
        rf"model\.name: {re.escape(str(index))} is damaged \(not valid JSON: .+\){SAVE_AGAIN}", message
    ), message


def test_an_index_without_a_weight_map(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    assert refusal(classify, sharded) == (
        f"model.name: {index} is damaged (no weight_map of tensor names to shard files){SAVE_AGAIN}"
    )


@pytest.mark.parametrize("how", ["removed", "renamed in the index"])
def test_a_missing_shard(sharded, how):
    index = sharded / "model.safetensors.index.json"
    if how == "removed":
        (sharded / "model-00002-of-00003.safetensors").unlink()
        missing = "model-00002-of-00003.safetensors"
    else:
        index.write_text(index.read_text().replace("model-00002-of-00003", "model-00009-of-00003"))
        missing = "model-00009-of-00003.safetensors"
    assert refusal(classify, sharded) == (
        f"model.name: {index} names the shard {missing}, which is not in {sharded}{SAVE_AGAIN}"
    )


def test_a_shard_cut_short(sharded):
    shard = sharded / "model-00003-of-00003.safetensors"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    assert refusal(classify, sharded) == (
        f"model.name: {shard} is damaged (cut short: its header says {size} bytes, "
        f"the file has {size // 2}){SAVE_AGAIN}"
    )


def test_a_sharded_tensor_of_another_shape_names_its_shard(sharded):
    shard = sharded / json_shard_of(sharded / "model.safetensors.index.json", QUERY)
    shard.write_bytes(reshaped_tensor(shard.read_bytes(), QUERY, [64, 16]))
    assert refusal(classify, sharded) == (
        f"model.name: {shard} is damaged or another model's: its tensor {QUERY} is [64, 16] where the model's "
        f"config needs [32, 32]{SAVE_AGAIN}"
    )


def test_a_shard_without_a_tensor_the_index_puts_there(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"classifier.bias"', '"classifier.bias_"'))
    shard = sharded / json_shard_of(index, "classifier.bias_")
    assert refusal(classify, sharded) == (
        f"model.name: {shard} is damaged (it lacks the tensor classifier.bias_, "
        f"which model.safetensors.index.json puts there){SAVE_AGAIN}"
    )


def json_shard_of(index: Path, key: str) -> str:
    import json

    return json.loads(index.read_text())["weight_map"][key]


# --------------------------------------------------------------------------------------------- GGUF


def gguf_model(d: Path) -> ModelConfig:
    return ModelConfig(name=str(d), gguf_file="tiny.gguf")


def test_a_tiny_gguf_dequantises_and_loads(gguf_dir):
    model, tokenizer = load_for_causal_lm(gguf_model(gguf_dir))
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(GGUF_TOKENS)


@pytest.mark.parametrize("cut", [30, 1000, -1])
def test_a_gguf_cut_short(gguf_dir, cut):
    path = gguf_dir / "tiny.gguf"
    path.write_bytes(path.read_bytes()[:cut])
    size = path.stat().st_size
    message = refusal(resolve, str(gguf_dir), "tiny.gguf")
    assert re.fullmatch(
        rf"model\.gguf_file: {re.escape(str(path))} is damaged \(cut short or overwritten: its header "
        rf"or tensor table does not fit its {size} bytes \(\w+: .+\)\); download it again",
        message,
    ), message
    assert not (gguf_dir.parent / "cache").exists() or not any((gguf_dir.parent / "cache").rglob("config.json"))


def test_a_gguf_with_an_overwritten_version(gguf_dir):
    path = gguf_dir / "tiny.gguf"
    data = path.read_bytes()
    path.write_bytes(data[:4] + b"\xff\xff\xff\x7f" + data[8:])
    message = refusal(resolve, str(gguf_dir), "tiny.gguf")
    assert message.startswith(f"model.gguf_file: {path} is damaged (cut short or overwritten:"), message
    assert "version" in message and message.endswith("; download it again"), message


def with_number(path: Path, key: str, value: int) -> None:
    """The GGUF file with the uint32 metadata value `key` overwritten (after the key, its 4-byte type)."""
    data = bytearray(path.read_bytes())
    at = data.index(key.encode()) + len(key) + 4
    data[at : at + 4] = value.to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("key", "value", "found"),
    [
        ("llama.block_count", 5, "2"),
        ("llama.embedding_length", 4096, "32"),
        ("llama.feed_forward_length", 1 << 30, "[32, 64, 64, 32]"),  # a model of 10¹¹ parameters, never built
        ("llama.attention.head_count", 0, "a query projection of 32 outputs"),  # a division by zero in transformers
        ("llama.attention.head_count_kv", 9, "4 query heads"),
    ],
)
def test_a_gguf_whose_sizes_disagree_with_its_tensors(gguf_dir, key, value, found):
    path = gguf_dir / "tiny.gguf"
    with_number(path, key, value)
    assert refusal(resolve, str(gguf_dir), "tiny.gguf") == (
        f"model.gguf_file: {path} is damaged (its header says {key} = {value}, its tensors have {found}); "
        f"download it again"
    )


def test_a_gguf_whose_special_token_is_past_its_tokens(gguf_dir):
    path = gguf_dir / "tiny.gguf"
    with_number(path, "tokenizer.ggml.bos_token_id", 61)
    assert refusal(resolve, str(gguf_dir), "tiny.gguf") == (
        f"model.gguf_file: {path} is damaged (its header says tokenizer.ggml.bos_token_id = 61, of 32 tokens); "
        f"download it again"
    )


# ----------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("damage", ["cut short", "missing shard", "gguf cut short"])
def test_the_cli_refuses_in_one_line(damage, tmp_path, tiny_data_dir, tiny_model_dir, cli, monkeypatch):
    monkeypatch.setenv("LRFT_CACHE_DIR", str(tmp_path / "cache"))
    model = {"name": str(tmp_path / "model")}
    if damage == "cut short":
        shutil.copytree(tiny_model_dir, tmp_path / "model")
        weights = tmp_path / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1])
    elif damage == "missing shard":
        save_sharded_bert(tmp_path / "model")
        (tmp_path / "model" / "model-00001-of-00003.safetensors").unlink()
    else:
        (tmp_path / "model").mkdir()
        save_tiny_gguf(tmp_path / "model" / "tiny.gguf")
        path = tmp_path / "model" / "tiny.gguf"
        path.write_bytes(path.read_bytes()[:-9])
        model["gguf_file"] = "tiny.gguf"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_dict(tmp_path / "model", tiny_data_dir, tmp_path / "runs", model=model, train={"max_steps": 1}),
    )
    code, _, err = cli("train", recipe)
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("is damaged" in errors[0] or "names the shard" in errors[0]), err


@pytest.mark.integration
def test_the_real_gguf_passes_and_a_copy_cut_short_is_refused(tmp_path):
    """The checks on a real GGUF (SmolLM2, 100 MB, Q4_1/Q8_0 tensors, 49152 tokens: ~10 s to parse twice):
    no false alarm on it, and its copy cut short refused before any dequantisation."""
    import importlib.util

    from lrft.models import ALIASES
    from lrft.weight_files import check_gguf

    alias = ALIASES["smollm2"]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the smollm2 alias is not installed ({alias.install})")
    real = Path(spec.submodule_search_locations[0]) / alias.subdir / alias.gguf
    check_gguf(real)
    cut = tmp_path / alias.gguf
    with open(real, "rb") as f:
        cut.write_bytes(f.read(50_000_000))
    with pytest.raises(
        LrftError,
        match=rf"^model\.gguf_file: {re.escape(str(cut))} is damaged \(cut short or "
        rf"overwritten: .+\); download it again$",
    ):
        check_gguf(cut)
