#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian/Ubuntu, root or sudo), to run launch/slurm.sbatch for real:
#
#   launch/slurm/setup_local_slurm.sh start   # install slurm-wlm + munge if missing, configure, start daemons
#   export SLURM_CONF=/tmp/bigjax-slurm/slurm.conf   # then sbatch, srun, sinfo talk to this cluster
#   launch/slurm/setup_local_slurm.sh stop    # stop the daemons this script started (by their pid files)
#
# Apart from the package install, everything it writes is under $STATE (default /tmp/bigjax-slurm), its
# slurm.conf included, so a machine's own SLURM configuration is never touched. No cgroups, no accounting: a
# test cluster, not a production one. The node is this host, with all its CPUs, and one partition, "debug".
set -euo pipefail

STATE=${STATE:-/tmp/bigjax-slurm}
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  fi
  mkdir -p "$STATE"/{ctld,d,munge}
  host=$(hostname -s)
  cpus=$(nproc)
  memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

  # munge authenticates SLURM's messages; a fresh key for this test cluster.
  if [ ! -s "$STATE/munge/munge.key" ]; then
    dd if=/dev/urandom bs=1 count=1024 of="$STATE/munge/munge.key" status=none
  fi
  chmod 700 "$STATE/munge"; chmod 400 "$STATE/munge/munge.key"
  running "$STATE/munge/munged.pid" || $sudo munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/seed"

  export SLURM_CONF=$STATE/slurm.conf  # read by the daemons and by every SLURM command
  cat >"$SLURM_CONF" <<CONF
ClusterName=bigjax-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

  running "$STATE/slurmctld.pid" || $sudo slurmctld -f "$SLURM_CONF"
  running "$STATE/slurmd.pid" || $sudo slurmd -f "$SLURM_CONF"
  for _ in $(seq 60); do
    if sinfo --noheader --nodes="$host" --format=%t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
      sinfo
      return 0
    fi
    sleep 1
  done
  echo "setup_local_slurm.sh: the node did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
  sinfo >&2 || true
  tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  return 1
}

stop() {
  for pid_file in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
    if [ -s "$pid_file" ]; then
      $sudo kill "$(cat "$pid_file")" 2>/dev/null || true
    fi
  done
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
