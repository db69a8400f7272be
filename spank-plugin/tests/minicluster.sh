#!/usr/bin/env bash
# A private two-node Slurm 22.05 cluster for the SPANK plugin's tests: munged, slurmctld and two
# slurmd (sp1, sp2; partition "one" = sp1 is the default, "two" = both), all inside one network
# namespace (loopback only), so it never collides with the
# shared harness cluster (slurm-tests/cluster.sh owns the bridge rbc0, node1..N and /run state).
#
#   minicluster.sh up DIR PLUGSTACK_FRAGMENT   # DIR is created; prints nothing on success
#   minicluster.sh down DIR
#   minicluster.sh run DIR CMD...              # CMD inside the namespace with SLURM_CONF set
#
# The namespace is named after DIR's basename (rbsp-*); every daemon's pid file lives in DIR.
set -euo pipefail
# The slurm.conf lines shared with slurm-tests/cluster.sh.
# shellcheck source=../../slurm-tests/slurm-conf.sh
. "$(dirname "$(readlink -f "$0")")/../../slurm-tests/slurm-conf.sh"

die() { printf 'minicluster: %s\n' "$*" >&2; exit 1; }
cmd=${1:?usage: minicluster.sh up|down|run DIR ...}
dir=${2:?missing DIR}
shift 2
case $dir in /tmp/*) ;; *) die "DIR must be under /tmp, got '$dir'" ;; esac
ns=rbsp-$(basename "$dir" | tr -c 'a-zA-Z0-9\n' '-' | cut -c1-10)
enter() { nsenter --net="/run/netns/$ns" "$@"; }

wait_for() {
  local limit=$1 i
  shift
  for ((i = 0; i < limit * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

down() {
  local f
  for f in "$dir"/run/*.pid; do
    [ -s "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.5
  for f in "$dir"/run/*.pid; do
    [ -s "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  if [ -e "/run/netns/$ns" ]; then
    # Leftover steps and tasks of the private node.
    local ino p
    ino=$(stat -L -c %i "/run/netns/$ns")
    for p in /proc/[0-9]*; do
      [ "$(stat -L -c %i "$p/ns/net" 2>/dev/null)" = "$ino" ] && kill -9 "${p#/proc/}" 2>/dev/null || true
    done
    ip netns delete "$ns" 2>/dev/null || true
  fi
  # Empty cgroups slurmd left (RBSP_PROCTRACK/RBSP_TASK=cgroup); the node names are ours.
  local cg
  for cg in /sys/fs/cgroup/*/slurm_sp1 /sys/fs/cgroup/*/slurm_sp2; do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  [ -e "$dir/.minicluster" ] && rm -rf "$dir"
  return 0
}

up() {
  local frag=${1:?missing PLUGSTACK_FRAGMENT} host
  [ -r "$frag" ] || die "cannot read $frag"
  down
  mkdir -p "$dir"/{run,log,slurmctld,slurmd,munge}
  touch "$dir/.minicluster"
  host=$(hostname)
  ip netns add "$ns"
  enter ip link set lo up
  # getaddrinfo(AI_ADDRCONFIG) in slurmctld finds nothing with loopback alone: give the namespace
  # one isolated address on a veth pair that stays inside it (no route leaves it; 198.18.64.0/24 is unused by the other test blocks).
  enter ip link add rbsp0 type veth peer name rbsp1
  enter ip addr add 198.18.64.1/32 dev rbsp0
  enter ip link set rbsp1 up
  enter ip link set rbsp0 up
  head -c 1024 /dev/urandom >"$dir/munge/munge.key"
  chmod 0400 "$dir/munge/munge.key"
  chmod 0711 "$dir/munge"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --log-file="$dir/log/munged.log" --pid-file="$dir/run/munged.pid" \
    --seed-file="$dir/munge/munged.seed"
  echo "include $frag" >"$dir/plugstack.conf"
  {
    slurm_conf_common "$dir" rbsp "$host(127.0.0.1)" "${RBSP_PROCTRACK:-linuxproc}" "${RBSP_TASK:-none}"
    cat <<EOF
SlurmdDebug=verbose
AccountingStorageType=accounting_storage/none
MinJobAge=30
NodeName=sp1 NodeAddr=127.0.0.1 Port=6818 CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=sp2 NodeAddr=127.0.0.1 Port=6821 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=one Nodes=sp1 Default=YES MaxTime=INFINITE State=UP
PartitionName=two Nodes=sp1,sp2 MaxTime=INFINITE State=UP
EOF
  } >"$dir/slurm.conf"
  # RBSP_PROCTRACK=cgroup: process tracking with cgroup v1 (freezer), as most sites run it.
  # RBSP_TASK=cgroup: per-task cgroups (memory constrained).
  printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nCgroupMountpoint=/sys/fs/cgroup\nConstrainRAMSpace=yes\n' >"$dir/cgroup.conf"
  export SLURM_CONF=$dir/slurm.conf
  enter slurmctld -i || die "slurmctld did not start: $(tail -5 "$dir/log/slurmctld.log" 2>&1)"
  wait_for 20 enter scontrol ping || die "slurmctld does not answer"
  local n
  for n in sp1 sp2; do
    mkdir -p "$dir/slurmd/$n"
    enter slurmd -N "$n" || die "slurmd $n did not start: $(tail -5 "$dir/log/slurmd-$n.log" 2>&1)"
  done
  wait_for 30 sh -c "[ \$(nsenter --net=/run/netns/$ns sinfo -h -N -p two -o %t | grep -cx idle) = 2 ]" ||
    die "nodes did not become idle: $(tail -5 "$dir/log/slurmd-sp2.log" 2>&1)"
}

case $cmd in
  up) up "$@" ;;
  down) down ;;
  run) SLURM_CONF=$dir/slurm.conf exec nsenter --net="/run/netns/$ns" "$@" ;;
  *) die "unknown command '$cmd'" ;;
esac
