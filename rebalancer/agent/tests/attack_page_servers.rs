//! Attack test 2 (issue #11), with peer protocol 4 on both agents: attackers on the
//! destination's node — one root, one unprivileged (uid 65534) — connect to the port that is to
//! carry the job's pages before the real connection is made, and again afterwards. They must
//! read nothing, what they write must reach no CRIU process, and the migration must complete
//! with the job's TCP client intact.
//!
//! - Post-copy: the source agent's lazy-page link port (`lazy_link.rs`): the destination agent
//!   must connect from its address and send the link's token first; CRIU listens nowhere.
//! - Stop-and-copy: the destination's page-server port, which the agent accepts for CRIU from
//!   the source's address only; and an unprivileged user on the source's node, who has that
//!   address: the source's nftables guard resets it there (`ps_guard.rs`), and the page
//!   server listens only once the guard is in place (`open-page-server`).
//!
//! The race is made deterministic, not left to a sleep: before the migration the test drops
//! (nftables, in the namespace of the node whose agent or CRIU makes the real connection) the
//! SYNs of root sockets in group 0 towards the port's node other than to its peer port. The
//! real connection therefore waits in TCP's SYN retransmission while the attackers (the root
//! one runs in group 4242) connect the moment the new listener appears; the rule goes once
//! they answered, and the next retransmission (1 s, then 2 s later) gets through.

mod common;
use common::*;
use rebalancer_proto::*;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Lab block of this file (see `Lab::new`; others use 0-6 and 8-15).
const K: u8 = 7;

/// Drops to `uid`/`gid` (argv), then for each "IP PORT" line connects, writes junk, and prints
/// "refused", "reset", "timeout", or "closed N" / "open N" (N bytes read within a second, and
/// whether the other end closed the connection by then).
const ATTACKER: &str = r#"
import os, socket, sys
gid, uid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setgid(gid); os.setuid(uid)
for line in sys.stdin:
    ip, port = line.split()
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((ip, int(port)))
    except ConnectionRefusedError:
        print("refused", flush=True); continue
    except ConnectionResetError:
        print("reset", flush=True); continue
    except socket.timeout:
        print("timeout", flush=True); continue
    try:
        s.sendall(b"\x01\x00\x00\x00INJECTED-PAGES" * 64)
    except OSError:
        pass
    s.settimeout(1)
    n, closed = 0, False
    try:
        while True:
            b = s.recv(65536)
            if not b:
                closed = True
                break
            n += len(b)
    except socket.timeout:
        pass
    except OSError:
        closed = True
    print("closed" if closed else "open", n, flush=True)
    s.close()
"#;

struct Attacker {
    who: &'static str,
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Attacker {
    fn start(netns: &str, who: &'static str, gid: u32, uid: u32) -> Attacker {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-u", "-c", ATTACKER])
            .arg(gid.to_string())
            .arg(uid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("attacker");
        let to = child.stdin.take().expect("stdin");
        let from = BufReader::new(child.stdout.take().expect("stdout"));
        Attacker {
            who,
            child,
            to,
            from,
        }
    }

    fn try_port(&mut self, l: (Ipv4Addr, u16)) -> String {
        writeln!(self.to, "{} {}", l.0, l.1).expect("tell the attacker");
        let mut answer = String::new();
        self.from.read_line(&mut answer).expect("attacker's answer");
        answer.trim().to_string()
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Listening (state 0A) IPv4 sockets in `pid`'s network namespace: (address, port).
fn listeners(pid: u32) -> Vec<(Ipv4Addr, u16)> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (ip, port) = f.get(1)?.split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            Some((
                Ipv4Addr::from(ip.to_ne_bytes()),
                u16::from_str_radix(port, 16).ok()?,
            ))
        })
        .collect()
}

fn nft(netns: &str, script: &str) {
    let mut c = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("nft script");
    assert!(c.wait().expect("nft").success(), "nft refused:\n{script}");
}

/// Holds the real connection's SYNs from `netns` to `to` (any port but `peer_port`) while the
/// attackers (other groups, other users) go first.
fn hold(netns: &str, to: Ipv4Addr, peer_port: u16) {
    nft(
        netns,
        &format!(
            "table ip rbt_hold {{\n chain output {{\n  type filter hook output priority 0; policy accept;\n  \
             ip daddr {to} tcp dport != {peer_port} tcp flags & (syn | ack) == syn meta skuid 0 meta skgid 0 counter drop\n }}\n}}\n"
        ),
    );
}

fn release(netns: &str) {
    nft(netns, "delete table ip rbt_hold\n");
}

/// What one attacker got: who, its first answer, its answer after the move, and whether the
/// listener was still up after its first answer.
type Attempt = (String, String, String, bool);

/// Runs one migration of `id` from node 0 to node 1 in `mode` while both attackers (in node
/// 1's namespace) try the first new listener on `watch_ip` in the namespace of `watch_agent`'s
/// node. Returns the record, the port and what each attacker got before and after.
fn attacked_move(
    lab: &Lab,
    id: &str,
    mode: MigrationMode,
    watch_agent: usize,
    hold_in: usize,
) -> (MigrationRecord, u16, Vec<Attempt>) {
    let dest_ns = lab.nodes[1].netns.clone();
    let attackers = vec![
        Attacker::start(&dest_ns, "root", 4242, 0),
        Attacker::start(&dest_ns, "nobody", 65534, 65534),
    ];
    attacked_move_by(lab, id, mode, (watch_agent, hold_in), attackers)
}

/// [`attacked_move`] with `attackers` of the caller's choice (`at`: the node whose new
/// listener they try, the node whose root SYNs are held back).
fn attacked_move_by(
    lab: &Lab,
    id: &str,
    mode: MigrationMode,
    (watch_agent, hold_in): (usize, usize),
    mut attackers: Vec<Attacker>,
) -> (MigrationRecord, u16, Vec<Attempt>) {
    let agent_pid = lab.nodes[watch_agent].agent.as_ref().expect("agent").id();
    let watch_ip: Ipv4Addr = lab.nodes[watch_agent].ip.parse().expect("node ip");
    let before = listeners(agent_pid);
    let hold_ns = lab.nodes[hold_in].netns.clone();
    let watch_peer_port = lab.nodes[watch_agent].port;
    hold(&hold_ns, watch_ip, watch_peer_port);
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let found = loop {
            if let Some(l) = listeners(agent_pid)
                .into_iter()
                .find(|l| l.0 == watch_ip && !before.contains(l))
            {
                break Some(l);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let results = found.map(|l| {
            let firsts: Vec<(String, bool)> = attackers
                .iter_mut()
                .map(|a| {
                    let r = a.try_port(l);
                    // Still listening after the answer: the attacker came before the real one.
                    (r, listeners(agent_pid).contains(&l))
                })
                .collect();
            release(&hold_ns);
            (l, firsts)
        });
        if results.is_none() {
            release(&hold_ns);
        }
        (results, attackers)
    });
    let rec = lab
        .client(0)
        .migrate(id, &lab.nodes[1].name, mode)
        .unwrap_or_else(|e| {
            panic!(
                "{mode} failed: {e}\n--- n0\n{}\n--- n1\n{}",
                lab.log(0),
                lab.log(1)
            )
        });
    let (results, mut attackers) = watcher.join().expect("watcher");
    let (l, firsts) = results.unwrap_or_else(|| {
        panic!(
            "no new listener on {watch_ip} during the {mode} move\n{}",
            lab.log(watch_agent)
        )
    });
    // "During": once the real connection was made, the port is closed.
    let out = attackers
        .iter_mut()
        .zip(firsts)
        .map(|(a, (first, still))| (a.who.to_string(), first, a.try_port(l), still))
        .collect();
    (rec, l.1, out)
}

/// Bytes read by an attacker's answer ("closed N" / "open N"); refused/reset/timeout read none.
fn bytes_read(answer: &str) -> u64 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn run(lab: &Lab, addr: &str, encrypted: bool) {
    let id = if encrypted { "aps1" } else { "aps2" };
    let mut c0 = lab.client(0);
    c0.call(&Request::CreateContainer {
        spec: server_spec(id, addr, 32),
    })
    .expect("create");
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(20, Duration::from_secs(60)),
        "no answers\n{}",
        lab.log(0)
    );
    // Post-copy: the link port is the source's (node 0); the destination agent connects.
    let (rec, port, got) = attacked_move(lab, id, MigrationMode::PostCopy, 0, 1);
    eprintln!(
        "encrypted={encrypted} post-copy, link port {port}: {got:?}; {}",
        summary(&rec)
    );
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    assert_eq!(rec.mode, Some(MigrationMode::PostCopy));
    for (who, first, after, still) in &got {
        assert!(
            still,
            "{who} came after the real link: the test proved nothing"
        );
        assert!(
            first.starts_with("closed") || first == "reset" || first == "refused",
            "{who} was left connected to the link port: {first}"
        );
        assert_eq!(
            bytes_read(first),
            0,
            "{who} read from the link port: {first}"
        );
        assert_eq!(
            after, "refused",
            "{who}: the link port still listens: {after}"
        );
    }
    let log0 = lab.log(0);
    assert!(
        log0.contains("lazy-link connection without the link's token refused"),
        "the source never saw the attackers' connections:\n{log0}"
    );
    // CRIU got the linked socket and listened nowhere; no guard was needed.
    let dump_log = lab
        .dir
        .join(&lab.nodes[0].name)
        .join("run/images")
        .join(format!("{}-src/img/dump.log", rec.id));
    let dump_log = std::fs::read_to_string(&dump_log).expect("dump log");
    assert!(
        dump_log.contains("Reusing ps socket"),
        "the lazy dump did not serve on the agents' link:\n{dump_log}"
    );
    assert_eq!(
        dump_log.contains("TLS handshake completed"),
        encrypted,
        "the lazy pages' encryption is not {encrypted}"
    );
    assert!(
        !log0.contains("lazy page server admits only the destination"),
        "a lazy-port guard was installed with peer protocol 4"
    );
    assert!(
        probe.advance(20, Duration::from_secs(20)),
        "client stalled after the post-copy move"
    );

    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    let mut c1 = lab.client(1);
    assert_eq!(
        c1.container(id).expect("on n1").state,
        ContainerState::Running
    );
    let _ = c1.call(&Request::KillContainer {
        id: id.into(),
        signal: 9,
    });

    // Stop-and-copy, a second container from node 0 to node 1.

    let sc = format!("{id}s");
    let sc_addr = {
        let mut o: Vec<&str> = addr.split('.').collect();
        let last = format!("{}", o[3].parse::<u8>().expect("octet") + 1);
        o[3] = &last;
        o.join(".")
    };
    c0.call(&Request::CreateContainer {
        spec: server_spec(&sc, &sc_addr, 32),
    })
    .expect("create");
    let probe = TcpProbe::start(&lab.client_ns, &sc_addr);
    assert!(
        probe.advance(20, Duration::from_secs(60)),
        "no answers\n{}",
        lab.log(0)
    );
    // Stop-and-copy: the page-server port is the destination's (node 1); the source's CRIU
    // dump (node 0) connects.
    let (rec, port, got) = attacked_move(lab, &sc, MigrationMode::StopAndCopy, 1, 0);
    eprintln!(
        "encrypted={encrypted} stop-and-copy, page-server port {port}: {got:?}; {}",
        summary(&rec)
    );
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    for (who, first, after, still) in &got {
        assert!(
            still,
            "{who} came after the dump's connection: the test proved nothing"
        );
        assert!(
            first.starts_with("closed") || first == "reset" || first == "refused",
            "{who} was left connected to the page server: {first}"
        );
        assert_eq!(
            bytes_read(first),
            0,
            "{who} read from the page server: {first}"
        );
        assert_eq!(
            after, "refused",
            "{who}: the page server still listens: {after}"
        );
    }
    assert!(
        lab.log(1)
            .contains("page-server connection from another address refused"),
        "the destination never saw the attackers' connections:\n{}",
        lab.log(1)
    );
    assert!(
        probe.advance(20, Duration::from_secs(20)),
        "client stalled after the stop-and-copy move"
    );
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    let _ = lab
        .client(1)
        .call(&Request::KillContainer { id: sc, signal: 9 });

    // Stop-and-copy again, with an unprivileged user on the *source's* node: it has the
    // address the destination admits, so only the source's guard (ps_guard.rs) stands in its
    // way, and the page server does not listen before the guard is in place.
    let sn = format!("{id}n");
    let sn_addr = {
        let mut o: Vec<&str> = addr.split('.').collect();
        let last = format!("{}", o[3].parse::<u8>().expect("octet") + 2);
        o[3] = &last;
        o.join(".")
    };
    c0.call(&Request::CreateContainer {
        spec: server_spec(&sn, &sn_addr, 32),
    })
    .expect("create");
    let probe = TcpProbe::start(&lab.client_ns, &sn_addr);
    assert!(
        probe.advance(20, Duration::from_secs(60)),
        "no answers\n{}",
        lab.log(0)
    );
    let neighbour = vec![Attacker::start(
        &lab.nodes[0].netns,
        "nobody on the source",
        65534,
        65534,
    )];
    let (rec, port, got) =
        attacked_move_by(lab, &sn, MigrationMode::StopAndCopy, (1, 0), neighbour);
    eprintln!(
        "encrypted={encrypted} stop-and-copy, page-server port {port}, attacker on the source: \
         {got:?}; {}",
        summary(&rec)
    );
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    for (who, first, after, still) in &got {
        assert!(
            still,
            "{who} came after the dump's connection: the test proved nothing"
        );
        // Reset on its own node before a byte left it.
        assert!(
            first == "refused" || first == "reset",
            "{who} reached the page server: {first}"
        );
        assert_eq!(
            after, "refused",
            "{who}: the page server still listens: {after}"
        );
    }
    let log0 = lab.log(0);
    assert!(
        !log0.contains("page server unguarded"),
        "the source could not guard the page server:\n{log0}"
    );
    assert!(
        probe.advance(20, Duration::from_secs(20)),
        "client stalled after the guarded stop-and-copy move"
    );
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    let _ = lab
        .client(1)
        .call(&Request::KillContainer { id: sn, signal: 9 });
    // The guard went with the transfer.
    let tables = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.nodes[0].netns,
            "nft",
            "list",
            "tables",
        ])
        .output()
        .expect("nft list tables");
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(
        !tables.contains("rebalancer_ps_"),
        "page-server guard left on the source:\n{tables}"
    );
}

#[test]
#[ignore = "needs root, CRIU 4.2 with GnuTLS, munge, nftables, python3 and network namespaces; .ci/run runs it with --include-ignored"]
fn strangers_on_the_page_ports_read_nothing_and_the_moves_complete() {
    let lab = Lab::new(K, 2);
    run(&lab, "198.19.23.10", true);
}

#[test]
#[ignore = "needs root, CRIU 4.2 with GnuTLS, munge, nftables, python3 and network namespaces; .ci/run runs it with --include-ignored"]
fn strangers_on_plain_page_ports_read_nothing_and_the_moves_complete() {
    let off = "encrypt_memory = false".to_string();
    let lab = Lab::with_config(K, 2, vec![off.clone(), off]);
    run(&lab, "198.19.23.20", false);
}
