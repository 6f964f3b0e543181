#!/usr/bin/env bash
# nanoGPT's own bench.py (GPT-2 124M, T=1024, bf16, torch.compile, flash attention) on random tokens, at each batch
# size given; one JSON line per run on stdout, its log on stderr. Needs nanoGPT's bench.py, model.py and
# configurator.py in third_party/nanoGPT (ignored by git; benchmarks/nanogpt.md says how to fetch them).
#
#   bash benchmarks/nanogpt.sh 12 24
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # for bigjax.ops.metrics, the one table of device peaks
cd "$ROOT/third_party/nanoGPT" 2>/dev/null || {
  echo "third_party/nanoGPT is missing: see benchmarks/nanogpt.md" >&2
  exit 1
}
PY=${PYTHON:-python3}
for batch in "${@:-12}"; do
  # bench.py: 10 burn-in steps, then 20 timed ones; it prints "time per iteration: X ms, MFU: Y%" (Y against an
  # A100's 312 TFLOP/s, by 6N + 12·L·H·Q·T, the PaLM formula bigjax uses too).
  log=$($PY bench.py --real_data=False --batch_size="$batch" --compile=True 2>&1 | tee /dev/stderr)
  $PY - "$batch" "$log" <<'PYEOF'
import json, re, sys
import torch

from bigjax.ops.devices import peak_flops_of_kind

batch, log = int(sys.argv[1]), sys.argv[2]
found = re.search(r"time per iteration: ([0-9.]+)ms, MFU: ([0-9.]+)%", log)
step_time, mfu_a100 = float(found[1]) / 1e3, float(found[2]) / 100
name = torch.cuda.get_device_name()
device_peak = peak_flops_of_kind(name)
print(json.dumps({
    "name": f"nanogpt_b{batch}",
    "tool": "nanoGPT bench.py --real_data=False --compile=True",
    "device_kind": name,
    "versions": {"torch": torch.__version__},
    "batch_size": batch,
    "tokens_per_example": 1024,
    "step_time_mean": step_time,  # bench.py times 20 steps together
    "tokens_per_second": batch * 1024 / step_time,
    "examples_per_second": batch / step_time,
    "mfu": mfu_a100 * 312e12 / device_peak if device_peak else None,
    "mfu_as_printed_vs_a100": mfu_a100,
}))
PYEOF
done
