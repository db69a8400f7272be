//! Bad requests get clear errors and change nothing; unauthenticated peers and unprivileged
//! local users are refused.

mod common;
use common::*;
use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind};
use rebalancer_proto::*;
use std::time::Duration;

fn migrate_req(
    id: &str,
    dest: &str,
    addr: Option<&str>,
    mode: MigrationMode,
    watch: bool,
) -> Request {
    Request::Migrate {
        request: MigrateRequest {
            container: id.into(),
            destination: dest.into(),
            destination_addr: addr.map(String::from),
            mode,
            max_downtime_ms: None,
            timeout_ms: None,
        },
        watch,
    }
}

fn expect_err(c: &mut Client, req: Request, code: ErrorCode, needle: &str) {
    let e = c.call(&req).expect_err("must fail");
    assert_eq!(e.code, code, "{e}");
    assert!(
        e.message.contains(needle),
        "message {:?} lacks {needle:?}",
        e.message
    );
}

/// Sends a hello and one request to a peer port without (or with a bad) credential.
fn raw_peer_hello(addr: &str, credential: Option<&str>) -> Response {
    let mut s = std::net::TcpStream::connect(addr).expect("connect peer port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut h = Hello::new(Role::Agent, "intruder");
    h.node = Some("rbt3n0".into());
    h.credential = credential.map(String::from);
    write_frame(
        &mut s,
        &Frame::json(FrameKind::Hello, 0, &h).expect("hello"),
    )
    .expect("send");
    let f = read_frame(&mut s, MAX_FRAME_LEN).expect("answer");
    assert_eq!(
        f.header.kind,
        FrameKind::Response,
        "an unauthenticated peer must not get a hello back"
    );
    // Whatever follows is ignored: the agent closed the connection.
    let _ = write_frame(
        &mut s,
        &Frame::json(
            FrameKind::Request,
            1,
            &serde_json::json!({"op": "capabilities"}),
        )
        .expect("req"),
    );
    assert!(
        read_frame(&mut s, MAX_FRAME_LEN).is_err(),
        "connection must be closed"
    );
    let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("json");
    serde_json::from_value(v).expect("response")
}

const UNPRIVILEGED_CLIENT: &str = r#"
import json, socket, struct, sys
def frame(kind, rid, obj):
    p = json.dumps(obj).encode()
    return struct.pack(">IHHII", 0x5352424C, 1, kind, len(p), rid) + p
def read(s):
    h = b""
    while len(h) < 16:
        h += s.recv(16 - len(h))
    n = struct.unpack(">IHHII", h)[3]
    p = b""
    while len(p) < n:
        p += s.recv(n - len(p))
    return json.loads(p)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(frame(1, 0, {"protocol": 1, "software": "t", "role": "cli"}))
read(s)
s.sendall(frame(2, 1, json.loads(sys.argv[2])))
print(json.dumps(read(s)))
"#;

fn as_nobody(sock: &std::path::Path, req: &Request) -> serde_json::Value {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            UNPRIVILEGED_CLIENT,
        ])
        .arg(sock)
        .arg(serde_json::to_string(req).expect("json"))
        .output()
        .expect("setpriv");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json answer")
}

/// Waits until container `id` has ended on the agent (killed and reaped, or gone).
fn wait_ended(c: &mut Client, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match c.container(id) {
            Err(e) if e.code == ErrorCode::NotFound => return,
            Ok(info) if info.state == ContainerState::Exited => return,
            other => assert!(
                std::time::Instant::now() < deadline,
                "{id} still there: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn bad_requests_fail_cleanly_and_change_nothing() {
    let lab = Lab::new(3, 2);
    let (n0, n1) = (lab.nodes[0].name.clone(), lab.nodes[1].name.clone());
    let addr = "198.19.19.10";
    let mut c0 = lab.client(0);
    let mut c1 = lab.client(1);
    c0.call(&Request::CreateContainer {
        spec: server_spec("web", addr, 0),
    })
    .expect("create");
    let before = c0.container("web").expect("info");
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(probe.advance(20, Duration::from_secs(20)), "no answers");

    expect_err(
        &mut c0,
        migrate_req("nosuch", &n1, None, MigrationMode::StopAndCopy, true),
        ErrorCode::NotFound,
        "no container nosuch",
    );
    expect_err(
        &mut c0,
        migrate_req("web", &n0, None, MigrationMode::StopAndCopy, true),
        ErrorCode::BadRequest,
        "already runs on",
    );
    expect_err(
        &mut c0,
        migrate_req("web", "mars", None, MigrationMode::StopAndCopy, true),
        ErrorCode::BadRequest,
        "unknown destination node mars",
    );
    expect_err(
        &mut c0,
        migrate_req(
            "web",
            &n1,
            Some("198.18.19.99:7878"),
            MigrationMode::StopAndCopy,
            true,
        ),
        ErrorCode::Unreachable,
        "198.18.19.99:7878",
    );
    expect_err(
        &mut c0,
        migrate_req("web", &n1, None, MigrationMode::PreCopy, true),
        ErrorCode::Unsupported,
        "CONFIG_MEM_SOFT_DIRTY",
    );
    expect_err(
        &mut c0,
        Request::CreateContainer {
            spec: server_spec("web", "198.19.19.11", 0),
        },
        ErrorCode::Busy,
        "already exists",
    );
    // The destination already runs a container with that id: it refuses, nothing moves.
    c1.call(&Request::CreateContainer {
        spec: server_spec("web", "198.19.19.20", 0),
    })
    .expect("blocker");
    expect_err(
        &mut c0,
        migrate_req("web", &n1, None, MigrationMode::StopAndCopy, true),
        ErrorCode::Busy,
        "already runs on",
    );
    c1.call(&Request::KillContainer {
        id: "web".into(),
        signal: 9,
    })
    .expect("kill blocker");
    wait_ended(&mut c1, "web");

    // Already migrating: a second request while the first runs.
    c0.call(&Request::CreateContainer {
        spec: server_spec("big", "198.19.19.30", 300),
    })
    .expect("create big");
    // Its 300 MiB are filled before it listens: once it answers, a migration takes long
    // enough for a second request to find it running.
    let big = TcpProbe::start(&lab.client_ns, "198.19.19.30");
    assert!(
        big.advance(1, Duration::from_secs(60)),
        "big never answered: {:?}\n{}",
        big.stats.lock().map(|s| s.errors.clone()),
        lab.log(0)
    );
    drop(big.stop());
    let first = match c0
        .call(&migrate_req(
            "big",
            &n1,
            None,
            MigrationMode::StopAndCopy,
            false,
        ))
        .unwrap_or_else(|e| {
            panic!(
                "first migration refused: {e}\n--- n0\n{}\n--- n1\n{}",
                lab.log(0),
                lab.log(1)
            )
        }) {
        Reply::Migration { migration } => migration,
        other => panic!("{other:?}"),
    };
    expect_err(
        &mut c0,
        migrate_req("big", &n1, None, MigrationMode::StopAndCopy, true),
        ErrorCode::Busy,
        "already migrating",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let Reply::Migration { migration } = c0
            .call(&Request::GetMigration {
                id: first.id.clone(),
            })
            .expect("get")
        else {
            panic!()
        };
        if migration.state.is_terminal() {
            assert_eq!(
                migration.state,
                MigrationState::Succeeded,
                "{:?}",
                migration.error
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "first migration never ended"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Peers without a valid munge credential are refused before anything else.
    let peer = format!("{}:{}", lab.nodes[1].ip, lab.nodes[1].port);
    let r = raw_peer_hello(&peer, None)
        .into_result()
        .expect_err("refused");
    assert_eq!(r.code, ErrorCode::PermissionDenied, "{r}");
    let r = raw_peer_hello(&peer, Some("MUNGE:AwQDAAAforged:"))
        .into_result()
        .expect_err("refused");
    assert_eq!(r.code, ErrorCode::PermissionDenied, "{r}");

    // An unprivileged local user may not migrate and sees nobody else's containers.
    let v = as_nobody(
        &lab.nodes[0].socket,
        &migrate_req("web", &n1, None, MigrationMode::StopAndCopy, true),
    );
    assert_eq!(v["error"]["code"], "permission_denied", "{v}");
    // An unprivileged user cannot have the agent run anything for it (stdio files, binds and
    // the root are opened by the agent as root).
    let mut own = server_spec("mine", "198.19.19.40", 0);
    own.uid = 65534;
    own.gid = 65534;
    let v = as_nobody(
        &lab.nodes[0].socket,
        &Request::CreateContainer { spec: own },
    );
    assert_eq!(v["error"]["code"], "permission_denied", "{v}");
    assert!(c0.container("mine").is_err(), "refused container exists");
    let v = as_nobody(&lab.nodes[0].socket, &Request::ListContainers);
    assert_eq!(
        v["ok"]["containers"].as_array().map(|a| a.len()),
        Some(0),
        "{v}"
    );

    // Nothing changed: same process, still running, client never noticed.
    let after = c0.container("web").expect("info");
    assert_eq!(after.state, ContainerState::Running);
    assert_eq!(after.pid, before.pid);
    assert!(probe.advance(20, Duration::from_secs(10)), "client stalled");
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    let _ = lab.log(1);
}
