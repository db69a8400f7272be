//! The agent's peer listener: admission of TCP connections before any byte of them is read.
//!
//! Two bounds keep a flood from crowding out migrations: connections open at once in total
//! (`peer_max_connections`) and from one IP address (`peer_max_per_host`). A connection beyond
//! either gets a `busy` error response (the frame a peer's client decodes as a refusal) and is
//! closed at once; refusals are logged at most once a second with their count. What an admitted
//! connection may take before it proves who it is (the `peer_idle_timeout_ms` deadline for its
//! hello and `authenticate`) is the server's business ([`super::server`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rebalancer_proto::frame::{Frame, FrameKind};
use rebalancer_proto::{ErrorCode, ErrorReply, HEADER_LEN};
use tokio::net::{TcpListener, TcpStream};

use super::wire::PeerResponse;

/// Limits of the peer listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once, from every address together.
    pub total: usize,
    /// Connections served at once from one IP address.
    pub per_host: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{open} peer connections are open, the limit is {limit} (peer_max_connections)")]
    Total { open: usize, limit: usize },
    #[error("{open} peer connections from {ip} are open, the limit per host is {limit} (peer_max_per_host)")]
    PerHost {
        ip: IpAddr,
        open: usize,
        limit: usize,
    },
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// Counts open connections; a [`Permit`] gives its slot back when dropped.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted connection's slot.
#[derive(Debug)]
pub struct Permit {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            counts: Arc::default(),
        }
    }

    /// A slot for a connection from `ip`, or why there is none.
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.limits.total {
            return Err(Refusal::Total {
                open: c.total,
                limit: self.limits.total,
            });
        }
        let from = c.by_ip.get(&ip).copied().unwrap_or(0);
        if from >= self.limits.per_host {
            return Err(Refusal::PerHost {
                ip,
                open: from,
                limit: self.limits.per_host,
            });
        }
        c.total += 1;
        *c.by_ip.entry(ip).or_insert(0) += 1;
        Ok(Permit {
            ip,
            counts: self.counts.clone(),
        })
    }

    /// Connections open now (total).
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// The bytes of the `busy` response sent to a refused connection (request id 0: it comes
/// before any request).
pub fn busy_frame(node: &str, why: &Refusal) -> Vec<u8> {
    let reply = PeerResponse::Error(ErrorReply {
        code: ErrorCode::Busy,
        message: format!("agent {node} is busy: {why}; try again later"),
    });
    match Frame::json(FrameKind::Response, 0, &reply) {
        Ok(f) => f.to_bytes(),
        // A short sentence always fits in a frame; an empty frame still closes politely.
        Err(_) => vec![0; HEADER_LEN],
    }
}

/// Rate limit of the refusal log line.
struct RefusalLog {
    last: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    fn note(&mut self, node: &str, peer: SocketAddr, why: &Refusal) {
        self.since += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        tracing::warn!(node = %node, peer = %peer, refused = self.since, reason = %why, "peer connection refused: busy");
        self.last = Some(now);
        self.since = 0;
    }
}

/// Accepts peer connections on `tcp` forever, handing each admitted one to `serve` with its
/// permit held until `serve` ends.
pub async fn run<F, Fut>(tcp: TcpListener, node: String, limits: Limits, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admission = Admission::new(limits);
    let mut log = RefusalLog {
        last: None,
        since: 0,
    };
    loop {
        let (s, peer) = match tcp.accept().await {
            Ok(v) => v,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept on peer listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match admission.admit(peer.ip()) {
            Ok(permit) => {
                let fut = serve(s);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
            Err(why) => {
                log.note(&node, peer, &why);
                // The send buffer of a fresh socket is empty: this never waits. Whatever
                // cannot be written now is dropped with the connection.
                let _ = s.try_write(&busy_frame(&node, &why));
                drop(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    #[test]
    fn limits_per_host_and_in_total_and_slots_come_back() {
        let a = Admission::new(Limits {
            total: 3,
            per_host: 2,
        });
        let p1 = a.admit(ip(1)).expect("first");
        let _p2 = a.admit(ip(1)).expect("second");
        assert_eq!(
            a.admit(ip(1)).expect_err("third from one host"),
            Refusal::PerHost {
                ip: ip(1),
                open: 2,
                limit: 2
            }
        );
        let _p3 = a.admit(ip(2)).expect("other host");
        assert_eq!(
            a.admit(ip(3)).expect_err("total"),
            Refusal::Total { open: 3, limit: 3 }
        );
        drop(p1);
        assert_eq!(a.open(), 2);
        let _p4 = a.admit(ip(1)).expect("slot returned");
    }

    #[test]
    fn the_busy_frame_decodes_as_a_busy_refusal_naming_the_limit() {
        let bytes = busy_frame(
            "n1",
            &Refusal::Total {
                open: 64,
                limit: 64,
            },
        );
        let f = rebalancer_proto::frame::read_frame(&mut &bytes[..], 1 << 20).expect("frame");
        assert_eq!(f.header.kind, FrameKind::Response);
        match f
            .decode::<PeerResponse>(FrameKind::Response, "response")
            .expect("json")
        {
            PeerResponse::Error(e) => {
                assert_eq!(e.code, ErrorCode::Busy);
                assert!(e.message.contains("peer_max_connections"), "{}", e.message);
                assert!(e.message.contains("n1"), "{}", e.message);
            }
            other => panic!("not an error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_reads_busy_and_an_admitted_one_is_served() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(run(
            tcp,
            "n1".into(),
            Limits {
                total: 8,
                per_host: 1,
            },
            move |mut s: TcpStream| {
                let mut rx = release_rx.clone();
                async move {
                    let _ = rx.wait_for(|r| *r).await;
                    let _ = s.write_all(b"served").await;
                }
            },
        ));
        // Accepted in connection order: the first holds 127.0.0.1's one slot until released.
        let mut first = TcpStream::connect(addr).await.expect("first");
        let mut s = TcpStream::connect(addr).await.expect("second");
        let mut second = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut second))
            .await
            .expect("the refused connection is closed at once")
            .expect("read");
        let f = rebalancer_proto::frame::read_frame(&mut &second[..], 1 << 20).expect("frame");
        let r: PeerResponse = f.decode(FrameKind::Response, "response").expect("json");
        assert!(
            matches!(&r, PeerResponse::Error(e) if e.code == ErrorCode::Busy && e.message.contains("peer_max_per_host")),
            "{r:?}"
        );
        release_tx.send(true).expect("release");
        let mut buf = Vec::new();
        first.read_to_end(&mut buf).await.expect("read");
        assert_eq!(buf, b"served");
    }
}
