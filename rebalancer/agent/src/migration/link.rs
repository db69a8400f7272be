//! Post-copy, peer protocol 4, on the source: the lazy-page link the two agents open before the
//! freeze ([`crate::lazy_link`] has the sockets' side), and the wait for the lazy dump's end.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rebalancer_proto::MigrationRecord;

use super::host::{within, Criu, Helper, Host, PeerLink};
use crate::agent::Agent;
use crate::error::AgentError;
use crate::peer::{PeerReply, PeerRequest};

/// How long the source waits for the destination's end of the link, beyond the destination's
/// own limit for opening it.
const SLACK: Duration = Duration::from_secs(5);

/// Binds the link port, has the destination (at `dest` on `conn`) connect to it with a fresh
/// token (`lazy-link`), and returns the one connection that came from `dest` with that token.
pub async fn open<C: Criu, L: PeerLink>(
    host: &C,
    agent: &Agent,
    conn: &mut L,
    dest: IpAddr,
    migration: &str,
) -> Result<OwnedFd, AgentError> {
    let ip = agent.cfg.advertise;
    let token = crate::lazy_link::token();
    let within = crate::lazy_link::CONNECT_WITHIN + SLACK;
    let (port, pending) = host.lazy_link_listen(ip, dest, token, within)?;
    let r = conn
        .call(&PeerRequest::LazyLink {
            to: (ip, port),
            token: crate::lazy_link::to_hex(&token),
        })
        .await;
    match r {
        Ok(PeerReply::LazyLinked) => {}
        other => {
            // Closes the listener.
            pending.abort();
            return Err(match other {
                Err(e) => e,
                Ok(o) => AgentError::Peer(format!("unexpected answer to lazy-link: {o:?}")),
            });
        }
    }
    let link = pending
        .await
        .map_err(|e| AgentError::Internal(format!("lazy-link accept task: {e}")))??;
    tracing::info!(migration = %migration, port, "lazy-page link open");
    Ok(link)
}

/// Waits for a post-copy lazy dump to serve its last page, bounded; the error if it failed.
pub async fn finish_lazy_dump<H: Host>(
    host: &H,
    agent: &Agent,
    rec: &MigrationRecord,
    mut d: H::Helper,
) -> Option<String> {
    // Bounded: a stuck page transfer must not hold the source forever.
    let limit = Duration::from_millis(agent.cfg.migration_timeout_ms)
        + Duration::from_secs(rec.stats.rss_bytes / (16 << 20));
    match within(host, limit, d.wait()).await {
        Some(st) if matches!(&st, Ok(s) if s.success()) => None,
        Some(st) => {
            tracing::error!(migration = %rec.id, status = ?st, "lazy page server failed after resume");
            Some(format!(
                "lazy page server failed after resume: it {}",
                crate::criu::exit_text(&st)
            ))
        }
        None => {
            tracing::error!(migration = %rec.id, "lazy page transfer not finished in {limit:?}; stopping it");
            d.start_kill();
            let _ = d.wait().await;
            Some(format!("lazy page transfer not finished in {limit:?}"))
        }
    }
}

/// Per-attempt limit of the `lazy-end` question: the destination's own wait for its daemon
/// plus the connection.
const LAZY_END_CALL: Duration = Duration::from_secs(15);
const LAZY_END_ATTEMPTS: u32 = 3;

/// After a committed post-copy's lazy dump ended without an error: asks the destination
/// (`lazy-end`, a connection of its own) whether every page arrived, since the dump ends the
/// same way when the destination's `criu lazy-pages` dies. The reason when the pages were
/// lost there (the container was killed); `None` when they all arrived, or when no answer
/// came (logged: the record cannot say more than the dump did).
pub async fn ask_lazy_end<H: Host>(
    host: &H,
    agent: &Agent,
    addr: std::net::SocketAddr,
    rec: &MigrationRecord,
) -> Option<String> {
    for attempt in 1..=LAZY_END_ATTEMPTS {
        let ask = async {
            let mut link = host.connect(&agent.cfg, addr, LAZY_END_CALL).await?;
            link.call(&PeerRequest::LazyEnd {
                migration: rec.id.clone(),
            })
            .await
        };
        let err = match within(host, LAZY_END_CALL, ask).await {
            Some(Ok(PeerReply::LazyEnded { lost: None })) => {
                tracing::info!(migration = %rec.id, destination = %rec.destination, "destination confirmed every lazy page arrived");
                return None;
            }
            Some(Ok(PeerReply::LazyEnded { lost: Some(why) })) => {
                tracing::error!(migration = %rec.id, destination = %rec.destination, reason = %why, "post-copy pages lost on the destination: the job was killed there");
                return Some(format!("post-copy failed on {}: {why}", rec.destination));
            }
            Some(Ok(other)) => {
                AgentError::Peer(format!("unexpected answer to lazy-end: {other:?}"))
            }
            Some(Err(e)) => e,
            None => AgentError::Timeout(format!(
                "no answer to lazy-end within {} s",
                LAZY_END_CALL.as_secs()
            )),
        };
        // An earlier release refuses the op: asking again changes nothing.
        let final_ = attempt == LAZY_END_ATTEMPTS
            || matches!(err, AgentError::BadRequest(_) | AgentError::NotFound(_));
        tracing::warn!(migration = %rec.id, destination = %rec.destination, attempt, error = %err.chain(), "lazy-end question failed");
        if final_ {
            break;
        }
        host.sleep(Duration::from_secs(1)).await;
    }
    None
}
