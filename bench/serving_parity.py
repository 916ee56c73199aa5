"""Serving parity on real runs: PEFT export loaded by PEFT, and merged dirs loaded by plain transformers.

    LRFT_DATA_DIR=../shared/data python bench/serving_parity.py results/runs/mrpc_{lora,tlora,talora,lorta}_r8_s42

For each run: `lrft merge --format peft`, then PEFT's own PeftModel.from_pretrained on a fresh base
model, compared with the lrft adapter on the run's validation split (max |logit diff|); `lrft merge`
(fp32 and bf16), loaded with AutoModelForSequenceClassification / AutoModelForCausalLM and compared
the same way; and a copy of the run pointed at a base whose weights differ, which must be refused.
PEFT is a test dependency: this script is a check, not part of lrft.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrft.data import collator, features, load_task_data  # noqa: E402
from lrft.models import resolve  # noqa: E402
from lrft.open_runs import load_run  # noqa: E402

EXAMPLES = 128


def lrft_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lrft", *map(str, args)], capture_output=True, text=True)


@torch.no_grad()
def logits(model, batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**b).logits.float() for b in batches])


def check(run: Path, work: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    opened = load_run(run)
    a, config, data_cfg, model_cfg = opened.adapted, opened.config, opened.data_cfg, opened.model_cfg
    task = a.task
    split = next(iter(load_task_data(task, data_cfg, need_train=False).evals.values())).head(EXAMPLES)
    feats = features(split, a.tokenizer, data_cfg.max_length, "parity examples")
    collate = collator(task, a.tokenizer)
    batches = [{k: v for k, v in collate(feats[i : i + 32]).items() if k != "labels"} for i in range(0, len(feats), 32)]
    ours = logits(a.model, batches)
    del a
    causal = task.problem == "causal_lm"
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    kw = {} if causal else {"num_labels": ours.shape[-1]}
    base_dir = resolve(model_cfg.name, model_cfg.gguf_file)
    out = {"run": run.name, "method": config["method"], "examples": len(feats)}

    exported = lrft_cli("merge", run, "--format", "peft", "--out", work / "peft", "--json")
    assert exported.returncode == 0, exported.stderr
    served = PeftModel.from_pretrained(cls.from_pretrained(base_dir, **kw), work / "peft")
    out["peft_max_abs_logit_diff"] = float((logits(served, batches) - ours).abs().max())
    out["peft_rank_pattern"] = len(json.loads((work / "peft" / "adapter_config.json").read_text())["rank_pattern"])
    del served

    for dtype in ("float32", "bfloat16"):
        merged = lrft_cli("merge", run, "--out", work / dtype, "--dtype", dtype, "--json")
        assert merged.returncode == 0, merged.stderr
        report = json.loads(merged.stdout)
        plain = cls.from_pretrained(work / dtype, dtype=getattr(torch, dtype))
        out[f"merged_{dtype}_max_abs_logit_diff"] = float((logits(plain, batches) - ours).abs().max())
        if dtype == "bfloat16":
            out["bf16_vs_fp32_merge"] = report.get("max_abs_logit_diff_vs_fp32_merge")
        del plain

    other = work / "other_base"
    shutil.copytree(base_dir, other)
    model = cls.from_pretrained(other, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    model.save_pretrained(other)
    foreign = work / "foreign_run"
    shutil.copytree(run, foreign, ignore=shutil.ignore_patterns("checkpoints"))
    text = (foreign / "recipe.yaml").read_text().replace(f"name: {model_cfg.name}\n", f"name: {other}\n", 1)
    (foreign / "recipe.yaml").write_text(text)
    refused = lrft_cli("eval", foreign)
    out["other_base_refused"] = refused.returncode == 2 and "target weights differ" in refused.stderr
    return out


def main() -> None:
    rows = []
    for run in map(Path, sys.argv[1:]):
        with tempfile.TemporaryDirectory() as work:
            rows.append(check(run, Path(work)))
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
