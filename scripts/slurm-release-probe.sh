#!/usr/bin/env bash
# Probes one Slurm release for the facts docs/slurm-releases.md records: job expansion, the
# CPUAlloc accounting bug after a merge-then-shrink, removing the batch host, and the sacct state
# of a step that ran during a resize. Brings up its own 3-node test cluster (slurm-tests/cluster.sh)
# under the machine-wide lock /run/slurm-rbc.lock and takes it down again; prints raw outputs.
#
# Usage: scripts/slurm-release-probe.sh RELEASE     (22.05 = the host's Slurm, 24.11, 26.05)
set -uo pipefail

rel=${1:?usage: $0 RELEASE}
here=$(cd "$(dirname "$0")/.." && pwd)
S=/tmp/rbc-probe-$rel
cluster() { "$here/slurm-tests/cluster.sh" "$@" --state-dir "$S"; }

if [ "${RBC_PROBE_LOCKED:-0}" != 1 ]; then
  exec env RBC_PROBE_LOCKED=1 flock -w 600 /run/slurm-rbc.lock "$0" "$@"
fi

cluster up --release "$rel" >/dev/null || exit 1
trap 'cluster down >/dev/null 2>&1' EXIT
eval "$(cluster env)"

show() { echo "\$ $*"; "$@" 2>&1; echo "(rc=$?)"; }
node_line() { scontrol show node "$1" | grep -oE 'CPUAlloc=[0-9]+|State=[A-Z+_]+' | tr '\n' ' '; echo; }
# Waits until job $1 is in state $2 (at most 20 s).
wait_state() {
  local k
  for ((k = 0; k < 200; k++)); do
    [ "$(squeue -h -j "$1" -o %T 2>/dev/null)" = "$2" ] && return 0
    sleep 0.1
  done
  return 1
}
jobid_of() { sed -n 's/.*Granted job allocation \([0-9]*\).*/\1/p' | head -1; }

echo "=== release: $(scontrol version)"

echo "=== 1. job expansion: J on node1, helper on node2 merged into J, then J shrunk to node2"
out=$(salloc --no-shell -N1 -n1 -w node1 -J probe-j 2>&1); echo "$out"; J=$(jobid_of <<<"$out")
out=$(salloc --no-shell -N1 -w node2 --dependency=expand:"$J" --immediate=10 -J probe-h 2>&1)
echo "$out"; H=$(jobid_of <<<"$out")
echo "J=$J helper=$H"
show scontrol update jobid="$H" NumNodes=0
show scontrol update jobid="$J" NumNodes=ALL
echo "after merge: node1 $(node_line node1) node2 $(node_line node2)"
show scontrol show job "$J" -d | grep -E 'NodeList=|NumNodes|CPU_IDs|TRES='
show scontrol update jobid="$J" NodeList=node2
sleep 1

echo "=== 2. accounting after the shrink to node2"
echo "node1 $(node_line node1)"
echo "node2 $(node_line node2)"
show scontrol show job "$J" -d | grep -E 'JobState|NodeList=|NumNodes|BatchHost|CPU_IDs|TRES='
echo "--- a competing 2-CPU allocation on node2 (granted = over-allocation):"
show salloc --no-shell -N1 -n2 -w node2 --immediate=5 -J probe-c
echo "node2 $(node_line node2)"
squeue -o '%i %j %T %N %C'
scancel -u root; sleep 2

echo "=== 3. removing the batch host of a 2-node job (salloc, then sbatch)"
B=$(salloc --no-shell -N2 -w node[1-2] -J probe-b 2>&1 | jobid_of)
scontrol show job "$B" | grep -oE 'BatchHost=[^ ]+'
show scontrol update jobid="$B" NodeList=node2
scontrol show job "$B" | grep -E ' NodeList=|NumNodes|BatchHost'
B2=$(sbatch --parsable -N2 -w node[1-2] -J probe-sb -o /dev/null --wrap 'sleep 60')
wait_state "$B2" RUNNING
scontrol show job "$B2" | grep -oE 'BatchHost=[^ ]+'
show scontrol update jobid="$B2" NodeList=node2
scontrol show job "$B2" | grep -E 'JobState| NodeList=|NumNodes|BatchHost'
scancel -u root; sleep 2

echo "=== 4. a step running while its job is resized"
R=$(salloc --no-shell -N2 -w node[1-2] -J probe-r 2>&1 | jobid_of)
srun --jobid="$R" --overlap -N1 -w node1 sleep 6 &
sleep 2
show scontrol update jobid="$R" NodeList=node1
wait
sleep 3
show sacct -j "$R" -n -X --format=JobID,State,NodeList,ExitCode
show sacct -j "$R" -n --format=JobID,JobName,State,NodeList,ExitCode
scancel -u root; sleep 1

echo "=== slurmctld warnings about the configuration"
grep -iE 'deprecat|obsolete|unknown|invalid|ignor' "$S/log/slurmctld.log" | head -20
