#!/usr/bin/env bash
# A real Slurm 22.05 test cluster on this one machine, its hosts isolated like separate machines:
# an admin host (MariaDB, slurmdbd, slurmctld) and one host per node (slurmd), each its own
# network, mount and UTS namespace on the bridge rbc0, with its own /run, /tmp, spool and munged.
# With --release 24.11|26.05, the same cluster from that Debian release (docs/slurm-releases.md).
#
#   cluster.sh up [--nodes N] [--state-dir DIR] [--plugstack FILE] [--release R]
#   cluster.sh down [--state-dir DIR]
#   cluster.sh status [--state-dir DIR]
#   cluster.sh env [--state-dir DIR]        # eval "$(slurm-tests/cluster.sh env)"
#   cluster.sh exec [--state-dir DIR] HOST CMD...   # CMD on HOST (admin, node1, ...), in $PWD
#
# Only one cluster can be up at a time (the bridge, the node namespaces and the ports are global);
# /run/slurm-rbc.current names the state dir of the cluster that is up. Every daemon runs as root
# (SlurmUser=root), which keeps a throw-away test cluster free of users, keys and permissions work.
# The machine running cluster.sh plays the login node: it has a munged of its own and runs the
# clients (sinfo, srun, sbatch...) with SLURM_CONF.
# Environment: RBC_STATE_DIR (default state dir), RBC_NODES (default node count),
# RBC_PLUGSTACK (a plugstack.conf fragment to include, same as --plugstack),
# RBC_SLURM_RELEASE (same as --release: 24.11 or 26.05 run every daemon of that Debian release
# inside the root built by scripts/slurm-release.sh; empty or 22.05: the host's own Slurm).
set -euo pipefail
# The slurm.conf lines shared with spank-plugin/tests/minicluster.sh.
# shellcheck source=slurm-conf.sh
. "$(dirname "$(readlink -f "$0")")/slurm-conf.sh"

readonly CURRENT=/run/slurm-rbc.current
# The checkout this script belongs to.
REPO_DIR=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
readonly REPO_DIR
# Serialises up and down of concurrent callers (fd 9; daemons must not inherit it).
readonly OP_LOCK=/run/slurm-rbc.op.lock
readonly BRIDGE=rbc0
readonly NET=198.18.0
readonly CONTAINERS=198.19.0.0/20
# rebalancerd leases each node's agent blocks of $CONTAINERS this long (64 addresses).
readonly BLOCK_PREFIX=26
readonly CLUSTER_NAME=rbc
# slurmctld, slurmdbd and MariaDB listen in the root namespace: ports away from the defaults, so that
# a private cluster elsewhere on the machine (default 6817/6819) does not collide. slurmd is per netns.
readonly CTLD_PORT=16817 SLURMD_PORT=6818 DBD_PORT=16818 DB_PORT=16819
# The admin host: its name (hostname, SlurmctldHost), network namespace and address.
readonly ADMIN=admin ADMIN_NETNS=rbc-admin ADMIN_ADDR=$NET.2
# Directories private to each host, KEY:PATH, backed by $S/host/HOST/KEY.
readonly PRIVATE_DIRS="run:/run tmp:/tmp spool:/var/spool/slurmd state:/var/lib/rebalancer"
# Where a node's agent listens for its SPANK plugin, on the node (local clients only).
readonly AGENT_SOCKET=/run/rebalancer/agent.sock
# The agents' TCP control port: the controller on the admin host reaches them there.
readonly CONTROL_PORT=7879
readonly MAX_NODES=200
# If the bridge vanishes under a running cluster, its traffic must not follow the default route.
readonly FALLBACK_METRIC=4242

log() { printf 'cluster: %s\n' "$*" >&2; }
# RBC_VERBOSE=1 times each phase of up.
phase() { [ "${RBC_VERBOSE:-0}" = 1 ] && log "$(date +%T.%3N) $*"; return 0; }
die() { printf 'cluster: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
state_dir=${RBC_STATE_DIR:-}
state_dir_given=0
[ -n "$state_dir" ] && state_dir_given=1
nodes=${RBC_NODES:-3}
plugstack=${RBC_PLUGSTACK:-}
release=${RBC_SLURM_RELEASE:-}
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
    --nodes=*) nodes=${1#*=}; shift ;;
    --state-dir) state_dir=${2:?--state-dir needs a directory}; state_dir_given=1; shift 2 ;;
    --state-dir=*) state_dir=${1#*=}; state_dir_given=1; shift ;;
    --plugstack) plugstack=${2:?--plugstack needs a file}; shift 2 ;;
    --plugstack=*) plugstack=${1#*=}; shift ;;
    --release) release=${2:?--release needs a release}; shift 2 ;;
    --release=*) release=${1#*=}; shift ;;
    -h|--help) usage 0 ;;
    # exec HOST CMD...: the options end at HOST.
    *) case $cmd in exec | _mounts) break ;; esac; die "unknown argument '$1'" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, daemons)"

# Without --state-dir, commands other than up act on the cluster that is up.
if [ "$state_dir_given" = 0 ]; then
  if [ "$cmd" != up ] && [ -s "$CURRENT" ]; then
    state_dir=$(cat "$CURRENT")
  else
    state_dir=/tmp/slurm-rbc
  fi
fi
case $state_dir in /*) ;; *) state_dir=$PWD/$state_dir ;; esac
state_dir=${state_dir%/}
[ -n "$state_dir" ] && [ "$state_dir" != / ] || die "refusing state dir '/'"
# Namespace arguments and mount lists are split on white space.
case $state_dir in *[[:space:]]*) die "the state dir '$state_dir' must not contain white space" ;; esac
S=$state_dir
[ "$release" = 22.05 ] && release=
# Commands other than up act on the release the cluster was started with.
if [ "$cmd" != up ] && [ -s "$S/release" ]; then release=$(cat "$S/release"); fi
# Already inside a release's root (scripts/slurm-release.sh run R ...): its Slurm is the local one.
inside_root=0
[ -e /.slurm-release-complete ] && { release=; inside_root=1; }
if [ -n "$release" ]; then
  "$(dirname "$(readlink -f "$0")")/../scripts/slurm-release.sh" path "$release" >/dev/null || exit 2
fi

node_names() {
  local n=$1 k
  for ((k = 1; k <= n; k++)); do printf 'node%d\n' "$k"; done
}

# Node count of the cluster in $S (recorded at up), else 0.
recorded_nodes() {
  if [ -s "$S/nodes" ]; then cat "$S/nodes"; else echo 0; fi
}

# A killed daemon whose parent does not reap it stays a zombie (pid 1 here may not reap): not alive.
pid_alive() {
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local st
  st=$(sed 's/.*) //; s/ .*//' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$st" != Z ]
}
pidfile_alive() { [ -s "$1" ] && pid_alive "$(cat "$1")"; }

tail_log() {
  local f=$1
  [ -f "$f" ] || { log "(no log at $f)"; return 0; }
  printf -- '----- last lines of %s -----\n' "$f" >&2
  tail -n 25 "$f" >&2
  printf -- '-----\n' >&2
}

# Waits up to $1 seconds (polling every 0.1 s, each try at most 5 s) for "$2..." to succeed.
wait_for() {
  local end=$((SECONDS + $1))
  shift
  while [ "$SECONDS" -lt "$end" ]; do
    if declare -F "$1" >/dev/null; then
      "$@" >/dev/null 2>&1 && return 0
    else
      timeout 5 "$@" >/dev/null 2>&1 && return 0
    fi
    sleep 0.1
  done
  return 1
}

# ----- another Slurm release (--release R) -------------------------------------------------------
# Every daemon and client of release R runs chrooted into R's root (scripts/slurm-release.sh), in
# the host's pid and network namespaces: nodes keep their netns (nsenter --net, then chroot). The
# root sees the host's /proc, /sys, /dev, /run, /tmp, /work, /home, /root, this checkout and
# account files at the same paths, so state-dir paths, pid files and job users mean the same inside and out.
# $S/bin holds one wrapper per Slurm, munge and MariaDB command; PATH puts it first.

readonly RELEASE_BINDS="/proc /sys /dev /run /tmp /work /home /root"
readonly RELEASE_FILES="/etc/hosts /etc/passwd /etc/group /etc/shadow"
readonly RELEASE_TOOLS="slurmctld slurmd slurmdbd slurmstepd srun sbatch salloc scontrol sinfo squeue
  sacct sacctmgr scancel sattach sstat sprio sshare sreport strigger sbcast sdiag munged munge
  unmunge remunge mariadb mariadbd mariadb-install-db mysql"
# With the libmariadb of Debian's MariaDB 11.8.9 (trixie and sid), slurmdbd's start-up query fails
# ("5027 Number of columns in result (=1) set execeeds maxmimum allowed number of columns (=0)")
# and slurmdbd exits; the mariadb client runs the same query fine. slurmdbd alone gets the host's
# libmariadb.so.3 (same soname), which scripts/slurm-release.sh puts here in the root.
# RBC_RELEASE_OWN_LIBMARIADB=1 keeps the release's own library (to re-check after an update).
readonly RELEASE_DBD_LIBDIR=/usr/local/lib/slurm-rebalancer/host-libmariadb
release_dbd_env() {
  if [ "${RBC_RELEASE_OWN_LIBMARIADB:-0}" = 1 ]; then echo env; else echo "env LD_LIBRARY_PATH=$RELEASE_DBD_LIBDIR"; fi
}

release_root() {
  local root
  root=$("$(dirname "$(readlink -f "$0")")/../scripts/slurm-release.sh" path "$release") || exit 1
  echo "$root"
}

# Called by up, before anything starts: bind mounts (recorded in $S/release-mounts) and wrappers.
release_setup() {
  local root m t
  root=$(release_root)
  "$(dirname "$(readlink -f "$0")")/../scripts/slurm-release.sh" check "$release" ||
    die "the root of Slurm $release is not usable: run scripts/slurm-release.sh build $release"
  echo "$release" >"$S/release"
  : >"$S/release-mounts"
  # The root itself must be a mount point: "ip netns exec" and "ip -n" (the agent) run
  # "mount --make-rslave /", which fails with EINVAL on a chroot that is a plain directory.
  mountpoint -q "$root" && umount -R -l "$root"
  mount --bind "$root" "$root"
  mount --make-rslave "$root"
  echo "$root" >>"$S/release-mounts"
  for m in $RELEASE_BINDS; do
    [ -d "$m" ] || continue
    mkdir -p "$root$m"
    mountpoint -q "$root$m" && umount -R -l "$root$m"
    mount --rbind "$m" "$root$m"
    # Unmounting the copy later must never reach the host's own mounts.
    mount --make-rslave "$root$m"
    echo "$root$m" >>"$S/release-mounts"
  done
  # A checkout elsewhere (CI clones into any directory): its binaries and scripts, same path.
  m=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
  if [ "$(stat -c %d:%i "$m")" != "$(stat -c %d:%i "$root$m" 2>/dev/null)" ]; then
    mkdir -p "$root$m"
    mount --rbind "$m" "$root$m"
    mount --make-rslave "$root$m"
    echo "$root$m" >>"$S/release-mounts"
  fi
  for m in $RELEASE_FILES; do
    [ -f "$m" ] || continue
    mountpoint -q "$root$m" && umount -l "$root$m"
    mount --bind "$m" "$root$m"
    echo "$root$m" >>"$S/release-mounts"
  done
  mkdir -p "$S/bin"
  local abs
  for t in $RELEASE_TOOLS; do
    abs=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$root" sh -c "command -v $t") ||
      die "$t is missing in $root"
    # $S/bin is on PATH inside the root too (tasks inherit it): there, run the tool itself.
    # chroot(8) changes to /: the wrapper returns to the caller's directory (same path inside).
    local pre=""
    # Trailing space: "env VAR=... " goes in front of the command.
    [ "$t" = slurmdbd ] && pre="$(release_dbd_env) "
    cat >"$S/bin/$t" <<EOF
#!/bin/sh
[ -e /.slurm-release-complete ] && exec $pre$abs "\$@"
exec chroot $root /bin/sh -c 'cd "\$1" 2>/dev/null || cd /; shift; exec $pre"\$@"' rbc "\$PWD" $abs "\$@"
EOF
    chmod 0755 "$S/bin/$t"
  done
  export PATH=$S/bin:$PATH
}

# cluster.sh run inside a release's root (e.g. a test binary linked with that release's
# libslurm): the root's tools are the local ones, only slurmdbd needs its library.
release_inside_setup() {
  mkdir -p "$S/bin"
  printf '#!/bin/sh\nexec %s /usr/sbin/slurmdbd "$@"\n' "$(release_dbd_env)" >"$S/bin/slurmdbd"
  chmod 0755 "$S/bin/slurmdbd"
  export PATH=$S/bin:$PATH
}

# Called by down once the daemons are gone.
release_teardown() {
  [ -s "$S/release-mounts" ] || return 0
  local m
  for m in $(tac "$S/release-mounts"); do
    mountpoint -q "$m" && umount -R -l "$m"
  done
  rm -f "$S/release-mounts"
}

# Per-release slurm.conf and slurmdbd.conf differences, applied after write_configs. None are
# needed so far: 24.11.5 and 26.05.5 accept the 22.05 files without a warning (measured).
release_configs() {
  case $release in
    24.11 | 26.05) ;;
  esac
}

# ----- hosts isolated like machines ----------------------------------------------------------------
# The admin host and every node are each a network, mount and UTS namespace (hostname = host
# name). The mount and UTS namespaces persist as bind mounts of their ns files, $S/ns/HOST.mnt and
# .uts (as `ip netns` keeps network namespaces), entered with nsenter (in_host, `cluster.sh exec`).
# Private to each host, like a machine's own disk: /run, /tmp, /var/spool/slurmd (SlurmdSpoolDir),
# /var/lib/rebalancer (agent state), backed by $S/host/HOST/{run,tmp,spool,state}, and a munged
# with the cluster's key (its socket, like every munge path in the configs, is the state dir's
# munge/munge.socket: on each host a bind of that host's own /run/munge). Shared, as a cluster
# shares them: the OS image (/usr...) and the rest of the file system, which plays the shared file
# system of home and work directories (/home, /work, /var/tmp), and the state dir at its own path
# (configs, logs; re-exposed when it lies under a private directory such as /tmp).
# No host sees $S/host (a read-only tmpfs hides it), the admin host included: the controller
# started there reaches the agents over the TCP control plane (controller_agents_toml), never
# through a socket. Every host's /etc/hosts is $S/hosts (the machine's own lines, then every host
# of the cluster), so host names resolve on each host as on a site's nodes.

host_names() { echo "$ADMIN"; node_names "$1"; }
host_addr() { if [ "$1" = "$ADMIN" ]; then echo "$ADMIN_ADDR"; else echo "$NET.$((10 + ${1#node}))"; fi; }
netns_of() { if [ "$1" = "$ADMIN" ]; then echo "$ADMIN_NETNS"; else echo "$1"; fi; }

# Runs "$@" on host $1 (its network, mount and UTS namespaces; working directory /).
in_host() {
  local h=$1
  shift
  nsenter --net="/run/netns/$(netns_of "$h")" --mount="$S/ns/$h.mnt" --uts="$S/ns/$h.uts" -- "$@"
}

# Creates host $1's mount and UTS namespaces (the network namespace exists already).
make_host() {
  local h=$1 b=$S/host/$1
  mkdir -p "$b"/{run,tmp,spool,state} "$b/run/munge"
  chmod 1777 "$b/tmp"
  install -m 0400 "$S/munge/munge.key" "$b/run/munge/munge.key"
  touch "$S/ns/$h.mnt" "$S/ns/$h.uts"
  echo "$h" >>"$S/hostlist"
  # The namespaces are made by a process of their own and bound here once it is inside them.
  # Binding a mount namespace's file is refused (EINVAL, or ELOOP with the new mount API) unless
  # the namespace is newer than the binder's by the kernel's count. Inside a release root (not
  # the first namespace) a new one counts as older about half the time, at random, on this
  # 2-CPU kernel (6.18; likely its per-CPU namespace ids): 21 of 40 binds failed in the 24.11
  # root, measured 2026-12-08, and `unshare --mount=FILE` fails the same way. Each try is a new
  # holder; 40 tries fail together about once in 10^12.
  local fifo=$S/ns/.$h.ready holder fd try ok=0
  for try in $(seq 1 40); do
    rm -f "$fifo"
    mkfifo "$fifo"
    # Read-write: opening does not wait for the writer, and a holder that dies is noticed.
    exec {fd}<>"$fifo"
    unshare --mount --uts --propagation private -- sh -c 'echo in >"$1"; exec sleep 600' sh "$fifo" \
      9>&- {fd}>&- &
    holder=$!
    if read -r -t 10 -u "$fd" _ && [ "$(readlink "/proc/$holder/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] &&
      mount --bind "/proc/$holder/ns/mnt" "$S/ns/$h.mnt" 2>/dev/null; then
      mount --bind "/proc/$holder/ns/uts" "$S/ns/$h.uts" && ok=1
    fi
    exec {fd}>&-
    rm -f "$fifo"
    kill "$holder" 2>/dev/null || true
    wait "$holder" 2>/dev/null || true
    [ "$ok" = 1 ] && break
  done
  [ "$ok" = 1 ] || die "could not set up the mount namespace of $h"
  nsenter --mount="$S/ns/$h.mnt" --uts="$S/ns/$h.uts" -- \
    "$(readlink -f "$0")" _mounts --state-dir "$S" "$h" 9>&- ||
    die "could not set up the mounts of $h"
}

setup_hosts() {
  local h m
  # Mount points in the OS image (Debian's slurmd and the agent use these paths).
  for m in $PRIVATE_DIRS; do mkdir -p "${m#*:}"; done
  if [ -n "$release" ]; then
    local root
    root=$(release_root)
    for m in $PRIVATE_DIRS; do mkdir -p "$root${m#*:}"; done
  fi
  # Bind mounts of ns files need a private parent mount (see unshare(1) --mount).
  mount --bind "$S/ns" "$S/ns"
  mount --make-private "$S/ns"
  for h in $(host_names "$nodes"); do make_host "$h"; done
}

# Runs inside host $1's new mount namespace (unshare; every mount private), before any daemon.
host_mounts() {
  local h=$1 b=$S/host/$1 m key target sub
  hostname "$h"
  # Copies of ns-file mounts (the other hosts', /run/netns/*) would keep those namespaces alive as
  # long as this one.
  awk '{for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "nsfs") print $5; break }}' \
    /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  # Shared like a cluster's file systems, at their own paths even when they lie under a private
  # directory (a checkout or state dir under /tmp): the state dir, and the checkout with its
  # build (the binaries and the SPANK plugin the hosts run, as a site installs them on its image).
  local shared p
  shared="$S $REPO_DIR ${CARGO_TARGET_DIR:-}"
  for m in $PRIVATE_DIRS; do
    key=${m%%:*} target=${m#*:}
    for p in $shared; do
      case $p in
        "$target"/*)
          sub=$b/$key/${p#"$target"/}
          mkdir -p "$sub"
          mount --bind "$p" "$sub"
          ;;
      esac
    done
    mount --rbind "$b/$key" "$target"
  done
  mkdir -p /run/munge /run/rebalancer
  mount --bind /run/munge "$S/munge"
  mount -t tmpfs -o ro,mode=0755,size=16k rbc-hidden "$S/host"
  mount --bind "$S/hosts" /etc/hosts
  if [ -n "$release" ]; then
    # Daemons of release R run chrooted into its root: the same private directories there.
    local root
    root=$(release_root)
    for m in $PRIVATE_DIRS; do mount --rbind "${m#*:}" "$root${m#*:}"; done
    if [ -d "$root$S/munge" ]; then
      mount --bind /run/munge "$root$S/munge"
      mount -t tmpfs -o ro,mode=0755,size=16k rbc-hidden "$root$S/host"
    fi
    [ -f "$root/etc/hosts" ] && mount --bind "$S/hosts" "$root/etc/hosts"
  fi
}

# Kills every process on the hosts (their mount namespaces, and the container network namespaces
# the agents made in their private /run/netns), then removes the namespaces.
down_hosts() {
  local f h p ino
  local -A host_of=()
  for f in "$S"/ns/*.mnt; do
    [ -e "$f" ] && mountpoint -q "$f" || continue
    h=$(basename "$f" .mnt)
    nsenter --mount="$f" sh -c 'for n in $(ls /run/netns 2>/dev/null); do
      ip netns pids "$n" 2>/dev/null | xargs -r kill -9; done' 2>/dev/null
    ino=$(stat -L -c %i "$f" 2>/dev/null) && host_of[$ino]=$h
  done
  if [ ${#host_of[@]} -gt 0 ]; then
    for p in /proc/[0-9]*; do
      ino=$(readlink "$p/ns/mnt" 2>/dev/null) || continue
      ino=${ino#mnt:[}; ino=${ino%]}
      [ -n "${host_of[$ino]:-}" ] && [ "${p#/proc/}" != "$$" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
  fi
  for f in "$S"/ns/*.mnt "$S"/ns/*.uts; do
    [ -e "$f" ] && mountpoint -q "$f" && umount "$f" 2>/dev/null
  done
  mountpoint -q "$S/ns" && umount -l "$S/ns"
  return 0
}

# Daemons of a cluster whose state dir is gone (deleted by hand, or by a test killed hard) still
# hold ports, namespaces or a bridge every later cluster needs (seen: an orphaned `slurmctld -i`
# on port 16817). A Slurm, munge or MariaDB daemon is an orphan when a directory its command line
# or SLURM_CONF names no longer exists in its own mount namespace.
kill_orphans() {
  local p comm d arg gone
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
    case $comm in slurmctld | slurmdbd | slurmd | munged | mariadbd) ;; *) continue ;; esac
    pid_alive "$p" || continue
    gone=""
    while read -r arg; do
      arg=${arg#--*=}
      case $arg in /*) ;; *) continue ;; esac
      d=$(dirname "$arg")
      [ -e "/proc/$p/root$d" ] || { gone=$d; break; }
    done < <({ tr '\0' '\n' <"/proc/$p/cmdline"; tr '\0' '\n' <"/proc/$p/environ" | sed -n 's/^SLURM_CONF=//p'; } 2>/dev/null)
    [ -n "$gone" ] || continue
    log "killing orphaned $comm (pid $p): its state dir $gone is gone"
    kill -9 "$p" 2>/dev/null
  done
  return 0
}

# The [agents] lines of a rebalancerd.toml on the admin host: how the controller reaches each
# node's agent. Over the TCP control plane: node names resolve through the hosts' /etc/hosts,
# and both ends prove themselves with munge credentials (the admin host's own munged).
controller_agents_toml() {
  cat <<EOT
# How rebalancerd on the admin host reaches each node's agent (written by cluster.sh): the
# agent's TCP control port, mutually authenticated with munge. The admin host has no path to
# any agent socket.
address_template = "{node}:$CONTROL_PORT"
name = "$ADMIN"
munge_socket = "$S/munge/munge.socket"
EOT
}

# The container addresses of the cluster's agents (top-level keys of every agent's config): the
# containers' subnet, from which each agent allocates addresses in the blocks rebalancerd leases
# it, as a site runs it (no `ipam = "local"`: two nodes could pick one address).
agent_ipam_toml() {
  cat <<EOT
# Container addresses (written by cluster.sh): from the blocks rebalancerd leases this node.
container_subnet = "$CONTAINERS"
ipam = "leased"
EOT
}

# The controller's [ipam] section: it leases the agents /$BLOCK_PREFIX blocks of the same subnet.
controller_ipam_toml() {
  cat <<EOT
# The container address blocks rebalancerd leases the agents (written by cluster.sh).
[ipam]
subnet = "$CONTAINERS"
block_prefix = $BLOCK_PREFIX
EOT
}

# The [control] section of node $1's agent config: its TCP control listener for the controller
# (root's credentials from the admin host; rebalancerd runs as root there).
agent_control_toml() {
  cat <<EOT
# The TCP control listener for rebalancerd on the admin host (written by cluster.sh).
[control]
listen = "$(host_addr "$1"):$CONTROL_PORT"
controller_uids = [0]
EOT
}

# /etc/hosts of every host: the machine's own lines, then the cluster's hosts.
hosts_file() {
  local h
  grep -v -E '[[:space:]](admin|node[0-9]+)([[:space:]]|$)' /etc/hosts || true
  echo "# The cluster's hosts (written by cluster.sh)."
  for h in $(host_names "$nodes"); do printf '%s\t%s\n' "$(host_addr "$h")" "$h"; done
}

# ----- down ---------------------------------------------------------------------------------------

# A node namespace is ours if its eth0 holds an address of our block.
netns_is_ours() {
  [ -e "/run/netns/$1" ] || return 1
  nsenter --net="/run/netns/$1" ip -4 -o addr show dev eth0 2>/dev/null | grep -q " $NET\."
}

kill_netns_pids() {
  local pids
  pids=$(ip netns pids "$1" 2>/dev/null) || return 0
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  return 0
}

# Processes whose command line names the state dir: daemons whose pid file is lost after a crash.
kill_state_dir_pids() {
  local f p
  for f in $(grep -lsF -- "$S/" /proc/[0-9]*/cmdline); do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" = "$$" ] && continue
    grep -qsF cluster.sh "$f" && continue
    kill -9 "$p" 2>/dev/null
  done
  return 0
}

# Node namespaces, veths, the bridge and the fallback routes.
down_network() {
  local n ns f
  n=$(recorded_nodes)
  [ "$n" -ge 3 ] 2>/dev/null || n=3
  # Namespaces named nodeK that carry our addresses, recorded or not (a crash may lose the record).
  for ns in $( (node_names "$n"; echo "$ADMIN_NETNS"; ls /run/netns 2>/dev/null) | grep -E "^(node[0-9]+|$ADMIN_NETNS)\$" | sort -u); do
    [ -e "/run/netns/$ns" ] || continue
    # A file that is no mount any more (a crash between `ip netns add` and its bind mount, or a
    # namespace unmounted by hand) makes the next `ip netns add` fail: nobody's, remove it.
    if ! mountpoint -q "/run/netns/$ns"; then
      rm -f "/run/netns/$ns"
      continue
    fi
    if netns_is_ours "$ns" || grep -qx "$ns" "$S/netns" 2>/dev/null; then
      kill_netns_pids "$ns"
      ip netns delete "$ns" 2>/dev/null
    fi
  done
  for f in /sys/class/net/rbc-node* /sys/class/net/rbc-admin; do
    [ -e "$f" ] && ip link delete "$(basename "$f")" 2>/dev/null
  done
  ip link delete "$BRIDGE" 2>/dev/null
  ip route delete unreachable "$NET.0/24" metric "$FALLBACK_METRIC" 2>/dev/null
  ip route delete unreachable "$CONTAINERS" metric "$FALLBACK_METRIC" 2>/dev/null
}

# The state dir of another cluster whose daemons still run, if any: it owns the network.
other_live_cluster() {
  local cur
  [ -s "$CURRENT" ] || return 1
  cur=$(cat "$CURRENT")
  [ "$cur" != "$S" ] || return 1
  local rc=0
  (S=$cur; daemon_states >/dev/null) || rc=$?
  [ "$rc" != 1 ] || return 1
  echo "$cur"
}

do_down() {
  set +e
  local f ns n k other
  # Daemons first (pid files): a moment to exit, then SIGKILL; the state goes away anyway.
  local -a pids=()
  for f in "$S"/run/*.pid "$S"/munge/munged.pid "$S"/db/mariadbd.pid \
    "$S"/host/*/run/munge/munged.pid; do
    [ -s "$f" ] && pids+=("$(cat "$f" 2>/dev/null)")
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null
    any_alive() { local p; for p in "${pids[@]}"; do pid_alive "$p" && return 0; done; return 1; }
    for ((k = 0; k < 10; k++)); do any_alive || break; sleep 0.1; done
    kill -KILL "${pids[@]}" 2>/dev/null
  fi
  phase down_hosts
  down_hosts
  if other=$(other_live_cluster); then
    log "leaving the network alone: it belongs to the cluster at $other"
  else
    phase down_network
    down_network
  fi
  phase kill_state_dir_pids
  kill_state_dir_pids
  sleep 0.2
  kill_state_dir_pids
  phase kill_orphans
  kill_orphans
  phase release_teardown
  release_teardown
  # The state dir is removed only if it looks like ours: never an arbitrary directory.
  if [ -d "$S" ]; then
    if [ -e "$S/.rbc-cluster" ] || [ -z "$(ls -A "$S" 2>/dev/null)" ]; then
      rm -rf "$S"
    else
      log "not removing $S: it was not created by cluster.sh"
    fi
  fi
  if [ -s "$CURRENT" ] && [ "$(cat "$CURRENT")" = "$S" ]; then rm -f "$CURRENT"; fi
  set -e
}

# ----- status -------------------------------------------------------------------------------------

# Prints one line per daemon; returns 0 if all run, 1 if none, 2 if some.
daemon_states() {
  local up=0 total=0 name f node
  local -a list=("munged:$S/munge/munged.pid" "mariadbd:$S/db/mariadbd.pid"
    "slurmdbd:$S/run/slurmdbd.pid" "slurmctld:$S/run/slurmctld.pid")
  for node in $(host_names "$(recorded_nodes)"); do list+=("munged-$node:$S/host/$node/run/munge/munged.pid"); done
  for node in $(node_names "$(recorded_nodes)"); do list+=("slurmd-$node:$S/run/slurmd-$node.pid"); done
  for entry in "${list[@]}"; do
    name=${entry%%:*}; f=${entry#*:}
    total=$((total + 1))
    if pidfile_alive "$f"; then
      up=$((up + 1)); printf '  %-14s running (pid %s)\n' "$name" "$(cat "$f")"
    else
      printf '  %-14s not running\n' "$name"
    fi
  done
  [ "$up" = "$total" ] && return 0
  [ "$up" = 0 ] && return 1
  return 2
}

do_status() {
  if [ ! -e "$S/.rbc-cluster" ]; then
    echo "no cluster at $S"
    return 1
  fi
  echo "cluster at $S ($(recorded_nodes) nodes)"
  local rc=0
  daemon_states || rc=$?
  if [ "$rc" = 0 ]; then
    SLURM_CONF=$S/slurm.conf sinfo -N -o '  %N %t %C' 2>&1 || true
  fi
  return "$rc"
}

do_env() {
  [ -e "$S/.rbc-cluster" ] || die "no cluster at $S (run: $0 up)"
  local n
  n=$(recorded_nodes)
  printf 'export SLURM_CONF=%q\n' "$S/slurm.conf"
  printf 'export RBC_STATE_DIR=%q\n' "$S"
  printf 'export RBC_NODES=%q\n' "$n"
  printf 'export RBC_NODE_NAMES=%q\n' "$(node_names "$n" | tr '\n' ' ' | sed 's/ $//')"
  # Hosts: `cluster.sh exec HOST CMD`; a host's private /run is $RBC_STATE_DIR/host/HOST/run.
  printf 'export RBC_ADMIN_HOST=%q\n' "$ADMIN"
  printf 'export RBC_AGENT_SOCKET=%q\n' "$AGENT_SOCKET"
  printf 'export RBC_CONTROLLER_AGENTS=%q\n' "$S/controller-agents.toml"
  # The controller's [ipam] section and the agents' container_subnet/ipam lines (leased blocks).
  printf 'export RBC_CONTROLLER_IPAM=%q\n' "$S/controller-ipam.toml"
  printf 'export RBC_AGENT_IPAM=%q\n' "$S/agent-ipam.toml"
  # Node N's agent's [control] section: $RBC_AGENT_CONTROL_DIR/nodeN.toml.
  printf 'export RBC_AGENT_CONTROL_DIR=%q\n' "$S/agent-control"
  if [ -n "$release" ]; then
    printf 'export RBC_SLURM_RELEASE=%q\n' "$release"
    printf 'export RBC_SLURM_ROOT=%q\n' "$(release_root)"
    printf 'export PATH=%q:"$PATH"\n' "$S/bin"
  fi
}

# ----- up -----------------------------------------------------------------------------------------

setup_network() {
  local k node
  ip link add "$BRIDGE" type bridge forward_delay 0
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  ip route add "$CONTAINERS" dev "$BRIDGE"
  ip route add unreachable "$NET.0/24" metric "$FALLBACK_METRIC"
  ip route add unreachable "$CONTAINERS" metric "$FALLBACK_METRIC"
  sysctl -qw "net.ipv4.conf.$BRIDGE.proxy_arp=1" "net.ipv4.neigh.$BRIDGE.proxy_delay=0"
  ip netns add "$ADMIN_NETNS"
  echo "$ADMIN_NETNS" >>"$S/netns"
  ip link add "rbc-$ADMIN" type veth peer name eth0 netns "$ADMIN_NETNS"
  ip link set "rbc-$ADMIN" master "$BRIDGE" up
  nsenter --net="/run/netns/$ADMIN_NETNS" sh -ec "
    ip link set lo up
    ip addr add $ADMIN_ADDR/24 dev eth0
    ip link set eth0 up"
  for ((k = 1; k <= nodes; k++)); do
    node=node$k
    ip netns add "$node"
    echo "$node" >>"$S/netns"
    ip link add "rbc-$node" type veth peer name eth0 netns "$node"
    ip link set "rbc-$node" master "$BRIDGE" up
    nsenter --net="/run/netns/$node" sh -ec "
      ip link set lo up
      ip addr add $NET.$((10 + k))/24 dev eth0
      ip link set eth0 up
      ip route add $CONTAINERS dev eth0
      sysctl -qw net.ipv4.conf.eth0.proxy_arp=1 net.ipv4.neigh.eth0.proxy_delay=0"
  done
}

make_munge_key() {
  mkdir -p "$S/munge"
  chmod 0711 "$S/munge"
  head -c 1024 /dev/urandom >"$S/munge/munge.key"
  chmod 0400 "$S/munge/munge.key"
}

# One munged on the login node (this machine) and one on every host, all with the cluster's key.
start_munge() {
  local h
  munged --force --socket="$S/munge/munge.socket" --key-file="$S/munge/munge.key" \
    --log-file="$S/log/munged.log" --pid-file="$S/munge/munged.pid" \
    --seed-file="$S/munge/munged.seed" 9>&- ||
    { tail_log "$S/log/munged.log"; die "munged did not start"; }
  wait_for 5 test -S "$S/munge/munge.socket" || { tail_log "$S/log/munged.log"; die "munged has no socket"; }
  for h in $(host_names "$nodes"); do
    # On the host, $S/munge is its own /run/munge.
    # --origin: the host's address (its name is in no resolver; munged would warn).
    in_host "$h" munged --force --socket="$S/munge/munge.socket" --key-file="$S/munge/munge.key" \
      --origin="$(host_addr "$h")" \
      --log-file="$S/log/munged-$h.log" --pid-file="$S/munge/munged.pid" \
      --seed-file="$S/munge/munged.seed" 9>&- ||
      { tail_log "$S/log/munged-$h.log"; die "munged on $h did not start"; }
  done
  for h in $(host_names "$nodes"); do
    wait_for 5 test -S "$S/host/$h/run/munge/munge.socket" ||
      { tail_log "$S/log/munged-$h.log"; die "munged on $h has no socket"; }
  done
}

start_mariadb() {
  mkdir -p "$S/db"
  cat >"$S/db/my.cnf" <<EOF
[mysqld]
datadir=$S/db/data
socket=$S/db/mariadbd.sock
pid-file=$S/db/mariadbd.pid
log-error=$S/log/mariadbd.log
bind-address=127.0.0.1
port=$DB_PORT
user=root
skip-name-resolve
innodb_buffer_pool_size=64M
innodb_log_file_size=16M
innodb_lock_wait_timeout=900
innodb_flush_log_at_trx_commit=0
EOF
  mariadb-install-db --defaults-file="$S/db/my.cnf" --auth-root-authentication-method=normal \
    --skip-test-db >"$S/log/mariadb-install.log" 2>&1 ||
    { tail_log "$S/log/mariadb-install.log"; die "mariadb-install-db failed"; }
  # setsid -f: the daemon is not a child of a subshell of ours that would stay behind.
  in_host "$ADMIN" setsid -f mariadbd --defaults-file="$S/db/my.cnf" </dev/null >>"$S/log/mariadbd.log" 2>&1 9>&-
  wait_for 20 mariadb --no-defaults -S "$S/db/mariadbd.sock" -uroot -e 'select 1' ||
    { tail_log "$S/log/mariadbd.log"; die "mariadbd did not start"; }
  mariadb --no-defaults -S "$S/db/mariadbd.sock" -uroot -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
    { tail_log "$S/log/mariadbd.log"; die "could not create the slurm database user"; }
}

write_configs() {
  local k mem
  # Every node sees the whole machine; splitting the memory keeps the cluster's total honest.
  mem=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / nodes * 9 / 10))
  : >"$S/plugstack.conf"
  if [ -n "$plugstack" ]; then
    [ -r "$plugstack" ] || die "plugstack file '$plugstack' is not readable"
    case $plugstack in /*) ;; *) plugstack=$PWD/$plugstack ;; esac
    echo "include $plugstack" >>"$S/plugstack.conf"
  fi
  {
    echo "# Written by slurm-tests/cluster.sh; removed by 'cluster.sh down'."
    # slurmctld runs on the admin host (its hostname); the spool is node-local, private to each
    # node (pid files and logs stay in the state dir, where the tests and `status` read them).
    slurm_conf_common "$S" "$CLUSTER_NAME" "$ADMIN($ADMIN_ADDR)" linuxproc none /var/spool/slurmd
    cat <<EOF
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ADMIN_ADDR
AccountingStoragePort=$DBD_PORT
# For accounting_storage/slurmdbd this is the munge socket (AuthInfo is not used for slurmdbd).
AccountingStoragePass=$S/munge/munge.socket
MailProg=/bin/true
SchedulerParameters=permit_job_expansion
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=60
MessageTimeout=10
EOF
  } >"$S/slurm.conf"
  for ((k = 1; k <= nodes; k++)); do
    echo "NodeName=node$k NodeAddr=$NET.$((10 + k)) CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN" >>"$S/slurm.conf"
  done
  # All nodes share the machine's two cores; each node still hands out its own 2 CPUs exclusively,
  # so placement (which the rebalancer changes) stays visible in Slurm.
  echo "PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >>"$S/slurm.conf"

  cat >"$S/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$S/munge/munge.socket
DbdHost=$ADMIN
DbdAddr=$ADMIN_ADDR
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$S/log/slurmdbd.log
PidFile=$S/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 0600 "$S/slurmdbd.conf"
  controller_agents_toml >"$S/controller-agents.toml"
  controller_ipam_toml >"$S/controller-ipam.toml"
  agent_ipam_toml >"$S/agent-ipam.toml"
  mkdir -p "$S/agent-control"
  for ((k = 1; k <= nodes; k++)); do agent_control_toml "node$k" >"$S/agent-control/node$k.toml"; done
  hosts_file >"$S/hosts"
}

start_slurm() {
  local node k
  export SLURM_CONF=$S/slurm.conf
  in_host "$ADMIN" env SLURM_CONF="$SLURM_CONF" PATH="$PATH" slurmdbd 9>&- || { tail_log "$S/log/slurmdbd.log"; die "slurmdbd did not start"; }
  wait_for 30 sacctmgr -n list cluster ||
    { tail_log "$S/log/slurmdbd.log"; die "slurmdbd does not answer"; }
  phase slurmctld
  in_host "$ADMIN" env SLURM_CONF="$SLURM_CONF" PATH="$PATH" slurmctld -i 9>&- || { tail_log "$S/log/slurmctld.log"; die "slurmctld did not start"; }
  wait_for 20 scontrol ping || { tail_log "$S/log/slurmctld.log"; die "slurmctld does not answer"; }
  for ((k = 1; k <= nodes; k++)); do
    node=node$k
    in_host "$node" env SLURM_CONF="$SLURM_CONF" PATH="$PATH" slurmd -N "$node" -f "$S/slurm.conf" 9>&- ||
      { tail_log "$S/log/slurmd-$node.log"; die "slurmd on $node did not start"; }
  done
  phase "wait for idle nodes"
  all_idle() { [ "$(sinfo -h -N -o '%t' | grep -c '^idle$')" = "$nodes" ]; }
  if ! wait_for 30 all_idle; then
    sinfo -N >&2 || true
    for node in $(node_names "$nodes"); do tail_log "$S/log/slurmd-$node.log"; done
    tail_log "$S/log/slurmctld.log"
    die "nodes did not become idle"
  fi
}

do_up() {
  [[ $nodes =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le "$MAX_NODES" ] ||
    die "--nodes must be 1..$MAX_NODES, got '$nodes'"
  local cur=""
  [ -s "$CURRENT" ] && cur=$(cat "$CURRENT")
  if [ -n "$cur" ] && [ "$cur" != "$S" ]; then
    local other_rc=0
    (S=$cur; daemon_states >/dev/null) || other_rc=$?
    if [ "$other_rc" != 1 ]; then
      die "a cluster is already up at $cur; take it down first: $0 down --state-dir $cur"
    fi
    log "cleaning up after a crashed cluster at $cur"
    (S=$cur; do_down)
  fi
  if [ -e "$S/.rbc-cluster" ]; then
    local rc=0
    daemon_states >/dev/null || rc=$?
    if [ "$rc" = 0 ] && SLURM_CONF=$S/slurm.conf wait_for 5 scontrol ping; then
      log "already up at $S ($(recorded_nodes) nodes)"
      return 0
    fi
    log "cluster at $S is partly up: taking it down first"
  fi
  do_down
  # Leftovers of another state dir (or of a crash without a record) would make the next steps fail.
  if [ -e "/sys/class/net/$BRIDGE" ]; then
    die "bridge $BRIDGE exists but belongs to no known cluster: run '$0 down --state-dir DIR' for the old state dir, or 'ip link delete $BRIDGE'"
  fi
  if [ -e "$S" ] && [ -n "$(ls -A "$S")" ]; then
    die "state dir $S exists and is not a cluster's: choose another --state-dir"
  fi
  mkdir -p "$S"/{log,run,slurmctld,ns,host}
  touch "$S/.rbc-cluster"
  echo "$nodes" >"$S/nodes"
  echo "$S" >"$CURRENT"
  if [ -n "$release" ]; then
    phase release_setup
    release_setup
  elif [ "$inside_root" = 1 ]; then
    release_inside_setup
  fi
  trap 'rc=$?; if [ $rc != 0 ]; then log "up failed; state left in $S for inspection: run '"'"'$0 down --state-dir $S'"'"' to clean"; fi' EXIT
  local t0=$SECONDS
  phase setup_network
  setup_network
  phase write_configs
  write_configs
  [ -z "$release" ] || release_configs
  make_munge_key
  phase setup_hosts
  setup_hosts
  phase start_munge
  start_munge
  phase start_mariadb
  start_mariadb
  phase start_slurm
  start_slurm
  trap - EXIT
  log "up at $S: $nodes nodes in $((SECONDS - t0)) s; run: eval \"\$($0 env)\""
}

# Descriptors inherited from the caller (flock(1)'s lock of a test run, a test harness's pipes)
# would be held by every daemon started here, and by an orphaned one for ever: keep only stdio.
# 255 is bash's own descriptor of this script.
close_inherited_fds() {
  local fd
  for fd in $(ls "/proc/$$/fd"); do
    [ "$fd" -gt 2 ] && [ "$fd" != 255 ] && eval "exec $fd>&-"
  done
  return 0
}

op_lock() {
  exec 9>"$OP_LOCK"
  flock -w 300 9 || die "another cluster.sh up/down holds $OP_LOCK for 300 s"
}

# Commands on a cluster of another release reach its clients through the wrappers.
if [ "$cmd" != up ] && [ -n "$release" ] && [ -d "$S/bin" ]; then export PATH=$S/bin:$PATH; fi

case $cmd in up | down | exec) close_inherited_fds ;; esac
case $cmd in
  up) op_lock; do_up ;;
  down) op_lock; do_down; log "down ($S)" ;;
  status) do_status ;;
  env) do_env ;;
  exec)
    h=${1:-}
    [ -n "$h" ] && [ $# -ge 2 ] || die "usage: $0 exec [--state-dir DIR] HOST CMD..."
    shift
    grep -qx -- "$h" "$S/hostlist" 2>/dev/null || die "no host '$h' in the cluster at $S (hosts: $(tr '\n' ' ' <"$S/hostlist" 2>/dev/null))"
    # nsenter starts in the host's /: come back to the caller's directory when the host has it.
    # Every step execs, so CMD keeps this script's pid (a caller can signal it).
    exec nsenter --net="/run/netns/$(netns_of "$h")" --mount="$S/ns/$h.mnt" --uts="$S/ns/$h.uts" -- \
      sh -c 'cd "$1" 2>/dev/null || cd /; shift; exec "$@"' rbc "$PWD" "$@"
    ;;
  _mounts) host_mounts "${1:?}" ;;
  -h|--help|help) usage 0 ;;
  *) die "unknown command '$cmd'" ;;
esac
