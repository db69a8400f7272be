#!/usr/bin/env bash
# The product's main job in one command: a live job step leaves a node that an admin drains,
# without its TCP client noticing more than a short pause.
#
#   scripts/demo.sh [--no-setup] [--no-build] [--keep]
#
# As root on a fresh Debian 12 machine: installs what is missing (scripts/setup.sh), builds the
# release binaries and the SPANK plugin, brings up the 3-node test cluster (slurm-tests/cluster.sh)
# with the plugin in plugstack.conf, starts one rebalancer-agent on each node and rebalancerd (on the admin host) with an
# automatic drain policy, runs a migratable TCP counter server as a Slurm step on node1 and a client
# job on node3 that sends a request every 10 ms, drains node1, and shows the rebalancer moving the
# step to node2 by itself. Everything is removed afterwards, also on Ctrl-C.
#   --no-setup   skip scripts/setup.sh      --no-build   use the binaries already built
#   --keep       leave the cluster, agents and controller running after success (stop: Ctrl-C)
# Environment: CARGO_TARGET_DIR (default: target/ of the repository), DEMO_DIR (state, default
# /var/tmp/rebalancer-demo), DEMO_MEM_MB (memory the server holds, default 256), DEMO_LOCK_WAIT_S
# (how long to wait for another cluster user, default 900).
# Exit status 0 only if the step moved, the client saw no error and Slurm shows the new placement.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEMO_DIR=${DEMO_DIR:-/var/tmp/rebalancer-demo}
MEM_MB=${DEMO_MEM_MB:-256}
LOCK_WAIT_S=${DEMO_LOCK_WAIT_S:-900}
# Same lock as slurm-tests' Cluster guard: one Slurm test cluster per machine.
LOCK=/run/slurm-rbc.lock
CLUSTER="$ROOT/slurm-tests/cluster.sh"
# Where each node's agent listens for the SPANK plugin, on the node (cluster.sh env's
# RBC_AGENT_SOCKET; plugstack.conf needs it before the cluster is up). The controller reaches the
# agents over their TCP control ports instead (cluster.sh's RBC_CONTROLLER_AGENTS).
AGENT_SOCKET=/run/rebalancer/agent.sock
PORT=8000

do_setup=1 do_build=1 keep=0
for a in "$@"; do
  case $a in
    --no-setup) do_setup=0 ;;
    --no-build) do_build=0 ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown argument '$a' (try --help)" >&2; exit 2 ;;
  esac
done

if [ -t 1 ]; then B=$'\033[1m' G=$'\033[32m' R=$'\033[31m' N=$'\033[0m'; else B='' G='' R='' N=''; fi
T0=$SECONDS
step() { printf '\n%s== [%3ds] %s%s\n' "$B" $((SECONDS - T0)) "$*" "$N"; }
say() { printf '   %s\n' "$*"; }
fail() {
  printf '\n%sdemo: FAILED: %s%s\n' "$R" "$*" "$N" >&2
  show_logs
  exit 1
}

[ "$(id -u)" = 0 ] || { echo "demo: run as root (it starts Slurm daemons, network namespaces and CRIU)" >&2; exit 1; }
# Not under /tmp: the job's working directory lives here, and a container gets its own /tmp.
case $DEMO_DIR in /var/tmp/?*) ;; *) echo "demo: DEMO_DIR must be under /var/tmp (it is removed afterwards; every host of the test cluster sees /var/tmp, while /tmp and /run are private to each host)" >&2; exit 2 ;; esac

CDIR=$DEMO_DIR/cluster   # cluster.sh state dir
ADIR=$DEMO_DIR/agents    # agent configs, sockets, logs
WORK=$DEMO_DIR/work      # the job's working directory (server, client, their output)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release
NODES=(node1 node2 node3)
declare -A AGENT_PID=()
CTL_PID='' SERVER_SRUN='' CLIENT_SRUN='' SERVER_JOB='' CLIENT_JOB='' cluster_up=0 locked=0

show_logs() {
  local f
  [ "$locked" = 1 ] || return 0
  for f in "$ADIR"/node1.log "$ADIR"/node2.log "$DEMO_DIR"/rebalancerd.log "$WORK"/server.out \
    "$WORK"/client.out "$CDIR"/log/slurmctld.log "$CDIR"/log/slurmd-node1.log "$CDIR"/log/slurmd-node2.log \
    "$CDIR"/host/node2"${AGENT_SOCKET%/*}"/images/*/restore-step.log; do
    [ -s "$f" ] || continue
    printf -- '----- last lines of %s -----\n' "$f" >&2
    tail -n 30 "$f" >&2
  done
}

# Kills a process and waits a moment for it; never by name.
stop_pid() {
  local p=$1 k
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
  kill -TERM "$p" 2>/dev/null || true
  for ((k = 0; k < 30; k++)); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ "$keep" = 1 ] && [ "$rc" = 0 ]; then
    say "--keep: everything stays up (eval \"\$($CLUSTER env --state-dir $CDIR)\" for Slurm commands,"
    say "rebalctl --socket $DEMO_DIR/ctl.sock); press Ctrl-C to clean up"
    trap 'keep=0' INT TERM
    while [ "$keep" = 1 ]; do sleep 1; done
  fi
  if [ "$locked" = 0 ]; then
    [ "$rc" = 130 ] && echo "demo: interrupted" >&2
    exit "$rc"   # nothing started yet, and $DEMO_DIR may belong to a demo that holds the lock
  fi
  step "cleaning up"
  if [ "$cluster_up" = 1 ]; then
    [ -n "$CLIENT_JOB" ] && scancel "$CLIENT_JOB" 2>/dev/null
    [ -n "$SERVER_JOB" ] && scancel "$SERVER_JOB" 2>/dev/null
  fi
  stop_pid "$CLIENT_SRUN"
  stop_pid "$SERVER_SRUN"
  stop_pid "$CTL_PID"
  for n in "${!AGENT_PID[@]}"; do stop_pid "${AGENT_PID[$n]}"; done
  # The agents' image tmpfs mounts; the containers' namespaces are on the node hosts, which
  # cluster.sh down takes apart.
  grep -o " $DEMO_DIR/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  if [ "$cluster_up" = 1 ] || [ -e "$CDIR/.rbc-cluster" ]; then
    "$CLUSTER" down --state-dir "$CDIR" 8>&- >/dev/null 2>&1 || say "cluster.sh down failed; run: $CLUSTER down --state-dir $CDIR"
  fi
  rm -rf "$DEMO_DIR"
  if [ "$rc" = 0 ]; then
    printf '\n%sdemo: succeeded in %d s%s\n' "$G" $((SECONDS - T0)) "$N"
  elif [ "$rc" = 130 ]; then
    echo "demo: interrupted" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ----- 1. install and build ---------------------------------------------------------------------
if [ "$do_setup" = 1 ]; then
  step "scripts/setup.sh (packages, CRIU >= 4.2, sysctls)"
  "$ROOT/scripts/setup.sh"
fi
export PATH=$HOME/.cargo/bin:$PATH
if [ "$do_build" = 1 ]; then
  step "cargo build --release (agent, rebalancerd, rebalctl, SPANK plugin) into $TARGET"
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release \
    -p rebalancer-agent -p rebalancer-controller -p rebalancer-cli -p slurm-rebalancer-spank)
fi
for f in rebalancer-agent rebalancerd rebalctl libslurm_rebalancer_spank.so; do
  [ -x "$BIN/$f" ] || [ -f "$BIN/$f" ] || fail "$BIN/$f is missing (run without --no-build)"
done
rebalctl() { "$BIN/rebalctl" --socket "$DEMO_DIR/ctl.sock" "$@"; }

# ----- 2. cluster, agents, controller -----------------------------------------------------------
step "waiting for the machine's Slurm test cluster slot ($LOCK)"
exec 8>"$LOCK"
if ! flock -n 8; then
  say "another test cluster is in use (a test run or CI); waiting up to ${LOCK_WAIT_S} s ..."
  flock -w "$LOCK_WAIT_S" 8 || fail "the test cluster slot stayed busy for ${LOCK_WAIT_S} s (held by: $(cat /run/slurm-rbc.current 2>/dev/null || echo unknown)); try again later"
fi
locked=1
# A previous demo killed hard (kill -9) leaves its state: take it down first.
if [ -e "$CDIR/.rbc-cluster" ]; then
  say "removing the leftovers of an earlier demo run"
  "$CLUSTER" down --state-dir "$CDIR" 8>&- >/dev/null 2>&1 || true
fi
grep -o " $DEMO_DIR/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
rm -rf "$DEMO_DIR"
mkdir -p "$ADIR" "$WORK" "$DEMO_DIR/policies"

step "Slurm cluster: slurmctld on the admin host (198.18.0.2), slurmd on node1..node3 (198.18.0.11-13), each host isolated like a machine, SPANK plugin loaded"
cat >"$DEMO_DIR/plugstack.conf" <<EOF
required $BIN/libslurm_rebalancer_spank.so socket=$AGENT_SOCKET
EOF
say "plugstack.conf: $(cat "$DEMO_DIR/plugstack.conf")"
cluster_up=1
"$CLUSTER" up --state-dir "$CDIR" --plugstack "$DEMO_DIR/plugstack.conf" 8>&- ||
  fail "cluster.sh up failed (another cluster up? see the message above)"
eval "$("$CLUSTER" env --state-dir "$CDIR")"
export SLURM_CONF
sinfo -N -o '   %N %t %C' | sed 's/^/ /'

step "rebalancer-agent on every node (on the node: its namespaces, /run and state directory; TCP control port 7879 for the controller)"
for ((k = 0; k < 3; k++)); do
  node=${NODES[$k]}
  peers=''
  for ((j = 0; j < 3; j++)); do
    [ "$j" = "$k" ] || peers+="${NODES[$j]} = \"198.18.0.$((11 + j)):7878\""$'\n'
  done
  cat >"$ADIR/$node.toml" <<EOF
node = "$node"
listen = "198.18.0.$((11 + k)):7878"
control_socket = "$AGENT_SOCKET"
$(cat "$RBC_AGENT_IPAM")
state_dir = "/var/lib/rebalancer"
run_dir = "/run/rebalancer"
migration_timeout_ms = 60000
[auth]
method = "munge"
munge_socket = "$CDIR/munge/munge.socket"
[peers]
$peers
$(cat "$RBC_AGENT_CONTROL_DIR/$node.toml")
EOF
  # The agent runs the restore step with srun, which finds the cluster through SLURM_CONF.
  # setsid: a Ctrl-C on the terminal reaches this script only, which then stops everything in order.
  # cluster.sh exec execs the agent: $! is its pid.
  setsid "$CLUSTER" exec --state-dir "$CDIR" "$node" "$BIN/rebalancer-agent" run --config "$ADIR/$node.toml" \
    </dev/null >"$ADIR/$node.log" 2>&1 8>&- &
  AGENT_PID[$node]=$!
  disown
done
for node in "${NODES[@]}"; do
  # The node's private /run, seen from here through its backing directory.
  sock=$CDIR/host/$node$AGENT_SOCKET
  for ((k = 0; k < 200; k++)); do
    [ -S "$sock" ] && break
    kill -0 "${AGENT_PID[$node]}" 2>/dev/null || fail "the agent on $node exited"
    sleep 0.1
  done
  [ -S "$sock" ] || fail "the agent on $node has no control socket after 20 s"
done
say "agents up: $(printf '%s ' "${NODES[@]}")(logs in $ADIR)"

step "rebalancerd on the admin host with an automatic drain policy, reaching the agents over their TCP control ports (7879, munge)"
cp "$ROOT/policies/drain.toml" "$DEMO_DIR/policies/drain.toml"
sed -i 's/^action *= *"[a-z-]*"/action = "automatic"/' "$DEMO_DIR/policies/drain.toml"
grep -q '^action = "automatic"' "$DEMO_DIR/policies/drain.toml" || fail "could not set the drain policy to automatic"
cat >"$DEMO_DIR/rebalancerd.toml" <<EOF
[controller]
socket = "$DEMO_DIR/ctl.sock"
journal = "$DEMO_DIR/journal.redb"
policies = "$DEMO_DIR/policies"
slurm_user = "root"
evaluate_interval_s = 2
[slurm]
backend = "libslurm"
conf = "$SLURM_CONF"
poll_interval_ms = 300
reconcile_interval_s = 5
[agents]
$(cat "$RBC_CONTROLLER_AGENTS")
poll_interval_ms = 500
[migration]
timeout_s = 120
$(cat "$RBC_CONTROLLER_IPAM")
EOF
"$BIN/rebalancerd" --check-config --config "$DEMO_DIR/rebalancerd.toml" >/dev/null ||
  fail "rebalancerd rejects $DEMO_DIR/rebalancerd.toml"
setsid "$CLUSTER" exec --state-dir "$CDIR" "$RBC_ADMIN_HOST" "$BIN/rebalancerd" --config "$DEMO_DIR/rebalancerd.toml" \
  </dev/null >/dev/null 2>"$DEMO_DIR/rebalancerd.log" 8>&- &
CTL_PID=$!
disown
for ((k = 0; k < 200; k++)); do
  rebalctl ping >/dev/null 2>&1 && break
  kill -0 "$CTL_PID" 2>/dev/null || fail "rebalancerd exited"
  sleep 0.1
done
rebalctl ping >/dev/null 2>&1 || fail "rebalancerd does not answer on $DEMO_DIR/ctl.sock"
# Every agent up and holding its leased block of container addresses.
for ((k = 0; k < 100; k++)); do
  [ "$(rebalctl show nodes 2>/dev/null | awk 'NR > 1 && $3 == "up"' | wc -l)" = 3 ] &&
    [ "$(rebalctl show blocks 2>/dev/null | grep -c '^Block=')" -ge 3 ] && break
  sleep 0.2
done
rebalctl show nodes | sed 's/^/   /'
[ "$(rebalctl show blocks 2>/dev/null | grep -c '^Block=')" -ge 3 ] ||
  fail "the agents did not all get a block of container addresses from rebalancerd"
say "container address blocks leased by rebalancerd (rebalctl show blocks):"
rebalctl show blocks | sed 's/^/   /'
rebalctl show policies | sed 's/^/   /'

# ----- 3. the workload --------------------------------------------------------------------------
cat >"$WORK/server.py" <<'EOF'
# TCP counter server: answers each line with the number of lines seen on that connection.
import socket, sys
mem = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(mem), 4096):
    mem[i] = 1
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.listen(4)
print("server: listening, holding", sys.argv[1], "MiB", flush=True)
while True:
    c, peer = s.accept()
    print("server: client", peer[0], flush=True)
    n = 0
    try:
        for line in c.makefile("rb"):
            n += 1
            c.sendall(b"%d\n" % n)
    except OSError as e:
        print("server: connection error:", e, flush=True)
    c.close()
EOF
# The TCP test client the Slurm end-to-end tests use (slurm-tests/workload/client.py).
cp "$ROOT/slurm-tests/workload/client.py" "$WORK/client.py"

cat >"$WORK/watch.py" <<'EOF'
# Follows the newest migration in `rebalctl --json show migrations`: prints each phase when it
# starts and the bytes sent so far, then the end; writes id/state/dst/slurm_error for the shell.
import json, shlex, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_DFL)
rebalctl, sock, limit, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
t0 = time.monotonic()
seen, said_state = 0, None
while time.monotonic() - t0 < limit:
    p = subprocess.run([rebalctl, "--socket", sock, "--json", "show", "migrations"],
                       capture_output=True, text=True)
    ms = json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else []
    if ms:
        m = ms[-1]; r = m["record"]; s = r["stats"]
        if seen == 0 and said_state is None:
            print("   [%5.1fs] policy %s started migration %s: %s %s -> %s, %s" % (
                time.monotonic() - t0, m["policy"], r["id"][:8], r["container"], r["source"],
                r["destination"], r.get("mode") or r["requested_mode"]))
            said_state = "started"
        start = r["phases"][0]["started_at"] if r["phases"] else 0
        for ph in r["phases"][seen:]:
            print("   [%5.1fs]   phase %-15s at +%5d ms   %7.1f MiB sent" % (
                time.monotonic() - t0, ph["phase"], ph["started_at"] - start, s["bytes_sent"] / 1048576))
        seen = len(r["phases"])
        done = r["state"] in ("rolled-back", "failed") or (
            r["state"] == "succeeded" and (m.get("slurm_synced") or m.get("slurm_error")))
        if done:
            print("   [%5.1fs] %s: downtime %s ms, %.1f MiB sent; %s" % (
                time.monotonic() - t0, r["state"], s.get("downtime_ms"), s["bytes_sent"] / 1048576,
                "Slurm allocation updated" if m.get("slurm_synced") else
                "Slurm: %s" % (m.get("slurm_error") or r.get("error"))))
            with open(out, "w") as f:
                for k, v in (("id", r["id"]), ("state", r["state"]), ("dst", r["destination"]),
                             ("slurm_error", m.get("slurm_error") or "")):
                    f.write("%s=%s\n" % (k, shlex.quote(v)))
            sys.exit(0)
    time.sleep(0.2)
sys.exit(1)
EOF

# Prints one field of the client's status.
client_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/client.json" "$1" 2>/dev/null; }
job_of() { sed -n 's/.*Granted job allocation \([0-9]*\).*/\1/p' "$1" | head -1; }

step "a migratable job: TCP counter server on node1 (SPANK --migratable)"
cd "$WORK"
# A one-node allocation on node1. When node1 drains, rebalancerd adds the destination to the job
# (the restore step must run on a node of the job), migrates the task, then releases node1.
run() { say "\$ $*"; "$@" 8>&-; }
salloc_job() {  # prints the job id salloc granted
  local err=$WORK/salloc.err
  salloc --no-shell "$@" 2>"$err" 8>&- || { cat "$err" >&2; return 1; }
  say "\$ salloc --no-shell $*    -> $(grep -o 'Granted job allocation [0-9]*' "$err")" >&2
  job_of "$err"
}
SERVER_JOB=$(salloc_job -N1 -n1 -w node1 -J demo-server) || fail "salloc for the server failed"
[ -n "$SERVER_JOB" ] || fail "salloc granted no job id"
scontrol show job "$SERVER_JOB" | grep -E ' NodeList=| BatchHost=' | sed 's/^ */   /'
say "\$ srun --jobid=$SERVER_JOB -w node1 -N1 -n1 --migratable python3 -u server.py $MEM_MB $PORT </dev/null &"
setsid srun --jobid="$SERVER_JOB" -w node1 -N1 -n1 --migratable python3 -u server.py "$MEM_MB" "$PORT" \
  </dev/null >"$WORK/server.out" 2>&1 8>&- &
SERVER_SRUN=$!
disown
addr=''
for ((k = 0; k < 150; k++)); do
  addr=$(rebalctl --json show containers "job=$SERVER_JOB" 2>/dev/null | python3 -c '
import json, sys
for c in json.load(sys.stdin):
    if c.get("state") == "running" and c.get("node") == "node1":
        print(c["address"]); break' 2>/dev/null || true)
  [ -n "$addr" ] && grep -q listening "$WORK/server.out" 2>/dev/null && break
  kill -0 "$SERVER_SRUN" 2>/dev/null || fail "the server's srun exited: $(cat "$WORK/server.out")"
  sleep 0.2
done
[ -n "$addr" ] || fail "the controller does not show the server's container on node1"
rebalctl show containers "job=$SERVER_JOB" | sed 's/^/   /'
squeue -s -j "$SERVER_JOB" | sed 's/^/   /'

step "a client job on node3: one request every 10 ms to $addr:$PORT"
# The client job takes both CPUs of node3, so node2 is the only node with room for the server.
say "\$ salloc --no-shell -w node3 -N1 -n1 -c2 -J demo-client; srun --jobid=C python3 client.py $addr $PORT &"
salloc --no-shell -w node3 -N1 -n1 -c2 -J demo-client 2>"$WORK/salloc-client.err" 8>&- ||
  { cat "$WORK/salloc-client.err" >&2; fail "salloc for the client failed"; }
CLIENT_JOB=$(job_of "$WORK/salloc-client.err")
[ -n "$CLIENT_JOB" ] || fail "no job id in: $(cat "$WORK/salloc-client.err")"
setsid srun --jobid="$CLIENT_JOB" -n1 -c2 python3 -u client.py "$addr" "$PORT" "$WORK/client.json" \
  </dev/null >"$WORK/client.out" 2>&1 8>&- &
CLIENT_SRUN=$!
disown
for ((k = 0; k < 100; k++)); do
  [ "$(client_field answers || echo 0)" -ge 200 ] 2>/dev/null && break
  kill -0 "$CLIENT_SRUN" 2>/dev/null || fail "the client exited: $(cat "$WORK/client.out")"
  sleep 0.1
done
[ "$(client_field answers || echo 0)" -ge 200 ] 2>/dev/null || fail "the client gets no answers"
say "client: $(client_field answers) answers, largest gap $(client_field max_gap_ms | cut -d. -f1) ms, $(client_field errors) errors"

# ----- 4. drain node1 ---------------------------------------------------------------------------
step "drain node1; the rebalancer moves the step by itself"
say "\$ scontrol update nodename=node1 state=drain reason=\"demo maintenance\""
scontrol update nodename=node1 state=drain reason="demo maintenance"
# One line per phase as the controller reports it (polled every 0.2 s), until the migration
# ended and Slurm's allocation was updated.
python3 -u "$WORK/watch.py" "$BIN/rebalctl" "$DEMO_DIR/ctl.sock" 120 "$WORK/migration.env" || {
  [ $? -gt 128 ] && exit 130   # Ctrl-C
  fail "no migration ended within 120 s of the drain"
}
. "$WORK/migration.env"   # id state dst slurm_error
[ "$state" = succeeded ] || fail "the migration ended $state: $(rebalctl show migrations "$id" 2>&1 | tail -n +2)"
[ -z "$slurm_error" ] || fail "the migration succeeded but Slurm's allocation was not updated: $slurm_error"
sleep 2   # let the client run on the destination for a while

# ----- 5. what holds afterwards -----------------------------------------------------------------
step "result"
rebalctl show migrations | sed 's/^/   /'
echo
rebalctl --json show migrations "$id" | python3 -c '
import json, sys
m = json.load(sys.stdin)[0]; r = m["record"]; s = r["stats"]
print("   mode %s (%s)" % (r["mode"], r.get("mode_reason") or "-"))
print("   downtime %s ms (freeze -> running on %s), whole migration %s ms" % (s["downtime_ms"], r["destination"], s["total_ms"]))
print("   %.1f MiB sent between the nodes, resident memory %.1f MiB, %d pages copied lazily after the resume" % (s["bytes_sent"] / 1048576, s["rss_bytes"] / 1048576, s["pages_lazy"]))
t0 = r["phases"][0]["started_at"]
print("   phases: " + ", ".join("%s +%d ms" % (p["phase"], p["started_at"] - t0) for p in r["phases"]))'
echo
answers=$(client_field answers) errors=$(client_field errors) gap=$(client_field max_gap_ms | cut -d. -f1)
conns=$(client_field connections) lastans=$(client_field last_answer)
say "client on node3: $answers answers, $errors errors, $conns TCP connection(s), largest gap ${gap} ms, server counter at $lastans"
[ "$errors" = 0 ] || fail "the client saw $errors error(s); last: $(client_field last_error)"
[ "$conns" = 1 ] || fail "the client had to reconnect"
kill -0 "$CLIENT_SRUN" 2>/dev/null || fail "the client exited"
before=$answers
sleep 1
[ "$(client_field answers)" -gt "$before" ] || fail "the client gets no more answers after the migration"
echo
say "\$ squeue -s -j $SERVER_JOB        (steps of the server's job)"
squeue -s -j "$SERVER_JOB" | sed 's/^/   /'
say "\$ scontrol show job $SERVER_JOB | grep -E 'JobState|NodeList|NumNodes'"
scontrol show job "$SERVER_JOB" | grep -E ' JobState=| NodeList=|NumNodes=' | sed 's/^ */   /'
jnodes=$(scontrol show job "$SERVER_JOB" | sed -n 's/^ *NodeList=\([^ ]*\).*/\1/p')
[ "$jnodes" = "$dst" ] || fail "job $SERVER_JOB is on '$jnodes', expected $dst"
rebalctl show containers "job=$SERVER_JOB" | sed 's/^/   /'
for ((k = 0; k < 100; k++)); do
  n1=$(sinfo -h -n node1 -o '%T')
  [ "$n1" = drained ] && break
  sleep 0.2
done
say "\$ sinfo -N"
sinfo -N -o '%N %T %C %E' | sed 's/^/   /'
[ "$n1" = drained ] || fail "node1 is '$n1', not drained"
echo
for ((k = 0; k < 100; k++)); do
  grep -qE "moved( [^ ]+ -> [^ ]+)? and runs on as step" "$WORK/server.out" && break
  sleep 0.1
done
say "the server's srun (started on node1) now follows the task on $dst; its output:"
sed 's/^/   | /' "$WORK/server.out"
grep -qE "moved( [^ ]+ -> [^ ]+)? and runs on as step" "$WORK/server.out" ||
  fail "the server's srun did not follow the moved task"
echo
say "\$ rebalctl history"
rebalctl history | sed 's/^/   /'
printf '\n%sdemo: job %s moved node1 -> %s while its client kept talking to it (largest gap %s ms, 0 errors)%s\n' \
  "$G" "$SERVER_JOB" "$dst" "$gap" "$N"
