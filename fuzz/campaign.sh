#!/usr/bin/env bash
# A long fuzz campaign over every parser the issue #11 fuzz tests cover (docs/security.md,
# "Fuzzing"). The normal `cargo test` runs each property with a bounded number of cases; this
# runs them with PROPTEST_CASES (default 20000) and prints cases and time per test binary.
#   fuzz/campaign.sh            # 20000 cases per property, debug build
#   PROPTEST_CASES=200000 PROFILE=--release fuzz/campaign.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${PROPTEST_CASES:-20000}"
export CARGO_INCREMENTAL=0
profile="${PROFILE:-}"
targets=(
  "rebalancer-proto fuzz_messages"
  "rebalancer-policy fuzz_policy"
  "rebalancer-controller fuzz_config"
  "rebalancer-agent fuzz_config"
  "slurm-rebalancer-spank fuzz_options"
)
for t in "${targets[@]}"; do
  set -- $t
  nice -n 10 cargo test -q $profile -p "$1" --test "$2" --no-run
done
total=0
for t in "${targets[@]}"; do
  set -- $t
  start=$(date +%s.%N)
  # Panics inside the watchdog threads print their own report; the summary line is ours.
  if ! out=$(nice -n 10 cargo test -q $profile -p "$1" --test "$2" 2>&1); then
    echo "$out" | tail -40
    echo "FAILED: $1 $2"
    exit 1
  fi
  end=$(date +%s.%N)
  props=$(echo "$out" | grep -o '[0-9]* passed' | head -1)
  printf '%-24s %-14s %s, %s cases per property, %.1f s\n' "$1" "$2" "$props" "$PROPTEST_CASES" \
    "$(echo "$end - $start" | bc)"
done
