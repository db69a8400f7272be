//! A recording TCP proxy: what crosses a connection, to show whether a marker travels in clear.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// The bytes a [`recording_proxy`] has seen, both directions in arrival order.
pub type Recording = Arc<Mutex<Vec<u8>>>;

/// Starts a proxy in network namespace `netns` (`None`: the caller's) on 127.0.0.1 that relays
/// every connection to `to`; returns its port and the recording. Runs until the process ends.
pub fn recording_proxy(netns: Option<&str>, to: &str) -> (u16, Recording) {
    let seen: Recording = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log = seen.clone();
    let ns = netns.map(|n| format!("/run/netns/{n}"));
    let to = to.to_owned();
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            // setns(2) on this thread only; threads spawned here start in its namespace.
            let f = std::fs::File::open(&ns).expect("proxy netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        tx.send(l.local_addr().expect("addr").port()).expect("port");
        for c in l.incoming() {
            let Ok(a) = c else { continue };
            let Ok(b) = TcpStream::connect(&to) else {
                continue;
            };
            for (mut from, mut into) in [
                (a.try_clone().expect("clone"), b.try_clone().expect("clone")),
                (b, a),
            ] {
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        log.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend_from_slice(&buf[..n]);
                    }
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (rx.recv().expect("proxy port"), seen)
}

/// Whether `needle` occurs in what `rec` has recorded so far.
pub fn recorded(rec: &Recording, needle: &[u8]) -> bool {
    let r = rec.lock().unwrap_or_else(|p| p.into_inner());
    !needle.is_empty() && r.windows(needle.len()).any(|w| w == needle)
}
