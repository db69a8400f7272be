//! What commit and rollback do. Destination: the incoming transaction ([`Incoming`]), its
//! commit (resume, route, ARP, the container is ours) and its undo. Source: resuming the frozen
//! copy after a failure before Commit, and releasing it after Commit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use rebalancer_proto::{now_millis, ContainerState, MigrationId, MigrationMode};

use super::host::{within, Helper, Host, PageServerGate};
use super::restore_step::StepLaunch;
use crate::agent::{Agent, LazySupply};
use crate::container::{Container, ContainerMeta};
use crate::error::AgentError;
use crate::netns::ContainerNet;
use crate::peer::PeerReply;

/// The sending half of a page server's gate ([`PageServerGate`]).
pub(super) type PageServerOpener =
    tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<Result<(), String>>>;

/// How long a gated page server may take to listen once opened.
const OPEN_WITHIN: Duration = Duration::from_secs(5);

/// An incoming migration on the destination, and what to undo if it does not commit.
pub(super) struct Incoming<H: Host> {
    pub(super) migration: MigrationId,
    pub(super) mode: MigrationMode,
    pub(super) meta: ContainerMeta,
    pub(super) net: ContainerNet,
    pub(super) root: PathBuf,
    pub(super) dir: PathBuf,
    /// Per-migration tmpfs directory: `img` (restored images) and `pre-K` (pre-copy rounds).
    pub(super) mig_dir: PathBuf,
    pub(super) images: PathBuf,
    pub(super) page_server: Option<H::Helper>,
    /// The source opens each page server itself once it guarded the port (`opens_page_servers`
    /// at prepare): the current one's port and gate, until `open-page-server`.
    pub(super) opens_page_servers: bool,
    pub(super) page_server_gate: Option<(u16, PageServerOpener)>,
    pub(super) lazy_daemon: Option<H::Helper>,
    /// Post-copy, peer protocol 4: this end of the agents' lazy-page link, until `restore`
    /// hands it to the lazy-pages daemon (closed with the arrival otherwise).
    pub(super) lazy_link: Option<std::os::fd::OwnedFd>,
    /// Memory this arrival announced, held against other arrivals until it ends (released
    /// when dropped).
    #[allow(dead_code)]
    pub(super) reservation: Option<super::room::Reservation>,
    pub(super) restored_pid: Option<i32>,
    pub(super) committed: bool,
    pub(super) restore_step: bool,
    /// The restore step (srun), started at prepare so that its launch is out of the downtime.
    pub(super) step: Option<StepLaunch>,
    pub(super) step_child: Option<H::Step>,
    pub(super) source: Option<(String, String)>,
    /// The container's cgroup here (agent-restored containers); criu restore runs inside it.
    pub(super) cgroup: Option<crate::cgroup::Cgroup>,
    /// CRIU's TLS options for this migration's page transfers (empty: plain TCP).
    pub(super) tls: Vec<String>,
    /// The fencing token the source prepared with (`None`: a source of the previous release).
    pub(super) epoch: Option<u64>,
    /// The job's spool directory this migration created here (spool.rs), removed on undo.
    pub(super) spool: Option<PathBuf>,
}

impl<H: Host> Incoming<H> {
    /// The gate of the next page server when the source opens them itself (it replaces the
    /// previous one's); its port is set by [`Self::gated`] once bound.
    pub(super) fn gate(&mut self) -> Option<PageServerGate> {
        self.page_server_gate = None;
        if !self.opens_page_servers {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.page_server_gate = Some((0, tx));
        Some(rx)
    }

    pub(super) fn gated(&mut self, port: u16) {
        if let Some((p, _)) = &mut self.page_server_gate {
            *p = port;
        }
    }

    /// `open-page-server`: the source guarded `port`; answers once the page server listens.
    pub(super) async fn open_page_server(
        &mut self,
        host: &H,
        port: u16,
    ) -> Result<PeerReply, AgentError> {
        let opener = match self.page_server_gate.take() {
            Some((p, o)) if p == port => o,
            Some((p, o)) => {
                self.page_server_gate = Some((p, o));
                return Err(AgentError::BadRequest(format!(
                    "open-page-server names port {port}; the page server waits on port {p}"
                )));
            }
            None => {
                return Err(AgentError::BadRequest(format!(
                    "open-page-server for port {port}: no page server waits to be opened"
                )))
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        opener.send(tx).map_err(|_| {
            AgentError::Internal(format!(
                "the page server on port {port} ended before it was opened"
            ))
        })?;
        match within(host, OPEN_WITHIN, rx).await {
            Some(Ok(Ok(()))) => {
                tracing::debug!(migration = %self.migration, port, "page server opened by the source");
                Ok(PeerReply::Ack)
            }
            Some(Ok(Err(e))) => Err(AgentError::Internal(format!(
                "page server on port {port}: {e}"
            ))),
            Some(Err(_)) => Err(AgentError::Internal(format!(
                "the page server on port {port} ended before it listened"
            ))),
            None => Err(AgentError::Timeout(format!(
                "the page server on port {port} did not listen within {} s",
                OPEN_WITHIN.as_secs()
            ))),
        }
    }

    /// Kills what was restored and removes everything this migration created here.
    pub(super) async fn undo(&mut self, host: &H, agent: &Agent, why: &str) {
        tracing::warn!(migration = %self.migration, container = %self.meta.spec.id, reason = why, "incoming migration aborted");
        // First, before anything is gone: a late Commit for this migration is refused for good.
        if let Some(store) = agent.store.get() {
            let epoch = self
                .epoch
                .unwrap_or_else(|| super::policy::epoch_of(&self.migration));
            if let Err(e) = store.fence(&self.migration, epoch) {
                tracing::error!(migration = %self.migration, error = %crate::adopt::chain(&e), "cannot journal the fence of an undone arrival");
            }
        }
        agent.restore_steps().remove(&self.migration);
        if let Some(mut c) = self.step_child.take() {
            c.start_kill();
            let _ = c.wait().await;
        }
        let restored = self.restored_pid.take();
        if let Some(pid) = restored {
            // The network first: the restored tree holds the client's connections (same
            // addresses and sequence numbers as the source's copy), and killing it with a
            // link out would close them for the client (found by the fault matrix).
            host.destroy_net(&self.net).await;
            host.kill_and_reap(pid).await;
        }
        for c in [self.page_server.take(), self.lazy_daemon.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            c.start_kill();
            let _ = c.wait().await;
        }
        if restored.is_none() {
            host.destroy_net(&self.net).await;
        }
        if let Some(cg) = self.cgroup.take() {
            host.remove_cgroup(cg).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.mig_dir);
        if let Some(d) = self.spool.take() {
            let _ = std::fs::remove_dir_all(d);
        }
        agent
            .incoming()
            .remove(&(self.meta.spec.id.clone(), self.meta.address));
    }
}

/// The destination's commit: resumes the restored tree, takes the address over and makes the
/// container this node's. `migration`/`epoch`: what the Commit names (absent from sources of
/// the previous release); a Commit for another migration or epoch, or for a fenced one, is
/// refused and the arrival undone by the caller.
pub(super) async fn commit_here<H: Host>(
    host: &Arc<H>,
    agent: &Arc<Agent>,
    inc: &mut Incoming<H>,
    migration: Option<&str>,
    epoch: Option<u64>,
) -> Result<PeerReply, AgentError> {
    let pid = inc
        .restored_pid
        .ok_or_else(|| AgentError::BadRequest("commit before restore".into()))?;
    if let Some(m) = migration.filter(|m| *m != inc.migration) {
        return Err(AgentError::BadRequest(format!(
            "commit names migration {m}, this connection prepared {}",
            inc.migration
        )));
    }
    if let (Some(live), Some(got)) = (inc.epoch, epoch) {
        if live != got {
            return Err(fence_refusal(crate::store::StoreError::WrongEpoch {
                migration: inc.migration.clone(),
                live,
                got,
            }));
        }
    }
    // Before the tree can run, and atomic with the `outcome` question's fence: either this
    // commit mark or the fence exists, never both (a restarted or unanswered source asks).
    match agent.store.get() {
        Some(store) => {
            let epoch = inc
                .epoch
                .unwrap_or_else(|| super::policy::epoch_of(&inc.migration));
            match store.commit_gate(&inc.migration, epoch, &inc.meta.spec.id, &inc.net.name) {
                Ok(()) => {}
                Err(e @ crate::store::StoreError::Fenced { .. }) => return Err(fence_refusal(e)),
                // The mark cannot be written: committing anyway would leave a restarted source
                // unable to learn it; refuse, the source then asks and finds it not committed.
                Err(e) => {
                    return Err(AgentError::Internal(format!(
                        "cannot journal the commit: {}",
                        crate::adopt::chain(&e)
                    )))
                }
            }
        }
        None => agent.mark_committed(&inc.migration, &inc.meta.spec.id, &inc.net.name),
    }
    inc.committed = true;
    let mut sub = super::timing::SubPhases::new(&inc.migration, "destination", host.now());
    // Resume first, then take the address over.
    host.signal_tree(pid, Signal::SIGCONT);
    let resumed_at = now_millis();
    sub.mark("resume", host.now());
    if let Err(e) = host.add_route(&inc.net).await {
        tracing::error!(migration = %inc.migration, error = %e.chain(), "cannot add the container route");
    }
    sub.mark("route", host.now());
    host.announce(&agent.cfg.uplink, inc.meta.address);
    sub.log("commit");
    let mut meta = inc.meta.clone();
    meta.started_at = inc.meta.started_at;
    let (runs_in, waiter) = agent
        .restore_steps()
        .get(&inc.migration)
        .map_or((None, None), |s| (s.task.clone(), s.waiter));
    let c = Container {
        meta,
        net: inc.net.clone(),
        root: inc.root.clone(),
        dir: inc.dir.clone(),
        pid,
        state: ContainerState::Running,
        exit_status: None,
        external: inc.restore_step,
        migrated_to: None,
        arrived_from: if inc.restore_step {
            inc.source.clone()
        } else {
            None
        },
        final_status: None,
        cgroup: inc.cgroup.take(),
        runs_in,
        waiter,
    };
    agent.containers().insert(inc.meta.spec.id.clone(), c);
    // Recorded now: a restart's sweep would take a namespace without record for an
    // uncommitted arrival.
    agent.persist();
    agent.restore_steps().remove(&inc.migration);
    if let Some(mut child) = inc.step_child.take() {
        // srun lives as long as the restored task; reap it when it ends.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
    }
    agent
        .incoming()
        .remove(&(inc.meta.spec.id.clone(), inc.meta.address));
    let images = inc.mig_dir.clone();
    let daemon = inc.lazy_daemon.take();
    let (mig, id) = (inc.migration.clone(), inc.meta.spec.id.clone());
    let (host, agent) = (host.clone(), agent.clone());
    // The images go once the lazy daemon is done (it reads them); a daemon whose container
    // ended has nothing left to serve and is stopped; a daemon that ends in error leaves the
    // container unable to get its missing pages, so it is killed (post-copy safety).
    if daemon.is_some() {
        note_lazy_supply(&agent, &mig, LazySupply::Serving);
    }
    tokio::spawn(async move {
        if let Some(d) = daemon {
            let end = watch_lazy_daemon(&*host, &agent, &mig, &id, pid, d, &images).await;
            let supply = match end {
                LazyEnd::Lost(why) => LazySupply::Lost(why),
                LazyEnd::Complete | LazyEnd::ContainerEnded => LazySupply::Complete,
            };
            note_lazy_supply(&agent, &mig, supply);
        }
        let _ = std::fs::remove_dir_all(images);
    });
    tracing::info!(migration = %inc.migration, container = %inc.meta.spec.id, pid, "migration committed: container runs here");
    Ok(PeerReply::Committed { resumed_at })
}

/// How a post-copy arrival's page supply ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LazyEnd {
    /// Every page arrived (the daemon exited 0).
    Complete,
    /// The container ended first; the daemon was stopped.
    ContainerEnded,
    /// The daemon ended in error (its page source vanished: the source died, the network cut,
    /// the daemon was killed) while the container ran: the container was killed, because a
    /// page it has not received yet could never arrive.
    Lost(String),
}

/// Follows the lazy-pages daemon of a committed post-copy arrival until it ends; see
/// [`LazyEnd`]. `images`: where its log is.
pub(super) async fn watch_lazy_daemon<H: Host>(
    host: &H,
    agent: &Agent,
    migration: &str,
    container: &str,
    pid: i32,
    mut d: H::Helper,
    images: &std::path::Path,
) -> LazyEnd {
    loop {
        tokio::select! {
            st = d.wait() => {
                let totals = std::fs::read_to_string(images.join("img").join("lazy-pages.log"))
                    .ok()
                    .and_then(|l| crate::criu::lazy_transfer_totals(&l));
                if matches!(&st, Ok(s) if s.success()) {
                    tracing::info!(migration = %migration, container = %container, pages = ?totals, "lazy-pages daemon finished: every page arrived");
                    return LazyEnd::Complete;
                }
                if !host.alive(pid) {
                    return LazyEnd::ContainerEnded;
                }
                let why = format!(
                    "the lazy-pages daemon {} before every page arrived (copied/total: {}); \
                     the container was killed, since its missing pages can no longer be served",
                    crate::criu::exit_text(&st),
                    totals.map_or("unknown".into(), |(c, t)| format!("{c}/{t}"))
                );
                tracing::error!(migration = %migration, container = %container, pid, reason = %why, "post-copy page source lost: killing the container");
                host.signal_tree(pid, Signal::SIGKILL);
                host.kill(pid);
                agent.persist();
                return LazyEnd::Lost(why);
            }
            _ = host.sleep(Duration::from_millis(500)) => {
                if !host.alive(pid) {
                    tracing::warn!(migration = %migration, container = %container, "container ended before all pages arrived; stopping lazy-pages");
                    d.start_kill();
                    let _ = d.wait().await;
                    return LazyEnd::ContainerEnded;
                }
            }
        }
    }
}

/// At most this many page-supply ends are kept for sources that never ask (a source that
/// died); the oldest by id go first.
const LAZY_SUPPLY_KEPT: usize = 64;

fn note_lazy_supply(agent: &Agent, migration: &str, supply: LazySupply) {
    let mut m = agent.lazy_supply();
    match m.get(migration) {
        Some(tx) => {
            tx.send_replace(supply);
        }
        None => {
            m.insert(migration.to_string(), tokio::sync::watch::channel(supply).0);
        }
    }
    while m.len() > LAZY_SUPPLY_KEPT {
        let ended = m
            .iter()
            .find(|(_, tx)| *tx.borrow() != LazySupply::Serving)
            .map(|(k, _)| k.clone());
        let Some(k) = ended else { break };
        m.remove(&k);
    }
}

/// How long `lazy-end` waits for a daemon that still serves: the source asks once its own
/// lazy dump ended, which the daemon's end causes, so the daemon ends within moments.
pub const LAZY_END_WAIT: Duration = Duration::from_secs(10);

/// The destination's answer to `lazy-end` (see `PeerRequest::LazyEnd`): whether the committed
/// post-copy arrival `migration` got every page, waiting up to [`LAZY_END_WAIT`] for its
/// daemon to end. An answered end is forgotten.
pub(super) async fn answer_lazy_end<H: Host>(
    host: &H,
    agent: &Agent,
    migration: &str,
) -> Result<PeerReply, AgentError> {
    let rx = agent.lazy_supply().get(migration).map(|tx| tx.subscribe());
    let Some(mut rx) = rx else {
        return Err(AgentError::NotFound(format!(
            "no committed post-copy arrival {migration} on {}",
            agent.cfg.node
        )));
    };
    let ended = tokio::select! {
        r = rx.wait_for(|s| *s != LazySupply::Serving) => r.map(|s| s.clone()).ok(),
        () = host.sleep(LAZY_END_WAIT) => None,
    };
    let Some(end) = ended else {
        return Err(AgentError::Busy(format!(
            "the lazy-pages daemon of {migration} still serves after {} s",
            LAZY_END_WAIT.as_secs()
        )));
    };
    agent.lazy_supply().remove(migration);
    let lost = match end {
        LazySupply::Lost(why) => Some(why),
        _ => None,
    };
    tracing::info!(migration = %migration, lost = ?lost, "lazy-end asked: answered");
    Ok(PeerReply::LazyEnded { lost })
}

/// How long a rollback after a killed `criu dump` watches the resumed tree.
pub const KILLED_DUMP_WATCH: Duration = Duration::from_secs(5);

/// After a rollback whose `criu dump` was killed by a signal (not interrupted through CRIU's
/// own failure path): whether the tree died, and why in a sentence; `None` when it still runs
/// after [`KILLED_DUMP_WATCH`] or the dump ended otherwise. CRIU's parasite returns a seized
/// task to its own code by itself once its tracer is gone (compel's parasite daemon reads EOF
/// on its control socket and sigreturns to the saved registers), with its TCP sockets still
/// in repair mode until this agent turns it off; a `recv` or `send` in that window fails
/// (EPERM), which a program may not survive (docs/fault-tolerance.md). The record must then
/// say the job was lost, never that it was rolled back.
pub(super) async fn lost_to_a_killed_dump<H: Host>(
    host: &H,
    agent: &Agent,
    e: &AgentError,
    pid: i32,
    container: &str,
) -> Option<String> {
    let AgentError::Criu { action, message } = e else {
        return None;
    };
    if !action.contains("dump") || !message.starts_with("was killed by signal") {
        return None;
    }
    let signal = message.split(':').next().unwrap_or(message);
    let started = host.now();
    while host.alive(pid) {
        if host.now().duration_since(started) >= KILLED_DUMP_WATCH {
            tracing::warn!(container = %container, pid, "criu {action} was killed mid-dump; the resumed tree still runs");
            return None;
        }
        host.sleep(Duration::from_millis(100)).await;
    }
    let status = agent
        .containers()
        .get(container)
        .and_then(|c| c.exit_status)
        .map_or("it ended".to_string(), |s| {
            format!("it ended (wait status {s})")
        });
    let why = format!(
        "criu {action} {signal} while its parasite was in the container's tasks; the tasks \
         resumed by themselves with their TCP sockets still in repair mode, and {status}: \
         the job is lost"
    );
    tracing::error!(container = %container, pid, reason = %why, "job lost to a killed criu dump");
    Some(why)
}

fn fence_refusal(e: crate::store::StoreError) -> AgentError {
    tracing::warn!(error = %e, "late or foreign commit refused");
    AgentError::BadRequest(e.to_string())
}

/// Resumes the frozen source tree after a failure before Commit.
pub(super) async fn resume_source<H: Host>(
    host: &H,
    agent: &Agent,
    migration: &str,
    container: &str,
    pid: i32,
    net: &ContainerNet,
) {
    match host.unlock(net).await {
        Ok(n) => tracing::info!(migration = %migration, tables = n, "network lock removed"),
        Err(e) => {
            tracing::error!(migration = %migration, error = %e.chain(), "cannot remove CRIU's network lock")
        }
    }
    let n = host.release_tcp_repair(pid);
    tracing::info!(migration = %migration, sockets = n, "TCP repair mode turned off");
    host.signal_tree(pid, Signal::SIGCONT);
    // Withdrawn at network-switch when Commit was sent and found not committed; harmless when
    // the route is still there.
    if let Err(e) = host.add_route(net).await {
        tracing::error!(migration = %migration, error = %e.chain(), "cannot restore the container's route");
    }
    if let Some(c) = agent.containers().get_mut(container) {
        c.state = ContainerState::Running;
    }
}

/// After Commit: the source's copy is killed and its namespace, cgroup and directory removed.
pub(super) async fn release_source<H: Host>(
    host: &H,
    agent: &Agent,
    container: &str,
    pid: i32,
    net: &ContainerNet,
    host_rootfs: bool,
) {
    host.signal_tree(pid, Signal::SIGKILL);
    host.kill(pid);
    host.destroy_net(net).await;
    let cgroup = agent
        .containers()
        .get_mut(container)
        .and_then(|c| c.cgroup.take());
    if let Some(cg) = cgroup {
        // Empties once the reaper collected the killed copy.
        host.remove_cgroup(cg).await;
    }
    if host_rootfs {
        let _ = std::fs::remove_dir_all(agent.container_dir(container));
    }
}
