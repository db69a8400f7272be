//! `rebalctl cancel`: finds the running migrations a [`CancelTarget`] names and forwards the
//! cancel to each one's source agent, which alone knows whether the migration is still before
//! its commit point (then it rolls back as on any failure, and the controller undoes the
//! allocation when the rolled-back record comes in, as for every rollback) or not (refused:
//! `too late: migration M is committing`).

use std::sync::Arc;

use rebalancer_proto::control::{CancelOutcome, CancelTarget, ControlReply, MigrationEntry};
use rebalancer_proto::{ErrorCode, ErrorReply, Reply, Request};
use tracing::{info, warn};

use crate::agents::AgentError;
use crate::auth::Caller;
use crate::daemon::{err, Controller};

/// Who a cancel names in the record, the journal and the logs: `uid 1000 (alice)`.
pub fn cancelled_by(caller: &Caller) -> String {
    let uid = nix::unistd::Uid::from_raw(caller.uid);
    match nix::unistd::User::from_uid(uid).ok().flatten() {
        Some(u) => format!("uid {} ({})", caller.uid, u.name),
        None => format!("uid {}", caller.uid),
    }
}

/// Handles [`rebalancer_proto::control::ControlRequest::Cancel`].
pub async fn cancel(
    ctl: &Arc<Controller>,
    caller: &Caller,
    target: CancelTarget,
) -> Result<ControlReply, ErrorReply> {
    let running = running(ctl, &target)?;
    let by = cancelled_by(caller);
    info!(uid = caller.uid, target = %target, migrations = running.len(), "cancel requested");
    let mut cancels = Vec::new();
    let mut refusals = Vec::new();
    for e in running {
        let r = &e.record;
        let answer = match ctl.agent(&r.source) {
            Some(a) => {
                a.call(Request::CancelMigration {
                    id: r.id.clone(),
                    by: by.clone(),
                })
                .await
            }
            None => Err(AgentError::Remote(err(
                ErrorCode::Unreachable,
                format!("no agent address for node {}", r.source),
            ))),
        };
        let (accepted, message, code) = match answer {
            Ok(Reply::Migration { .. }) => {
                info!(migration = %r.id, container = %r.container, source = %r.source, by = %by, "cancel accepted; the source rolls back");
                (
                    true,
                    format!("cancel accepted; {} rolls it back", r.source),
                    None,
                )
            }
            Ok(_) => {
                let e = err(
                    ErrorCode::Internal,
                    format!("{} answered cancel with an unexpected reply", r.source),
                );
                refusals.push(e.clone());
                (false, e.message, Some(e.code))
            }
            Err(AgentError::Remote(e)) => {
                warn!(migration = %r.id, source = %r.source, "cancel refused: {}", e.message);
                refusals.push(e.clone());
                (false, e.message, Some(e.code))
            }
            Err(other) => {
                let e = err(
                    other.code(),
                    format!("cannot reach {} to cancel: {other}", r.source),
                );
                warn!(migration = %r.id, source = %r.source, "cancel not delivered: {}", e.message);
                refusals.push(e.clone());
                (false, e.message, Some(e.code))
            }
        };
        cancels.push(CancelOutcome {
            migration: r.id.clone(),
            container: r.container.clone(),
            source: r.source.clone(),
            accepted,
            message,
            code,
        });
    }
    // One migration, or none accepted: the refusal is the answer (and the exit status).
    if !cancels.iter().any(|c| c.accepted) || matches!(target, CancelTarget::Migration { .. }) {
        if let Some(e) = refusals.into_iter().next() {
            return Err(e);
        }
    }
    Ok(ControlReply::Cancelled { cancels })
}

/// The running migrations `target` names; an error naming why when there is none.
fn running(ctl: &Controller, target: &CancelTarget) -> Result<Vec<MigrationEntry>, ErrorReply> {
    let live: Vec<MigrationEntry> = ctl
        .state()
        .in_flight
        .values()
        .filter_map(|f| f.entry.clone())
        .filter(|e| !e.record.state.is_terminal())
        .collect();
    match target {
        CancelTarget::Migration { id } => {
            let found: Vec<MigrationEntry> = live
                .into_iter()
                .filter(|e| e.record.id == *id || e.record.id.starts_with(id.as_str()))
                .collect();
            match found.len() {
                1 => Ok(found),
                0 => Err(not_running(ctl, id)),
                n => Err(err(
                    ErrorCode::BadRequest,
                    format!("'{id}' names {n} running migrations; give more of the id"),
                )),
            }
        }
        CancelTarget::Job { job_id } => {
            let found: Vec<MigrationEntry> = live
                .into_iter()
                .filter(|e| e.record.task.as_ref().is_some_and(|t| t.job_id == *job_id))
                .collect();
            if found.is_empty() {
                // Reserved, but not accepted by its source yet (the allocation is being
                // expanded): there is no migration to cancel for a moment.
                let starting = ctl
                    .state()
                    .in_flight
                    .values()
                    .find(|f| {
                        f.entry.is_none()
                            && f.decision
                                .task
                                .as_ref()
                                .is_some_and(|t| t.job_id == *job_id)
                    })
                    .map(|f| f.decision.container.clone());
                return Err(match starting {
                    Some(c) => err(
                        ErrorCode::Busy,
                        format!(
                            "the migration of {c} (job {job_id}) is starting; cancel it again in a moment"
                        ),
                    ),
                    None => err(
                        ErrorCode::NotFound,
                        format!("job {job_id} has no running migration"),
                    ),
                });
            }
            Ok(found)
        }
    }
}

/// Why migration `id` cannot be cancelled although it was named: it ended, or never was.
fn not_running(ctl: &Controller, id: &str) -> ErrorReply {
    let journaled = ctl.migrations().ok().and_then(|all| {
        all.into_iter()
            .find(|m| m.record.id == id || m.record.id.starts_with(id))
    });
    match journaled {
        Some(m) if m.record.state.is_terminal() => err(
            ErrorCode::NotFound,
            format!(
                "migration {} is not running: it ended {}",
                m.record.id, m.record.state
            ),
        ),
        _ => err(ErrorCode::NotFound, format!("no running migration '{id}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_names_the_caller() {
        let c = |uid| Caller {
            uid,
            gid: uid,
            pid: Some(42),
        };
        // Root has a name on every machine; a uid nobody has keeps the number alone.
        assert_eq!(cancelled_by(&c(0)), "uid 0 (root)");
        assert_eq!(cancelled_by(&c(4_000_000_001)), "uid 4000000001");
    }
}
