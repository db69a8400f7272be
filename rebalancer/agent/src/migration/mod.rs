//! A migration, split by role: [`source`] (pre-flight, dump, transfer, the commit decision),
//! [`destination`] (the peer server and its incoming transaction), [`restore_step`] (Slurm
//! tasks restored by a step on the destination), [`commit`] (what commit and rollback do on
//! each side), [`policy`] (pure decisions: mode, pre-copy convergence, room), [`room`] (what
//! arrivals reserve, announced image sizes) and [`link`] (the source's post-copy page link). The state
//! machines reach the host only through [`host`]; [`sim`] is a simulated host for unit tests.
//! See `LIFECYCLE.md` for the transaction rule.

use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::{now_millis, MigrationRecord, MigrationState, Phase, PhaseRecord};

use crate::agent::Agent;
use crate::error::AgentError;
use crate::peer::{PeerConn, PeerRequest};

pub mod cancel;
pub mod commit;
pub mod destination;
pub mod heartbeat;
pub mod hold;
pub mod host;
pub mod link;
pub mod page_server;
pub mod page_server_open;
pub mod pause;
pub mod policy;
pub mod resolve;
pub mod restore_step;
pub mod room;
pub mod sim;
#[cfg(test)]
mod sim_tests;
pub mod simrun;
pub mod source;
pub mod spool;
pub mod step_user;
pub mod timing;

/// Phase bookkeeping on a record.
pub fn enter(rec: &mut MigrationRecord, phase: Phase) {
    let now = now_millis();
    if let Some(last) = rec.phases.last_mut() {
        if last.ended_at.is_none() {
            last.ended_at = Some(now);
        }
    }
    rec.phases.push(PhaseRecord {
        phase,
        started_at: now,
        ended_at: None,
    });
}

pub fn finish(rec: &mut MigrationRecord, state: MigrationState, error: Option<String>) {
    let now = now_millis();
    if let Some(last) = rec.phases.last_mut() {
        if last.ended_at.is_none() {
            last.ended_at = Some(now);
        }
    }
    rec.state = state;
    rec.error = error;
    rec.ended_at = Some(now);
    rec.stats.total_ms = Some(now.saturating_sub(rec.started_at));
}

/// Records a task's final status and tells the node it came from (which does the same, up the
/// chain of migrations).
pub fn task_final(agent: &Arc<Agent>, id: &str, status: i32, node: &str) {
    let Some((src, addr)) = agent.record_final(id, status, node) else {
        return;
    };
    let agent = agent.clone();
    let (id, node) = (id.to_string(), node.to_string());
    tokio::spawn(async move {
        for attempt in 0..5u64 {
            let r = async {
                let a: std::net::SocketAddr = addr
                    .parse()
                    .map_err(|_| AgentError::BadRequest(format!("bad agent address {addr}")))?;
                let mut conn = PeerConn::connect(&agent.cfg, a, Duration::from_secs(10)).await?;
                conn.call(&PeerRequest::TaskEnded {
                    container: id.clone(),
                    wait_status: status,
                    node: node.clone(),
                })
                .await
            }
            .await;
            match r {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(container = %id, source = %src, error = %e.chain(), attempt, "cannot tell the source node the task's final status");
                    tokio::time::sleep(Duration::from_secs(1 + attempt)).await;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebalancer_proto::MigrationMode::*;

    #[test]
    fn phases_are_closed_in_order() {
        let mut rec = MigrationRecord {
            id: "m".into(),
            container: "c".into(),
            task: None,
            source: "a".into(),
            destination: "b".into(),
            requested_mode: StopAndCopy,
            mode: Some(StopAndCopy),
            mode_reason: None,
            state: MigrationState::Running,
            phases: vec![],
            stats: Default::default(),
            error: None,
            started_at: now_millis(),
            ended_at: None,
            cancelled_by: None,
        };
        enter(&mut rec, Phase::Prepare);
        enter(&mut rec, Phase::Dump);
        assert!(rec.phases[0].ended_at.is_some());
        assert!(rec.phases[1].ended_at.is_none());
        finish(&mut rec, MigrationState::Succeeded, None);
        assert!(rec.phases.iter().all(|p| p.ended_at.is_some()));
        assert!(rec.stats.total_ms.is_some());
        assert!(rec.state.is_terminal());
    }
}
