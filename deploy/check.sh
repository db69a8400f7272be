#!/usr/bin/env bash
# Checks deploy/: install.sh into a scratch --destdir (complete, idempotent, keeps local config
# edits), the example configurations against the built binaries' own validators, and the units
# with systemd-analyze verify when it is available. Needs no root and changes nothing outside a
# temporary directory.
# Usage: deploy/check.sh [--target-dir DIR] [--profile NAME]   (defaults as install.sh)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
profile=release
while [ $# -gt 0 ]; do
  case "$1" in
    --target-dir) target_dir=${2:?}; shift 2 ;;
    --profile) profile=${2:?}; shift 2 ;;
    *) echo "usage: $0 [--target-dir DIR] [--profile NAME]" >&2; exit 2 ;;
  esac
done

fail() { printf 'check: FAIL: %s\n' "$*" >&2; exit 1; }
ok() { printf 'check: ok: %s\n' "$*"; }

tmp=$(mktemp -d /tmp/rebalancer-deploy-check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/root
inst() { "$repo/deploy/install.sh" --destdir "$stage" --target-dir "$target_dir" --profile "$profile" \
           --plugin-dir /usr/lib/slurm-test "$@"; }

out=$(inst) || fail "install.sh failed: $out"
for f in usr/local/sbin/rebalancer-agent usr/local/sbin/rebalancerd usr/local/bin/rebalctl \
         usr/lib/slurm-test/spank_rebalancer.so etc/systemd/system/rebalancer-agent.service \
         etc/systemd/system/rebalancerd.service etc/slurm-rebalancer/agent.toml \
         etc/slurm-rebalancer/rebalancerd.toml etc/slurm-rebalancer/policies/drain.toml \
         etc/slurm-rebalancer/plugstack.conf.d/slurm-rebalancer.conf \
         etc/sysctl.d/90-slurm-rebalancer.conf usr/local/share/man/man8/rebalancerd.8 \
         usr/local/share/man/man7/slurm-rebalancer.7 \
         usr/local/share/doc/slurm-rebalancer/deploy.md; do
  [ -f "$stage/$f" ] || fail "install.sh did not install /$f"
done
grep -q '^optional /usr/lib/slurm-test/spank_rebalancer.so ' \
  "$stage/etc/slurm-rebalancer/plugstack.conf.d/slurm-rebalancer.conf" ||
  fail "plugstack line does not name the PluginDir"
ok "install.sh installs every file"

out=$(inst) || fail "second install.sh failed"
grep -q 'nothing to do' <<<"$out" || fail "second run changed something: $out"
ok "a second run changes nothing"

echo '# local edit' >>"$stage/etc/slurm-rebalancer/agent.toml"
inst >/dev/null
grep -q '^# local edit' "$stage/etc/slurm-rebalancer/agent.toml" || fail "install.sh overwrote agent.toml"
cmp -s "$repo/deploy/etc/agent.toml" "$stage/etc/slurm-rebalancer/agent.toml.dist" ||
  fail "shipped agent.toml not written as agent.toml.dist"
out=$(inst)
grep -q 'nothing to do' <<<"$out" || fail "run after a local edit is not idempotent: $out"
ok "local configuration edits are kept, the shipped file goes to .dist"

out=$(inst --dry-run --destdir "$tmp/dry") || fail "dry run failed"
[ ! -e "$tmp/dry" ] || fail "--dry-run created files"
ok "--dry-run changes nothing"

"$stage/usr/local/sbin/rebalancer-agent" check-config --config "$repo/deploy/etc/agent.toml" >/dev/null ||
  fail "deploy/etc/agent.toml rejected by rebalancer-agent check-config"
sed "s|^policies = .*|policies = \"$stage/etc/slurm-rebalancer/policies\"|" \
  "$repo/deploy/etc/rebalancerd.toml" >"$tmp/rebalancerd.toml"
"$stage/usr/local/sbin/rebalancerd" --check-config --config "$tmp/rebalancerd.toml" >"$tmp/cc.out" ||
  fail "deploy/etc/rebalancerd.toml rejected: $(cat "$tmp/cc.out")"
grep -q 'policies valid: 3' "$tmp/cc.out" || fail "installed policies not valid: $(cat "$tmp/cc.out")"
ok "example configurations and installed policies pass the binaries' checks"

if command -v systemd-analyze >/dev/null; then
  mkdir "$tmp/units"
  for u in rebalancer-agent rebalancerd; do
    # Point ExecStart at the staged binaries: verify checks that they exist.
    sed "s|/usr/local/sbin/|$stage/usr/local/sbin/|g" "$stage/etc/systemd/system/$u.service" \
      >"$tmp/units/$u.service"
  done
  # verify exits 0 on "ignoring" warnings (an unknown value): any output is a failure here.
  v=$(MANPATH=$stage/usr/local/share/man: systemd-analyze verify "$tmp/units/"*.service 2>&1) ||
    fail "systemd-analyze verify: $v"
  [ -z "$v" ] || fail "systemd-analyze verify: $v"
  ok "systemd-analyze verify"
else
  echo "check: skipped: systemd-analyze not installed"
fi
