#!/usr/bin/env bash
# Builds a root file system holding one Slurm release from Debian's own packages, for the test
# cluster (slurm-tests/cluster.sh --release R) and for building the plugin and bindings against
# that release's headers. Idempotent: a second run only checks the root.
#
# Usage: scripts/slurm-release.sh build RELEASE     build (or check) the root of RELEASE
#        scripts/slurm-release.sh check RELEASE     check only; exit 1 when the root is not usable
#        scripts/slurm-release.sh path RELEASE      print the root's directory
#        scripts/slurm-release.sh env RELEASE       print SLURM_INCLUDE_DIR/SLURM_LIB_DIR exports
#                                                   for both build scripts (build.rs files)
#        scripts/slurm-release.sh run RELEASE CMD.. run CMD with the root as / (pivot_root in a
#                                                   private mount namespace) that sees the host's /proc,
#                                                   /sys, /dev, /run, /tmp, /work and /root
#                                                   (cargo, the checkout); e.g. build the plugin
#                                                   against the release inside its root
#        scripts/slurm-release.sh list              releases this script knows, with their suites
# Exit status: 0 done, 1 error, 3 Debian's repository could not be installed from (mmdebstrap
# failed: the network, or a suite that is not installable today, which happens in sid).
# RELEASE is 24.11 (Debian trixie) or 26.05 (Debian sid). 22.05 is the host's own (bookworm).
# Roots live under $SLURM_RELEASES_DIR (default /var/lib/slurm-rebalancer/releases), never in git.
set -euo pipefail

log() { printf '\033[1mslurm-release:\033[0m %s\n' "$*" >&2; }
die() { printf 'slurm-release: error: %s\n' "$*" >&2; exit 1; }

RELEASES_DIR=${SLURM_RELEASES_DIR:-/var/lib/slurm-rebalancer/releases}

# Release -> Debian suite. Keep in step with docs/slurm-releases.md.
suite_of() {
  case "$1" in
    24.11) echo trixie ;;
    26.05) echo sid ;;
    *) die "unknown release '$1' (known: 24.11, 26.05; 22.05 is the host's)" ;;
  esac
}

# Packages every root holds: the Slurm daemons and headers of that release, munge and MariaDB
# for slurmdbd, and what the tests run inside a node (python3, ip, ps, nft).
base_pkgs=(
  slurmctld slurmd slurmdbd slurm-client libslurm-dev munge mariadb-server mariadb-client
  python3 iproute2 procps psmisc nftables util-linux mount ca-certificates
  # Building the plugin and the bindings inside the root (bindgen needs libclang).
  build-essential clang libclang-dev pkgconf
)

# CRIU: sid's package is 4.2.1 (works here); trixie's 4.1.1 fails on TCP dumps with this kernel
# (FIELD-NOTES), so trixie gets the host's /usr/local/sbin/criu and the libraries it links.
criu_pkgs_of() {
  case "$1" in
    26.05) echo criu ;;
    24.11) echo libbsd0 libgnutls30t64 libnftables1 libprotobuf-c1 libnl-3-200 libnet1 libuuid1 \
      libxtables12 libjansson4 libmnl0 libnftnl11 ;;
  esac
}

mirror() {
  # Same mirror as the machine, as scripts/setup.sh finds it.
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# slurmdbd of 24.11.5/26.05.5 fails with Debian's libmariadb of MariaDB 11.8.9 (error 5027 at
# start-up, docs/slurm-releases.md); slurm-tests/cluster.sh runs it with the host's copy, kept here.
readonly HOST_LIBMARIADB_DIR=/usr/local/lib/slurm-rebalancer/host-libmariadb
install_host_libmariadb() {
  local lib=/usr/lib/x86_64-linux-gnu/libmariadb.so.3
  [ -f "$lib" ] || die "$lib missing: install libmariadb3 (scripts/setup.sh installs slurmdbd)"
  cmp -s "$lib" "$1$HOST_LIBMARIADB_DIR/libmariadb.so.3" && return 0
  install -D -m 0644 "$lib" "$1$HOST_LIBMARIADB_DIR/libmariadb.so.3"
}

# The agent's default CRIU is /usr/local/sbin/criu (where scripts/setup.sh installs it); sid's
# package puts it in /usr/sbin. The link is absolute (right inside the root), so from the host
# it dangles: -L, not only -e, tells that it is there.
link_criu() {
  [ -e "$1/usr/local/sbin/criu" ] || [ -L "$1/usr/local/sbin/criu" ] ||
    ln -s /usr/sbin/criu "$1/usr/local/sbin/criu"
}

root_of() { echo "$RELEASES_DIR/$1"; }

# The root is usable when its Slurm is the expected release and every tool the cluster needs runs.
check_root() {
  local rel=$1 root v
  root=$(root_of "$rel")
  [ -f "$root/.slurm-release-complete" ] || { log "$root: not built"; return 1; }
  v=$(chroot "$root" slurmctld -V 2>/dev/null | awk '{print $2}') || true
  case "$v" in
    "$rel".*) ;;
    *) log "$root: slurmctld reports '${v:-nothing}', expected $rel.x"; return 1 ;;
  esac
  local t
  for t in slurmd slurmdbd srun sbatch salloc scontrol sacct munged mariadbd python3 ip nft ps \
    criu cc clang mount umount nsenter; do
    chroot "$root" sh -c "command -v $t" >/dev/null 2>&1 || { log "$root: $t missing"; return 1; }
  done
  [ -f "$root/usr/include/slurm/slurm.h" ] || { log "$root: slurm/slurm.h missing"; return 1; }
  chroot "$root" criu --version >/dev/null 2>&1 || { log "$root: criu does not run"; return 1; }
  chroot "$root" /usr/local/sbin/criu --version >/dev/null 2>&1 ||
    { log "$root: /usr/local/sbin/criu does not run"; return 1; }
  [ -f "$root$HOST_LIBMARIADB_DIR/libmariadb.so.3" ] ||
    { log "$root: the host's libmariadb.so.3 is missing"; return 1; }
  log "$rel: Slurm $v, $(chroot "$root" criu --version | awk '/^Version:/ {print "CRIU " $2}'), $(du -sh --one-file-system "$root" | cut -f1) at $root"
}

build_root() {
  local rel=$1 suite root tmp start
  suite=$(suite_of "$rel")
  root=$(root_of "$rel")
  # A complete root of an older build gets what it lacks in place.
  if [ -f "$root/.slurm-release-complete" ]; then
    install_host_libmariadb "$root"
    link_criu "$root"
  fi
  if check_root "$rel" 2>/dev/null; then
    check_root "$rel"
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "building a root needs root (mmdebstrap in root mode, chroot)"
  command -v mmdebstrap >/dev/null || {
    log "installing mmdebstrap"
    apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  }
  mkdir -p "$RELEASES_DIR"
  # A root in use (cluster.sh --release binds /tmp, /work, /root... into it) must never be
  # deleted: rm -rf would walk into the host's own directories.
  if findmnt -rn -o TARGET | awk -v r="$root" '$0 == r || index($0, r "/") == 1 {f = 1} END {exit !f}'; then
    die "$root has mounts inside (a cluster of $rel is up?): take it down first"
  fi
  # Build next to the final place and rename at the end, so a broken run never leaves a root
  # that looks complete.
  tmp="$root.partial"
  rm -rf --one-file-system "$tmp"
  start=$(date +%s)
  local pkgs
  pkgs="$(IFS=,; echo "${base_pkgs[*]}"),$(criu_pkgs_of "$rel" | tr ' ' ',')"
  log "building $rel from Debian $suite at $(mirror) into $root"
  # --variant=apt: only Essential + apt; --include adds ours. Recommends stay out (as on the host).
  # mmdebstrap installs a policy-rc.d during the build, so no daemon starts inside.
  # Check-Valid-Until off: this machine's mirror can be a frozen snapshot whose sid Release file
  # has expired (seen 2026-12-07); signatures are still checked.
  mmdebstrap --mode=root --variant=apt --components=main --include="$pkgs" \
    --aptopt='APT::Install-Recommends "false"' \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --customize-hook='rm -f "$1"/etc/hostname' \
    "$suite" "$tmp" "$(mirror)" >"$RELEASES_DIR/$rel.build.log" 2>&1 \
    || { tail -20 "$RELEASES_DIR/$rel.build.log" >&2
      printf 'slurm-release: error: mmdebstrap failed (log: %s)\n' "$RELEASES_DIR/$rel.build.log" >&2
      exit 3; }
  if [ "$rel" = 24.11 ]; then
    [ -x /usr/local/sbin/criu ] || die "/usr/local/sbin/criu missing: run scripts/setup.sh first"
    install -D -m 0755 /usr/local/sbin/criu "$tmp/usr/local/sbin/criu"
  fi
  install_host_libmariadb "$tmp"
  link_criu "$tmp"
  # CRIU's network lock uses nftables here (no iptables-restore), as scripts/setup.sh sets on the host.
  mkdir -p "$tmp/etc/criu"
  echo 'network-lock nftables' >"$tmp/etc/criu/runc.conf"
  # Daemons run with the cluster's own config directories; the packaged ones stay unused.
  date -u +%FT%TZ >"$tmp/.slurm-release-complete"
  rm -rf --one-file-system "$root"
  mv "$tmp" "$root"
  log "$rel built in $(($(date +%s) - start)) s"
  check_root "$rel"
}

print_env() {
  local root
  root=$(root_of "$1")
  printf 'export SLURM_INCLUDE_DIR=%q\n' "$root/usr/include"
  printf 'export SLURM_LIB_DIR=%q\n' "$root/usr/lib/x86_64-linux-gnu"
}

run_in_root() {
  local rel=$1 root
  shift
  [ $# -gt 0 ] || die "usage: $0 run RELEASE CMD..."
  root=$(root_of "$rel")
  check_root "$rel" 2>/dev/null || die "the root of $rel is not usable: run $0 build $rel"
  # The mounts live in a private mount namespace: they vanish with CMD, nothing to clean up.
  exec unshare --mount --propagation private -- /bin/sh -ec '
    root=$1; shift
    # The root must be a mount point: "ip netns exec" and "ip -n" (the agent) run
    # "mount --make-rslave /", which fails with EINVAL on a chroot that is a plain directory.
    mount --bind "$root" "$root"
    for m in /proc /sys /dev /run /tmp /work /root /home; do
      [ -d "$m" ] || continue
      mkdir -p "$root$m"; mount --rbind "$m" "$root$m"
    done
    for f in /etc/hosts /etc/passwd /etc/group; do mount --bind "$f" "$root$f"; done
    dir=$(pwd)
    # A checkout elsewhere (CI clones into any directory) is bound at its own path too.
    if [ "$(stat -c %d:%i "$dir")" != "$(stat -c %d:%i "$root$dir" 2>/dev/null)" ]; then
      mkdir -p "$root$dir"; mount --rbind "$dir" "$root$dir"
    fi
    # pivot_root, not chroot: CRIU refuses to dump a task whose root differs from its mount
    # namespace'"'"'s ("mnt: The root task has another root than mntns"), and the agent'"'"'s
    # containers inherit this root. The host'"'"'s tree is detached from this namespace.
    mkdir -p "$root/.host-root"
    cd "$root"
    pivot_root . .host-root
    umount -l /.host-root
    cd "$dir" || { echo "slurm-release: cannot enter $dir inside the root" >&2; exit 1; }
    exec "$@"
  ' rbc "$root" "$@"
}

cmd=${1:-}
case "$cmd" in
  build) [ $# = 2 ] || die "usage: $0 build RELEASE"; build_root "$2" ;;
  check) [ $# = 2 ] || die "usage: $0 check RELEASE"; suite_of "$2" >/dev/null; check_root "$2" ;;
  path) [ $# = 2 ] || die "usage: $0 path RELEASE"; suite_of "$2" >/dev/null; root_of "$2" ;;
  env) [ $# = 2 ] || die "usage: $0 env RELEASE"; suite_of "$2" >/dev/null; print_env "$2" ;;
  run) [ $# -ge 3 ] || die "usage: $0 run RELEASE CMD..."; suite_of "$2" >/dev/null; rel=$2; shift 2
    run_in_root "$rel" "$@" ;;
  list) printf '22.05\tbookworm (the host)\n24.11\ttrixie\n26.05\tsid\n' ;;
  *) die "usage: $0 build|check|path RELEASE | list" ;;
esac
