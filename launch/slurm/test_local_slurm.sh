#!/usr/bin/env bash
# `make test-slurm`: run launch/slurm.sbatch for real on a one-node SLURM cluster started on this machine,
# once with a task per node (one process, 8 simulated CPU devices) and once with a task per "GPU" (two
# processes of 4 devices that find each other through SLURM's variables), and check they train alike.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
scratch=$(mktemp -d /tmp/bigjax-slurm-test.XXXXXX)

export STATE=/tmp/bigjax-slurm SLURM_CONF=/tmp/bigjax-slurm/slurm.conf  # this cluster, not the machine's own
launch/slurm/setup_local_slurm.sh start
trap 'launch/slurm/setup_local_slurm.sh stop' EXIT

export JAX_PLATFORMS=cpu BIGJAX=$repo/.venv/bin/bigjax
run() {  # run NAME [VAR=VALUE ...]: one sbatch job, waited for; its output is shown
  local name=$1; shift
  env "$@" WORKDIR="$scratch/$name" sbatch --wait --job-name="bigjax-$name" --output="$scratch/$name.out" \
    launch/slurm.sbatch experiments/tiny.py --config.log_every=1 || status=$?
  echo "---- $name: sbatch exited ${status:-0}; its output:"
  cat "$scratch/$name.out"
  return "${status:-0}"
}
run node XLA_FLAGS=--xla_force_host_platform_device_count=8
run gpu XLA_FLAGS=--xla_force_host_platform_device_count=4 BIGJAX_TASKS=gpu GPUS_PER_NODE=2

"$BIGJAX" --help >/dev/null  # the venv works outside SLURM too
.venv/bin/python - "$scratch" <<'PY'
import json, pathlib, sys
import numpy as np
scratch = pathlib.Path(sys.argv[1])
def losses(name):
    rows = [json.loads(line) for line in (scratch / name / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]  # the last row is the goodput account
node, gpu = losses("node"), losses("gpu")
assert len(node) == len(gpu) == 8, (node, gpu)
np.testing.assert_allclose(gpu, node, rtol=1e-5)
out = (scratch / "gpu.out").read_text()
assert "1 node(s) x 2 task(s)" in out and "0: mesh data=8" in out and "1: " in out, out
print(f"test-slurm: OK: 1 task x 8 devices and 2 tasks x 4 devices give the same 8 losses ({node[0]:.4f} ... {node[-1]:.4f})")
PY
rm -rf "$scratch"
