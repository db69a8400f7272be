//! The controller ↔ agent control plane over TCP (issue #13 item 1, issue #11 attack test 6):
//! `rebalancerd` runs in its own network namespace of the lab and knows the agents only by
//! their TCP control ports; both sides prove themselves with connection-bound munge
//! credentials. Block [rbk] of the network plan: nodes 198.18.52.0/24, containers
//! 198.19.52.0/24.
//!
//! The agent binary is taken from the same target directory, or from `REBALANCER_AGENT_BIN`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rebalancer_proto::auth::{Binding, CONTROL_DOMAIN};
use rebalancer_proto::channel::{Channel, ChannelConfig};
use rebalancer_proto::control::{ControlReply, ControlRequest, MigrateTarget};
use rebalancer_proto::frame::{Frame, FrameKind};
use rebalancer_proto::*;

mod common;
use common::*;
use rebalancer_testkit::{NetLab, NetPlan, TcpProbe};

const P: &str = "rbk";
const NET: &str = "198.18.52";
const SUBNET: &str = "198.19.52.0/24";
const CONTROL_PORT: u16 = 7879;

struct Lab {
    dir: PathBuf,
    agents: Vec<Child>,
    net: NetLab,
}

impl Lab {
    /// Two agents with a TCP control listener each; `control` is extra `[control]` lines.
    fn up(control: &str) -> Lab {
        let dir = PathBuf::from(format!("/tmp/{P}-tcp-lab"));
        let net = NetLab::up(NetPlan {
            prefix: P.into(),
            block: 52,
            subnet: SUBNET.into(),
            nodes: 2,
            dir: dir.clone(),
        });
        let mut lab = Lab {
            dir: dir.clone(),
            agents: vec![],
            net,
        };
        let d = dir.display();
        let munge = lab.net.munge_socket();
        let munge = munge.display();
        for i in 0..2 {
            let o = 1 - i;
            let cfg = dir.join(format!("node{i}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "node = \"{P}n{i}\"\nlisten = \"{NET}.{ip}:7878\"\ncontrol_socket = \"{d}/{P}n{i}.sock\"\ncontainer_subnet = \"{SUBNET}\"\n\
                     state_dir = \"{d}/node{i}/state\"\nrun_dir = \"{d}/node{i}/run\"\nmigration_timeout_ms = 30000\n\
                     [auth]\nmethod = \"munge\"\nmunge_socket = \"{munge}\"\n[peers]\n{P}n{o} = \"{NET}.{oip}:7878\"\n\
                     [control]\nlisten = \"{NET}.{ip}:{CONTROL_PORT}\"\n{control}\n",
                    ip = 10 + i,
                    oip = 10 + o
                ),
            )
            .expect("agent config");
            let log = dir.join(format!("node{i}.log"));
            lab.agents
                .push(spawn_agent(&format!("{P}n{i}"), &cfg, &log));
        }
        for i in 0..2 {
            wait_agent(&lab.sock(i), &format!("node{i}"), || {
                lab.log(&format!("node{i}.log"))
            });
        }
        lab
    }

    fn sock(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{P}n{i}.sock"))
    }

    /// A daemon's log without its colour codes.
    fn log(&self, name: &str) -> String {
        let raw = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters final-letter
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Starts rebalancerd in the client namespace: its agents are TCP addresses only.
    fn controller(&self, extra: &str) -> KillOnDrop {
        let d = self.dir.display();
        let munge = self.net.munge_socket();
        let config = format!(
            "[controller]\nsocket = \"{d}/ctl.sock\"\njournal = \"{d}/journal.redb\"\npolicies = \"{d}/policies\"\n{extra}\n\
             [slurm]\nenabled = false\n\
             [agents]\nname = \"admin\"\nmunge_socket = \"{}\"\npoll_interval_ms = 500\n\
             nodes.{P}n0 = {{ address = \"{NET}.10:{CONTROL_PORT}\" }}\n\
             nodes.{P}n1 = {{ address = \"{NET}.11:{CONTROL_PORT}\" }}\n\
             [migration]\ntimeout_s = 60\n",
            munge.display()
        );
        // What the test claims: the controller is given no agent socket at all.
        assert!(
            !config.contains("socket_template") && !config.contains(&format!("{P}n0.sock")),
            "{config}"
        );
        std::fs::create_dir_all(self.dir.join("policies")).expect("policies");
        std::fs::write(self.dir.join("rebalancerd.toml"), config).expect("config");
        let log = std::fs::File::create(self.dir.join("rebalancerd.log")).expect("log");
        KillOnDrop(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.net.client_ns))
                .arg(env!("CARGO_BIN_EXE_rebalancerd"))
                .arg("--config")
                .arg(self.dir.join("rebalancerd.toml"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("rebalancerd"),
        )
    }

    fn munge(&self, payload: &str, as_nobody: bool) -> String {
        let sock = self.net.munge_socket();
        let pre = if as_nobody {
            "setpriv --reuid=65534 --regid=65534 --clear-groups "
        } else {
            ""
        };
        let out = sh(&format!(
            "printf %s '{payload}' | {pre}munge --socket {}",
            sock.display()
        ));
        assert!(out.status.success(), "munge: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

fn wait_for<T>(
    what: &str,
    limit: Duration,
    logs: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}:\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
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
    }
    .payload()
    .expect("payload")
}

#[test]
#[ignore = "needs root, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn the_tcp_control_port_refuses_all_but_an_authenticated_controller() {
    let lab = Lab::up("");
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
    let cred = lab.munge(&payload("rbkn1", &n), false);
    let e = refused(&authenticate(&mut ch, Some(cred)));
    assert!(e.message.contains("for rbkn1, this is rbkn0"), "{e}");

    // A valid credential captured on one connection, replayed on another one.
    let ch1 = tcp_hello(&addr, Role::Controller).expect("hello");
    let captured = lab.munge(&payload("rbkn0", &nonce_of(&ch1)), false);
    drop(ch1);
    let mut ch2 = tcp_hello(&addr, Role::Controller).expect("hello");
    let e = refused(&authenticate(&mut ch2, Some(captured)));
    assert!(e.message.contains("another connection"), "{e}");

    // Right node and connection, but not root (nor any uid in controller_uids).
    let mut ch = tcp_hello(&addr, Role::Controller).expect("hello");
    let cred = lab.munge(&payload("rbkn0", &nonce_of(&ch)), true);
    let e = refused(&authenticate(&mut ch, Some(cred)));
    assert!(e.message.contains("uid 65534"), "{e}");

    // After a refusal the connection is closed: nothing more is served on it.
    assert!(ch.call::<Response>(&Request::ListContainers).is_err());

    // The real thing: root's credential for this node and connection.
    let mut ch = tcp_hello(&addr, Role::Controller).expect("hello");
    let cred = lab.munge(&payload("rbkn0", &nonce_of(&ch)), false);
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
    let lab = Lab::up("");
    let created = agent_call(
        &lab.sock(0),
        &Request::CreateContainer {
            spec: server("j41.s0.t0", 41, "198.19.52.41"),
        },
    );
    assert!(created.is_ok(), "{created:?}\n{}", lab.log("node0.log"));
    let probe = TcpProbe::start(Some(&lab.net.client_ns), "198.19.52.41");
    probe.wait_answers(20, "the server answers before the move");
    let _ctl = lab.controller("");
    let ctl = lab.dir.join("ctl.sock");
    let logs = || format!("{}\n{}", lab.log("rebalancerd.log"), lab.log("node0.log"));

    // Containers, metrics and capabilities come over TCP.
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
                containers.iter().any(|c| c.id == "j41.s0.t0").then_some(())
            }
            _ => None,
        },
    );
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
    let lab = Lab::up("hello_timeout_s = 4\nidle_timeout_s = 8\nmax_connections = 512\n");
    let created = agent_call(
        &lab.sock(0),
        &Request::CreateContainer {
            spec: server("j42.s0.t0", 42, "198.19.52.42"),
        },
    );
    assert!(created.is_ok(), "{created:?}\n{}", lab.log("node0.log"));
    let probe = TcpProbe::start(Some(&lab.net.client_ns), "198.19.52.42");
    probe.wait_answers(20, "the server answers before the move");
    let _ctl = lab.controller("max_connections = 256\n");
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
    let t = closed_within(idle_local, Duration::from_secs(15));
    println!("agent socket: idle connections closed after {t:?}");
    let t = closed_within(idle_tcp, Duration::from_secs(15));
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
