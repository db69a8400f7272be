//! Helpers shared by the root tests that run real agents: their labs ([`lab`]: nodes isolated
//! like machines; [`cluster`]: agents on slurm-tests' cluster), and calls to agents and the
//! controller.
#![allow(dead_code)]

pub mod cluster;
pub mod lab;
#[allow(unused_imports)] // the Slurm labs build their agents on slurm-tests' cluster
pub use lab::{ControllerPlan, Lab, LabPlan};

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rebalancer_proto::control::{ControlReply, ControlRequest, ControlResponse};
use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind};
use rebalancer_proto::*;

#[allow(unused_imports)] // not every test binary runs shell commands
pub use rebalancer_testkit::{must, sh};

pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REBALANCER_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("rebalancer-agent"))
        .expect("target dir");
    assert!(
        p.exists(),
        "{} missing: build it (cargo build -p rebalancer-agent) or set REBALANCER_AGENT_BIN",
        p.display()
    );
    p
}

pub fn hello(s: &mut UnixStream, role: Role) {
    write_frame(
        s,
        &Frame::json(FrameKind::Hello, 0, &Hello::new(role, "ctl-test")).expect("hello"),
    )
    .expect("send");
    let f = read_frame(s, MAX_FRAME_LEN).expect("hello back");
    assert_eq!(f.header.kind, FrameKind::Hello);
}

pub fn agent_call(sock: &Path, req: &Request) -> Result<Reply, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    hello(&mut s, Role::Cli);
    write_frame(
        &mut s,
        &Frame::json(FrameKind::Request, 1, req).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let f = read_frame(&mut s, MAX_FRAME_LEN).map_err(|e| e.to_string())?;
    let r: Response = f
        .decode(FrameKind::Response, "response")
        .map_err(|e| e.to_string())?;
    r.into_result().map_err(|e| e.to_string())
}

pub fn ctl_call(sock: &Path, req: &ControlRequest) -> Result<ControlReply, ErrorReply> {
    let mut s = UnixStream::connect(sock).map_err(|e| ErrorReply {
        code: ErrorCode::Unreachable,
        message: e.to_string(),
    })?;
    hello(&mut s, Role::Cli);
    write_frame(
        &mut s,
        &Frame::json(FrameKind::Request, 1, req).expect("frame"),
    )
    .expect("send");
    loop {
        let f = read_frame(&mut s, MAX_FRAME_LEN).expect("reply");
        if f.header.kind == FrameKind::Event {
            continue;
        }
        let r: ControlResponse = f.decode(FrameKind::Response, "response").expect("response");
        return r.into_result();
    }
}

/// A TCP counter server (answers each line with the count so far on that connection).
pub fn server(id: &str, job: u32, address: &str) -> ContainerSpec {
    server_of(id, job, address, 48)
}

/// [`server`] holding `mib` MiB of touched memory.
pub fn server_of(id: &str, job: u32, address: &str, mib: u32) -> ContainerSpec {
    let prog = format!("import socket\nbuf = bytearray({mib} << 20)\nfor i in range(0, len(buf), 4096): buf[i] = 1\n\
                s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                s.bind(('0.0.0.0', 8000)); s.listen(4)\nwhile True:\n    c, _ = s.accept(); f = c.makefile('rb'); n = 0\n\
                \x20   for line in f:\n        n += 1; c.sendall(b'%d\\n' % n)\n");
    ContainerSpec {
        id: id.into(),
        task: Some(TaskRef {
            job_id: job,
            step_id: 0,
            task_id: 0,
        }),
        uid: 0,
        gid: 0,
        argv: vec!["python3".into(), "-u".into(), "-c".into(), prog],
        env: vec![],
        cwd: "/".into(),
        rootfs: RootfsSpec::Host,
        binds: vec![],
        memory_limit: None,
        cpus: Some(1.0),
        class: None,
        address: Some(address.into()),
        stdout: None,
        stderr: None,
    }
}

/// Kills the controller also when an assertion fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 100 ms until it gives a value; fails naming `what`, with `logs()`, after
/// `limit`.
pub fn wait_for<T>(
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
        assert!(std::time::Instant::now() < deadline, "{what}:\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

// For a lab of its own (control_downgrade.rs): an agent in a node network namespace only.
/// Starts `rebalancer-agent run --config CFG` inside the node network namespace NETNS, with
/// stdout and stderr in LOG.
pub fn spawn_agent(netns: &str, cfg: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log");
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(agent_bin())
        .args(["run", "--config"])
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("agent")
}

/// Waits up to 20 s for the agent behind SOCK to answer a ping; fails with `logs()` otherwise.
pub fn wait_agent(sock: &Path, name: &str, logs: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent_call(sock, &Request::Ping).is_err() {
        assert!(
            Instant::now() < deadline,
            "agent {name} did not start:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
