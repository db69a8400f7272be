//! Limits and timeouts of the agent's control socket with a real agent (block rbt13): a silent
//! connection is closed after `idle_timeout_s`, one that never says hello after
//! `hello_timeout_s`, a non-root uid beyond `max_connections_per_uid` gets a `busy` reply, and
//! the SPANK waiter's connection (a registered task) outlives the idle timeout and still gets
//! its task's final status.

mod common;
use common::*;
use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind};
use rebalancer_proto::*;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spank");

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
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return l,
            Ok(l) => eprintln!("waiter: {l}"),
            Err(e) => panic!("no '{prefix}' line from the waiter: {e}"),
        }
    }
}

/// How long until the agent closes `s` (reads until EOF or an error), at most `limit`.
fn closed_after(mut s: UnixStream, limit: Duration) -> Duration {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return t.elapsed(),
            Ok(_) => {}
            Err(e) => panic!("still open after {:?}: {e}", t.elapsed()),
        }
    }
}

#[test]
#[ignore = "needs root, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn idle_and_helloless_connections_close_but_the_waiter_keeps_its_connection() {
    let stepd_dir = std::path::PathBuf::from("/tmp/rbt13-stepd");
    std::fs::create_dir_all(&stepd_dir).expect("dir");
    let stepd = stepd_dir.join("slurmstepd");
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    std::fs::copy(&python, &stepd).expect("copy python as slurmstepd");
    let lab = Lab::with_config(
        13,
        1,
        vec![
            "[control]\nidle_timeout_s = 1\nhello_timeout_s = 1\nmax_connections_per_uid = 2\n"
                .into(),
        ],
    );
    let sock = lab.nodes[0].socket.clone();

    // The waiter of a task registers it, then stays silent on its connection.
    let mut task = Command::new(&stepd)
        .arg(format!("{SCRIPTS}/stepd.py"))
        .arg("[7.0]")
        .arg(format!("{SCRIPTS}/waiter.py"))
        .arg(&sock)
        .arg(env!("CARGO_BIN_EXE_rebalancer-agent"))
        .arg(&lab.nodes[0].name)
        .arg("198.19.29.10")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fake slurmstepd");
    let rx = lines_of(&mut task);
    wait_line(&rx, "registered", Duration::from_secs(20));

    // A client that said hello and then nothing, and one that never says hello.
    let mut idle = UnixStream::connect(&sock).expect("connect");
    write_frame(
        &mut idle,
        &Frame::json(FrameKind::Hello, 0, &Hello::new(Role::Cli, "idle")).expect("hello"),
    )
    .expect("send hello");
    let f = read_frame(&mut idle, MAX_FRAME_LEN).expect("hello back");
    assert_eq!(f.header.kind, FrameKind::Hello);
    let t = closed_after(idle, Duration::from_secs(10));
    println!("silent connection closed after {t:?} (idle_timeout_s = 1)");
    assert!(t >= Duration::from_millis(900), "closed early: {t:?}");
    let t = closed_after(
        UnixStream::connect(&sock).expect("connect"),
        Duration::from_secs(10),
    );
    println!("connection without a hello closed after {t:?} (hello_timeout_s = 1)");
    assert!(t >= Duration::from_millis(900), "closed early: {t:?}");

    // A non-root uid opens three connections at once: one of them (the agent admits them in
    // whatever order its tasks run) is refused with busy, the two others wait for their hello
    // and are closed when it is overdue (an empty read).
    let py = format!(
        "import socket\nss = []\nfor i in range(3):\n    s = socket.socket(socket.AF_UNIX); s.connect('{}'); ss.append(s)\n\
         for s in ss:\n    s.settimeout(5)\n    print(repr(s.recv(4096)))\n",
        sock.display()
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &py,
        ])
        .output()
        .expect("setpriv python3");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let busy = lines
        .iter()
        .filter(|l| {
            l.contains("\"busy\"") && l.contains("uid 65534 has its limit of 2 connections")
        })
        .count();
    let closed = lines.iter().filter(|l| **l == "b''").count();
    assert_eq!((busy, closed), (1, 2), "{out:?}\n{}", lab.log(0));

    // The waiter's connection outlived the idle timeout several times over: its task's end
    // still arrives on it.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        rx.try_recv().is_err(),
        "the waiter heard something before its task ended"
    );
    lab.client(0)
        .call(&Request::KillContainer {
            id: "j7.s0.t0".into(),
            signal: 9,
        })
        .expect("kill");
    let fin = wait_line(&rx, "finished", Duration::from_secs(20));
    assert!(fin.contains("\"wait_status\": 9"), "{fin}\n{}", lab.log(0));
    let _ = task.wait();
    let log = lab.log(0);
    assert!(log.contains("connection refused"), "{log}");
}
