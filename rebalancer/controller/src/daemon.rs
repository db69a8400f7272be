//! The controller's state and its wiring: the agent poll, the views built from what Slurm and
//! the agents report, and the loops. Slurm sync (`slurm_watch`), evaluation (`evaluate`),
//! execution (`execute`) and recovery (`recovery`) live in their own modules; in-flight
//! migrations are owned by [`Migrations`]. See `LIFECYCLE.md` next to this file.

pub mod ipam;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rebalancer_proto::control::{
    AgentHealth, DecisionOutcome, DecisionRecord, MigrationEntry, NodeStatus, PolicyState,
};
use rebalancer_proto::{
    now_millis, ContainerInfo, ContainerState, ErrorCode, ErrorReply, Event, MigrationMode, Millis,
    NodeCapabilities, NodeMetrics,
};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::agents::AgentClient;
use crate::auth::Access;
use crate::config::{AgentAddr, Config};
pub use crate::inflight::{InFlight, Migrations};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::planner::{ContainerSnap, InFlightSnap, NodeSnap, PlanInput, Planner};
use crate::slurm_sync::{NodeFlags, SlurmBackend, SlurmJob, SlurmNode};

/// What the controller knows of one node's agent.
#[derive(Debug, Clone, Default)]
pub struct AgentView {
    pub health: Option<Result<(), String>>,
    pub metrics: Option<NodeMetrics>,
    pub capabilities: Option<NodeCapabilities>,
    pub containers: Vec<ContainerInfo>,
}

#[derive(Debug, Default)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, SlurmNode>,
    pub jobs: BTreeMap<u32, SlurmJob>,
    pub agents: BTreeMap<String, AgentView>,
    /// In-flight migrations, failed-start back-offs, pre-expanded jobs and last moves.
    pub in_flight: Migrations,
    pub policy_states: BTreeMap<String, PolicyState>,
    pub decision_counts: BTreeMap<String, u64>,
    /// Last non-executed decision per (policy, container), to journal repeats only when they change.
    pub last_advice: HashMap<(String, String), (String, DecisionOutcome, Millis)>,
    /// Planner memory as last journaled.
    pub planner_saved: Option<String>,
    /// Holder allocations by moved container (`holder.rs`; the journal's copy).
    pub holders: BTreeMap<String, crate::holder::Holder>,
}

/// Agents polled at the same time.
const AGENT_POLL_CONCURRENCY: usize = 64;

/// Journal key of the planner's memory (hysteresis, cooldowns).
pub const PLANNER_STATE: &str = "planner_state";

/// Progress of an operator request, sent to the connection that asked.
#[derive(Debug)]
pub enum Progress {
    Queued {
        container: String,
    },
    Started(Box<MigrationEntry>),
    Event(Box<Event>),
    Ended {
        container: String,
        decision: Box<DecisionRecord>,
        result: Result<Box<MigrationEntry>, ErrorReply>,
    },
}

pub struct Controller {
    pub cfg: Config,
    pub access: Access,
    pub journal: Journal,
    pub slurm: Arc<dyn SlurmBackend>,
    pub planner: Mutex<Box<dyn Planner>>,
    pub state: RwLock<ClusterState>,
    pub metrics: Arc<Metrics>,
    pub eval: Notify,
    /// Container address blocks leased to nodes (`daemon/ipam.rs`); `None` when the journal's leases
    /// cannot be used (logged at start-up).
    pub ipam: Option<ipam::Leases>,
}

pub(crate) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
pub(crate) fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

pub fn err(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

impl Controller {
    pub fn new(
        cfg: Config,
        journal: Journal,
        slurm: Arc<dyn SlurmBackend>,
        planner: Box<dyn Planner>,
    ) -> Arc<Controller> {
        let policy_states = journal.policy_states().unwrap_or_else(|e| {
            warn!("cannot read policy states from the journal: {e}");
            BTreeMap::new()
        });
        let mut planner = planner;
        let planner_saved = match journal.meta(PLANNER_STATE) {
            Ok(Some(saved)) => {
                planner.restore_state(&saved);
                Some(saved)
            }
            Ok(None) => None,
            Err(e) => {
                warn!("cannot read the planner's state from the journal: {e}");
                None
            }
        };
        let state = ClusterState {
            policy_states,
            planner_saved,
            ..Default::default()
        };
        let ipam = ipam::Leases::load(cfg.ipam, &journal)
            .inspect_err(|e| tracing::error!("address blocks not leased: {e}"))
            .ok();
        Arc::new(Controller {
            ipam,
            access: Access {
                slurm_user: cfg.slurm_user,
                operators: cfg.operators.clone(),
            },
            cfg,
            journal,
            slurm,
            planner: Mutex::new(planner),
            state: RwLock::new(state),
            metrics: Arc::new(Metrics::new()),
            eval: Notify::new(),
        })
    }

    pub fn planner(&self) -> std::sync::MutexGuard<'_, Box<dyn Planner>> {
        self.planner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, ClusterState> {
        read(&self.state)
    }

    pub fn agent(&self, node: &str) -> Option<AgentClient> {
        AgentClient::for_node(node, &self.cfg.agents)
    }

    /// Nodes known from Slurm or from the agent map.
    pub fn node_names(&self) -> Vec<String> {
        let st = self.state();
        let mut names: Vec<String> = st.nodes.keys().cloned().collect();
        for n in self.cfg.agents.nodes.keys().chain(st.agents.keys()) {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.sort();
        names
    }

    // ---- Agents -------------------------------------------------------------------------

    pub async fn poll_agents(self: &Arc<Self>) {
        let names = self.node_names();
        let polled_at = now_millis();
        // Bounded fan-out: a large cluster must not open thousands of sockets at once.
        let permits = Arc::new(tokio::sync::Semaphore::new(AGENT_POLL_CONCURRENCY));
        let mut tasks = Vec::new();
        for node in names {
            let Some(agent) = self.agent(&node) else {
                continue;
            };
            let need_caps = read(&self.state)
                .agents
                .get(&node)
                .is_none_or(|a| a.capabilities.is_none());
            let permits = permits.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                let m = agent.metrics().await;
                let c = match &m {
                    Ok(_) => agent.containers().await.map(Some),
                    Err(_) => Ok(None),
                };
                let caps = if need_caps && m.is_ok() {
                    agent.capabilities().await.ok()
                } else {
                    None
                };
                (node, m, c, caps)
            }));
        }
        for t in tasks {
            let Ok((node, m, c, caps)) = t.await else {
                continue;
            };
            let mut guard = write(&self.state);
            let st = &mut *guard;
            let view = st.agents.entry(node.clone()).or_default();
            match (m, c) {
                (Ok(m), Ok(c)) => {
                    if matches!(view.health, Some(Err(_))) {
                        info!(node = %node, "agent reachable again");
                    }
                    view.health = Some(Ok(()));
                    view.metrics = Some(m);
                    if let Some(mut c) = c {
                        // A move that ended while this poll was on its way is newer than the
                        // agent's answer: its entries (`execute.rs` moves them at the end) are
                        // kept, so that the source does not show the moved container again
                        // until the next poll.
                        let newer =
                            |id: &str| st.in_flight.last_moved(id).is_some_and(|t| t >= polled_at);
                        c.retain(|x| !newer(&x.id));
                        c.extend(view.containers.iter().filter(|x| newer(&x.id)).cloned());
                        view.containers = c;
                    }
                    if caps.is_some() {
                        view.capabilities = caps;
                    }
                }
                (Err(e), _) | (Ok(_), Err(e)) => {
                    if !matches!(view.health, Some(Err(_))) {
                        warn!(node = %node, "agent unreachable: {e}");
                    }
                    view.health = Some(Err(e.to_string()));
                }
            }
        }
        self.export_node_gauges();
        ipam::sync(self).await;
    }

    fn export_node_gauges(&self) {
        let names = self.node_names();
        let st = self.state();
        let samples: Vec<crate::metrics::NodeSample> = names
            .iter()
            .map(|n| {
                let a = st.agents.get(n);
                crate::metrics::NodeSample {
                    node: n.clone(),
                    agent_up: a.is_some_and(|a| matches!(a.health, Some(Ok(())))),
                    containers: a.map(|a| a.containers.len()).unwrap_or(0),
                    draining: st.nodes.get(n).is_some_and(|s| s.flags.drain),
                }
            })
            .collect();
        drop(st);
        self.metrics.set_nodes(&samples);
    }

    // ---- Views --------------------------------------------------------------------------

    pub fn plan_input(&self) -> PlanInput {
        let names = self.node_names();
        let st = self.state();
        let mut nodes = Vec::new();
        let mut containers = Vec::new();
        for name in &names {
            let s = st.nodes.get(name);
            let a = st.agents.get(name);
            let metrics = a.and_then(|a| a.metrics.as_ref());
            let agent_up = a.is_some_and(|a| matches!(a.health, Some(Ok(()))));
            let moved_in = self.moved_in_cpus(&st, name);
            nodes.push(NodeSnap {
                name: name.clone(),
                state: s
                    .map(|s| s.state.clone())
                    .unwrap_or_else(|| "UNKNOWN".into()),
                flags: s.map(|s| s.flags).unwrap_or_default(),
                partitions: s.map(|s| s.partitions.clone()).unwrap_or_default(),
                features: s.map(|s| s.features.clone()).unwrap_or_default(),
                cpus_total: s
                    .map(|s| s.cpus_total)
                    .filter(|c| *c > 0)
                    .or(metrics.map(|m| m.cpus))
                    .unwrap_or(0),
                cpus_alloc: crate::planner::allocated_cpus(
                    s.map(|s| s.cpus_alloc).unwrap_or(0),
                    moved_in,
                ),
                mem_total_mb: s.map(|s| s.mem_total_mb).unwrap_or(0),
                mem_alloc_mb: s.map(|s| s.mem_alloc_mb).unwrap_or(0),
                load: metrics.map(|m| m.load1).unwrap_or(0.0),
                temperature_c: metrics.and_then(|m| m.temperature_c),
                modes: a
                    .and_then(|a| a.capabilities.as_ref())
                    .map(|c| {
                        c.modes
                            .iter()
                            .copied()
                            .filter(|m| *m != MigrationMode::Auto)
                            .collect()
                    })
                    .unwrap_or_default(),
                agent_up,
            });
            if let Some(a) = a {
                // A container that moved away or ended is no work of this node's: an agent
                // keeps its record a while (to route the task's end), and a policy would call
                // it not migratable.
                for c in a.containers.iter().filter(|c| c.state.is_live()) {
                    containers.push(self.container_snap(&st, c));
                }
            }
        }
        let in_flight = st
            .in_flight
            .values()
            .map(|f| InFlightSnap {
                container: f.decision.container.clone(),
                job_id: f.decision.task.as_ref().map(|t| t.job_id).unwrap_or(0),
                source: f.decision.source.clone(),
                destination: f.decision.destination.clone(),
                cpus: f.cpus,
                rss_mb: f.rss_mb,
                started: f.started,
            })
            .collect();
        PlanInput {
            nodes,
            containers,
            in_flight,
            now: now_millis(),
        }
    }

    /// CPUs of the live containers on `node` that a migration brought there and no holder
    /// holds (Slurm does not count them there: [`crate::planner::allocated_cpus`]).
    fn moved_in_cpus(&self, st: &ClusterState, node: &str) -> Vec<u32> {
        st.agents
            .get(node)
            .map(|a| {
                a.containers
                    .iter()
                    .filter(|c| c.state.is_live() && st.in_flight.last_moved(&c.id).is_some())
                    // A holder makes Slurm count them: its CPUAlloc is taken as it is.
                    .filter(|c| !crate::holder::held_on(&st.holders, &c.id, node))
                    .map(|c| self.container_snap(st, c).cpus)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn container_snap(&self, st: &ClusterState, c: &ContainerInfo) -> ContainerSnap {
        let job = c.task.as_ref().and_then(|t| st.jobs.get(&t.job_id));
        ContainerSnap {
            id: c.id.clone(),
            job_id: c.task.as_ref().map(|t| t.job_id).unwrap_or(0),
            step_id: c.task.as_ref().map(|t| t.step_id).unwrap_or(0),
            uid: c.uid,
            user: job.map(|j| j.user.clone()).unwrap_or_default(),
            account: job.map(|j| j.account.clone()).unwrap_or_default(),
            partition: job.map(|j| j.partition.clone()).unwrap_or_default(),
            node: c.node.clone(),
            cpus: c.cpus.map(|c| c.ceil().max(1.0) as u32).unwrap_or(1),
            rss_mb: c.rss_bytes.div_ceil(1 << 20),
            class: c.class.clone(),
            migratable: c.state == ContainerState::Running,
            last_moved: st.in_flight.last_moved(&c.id),
        }
    }

    pub fn node_statuses(&self) -> Vec<NodeStatus> {
        let names = self.node_names();
        let st = self.state();
        names
            .iter()
            .map(|name| {
                let s = st.nodes.get(name);
                let a = st.agents.get(name);
                let addr = self.cfg.agents.address_of(name);
                NodeStatus {
                    name: name.clone(),
                    slurm_state: s
                        .map(|s| s.state.clone())
                        .unwrap_or_else(|| "UNKNOWN".into()),
                    cpus_total: s
                        .map(|s| s.cpus_total)
                        .filter(|c| *c > 0)
                        .or(a.and_then(|a| a.metrics.as_ref()).map(|m| m.cpus))
                        .unwrap_or(0),
                    cpus_alloc: crate::planner::allocated_cpus(
                        s.map(|s| s.cpus_alloc).unwrap_or(0),
                        self.moved_in_cpus(&st, name),
                    ),
                    mem_total_mb: s.map(|s| s.mem_total_mb).unwrap_or(0),
                    mem_alloc_mb: s.map(|s| s.mem_alloc_mb).unwrap_or(0),
                    partitions: s.map(|s| s.partitions.clone()).unwrap_or_default(),
                    agent: match a.and_then(|a| a.health.as_ref()) {
                        Some(Ok(())) => AgentHealth::Up,
                        Some(Err(_)) => AgentHealth::Unreachable,
                        None => AgentHealth::Unknown,
                    },
                    agent_address: addr.map(|a| a.to_string()),
                    agent_error: a.and_then(|a| a.health.clone()).and_then(|h| h.err()),
                    metrics: a.and_then(|a| a.metrics.clone()),
                    capabilities: a.and_then(|a| a.capabilities.clone()),
                    containers: a
                        .map(|a| {
                            a.containers
                                .iter()
                                .filter(|c| {
                                    !matches!(
                                        c.state,
                                        ContainerState::MigratedAway | ContainerState::Exited
                                    )
                                })
                                .count() as u32
                        })
                        .unwrap_or(0),
                    in_flight: st.in_flight.on_node(name),
                    address_blocks: self
                        .ipam
                        .as_ref()
                        .map(|l| l.cidrs_of(name))
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Every live container the agents report, newest poll.
    pub fn containers(&self) -> Vec<ContainerInfo> {
        let st = self.state();
        st.agents
            .values()
            .flat_map(|a| a.containers.iter().cloned())
            .filter(|c| !matches!(c.state, ContainerState::MigratedAway))
            .collect()
    }

    /// Journaled migrations with the live record of those in flight, oldest first.
    pub fn migrations(&self) -> Result<Vec<MigrationEntry>, ErrorReply> {
        let mut all = self
            .journal
            .migrations()
            .map_err(|e| err(ErrorCode::Internal, format!("journal: {e}")))?;
        let st = self.state();
        for f in st.in_flight.values() {
            if let Some(live) = &f.entry {
                if let Some(m) = all.iter_mut().find(|m| m.record.id == live.record.id) {
                    *m = live.clone();
                }
            }
        }
        Ok(all)
    }

    /// Reloads the policies from `controller.policies`. A path that appeared since the start
    /// replaces the built-in drain policy; on any error the current set stays.
    pub fn reload_policies(&self) -> Result<usize, Vec<String>> {
        let path = &self.cfg.policies;
        if !path.exists() {
            return Err(vec![format!(
                "{}: no such file or directory; the current policies stay",
                path.display()
            )]);
        }
        let mut fresh = crate::policy_adapter::PolicyPlanner::load(path)?;
        let mut p = self.planner();
        if let Some(saved) = p.save_state() {
            fresh.restore_state(&saved);
        }
        *p = Box::new(fresh);
        let n = p.policies().len();
        drop(p);
        info!(path = %path.display(), policies = n, "policies reloaded");
        self.eval.notify_one();
        Ok(n)
    }

    pub fn set_policy_state(&self, name: &str, s: PolicyState) -> Result<(), ErrorReply> {
        self.journal
            .set_policy_state(name, s)
            .map_err(|e| err(ErrorCode::Internal, format!("journal: {e}")))?;
        write(&self.state).policy_states.insert(name.to_string(), s);
        info!(policy = name, state = s.as_str(), "policy state changed");
        self.eval.notify_one();
        Ok(())
    }

    /// The containers an operator target names.
    pub fn resolve_target(
        &self,
        target: &rebalancer_proto::control::MigrateTarget,
    ) -> Vec<ContainerSnap> {
        use rebalancer_proto::control::MigrateTarget as T;
        let input = self.plan_input();
        let mut found: Vec<ContainerSnap> = input
            .containers
            .into_iter()
            .filter(|c| c.migratable || matches!(target, T::Container { .. }))
            .filter(|c| match target {
                T::Job { job_id } => c.job_id == *job_id,
                T::Step { job_id, step_id } => c.job_id == *job_id && c.step_id == *step_id,
                T::Container { id } => c.id == *id,
            })
            .collect();
        // A moved container stays listed, ended, by the node it left: the running copy is the
        // one to move (else `migrate container=X node=<where it came from>` found the old entry
        // and answered that X already runs there).
        if found.iter().any(|c| c.migratable) {
            found.retain(|c| c.migratable);
        }
        found
    }

    pub fn address_of(&self, node: &str) -> Option<AgentAddr> {
        self.cfg.agents.address_of(node)
    }

    pub fn node_flags(&self, node: &str) -> NodeFlags {
        self.state()
            .nodes
            .get(node)
            .map(|n| n.flags)
            .unwrap_or_default()
    }
}

/// The loops: Slurm watch, agent polls, evaluation. Returns when `shutdown` fires.
pub async fn run_loops(ctl: Arc<Controller>, shutdown: Arc<Notify>) {
    let slurm_loop = {
        let ctl = ctl.clone();
        async move {
            if !ctl.cfg.slurm.enabled {
                return std::future::pending::<()>().await;
            }
            let mut last_full = tokio::time::Instant::now() - ctl.cfg.slurm.reconcile_interval;
            let mut tick = tokio::time::interval(ctl.cfg.slurm.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let full = last_full.elapsed() >= ctl.cfg.slurm.reconcile_interval;
                if full {
                    last_full = tokio::time::Instant::now();
                }
                if ctl.poll_slurm(full).await {
                    // A drain: refresh the containers of the node now rather than at the next poll.
                    ctl.poll_agents().await;
                    ctl.eval.notify_one();
                } else if full {
                    ctl.eval.notify_one();
                }
                if full {
                    ctl.retry_kept_sources().await;
                    ctl.reconcile_holders().await;
                }
            }
        }
    };
    let prune_loop = {
        let ctl = ctl.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match ctl.journal.prune(ctl.cfg.journal_keep) {
                    Ok(0) => {}
                    Ok(n) => info!(removed = n, "journal pruned"),
                    Err(e) => warn!("cannot prune the journal: {e}"),
                }
            }
        }
    };
    let agent_loop = {
        let ctl = ctl.clone();
        async move {
            let mut tick = tokio::time::interval(ctl.cfg.agents.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                ctl.poll_agents().await;
            }
        }
    };
    let eval_loop = {
        let ctl = ctl.clone();
        async move {
            loop {
                tokio::select! {
                    _ = ctl.eval.notified() => {}
                    _ = tokio::time::sleep(ctl.cfg.evaluate_interval) => {}
                }
                ctl.evaluate().await;
            }
        }
    };
    tokio::select! {
        _ = slurm_loop => {}
        _ = agent_loop => {}
        _ = prune_loop => {}
        _ = eval_loop => {}
        _ = shutdown.notified() => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use rebalancer_proto::{ContainerInfo, ContainerState};

    use super::*;

    /// A container of root on `node` as an agent lists it (also for other modules' tests).
    pub(crate) fn container_on(node: &str, id: &str, state: ContainerState) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            task: None,
            uid: 0,
            gid: 0,
            node: node.into(),
            address: String::new(),
            pid: Some(10),
            state,
            rss_bytes: 0,
            cpus: Some(1.0),
            class: None,
            exit_status: None,
            started_at: 0,
            runs_in: None,
        }
    }

    /// After a move the source's agent still lists the container (migrated away) for a while:
    /// the policies see only live ones, so no "not migratable" skip follows every move.
    #[test]
    fn policies_see_only_the_live_containers_of_a_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::config::Config::from_str_at("", Path::new("/etc/rebalancerd.toml"))
            .expect("default config");
        let ctl = Controller::new(
            cfg,
            crate::journal::Journal::open(&dir.path().join("j.redb")).expect("journal"),
            Arc::new(crate::slurm_sync::NoSlurm),
            Box::new(crate::planner::BuiltinPlanner::new(None)),
        );
        write(&ctl.state).agents.insert(
            "node1".into(),
            AgentView {
                health: Some(Ok(())),
                containers: vec![
                    container_on("node1", "moved", ContainerState::MigratedAway),
                    container_on("node1", "runs", ContainerState::Running),
                    container_on("node1", "ended", ContainerState::Exited),
                    container_on("node1", "moving", ContainerState::Migrating),
                ],
                ..Default::default()
            },
        );
        let ids: Vec<String> = ctl
            .plan_input()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, ["runs", "moving"]);
    }
}
