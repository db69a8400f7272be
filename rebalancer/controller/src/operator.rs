//! Operator migrations (`rebalctl migrate` and `evacuate`): placed all at once, journaled,
//! started within the in-flight limits, and followed to their end for a watching client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::channel::AsyncChannel;
use rebalancer_proto::control::{ControlReply, DecisionOutcome, DecisionRecord, MigrationEntry};
use rebalancer_proto::frame::FrameKind;
use rebalancer_proto::{now_millis, ErrorCode, ErrorReply, MigrationMode};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::info;

use crate::auth::Caller;
use crate::daemon::{err, Controller, Progress};
use crate::planner::{choose_destination, destination_refusal, PlanAction, PlannedMove};

/// Operator migrations: placed, journaled, started within the in-flight limits (waiting for a
/// slot when needed), and, with `watch`, followed to their end with events on `sock`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn operator_moves(
    ctl: &Arc<Controller>,
    caller: &Caller,
    containers: Vec<crate::planner::ContainerSnap>,
    destination: Option<String>,
    mode: Option<MigrationMode>,
    why: String,
    watch: bool,
    sock: &mut AsyncChannel<UnixStream>,
    id: u32,
) -> Result<ControlReply, ErrorReply> {
    let policy = format!("operator:{}", caller.uid);
    let mode = mode.unwrap_or(ctl.cfg.migration.default_mode);
    let input = ctl.plan_input();
    if let Some(d) = &destination {
        if !input.nodes.iter().any(|n| n.name == *d) {
            return Err(err(ErrorCode::NotFound, format!("no node named '{d}'")));
        }
    }
    // Place everything first so that one request either starts or explains itself.
    let mut reserved: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    let mut moves = Vec::new();
    for c in &containers {
        if ctl.state().in_flight.contains_key(&c.id) {
            return Err(err(
                ErrorCode::Busy,
                format!(
                    "container {} is already migrating, or its last migration's outcome is still being resolved: ask again once it ended",
                    c.id
                ),
            ));
        }
        let dest = match &destination {
            Some(d) if *d == c.node => {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("container {} already runs on {d}", c.id),
                ))
            }
            Some(d) => {
                // Refused now, with the reason, rather than when the expansion times out.
                let holds = ctl
                    .state()
                    .jobs
                    .get(&c.job_id)
                    .is_some_and(|j| j.nodes.contains(d));
                if let Some(why) = destination_refusal(&input, c, d, &reserved, holds) {
                    return Err(err(ErrorCode::NoRoom, why));
                }
                d.clone()
            }
            None => choose_destination(&input, c, &reserved)
                .map_err(|e| err(ErrorCode::NoRoom, format!("container {}: {e}", c.id)))?,
        };
        let r = reserved.entry(dest.clone()).or_default();
        r.0 += c.cpus;
        r.1 += c.rss_mb;
        moves.push((
            c.clone(),
            PlannedMove {
                policy: policy.clone(),
                container: c.id.clone(),
                source: c.node.clone(),
                destination: dest,
                mode,
                max_downtime_ms: None,
                why: why.clone(),
                action: PlanAction::Automatic,
            },
        ));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
    let total = moves.len();
    for (c, mv) in moves {
        let ctl = ctl.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + ctl.cfg.migration.timeout;
            let mut queued = false;
            loop {
                match ctl.try_reserve(&mv, &c) {
                    Ok(()) => break,
                    Err(why) if tokio::time::Instant::now() < deadline => {
                        if !queued {
                            info!(container = %mv.container, "operator migration waits for a slot: {why}");
                            let _ = tx.send(Progress::Queued {
                                container: mv.container.clone(),
                            });
                            queued = true;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(why) => {
                        let _ = tx.send(Progress::Ended {
                            container: mv.container.clone(),
                            decision: Box::new(skipped(&mv, &c, &why)),
                            result: Err(err(ErrorCode::Busy, why)),
                        });
                        return;
                    }
                }
            }
            let d = ctl.decision(&mv, &c, DecisionOutcome::Started, None);
            match ctl.journal.record_decision(d) {
                Ok(d) => {
                    ctl.metrics.record_decision("operator", "started");
                    info!(policy = %d.policy, container = %d.container, source = %d.source, destination = %d.destination, mode = %d.mode, "decision: {}", d.why);
                    ctl.launch(d, None, Some(tx));
                }
                Err(e) => {
                    ctl.state
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .in_flight
                        .remove(&mv.container);
                    let _ = tx.send(Progress::Ended {
                        container: mv.container.clone(),
                        decision: Box::new(skipped(&mv, &c, "journal error")),
                        result: Err(err(ErrorCode::Internal, format!("journal: {e}"))),
                    });
                }
            }
        });
    }
    drop(tx);

    let mut decisions = Vec::new();
    let mut started: BTreeMap<String, MigrationEntry> = BTreeMap::new();
    let mut accounted = std::collections::BTreeSet::new();
    let mut errors = Vec::new();
    let mut ended = 0;
    while let Some(p) = rx.recv().await {
        match p {
            Progress::Queued { container } => {
                accounted.insert(container);
            }
            Progress::Started(e) => {
                accounted.insert(e.record.container.clone());
                started.insert(e.record.container.clone(), *e);
            }
            Progress::Event(ev) => {
                if watch {
                    sock.send(FrameKind::Event, id, &*ev)
                        .await
                        .map_err(|e| err(ErrorCode::Internal, format!("client went away: {e}")))?;
                }
            }
            Progress::Ended {
                container,
                decision,
                result,
            } => {
                ended += 1;
                accounted.insert(container.clone());
                decisions.push(*decision);
                match result {
                    Ok(e) => {
                        started.insert(container, *e);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        if ended == total || (!watch && accounted.len() == total) {
            break;
        }
    }
    let migrations: Vec<MigrationEntry> = started.into_values().collect();
    if watch {
        // The exit status reflects the worst outcome.
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        if let Some(m) = migrations
            .iter()
            .find(|m| m.record.state != rebalancer_proto::MigrationState::Succeeded)
        {
            let code = match m.record.state {
                rebalancer_proto::MigrationState::RolledBack => ErrorCode::RolledBack,
                _ => ErrorCode::Internal,
            };
            return Err(err(
                code,
                format!(
                    "migration {} of {} ended {}: {}",
                    m.record.id,
                    m.record.container,
                    m.record.state,
                    m.record.error.as_deref().unwrap_or("no detail")
                ),
            ));
        }
    } else if migrations.is_empty() {
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
    }
    Ok(ControlReply::Migrated {
        decisions,
        migrations,
    })
}

fn skipped(mv: &PlannedMove, c: &crate::planner::ContainerSnap, why: &str) -> DecisionRecord {
    DecisionRecord {
        seq: 0,
        at: now_millis(),
        policy: mv.policy.clone(),
        container: mv.container.clone(),
        task: None,
        uid: Some(c.uid),
        source: mv.source.clone(),
        destination: mv.destination.clone(),
        mode: mv.mode,
        why: mv.why.clone(),
        outcome: DecisionOutcome::Skipped,
        detail: Some(why.to_string()),
        migration: None,
    }
}
