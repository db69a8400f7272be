#!/usr/bin/env bash
# Runs the test suite against one Slurm release from Debian (docs/slurm-releases.md): everything is
# built and run inside that release's root (scripts/slurm-release.sh), against its headers and
# libslurm, with a target directory of its own (target/slurm-RELEASE); the Slurm clusters the tests
# bring up (slurm-tests/cluster.sh) are then that release's. As root.
#
# Usage: scripts/test-release.sh RELEASE [--e2e]
#   RELEASE  24.11 or 26.05 (22.05, the host's: scripts/test-all.sh)
#   --e2e    only the end-to-end tests (slurm-tests/tests/migration.rs and accounting.rs)
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

rel=${1:?usage: $0 RELEASE [--e2e]}
mode=${2:-all}
[ "$(id -u)" = 0 ] || { echo "test-release: run as root" >&2; exit 1; }

scripts/slurm-release.sh build "$rel"
target=$PWD/target/slurm-$rel

skip=()
# Same rule as scripts/test-all.sh: migrating another user's task needs CAP_SYS_RESOURCE.
capeff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
if ! (((16#$capeff >> 24) & 1)); then
  echo "test-release: root lacks CAP_SYS_RESOURCE here (CapEff $capeff): not running a_users_srun_step_moves_off_a_drained_node"
  skip+=(--skip a_users_srun_step_moves_off_a_drained_node)
fi

# A first run seeds the release's target directory from the host's (its dependencies' builds,
# not its test executables): only what reads Slurm's headers or links libslurm is rebuilt, since
# SLURM_INCLUDE_DIR and SLURM_LIB_DIR are set inside the root (unset on the host), which makes
# their build scripts run again. The glibc of a release's root is newer than the host's, so
# objects built on the host link and run there.
if [ ! -d "$target/debug" ] && [ -d target/debug/deps ]; then
  t0=$SECONDS
  mkdir -p "$target/debug"
  execs=$(mktemp)
  (cd target/debug && find ./deps -maxdepth 1 -type f -perm -u+x ! -name '*.so') >"$execs"
  # Exit 1 of tar: a file changed while it was read (a build running meanwhile); cargo rebuilds
  # whatever the copy missed.
  { tar -C target/debug --exclude=./incremental -X "$execs" -cf - . || [ $? = 1 ]; } |
    tar -C "$target/debug" -xf -
  rm -f "$execs"
  echo "test-release: seeded $target from the host's target directory in $((SECONDS - t0)) s ($(du -sh "$target" | cut -f1))"
fi

# The e2e tests append their figures (downtime, client's largest gap) here; printed at the end.
figures=$target/e2e-figures.txt
mkdir -p "$target"
: > "$figures"
in_root() {
  scripts/slurm-release.sh run "$rel" env CARGO_TARGET_DIR="$target" RBC_E2E_FIGURES="$figures" \
    SLURM_INCLUDE_DIR=/usr/include SLURM_LIB_DIR=/usr/lib/x86_64-linux-gnu "$@"
}
# "24.11.5" from a slurm_version.h.
slurm_version() {
  local n
  n=$(awk '/^#define SLURM_VERSION_NUMBER/ {print $3}' "$1" 2>/dev/null)
  [ -n "$n" ] && printf '%d.%02d.%d' $((n >> 16)) $(((n >> 8) & 255)) $((n & 255))
}
print_figures() {
  local version
  version=$(eval "$(scripts/slurm-release.sh env "$rel")"
    slurm_version "$SLURM_INCLUDE_DIR/slurm/slurm_version.h")
  echo "test-release: figures on Slurm ${version:-$rel}:"
  sed 's/^/  /' "$figures"
}

case $mode in
  --e2e)
    # The test finds the agent, controller, CLI and plugin in the same target directory.
    in_root cargo build -p rebalancer-agent -p rebalancer-controller -p rebalancer-cli \
      -p slurm-rebalancer-spank
    in_root cargo test -p slurm-tests --test migration --test accounting -- --ignored \
      --test-threads=1 "${skip[@]}"
    print_figures
    ;;
  all)
    in_root cargo build --workspace --all-targets
    in_root cargo test --workspace --all-targets
    in_root cargo test --workspace --all-targets -- --ignored --test-threads=1 "${skip[@]}"
    print_figures
    ;;
  *) echo "usage: $0 RELEASE [--e2e]" >&2; exit 2 ;;
esac
