//! A client of the tests' TCP counter servers (port 8000: each line is answered with the count
//! of lines so far on that connection). One request every 10 ms on one connection, from a
//! network namespace or the caller's; every answer must be the previous one plus one, so a
//! lost, repeated or reordered answer, a reset or a new connection is an error.

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the probe saw so far.
#[derive(Debug, Default, Clone)]
pub struct ProbeStats {
    pub requests: u64,
    pub last_counter: u64,
    /// The first error ends the probe: connect, i/o, closed, or a counter out of sequence.
    pub errors: Vec<String>,
    pub max_gap: Duration,
}

pub struct TcpProbe {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<Mutex<ProbeStats>>,
    pub count: Arc<AtomicU64>,
}

impl TcpProbe {
    /// Connects to `addr`:8000 from network namespace `netns` (a name under /run/netns, or the
    /// caller's namespace), retrying for 20 s while the server starts.
    pub fn start(netns: Option<&str>, addr: &str) -> TcpProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(ProbeStats::default()));
        let count = Arc::new(AtomicU64::new(0));
        let (st, s2, c2) = (stop.clone(), stats.clone(), count.clone());
        let ns = netns.map(|n| format!("/run/netns/{n}"));
        let addr = format!("{addr}:8000");
        let handle = std::thread::spawn(move || {
            if let Some(ns) = ns {
                // setns(2) on this thread only: the probe's socket lives in that namespace.
                let f = std::fs::File::open(&ns).expect("client netns");
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            let stream = loop {
                match std::net::TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(e) => {
                        if Instant::now() > deadline {
                            lock(&s2).errors.push(format!("connect: {e}"));
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(15)))
                .expect("timeout");
            let mut w = stream.try_clone().expect("clone");
            let mut r = BufReader::new(stream);
            let mut last = Instant::now();
            let mut expect = 1u64;
            while !st.load(Ordering::Relaxed) {
                let mut line = String::new();
                let res = w.write_all(b"x\n").and_then(|_| r.read_line(&mut line));
                let mut s = lock(&s2);
                match res {
                    Ok(0) => {
                        s.errors.push("connection closed".into());
                        return;
                    }
                    Ok(_) => {
                        let v: u64 = line.trim().parse().unwrap_or(0);
                        if v != expect {
                            s.errors.push(format!("counter {v}, expected {expect}"));
                            return;
                        }
                        expect += 1;
                        let gap = last.elapsed();
                        if gap > s.max_gap {
                            s.max_gap = gap;
                        }
                        last = Instant::now();
                        s.requests += 1;
                        s.last_counter = v;
                        c2.store(v, Ordering::Relaxed);
                    }
                    Err(e) => {
                        s.errors.push(format!("i/o: {e}"));
                        return;
                    }
                }
                drop(s);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        TcpProbe {
            stop,
            handle: Some(handle),
            stats,
            count,
        }
    }

    /// Waits until the counter reached `n` more answers than now; false at the deadline or at
    /// the first error.
    pub fn advance(&self, n: u64, within: Duration) -> bool {
        let start = self.count.load(Ordering::Relaxed);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.count.load(Ordering::Relaxed) >= start + n {
                return true;
            }
            if !lock(&self.stats).errors.is_empty() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// (last answer, errors).
    pub fn state(&self) -> (u64, Vec<String>) {
        let s = lock(&self.stats);
        (s.last_counter, s.errors.clone())
    }

    /// Waits up to 15 s for answer `n`; panics with `why` and the probe's state otherwise.
    pub fn wait_answers(&self, n: u64, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.count.load(Ordering::Relaxed) < n {
            let (last, errors) = self.state();
            assert!(
                Instant::now() < deadline && errors.is_empty(),
                "{why}: probe at answer {last}, errors {errors:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn reset_gap(&self) {
        lock(&self.stats).max_gap = Duration::ZERO;
    }

    pub fn stop(mut self) -> ProbeStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        std::mem::take(&mut *lock(&self.stats))
    }
}

impl Drop for TcpProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock(s: &Mutex<ProbeStats>) -> MutexGuard<'_, ProbeStats> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}
