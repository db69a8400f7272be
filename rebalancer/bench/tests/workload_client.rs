//! The workload and the client talk over loopback (no root): the client reports answers, a
//! monotonic counter and the workload's own statistics.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use rebalancer_bench::wire::ClientReport;

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
    std::thread::sleep(Duration::from_millis(400));
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
    // Nothing froze the workload: its heartbeat never stalled for long.
    assert!(server.max_heartbeat_gap_us < 200_000, "{server:?}");
    // The client sends every 10 ms; no answer came later than that by much.
    assert!(rep.max_gap_us < 200_000, "{rep:?}");
}
