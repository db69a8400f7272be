//! Source side of a migration: pre-flight checks, dump, transfer, restore, commit or rollback.
//! What commit and rollback do to the source's copy is in [`super::commit`].
//!
//! Transaction rule: the source tree stays frozen (CRIU `--leave-stopped`, network locked) until
//! the destination reports the restored tree (itself still stopped). The source then sends
//! Commit — its point of no return — withdraws its route and kills its copy; the destination
//! resumes and announces the address. Any failure before Commit (destination error, timeout,
//! lost connection, destination agent killed) rolls back: the destination undoes its side on
//! EOF/Abort and the source deletes CRIU's nftables lock table and SIGCONTs its tree, so there
//! are never two live copies. Post-copy: after Commit the destination runs while pages still
//! come from the source's `criu dump` page server; losing the source or the link then kills the
//! container (the pages exist nowhere else) and the migration is recorded as `failed`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rebalancer_proto::{
    now_millis, ContainerState, MigrateRequest, MigrationMode, MigrationRecord, MigrationState,
    MigrationStats, Phase,
};

use super::host::{within, Helper, Host, PeerLink, System};
use super::policy::{choose_mode, precopy_converged, PrecopyPolicy};
use super::{commit, enter, finish};
use crate::agent::Agent;
use crate::container::{self, ContainerMeta};
use crate::criu;
use crate::error::AgentError;
use crate::netns::ContainerNet;
use crate::peer::{PeerConn, PeerReply, PeerRequest};

/// Everything a running migration needs, produced by [`preflight`].
pub struct Prepared<L = PeerConn> {
    pub rec: MigrationRecord,
    pub conn: L,
    pub page_server: Option<(std::net::Ipv4Addr, u16)>,
    pub pid: i32,
    pub net: ContainerNet,
    pub meta: ContainerMeta,
    pub deadline: Instant,
    /// Post-copy: port of the source's lazy page server.
    pub lazy_port: Option<u16>,
    /// Encrypted page transfer: this side's identity and the destination's certificate.
    pub tls: Option<(crate::tls::Identity, String)>,
}

/// Checks the request and prepares the destination. On error nothing has changed.
pub async fn preflight(agent: &Arc<Agent>, req: &MigrateRequest) -> Result<Prepared, AgentError> {
    preflight_with(&System::new(&agent.cfg), agent, req).await
}

/// [`preflight`] on `host`.
pub async fn preflight_with<H: Host>(
    host: &H,
    agent: &Arc<Agent>,
    req: &MigrateRequest,
) -> Result<Prepared<H::Link>, AgentError> {
    let id = &req.container;
    if req.destination == agent.cfg.node {
        return Err(AgentError::BadRequest(format!(
            "container {id} already runs on {}",
            req.destination
        )));
    }
    let addr: SocketAddr = match &req.destination_addr {
        Some(a) => a.parse().map_err(|_| {
            AgentError::BadRequest(format!("destination address {a:?} is not IP:PORT"))
        })?,
        None => *agent.cfg.peers.get(&req.destination).ok_or_else(|| {
            AgentError::BadRequest(format!(
                "unknown destination node {} (no address given, none in [peers])",
                req.destination
            ))
        })?,
    };
    // Mark migrating atomically; undone below on any failure.
    let (pid, net, meta, external) = {
        let mut cs = agent.containers();
        let c = cs
            .get_mut(id)
            .filter(|c| {
                c.state != ContainerState::MigratedAway && c.state != ContainerState::Exited
            })
            .ok_or_else(|| {
                AgentError::NotFound(format!("no container {id} on {}", agent.cfg.node))
            })?;
        match c.state {
            ContainerState::Running => {}
            ContainerState::Migrating => {
                return Err(AgentError::Busy(format!(
                    "container {id} is already migrating"
                )))
            }
            s => return Err(AgentError::Busy(format!("container {id} is {s:?}"))),
        }
        if let Some(why) = crate::caps::dump_refusal(c.meta.spec.uid, &agent.cfg.node) {
            return Err(AgentError::Unsupported(why));
        }
        if c.external {
            // Slurm gives a task its stdio after the plugin registered it, so what fds 0-2 are
            // (pipes to slurmstepd, or the step's output files) is only known now.
            let (keys, paths) = host.stdio_ids(c.pid);
            if let Some(why) = container::stdin_refusal(&keys, &paths) {
                return Err(AgentError::Unsupported(why));
            }
            (c.meta.stdio_keys, c.meta.stdio_paths) = (keys, paths);
        }
        c.state = ContainerState::Migrating;
        (c.pid, c.net.clone(), c.meta.clone(), c.external)
    };
    let unmark = || {
        if let Some(c) = agent.containers().get_mut(id) {
            if c.state == ContainerState::Migrating {
                c.state = ContainerState::Running;
            }
        }
    };
    let r = async {
        let timeout = Duration::from_millis(
            req.timeout_ms
                .unwrap_or(agent.cfg.migration_timeout_ms)
                .max(1000),
        );
        let mut conn = host.connect(&agent.cfg, addr, timeout).await?;
        let remote = match conn.call(&PeerRequest::Capabilities).await? {
            PeerReply::Capabilities { capabilities } => capabilities,
            other => {
                return Err(AgentError::Peer(format!(
                    "unexpected answer to capabilities: {other:?}"
                )))
            }
        };
        // The node the destination proved with its credential, when it proved one.
        if let Some(proven) = conn.proven_node().filter(|n| *n != req.destination) {
            return Err(AgentError::PermissionDenied(format!(
                "the agent at {addr} proved it is node {proven}, not {}",
                req.destination
            )));
        }
        if remote.node != req.destination {
            return Err(AgentError::BadRequest(format!(
                "agent at {addr} is node {}, not {}",
                remote.node, req.destination
            )));
        }
        let rss = host.tree_rss(pid);
        let local =
            super::policy::modes_with_encryption(&agent.caps.modes, agent.cfg.encrypt_memory);
        // Only when the kernel could: otherwise choose_mode names what the kernel lacks.
        if req.mode == MigrationMode::PreCopy
            && agent.caps.modes.contains(&MigrationMode::PreCopy)
            && !local.contains(&MigrationMode::PreCopy)
        {
            return Err(AgentError::Unsupported(
                "pre-copy with encrypted pages is not supported yet (CRIU's TLS page server \
                 fails between pre-copy rounds, docs/precopy.md); use stop-and-copy or \
                 post-copy, or encrypt_memory = false on both nodes"
                    .into(),
            ));
        }
        let (mode, reason) =
            choose_mode(req.mode, rss, req.max_downtime_ms, &local, &remote.modes)?;
        let mut rec = MigrationRecord {
            id: uuid::Uuid::new_v4().to_string(),
            container: id.clone(),
            task: meta.spec.task.clone(),
            source: agent.cfg.node.clone(),
            destination: req.destination.clone(),
            requested_mode: req.mode,
            mode: Some(mode),
            mode_reason: Some(reason),
            state: MigrationState::Running,
            phases: Vec::new(),
            stats: MigrationStats {
                rss_bytes: rss,
                ..Default::default()
            },
            error: None,
            started_at: now_millis(),
            ended_at: None,
        };
        enter(&mut rec, Phase::Prepare);
        let identity = if agent.cfg.encrypt_memory {
            Some(crate::tls::Identity::generate(&agent.cfg.node, &rec.id)?)
        } else {
            None
        };
        let (page_server, dest_cert) = match conn
            .call(&PeerRequest::Prepare {
                migration: rec.id.clone(),
                mode,
                source_node: agent.cfg.node.clone(),
                meta: Box::new(crate::peer::MigratingContainer::try_from(&meta)?),
                restore_step: external,
                rss_bytes: rss,
                source_addr: Some(
                    std::net::SocketAddr::new(agent.cfg.advertise.into(), agent.cfg.listen.port())
                        .to_string(),
                ),
                tls_cert: identity.as_ref().map(|i| i.cert_pem.clone()),
            })
            .await?
        {
            PeerReply::Prepared {
                page_server,
                tls_cert,
            } => (page_server, tls_cert),
            other => {
                return Err(AgentError::Peer(format!(
                    "unexpected answer to prepare: {other:?}"
                )))
            }
        };
        // A destination that ignored our certificate (an older agent) would run plain TCP.
        crate::tls::agree(identity.is_some(), dest_cert.is_some(), &req.destination)?;
        if identity.is_none() && dest_cert.is_some() {
            return Err(AgentError::Peer(format!(
                "{} sent a TLS certificate the source did not ask for",
                req.destination
            )));
        }
        if let Some(c) = &dest_cert {
            crate::tls::check_peer_cert(c)?;
        }
        let tls = identity.zip(dest_cert);
        Ok(Prepared {
            tls,
            rec,
            conn,
            page_server,
            pid,
            net: net.clone(),
            meta: meta.clone(),
            deadline: host.now() + timeout,
            lazy_port: None,
        })
    }
    .await;
    if r.is_err() {
        unmark();
    }
    r
}

fn images_dir(agent: &Agent, rec: &MigrationRecord) -> std::path::PathBuf {
    agent
        .cfg
        .run_dir
        .join("images")
        .join(format!("{}-src", rec.id))
}

/// Runs a prepared migration to its end. Never leaves the container frozen.
pub async fn run(agent: Arc<Agent>, p: Prepared) -> MigrationRecord {
    let host = System::new(&agent.cfg);
    run_with(&host, agent, p).await
}

/// [`run`] on `host`.
pub async fn run_with<H: Host>(
    host: &H,
    agent: Arc<Agent>,
    mut p: Prepared<H::Link>,
) -> MigrationRecord {
    let base = images_dir(&agent, &p.rec);
    let dir = base.join("img");
    let mode = p.rec.mode.unwrap_or(MigrationMode::StopAndCopy);
    let mut dump_child: Option<H::Helper> = None;
    let mut frozen_at: Option<Instant> = None;
    let left = p.deadline.saturating_duration_since(host.now());
    let res = within(
        host,
        left,
        attempt(
            host,
            &agent,
            &mut p,
            &dir,
            mode,
            &mut dump_child,
            &mut frozen_at,
        ),
    )
    .await
    .unwrap_or_else(|| Err(AgentError::Timeout("migration timed out".into())));
    match res {
        Ok(committed_at) => {
            let mut lazy_error: Option<String> = None;
            // The destination owns the container from the commit on (also for task-exited,
            // which the source's Slurm task sends as soon as its frozen copy is killed).
            if let Some(c) = agent.containers().get_mut(&p.rec.container) {
                c.state = ContainerState::MigratedAway;
                c.migrated_to = Some(p.rec.destination.clone());
            }
            if let (Some(f), Some(c)) = (frozen_at, committed_at) {
                p.rec.stats.downtime_ms = Some(c.duration_since(f).as_millis() as u64);
            }
            if mode == MigrationMode::PostCopy {
                enter(&mut p.rec, Phase::LazyPages);
                agent.publish(&p.rec);
                if let Some(mut d) = dump_child.take() {
                    // Bounded: a stuck page transfer must not hold the source forever.
                    let limit = Duration::from_millis(agent.cfg.migration_timeout_ms)
                        + Duration::from_secs(p.rec.stats.rss_bytes / (16 << 20));
                    match within(host, limit, d.wait()).await {
                        Some(st) if matches!(&st, Ok(s) if s.success()) => {}
                        Some(st) => {
                            tracing::error!(migration = %p.rec.id, status = ?st, "lazy page server failed after resume");
                            lazy_error = Some(format!(
                                "lazy page server failed after resume: it {}",
                                crate::criu::exit_text(&st)
                            ));
                        }
                        None => {
                            tracing::error!(migration = %p.rec.id, "lazy page transfer not finished in {limit:?}; stopping it");
                            d.start_kill();
                            let _ = d.wait().await;
                            lazy_error =
                                Some(format!("lazy page transfer not finished in {limit:?}"));
                        }
                    }
                }
                let (pages, lazy) = host.lazy_totals(&dir);
                p.rec.stats.pages_scanned = pages;
                p.rec.stats.pages_lazy = lazy;
                p.rec.stats.pages_written = pages.saturating_sub(lazy);
                // Lazy pages crossed the wire once each.
                p.rec.stats.bytes_sent += p.rec.stats.pages_lazy * 4096;
            }
            enter(&mut p.rec, Phase::Cleanup);
            let host_rootfs = matches!(p.meta.spec.rootfs, rebalancer_proto::RootfsSpec::Host);
            if let Some(f) = frozen_at {
                p.rec.stats.frozen_ms = Some(host.now().duration_since(f).as_millis() as u64);
            }
            commit::release_source(host, &agent, &p.rec.container, p.pid, &p.net, host_rootfs)
                .await;
            remove_images(&base);
            if let Some(e) = lazy_error {
                // Post-copy after resume: the destination may miss pages (post-copy's failure model).
                finish(&mut p.rec, MigrationState::Failed, Some(e));
            } else if committed_at.is_some() {
                finish(&mut p.rec, MigrationState::Succeeded, None);
            } else {
                // Commit was sent but its answer never came: the destination may or may not run
                // the container; the source copy is gone either way (never two live copies).
                let why = format!(
                    "commit sent to {} but not confirmed: check the container there",
                    p.rec.destination
                );
                finish(&mut p.rec, MigrationState::Failed, Some(why));
            }
            tracing::info!(migration = %p.rec.id, container = %p.rec.container, downtime_ms = ?p.rec.stats.downtime_ms, state = ?p.rec.state, "migration finished");
        }
        Err(e) => {
            tracing::warn!(migration = %p.rec.id, container = %p.rec.container, error = %e.chain(), "migration failed, rolling back");
            enter(&mut p.rec, Phase::Rollback);
            agent.publish(&p.rec);
            let _ = within(
                host,
                Duration::from_secs(3),
                p.conn.call(&PeerRequest::Abort { reason: e.chain() }),
            )
            .await;
            if let Some(mut d) = dump_child.take() {
                // A lazy dump still serving: nudge it out of accept() so it finishes.
                if let Some(addr) = lazy_addr(&agent, &p) {
                    let tls = base.join("tls");
                    host.poke(addr, p.tls.is_some().then_some(tls.as_path()))
                        .await;
                }
                if within(host, Duration::from_secs(5), d.wait())
                    .await
                    .is_none()
                {
                    d.start_kill();
                    let _ = d.wait().await;
                }
            }
            if frozen_at.is_some() {
                commit::resume_source(host, &agent, &p.rec.id, &p.rec.container, p.pid, &p.net)
                    .await;
                p.rec.stats.frozen_ms =
                    frozen_at.map(|f| host.now().duration_since(f).as_millis() as u64);
            } else if let Some(c) = agent.containers().get_mut(&p.rec.container) {
                c.state = ContainerState::Running;
            }
            remove_images(&base);
            finish(&mut p.rec, MigrationState::RolledBack, Some(e.chain()));
        }
    }
    agent.publish(&p.rec);
    p.rec
}

/// Removes a migration's source images unless `REBALANCER_KEEP_IMAGES` is set (debugging).
fn remove_images(dir: &std::path::Path) {
    if std::env::var_os("REBALANCER_KEEP_IMAGES").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn lazy_addr<L>(agent: &Agent, p: &Prepared<L>) -> Option<(std::net::Ipv4Addr, u16)> {
    p.lazy_port.map(|port| (agent.cfg.advertise, port))
}

/// Pre-copy rounds while the container runs, until [`precopy_converged`]; returns the index
/// of the last round (the parent of the final dump).
async fn precopy_rounds<H: Host>(
    host: &H,
    agent: &Arc<Agent>,
    p: &mut Prepared<H::Link>,
    dir: &std::path::Path,
    tls: &[String],
) -> Result<u32, AgentError> {
    let base = dir.parent().unwrap_or(dir).to_path_buf();
    let policy = PrecopyPolicy::default();
    let mut round = 0u32;
    loop {
        let ps = match p
            .conn
            .call(&PeerRequest::PrecopyRound { round, last: false })
            .await?
        {
            PeerReply::RoundReady { page_server } => page_server,
            other => {
                return Err(AgentError::Peer(format!(
                    "unexpected answer to a pre-copy round: {other:?}"
                )))
            }
        };
        enter(&mut p.rec, Phase::PrecopyRound { round });
        agent.publish(&p.rec);
        let rdir = base.join(format!("pre-{round}"));
        std::fs::create_dir_all(&rdir).map_err(|source| AgentError::Io {
            what: format!("mkdir {}", rdir.display()),
            source,
        })?;
        let prev = (round > 0).then(|| format!("../pre-{}", round - 1));
        let started = host.now();
        host.pre_dump(p.pid, &rdir, ps, prev.as_deref(), tls)
            .await?;
        let s = host.stats(&rdir, "stats-dump").unwrap_or_default();
        p.rec.stats.bytes_sent += s.pages_written * 4096;
        p.rec.stats.rounds.push(rebalancer_proto::RoundStats {
            round,
            pages_scanned: s.pages_scanned,
            pages_written: s.pages_written,
            pages_skipped_parent: s.pages_skipped_parent,
            duration_ms: host.now().duration_since(started).as_millis() as u64,
        });
        tracing::info!(migration = %p.rec.id, round, written = s.pages_written, scanned = s.pages_scanned, "pre-copy round done");
        if let Some(why) = precopy_converged(&policy, &p.rec.stats.rounds) {
            let reason = p.rec.mode_reason.take().unwrap_or_default();
            p.rec.mode_reason = Some(format!("{reason}; pre-copy stopped: {why}"));
            return Ok(round);
        }
        round += 1;
    }
}

/// Dump, transfer, restore, commit. Returns when the destination committed.
async fn attempt<H: Host>(
    host: &H,
    agent: &Arc<Agent>,
    p: &mut Prepared<H::Link>,
    dir: &std::path::Path,
    mode: MigrationMode,
    dump_child: &mut Option<H::Helper>,
    frozen_at: &mut Option<Instant>,
) -> Result<Option<Instant>, AgentError> {
    std::fs::create_dir_all(dir).map_err(|source| AgentError::Io {
        what: format!("mkdir {}", dir.display()),
        source,
    })?;
    let net_inode = host.net_inode(&p.net)?;
    let tls = match &p.tls {
        Some((mine, peer)) => {
            crate::tls::write_files(&dir.parent().unwrap_or(dir).join("tls"), mine, peer, true)?
        }
        None => Vec::new(),
    };
    let mut args = criu::DumpArgs {
        pid: p.pid,
        images_dir: dir.to_path_buf(),
        net_inode,
        ext_mounts: container::external_mounts(&p.meta.mounts)
            .into_iter()
            .map(|(t, k, _)| (t, k))
            .collect(),
        ext_files: p
            .meta
            .stdio_keys
            .iter()
            .filter(|k| container::is_external_file_key(k))
            .cloned()
            .collect(),
        tls: tls.clone(),
        ..Default::default()
    };
    if mode == MigrationMode::PreCopy {
        let last = precopy_rounds(host, agent, p, dir, &tls).await?;
        match p
            .conn
            .call(&PeerRequest::PrecopyRound {
                round: last + 1,
                last: true,
            })
            .await?
        {
            PeerReply::RoundReady { page_server } => p.page_server = Some(page_server),
            other => {
                return Err(AgentError::Peer(format!(
                    "unexpected answer to the final round: {other:?}"
                )))
            }
        }
        args.prev = Some(format!("../pre-{last}"));
    }
    enter(&mut p.rec, Phase::Freeze);
    agent.publish(&p.rec);
    *frozen_at = Some(host.now());
    let mut lazy_serve = None;
    match mode {
        MigrationMode::PostCopy => {
            let ip = agent.cfg.advertise;
            let port = host.pick_port(ip)?;
            args.lazy_serve = Some((ip, port));
            lazy_serve = Some((ip, port));
            p.lazy_port = Some(port);
            enter(&mut p.rec, Phase::Dump);
            agent.publish(&p.rec);
            match host.dump_lazy(&args).await {
                Ok(child) => *dump_child = Some(child),
                Err(e) => {
                    // criu exited without serving: its own failure path resumed the tree.
                    *frozen_at = None;
                    return Err(e);
                }
            }
        }
        _ => {
            args.page_server = p.page_server;
            enter(&mut p.rec, Phase::Dump);
            agent.publish(&p.rec);
            if let Err(e) = host.dump(&args).await {
                // A failed dump resumes the tree itself (CRIU's failure path).
                *frozen_at = None;
                return Err(e);
            }
        }
    }
    if let Some(s) = host.stats(dir, "stats-dump") {
        p.rec.stats.pages_scanned = s.pages_scanned;
        p.rec.stats.pages_written = s.pages_written;
        p.rec.stats.pages_lazy = s.pages_lazy;
        if mode != MigrationMode::PostCopy {
            p.rec.stats.bytes_sent += s.pages_written * 4096;
        }
    }
    enter(&mut p.rec, Phase::Transfer);
    agent.publish(&p.rec);
    let mut sub = super::timing::SubPhases::new(&p.rec.id, "source", host.now());
    let before = p.conn.bytes_sent();
    p.conn.send_images(dir).await?;
    sub.mark("send-images", host.now());
    enter(&mut p.rec, Phase::Restore);
    agent.publish(&p.rec);
    match p
        .conn
        .call(&PeerRequest::Restore {
            lazy_pages: lazy_serve,
        })
        .await?
    {
        PeerReply::Restored { .. } => {}
        other => {
            return Err(AgentError::Peer(format!(
                "unexpected answer to restore: {other:?}"
            )))
        }
    }
    sub.mark("restore-call", host.now());
    enter(&mut p.rec, Phase::NetworkSwitch);
    agent.publish(&p.rec);
    // Point of no return: from here the source never resumes its copy.
    host.withdraw_route(&p.net).await;
    sub.mark("withdraw-route", host.now());
    let r = p.conn.call(&PeerRequest::Commit).await;
    sub.mark("commit-call", host.now());
    note_dump_log(&mut sub, dir);
    sub.log("switch");
    p.rec.stats.bytes_sent += p.conn.bytes_sent() - before;
    match r {
        Ok(PeerReply::Committed { .. }) => Ok(Some(host.now())),
        Ok(other) => {
            tracing::error!(migration = %p.rec.id, answer = ?other, "unexpected answer to commit; destination owns the container");
            Ok(Some(host.now()))
        }
        Err(e) => {
            // Unknown outcome after Commit: never resume (could make two copies).
            tracing::error!(migration = %p.rec.id, error = %e.chain(), "commit unanswered; source copy is not resumed");
            Ok(None)
        }
    }
}

/// CRIU's own figures of the dump, from its log (ms since CRIU started): tree seized, network
/// locked, dump done.
fn note_dump_log(sub: &mut super::timing::SubPhases, dir: &std::path::Path) {
    use super::timing::{criu_log_mark_ms, criu_log_span_ms};
    let Ok(log) = std::fs::read_to_string(dir.join("dump.log")) else {
        return;
    };
    // CRIU's start-up before this (cgroups, mounts) runs before the tree stops.
    if let Some(ms) = criu_log_mark_ms(&log, "Seized task") {
        sub.note("criu-dump-log-seized", ms);
    }
    if let Some(ms) = criu_log_mark_ms(&log, "net: Lock network") {
        sub.note("criu-dump-log-net-locked", ms);
    }
    if let Some(ms) = criu_log_mark_ms(&log, "Dumping finished successfully") {
        sub.note("criu-dump-log-done", ms);
    }
    if let Some(ms) = criu_log_span_ms(&log) {
        sub.note("criu-dump-log-total", ms);
    }
}
