//! Resolving a migration whose outcome is unknown (Commit sent, its answer lost): the source
//! asks the destination, which fences the migration unless it committed, and acts only on its
//! answer; without one the container stays frozen. Used by the source right after a lost
//! Commit, by its background retries and by a restarted agent (adopt.rs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::{ContainerState, MigrationRecord, MigrationState};

use super::host::{within, Host, PeerLink};
use super::{commit, finish};
use crate::agent::Agent;
use crate::error::AgentError;
use crate::peer::{PeerReply, PeerRequest};

/// Pause between two rounds of [`resolve_unknown`] in [`resolve_until_known`], doubling up to
/// [`RESOLVE_MAX_PAUSE`].
pub const RESOLVE_FIRST_PAUSE: Duration = Duration::from_secs(5);
pub const RESOLVE_MAX_PAUSE: Duration = Duration::from_secs(60);

/// Keeps resolving an unknown outcome until the destination answers (the agent's restart
/// resolves it too, from the journal). Never resumes without the destination's answer.
pub async fn resolve_until_known<H: Host>(
    host: &H,
    agent: &Arc<Agent>,
    mut rec: MigrationRecord,
    addr: SocketAddr,
) -> MigrationRecord {
    let mut pause = RESOLVE_FIRST_PAUSE;
    while rec.state == MigrationState::Unknown {
        host.sleep(pause).await;
        rec = resolve_unknown(host, agent, rec, addr).await;
        pause = (pause * 2).min(RESOLVE_MAX_PAUSE);
    }
    rec
}

/// One attempt to resolve a migration whose outcome is unknown: asks the destination (which
/// fences it unless committed); committed: the frozen copy here is killed and the record says
/// succeeded; not committed: the copy is resumed and the record says rolled back; no answer:
/// nothing changes. Publishes the resolved record.
pub async fn resolve_unknown<H: Host>(
    host: &H,
    agent: &Arc<Agent>,
    mut rec: MigrationRecord,
    addr: SocketAddr,
) -> MigrationRecord {
    let found = agent
        .containers()
        .get(&rec.container)
        .filter(|c| c.state == ContainerState::Migrating)
        .map(|c| (c.pid, c.net.clone(), c.meta.spec.rootfs.clone()));
    let Some((pid, net, rootfs)) = found else {
        tracing::warn!(migration = %rec.id, container = %rec.container, "unknown outcome: the container is no longer frozen here; nothing to resolve");
        return rec;
    };
    let epoch = super::policy::epoch_of(&rec.id);
    match ask_outcome(host, agent, addr, &rec, epoch).await {
        Ok(true) => {
            tracing::warn!(migration = %rec.id, container = %rec.container, "unknown outcome resolved: the destination committed; the frozen copy here is killed");
            if let Some(c) = agent.containers().get_mut(&rec.container) {
                c.state = ContainerState::MigratedAway;
                c.migrated_to = Some(rec.destination.clone());
            }
            let host_rootfs = matches!(rootfs, rebalancer_proto::RootfsSpec::Host);
            commit::release_source(host, agent, &rec.container, pid, &net, host_rootfs).await;
            let why = format!(
                "{}; resolved: {} committed",
                rec.error.take().unwrap_or_default(),
                rec.destination
            );
            finish(&mut rec, MigrationState::Succeeded, Some(why));
            agent.publish(&rec);
            agent.persist();
        }
        Ok(false) => {
            tracing::warn!(migration = %rec.id, container = %rec.container, "unknown outcome resolved: the destination did not commit; resuming the container here");
            commit::resume_source(host, agent, &rec.id, &rec.container, pid, &net).await;
            let why = format!(
                "{}; resolved: {} did not commit, the container runs here again",
                rec.error.take().unwrap_or_default(),
                rec.destination
            );
            finish(&mut rec, MigrationState::RolledBack, Some(why));
            agent.publish(&rec);
            agent.persist();
        }
        Err(e) => {
            tracing::warn!(migration = %rec.id, container = %rec.container, error = %e.chain(), "unknown outcome still unresolved; the container stays frozen");
        }
    }
    rec
}

/// Per-call limit of one outcome question (connect and answer).
pub const OUTCOME_CALL: Duration = Duration::from_secs(5);
/// Outcome questions before the end is reported unknown, with a doubling pause in between
/// (0.5, 1, 2, 4 s: about 23 s at most with [`OUTCOME_CALL`]).
pub const OUTCOME_ATTEMPTS: u32 = 5;

/// Asks `addr` whether it committed `rec` (fencing it if not), with [`OUTCOME_ATTEMPTS`]
/// bounded attempts and a doubling pause on `host`'s clock. `Err`: the last failure.
pub async fn ask_outcome<H: Host>(
    host: &H,
    agent: &Agent,
    addr: SocketAddr,
    rec: &MigrationRecord,
    epoch: u64,
) -> Result<bool, AgentError> {
    let mut pause = Duration::from_millis(500);
    let mut last = AgentError::Internal("no outcome question was asked".into());
    for attempt in 1..=OUTCOME_ATTEMPTS {
        let ask = async {
            let mut link = host.connect(&agent.cfg, addr, OUTCOME_CALL).await?;
            link.call(&PeerRequest::Outcome {
                migration: rec.id.clone(),
                container: rec.container.clone(),
                epoch: Some(epoch),
            })
            .await
        };
        match within(host, OUTCOME_CALL, ask).await {
            Some(Ok(PeerReply::Outcome { committed })) => return Ok(committed),
            Some(Ok(other)) => {
                last = AgentError::Peer(format!("unexpected answer to outcome: {other:?}"))
            }
            Some(Err(e)) => last = e,
            None => {
                last = AgentError::Timeout(format!(
                    "no answer to outcome within {} s",
                    OUTCOME_CALL.as_secs()
                ))
            }
        }
        tracing::warn!(migration = %rec.id, destination = %rec.destination, attempt, error = %last.chain(), "outcome question failed");
        if attempt < OUTCOME_ATTEMPTS {
            host.sleep(pause).await;
            pause *= 2;
        }
    }
    Err(last)
}
