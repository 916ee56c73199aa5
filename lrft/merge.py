"""`lrft merge`: fold a run's adapter into its base weights and write a plain Hugging Face model dir,
or (`--format peft`) export it as a standard PEFT LoRA adapter dir (lrft.peft_format).

ΔW is added module by module in fp32 and cast to the base dtype, then the model to `--dtype`; one
copy of the model is in memory at a time (merging happens in place, on the CPU unless the model is
elsewhere). Parity on real validation batches: the merged model's logits against the adapted
model's (in fp32 refused beyond what float32 rounding explains: logit_parity), for
bf16/fp16 also against the fp32 merge, with how much of each module's update survives rounding to
that dtype (a verdict: within rounding, or a warning), and for causal LMs identical greedy
generations. A cast keeps the buffers a model computes for itself (rotary inv_freq) in their dtype,
as from_pretrained does, so the files give the logits that were checked. The dir is written under
a temporary name and loaded back with plain transformers before it gets its final name;
`merge_report.json` records the numbers and where the parity data came from.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import torch

from lrft import console, peft_format, quantize
from lrft.adapted_model import Opened
from lrft.atomic_files import atomic_dir, check_writable
from lrft.data import PreferenceSplit, collator, features, get_task, load_task_data
from lrft.data.causal import prompt_features
from lrft.errors import LrftError
from lrft.guard import check_output
from lrft.inject import adapted, merge
from lrft.models import load_model
from lrft.open_runs import data_settings, load_run, open_adapted
from lrft.run_layout import MERGE_REPORT
from lrft.run_lock import writer_lock
from lrft.targets import head_modules, is_encoder_decoder, stack_layers

# An fp32 merge computes (W0 + ΔW)·x where the adapted model computed W0·x + ΔW·x: the same products
# summed in another order, after W0 + ΔW was rounded once to fp32. Rounding errors of eps_fp32 relative
# to the numbers summed, accumulating as a random walk over each sum (√width, the longest dot product)
# and over the layers (√depth), so the logits are off by a share of their own size:
# |Δlogit| ≈ c · eps_fp32 · √(depth · width) · max|logit|. Measured on correct merges of adapters with
# ‖ΔW‖/‖W0‖ of 3% on every tiny family × method (tests/test_merge_parity.py) and of 0.3% to 10% on
# SmolLM2-135M (30 layers, width 1536, max|logit| 42 on GSM8K, |Δlogit| ~1e-4), c is 0.01 to 0.42
# (SmolLM2: 0.1) whatever the size of ΔW. The check allows c = PARITY_ROUNDING_FACTOR, about ten
# times the largest seen: on SmolLM2 1e-4 of max|logit| (4.3e-3), while a wrong merge there shows
# 2.7e-4 of it (one of its 210 modules left unmerged at ‖ΔW‖/‖W0‖ = 0.3%) to 8e-2 (ΔW added twice at 3%).
PARITY_ROUNDING_FACTOR = 4.0
UPDATE_KEPT_MIN = 0.5  # a bf16/fp16 merge warns when a module keeps less than half of its update
PARITY_EXAMPLES = {"classification": 64, "regression": 64, "causal_lm": 4, "preference": 4}
CAUSAL_PARITY_TOKENS = 128  # logits of a causal LM are (tokens × vocab): a short window suffices
GENERATION_PROMPTS, GENERATION_TOKENS = 3, 24
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a merge does, in order (the notes of its progress).
MERGE_STEPS = (
    "loading the adapted model",
    "the adapted model's outputs",
    "merging",
    "the merged model's outputs",
    "writing",
    "the written model's outputs",
)


FORMATS = ("hf", "peft")  # `--format`: a merged model dir, or the adapter as a PEFT LoRA dir


def merge_command(
    run_dir: str | Path,
    out: Path,
    *,
    format: str = "hf",
    dtype: str | None = None,
    force: bool = False,
    task: str | None = None,
    base: str | None = None,
    data_path: str | None = None,
) -> dict:
    """`lrft merge`: `merge_run` (format hf) or `export_run` (format peft); its report."""
    if format not in FORMATS:
        raise LrftError(f"--format: unknown {format!r}; choose hf (a merged model) or peft (a PEFT LoRA adapter)")
    if format == "peft":
        if dtype is not None:
            raise LrftError("--dtype: a PEFT export keeps the adapter in float32; drop --dtype or use --format hf")
        return export_run(run_dir, out, force=force)
    return merge_run(run_dir, out, dtype=dtype, force=force, task=task, base=base, data_path=data_path)


def report_lines(report: dict, format: str) -> list[str]:
    """What `lrft merge` prints for its `--format`."""
    return peft_format.export_lines(report) if format == "peft" else parity_lines(report)


def export_run(run_dir: Path, out: Path, *, force: bool = False) -> dict:
    """Write the run's adapter as a PEFT LoRA dir at `out` (atomically); returns the export report."""
    out = Path(out)
    _check_out(out, force, {Path(run_dir): "the run dir this command reads"})
    with writer_lock(out):
        opened = load_run(run_dir, force=force)
        _check_out(out, force, read_from(run_dir, opened))
        return peft_format.export(opened, out, force)


def merge_run(
    run_dir: str | Path,
    out: Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    task: str | None = None,
    base: str | None = None,
    data_path: str | None = None,
) -> dict:
    """Write the merged model to `out` (atomically) and return the parity report.

    `run_dir` is an lrft run dir or a PEFT LoRA dir (then `task` and `base` may be needed).
    """
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise LrftError(f"--dtype: unknown {dtype!r}; choose one of: {', '.join(DTYPES)}")
    _check_out(out, force, {Path(run_dir): "the run or adapter dir this command reads"})
    with writer_lock(out), console.progress("merge", len(MERGE_STEPS), "steps") as phase:
        return _merge(run_dir, out, dtype, force, task, base, data_path, phase)


def _merge(
    run_dir,
    out: Path,
    dtype: str | None,
    force: bool,
    task: str | None,
    base: str | None,
    data_path: str | None,
    phase: console.Phase,
) -> dict:
    step = iter(MERGE_STEPS)
    phase.update(0, note=next(step))
    opened = _open_to_merge(run_dir, out, task, base, force)
    a, config, data_cfg = opened.adapted, opened.config, data_settings(opened, data_path)
    model = a.model
    causal = a.task.causal
    phase.advance(note=next(step))
    batch, prompts, data_source = _parity_inputs(data_cfg, a)
    before = _logits(model, batch)
    generated = _greedy(model, a.tokenizer, prompts) if causal else None
    quantization = _dequantize_to_merge(opened, batch, before)
    base_dtype = next(model.parameters()).dtype
    target = DTYPES[dtype] if dtype else DTYPES[opened.model_cfg.dtype]
    phase.advance(note=next(step))
    kept = update_kept(model, target) if target != base_dtype else None
    merge(model)
    report = {
        "run_dir": str(run_dir),
        "out": str(out),
        "method": config["method"],
        "task": a.task.name,
        "data_source": data_source,
        "dtype": str(target).removeprefix("torch."),
        "parity_examples": int(batch["input_ids"].shape[0]),
        **({"quantization": quantization} if quantization else {}),
    }
    phase.advance(note=next(step))
    merged = _merged_logits(model, batch, before, base_dtype, target, kept, report)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    with atomic_dir(out, overwrite=force, flag="--out") as tmp:
        phase.advance(note=next(step))
        model.save_pretrained(tmp)
        a.tokenizer.save_pretrained(tmp)
        del model, a, opened  # the reload below is the only copy from here on
        gc.collect()
        phase.advance(note=next(step))
        reloaded = _reload(tmp, causal, target)
        after = _logits(reloaded, batch)
        report.update(logit_parity(reloaded, before, after))
        report["max_abs_logit_diff_reload_vs_memory"] = _maxdiff(after, merged)
        report["reload_matches_memory"] = report["max_abs_logit_diff_reload_vs_memory"] == 0.0
        if causal:
            report.update(_causal_checks(reloaded, tmp, prompts, generated, tied))
        check_parity(report, target, kept)
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        phase.advance()
    return report


def _open_to_merge(run_dir, out: Path, task: str | None, base: str | None, force: bool) -> Opened:
    """The run or PEFT dir `lrft merge` folds, once `out` is checked to replace nothing it reads."""
    opened = open_adapted(run_dir, task=task, base=base, force=force)
    if opened is None:
        raise LrftError(
            f"{run_dir}: neither an lrft run dir (recipe.yaml) nor a PEFT LoRA adapter dir "
            f"(adapter_config.json + adapter_model.safetensors)"
        )
    _check_out(out, force, read_from(run_dir, opened))
    return opened


def _merged_logits(
    model: torch.nn.Module,
    batch: dict,
    before: torch.Tensor,
    base_dtype: torch.dtype,
    target: torch.dtype,
    kept: dict | None,
    report: dict,
) -> torch.Tensor:
    """The merged model's logits, in the target dtype (cast to it here); the report gets how far they
    are from the adapted model's (`before`) and, for a cast from fp32, from the fp32 merge."""
    merged = _logits(model, batch)
    report["max_abs_logit_diff_in_memory"] = _maxdiff(merged, before)
    if target != base_dtype:
        cast_parameters(model, target)
        cast = _logits(model, batch)
        if base_dtype == torch.float32:
            report["max_abs_logit_diff_vs_fp32_merge"] = _maxdiff(cast, merged)
            report["update_kept_min"] = min(kept.values()) if kept else None
        merged = cast
    return merged


def _causal_checks(reloaded, model_dir: Path, prompts: list[list[int]], generated: list[list[int]], tied: bool) -> dict:
    """Whether the written causal LM generates what the adapted one did, and keeps tied embeddings tied."""
    emb, head = reloaded.get_input_embeddings(), reloaded.get_output_embeddings()
    checks = {
        "generation_identical": _greedy(reloaded, _tokenizer(model_dir), prompts) == generated,
        "tied_embeddings": bool(
            emb is not None and head is not None and emb.weight.data_ptr() == head.weight.data_ptr()
        ),
    }
    if tied and not checks["tied_embeddings"]:
        raise RuntimeError("the merged model lost its tied input/output embeddings")
    return checks


def rounding_growth(model) -> float:
    """√(depth · width): how far float32 rounding errors grow through `model`, depth its number of layers
    (an encoder-decoder's encoder and decoder layers; every Linear layer where the config does not say) and width its longest dot product (fan-in)."""
    from transformers.pytorch_utils import Conv1D

    fan_ins = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    fan_ins += [m.weight.shape[0] for m in model.modules() if isinstance(m, Conv1D)]  # stored in × out
    depth = sum(stack_layers(model.config)) or len(fan_ins)  # an encoder-decoder: both stacks
    return math.sqrt(depth * max(fan_ins, default=1))


def logit_parity(model, adapted_logits: torch.Tensor, merged_logits: torch.Tensor) -> dict[str, float]:
    """The parity numbers of a merge of `model` (adapted or merged: the same shapes): max |logit diff|
    against the adapted model, the adapted model's max |logit| and the fp32 tolerance that follows
    (PARITY_ROUNDING_FACTOR · eps_fp32 · √(depth · width) of it), by merge_report.json's names."""
    scale = float(adapted_logits.abs().max())
    rtol = PARITY_ROUNDING_FACTOR * torch.finfo(torch.float32).eps * rounding_growth(model)
    return {
        "max_abs_logit_diff": _maxdiff(merged_logits, adapted_logits),
        "max_abs_logit": scale,
        "parity_rtol": rtol,
        "parity_tolerance": rtol * scale,
    }


def check_fp32_parity(parity: dict) -> None:
    """An fp32 merge equals the adapted model up to float32 rounding (`parity`: logit_parity's numbers);
    anything more is a bug in the merge, never the user's to fix."""
    if parity["max_abs_logit_diff"] > parity["parity_tolerance"]:
        raise RuntimeError(
            f"merged model differs from the adapted one by {parity['max_abs_logit_diff']:.3g} > "
            f"{parity['parity_tolerance']:.3g} ({parity['parity_rtol']:.2g} of the adapted model's "
            f"max |logit| {parity['max_abs_logit']:.3g}, float32 rounding) in fp32"
        )


def check_parity(report: dict, target: torch.dtype, kept: dict[str, float] | None) -> None:
    """An fp32 merge must equal the adapted model (a bug otherwise); a bf16/fp16 one gets a verdict."""
    if target == torch.float32:
        check_fp32_parity(report)
    if not report["reload_matches_memory"]:
        console.warn(
            f"the written model's logits differ from the merged model's in memory by "
            f"{report['max_abs_logit_diff_reload_vs_memory']:.3g} (same weights and code should give the "
            f"same numbers); compare its outputs before serving it"
        )
    lost = sorted(name for name, share in (kept or {}).items() if share < UPDATE_KEPT_MIN)
    report["verdict"] = "update_lost_in_rounding" if lost else "ok"
    if lost:
        dtype = report["dtype"]
        console.warn(
            f"{len(lost)} of {len(kept)} modules keep less than {UPDATE_KEPT_MIN:.0%} of their update in "
            f"{dtype} (e.g. {lost[0]}: {kept[lost[0]]:.0%}): ΔW is below the resolution of {dtype} "
            f"weights there, so the merged model is closer to the base model than the adapted one is. Merge "
            f"in float32, or serve the adapter on the base model (--format peft)"
        )


def parity_lines(report: dict) -> list[str]:
    """What `lrft merge` prints: where the model went and what the parity check found."""
    dtype, kept = report["dtype"], report.get("update_kept_min")
    against = f"max |logit diff| {report['max_abs_logit_diff']:.3g} against the adapted model"
    if "max_abs_logit_diff_vs_fp32_merge" in report:
        against += f", {report['max_abs_logit_diff_vs_fp32_merge']:.3g} against the float32 merge"
    if report["verdict"] != "ok":
        verdict = f"{dtype} rounding loses part of the update (see the warning)"
    elif report["max_abs_logit_diff"] <= report["parity_tolerance"]:
        verdict = f"identical up to float32 rounding (within {report['parity_tolerance']:.2g})"
    else:
        verdict = f"within {dtype} rounding of the float32 merge" + (
            f" (every module keeps ≥ {int(kept * 100)}% of its update)" if kept is not None else ""
        )
    lines = [
        f"merged model written to {report['out']} ({dtype})",
        f"parity on {report['parity_examples']} validation examples: {against}: {verdict}",
    ]
    if "generation_identical" in report:
        lines.append(
            f"greedy generations of {GENERATION_PROMPTS} prompts: "
            + (
                "identical to the adapted model's"
                if report["generation_identical"]
                else f"not all identical to the adapted model's ({dtype} rounding)"
            )
        )
    if q := report.get("quantization"):
        lines.append(
            f"{q['base']} base: merged onto its dequantized weights (the adapter trained on them); merged onto "
            f"the original weights instead it would differ by {q['max_abs_logit_diff_merged_onto_original_weights']:.3g}"
        )
    return lines


@torch.no_grad()
def update_kept(model, dtype: torch.dtype) -> dict[str, float]:
    """Per adapted module, the share of its update ΔW that survives merging in `dtype`:
    ⟨Q(W0 + ΔW) − Q(W0), ΔW⟩ / ‖ΔW‖², Q rounding to `dtype`. About 1 when ΔW is well above the resolution
    of the weights in `dtype`; near 0 when round-to-nearest gives W0's own value back. Modules with a
    zero update are left out. One module's temporaries at a time."""
    kept = {}
    for name, wrapper in adapted(model).items():
        w = wrapper.base.weight.float()
        delta = wrapper.adapter.delta_weight().to(w.device)
        delta = delta.T if wrapper.transposed else delta
        norm2 = float((delta * delta).sum())
        if norm2 > 0:
            survived = (w + delta).to(dtype).float() - w.to(dtype).float()
            kept[name] = float((survived * delta).sum()) / norm2
    return kept


def cast_parameters(model, dtype: torch.dtype) -> None:
    """The model in `dtype` as from_pretrained(dtype=...) loads it: parameters and saved buffers cast,
    buffers a model computes for itself (rotary inv_freq, not saved) kept in their own dtype. A plain
    `.to(dtype)` casts those too, and the merged model in memory would compute other logits than the
    files it writes."""
    saved = set(model.state_dict())
    computed = {name: buf for name, buf in model.named_buffers() if name not in saved}
    model.to(dtype)
    for name, buf in computed.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf


def _check_out(out: Path, force: bool, sources: dict[Path, str]) -> None:
    """--out is refused where lrft.guard says no (whatever --force says), where it cannot be written, and
    when it exists without --force."""
    check_output(out, "--out", sources=sources)
    check_writable(out, "--out")
    if out.exists() and not force:
        raise LrftError(f"--out: {out} already exists; choose another dir or pass --force to replace it")


def read_from(target: Path, opened) -> dict[Path, str]:
    """What a merge reads, never to be replaced: the run or PEFT dir and a local base model dir."""
    what = "the run dir" if opened.run_dir is not None else "the PEFT adapter dir"
    sources = {Path(target): f"{what} this command reads"}
    base = Path(opened.model_cfg.name).expanduser()
    if base.is_dir():
        sources[base] = "the base model dir of the adapter this command reads"
    return sources


def _parity_inputs(data_cfg, a) -> tuple[dict, list[dict], str]:
    """A batch of real validation examples (without labels), for causal LMs a few prompts, and where the
    examples came from."""
    task = a.task
    data = load_task_data(task, data_cfg, need_train=False)
    split = next(iter(data.evals.values())).head(PARITY_EXAMPLES[task.problem])
    if isinstance(split, PreferenceSplit):  # pairs: their prompts with the chosen responses
        split, task = split.chosen_examples(), get_task("instruction")
    seq2seq = is_encoder_decoder(a.model)
    feats = features(split, a.tokenizer, data_cfg.max_length, "parity examples", encoder_decoder=seq2seq)
    if task.causal:
        feats = [{k: v[:CAUSAL_PARITY_TOKENS] for k, v in f.items()} for f in feats]
    batch = collator(task, a.tokenizer)(feats)
    if seq2seq:  # the decoder reads the responses (its inputs made from them), not the loss
        batch["decoder_input_ids"] = a.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    batch.pop("labels", None)
    prompts = []
    if task.causal:
        heads = prompt_features(split.head(GENERATION_PROMPTS), a.tokenizer, seq2seq)
        prompts = [p["prompt_ids"] for p in heads]
    return dict(batch), prompts, data.source


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


@torch.no_grad()
def _greedy(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding to differ between runs)."""
    device = next(model.parameters()).device
    out = []
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        tokens = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=GENERATION_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.append(tokens[0, 1 if is_encoder_decoder(model) else len(ids) :].tolist())  # a decoder starts at 1
    return out


def _dequantize_to_merge(opened: Opened, batch: dict, adapted_logits: torch.Tensor) -> dict | None:
    """A quantized base merges onto its dequantized weights, those the adapter trained against: the
    model dequantized in place, and the report's entry (None for a base that is not quantized)."""
    config = quantize.model_quantization(opened.adapted.model)
    if config is None:
        return None
    gap = _original_weights_gap(opened, batch, adapted_logits)
    quantize.dequantize(opened.adapted.model)
    return {
        "base": opened.model_cfg.quantize,
        "merged_onto": "the dequantized weights",
        "max_abs_logit_diff_merged_onto_original_weights": gap,
        "config": config,
    }


@torch.no_grad()
def _original_weights_gap(opened: Opened, batch: dict, adapted_logits: torch.Tensor) -> float:
    """Max |logit diff| against the adapted (quantized) model of the base at its original weights plus
    the same ΔW and head: the gap of a merge onto the weights before quantization, which lrft does not do."""
    from transformers.pytorch_utils import Conv1D

    a = opened.adapted
    plain, _ = load_model(opened.model_cfg.model_copy(update={"quantize": None}), a.task, a.label_names)
    heads = {k: v for k, v in a.model.state_dict().items() if k.split(".")[0] in head_modules(a.model)}
    plain.load_state_dict(heads, strict=False)  # the trained head, where the task has one
    for name, wrapper in adapted(a.model).items():
        layer = plain.get_submodule(name)
        delta = wrapper.adapter.delta_weight().to(layer.weight.device)
        layer.weight += (delta.T if isinstance(layer, Conv1D) else delta).to(layer.weight.dtype)
    gap = _maxdiff(_logits(plain, batch), adapted_logits)
    del plain
    gc.collect()
    return gap


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _reload(path: Path, causal: bool, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    if causal and is_encoder_decoder(AutoConfig.from_pretrained(path)):
        cls = AutoModelForSeq2SeqLM
    return cls.from_pretrained(path, dtype=dtype).eval()


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
