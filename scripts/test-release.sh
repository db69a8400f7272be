#!/usr/bin/env bash
# Runs the test suite against one Slurm release from Debian (docs/slurm-releases.md): everything is
# built and run inside that release's root (scripts/slurm-release.sh), against its headers and
# libslurm, with a target directory of its own (target/slurm-RELEASE); the Slurm clusters the tests
# bring up (slurm-tests/cluster.sh) are then that release's. As root.
#
# Usage: scripts/test-release.sh RELEASE [--e2e]
#   RELEASE  24.11 or 26.05 (22.05, the host's: scripts/test-all.sh)
#   --e2e    only the end-to-end migration tests (slurm-tests/tests/migration.rs)
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

in_root() { scripts/slurm-release.sh run "$rel" env CARGO_TARGET_DIR="$target" "$@"; }

case $mode in
  --e2e)
    # The test finds the agent, controller, CLI and plugin in the same target directory.
    in_root cargo build -p rebalancer-agent -p rebalancer-controller -p rebalancer-cli \
      -p slurm-rebalancer-spank
    in_root cargo test -p slurm-tests --test migration -- --ignored --test-threads=1 "${skip[@]}"
    ;;
  all)
    in_root cargo build --workspace --all-targets
    in_root cargo test --workspace --all-targets
    in_root cargo test --workspace --all-targets -- --ignored --test-threads=1 "${skip[@]}"
    ;;
  *) echo "usage: $0 RELEASE [--e2e]" >&2; exit 2 ;;
esac
