//! Local control socket (Unix, rebalancer-proto framing). Callers are identified by SO_PEERCRED:
//! root and `admin_uids` may do everything; other users see and manage only their own containers
//! and may not migrate.

use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::frame::{read_frame_async, write_frame_async, Frame, FrameKind};
use rebalancer_proto::{
    ErrorCode, Event, Hello, MigrationState, NodeMetrics, Reply, Request, Response, Role,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;

use crate::agent::Agent;
use crate::error::AgentError;

struct Caller {
    uid: u32,
    pid: Option<i32>,
    admin: bool,
    /// Tasks prepared on this connection and not registered yet.
    pending: std::sync::Mutex<Vec<String>>,
}

pub async fn serve(agent: Arc<Agent>, mut s: UnixStream) {
    let (uid, pid) = match s.peer_cred() {
        Ok(c) => (c.uid(), c.pid()),
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials on control socket");
            return;
        }
    };
    let caller = Caller {
        uid,
        pid,
        admin: uid == 0 || agent.cfg.admin_uids.contains(&uid),
        pending: std::sync::Mutex::new(Vec::new()),
    };
    let r = serve_inner(&agent, &mut s, &caller).await;
    let pending = std::mem::take(&mut *caller.pending.lock().unwrap_or_else(|p| p.into_inner()));
    crate::spank::drop_pending(&agent, &pending).await;
    if let Err(e) = r {
        if !matches!(e, AgentError::Proto(rebalancer_proto::ProtoError::Closed)) {
            tracing::debug!(uid, error = %e.chain(), "control connection ended");
        }
    }
}

async fn send<T: serde::Serialize>(
    s: &mut UnixStream,
    kind: FrameKind,
    id: u32,
    v: &T,
) -> Result<(), AgentError> {
    write_frame_async(s, &Frame::json(kind, id, v)?).await?;
    Ok(())
}

async fn serve_inner(
    agent: &Arc<Agent>,
    s: &mut UnixStream,
    caller: &Caller,
) -> Result<(), AgentError> {
    let f = read_frame_async(s, MAX_FRAME_LEN).await?;
    let hello: Hello = match f.decode(FrameKind::Hello, "hello") {
        Ok(h) => h,
        Err(e) => {
            send(
                s,
                FrameKind::Response,
                f.header.id,
                &Response::error(
                    ErrorCode::BadRequest,
                    format!("expected a hello first: {e}"),
                ),
            )
            .await?;
            return Ok(());
        }
    };
    if hello.protocol != PROTOCOL_VERSION {
        send(
            s,
            FrameKind::Response,
            0,
            &Response::error(
                ErrorCode::Version,
                format!(
                    "client speaks protocol {}, agent {PROTOCOL_VERSION}",
                    hello.protocol
                ),
            ),
        )
        .await?;
        return Ok(());
    }
    let mut me = Hello::new(Role::Agent, crate::SOFTWARE);
    me.node = Some(agent.cfg.node.clone());
    send(s, FrameKind::Hello, 0, &me).await?;
    loop {
        let f = read_frame_async(s, MAX_FRAME_LEN).await?;
        let id = f.header.id;
        let req: Request = match f.decode(FrameKind::Request, "request") {
            Ok(r) => r,
            Err(e) => {
                send(
                    s,
                    FrameKind::Response,
                    id,
                    &Response::error(ErrorCode::BadRequest, e.to_string()),
                )
                .await?;
                continue;
            }
        };
        if let Request::Migrate { request, watch } = req {
            handle_migrate(agent, s, caller, id, request, watch).await?;
            continue;
        }
        let resp = match handle(agent, caller, req).await {
            Ok(r) => Response::Ok(r),
            Err(e) => Response::error(e.code(), e.chain()),
        };
        send(s, FrameKind::Response, id, &resp).await?;
    }
}

async fn handle_migrate(
    agent: &Arc<Agent>,
    s: &mut UnixStream,
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
        Request::Migrate { .. } => {
            Err(AgentError::Internal("migrate is handled separately".into()))
        }
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
            let tx = agent
                .restore_steps()
                .values_mut()
                .find(|s| s.plan.container == id)
                .and_then(|s| s.registered.take());
            if let Some(tx) = tx {
                let _ = tx.send(registration.pid);
            }
            tracing::info!(container = %id, pid = registration.pid, "restore step registered the restored task");
            Ok(Reply::Done)
        }
        Request::RegisterTask { registration } => {
            let c = crate::spank::register(agent, caller.uid, caller.pid, registration)?;
            let id = c.meta.spec.id.clone();
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
