#!/usr/bin/env bash
# Run N processes of one bigjax job on this machine, each with its own simulated CPU devices: multi-host
# behaviour (process 0 alone logs, every process reads its slice of the batch and joins checkpoints,
# collectives over gloo) on a laptop.
#
#   launch/multiprocess.sh N [--devices-per-process D] [--logdir DIR] -- bigjax train --config ... --workdir ...
#
# Each process gets JAX_COORDINATOR_ADDRESS (a free port on 127.0.0.1), JAX_NUM_PROCESSES, JAX_PROCESS_ID and
# D simulated devices (default 8/N, so the job has 8 devices like one process of the tests). Process i
# writes DIR/process-i.log (default DIR: ./multiprocess-logs); process 0's log is shown as it is written.
# When a process fails, the others are stopped at once, the failed process's last lines are shown, and this
# script exits with its status. Ctrl-C stops them all.
set -uo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 1 ] || usage
num_processes=$1; shift
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || { echo "multiprocess.sh: N must be a positive number, got '$num_processes'" >&2; exit 2; }
devices_per_process=$(( num_processes >= 8 ? 1 : 8 / num_processes ))
logdir=multiprocess-logs
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case $1 in
    --devices-per-process) devices_per_process=$2; shift 2 ;;
    --logdir) logdir=$2; shift 2 ;;
    *) echo "multiprocess.sh: unknown option '$1'" >&2; usage ;;
  esac
done
[ "${1:-}" = "--" ] && [ $# -ge 2 ] || { echo "multiprocess.sh: give the command after --" >&2; usage; }
shift

python=${PYTHON:-python3}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$logdir"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
  done
  [ -n "${tail_pid:-}" ] && kill "$tail_pid" 2>/dev/null
  wait 2>/dev/null
}
trap 'echo "multiprocess.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  : >"$logdir/process-$i.log"
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" \
  JAX_NUM_PROCESSES=$num_processes \
  JAX_PROCESS_ID=$i \
  PYTHONUNBUFFERED=1 \
    "$@" >"$logdir/process-$i.log" 2>&1 &
  pids+=($!)
done
echo "multiprocess.sh: $num_processes processes x $devices_per_process CPU devices, coordinator 127.0.0.1:$port, logs in $logdir/" >&2
tail -n +1 -f "$logdir/process-0.log" &
tail_pid=$!

# Poll rather than `wait -n`, which macOS's bash 3.2 lacks. bash reaps finished children itself, so
# `kill -0` fails once one has exited and `wait PID` then returns its status.
remaining=$num_processes
while [ "$remaining" -gt 0 ]; do
  sleep 1
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [ -z "$pid" ] && continue
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"; status=$?
    pids[$i]=""
    remaining=$((remaining - 1))
    if [ "$status" -ne 0 ]; then
      sleep 1  # let the log of process 0 catch up before it is cut off
      echo "multiprocess.sh: process $i exited with status $status; stopping the others. Its last lines ($logdir/process-$i.log):" >&2
      tail -n 15 "$logdir/process-$i.log" | sed "s/^/  [process $i] /" >&2
      stop_all
      exit "$status"
    fi
  done
done
sleep 0.5  # the tail of process 0's log
kill "$tail_pid" 2>/dev/null
wait "$tail_pid" 2>/dev/null
echo "multiprocess.sh: all $num_processes processes finished" >&2
