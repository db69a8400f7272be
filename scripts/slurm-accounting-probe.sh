#!/usr/bin/env bash
# Sequences of Slurm operations that might leave slurmctld's node accounting exact after a move
# (docs/slurm-releases.md, "Looking for an exact sequence"): E1 a move to the lower-numbered node,
# E2 a helper spanning the job's node and the destination, E3 a second expansion and taking its
# extra CPUs back, E4 the offset with a gap in the node list, E5 the holder allocation. Brings up
# its own 3-node cluster of RELEASE (22.05 = the host's) and takes it down; prints raw outputs.
# Run it under the machine-wide lock: flock -o /run/rbc-root-tests.lock scripts/slurm-accounting-probe.sh 24.11
set -uo pipefail
rel=${1:-22.05}
here=$(cd "$(dirname "$0")/.." && pwd)
S=/tmp/rbc-accounting-probe-$rel
cluster() { "$here/slurm-tests/cluster.sh" "$@" --state-dir "$S"; }
if [ "$rel" = 22.05 ]; then cluster up >/dev/null || exit 1; else cluster up --release "$rel" >/dev/null || exit 1; fi
trap 'cluster down >/dev/null 2>&1' EXIT
eval "$(cluster env)"
show() { echo "\$ $*"; "$@" 2>&1; echo "(rc=$?)"; }
nl() { for n in "$@"; do echo -n "$n $(scontrol show node "$n" | grep -oE 'CPUAlloc=[0-9]+|State=[A-Z+_]+' | tr '\n' ' ') "; done; echo; }
jobid_of() { sed -n 's/.*Granted job allocation \([0-9]*\).*/\1/p' | head -1; }
jd() { scontrol show job "$1" -d | grep -E ' NodeList=|NumCPUs|TRES=|CPU_IDs' ; }
compete() { # $1 node
  out=$(salloc --no-shell -N1 -n2 -w "$1" --immediate=3 -J compete 2>&1); echo "compete -n2 on $1: $(echo "$out" | tail -1)"
  C=$(jobid_of <<<"$out"); [ -n "$C" ] && scancel "$C"; sleep 1; }
expand() { # $1 job $2 nodes [$3 extra salloc args]
  out=$(salloc --no-shell -w "$2" ${3:-} --dependency=expand:"$1" --immediate=10 -J helper 2>&1); H=$(jobid_of <<<"$out")
  echo "helper $H on $2 (${3:-})"; scontrol update jobid="$H" NumNodes=0; scontrol update jobid="$1" NumNodes=ALL; }
echo "=== $(scontrol version)"
echo "=== E1: move to the lower-numbered node: J on node2, expand to node1, shrink to node1"
J=$(salloc --no-shell -N1 -n1 -w node2 -J e1 2>&1 | jobid_of)
expand "$J" node1 -N1; echo "after merge: $(nl node1 node2)"; jd "$J"
show scontrol update jobid="$J" NodeList=node1; sleep 1
echo "after shrink: $(nl node1 node2)"; jd "$J"; compete node1
scancel "$J"; sleep 2
echo "=== E2: helper spanning the job's node and the destination (node[1-2] -n2), then shrink to node2"
J=$(salloc --no-shell -N1 -n1 -w node1 -J e2 2>&1 | jobid_of)
expand "$J" node1,node2 "-N2 -n2"; echo "after merge: $(nl node1 node2)"; jd "$J"
show scontrol update jobid="$J" NodeList=node2; sleep 1
echo "after shrink: $(nl node1 node2)"; jd "$J"; compete node2; compete node1
scancel "$J"; sleep 2
echo "=== E3: ordinary move node1 -> node2, then a second expansion onto node2, then take the extra TRES back"
J=$(salloc --no-shell -N1 -n1 -w node1 -J e3 2>&1 | jobid_of)
expand "$J" node2 -N1; show scontrol update jobid="$J" NodeList=node2; sleep 1
echo "after shrink: $(nl node1 node2)"; jd "$J"
expand "$J" node2 -N1; echo "after 2nd expansion: $(nl node1 node2)"; jd "$J"
show scontrol update jobid="$J" NodeList=node2; echo "after NodeList=node2 again: $(nl node2)"; jd "$J"
show scontrol update jobid="$J" NumCPUs=1; echo "after NumCPUs=1: $(nl node2)"; jd "$J"
show scontrol update jobid="$J" MinCPUsNode=1; echo "after MinCPUsNode=1: $(nl node2)"; jd "$J"
compete node2
scancel "$J"; sleep 2
echo "=== E4: expansion onto node2 with a helper job on node3 first (node2 not the last node), J on node1"
J=$(salloc --no-shell -N1 -n1 -w node1 -J e4 2>&1 | jobid_of)
expand "$J" node3 -N1; echo "after merge node3: $(nl node1 node3)"; jd "$J"
scancel "$J"; sleep 2
echo "=== E5: the holder: ordinary move node1 -> node2, then salloc --no-shell --immediate -n1 -w node2"
J=$(salloc --no-shell -N1 -n1 -w node1 -J e5 2>&1 | jobid_of)
expand "$J" node2 -N1; show scontrol update jobid="$J" NodeList=node2; sleep 1
echo "after shrink: $(nl node1 node2)"
out=$(salloc --no-shell -N1 -n1 --mem=1 -w node2 --immediate=3 -J "rebal-hold:$J:test" 2>&1); echo "$out"; HOLD=$(jobid_of <<<"$out")
echo "with the holder: $(nl node1 node2)"; scontrol show node node2 | grep -E 'CPUAlloc|AllocMem|AllocTRES'
compete node2; compete node1
scancel "$HOLD"; sleep 1; echo "holder cancelled: $(nl node2)"
scancel "$J"; sleep 1
