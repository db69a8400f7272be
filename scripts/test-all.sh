#!/usr/bin/env bash
# Runs every test of slurm-rebalancer on this machine, as root: formatting and lints, unit tests,
# then the privileged tests (CRIU migrations between network namespaces, a real Slurm cluster).
# Installs what it needs first (scripts/setup.sh). It then runs the end-to-end migration tests on
# Slurm 24.11 and 26.05 too, each in a root built from Debian (scripts/test-release.sh);
# RBC_CI_RELEASES chooses them ("" for none, "24.11" for one). Usage: scripts/test-all.sh [--unit-only]
set -euo pipefail
cd "$(dirname "$0")/.."

# "24.11.5" from a slurm_version.h.
slurm_version() {
  local n
  n=$(awk '/^#define SLURM_VERSION_NUMBER/ {print $3}' "$1" 2>/dev/null)
  [ -n "$n" ] && printf '%d.%02d.%d' $((n >> 16)) $(((n >> 8) & 255)) $((n & 255))
}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "test-all: run as root (privileged tests use CRIU and namespaces)" >&2; exit 1; }

step "setup (packages, CRIU >= 4.2, sysctls)"
scripts/setup.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
deploy/monitoring/check.sh
scripts/md2man.py --check docs/policies.md docs/man/rebalancer-policies.5
scripts/check-structure.py

step "unit tests"
cargo test --workspace --all-targets

if [ "${1:-}" = --unit-only ]; then exit 0; fi

step "privileged tests (root, CRIU, network namespaces, Slurm)"
# One test at a time: several tests start whole clusters and migrations on a 2-core machine.
# This includes the fault matrix (rebalancer/agent/tests/fault_matrix.rs: every cell once, about
# 3 minutes; RBC_FAULT_RUNS=N repeats each cell for docs/fault-tolerance.md's table, not in CI).
# The controller's half is slurm-tests/tests/controller_faults.rs (rebalancerd SIGKILLed in three
# phases of a migration on a real Slurm cluster, about 30 s), and the agent upgrade under
# running containers with a migration in flight is rebalancer/agent/tests/agent_restart.rs; both
# run here with every other ignored test.
unset RBC_FAULT_RUNS RBC_FAULT_CELL RBC_FAULT_WRITE
# The qemu tests of rebalancer/vm-tests are among them: precopy_vm (one guest, a kernel with
# soft-dirty; docs/precopy.md) and two_guests (a migration between two guests, each its own
# kernel, munged and agent; about 2 minutes; docs/two-kernels.md).
skip=()
# Migrating another user's task needs CAP_SYS_RESOURCE in root's effective set (CRIU reads the
# task's rlimits); some VMs and containers bound it away. The test that needs it is then not run,
# and this says so: it would fail, naming the capability.
capeff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
if (( (16#$capeff >> 24) & 1 )); then :; else
  echo "test-all: root lacks CAP_SYS_RESOURCE here (CapEff $capeff): not running a_users_srun_step_moves_off_a_drained_node (a user's job cannot be migrated on this machine)"
  skip+=(--skip a_users_srun_step_moves_off_a_drained_node)
fi
figures=$PWD/target/e2e-figures-22.05.txt
: > "$figures"
t=$SECONDS
RBC_E2E_FIGURES=$figures cargo test --workspace --all-targets -- --ignored --test-threads=1 "${skip[@]}"
version=$(slurm_version /usr/include/slurm/slurm_version.h)
echo "test-all: privileged tests on the host's Slurm ${version:-22.05} took $((SECONDS - t)) s; figures:"
sed 's/^/  /' "$figures"

# The end-to-end migration tests again on the other releases Debian carries, each built and run
# inside a root that scripts/slurm-release.sh builds from Debian's repositories (first run: about
# 1.5 GB and a minute or two per root; the release's target directory is seeded from the host's,
# so only what reads Slurm's headers is rebuilt). A root that Debian's repository cannot give
# today (exit 3 of slurm-release.sh: the network, or sid not installable) is reported and
# skipped; any other failure fails the run.
skipped_releases=()
for rel in ${RBC_CI_RELEASES-24.11 26.05}; do
  step "end-to-end migrations on Slurm $rel (root from Debian)"
  t=$SECONDS
  rc=0
  scripts/slurm-release.sh build "$rel" || rc=$?
  if [ "$rc" = 3 ]; then
    echo "test-all: SKIPPED Slurm $rel: Debian's repository could not give its root today (see the log above)"
    skipped_releases+=("$rel")
    continue
  fi
  [ "$rc" = 0 ] || exit "$rc"
  scripts/test-release.sh "$rel" --e2e
  echo "test-all: Slurm $rel end-to-end tests took $((SECONDS - t)) s (build included)"
done
if [ ${#skipped_releases[@]} -gt 0 ]; then
  echo "test-all: releases skipped because Debian could not give their roots: ${skipped_releases[*]}"
fi
