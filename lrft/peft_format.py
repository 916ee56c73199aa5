"""The PEFT LoRA format: export any lrft adapter exactly, and read PEFT LoRA adapters back in.

Every lrft method is per module exactly a rank-r LoRA: `Adapter.lora_factors()` gives lora_A (r×in)
and lora_B (out×r) with every scale folded into lora_B. The export writes them as PEFT's
`base_model.model.<module>.lora_{A,B}.weight` with lora_alpha = r (scaling 1), per-module ranks
(talora) through `rank_pattern` and `alpha_pattern`, a trained task head in `modules_to_save`. So the
served LoRA computes what lrft trained, with no approximation: tlora → (Aᵀ, α·CᵀBᵀ), talora → (A,
s_i·B), lorta → (Aᵀ, s·S_lm) for q/k/v (a fused q/k/v projection: its slices' S stacked in its row
order) and (S_lmᵀ, s·A) for o. Conv1D bases (GPT-2) set `fan_in_fan_out`, as PEFT does; the factors
keep their shapes. Before the dir gets its name, each module's exported factors are checked against
the lrft forward on a probe input.

The base model: adapter_config.json's base_model_name_or_path is a name that loads on another
machine, never this one's path. A packaged alias (minilm, smollm2) is named by the hub model it
packages (`lrft.models.Alias.hub_id`), checked by the weights file's sha256: the installed file against
the alias's hub record, and against the hub's file where the local HF cache holds it (a mismatch is
warned about and recorded). lrft_export.json says all of it under base_model.alias: the hub id, the hub
repo, file, commit and sha256 of the weights, the checks' outcomes, and for a GGUF alias that the
weights trained on are the dequantised GGUF (dequantized_from_gguf), which differ from the hub
model's own bf16 weights by the quantisation: for lrft's outputs serve on the GGUF (exact_base).

Reading: a PEFT LoRA dir (LoraConfig, safetensors) becomes lrft `lora` adapters with its per-module
ranks and scales, so `lrft eval` and `lrft merge` work on adapters trained elsewhere (fan_in_fan_out
ones on Conv1D bases included). Its base: an lrft export's own (the alias it was trained on, or, where
the alias's package is not installed, the alias's weights on the hub; its fingerprint is checked);
else base_model_name_or_path, which for the hub id of a packaged HF-format alias not in the local HF
cache is the installed alias, when its weights file has the hub's sha256.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from lrft import console, methods, quantize
from lrft.adapted_model import Opened, attach, check_fingerprint, load_base
from lrft.atomic_files import atomic_dir, file_sha256, read_json
from lrft.checkpoint import load_tensors
from lrft.data.text_to_text import task_for
from lrft.errors import LrftError
from lrft.inject import adapted
from lrft.methods import Built
from lrft.methods.lora import LoRA
from lrft.models import ALIASES, Alias, looks_local, resolve
from lrft.recipe import DataConfig, ModelConfig
from lrft.targets import OUTPUT_HEADS, head_modules, is_encoder_decoder

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PROVENANCE = "lrft_export.json"  # PEFT's config keeps PEFT's keys only; where the adapter came from goes here
PREFIX = "base_model.model."
# The exported branch x·Aᵀ·Bᵀ sums the lrft branch's products in another order: float32 rounding of a
# share of the branch's own size, growing with √fan-in (one layer of lrft.merge's reasoning). Measured
# on every tiny family × method at ‖ΔW‖/‖W0‖ of 0.3% and 3%: at most 0.8 · eps_fp32 · √fan-in of the
# branch's max |output|; allowed: 16 times that, far below a wrong factor or scale (a share of 1).
EXPORT_ROUNDING_FACTOR = 16.0
TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "preference": "CAUSAL_LM"}


def is_peft_dir(path: Path) -> bool:
    """Whether `path` has a PEFT adapter's files (what they hold, `load_peft` checks)."""
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


# ------------------------------------------------------------------------------------------- export


def export(opened: Opened, out: Path, force: bool = False) -> dict:
    """Write an opened run's adapter as a PEFT LoRA dir at `out` (atomically); returns the export report."""
    a, config, run_dir = opened.adapted, opened.config, opened.run_dir
    heads = list(head_modules(a.model)) if config.get("head_trained") else []
    state, lora_config, worst = lora_adapter(a.model, heads)
    r, others = lora_config["r"], lora_config["rank_pattern"]
    base = config["base_model"]
    base_name, alias = export_base(opened.model_cfg)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if is_encoder_decoder(a.model) else TASK_TYPES[a.task.problem],
        "base_model_name_or_path": base_name,
        "revision": base.get("revision"),
        **lora_config,
    }
    report = {
        "run_dir": str(run_dir),
        "out": str(out),
        "format": "peft",
        "method": config["method"],
        "modules": len(lora_config["target_modules"]),
        "rank": r,
        "rank_pattern": len(others),
        "modules_to_save": heads,
        "max_abs_branch_diff": worst,
        "base_model_name_or_path": base_name,
        **({"base_model_note": alias["note"]} if alias and "note" in alias else {}),
        **({"quantized_base": opened.model_cfg.quantize} if opened.model_cfg.quantize else {}),
    }
    with atomic_dir(out, overwrite=force, flag="--out") as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
        provenance = {
            "lrft_method": config["method"],
            "lrft_params": config["params"],
            "run_dir": str(run_dir),
            "base_model": {
                **base,
                "resolved_path": resolve(opened.model_cfg.name, opened.model_cfg.gguf_file, opened.model_cfg.revision),
                **({"alias": alias} if alias else {}),
            },
            "task": config["task"],
            "format": opened.data_cfg.format,  # text-to-text: the task as prompts and answer words
            "label_names": config.get("label_names"),
            "data_source": config.get("data_source"),
            # serve on the base quantized as it trained (its BitsAndBytesConfig), or merge with lrft merge
            "quantization": quantize.model_quantization(a.model),
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return report


def export_lines(report: dict) -> list[str]:
    """What `lrft merge --format peft` prints: where the adapter went and how exactly it matches."""
    others = f" ({report['rank_pattern']} modules with their own rank)" if report["rank_pattern"] else ""
    note = [report["base_model_note"]] if report.get("base_model_note") else []
    return [
        f"PEFT LoRA adapter written to {report['out']}: {report['modules']} modules, rank {report['rank']}{others}, "
        f"base model {report['base_model_name_or_path']}",
        *note,
        f"exported factors match the lrft branches to {report['max_abs_branch_diff']:.2g}",
        *(
            [
                f"trained on a {report['quantized_base']} base: serve it on the base quantized the same way "
                f"(the BitsAndBytesConfig in {PROVENANCE}), or on the model `lrft merge` writes"
            ]
            if report.get("quantized_base")
            else []
        ),
    ]


def lora_adapter(model, heads: list[str]) -> tuple[dict[str, torch.Tensor], dict, float]:
    """The model's adapters as PEFT LoRA tensors (and the named heads' as modules_to_save), the LoraConfig
    keys that describe them, and the largest difference of an exported branch from its lrft branch."""
    state, ranks, transposed = {}, {}, False
    for name, wrapper in adapted(model).items():
        lora_A, lora_B = (t.detach().contiguous() for t in wrapper.adapter.lora_factors())
        state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"] = lora_A, lora_B
        ranks[name] = lora_A.shape[0]
        transposed |= wrapper.transposed
    for head in heads:
        for key, value in model.get_submodule(head).state_dict().items():
            state[f"{PREFIX}{head}.{key}"] = value.detach().contiguous()
    worst = _check_export(model, state)
    r = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank; the others are patterns
    others = {n: k for n, k in ranks.items() if k != r}
    # fan_in_fan_out: PEFT's flag for Conv1D bases (weight stored in × out); lora_A and lora_B keep their
    # shapes, only PEFT's own merge transposes
    config = {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(ranks),
        "modules_to_save": heads or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": transposed,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return state, config, worst


@torch.no_grad()
def _check_export(model, state: dict[str, torch.Tensor]) -> float:
    """max |lrft branch − exported LoRA branch| over every module, on a probe input (eval mode)."""
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for name, wrapper in adapted(model).items():
        ad = wrapper.adapter
        was = ad.training
        ad.eval()
        x = torch.randn(8, wrapper.in_features, generator=gen)
        got = x @ state[f"{PREFIX}{name}.lora_A.weight"].T @ state[f"{PREFIX}{name}.lora_B.weight"].T
        want = ad(x.to(next(iter(ad.lora_factors())).device)).float().cpu()
        ad.train(was)
        diff = float((got - want).abs().max())
        tolerance = (
            EXPORT_ROUNDING_FACTOR
            * torch.finfo(torch.float32).eps
            * math.sqrt(wrapper.in_features)
            * float(want.abs().max())
        )
        if diff > tolerance:
            raise RuntimeError(
                f"PEFT export of {name} differs from the lrft branch by {diff:.3g} > {tolerance:.3g} "
                f"(float32 rounding of its branch)"
            )
        worst = max(worst, diff)
    return worst


def portable_name(name: str) -> str:
    """The base model as PEFT's config names it on another machine: the hub id the recipe gave, a
    relative dir as given, an absolute dir by its own name; never this machine's absolute path
    (lrft_export.json keeps that, as base_model.resolved_path). An alias: see `export_base`."""
    path = Path(name).expanduser()
    return path.name if path.is_absolute() else name


def export_base(model_cfg) -> tuple[str, dict | None]:
    """(base_model_name_or_path, lrft_export.json's alias record or None): an alias is named by the hub
    model it packages, unless the recipe picked another GGUF file than the alias's own."""
    alias = ALIASES.get(model_cfg.name)
    if alias is None or not alias.hub_id or model_cfg.gguf_file not in (None, alias.gguf):
        return portable_name(model_cfg.name), None
    return alias.hub_id, alias_record(model_cfg.name)


def alias_record(name: str) -> dict:
    """What an export of a run on the alias `name` records of its base: the hub model, the hub file its
    weights are a copy of, and whether the installed file is that file (by sha256; also against the
    hub's own file where the local HF cache has it). Warns when a check fails."""
    alias = ALIASES[name]
    files = alias.files_dir()
    installed = files / alias.weights_file if files else None
    sha = file_sha256(installed) if installed and installed.is_file() else None
    cached = hub_cached(alias)
    hub_cache = "not cached" if cached is None else "same file" if file_sha256(cached) == sha else "differs"
    record = {
        "name": name,
        "hub_id": alias.hub_id,
        "weights_repo": alias.weights_repo,
        "weights_file": alias.weights_file,
        "weights_revision": alias.weights_revision,
        "weights_sha256": sha,
        "matches_hub_record": sha == alias.weights_sha256,
        "hub_cache": hub_cache,
        "dequantized_from_gguf": alias.gguf is not None,
    }
    what = f"the installed {alias.weights_file} of the alias {name}"
    if not record["matches_hub_record"]:
        console.warn(
            f"{what} is not {alias.weights_repo}'s at {alias.weights_revision} (sha256 {sha} vs "
            f"{alias.weights_sha256}); the export names {alias.hub_id} as its base all the same"
        )
    if hub_cache == "differs":
        console.warn(
            f"{what} differs from {alias.weights_repo}'s in the local HF cache ({cached}); the export "
            f"names {alias.hub_id} as its base all the same"
        )
    if alias.gguf:
        record["exact_base"] = hub_source(alias)
        record["note"] = (
            f"the base weights trained on are {alias.gguf} of {alias.gguf_repo} dequantised to float32, "
            f"which differ from {alias.hub_id}'s own by the quantisation; for lrft's outputs load the "
            f"base from {alias.gguf_repo} with gguf_file={alias.gguf!r}"
        )
    return record


def hub_source(alias: Alias) -> dict:
    """The alias's very weights on the hub, as model settings (name, gguf_file, revision)."""
    return {"name": alias.weights_repo, "gguf_file": alias.gguf, "revision": alias.weights_revision}


def hub_cached(alias: Alias) -> Path | None:
    """The hub's copy of the alias's weights file in the local HF cache (main, else the pinned commit), if any."""
    from huggingface_hub import try_to_load_from_cache

    for revision in (None, alias.weights_revision):
        found = try_to_load_from_cache(alias.weights_repo, alias.weights_file, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


# ------------------------------------------------------------------------------------------- import


def load_peft(path: Path, task_name: str | None, base_name: str | None = None, force: bool = False) -> Opened:
    """A PEFT LoRA dir opened on its base model as lrft `lora` adapters, like `lrft.open_runs.load_run`."""
    path = Path(path)
    config = read_json(path / CONFIG, "PEFT adapter config")
    if "peft_type" not in config:
        raise LrftError(f"{path / CONFIG}: no peft_type, so not a PEFT adapter config; restore the adapter dir")
    if config["peft_type"] != "LORA":
        raise LrftError(f"{path}: a PEFT {config['peft_type']} adapter; lrft reads LoRA adapters only")
    if config.get("use_dora"):  # fan_in_fan_out (Conv1D bases) needs nothing: lora_A and lora_B keep their shapes
        raise LrftError(f"{path}: use_dora=True is not supported; lrft reads plain LoRA adapters of Linear layers")
    provenance = _read_provenance(path)
    task_name = task_name or provenance.get("task")
    if not task_name:
        raise LrftError(f"--task: {path} is a PEFT adapter; say which task it is for, e.g. --task glue/mrpc")
    model_cfg = ModelConfig(**{"revision": config.get("revision"), **base_model(path, config, provenance, base_name)})
    factors, heads = _read_weights(path / WEIGHTS)
    fmt = provenance.get("format", "classifier") if task_name == provenance.get("task") else "classifier"
    task = task_for(task_name, fmt)
    label_names = provenance.get("label_names") or (list(task.label_names) if task.label_names else None)
    if label_names is None and task.problem == "classification":  # users' own labels: as many as the head has
        rows = [
            v.shape[0] for k, v in sorted(heads.items()) if k.endswith("weight") and k.split(".")[0] in OUTPUT_HEADS
        ]
        if not rows:
            raise LrftError(
                f"{path}: no trained head and no label names; lrft cannot tell how many labels {task.name} has here"
            )
        label_names = [str(i) for i in range(rows[-1])]
    base = load_base(model_cfg, task, label_names, sorted(factors), min(f["A"].shape[0] for f in factors.values()))
    check_fingerprint(provenance, base, path, force)  # exported by lrft: the base it was trained on is known
    adapters = _lora_adapters(path, config, base.targets, factors)
    lora = methods.get("lora")
    params = lora.params(rank=min(ad.A.shape[0] for ad in adapters.values()))
    a = attach(base, Built(adapters, meta={"peft": str(path)}), lora, params, train_head=bool(heads))
    own = a.model.state_dict()
    for key, value in heads.items():
        if key not in own or own[key].shape != value.shape:
            raise LrftError(f"{path}: the saved head tensor {key} does not fit {model_cfg.name} for {task.name}")
        own[key].copy_(value)
    a.model.eval()
    config = {
        "method": "lora",
        "source": "peft",
        "task": task.name,
        "params": params.model_dump(),
        "base_model": {"name": model_cfg.name},
        "data_source": provenance.get("data_source") if provenance.get("task") == task.name else None,
    }
    return Opened(a, config, model_cfg, DataConfig(task=task.name, format=fmt))


def _lora_adapters(path: Path, config: dict, targets: list, factors: dict[str, dict[str, torch.Tensor]]) -> dict:
    """lrft `lora` adapters holding a PEFT dir's lora_A and lora_B per target, at PEFT's scale (lora_alpha
    or its alpha_pattern over the rank, or over √rank with use_rslora)."""
    r = int(config.get("r", 8))
    adapters = {}
    for t in targets:
        A, B = factors[t.name]["A"], factors[t.name]["B"]
        rank = A.shape[0]
        alpha = float(_pattern(config.get("alpha_pattern") or {}, t.name, config.get("lora_alpha", r)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if B.shape != (t.shape[0], rank) or A.shape[1] != t.shape[1]:
            raise LrftError(
                f"{path}: {t.name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, which do not fit "
                f"the base layer ({t.shape[0]}×{t.shape[1]}); give the adapter's base model with --base"
            )
        adapters[t.name] = LoRA(A.clone(), t.shape[0], scale, 0.0)
        with torch.no_grad():
            adapters[t.name].B.copy_(B)
    return adapters


def _read_weights(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(lora_A and lora_B per module, the saved head tensors) of a PEFT weights file."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    for key, value in load_tensors(path).items():
        m = re.match(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])(?:\.\w+)?\.weight$", key)
        if m:
            factors.setdefault(m.group(1), {})[m.group(2)] = value.float()
        elif key.startswith(PREFIX):
            heads[key[len(PREFIX) :].replace(".modules_to_save.default.", ".")] = value
    half = sorted(name for name, f in factors.items() if set(f) != {"A", "B"})
    if not factors or half:
        what = f"{half[0]} has only one of lora_A and lora_B" if half else "it holds no lora_A / lora_B tensors"
        raise LrftError(f"{path}: not the weights of a PEFT LoRA adapter ({what}); restore the adapter dir")
    return factors, heads


def base_model(path: Path, config: dict, provenance: dict, given: str | None) -> dict:
    """The base model to load a PEFT dir on: `given` (--base); else, for an lrft export, the model its run
    trained on when it is here (an alias, a hub id, or a dir that exists; with its GGUF file), an alias
    not installed here by its weights on the hub; else the config's base_model_name_or_path (the
    packaged alias, for the hub id of one not in the local HF cache: see `packaged_alias`)."""
    if given:
        return {"name": given}
    trained = provenance.get("base_model") or {}
    name = trained.get("name")
    if name in ALIASES and ALIASES[name].files_dir() is None and trained.get("gguf_file") in (None, ALIASES[name].gguf):
        return hub_source(ALIASES[name])  # the fingerprint check then tells whether they are the weights trained on
    if name and (not looks_local(name) or Path(name).expanduser().exists()):
        return {"name": name, "gguf_file": trained.get("gguf_file"), "quantize": trained.get("quantize")}
    if not config.get("base_model_name_or_path"):
        raise LrftError(f"--base: {path} names no base model (base_model_name_or_path); give one with --base")
    hub_id = config["base_model_name_or_path"]
    alias = packaged_alias(hub_id, config.get("revision"))
    return {"name": alias, "revision": None} if alias else {"name": hub_id}


def packaged_alias(hub_id: str, revision: str | None) -> str | None:
    """The installed alias that packages the hub model `hub_id` when the local HF cache does not have it
    and the installed weights file has the hub's sha256 (so no download is needed); None otherwise. A
    GGUF alias never stands for its hub model: its dequantised weights are not the hub's."""
    for name, alias in ALIASES.items():
        if alias.gguf or alias.hub_id != hub_id or revision not in (None, "main", alias.weights_revision):
            continue
        files = alias.files_dir()
        if files is None or not (files / alias.weights_file).is_file() or hub_cached(alias) is not None:
            return None
        if file_sha256(files / alias.weights_file) != alias.weights_sha256:
            return None
        console.log(
            f"{hub_id} is not in the local HF cache: using the installed alias {name}, whose "
            f"{alias.weights_file} is the hub's (sha256 {alias.weights_sha256[:12]}…)"
        )
        return name
    return None


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module name it ends with (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def _read_provenance(path: Path) -> dict:
    p = path / PROVENANCE
    return read_json(p, "lrft export record") if p.is_file() else {}
