//! Attack test 3 against real agents (issue #11; the unit form is in `auth.rs`). Three lab
//! agents; the attacker is root in the lab's namespaces but holds no munge key of its own use:
//! it only relays what agents send.
//!
//! 1. It captures rbt8n1's genuine hello credential (it greets n1 as "rbt8n0" with its own
//!    nonce) and replays it to rbt8n2 as the `authenticate` of a connection claiming to be
//!    n1: refused (the credential is for another node and another connection).
//! 2. A fake destination that answers n0's hello without a credential: the migration is refused
//!    and the job keeps running on n0.
//! 3. A fake destination that relays to rbt8n2 (so n0 receives n2's genuine credential, bound
//!    to n0's nonce, and authenticates to n2 for real) while n0 meant to reach n1: refused,
//!    the job keeps running.

mod common;
use common::*;
use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind};
use rebalancer_proto::peer::{PeerRequest, PeerResponse};
use rebalancer_proto::*;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Runs `f` on a thread that joined network namespace `ns` (setns affects only that thread).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on an open namespace file changes only this thread's network namespace.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

fn hello_v2(node: &str, nonce: &str, credential: Option<String>) -> Hello {
    let mut h = Hello::new(Role::Agent, "attacker").with_versions(VersionRange::new(2, 2));
    h.node = Some(node.into());
    h.nonce = Some(nonce.into());
    h.credential = credential;
    h
}

fn send<T: serde::Serialize>(s: &mut TcpStream, kind: FrameKind, id: u32, v: &T) {
    write_frame(s, &Frame::json(kind, id, v).expect("frame")).expect("write");
}

/// Greets the agent at `addr` as `claim` with `nonce`; returns its hello.
fn greet(addr: &str, claim: &str, nonce: &str) -> (TcpStream, Hello) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    send(&mut s, FrameKind::Hello, 0, &hello_v2(claim, nonce, None));
    let f = read_frame(&mut s, 1 << 20).expect("hello back");
    let h: Hello = f.decode(FrameKind::Hello, "hello").expect("a hello");
    (s, h)
}

/// A one-shot fake destination on `listen` (inside `ns`): reads the source's hello and answers
/// with `answer(source hello)`; returns what the source sent next (its error, if any).
fn fake_destination(
    ns: &str,
    listen: String,
    answer: impl FnOnce(&Hello) -> Hello + Send + 'static,
) -> std::thread::JoinHandle<String> {
    let ns = ns.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let l = TcpListener::bind(&listen).expect("bind fake destination");
            let _ = ready_tx.send(());
            let (mut s, _) = l.accept().expect("source connects");
            s.set_read_timeout(Some(Duration::from_secs(15)))
                .expect("timeout");
            let f = read_frame(&mut s, 1 << 20).expect("source hello");
            let theirs: Hello = f.decode(FrameKind::Hello, "hello").expect("a hello");
            send(&mut s, FrameKind::Hello, 0, &answer(&theirs));
            // Accept the source's proof, so that only its own checks can stop it.
            loop {
                let f = match read_frame(&mut s, 1 << 20) {
                    Ok(f) => f,
                    Err(e) => return format!("closed: {e}"),
                };
                match f.decode::<PeerRequest>(FrameKind::Request, "request") {
                    Ok(PeerRequest::Authenticate { .. }) => send(
                        &mut s,
                        FrameKind::Response,
                        f.header.id,
                        &PeerResponse::Ok(rebalancer_proto::peer::PeerReply::Authenticated {
                            credential: None,
                        }),
                    ),
                    other => {
                        return format!(
                            "{:?} {other:?}: {}",
                            f.header.kind,
                            String::from_utf8_lossy(&f.payload)
                        )
                    }
                }
            }
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("fake destination listening");
    h
}

/// A fake destination on `listen` (inside `ns`) that pipes one connection to `upstream`, a
/// real agent. Returns the bytes relayed each way (source → upstream, upstream → source).
fn relay(ns: &str, listen: String, upstream: String) -> std::thread::JoinHandle<(u64, u64)> {
    let ns = ns.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let l = TcpListener::bind(&listen).expect("bind relay");
            let _ = ready_tx.send(());
            let (src, _) = l.accept().expect("source connects");
            let up = TcpStream::connect(&upstream).expect("connect upstream");
            let (mut a, mut b) = (
                src.try_clone().expect("clone"),
                up.try_clone().expect("clone"),
            );
            let there = std::thread::spawn(move || {
                let n = std::io::copy(&mut a, &mut b).unwrap_or(0);
                let _ = b.shutdown(std::net::Shutdown::Write);
                n
            });
            let (mut up_r, mut src_w) = (up, src);
            let back = std::io::copy(&mut up_r, &mut src_w).unwrap_or(0);
            let _ = src_w.shutdown(std::net::Shutdown::Both);
            let _ = up_r.shutdown(std::net::Shutdown::Both);
            (there.join().unwrap_or(0), back)
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("relay listening");
    h
}

fn migrate_to(lab: &Lab, id: &str, dest: &str, addr: &str) -> Result<MigrationRecord, ErrorReply> {
    let req = Request::Migrate {
        request: MigrateRequest {
            container: id.into(),
            destination: dest.into(),
            destination_addr: Some(addr.into()),
            mode: MigrationMode::StopAndCopy,
            max_downtime_ms: None,
            timeout_ms: None,
        },
        watch: true,
    };
    match lab.client(0).call(&req)? {
        Reply::Migration { migration } => Ok(migration),
        other => panic!("unexpected {other:?}"),
    }
}

fn still_runs_on_n0(lab: &Lab, id: &str, probe: &TcpProbe, after: &str) {
    let info = lab.client(0).container(id).expect("still on n0");
    assert_eq!(info.state, ContainerState::Running, "after {after}");
    assert!(
        probe.advance(10, Duration::from_secs(10)),
        "the job stopped answering after {after}"
    );
}

#[test]
#[ignore = "needs root, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn replayed_and_relayed_credentials_are_refused_and_the_job_stays() {
    let lab = Lab::new(8, 3);
    let n: Vec<(String, String)> = lab
        .nodes
        .iter()
        .map(|x| (x.name.clone(), format!("{}:{}", x.ip, x.port)))
        .collect();
    let (n0, n1, n2) = (n[0].0.clone(), n[1].0.clone(), n[2].0.clone());

    // 1. Capture n1's credential (for "n0", nonce X) and replay it to n2 as "n1".
    let (n1_addr, n2_addr) = (n[1].1.clone(), n[2].1.clone());
    let (c0, c1, c2) = (n0.clone(), n1.clone(), n2.clone());
    let refused = in_netns(&lab.nodes[0].netns, move || {
        let (_s1, h1) = greet(&n1_addr, &c0, "0123456789abcdef0123456789abcdef");
        let captured = h1.credential.expect("n1 answers with a credential");
        let (mut s2, h2) = greet(&n2_addr, &c1, "fedcba9876543210fedcba9876543210");
        assert_eq!(h2.node.as_deref(), Some(c2.as_str()));
        send(
            &mut s2,
            FrameKind::Request,
            1,
            &PeerRequest::Authenticate {
                credential: Some(captured),
            },
        );
        let f = read_frame(&mut s2, 1 << 20).expect("n2 answers");
        let r: PeerResponse = f.decode(FrameKind::Response, "response").expect("response");
        format!("{r:?}")
    });
    eprintln!("replayed credential: {refused}");
    assert!(
        refused.contains("PermissionDenied") || refused.contains("permission"),
        "{refused}"
    );
    assert!(refused.contains("replayed"), "{refused}");

    let mut c = lab.client(0);
    c.call(&Request::CreateContainer {
        spec: server_spec("hr1", "198.19.24.10", 16),
    })
    .expect("create");
    let probe = TcpProbe::start(&lab.client_ns, "198.19.24.10");
    assert!(
        probe.advance(20, Duration::from_secs(60)),
        "no answers\n{}",
        lab.log(0)
    );

    // 2. A destination that answers without a credential.
    let fake = format!("{}:7979", lab.nodes[2].ip);
    let n1c = n1.clone();
    let server = fake_destination(&lab.nodes[2].netns, fake.clone(), move |_| {
        hello_v2(&n1c, "00000000000000000000000000000000", None)
    });
    let e = migrate_to(&lab, "hr1", &n1, &fake).expect_err("no credential");
    eprintln!("destination without a credential: {e:?}");
    let shown = format!("{e:?}");
    assert!(shown.contains("no munge credential"), "{shown}");
    let _ = server.join();
    still_runs_on_n0(&lab, "hr1", &probe, "the credential-less destination");

    // 3. A fake n1 that relays to n2: n0 gets n2's genuine hello and credential (bound to n0's
    //    nonce), authenticates to n2 for real, and must still refuse: it meant n1.
    let fake = format!("{}:7980", lab.nodes[2].ip);
    let server = relay(&lab.nodes[2].netns, fake.clone(), n[2].1.clone());
    let e = migrate_to(&lab, "hr1", &n1, &fake).expect_err("another node's credential");
    let relayed = server.join().expect("relay");
    eprintln!("destination relaying another node: {e:?} (relayed {relayed:?} bytes)");
    let shown = format!("{e:?}");
    assert!(shown.contains("PermissionDenied"), "{shown}");
    assert!(
        shown.contains(&format!("proved it is node {n2}, not {n1}")),
        "{shown}"
    );
    assert!(
        relayed.0 > 0 && relayed.1 > 0,
        "nothing went through the relay"
    );
    still_runs_on_n0(&lab, "hr1", &probe, "the relaying destination");

    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    let _ = lab.client(0).call(&Request::KillContainer {
        id: "hr1".into(),
        signal: 9,
    });
}
