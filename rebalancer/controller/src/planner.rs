//! The controller's view of a policy engine, behind [`Planner`], plus destination placement for
//! operator requests (`rebalctl migrate` without `node=`, `rebalctl evacuate`).
//!
//! [`BuiltinPlanner`] evacuates drained, down and reboot-pending nodes with one implicit policy
//! (used when no policy path exists);
//! `crate::policy_adapter::PolicyPlanner` runs the `rebalancer-policy` crate's policies.

use std::collections::BTreeMap;
use std::path::Path;

use rebalancer_proto::control::{PolicyCheckReport, PolicySource, PolicyState};
use rebalancer_proto::{ContainerId, MigrationMode, Millis};
use serde::Serialize;

use crate::slurm_sync::NodeFlags;

#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeSnap {
    pub name: String,
    pub state: String,
    pub flags: NodeFlags,
    pub partitions: Vec<String>,
    pub features: Vec<String>,
    pub cpus_total: u32,
    pub cpus_alloc: u32,
    pub mem_total_mb: u64,
    pub mem_alloc_mb: u64,
    pub load: f64,
    pub temperature_c: Option<f64>,
    pub modes: Vec<MigrationMode>,
    /// The controller can reach the node's agent.
    pub agent_up: bool,
}

/// CPUs allocated on a node, with the CPUs of the tasks the rebalancer moved onto it added to
/// Slurm's count: Slurm (22.05 to 26.05) does not account a job's CPUs on a node the job was
/// expanded onto (`job_resources_bits_copy`, docs/slurm-releases.md), so its `CPUAlloc` there
/// stays short by what the moved tasks use and another job could be placed on them. `moved_in`:
/// the CPUs of each live container that moved to the node. Pure.
pub fn allocated_cpus(slurm_alloc: u32, moved_in: impl IntoIterator<Item = u32>) -> u32 {
    moved_in
        .into_iter()
        .fold(slurm_alloc, |sum, c| sum.saturating_add(c))
}

impl NodeSnap {
    pub fn free_cpus(&self) -> i64 {
        i64::from(self.cpus_total) - i64::from(self.cpus_alloc)
    }
    pub fn free_mem_mb(&self) -> i64 {
        self.mem_total_mb as i64 - self.mem_alloc_mb as i64
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ContainerSnap {
    pub id: ContainerId,
    pub job_id: u32,
    pub step_id: u32,
    pub uid: u32,
    pub user: String,
    pub account: String,
    pub partition: String,
    pub node: String,
    pub cpus: u32,
    pub rss_mb: u64,
    pub class: Option<String>,
    pub migratable: bool,
    pub last_moved: Option<Millis>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct InFlightSnap {
    pub container: ContainerId,
    pub job_id: u32,
    pub source: String,
    pub destination: String,
    pub cpus: u32,
    pub rss_mb: u64,
    pub started: Millis,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanInput {
    pub nodes: Vec<NodeSnap>,
    pub containers: Vec<ContainerSnap>,
    pub in_flight: Vec<InFlightSnap>,
    pub now: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanAction {
    Automatic,
    Recommend,
    DryRun,
}

impl PlanAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanAction::Automatic => "automatic",
            PlanAction::Recommend => "recommend",
            PlanAction::DryRun => "dry-run",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedMove {
    pub policy: String,
    pub container: ContainerId,
    pub source: String,
    pub destination: String,
    pub mode: MigrationMode,
    pub max_downtime_ms: Option<u64>,
    pub why: String,
    pub action: PlanAction,
}

/// Something a policy considered and did not move, with why (the planner's skips).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipNote {
    pub policy: String,
    pub node: String,
    /// None when the whole node was skipped.
    pub container: Option<ContainerId>,
    /// Kebab-case code: `no-destination`, `not-migratable`, `job-cooldown`, ...
    pub code: String,
    pub reason: String,
}

impl SkipNote {
    /// Whether an operator wants to hear of it: a trigger that is quiet, a container outside
    /// the policy's scope or one already moving is not "a move that does not happen".
    pub fn worth_telling(&self) -> bool {
        !matches!(
            self.code.as_str(),
            "in-band" | "out-of-scope" | "in-flight" | "already-planned"
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PolicyInfo {
    pub name: String,
    pub kind: String,
    pub action: PlanAction,
    pub priority: i32,
    pub description: String,
    pub source: String,
    /// State before any `rebalctl update`: from the file's `enabled` and `action`.
    pub default_state: PolicyState,
}

/// A policy engine as the controller uses it.
pub trait Planner: Send + 'static {
    /// Loads the policies at `path` (file or directory); on error the old set stays.
    fn reload(&mut self, path: &Path) -> Result<(), Vec<String>>;
    /// Validates policy texts without loading them.
    fn check(&self, sources: &[PolicySource]) -> PolicyCheckReport;
    fn policies(&self) -> Vec<PolicyInfo>;
    /// Moves the policies want now. Disabled policies plan nothing; dry-run ones plan with
    /// [`PlanAction::DryRun`].
    fn plan(
        &mut self,
        input: &PlanInput,
        states: &BTreeMap<String, PolicyState>,
    ) -> Vec<PlannedMove>;
    /// Like [`Planner::plan`], but leaves the planner's memory (hysteresis, cooldowns) as it is.
    fn preview(
        &self,
        input: &PlanInput,
        states: &BTreeMap<String, PolicyState>,
    ) -> Vec<PlannedMove>;
    /// Like [`Planner::preview`], with what the policies considered and did not move.
    fn explain(
        &self,
        input: &PlanInput,
        states: &BTreeMap<String, PolicyState>,
    ) -> (Vec<PlannedMove>, Vec<SkipNote>) {
        (self.preview(input, states), Vec::new())
    }
    /// The skips of the last [`Planner::plan`] run (taken once, for the journal).
    fn take_skips(&mut self) -> Vec<SkipNote> {
        Vec::new()
    }
    /// A move made outside the planner (operator request), so that cooldowns count it.
    fn record_move(&mut self, _job_id: u32, _source: &str, _destination: &str, _at: Millis) {}
    /// Planner memory (hysteresis, cooldowns) to journal, and to restore after a restart.
    fn save_state(&self) -> Option<String> {
        None
    }
    fn restore_state(&mut self, _saved: &str) {}
}

/// Reads the policy texts at `path`: one file, or every `*.toml` of a directory (sorted).
pub fn read_sources(path: &Path) -> Result<Vec<PolicySource>, String> {
    let files = if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: cannot list: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(&p)
                .map(|text| PolicySource {
                    path: p.display().to_string(),
                    text,
                })
                .map_err(|e| format!("{}: cannot read: {e}", p.display()))
        })
        .collect()
}

/// Ranks destinations for one container: agent reachable, not draining/down, same partition
/// when both sides name one, room for its CPUs and memory after reservations, then least load
/// per CPU. `reserved` holds CPUs and MiB already promised per node in this round.
pub fn choose_destination(
    input: &PlanInput,
    c: &ContainerSnap,
    reserved: &BTreeMap<String, (u32, u64)>,
) -> Result<String, String> {
    let mut best: Option<(f64, &NodeSnap)> = None;
    let mut reasons = Vec::new();
    for n in &input.nodes {
        if n.name == c.node {
            continue;
        }
        if let Some(r) = unfit(input, c, n, reserved, true) {
            reasons.push(format!("{}: {r}", n.name));
            continue;
        }
        let (rc, _) = reserved.get(&n.name).copied().unwrap_or((0, 0));
        let inflight_cpus: u32 = input
            .in_flight
            .iter()
            .filter(|f| f.destination == n.name)
            .map(|f| f.cpus)
            .sum();
        let cpus = f64::from(n.cpus_total.max(1));
        let score = (n.load + f64::from(rc + inflight_cpus)) / cpus;
        if best.is_none_or(|(s, b)| score < s || (score == s && n.name < b.name)) {
            best = Some((score, n));
        }
    }
    best.map(|(_, n)| n.name.clone()).ok_or_else(|| {
        if reasons.is_empty() {
            "no other node".to_string()
        } else {
            format!("no destination fits ({})", reasons.join("; "))
        }
    })
}

/// Why an operator's named destination cannot take `c` now, or `None`: the same rules as
/// [`choose_destination`], checked before Slurm is asked for the expansion (a DRAIN/DOWN or
/// full node would otherwise be found out only when the expansion times out, 30 s later).
/// `job_holds_it`: the job already has the node (another of its tasks runs there), so no
/// expansion asks Slurm for CPUs there and its fullness is not judged. Pure.
pub fn destination_refusal(
    input: &PlanInput,
    c: &ContainerSnap,
    name: &str,
    reserved: &BTreeMap<String, (u32, u64)>,
    job_holds_it: bool,
) -> Option<String> {
    let n = input.nodes.iter().find(|n| n.name == name)?;
    unfit(input, c, n, reserved, !job_holds_it).map(|r| format!("{name} cannot take {}: {r}", c.id))
}

/// Why node `n` cannot receive `c` (its agent, Slurm's state, the partition, and with
/// `check_room` its free CPUs and memory less what is reserved or in flight to it). Pure.
fn unfit(
    input: &PlanInput,
    c: &ContainerSnap,
    n: &NodeSnap,
    reserved: &BTreeMap<String, (u32, u64)>,
    check_room: bool,
) -> Option<String> {
    if !n.agent_up {
        return Some("agent unreachable".into());
    }
    if let Some(r) = n.flags.evacuate_reason() {
        return Some(r.into());
    }
    if !c.partition.is_empty() && !n.partitions.is_empty() && !n.partitions.contains(&c.partition) {
        return Some(format!("not in partition {}", c.partition));
    }
    if !check_room {
        return None;
    }
    let (rc, rm) = reserved.get(&n.name).copied().unwrap_or((0, 0));
    let inflight_cpus: u32 = input
        .in_flight
        .iter()
        .filter(|f| f.destination == n.name)
        .map(|f| f.cpus)
        .sum();
    let inflight_mem: u64 = input
        .in_flight
        .iter()
        .filter(|f| f.destination == n.name)
        .map(|f| f.rss_mb)
        .sum();
    // A node Slurm knows nothing about (no CPU count) is judged by its agent alone.
    if n.cpus_total > 0 && n.free_cpus() - i64::from(rc + inflight_cpus) < i64::from(c.cpus) {
        return Some("not enough free CPUs".into());
    }
    if n.mem_total_mb > 0 && n.free_mem_mb() - ((rm + inflight_mem) as i64) < (c.rss_mb as i64) {
        return Some("not enough free memory".into());
    }
    None
}

/// One implicit drain policy: evacuate every migratable container from nodes that are DRAIN,
/// DRAINING, DOWN or REBOOT ASAP.
#[derive(Debug, Default)]
pub struct BuiltinPlanner {
    pub mode: Option<MigrationMode>,
    /// Skips of the last `plan` run.
    skips: Vec<SkipNote>,
}

impl BuiltinPlanner {
    pub fn new(mode: Option<MigrationMode>) -> Self {
        BuiltinPlanner {
            mode,
            skips: Vec::new(),
        }
    }
}

pub const BUILTIN_DRAIN: &str = "builtin-drain";

impl Planner for BuiltinPlanner {
    fn preview(
        &self,
        input: &PlanInput,
        states: &BTreeMap<String, PolicyState>,
    ) -> Vec<PlannedMove> {
        BuiltinPlanner::new(self.mode).plan(input, states)
    }

    fn explain(
        &self,
        input: &PlanInput,
        states: &BTreeMap<String, PolicyState>,
    ) -> (Vec<PlannedMove>, Vec<SkipNote>) {
        let mut p = BuiltinPlanner::new(self.mode);
        let moves = p.plan(input, states);
        (moves, p.skips)
    }

    fn take_skips(&mut self) -> Vec<SkipNote> {
        std::mem::take(&mut self.skips)
    }

    fn reload(&mut self, _path: &Path) -> Result<(), Vec<String>> {
        Ok(())
    }

    fn check(&self, sources: &[PolicySource]) -> PolicyCheckReport {
        // Syntax only: the built-in planner has no policy language of its own.
        let mut errors = Vec::new();
        for s in sources {
            if let Err(e) = s.text.parse::<toml::Table>() {
                let (l, c) = e
                    .span()
                    .map(|sp| crate::config::line_col(&s.text, sp.start))
                    .unwrap_or((1, 1));
                errors.push(format!("{}:{l}:{c}: {}", s.path, e.message().trim()));
            }
        }
        PolicyCheckReport {
            ok: errors.is_empty(),
            policies: vec![],
            errors,
        }
    }

    fn policies(&self) -> Vec<PolicyInfo> {
        vec![PolicyInfo {
            name: BUILTIN_DRAIN.into(),
            kind: "drain".into(),
            action: PlanAction::Automatic,
            priority: 0,
            description: "evacuate nodes that are DRAIN, DOWN or REBOOT ASAP".into(),
            source: "built-in".into(),
            default_state: PolicyState::Enabled,
        }]
    }

    fn plan(
        &mut self,
        input: &PlanInput,
        states: &BTreeMap<String, PolicyState>,
    ) -> Vec<PlannedMove> {
        let action = match states.get(BUILTIN_DRAIN) {
            Some(PolicyState::Disabled) => return vec![],
            Some(PolicyState::DryRun) => PlanAction::DryRun,
            _ => PlanAction::Automatic,
        };
        let mut reserved: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        let mut out = Vec::new();
        let mut skips = Vec::new();
        let skip = |node: &str, container: Option<&str>, code: &str, reason: String| SkipNote {
            policy: BUILTIN_DRAIN.into(),
            node: node.into(),
            container: container.map(str::to_string),
            code: code.into(),
            reason,
        };
        for n in &input.nodes {
            let Some(reason) = n.flags.evacuate_reason() else {
                continue;
            };
            if !n.agent_up {
                // CRIU runs on the source: nothing can leave a node whose agent is gone.
                tracing::debug!(policy = BUILTIN_DRAIN, node = %n.name, "cannot evacuate: agent unreachable");
                skips.push(skip(
                    &n.name,
                    None,
                    "source-down",
                    format!(
                        "{} is {reason} but its agent is unreachable; CRIU runs on the source",
                        n.name
                    ),
                ));
                continue;
            }
            for c in input.containers.iter().filter(|c| c.node == n.name) {
                if !c.migratable {
                    skips.push(skip(
                        &n.name,
                        Some(&c.id),
                        "not-migratable",
                        format!("job {} was not started with --migratable", c.job_id),
                    ));
                    continue;
                }
                if input.in_flight.iter().any(|f| f.container == c.id) {
                    continue;
                }
                let why = format!("{} is {reason} (Slurm state {})", n.name, n.state);
                match choose_destination(input, c, &reserved) {
                    Ok(dest) => {
                        let r = reserved.entry(dest.clone()).or_default();
                        r.0 += c.cpus;
                        r.1 += c.rss_mb;
                        out.push(PlannedMove {
                            policy: BUILTIN_DRAIN.into(),
                            container: c.id.clone(),
                            source: n.name.clone(),
                            destination: dest,
                            mode: self.mode.unwrap_or(MigrationMode::Auto),
                            max_downtime_ms: None,
                            why,
                            action,
                        });
                    }
                    Err(e) => {
                        tracing::debug!(policy = BUILTIN_DRAIN, container = %c.id, job = c.job_id, node = %n.name, "cannot evacuate: {e}");
                        skips.push(skip(&n.name, Some(&c.id), "no-destination", e));
                    }
                }
            }
        }
        self.skips = skips;
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn node(name: &str, state: &str, load: f64) -> NodeSnap {
        NodeSnap {
            name: name.into(),
            state: state.into(),
            flags: NodeFlags::from_state(state),
            partitions: vec!["debug".into()],
            cpus_total: 4,
            cpus_alloc: 1,
            mem_total_mb: 4000,
            mem_alloc_mb: 100,
            load,
            agent_up: true,
            ..Default::default()
        }
    }

    pub(crate) fn container(id: &str, node: &str) -> ContainerSnap {
        ContainerSnap {
            id: id.into(),
            job_id: 5,
            node: node.into(),
            partition: "debug".into(),
            cpus: 1,
            rss_mb: 100,
            migratable: true,
            ..Default::default()
        }
    }

    #[test]
    fn drain_evacuates_to_least_loaded_reachable_node() {
        let mut down = node("n4", "IDLE", 0.0);
        down.agent_up = false;
        let input = PlanInput {
            nodes: vec![
                node("n1", "MIXED+DRAIN", 1.0),
                node("n2", "MIXED", 2.0),
                node("n3", "MIXED", 0.5),
                down,
            ],
            containers: vec![
                container("a", "n1"),
                container("b", "n1"),
                container("c", "n2"),
            ],
            in_flight: vec![],
            now: 0,
        };
        let moves = BuiltinPlanner::default().plan(&input, &BTreeMap::new());
        assert_eq!(moves.len(), 2);
        assert_eq!(moves[0].destination, "n3");
        // The first move's reservation makes n3 (0.5+1)/4 > n2? no: 1.5/4 < 2/4, still n3.
        assert_eq!(moves[1].destination, "n3");
        assert!(moves[0].why.contains("DRAINING"), "{}", moves[0].why);
        assert_eq!(moves[0].action, PlanAction::Automatic);
    }

    #[test]
    fn states_disable_and_dry_run() {
        let input = PlanInput {
            nodes: vec![node("n1", "DOWN", 0.0), node("n2", "IDLE", 0.0)],
            containers: vec![container("a", "n1")],
            ..Default::default()
        };
        let mut p = BuiltinPlanner::default();
        let mut st = BTreeMap::new();
        st.insert(BUILTIN_DRAIN.to_string(), PolicyState::Disabled);
        assert!(p.plan(&input, &st).is_empty());
        st.insert(BUILTIN_DRAIN.to_string(), PolicyState::DryRun);
        assert_eq!(p.plan(&input, &st)[0].action, PlanAction::DryRun);
    }

    #[test]
    fn nothing_leaves_a_node_whose_agent_is_gone() {
        let mut n1 = node("n1", "DOWN", 0.0);
        n1.agent_up = false;
        let input = PlanInput {
            nodes: vec![n1, node("n2", "IDLE", 0.0)],
            containers: vec![container("a", "n1")],
            ..Default::default()
        };
        assert!(BuiltinPlanner::default()
            .plan(&input, &BTreeMap::new())
            .is_empty());
    }

    #[test]
    fn no_room_is_explained() {
        let mut full = node("n2", "IDLE", 0.0);
        full.cpus_alloc = 4;
        let input = PlanInput {
            nodes: vec![node("n1", "DOWN", 0.0), full],
            containers: vec![container("a", "n1")],
            ..Default::default()
        };
        let e =
            choose_destination(&input, &input.containers[0], &BTreeMap::new()).expect_err("full");
        assert!(e.contains("n2: not enough free CPUs"), "{e}");
    }

    /// A named destination that is DRAIN/DOWN or full is refused with the reason; a node the job
    /// already holds is not judged by its free CPUs (no expansion asks Slurm for them).
    #[test]
    fn a_named_destination_that_cannot_take_the_task_is_refused_with_why() {
        let mut full = node("n3", "ALLOCATED", 0.0);
        full.cpus_alloc = 4;
        let input = PlanInput {
            nodes: vec![
                node("n1", "MIXED", 0.0),
                node("n2", "IDLE+DRAIN", 0.0),
                full,
                node("n4", "DOWN", 0.0),
                node("n5", "IDLE", 0.0),
            ],
            containers: vec![container("a", "n1")],
            ..Default::default()
        };
        let c = &input.containers[0];
        let none = BTreeMap::new();
        let why = |n: &str, holds: bool| destination_refusal(&input, c, n, &none, holds);
        assert_eq!(why("n2", false).as_deref(), Some("n2 cannot take a: DRAIN"));
        assert_eq!(
            why("n3", false).as_deref(),
            Some("n3 cannot take a: not enough free CPUs")
        );
        assert_eq!(why("n3", true), None);
        assert_eq!(why("n4", true).as_deref(), Some("n4 cannot take a: DOWN"));
        assert_eq!(why("n5", false), None);
        // What this request already placed on n5 counts.
        let mut reserved = BTreeMap::new();
        reserved.insert("n5".to_string(), (3, 0));
        assert_eq!(
            destination_refusal(&input, c, "n5", &reserved, false).as_deref(),
            Some("n5 cannot take a: not enough free CPUs")
        );
    }

    /// A node holding a moved task counts its CPUs even though Slurm's CPUAlloc does not, so a
    /// full node is seen as full.
    #[test]
    fn moved_in_tasks_count_on_their_node() {
        assert_eq!(allocated_cpus(0, [1]), 1);
        assert_eq!(allocated_cpus(2, [1, 2]), 5);
        assert_eq!(allocated_cpus(3, []), 3);
        assert_eq!(allocated_cpus(u32::MAX, [1]), u32::MAX);
    }

    #[test]
    fn check_reports_syntax_positions() {
        let r = BuiltinPlanner::default().check(&[PolicySource {
            path: "p.toml".into(),
            text: "[policy]\nname = \n".into(),
        }]);
        assert!(!r.ok);
        assert!(r.errors[0].starts_with("p.toml:2:"), "{:?}", r.errors);
    }
}
