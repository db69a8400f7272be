//! The control socket: `Hello`, then [`ControlRequest`]s answered by [`ControlResponse`]s.
//! Callers are identified with `SO_PEERCRED`; see [`crate::auth`].

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::channel::{AsyncChannel, ChannelConfig};
use rebalancer_proto::control::{
    ControlReply, ControlRequest, ControlResponse, DecisionOutcome, DecisionRecord, MigrationEntry,
    PlanItem, PolicyCheckReport, PolicyStatus,
};
use rebalancer_proto::frame::FrameKind;
use rebalancer_proto::{now_millis, ErrorCode, ErrorReply, Hello, MigrationMode, ProtoError, Role};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::auth::Caller;
use crate::daemon::{err, Controller, Progress};
use crate::planner::{choose_destination, PlanAction, PlannedMove};

/// Control requests are small; a policy check carries a few files.
const MAX_REQUEST: u32 = 4 * 1024 * 1024;

/// Binds the control socket (replacing a stale one) so that any local user can connect;
/// permissions are enforced per request from the peer's credentials.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, ctl: Arc<Controller>) {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctl = ctl.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(sock, ctl).await {
                debug!("control connection ended: {e}");
            }
        });
    }
}

/// A client connection: the channel over the control socket.
type Conn = AsyncChannel<UnixStream>;

/// How long a client may take to send its `Hello`; afterwards a connection may stay quiet.
const HELLO_WAIT: Duration = Duration::from_secs(10);

async fn send<T: serde::Serialize>(
    s: &mut Conn,
    kind: FrameKind,
    id: u32,
    msg: &T,
) -> Result<(), ProtoError> {
    s.send(kind, id, msg).await
}

async fn connection(sock: UnixStream, ctl: Arc<Controller>) -> Result<(), ProtoError> {
    let cred = sock.peer_cred()?;
    let caller = Caller {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let cfg = ChannelConfig::default()
        .max_frame(MAX_REQUEST)
        .idle_timeout(Some(HELLO_WAIT))
        .call_timeout(None);
    // The channel answers a bad header, a non-Hello or a peer without a common version with
    // an error response before failing here.
    let mut sock = AsyncChannel::accept(
        sock,
        cfg,
        Hello::new(Role::Controller, crate::agents::SOFTWARE),
        |_| Ok(()),
    )
    .await?;
    sock.set_idle_timeout(None);
    loop {
        let f = sock.recv_frame().await?;
        let id = f.header.id;
        let req: ControlRequest = match f.decode(FrameKind::Request, "request") {
            Ok(r) => r,
            Err(e) => {
                let r = ControlResponse::error(ErrorCode::BadRequest, e.to_string());
                send(&mut sock, FrameKind::Response, id, &r).await?;
                continue;
            }
        };
        debug!(uid = caller.uid, op = req.op(), "control request");
        if let Err(m) = ctl.access.check(&caller, &req) {
            info!(
                uid = caller.uid,
                pid = caller.pid,
                op = req.op(),
                "refused: {m}"
            );
            let r = ControlResponse::error(ErrorCode::PermissionDenied, m);
            send(&mut sock, FrameKind::Response, id, &r).await?;
            continue;
        }
        let resp = match handle(&ctl, &caller, req, &mut sock, id).await {
            Ok(r) => ControlResponse::Ok(r),
            Err(e) => ControlResponse::Error(e),
        };
        send(&mut sock, FrameKind::Response, id, &resp).await?;
    }
}

fn journal_err(e: crate::journal::JournalError) -> ErrorReply {
    err(ErrorCode::Internal, format!("journal: {e}"))
}

/// Handles one request; `sock` carries events for watched requests.
pub async fn handle(
    ctl: &Arc<Controller>,
    caller: &Caller,
    req: ControlRequest,
    sock: &mut Conn,
    id: u32,
) -> Result<ControlReply, ErrorReply> {
    match req {
        ControlRequest::Ping => Ok(ControlReply::Pong {
            software: crate::agents::SOFTWARE.into(),
        }),
        ControlRequest::ShowNodes { name } => {
            let mut nodes = ctl.node_statuses();
            if let Some(n) = name {
                nodes.retain(|x| x.name == n);
                if nodes.is_empty() {
                    return Err(err(ErrorCode::NotFound, format!("no node named '{n}'")));
                }
            }
            Ok(ControlReply::Nodes { nodes })
        }
        ControlRequest::ShowContainers { id: cid, job_id } => {
            let mut containers: Vec<_> = ctl
                .containers()
                .into_iter()
                .filter(|c| ctl.access.sees(caller, Some(c.uid)))
                .filter(|c| job_id.is_none_or(|j| c.task.as_ref().is_some_and(|t| t.job_id == j)))
                .collect();
            containers.sort_by(|a, b| a.id.cmp(&b.id));
            if let Some(want) = cid {
                containers.retain(|c| c.id == want);
                if containers.is_empty() {
                    return Err(err(
                        ErrorCode::NotFound,
                        format!("no container '{want}' (or not yours)"),
                    ));
                }
            }
            Ok(ControlReply::Containers { containers })
        }
        ControlRequest::ShowMigrations { id: mid, active } => {
            let mut migrations: Vec<MigrationEntry> = ctl
                .migrations()?
                .into_iter()
                .filter(|m| ctl.access.sees(caller, m.uid))
                .filter(|m| !active || !m.record.state.is_terminal())
                .collect();
            if let Some(want) = mid {
                migrations.retain(|m| m.record.id == want || m.record.id.starts_with(&want));
                if migrations.is_empty() {
                    return Err(err(
                        ErrorCode::NotFound,
                        format!("no migration '{want}' (or not yours)"),
                    ));
                }
            }
            Ok(ControlReply::Migrations { migrations })
        }
        ControlRequest::ShowPolicies { name } => {
            let mut policies = policy_statuses(ctl);
            if let Some(n) = name {
                policies.retain(|p| p.name == n);
                if policies.is_empty() {
                    return Err(err(ErrorCode::NotFound, format!("no policy named '{n}'")));
                }
            }
            Ok(ControlReply::Policies { policies })
        }
        ControlRequest::PolicyCheck { sources } => {
            let report = if sources.is_empty() {
                match crate::planner::read_sources(&ctl.cfg.policies) {
                    Ok(s) => ctl.planner().check(&s),
                    Err(e) => PolicyCheckReport {
                        ok: false,
                        policies: vec![],
                        errors: vec![e],
                    },
                }
            } else {
                ctl.planner().check(&sources)
            };
            Ok(ControlReply::PolicyCheck { report })
        }
        ControlRequest::PolicyReload => {
            ctl.reload_policies().map_err(|errors| {
                err(
                    ErrorCode::BadRequest,
                    format!(
                        "policies not reloaded, the old set stays:\n{}",
                        errors.join("\n")
                    ),
                )
            })?;
            info!(uid = caller.uid, "policy reload requested");
            Ok(ControlReply::Policies {
                policies: policy_statuses(ctl),
            })
        }
        ControlRequest::UpdatePolicy { name, state } => {
            if !ctl.planner().policies().iter().any(|p| p.name == name) {
                return Err(err(
                    ErrorCode::NotFound,
                    format!("no policy named '{name}'"),
                ));
            }
            ctl.set_policy_state(&name, state)?;
            Ok(ControlReply::Policies {
                policies: policy_statuses(ctl)
                    .into_iter()
                    .filter(|p| p.name == name)
                    .collect(),
            })
        }
        ControlRequest::History { limit } => {
            let limit = limit.unwrap_or(50).clamp(1, 100_000) as usize;
            // Filter before limiting so that a user gets up to `limit` of their own.
            let all = ctl.journal.decisions(usize::MAX).map_err(journal_err)?;
            let mut decisions: Vec<DecisionRecord> = all
                .into_iter()
                .rev()
                .filter(|d| ctl.access.sees(caller, d.uid))
                .take(limit)
                .collect();
            decisions.reverse();
            Ok(ControlReply::History { decisions })
        }
        ControlRequest::Plan => {
            let input = ctl.plan_input();
            let states = ctl.state().policy_states.clone();
            let moves = ctl.planner().preview(&input, &states);
            let moves = moves
                .into_iter()
                .filter_map(|m| {
                    let c = input.containers.iter().find(|c| c.id == m.container)?;
                    if !ctl.access.sees(caller, Some(c.uid)) {
                        return None;
                    }
                    let action = match states.get(&m.policy) {
                        Some(rebalancer_proto::control::PolicyState::DryRun) => PlanAction::DryRun,
                        _ => m.action,
                    };
                    Some(PlanItem {
                        job_id: (c.job_id > 0).then_some(c.job_id),
                        action: action.as_str().into(),
                        policy: m.policy,
                        container: m.container,
                        source: m.source,
                        destination: m.destination,
                        mode: m.mode,
                        why: m.why,
                    })
                })
                .collect();
            Ok(ControlReply::Plan { moves })
        }
        ControlRequest::Migrate {
            target,
            destination,
            mode,
            watch,
        } => {
            let containers = ctl.resolve_target(&target);
            if containers.is_empty() {
                return Err(err(
                    ErrorCode::NotFound,
                    format!("{target}: no running container"),
                ));
            }
            let why = format!("rebalctl migrate {target} by uid {}", caller.uid);
            operator_moves(
                ctl,
                caller,
                containers,
                destination,
                mode,
                why,
                watch,
                sock,
                id,
            )
            .await
        }
        ControlRequest::Evacuate { node, mode, watch } => {
            if !ctl.node_names().contains(&node) {
                return Err(err(ErrorCode::NotFound, format!("no node named '{node}'")));
            }
            let containers: Vec<_> = ctl
                .plan_input()
                .containers
                .into_iter()
                .filter(|c| c.node == node && c.migratable)
                .collect();
            if containers.is_empty() {
                return Ok(ControlReply::Migrated {
                    decisions: vec![],
                    migrations: vec![],
                });
            }
            let why = format!("rebalctl evacuate node={node} by uid {}", caller.uid);
            operator_moves(ctl, caller, containers, None, mode, why, watch, sock, id).await
        }
    }
}

pub fn policy_statuses(ctl: &Controller) -> Vec<PolicyStatus> {
    let infos = ctl.planner().policies();
    let st = ctl.state();
    infos
        .into_iter()
        .map(|p| PolicyStatus {
            state: st
                .policy_states
                .get(&p.name)
                .copied()
                .unwrap_or(p.default_state),
            decisions: st.decision_counts.get(&p.name).copied().unwrap_or(0),
            name: p.name,
            kind: p.kind,
            action: p.action.as_str().into(),
            priority: p.priority,
            description: p.description,
            source: p.source,
        })
        .collect()
}

/// Operator migrations: placed, journaled, started within the in-flight limits (waiting for a
/// slot when needed), and, with `watch`, followed to their end with events on `sock`.
#[allow(clippy::too_many_arguments)]
async fn operator_moves(
    ctl: &Arc<Controller>,
    caller: &Caller,
    containers: Vec<crate::planner::ContainerSnap>,
    destination: Option<String>,
    mode: Option<MigrationMode>,
    why: String,
    watch: bool,
    sock: &mut Conn,
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
                format!("container {} is already migrating", c.id),
            ));
        }
        let dest = match &destination {
            Some(d) if *d == c.node => {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("container {} already runs on {d}", c.id),
                ))
            }
            Some(d) => d.clone(),
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
                    send(sock, FrameKind::Event, id, &*ev)
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
