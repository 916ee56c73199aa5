#!/usr/bin/env bash
# The GPU path in one prepared script (issue 33, item 5), under 8 minutes on one GPU:
#   1. every method a few steps on SmolLM2 (GSM8K) at train.precision auto (bf16 on a GPU that has it)
#      and again with model.quantize nf4;
#   2. the cluster checks one CUDA device can run: an NCCL process group of one process (torchrun),
#      FSDP2's accelerate launch (sharding itself needs 2+ processes, so 2+ GPUs), and pre-emption
#      (SIGTERM, exit 75, then resume to the end);
#   3. a merge (parity report) and a PEFT export of one run;
#   4. a table: step time, peak GPU memory (peak RSS on the CPU), final loss, merge parity.
# Without a GPU it runs its CPU part (1, 3 and 4, one step each) so the script itself stays checked.
#
#   LRFT_DATA_DIR=../shared/data bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-$(mktemp -d)}}
RUNS="$OUT/runs"
mkdir -p "$RUNS"
export LRFT_DATA_DIR=${LRFT_DATA_DIR:-../shared/data}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=1 STEPS=4 DEVICE=cuda
  python -c "import torch; print('gpu:', torch.cuda.get_device_name(), 'bf16:', torch.cuda.is_bf16_supported())"
else
  GPU=0 STEPS=1 DEVICE=cpu
  echo "no CUDA device: the CPU part only (one step per run)"
fi
SMALL=(train.max_steps=$STEPS train.batch_size=4 data.max_train_samples=16 data.max_eval_samples=4
  data.max_new_tokens=24 data.max_length=192 train.eval_on_start=false calibration.samples=8
  calibration.batch_size=4 train.device=$DEVICE "output.dir=$RUNS")

train() {  # name, recipe, overrides...
  local name=$1 recipe=$2
  shift 2
  echo "== $name"
  lrft train "$recipe" "${SMALL[@]}" "name=$name" "$@" --json > "$OUT/$name.json"
}

for method in lora tlora talora lorta; do
  train "auto_$method" "recipes/gsm8k_$method.yaml"
  train "nf4_$method" "recipes/gsm8k_$method.yaml" model.quantize=nf4
done

echo "== merge and export"
lrft merge "$RUNS/nf4_talora" --out "$OUT/merged_nf4_talora" --json > "$OUT/merge_nf4_talora.json"
lrft merge "$RUNS/auto_lora" --out "$OUT/merged_auto_lora" --json > "$OUT/merge_auto_lora.json"
lrft merge "$RUNS/auto_lora" --format peft --out "$OUT/peft_auto_lora" --json > "$OUT/export_auto_lora.json"

if [ "$GPU" = 1 ]; then
  echo "== NCCL: one process under torchrun"
  torchrun --standalone --nproc_per_node 1 -m lrft train recipes/gsm8k_lora.yaml "${SMALL[@]}" name=nccl_lora \
    --json > "$OUT/nccl_lora.json"
  echo "== FSDP2's launch on one process (lrft shards from 2 processes on: this checks the launch path)"
  accelerate launch --config_file docs/accelerate_fsdp.yaml --num_processes 1 -m lrft train \
    recipes/gsm8k_lora.yaml "${SMALL[@]}" name=fsdp_lora --json > "$OUT/fsdp_lora.json"
  echo "== pre-emption: SIGTERM mid-run (exit 75), then resume"
  PRE=(recipes/gsm8k_lora.yaml "${SMALL[@]}" train.max_steps=100 train.log_every=1 train.save_every=5 name=preempted)
  lrft train "${PRE[@]}" > "$OUT/preempted.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do  # until a step after the first checkpoint has been logged
    sleep 1
    grep -q '"step": 6' "$RUNS/preempted/metrics.jsonl" 2>/dev/null && break
  done
  kill -TERM $pid
  set +e
  wait $pid
  code=$?
  set -e
  echo "stopped with exit code $code (75 expected)"
  lrft train "${PRE[@]}" --json > "$OUT/preempted.json"
fi

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for f in sorted(out.glob("*.json")):
    s = json.loads(f.read_text())
    if "final" not in s:
        continue
    memory = f"{s['peak_gpu_mib']:,.0f} GPU" if s.get("peak_gpu_mib") else f"{s['peak_rss_mib']:,.0f} RSS"
    rows.append(
        f"| {f.stem} | {s['method']} | {s['precision']['train']} | {s['steps']} | {s['median_step_time_s']} | "
        f"{memory} | {s['final'].get('loss', float('nan')):.4f} |"
    )
print("| run | method | precision | steps | median step (s) | peak MiB | final loss |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
print("\n".join(rows))
for name in ("merge_nf4_talora", "merge_auto_lora"):
    r = json.loads((out / f"{name}.json").read_text())
    q = r.get("quantization", {})
    gap = q.get("max_abs_logit_diff_merged_onto_original_weights")
    print(
        f"{name}: max |logit diff| {r['max_abs_logit_diff']:.3g} (tolerance {r['parity_tolerance']:.2g}), "
        f"verdict {r['verdict']}, generations identical: {r.get('generation_identical')}"
        + (f"; onto the original weights it would be {gap:.3g}" if gap is not None else "")
    )
e = json.loads((out / "export_auto_lora.json").read_text())
print(f"export_auto_lora: {e['modules']} modules, factors match to {e['max_abs_branch_diff']:.2g}")
PY
