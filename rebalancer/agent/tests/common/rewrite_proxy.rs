//! A man in the middle that rewrites the hellos (issue #11, downgrade attack): a TCP proxy
//! that decodes the first frame each way as a `Hello`, lets the test change it (its version
//! range, its nonce) and relays everything after it unchanged. Shared by the agent's and the
//! controller's downgrade tests (the controller's includes this file by path).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind, MAX_FRAME_LEN};
use rebalancer_proto::Hello;

/// Which end sent a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    Client,
    Server,
}

/// What the proxy does to each hello.
pub type Rewrite = Arc<dyn Fn(From, &mut Hello) + Send + Sync>;

/// Passes every hello unchanged.
pub fn unchanged() -> Rewrite {
    Arc::new(|_, _| {})
}

/// The nonce with the range a current end states stripped (`HEX.vMIN-MAX` → `HEX`): the end
/// looks like one of an earlier release.
pub fn strip_range(n: &str) -> String {
    n.split_once(".v").map_or(n, |(b, _)| b).to_string()
}

/// Starts the proxy in network namespace `netns` (`None`: the caller's) on 127.0.0.1, relaying
/// to `to`; returns its port and the number of hellos it rewrote or passed.
pub fn rewriting_proxy(netns: Option<&str>, to: &str, rewrite: Rewrite) -> (u16, Arc<AtomicUsize>) {
    let hellos = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = netns.map(|n| format!("/run/netns/{n}"));
    let to = to.to_owned();
    let count = hellos.clone();
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
            for (side, from, into) in [
                (
                    From::Client,
                    a.try_clone().expect("clone"),
                    b.try_clone().expect("clone"),
                ),
                (From::Server, b, a),
            ] {
                let (rewrite, count) = (rewrite.clone(), count.clone());
                std::thread::spawn(move || relay(side, from, into, rewrite, count));
            }
        }
    });
    (rx.recv().expect("proxy port"), hellos)
}

fn relay(
    side: From,
    mut from: TcpStream,
    mut into: TcpStream,
    rewrite: Rewrite,
    n: Arc<AtomicUsize>,
) {
    if let Ok(f) = read_frame(&mut from, MAX_FRAME_LEN) {
        let out = match f.decode::<Hello>(FrameKind::Hello, "hello") {
            Ok(mut h) => {
                rewrite(side, &mut h);
                n.fetch_add(1, Ordering::SeqCst);
                Frame::json(FrameKind::Hello, f.header.id, &h).expect("hello frame")
            }
            // An error answer instead of a hello: passed on as it is.
            Err(_) => f,
        };
        if write_frame(&mut into, &out).is_err() {
            return;
        }
    }
    let mut buf = [0u8; 65536];
    while let Ok(k) = from.read(&mut buf) {
        if k == 0 || into.write_all(&buf[..k]).is_err() {
            break;
        }
    }
    let _ = into.shutdown(std::net::Shutdown::Write);
}
