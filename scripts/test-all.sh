#!/usr/bin/env bash
# Runs every test of slurm-rebalancer on this machine, as root: formatting and lints, unit tests,
# then the privileged tests (CRIU migrations between network namespaces, a real Slurm cluster).
# Installs what it needs first (scripts/setup.sh). Usage: scripts/test-all.sh [--unit-only]
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "test-all: run as root (privileged tests use CRIU and namespaces)" >&2; exit 1; }

step "setup (packages, CRIU >= 4.2, sysctls)"
scripts/setup.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "unit tests"
cargo test --workspace --all-targets

if [ "${1:-}" = --unit-only ]; then exit 0; fi

step "privileged tests (root, CRIU, network namespaces, Slurm)"
# One test at a time: several tests start whole clusters and migrations on a 2-core machine.
cargo test --workspace --all-targets -- --ignored --test-threads=1
