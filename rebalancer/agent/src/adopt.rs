//! Start-up: take back what a previous agent process ran on this node (`store.rs` records),
//! resolve the migrations it left in flight, and sweep what no record owns.
//!
//! Containers do not belong to the agent process (systemd `KillMode=process`, stdio relays of
//! their own), so they outlive a restart or an upgrade. Rules, in [`judge`]:
//! - a record whose pid 1 no longer exists, or exists with another start time (a reused pid), is
//!   an ended container: its namespace and cgroup are removed, it is never adopted;
//! - a Running record is adopted as is;
//! - a Migrating record (this node was the source) is resolved from the journal: if the journal
//!   never reached `network-switch`, Commit was never sent and the tree is resumed (CRIU's
//!   network lock removed, TCP repair off, SIGCONT); otherwise the destination may run the
//!   container, so the copy here stays frozen and is reported — never two live copies.
//!
//! Incoming migrations are not recorded until they commit (the destination persists the
//! container right after it took over), so an uncommitted incoming tree is found by the sweep:
//! its namespace has no record, and its processes are all stopped (restored with
//! `--leave-stopped`, never resumed): they are killed and the namespace deleted. A namespace
//! without record whose processes run is left alone and reported (it may be a job).

use std::collections::BTreeSet;
use std::sync::Arc;

use nix::sys::signal::Signal;
use rebalancer_proto::{ContainerState, MigrationRecord, MigrationState, Phase};

use crate::agent::Agent;
use crate::error::AgentError;
use crate::peer::{PeerReply, PeerRequest};
use crate::procstat::ProcStat;
use crate::store::{ContainerRecord, Store};

/// The error and its causes on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What to do with one container record at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pid 1 is the recorded process: take it back in this state.
    Adopt,
    /// Interrupted before Commit could be sent: resume the frozen source tree, then adopt.
    Resume { migration: Option<String> },
    /// Commit may have been sent: keep the tree frozen (state Migrating) and report.
    KeepFrozen { migration: String },
    /// Pid 1 is gone or its pid was reused: release the container's resources.
    Ended,
}

/// Whether a source migration's journal shows that Commit may have been sent. Pure.
pub fn commit_may_have_been_sent(rec: &MigrationRecord) -> bool {
    rec.phases.iter().any(|p| {
        matches!(
            p.phase,
            Phase::NetworkSwitch | Phase::LazyPages | Phase::Cleanup
        )
    })
}

/// A journal entry still to be resolved: running, or ended with an unknown outcome.
fn unresolved(s: MigrationState) -> bool {
    !s.is_terminal() || s == MigrationState::Unknown
}

/// The decision for one record. `start_now`: pid 1's start time now (`None`: no such live
/// process); `journal`: this node's unfinished source migrations. Pure: unit-tested.
pub fn judge(
    rec: &ContainerRecord,
    start_now: Option<u64>,
    journal: &[MigrationRecord],
) -> Verdict {
    if start_now != Some(rec.pid_start) {
        return Verdict::Ended;
    }
    // The journal is written synchronously, the record by the reaper up to 100 ms later: an
    // unfinished journal entry counts even when the record still says Running.
    let mine = journal
        .iter()
        .filter(|m| m.container == rec.meta.spec.id && unresolved(m.state))
        .max_by_key(|m| m.started_at);
    if rec.state != ContainerState::Migrating && mine.is_none() {
        return Verdict::Adopt;
    }
    match mine {
        Some(m) if commit_may_have_been_sent(m) => Verdict::KeepFrozen {
            migration: m.id.clone(),
        },
        Some(m) => Verdict::Resume {
            migration: Some(m.id.clone()),
        },
        // Marked Migrating but no journal yet: the migration had not started its dump.
        None => Verdict::Resume { migration: None },
    }
}

/// Network namespaces that belong to this node's agent (`rb-<node>-…`) and no record. Pure.
pub fn unowned_netns<'a>(
    node: &str,
    present: &'a [String],
    owned: &BTreeSet<String>,
) -> Vec<&'a str> {
    let prefix = format!("rb-{node}-");
    present
        .iter()
        .filter(|n| n.starts_with(&prefix) && !owned.contains(*n))
        .map(String::as_str)
        .collect()
}

/// What start-up found, for the log and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub adopted: Vec<String>,
    pub resumed: Vec<String>,
    pub kept_frozen: Vec<String>,
    /// Frozen source copies killed because the destination committed.
    pub released: Vec<String>,
    pub ended: Vec<String>,
    pub swept_netns: Vec<String>,
    pub unowned_running_netns: Vec<String>,
}

/// Re-adopts the records in `store` into `agent` (run once, before the listeners start).
pub async fn adopt(agent: &Arc<Agent>, store: &Store) -> Summary {
    let mut sum = Summary::default();
    let (recs, bad) = store.load();
    agent.note_persisted(&recs);
    crate::agent::ipam::load(agent, store);
    for e in bad {
        tracing::error!(error = %chain(&e), "container record not adopted");
    }
    let (journal, bad) = store.load_migrations();
    for e in bad {
        tracing::error!(error = %chain(&e), "migration journal entry unreadable");
    }
    // A crashed agent's `criu dump` may still hold a tree it was freezing; its migration cannot
    // finish (the peer connection died with the agent), and resuming the tree under it would
    // race with it.
    let killed = kill_orphan_dumps(&agent.cfg.run_dir);
    if killed > 0 {
        tracing::warn!(
            killed,
            "stopped CRIU dumps left by the previous agent process"
        );
    }
    let node = agent.cfg.node.clone();
    let journal: Vec<MigrationRecord> = journal.into_iter().filter(|m| m.source == node).collect();
    let mut owned = BTreeSet::new();
    for rec in recs {
        let id = rec.meta.spec.id.clone();
        let verdict = judge(&rec, crate::procstat::live_start_time(rec.pid), &journal);
        match &verdict {
            Verdict::Ended => {
                tracing::info!(container = %id, pid = rec.pid, "container ended while the agent was away");
                let c = rec.container(ContainerState::Exited);
                crate::netns::destroy(&c.net).await;
                if let Some(cg) = &c.cgroup {
                    cg.remove().await;
                }
                if matches!(rec.meta.spec.rootfs, rebalancer_proto::RootfsSpec::Host) {
                    let _ = std::fs::remove_dir_all(&rec.dir);
                }
                if let Err(e) = store.remove(&id) {
                    tracing::warn!(container = %id, error = %chain(&e), "cannot remove record");
                }
                sum.ended.push(id);
                continue;
            }
            Verdict::Adopt => {
                tracing::info!(container = %id, pid = rec.pid, address = %rec.address, external = rec.external, "container re-adopted");
                sum.adopted.push(id.clone());
                agent.adopt_container(rec.container(rec.state));
            }
            Verdict::Resume { migration } => {
                tracing::warn!(container = %id, migration = ?migration, "migration interrupted by the agent's restart before Commit: resuming the container here");
                agent.adopt_container(resume(&rec).await);
                sum.resumed.push(id.clone());
            }
            Verdict::KeepFrozen { migration } => {
                let Some(m) = journal.iter().find(|m| &m.id == migration) else {
                    continue;
                };
                match ask_destination(agent, m).await {
                    Ok(true) => {
                        tracing::warn!(container = %id, migration = %migration, destination = %m.destination, "migration interrupted after Commit: the destination committed; the frozen copy here is killed");
                        agent.adopt_container(release(&rec, &m.destination).await);
                        sum.released.push(id.clone());
                    }
                    Ok(false) => {
                        tracing::warn!(container = %id, migration = %migration, destination = %m.destination, "migration interrupted at Commit: the destination did not commit; resuming the container here");
                        agent.adopt_container(resume(&rec).await);
                        sum.resumed.push(id.clone());
                    }
                    Err(e) => {
                        tracing::error!(container = %id, migration = %migration, destination = %m.destination, error = %e.chain(), "migration interrupted after Commit may have been sent and the destination cannot say whether it committed: the container stays frozen here; check the destination, then kill or resume this copy");
                        sum.kept_frozen.push(id.clone());
                        agent.adopt_container(rec.container(ContainerState::Migrating));
                    }
                }
            }
        }
        owned.insert(rec.netns.clone());
    }
    // Journal entries without a live container are over.
    for m in &journal {
        if !sum.kept_frozen.contains(&m.container) {
            let _ = store.remove_migration(&m.id);
        }
    }
    // A committed arrival cut before it was resumed is stopped and has no record yet: never
    // swept (the source has killed or will kill its own copy).
    for m in store.commit_marks() {
        owned.insert(m.netns);
    }
    sweep_netns(&node, &owned, &mut sum).await;
    agent.persist();
    tracing::info!(
        node = %node,
        adopted = sum.adopted.len(),
        resumed = sum.resumed.len(),
        kept_frozen = sum.kept_frozen.len(),
        released = sum.released.len(),
        ended = sum.ended.len(),
        swept_netns = sum.swept_netns.len(),
        "start-up re-adoption done"
    );
    // Adopted containers hold their addresses; those that moved away keep theirs lent.
    crate::agent::ipam::sync(agent);
    sum
}

/// Resumes a source tree frozen by a cut migration: CRIU's network lock table removed, TCP
/// repair off, SIGCONT, route (withdrawn at network-switch) re-added.
async fn resume(rec: &ContainerRecord) -> crate::container::Container {
    let id = &rec.meta.spec.id;
    let c = rec.container(ContainerState::Running);
    match crate::netns::unlock_criu_tables(&c.net).await {
        Ok(n) => tracing::info!(container = %id, tables = n, "network lock removed"),
        Err(e) => {
            tracing::error!(container = %id, error = %e.chain(), "cannot remove CRIU's network lock")
        }
    }
    let sockets = crate::container::release_tcp_repair(rec.pid);
    crate::container::signal_tree(rec.pid, Signal::SIGCONT);
    // Harmless if the route is still there.
    let _ = crate::netns::add_route(&c.net).await;
    tracing::info!(container = %id, sockets, "container resumed");
    c
}

/// Kills a source copy whose destination committed and releases its namespace, cgroup and
/// root skeleton.
async fn release(rec: &ContainerRecord, destination: &str) -> crate::container::Container {
    let mut c = rec.container(ContainerState::MigratedAway);
    crate::container::signal_tree(rec.pid, Signal::SIGKILL);
    // Gone before its cgroups are removed (a cgroup with a dying task refuses rmdir; found by
    // the fault matrix), bounded.
    for _ in 0..100 {
        if !alive_not_zombie(rec.pid) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    crate::netns::destroy(&c.net).await;
    if let Some(cg) = c.cgroup.take() {
        cg.remove().await;
    }
    if matches!(rec.meta.spec.rootfs, rebalancer_proto::RootfsSpec::Host) {
        let _ = std::fs::remove_dir_all(&rec.dir);
    }
    c.migrated_to = Some(destination.to_string());
    c
}

/// Asks the destination of a cut migration whether it committed (`PeerRequest::Outcome`).
async fn ask_destination(agent: &Agent, m: &MigrationRecord) -> Result<bool, AgentError> {
    let addr = *agent.cfg.peers.get(&m.destination).ok_or_else(|| {
        AgentError::NotFound(format!("no peer address for {} in [peers]", m.destination))
    })?;
    let t = std::time::Duration::from_secs(5);
    let ask = async {
        let mut conn = crate::peer::PeerConn::connect(&agent.cfg, addr, t).await?;
        conn.call(&PeerRequest::Outcome {
            migration: m.id.clone(),
            container: m.container.clone(),
            epoch: Some(crate::migration::policy::epoch_of(&m.id)),
        })
        .await
    };
    match tokio::time::timeout(2 * t, ask).await {
        Ok(Ok(PeerReply::Outcome { committed })) => Ok(committed),
        Ok(Ok(other)) => Err(AgentError::Peer(format!(
            "unexpected answer to outcome: {other:?}"
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(AgentError::Timeout(format!(
            "{} did not answer the outcome question",
            m.destination
        ))),
    }
}

/// The destination's answer to a restarted source's `outcome` question: committed when this
/// node's commit mark for the migration exists; an arrival of the container still in progress
/// cannot be answered yet (`busy`: the source keeps its copy frozen); otherwise not committed
/// (the arrival was undone, or never got this far). With `epoch` (a source of this release)
/// the answer fences instead of waiting: a migration not committed here is refused Commit from
/// now on, journaled, so "not committed" stays true across a restart of this agent.
pub fn outcome(
    agent: &Agent,
    migration: &str,
    container: &str,
    epoch: Option<u64>,
) -> Result<PeerReply, AgentError> {
    let Some(store) = agent.store.get() else {
        return Err(AgentError::Unsupported(
            "this agent keeps no commit records".into(),
        ));
    };
    if let Some(epoch) = epoch {
        crate::migration::policy::check_migration_id(migration)?;
        let committed = store.fence(migration, epoch).map_err(|e| {
            AgentError::Internal(format!("cannot journal the outcome: {}", chain(&e)))
        })?;
        tracing::info!(migration = %migration, container = %container, epoch, committed, "outcome asked: answered (and fenced unless committed)");
        return Ok(PeerReply::Outcome { committed });
    }
    if store
        .commit_marks()
        .iter()
        .any(|m| m.migration == migration)
    {
        return Ok(PeerReply::Outcome { committed: true });
    }
    let arriving = agent.incoming().iter().any(|(id, _)| id == container)
        || agent.restore_steps().contains_key(migration);
    if arriving {
        return Err(AgentError::Busy(format!(
            "migration {migration} of {container} is still arriving on {}",
            agent.cfg.node
        )));
    }
    Ok(PeerReply::Outcome { committed: false })
}

/// Whether a command line (NUL-separated argv) is a non-lazy `criu dump`/`pre-dump` writing
/// under `run_dir`. Lazy dumps are spared: after Commit they serve a running container's
/// pages. Pure.
pub fn is_orphan_dump(cmdline: &[u8], run_dir: &std::path::Path) -> bool {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let Some(prog) = args.first() else {
        return false;
    };
    let dir = format!("{}/", run_dir.to_string_lossy().trim_end_matches('/'));
    std::path::Path::new(prog)
        .file_name()
        .is_some_and(|n| n == "criu")
        && args.get(1).is_some_and(|a| a == "dump" || a == "pre-dump")
        && !args.iter().any(|a| a == "--lazy-pages")
        && args.iter().any(|a| a.starts_with(&dir))
}

/// SIGKILLs the [`is_orphan_dump`] processes and waits (up to 2 s) until they are gone.
fn kill_orphan_dumps(run_dir: &std::path::Path) -> usize {
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| is_orphan_dump(&c, run_dir))
                })
                .collect()
        })
        .unwrap_or_default();
    for p in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while pids.iter().any(|p| crate::container::alive(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    pids.len()
}

/// Names under /run/netns.
fn netns_names() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Pids whose network namespace is the one bound at `/run/netns/NAME`.
fn pids_in_netns(name: &str) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(format!("/run/netns/{name}")) else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .collect()
}

/// Whether a process is stopped (`T`) or traced (`t`).
fn stopped(pid: i32) -> bool {
    ProcStat::of(pid).is_some_and(|s| s.stopped())
}

/// Whether `pid` exists and has not exited (a zombie holds no namespace).
fn alive_not_zombie(pid: i32) -> bool {
    ProcStat::of(pid).is_some_and(|s| !s.ended())
}

/// Deletes every link of network namespace `name` but `lo` (a veth takes its node-side peer).
async fn unlink_netns(name: &str) {
    let out = tokio::process::Command::new("ip")
        .args(["-n", name, "-o", "link", "show"])
        .output()
        .await;
    let Ok(out) = out else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "2: eth0@if7: <...>"
        let Some(ifname) = line.split(": ").nth(1) else {
            continue;
        };
        let ifname = ifname.split('@').next().unwrap_or(ifname);
        if ifname == "lo" {
            continue;
        }
        let _ = tokio::process::Command::new("ip")
            .args(["-n", name, "link", "del", ifname])
            .status()
            .await;
    }
}

async fn sweep_netns(node: &str, owned: &BTreeSet<String>, sum: &mut Summary) {
    let present = netns_names();
    for name in unowned_netns(node, &present, owned) {
        let pids = pids_in_netns(name);
        if !pids.iter().all(|p| stopped(*p)) {
            tracing::warn!(netns = %name, pids = ?pids, "network namespace without record holds running processes: left alone");
            sum.unowned_running_netns.push(name.to_string());
            continue;
        }
        // Uncommitted incoming restores (kept stopped until Commit) or leftovers. Their links
        // go first: such a tree holds the client's connections (the source's copy has the same
        // addresses and sequence numbers), and dying with a link out it would reset them.
        if !pids.is_empty() {
            unlink_netns(name).await;
        }
        for p in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
        }
        // Gone before the namespace and the cgroups they hold are removed (bounded).
        for _ in 0..100 {
            if pids.iter().all(|p| !alive_not_zombie(*p)) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The node-side veth goes with the namespace's peer; routes on it with the link.
        let _ = tokio::process::Command::new("ip")
            .args(["netns", "del", name])
            .status()
            .await;
        tracing::info!(netns = %name, killed = pids.len(), "swept network namespace no record owns");
        sum.swept_netns.push(name.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebalancer_proto::{MigrationMode, PhaseRecord, RootfsSpec};

    pub(crate) fn record(id: &str, state: ContainerState, pid_start: u64) -> ContainerRecord {
        ContainerRecord {
            version: crate::store::RECORD_VERSION,
            meta: crate::container::ContainerMeta {
                spec: rebalancer_proto::ContainerSpec {
                    id: id.into(),
                    task: None,
                    uid: 1000,
                    gid: 1000,
                    argv: vec!["/bin/sleep".into(), "100".into()],
                    env: vec![],
                    cwd: "/".into(),
                    rootfs: RootfsSpec::Host,
                    binds: vec![],
                    memory_limit: None,
                    cpus: None,
                    class: None,
                    address: Some("198.18.4.7".into()),
                    stdout: None,
                    stderr: None,
                },
                address: "198.18.4.7".parse().expect("address"),
                mounts: vec![],
                symlinks: vec![],
                stdio_keys: vec!["pipe:[1]".into(), "pipe:[2]".into(), "pipe:[3]".into()],
                stdio_paths: vec![],
                started_at: 5,
            },
            netns: format!("rb-n1-{id}-0000abcd"),
            veth: "rbv0000abcd".into(),
            address: "198.18.4.7".parse().expect("address"),
            root: "/run/r/containers/c/root".into(),
            dir: "/run/r/containers/c".into(),
            pid: 4242,
            pid_start,
            state,
            external: false,
            arrived_from: None,
            cgroup: vec![],
            runs_in: None,
            waiter: None,
        }
    }

    fn journal(container: &str, phases: &[Phase]) -> MigrationRecord {
        MigrationRecord {
            id: format!("m-{container}"),
            container: container.into(),
            task: None,
            source: "n1".into(),
            destination: "n2".into(),
            requested_mode: MigrationMode::StopAndCopy,
            mode: None,
            mode_reason: None,
            state: MigrationState::Running,
            phases: phases
                .iter()
                .map(|p| PhaseRecord {
                    phase: p.clone(),
                    started_at: 1,
                    ended_at: None,
                })
                .collect(),
            stats: Default::default(),
            error: None,
            started_at: 1,
            ended_at: None,
            cancelled_by: None,
        }
    }

    #[test]
    fn a_reused_or_vanished_pid_is_never_adopted() {
        let r = record("c1", ContainerState::Running, 777);
        assert_eq!(judge(&r, Some(777), &[]), Verdict::Adopt);
        // Same pid, another process (started later).
        assert_eq!(judge(&r, Some(778), &[]), Verdict::Ended);
        assert_eq!(judge(&r, None, &[]), Verdict::Ended);
        // Also when it was migrating.
        let m = record("c1", ContainerState::Migrating, 777);
        assert_eq!(
            judge(&m, Some(1), &[journal("c1", &[Phase::Prepare])]),
            Verdict::Ended
        );
    }

    #[test]
    fn an_interrupted_source_resumes_only_if_commit_was_never_sent() {
        let r = record("c1", ContainerState::Migrating, 9);
        let before = journal(
            "c1",
            &[
                Phase::Prepare,
                Phase::Freeze,
                Phase::Dump,
                Phase::Transfer,
                Phase::Restore,
            ],
        );
        assert_eq!(
            judge(&r, Some(9), &[before]),
            Verdict::Resume {
                migration: Some("m-c1".into())
            }
        );
        let rolling_back = journal("c1", &[Phase::Prepare, Phase::Dump, Phase::Rollback]);
        assert!(matches!(
            judge(&r, Some(9), &[rolling_back]),
            Verdict::Resume { .. }
        ));
        for last in [Phase::NetworkSwitch, Phase::LazyPages, Phase::Cleanup] {
            let after = journal("c1", &[Phase::Prepare, Phase::Restore, last.clone()]);
            assert_eq!(
                judge(&r, Some(9), &[after]),
                Verdict::KeepFrozen {
                    migration: "m-c1".into()
                },
                "{last:?}"
            );
        }
        // A record not yet updated to Migrating: the journal decides.
        let stale = record("c1", ContainerState::Running, 9);
        let dumping = journal("c1", &[Phase::Prepare, Phase::Freeze, Phase::Dump]);
        assert!(matches!(
            judge(&stale, Some(9), &[dumping]),
            Verdict::Resume { .. }
        ));
        let switching = journal("c1", &[Phase::Restore, Phase::NetworkSwitch]);
        assert!(matches!(
            judge(&stale, Some(9), &[switching]),
            Verdict::KeepFrozen { .. }
        ));
        // Another container's journal does not count; no journal: not dumped yet.
        let other = journal("c2", &[Phase::NetworkSwitch]);
        assert_eq!(
            judge(&r, Some(9), &[other]),
            Verdict::Resume { migration: None }
        );
        // A finished journal entry (rolled back) does not hold the container frozen.
        let mut done = journal("c1", &[Phase::NetworkSwitch]);
        done.state = MigrationState::RolledBack;
        assert_eq!(
            judge(&r, Some(9), &[done]),
            Verdict::Resume { migration: None }
        );
    }

    #[test]
    fn an_unknown_outcome_in_the_journal_keeps_the_copy_frozen_for_the_destinations_answer() {
        let r = record("c1", ContainerState::Migrating, 9);
        let mut unknown = journal("c1", &[Phase::Restore, Phase::NetworkSwitch]);
        unknown.state = MigrationState::Unknown;
        assert_eq!(
            judge(&r, Some(9), &[unknown]),
            Verdict::KeepFrozen {
                migration: "m-c1".into()
            }
        );
    }

    #[test]
    fn only_non_lazy_dumps_under_this_run_dir_are_orphans() {
        let run = std::path::Path::new("/run/rb/work");
        let cl = |a: &[&str]| a.join("\0").into_bytes();
        assert!(is_orphan_dump(
            &cl(&[
                "/usr/local/sbin/criu",
                "dump",
                "--images-dir",
                "/run/rb/work/images/m1/img"
            ]),
            run
        ));
        assert!(is_orphan_dump(
            &cl(&[
                "criu",
                "pre-dump",
                "--images-dir",
                "/run/rb/work/images/m1/pre-1"
            ]),
            run
        ));
        // Lazy dumps may serve a committed container; other commands and other agents' dirs.
        assert!(!is_orphan_dump(
            &cl(&[
                "criu",
                "dump",
                "--lazy-pages",
                "--images-dir",
                "/run/rb/work/images/m1"
            ]),
            run
        ));
        assert!(!is_orphan_dump(
            &cl(&["criu", "restore", "--images-dir", "/run/rb/work/images/m1"]),
            run
        ));
        assert!(!is_orphan_dump(
            &cl(&["criu", "dump", "--images-dir", "/run/other/images/m1"]),
            run
        ));
        assert!(!is_orphan_dump(
            &cl(&["python3", "dump", "/run/rb/work"]),
            run
        ));
        assert!(!is_orphan_dump(b"", run));
        assert!(!is_orphan_dump(
            &cl(&["criu", "dump", "--images-dir", "/run/rb/work2/images/m1"]),
            run
        ));
    }

    #[test]
    fn only_this_nodes_namespaces_without_record_are_swept() {
        let present: Vec<String> = ["rb-n1-a-1", "rb-n1-b-2", "rb-n10-c-3", "other", "rb-n2-d-4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let owned: BTreeSet<String> = ["rb-n1-a-1".to_string()].into();
        assert_eq!(unowned_netns("n1", &present, &owned), vec!["rb-n1-b-2"]);
    }

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An agent on a node name no other test uses, with its store in `dir`.
    fn agent(node: &str, dir: &std::path::Path) -> Arc<Agent> {
        agent_with(node, dir, "")
    }

    /// Like `agent`, with TOML lines appended (after `[auth]`, e.g. a `[peers]` table).
    fn agent_with(node: &str, dir: &std::path::Path, tail: &str) -> Arc<Agent> {
        let toml = format!(
            "node = \"{node}\"\nlisten = \"198.18.0.1:7878\"\nrun_dir = \"{}\"\nstate_dir = \"{}\"\n[auth]\nmethod = \"none\"\n",
            dir.join("run").display(),
            dir.join("state").display(),
        ) + tail;
        let cfg = crate::config::AgentConfig::from_toml(&toml, std::path::Path::new("t.toml"))
            .expect("config");
        let caps = rebalancer_proto::NodeCapabilities {
            node: node.into(),
            criu_version: None,
            criu_path: None,
            uffd: false,
            tcp_established: false,
            nftables_lock: false,
            dirty_tracking: false,
            modes: vec![],
            notes: vec![],
        };
        let mut a = Agent::new(cfg, caps);
        Arc::get_mut(&mut a).expect("sole owner").cgroups = None;
        let store = Store::open(&dir.join("state")).expect("store");
        a.store.set(store).expect("store set once");
        a
    }

    #[tokio::test]
    async fn a_restarted_agent_takes_back_live_containers_and_keeps_a_committing_one_frozen() {
        let node = format!("rt{:08x}", crate::agent::random_u32());
        let dir = Dir(std::env::temp_dir().join(format!("rb-adopt-{node}")));
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let mut moving = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let mut done = std::process::Command::new("true").spawn().expect("true");
        let _ = done.wait();
        let first = agent(&node, &dir.0);
        for (id, pid, state) in [
            ("live", live.id() as i32, ContainerState::Running),
            ("moving", moving.id() as i32, ContainerState::Migrating),
            ("gone", done.id() as i32, ContainerState::Running),
        ] {
            let start = crate::procstat::live_start_time(pid).unwrap_or(1);
            let mut rec = record(id, state, start);
            rec.pid = pid;
            rec.netns = format!("rb-{node}-{id}-00000001");
            rec.dir = dir.0.join("c").join(id);
            first.containers().insert(id.into(), rec.container(state));
        }
        first.persist();
        // "gone" has no live pid 1: no record was written for it.
        let (recs, bad) = first.store.get().expect("store").load();
        assert!(bad.is_empty(), "{bad:?}");
        let ids: Vec<&str> = recs.iter().map(|r| r.meta.spec.id.as_str()).collect();
        assert_eq!(ids, vec!["live", "moving"]);
        // The source journals network-switch before it would send Commit.
        let mut m = journal(
            "moving",
            &[Phase::Prepare, Phase::Restore, Phase::NetworkSwitch],
        );
        m.source = node.clone();
        first.publish(&m);
        drop(first);

        let second = agent(&node, &dir.0);
        let sum = adopt(&second, second.store.get().expect("store")).await;
        assert_eq!(sum.adopted, vec!["live".to_string()]);
        assert_eq!(sum.kept_frozen, vec!["moving".to_string()]);
        assert!(sum.resumed.is_empty() && sum.ended.is_empty(), "{sum:?}");
        {
            let cs = second.containers();
            assert_eq!(cs["live"].pid, live.id() as i32);
            assert_eq!(cs["live"].state, ContainerState::Running);
            assert_eq!(cs["moving"].state, ContainerState::Migrating);
        }
        // Adopted addresses are not handed out again.
        assert!(second.address_in_use("198.18.4.7".parse().expect("address")));

        // The live container ends while no agent runs: the next start drops its record, and a
        // finished migration leaves the journal.
        let _ = live.kill();
        let _ = live.wait();
        m.state = rebalancer_proto::MigrationState::RolledBack;
        second.publish(&m);
        assert!(second
            .store
            .get()
            .expect("store")
            .load_migrations()
            .0
            .is_empty());
        drop(second);
        let third = agent(&node, &dir.0);
        let sum = adopt(&third, third.store.get().expect("store")).await;
        assert_eq!(sum.ended, vec!["live".to_string()]);
        // No unfinished journal entry: "moving" was never committed, so it is resumed.
        assert_eq!(sum.resumed, vec!["moving".to_string()]);
        assert!(!third.containers().contains_key("live"));
        let _ = moving.kill();
        let _ = moving.wait();
        third.reap().await;
        third.persist();
        let (recs, _) = third.store.get().expect("store").load();
        assert!(recs.is_empty(), "{recs:?}");
    }

    /// A destination agent serving peer connections on 127.0.0.1; returns it and its address.
    async fn destination(node: &str, dir: &std::path::Path) -> (Arc<Agent>, String) {
        let b = agent(node, dir);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let served = b.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(crate::migration::destination::serve(served.clone(), s));
            }
        });
        (b, addr)
    }

    #[tokio::test]
    async fn a_source_cut_after_commit_asks_the_destination_and_keeps_exactly_one_copy() {
        let tag = format!("{:08x}", crate::agent::random_u32());
        let (src, dst) = (format!("rs{tag}"), format!("rd{tag}"));
        let dir = Dir(std::env::temp_dir().join(format!("rb-outcome-{tag}")));
        let (b, addr) = destination(&dst, &dir.0.join("b")).await;
        // Migration "m-c1" was committed on b, "m-c2" never reached it.
        b.mark_committed("m-c1", "c1", "rb-x-c1-1");
        let mut kids = Vec::new();
        let a = agent_with(
            &src,
            &dir.0.join("a"),
            &format!("[peers]\n{dst} = \"{addr}\"\n"),
        );
        for id in ["c1", "c2"] {
            let kid = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("sleep");
            let pid = kid.id() as i32;
            kids.push(kid);
            let mut rec = record(
                id,
                ContainerState::Migrating,
                crate::procstat::live_start_time(pid).expect("start"),
            );
            rec.pid = pid;
            rec.netns = format!("rb-{src}-{id}-00000001");
            rec.dir = dir.0.join("a").join(id);
            a.containers()
                .insert(id.into(), rec.container(ContainerState::Migrating));
            let mut m = journal(id, &[Phase::Prepare, Phase::Restore, Phase::NetworkSwitch]);
            m.source = src.clone();
            m.destination = dst.clone();
            a.publish(&m);
        }
        a.persist();
        drop(a);

        let a = agent_with(
            &src,
            &dir.0.join("a"),
            &format!("[peers]\n{dst} = \"{addr}\"\n"),
        );
        let sum = adopt(&a, a.store.get().expect("store")).await;
        assert_eq!(sum.released, vec!["c1".to_string()], "{sum:?}");
        assert_eq!(sum.resumed, vec!["c2".to_string()], "{sum:?}");
        assert!(sum.kept_frozen.is_empty(), "{sum:?}");
        // The released copy is gone (SIGKILLed), the resumed one runs.
        let st = kids[0].wait().expect("wait");
        assert!(!st.success(), "{st:?}");
        assert!(matches!(kids[1].try_wait(), Ok(None)));
        {
            let cs = a.containers();
            assert_eq!(cs["c1"].state, ContainerState::MigratedAway);
            assert_eq!(cs["c1"].migrated_to.as_deref(), Some(dst.as_str()));
            assert_eq!(cs["c2"].state, ContainerState::Running);
        }
        // Both journal entries are resolved; only c2 keeps a record.
        let store = a.store.get().expect("store");
        assert!(store.load_migrations().0.is_empty());
        let ids: Vec<String> = store.load().0.into_iter().map(|r| r.meta.spec.id).collect();
        assert_eq!(ids, vec!["c2".to_string()]);
        // An arrival still in progress cannot be answered yet.
        b.incoming()
            .insert(("c3".into(), "198.18.4.9".parse().expect("ip")));
        assert!(matches!(
            outcome(&b, "m-c3", "c3", None),
            Err(AgentError::Busy(_))
        ));
        assert!(matches!(
            outcome(&b, "m-c1", "c1", None),
            Ok(PeerReply::Outcome { committed: true })
        ));
        assert!(matches!(
            outcome(&b, "m-c2", "c2", None),
            Ok(PeerReply::Outcome { committed: false })
        ));
        // The restarted source asked with an epoch: c2's migration is fenced on b for good,
        // and an arrival still in progress is answered (and fenced) instead of `busy`.
        let bs = b.store.get().expect("store");
        assert!(bs.is_fenced("m-c2"), "the not-committed answer fences");
        assert!(bs.commit_gate("m-c2", 1, "c2", "n").is_err());
        assert!(matches!(
            outcome(&b, "m-c3", "c3", Some(3)),
            Ok(PeerReply::Outcome { committed: false })
        ));
        assert!(bs.commit_gate("m-c3", 3, "c3", "n").is_err());
        assert!(matches!(
            outcome(&b, "m-c1", "c1", Some(1)),
            Ok(PeerReply::Outcome { committed: true })
        ));
        for mut k in kids {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}
