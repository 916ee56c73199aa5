"""`lrft merge`: fold a run's adapter into its base weights and write a plain Hugging Face model dir,
or (`--format peft`) export it as a standard PEFT LoRA adapter dir (lrft.peft_format).

ΔW is added module by module in fp32 and cast to the base dtype, then the model to `--dtype`; one
copy of the model is in memory at a time (merging happens in place, on the CPU unless the model is
elsewhere). Parity on real validation batches: the merged model's logits against the adapted
model's (refused above 1e-4 in fp32), for bf16/fp16 also against the fp32 merge, and for causal
LMs identical greedy generations. The dir is written under a temporary name and loaded back with
plain transformers before it gets its final name; `merge_report.json` records the numbers.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from lrft import console, peft_format
from lrft.data import collator, features, load_task_data
from lrft.data.causal import prompt_features
from lrft.errors import LrftError
from lrft.files import atomic_dir, check_writable
from lrft.guard import check_output
from lrft.inject import merge
from lrft.rundir import MERGE_REPORT, data_settings, load_run, open_adapted, writer_lock

PARITY_TOL_FP32 = 1e-4
PARITY_EXAMPLES = {"classification": 64, "regression": 64, "causal_lm": 4}
CAUSAL_PARITY_TOKENS = 128  # logits of a causal LM are (tokens × vocab): a short window suffices
GENERATION_PROMPTS, GENERATION_TOKENS = 3, 24
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_run(run_dir: Path, out: Path, *, force: bool = False) -> dict:
    """Write the run's adapter as a PEFT LoRA dir at `out` (atomically); returns the export report."""
    out = Path(out)
    _check_out(out, force, {Path(run_dir): "the run dir this command reads"})
    with writer_lock(out):
        opened = load_run(run_dir, force=force)
        _check_out(out, force, read_from(run_dir, opened))
        return peft_format.export(opened, out, force)


def merge_run(run_dir: Path, out: Path, *, dtype: str | None = None, force: bool = False, task: str | None = None,
              base: str | None = None, data_path: str | None = None) -> dict:
    """Write the merged model to `out` (atomically) and return the parity report.

    `run_dir` is an lrft run dir or a PEFT LoRA dir (then `task` and `base` may be needed).
    """
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise LrftError(f"--dtype: unknown {dtype!r}; choose one of: {', '.join(DTYPES)}")
    _check_out(out, force, {Path(run_dir): "the run or adapter dir this command reads"})
    with writer_lock(out):
        return _merge(run_dir, out, dtype, force, task, base, data_path)


def _merge(run_dir: Path, out: Path, dtype: str | None, force: bool, task: str | None, base: str | None,
           data_path: str | None) -> dict:
    opened = open_adapted(run_dir, task=task, base=base, force=force)
    if opened is None:
        raise LrftError(f"{run_dir}: neither an lrft run dir (recipe.yaml) nor a PEFT LoRA adapter dir "
                        f"(adapter_config.json + adapter_model.safetensors)")
    _check_out(out, force, read_from(run_dir, opened))
    a, config, data_cfg = opened.adapted, opened.config, data_settings(opened, data_path)
    task, model = a.task, a.model
    causal = task.problem == "causal_lm"
    batch, prompts, data_source = _parity_inputs(data_cfg, a)
    before = _logits(model, batch)
    generated = _greedy(model, a.tokenizer, prompts) if causal else None

    merge(model)
    base_dtype = next(model.parameters()).dtype
    target = DTYPES[dtype] if dtype else DTYPES[opened.model_cfg.dtype]
    report = {"run_dir": str(run_dir), "out": str(out), "method": config["method"], "task": task.name,
              "data_source": data_source, "dtype": str(target).removeprefix("torch."),
              "parity_examples": int(batch["input_ids"].shape[0])}
    merged = _logits(model, batch)
    report["max_abs_logit_diff_in_memory"] = _maxdiff(merged, before)
    if target != base_dtype:
        model.to(target)
        cast = _logits(model, batch)
        if base_dtype == torch.float32:
            report["max_abs_logit_diff_vs_fp32_merge"] = _maxdiff(cast, merged)
        merged = cast
    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    with atomic_dir(out, overwrite=force, flag="--out") as tmp:
        model.save_pretrained(tmp)
        a.tokenizer.save_pretrained(tmp)
        del model, a, opened  # the reload below is the only copy from here on
        gc.collect()
        reloaded = _reload(tmp, causal, target)
        after = _logits(reloaded, batch)
        report["max_abs_logit_diff"] = _maxdiff(after, before)
        report["reload_matches_memory"] = _maxdiff(after, merged) == 0.0
        if causal:
            report["generation_identical"] = _greedy(reloaded, _tokenizer(tmp), prompts) == generated
            emb, head = reloaded.get_input_embeddings(), reloaded.get_output_embeddings()
            report["tied_embeddings"] = bool(emb is not None and head is not None and
                                             emb.weight.data_ptr() == head.weight.data_ptr())
            if tied and not report["tied_embeddings"]:
                raise RuntimeError("the merged model lost its tied input/output embeddings")
        console.log(f"parity on {report['parity_examples']} validation examples: max |logit diff| "
                    f"{report['max_abs_logit_diff']:.3g} ({report['dtype']})"
                    + (f", {report['max_abs_logit_diff_vs_fp32_merge']:.3g} against the fp32 merge"
                       if "max_abs_logit_diff_vs_fp32_merge" in report else "")
                    + (f"; greedy generations identical: {report['generation_identical']}" if causal else ""))
        if target == torch.float32 and report["max_abs_logit_diff"] > PARITY_TOL_FP32:
            raise RuntimeError(f"merged model differs from the adapted one by {report['max_abs_logit_diff']:.3g} > "
                               f"{PARITY_TOL_FP32} in fp32")
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


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
    feats = features(task, split, a.tokenizer, data_cfg.max_length, "parity examples")
    if task.problem == "causal_lm":
        feats = [{k: v[:CAUSAL_PARITY_TOKENS] for k, v in f.items()} for f in feats]
    batch = collator(task, a.tokenizer)(feats)
    batch.pop("labels", None)
    prompts = []
    if task.problem == "causal_lm":
        prompts = [p["prompt_ids"] for p in prompt_features(split.head(GENERATION_PROMPTS), a.tokenizer)]
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
        tokens = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=GENERATION_TOKENS,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append(tokens[0, len(ids):].tolist())
    return out


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _reload(path: Path, causal: bool, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    return cls.from_pretrained(path, dtype=dtype).eval()


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
