//! The source and destination state machines on two simulated nodes, connected by the real
//! peer protocol over an in-memory pipe: every phase of every mode, with a failure injected at
//! each, must end in the documented state (LIFECYCLE.md): before Commit the container runs again
//! on the source and nothing is left on the destination; once Commit was sent, never both.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::{
    ContainerState, MigrateRequest, MigrationMode, MigrationRecord, MigrationState,
    NodeCapabilities,
};

use super::host::Clock;
use super::sim::{Fault, Proc, SimHost};
use super::source::{preflight_with, run_with};
use crate::agent::Agent;
use crate::config::AgentConfig;

const ID: &str = "c1";
const PID: i32 = 100;

// Cancelling, and where a moved task runs: a child module sees these helpers.
mod cancel;

struct Node {
    agent: Arc<Agent>,
    host: SimHost,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A simulated node; `extra`: more top-level configuration lines. Pages in clear unless `extra`
/// says otherwise: pre-copy is withheld with encryption, and these tests drive every mode.
fn node_with(name: &str, tag: &str, extra: &str) -> Node {
    let extra = if extra.contains("encrypt_memory") {
        extra.to_string()
    } else {
        format!("encrypt_memory = false\n{extra}")
    };
    let dir = std::env::temp_dir().join(format!(
        "rb-sim-{tag}-{name}-{}-{:08x}",
        std::process::id(),
        crate::agent::random_u32()
    ));
    let toml = format!(
        "node = \"{name}\"\nlisten = \"198.18.0.{}:7878\"\nrun_dir = \"{}\"\nstate_dir = \"{}\"\n{extra}\n[auth]\nmethod = \"none\"\n",
        if name == "a" { 1 } else { 2 },
        dir.join("run").display(),
        dir.join("state").display(),
    );
    let cfg = AgentConfig::from_toml(&toml, Path::new("sim.toml")).expect("config");
    let caps = NodeCapabilities {
        node: name.into(),
        criu_version: Some("sim".into()),
        criu_path: None,
        uffd: true,
        tcp_established: true,
        nftables_lock: true,
        dirty_tracking: true,
        modes: vec![
            MigrationMode::StopAndCopy,
            MigrationMode::PostCopy,
            MigrationMode::PreCopy,
            MigrationMode::Auto,
        ],
        notes: vec![],
    };
    let state_dir = cfg.state_dir.clone();
    let mut agent = Agent::new(cfg, caps);
    // No cgroups in the simulation.
    Arc::get_mut(&mut agent).expect("sole owner").cgroups = None;
    // Commit marks and fences are journaled, as on a real node.
    let store = crate::store::Store::open(&state_dir).expect("store");
    let _ = agent.store.set(store);
    Node {
        agent,
        host: SimHost::new(),
        dir,
    }
}

/// Node `a` runs container c1 (pid 100); its connector reaches node `b`.
fn pair(tag: &str) -> (Node, Node) {
    pair_of(tag, false)
}

/// Like [`pair`]; `task`: c1 is a Slurm task (restored by a restore step on `b`).
fn pair_of(tag: &str, task: bool) -> (Node, Node) {
    pair_configured(tag, task, "", "")
}

/// Like [`pair_of`], with extra configuration lines for `a` and for `b`.
fn pair_configured(tag: &str, task: bool, a_cfg: &str, b_cfg: &str) -> (Node, Node) {
    let (a, b) = (node_with("a", tag, a_cfg), node_with("b", tag, b_cfg));
    super::simrun::plant(&a.agent, &a.host, task);
    a.host.connect_to(b.agent.clone(), b.host.clone());
    (a, b)
}

/// Migrates c1 from a to b; `Err` when the pre-flight refused.
async fn migrate(a: &Node, b: &Node, mode: MigrationMode) -> Result<MigrationRecord, String> {
    migrate_then(a, b, mode, |_| ()).await
}

/// [`migrate`], calling `during(b)` while the migration runs (to move b's clock, say).
async fn migrate_then(
    a: &Node,
    b: &Node,
    mode: MigrationMode,
    during: impl Fn(&Node),
) -> Result<MigrationRecord, String> {
    let req = MigrateRequest {
        container: ID.into(),
        destination: "b".into(),
        destination_addr: Some("198.18.0.2:7878".into()),
        mode,
        max_downtime_ms: None,
        timeout_ms: None,
    };
    let run = async {
        match preflight_with(&a.host, &a.agent, &req).await {
            Ok(p) => Ok(run_with(&a.host, a.agent.clone(), p).await),
            Err(e) => Err(e.chain()),
        }
    };
    tokio::pin!(run);
    let r = loop {
        tokio::select! {
            r = &mut run => break r,
            _ = tokio::task::yield_now() => during(b),
        }
    };
    b.host.settle().await;
    r
}

fn source_state(a: &Node) -> ContainerState {
    a.agent.containers().get(ID).expect("container").state
}

/// Before Commit: the source copy runs again, unlocked and routed; the destination is clean.
fn assert_rolled_back(a: &Node, b: &Node, what: &str) {
    let log = format!(
        "{what}\nsource: {:?}\ndestination: {:?}",
        a.host.state().log,
        b.host.state().log
    );
    assert_eq!(a.host.live(), [(PID, Proc::Running)], "{log}");
    assert_eq!(source_state(a), ContainerState::Running, "{log}");
    {
        let s = a.host.state();
        assert!(s.locked.is_empty(), "network lock left: {log}");
        assert_eq!(s.routes.len(), 1, "source route: {log}");
        assert!(s.helpers.is_empty(), "helpers left on the source: {log}");
        assert!(s.ps_guards.is_empty(), "page-server guard left: {log}");
    }
    assert_clean(b, &log);
}

fn assert_clean(b: &Node, log: &str) {
    assert!(b.host.live().is_empty(), "restored tree left: {log}");
    let s = b.host.state();
    assert!(s.netns.is_empty(), "netns left: {log}");
    assert!(s.helpers.is_empty(), "helpers left: {log}");
    assert!(s.announced.is_empty(), "address announced: {log}");
    drop(s);
    assert!(b.agent.incoming().is_empty(), "reservation left: {log}");
    assert!(b.agent.containers().is_empty(), "container recorded: {log}");
    let images = b.agent.cfg.run_dir.join("images");
    let left: Vec<_> = std::fs::read_dir(&images)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "images left {left:?}: {log}");
}

const MODES: [MigrationMode; 3] = [
    MigrationMode::StopAndCopy,
    MigrationMode::PostCopy,
    MigrationMode::PreCopy,
];

#[tokio::test]
async fn every_mode_commits_and_the_container_runs_only_on_the_destination() {
    for mode in MODES {
        let (a, b) = pair("ok");
        let rec = migrate(&a, &b, mode).await.expect("preflight");
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{mode}: {:?}",
            rec.error
        );
        assert_eq!(a.host.live(), [], "{mode}: source copy still alive");
        assert_eq!(source_state(&a), ContainerState::MigratedAway);
        assert!(a.host.state().netns.is_empty(), "{mode}");
        let live = b.host.live();
        assert_eq!(live.len(), 1, "{mode}");
        assert_eq!(live[0].1, Proc::Running, "{mode}");
        let bc = b.agent.containers();
        let c = bc.get(ID).expect("container on the destination");
        assert_eq!((c.state, c.pid), (ContainerState::Running, live[0].0));
        drop(bc);
        let s = b.host.state();
        assert_eq!(s.routes.len(), 1, "{mode}: destination route");
        assert_eq!(s.announced, [Ipv4Addr::new(198, 19, 0, 9)], "{mode}");
        assert!(
            rec.phases
                .iter()
                .any(|p| matches!(p.phase, rebalancer_proto::Phase::NetworkSwitch)),
            "{mode}: {:?}",
            rec.phases
        );
    }
}

/// Before each transfer to a page server the source guards it, and only then does the
/// destination listen; the guard goes with the transfer. With encrypted pages a guard that
/// cannot be installed is a warning (a stranger could only make the move fail); with plain
/// pages it refuses the move (the fault list above).
#[tokio::test]
async fn page_servers_listen_only_once_the_source_guarded_them() {
    let pos = |log: &[String], what: &str| log.iter().position(|l| l == what);
    for mode in [MigrationMode::StopAndCopy, MigrationMode::PreCopy] {
        let (a, b) = pair("ps-guard");
        let rec = migrate(&a, &b, mode).await.expect("preflight");
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{mode}: {:?}",
            rec.error
        );
        let (src, dst) = (a.host.state().log.clone(), b.host.state().log.clone());
        let guards = src.iter().filter(|l| *l == "ps-guard").count();
        let opened = dst.iter().filter(|l| *l == "page-server-listen").count();
        let servers = dst.iter().filter(|l| *l == "page-server").count();
        assert!(guards >= 1, "{mode}: {src:?}");
        assert_eq!(
            (guards, opened),
            (servers, servers),
            "{mode}: {src:?} {dst:?}"
        );
        assert_eq!(
            src.iter().filter(|l| *l == "ps-unguard").count(),
            guards,
            "{mode}: {src:?}"
        );
        assert!(a.host.state().ps_guards.is_empty(), "{mode}");
        // The stop-and-copy dump comes after its page server was guarded and opened.
        let dump = pos(&src, "dump").expect("dumped");
        assert!(
            src.iter().take(dump).any(|l| l == "ps-guard"),
            "{mode}: {src:?}"
        );
    }
    let (a, b) = pair_configured("ps-guard-tls", false, ON, ON);
    a.host.inject(Fault::Action("ps-guard"));
    let rec = migrate(&a, &b, MigrationMode::StopAndCopy)
        .await
        .expect("preflight");
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    assert!(a
        .host
        .state()
        .log
        .contains(&"ps-guard (failed)".to_string()));
}

/// Failures before Commit, on either node, in each mode where the phase exists.
fn faults(mode: MigrationMode) -> Vec<(bool, Fault)> {
    use Fault::*;
    let src = |f| (true, f);
    let dst = |f| (false, f);
    let mut v = vec![
        src(LinkBefore("capabilities")),
        src(LinkBefore("prepare")),
        src(LinkAfter("prepare")),
        dst(Action("cgroup")),
        dst(Action("create-net")),
        src(Action("net-inode")),
        src(LinkBefore("images")),
        src(LinkAfter("images")),
        src(LinkBefore("restore")),
        dst(Action("restore")),
        src(LinkAfter("restore")),
    ];
    match mode {
        MigrationMode::StopAndCopy => {
            v.extend([
                dst(Action("page-server")),
                src(Action("dump")),
                // Plain pages: no transfer to a page server another user could reach first.
                src(Action("ps-guard")),
                dst(Action("page-server-listen")),
                src(LinkBefore("open-page-server")),
                src(LinkAfter("open-page-server")),
            ]);
        }
        MigrationMode::PostCopy => {
            v.extend([
                src(Action("dump-lazy")),
                dst(Action("lazy-pages")),
                // Peer protocol 4's link, before anything is frozen.
                src(Action("lazy-link")),
                src(Action("lazy-link-accept")),
                dst(Action("lazy-connect")),
                src(LinkBefore("lazy-link")),
                src(LinkAfter("lazy-link")),
            ]);
        }
        _ => v.extend([
            src(LinkBefore("precopy-round")),
            src(LinkAfter("precopy-round")),
            dst(Action("page-server")),
            src(Action("pre-dump")),
            src(Action("dump")),
            src(Action("ps-guard")),
            dst(Action("page-server-listen")),
            src(LinkBefore("open-page-server")),
        ]),
    }
    v
}

#[tokio::test]
async fn a_failure_in_any_phase_before_commit_resumes_the_source_and_clears_the_destination() {
    for mode in MODES {
        for (on_source, fault) in faults(mode) {
            let (a, b) = pair("fail");
            let what = format!(
                "{mode}, fault {fault:?} on the {}",
                if on_source { "source" } else { "destination" }
            );
            if on_source {
                a.host.inject(fault.clone());
            } else {
                b.host.inject(fault.clone());
            }
            match migrate(&a, &b, mode).await {
                Ok(rec) => {
                    assert_eq!(
                        rec.state,
                        MigrationState::RolledBack,
                        "{what}: {:?}",
                        rec.error
                    );
                    assert!(rec.error.is_some(), "{what}");
                }
                // Refused in the pre-flight: nothing was frozen.
                Err(e) => assert!(!e.is_empty(), "{what}"),
            }
            assert_rolled_back(&a, &b, &what);
        }
    }
}

#[tokio::test]
async fn an_unreachable_destination_changes_nothing() {
    let (a, b) = pair("unreach");
    a.host.inject(Fault::Action("connect"));
    let e = migrate(&a, &b, MigrationMode::StopAndCopy)
        .await
        .expect_err("refused");
    assert!(e.contains("no route"), "{e}");
    assert_rolled_back(&a, &b, "connect");
}

/// The invariant checked at every step: the container never runs on both nodes at once.
fn assert_never_both(a: &Node, b: &Node, what: &str) {
    let running = |n: &Node| n.host.live().iter().any(|(_, p)| *p == Proc::Running);
    assert!(
        !(running(a) && running(b)),
        "{what}: two live copies\nsource: {:?}\ndestination: {:?}",
        a.host.state().log,
        b.host.state().log
    );
}

/// Where the answer to Commit can be lost: (fault on the source's link, whether the destination
/// received and applied Commit).
fn lost_commit_answers() -> [(Fault, bool); 4] {
    [
        // Lost on the way (reset before sending): the destination never saw it.
        (Fault::LinkBefore("commit"), false),
        // Delivered and applied, then the connection broke (EOF/RST) before the answer.
        (Fault::LinkAfter("commit"), true),
        // Delivered and applied, the answer never came: the source's per-call timer ends it.
        (Fault::LinkStall("commit"), true),
        // Held in the network past the source's timer, delivered after its outcome question.
        (Fault::LinkLate("commit"), false),
    ]
}

/// Once Commit was sent the source never resumes by itself: it asks the destination, and
/// resumes only on its "not committed" answer, which the destination keeps true for good (a
/// late Commit is refused). Committed: the source copy is killed. Never two copies, never none.
#[tokio::test]
async fn a_lost_commit_answer_is_resolved_by_asking_the_destination_at_every_point() {
    for mode in MODES {
        for (fault, applied) in lost_commit_answers() {
            let (a, b) = pair("commit");
            let what = format!("{mode}, {fault:?}");
            a.host.inject(fault.clone());
            let rec = migrate_then(&a, &b, mode, |b| {
                assert_never_both(&a, b, &what);
                if a.host.waiting_for_a_timer() {
                    a.host.advance(Duration::from_secs(1));
                }
            })
            .await
            .expect("preflight");
            let log = format!(
                "{what}\nsource: {:?}\ndestination: {:?}",
                a.host.state().log,
                b.host.state().log
            );
            let marks = b.agent.store.get().expect("store").commit_marks();
            if applied {
                assert_eq!(
                    rec.state,
                    MigrationState::Succeeded,
                    "{log}: {:?}",
                    rec.error
                );
                assert!(
                    rec.error
                        .as_deref()
                        .is_some_and(|e| e.contains("confirmed it committed")),
                    "{log}: {:?}",
                    rec.error
                );
                assert_eq!(a.host.live(), [], "{log}: source copy not killed");
                assert_eq!(source_state(&a), ContainerState::MigratedAway, "{log}");
                let live = b.host.live();
                assert_eq!(live.len(), 1, "{log}");
                assert_eq!(live[0].1, Proc::Running, "{log}");
                assert_eq!(marks.len(), 1, "{log}");
            } else {
                assert_eq!(
                    rec.state,
                    MigrationState::RolledBack,
                    "{log}: {:?}",
                    rec.error
                );
                assert!(
                    rec.error
                        .as_deref()
                        .is_some_and(|e| e.contains("did not commit")),
                    "{log}: {:?}",
                    rec.error
                );
                // Resumed, unlocked and routed again (the route went at network-switch).
                assert_rolled_back(&a, &b, &log);
                assert!(marks.is_empty(), "{log}");
                assert!(
                    b.agent.store.get().expect("store").is_fenced(&rec.id),
                    "{log}: not fenced"
                );
            }
            // The source's journal is resolved either way.
            assert!(
                a.agent
                    .store
                    .get()
                    .expect("store")
                    .load_migrations()
                    .0
                    .is_empty(),
                "{log}"
            );
        }
    }
}

/// A Commit that arrives after the destination answered "not committed" is refused, and the
/// destination then undoes the arrival: it never runs the container the source resumed.
#[tokio::test]
async fn a_late_commit_after_a_not_committed_answer_is_refused() {
    let (a, b) = pair("late");
    a.host.inject(Fault::LinkLate("commit"));
    let rec = migrate_then(&a, &b, MigrationMode::StopAndCopy, |_| {
        if a.host.waiting_for_a_timer() {
            a.host.advance(Duration::from_secs(1));
        }
    })
    .await
    .expect("preflight");
    let log = format!(
        "source: {:?}\ndestination: {:?}",
        a.host.state().log,
        b.host.state().log
    );
    assert_eq!(rec.state, MigrationState::RolledBack, "{log}");
    let late = a
        .host
        .state()
        .log
        .iter()
        .find(|l| l.starts_with("commit delivered late"))
        .cloned()
        .unwrap_or_default();
    assert!(late.contains("refused") && late.contains("fenced"), "{log}");
    assert_rolled_back(&a, &b, &log);
}

/// The destination committed and then the network cut: the source cannot learn the outcome, so
/// its copy stays frozen (never resumed by a timer) and the record says unknown; once the
/// network heals, asking again resolves it: the frozen copy is killed.
#[tokio::test]
async fn an_unreachable_destination_after_commit_leaves_the_source_frozen_and_unknown() {
    for mode in MODES {
        let (a, b) = pair("unknown");
        a.host.inject(Fault::PartitionAfter("commit"));
        let rec = migrate_then(&a, &b, mode, |_| {
            if a.host.waiting_for_a_timer() {
                a.host.advance(Duration::from_secs(1));
            }
        })
        .await
        .expect("preflight");
        let log = format!(
            "{mode}\nsource: {:?}\ndestination: {:?}",
            a.host.state().log,
            b.host.state().log
        );
        assert_eq!(rec.state, MigrationState::Unknown, "{log}: {:?}", rec.error);
        assert!(
            rec.error
                .as_deref()
                .is_some_and(|e| e.contains("outcome is unknown")),
            "{log}: {:?}",
            rec.error
        );
        // Frozen, not resumed; the destination runs it: one live copy.
        assert_eq!(a.host.live(), [(PID, Proc::Stopped)], "{log}");
        assert_eq!(source_state(&a), ContainerState::Migrating, "{log}");
        assert_eq!(b.host.live().len(), 1, "{log}");
        assert_eq!(b.host.live()[0].1, Proc::Running, "{log}");
        // Journaled, so that a restarted agent resolves it too.
        let journal = a.agent.store.get().expect("store").load_migrations().0;
        assert_eq!(journal.len(), 1, "{log}");
        assert_eq!(journal[0].state, MigrationState::Unknown, "{log}");
        // Still cut: another attempt changes nothing.
        let addr = "198.18.0.2:7878".parse().expect("addr");
        let ask = super::source::resolve_unknown(&a.host, &a.agent, rec.clone(), addr);
        tokio::pin!(ask);
        let rec = loop {
            tokio::select! {
                r = &mut ask => break r,
                _ = tokio::task::yield_now() => a.host.advance(Duration::from_secs(1)),
            }
        };
        assert_eq!(rec.state, MigrationState::Unknown, "{log}");
        assert_eq!(a.host.live(), [(PID, Proc::Stopped)], "{log}");
        // Healed: the destination says it committed; the frozen copy is killed.
        a.host.partition(false);
        let rec = super::source::resolve_unknown(&a.host, &a.agent, rec, addr).await;
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{log}: {:?}",
            rec.error
        );
        assert_eq!(a.host.live(), [], "{log}");
        assert_eq!(source_state(&a), ContainerState::MigratedAway, "{log}");
        assert!(a
            .agent
            .store
            .get()
            .expect("store")
            .load_migrations()
            .0
            .is_empty());
        b.host.settle().await;
    }
}

/// The same cut before the destination committed (Commit lost, then partitioned): unknown
/// while cut, and once healed the destination answers "not committed" and the source resumes.
#[tokio::test]
async fn an_unknown_outcome_resolved_as_not_committed_resumes_the_source() {
    let (a, b) = pair("unknown-nc");
    a.host.inject(Fault::LinkLate("commit"));
    let rec = migrate_then(&a, &b, MigrationMode::PostCopy, |_| {
        // The network cuts while Commit is held back in it.
        if a.host.state().stalled {
            a.host.partition(true);
        }
        if a.host.waiting_for_a_timer() {
            a.host.advance(Duration::from_secs(1));
        }
    })
    .await
    .expect("preflight");
    let log = format!(
        "source: {:?}\ndestination: {:?}",
        a.host.state().log,
        b.host.state().log
    );
    assert_eq!(rec.state, MigrationState::Unknown, "{log}: {:?}", rec.error);
    assert_eq!(a.host.live(), [(PID, Proc::Stopped)], "{log}");
    let addr = "198.18.0.2:7878".parse().expect("addr");
    a.host.partition(false);
    let rec = super::source::resolve_unknown(&a.host, &a.agent, rec, addr).await;
    b.host.settle().await;
    assert_eq!(
        rec.state,
        MigrationState::RolledBack,
        "{log}: {:?}",
        rec.error
    );
    assert_rolled_back(&a, &b, &log);
}

#[tokio::test]
async fn a_slurm_task_moves_through_a_restore_step_or_rolls_back_in_every_phase() {
    for mode in MODES {
        let (a, b) = pair_of("task", true);
        let rec = migrate(&a, &b, mode).await.expect("preflight");
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{mode}: {:?}",
            rec.error
        );
        assert_eq!(a.host.live(), [], "{mode}");
        {
            let bc = b.agent.containers();
            let c = bc.get(ID).expect("task on the destination");
            assert!(
                c.external,
                "{mode}: a restored task is Slurm's, not the agent's child"
            );
            assert_eq!(c.arrived_from.as_ref().map(|(n, _)| n.as_str()), Some("a"));
            assert_eq!(b.host.live(), [(c.pid, Proc::Running)], "{mode}");
        }
        assert!(b.agent.restore_steps().is_empty(), "{mode}");

        let mut faults: Vec<_> = faults(mode)
            .into_iter()
            // The restore step, not the agent, restores a task, in the step's own cgroups.
            .filter(|(_, f)| *f != Fault::Action("restore") && *f != Fault::Action("cgroup"))
            .collect();
        faults.extend([
            (false, Fault::Action("start-step")),
            (false, Fault::Action("restore-step")),
        ]);
        for (on_source, fault) in faults {
            let (a, b) = pair_of("task-fail", true);
            let what = format!("task, {mode}, fault {fault:?} (source: {on_source})");
            if on_source {
                a.host.inject(fault.clone());
            } else {
                b.host.inject(fault.clone());
            }
            if let Ok(rec) = migrate(&a, &b, mode).await {
                assert_eq!(
                    rec.state,
                    MigrationState::RolledBack,
                    "{what}: {:?}",
                    rec.error
                );
            }
            assert_rolled_back(&a, &b, &what);
            assert!(b.agent.restore_steps().is_empty(), "{what}");
        }
    }
}

#[tokio::test]
async fn a_restore_step_that_never_registers_times_out_on_the_simulated_clock() {
    let (a, b) = pair_of("step-timeout", true);
    // The step's task never restores: only the destination's 60 s limit ends the wait.
    b.host.inject(Fault::Action("restore-step"));
    b.host.hang_steps();
    // Time passes on the destination only while it waits for the step's registration.
    let waiting = |b: &Node| b.agent.restore_steps().values().any(|s| *s.ready.borrow());
    let rec = migrate_then(&a, &b, MigrationMode::StopAndCopy, |b| {
        if waiting(b) {
            b.host.advance(Duration::from_secs(1))
        }
    })
    .await
    .expect("preflight");
    assert_eq!(rec.state, MigrationState::RolledBack);
    let e = rec.error.unwrap_or_default();
    assert!(e.contains("did not register within 60 s"), "{e}");
    assert_rolled_back(&a, &b, "step timeout");
}

#[tokio::test]
async fn a_dump_stuck_past_the_deadline_rolls_back_on_the_simulated_clock() {
    for (mode, action) in [
        (MigrationMode::StopAndCopy, "dump"),
        (MigrationMode::PreCopy, "pre-dump"),
    ] {
        let (a, b) = pair("deadline");
        a.host.inject(Fault::Hang(action));
        // Only the source's clock moves: its migration deadline (and then the 3 s it gives
        // the abort) pass, the destination's timers never fire.
        let rec = migrate_then(&a, &b, mode, |_| a.host.advance(Duration::from_secs(1)))
            .await
            .expect("preflight");
        assert_eq!(rec.state, MigrationState::RolledBack, "{mode}");
        assert_eq!(rec.error.as_deref(), Some("migration timed out"), "{mode}");
        assert_rolled_back(&a, &b, &format!("{mode}: {action} stuck"));
    }
}

#[tokio::test]
async fn post_copy_pages_lost_after_commit_fail_the_migration_without_a_second_copy() {
    let (a, b) = pair("lazy");
    a.host.inject(Fault::Action("lazy-serve"));
    let rec = migrate(&a, &b, MigrationMode::PostCopy)
        .await
        .expect("preflight");
    assert_eq!(rec.state, MigrationState::Failed);
    assert!(
        rec.error
            .as_deref()
            .is_some_and(|e| e.contains("lazy page server failed after resume")),
        "{:?}",
        rec.error
    );
    // The destination runs it (post-copy's failure model: its missing pages are lost).
    assert_eq!(a.host.live(), []);
    assert_eq!(b.host.live().len(), 1);
}

/// The destination's lazy-pages daemon loses its page source after the container resumed: the
/// container is killed (it would read zeros where pages are missing), and nothing is left.
#[tokio::test]
async fn a_container_whose_lazy_pages_can_no_longer_be_served_is_killed() {
    let (a, b) = pair("lazy-lost");
    b.host.inject(Fault::Action("lazy-lost"));
    let rec = migrate(&a, &b, MigrationMode::PostCopy)
        .await
        .expect("preflight");
    assert_eq!(
        rec.phases.last().map(|p| p.phase.clone()),
        Some(rebalancer_proto::Phase::Cleanup)
    );
    // The watcher runs beside the connection: give it its turns.
    for _ in 0..1000 {
        if b.host.live().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let log = format!(
        "source: {:?}\ndestination: {:?}",
        a.host.state().log,
        b.host.state().log
    );
    assert!(
        b.host.live().is_empty(),
        "still running on lost pages: {log}"
    );
    assert!(a.host.live().is_empty(), "{log}");
    assert!(b.host.state().helpers.is_empty(), "helpers left: {log}");
    assert!(
        b.host.state().log.iter().any(|l| l.starts_with("SIGKILL")),
        "{log}"
    );
    // The source's dump cannot tell; the destination's `lazy-end` answer makes the record say
    // the job was lost.
    assert_eq!(rec.state, MigrationState::Failed, "{log}");
    assert!(
        rec.error
            .as_deref()
            .is_some_and(|e| e.contains("post-copy failed on b") && e.contains("lazy-pages daemon")),
        "{:?}",
        rec.error
    );
}

const ON: &str = "encrypt_memory = true";

/// What each node's page-moving CRIU commands were: (action, with TLS).
fn tls_use(n: &Node) -> Vec<(&'static str, bool)> {
    n.host.state().tls.clone()
}

#[tokio::test]
async fn page_transfers_are_encrypted_on_both_nodes_in_every_mode_that_allows_it() {
    for mode in [MigrationMode::StopAndCopy, MigrationMode::PostCopy] {
        let (a, b) = pair_configured("tls", false, ON, ON);
        let rec = migrate(&a, &b, mode).await.expect("preflight");
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{mode}: {:?}",
            rec.error
        );
        let (src, dst) = (tls_use(&a), tls_use(&b));
        assert!(
            !src.is_empty() && !dst.is_empty(),
            "{mode}: {src:?} {dst:?}"
        );
        assert!(
            src.iter().chain(&dst).all(|(_, tls)| *tls),
            "{mode}: {src:?} {dst:?}"
        );
        // The keys went with the migration's directory.
        let left = std::fs::read_dir(b.agent.cfg.run_dir.join("images"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "{mode}");
    }
}

#[tokio::test]
async fn encryption_is_agreed_or_the_migration_is_refused_before_anything_moves() {
    // The destination follows a source that encrypts, whatever its own setting.
    let (a, b) = pair_configured("tls-follow", false, ON, "encrypt_memory = false");
    let rec = migrate(&a, &b, MigrationMode::StopAndCopy)
        .await
        .expect("preflight");
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    assert!(tls_use(&b).iter().all(|(_, t)| *t), "{:?}", tls_use(&b));
    // A destination that requires encryption refuses a plain source at prepare.
    let (a, b) = pair_configured("tls-refuse", false, "encrypt_memory = false", ON);
    let e = migrate(&a, &b, MigrationMode::PostCopy)
        .await
        .expect_err("refused");
    assert!(e.contains("encrypt_memory = false"), "{e}");
    assert_rolled_back(&a, &b, "plain source, encrypting destination");
    assert!(
        tls_use(&a).is_empty(),
        "nothing was dumped: {:?}",
        tls_use(&a)
    );
    // Both plain: a trusted network's choice.
    let (a, b) = pair_configured(
        "tls-off",
        false,
        "encrypt_memory = false",
        "encrypt_memory = false",
    );
    let rec = migrate(&a, &b, MigrationMode::StopAndCopy)
        .await
        .expect("preflight");
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    assert!(tls_use(&a).iter().chain(&tls_use(&b)).all(|(_, t)| !*t));
}

#[tokio::test]
async fn pre_copy_is_refused_with_encrypted_pages_before_anything_moves() {
    let (a, b) = pair_configured("tls-precopy", false, ON, ON);
    let e = migrate(&a, &b, MigrationMode::PreCopy)
        .await
        .expect_err("refused");
    assert!(e.contains("pre-copy with encrypted pages"), "{e}");
    assert_rolled_back(&a, &b, "pre-copy with encryption");
    assert!(tls_use(&a).is_empty() && tls_use(&b).is_empty());
}

/// Where the source released its inbound hold, and what of it is left: (the released holds,
/// whether each was diverting; the source's log positions of the release and of `after`).
fn hold_end(a: &Node, what: &str, after: &str) -> (Vec<(String, bool)>, Option<usize>) {
    let s = a.host.state();
    let log = format!("{what}: {:?}", s.log);
    assert!(s.held.is_empty(), "hold left prepared: {log}");
    assert!(s.holding.is_empty(), "hold left diverting: {log}");
    let released = s.log.iter().rposition(|l| l == "release-hold");
    if let (Some(r), Some(x)) = (released, s.log.iter().rposition(|l| l == after)) {
        assert!(r > x, "hold released before {after}: {log}");
    }
    (s.released.clone(), released)
}

/// The inbound hold (hold.rs) starts with the dump and is released exactly once on every way
/// out: after the switch on success, after the resume and the route on a rollback (so the held
/// packets reach a copy that runs), and also when the outcome is unknown. A hold that cannot be
/// prepared does not stop the migration, and `hold_inbound = false` prepares none.
#[tokio::test]
async fn the_inbound_hold_is_released_once_on_success_and_on_every_rollback() {
    for mode in MODES {
        let (a, b) = pair("hold-ok");
        let rec = migrate(&a, &b, mode).await.expect("preflight");
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{mode}: {:?}",
            rec.error
        );
        let (released, _) = hold_end(&a, &format!("{mode}"), "withdraw-route");
        assert_eq!(released.len(), 1, "{mode}: {released:?}");
        assert!(released[0].1, "{mode}: the dump never started the hold");

        for (on_source, fault) in faults(mode) {
            let (a, b) = pair("hold-fail");
            let what = format!("{mode}, fault {fault:?} on the source: {on_source}");
            if on_source {
                a.host.inject(fault.clone());
            } else {
                b.host.inject(fault.clone());
            }
            let rec = migrate(&a, &b, mode).await;
            assert_rolled_back(&a, &b, &what);
            let (released, at) = hold_end(&a, &what, "add-route");
            match rec {
                // Refused in the pre-flight: no hold was ever prepared.
                Err(_) => assert!(released.is_empty(), "{what}: {released:?}"),
                Ok(_) => {
                    assert!(released.len() <= 1, "{what}: {released:?}");
                    // A rollback after the freeze resumes (unlock, route) before the release.
                    if released.first().is_some_and(|r| r.1) {
                        let s = a.host.state();
                        let unlock = s.log.iter().rposition(|l| l == "unlock");
                        assert!(
                            unlock < at,
                            "{what}: released before the resume: {:?}",
                            s.log
                        );
                    }
                }
            }
        }

        let (a, b) = pair("hold-unknown");
        a.host.inject(Fault::PartitionAfter("commit"));
        let rec = migrate_then(&a, &b, mode, |_| {
            if a.host.waiting_for_a_timer() {
                a.host.advance(Duration::from_secs(1));
            }
        })
        .await
        .expect("preflight");
        assert_eq!(
            rec.state,
            MigrationState::Unknown,
            "{mode}: {:?}",
            rec.error
        );
        let (released, _) = hold_end(&a, &format!("{mode} unknown"), "withdraw-route");
        assert_eq!(released.len(), 1, "{mode} unknown: {released:?}");

        let (a, b) = pair("hold-cannot");
        a.host.inject(Fault::Action("hold"));
        let rec = migrate(&a, &b, mode).await.expect("preflight");
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{mode}: {:?}",
            rec.error
        );
        let (released, at) = hold_end(&a, &format!("{mode} no hold"), "withdraw-route");
        assert!(released.is_empty() && at.is_none(), "{mode}: {released:?}");

        let (a, b) = pair_configured("hold-off", false, "hold_inbound = false", "");
        let rec = migrate(&a, &b, mode).await.expect("preflight");
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{mode}: {:?}",
            rec.error
        );
        let s = a.host.state();
        assert!(
            !s.log
                .iter()
                .any(|l| l.starts_with("hold") || l == "release-hold"),
            "{mode}: hold with hold_inbound = false: {:?}",
            s.log
        );
    }
}

// Peer protocol 4's lazy link and the destination's room: in a file of their own.
mod link_room;

/// Drives a migration with a silent partition armed: both clocks move one second per step
/// while a timer is awaited (`b_only`: only the destination's, until its side is undone).
async fn migrate_silenced(
    a: &Node,
    b: &Node,
    mode: MigrationMode,
    b_only: bool,
) -> (MigrationRecord, Duration) {
    let req = MigrateRequest {
        container: ID.into(),
        destination: "b".into(),
        destination_addr: Some("198.18.0.2:7878".into()),
        mode,
        max_downtime_ms: None,
        timeout_ms: None,
    };
    let start = a.host.now();
    let run = async {
        let p = preflight_with(&a.host, &a.agent, &req)
            .await
            .expect("preflight");
        run_with(&a.host, a.agent.clone(), p).await
    };
    tokio::pin!(run);
    let rec = loop {
        tokio::select! {
            r = &mut run => break r,
            _ = tokio::task::yield_now() => {
                assert!(
                    running(a).is_empty() || b.host.live().is_empty(),
                    "two live copies: {:?} / {:?}",
                    a.host.state().log,
                    b.host.state().log
                );
                if a.host.waiting_for_a_timer() {
                    let dest_done = b.agent.incoming().is_empty();
                    b.host.advance(Duration::from_secs(1));
                    if !b_only || dest_done {
                        a.host.advance(Duration::from_secs(1));
                    }
                }
            }
        }
    };
    let took = a.host.now().duration_since(start);
    b.host.settle().await;
    (rec, took)
}

fn running(n: &Node) -> Vec<i32> {
    n.host
        .live()
        .into_iter()
        .filter(|(_, p)| *p == Proc::Running)
        .map(|(pid, _)| pid)
        .collect()
}

/// The figure in a stall error ("nothing heard for N ms").
fn silence_ms(e: &str) -> Option<u64> {
    let (_, rest) = e.split_once("nothing heard for ")?;
    rest.split_once(" ms")?.0.parse().ok()
}

#[tokio::test]
async fn a_silent_partition_in_each_long_phase_is_found_by_heartbeats_and_rolled_back() {
    // Default heartbeat: every 2 s, 3 missed: the stall limit is 6 s, the deadline 60 s.
    let (limit, interval) = (Duration::from_secs(6), Duration::from_secs(2));
    for mode in MODES {
        for phase in super::simrun::silent_phases(mode) {
            let (a, b) = pair("silence");
            a.host.inject(Fault::Silence(phase));
            let (rec, took) = migrate_silenced(&a, &b, mode, false).await;
            let what = format!("{mode}, silent from {phase}");
            assert_eq!(rec.state, MigrationState::RolledBack, "{what}: {rec:?}");
            let e = rec.error.clone().unwrap_or_default();
            assert!(e.contains("stalled"), "{what}: found by a timeout: {e}");
            if let Some(ms) = silence_ms(&e) {
                assert!(
                    Duration::from_millis(ms) <= limit + interval,
                    "{what}: {ms} ms of silence before the stall was called"
                );
            }
            // Detection, then the 3 s the abort is given: far below the 60 s deadline.
            assert!(took < Duration::from_secs(20), "{what}: took {took:?}");
            println!("{what}: rolled back after {took:?} of simulated time ({e})");
            assert_rolled_back(&a, &b, &what);
        }
    }
}

#[tokio::test]
async fn the_destination_finds_a_silent_source_by_its_missing_heartbeats_and_undoes_its_side() {
    for mode in [MigrationMode::StopAndCopy, MigrationMode::PreCopy] {
        let (a, b) = pair("silent-src");
        let phase = if mode == MigrationMode::PreCopy {
            "pre-dump"
        } else {
            "dump"
        };
        a.host.inject(Fault::Silence(phase));
        // Only the destination's clock moves first: it must undo its side on its own.
        let (rec, _) = migrate_silenced(&a, &b, mode, true).await;
        assert_eq!(rec.state, MigrationState::RolledBack, "{mode}");
        assert_rolled_back(&a, &b, &format!("{mode}: source silent during {phase}"));
    }
}

#[tokio::test]
async fn without_heartbeats_a_silent_partition_waits_for_the_deadline() {
    // A destination of an earlier release (or heartbeats off) agrees to none: timeouts only.
    let (a, b) = pair_configured("no-beat", false, "", "heartbeat_interval_ms = 0");
    a.host.inject(Fault::Silence("dump"));
    let (rec, took) = migrate_silenced(&a, &b, MigrationMode::StopAndCopy, false).await;
    assert_eq!(rec.state, MigrationState::RolledBack);
    assert_eq!(rec.error.as_deref(), Some("migration timed out"));
    assert!(took >= Duration::from_secs(60), "{took:?}");
    assert_rolled_back(&a, &b, "no heartbeats");
}

#[tokio::test]
async fn a_pair_with_heartbeats_off_on_either_side_still_migrates_in_every_mode() {
    for (a_cfg, b_cfg) in [
        ("heartbeat_interval_ms = 0", ""),
        ("", "heartbeat_interval_ms = 0"),
    ] {
        for mode in MODES {
            let (a, b) = pair_configured("beat-off", false, a_cfg, b_cfg);
            let rec = migrate(&a, &b, mode).await.expect("preflight");
            assert_eq!(
                rec.state,
                MigrationState::Succeeded,
                "{mode} ({a_cfg:?} / {b_cfg:?}): {:?}",
                rec.error
            );
            assert_eq!(a.host.live(), [], "{mode}");
            assert_eq!(b.host.live().len(), 1, "{mode}");
        }
    }
}
