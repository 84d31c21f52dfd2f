#!/usr/bin/env bash
# A real SLURM cluster on this one machine, with two emulated nodes (n1, n2), for the `slurm`
# tests and for trying configs/slurm/*.sbatch without a cluster.
#
#   scripts/local_slurm.sh install   # apt-get install slurm-wlm munge (Debian/Ubuntu, as root)
#   scripts/local_slurm.sh start     # writes $DMDX_SLURM_DIR/slurm.conf, starts munged, slurmctld, 2 x slurmd
#   scripts/local_slurm.sh env       # prints `export SLURM_CONF=...` (eval it before sbatch/squeue)
#   scripts/local_slurm.sh status
#   scripts/local_slurm.sh stop      # stops the daemons started here, by their pid files
#
# Everything lives in $DMDX_SLURM_DIR (default /tmp/dmdx-slurm): config, state, spool, logs and
# pid files; nothing in /etc/slurm is touched (clients find the cluster through SLURM_CONF).
# Needs root (slurmd launches jobs as the submitting user). Recipe: ENV.md, "A real SLURM cluster".
set -euo pipefail

DIR="${DMDX_SLURM_DIR:-/tmp/dmdx-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
export SLURM_CONF="$CONF"

install() {
  if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "cannot install slurm-wlm and munge here (needs root and apt-get); the slurm tests will be skipped" >&2
    return 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool/n1" "$DIR/spool/n2" "$DIR/log"
  cat > "$CONF" <<CONF
ClusterName=dmdx-local
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
MailProg=/bin/true
NodeName=n[1-2] NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=17101-17102 CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
  if munge -n </dev/null >/dev/null 2>&1; then return 0; fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do
    if munge -n </dev/null >/dev/null 2>&1; then
      cp /run/munge/munged.pid "$DIR/munged.pid"   # started here, so stopped here
      return 0
    fi
    sleep 0.1
  done
  echo "munged did not start" >&2; return 1
}

start() {
  install
  if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    echo "local SLURM already running (SLURM_CONF=$CONF)"; return 0
  fi
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    echo "another SLURM daemon runs on this machine (not from $DIR); stop it first" >&2; return 1
  fi
  write_conf
  start_munge
  /usr/sbin/slurmctld -c    # -c: start clean, forget jobs of an earlier cluster in $DIR
  for node in n1 n2; do /usr/sbin/slurmd -N "$node"; done
  for _ in $(seq 100); do
    if [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" -ge 2 ]; then
      echo "local SLURM up: nodes n1 n2 idle (SLURM_CONF=$CONF)"; return 0
    fi
    sleep 0.2
  done
  echo "local SLURM did not come up; logs in $DIR/log:" >&2
  tail -n 20 "$DIR"/log/*.log >&2 || true
  return 1
}

stop_pidfile() {
  local f="$1"
  if [ -f "$f" ]; then
    local pid; pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$f"
  fi
}

stop() {
  stop_pidfile "$DIR/slurmd.n1.pid"
  stop_pidfile "$DIR/slurmd.n2.pid"
  stop_pidfile "$DIR/slurmctld.pid"
  stop_pidfile "$DIR/munged.pid"   # only if start launched it
  echo "local SLURM stopped"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status) sinfo -N; squeue ;;
  *) echo "usage: $0 install|start|stop|env|status" >&2; exit 2 ;;
esac
