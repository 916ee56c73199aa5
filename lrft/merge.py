"""`lrft merge`: fold a run's adapter into its base weights and write a plain Hugging Face model dir.

ΔW is added in fp32 and cast back to the base dtype (or `--dtype`). Before the new dir gets its
final name, it is loaded back with plain transformers and compared with the adapted model on real
validation batches; in fp32 a max |logit diff| above 1e-4 aborts and nothing is left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lrft import console
from lrft.checkpoint import atomic_dir
from lrft.data import encode, load_task_data
from lrft.errors import LrftError
from lrft.inject import merge
from lrft.run import load_run

PARITY_TOL_FP32 = 1e-4
PARITY_EXAMPLES = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_run(run_dir: Path, out: Path, dtype: str | None = None, force: bool = False) -> dict:
    """Write the merged model to `out` (atomically) and return the parity report."""
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise LrftError(f"--dtype: unknown {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if out.exists() and not force:
        raise LrftError(f"--out: {out} already exists; choose another dir or pass --force to replace it")
    recipe, a, config = load_run(run_dir)
    from transformers import DataCollatorWithPadding

    data = load_task_data(a.task, recipe.data, need_train=False)
    split = next(iter(data.evals.values())).head(PARITY_EXAMPLES)
    batch = DataCollatorWithPadding(a.tokenizer, return_tensors="pt")(encode(split, a.tokenizer, recipe.data.max_length))
    batch.pop("labels", None)
    with torch.no_grad():
        before = a.model(**batch).logits.float()
    model = merge(a.model)
    target_dtype = DTYPES[dtype] if dtype else DTYPES[recipe.model.dtype]
    model.to(target_dtype)
    report = {"run_dir": str(run_dir), "out": str(out), "method": config["method"], "dtype": str(target_dtype).split(".")[-1],
              "parity_examples": len(split)}
    with atomic_dir(out, overwrite=force) as tmp:
        model.save_pretrained(tmp)
        a.tokenizer.save_pretrained(tmp)
        from transformers import AutoModelForSequenceClassification

        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=target_dtype)
        reloaded.eval()
        with torch.no_grad():
            after = reloaded(**batch).logits.float()
        diff = float((after - before).abs().max())
        report["max_abs_logit_diff"] = diff
        console.log(f"parity on {len(split)} validation examples: max |logit diff| {diff:.3g} ({report['dtype']})")
        if target_dtype == torch.float32 and diff > PARITY_TOL_FP32:
            raise RuntimeError(f"merged model differs from the adapted one by {diff:.3g} > {PARITY_TOL_FP32} in fp32")
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
