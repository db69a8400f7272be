//! Progress heartbeats on the peer connection, so that a stalled peer (a partition, a hung
//! agent) is found within seconds instead of at the end of the whole-migration timeout.
//!
//! No new message and no new protocol version: heartbeats are event frames
//! ([`rebalancer_proto::peer::PeerEvent`]), which the channel already carries and an older
//! agent drops. They are agreed in `prepare` (`heartbeat_ms`) and `prepared` (the
//! destination's echo of it); with an older peer neither side sends any and the timeouts alone
//! apply.
//!
//! - While the source runs a long local phase (pre-copy round, dump, lazy dump start-up) it
//!   sends a heartbeat every interval ([`beating`]); the destination answers each at once.
//! - While the destination serves a long request (prepare, pre-copy round, restore) it sends
//!   heartbeats with the request's id ([`serve_beating`]); the source waits for the answer
//!   frame by frame ([`watched_call`]).
//! - A side that hears nothing for `misses` intervals treats its peer as stalled. Before the
//!   commit point that is a failure like any other: the source rolls back (its tree resumes),
//!   the destination undoes its side. Commit itself is never watched here: once it may have
//!   been sent, the fencing path (`source::commit_and_resolve`) decides.
//!
//! Time is the [`Clock`] of the host, so the simulation drives these timers too.

use std::future::Future;
use std::time::{Duration, Instant};

use rebalancer_proto::channel::AsyncChannel;
use rebalancer_proto::frame::FrameKind;
use rebalancer_proto::peer::PeerEvent;
use tokio::io::{AsyncRead, AsyncWrite};

use super::host::{within, Clock, PeerLink};
use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::peer::{PeerReply, PeerRequest};

/// The heartbeat agreed for one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub interval: Duration,
    /// Intervals without a frame from the peer after which it counts as stalled.
    pub misses: u32,
}

/// Shortest and longest interval a peer may ask for (a source's `heartbeat_ms` is clamped).
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);

impl Heartbeat {
    /// This node's heartbeat, `None` when `heartbeat_interval_ms = 0`.
    pub fn from_config(cfg: &AgentConfig) -> Option<Heartbeat> {
        (cfg.heartbeat_interval_ms > 0).then(|| Heartbeat {
            interval: Duration::from_millis(cfg.heartbeat_interval_ms),
            misses: cfg.heartbeat_misses,
        })
    }

    /// The destination's side of the agreement: the source's interval (clamped), this node's
    /// miss count; `None` when either side has heartbeats off.
    pub fn agree(cfg: &AgentConfig, source_ms: Option<u64>) -> Option<Heartbeat> {
        let own = Heartbeat::from_config(cfg)?;
        let ms = source_ms.filter(|ms| *ms > 0)?;
        Some(Heartbeat {
            interval: Duration::from_millis(ms).clamp(MIN_INTERVAL, MAX_INTERVAL),
            misses: own.misses,
        })
    }

    /// Silence after which the peer counts as stalled.
    pub fn stall_limit(&self) -> Duration {
        self.interval * self.misses.max(1)
    }

    fn stalled(&self, peer: &str, phase: &str, heard: Instant, now: Instant) -> AgentError {
        AgentError::Timeout(format!(
            "{peer} stalled: nothing heard for {} ms during {phase} (heartbeat every {} ms, \
             {} missed)",
            now.duration_since(heard).as_millis(),
            self.interval.as_millis(),
            self.misses
        ))
    }
}

/// Runs `fut`, a long local phase of the source, while sending a heartbeat every interval and
/// waiting up to one interval for the destination's answer. Returns `fut`'s output, or an error
/// once nothing was heard for the stall limit or the link broke; `fut` is then dropped (a CRIU
/// dump dropped this way leaves through CRIU's own failure path, see `criu::run_interruptible`).
/// Without a heartbeat (an older destination) it is `fut`.
pub async fn beating<C, L, F, T>(
    clock: &C,
    link: &mut L,
    hb: Option<Heartbeat>,
    phase: &str,
    fut: F,
) -> Result<T, AgentError>
where
    C: Clock + ?Sized,
    L: PeerLink,
    F: Future<Output = Result<T, AgentError>>,
{
    let Some(hb) = hb else {
        return fut.await;
    };
    tokio::pin!(fut);
    let mut heard = clock.now();
    let mut pause = hb.interval;
    loop {
        tokio::select! {
            biased;
            r = &mut fut => return r,
            _ = clock.sleep(pause) => {}
        }
        let bytes = link.bytes_sent();
        let sent = clock.now();
        let r = within(clock, hb.interval, async {
            link.beat(phase, bytes).await?;
            link.heard().await
        })
        .await;
        // One heartbeat per interval, however long the answer took: a stall is found within
        // the stall limit plus one interval.
        pause = hb.interval.saturating_sub(clock.now().duration_since(sent));
        match r {
            Some(Ok(())) => heard = clock.now(),
            Some(Err(e)) => {
                tracing::warn!(phase, error = %e.chain(), "peer link broke during a heartbeat");
                return Err(e);
            }
            None => {}
        }
        let now = clock.now();
        if now.duration_since(heard) >= hb.stall_limit() {
            let e = hb.stalled("the destination agent", phase, heard, now);
            tracing::warn!(phase, error = %e, "destination stalled");
            return Err(e);
        }
    }
}

/// A call whose answer may take long (prepare, pre-copy round, restore). With a heartbeat, the
/// destination sends heartbeats while it works, and a silence of the stall limit ends the call
/// with an error; without one it is `link.call(req)`.
pub async fn watched_call<C, L>(
    clock: &C,
    link: &mut L,
    hb: Option<Heartbeat>,
    req: &PeerRequest,
) -> Result<PeerReply, AgentError>
where
    C: Clock + ?Sized,
    L: PeerLink,
{
    let Some(hb) = hb else {
        return link.call(req).await;
    };
    let id = link.send_req(req).await?;
    let mut heard = clock.now();
    loop {
        match within(clock, hb.interval, link.next_of(id)).await {
            Some(Ok(Some(reply))) => return Ok(reply),
            Some(Ok(None)) => heard = clock.now(),
            Some(Err(e)) => return Err(e),
            None => {}
        }
        let now = clock.now();
        if now.duration_since(heard) >= hb.stall_limit() {
            let e = hb.stalled("the destination agent", req.op(), heard, now);
            tracing::warn!(op = req.op(), error = %e, "destination stalled during a call");
            return Err(e);
        }
    }
}

/// The destination serving request `id` with `fut`: sends a heartbeat with that id every
/// interval until `fut` ends. `fut` is never cut (a CRIU restore runs to its end); a heartbeat
/// that cannot be written within an interval stops the heartbeats (the source then finds the
/// silence, and this side finds the source's at its next wait).
pub async fn serve_beating<C, S, F, T>(
    clock: &C,
    ch: &mut AsyncChannel<S>,
    id: u32,
    hb: Heartbeat,
    phase: &str,
    fut: F,
) -> T
where
    C: Clock + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = T>,
{
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            r = &mut fut => return r,
            _ = clock.sleep(hb.interval) => {}
        }
        let ev = PeerEvent::Heartbeat {
            phase: phase.to_string(),
            bytes: 0,
        };
        match within(clock, hb.interval, ch.send(FrameKind::Event, id, &ev)).await {
            Some(Ok(())) => continue,
            Some(Err(e)) => {
                tracing::warn!(phase, error = %e, "cannot send a heartbeat to the source; stopping them")
            }
            None => {
                tracing::warn!(
                    phase,
                    "a heartbeat to the source was not written within an interval; stopping them"
                )
            }
        }
        return fut.await;
    }
}

/// Bytes in the files of `dir` (what a page server received so far), for the destination's
/// answers; 0 when unreadable.
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_destination_takes_the_sources_interval_within_bounds_and_its_own_misses() {
        let cfg = |extra: &str| {
            crate::config::AgentConfig::from_toml(
                &format!("node = \"n\"\nlisten = \"127.0.0.1:7878\"\n{extra}\n[auth]\nmethod = \"none\"\n"),
                std::path::Path::new("t.toml"),
            )
            .expect("config")
        };
        let c = cfg("heartbeat_misses = 4");
        let hb = Heartbeat::agree(&c, Some(500)).expect("agreed");
        assert_eq!(hb.interval, Duration::from_millis(500));
        assert_eq!(hb.stall_limit(), Duration::from_secs(2));
        assert_eq!(
            Heartbeat::agree(&c, Some(1)).map(|h| h.interval),
            Some(MIN_INTERVAL)
        );
        assert_eq!(
            Heartbeat::agree(&c, Some(u64::MAX)).map(|h| h.interval),
            Some(MAX_INTERVAL)
        );
        assert_eq!(Heartbeat::agree(&c, None), None, "an older source");
        assert_eq!(
            Heartbeat::from_config(&cfg("")),
            Some(Heartbeat {
                interval: Duration::from_secs(2),
                misses: 3
            }),
            "the default: a 6 s stall limit"
        );
        assert_eq!(
            Heartbeat::agree(&cfg("heartbeat_interval_ms = 0"), Some(500)),
            None,
            "heartbeats off here"
        );
    }

    #[test]
    fn bad_heartbeat_settings_are_refused_naming_the_field() {
        for (line, field) in [
            ("heartbeat_interval_ms = 50", "heartbeat_interval_ms"),
            ("heartbeat_interval_ms = 60001", "heartbeat_interval_ms"),
            ("heartbeat_misses = 1", "heartbeat_misses"),
            ("heartbeat_misses = 101", "heartbeat_misses"),
        ] {
            let e = crate::config::AgentConfig::from_toml(
                &format!("node = \"n\"\nlisten = \"127.0.0.1:7878\"\n{line}\n"),
                std::path::Path::new("t.toml"),
            )
            .expect_err(line);
            assert!(
                matches!(&e, crate::config::ConfigError::Invalid { field: f, .. } if *f == field),
                "{line}: {e}"
            );
        }
    }
}
