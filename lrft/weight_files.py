"""Pre-flight checks of a base model's weight files: safetensors (one file, or shards named by
`model.safetensors.index.json`) and GGUF. A damaged file is named in one line with the fix before a
loader meets it: transformers, safetensors and gguf answer a file cut short or overwritten with a
traceback of theirs (an IndexError in numpy, "incomplete metadata"), or not at all.

The checks read headers only, never tensor data: a safetensors header is JSON behind an 8-byte length
(every tensor's dtype × shape must fill its data_offsets, and the offsets the file), which
`safetensors.safe_open` then parses as the loader will; a GGUF file's header and tensor table are
parsed by gguf's reader, which maps each tensor onto the file and fails when one does not fit, and the
sizes the config is built from (layers, widths, heads, special tokens) must agree with the tensors. What
no header shows, a tensor whose shape differs from the config's, transformers reports on load
(models.check_loaded refuses it).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lrft.errors import LrftError

SAFE_WEIGHTS = "model.safetensors"  # transformers' names, in the order it looks for them
SAFE_INDEX = "model.safetensors.index.json"
SAVE_AGAIN = "download or save the model again"
HEADER_LENGTH_BYTES = 8  # a little-endian u64: the JSON header's size
# Bytes per element of safetensors' dtypes; a dtype not listed (a newer sub-byte float) is left to safe_open.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# What gguf's reader raises on a file cut short or overwritten: its own ValueErrors (magic, version,
# alignment, duplicates; UnicodeDecodeError is one), numpy's on a view past the end, enum lookups.
GGUF_READ_ERRORS = (ValueError, IndexError, KeyError, OverflowError, TypeError)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def damaged(field: str, path: Path, what: str, fix: str = SAVE_AGAIN) -> LrftError:
    """The one-line refusal of a damaged weight file: the field that named it, the file, how, the fix."""
    return LrftError(f"{field}: {path} is damaged ({what}); {fix}")


def check_model_dir(directory: Path, field: str = "model.name") -> None:
    """The safetensors weights transformers would load from a model dir are sound (a dir without any
    is left to the loader, which says so)."""
    if (directory / SAFE_WEIGHTS).is_file():
        check_safetensors(directory / SAFE_WEIGHTS, field)
    elif (directory / SAFE_INDEX).is_file():
        check_index(directory / SAFE_INDEX, field)


def weights_file(directory: Path, tensor: str = "") -> Path:
    """The file holding a model dir's `tensor`: the single safetensors file, else the shard the index puts
    it in (a model's key may carry a prefix the file's lacks: "bert.x" for "x", or the reverse), else
    the index itself."""
    if (directory / SAFE_WEIGHTS).is_file():
        return directory / SAFE_WEIGHTS
    try:
        weight_map = json.loads((directory / SAFE_INDEX).read_bytes())["weight_map"]
        shard = next(
            v
            for k, v in weight_map.items()
            if tensor and (k == tensor or tensor.endswith(f".{k}") or k.endswith(f".{tensor}"))
        )
        return directory / shard
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return directory / SAFE_INDEX


def check_safetensors(path: Path, field: str = "model.name") -> set[str]:
    """The tensor names of a sound safetensors file; a damaged one is refused, saying how."""
    problem = safetensors_problem(path, field)
    if problem:
        raise damaged(field, path, problem)
    with safe_open(str(path), "pt") as f:  # sound: safetensors_problem opened it already
        return set(f.keys())


def safetensors_problem(path: Path, field: str = "model.name") -> str | None:
    """What is wrong with a safetensors file, in words; None when it is sound (safe_open agrees)."""
    header, header_length, problem = _read_header(path, field)
    if problem:
        return problem
    size = path.stat().st_size
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_problem(name, info)
        if problem:
            return problem
        end = max(end, info["data_offsets"][1])
    expected = HEADER_LENGTH_BYTES + header_length + end
    if size < expected:
        return f"cut short: its header says {expected} bytes, the file has {size}"
    if size > expected:
        extra = size - expected
        return f"{extra} byte{'s' if extra > 1 else ''} past the end its header gives ({expected} bytes)"
    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as e:  # what the checks above do not look at (overlapping tensors, holes)
        return f"safetensors cannot read it: {_first_line(e)}"
    return None


def _read_header(path: Path, field: str) -> tuple[dict, int, str | None]:
    """(the parsed JSON header, its length in bytes, None), or ({}, 0, what is wrong with it)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(HEADER_LENGTH_BYTES)
            if len(prefix) < HEADER_LENGTH_BYTES:
                return {}, 0, f"cut short: {size} bytes, fewer than the {HEADER_LENGTH_BYTES} of its header length"
            length = int.from_bytes(prefix, "little")
            if length > size - HEADER_LENGTH_BYTES:
                return (
                    {},
                    0,
                    (
                        f"cut short or not safetensors: its first {HEADER_LENGTH_BYTES} bytes announce "
                        f"a {length}-byte header, the file has {size} bytes"
                    ),
                )
            raw = f.read(length)
    except OSError as e:
        raise LrftError(f"{field}: cannot read {path}: {e.strerror or e}; check its permissions") from None
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return {}, 0, f"its header is not valid JSON: {_first_line(e)[:80]}"
    if not isinstance(header, dict):
        return {}, 0, "its header is not a JSON object"
    return header, length, None


def _tensor_problem(name: str, info) -> str | None:
    """What is wrong with one tensor's header entry: its fields, or a dtype × shape that does not fill
    its data_offsets."""
    if not isinstance(info, dict):
        return f"tensor {name}: its header entry is not an object"
    shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
    if not (isinstance(shape, list) and all(_natural(d) for d in shape)):
        return f"tensor {name}: its shape {shape!r} is not a list of sizes"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_natural(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        return f"tensor {name}: its data_offsets {offsets!r} are not [begin, end]"
    if not isinstance(dtype, str):
        return f"tensor {name}: its dtype {dtype!r} is not a name"
    if dtype in DTYPE_BYTES:
        needed, has = math.prod(shape) * DTYPE_BYTES[dtype], offsets[1] - offsets[0]
        if needed != has:
            return f"tensor {name}: shape {shape} of {dtype} needs {needed} bytes, its data_offsets hold {has}"
    return None


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_index(index: Path, field: str = "model.name") -> None:
    """A shard index parses, and every shard it names is there, sound and holds the tensors it says."""
    try:
        mapping = json.loads(index.read_bytes())
    except OSError as e:
        raise LrftError(f"{field}: cannot read {index}: {e.strerror or e}; check its permissions") from None
    except ValueError as e:
        raise damaged(field, index, f"not valid JSON: {_first_line(e)[:80]}") from None
    weight_map = mapping.get("weight_map") if isinstance(mapping, dict) else None
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) and v for v in weight_map.values())):
        raise damaged(field, index, "no weight_map of tensor names to shard files")
    for shard_name in sorted(set(weight_map.values())):
        shard = index.parent / shard_name
        if not shard.is_file():
            raise LrftError(
                f"{field}: {index} names the shard {shard_name}, which is not in {index.parent}; {SAVE_AGAIN}"
            )
        held = check_safetensors(shard, field)
        absent = sorted(k for k, v in weight_map.items() if v == shard_name and k not in held)
        if absent:
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            raise damaged(field, shard, f"it lacks the tensor {absent[0]}{more}, which {index.name} puts there")


def check_gguf(path: Path, field: str = "model.gguf_file") -> None:
    """A GGUF file whose header and tensor table parse and fit the file, and whose architecture's sizes
    agree with its tensors (a damaged size would build a model of another shape, or one too big to fit)."""
    import gguf

    fix = "download it again"
    try:
        reader = gguf.GGUFReader(str(path))
    except GGUF_READ_ERRORS as e:
        raise damaged(
            field,
            path,
            f"cut short or overwritten: its header or tensor table does not fit its "
            f"{path.stat().st_size} bytes ({type(e).__name__}: {_first_line(e)[:80]})",
            fix,
        ) from None
    except OSError as e:
        raise LrftError(f"{field}: cannot read {path}: {e.strerror or e}; check its permissions") from None
    arch = _field_text(reader, "general.architecture")
    if not arch:
        raise damaged(field, path, "its header has no general.architecture", fix)
    problem = _gguf_sizes_problem(reader, arch)
    if problem:
        raise damaged(field, path, problem, fix)


def _gguf_sizes_problem(reader, arch: str) -> str | None:
    """Where the sizes the config is built from (a damaged one builds a model of another shape, a huge
    one a model that does not fit in memory, a zero one a division by zero) disagree with the tensors."""
    tensors = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # GGUF order: [in, out]
    blocks = {int(m.group(1)) for name in tensors if (m := _BLOCK_RE.match(name))}
    embedding, q_proj = tensors.get("token_embd.weight"), tensors.get("blk.0.attn_q.weight")
    ffn = tensors.get("blk.0.ffn_up.weight", []) + tensors.get("blk.0.ffn_down.weight", [])
    number = {
        key: _field_number(reader, f"{arch}.{key}")
        for key in (
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "vocab_size",
            "context_length",
            "attention.head_count",
            "attention.head_count_kv",
        )
    }
    for key, present in (("block_count", blocks), ("embedding_length", embedding)):
        if present and number[key] is None:  # transformers would build its default size (4096 wide, 32 deep)
            return f"its header has no number {arch}.{key}"
    heads, kv_heads = number["attention.head_count"], number["attention.head_count_kv"]
    position = tensors.get("position_embd.weight")
    checks = [  # (holds, what the header says, what the tensors have)
        (not blocks or number["block_count"] in (None, len(blocks)), "block_count", len(blocks)),
        (
            not embedding or number["embedding_length"] in (None, embedding[0]),
            "embedding_length",
            embedding and embedding[0],
        ),
        (not ffn or number["feed_forward_length"] in (None, *ffn, *(2 * n for n in ffn)), "feed_forward_length", ffn),
        (
            not embedding or number["vocab_size"] is None or number["vocab_size"] <= embedding[1],
            "vocab_size",
            embedding and f"embeddings for {embedding[1]} tokens",
        ),
        (not position or number["context_length"] in (None, position[1]), "context_length", position and position[1]),
        (
            not q_proj or heads is None or 0 < heads <= q_proj[1],
            "attention.head_count",
            q_proj and f"a query projection of {q_proj[1]} outputs",
        ),
        (
            not q_proj or kv_heads is None or 0 < kv_heads <= (heads or 0),
            "attention.head_count_kv",
            f"{heads} query heads",
        ),
    ]
    for holds, key, found in checks:
        if not holds:
            return f"its header says {arch}.{key} = {number[key]}, its tensors have {found}"
    tokens = reader.get_field("tokenizer.ggml.tokens")
    for key in ("bos", "eos", "unknown", "padding", "seperator", "cls", "mask"):
        token_id = _field_number(reader, f"tokenizer.ggml.{key}_token_id")
        if tokens is not None and token_id is not None and token_id >= len(tokens.data):
            return f"its header says tokenizer.ggml.{key}_token_id = {token_id}, of {len(tokens.data)} tokens"
    return None


def _field_text(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (UnicodeDecodeError, IndexError, TypeError):
        return None


def _field_number(reader, key: str) -> int | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    try:
        return int(field.parts[field.data[0]][0])
    except (IndexError, TypeError, ValueError, OverflowError):
        return None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
