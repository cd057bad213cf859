#!/usr/bin/env bash
# A real Slurm cluster on this machine (Slurm 22.05 from Debian: slurmctld, slurmd, slurmdbd with MariaDB for
# accounting, munge), without systemd or cgroups, for the test suite and for trying the sbatch scripts before a
# real cluster. Every daemon runs from STATE_DIR with its own pid file and is stopped by pid.
# Two nodes by default (IPT_SLURM_NODES): Debian builds Slurm with multiple-slurmd support (`scontrol show config`:
# MULTIPLE_SLURMD = Yes), so one slurmd per node runs here, each with its own node name (slurmd -N), port, spool,
# log and pid file. Both nodes are this machine (same CPUs, same file system, NodeAddr 127.0.0.1): a multi-node
# test gets a real two-node allocation, one slurmd/slurmstepd per node, srun steps spanning both, and processes
# of different nodes meeting over TCP; it does not get separate hosts or network stacks.
#
#   bash scripts/slurm_local.sh up [STATE_DIR]       # idempotent; prints: export SLURM_CONF=STATE_DIR/etc/slurm.conf
#   bash scripts/slurm_local.sh status [STATE_DIR]   # exit 0 when every daemon runs and the node answers
#   bash scripts/slurm_local.sh down [STATE_DIR]     # cancel this cluster's jobs, stop its daemons by pid
#
# `up` needs root (slurmd and munged's user switch); it installs the Debian packages (slurmctld slurmd
# slurm-client slurmdbd munge mariadb-server, --no-install-recommends) when a command is missing, generates
# the configuration (the node's CPUs and memory from `slurmd -C`), starts munged (as the munge user),
# mariadbd (as mysql), slurmdbd, slurmctld and slurmd, adds the cluster, an account and the current user to
# the accounting database, and waits until the node is idle and `sacct` answers.
#
# The daemons never inherit the lock (fd 9) nor the caller's stdout, so a caller reading this script's output
# through a pipe sees it end.
# Variables: STATE_DIR (argument) or IPT_SLURM_STATE (default /tmp/ipt-slurm); IPT_SLURM_PORT, the first of
# consecutive TCP ports on 127.0.0.1 (slurmctld, the first slurmd, slurmdbd, mariadbd, then one per further
# slurmd; default 16817); IPT_SLURM_NODES (default 2; the first node is named after this host, the others
# HOST-2, HOST-3...);
# IPT_SLURM_CLUSTER (cluster name, default ipt), IPT_SLURM_PARTITION (default local), IPT_SLURM_ACCOUNT
# (default ipt). Logs: STATE_DIR/log/.
set -euo pipefail

cmd="${1:-}"
state="${2:-${IPT_SLURM_STATE:-/tmp/ipt-slurm}}"
case "$state" in /*) ;; *) state="$PWD/$state" ;; esac
port="${IPT_SLURM_PORT:-16817}"
cluster="${IPT_SLURM_CLUSTER:-ipt}"
partition="${IPT_SLURM_PARTITION:-local}"
account="${IPT_SLURM_ACCOUNT:-ipt}"
n_nodes="${IPT_SLURM_NODES:-2}"
[[ "$n_nodes" =~ ^[1-9][0-9]*$ ]] || { echo "slurm_local.sh: IPT_SLURM_NODES=$n_nodes: expected a positive integer" >&2; exit 2; }
conf="$state/etc/slurm.conf"
export SLURM_CONF="$conf"
host="$(hostname -s)"
nodes=("$host")
for ((i = 2; i <= n_nodes; i++)); do nodes+=("$host-$i"); done
node_port() {  # the slurmd port of node number $1 (1-based)
  if [ "$1" = 1 ]; then echo $((port + 1)); else echo $((port + 2 + $1)); fi
}
daemons=(munged mariadbd slurmdbd slurmctld "${nodes[@]/#/slurmd:}")

die() { echo "slurm_local.sh: $*" >&2; exit 1; }
log() { echo "slurm_local.sh: $*" >&2; }

# Daemons are named by program; a slurmd as slurmd:NODE (one per node).
pidfile() {
  case "$1" in
    munged) echo "$state/munge/munged.pid" ;;
    mariadbd) echo "$state/mysql/mariadbd.pid" ;;
    slurmd:*) echo "$state/run/slurmd-${1#slurmd:}.pid" ;;
    *) echo "$state/run/$1.pid" ;;
  esac
}

# The daemon's pid when its pid file names a live process of that program, else nothing.
daemon_pid() {
  local file pid
  file="$(pidfile "$1")"
  [ -s "$file" ] || return 1
  pid="$(tr -dc 0-9 <"$file")"
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${1%%:*}" ] || return 1
  echo "$pid"
}

# Wait up to $1 seconds for the command after it to succeed.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

show_log() { [ -f "$state/log/$1.log" ] && tail -n 20 "$state/log/$1.log" >&2; return 0; }

install_packages() {
  local missing=0 c
  for c in munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sbatch sacctmgr; do
    command -v "$c" >/dev/null || missing=1
  done
  [ "$missing" = 0 ] && return 0
  command -v apt-get >/dev/null || die "Slurm, munge or MariaDB is missing and apt-get is not available"
  local pkgs=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
  log "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >"$state/log/apt.log" 2>&1; then
    apt-get update >>"$state/log/apt.log" 2>&1 || true
    apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$state/log/apt.log" 2>&1 \
      || { show_log apt; die "apt-get install failed (log: $state/log/apt.log)"; }
  fi
}

write_configs() {
  local node node_hw auth i
  node="$host"
  # slurmd -C prints this machine's node line: NodeName=... CPUs=... RealMemory=...; keep all but the name.
  node_hw="$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* *//')"
  [ -n "$node_hw" ] || die "slurmd -C printed no node line"
  auth="socket=$state/munge/munge.socket"
  cat >"$conf.tmp" <<EOF
# Generated by scripts/slurm_local.sh: a single-node test cluster without systemd or cgroups.
ClusterName=$cluster
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=$auth
CredType=cred/munge
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d-%n
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$state/run/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((port + 2))
AccountingStoragePass=$auth
PartitionName=$partition Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
  for i in "${!nodes[@]}"; do
    echo "NodeName=${nodes[$i]} NodeHostname=$node NodeAddr=127.0.0.1 Port=$(node_port $((i + 1))) $node_hw State=UNKNOWN"
  done >>"$conf.tmp"
  mv "$conf.tmp" "$conf"
  (
    umask 077  # slurmdbd refuses a slurmdbd.conf that others can read
    cat >"$state/etc/slurmdbd.conf.tmp" <<EOF
# Generated by scripts/slurm_local.sh.
DbdHost=$node
DbdAddr=127.0.0.1
DbdPort=$((port + 2))
SlurmUser=root
AuthType=auth/munge
AuthInfo=$auth
PidFile=$(pidfile slurmdbd)
LogFile=$state/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((port + 3))
StorageUser=slurm
StoragePass=$(cat "$state/mysql.pass")
StorageLoc=slurm_acct_db
EOF
    mv "$state/etc/slurmdbd.conf.tmp" "$state/etc/slurmdbd.conf"
  )
}

start_munged() {
  daemon_pid munged >/dev/null && return 0
  install -d -o munge -g munge -m 755 "$state/munge"
  if [ ! -s "$state/munge/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$state/munge/munge.key"
  fi
  runuser -u munge -- munged --socket="$state/munge/munge.socket" --key-file="$state/munge/munge.key" \
    --pid-file="$(pidfile munged)" --log-file="$state/munge/munged.log" --seed-file="$state/munge/munged.seed" \
    </dev/null >/dev/null 2>&1 9>&- || { tail -n 20 "$state/munge/munged.log" >&2; die "munged did not start"; }
  wait_for 20 daemon_pid munged || die "munged did not write its pid file"
  started+=(munged)
}

mariadb_sql() { mariadb --no-defaults --socket="$state/mysql/mysqld.sock" -u root -e "$1"; }

start_mariadbd() {
  daemon_pid mariadbd >/dev/null && return 0
  install -d -o mysql -g mysql -m 750 "$state/mysql"
  if [ ! -d "$state/mysql/data/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$state/mysql/data" --skip-test-db \
      --auth-root-authentication-method=socket >"$state/log/mariadb-install.log" 2>&1 \
      || { show_log mariadb-install; die "mariadb-install-db failed"; }
  fi
  setsid mariadbd --no-defaults --user=mysql --datadir="$state/mysql/data" --socket="$state/mysql/mysqld.sock" \
    --pid-file="$(pidfile mariadbd)" --bind-address=127.0.0.1 --port=$((port + 3)) --skip-name-resolve \
    --skip-log-bin --innodb-buffer-pool-size=64M --log-error="$state/log/mariadbd.log" </dev/null >/dev/null 2>&1 9>&- &
  wait_for 60 mariadb_sql "SELECT 1" || { show_log mariadbd; die "mariadbd did not answer"; }
  wait_for 10 daemon_pid mariadbd || die "mariadbd did not write its pid file"
  local pass
  pass="$(cat "$state/mysql.pass")"
  mariadb_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "cannot create the slurm database user"
  started+=(mariadbd)
}

start_slurm_daemon() {  # slurmdbd | slurmctld | slurmd:NODE: each forks into the background, writes its pid file
  daemon_pid "$1" >/dev/null && return 0
  local cmd=("${1%%:*}") name="${1/:/-}"
  case "$1" in slurmd:*) mkdir -p "$state/spool/d-${1#slurmd:}"; cmd+=(-N "${1#slurmd:}") ;; esac
  "${cmd[@]}" </dev/null >>"$state/log/$name.start.log" 2>&1 9>&- || { show_log "$name"; die "$1 did not start"; }
  wait_for 30 daemon_pid "$1" || { show_log "$name"; die "$1 did not write its pid file"; }
  started+=("$1")
}

# sacctmgr -i add ... is not idempotent (it fails on "Nothing new added"): add only what is missing.
ensure_association() {
  local user
  [ -n "$(sacctmgr -n -P list cluster "$cluster" format=cluster)" ] || sacctmgr -i add cluster "$cluster" >/dev/null
  [ -n "$(sacctmgr -n -P list account "$account" format=account)" ] \
    || sacctmgr -i add account "$account" Cluster="$cluster" Description="ipt tests" Organization=ipt >/dev/null
  for user in "$(id -un)" ${SUDO_USER:+"$SUDO_USER"}; do
    [ -n "$(sacctmgr -n -P list assoc cluster="$cluster" account="$account" user="$user" format=user)" ] \
      || sacctmgr -i add user "$user" Account="$account" Cluster="$cluster" >/dev/null
  done
}

no_jobs() { [ -z "$(squeue -h -o %i 2>/dev/null)" ]; }

node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null; }

node_idle() { case "$(node_state "$1")" in idle | mixed | allocated) return 0 ;; *) return 1 ;; esac; }

nodes_idle() {
  local n
  for n in "${nodes[@]}"; do node_idle "$n" || return 1; done
}

nodes_states() {
  local n out=()
  for n in "${nodes[@]}"; do out+=("$n $(node_state "$n")"); done
  (IFS=,; echo "${out[*]}")
}

# The state folder holds secrets (munge.key, mysql.pass) under a predictable name (/tmp/ipt-slurm) anyone could
# have made first: it is created fresh with mode 0700, and an existing one is used only when it is a real folder
# owned by this user and writable by nobody else (so everything in it was written by this user or by the daemons'
# users in the folders made for them); anything else is refused, never trusted.
claim_state() {
  if [ -e "$state" ] || [ -L "$state" ]; then
    [ -d "$state" ] && [ ! -L "$state" ] || die "$state: exists and is not a folder (a link or a file); remove it or pick another STATE_DIR"
    [ "$(stat -c %u "$state")" = "$(id -u)" ] || die "$state: owned by uid $(stat -c %u "$state"), not by this user; refusing to use a munge.key or mysql.pass found there (remove it or pick another STATE_DIR)"
    case "$(stat -c %A "$state")" in ?????w????|????????w?) die "$state: writable by others; refusing to use a munge.key or mysql.pass found there (remove it or pick another STATE_DIR)" ;; esac
    local f
    for f in "$state/mysql.pass" "$state/munge" "$state/munge/munge.key" "$state/etc"; do
      [ ! -L "$f" ] || die "$f: a link; refusing to use it (remove $state or pick another STATE_DIR)"
    done
  else
    mkdir -p "$(dirname "$state")"
    mkdir -m 700 "$state"
  fi
}

up() {
  [ "$(id -u)" = 0 ] || die "bringing up the local cluster needs root (slurmd, munged as the munge user)"
  claim_state
  mkdir -p "$state"/{etc,log,run,spool/ctld,spool/d}
  chmod 711 "$state"  # the munge and mysql users reach their own folders in it; nobody else lists it
  exec 9>"$state/lock"
  flock 9
  install_packages
  if [ ! -s "$state/mysql.pass" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$state/mysql.pass")
  fi
  if [ -e "$state/run/slurmd.pid" ]; then
    # a cluster brought up by the single-node version of this script: its slurmd and slurmctld know one node
    stop_legacy_slurmd
    stop slurmctld
    rm -f "$state/run/slurmd.pid"
  fi
  write_configs
  started=()
  start_munged
  start_mariadbd
  start_slurm_daemon slurmdbd
  wait_for 60 sacctmgr -n list cluster || { show_log slurmdbd; die "slurmdbd does not answer sacctmgr"; }
  ensure_association
  start_slurm_daemon slurmctld
  wait_for 30 scontrol ping || { show_log slurmctld; die "slurmctld does not answer scontrol ping"; }
  local n
  for n in "${nodes[@]}"; do start_slurm_daemon "slurmd:$n"; done
  if ! wait_for 30 nodes_idle; then
    # a node left down or drained by an earlier run: tell slurmctld it is back
    for n in "${nodes[@]}"; do
      node_idle "$n" || scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
    done
    wait_for 30 nodes_idle || { show_log "slurmd-$host"; die "nodes not idle: $(nodes_states)"; }
  fi
  wait_for 30 sacct -n -X || { show_log slurmdbd; die "sacct does not answer"; }
  log "${#started[@]} daemon(s) started${started[*]:+: ${started[*]}}; nodes $(nodes_states)," \
    "partition $partition, account $account, cluster $cluster"
  echo "export SLURM_CONF=$conf"
}

status() {
  local name pid ok=0
  for name in "${daemons[@]}"; do
    if pid="$(daemon_pid "$name")"; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; ok=1; fi
  done
  if [ "$ok" = 0 ]; then
    echo "nodes: $(nodes_states)"
    nodes_idle && sacct -n -X >/dev/null 2>&1 || ok=1
  fi
  [ "$ok" = 0 ] && echo "export SLURM_CONF=$conf"
  return "$ok"
}

down() {
  [ -d "$state" ] || { log "nothing at $state"; return 0; }
  exec 9>"$state/lock"
  flock 9
  local jobs
  if daemon_pid slurmctld >/dev/null; then
    jobs="$(squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      wait_for 40 no_jobs || log "jobs still listed: $(squeue -h -o %i | xargs)"
    fi
  fi
  # the Slurm daemons together, then what they use (the database, munge) together
  # every slurmd with a pid file (also of nodes an earlier IPT_SLURM_NODES had, and the single-node layout's)
  local f slurmds=()
  for f in "$state"/run/slurmd-*.pid; do [ -e "$f" ] && slurmds+=("slurmd:$(basename "$f" .pid | sed 's/^slurmd-//')"); done
  stop "${slurmds[@]}" slurmctld slurmdbd
  [ -e "$state/run/slurmd.pid" ] && stop_legacy_slurmd
  stop mariadbd munged
}

stop_legacy_slurmd() {  # the single slurmd of a cluster brought up by an earlier version of this script
  local pid
  pid="$(tr -dc 0-9 <"$state/run/slurmd.pid")"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ]; then
    kill -TERM "$pid" && wait_for 30 test ! -e "/proc/$pid" && echo "stopped slurmd (pid $pid)"
  fi
  return 0
}

stop() {  # TERM to each running daemon named, then wait for all of them (KILL after 30 s)
  local name pid i pids=() names=()
  for name in "$@"; do
    pid="$(daemon_pid "$name")" || continue
    kill -TERM "$pid" && pids+=("$pid") && names+=("$name")
  done
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}" name="${names[$i]}"
    if ! wait_for 30 test ! -e "/proc/$pid"; then
      log "$name (pid $pid) ignored SIGTERM: killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "stopped $name (pid $pid)"
  done
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status [STATE_DIR]" >&2; exit 2 ;;
esac
