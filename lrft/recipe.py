"""Recipes: the typed YAML schema of a run, `key=value` overrides, and strict validation.

Every field carries a one-line description (`lrft init` writes them as comments). Validation gathers
every problem of a recipe (unknown keys with a did-you-mean, wrong types, out-of-range values,
conflicting options) into one ConfigError, so a user fixes them all in one go.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lrft import methods
from lrft.data import TASKS
from lrft.errors import ConfigError, LrftError, did_you_mean


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(description="packaged alias (minilm, smollm2), a local model dir, or a hub id")
    type: Literal["auto", "classification", "causal_lm"] = Field(
        "auto", description="head: sequence classification or causal LM (auto: what the task needs)")
    gguf_file: str | None = Field(None, description="a GGUF file in model.name (dir or hub repo), dequantised to train")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) to load")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the frozen base weights (adapters always train in float32)")
    trust_remote_code: bool = Field(False, description="run the model repo's own code (only if you trust it)")


class DataConfig(Section):
    task: str = Field(description="glue/<cola|sst2|mrpc|stsb|qqp|mnli|qnli|rte|wnli>, text-classification, gsm8k or instruction")
    path: str | None = Field(None, description="local dir with the task's files (else $LRFT_DATA_DIR, else the hub)")
    max_length: int = Field(128, ge=8, description="truncate examples to this many tokens")
    max_train_samples: int | None = Field(None, gt=0, description="use only the first N training examples")
    max_eval_samples: int | None = Field(None, gt=0, description="use only the first N evaluation examples")
    text_column: str = Field("text", description="text-classification: field holding the text")
    text_pair_column: str | None = Field(None, description="text-classification: field of the second text, if any")
    label_column: str = Field("label", description="text-classification: field holding the label")
    label_names: list[str] | None = Field(None, description="text-classification: labels in order (default: sorted)")
    max_new_tokens: int = Field(256, gt=0, description="generation tasks (gsm8k): tokens generated per answer at evaluation")


class AdapterConfig(Section):
    method: str = Field(description=f"one of: {', '.join(methods.REGISTRY)}")
    target_modules: list[str] | None = Field(
        None, description="Linear layers to adapt, matched by name suffix (default: the model's attention query, value)")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (rank, ...)")


class TrainConfig(Section):
    epochs: int = Field(3, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    lr: float = Field(5e-4, gt=0, description="learning rate of the adapter parameters")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the task head (default: lr)")
    train_head: bool = Field(True, description="train the task head (classifier) along with the adapter")
    batch_size: int = Field(32, gt=0, description="examples per optimizer step (all processes together)")
    eval_batch_size: int = Field(64, gt=0, description="examples per evaluation batch")
    grad_accum: int = Field(1, gt=0, description="split each batch into this many accumulated micro-batches")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the adapter parameters")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="learning-rate schedule after warmup")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of steps spent warming up")
    warmup_steps: int | None = Field(None, ge=0, description="warmup steps (instead of warmup_ratio)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (null: no clipping)")
    skip_nonfinite: bool = Field(False, description="skip batches whose loss or gradients are NaN/Inf (counted) instead of stopping")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast precision of the forward pass")
    eval_every: int | None = Field(None, gt=0, description="evaluate every N steps (default: at the end of each epoch)")
    eval_on_start: bool = Field(False, description="evaluate the base model before the first step (a before/after baseline)")
    log_every: int = Field(10, gt=0, description="write a metrics.jsonl line every N steps")
    save_every: int | None = Field(None, gt=0, description="checkpoint every N steps (always at each epoch end)")
    keep_last: int = Field(1, gt=0, description="keep this many resumable checkpoints")
    metric_for_best: str | None = Field(None, description="eval metric that picks the best checkpoint (default: the task's)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="where to train (auto: GPU if there is one)")

    @model_validator(mode="after")
    def _warmup_once(self):
        if self.warmup_steps is not None and "warmup_ratio" in self.model_fields_set:
            raise ValueError("set train.warmup_steps or train.warmup_ratio, not both")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum ({self.grad_accum})")
        return self


class CalibrationConfig(Section):
    samples: int = Field(32, gt=0, description="training examples run through the model before training (methods that calibrate)")
    batch_size: int = Field(8, gt=0, description="examples per calibration batch")
    seed: int | None = Field(None, description="seed of the sample draw (default: the recipe's seed)")
    cache: str | None = Field(None, description="reuse the statistics of another run (its dir or calibration/ dir) if they match")
    dtype: Literal["float32", "float64"] = Field("float32", description="accumulation dtype of the covariances")
    center: bool = Field(False, description="subtract the mean from the covariance (the paper's Algorithm 1 does not)")


class OutputConfig(Section):
    dir: str = Field("runs", description="runs are written to <dir>/<name>/")


class Recipe(Section):
    name: str | None = Field(None, description="run name: the run dir is output.dir/<name> (default: the recipe file's stem)")
    seed: int = Field(42, description="seed of adapter init, data order and dropout")
    model: ModelConfig
    data: DataConfig
    adapter: AdapterConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name

    def method_params(self):
        """`adapter.params` validated by the method's own schema, defaults filled in."""
        return methods.get(self.adapter.method).params.model_validate(self.adapter.params)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------- loading

def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; the run name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise LrftError(f"recipe: no file at {path}; write one with `lrft init -o {path}`")
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LrftError(f"{path}: a recipe is a YAML mapping (model:, data:, adapter:, ...), not a {type(raw).__name__}")
    apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    return validate(raw, source=str(path))


def parse_yaml(text: str, source: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LrftError(f"{source}: YAML syntax error{where}: {problem}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Apply `a.b.c=value` overrides in place; values are parsed as YAML (8 → int, [q,v] → list)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise LrftError(f"override {item!r}: expected key=value, e.g. train.lr=1e-3")
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1], 1):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LrftError(f"override {item!r}: '{part}' is not a section; set {'.'.join(parts[:depth])}=... "
                                "itself")
            node = child
        node[parts[-1]] = parse_yaml(value, f"override {item!r}") if value else None


def validate(raw: dict, source: str | None = None) -> Recipe:
    """A Recipe from a raw mapping, or a ConfigError listing every problem found."""
    problems: list[str] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems += _render(e, Recipe, raw, ())
    problems += _check_names(raw)
    params = _check_method_params(raw, problems)
    if problems:
        raise ConfigError(problems, source)
    recipe.adapter.params = params.model_dump()
    return recipe


def _check_names(raw: dict) -> list[str]:
    out = []
    name = raw.get("name")
    if isinstance(name, str) and not _NAME_RE.match(name):
        out.append(f"name: {name!r} is not a plain run name (letters, digits, '.', '_', '-'; no '/' or '..')")
    data = raw.get("data")
    task = data.get("task") if isinstance(data, dict) else None
    if isinstance(task, str) and task not in TASKS:
        out.append(f"data.task: unknown task {task!r}{did_you_mean(task, TASKS)}; choose one of: {', '.join(TASKS)}")
    model = raw.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if isinstance(task, str) and task in TASKS and kind in ("classification", "causal_lm"):
        needed = "causal_lm" if TASKS[task].problem == "causal_lm" else "classification"
        if kind != needed:
            out.append(f"model.type: {kind} does not fit data.task {task}, which needs {needed}; set model.type: {needed} "
                       f"or auto")
    return out


def _check_method_params(raw: dict, problems: list[str]):
    adapter = raw.get("adapter")
    if not isinstance(adapter, dict) or not isinstance(adapter.get("method"), str):
        return None
    name = adapter["method"]
    if name not in methods.REGISTRY:
        problems.append(f"adapter.method: unknown method {name!r}{did_you_mean(name, methods.REGISTRY)}; "
                        f"choose one of: {', '.join(methods.REGISTRY)}")
        return None
    params = adapter.get("params") or {}
    if not isinstance(params, dict):
        return None  # the Recipe schema already reported it
    schema = methods.REGISTRY[name].params
    try:
        return schema.model_validate(params)
    except ValidationError as e:
        problems += _render(e, schema, params, ("adapter", "params"))
        return None


def _render(err: ValidationError, schema: type[BaseModel], raw: dict, prefix: tuple) -> list[str]:
    out = []
    for e in err.errors():
        loc = prefix + tuple(str(p) for p in e["loc"])
        where = ".".join(loc) if loc else "recipe"
        kind = e["type"]
        if kind == "extra_forbidden":
            known = _fields_at(schema, e["loc"][:-1])
            out.append(f"{where}: unknown key{did_you_mean(str(e['loc'][-1]), known)}"
                       + (f"; known keys here: {', '.join(known)}" if known else ""))
        elif kind == "missing":
            out.append(f"{where}: required, but missing")
        elif kind == "value_error":
            out.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            out.append(f"{where}: {e['msg'][0].lower()}{e['msg'][1:]} (got {e['input']!r})")
    return out


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section at `loc` in `schema`."""
    for part in loc:
        field = schema.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        schema = ann
    return list(schema.model_fields)


# ------------------------------------------------------------------------------- commented YAML

def commented_yaml(recipe: Recipe, header: list[str]) -> str:
    """The recipe as YAML with each field's description as a comment (what `lrft init` writes)."""
    data = recipe.model_dump(mode="json")
    lines = [f"# {h}" if h else "#" for h in header] + [""]

    def scalar(v) -> str:
        return yaml.safe_dump(v, default_flow_style=True, width=10_000, allow_unicode=True).removesuffix("...\n").strip()

    def emit(schema: type[BaseModel], values: dict, indent: str) -> None:
        for key, f in schema.model_fields.items():
            value = values.get(key)
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append(f"{indent}{key}:" + (f"  # {f.description}" if f.description else ""))
                emit(ann, value, indent + "  ")
            elif key == "params" and schema is AdapterConfig:
                lines.append(f"{indent}params:  # {f.description}")
                emit(methods.get(recipe.adapter.method).params, value, indent + "  ")
            else:
                lines.append(f"{indent}{key}: {scalar(value)}" + (f"  # {f.description}" if f.description else ""))
            if indent == "" and isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append("")

    emit(Recipe, data, "")
    return "\n".join(lines).rstrip() + "\n"
