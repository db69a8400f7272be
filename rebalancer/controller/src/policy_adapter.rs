//! [`Planner`] over the `rebalancer-policy` crate: TOML policies, hysteresis, cooldowns and the
//! planner's explanations.

use std::collections::BTreeMap;
use std::path::Path;

use rebalancer_policy as pol;
use rebalancer_proto::control::{PolicyCheckReport, PolicySource, PolicyState};
use rebalancer_proto::{MigrationMode, Millis};
use tracing::{debug, warn};

use crate::planner::{PlanAction, PlanInput, PlannedMove, Planner, PolicyInfo, SkipNote};

pub struct PolicyPlanner {
    set: pol::PolicySet,
    state: pol::PolicyState,
    /// Skips of the last `plan` run.
    skips: Vec<SkipNote>,
}

/// The skip code as the policy crate spells it in JSON (`no-destination`).
fn code_str(c: pol::SkipCode) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{c:?}"))
}

fn problems(e: pol::LoadError) -> Vec<String> {
    e.problems.iter().map(|p| p.to_string()).collect()
}

/// Loads a policy file or a directory of `*.toml` files.
fn load(path: &Path) -> Result<pol::PolicySet, Vec<String>> {
    if path.is_dir() {
        pol::load_dir(path).map_err(problems)
    } else {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
        pol::load_sources(&[(path, text)]).map_err(problems)
    }
}

/// `Auto` is the agent's choice, not a mode the planner can weigh.
fn to_policy_mode(m: MigrationMode) -> Option<MigrationMode> {
    (m != MigrationMode::Auto).then_some(m)
}

fn secs(ms: Millis) -> pol::Timestamp {
    ms / 1000
}

/// The planner's view of the cluster (times in seconds).
pub fn cluster_view(input: &PlanInput) -> pol::ClusterView {
    pol::ClusterView {
        nodes: input
            .nodes
            .iter()
            .map(|n| pol::NodeView {
                name: n.name.clone(),
                flags: pol::NodeFlags {
                    // A node whose agent is unreachable can neither send nor receive.
                    down: n.flags.down || !n.agent_up,
                    ..n.flags
                },
                partitions: n.partitions.clone(),
                features: n.features.clone(),
                cpus_total: n.cpus_total,
                cpus_alloc: n.cpus_alloc,
                mem_total_mb: n.mem_total_mb,
                mem_alloc_mb: n.mem_alloc_mb,
                load: n.load,
                temperature_c: n.temperature_c,
                modes: n.modes.iter().copied().filter_map(to_policy_mode).collect(),
            })
            .collect(),
        // CRIU runs on the source: containers of a node whose agent is gone cannot move, and a
        // planned move would start cooldowns for nothing.
        containers: input
            .containers
            .iter()
            .filter(|c| input.nodes.iter().any(|n| n.name == c.node && n.agent_up))
            .map(|c| pol::ContainerView {
                id: c.id.clone(),
                job_id: u64::from(c.job_id),
                step_id: u64::from(c.step_id),
                user: c.user.clone(),
                account: c.account.clone(),
                partition: c.partition.clone(),
                node: c.node.clone(),
                cpus: c.cpus,
                rss_mb: c.rss_mb,
                class: c.class.clone(),
                migratable: c.migratable,
                last_moved: c.last_moved.map(secs),
            })
            .collect(),
        in_flight: input
            .in_flight
            .iter()
            .map(|f| pol::InFlight {
                container: f.container.clone(),
                job_id: u64::from(f.job_id),
                source: f.source.clone(),
                destination: f.destination.clone(),
                cpus: f.cpus,
                rss_mb: f.rss_mb,
                started: secs(f.started),
            })
            .collect(),
        now: secs(input.now),
    }
}

impl PolicyPlanner {
    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        Ok(PolicyPlanner {
            set: load(path)?,
            state: pol::PolicyState::default(),
            skips: Vec::new(),
        })
    }

    /// The set with run-time states applied.
    fn effective(&self, states: &BTreeMap<String, PolicyState>) -> pol::PolicySet {
        let mut set = self.set.clone();
        for (name, s) in states {
            match s {
                PolicyState::Disabled => {
                    set.set_enabled(name, false);
                }
                PolicyState::DryRun => {
                    set.set_enabled(name, true);
                    set.set_action(name, pol::Action::DryRun);
                }
                PolicyState::Enabled => {
                    set.set_enabled(name, true);
                }
            }
        }
        set
    }
}

impl Planner for PolicyPlanner {
    fn reload(&mut self, path: &Path) -> Result<(), Vec<String>> {
        self.set = load(path)?;
        Ok(())
    }

    fn check(&self, sources: &[PolicySource]) -> PolicyCheckReport {
        pol::check_sources(sources)
    }

    fn policies(&self) -> Vec<PolicyInfo> {
        self.set
            .policies()
            .iter()
            .map(|p| PolicyInfo {
                name: p.name.clone(),
                kind: p.kind.as_str().into(),
                action: match p.action {
                    pol::Action::Automatic => PlanAction::Automatic,
                    pol::Action::Recommend => PlanAction::Recommend,
                    pol::Action::DryRun => PlanAction::DryRun,
                },
                priority: p.priority,
                description: p.description.clone(),
                source: p.source.display().to_string(),
                default_state: if !p.enabled {
                    PolicyState::Disabled
                } else if p.action == pol::Action::DryRun {
                    PolicyState::DryRun
                } else {
                    PolicyState::Enabled
                },
            })
            .collect()
    }

    fn plan(
        &mut self,
        input: &PlanInput,
        states: &BTreeMap<String, PolicyState>,
    ) -> Vec<PlannedMove> {
        let set = self.effective(states);
        let view = cluster_view(input);
        let plan = pol::plan(&set, &view, &mut self.state);
        for w in &plan.warnings {
            warn!("policy planner: {w}");
        }
        for s in &plan.skips {
            debug!(policy = %s.policy, node = %s.node, container = s.container.as_deref().unwrap_or(""), code = ?s.code, "skip: {}", s.reason);
        }
        self.skips = plan
            .skips
            .iter()
            .map(|s| SkipNote {
                policy: s.policy.clone(),
                node: s.node.clone(),
                container: s.container.clone(),
                code: code_str(s.code),
                reason: s.reason.clone(),
            })
            .collect();
        plan.decisions
            .into_iter()
            .map(|d| PlannedMove {
                max_downtime_ms: set.get(&d.policy).and_then(|p| p.migration.max_downtime_ms),
                action: match d.action {
                    pol::DecisionAction::Migrate => PlanAction::Automatic,
                    pol::DecisionAction::Recommend => PlanAction::Recommend,
                    pol::DecisionAction::DryRun => PlanAction::DryRun,
                },
                why: d.why.summary,
                policy: d.policy,
                container: d.container,
                source: d.source,
                destination: d.destination,
                mode: d.mode,
            })
            .collect()
    }

    fn preview(
        &self,
        input: &PlanInput,
        states: &BTreeMap<String, PolicyState>,
    ) -> Vec<PlannedMove> {
        self.explain(input, states).0
    }

    fn explain(
        &self,
        input: &PlanInput,
        states: &BTreeMap<String, PolicyState>,
    ) -> (Vec<PlannedMove>, Vec<SkipNote>) {
        let mut copy = PolicyPlanner {
            set: self.set.clone(),
            state: self.state.clone(),
            skips: Vec::new(),
        };
        let moves = copy.plan(input, states);
        (moves, copy.skips)
    }

    fn take_skips(&mut self) -> Vec<SkipNote> {
        std::mem::take(&mut self.skips)
    }

    fn record_move(&mut self, job_id: u32, source: &str, destination: &str, at: Millis) {
        self.state
            .record_move(u64::from(job_id), source, destination, secs(at));
    }

    fn save_state(&self) -> Option<String> {
        serde_json::to_string(&self.state).ok()
    }

    fn restore_state(&mut self, saved: &str) {
        match serde_json::from_str(saved) {
            Ok(s) => self.state = s,
            Err(e) => warn!("journaled planner state not restored: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::tests::{container, node};

    const DRAIN: &str = "kind = \"drain\"\naction = \"automatic\"\n";

    fn planner() -> PolicyPlanner {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("drain.toml"), DRAIN).expect("write");
        PolicyPlanner::load(dir.path()).expect("load")
    }

    fn input() -> PlanInput {
        let mut n1 = node("n1", "MIXED+DRAIN", 1.0);
        n1.modes = vec![MigrationMode::StopAndCopy, MigrationMode::PostCopy];
        let mut n2 = node("n2", "IDLE", 0.0);
        n2.modes = n1.modes.clone();
        PlanInput {
            nodes: vec![n1, n2],
            containers: vec![container("c1", "n1")],
            in_flight: vec![],
            now: 1_700_000_000_000,
        }
    }

    #[test]
    fn drain_policy_file_plans_an_explained_move() {
        let mut p = planner();
        let infos = p.policies();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].kind, "drain");
        let moves = p.plan(&input(), &BTreeMap::new());
        assert_eq!(moves.len(), 1, "{moves:?}");
        let m = &moves[0];
        assert_eq!((m.source.as_str(), m.destination.as_str()), ("n1", "n2"));
        assert_eq!(m.action, PlanAction::Automatic);
        assert!(!m.why.is_empty());
        assert_ne!(m.mode, MigrationMode::Auto);
    }

    #[test]
    fn run_time_states_override_the_file() {
        let mut p = planner();
        let name = p.policies()[0].name.clone();
        let mut st = BTreeMap::new();
        st.insert(name.clone(), PolicyState::DryRun);
        let moves = p.plan(&input(), &st);
        assert!(
            moves.iter().all(|m| m.action == PlanAction::DryRun),
            "{moves:?}"
        );
        st.insert(name, PolicyState::Disabled);
        let mut fresh = planner();
        assert!(fresh.plan(&input(), &st).is_empty());
    }

    #[test]
    fn an_unreachable_destination_agent_is_not_chosen() {
        let mut p = planner();
        let mut i = input();
        i.nodes[1].agent_up = false;
        assert!(p.plan(&i, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn nothing_is_planned_off_a_node_whose_agent_is_gone() {
        let mut p = planner();
        let mut i = input();
        i.nodes[0].agent_up = false;
        assert!(p.plan(&i, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn check_reports_positions_and_names() {
        let p = planner();
        let ok = p.check(&[PolicySource {
            path: "p/drain.toml".into(),
            text: DRAIN.into(),
        }]);
        assert!(ok.ok && ok.policies.len() == 1, "{ok:?}");
        let bad = p.check(&[PolicySource {
            path: "p/bad.toml".into(),
            text: "kind = \"drain\"\nacton = \"automatic\"\n".into(),
        }]);
        assert!(!bad.ok);
        assert!(
            bad.errors.iter().any(|e| e.starts_with("p/bad.toml:2:1:")),
            "{:?}",
            bad.errors
        );
    }

    #[test]
    fn preview_leaves_the_memory_alone() {
        let mut p = planner();
        let before = p.save_state();
        assert_eq!(p.preview(&input(), &BTreeMap::new()).len(), 1);
        assert_eq!(p.save_state(), before);
        assert_eq!(p.plan(&input(), &BTreeMap::new()).len(), 1);
        assert_ne!(p.save_state(), before);
    }

    #[test]
    fn planner_state_round_trips() {
        let mut p = planner();
        p.record_move(42, "n1", "n2", 1_700_000_000_000);
        let saved = p.save_state().expect("state");
        let mut q = planner();
        q.restore_state(&saved);
        assert_eq!(q.save_state().as_deref(), Some(saved.as_str()));
        assert!(saved.contains("42"), "{saved}");
    }
}
