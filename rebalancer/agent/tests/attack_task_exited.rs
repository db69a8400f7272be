//! Attack test 4 (issue #11): forging `task-exited` or `kill-container` on the control socket.
//!
//! Two SPANK-path tasks run under a fake slurmstepd (see `spank_task.rs`): j21, owned by uid
//! 65534, and j22, owned by root. Then:
//! - j21's own waiter reports a made-up end on its registering connection while pid 1 runs;
//! - uid 65534 (a real unprivileged process) sends `task-exited` for its own task and for
//!   j22, and `kill-container` for j22;
//! - root, on another connection than the waiter's, sends `task-exited` for j21.
//!
//! Each is refused with a clear error, and both tasks keep running and answering TCP. A
//! legitimate end (uid 65534 signals its own task, its waiter reaps and reports) still works.

mod common;
use common::*;
use rebalancer_proto::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spank");
const NOBODY: u32 = 65534;

fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, within: Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return l,
            Ok(l) => eprintln!("waiter: {l}"),
            Err(e) => panic!("no '{prefix}' line from the waiter: {e}"),
        }
    }
}

/// Runs `forge.py` as `uid` and returns its one line ("accepted ..." or "refused ...").
fn forge(uid: u32, lab: &Lab, op: &str, container: &str, n: i32) -> String {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(format!("{SCRIPTS}/forge.py"))
        .arg(&lab.nodes[0].socket)
        .arg(&lab.nodes[0].name)
        .arg(op)
        .arg(container)
        .arg(n.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if uid != 0 {
        use std::os::unix::process::CommandExt;
        // std drops supplementary groups when it changes uid as root.
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("run forge.py");
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "forge.py as uid {uid} failed: {s} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("uid {uid} {op} {container}: {s}");
    s
}

fn task(lab: &Lab, stepd: &std::path::Path, job: u32, uid: u32, addr: &str) -> std::process::Child {
    Command::new(stepd)
        .arg(format!("{SCRIPTS}/stepd.py"))
        .arg(format!("[{job}.0]"))
        .arg(format!("{SCRIPTS}/waiter.py"))
        .arg(&lab.nodes[0].socket)
        .arg(env!("CARGO_BIN_EXE_rebalancer-agent"))
        .arg(&lab.nodes[0].name)
        .arg(addr)
        .env("RB_JOB", job.to_string())
        .env("RB_UID", uid.to_string())
        .env("RB_FORGE_EARLY", if uid == NOBODY { "1" } else { "0" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fake slurmstepd")
}

#[test]
#[ignore = "needs root, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn forged_task_ends_and_kills_are_refused_and_the_tasks_keep_running() {
    let stepd_dir = std::path::PathBuf::from("/tmp/rbt14-stepd");
    std::fs::create_dir_all(&stepd_dir).expect("dir");
    let stepd = stepd_dir.join("slurmstepd");
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    std::fs::copy(&python, &stepd).expect("copy python as slurmstepd");
    let lab = Lab::new(14, 1);
    let (own_addr, other_addr) = ("198.19.30.10", "198.19.30.11");
    let mut own = task(&lab, &stepd, 21, NOBODY, own_addr);
    let mut other = task(&lab, &stepd, 22, 0, other_addr);
    let own_rx = lines_of(&mut own);
    let other_rx = lines_of(&mut other);
    wait_line(&own_rx, "registered", Duration::from_secs(20));
    wait_line(&other_rx, "registered", Duration::from_secs(20));

    // The waiter's own connection, but pid 1 still runs under it: no end to report.
    let early = wait_line(&own_rx, "forged-early", Duration::from_secs(10));
    assert!(early.starts_with("forged-early refused"), "{early}");
    assert!(early.contains("still runs as a child"), "{early}");

    let own_probe = TcpProbe::start(&lab.client_ns, own_addr);
    let other_probe = TcpProbe::start(&lab.client_ns, other_addr);
    for p in [&own_probe, &other_probe] {
        assert!(p.advance(20, Duration::from_secs(20)), "no answers");
    }

    // The owner, through the waiter's path.
    let r = forge(NOBODY, &lab, "task-exited", "j21.s0.t0", 0);
    assert!(r.starts_with("refused"), "{r}");
    assert!(r.contains("uid 65534 is not the task's waiter"), "{r}");
    assert!(r.contains("permission_denied"), "{r}");
    // Another user's task: neither its end nor a signal.
    let r = forge(NOBODY, &lab, "task-exited", "j22.s0.t0", 0);
    assert!(
        r.starts_with("refused") && r.contains("not the task's waiter"),
        "{r}"
    );
    let r = forge(NOBODY, &lab, "kill-container", "j22.s0.t0", 9);
    assert!(
        r.starts_with("refused") && r.contains("no container j22.s0.t0"),
        "{r}"
    );
    // Root, but not the connection that registered the task.
    let r = forge(0, &lab, "task-exited", "j21.s0.t0", 0);
    assert!(
        r.starts_with("refused") && r.contains("did not register it"),
        "{r}"
    );

    // Both victims run on, in their network namespaces, and their waiters still wait.
    let mut c0 = lab.client(0);
    for id in ["j21.s0.t0", "j22.s0.t0"] {
        let info = c0.container(id).expect("still known");
        assert_eq!(info.state, ContainerState::Running, "{id}");
        assert_eq!(info.exit_status, None, "{id}");
    }
    for p in [&own_probe, &other_probe] {
        assert!(
            p.advance(20, Duration::from_secs(20)),
            "a victim stopped answering"
        );
    }
    assert!(own_rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert!(other_rx.recv_timeout(Duration::from_millis(300)).is_err());
    let own_stats = own_probe.stop();
    let other_stats = other_probe.stop();
    assert!(own_stats.errors.is_empty(), "{:?}", own_stats.errors);
    assert!(other_stats.errors.is_empty(), "{:?}", other_stats.errors);

    // Legitimate: the owner signals their own task; its waiter reaps and reports the real end.
    let r = forge(NOBODY, &lab, "kill-container", "j21.s0.t0", 9);
    assert!(r.starts_with("accepted"), "{r}");
    let fin = wait_line(&own_rx, "finished", Duration::from_secs(20));
    assert!(fin.contains("\"wait_status\": 9"), "{fin}");
    c0.call(&Request::KillContainer {
        id: "j22.s0.t0".into(),
        signal: 9,
    })
    .expect("kill j22");
    let fin = wait_line(&other_rx, "finished", Duration::from_secs(20));
    assert!(fin.contains("\"wait_status\": 9"), "{fin}");
    let _ = own.wait();
    let _ = other.wait();
}
