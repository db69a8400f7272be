//! The controller's state and its loops: Slurm watch, agent polling, evaluation, execution.
//! See `LIFECYCLE.md` next to this file.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rebalancer_proto::control::{
    AgentHealth, DecisionOutcome, DecisionRecord, MigrationEntry, NodeStatus, PolicyState,
};
use rebalancer_proto::{
    now_millis, ContainerInfo, ContainerState, ErrorCode, ErrorReply, Event, MigrateRequest,
    MigrationMode, MigrationRecord, MigrationState, Millis, NodeCapabilities, NodeMetrics,
};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, info, warn};

use crate::agents::{AgentClient, AgentError};
use crate::auth::Access;
use crate::config::{AgentAddr, Config};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::planner::{
    ContainerSnap, InFlightSnap, NodeSnap, PlanAction, PlanInput, PlannedMove, Planner,
};
use crate::slurm_sync::{allocation_change, NodeFlags, SlurmBackend, SlurmJob, SlurmNode};

/// What the controller knows of one node's agent.
#[derive(Debug, Clone, Default)]
pub struct AgentView {
    pub health: Option<Result<(), String>>,
    pub metrics: Option<NodeMetrics>,
    pub capabilities: Option<NodeCapabilities>,
    pub containers: Vec<ContainerInfo>,
}

/// A migration the controller started (or found running at start-up).
#[derive(Debug, Clone)]
pub struct InFlight {
    pub decision: DecisionRecord,
    pub entry: Option<MigrationEntry>,
    pub cpus: u32,
    pub rss_mb: u64,
    pub started: Millis,
}

#[derive(Debug, Default)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, SlurmNode>,
    pub jobs: BTreeMap<u32, SlurmJob>,
    pub agents: BTreeMap<String, AgentView>,
    /// By container id: one migration per container at a time.
    pub in_flight: BTreeMap<String, InFlight>,
    pub policy_states: BTreeMap<String, PolicyState>,
    pub decision_counts: BTreeMap<String, u64>,
    pub last_moved: HashMap<String, Millis>,
    /// Last non-executed decision per (policy, container), to journal repeats only when they change.
    pub last_advice: HashMap<(String, String), (String, DecisionOutcome, Millis)>,
    /// Planner memory as last journaled.
    pub planner_saved: Option<String>,
    /// Containers whose last migration could not start, and when.
    pub failed_starts: HashMap<String, Millis>,
    /// By container: the job whose allocation was expanded onto the destination before the
    /// migration, with its node list before, to undo the expansion if the migration fails.
    pub pre_expanded: HashMap<String, (u32, Vec<String>)>,
}

/// Pause before an automatic move whose start failed is tried again.
const RETRY_AFTER_FAILURE_MS: u64 = 60_000;

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
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
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
        Arc::new(Controller {
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
        self.cfg
            .agents
            .address_of(node)
            .map(|a| AgentClient::new(a, self.cfg.agents.timeout))
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

    // ---- Slurm --------------------------------------------------------------------------

    /// Polls Slurm once; returns true when a node entered an evacuation state.
    pub async fn poll_slurm(self: &Arc<Self>, force: bool) -> bool {
        let slurm = self.slurm.clone();
        let res = tokio::task::spawn_blocking(move || {
            let nodes = slurm.poll_nodes(force)?;
            // Jobs start and end with node allocation changes: reload them with the nodes so that
            // a new job's user, account and partition are known at the next evaluation.
            let jobs = if force || nodes.is_some() {
                Some(slurm.jobs()?)
            } else {
                None
            };
            Ok::<_, crate::slurm_sync::SlurmError>((nodes, jobs))
        })
        .await;
        let (nodes, jobs) = match res {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                warn!(backend = self.slurm.name(), "cannot read Slurm: {e}");
                return false;
            }
            Err(e) => {
                error!("Slurm poll task failed: {e}");
                return false;
            }
        };
        let mut st = write(&self.state);
        if let Some(jobs) = jobs {
            st.jobs = jobs.into_iter().map(|j| (j.job_id, j)).collect();
        }
        let Some(nodes) = nodes else {
            return false;
        };
        let mut triggered = false;
        for n in &nodes {
            let old = st.nodes.get(&n.name).map(|o| o.flags).unwrap_or_default();
            if n.flags != old {
                info!(node = %n.name, state = %n.state, "node state changed");
                if n.flags.evacuate_reason().is_some()
                    && old.evacuate_reason() != n.flags.evacuate_reason()
                {
                    triggered = true;
                }
            }
        }
        st.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        triggered
    }

    // ---- Agents -------------------------------------------------------------------------

    pub async fn poll_agents(self: &Arc<Self>) {
        let names = self.node_names();
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
            let mut st = write(&self.state);
            let view = st.agents.entry(node.clone()).or_default();
            match (m, c) {
                (Ok(m), Ok(c)) => {
                    if matches!(view.health, Some(Err(_))) {
                        info!(node = %node, "agent reachable again");
                    }
                    view.health = Some(Ok(()));
                    view.metrics = Some(m);
                    if let Some(c) = c {
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
                cpus_alloc: s.map(|s| s.cpus_alloc).unwrap_or(0),
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
                for c in &a.containers {
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
            last_moved: st.last_moved.get(&c.id).copied(),
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
                    cpus_alloc: s.map(|s| s.cpus_alloc).unwrap_or(0),
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
                    in_flight: st
                        .in_flight
                        .values()
                        .filter(|f| f.decision.source == *name || f.decision.destination == *name)
                        .count() as u32,
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

    // ---- Evaluation and execution -------------------------------------------------------

    /// Runs the policies once and acts on their moves.
    pub async fn evaluate(self: &Arc<Self>) {
        let input = self.plan_input();
        let states = self.state().policy_states.clone();
        let (moves, saved) = {
            let mut p = self.planner();
            let moves = p.plan(&input, &states);
            (moves, p.save_state())
        };
        if let Some(saved) = saved {
            let changed = self.state().planner_saved.as_deref() != Some(saved.as_str());
            if changed {
                if let Err(e) = self.journal.put_meta(PLANNER_STATE, &saved) {
                    warn!("cannot journal the planner's state: {e}");
                }
                write(&self.state).planner_saved = Some(saved);
            }
        }
        if moves.is_empty() {
            debug!("evaluation: nothing to do");
            return;
        }
        for mv in moves {
            // A policy disabled or set to dry-run at run time wins over the planner's own view.
            let action = match states.get(&mv.policy) {
                Some(PolicyState::Disabled) => continue,
                Some(PolicyState::DryRun) => PlanAction::DryRun,
                _ => mv.action,
            };
            {
                let st = self.state();
                if st.in_flight.contains_key(&mv.container) {
                    continue;
                }
                // A start that failed (agent unreachable, refused) is retried after a pause,
                // not at every evaluation.
                if st
                    .failed_starts
                    .get(&mv.container)
                    .is_some_and(|t| now_millis().saturating_sub(*t) < RETRY_AFTER_FAILURE_MS)
                {
                    continue;
                }
            }
            let Some(c) = input.containers.iter().find(|c| c.id == mv.container) else {
                continue;
            };
            match action {
                PlanAction::DryRun => self.advise(&mv, c, DecisionOutcome::DryRun, None),
                PlanAction::Recommend => self.advise(&mv, c, DecisionOutcome::Recommended, None),
                PlanAction::Automatic => {
                    if let Err(why) = self.try_reserve(&mv, c) {
                        self.advise(&mv, c, DecisionOutcome::Skipped, Some(why));
                        continue;
                    }
                    let d = self.decision(&mv, c, DecisionOutcome::Started, None);
                    match self.journal.record_decision(d) {
                        Ok(d) => {
                            self.count_decision(&d);
                            self.launch(d, mv.max_downtime_ms, None);
                        }
                        Err(e) => {
                            error!(container = %mv.container, "cannot journal a decision, not acting on it: {e}");
                            write(&self.state).in_flight.remove(&mv.container);
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn decision(
        &self,
        mv: &PlannedMove,
        c: &ContainerSnap,
        outcome: DecisionOutcome,
        detail: Option<String>,
    ) -> DecisionRecord {
        let task = self
            .state()
            .agents
            .get(&c.node)
            .and_then(|a| a.containers.iter().find(|x| x.id == c.id))
            .and_then(|x| x.task.clone());
        DecisionRecord {
            seq: 0,
            at: now_millis(),
            policy: mv.policy.clone(),
            container: mv.container.clone(),
            task,
            uid: Some(c.uid),
            source: mv.source.clone(),
            destination: mv.destination.clone(),
            mode: mv.mode,
            why: mv.why.clone(),
            outcome,
            detail,
            migration: None,
        }
    }

    fn count_decision(&self, d: &DecisionRecord) {
        self.metrics.record_decision(&d.policy, d.outcome.as_str());
        *write(&self.state)
            .decision_counts
            .entry(d.policy.clone())
            .or_default() += 1;
        info!(
            policy = %d.policy, container = %d.container,
            job = d.task.as_ref().map(|t| t.job_id), step = d.task.as_ref().map(|t| t.step_id),
            source = %d.source, destination = %d.destination, mode = %d.mode,
            outcome = d.outcome.as_str(), detail = d.detail.as_deref().unwrap_or(""),
            "decision: {}", d.why
        );
    }

    /// Journals a decision that is not executed, unless the same advice was given recently.
    fn advise(
        &self,
        mv: &PlannedMove,
        c: &ContainerSnap,
        outcome: DecisionOutcome,
        detail: Option<String>,
    ) {
        let key = (mv.policy.clone(), mv.container.clone());
        let now = now_millis();
        {
            let st = self.state();
            if let Some((dest, o, at)) = st.last_advice.get(&key) {
                if *dest == mv.destination && *o == outcome && now.saturating_sub(*at) < 600_000 {
                    return;
                }
            }
        }
        write(&self.state)
            .last_advice
            .insert(key, (mv.destination.clone(), outcome, now));
        let d = self.decision(mv, c, outcome, detail);
        match self.journal.record_decision(d) {
            Ok(d) => self.count_decision(&d),
            Err(e) => error!(container = %mv.container, "cannot journal a decision: {e}"),
        }
    }

    /// Checks the in-flight limits and, when they allow, holds a slot for the container.
    pub fn try_reserve(&self, mv: &PlannedMove, c: &ContainerSnap) -> Result<(), String> {
        let mut st = write(&self.state);
        let m = &self.cfg.migration;
        if st.in_flight.contains_key(&mv.container) {
            return Err(format!("container {} is already migrating", mv.container));
        }
        if st.in_flight.len() as u32 >= m.max_in_flight {
            return Err(format!(
                "{} migrations in flight (max_in_flight)",
                st.in_flight.len()
            ));
        }
        for node in [&mv.source, &mv.destination] {
            let n = st
                .in_flight
                .values()
                .filter(|f| f.decision.source == *node || f.decision.destination == *node)
                .count() as u32;
            if n >= m.max_per_node {
                return Err(format!("{n} migrations in flight on {node} (max_per_node)"));
            }
        }
        let placeholder = DecisionRecord {
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
            outcome: DecisionOutcome::Started,
            detail: None,
            migration: None,
        };
        st.in_flight.insert(
            mv.container.clone(),
            InFlight {
                decision: placeholder,
                entry: None,
                cpus: c.cpus,
                rss_mb: c.rss_mb,
                started: now_millis(),
            },
        );
        self.metrics.in_flight.set(st.in_flight.len() as i64);
        Ok(())
    }

    /// Sends the migration to the source agent and follows it in a task. The slot must have
    /// been reserved with [`Self::try_reserve`].
    pub fn launch(
        self: &Arc<Self>,
        mut decision: DecisionRecord,
        max_downtime_ms: Option<u64>,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) {
        if let Some(f) = write(&self.state).in_flight.get_mut(&decision.container) {
            f.decision = decision.clone();
        }
        let this = self.clone();
        tokio::spawn(async move {
            let container = decision.container.clone();
            let Some(agent) = this.agent(&decision.source) else {
                let e = err(
                    ErrorCode::Unreachable,
                    format!("no agent address for node {}", decision.source),
                );
                this.fail_start(&mut decision, e, progress);
                return;
            };
            // A Slurm task is restored by a step on the destination, which Slurm allows only
            // on a node of the job: the job must hold the destination before the migration.
            if let Err(e) = this.expand_before(&decision).await {
                this.fail_start(&mut decision, e, progress);
                return;
            }
            let req = MigrateRequest {
                container: container.clone(),
                destination: decision.destination.clone(),
                destination_addr: None,
                mode: decision.mode,
                max_downtime_ms: max_downtime_ms.or(this.cfg.migration.max_downtime_ms),
                timeout_ms: Some(this.cfg.migration.timeout.as_millis() as u64),
            };
            let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
            let (st_tx, mut st_rx) = tokio::sync::oneshot::channel();
            let overall = this.cfg.migration.timeout + Duration::from_secs(30);
            let run = agent.migrate(req, ev_tx, st_tx, overall);
            tokio::pin!(run);
            let mut entry: Option<MigrationEntry> = None;
            let mut started_open = true;
            let result = loop {
                tokio::select! {
                    r = &mut run => break r,
                    s = &mut st_rx, if started_open => {
                        started_open = false;
                        if let Ok(rec) = s {
                            entry = Some(this.on_started(&mut decision, rec, progress.as_ref()));
                        }
                    }
                    Some(ev) = ev_rx.recv() => {
                        this.on_event(&mut entry, &ev);
                        if let Some(p) = &progress {
                            let _ = p.send(Progress::Event(Box::new(ev)));
                        }
                    }
                }
            };
            while let Ok(ev) = ev_rx.try_recv() {
                this.on_event(&mut entry, &ev);
                if let Some(p) = &progress {
                    let _ = p.send(Progress::Event(Box::new(ev)));
                }
            }
            if entry.is_none() {
                if let Ok(rec) = st_rx.try_recv() {
                    entry = Some(this.on_started(&mut decision, rec, progress.as_ref()));
                }
            }
            match (result, entry) {
                (Ok(rec), Some(mut e)) => {
                    e.record = rec;
                    this.finish(e, decision, progress).await;
                }
                (Ok(rec), None) => {
                    let e = this.on_started(&mut decision, rec, progress.as_ref());
                    this.finish(e, decision, progress).await;
                }
                (Err(AgentError::Remote(e)), None) => {
                    this.undo_expansion(&container).await;
                    this.fail_start(&mut decision, e, progress)
                }
                (Err(e), None) => {
                    this.undo_expansion(&container).await;
                    let code = e.code();
                    this.fail_start(&mut decision, err(code, e.to_string()), progress)
                }
                (Err(AgentError::Remote(e)), Some(entry)) => {
                    // The agent answers a watched migration that did not succeed with an error;
                    // the final record is one GetMigration away.
                    info!(migration = %entry.record.id, container = %container, "agent reports: {e}");
                    this.follow(entry, decision, progress).await;
                }
                (Err(e), Some(entry)) => {
                    // The agent may still be migrating: follow it by polling.
                    warn!(migration = %entry.record.id, container = %container, "lost the agent's progress stream: {e}; polling");
                    this.follow(entry, decision, progress).await;
                }
            }
        });
    }

    fn on_started(
        &self,
        decision: &mut DecisionRecord,
        rec: MigrationRecord,
        progress: Option<&mpsc::UnboundedSender<Progress>>,
    ) -> MigrationEntry {
        decision.migration = Some(rec.id.clone());
        if let Err(e) = self.journal.update_decision(decision) {
            error!(migration = %rec.id, "cannot journal the decision's migration id: {e}");
        }
        let entry = MigrationEntry {
            record: rec,
            decision: decision.seq,
            policy: decision.policy.clone(),
            uid: decision.uid,
            slurm_synced: false,
            slurm_error: None,
            slurm_kept_source: None,
        };
        if let Err(e) = self.journal.put_migration(&entry) {
            error!(migration = %entry.record.id, "cannot journal a migration: {e}");
        }
        info!(
            migration = %entry.record.id, container = %decision.container, policy = %decision.policy,
            job = decision.task.as_ref().map(|t| t.job_id), step = decision.task.as_ref().map(|t| t.step_id),
            source = %decision.source, destination = %decision.destination, "migration started"
        );
        if let Some(f) = write(&self.state).in_flight.get_mut(&decision.container) {
            f.decision = decision.clone();
            f.entry = Some(entry.clone());
        }
        if let Some(p) = progress {
            let _ = p.send(Progress::Started(Box::new(entry.clone())));
        }
        entry
    }

    fn on_event(&self, entry: &mut Option<MigrationEntry>, ev: &Event) {
        let Event::MigrationProgress { migration, .. } = ev;
        let Some(e) = entry else {
            return;
        };
        let phase_changed =
            e.record.phases.len() != migration.phases.len() || e.record.state != migration.state;
        e.record = migration.clone();
        if phase_changed {
            if let Some(p) = migration.phases.last() {
                debug!(migration = %migration.id, container = %migration.container, phase = %p.phase, "phase");
            }
            if let Err(err) = self.journal.put_migration(e) {
                error!(migration = %migration.id, "cannot journal progress: {err}");
            }
        }
        if let Some(f) = write(&self.state).in_flight.get_mut(&migration.container) {
            f.entry = Some(e.clone());
        }
    }

    fn fail_start(
        &self,
        decision: &mut DecisionRecord,
        e: ErrorReply,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) {
        warn!(container = %decision.container, source = %decision.source, destination = %decision.destination, policy = %decision.policy, "migration not started: {e}");
        decision.outcome = DecisionOutcome::Failed;
        write(&self.state)
            .failed_starts
            .insert(decision.container.clone(), now_millis());
        decision.detail = Some(e.to_string());
        if let Err(je) = self.journal.update_decision(decision) {
            error!(container = %decision.container, "cannot journal a decision: {je}");
        }
        self.metrics.record_decision(&decision.policy, "failed");
        {
            let mut st = write(&self.state);
            st.in_flight.remove(&decision.container);
            self.metrics.in_flight.set(st.in_flight.len() as i64);
        }
        if let Some(p) = progress {
            let _ = p.send(Progress::Ended {
                container: decision.container.clone(),
                decision: Box::new(decision.clone()),
                result: Err(e),
            });
        }
    }

    /// Polls the source agent until the migration ends (after a lost stream or a restart).
    pub async fn follow(
        self: &Arc<Self>,
        mut entry: MigrationEntry,
        decision: DecisionRecord,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) {
        let deadline = entry.record.started_at
            + (self.cfg.migration.timeout + Duration::from_secs(60)).as_millis() as u64;
        loop {
            match self.agent(&entry.record.source) {
                Some(agent) => match agent.migration(&entry.record.id).await {
                    Ok(rec) => {
                        entry.record = rec;
                        if entry.record.state.is_terminal() {
                            break;
                        }
                    }
                    Err(AgentError::Remote(e)) if e.code == ErrorCode::NotFound => {
                        mark_lost(
                            &mut entry,
                            "the source agent has no record of it (agent restarted?)",
                        );
                        break;
                    }
                    Err(e) => {
                        debug!(migration = %entry.record.id, "still cannot ask the source agent: {e}")
                    }
                },
                None => {
                    mark_lost(&mut entry, "no agent address for the source node");
                    break;
                }
            }
            if now_millis() > deadline {
                mark_lost(
                    &mut entry,
                    "the source agent did not report an end before the timeout",
                );
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.finish(entry, decision, progress).await;
    }

    /// Journals the end of a migration, updates Slurm's allocation and frees the slot.
    pub async fn finish(
        self: &Arc<Self>,
        mut entry: MigrationEntry,
        decision: DecisionRecord,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) {
        let rec = &entry.record;
        let job = rec
            .task
            .as_ref()
            .or(decision.task.as_ref())
            .map(|t| t.job_id);
        info!(
            migration = %rec.id, container = %rec.container, policy = %entry.policy, job,
            source = %rec.source, destination = %rec.destination, state = ?rec.state,
            mode = rec.mode.map(|m| m.as_str()).unwrap_or("-"),
            downtime_ms = rec.stats.downtime_ms, bytes = rec.stats.bytes_sent,
            error = rec.error.as_deref().unwrap_or(""), "migration ended"
        );
        self.metrics.record_migration(rec);
        if rec.state == MigrationState::Succeeded {
            {
                // Until the next poll the cached lists still show the container on its source,
                // and an evaluation would plan the same move again.
                let mut st = write(&self.state);
                st.last_moved.insert(rec.container.clone(), now_millis());
                let moved = st.agents.get_mut(&rec.source).and_then(|a| {
                    let i = a.containers.iter().position(|c| c.id == rec.container)?;
                    Some(a.containers.remove(i))
                });
                if let Some(mut c) = moved {
                    c.node = rec.destination.clone();
                    c.state = ContainerState::Running;
                    let dest = st.agents.entry(rec.destination.clone()).or_default();
                    dest.containers.retain(|x| x.id != c.id);
                    dest.containers.push(c);
                }
            }
            if entry.policy.starts_with("operator:") {
                if let Some(t) = &rec.task {
                    self.planner().record_move(
                        t.job_id,
                        &rec.source,
                        &rec.destination,
                        now_millis(),
                    );
                }
            }
            write(&self.state).pre_expanded.remove(&rec.container);
            self.sync_slurm(&mut entry).await;
        } else {
            self.undo_expansion(&entry.record.container).await;
        }
        if let Err(e) = self.journal.put_migration(&entry) {
            error!(migration = %entry.record.id, "cannot journal the end of a migration: {e}");
        }
        {
            let mut st = write(&self.state);
            st.in_flight.remove(&entry.record.container);
            self.metrics.in_flight.set(st.in_flight.len() as i64);
        }
        if let Some(p) = progress {
            let container = entry.record.container.clone();
            let _ = p.send(Progress::Ended {
                container,
                decision: Box::new(decision),
                result: Ok(Box::new(entry)),
            });
        }
        self.eval.notify_one();
    }

    /// Adds the destination to the job of a Slurm task before its migration and remembers the
    /// job's nodes so that [`Self::undo_expansion`] can restore them.
    async fn expand_before(self: &Arc<Self>, decision: &DecisionRecord) -> Result<(), ErrorReply> {
        if !self.cfg.slurm.enabled || !self.cfg.slurm.sync_allocation {
            return Ok(());
        }
        let Some(job_id) = decision.task.as_ref().map(|t| t.job_id) else {
            return Ok(());
        };
        let destination = decision.destination.clone();
        let slurm = self.slurm.clone();
        let dest = destination.clone();
        let res = tokio::task::spawn_blocking(move || {
            let Some(job) = slurm.job(job_id)? else {
                return Ok::<_, crate::slurm_sync::SlurmError>(None);
            };
            if job.nodes.contains(&dest) {
                return Ok(None);
            }
            slurm.expand_job(job_id, &dest)?;
            Ok(Some(job.nodes))
        })
        .await;
        match res {
            Ok(Ok(Some(before))) => {
                info!(container = %decision.container, job = job_id, destination = %destination, "job expanded onto the destination before the migration");
                write(&self.state)
                    .pre_expanded
                    .insert(decision.container.clone(), (job_id, before));
                Ok(())
            }
            Ok(Ok(None)) => Ok(()),
            Ok(Err(e)) => Err(err(
                ErrorCode::NoRoom,
                format!("cannot add {destination} to job {job_id} before the migration: {e}"),
            )),
            Err(e) => Err(err(
                ErrorCode::Internal,
                format!("expansion task failed: {e}"),
            )),
        }
    }

    /// Gives back the destination a failed migration's job was expanded onto, so a failure
    /// leaves Slurm's allocation as it was.
    async fn undo_expansion(self: &Arc<Self>, container: &str) {
        let Some((job_id, before)) = write(&self.state).pre_expanded.remove(container) else {
            return;
        };
        let slurm = self.slurm.clone();
        let nodes = before.clone();
        let res = tokio::task::spawn_blocking(move || slurm.set_job_nodes(job_id, &nodes)).await;
        match res {
            Ok(Ok(())) => {
                info!(container, job = job_id, nodes = %before.join(","), "migration failed: job's allocation restored")
            }
            Ok(Err(e)) => {
                warn!(
                    container,
                    job = job_id,
                    "cannot restore the job's allocation after a failed migration: {e}"
                )
            }
            Err(e) => warn!(container, job = job_id, "allocation undo task failed: {e}"),
        }
    }

    /// Expands the job to the destination and shrinks it from the source when nothing of the
    /// job is left there.
    async fn sync_slurm(self: &Arc<Self>, entry: &mut MigrationEntry) {
        if !self.cfg.slurm.enabled || !self.cfg.slurm.sync_allocation {
            return;
        }
        let Some(job_id) = entry.record.task.as_ref().map(|t| t.job_id) else {
            return;
        };
        let (source, destination, moved) = (
            entry.record.source.clone(),
            entry.record.destination.clone(),
            entry.record.container.clone(),
        );
        // Count what the job still has on the source, from a fresh list.
        let remaining = match self.agent(&source) {
            Some(a) => match a.containers().await {
                Ok(list) => list
                    .iter()
                    .filter(|c| {
                        c.id != moved
                            && c.task.as_ref().is_some_and(|t| t.job_id == job_id)
                            && c.state.is_live()
                    })
                    .count(),
                Err(e) => {
                    entry.slurm_error = Some(format!("cannot list the source's containers: {e}"));
                    return;
                }
            },
            None => 0,
        };
        // Another task of the same step on another node (newest poll of every agent).
        let step_id = entry.record.task.as_ref().map(|t| t.step_id);
        let step_elsewhere = self
            .containers()
            .into_iter()
            .find(|c| {
                c.id != moved
                    && c.node != source
                    && c.task
                        .as_ref()
                        .is_some_and(|t| t.job_id == job_id && Some(t.step_id) == step_id)
                    && c.state.is_live()
            })
            .map(|c| c.node);
        let note = entry.record.task.as_ref().map(|t| {
            crate::slurm_sync::move_note(t, &source, &destination, entry.record.stats.downtime_ms)
        });
        let slurm = self.slurm.clone();
        let res = tokio::task::spawn_blocking(move || {
            // The trail first: it is worth having even when the allocation cannot change.
            if let Some(n) = &note {
                if let Err(e) = slurm.record_move(job_id, n) {
                    warn!(
                        job = job_id,
                        "cannot note the move in the job's AdminComment: {e}"
                    );
                }
            }
            let Some(job) = slurm.job(job_id)? else {
                return Ok::<_, crate::slurm_sync::SlurmError>(Some(format!(
                    "job {job_id} is not in Slurm"
                )));
            };
            if job.state != "RUNNING" {
                return Ok(Some(format!("job {job_id} is {}", job.state)));
            }
            let change = allocation_change(
                &job,
                &source,
                &destination,
                remaining,
                step_elsewhere.as_deref(),
            );
            if let Some(d) = &change.expand_to {
                slurm.expand_job(job_id, d)?;
            }
            if let Some(nodes) = &change.shrink_to {
                slurm.set_job_nodes(job_id, nodes)?;
            }
            Ok(change.keep_reason)
        })
        .await;
        match res {
            Ok(Ok(keep)) => {
                entry.slurm_synced = true;
                entry.slurm_kept_source.clone_from(&keep);
                info!(migration = %entry.record.id, job = job_id, kept_source = keep.as_deref().unwrap_or("no"), "Slurm allocation updated");
            }
            Ok(Err(e)) => {
                warn!(migration = %entry.record.id, job = job_id, "cannot update Slurm's allocation: {e}");
                entry.slurm_error = Some(e.to_string());
            }
            Err(e) => entry.slurm_error = Some(format!("sync task failed: {e}")),
        }
    }

    /// Start-up: finish or clean up what the journal says was in flight.
    pub async fn recover(self: &Arc<Self>) {
        let unfinished = match self.journal.unfinished() {
            Ok(u) => u,
            Err(e) => {
                error!("cannot read the journal: {e}");
                return;
            }
        };
        for entry in unfinished {
            let decision = self
                .journal
                .decisions(usize::MAX)
                .ok()
                .and_then(|ds| ds.into_iter().find(|d| d.seq == entry.decision))
                .unwrap_or_else(|| recovered_decision(&entry));
            info!(migration = %entry.record.id, container = %entry.record.container, source = %entry.record.source, "recovering a migration that was in flight at the last stop");
            write(&self.state).in_flight.insert(
                entry.record.container.clone(),
                InFlight {
                    decision: decision.clone(),
                    entry: Some(entry.clone()),
                    cpus: 1,
                    rss_mb: entry.record.stats.rss_bytes >> 20,
                    started: entry.record.started_at,
                },
            );
            let this = self.clone();
            tokio::spawn(async move { this.follow(entry, decision, None).await });
        }
        // Successful migrations whose allocation update was interrupted.
        if let Ok(all) = self.journal.migrations() {
            for mut e in all.into_iter().filter(|e| {
                e.record.state == MigrationState::Succeeded
                    && !e.slurm_synced
                    && e.slurm_error.is_none()
            }) {
                let this = self.clone();
                tokio::spawn(async move {
                    this.sync_slurm(&mut e).await;
                    if let Err(err) = this.journal.put_migration(&e) {
                        error!(migration = %e.record.id, "cannot journal: {err}");
                    }
                });
            }
        }
    }

    /// Releases source nodes kept after earlier migrations once what kept them is gone (the
    /// job's other containers there ended or moved, or the rest of a multi-node step ended).
    /// A source kept as the batch host stays until the job ends.
    pub async fn retry_kept_sources(self: &Arc<Self>) {
        let Ok(all) = self.journal.migrations() else {
            return;
        };
        for mut e in all.into_iter().filter(|e| {
            e.record.state == MigrationState::Succeeded
                && e.slurm_synced
                && e.slurm_kept_source
                    .as_deref()
                    .is_some_and(crate::slurm_sync::kept_source_may_change)
        }) {
            let before = e.slurm_kept_source.clone();
            self.sync_slurm(&mut e).await;
            if e.slurm_kept_source != before {
                info!(migration = %e.record.id, source = %e.record.source, now = e.slurm_kept_source.as_deref().unwrap_or("released"), "kept source node re-examined");
                if let Err(err) = self.journal.put_migration(&e) {
                    error!(migration = %e.record.id, "cannot journal: {err}");
                }
            }
        }
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
        input
            .containers
            .into_iter()
            .filter(|c| c.migratable || matches!(target, T::Container { .. }))
            .filter(|c| match target {
                T::Job { job_id } => c.job_id == *job_id,
                T::Step { job_id, step_id } => c.job_id == *job_id && c.step_id == *step_id,
                T::Container { id } => c.id == *id,
            })
            .collect()
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

fn mark_lost(entry: &mut MigrationEntry, why: &str) {
    warn!(migration = %entry.record.id, container = %entry.record.container, "migration lost: {why}");
    entry.record.state = MigrationState::Failed;
    entry.record.error = Some(format!("controller lost track: {why}"));
    entry.record.ended_at = Some(now_millis());
}

fn recovered_decision(entry: &MigrationEntry) -> DecisionRecord {
    DecisionRecord {
        seq: entry.decision,
        at: entry.record.started_at,
        policy: entry.policy.clone(),
        container: entry.record.container.clone(),
        task: entry.record.task.clone(),
        uid: entry.uid,
        source: entry.record.source.clone(),
        destination: entry.record.destination.clone(),
        mode: entry.record.requested_mode,
        why: "recovered after a controller restart".into(),
        outcome: DecisionOutcome::Started,
        detail: None,
        migration: Some(entry.record.id.clone()),
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
