//! The workload and the client talk over loopback (no root): the client reports answers, a
//! monotonic counter and the workload's own statistics.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rebalancer_bench::wire::{ClientReport, ServerStats};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(17000)
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn client_sees_a_rising_counter_and_server_stats() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Kill(
        Command::new(env!("CARGO_BIN_EXE_bench-workload"))
            .args([
                "--listen",
                &addr,
                "--mib",
                "8",
                "--dirty-percent-per-sec",
                "50",
            ])
            .spawn()
            .expect("start workload"),
    );
    let mut client = Kill(
        Command::new(env!("CARGO_BIN_EXE_bench-client"))
            .args(["--server", &addr, "--connect-timeout-s", "20"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start client"),
    );
    let out = client.0.stdout.take().expect("client stdout");
    let mut lines = BufReader::new(out).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "ready");
    // Stop once the workload has answered at least 10 requests and dirtied memory, however
    // slowly this (shared) machine runs them; `stats` does not touch the counter.
    wait_for_server(&addr, |st| st.counter >= 10 && st.pages_dirtied > 0);
    client
        .0
        .stdin
        .as_mut()
        .expect("client stdin")
        .write_all(b"stop\n")
        .expect("stop");
    let json = lines.next().expect("report").expect("read");
    let rep: ClientReport = serde_json::from_str(&json).expect("parse report");
    assert!(rep.requests >= 10, "{rep:?}");
    assert!(rep.errors.is_empty(), "{rep:?}");
    assert!(!rep.counter_went_backwards);
    assert_eq!(rep.last_counter - rep.first_counter + 1, rep.requests);
    let server = rep.server.clone().expect("server stats");
    assert!(server.ready);
    assert_eq!(server.mib, 8);
    assert!(server.pages_dirtied > 0);
    // Latencies on a shared 2-core machine are figures to read, not to assert.
    eprintln!(
        "workload heartbeat gap {} us, client answer gap {} us over {} requests",
        server.max_heartbeat_gap_us, rep.max_gap_us, rep.requests
    );
}

/// Polls the workload's `stats` until `done` holds; panics with the last stats after 30 s.
fn wait_for_server(addr: &str, done: impl Fn(&ServerStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(st) = server_stats(addr) {
            if done(&st) {
                return;
            }
            last = Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the workload never got there: {last:?}");
}

fn server_stats(addr: &str) -> std::io::Result<ServerStats> {
    let s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&s).write_all(b"stats\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
