"""Adapter dirs (safetensors + JSON) and resumable training checkpoints, written atomically.

Nothing here pickles. Training state (optimizer, scheduler, RNG) is split into its tensors, saved
with safetensors, and a JSON skeleton that records where each tensor goes and which containers were
tuples or dicts with non-string keys, so it comes back exactly. Dirs get their final name only once
complete (lrft.atomic_files), so a killed process never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrft.adapted_model import check_adapter_config
from lrft.atomic_files import atomic_dir, read_json, remove_stale
from lrft.errors import LrftError

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
CKPT_PREFIX = "step-"


# ------------------------------------------------------------------------------------ adapter dirs


def save_adapter(directory: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "lrft_method": config.get("method", "")})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json of an adapter dir, checked to hold what lrft wrote into it."""
    path = Path(directory) / CONFIG_FILE
    return check_adapter_config(read_json(path, "adapter config"), path)


def load_adapter(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of an adapter dir; one clear error for anything missing or corrupt."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    path = directory / ADAPTER_FILE
    if not path.is_file():
        raise LrftError(f"{path}: missing; the adapter dir is incomplete (was the run interrupted?)")
    return load_tensors(path), config


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; one clear error for a damaged one."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LrftError(f"{path}: not a readable safetensors file ({e}); retrain or restore it") from None


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


def load_tree(directory: Path, parts: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """The tree `save_tree` wrote to `directory`, checked to hold each of `parts` (name → type), if given."""
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
        skeleton = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    except (SafetensorError, OSError, ValueError) as e:
        raise LrftError(f"{directory}: unreadable checkpoint ({e}); rerun with --restart to start over") from None
    named = {v["__tensor__"] for v in _walk(skeleton) if isinstance(v, dict) and "__tensor__" in v}
    missing = sorted(named - set(tensors))
    wrong = [
        k for k, kind in (parts or {}).items() if not (isinstance(skeleton, dict) and isinstance(skeleton.get(k), kind))
    ]
    if missing or wrong:
        what = f"tensors {', '.join(missing[:3])} are missing" if missing else f"no valid {', '.join(wrong)}"
        raise LrftError(f"{directory}: a damaged checkpoint ({what}); rerun with --restart to start over")
    return _unflatten(skeleton, tensors)


def _walk(obj: Any):
    """Every value of a JSON skeleton, containers included."""
    yield obj
    for child in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ():
        yield from _walk(child)


def save_checkpoint(root: Path, step: int, tree: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep_last`."""
    final = Path(root) / f"{CKPT_PREFIX}{step:09d}"
    remove_stale(Path(root), f".{CKPT_PREFIX}")  # any step's write a kill interrupted
    with atomic_dir(final, what=f"checkpoint {final.name}") as tmp:
        save_tree(tmp, tree)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a dir only gets its name once it is complete)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX) :].isdigit()
    )
