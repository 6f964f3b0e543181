#!/usr/bin/env bash
# bigjax on a Cloud TPU VM or TPU slice (several hosts), driven from your machine with gcloud:
#
#   launch/tpu_vm.sh --name NAME --zone ZONE [--project P] [--create TYPE [--version RUNTIME] [--spot]]
#                    [--workdir DIR] [--delete] [--dry-run] -- experiments/NAME.py[:ARG] [bigjax train arguments]
#
#   launch/tpu_vm.sh --name demo --zone us-west4-a --create v5litepod-8 --delete -- experiments/shakespeare_char.py
#
# 1. --create TYPE (v5litepod-8, v5p-32, v6e-16, v4-32, ...): `gcloud compute tpus tpu-vm create`; without it,
#    the TPU NAME must exist.
# 2. Set up every worker (--worker=all): this checkout's committed tree (git archive HEAD) is copied over and
#    installed with the [tpu] extra into ~/bigjax/.venv (Python 3.11 through uv; TPU images ship 3.10).
# 3. Check that DIR is one directory all workers share (a file written by worker 0 must be read by all).
# 4. Run `bigjax train` on all workers at once, their output streamed here. Each process finds the others from
#    the TPU metadata (BIGJAX_DISTRIBUTED=auto); process 0 alone logs.
# 5. --delete: delete the TPU afterwards, whether training succeeded or not.
# --dry-run prints the commands instead of running them.
#
# DIR (--workdir) default: ~/bigjax/runs/NAME on each worker, right for a single host. A slice of several hosts
# needs a DIR every worker reaches, because every process joins every checkpoint save and restore: a bucket,
# gs://BUCKET/PATH (the TPU's service account needs write access to it), or storage all workers mount at the
# same path (Filestore, any NFS).
set -euo pipefail

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

name="" zone="" project="" create="" version="" spot="" workdir="" delete="" dry_run=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --create) create=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --workdir) workdir=$2; shift 2 ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    *) echo "tpu_vm.sh: unknown option '$1'" >&2; usage ;;
  esac
done
[ "${1:-}" = "--" ] && [ $# -ge 2 ] || { echo "tpu_vm.sh: give the experiment after --" >&2; usage; }
shift
config=$1; shift
[ -n "$name" ] && [ -n "$zone" ] || { echo "tpu_vm.sh: --name and --zone are required" >&2; usage; }
workdir=${workdir:-"~/bigjax/runs/$(basename "${config%%:*}" .py)"}

if [ -z "$version" ]; then  # the runtime image that goes with each TPU generation
  case $create in
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

run() {  # run a command, or only print it with --dry-run
  if [ -n "$dry_run" ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
tpu_vm() {  # gcloud compute tpus tpu-vm VERB ARGS..., with the zone and project
  local verb=$1; shift
  run gcloud compute tpus tpu-vm "$verb" "$@" --zone="$zone" ${project:+--project="$project"}
}
on_workers() {  # on_workers all|0 COMMAND: run a shell command on the workers
  tpu_vm ssh "$name" --worker="$1" --command="$2"
}

if [ -n "$create" ]; then
  tpu_vm create "$name" --accelerator-type="$create" --version="$version" ${spot:+--spot}
fi
archive=$(mktemp /tmp/bigjax-XXXXXX.tar.gz)
finish() {
  rm -f "$archive"
  if [ -n "$delete" ]; then tpu_vm delete "$name" --quiet; fi
}
trap finish EXIT

run git archive --format=tar.gz -o "$archive" HEAD
tpu_vm scp "$archive" "$name:bigjax.tar.gz" --worker=all
on_workers all 'set -e; rm -rf ~/bigjax/src && mkdir -p ~/bigjax/src && tar -xzf ~/bigjax.tar.gz -C ~/bigjax/src
  python3 -m pip install --user --quiet uv
  python3 -m uv venv --quiet --allow-existing --python 3.11 ~/bigjax/.venv
  python3 -m uv pip install --quiet --python ~/bigjax/.venv/bin/python -e ~/bigjax/src"[tpu]"'

if [[ $workdir != gs://* ]]; then  # a bucket is the same for every worker; a path must be shared storage
  token=$RANDOM$RANDOM
  on_workers 0 "mkdir -p $workdir && echo $token > $workdir/.bigjax-shared"
  on_workers all "grep -qx $token $workdir/.bigjax-shared || { echo \"error: \$(hostname) does not see $workdir as worker 0 wrote it;\" \
    \"pass --workdir on storage all workers share, or a gs:// bucket\" >&2; exit 1; }"
fi

train_args=$(printf ' %q' "$config" "$@")
on_workers all "cd ~/bigjax/src && BIGJAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1 ~/bigjax/.venv/bin/bigjax train \
  --workdir $workdir --config$train_args"
