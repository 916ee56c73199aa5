"""Recipes: the typed schema of a run, what a recipe file is validated against.

The schema is complete by itself: the task is one of the registered tasks, `adapter` is one variant
per registered method (chosen by `adapter.method`), so `adapter.params` is validated and typed by that
method's own params class, once. Every field carries a one-line description (`lrft init` writes them
as comments; docs/recipe-reference.md lists them). Values a run cannot use are refused here, not where
they would fail: NaN and Inf, seeds outside NumPy's range, token lengths no tokenizer takes, an empty
list of target modules, names that are no plain dir name.

Reading a file (strict YAML), `key=value` overrides and the problem lines of a bad recipe (every
problem at once, in one ConfigError) are lrft.config's; `load_recipe` and `validate` bind them to this
schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import Field, create_model, field_validator, model_validator

from lrft import methods, tracking
from lrft.config.names import distinct_names_problem, plain_name_problem
from lrft.config.overrides import apply_overrides
from lrft.config.problems import validated
from lrft.config.sections import Section
from lrft.config.yaml_files import read_yaml_mapping
from lrft.data import TASKS
from lrft.errors import LrftError
from lrft.methods import MethodParams
from lrft.preference import LOSSES

SEED_LIMIT = 2**32  # NumPy's seeds are 0 ≤ seed < 2**32 (accelerate's set_seed seeds NumPy too)
TOKENS_LIMIT = 2**20  # more tokens than any model reads; tokenizers take lengths as C integers (2**64 overflows)


class ModelConfig(Section):
    name: str = Field(description="packaged alias (minilm, smollm2), a local model dir, or a hub id")
    type: Literal["auto", "classification", "causal_lm", "seq2seq_lm"] = Field(
        "auto",
        description="head: sequence classification, causal LM or encoder-decoder LM (auto: what the task and model need)",
    )
    gguf_file: str | None = Field(None, description="a GGUF file in model.name (dir or hub repo), dequantised to train")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) to load")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the frozen base weights (adapters always train in float32)"
    )
    trust_remote_code: bool = Field(False, description="run the model repo's own code (only if you trust it)")
    quantize: Literal["nf4", "fp4", "int8"] | None = Field(
        None,
        description=(
            "QLoRA: load the frozen base's Linear layers quantized by bitsandbytes (4-bit NF4 or FP4, 8-bit); "
            "adapters stay float32 (needs `pip install 'lrft[qlora]'`)"
        ),
    )


TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
TRACKERS = tuple(tracking.PACKAGES)


class DataConfig(Section):
    task: TaskName = Field(
        description=(
            "glue/<cola|sst2|mrpc|stsb|qqp|mnli|qnli|rte|wnli>, text-classification, gsm8k, instruction, "
            "preference, commonsense or arithmetic"
        )
    )
    path: str | None = Field(None, description="local dir with the task's files (else $LRFT_DATA_DIR, else the hub)")
    max_length: int = Field(128, ge=8, le=TOKENS_LIMIT, description="truncate examples to this many tokens")
    max_train_samples: int | None = Field(None, gt=0, description="use only the first N training examples")
    max_eval_samples: int | None = Field(None, gt=0, description="use only the first N evaluation examples")
    text_column: str = Field("text", description="text-classification: field holding the text")
    text_pair_column: str | None = Field(None, description="text-classification: field of the second text, if any")
    label_column: str = Field("label", description="text-classification: field holding the label")
    label_names: list[str] | None = Field(None, description="text-classification: labels in order (default: sorted)")
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        le=TOKENS_LIMIT,
        description="preference: a pair over max_length keeps this many of its prompt's last tokens (default: half)",
    )
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="preference: share of a single file's pairs held out (by a hash of each pair)"
    )
    max_new_tokens: int = Field(
        256, gt=0, le=TOKENS_LIMIT, description="generation tasks (gsm8k): tokens generated per answer at evaluation"
    )
    format: Literal["classifier", "text-to-text"] = Field(
        "classifier",
        description="a classification task through a classifier head, or as prompts and answer words (rank-scored)",
    )
    prompt: str | None = Field(None, description="text-to-text: the prompt template, with {text} and {pair}")
    label_words: list[str] | None = Field(None, description="text-to-text: the answer word of each label, in order")
    eval_sets: list[str] | None = Field(
        None, min_length=1, description="commonsense/arithmetic: the test sets to score (default: every one in the dir)"
    )
    train_file: str | None = Field(
        None, description="commonsense/arithmetic: train on this one file instead of the mix of the suite's"
    )

    @field_validator("label_names")
    @classmethod
    def _distinct_labels(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        problem = distinct_names_problem(names) or (
            f"{names!r} is one label; a classifier needs two or more" if len(names) < 2 else None
        )
        if problem:
            raise ValueError(
                f"data.label_names: {problem}; list every label once, in order (e.g. [negative, "
                f"positive]), or leave the key out to take them from the data"
            )
        return names

    @model_validator(mode="after")
    def _room_for_responses(self):
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length: {self.max_prompt_length} tokens of prompt leave no room for a response "
                f"in data.max_length={self.max_length}; set it below data.max_length (or leave it out: half)"
            )
        return self


class AdapterConfig(Section):
    """`adapter`: a method and its params. One subclass per registered method (`adapter_variant`)."""

    method: str = Field(description=f"one of: {', '.join(methods.REGISTRY)}")
    target_modules: list[str] | None = Field(
        None,
        description="Linear layers to adapt, matched by name suffix (default: the model family's query and value projections)",
    )
    params: MethodParams = Field(default_factory=MethodParams, description="the method's parameters (rank, ...)")
    init_from: str | None = Field(
        None, description="a finished run whose adapter the training starts from (DPO after SFT: the reference too)"
    )

    @field_validator("params", mode="before")
    @classmethod
    def _empty_params(cls, value):
        return {} if value is None else value  # `params:` with nothing under it

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        if not names:
            raise ValueError(
                "adapter.target_modules: [] adapts no layer, so nothing but the head would train; list "
                "the Linear layers to adapt (e.g. [query, value]) or leave the key out for the model's "
                "default"
            )
        problem = distinct_names_problem(names)
        if problem:
            raise ValueError(
                f"adapter.target_modules: {problem}; list each Linear layer to adapt once, by name "
                f"suffix (e.g. query, value)"
            )
        return names


def adapter_variant(method: methods.Method) -> type[AdapterConfig]:
    """The `adapter` section of recipes using `method`: its name as the tag, its params class typed."""
    return create_model(
        f"AdapterConfig_{method.name}",
        __base__=AdapterConfig,
        method=(Literal[method.name], Field(description=AdapterConfig.model_fields["method"].description)),
        params=(
            method.params,
            Field(default_factory=method.params, description=AdapterConfig.model_fields["params"].description),
        ),
    )


ADAPTER_VARIANTS = {name: adapter_variant(m) for name, m in methods.REGISTRY.items()}
# Union[...] of a tuple built at run time: the `X | Y` spelling needs the members written out
AnyAdapterConfig = Annotated[Union[tuple(ADAPTER_VARIANTS.values())], Field(discriminator="method")]  # noqa: UP007


# The task head is a new, randomly initialised layer, while an adapter perturbs pretrained weights: LoRA's
# good lrs (1e-4-1e-3) leave a fresh head near its random start after a few epochs (GLUE STS-B with LoRA
# at 5e-4: Pearson 0.04; with a head at 1e-2, 0.6). The papers' own code gives the head its own lr
# (LoRTA's classifier_lr). The tiny methods' lrs (2e-2, 3e-2) are above the floor and stay as they are.
HEAD_LR_MIN = 1e-2


class DPOConfig(Section):
    loss: Literal[tuple(LOSSES)] = Field(  # type: ignore[valid-type]
        "sigmoid", description=f"preference loss: {', '.join(LOSSES)} (lrft/preference.py has each formula)"
    )
    beta: float = Field(0.1, gt=0, description="β: the strength of the reference's pull (orpo: the odds ratio's λ)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: the share of pairs assumed mislabelled (cDPO)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the reward margin γ")
    reference: Literal["auto", "precomputed", "adapters_off"] = Field(
        "auto",
        description=(
            "the reference's log-probs: precomputed once into the run dir, or each step with the adapters "
            "switched off (auto: whichever runs fewer forward passes)"
        ),
    )


class TrainConfig(Section):
    epochs: int = Field(3, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    lr: float = Field(5e-4, gt=0, description="learning rate of the adapter parameters")
    head_lr: float | None = Field(
        None,
        gt=0,
        description=(
            f"learning rate of the task head, a layer trained from scratch (default: lr, but at least {HEAD_LR_MIN:g})"
        ),
    )
    train_head: bool = Field(True, description="train the task head (classifier) along with the adapter")
    batch_size: int = Field(32, gt=0, description="examples per optimizer step (all processes together)")
    eval_batch_size: int = Field(64, gt=0, description="examples per evaluation batch")
    generation_batch_size: int | None = Field(
        None,
        gt=0,
        description=(
            "prompts per batch of evaluation's generations (default: eval_batch_size); a decoding step reads "
            "every weight whatever the batch, so larger batches cost less per token"
        ),
    )
    grad_accum: int = Field(1, gt=0, description="split each batch into this many accumulated micro-batches")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the adapter parameters")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="learning-rate schedule after warmup"
    )
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of steps spent warming up")
    warmup_steps: int | None = Field(None, ge=0, description="warmup steps (instead of warmup_ratio)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (null: no clipping)")
    skip_nonfinite: bool = Field(
        False, description="skip batches whose loss or gradients are NaN/Inf (counted) instead of stopping"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "autocast precision of training's forward pass (auto: bf16 where the device computes it natively, "
            "a CUDA GPU with bf16 or a CPU with AVX-512 BF16 or AMX, else fp32); adapters and optimizer stay fp32"
        ),
    )
    eval_precision: Literal["fp32", "auto", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast precision of evaluation (fp32: metrics that do not depend on the training hardware)",
    )
    eval_every: int | None = Field(None, gt=0, description="evaluate every N steps (default: at the end of each epoch)")
    eval_on_start: bool = Field(
        False, description="evaluate the base model before the first step (a before/after baseline)"
    )
    log_every: int = Field(10, gt=0, description="write a metrics.jsonl line every N steps")
    save_every: int | None = Field(None, gt=0, description="checkpoint every N steps (always at each epoch end)")
    save_every_minutes: float | None = Field(
        None, gt=0, description="also checkpoint when this many minutes have passed since the last checkpoint"
    )
    keep_last: int = Field(1, gt=0, description="keep this many resumable checkpoints")
    metric_for_best: str | None = Field(
        None, description="eval metric that picks the best checkpoint (default: the task's)"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="where to train (auto: GPU if there is one)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass instead of keeping them (less memory, slower)"
    )
    group_by_length: bool = Field(
        False,
        description="batch examples of similar length together (less padding); the same batches on any process count",
    )
    objective: Literal["auto", "dpo"] = Field(
        "auto", description="what training minimises: auto (the task's own loss; dpo for preference pairs) or dpo"
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="preference optimisation (train.objective: dpo)")
    report_to: list[Literal[TRACKERS]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="experiment trackers to log to: tensorboard, wandb, mlflow, trackio, ..."
    )

    @property
    def head_learning_rate(self) -> float:
        """The task head's learning rate: head_lr, else the adapter's lr but at least HEAD_LR_MIN."""
        return self.head_lr if self.head_lr is not None else max(self.lr, HEAD_LR_MIN)

    @model_validator(mode="after")
    def _warmup_once(self):
        if self.warmup_steps is not None and "warmup_ratio" in self.model_fields_set:
            raise ValueError("set train.warmup_steps or train.warmup_ratio, not both")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum ({self.grad_accum})"
            )
        return self


class CalibrationConfig(Section):
    samples: int = Field(
        32, gt=0, description="training examples run through the model before training (methods that calibrate)"
    )
    batch_size: int = Field(8, gt=0, description="examples per calibration batch")
    seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT, description="seed of the sample draw (default: the recipe's seed)"
    )
    cache: str | None = Field(
        None, description="reuse the statistics of another run (its dir or calibration/ dir) if they match"
    )
    dtype: Literal["float32", "float64"] = Field("float32", description="accumulation dtype of the covariances")
    center: bool = Field(False, description="subtract the mean from the covariance (the paper's Algorithm 1 does not)")


class OutputConfig(Section):
    dir: str = Field("runs", description="runs are written to <dir>/<name>/")


NAME_MAX = 200  # a run dir's name, with room for the temporary names of atomic writes next to it


class Recipe(Section):
    name: str | None = Field(
        None, description="run name: the run dir is output.dir/<name> (default: the recipe file's stem)"
    )
    seed: int = Field(42, ge=0, lt=SEED_LIMIT, description="seed of adapter init, data order and dropout")
    model: ModelConfig
    data: DataConfig
    adapter: AnyAdapterConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if name is not None and (
            problem := plain_name_problem(name, "run name", refused="; no '/' or '..'", max_length=NAME_MAX)
        ):
            raise ValueError(f"name: {problem}")
        return name

    @model_validator(mode="after")
    def _head_fits_task(self):
        task = TASKS[self.data.task]
        if self.data.format == "text-to-text" and task.problem not in ("classification", "regression"):
            raise ValueError(
                f"data.format: text-to-text renders a classification or regression task, and {task.name} is "
                f"{task.problem}; leave data.format out"
            )
        needed = "causal_lm" if task.causal or self.data.format == "text-to-text" else "classification"
        fits = ("auto", needed, "seq2seq_lm") if needed == "causal_lm" else ("auto", needed)  # prompt → response
        if self.model.type not in fits:
            raise ValueError(
                f"model.type: {self.model.type} does not fit data.task {self.data.task}, which needs "
                f"{needed}; set model.type: {needed} or auto"
            )
        return self

    @model_validator(mode="after")
    def _objective_fits_task(self):
        problem = TASKS[self.data.task].problem
        if self.train.objective == "dpo" and problem != "preference":
            raise ValueError(
                f"train.objective: dpo trains preference pairs, and data.task {self.data.task} is {problem}; "
                "set data.task: preference (pairs of chosen and rejected responses) or leave train.objective out"
            )
        if self.adapter.init_from and self.train.dpo.reference == "adapters_off" and problem == "preference":
            raise ValueError(
                "train.dpo.reference: adapters_off makes the base model the reference, not the adapter.init_from "
                "policy; set train.dpo.reference: precomputed (or auto) to start from that run and refer to it"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ------------------------------------------------------- loading: lrft.config bound to this schema

NAMED_CHOICES = ("data.task",)  # a wrong value is answered with a did-you-mean, not every task there is


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; the run name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise LrftError(f"recipe: no file at {path}; write one with `lrft init -o {path}`")
    raw = read_recipe_mapping(path)
    overridden = apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    return validate(raw, source=str(path), overrides=overridden)


def read_recipe_mapping(path: Path) -> dict:
    """The raw mapping of a recipe file (a user's, or a run dir's recipe.yaml), not yet validated."""
    return read_yaml_mapping(path, "a recipe", "model:, data:, adapter:, ...")


def validate(raw: dict, source: str | None = None, overrides: dict[str, str] | None = None) -> Recipe:
    """A Recipe from a raw mapping, or a ConfigError listing every problem found. A problem of a key a
    command-line override set (`overrides`: dotted key → the override) is named as the override's."""
    return validated(Recipe, raw, source, overrides, whole="recipe", named_choices=NAMED_CHOICES)
