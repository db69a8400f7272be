//! The control socket: `Hello`, then [`ControlRequest`]s answered by [`ControlResponse`]s.
//! Callers are identified with `SO_PEERCRED`; see [`crate::auth`].
//!
//! Connections are bounded (`controller.max_connections`, and per non-root uid
//! `controller.max_connections_per_uid`): beyond a limit a connection gets a `busy` error
//! reply. A client has [`HELLO_WAIT`] for its hello, then `controller.idle_timeout_s` between
//! requests; a request must arrive whole within that time, so a slow sender is closed too.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::channel::{AsyncChannel, ChannelConfig};
use rebalancer_proto::control::MigrateTarget;
use rebalancer_proto::control::{
    ControlReply, ControlRequest, ControlResponse, DecisionRecord, MigrationEntry, PlanItem,
    PolicyCheckReport, PolicyStatus,
};
use rebalancer_proto::frame::FrameKind;
use rebalancer_proto::gate::{refuse_async, Gate};
use rebalancer_proto::{ErrorCode, ErrorReply, Hello, ProtoError, Role};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::auth::Caller;
use crate::daemon::{err, Controller};

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
    let gate = Gate::new("controller control socket", ctl.cfg.control.gate);
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
        let gate = gate.clone();
        tokio::spawn(async move {
            match connection(sock, ctl, &gate).await {
                Ok(()) | Err(ProtoError::Closed) => {}
                // DEBUG like the rest: a flood would write a line per connection.
                Err(e @ ProtoError::Timeout { .. }) => debug!("control connection closed: {e}"),
                Err(e) => debug!("control connection ended: {e}"),
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

async fn connection(
    mut sock: UnixStream,
    ctl: Arc<Controller>,
    gate: &Arc<Gate>,
) -> Result<(), ProtoError> {
    let cred = sock.peer_cred()?;
    let caller = Caller {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let key = format!("uid {}", caller.uid);
    // Root's connections count towards the total only.
    let _permit = match gate.try_enter(&key, caller.uid != 0) {
        Ok(p) => p,
        Err(r) => {
            if r.log {
                warn!(
                    uid = caller.uid,
                    pid = caller.pid,
                    refused_total = r.refused,
                    "connection refused: {}",
                    r.message
                );
            }
            refuse_async(&mut sock, &r).await;
            return Ok(());
        }
    };
    let idle = ctl.cfg.control.idle_timeout;
    let cfg = ChannelConfig::default()
        .max_frame(MAX_REQUEST)
        .idle_timeout(Some(HELLO_WAIT))
        // A server makes no calls: this bounds each write (a client that stops reading).
        .call_timeout(Some(idle));
    // The channel answers a bad header, a non-Hello or a peer without a common version with
    // an error response before failing here.
    let mut sock = AsyncChannel::accept(
        sock,
        cfg,
        Hello::new(Role::Controller, crate::agents::SOFTWARE),
        |_| Ok(()),
    )
    .await?;
    sock.set_idle_timeout(Some(idle));
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
        ControlRequest::ShowBlocks { node } => Ok(ControlReply::Blocks {
            blocks: crate::daemon::ipam::show(ctl, node.as_deref())?,
        }),
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
            let (moves, _) = crate::explain::explain(ctl, caller, None, None);
            let moves = moves
                .into_iter()
                .map(|m| PlanItem { held: None, ..m })
                .collect();
            Ok(ControlReply::Plan { moves })
        }
        ControlRequest::Explain { job_id, node } => {
            if let Some(n) = &node {
                if !ctl.node_names().contains(n) {
                    return Err(err(ErrorCode::NotFound, format!("no node named '{n}'")));
                }
            }
            let (moves, unmoved) = crate::explain::explain(ctl, caller, job_id, node.as_deref());
            Ok(ControlReply::Explanation { moves, unmoved })
        }
        ControlRequest::Migrate {
            target,
            destination,
            mode,
            watch,
        } => {
            let containers = ctl.resolve_target(&target);
            if containers.is_empty() {
                let (job, step) = match &target {
                    MigrateTarget::Job { job_id } => (Some(*job_id), None),
                    MigrateTarget::Step { job_id, step_id } => (Some(*job_id), Some(*step_id)),
                    MigrateTarget::Container { .. } => (None, None),
                };
                let why = job
                    .map(|j| crate::explain::unmovable(ctl, None, Some(j), step))
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|d| ctl.access.sees(caller, d.uid))
                    .filter_map(|d| d.detail)
                    .collect::<Vec<_>>();
                let message = if why.is_empty() {
                    format!("{target}: no running container (Slurm does not list it as running)")
                } else {
                    format!("{target}: nothing to migrate: {}", why.join("; "))
                };
                return Err(err(ErrorCode::NotFound, message));
            }
            let why = format!("rebalctl migrate {target} by uid {}", caller.uid);
            crate::operator::operator_moves(
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
        ControlRequest::Cancel { target } => crate::cancel::cancel(ctl, caller, target).await,
        ControlRequest::Watch { id: want } => {
            crate::attach::watch(ctl, caller, &want, sock, id).await
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
            // What stays on the node, named in the answer so that an evacuation that leaves
            // work behind says so.
            let stays: Vec<DecisionRecord> =
                crate::explain::unmovable(ctl, Some(&node), None, None)
                    .into_iter()
                    .filter(|d| ctl.access.sees(caller, d.uid))
                    .collect();
            if containers.is_empty() {
                return Ok(ControlReply::Migrated {
                    decisions: stays,
                    migrations: vec![],
                });
            }
            let why = format!("rebalctl evacuate node={node} by uid {}", caller.uid);
            let mut reply = crate::operator::operator_moves(
                ctl, caller, containers, None, mode, why, watch, sock, id,
            )
            .await?;
            if let ControlReply::Migrated { decisions, .. } = &mut reply {
                decisions.extend(stays);
            }
            Ok(reply)
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
