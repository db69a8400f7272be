#!/bin/bash
# Proves the inbound hold in isolation (docs/benchmarks.md, "Holding the client's packets"):
# a client, a node and a container namespace; a TCP echo client sends a request every 10 ms.
# At t=1 s the container's inbound packets are diverted from the node's uplink ingress into an
# IFB whose TBF is plugged (a frame the tokens cannot pay for sits at its head); after HOLD_MS
# the TBF is changed to line rate and kicked. Prints the client's largest gap, the requests
# lost, the client's TcpRetransSegs and the backlog seen during the hold.
# MODE=hold (default) | drop (the same window with an nftables drop, like CRIU's lock) | none.
# Needs root; run under the machine-wide lock: flock -o /run/rbc-root-tests.lock ./hold-lab.sh
set -euo pipefail
HOLD_MS=${HOLD_MS:-300}
MODE=${MODE:-hold}
C=hl-c N=hl-n K=hl-k
IP=198.19.254.10 NODE=198.19.254.254 CLI=198.19.254.1
IFB=hlifb0
cleanup() {
  for ns in $C $N $K; do ip netns del $ns 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
for ns in $C $N $K; do ip netns add $ns; ip -n $ns link set lo up; done
ip -n $C link add c0 type veth peer name n0 netns $N
ip -n $C addr add $CLI/24 dev c0; ip -n $C link set c0 up
ip -n $N addr add $NODE/24 dev n0; ip -n $N link set n0 up
ip -n $N link add n1 type veth peer name eth0 netns $K
ip -n $K addr add $IP/32 dev eth0; ip -n $K link set eth0 up
ip -n $K route add default dev eth0
ip -n $N link set n1 up
ip netns exec $N sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.n0.proxy_arp=1 net.ipv4.conf.n1.proxy_arp=1
ip -n $N route add $IP/32 dev n1
ip netns exec $K python3 - <<'PY' &
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.19.254.10", 7000)); s.listen(1)
c, _ = s.accept()
while True:
    d = c.recv(65536)
    if not d: break
    c.sendall(d)
PY
sleep 0.5
# Prepared before the freeze: the IFB with its plugged TBF, the uplink's ingress qdisc.
plug() { # one frame the TBF's spent bucket cannot pay for (the IFB drops it when it leaves)
  ip netns exec $N python3 -c '
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("'$IFB'", 0))
s.send(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"\x00" * 1500)'
}
ip -n $N link add $IFB type ifb; ip -n $N link set $IFB up
tc -n $N qdisc add dev $IFB root tbf rate 800bit burst 1600 limit 2mb
plug; plug
tc -n $N qdisc add dev n0 ingress
ip netns exec $N nstat -n >/dev/null
ip netns exec $C nstat -n >/dev/null
ip netns exec $C python3 - $HOLD_MS <<'PY' > /tmp/hold-lab-client.$$ &
import socket, sys, time
s = socket.create_connection(("198.19.254.10", 7000))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t0 = time.monotonic(); last = t0; gap = 0; n = 0
while time.monotonic() - t0 < 3.0:
    s.sendall(b"x" * 64)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    now = time.monotonic(); gap = max(gap, now - last); last = now; n += 1
    time.sleep(0.01)
print(f"requests {n} largest_gap_ms {gap*1000:.0f}")
PY
CLIENT=$!
# The release as the agent does it, from a process already running (no start-up cost in the
# measured window): `tc qdisc change` to line rate, then one frame to kick the dequeue.
FIFO=/tmp/hold-lab-fifo.$$; rm -f $FIFO; mkfifo $FIFO
ip netns exec $N python3 - $IFB $FIFO <<'PY' > /tmp/hold-lab-release.$$ &
import socket, subprocess, sys, time
ifb, fifo = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((ifb, 0))
open(fifo).read()
t0 = time.monotonic()
subprocess.run(["tc", "qdisc", "change", "dev", ifb, "root", "tbf", "rate", "10gbit",
                "burst", "256k", "limit", "2mb"], check=True)
t1 = time.monotonic()
s.send(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"\x00" * 1500)
print(f"change {1000*(t1-t0):.1f} ms, change+kick {1000*(time.monotonic()-t0):.1f} ms")
PY
RELEASER=$!
sleep 1
t_hold=$(date +%s%N)
case $MODE in
hold) tc -n $N filter add dev n0 parent ffff: protocol ip prio 10 u32 match ip dst $IP/32 \
        action mirred egress redirect dev $IFB ;;
drop) ip netns exec $K nft add table ip hl\; add chain ip hl in '{ type filter hook input priority 0; policy drop; }' ;;
esac
sleep $(echo "scale=3; $HOLD_MS/1000" | bc)
backlog=$(tc -n $N -s qdisc show dev $IFB | grep -o 'backlog [^ ]* [0-9]*p' || true)
case $MODE in
hold)
  echo go > $FIFO
  wait $RELEASER
  sleep 0.02
  after_kick=$(tc -n $N -s qdisc show dev $IFB | grep -o 'backlog [^ ]* [0-9]*p')
  tc -n $N filter del dev n0 parent ffff: protocol ip prio 10
  echo "release: $(cat /tmp/hold-lab-release.$$); backlog 20 ms later: $after_kick"
  ;;
drop|none) echo go > $FIFO; wait $RELEASER || true
   [ $MODE = drop ] && ip netns exec $K nft delete table ip hl ;;
esac
rm -f $FIFO /tmp/hold-lab-release.$$
wait $CLIENT
echo "mode $MODE hold_ms $HOLD_MS backlog_during_hold: ${backlog:-none}"
cat /tmp/hold-lab-client.$$; rm -f /tmp/hold-lab-client.$$
echo "client $(ip netns exec $C nstat -az TcpRetransSegs | grep TcpRetransSegs)"
tc -n $N -s qdisc show dev $IFB | head -3
