//! Source side of a migration: pre-flight checks, dump, transfer, restore, commit or rollback.
//! What commit and rollback do to the source's copy is in [`super::commit`].
//!
//! Transaction rule: the source tree stays frozen (CRIU `--leave-stopped`, network locked) until
//! the destination reports the restored tree (itself still stopped). The source then sends
//! Commit — its point of no return — withdraws its route and kills its copy; the destination
//! resumes and announces the address. Any failure before Commit (destination error, timeout,
//! lost connection, destination agent killed) rolls back: the destination undoes its side on
//! EOF/Abort and the source deletes CRIU's nftables lock table and SIGCONTs its tree, so there
//! are never two live copies. A lost answer to Commit is resolved by asking the destination
//! (`outcome`, which fences an uncommitted migration there): committed → the copy here is
//! killed, not committed → resumed, no answer → kept frozen and recorded `unknown`. Post-copy: after Commit the destination runs while pages still
//! come from the source's `criu dump` page server; losing the source or the link then kills the
//! container (the pages exist nowhere else) and the migration is recorded as `failed`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rebalancer_proto::{
    now_millis, ContainerState, MigrateRequest, MigrationMode, MigrationRecord, MigrationState,
    MigrationStats, Phase,
};

use super::heartbeat::{beating, watched_call, Heartbeat};
use super::host::{within, Criu, Helper, Host, PeerLink, System};
use super::page_server_open::{self, Openings};
use super::policy::{choose_mode, measured_model, precopy_converged, PrecopyPolicy};
pub use super::resolve::{
    ask_outcome, resolve_unknown, resolve_until_known, OUTCOME_ATTEMPTS, OUTCOME_CALL,
    RESOLVE_FIRST_PAUSE, RESOLVE_MAX_PAUSE,
};
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
    /// The destination agent's peer address (the outcome question opens a connection of its own).
    pub addr: SocketAddr,
    pub deadline: Instant,
    /// Post-copy: port of the source's lazy page server.
    pub lazy_port: Option<u16>,
    /// Encrypted page transfer: this side's identity and the destination's certificate.
    pub tls: Option<(crate::tls::Identity, String)>,
    /// Progress heartbeats, when the destination agreed to them ([`super::heartbeat`]).
    pub heartbeat: Option<Heartbeat>,
    /// The page servers' guards and openings ([`page_server_open`]).
    pub openings: Openings,
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
        // The node the destination proved with its credential, when it proved one: checked
        // before anything else is asked of it or sent to it.
        if let Some(proven) = conn.proven_node().filter(|n| *n != req.destination) {
            return Err(AgentError::PermissionDenied(format!(
                "the agent at {addr} proved it is node {proven}, not {}",
                req.destination
            )));
        }
        let remote = match conn.call(&PeerRequest::Capabilities).await? {
            PeerReply::Capabilities { capabilities } => capabilities,
            other => {
                return Err(AgentError::Peer(format!(
                    "unexpected answer to capabilities: {other:?}"
                )))
            }
        };
        if remote.node != req.destination {
            return Err(AgentError::BadRequest(format!(
                "agent at {addr} is node {}, not {}",
                remote.node, req.destination
            )));
        }
        let rss = host.tree_rss(pid);
        let local =
            super::policy::offered_modes(req.mode, &agent.caps.modes, agent.cfg.encrypt_memory)?;
        let model = measured_model(&agent.cfg.node, agent.migrations().values());
        let (mode, reason) = choose_mode(
            req.mode,
            rss,
            req.max_downtime_ms,
            &local,
            &remote.modes,
            &model,
        )?;
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
            cancelled_by: None,
        };
        enter(&mut rec, Phase::Prepare);
        let identity = if agent.cfg.encrypt_memory {
            Some(crate::tls::Identity::generate(&agent.cfg.node, &rec.id)?)
        } else {
            None
        };
        super::pause::point(host, &agent.cfg, "prepare").await;
        let own_beat = Heartbeat::from_config(&agent.cfg);
        let (heartbeat, opens_page_servers);
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
                epoch: Some(super::policy::epoch_of(&rec.id)),
                timeout_ms: Some(timeout.as_millis() as u64),
                spool: super::spool::collect(&agent.cfg.slurmd_spool_dir, &meta)?,
                heartbeat_ms: own_beat.map(|h| h.interval.as_millis() as u64),
                opens_page_servers: true,
            })
            .await?
        {
            PeerReply::Prepared {
                page_server,
                tls_cert,
                heartbeat_ms,
                opens_page_servers: opens,
            } => {
                // Only an agreed heartbeat: an older destination sends none.
                heartbeat = own_beat.filter(|_| heartbeat_ms.is_some());
                opens_page_servers = opens;
                (page_server, tls_cert)
            }
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
            addr,
            deadline: host.now() + timeout,
            lazy_port: None,
            heartbeat,
            openings: Openings::new(opens_page_servers),
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

/// Runs a prepared migration to its end. Leaves the container frozen only when the outcome
/// of a sent Commit is unknown; a background task then keeps asking the destination
/// ([`resolve_until_known`]).
pub async fn run(agent: Arc<Agent>, p: Prepared) -> MigrationRecord {
    let host = System::new(&agent.cfg);
    let addr = p.addr;
    let rec = run_with(&host, agent.clone(), p).await;
    if rec.state == MigrationState::Unknown {
        let rec = rec.clone();
        tokio::spawn(async move { resolve_until_known(&host, &agent, rec, addr).await });
    }
    rec
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
    // Whether an inbound hold is prepared (hold.rs); released on every way out.
    let mut held = false;
    let left = p.deadline.saturating_duration_since(host.now());
    // `rebalctl cancel` reaches this migration until its commit point (cancel.rs).
    let cancel = agent.cancels.register(&p.rec.id);
    // The whole-migration deadline ends the attempt up to the restored (stopped) tree only:
    // once Commit may have been sent, no timer decides; the destination's answer does. A
    // cancel ends the attempt the way the deadline does.
    let res = tokio::select! {
        biased;
        by = cancel.cancelled() => Err(AgentError::Cancelled(by)),
        r = within(
            host,
            left,
            attempt(
                host,
                &agent,
                &mut p,
                &dir,
                mode,
                &mut dump_child,
                (&mut frozen_at, &mut held),
            ),
        ) => r.unwrap_or_else(|| Err(AgentError::Timeout("migration timed out".into()))),
    };
    // Kept to the end: a cancel after the commit point is refused as too late.
    let res = res.and_then(|()| cancel.commit_point().map_err(AgentError::Cancelled));
    let res = match res {
        Ok(()) => match commit_and_resolve(host, &agent, &mut p).await {
            CommitEnd::Committed { at, resolved } => {
                // The destination runs and routes the address: the held packets go there.
                release_hold(host, &agent, &p, &mut held).await;
                Ok((at, resolved))
            }
            CommitEnd::NotCommitted(why) => Err(AgentError::Peer(why)),
            CommitEnd::Unknown(why) => {
                // Routed wherever the address is now (or dropped, as without a hold).
                release_hold(host, &agent, &p, &mut held).await;
                keep_frozen(host, &agent, &mut p, &base, mode, dump_child.take(), why).await;
                return p.rec;
            }
        },
        Err(e) => Err(e),
    };
    match res {
        Ok((committed_at, resolved)) => {
            let mut lazy_error: Option<String> = None;
            // The destination owns the container from the commit on (also for task-exited,
            // which the source's Slurm task sends as soon as its frozen copy is killed).
            if let Some(c) = agent.containers().get_mut(&p.rec.container) {
                c.state = ContainerState::MigratedAway;
                c.migrated_to = Some(p.rec.destination.clone());
            }
            if let Some(f) = frozen_at {
                p.rec.stats.downtime_ms = Some(committed_at.duration_since(f).as_millis() as u64);
            }
            if mode == MigrationMode::PostCopy {
                enter(&mut p.rec, Phase::LazyPages);
                agent.publish(&p.rec);
                super::pause::point(host, &agent.cfg, "lazy-pages").await;
                if let Some(d) = dump_child.take() {
                    lazy_error = super::link::finish_lazy_dump(host, &agent, &p.rec, d).await;
                }
                if lazy_error.is_none() {
                    lazy_error = super::link::ask_lazy_end(host, &agent, p.addr, &p.rec).await;
                }
                let (pages, lazy) = host.lazy_totals(&dir);
                p.rec.stats.pages_scanned = pages;
                p.rec.stats.pages_lazy = lazy;
                p.rec.stats.pages_written = pages.saturating_sub(lazy);
                // Lazy pages crossed the wire once each.
                p.rec.stats.bytes_sent += p.rec.stats.pages_lazy * 4096;
            }
            enter(&mut p.rec, Phase::Cleanup);
            agent.publish(&p.rec);
            super::pause::point(host, &agent.cfg, "cleanup").await;
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
            } else {
                // `resolved`: the Commit answer was lost and the destination confirmed it
                // committed when asked; said in the record, the move itself succeeded.
                finish(&mut p.rec, MigrationState::Succeeded, resolved);
            }
            tracing::info!(migration = %p.rec.id, container = %p.rec.container, downtime_ms = ?p.rec.stats.downtime_ms, state = ?p.rec.state, "migration finished");
        }
        Err(e) => {
            cancel.rolling_back();
            tracing::warn!(migration = %p.rec.id, container = %p.rec.container, error = %e.chain(), "migration failed, rolling back");
            enter(&mut p.rec, Phase::Rollback);
            agent.publish(&p.rec);
            let _ = within(
                host,
                Duration::from_secs(3),
                p.conn.call(&PeerRequest::Abort { reason: e.chain() }),
            )
            .await;
            // Cut before its transfer ended (a failure, the deadline, a cancel).
            p.openings.unguard_all(host).await;
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
            // A dump cut by the deadline first leaves through CRIU's own failure path.
            Criu::settle(host).await;
            if frozen_at.is_some() {
                commit::resume_source(host, &agent, &p.rec.id, &p.rec.container, p.pid, &p.net)
                    .await;
                p.rec.stats.frozen_ms =
                    frozen_at.map(|f| host.now().duration_since(f).as_millis() as u64);
            } else if let Some(c) = agent.containers().get_mut(&p.rec.container) {
                c.state = ContainerState::Running;
            }
            // After the resume and the route: the held packets reach the resumed tree.
            release_hold(host, &agent, &p, &mut held).await;
            remove_images(&base);
            let lost =
                super::commit::lost_to_a_killed_dump(host, &agent, &e, p.pid, &p.rec.container)
                    .await;
            if let Some(why) = lost {
                finish(&mut p.rec, MigrationState::Failed, Some(why));
            } else if let AgentError::Cancelled(by) = &e {
                p.rec.cancelled_by = Some(by.clone());
                finish(
                    &mut p.rec,
                    MigrationState::RolledBack,
                    Some(super::cancel::reason(by)),
                );
            } else {
                finish(&mut p.rec, MigrationState::RolledBack, Some(e.chain()));
            }
        }
    }
    agent.publish(&p.rec);
    p.rec
}

/// Removes a migration's source images unless `REBALANCER_KEEP_IMAGES` is set (debugging).
/// Releases the inbound hold, if one is prepared (hold.rs).
async fn release_hold<H: Host>(host: &H, agent: &Agent, p: &Prepared<H::Link>, held: &mut bool) {
    if std::mem::take(held) {
        let r = host.release_inbound(&p.net, &agent.cfg.uplink).await;
        tracing::info!(migration = %p.rec.id, container = %p.rec.container, held_packets = r.packets, held_bytes = r.bytes, drained = r.drained, release_ms = r.release_ms, "inbound hold released");
    }
}

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
        let ps = match watched_call(
            host,
            &mut p.conn,
            p.heartbeat,
            &PeerRequest::PrecopyRound { round, last: false },
        )
        .await?
        {
            PeerReply::RoundReady { page_server } => page_server,
            other => {
                return Err(AgentError::Peer(format!(
                    "unexpected answer to a pre-copy round: {other:?}"
                )))
            }
        };
        open_page_server(host, p, ps).await?;
        enter(&mut p.rec, Phase::PrecopyRound { round });
        agent.publish(&p.rec);
        let rdir = base.join(format!("pre-{round}"));
        std::fs::create_dir_all(&rdir).map_err(|source| AgentError::Io {
            what: format!("mkdir {}", rdir.display()),
            source,
        })?;
        let prev = (round > 0).then(|| format!("../pre-{}", round - 1));
        let started = host.now();
        let r = beating(
            host,
            &mut p.conn,
            p.heartbeat,
            "pre-copy-round",
            host.pre_dump(p.pid, &rdir, ps, prev.as_deref(), tls),
        )
        .await;
        p.openings.unguard(host, ps).await;
        r?;
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

/// [`Openings::open`] for `ps` in `p`'s migration.
async fn open_page_server<H: Host>(
    host: &H,
    p: &mut Prepared<H::Link>,
    ps: (std::net::Ipv4Addr, u16),
) -> Result<(), AgentError> {
    let m = page_server_open::Migration {
        id: &p.rec.id,
        deadline: p.deadline,
        encrypted: p.tls.is_some(),
        heartbeat: p.heartbeat,
    };
    p.openings.open(host, &mut p.conn, &m, ps).await
}

/// Dump, transfer, restore: returns once the destination holds the restored, stopped tree
/// (Commit is [`commit_and_resolve`]'s).
async fn attempt<H: Host>(
    host: &H,
    agent: &Arc<Agent>,
    p: &mut Prepared<H::Link>,
    dir: &std::path::Path,
    mode: MigrationMode,
    dump_child: &mut Option<H::Helper>,
    (frozen_at, held): (&mut Option<Instant>, &mut bool),
) -> Result<(), AgentError> {
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
        match watched_call(
            host,
            &mut p.conn,
            p.heartbeat,
            &PeerRequest::PrecopyRound {
                round: last + 1,
                last: true,
            },
        )
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
    // Before the freeze: the guard and the opening cost no downtime.
    if let (true, Some(ps)) = (mode != MigrationMode::PostCopy, p.page_server) {
        open_page_server(host, p, ps).await?;
    }
    if agent.cfg.hold_inbound {
        // Set up before the freeze; the dump's action script starts it at CRIU's network lock.
        let r = host.hold_inbound(&p.net, &agent.cfg.uplink, dir.parent().unwrap_or(dir));
        args.action_script = super::hold::prepared(r.await, &p.rec);
        *held = args.action_script.is_some();
    }
    // Peer protocol 4: the lazy-page link is opened while the tree still runs (not in the
    // downtime), so that no CRIU process listens.
    let link = if mode == MigrationMode::PostCopy
        && p.conn.version() >= rebalancer_proto::peer::LAZY_LINK_VERSION
    {
        let link = super::link::open(host, agent, &mut p.conn, p.addr.ip(), &p.rec.id).await?;
        let tls_dir = dir.parent().unwrap_or(dir).join("tls");
        Some(
            host.lazy_link_for_dump(link, p.tls.is_some().then_some(tls_dir.as_path()))
                .await?,
        )
    } else {
        None
    };
    enter(&mut p.rec, Phase::Freeze);
    agent.publish(&p.rec);
    super::pause::point(host, &agent.cfg, "freeze").await;
    *frozen_at = Some(host.now());
    let mut lazy_serve = None;
    match mode {
        MigrationMode::PostCopy => {
            match &link {
                Some(sock) => args.lazy_socket = Some(std::os::fd::AsRawFd::as_raw_fd(sock)),
                None => {
                    // An older destination: CRIU listens, behind the guard (lazy_guard.rs).
                    let ip = agent.cfg.advertise;
                    let port = host.pick_port(ip)?;
                    host.guard_lazy_port(
                        (ip, port),
                        crate::lazy_guard::peer_ip(&agent.cfg, &p.rec.destination),
                        Duration::from_millis(agent.cfg.migration_timeout_ms.max(1000)),
                        !args.tls.is_empty(),
                    )
                    .await?;
                    args.lazy_serve = Some((ip, port));
                    lazy_serve = Some((ip, port));
                    p.lazy_port = Some(port);
                }
            }
            enter(&mut p.rec, Phase::Dump);
            agent.publish(&p.rec);
            super::pause::point(host, &agent.cfg, "dump").await;
            let r = beating(
                host,
                &mut p.conn,
                p.heartbeat,
                "dump",
                host.dump_lazy(&args),
            )
            .await;
            // CRIU has its own copy of the link now.
            drop(link);
            match r {
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
            super::pause::point(host, &agent.cfg, "dump").await;
            let r = beating(host, &mut p.conn, p.heartbeat, "dump", host.dump(&args)).await;
            if let Some(ps) = p.page_server {
                p.openings.unguard(host, ps).await;
            }
            if let Err(e) = r {
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
    super::pause::point(host, &agent.cfg, "transfer").await;
    let mut sub = super::timing::SubPhases::new(&p.rec.id, "source", host.now());
    let before = p.conn.bytes_sent();
    send_images_bounded(host, p, dir).await?;
    sub.mark("send-images", host.now());
    enter(&mut p.rec, Phase::Restore);
    agent.publish(&p.rec);
    super::pause::point(host, &agent.cfg, "restore").await;
    match watched_call(
        host,
        &mut p.conn,
        p.heartbeat,
        &PeerRequest::Restore {
            lazy_pages: lazy_serve,
        },
    )
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
    note_dump_log(&mut sub, dir);
    sub.log("switch");
    p.rec.stats.bytes_sent += p.conn.bytes_sent() - before;
    Ok(())
}

/// Lowest image transfer rate accepted with heartbeats on: the destination reads the images
/// without answering heartbeats, so a transfer slower than this counts as a stalled peer.
pub const TRANSFER_FLOOR_BYTES_PER_S: u64 = 8 << 20;

/// Sends the images; with heartbeats, bounded by the stall limit plus their size at
/// [`TRANSFER_FLOOR_BYTES_PER_S`] (a partition during the transfer is found in seconds).
async fn send_images_bounded<H: Host>(
    host: &H,
    p: &mut Prepared<H::Link>,
    dir: &std::path::Path,
) -> Result<u64, AgentError> {
    let Some(hb) = p.heartbeat else {
        return p.conn.send_images(dir).await;
    };
    let size = super::heartbeat::dir_bytes(dir);
    let limit = hb.stall_limit() + Duration::from_secs(size / TRANSFER_FLOOR_BYTES_PER_S);
    within(host, limit, p.conn.send_images(dir))
        .await
        .unwrap_or_else(|| {
            Err(AgentError::Timeout(format!(
                "the destination agent stalled: {size} bytes of images not taken within {} ms",
                limit.as_millis()
            )))
        })
}

/// How a sent Commit ended, as far as the source can know.
#[derive(Debug)]
enum CommitEnd {
    /// The destination committed (`resolved`: learned by asking, the answer to Commit was lost).
    Committed {
        at: Instant,
        resolved: Option<String>,
    },
    /// The destination confirmed it did not commit (and never will: it fenced the migration).
    NotCommitted(String),
    /// Neither answer could be had: the source copy stays frozen.
    Unknown(String),
}

/// Per-call limit of the Commit request; past it the source asks for the outcome.
pub const COMMIT_CALL: Duration = Duration::from_secs(10);
/// The point of no return: withdraws the route, sends Commit and, when its answer is lost
/// (timeout, reset, EOF, error), asks the destination for the outcome. Never resumes anything.
async fn commit_and_resolve<H: Host>(
    host: &H,
    agent: &Arc<Agent>,
    p: &mut Prepared<H::Link>,
) -> CommitEnd {
    enter(&mut p.rec, Phase::NetworkSwitch);
    // Journaled synchronously before Commit can be sent (a restarted agent must know).
    agent.publish(&p.rec);
    super::pause::point(host, &agent.cfg, "network-switch").await;
    host.withdraw_route(&p.net).await;
    let epoch = super::policy::epoch_of(&p.rec.id);
    let before = p.conn.bytes_sent();
    let r = within(
        host,
        COMMIT_CALL,
        p.conn.call(&PeerRequest::Commit {
            migration: Some(p.rec.id.clone()),
            epoch: Some(epoch),
        }),
    )
    .await;
    p.rec.stats.bytes_sent += p.conn.bytes_sent() - before;
    let why = match r {
        Some(Ok(PeerReply::Committed { .. })) => {
            return CommitEnd::Committed {
                at: host.now(),
                resolved: None,
            }
        }
        Some(Ok(other)) => format!("unexpected answer to commit: {other:?}"),
        Some(Err(e)) => e.chain(),
        None => format!("no answer to commit within {} s", COMMIT_CALL.as_secs()),
    };
    tracing::error!(migration = %p.rec.id, destination = %p.rec.destination, error = %why, "commit unanswered; the source copy stays frozen while the destination is asked for the outcome");
    match ask_outcome(host, agent, p.addr, &p.rec, epoch).await {
        Ok(true) => {
            tracing::warn!(migration = %p.rec.id, "the destination committed (its answer to commit was lost)");
            CommitEnd::Committed {
                at: host.now(),
                resolved: Some(format!(
                    "the answer to commit was lost ({why}); {} confirmed it committed",
                    p.rec.destination
                )),
            }
        }
        Ok(false) => CommitEnd::NotCommitted(format!(
            "commit unanswered ({why}); {} confirmed it did not commit and will refuse it",
            p.rec.destination
        )),
        Err(e) => CommitEnd::Unknown(format!(
            "commit sent to {} but its outcome is unknown: the answer was lost ({why}) and \
             the outcome question failed {OUTCOME_ATTEMPTS} times ({}); the container stays \
             frozen on {} until the outcome is resolved",
            p.rec.destination,
            e.chain(),
            agent.cfg.node
        )),
    }
}

/// The outcome is unknown: the source copy stays frozen behind CRIU's lock (container state
/// Migrating, the journal kept for a restarted agent), and the record says `unknown`. Nothing
/// here resumes it: only the destination's answer, later (`adopt.rs`, the controller).
async fn keep_frozen<H: Host>(
    host: &H,
    agent: &Arc<Agent>,
    p: &mut Prepared<H::Link>,
    base: &std::path::Path,
    mode: MigrationMode,
    dump_child: Option<H::Helper>,
    why: String,
) {
    tracing::error!(migration = %p.rec.id, container = %p.rec.container, destination = %p.rec.destination, reason = %why, "migration outcome unknown: the container stays frozen here");
    if let (MigrationMode::PostCopy, Some(d)) = (mode, dump_child) {
        // The destination may run on these pages: serve them as long as it asks.
        if let Some(e) = super::link::finish_lazy_dump(host, agent, &p.rec, d).await {
            tracing::warn!(migration = %p.rec.id, error = %e, "lazy dump of an unknown outcome ended");
        }
    }
    // The images are not needed to resume (the tree is only stopped) nor to commit.
    remove_images(base);
    finish(&mut p.rec, MigrationState::Unknown, Some(why));
    agent.publish(&p.rec);
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
