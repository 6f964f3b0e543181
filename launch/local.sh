#!/usr/bin/env bash
# One process on all of this machine's devices (every GPU, the TPU chips of one host, or the CPU):
#
#   launch/local.sh experiments/NAME.py[:ARG] [--workdir DIR] [bigjax train arguments ...]
#
# DIR defaults to runs/NAME. The JAX_* / BIGJAX_DISTRIBUTED variables of a multi-process job are cleared, so a
# shell left over from launch/multiprocess.sh or a SLURM allocation still gets a single process.
set -euo pipefail

if [ $# -lt 1 ] || [[ $1 == -* ]]; then
  echo "usage: launch/local.sh experiments/NAME.py[:ARG] [--workdir DIR] [bigjax train arguments]" >&2
  exit 2
fi
config=$1; shift
workdir=runs/$(basename "${config%%:*}" .py)
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --workdir) workdir=$2; shift 2 ;;
    --workdir=*) workdir=${1#--workdir=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
bigjax=${BIGJAX:-$repo/.venv/bin/bigjax}
[ -x "$bigjax" ] || bigjax=bigjax
unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
export BIGJAX_DISTRIBUTED=off
exec "$bigjax" train --config "$config" --workdir "$workdir" ${args[@]+"${args[@]}"}
