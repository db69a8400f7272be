//! Attack test 2, post-copy half (issue #11): a process on the node network connects to the
//! source's lazy page server before the destination does. CRIU's lazy dump accepts exactly one
//! connection (criu/page-xfer.c `cr_page_server` → util.c `run_tcp_server`: one `accept`, then
//! the listener is closed), so a stranger who wins that race would be served, and the real
//! destination never would (plain pages: a leak; encrypted: a failed migration). The source
//! agent now resets every connection to that port that does not come from the destination
//! (`lazy_guard.rs`).
//!
//! The attacker watches the source's sockets (any local user can read /proc/net/tcp) and
//! connects from the client namespace the moment the lazy listener appears. It must be reset,
//! read nothing, and the migration must still complete with the client's TCP connection intact.
//! Run for both the encrypted default and `encrypt_memory = false`.
//!
//! From peer protocol 4 CRIU listens nowhere (the agents link the connection themselves,
//! `attack_page_servers.rs`); the guard remains for destinations of peer protocol 3 and older,
//! so the destination here speaks `[1, 3]`.

mod common;
use common::*;
use rebalancer_proto::*;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connects to each "IP PORT" line read from stdin; prints "reset", "refused", "timeout" or
/// "accepted N" (N bytes read within a second).
const ATTACKER: &str = r#"
import socket, sys
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
    s.settimeout(1)
    try:
        n = len(s.recv(65536))
    except Exception:
        n = 0
    print("accepted", n, flush=True)
"#;

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

/// The destination's configuration line: an agent of the previous peer protocol.
const OLDER_PEER: &str = "peer_protocol = [1, 3]";

fn attack(lab: &Lab, addr: &str, id: &str) {
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
    let agent_pid = lab.nodes[0].agent.as_ref().expect("agent 0").id();
    let src_ip: Ipv4Addr = lab.nodes[0].ip.parse().expect("node ip");
    let before = listeners(agent_pid);

    let mut attacker = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.client_ns,
            "python3",
            "-u",
            "-c",
            ATTACKER,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("attacker");
    let mut to_attacker = attacker.stdin.take().expect("stdin");
    let from_attacker = attacker.stdout.take().expect("stdout");
    let done = Arc::new(AtomicBool::new(false));
    let watch_done = done.clone();
    // Polls the source's sockets every millisecond; the first new listener on the node address
    // is the lazy page server. Once the attacker answered, that listener must still be there:
    // then a refusal came from the guard, not from CRIU having accepted the destination already.
    let watcher = std::thread::spawn(move || {
        while !watch_done.load(Ordering::Relaxed) {
            if let Some(l) = listeners(agent_pid)
                .into_iter()
                .find(|l| l.0 == src_ip && !before.contains(l))
            {
                writeln!(to_attacker, "{} {}", l.0, l.1).expect("tell the attacker");
                let answer = BufReader::new(from_attacker)
                    .lines()
                    .next()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let still = listeners(agent_pid).contains(&l);
                return Some((l.1, answer, still));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    });

    let rec = c0
        .migrate(id, &lab.nodes[1].name, MigrationMode::PostCopy)
        .unwrap_or_else(|e| {
            panic!(
                "migration failed: {e}\n--- n0\n{}\n--- n1\n{}",
                lab.log(0),
                lab.log(1)
            )
        });
    done.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("watcher");
    let (port, answer, still_listening) = seen.unwrap_or_else(|| {
        panic!(
            "the attacker never saw the lazy page server listen\n{}",
            lab.log(0)
        )
    });
    eprintln!(
        "{id}: attacker on lazy port {port}: {answer} (listener still up afterwards: \
         {still_listening}); {}",
        summary(&rec)
    );
    assert!(
        still_listening,
        "the attacker came after CRIU's accept: the test proved nothing"
    );
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    assert_eq!(rec.mode, Some(MigrationMode::PostCopy));
    assert!(
        answer == "reset" || answer == "refused",
        "the stranger reached the lazy page server: {answer}"
    );
    assert!(
        probe.advance(20, Duration::from_secs(20)),
        "client stalled after the move"
    );
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    let mut c1 = lab.client(1);
    assert_eq!(
        c1.container(id).expect("on n1").state,
        ContainerState::Running
    );
    let _ = attacker.kill();
    let _ = attacker.wait();
    // The guard goes once CRIU's single accept happened.
    let gone = Instant::now() + Duration::from_secs(10);
    let table = format!("rebalancer_lazy_{port}");
    loop {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.nodes[0].netns,
                "nft",
                "list",
                "tables",
            ])
            .output()
            .expect("nft");
        if !String::from_utf8_lossy(&out.stdout).contains(&table) {
            break;
        }
        assert!(Instant::now() < gone, "{table} outlived the migration");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c1.call(&Request::KillContainer {
        id: id.into(),
        signal: 9,
    });
}

#[test]
#[ignore = "needs root, CRIU 4.2 with GnuTLS, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn a_stranger_on_the_lazy_port_is_reset_and_the_move_completes() {
    let lab = Lab::with_config(13, 2, vec![String::new(), OLDER_PEER.into()]);
    attack(&lab, "198.19.29.10", "lz1");
}

#[test]
#[ignore = "needs root, CRIU 4.2 with GnuTLS, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn a_stranger_on_a_plain_lazy_port_is_reset_and_the_move_completes() {
    let off = "encrypt_memory = false".to_string();
    let lab = Lab::with_config(13, 2, vec![off.clone(), format!("{off}\n{OLDER_PEER}")]);
    attack(&lab, "198.19.29.11", "lz2");
}
