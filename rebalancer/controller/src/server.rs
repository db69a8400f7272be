//! The control socket: `Hello`, then [`ControlRequest`]s answered by [`ControlResponse`]s.
//! Callers are identified with `SO_PEERCRED`; see [`crate::auth`].
//!
//! Connections are bounded (`controller.max_connections`, and per non-root uid
//! `controller.max_connections_per_uid`): beyond a limit a connection gets a `busy` error
//! reply. A client has [`HELLO_WAIT`] for its hello, then `controller.idle_timeout_s` between
//! requests; a request must arrive whole within that time, so a slow sender is closed too.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::channel::{AsyncChannel, ChannelConfig};
use rebalancer_proto::control::MigrateTarget;
use rebalancer_proto::control::{
    ControlReply, ControlRequest, ControlResponse, DecisionOutcome, DecisionRecord, MigrationEntry,
    PlanItem, PolicyCheckReport, PolicyStatus, Unmoved,
};
use rebalancer_proto::frame::FrameKind;
use rebalancer_proto::gate::{refuse_async, Gate};
use rebalancer_proto::{
    now_millis, ContainerState, ErrorCode, ErrorReply, Hello, MigrationMode, ProtoError, Role,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::auth::Caller;
use crate::daemon::{err, Controller, Progress};
use crate::planner::{choose_destination, destination_refusal, PlanAction, PlannedMove};

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
            let (moves, _) = explain(ctl, caller, None, None);
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
            let (moves, unmoved) = explain(ctl, caller, job_id, node.as_deref());
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
                    .map(|j| unmovable(ctl, None, Some(j), step))
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
            // What stays on the node, named in the answer so that an evacuation that leaves
            // work behind says so.
            let stays: Vec<DecisionRecord> = unmovable(ctl, Some(&node), None, None)
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
            let mut reply =
                operator_moves(ctl, caller, containers, None, mode, why, watch, sock, id).await?;
            if let ControlReply::Migrated { decisions, .. } = &mut reply {
                decisions.extend(stays);
            }
            Ok(reply)
        }
    }
}

/// Work the rebalancer cannot move, as skipped decisions (not journaled): Slurm jobs running
/// on `node` (or the job `job`) without a container — started without `--migratable` — and
/// containers that are not running (exited, being restored, moved away).
fn unmovable(
    ctl: &Controller,
    node: Option<&str>,
    job: Option<u32>,
    step: Option<u32>,
) -> Vec<DecisionRecord> {
    let containers = ctl.containers();
    let st = ctl.state();
    let mut out = Vec::new();
    let note = |subject: String, uid: Option<u32>, source: &str, detail: String| DecisionRecord {
        seq: 0,
        at: now_millis(),
        policy: "-".into(),
        container: subject,
        task: None,
        uid,
        source: source.into(),
        destination: "-".into(),
        mode: MigrationMode::Auto,
        why: "not movable".into(),
        outcome: DecisionOutcome::Skipped,
        detail: Some(detail),
        migration: None,
    };
    for j in st.jobs.values() {
        if job.is_some_and(|x| x != j.job_id) || !j.state.eq_ignore_ascii_case("RUNNING") {
            continue;
        }
        for n in &j.nodes {
            if node.is_some_and(|x| x != n) {
                continue;
            }
            let here: Vec<_> = containers
                .iter()
                .filter(|c| {
                    c.node == *n
                        && c.task.as_ref().is_some_and(|t| {
                            t.job_id == j.job_id && step.is_none_or(|s| s == t.step_id)
                        })
                })
                .collect();
            if here.is_empty() {
                out.push(note(
                    format!("job {}", j.job_id),
                    Some(j.uid),
                    n,
                    format!(
                        "job {} runs on {n} without a container: it was not started with \
                         --migratable, so its tasks cannot move",
                        j.job_id
                    ),
                ));
            }
            for c in here
                .into_iter()
                .filter(|c| c.state != ContainerState::Running)
            {
                out.push(note(
                    c.id.clone(),
                    Some(c.uid),
                    n,
                    format!(
                        "container {} is {}, not running",
                        c.id,
                        container_state(c.state)
                    ),
                ));
            }
        }
    }
    if job.is_none() {
        // Containers outside any Slurm job the controller knows (agent-run containers).
        for c in containers.iter().filter(|c| {
            node.is_some_and(|n| n == c.node)
                && c.state != ContainerState::Running
                && c.task
                    .as_ref()
                    .is_none_or(|t| !st.jobs.contains_key(&t.job_id))
        }) {
            out.push(note(
                c.id.clone(),
                Some(c.uid),
                &c.node,
                format!(
                    "container {} is {}, not running",
                    c.id,
                    container_state(c.state)
                ),
            ));
        }
    }
    out
}

fn container_state(s: ContainerState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}"))
}

/// What the policies would do now, each move with why the controller holds it back (if it
/// does), and what they considered and leave where it is, with why; only what the caller may
/// see, and only one job's or one node's when asked.
fn explain(
    ctl: &Controller,
    caller: &Caller,
    job_id: Option<u32>,
    node: Option<&str>,
) -> (Vec<PlanItem>, Vec<Unmoved>) {
    let input = ctl.plan_input();
    let states = ctl.state().policy_states.clone();
    let (moves, skips) = ctl.planner().explain(&input, &states);
    let now = now_millis();
    let limits = &ctl.cfg.migration;
    // The reason of each container's last failed start, for the back-off's explanation.
    let failures: BTreeMap<String, String> = ctl
        .journal
        .decisions(1000)
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.outcome == DecisionOutcome::Failed)
        .map(|d| (d.container, d.detail.unwrap_or_default()))
        .collect();
    let wanted = |job: u32, nodes: &[&str]| {
        job_id.is_none_or(|j| j == job) && node.is_none_or(|n| nodes.contains(&n))
    };
    let st = ctl.state();
    let moves = moves
        .into_iter()
        .filter_map(|m| {
            let c = input.containers.iter().find(|c| c.id == m.container)?;
            if !ctl.access.sees(caller, Some(c.uid))
                || !wanted(c.job_id, &[&m.source, &m.destination])
            {
                return None;
            }
            let action = match states.get(&m.policy) {
                Some(rebalancer_proto::control::PolicyState::DryRun) => PlanAction::DryRun,
                _ => m.action,
            };
            let held = if let Some(f) = st.in_flight.get(&m.container) {
                Some(match f.entry.as_ref() {
                    Some(e) => format!("already migrating (migration {})", e.record.id),
                    None => "already migrating".to_string(),
                })
            } else if let Some(until) = st.in_flight.backing_off_until(&m.container, now) {
                Some(format!(
                    "backing off after a failed start until {}{}",
                    rebalancer_proto::iso8601(until),
                    failures
                        .get(&m.container)
                        .filter(|e| !e.is_empty())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ))
            } else if action != PlanAction::Automatic {
                None
            } else if st.in_flight.len() as u32 >= limits.max_in_flight {
                Some(format!(
                    "{} migrations in flight; max_in_flight = {}",
                    st.in_flight.len(),
                    limits.max_in_flight
                ))
            } else {
                [&m.source, &m.destination]
                    .into_iter()
                    .find(|n| st.in_flight.on_node(n) >= limits.max_per_node)
                    .map(|n| {
                        format!(
                            "{n} takes part in {} migrations; max_per_node = {}",
                            st.in_flight.on_node(n),
                            limits.max_per_node
                        )
                    })
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
                held,
            })
        })
        .collect();
    drop(st);
    let mut unmoved: Vec<Unmoved> = skips
        .into_iter()
        .filter(|s| s.worth_telling())
        .filter_map(|s| {
            let c = s
                .container
                .as_ref()
                .and_then(|id| input.containers.iter().find(|c| c.id == *id));
            match (s.container.is_some(), c) {
                // A container the caller may not see, or one gone since.
                (true, None) => return None,
                (true, Some(c)) if !ctl.access.sees(caller, Some(c.uid)) => return None,
                _ => {}
            }
            let job = c.map(|c| c.job_id).filter(|j| *j > 0);
            if node.is_some_and(|n| n != s.node) {
                return None;
            }
            // A node's skip concerns every job with a container there.
            let job_there = |j: u32| {
                input
                    .containers
                    .iter()
                    .any(|x| x.node == s.node && x.job_id == j)
            };
            if let Some(j) = job_id {
                if job.map_or(s.container.is_some() || !job_there(j), |x| x != j) {
                    return None;
                }
            }
            Some(Unmoved {
                policy: s.policy,
                node: s.node,
                container: s.container,
                job_id: job,
                code: s.code,
                reason: s.reason,
                until: None,
            })
        })
        .collect();
    // CRIU runs on the source: nothing leaves a node whose agent does not answer, whatever the
    // policy (the planners leave such containers out of their view).
    for n in input.nodes.iter().filter(|n| !n.agent_up) {
        for c in input.containers.iter().filter(|c| c.node == n.name) {
            if !ctl.access.sees(caller, Some(c.uid)) || !wanted(c.job_id, &[&n.name]) {
                continue;
            }
            unmoved.push(Unmoved {
                policy: "controller".into(),
                node: n.name.clone(),
                container: Some(c.id.clone()),
                job_id: (c.job_id > 0).then_some(c.job_id),
                code: "agent-unreachable".into(),
                reason: format!(
                    "the agent on {} does not answer; CRIU runs on the source",
                    n.name
                ),
                until: None,
            });
        }
    }
    (moves, unmoved)
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
