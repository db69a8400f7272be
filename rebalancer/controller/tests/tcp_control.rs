//! The controller ↔ agent control plane over TCP (issue #13 item 1, issue #11 attack test 6):
//! `rebalancerd` runs on the admin host of the common `Lab` (nodes isolated like machines: own
//! network, mount and UTS namespaces, /run and munged) and knows the agents only by their TCP
//! control ports; both sides prove themselves with connection-bound munge credentials. Block [rbk] of the network plan: nodes 198.18.52.0/24, containers
//! 198.19.52.0/24.
//!
//! The agent binary is taken from the same target directory, or from `REBALANCER_AGENT_BIN`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rebalancer_proto::auth::{Binding, CONTROL_DOMAIN};
use rebalancer_proto::channel::{Channel, ChannelConfig};
use rebalancer_proto::control::{ControlReply, ControlRequest, MigrateTarget};
use rebalancer_proto::frame::{Frame, FrameKind};
use rebalancer_proto::*;

mod common;
use common::lab::{ADMIN, CONTROL_PORT};
use common::*;
use rebalancer_testkit::TcpProbe;

const P: &str = "rbk";
const NET: &str = "198.18.52";

/// The lab: two isolated nodes with a TCP control listener each; `control` is extra
/// `[control]` lines.
fn lab_up(control: &str) -> Lab {
    LabPlan::new(P, 52).control_config(control).up()
}

/// Starts rebalancerd on the admin host: its agents are TCP addresses only.
fn controller(lab: &Lab, extra: &str) -> KillOnDrop {
    controller_as(lab, "", extra, &lab.agents_toml())
}

/// As [`controller`], its files named with `tag` (ctl{tag}.sock, rebalancerd{tag}.log ...),
/// `agents` its `[agents]` lines after name and munge.
fn controller_as(lab: &Lab, tag: &str, extra: &str, agents: &str) -> KillOnDrop {
    lab.controller(ControllerPlan {
        tag,
        controller: extra,
        agents: "poll_interval_ms = 500",
        nodes: Some(agents),
        rest: "[migration]\ntimeout_s = 60\n",
        path: None,
    })
}

/// A munge credential from the admin host's munged.
fn munge(lab: &Lab, payload: &str, as_nobody: bool) -> String {
    lab.munge_on(ADMIN, payload, as_nobody)
}

/// A control call that tolerates a busy or not-yet-started controller.
fn try_ctl(sock: &Path, req: &ControlRequest) -> Result<ControlReply, String> {
    let s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    let cfg = ChannelConfig::default().call_timeout(Some(Duration::from_secs(20)));
    let mut ch =
        Channel::connect(s, cfg, Hello::new(Role::Cli, "tcp-test")).map_err(|e| e.to_string())?;
    let r: rebalancer_proto::control::ControlResponse = ch.call(req).map_err(|e| e.to_string())?;
    r.into_result().map_err(|e| e.to_string())
}

/// Waits until the controller at `ctl` lists container `id` (20 s).
fn wait_listed(ctl: &Path, id: &str, logs: impl Fn() -> String) {
    wait_for(
        &format!("the controller never listed container {id}"),
        Duration::from_secs(20),
        logs,
        || match try_ctl(
            ctl,
            &ControlRequest::ShowContainers {
                id: None,
                job_id: None,
            },
        ) {
            Ok(ControlReply::Containers { containers }) => {
                containers.iter().any(|c| c.id == id).then_some(())
            }
            _ => None,
        },
    );
}

/// Opens a TCP control connection as a controller would and returns it after the hellos.
fn tcp_hello(addr: &str, role: Role) -> Result<Channel<TcpStream>, ProtoError> {
    let s = TcpStream::connect(addr)?;
    let mut hello = Hello::new(role, "tcp-test");
    hello.node = Some("admin".into());
    let cfg = ChannelConfig::default().call_timeout(Some(Duration::from_secs(10)));
    Channel::connect(s, cfg, hello)
}

fn authenticate(ch: &mut Channel<TcpStream>, credential: Option<String>) -> Response {
    ch.call(&Request::Authenticate {
        credential,
        nonce: rebalancer_proto::auth::nonce(),
    })
    .expect("an answer to authenticate")
}

fn refused(r: &Response) -> ErrorReply {
    match r {
        Response::Error(e) => e.clone(),
        other => panic!("accepted: {other:?}"),
    }
}

fn payload(to: &str, nonce: &str) -> String {
    Binding {
        domain: CONTROL_DOMAIN,
        from: "admin".into(),
        to: to.into(),
        nonce: nonce.into(),
        session: None,
        offer: None,
    }
    .payload()
    .expect("payload")
}

#[test]
#[ignore = "needs root, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn the_tcp_control_port_refuses_all_but_an_authenticated_controller() {
    let lab = lab_up("");
    let addr = format!("{NET}.10:{CONTROL_PORT}");
    let nonce_of = |ch: &Channel<TcpStream>| {
        let h = &ch.negotiated().peer;
        assert_eq!(h.node.as_deref(), Some("rbkn0"));
        h.nonce.clone().expect("the agent's hello carries a nonce")
    };

    // Not the controller's role.
    let e = match tcp_hello(&addr, Role::Cli) {
        Err(ProtoError::Refused(e)) => e,
        other => panic!("a CLI hello was not refused: {other:?}"),
    };
    assert_eq!(e.code, ErrorCode::PermissionDenied);
    assert!(e.message.contains("serves the controller only"), "{e}");

    // A request before authenticate.
    let mut ch = tcp_hello(&addr, Role::Controller).expect("hello");
    let r: Response = ch.call(&Request::ListContainers).expect("answer");
    let e = refused(&r);
    assert!(e.message.contains("must be authenticate"), "{e}");

    // No credential.
    let mut ch = tcp_hello(&addr, Role::Controller).expect("hello");
    let e = refused(&authenticate(&mut ch, None));
    assert_eq!(e.code, ErrorCode::PermissionDenied);
    assert!(e.message.contains("no munge credential"), "{e}");

    // A credential for another node, bound to this connection.
    let mut ch = tcp_hello(&addr, Role::Controller).expect("hello");
    let n = nonce_of(&ch);
    let cred = munge(&lab, &payload("rbkn1", &n), false);
    let e = refused(&authenticate(&mut ch, Some(cred)));
    assert!(e.message.contains("for rbkn1, this is rbkn0"), "{e}");

    // A valid credential captured on one connection, replayed on another one.
    let ch1 = tcp_hello(&addr, Role::Controller).expect("hello");
    let captured = munge(&lab, &payload("rbkn0", &nonce_of(&ch1)), false);
    drop(ch1);
    let mut ch2 = tcp_hello(&addr, Role::Controller).expect("hello");
    let e = refused(&authenticate(&mut ch2, Some(captured)));
    assert!(e.message.contains("another connection"), "{e}");

    // Right node and connection, but not root (nor any uid in controller_uids).
    let mut ch = tcp_hello(&addr, Role::Controller).expect("hello");
    let cred = munge(&lab, &payload("rbkn0", &nonce_of(&ch)), true);
    let e = refused(&authenticate(&mut ch, Some(cred)));
    assert!(e.message.contains("uid 65534"), "{e}");

    // After a refusal the connection is closed: nothing more is served on it.
    assert!(ch.call::<Response>(&Request::ListContainers).is_err());

    // The real thing: root's credential for this node and connection.
    let mut ch = tcp_hello(&addr, Role::Controller).expect("hello");
    let cred = munge(&lab, &payload("rbkn0", &nonce_of(&ch)), false);
    match authenticate(&mut ch, Some(cred)) {
        Response::Ok(Reply::Authenticated { credential }) => {
            assert!(credential.is_some_and(|c| c.starts_with("MUNGE:")))
        }
        other => panic!(
            "root's credential refused: {other:?}\n{}",
            lab.log("node0.log")
        ),
    }
    let r: Response = ch.call(&Request::Capabilities).expect("capabilities");
    assert!(
        matches!(r, Response::Ok(Reply::Capabilities { .. })),
        "{r:?}"
    );
    // Task requests need the local socket's peer credentials, even from the controller.
    let r: Response = ch
        .call(&Request::TaskExited {
            container: "j1.s0.t0".into(),
            wait_status: 0,
        })
        .expect("answer");
    assert!(
        refused(&r).message.contains("local control socket only"),
        "{r:?}"
    );
    let log = lab.log("node0.log");
    assert!(log.contains("TCP control connection refused"), "{log}");
    assert!(log.contains("controller authenticated"), "{log}");
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn a_controller_with_tcp_agents_only_migrates_a_container() {
    let lab = lab_up("");
    let created = agent_call(
        &lab.sock(0),
        &Request::CreateContainer {
            spec: server("j41.s0.t0", 41, "198.19.52.41"),
        },
    );
    assert!(created.is_ok(), "{created:?}\n{}", lab.log("node0.log"));
    let probe = TcpProbe::start(Some(&lab.net.client_ns), "198.19.52.41");
    probe.wait_answers(20, "the server answers before the move");
    let _ctl = controller(&lab, "");
    let ctl = lab.dir.join("ctl.sock");
    let logs = || format!("{}\n{}", lab.log("rebalancerd.log"), lab.log("node0.log"));

    // Containers, metrics and capabilities come over TCP.
    wait_listed(&ctl, "j41.s0.t0", logs);
    let nodes = wait_for(
        "nodes without metrics",
        Duration::from_secs(20),
        logs,
        || match try_ctl(&ctl, &ControlRequest::ShowNodes { name: None }) {
            Ok(ControlReply::Nodes { nodes })
                if nodes.len() == 2 && nodes.iter().all(|n| n.metrics.is_some()) =>
            {
                Some(nodes)
            }
            _ => None,
        },
    );
    println!(
        "nodes seen over TCP: {:?}",
        nodes.iter().map(|n| &n.name).collect::<Vec<_>>()
    );

    let started = Instant::now();
    let r = try_ctl(
        &ctl,
        &ControlRequest::Migrate {
            target: MigrateTarget::Container {
                id: "j41.s0.t0".into(),
            },
            destination: Some("rbkn1".into()),
            mode: None,
            watch: false,
        },
    );
    assert!(r.is_ok(), "{r:?}\n{}", logs());
    let entry = wait_for(
        "the migration did not end",
        Duration::from_secs(60),
        logs,
        || match try_ctl(
            &ctl,
            &ControlRequest::ShowMigrations {
                id: None,
                active: false,
            },
        ) {
            Ok(ControlReply::Migrations { migrations }) => migrations
                .into_iter()
                .find(|m| m.record.state.is_terminal()),
            _ => None,
        },
    );
    println!(
        "migration over the TCP control plane: {:?} in {:?}",
        entry.record.state,
        started.elapsed()
    );
    assert_eq!(
        entry.record.state,
        MigrationState::Succeeded,
        "{entry:?}\n{}",
        logs()
    );
    assert_eq!(
        (
            entry.record.source.as_str(),
            entry.record.destination.as_str()
        ),
        ("rbkn0", "rbkn1")
    );
    probe.reset_gap();
    let before = probe.state().0;
    probe.wait_answers(before + 20, "answers after the move");
    assert!(
        probe.state().1.is_empty(),
        "client errors: {:?}",
        probe.state().1
    );
    match agent_call(
        &lab.sock(1),
        &Request::GetContainer {
            id: "j41.s0.t0".into(),
        },
    ) {
        Ok(Reply::Container { container }) => assert_eq!(container.state, ContainerState::Running),
        other => panic!("not on node1: {other:?}"),
    }
    // Both agents saw the controller authenticate over TCP.
    for i in 0..2 {
        let log = lab.log(&format!("node{i}.log"));
        assert!(
            log.contains("controller authenticated on the TCP control port"),
            "node{i}: {log}"
        );
        assert!(log.contains("controller=admin"), "node{i}: {log}");
    }
}

/// Whether a marker the controller reads from an agent crosses the TCP control connection in
/// clear: a container named with the marker lives on node 0, and the controller (its
/// `[agents]` extra lines `protocol`) reaches node 0 through a recording proxy in its own
/// namespace. The container's address is 198.19.52.OCTET. Returns (marker seen, bytes
/// recorded, the agent's log line of that controller).
fn control_marker_in_clear(
    lab: &Lab,
    tag: &str,
    octet: u8,
    protocol: &str,
) -> (bool, usize, String) {
    let marker = format!("rbkmark{tag}{}", &rebalancer_proto::auth::nonce()[..12]);
    let mut spec = server(&marker, 45, &format!("198.19.52.{octet}"));
    spec.argv = vec!["sleep".into(), "600".into()];
    let created = agent_call(&lab.sock(0), &Request::CreateContainer { spec });
    assert!(created.is_ok(), "{created:?}\n{}", lab.log("node0.log"));
    let (port, seen) = rebalancer_testkit::recording_proxy(
        Some(&lab.net.client_ns),
        &format!("{NET}.10:{CONTROL_PORT}"),
    );
    let _ctl = controller_as(
        lab,
        tag,
        "",
        &format!(
            "{protocol}\nnodes.{P}n0 = {{ address = \"127.0.0.1:{port}\" }}\n\
             nodes.{P}n1 = {{ address = \"{NET}.11:{CONTROL_PORT}\" }}\n"
        ),
    );
    let ctl = lab.dir.join(format!("ctl{tag}.sock"));
    let logs = || {
        format!(
            "{}\n{}",
            lab.log(&format!("rebalancerd{tag}.log")),
            lab.log("node0.log")
        )
    };
    // The controller lists the container: its id has crossed the proxied connection.
    wait_listed(&ctl, &marker, logs);
    let bytes = seen.lock().unwrap_or_else(|p| p.into_inner()).len();
    let line = lab
        .log("node0.log")
        .lines()
        .rfind(|l| l.contains("controller authenticated on the TCP control port"))
        .unwrap_or_default()
        .to_owned();
    let _ = agent_call(
        &lab.sock(0),
        &Request::KillContainer {
            id: marker.clone(),
            signal: 9,
        },
    );
    (
        rebalancer_testkit::recorded(&seen, marker.as_bytes()),
        bytes,
        line,
    )
}

#[test]
#[ignore = "needs root, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn a_marker_crosses_the_control_connection_in_clear_under_protocol_1_and_not_under_2() {
    let lab = lab_up("");
    let (clear, n, line) = control_marker_in_clear(&lab, "v1", 45, "control_protocol = [1, 1]");
    println!("control protocol 1: {n} bytes recorded; agent: {line}");
    assert!(
        clear,
        "under protocol 1 the container list should cross in clear (else the recording shows \
         nothing)\n{}",
        lab.log("node0.log")
    );
    assert!(
        line.contains("version=1") && line.contains("encrypted=false"),
        "{line}"
    );
    assert!(
        lab.log("node0.log").contains(
            "TCP control protocol 1: the connection with the controller is not encrypted"
        ),
        "the agent does not log the unencrypted connection"
    );
    // The default: both ends speak 2, and it is chosen.
    let (clear, n, line) = control_marker_in_clear(&lab, "v2", 46, "");
    println!("control protocol 2: {n} bytes recorded; agent: {line}");
    assert!(n > 1000, "the proxy saw almost nothing: {n} bytes");
    assert!(
        !clear,
        "under protocol 2 the marker crossed the control connection in clear"
    );
    assert!(
        line.contains("version=2") && line.contains("encrypted=true"),
        "{line}"
    );
}

#[test]
#[ignore = "needs root, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn an_agent_that_requires_encryption_refuses_an_unencrypted_controller() {
    let lab = lab_up("tcp_protocol = [2, 2]");
    let addr = format!("{NET}.10:{CONTROL_PORT}");
    // A client of protocol 1 only (the channel's default versions): no common version.
    let e = match tcp_hello(&addr, Role::Controller) {
        Err(ProtoError::Refused(e)) => e,
        other => panic!("a protocol-1 controller was not refused: {other:?}"),
    };
    assert_eq!(e.code, ErrorCode::Version, "{e}");
    // rebalancerd limited to protocol 1 never sees the agent up; by default it does.
    let _old = controller_as(
        &lab,
        "old",
        "",
        &format!("control_protocol = [1, 1]\nnodes.{P}n0 = {{ address = \"{addr}\" }}\n"),
    );
    let _new = controller_as(
        &lab,
        "new",
        "",
        &format!("nodes.{P}n0 = {{ address = \"{addr}\" }}\n"),
    );
    let up = |tag: &str| match try_ctl(
        &lab.dir.join(format!("ctl{tag}.sock")),
        &ControlRequest::ShowNodes { name: None },
    ) {
        Ok(ControlReply::Nodes { nodes }) => nodes.iter().any(|n| n.metrics.is_some()),
        _ => false,
    };
    wait_for(
        "the default controller never reached the agent",
        Duration::from_secs(20),
        || lab.log("rebalancerdnew.log"),
        || up("new").then_some(()),
    );
    assert!(
        !up("old"),
        "a protocol-1 controller got the agent's metrics"
    );
    let log = lab.log("rebalancerdold.log");
    assert!(log.contains("no common protocol version"), "{log}");
}

/// Raises the open-file limit of this process (and so of the daemons it starts).
fn raise_nofile(n: u64) {
    must(&format!(
        "prlimit --pid {} --nofile={n}:{n}",
        std::process::id()
    ));
}

enum Flooded {
    /// Got an error reply at once.
    Busy(ErrorReply),
    /// Admitted: the connection waits for its hello.
    Admitted(Box<dyn ReadClose>),
}

trait ReadClose: Read + Send {
    fn set_timeout(&self, t: Duration);
}
impl ReadClose for UnixStream {
    fn set_timeout(&self, t: Duration) {
        let _ = self.set_read_timeout(Some(t));
    }
}
impl ReadClose for TcpStream {
    fn set_timeout(&self, t: Duration) {
        let _ = self.set_read_timeout(Some(t));
    }
}

/// Whether an idle connection is answered with a busy reply before `deadline`, or left waiting
/// (admitted: the server waits for its hello, or closed it when the hello was overdue).
fn classify(mut s: Box<dyn ReadClose>, deadline: Instant) -> Flooded {
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_timeout(left.max(Duration::from_millis(1)));
    let mut dec = rebalancer_proto::codec::Decoder::new(MAX_FRAME_LEN);
    match rebalancer_proto::codec::read_blocking(&mut dec, &mut s) {
        Ok(f) => match f.decode::<Response>(FrameKind::Response, "response") {
            Ok(Response::Error(e)) => Flooded::Busy(e),
            other => panic!("an idle connection got {other:?}"),
        },
        Err(_) => Flooded::Admitted(s),
    }
}

/// Opens `n` idle connections with `open`; returns the busy replies and the admitted ones.
fn flood(
    n: usize,
    open: impl Fn() -> Box<dyn ReadClose>,
) -> (Vec<ErrorReply>, Vec<Box<dyn ReadClose>>) {
    let opened: Vec<_> = (0..n).map(|_| open()).collect();
    // Time for the server to get through its accept queue (a debug build on a busy machine).
    let deadline = Instant::now() + Duration::from_secs(2);
    let (mut busy, mut admitted) = (vec![], vec![]);
    for s in opened {
        match classify(s, deadline) {
            Flooded::Busy(e) => busy.push(e),
            Flooded::Admitted(s) => admitted.push(s),
        }
    }
    (busy, admitted)
}

/// Waits until every admitted connection is closed by the server; returns how long it took.
fn closed_within(admitted: Vec<Box<dyn ReadClose>>, limit: Duration) -> Duration {
    let t = Instant::now();
    for mut s in admitted {
        s.set_timeout(limit);
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        assert!(
            t.elapsed() < limit,
            "a flood connection stayed open {:?}",
            t.elapsed()
        );
    }
    t.elapsed()
}

/// A client that sends a frame header one byte every 400 ms; returns when the server closed it.
fn slow_sender(mut s: impl Read + Write, limit: Duration) -> Duration {
    let f = Frame::json(FrameKind::Hello, 0, &Hello::new(Role::Controller, "slow")).expect("frame");
    let mut bytes = Vec::new();
    rebalancer_proto::frame::write_frame(&mut bytes, &f).expect("encode");
    let t = Instant::now();
    for b in bytes {
        if s.write_all(&[b]).is_err() {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(400));
        assert!(t.elapsed() < limit, "the slow sender was never cut off");
    }
    panic!(
        "the slow sender got its whole hello through in {:?}",
        t.elapsed()
    );
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn floods_of_idle_and_slow_connections_are_refused_while_a_migration_completes() {
    raise_nofile(16384);
    // The hello timeout outlasts the floods (1000 connections took up to 7 s under load): a
    // connection closed for its overdue hello frees a slot, and a slot freed during the flood
    // would be counted as a second admission.
    let lab = lab_up("hello_timeout_s = 15\nidle_timeout_s = 20\nmax_connections = 512\n");
    let created = agent_call(
        &lab.sock(0),
        &Request::CreateContainer {
            spec: server("j42.s0.t0", 42, "198.19.52.42"),
        },
    );
    assert!(created.is_ok(), "{created:?}\n{}", lab.log("node0.log"));
    let probe = TcpProbe::start(Some(&lab.net.client_ns), "198.19.52.42");
    probe.wait_answers(20, "the server answers before the move");
    let _ctl = controller(&lab, "max_connections = 256\n");
    let ctl = lab.dir.join("ctl.sock");
    let logs = || format!("{}\n{}", lab.log("rebalancerd.log"), lab.log("node0.log"));
    wait_for(
        "controller never saw the container",
        Duration::from_secs(20),
        logs,
        || match try_ctl(
            &ctl,
            &ControlRequest::ShowContainers {
                id: None,
                job_id: None,
            },
        ) {
            Ok(ControlReply::Containers { containers }) => {
                containers.iter().any(|c| c.id == "j42.s0.t0").then_some(())
            }
            _ => None,
        },
    );

    // Slow senders on all three, in the background.
    let slow: Vec<_> = [
        ("agent socket", lab.sock(0)),
        ("controller socket", ctl.clone()),
    ]
    .into_iter()
    .map(|(what, p)| {
        let s = UnixStream::connect(&p).expect("connect");
        std::thread::spawn(move || (what, slow_sender(s, Duration::from_secs(30))))
    })
    .chain(std::iter::once({
        let s = TcpStream::connect(format!("{NET}.10:{CONTROL_PORT}")).expect("connect");
        std::thread::spawn(move || ("agent TCP port", slow_sender(s, Duration::from_secs(30))))
    }))
    .collect();

    // 1000 idle connections on each, while the migration runs: the agent's floods start
    // first, the controller's once it accepted the migration.
    let sock0 = lab.sock(0);
    let local = std::thread::spawn(move || {
        flood(1000, || {
            Box::new(UnixStream::connect(&sock0).expect("connect")) as Box<dyn ReadClose>
        })
    });
    let tcp = format!("{NET}.10:{CONTROL_PORT}");
    let remote = std::thread::spawn(move || {
        flood(1000, || {
            Box::new(TcpStream::connect(&tcp).expect("connect")) as Box<dyn ReadClose>
        })
    });
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let r = try_ctl(
        &ctl,
        &ControlRequest::Migrate {
            target: MigrateTarget::Container {
                id: "j42.s0.t0".into(),
            },
            destination: Some("rbkn1".into()),
            mode: None,
            watch: false,
        },
    );
    assert!(r.is_ok(), "{r:?}\n{}", logs());
    let (busy_ctl, idle_ctl) = flood(1000, || {
        Box::new(UnixStream::connect(&ctl).expect("connect"))
    });
    let (busy_local, idle_local) = local.join().expect("agent socket flood");
    let (busy_tcp, idle_tcp) = remote.join().expect("agent TCP flood");
    println!(
        "flood sent after {:?}: agent socket {} admitted / {} busy, agent TCP {} / {}, controller {} / {}",
        started.elapsed(),
        idle_local.len(),
        busy_local.len(),
        idle_tcp.len(),
        busy_tcp.len(),
        idle_ctl.len(),
        busy_ctl.len()
    );
    // Root's connections: the totals apply (512 on the agent's socket, 256 on the
    // controller's); over TCP the per-address limit (8) comes first.
    assert!(
        idle_local.len() <= 512 && busy_local.len() >= 488,
        "{}",
        idle_local.len()
    );
    assert!(
        idle_tcp.len() <= 8 && busy_tcp.len() >= 992,
        "{}",
        idle_tcp.len()
    );
    assert!(
        idle_ctl.len() <= 256 && busy_ctl.len() >= 744,
        "{}",
        idle_ctl.len()
    );
    for e in busy_local.iter().chain(&busy_tcp).chain(&busy_ctl) {
        assert_eq!(e.code, ErrorCode::Busy, "{e}");
    }
    assert!(
        busy_tcp[0].message.contains("address 198.18.52.1"),
        "{}",
        busy_tcp[0]
    );

    // The admitted idle ones are closed once their hello is overdue.
    let t = closed_within(idle_local, Duration::from_secs(25));
    println!("agent socket: idle connections closed after {t:?}");
    let t = closed_within(idle_tcp, Duration::from_secs(25));
    println!("agent TCP port: idle connections closed after {t:?}");
    let t = closed_within(idle_ctl, Duration::from_secs(20));
    println!("controller socket: idle connections closed after {t:?}");
    for h in slow {
        let (what, t) = h.join().expect("slow sender");
        println!("{what}: slow sender cut off after {t:?}");
    }

    let entry = wait_for(
        "the migration did not end",
        Duration::from_secs(60),
        logs,
        || match try_ctl(
            &ctl,
            &ControlRequest::ShowMigrations {
                id: None,
                active: false,
            },
        ) {
            Ok(ControlReply::Migrations { migrations }) => migrations
                .into_iter()
                .find(|m| m.record.state.is_terminal()),
            _ => None,
        },
    );
    println!(
        "migration under the flood: {:?}, {:?} after it started",
        entry.record.state,
        started.elapsed()
    );
    assert_eq!(
        entry.record.state,
        MigrationState::Succeeded,
        "{entry:?}\n{}",
        logs()
    );
    probe.reset_gap();
    let before = probe.state().0;
    probe.wait_answers(before + 20, "answers after the move");
    assert!(
        probe.state().1.is_empty(),
        "client errors: {:?}",
        probe.state().1
    );
    // Served again once the flood is gone.
    assert!(agent_call(&lab.sock(0), &Request::Ping).is_ok());
    let log = lab.log("node0.log");
    assert!(log.contains("connection refused"), "{log}");
    assert!(
        lab.log("rebalancerd.log").contains("connection refused"),
        "{}",
        lab.log("rebalancerd.log")
    );
}
