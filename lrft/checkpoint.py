"""Files on disk: atomic writes, adapter dirs (safetensors + JSON), resumable training checkpoints.

Nothing here pickles. Training state (optimizer, scheduler, RNG) is split into its tensors, saved
with safetensors, and a JSON skeleton that records where each tensor goes and which containers were
tuples or dicts with non-string keys, so it comes back exactly. Every file and dir is written under
a temporary name, fsynced and renamed, so a killed process never leaves one that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrft.errors import LrftError

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
CKPT_PREFIX = "step-"


# ------------------------------------------------------------------------------------ atomic files

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove_stale(directory: Path, prefix: str = ".") -> None:
    """Remove the `.NAME.tmp-PID` / `.NAME.old-PID` files and dirs that killed writers left in `directory`."""
    if not directory.is_dir():
        return
    for p in directory.glob(f"{prefix}*"):
        _, sep, pid = p.name.rpartition(".tmp-") if ".tmp-" in p.name else p.name.rpartition(".old-")
        if sep and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path.parent, f".{path.name}.")
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_dir(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary dir; on success it replaces `final` in one rename, on failure it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final.parent, f".{final.name}.")
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            if not overwrite:
                raise LrftError(f"{final} already exists; pass --force to replace it")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line (whole lines only: a reader never sees half a record from a finished write)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill: what follows it was never written
    return out


# ------------------------------------------------------------------------------------ adapter dirs

def save_adapter(directory: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "lrft_method": config.get("method", "")})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_adapter(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of an adapter dir; one clear error for anything missing or corrupt."""
    directory = Path(directory)
    config = read_json(directory / CONFIG_FILE, "adapter config")
    path = directory / ADAPTER_FILE
    if not path.is_file():
        raise LrftError(f"{path}: missing; the adapter dir is incomplete (was the run interrupted?)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LrftError(f"{path}: not a readable safetensors file ({e}); retrain or restore it") from None
    return state, config


def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LrftError(f"{path}: missing {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LrftError(f"{path}: not valid JSON ({e})") from None


# -------------------------------------------------------------------------------- training state

def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if hasattr(obj, "tolist"):  # numpy arrays and scalars (numpy's RNG state)
        return {"__array__": obj.tolist(), "dtype": str(obj.dtype)}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__array__" in obj:
            import numpy as np

            return np.array(obj["__array__"], dtype=obj["dtype"])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    return obj


def save_tree(directory: Path, tree: dict) -> None:
    """Write a nested structure of tensors and plain values as safetensors + JSON (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(tree, tensors, "")
    save_file(tensors, str(Path(directory) / STATE_TENSORS))
    (Path(directory) / STATE_JSON).write_text(json.dumps(skeleton), encoding="utf-8")


def load_tree(directory: Path) -> dict:
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
        skeleton = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    except (SafetensorError, OSError, ValueError) as e:
        raise LrftError(f"{directory}: unreadable checkpoint ({e}); rerun with --restart to start over") from None
    return _unflatten(skeleton, tensors)


def save_checkpoint(root: Path, step: int, tree: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep_last`."""
    final = Path(root) / f"{CKPT_PREFIX}{step:09d}"
    _remove_stale(Path(root), f".{CKPT_PREFIX}")  # any step's write a kill interrupted
    with atomic_dir(final) as tmp:
        save_tree(tmp, tree)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a dir only gets its name once it is complete)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
                  and p.name[len(CKPT_PREFIX):].isdigit())
