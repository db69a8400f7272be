#!/usr/bin/env bash
# Installs everything slurm-rebalancer needs on a fresh Debian 12 machine, as root.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [--no-slurm]
set -euo pipefail

log() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and sets sysctls)"
. /etc/os-release
[ "${ID:-}" = debian ] || log "warning: tested on Debian 12, this is ${PRETTY_NAME:-unknown}"

CRIU_MIN=4.2
CRIU_PREFIX=/usr/local
export DEBIAN_FRONTEND=noninteractive

want_slurm=1
[ "${1:-}" = --no-slurm ] && want_slurm=0

# --- Debian packages ---------------------------------------------------------
pkgs=(
  nftables iproute2 iputils-arping procps psmisc util-linux python3 libclang-dev clang pkgconf
  # openssl: the agent ends a TLS lazy page server with a handshake of its own on rollback
  openssl
  # CRIU build dependencies (from FIELD-NOTES)
  build-essential libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev
  libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler python3-protobuf
  uuid-dev libaio-dev asciidoc-base xz-utils dpkg-dev
  # runc, for the benchmark's reference toolchain
  runc
  # promtool, for deploy/monitoring/check.sh (the package's server is not started)
  prometheus
  # pre-copy proof (rebalancer/vm-tests): a Debian 6.1 kernel with soft-dirty under qemu (TCG)
  qemu-system-x86 busybox-static
)
if [ "$want_slurm" = 1 ]; then
  pkgs+=(slurmctld slurmd slurmdbd slurm-client libslurm-dev munge mariadb-server)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${#missing[@]} Debian packages: ${missing[*]}"
  apt-get update -qq
  # Packaged daemons must not start on install: the test harness runs its own instances.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# --- CRIU >= 4.2 from Debian's source package --------------------------------
criu_ok() {
  local v
  v=$("$CRIU_PREFIX/sbin/criu" --version 2>/dev/null | awk '/^Version:/ {print $2}') || return 1
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$CRIU_MIN" "$v" | sort -V | head -1)" = "$CRIU_MIN" ]
}
if ! criu_ok; then
  log "building CRIU >= $CRIU_MIN from Debian's source package (Debian 12 ships 3.17, too old for this kernel)"
  work=$(mktemp -d /tmp/criu-build.XXXXXX)
  srclist=/etc/apt/sources.list.d/slurm-rebalancer-sid-src.sources
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=http://deb.debian.org/debian
  cat > "$srclist" <<SRC
Types: deb-src
URIs: $uri
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  trap 'rm -f "$srclist"' EXIT
  apt-get update -qq
  (cd "$work" && apt-get source --download-only criu >/dev/null 2>&1 || true)
  rm -f "$srclist"; trap - EXIT
  apt-get update -qq || true
  orig=$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | head -1)
  [ -n "$orig" ] || die "could not download CRIU's source from Debian sid"
  tar -C "$work" -xf "$orig"
  dir=$(find "$work" -maxdepth 1 -mindepth 1 -type d -name 'criu*' | head -1)
  [ -n "$dir" ] || die "CRIU source tarball has no criu directory"
  log "compiling $(basename "$dir")"
  make -C "$dir" -j"$(nproc)" criu >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; die "CRIU build failed (log: $work/build.log)"; }
  install -D -m 0755 "$dir/criu/criu" "$CRIU_PREFIX/sbin/criu"
  rm -rf "$work"
  criu_ok || die "installed CRIU is not >= $CRIU_MIN"
fi
log "CRIU $("$CRIU_PREFIX/sbin/criu" --version | awk '/^Version:/ {print $2}') at $CRIU_PREFIX/sbin/criu"

# --- sysctls -----------------------------------------------------------------
# Lazy pages need 4 MiB pipes; CRIU lacks CAP_SYS_RESOURCE here, so raise the limit.
cur=$(cat /proc/sys/fs/pipe-max-size)
if [ "$cur" -lt 8388608 ]; then
  echo 8388608 > /proc/sys/fs/pipe-max-size
  log "fs.pipe-max-size raised from $cur to 8388608 (lazy pages)"
fi
echo 1 > /proc/sys/net/ipv4/ip_forward
mkdir -p /etc/sysctl.d
cat > /etc/sysctl.d/90-slurm-rebalancer.conf <<SYS
fs.pipe-max-size = 8388608
net.ipv4.ip_forward = 1
SYS

# CRIU's default network lock needs iptables-restore; we use nftables.
mkdir -p /etc/criu
grep -qs 'network-lock nftables' /etc/criu/runc.conf || echo 'network-lock nftables' >> /etc/criu/runc.conf

# --- Rust toolchain check ----------------------------------------------------
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
log "done"
