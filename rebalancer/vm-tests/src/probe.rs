//! The TCP client of the migration tests: one connection to the container's counter server
//! (`vm-guest workload`), one request every 10 ms, every answer checked to be the next number
//! (a lost, repeated or reordered reply is an error and ends the probe). Runs in a network
//! namespace of its own when given one (the guest's client namespace, or the host-side
//! namespace of `tests/two_guests.rs`).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::report::ProbeReport;

pub struct Probe {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    report: Arc<Mutex<(ProbeReport, Instant)>>,
}

impl Probe {
    /// Starts the client thread; it enters `netns` (a `/run/netns/NAME` file) first, and keeps
    /// trying to connect for 60 s.
    pub fn start(netns: Option<&Path>, target: SocketAddr) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let report = Arc::new(Mutex::new((ProbeReport::default(), Instant::now())));
        let (st, c2, r2) = (stop.clone(), count.clone(), report.clone());
        let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
        std::thread::spawn(move || {
            let fail = |m: String| {
                if let Ok(mut r) = r2.lock() {
                    r.0.errors.push(m);
                }
            };
            if let Some(path) = netns {
                let ns = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) => return fail(format!("open {}: {e}", path.display())),
                };
                // The network namespace is per thread: only this thread moves.
                if let Err(e) = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET) {
                    return fail(format!("setns {}: {e}", path.display()));
                }
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            let s = loop {
                match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return fail(format!("connect {target}: {e}"))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
            let Ok(mut w) = s.try_clone() else {
                return fail("clone socket".into());
            };
            let mut r = BufReader::new(s);
            let mut expect = 1u64;
            if let Ok(mut g) = r2.lock() {
                g.1 = Instant::now();
            }
            while !st.load(Ordering::Relaxed) {
                let mut line = String::new();
                let res = w.write_all(b"x\n").and_then(|_| r.read_line(&mut line));
                match res {
                    Ok(0) => return fail("connection closed".into()),
                    Err(e) => return fail(format!("i/o: {e}")),
                    Ok(_) => {
                        let v: u64 = line.trim().parse().unwrap_or(0);
                        if v != expect {
                            return fail(format!("counter {v}, expected {expect}"));
                        }
                        expect += 1;
                        if let Ok(mut g) = r2.lock() {
                            let gap = g.1.elapsed().as_millis() as u64;
                            g.0.max_gap_ms = g.0.max_gap_ms.max(gap);
                            g.0.requests += 1;
                            g.1 = Instant::now();
                        }
                        c2.store(v, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Probe {
            stop,
            count,
            report,
        }
    }

    /// The last counter value the server answered (= answers received in sequence).
    pub fn answered(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits for `n` more answers; false on a client error or timeout.
    pub fn advance(&self, n: u64, within: Duration) -> bool {
        let start = self.answered();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.answered() >= start + n {
                return true;
            }
            if self
                .report
                .lock()
                .map(|r| !r.0.errors.is_empty())
                .unwrap_or(true)
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The report since the last call, then starts a fresh one.
    pub fn take(&self) -> ProbeReport {
        match self.report.lock() {
            Ok(mut g) => std::mem::take(&mut g.0),
            Err(_) => ProbeReport {
                errors: vec!["probe lock poisoned".into()],
                ..Default::default()
            },
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
