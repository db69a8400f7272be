//! Connection limits for servers: at most `max_total` connections at once and `max_per_key`
//! per key (a uid, a peer address). A connection beyond a limit is refused with a `busy`
//! error reply ([`refuse_async`]) and counted; [`Refusal::log`] says when to write a log line,
//! so that a flood gives one line a second, not one per connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateConfig {
    pub max_total: usize,
    pub max_per_key: usize,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_key: HashMap<String, usize>,
    last_log: Option<Instant>,
}

/// Counts the open connections of one listener.
#[derive(Debug)]
pub struct Gate {
    what: &'static str,
    cfg: GateConfig,
    counts: Mutex<Counts>,
    refused: AtomicU64,
}

/// An admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    key: String,
}

/// A connection beyond a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The sentence for the error reply and the log.
    pub message: String,
    /// Connections this gate refused so far, this one included.
    pub refused: u64,
    /// Whether to log this refusal (the first, then at most one a second).
    pub log: bool,
}

const LOG_EVERY: Duration = Duration::from_secs(1);

impl Gate {
    /// `what` names the listener in messages, e.g. "agent control socket".
    pub fn new(what: &'static str, cfg: GateConfig) -> Arc<Gate> {
        Arc::new(Gate {
            what,
            cfg,
            counts: Mutex::new(Counts::default()),
            refused: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> GateConfig {
        self.cfg
    }

    /// Admits a connection of `key` or refuses it. `per_key` false: only the total applies
    /// (root's connections, which the per-user limit must not starve).
    pub fn try_enter(self: &Arc<Self>, key: &str, per_key: bool) -> Result<Permit, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.per_key.get(key).copied().unwrap_or(0);
        let why = if c.total >= self.cfg.max_total {
            Some(format!(
                "the {} has its limit of {} connections open; try again later",
                self.what, self.cfg.max_total
            ))
        } else if per_key && mine >= self.cfg.max_per_key {
            Some(format!(
                "{key} has its limit of {} connections to the {} open; try again later",
                self.cfg.max_per_key, self.what
            ))
        } else {
            None
        };
        if let Some(message) = why {
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            let now = Instant::now();
            let log = c
                .last_log
                .is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
            if log {
                c.last_log = Some(now);
            }
            return Err(Refusal {
                message,
                refused,
                log,
            });
        }
        c.total += 1;
        *c.per_key.entry(key.to_string()).or_default() += 1;
        Ok(Permit {
            gate: self.clone(),
            key: key.to_string(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    /// Connections refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.gate.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_key.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_key.remove(&self.key);
            }
        }
    }
}

/// Sends a refused connection its `busy` error reply (within one second) and closes it.
#[cfg(feature = "async")]
pub async fn refuse_async<S: tokio::io::AsyncWrite + Unpin>(mut s: S, r: &Refusal) {
    use crate::error::{ErrorCode, ErrorReply};
    let reply = crate::messages::Response::Error(ErrorReply {
        code: ErrorCode::Busy,
        message: r.message.clone(),
    });
    let Ok(f) = crate::frame::Frame::json(crate::frame::FrameKind::Response, 0, &reply) else {
        return;
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        crate::frame::write_frame_async(&mut s, &f),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_open_connections_and_free_on_drop() {
        let g = Gate::new(
            "test socket",
            GateConfig {
                max_total: 3,
                max_per_key: 2,
            },
        );
        let a1 = g.try_enter("uid 1000", true).expect("first");
        let _a2 = g.try_enter("uid 1000", true).expect("second");
        let r = g
            .try_enter("uid 1000", true)
            .expect_err("third of one user");
        assert!(r.message.contains("uid 1000 has its limit of 2"), "{r:?}");
        assert_eq!((r.refused, r.log), (1, true));
        let _root = g.try_enter("uid 0", false).expect("root: total only");
        let r = g.try_enter("uid 0", false).expect_err("total");
        assert!(r.message.contains("limit of 3 connections"), "{r:?}");
        // Refusals within a second are counted but not all logged.
        assert_eq!((r.refused, r.log), (2, false));
        assert_eq!(g.open(), 3);
        drop(a1);
        assert_eq!(g.open(), 2);
        let _again = g.try_enter("uid 1000", true).expect("a place was freed");
        assert_eq!(g.refused(), 2);
    }

    #[cfg(feature = "async")]
    #[tokio::test]
    async fn a_refused_connection_reads_a_busy_error_reply() {
        use crate::frame::{read_frame_async, FrameKind};
        use crate::messages::Response;
        let g = Gate::new(
            "test socket",
            GateConfig {
                max_total: 1,
                max_per_key: 1,
            },
        );
        let _held = g.try_enter("uid 0", false).expect("first");
        let r = g.try_enter("uid 0", false).expect_err("over the limit");
        let (mut client, server) = tokio::io::duplex(4096);
        refuse_async(server, &r).await;
        let f = read_frame_async(&mut client, 4096).await.expect("a frame");
        assert_eq!((f.header.kind, f.header.id), (FrameKind::Response, 0));
        match f.decode::<Response>(FrameKind::Response, "response") {
            Ok(Response::Error(e)) => {
                assert_eq!(e.code, crate::ErrorCode::Busy);
                assert!(
                    e.message.starts_with("the test socket has its limit of 1"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
