//! Destination side of a migration: the peer server, one incoming transaction per connection.
//! The protocol is drawn in [`crate::peer`]; what Commit and an undo do is in [`super::commit`].

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::channel::AsyncChannel;
use rebalancer_proto::frame::{Frame, FrameKind};
use rebalancer_proto::{ContainerState, MigrationMode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::commit::Incoming;
use super::heartbeat::Heartbeat;
use super::host::{within, Clock, Helper, Host, LazySource, System};
use super::policy::room_check;
use super::restore_step::{self, missing_stdio_files};
use super::timing::{criu_log_mark_ms, criu_log_span_ms, SubPhases};
use crate::agent::Agent;
use crate::container;
use crate::criu;
use crate::error::AgentError;
use crate::peer::{reply_error, PeerReply, PeerRequest, PeerResponse};

/// Serves one peer connection (destination side) on the real node.
pub async fn serve(agent: Arc<Agent>, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let host = Arc::new(System::new(&agent.cfg));
    serve_with(host, agent, stream, peer).await
}

/// Serves one peer connection on `host`; whatever did not commit is undone when it ends.
pub async fn serve_with<H: Host, S: AsyncRead + AsyncWrite + Unpin + Send>(
    host: Arc<H>,
    agent: Arc<Agent>,
    stream: S,
    peer: Option<std::net::SocketAddr>,
) {
    let mut incoming: Option<Incoming<H>> = None;
    let r = serve_inner(&host, &agent, stream, peer, &mut incoming).await;
    if let Some(mut inc) = incoming {
        if !inc.committed {
            let why = match &r {
                Ok(()) => "source closed the connection before commit".to_string(),
                Err(e) => e.chain(),
            };
            inc.undo(&*host, &agent, &why).await;
        }
    }
    if let Err(e) = r {
        tracing::info!(peer = ?peer, error = %e.chain(), "peer connection ended");
    }
}

async fn write_resp<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut AsyncChannel<S>,
    id: u32,
    r: &PeerResponse,
) -> Result<(), AgentError> {
    s.send(FrameKind::Response, id, r).await?;
    Ok(())
}

async fn read_timeout<C: Clock, S: AsyncRead + AsyncWrite + Unpin>(
    clock: &C,
    s: &mut AsyncChannel<S>,
    t: Duration,
) -> Result<Frame, AgentError> {
    Ok(within(clock, t, s.recv_frame())
        .await
        .ok_or_else(|| AgentError::Timeout("source went silent".into()))??)
}

async fn serve_inner<H: Host, S: AsyncRead + AsyncWrite + Unpin + Send>(
    host: &Arc<H>,
    agent: &Arc<Agent>,
    stream: S,
    peer: Option<std::net::SocketAddr>,
    incoming: &mut Option<Incoming<H>>,
) -> Result<(), AgentError> {
    let mut timeout = Duration::from_millis(agent.cfg.migration_timeout_ms);
    // AWAIT_HELLO: nothing but a hello with a valid credential gets further (crate::peer::server).
    let hello_timeout = timeout.min(agent.cfg.peer_idle_timeout);
    let accepted = match crate::peer::server::accept(&agent.cfg, stream, hello_timeout).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(peer = ?peer, error = %e, "rejected unauthenticated peer");
            return Err(e);
        }
    };
    let (mut ch, source_node) = (accepted.ch, accepted.node);
    // An authenticated source may be silent while it dumps: the migration timeout bounds that.
    ch.set_idle_timeout(Some(timeout));
    let s = &mut ch;

    // Agreed in prepare: from then on a silence of the stall limit ends the connection.
    let mut beat: Option<Heartbeat> = None;
    loop {
        let wait = beat.map_or(timeout, |b| b.stall_limit().min(timeout));
        let f = match read_timeout(&**host, s, wait).await {
            Ok(f) => f,
            Err(AgentError::Proto(rebalancer_proto::ProtoError::Closed)) => return Ok(()),
            Err(AgentError::Timeout(_)) if let Some(b) = beat => {
                return Err(AgentError::Timeout(format!(
                    "the source agent stalled: nothing heard for {} ms (heartbeat every {} ms)",
                    wait.as_millis(),
                    b.interval.as_millis()
                )))
            }
            Err(e) => return Err(e),
        };
        if f.header.kind == FrameKind::Event {
            // A heartbeat of the source's long phase: answered at once with this side's
            // progress (what the page server received so far). Without an agreement: dropped.
            if beat.is_some() {
                answer_beat(s, incoming.as_ref()).await?;
            }
            continue;
        }
        let id = f.header.id;
        let req: PeerRequest = match f.decode(FrameKind::Request, "request") {
            Ok(r) => r,
            Err(e) => {
                write_resp(s, id, &reply_error(&AgentError::BadRequest(e.to_string()))).await?;
                continue;
            }
        };
        if let PeerRequest::Prepare {
            timeout_ms: Some(t),
            ..
        } = &req
        {
            // The source's limit travels in Prepare: a dump or pre-copy round longer than this
            // node's own limit is not cut here while the source still waits for it.
            timeout = peer_wait(timeout, *t);
            s.set_idle_timeout(Some(timeout));
        }
        let mut agreed = None;
        if let PeerRequest::Prepare { heartbeat_ms, .. } = &req {
            agreed = Heartbeat::agree(&agent.cfg, *heartbeat_ms);
        }
        let phase = req.op();
        // Long requests send heartbeats while they run; images are read from the channel.
        let long = matches!(
            req,
            PeerRequest::Prepare { .. }
                | PeerRequest::Restore { .. }
                | PeerRequest::PrecopyRound { .. }
        );
        let mut result = match agreed.or(beat).filter(|_| long) {
            Some(hb) => {
                let fut = handle(
                    host,
                    agent,
                    (
                        None::<&mut AsyncChannel<crate::peer::tls::PeerStream<S>>>,
                        id,
                    ),
                    incoming,
                    req,
                    (&source_node, peer),
                    timeout,
                );
                super::heartbeat::serve_beating(&**host, s, id, hb, phase, fut).await
            }
            None => {
                handle(
                    host,
                    agent,
                    (Some(&mut *s), id),
                    incoming,
                    req,
                    (&source_node, peer),
                    timeout,
                )
                .await
            }
        };
        if let (Some(hb), Ok(PeerReply::Prepared { heartbeat_ms, .. })) = (agreed, &mut result) {
            *heartbeat_ms = Some(hb.interval.as_millis() as u64);
            beat = Some(hb);
        }
        let done = matches!(
            result,
            Ok(PeerReply::Committed { .. }) | Ok(PeerReply::Aborted)
        );
        match result {
            Ok(r) => write_resp(s, id, &PeerResponse::Ok(r)).await?,
            Err(e) => {
                tracing::warn!(error = %e.chain(), "peer request failed");
                write_resp(s, id, &reply_error(&e)).await?;
                // A failed step leaves nothing half-done behind.
                if let Some(mut inc) = incoming.take() {
                    if !inc.committed {
                        inc.undo(&**host, agent, &e.chain()).await;
                    }
                }
            }
        }
        if done {
            return Ok(());
        }
    }
}

/// Longest wait for the source's next frame once it announced its own limit of `source_ms`:
/// the longer of the two, at most [`MAX_PEER_WAIT`]. Pure.
pub fn peer_wait(own: Duration, source_ms: u64) -> Duration {
    own.max(Duration::from_millis(source_ms)).min(MAX_PEER_WAIT)
}

/// Bound of [`peer_wait`]: a source cannot make this node wait longer for it.
pub const MAX_PEER_WAIT: Duration = Duration::from_secs(6 * 3600);

/// Answers a source's heartbeat with this side's own (request id 0).
async fn answer_beat<H: Host, S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut AsyncChannel<S>,
    incoming: Option<&Incoming<H>>,
) -> Result<(), AgentError> {
    let ev = rebalancer_proto::peer::PeerEvent::Heartbeat {
        phase: "wait".into(),
        bytes: incoming.map_or(0, |i| super::heartbeat::dir_bytes(&i.images)),
    };
    s.send(FrameKind::Event, 0, &ev).await?;
    Ok(())
}

/// Serves one request. `s` is the channel for requests that read from it (images); long
/// requests run with `None` while [`super::heartbeat::serve_beating`] holds it.
async fn handle<H: Host, S: AsyncRead + AsyncWrite + Unpin>(
    host: &Arc<H>,
    agent: &Arc<Agent>,
    (s, id): (Option<&mut AsyncChannel<S>>, u32),
    incoming: &mut Option<Incoming<H>>,
    req: PeerRequest,
    (source_node, peer): (&str, Option<std::net::SocketAddr>),
    timeout: Duration,
) -> Result<PeerReply, AgentError> {
    // Page servers take connections from the source agent's address only.
    let from = peer.map(|p| p.ip());
    match req {
        PeerRequest::Authenticate { .. } => Err(AgentError::BadRequest(
            "authenticate comes once, first, with peer protocol 2".into(),
        )),
        PeerRequest::Capabilities => Ok(PeerReply::Capabilities {
            capabilities: agent.caps.clone(),
        }),
        PeerRequest::Prepare {
            migration,
            mode,
            meta,
            source_node: claimed,
            restore_step,
            source_addr,
            rss_bytes,
            tls_cert,
            epoch,
            timeout_ms: _,
            spool,
            heartbeat_ms: _,
            opens_page_servers,
        } => {
            if incoming.is_some() {
                return Err(AgentError::BadRequest("prepare sent twice".into()));
            }
            // It names directories here: never a path.
            super::policy::check_migration_id(&migration)?;
            if claimed != source_node {
                return Err(AgentError::BadRequest(format!(
                    "prepare names source {claimed}, hello said {source_node}"
                )));
            }
            if !agent.caps.modes.contains(&mode) {
                return Err(AgentError::Unsupported(format!(
                    "destination {} does not support {mode}: {}",
                    agent.cfg.node,
                    agent.caps.notes.join("; ")
                )));
            }
            let meta = container::ContainerMeta::try_from(*meta)?;
            let id = meta.spec.id.clone();
            {
                let cs = agent.containers();
                if cs.get(&id).is_some_and(|c| c.state.is_live()) {
                    return Err(AgentError::Busy(format!(
                        "container {id} already runs on {}",
                        agent.cfg.node
                    )));
                }
            }
            if agent.address_in_use(meta.address) {
                return Err(AgentError::NoRoom(format!(
                    "address {} is in use on {}",
                    meta.address, agent.cfg.node
                )));
            }
            agent.validate_spec(&meta.spec)?;
            // Memory other arrivals announced is not free for this one.
            let (others, n_others) = {
                let r = agent.reserved();
                (r.values().fold(0u64, |a, b| a.saturating_add(*b)), r.len())
            };
            if let Some(avail) = host.mem_available() {
                room_check(mode, rss_bytes, avail.saturating_sub(others), &agent.cfg.node)
                    .map_err(|e| match e {
                        AgentError::NoRoom(m) if n_others > 0 => AgentError::NoRoom(format!(
                            "{m} ({} MiB of its available memory is reserved by {n_others} other incoming migration(s))",
                            others >> 20
                        )),
                        e => e,
                    })?;
            }
            // Encrypt whenever the source asks; refuse a plain transfer if this node wants one.
            let identity =
                if crate::tls::agree(agent.cfg.encrypt_memory, tls_cert.is_some(), source_node)? {
                    Some(crate::tls::Identity::generate(&agent.cfg.node, &migration)?)
                } else {
                    None
                };
            agent.incoming().insert((id.clone(), meta.address));
            let dir = agent.container_dir(&id);
            let mig_dir = agent.cfg.run_dir.join("images").join(&migration);
            let images = mig_dir.join("img");
            let root = agent.root_for(&meta.spec);
            let net = agent.new_net(&id, meta.address);
            let mut inc = Incoming {
                migration: migration.clone(),
                mode,
                meta: meta.clone(),
                net: net.clone(),
                root: root.clone(),
                dir: dir.clone(),
                mig_dir: mig_dir.clone(),
                images: images.clone(),
                page_server: None,
                opens_page_servers,
                page_server_gate: None,
                lazy_daemon: None,
                lazy_link: None,
                reservation: Some(super::room::Reservation::hold(agent, &migration, rss_bytes)),
                restored_pid: None,
                committed: false,
                restore_step,
                step: None,
                step_child: None,
                source: source_addr.map(|a| (source_node.to_string(), a)),
                cgroup: None,
                tls: Vec::new(),
                epoch,
                spool: None,
            };

            let r = async {
                if let rebalancer_proto::RootfsSpec::Host = meta.spec.rootfs {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                std::fs::create_dir_all(&images).map_err(|source| AgentError::Io {
                    what: format!("mkdir {}", images.display()),
                    source,
                })?;
                // A batch task's job directory of a node-local spool: the root and the binds
                // check below need it.
                if let (Some(sent), Some(task)) = (&spool, &meta.spec.task) {
                    inc.spool =
                        super::spool::install(&agent.cfg.slurmd_spool_dir, task.job_id, sent)?;
                }
                container::prepare_root(&root, &meta.mounts, &meta.symlinks)?;
                if restore_step {
                    // The source refuses these first; a peer that did not is refused here.
                    if let Some(why) = container::stdin_refusal(&meta.stdio_keys, &meta.stdio_paths) {
                        return Err(AgentError::Unsupported(why));
                    }
                    let missing = missing_stdio_files(&meta.stdio_paths);
                    if !missing.is_empty() {
                        return Err(AgentError::NoRoom(format!(
                            "the task's output file(s) {} do not exist on {}; the restored task could not write to them",
                            missing.join(", "),
                            agent.cfg.node
                        )));
                    }
                }
                for b in &meta.spec.binds {
                    if !std::path::Path::new(b).exists() {
                        return Err(AgentError::NoRoom(format!(
                            "bind source {b} does not exist on {}",
                            agent.cfg.node
                        )));
                    }
                }
                if !restore_step {
                    // Same limits as on the source, or no migration.
                    inc.cgroup = host.create_cgroup(agent, &meta.spec)?;
                }
                if let (Some(mine), Some(peer)) = (&identity, &tls_cert) {
                    inc.tls = crate::tls::write_files(&mig_dir.join("tls"), mine, peer, false)?;
                }
                host.create_net(&net, false).await?;
                let mut page_server = None;
                if mode == MigrationMode::StopAndCopy {
                    let ip = agent.cfg.advertise;
                    let gate = inc.gate();
                    let (addr, child) = host
                        .page_server(&images, ip, None, &inc.tls, from, gate)
                        .await?;
                    // In the transaction at once, so that a failure below stops it too.
                    inc.page_server = Some(child);
                    inc.gated(addr.1);
                    page_server = Some(addr);
                }
                if restore_step {
                    let target = restore_step::StepTarget {
                        migration: &inc.migration,
                        meta: &inc.meta,
                        images: &inc.images,
                        root: &inc.root,
                        netns: &inc.net.path(),
                        mode,
                    };
                    let (step, child) = restore_step::start(&**host, agent, &target)?;
                    inc.step = Some(step);
                    inc.step_child = Some(child);
                }
                Ok::<_, AgentError>(page_server)
            }
            .await;
            match r {
                Ok(addr) => {
                    tracing::info!(migration = %migration, container = %id, mode = %mode, encrypted = !inc.tls.is_empty(), "incoming migration prepared");
                    *incoming = Some(inc);
                    Ok(PeerReply::Prepared {
                        page_server: addr,
                        tls_cert: identity.map(|i| i.cert_pem),
                        // Set by the caller once it agreed to heartbeats.
                        heartbeat_ms: None,
                        opens_page_servers,
                    })
                }
                Err(e) => {
                    inc.undo(&**host, agent, &e.chain()).await;
                    Err(e)
                }
            }
        }
        PeerRequest::Images { files } => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("images before prepare".into()))?;
            let s =
                s.ok_or_else(|| AgentError::Internal("images served without the channel".into()))?;
            // Refused before a byte is written when the sizes cannot fit.
            let others = super::room::reserved_by_others(agent, &inc.migration);
            super::room::check_announced_images(
                &files,
                host.space_free(&inc.images),
                host.mem_available().map(|a| (a, others)),
                &agent.cfg.node,
            )?;
            // Written to the tmpfs chunk by chunk as the data frames arrive.
            let total = within(
                &**host,
                timeout,
                crate::peer::server::receive_images(s, id, &files, &inc.images),
            )
            .await
            .ok_or_else(|| AgentError::Timeout("source went silent".into()))??;
            Ok(PeerReply::ImagesReceived { bytes: total })
        }
        PeerRequest::Restore { lazy_pages } => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("restore before prepare".into()))?;
            restore(host, agent, inc, lazy_pages).await
        }
        PeerRequest::LazyLink { to, token } => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("lazy-link before prepare".into()))?;
            lazy_link(host, inc, to, &token, from).await
        }
        PeerRequest::Commit { migration, epoch } => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("commit before prepare".into()))?;
            super::commit::commit_here(host, agent, inc, migration.as_deref(), epoch).await
        }
        PeerRequest::PrecopyRound { round, last } => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("pre-copy round before prepare".into()))?;
            if inc.mode != MigrationMode::PreCopy {
                return Err(AgentError::BadRequest(format!(
                    "pre-copy round in a {} migration",
                    inc.mode
                )));
            }
            if let Some(mut ps) = inc.page_server.take() {
                // The previous round's page server ends when its pre-dump closed the connection.
                let st = within(&**host, Duration::from_secs(30), ps.wait())
                    .await
                    .ok_or_else(|| {
                        AgentError::Timeout("previous round's page server still running".into())
                    })?
                    .map_err(|source| AgentError::Io {
                        what: "wait page server".into(),
                        source,
                    })?;
                if !st.success() {
                    return Err(AgentError::Criu {
                        action: "page-server",
                        message: format!("round {} failed", round.saturating_sub(1)),
                    });
                }
            }
            let dir = if last {
                inc.images.clone()
            } else {
                inc.mig_dir.join(format!("pre-{round}"))
            };
            std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
                what: format!("mkdir {}", dir.display()),
                source,
            })?;
            let prev = (round > 0).then(|| format!("../pre-{}", round - 1));
            let ip = agent.cfg.advertise;
            let gate = inc.gate();
            let (page_server, child) = host
                .page_server(&dir, ip, prev.as_deref(), &inc.tls, from, gate)
                .await?;
            inc.page_server = Some(child);
            inc.gated(page_server.1);
            Ok(PeerReply::RoundReady { page_server })
        }
        PeerRequest::OpenPageServer { port } => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("open-page-server before prepare".into()))?;
            inc.open_page_server(&**host, port).await
        }
        PeerRequest::TaskEnded {
            container,
            wait_status,
            node,
        } => {
            let known = agent
                .containers()
                .get(&container)
                .is_some_and(|c| c.state == ContainerState::MigratedAway);
            if !known {
                return Err(AgentError::NotFound(format!(
                    "no migrated-away task {container} on {}",
                    agent.cfg.node
                )));
            }
            tracing::info!(container = %container, wait_status, node = %node, "migrated task ended");
            super::task_final(agent, &container, wait_status, &node);
            Ok(PeerReply::Ack)
        }
        PeerRequest::Abort { reason } => {
            if let Some(mut inc) = incoming.take() {
                if !inc.committed {
                    inc.undo(&**host, agent, &reason).await;
                }
            }
            Ok(PeerReply::Aborted)
        }
        PeerRequest::Outcome {
            migration,
            container,
            epoch,
        } => crate::adopt::outcome(agent, &migration, &container, epoch),
        PeerRequest::LazyEnd { migration } => {
            super::commit::answer_lazy_end(&**host, agent, &migration).await
        }
    }
}

/// Post-copy, peer protocol 4: opens the lazy-page link to the source agent's port `to`
/// (only at the source agent's own address) and keeps it for `restore`.
async fn lazy_link<H: Host>(
    host: &Arc<H>,
    inc: &mut Incoming<H>,
    to: (Ipv4Addr, u16),
    token: &str,
    from: Option<std::net::IpAddr>,
) -> Result<PeerReply, AgentError> {
    if inc.mode != MigrationMode::PostCopy {
        return Err(AgentError::BadRequest(format!(
            "lazy-link in a {} migration",
            inc.mode
        )));
    }
    if inc.lazy_link.is_some() {
        return Err(AgentError::BadRequest("lazy-link sent twice".into()));
    }
    // Never a connection to wherever a message says: only back to the source agent.
    if let Some(f) = from.filter(|f| *f != std::net::IpAddr::V4(to.0)) {
        return Err(AgentError::PermissionDenied(format!(
            "lazy-link to {}:{} refused: the source agent is at {f}",
            to.0, to.1
        )));
    }
    let token = crate::lazy_link::from_hex(token)?;
    let link = host
        .lazy_link_connect(
            std::net::SocketAddr::from(to),
            token,
            crate::lazy_link::CONNECT_WITHIN,
        )
        .await?;
    tracing::info!(migration = %inc.migration, source = %format!("{}:{}", to.0, to.1), "lazy-page link open");
    inc.lazy_link = Some(link);
    Ok(PeerReply::LazyLinked)
}

async fn restore<H: Host>(
    host: &Arc<H>,
    agent: &Arc<Agent>,
    inc: &mut Incoming<H>,
    lazy_pages: Option<(Ipv4Addr, u16)>,
) -> Result<PeerReply, AgentError> {
    super::pause::point(&**host, &agent.cfg, "restore").await;
    let started = host.now();
    let mut sub = SubPhases::new(&inc.migration, "destination", started);
    if let Some(mut ps) = inc.page_server.take() {
        // The page server exits once the dump closed its connection.
        let st = within(&**host, Duration::from_secs(30), ps.wait())
            .await
            .ok_or_else(|| AgentError::Timeout("page server still running after the dump".into()))?
            .map_err(|source| AgentError::Io {
                what: "wait page server".into(),
                source,
            })?;
        if !st.success() {
            return Err(AgentError::Criu {
                action: "page-server",
                message: criu::log_tail(&inc.images, "page-server.log"),
            });
        }
    }
    // No restore-side network lock: nothing reaches this namespace before commit_here adds
    // the node route, after the tree resumed (the source's copy stays behind the dump's lock).
    // A failure only costs time: CRIU then locks and unlocks as the dump said.
    if let Err(e) = criu::skip_restore_network_lock(&inc.images) {
        tracing::warn!(migration = %inc.migration, error = %e.chain(), "restore keeps CRIU's network lock");
    }
    let lazy = inc.mode == MigrationMode::PostCopy;
    if lazy {
        // Peer protocol 4: the link opened at `lazy-link`; before: CRIU's listener.
        let src = match (inc.lazy_link.take(), lazy_pages) {
            (Some(link), _) => LazySource::Link(link),
            (None, Some(addr)) => LazySource::Listener(addr),
            (None, None) => {
                return Err(AgentError::BadRequest(
                    "post-copy restore without a lazy-page link or page server".into(),
                ))
            }
        };
        sub.mark("page-server-wait", host.now());
        let d = host.lazy_pages(&inc.images, src, &inc.tls).await?;
        inc.lazy_daemon = Some(d);
        sub.mark("lazy-daemon", host.now());
    } else {
        sub.mark("page-server-wait", host.now());
    }
    if inc.restore_step {
        let (Some(step), Some(child)) = (inc.step.take(), inc.step_child.as_mut()) else {
            return Err(AgentError::Internal("no restore step was started".into()));
        };
        let (pid, pages_restored) =
            restore_step::restore(&**host, step, child, &inc.images, &inc.migration).await?;
        inc.restored_pid = Some(pid);
        return Ok(PeerReply::Restored {
            pid,
            restore_ms: host.now().duration_since(started).as_millis() as u64,
            pages_restored,
        });
    }
    let (out, err) = agent.stdio_paths(&inc.meta.spec);
    let stdio = container::stdio_pipes(&out, &err)?;
    let net = host.open_net(&inc.net)?;
    let mut inherit = vec![(net.as_raw_fd(), criu::NET_KEY.to_string())];
    for (fd, key) in stdio.child.iter().zip(inc.meta.stdio_keys.iter()) {
        inherit.push((fd.as_raw_fd(), key.clone()));
    }
    let keep: Vec<i32> = inherit.iter().map(|(fd, _)| *fd).collect();
    let pidfile = inc.images.join("restored.pid");
    let args = criu::RestoreArgs {
        images_dir: inc.images.clone(),
        root: inc.root.clone(),
        ext_mounts: container::external_mounts(&inc.meta.mounts)
            .into_iter()
            .map(|(_, key, src)| (key, src))
            .collect(),
        inherit,
        pidfile: pidfile.clone(),
        lazy,
        leave_stopped: true,
        ignore_cgroups: true,
    }
    .build();
    let procs = match &inc.cgroup {
        Some(cg) => cg.procs_files()?,
        None => Vec::new(),
    };
    let mut join = crate::cgroup::raw(&procs);
    join.extend(agent.detached_fds(inc.cgroup.is_some()));
    sub.mark("setup", host.now());
    let r = host
        .restore(&args, &keep, &join, &inc.images, &pidfile)
        .await;
    drop(procs);
    drop(stdio);
    drop(net);
    let pid = r?;
    inc.restored_pid = Some(pid);
    sub.mark("criu-restore", host.now());
    let stats = host.stats(&inc.images, "stats-restore").unwrap_or_default();
    sub.mark("stats", host.now());
    note_criu_log(&mut sub, &inc.images);
    sub.log("restore");
    tracing::info!(migration = %inc.migration, pid, "restored (stopped), waiting for commit");
    Ok(PeerReply::Restored {
        pid,
        restore_ms: host.now().duration_since(started).as_millis() as u64,
        pages_restored: stats.pages_restored,
    })
}

/// CRIU's own figures inside `criu-restore`, from its log: its whole run, and when the restored
/// tree was complete (the rest is CRIU's network unlock, stats and exit).
fn note_criu_log(sub: &mut SubPhases, images: &std::path::Path) {
    let Ok(log) = std::fs::read_to_string(images.join("restore.log")) else {
        return;
    };
    if let Some(ms) = criu_log_mark_ms(&log, "net: Unlock network") {
        sub.note("criu-log-net-unlocked", ms);
    }
    if let Some(ms) = criu_log_mark_ms(&log, "Restore finished successfully") {
        sub.note("criu-log-restored", ms);
    }
    if let Some(ms) = criu_log_span_ms(&log) {
        sub.note("criu-log-total", ms);
    }
    // 1 when CRIU found its kernel-feature cache (criu::kdat_run_dir), else 0.
    let cached = log.contains("Loaded kdat cache");
    sub.note("criu-kdat-cached", if cached { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sources_limit_lengthens_the_wait_for_it_within_a_bound() {
        let own = Duration::from_secs(60);
        assert_eq!(peer_wait(own, 600_000), Duration::from_secs(600));
        assert_eq!(peer_wait(own, 1_000), own);
        assert_eq!(peer_wait(own, u64::MAX), MAX_PEER_WAIT);
    }
}
