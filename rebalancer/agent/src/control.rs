//! The agent's control API on [`rebalancer_proto::channel`]: the local Unix socket (callers
//! identified by SO_PEERCRED: root and `admin_uids` may do everything; other users see and
//! manage only their own containers and may not migrate) and, when `[control] listen` is set,
//! a TCP listener for the controller on another host, mutually authenticated with munge.
//!
//! Both listeners bound their connections ([`rebalancer_proto::gate`]): beyond a limit a
//! connection gets a `busy` error reply. A client has `hello_timeout` for its hello (and over
//! TCP its `authenticate`), then may stay silent `idle_timeout` between requests; a frame must
//! arrive whole within that time, so a slow sender is closed too. A connection that registered
//! a task (the SPANK waiter, which reports the task's end on it) is exempt from the idle
//! timeout: it lives as long as its task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::auth::{Binding, Expect, CONTROL_DOMAIN};
use rebalancer_proto::channel::{AsyncChannel, ChannelConfig};
use rebalancer_proto::frame::FrameKind;
use rebalancer_proto::gate::{refuse_async, Gate, Permit};
use rebalancer_proto::tls::{self, Side};
use rebalancer_proto::{
    ErrorCode, ErrorReply, Event, Hello, MigrationState, NodeMetrics, ProtoError, Reply, Request,
    Response, Role, VersionRange, CONTROL_TCP_ENCRYPTED,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::agent::Agent;
use crate::error::AgentError;

/// Control requests are small; a container spec or a registration is a few KiB.
const MAX_REQUEST: u32 = 1024 * 1024;

struct Caller {
    uid: u32,
    pid: Option<i32>,
    admin: bool,
    /// Over the local socket (task requests need a local peer whose pid is checked).
    local: bool,
    /// Tasks prepared on this connection and not registered yet.
    pending: std::sync::Mutex<Vec<String>>,
    /// Tasks registered on this connection: only it may report their end.
    registered: crate::control_authz::Registered,
}

/// The gates of the control listeners, made once at start-up.
#[derive(Clone)]
pub struct Gates {
    pub local: Arc<Gate>,
    pub tcp: Arc<Gate>,
}

impl Gates {
    pub fn new(cfg: &crate::config::ControlConfig) -> Gates {
        Gates {
            local: Gate::new("agent control socket", cfg.local),
            tcp: Gate::new("agent TCP control port", cfg.tcp),
        }
    }
}

fn channel_config(agent: &Agent) -> ChannelConfig {
    let c = &agent.cfg.control;
    ChannelConfig::default()
        .max_frame(MAX_REQUEST)
        .idle_timeout(Some(c.hello_timeout))
        // A server makes no calls: this bounds each write, so a client that stops reading is
        // dropped too.
        .call_timeout(Some(c.idle_timeout))
}

/// Admits a connection or sends it a `busy` reply (logged at most once a second).
async fn admit<S: AsyncWrite + Unpin>(
    gate: &Arc<Gate>,
    s: &mut S,
    key: &str,
    per_key: bool,
) -> Option<Permit> {
    match gate.try_enter(key, per_key) {
        Ok(p) => Some(p),
        Err(r) => {
            if r.log {
                tracing::warn!(
                    caller = key,
                    refused_total = r.refused,
                    limit = gate.config().max_total,
                    "connection refused: {}",
                    r.message
                );
            }
            refuse_async(s, &r).await;
            None
        }
    }
}

/// A connection on the local control socket.
pub async fn serve(agent: Arc<Agent>, mut s: UnixStream, gate: Arc<Gate>) {
    let (uid, pid) = match s.peer_cred() {
        Ok(c) => (c.uid(), c.pid()),
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials on control socket");
            return;
        }
    };
    let key = format!("uid {uid}");
    // Root's connections count towards the total only: a user's flood must not lock out the
    // SPANK plugin of root's jobs, and root can flood anyway.
    let Some(_permit) = admit(&gate, &mut s, &key, uid != 0).await else {
        return;
    };
    let caller = Caller {
        uid,
        pid,
        admin: uid == 0 || agent.cfg.admin_uids.contains(&uid),
        local: true,
        pending: std::sync::Mutex::new(Vec::new()),
        registered: Default::default(),
    };
    let mut me = Hello::new(Role::Agent, crate::SOFTWARE);
    me.node = Some(agent.cfg.node.clone());
    // The channel answers a bad header, a non-Hello or no common version with an error reply.
    let r = match AsyncChannel::accept(s, channel_config(&agent), me, |_| Ok(())).await {
        Ok(mut ch) => {
            ch.set_idle_timeout(Some(agent.cfg.control.idle_timeout));
            serve_requests(&agent, &mut ch, &caller).await
        }
        Err(e) => Err(e.into()),
    };
    let pending = std::mem::take(&mut *caller.pending.lock().unwrap_or_else(|p| p.into_inner()));
    crate::spank::drop_pending(&agent, &pending).await;
    ended(&key, r);
}

fn ended(who: &str, r: Result<(), AgentError>) {
    match r {
        Ok(()) | Err(AgentError::Proto(ProtoError::Closed)) => {}
        // DEBUG: a flood would otherwise write a line per connection; refusals are logged.
        Err(AgentError::Proto(e @ ProtoError::Timeout { .. })) => {
            tracing::debug!(caller = who, "control connection closed: {e}")
        }
        Err(e) => tracing::debug!(caller = who, error = %e.chain(), "control connection ended"),
    }
}

/// A connection on the TCP control listener: only an authenticated controller is served.
pub async fn serve_tcp(agent: Arc<Agent>, mut s: TcpStream, peer: SocketAddr, gate: Arc<Gate>) {
    let _ = s.set_nodelay(true);
    let key = format!("address {}", peer.ip());
    let Some(_permit) = admit(&gate, &mut s, &key, true).await else {
        return;
    };
    // It states this port's range: the controller's credential names it back (downgrade
    // protection, `rebalancer_proto::auth`).
    let our_nonce = rebalancer_proto::auth::ranged_nonce(agent.cfg.control.tcp_protocol);
    let mut me = Hello::new(Role::Agent, crate::SOFTWARE);
    me.node = Some(agent.cfg.node.clone());
    me.nonce = Some(our_nonce.clone());
    let only_controller = |h: &Hello| {
        if h.role == Role::Controller {
            Ok(())
        } else {
            Err(ErrorReply {
                code: ErrorCode::PermissionDenied,
                message: format!(
                    "the TCP control port serves the controller only, not {:?} clients;                      local clients use the control socket",
                    h.role
                ),
            })
        }
    };
    let c = &agent.cfg.control;
    let r = async {
        let cfg = channel_config(&agent).versions(c.tcp_protocol);
        let ch = AsyncChannel::accept(s, cfg, me, only_controller).await?;
        let version = ch.negotiated().version;
        // Protocol 2: the rest of the connection, `authenticate` included, inside TLS.
        let (mut ch, session) = if version >= CONTROL_TCP_ENCRYPTED {
            let (ch, e) = tls::upgrade(ch, Side::Server, c.hello_timeout, tls::CONTROL)
                .await
                .map_err(crate::peer::tls::agent_error)?;
            (ch, Some(e))
        } else {
            tracing::warn!(peer = %peer, version, "TCP control protocol {version}: the connection with the controller is not encrypted (a controller of an earlier release?)");
            (
                tls::plain(ch).map_err(crate::peer::tls::agent_error)?,
                None,
            )
        };
        let caller =
            authenticate_controller(&agent, &mut ch, &our_nonce, peer, session.as_deref()).await?;
        ch.set_idle_timeout(Some(c.idle_timeout));
        serve_requests(&agent, &mut ch, &caller).await
    }
    .await;
    if let Err(AgentError::PermissionDenied(m)) = &r {
        tracing::warn!(peer = %peer, "TCP control connection refused: {m}");
    }
    ended(&key, r);
}

/// The first request over TCP must be an `authenticate` whose credential is bound to this
/// connection's nonce and this node (and with protocol 2 to this TLS session, `session`), from
/// a uid in `controller_uids`; the answer carries this node's credential bound to the
/// controller's nonce (and the session). Anything else gets an error reply.
async fn authenticate_controller<S: AsyncRead + AsyncWrite + Unpin>(
    agent: &Agent,
    ch: &mut AsyncChannel<S>,
    our_nonce: &str,
    peer: SocketAddr,
    session: Option<&str>,
) -> Result<Caller, AgentError> {
    let f = ch.recv_frame().await?;
    let id = f.header.id;
    let checked = match f.decode::<Request>(FrameKind::Request, "request") {
        Ok(Request::Authenticate { credential, nonce }) => {
            let offered = ch.negotiated().peer.versions();
            let nonces = (nonce, our_nonce);
            check_controller(agent, credential.as_deref(), nonces, session, offered).await
        }
        _ => Err(AgentError::PermissionDenied(
            "the first request on the TCP control port must be authenticate".into(),
        )),
    };
    let (uid, name, ours) = match checked {
        Ok(v) => v,
        Err(e) => {
            let _ = ch
                .send(
                    FrameKind::Response,
                    id,
                    &Response::error(e.code(), e.chain()),
                )
                .await;
            return Err(e);
        }
    };
    ch.send(
        FrameKind::Response,
        id,
        &Response::Ok(Reply::Authenticated {
            credential: Some(ours),
        }),
    )
    .await?;
    tracing::info!(peer = %peer, controller = %name, uid, version = ch.negotiated().version, encrypted = session.is_some(), "controller authenticated on the TCP control port");
    Ok(Caller {
        uid,
        pid: None,
        admin: true,
        local: false,
        pending: std::sync::Mutex::new(Vec::new()),
        registered: Default::default(),
    })
}

/// Checks the controller's credential; returns its uid, its name and this node's answer.
/// `offered`: the range the controller's hello stated as it arrived.
async fn check_controller(
    agent: &Agent,
    credential: Option<&str>,
    (their_nonce, our_nonce): (String, &str),
    session: Option<&str>,
    offered: VersionRange,
) -> Result<(u32, String, String), AgentError> {
    let sock = agent.cfg.munge_socket.as_deref();
    let expect = Expect {
        domain: CONTROL_DOMAIN,
        uids: &agent.cfg.control.controller_uids,
        from: None,
        to: &agent.cfg.node,
        nonce: our_nonce,
        session,
        offer: Some(offered),
    };
    let (uid, payload) = rebalancer_proto::munge::decode(sock, credential)
        .await
        .map_err(auth_error)?;
    let name = expect.check(uid, &payload).map_err(auth_error)?;
    let binding = Binding {
        domain: CONTROL_DOMAIN,
        from: agent.cfg.node.clone(),
        to: name.clone(),
        nonce: their_nonce,
        session: session.map(str::to_string),
        offer: None,
    };
    let ours = rebalancer_proto::munge::bound_credential(sock, &binding)
        .await
        .map_err(auth_error)?;
    Ok((uid, name, ours))
}

fn auth_error(e: rebalancer_proto::auth::AuthError) -> AgentError {
    use rebalancer_proto::auth::AuthError as A;
    match e {
        A::Busy(_) => AgentError::Busy(e.to_string()),
        A::Timeout { .. } => AgentError::Timeout(e.to_string()),
        A::Munge(_) => AgentError::Internal(e.to_string()),
        e => AgentError::PermissionDenied(format!("controller authentication: {e}")),
    }
}

/// Requests that name a local task process: they need the local socket's peer credentials.
fn needs_local_peer(req: &Request) -> bool {
    matches!(
        req,
        Request::PrepareTask { .. }
            | Request::RegisterTask { .. }
            | Request::PrepareRestore { .. }
            | Request::TaskExited { .. }
    )
}

async fn serve_requests<S: AsyncRead + AsyncWrite + Unpin>(
    agent: &Arc<Agent>,
    ch: &mut AsyncChannel<S>,
    caller: &Caller,
) -> Result<(), AgentError> {
    loop {
        let f = ch.recv_frame().await?;
        let id = f.header.id;
        let req: Request = match f.decode(FrameKind::Request, "request") {
            Ok(r) => r,
            Err(e) => {
                ch.send(
                    FrameKind::Response,
                    id,
                    &Response::error(ErrorCode::BadRequest, e.to_string()),
                )
                .await?;
                continue;
            }
        };
        if let Request::Migrate { request, watch } = req {
            handle_migrate(agent, ch, caller, id, request, watch).await?;
            continue;
        }
        let registers = matches!(req, Request::RegisterTask { .. });
        let resp = if matches!(req, Request::Authenticate { .. }) {
            Response::error(
                ErrorCode::BadRequest,
                if caller.local {
                    "authenticate belongs to the TCP control port; this socket identifies \
                     callers by their credentials"
                } else {
                    "authenticate comes once, first"
                },
            )
        } else if !caller.local && needs_local_peer(&req) {
            Response::error(
                ErrorCode::PermissionDenied,
                "task requests come from the SPANK plugin on the local control socket only",
            )
        } else {
            match handle(agent, caller, req).await {
                Ok(r) => Response::Ok(r),
                Err(e) => Response::error(e.code(), e.chain()),
            }
        };
        if registers && matches!(resp, Response::Ok(_)) {
            // The waiter keeps this connection for its task's life and reports the end on it.
            ch.set_idle_timeout(None);
        }
        ch.send(FrameKind::Response, id, &resp).await?;
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin, T: serde::Serialize>(
    ch: &mut AsyncChannel<S>,
    kind: FrameKind,
    id: u32,
    v: &T,
) -> Result<(), AgentError> {
    ch.send(kind, id, v).await?;
    Ok(())
}

async fn handle_migrate<S: AsyncRead + AsyncWrite + Unpin>(
    agent: &Arc<Agent>,
    s: &mut AsyncChannel<S>,
    caller: &Caller,
    id: u32,
    request: rebalancer_proto::MigrateRequest,
    watch: bool,
) -> Result<(), AgentError> {
    if !caller.admin {
        let e =
            AgentError::PermissionDenied(format!("uid {} may not migrate containers", caller.uid));
        return send(
            s,
            FrameKind::Response,
            id,
            &Response::error(e.code(), e.chain()),
        )
        .await;
    }
    let prepared = match crate::migration::source::preflight(agent, &request).await {
        Ok(p) => p,
        Err(e) => {
            return send(
                s,
                FrameKind::Response,
                id,
                &Response::error(e.code(), e.chain()),
            )
            .await
        }
    };
    let mig_id = prepared.rec.id.clone();
    let mut events = agent.events.subscribe();
    agent.publish(&prepared.rec);
    tracing::info!(migration = %mig_id, container = %request.container, destination = %request.destination, mode = ?prepared.rec.mode, "migration started");
    let task = tokio::spawn(crate::migration::source::run(agent.clone(), prepared));
    if !watch {
        let rec = agent.migrations().get(&mig_id).cloned();
        if let Some(rec) = rec {
            send(
                s,
                FrameKind::Response,
                id,
                &Response::Ok(Reply::Migration { migration: rec }),
            )
            .await?;
        }
        return Ok(());
    }
    // Watched: progress events, then the final record as the response.
    loop {
        match events.recv().await {
            Ok(rec) if rec.id == mig_id => {
                if rec.state.is_terminal() {
                    break;
                }
                send(
                    s,
                    FrameKind::Event,
                    id,
                    &Event::MigrationProgress {
                        migration: rec,
                        progress_bytes: None,
                    },
                )
                .await?;
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
    let rec = match task.await {
        Ok(r) => r,
        Err(e) => return Err(AgentError::Internal(format!("migration task: {e}"))),
    };
    let resp = match rec.state {
        MigrationState::Succeeded => Response::Ok(Reply::Migration { migration: rec }),
        MigrationState::RolledBack => Response::error(
            ErrorCode::RolledBack,
            format!(
                "migration {} rolled back, container {} still runs on {}: {}",
                rec.id,
                rec.container,
                rec.source,
                rec.error.clone().unwrap_or_default()
            ),
        ),
        _ => Response::error(
            ErrorCode::Internal,
            rec.error
                .clone()
                .unwrap_or_else(|| "migration failed".into()),
        ),
    };
    send(s, FrameKind::Response, id, &resp).await
}

/// `cancel-migration`: accepted before the source's commit point (the migration then rolls
/// back, see `migration/cancel.rs`), refused with the reason otherwise.
fn cancel_migration(agent: &Agent, id: &str, by: &str) -> Result<Reply, AgentError> {
    use crate::migration::cancel::CancelRefused;
    // Who asked ends up in the record and in logs: bounded, one line.
    let by: String = by.chars().filter(|c| !c.is_control()).take(200).collect();
    let node = &agent.cfg.node;
    match agent.cancels.cancel(id, &by) {
        Ok(()) => {
            tracing::warn!(migration = %id, by = %by, "migration cancelled; rolling back");
            let migration = agent.migrations().get(id).cloned().ok_or_else(|| {
                AgentError::Internal(format!("migration {id} runs without a record"))
            })?;
            Ok(Reply::Migration { migration })
        }
        Err(CancelRefused::NotRunning(_)) => match agent.migrations().get(id) {
            Some(r) if r.state.is_terminal() => Err(AgentError::NotFound(format!(
                "migration {id} already ended ({}) on {node}",
                r.state
            ))),
            Some(r) if r.source != *node => Err(AgentError::BadRequest(format!(
                "{node} is the destination of migration {id}; its source {} cancels it",
                r.source
            ))),
            // Between the pre-flight's record and the run taking over (a moment).
            Some(_) => Err(AgentError::Busy(format!(
                "migration {id} is starting on {node}; cancel it again in a moment"
            ))),
            None => Err(AgentError::NotFound(format!("no migration {id} on {node}"))),
        },
        Err(e) => Err(AgentError::Busy(e.to_string())),
    }
}

async fn metrics(agent: &Agent) -> NodeMetrics {
    let running: Vec<(String, i32)> = agent
        .containers()
        .values()
        .filter(|c| c.state == rebalancer_proto::ContainerState::Running && c.pid > 0)
        .map(|c| (c.meta.spec.id.clone(), c.pid))
        .collect();
    // Sources may scan /proc or run a command: keep them off the runtime's threads.
    let (node, cfg) = (agent.cfg.node.clone(), agent.cfg.metrics.clone());
    let (load1, temperature_c) =
        tokio::task::spawn_blocking(move || crate::metrics::read(&node, &cfg, &running))
            .await
            .unwrap_or((0.0, None));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let containers = agent
        .containers()
        .values()
        .filter(|c| c.state == rebalancer_proto::ContainerState::Running)
        .count() as u32;
    NodeMetrics {
        node: agent.cfg.node.clone(),
        at: rebalancer_proto::now_millis(),
        load1,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        mem_total_bytes: field("MemTotal:"),
        mem_available_bytes: field("MemAvailable:"),
        temperature_c,
        containers,
    }
}

async fn handle(agent: &Arc<Agent>, caller: &Caller, req: Request) -> Result<Reply, AgentError> {
    let visible = |uid: u32| caller.admin || uid == caller.uid;
    match req {
        Request::Ping => Ok(Reply::Pong {
            software: crate::SOFTWARE.into(),
        }),
        Request::Capabilities => Ok(Reply::Capabilities {
            capabilities: agent.caps.clone(),
        }),
        Request::Metrics => Ok(Reply::Metrics {
            metrics: metrics(agent).await,
        }),
        Request::ListContainers => {
            let cs = agent.containers();
            Ok(Reply::Containers {
                containers: cs
                    .values()
                    .filter(|c| visible(c.meta.spec.uid))
                    .map(|c| agent.info(c))
                    .collect(),
            })
        }
        Request::GetContainer { id } => {
            let cs = agent.containers();
            cs.get(&id)
                .filter(|c| visible(c.meta.spec.uid))
                .map(|c| Reply::Container {
                    container: agent.info(c),
                })
                .ok_or_else(|| {
                    AgentError::NotFound(format!("no container {id} on {}", agent.cfg.node))
                })
        }
        Request::CreateContainer { spec } => {
            // The agent opens stdio files, bind mounts and picks the root as root, so a spec
            // from an unprivileged caller would be a path to root. Users' containers come only
            // through the SPANK path, whose peer is verified to be a task of its step.
            if !caller.admin {
                return Err(AgentError::PermissionDenied(format!(
                    "uid {} may not create containers directly: only root and admin_uids may; \
                     users get containers through `srun --migratable`",
                    caller.uid
                )));
            }
            let info = agent.create_container(spec).await?;
            Ok(Reply::Container { container: info })
        }
        Request::KillContainer { id, signal } => {
            let owner = agent.containers().get(&id).map(|c| c.meta.spec.uid);
            match owner {
                Some(u) if visible(u) => {}
                _ => {
                    return Err(AgentError::NotFound(format!(
                        "no container {id} on {}",
                        agent.cfg.node
                    )))
                }
            }
            agent.kill(&id, signal)?;
            Ok(Reply::Done)
        }
        Request::GetMigration { id } => {
            if !caller.admin {
                return Err(AgentError::PermissionDenied(
                    "only administrators see migrations".into(),
                ));
            }
            agent
                .migrations()
                .get(&id)
                .cloned()
                .map(|m| Reply::Migration { migration: m })
                .ok_or_else(|| {
                    AgentError::NotFound(format!("no migration {id} on {}", agent.cfg.node))
                })
        }
        Request::ListMigrations => {
            if !caller.admin {
                return Err(AgentError::PermissionDenied(
                    "only administrators see migrations".into(),
                ));
            }
            Ok(Reply::Migrations {
                migrations: agent.migrations().values().cloned().collect(),
            })
        }
        Request::CancelMigration { id, by } => {
            if !caller.admin {
                return Err(AgentError::PermissionDenied(format!(
                    "uid {} may not cancel migrations",
                    caller.uid
                )));
            }
            cancel_migration(agent, &id, &by)
        }
        Request::Migrate { .. } => {
            Err(AgentError::Internal("migrate is handled separately".into()))
        }
        Request::AddressBlocks { lease } => {
            // The blocks decide which addresses this node hands out: only the controller
            // (TCP control port) or an administrator on the socket may set them.
            if !caller.admin {
                return Err(AgentError::PermissionDenied(format!(
                    "uid {} may not lease address blocks: only the controller, root and admin_uids may",
                    caller.uid
                )));
            }
            Ok(Reply::AddressBlocks {
                blocks: crate::agent::ipam::lease(agent, lease)?,
            })
        }
        Request::Authenticate { .. } => Err(AgentError::Internal(
            "authenticate is handled separately".into(),
        )),
        Request::PrepareTask { registration } => {
            let prepared =
                crate::spank::prepare(agent, caller.uid, caller.pid, registration).await?;
            caller
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(prepared.container.clone());
            Ok(Reply::TaskPrepared { prepared })
        }
        Request::PrepareRestore {
            migration,
            registration,
        } => {
            crate::spank::verify(caller.uid, caller.pid, &registration, false)?;
            let not_here = || {
                AgentError::NotFound(format!(
                    "no incoming migration {migration} on {}",
                    agent.cfg.node
                ))
            };
            let mut ready = {
                let steps = agent.restore_steps();
                let step = steps.get(&migration).ok_or_else(not_here)?;
                let job = registration.task.job_id;
                if !step.plan.container.starts_with(&format!("j{job}.")) {
                    return Err(AgentError::PermissionDenied(format!(
                        "migration {migration} restores {}, not a task of job {job}",
                        step.plan.container
                    )));
                }
                step.ready.clone()
            };
            // The step was started at prepare; it restores once the images are in. An aborted
            // migration drops the sender.
            let limit = Duration::from_millis(agent.cfg.migration_timeout_ms.max(1000));
            match tokio::time::timeout(limit, ready.wait_for(|go| *go)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => {
                    return Err(AgentError::Busy(format!(
                        "migration {migration} was aborted before its restore"
                    )))
                }
                Err(_) => {
                    return Err(AgentError::Timeout(format!(
                        "migration {migration} sent no images within {} s",
                        limit.as_secs()
                    )))
                }
            }
            let plan = agent
                .restore_steps()
                .get(&migration)
                .map(|s| s.plan.clone())
                .ok_or_else(not_here)?;
            Ok(Reply::RestorePlan { plan })
        }
        Request::RegisterTask { registration } if is_restore_registration(agent, &registration) => {
            crate::spank::verify(caller.uid, caller.pid, &registration, true)?;
            let id = registration.container.clone().unwrap_or_default();
            caller.registered.add(&id);
            let tx = agent
                .restore_steps()
                .values_mut()
                .find(|s| s.plan.container == id)
                .and_then(|s| {
                    s.task = Some(registration.task.clone());
                    s.waiter = crate::spank::waiter_of(caller.pid);
                    s.registered.take()
                });
            if let Some(tx) = tx {
                let _ = tx.send(registration.pid);
            }
            tracing::info!(container = %id, pid = registration.pid, "restore step registered the restored task");
            Ok(Reply::Done)
        }
        Request::RegisterTask { registration } => {
            let c = crate::spank::register(agent, caller.uid, caller.pid, registration)?;
            let id = c.meta.spec.id.clone();
            caller.registered.add(&id);
            caller
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|p| *p != id);
            let info = agent.info(&c);
            tracing::info!(container = %id, pid = c.pid, "task registered");
            agent.containers().insert(id, c);
            agent.persist();
            Ok(Reply::Container { container: info })
        }
        Request::TaskExited {
            container,
            wait_status,
        } => {
            crate::control_authz::authorize_task_exited(
                agent,
                caller.uid,
                caller.pid,
                &caller.registered,
                &container,
                wait_status,
            )?;
            let (net, moved, known, arrived) = {
                let mut cs = agent.containers();
                let c = cs
                    .get_mut(&container)
                    .filter(|c| c.external && visible(c.meta.spec.uid))
                    .ok_or_else(|| {
                        AgentError::NotFound(format!(
                            "no task container {container} on {}",
                            agent.cfg.node
                        ))
                    })?;
                let moved = c.state == rebalancer_proto::ContainerState::MigratedAway;
                c.exit_status = Some(wait_status);
                let net = (!moved && c.state != rebalancer_proto::ContainerState::Exited)
                    .then(|| c.net.clone());
                if !moved {
                    c.state = rebalancer_proto::ContainerState::Exited;
                }
                // A task that arrived here by migration may have brought its job's spool dir.
                let arrived = (!moved && c.arrived_from.is_some()).then(|| c.meta.clone());
                (net, moved, c.final_status.clone(), arrived)
            };
            if let Some(net) = net {
                crate::netns::destroy(&net).await;
            }
            if let Some(meta) = arrived {
                crate::migration::spool::remove_arrived(&agent.cfg.slurmd_spool_dir, &meta);
            }
            if !moved {
                crate::migration::task_final(agent, &container, wait_status, &agent.cfg.node);
                return Ok(Reply::TaskFinished {
                    wait_status,
                    migrated_to: None,
                });
            }
            // The task lives on elsewhere: answer once its final status comes back.
            let (status, node) = match known {
                Some(k) => k,
                None => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    agent
                        .held
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(container.clone())
                        .or_default()
                        .push(tx);
                    rx.await.map_err(|_| {
                        AgentError::Internal(format!("final status of {container} lost"))
                    })?
                }
            };
            Ok(Reply::TaskFinished {
                wait_status: status,
                migrated_to: Some(node),
            })
        }
    }
}

/// Whether a `register-task` comes from a restore step this node waits for.
fn is_restore_registration(agent: &Agent, reg: &rebalancer_proto::TaskRegistration) -> bool {
    reg.container.as_ref().is_some_and(|id| {
        agent
            .restore_steps()
            .values()
            .any(|s| s.plan.container == *id && s.registered.is_some())
    })
}
