#!/usr/bin/env bash
# Installs a built slurm-rebalancer on this host. Idempotent: a second run changes nothing.
# Never overwrites a configuration or policy file; never enables or starts a service; never edits
# Slurm's own files. Run deploy/install.sh --help for the options; docs/deploy.md for the steps
# around it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/install.sh [OPTIONS]

Installs the binaries built by cargo, the SPANK plugin, the systemd units, example
configurations, the shipped policies, docs and man pages.

Roles (what this host is; default all):
  --role compute   rebalancer-agent, SPANK plugin, agent unit, agent.toml, sysctl file
  --role login     SPANK plugin only (srun/sbatch/salloc load it too)
  --role admin     rebalancerd, rebalctl, controller unit, rebalancerd.toml, policies
  --role all       everything

Options:
  --prefix DIR      installation prefix (default /usr/local): daemons in DIR/sbin, rebalctl in
                    DIR/bin, docs in DIR/share/doc/slurm-rebalancer, man pages in DIR/share/man
  --destdir DIR     stage every file under DIR instead of / (packaging, tests); nothing outside
                    DIR is touched and systemd is not reloaded
  --target-dir DIR  cargo's target directory (default: $CARGO_TARGET_DIR, else <repo>/target)
  --profile NAME    cargo profile directory to take binaries from (default release)
  --plugin-dir DIR  Slurm's PluginDir (default: detected, see below)
  --dry-run         print what would change, change nothing
  -h, --help        this text

PluginDir detection, first that answers: --plugin-dir; `scontrol show config`; PluginDir= in
slurm.conf ($SLURM_CONF or /etc/slurm/slurm.conf); pkg-config slurm; the first existing of
/usr/lib/<multiarch>/slurm-wlm (Debian), /usr/lib64/slurm, /usr/lib/slurm, /usr/local/lib/slurm;
else /usr/lib/x86_64-linux-gnu/slurm-wlm.

Build first (from the repository root):
  cargo build --release -p rebalancer-agent -p rebalancer-controller -p rebalancer-cli \
      -p slurm-rebalancer-spank

Exit status: 0 done (or nothing to do), 1 a step failed, 2 bad arguments or missing build.
EOF
}

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$1" >&2; exit "${2:-1}"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
role=all
prefix=/usr/local
destdir=
target_dir=${CARGO_TARGET_DIR:-$repo/target}
profile=release
plugin_dir=
dry_run=0

need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value" 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --role) need_arg "$@"; role=$2; shift 2 ;;
    --role=*) role=${1#*=}; shift ;;
    --prefix) need_arg "$@"; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --destdir) need_arg "$@"; destdir=$2; shift 2 ;;
    --destdir=*) destdir=${1#*=}; shift ;;
    --target-dir) need_arg "$@"; target_dir=$2; shift 2 ;;
    --target-dir=*) target_dir=${1#*=}; shift ;;
    --profile) need_arg "$@"; profile=$2; shift 2 ;;
    --profile=*) profile=${1#*=}; shift ;;
    --plugin-dir) need_arg "$@"; plugin_dir=$2; shift 2 ;;
    --plugin-dir=*) plugin_dir=${1#*=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" 2 ;;
  esac
done

case "$role" in all|compute|login|admin) ;; *) die "--role must be all, compute, login or admin" 2 ;; esac
case "$prefix" in /*) ;; *) die "--prefix must be an absolute path" 2 ;; esac
prefix=${prefix%/}; [ -n "$prefix" ] || prefix=/
if [ -n "$destdir" ]; then
  case "$destdir" in /*) ;; *) die "--destdir must be an absolute path" 2 ;; esac
  destdir=${destdir%/}
fi
[ "$dry_run" = 1 ] || [ -n "$destdir" ] || [ "$(id -u)" = 0 ] ||
  die "must run as root to install into the system (or use --destdir / --dry-run)" 2

want() { # want COMPONENT: whether the role includes it
  case "$role:$1" in
    all:*|compute:agent|compute:plugin|login:plugin|admin:controller) return 0 ;;
    *) return 1 ;;
  esac
}

sbindir=$prefix/sbin
bindir=$prefix/bin
docdir=$prefix/share/doc/slurm-rebalancer
mandir=$prefix/share/man
confdir=/etc/slurm-rebalancer
unitdir=/etc/systemd/system
build=$target_dir/$profile

# --- what was built -----------------------------------------------------------
missing=()
check_built() { [ -f "$build/$1" ] || missing+=("$build/$1"); }
if want agent; then check_built rebalancer-agent; fi
if want controller; then check_built rebalancerd; check_built rebalctl; fi
if want plugin; then check_built libslurm_rebalancer_spank.so; fi
if [ ${#missing[@]} -gt 0 ]; then
  flag=--release; [ "$profile" = release ] || flag="--profile $profile"
  [ "$profile" = debug ] && flag=
  die "not built: ${missing[*]}
  build with: cargo build $flag -p rebalancer-agent -p rebalancer-controller -p rebalancer-cli -p slurm-rebalancer-spank
  (or point --target-dir / --profile at the build)" 2
fi

# --- Slurm's PluginDir --------------------------------------------------------
detect_plugin_dir() {
  local d conf
  if command -v scontrol >/dev/null 2>&1; then
    d=$(timeout 5 scontrol show config 2>/dev/null | awk -F'= *' '/^PluginDir[[:space:]]/ {print $2; exit}') || true
    # PluginDir may list several directories separated by ':'; plugins go into the first.
    d=${d%%:*}
    if [ -n "$d" ]; then echo "$d scontrol"; return; fi
  fi
  conf=${SLURM_CONF:-/etc/slurm/slurm.conf}
  if [ -r "$conf" ]; then
    d=$(sed -n 's/^[[:space:]]*[Pp][Ll][Uu][Gg][Ii][Nn][Dd][Ii][Rr][[:space:]]*=[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$conf" | head -1)
    d=${d%%:*}
    if [ -n "$d" ]; then echo "$d $conf"; return; fi
  fi
  if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists slurm 2>/dev/null; then
    d=$(pkg-config --variable=libdir slurm)/slurm
    if [ -d "$d" ]; then echo "$d pkg-config"; return; fi
  fi
  local multiarch
  multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
  for d in "/usr/lib/$multiarch/slurm-wlm" /usr/lib64/slurm /usr/lib/slurm /usr/local/lib/slurm; do
    if [ -d "$d" ]; then echo "$d existing-directory"; return; fi
  done
  echo "/usr/lib/x86_64-linux-gnu/slurm-wlm default"
}
if want plugin; then
  if [ -n "$plugin_dir" ]; then
    plugin_src="--plugin-dir"
  else
    read -r plugin_dir plugin_src < <(detect_plugin_dir)
  fi
  case "$plugin_dir" in /*) ;; *) die "PluginDir '$plugin_dir' is not an absolute path" 2 ;; esac
  say "Slurm PluginDir: $plugin_dir (from $plugin_src)"
fi

# --- primitives ---------------------------------------------------------------
changed=0
run() { # run CMD...: execute, or only print in dry-run mode
  if [ "$dry_run" = 1 ]; then printf '  would run: %s\n' "$*"; else "$@"; fi
}

# put SRC DST MODE: install or replace DST (a new inode, so running binaries and loaded .so files
# keep their old copy); nothing happens when DST already has SRC's content and mode.
put() {
  local src=$1 dst=$destdir$2 mode=$3
  if [ -f "$dst" ] && cmp -s "$src" "$dst" && [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
    say "unchanged  $2"
    return
  fi
  local what=installed; [ -e "$dst" ] && what=replaced
  say "$(printf "%-10s" "$what") $2"
  changed=1
  run install -d -m 0755 "$(dirname "$dst")"
  run install -m "$mode" "$src" "$dst.rebalancer-new"
  run mv -f "$dst.rebalancer-new" "$dst"
}

# put_text DST MODE < CONTENT: like put for generated content.
put_text() {
  local tmp; tmp=$(mktemp)
  cat >"$tmp"
  put "$tmp" "$1" "$2"
  rm -f "$tmp"
}

# put_config SRC DST: a file the administrator owns. Installed only when absent; otherwise the
# shipped version goes next to it as DST.dist (when it differs) and the existing file stays.
put_config() {
  local src=$1 dst=$destdir$2
  if [ ! -e "$dst" ]; then
    say "installed  $2"
    changed=1
    run install -d -m 0755 "$(dirname "$dst")"
    run install -m 0644 "$src" "$dst"
  elif cmp -s "$src" "$dst"; then
    say "unchanged  $2"
  elif [ -f "$dst.dist" ] && cmp -s "$src" "$dst.dist"; then
    say "kept       $2 (yours; shipped version in $2.dist)"
  else
    say "kept       $2 (yours; shipped version written to $2.dist)"
    changed=1
    run install -m 0644 "$src" "$dst.dist"
  fi
}

# Units and the plugstack line name installed paths; rewrite them for this prefix/PluginDir.
rewrite() {
  sed -e "s|/usr/local/sbin/|$sbindir/|g" \
      -e "s|/usr/local/share/doc/slurm-rebalancer/|$docdir/|g" \
      -e "s|/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_rebalancer.so|${plugin_dir:-/usr/lib/x86_64-linux-gnu/slurm-wlm}/spank_rebalancer.so|g" \
      "$1"
}

# --- install ------------------------------------------------------------------
[ "$dry_run" = 1 ] && say "dry run: nothing is changed"
[ -n "$destdir" ] && say "staging under $destdir"

if want agent; then
  put "$build/rebalancer-agent" "$sbindir/rebalancer-agent" 0755
  rewrite "$repo/deploy/systemd/rebalancer-agent.service" | put_text "$unitdir/rebalancer-agent.service" 0644
  put_config "$repo/deploy/etc/agent.toml" "$confdir/agent.toml"
  # Lazy pages (post-copy) need 4 MiB pipes; the agent sets ip_forward itself but a site may
  # want it on at boot. Same content as scripts/setup.sh writes.
  printf 'fs.pipe-max-size = 8388608\nnet.ipv4.ip_forward = 1\n' >"${TMPDIR:-/tmp}/rebalancer-sysctl.$$"
  put_config "${TMPDIR:-/tmp}/rebalancer-sysctl.$$" /etc/sysctl.d/90-slurm-rebalancer.conf
  rm -f "${TMPDIR:-/tmp}/rebalancer-sysctl.$$"
fi
if want controller; then
  put "$build/rebalancerd" "$sbindir/rebalancerd" 0755
  put "$build/rebalctl" "$bindir/rebalctl" 0755
  "$build/rebalctl" completion bash | put_text "$prefix/share/bash-completion/completions/rebalctl" 0644
  rewrite "$repo/deploy/systemd/rebalancerd.service" | put_text "$unitdir/rebalancerd.service" 0644
  put_config "$repo/deploy/etc/rebalancerd.toml" "$confdir/rebalancerd.toml"
  for p in "$repo"/policies/*.toml; do
    put_config "$p" "$confdir/policies/$(basename "$p")"
  done
  put "$repo/docs/man/rebalancerd.8" "$mandir/man8/rebalancerd.8" 0644
  put "$repo/docs/man/rebalctl.1" "$mandir/man1/rebalctl.1" 0644
  put "$repo/docs/man/rebalancer-policies.5" "$mandir/man5/rebalancer-policies.5" 0644
  # For the site's Prometheus and Grafana (docs/monitoring.md); nothing here loads them.
  for f in grafana-dashboard.json rebalancer-rules.yml rebalancer-rules.test.yml; do
    put "$repo/deploy/monitoring/$f" "$docdir/monitoring/$f" 0644
  done
fi
if want plugin; then
  put "$repo/docs/man/slurm-rebalancer.7" "$mandir/man7/slurm-rebalancer.7" 0644
fi
if want plugin; then
  put "$build/libslurm_rebalancer_spank.so" "$plugin_dir/spank_rebalancer.so" 0755
  # Ready to copy into plugstack.conf.d; not activated here (docs/deploy.md: the plugin goes last).
  rewrite "$repo/deploy/plugstack.conf.d/slurm-rebalancer.conf" |
    put_text "$confdir/plugstack.conf.d/slurm-rebalancer.conf" 0644
fi
for d in deploy security agent admin-cli policies monitoring; do
  [ -f "$repo/docs/$d.md" ] && put "$repo/docs/$d.md" "$docdir/$d.md" 0644
done

# --- after --------------------------------------------------------------------
if [ "$changed" = 1 ] && [ -z "$destdir" ] && [ -d /run/systemd/system ] && { want agent || want controller; }; then
  run systemctl daemon-reload
fi
if want agent; then
  criu=
  if [ -r "$destdir$confdir/agent.toml" ]; then
    criu=$(sed -n 's/^[[:space:]]*criu[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$destdir$confdir/agent.toml" | head -1)
  fi
  criu=${criu:-/usr/local/sbin/criu}
  v=$("$criu" --version 2>/dev/null | awk '/^Version:/ {print $2}') || true
  if [ -z "$v" ]; then
    say "warning: no CRIU at $criu; build CRIU >= 4.2 (docs/deploy.md) before starting the agent"
  elif [ "$(printf '%s\n%s\n' 4.2 "$v" | sort -V | head -1)" != 4.2 ]; then
    say "warning: CRIU $v at $criu is older than 4.2; the agent will offer no migration mode"
  fi
fi

[ "$changed" = 0 ] && say "nothing to do: everything is installed and up to date"
cat <<EOF
install: next steps (docs/deploy.md):
EOF
if want agent; then cat <<EOF
  compute: edit $confdir/agent.toml (node, listen, advertise, [peers]), then
           $sbindir/rebalancer-agent check-config -c $confdir/agent.toml
           $sbindir/rebalancer-agent check -c $confdir/agent.toml
           sysctl --system     # applies /etc/sysctl.d/90-slurm-rebalancer.conf
           systemctl enable --now rebalancer-agent
EOF
fi
if want controller; then cat <<EOF
  admin:   edit $confdir/rebalancerd.toml and $confdir/policies/, then
           $sbindir/rebalancerd --check-config --config $confdir/rebalancerd.toml
           systemctl enable --now rebalancerd
EOF
fi
if want plugin; then cat <<EOF
  plugin:  once every agent runs, on every login and compute node:
           cp $confdir/plugstack.conf.d/slurm-rebalancer.conf /etc/slurm/plugstack.conf.d/
EOF
fi
