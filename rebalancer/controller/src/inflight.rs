//! The owner of in-flight migration state: the slots held by running migrations, the back-off
//! after a start that failed, the jobs expanded onto a destination before a migration, and when
//! each container last moved. Its methods are the only way to change that state, so the limits
//! (one migration per container, `max_in_flight`, `max_per_node`) and the rule that an
//! expansion belongs to a migration that holds a slot are kept here and nowhere else.

use std::collections::{BTreeMap, HashMap};

use rebalancer_proto::control::{DecisionRecord, MigrationEntry};
use rebalancer_proto::{ContainerState, MigrationRecord, MigrationState, Millis};

/// Pause before an automatic move whose start failed is tried again.
pub const RETRY_AFTER_FAILURE_MS: u64 = 60_000;

/// How a migration ended, for the job's allocation. Pure: [`Outcome::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The task runs on the destination: the job keeps it and may leave the source.
    Succeeded,
    /// The source agent confirmed the task runs there again: the expansion is undone.
    RolledBack,
    /// Where the task runs is not known (Commit may have been applied, a post-copy failed
    /// after the point of no return, or the controller lost track): the allocation is kept on
    /// both nodes until [`Resolution`] says where it runs. Undoing it could kill the only copy.
    Unknown,
}

impl Outcome {
    pub fn of(rec: &MigrationRecord) -> Outcome {
        match rec.state {
            MigrationState::Succeeded => Outcome::Succeeded,
            MigrationState::RolledBack => Outcome::RolledBack,
            // Failed is after the point of no return; Pending/Running here means lost track.
            MigrationState::Failed
            | MigrationState::Unknown
            | MigrationState::Pending
            | MigrationState::Running => Outcome::Unknown,
        }
    }
}

/// Where a task of an unknown outcome turned out to run, from the two agents' container lists
/// (`None`: the agent has no such container). Pure: [`Resolution::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// It runs on the destination: as after a success (the source may leave the job).
    Moved,
    /// It runs on the source again: the expansion is undone.
    Stayed,
    /// It runs nowhere (ended, or lost in post-copy): the expansion is undone.
    Gone,
    /// Not known yet (the source still holds a frozen copy and no copy runs, or an agent did
    /// not answer): ask again later, change nothing.
    Pending,
}

impl Resolution {
    pub fn of(source: Option<ContainerState>, destination: Option<ContainerState>) -> Resolution {
        use ContainerState::*;
        let runs = |s: Option<ContainerState>| s == Some(Running);
        match (source, destination) {
            // The destination runs a tree only after it committed.
            (s, d) if runs(d) && !runs(s) => Resolution::Moved,
            (s, d) if runs(s) && !runs(d) && d != Some(Migrating) => Resolution::Stayed,
            // Both running breaks the first invariant: never act on it.
            (s, d) if runs(s) && runs(d) => Resolution::Pending,
            // A frozen source copy or an arrival in progress: the agents are still resolving.
            (Some(Migrating), _) | (_, Some(Migrating)) => Resolution::Pending,
            (Some(Starting), _) | (_, Some(Starting)) => Resolution::Pending,
            _ => Resolution::Gone,
        }
    }
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

/// The in-flight limits of `[migration]` in the controller's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_in_flight: u32,
    pub max_per_node: u32,
}

/// A job expanded onto a migration's destination, with its node list before the expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    pub job_id: u32,
    pub nodes_before: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Migrations {
    /// By container id: one migration per container at a time.
    in_flight: BTreeMap<String, InFlight>,
    /// Containers whose last migration could not start, and when.
    failed_starts: HashMap<String, Millis>,
    /// By container: only for containers in `in_flight`.
    pre_expanded: HashMap<String, Expansion>,
    /// By container: when its last migration succeeded.
    last_moved: HashMap<String, Millis>,
    /// By (job, node): when the controller last took the node out of the job's allocation.
    departures: HashMap<(u32, String), Millis>,
}

impl Migrations {
    /// True when the container holds a slot.
    pub fn contains_key(&self, container: &str) -> bool {
        self.in_flight.contains_key(container)
    }

    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    pub fn get(&self, container: &str) -> Option<&InFlight> {
        self.in_flight.get(container)
    }

    /// The migrations in flight, by container id.
    pub fn values(&self) -> impl Iterator<Item = &InFlight> {
        self.in_flight.values()
    }

    /// Migrations in flight with `node` as their source or destination.
    pub fn on_node(&self, node: &str) -> u32 {
        self.in_flight
            .values()
            .filter(|f| f.decision.source == node || f.decision.destination == node)
            .count() as u32
    }

    /// Holds a slot for `f.decision.container` when the limits allow; the error says which
    /// limit refused it.
    pub fn try_reserve(&mut self, limits: Limits, f: InFlight) -> Result<(), String> {
        let container = &f.decision.container;
        if self.in_flight.contains_key(container) {
            return Err(format!("container {container} is already migrating"));
        }
        if self.in_flight.len() as u32 >= limits.max_in_flight {
            return Err(format!(
                "{} migrations in flight (max_in_flight)",
                self.in_flight.len()
            ));
        }
        for node in [&f.decision.source, &f.decision.destination] {
            let n = self.on_node(node);
            if n >= limits.max_per_node {
                return Err(format!("{n} migrations in flight on {node} (max_per_node)"));
            }
        }
        self.in_flight.insert(container.clone(), f);
        Ok(())
    }

    /// A migration found running at start-up: it holds its slot whatever the limits say,
    /// because it runs already.
    pub fn adopt(&mut self, f: InFlight) {
        self.in_flight.insert(f.decision.container.clone(), f);
    }

    /// Replaces the decision of a held slot (journaled sequence number, migration id).
    pub fn set_decision(&mut self, d: &DecisionRecord) {
        if let Some(f) = self.in_flight.get_mut(&d.container) {
            f.decision = d.clone();
        }
    }

    /// Records the live migration record of a held slot.
    pub fn set_entry(&mut self, container: &str, e: &MigrationEntry) {
        if let Some(f) = self.in_flight.get_mut(container) {
            f.entry = Some(e.clone());
        }
    }

    /// Frees the container's slot; returns the number still in flight. An expansion not taken
    /// with [`Self::take_expansion`] before is forgotten with the slot.
    pub fn remove(&mut self, container: &str) -> usize {
        self.in_flight.remove(container);
        self.pre_expanded.remove(container);
        self.in_flight.len()
    }

    /// The migration could not start: frees the slot and holds the container back for
    /// [`RETRY_AFTER_FAILURE_MS`] from automatic moves. Returns the number still in flight.
    pub fn start_failed(&mut self, container: &str, now: Millis) -> usize {
        self.failed_starts.insert(container.to_string(), now);
        self.remove(container)
    }

    /// True while a failed start holds the container back from automatic moves.
    pub fn backing_off(&self, container: &str, now: Millis) -> bool {
        self.failed_starts
            .get(container)
            .is_some_and(|t| now.saturating_sub(*t) < RETRY_AFTER_FAILURE_MS)
    }

    /// When the back-off after a failed start ends, while it holds the container back.
    pub fn backing_off_until(&self, container: &str, now: Millis) -> Option<Millis> {
        self.failed_starts
            .get(container)
            .map(|t| t.saturating_add(RETRY_AFTER_FAILURE_MS))
            .filter(|until| *until > now)
    }

    /// Remembers that the container's job was expanded for its migration; ignored (false)
    /// unless the container holds a slot.
    pub fn expanded(&mut self, container: &str, x: Expansion) -> bool {
        if !self.in_flight.contains_key(container) {
            return false;
        }
        self.pre_expanded.insert(container.to_string(), x);
        true
    }

    /// The expansion to undo after a failed migration (at most once).
    pub fn take_expansion(&mut self, container: &str) -> Option<Expansion> {
        self.pre_expanded.remove(container)
    }

    /// The outcome is unknown: the expansion (if any) is handed over to be journaled with the
    /// unknown outcome, and the slot stays held, so that nothing moves the container again
    /// until [`Self::remove`] after the resolution.
    pub fn outcome_unknown(&mut self, container: &str) -> Option<Expansion> {
        self.pre_expanded.remove(container)
    }

    /// The migration succeeded: the expansion stays (the job keeps the destination) and the
    /// container counts as just moved. The slot stays held until [`Self::remove`].
    pub fn succeeded(&mut self, container: &str, now: Millis) {
        self.pre_expanded.remove(container);
        self.last_moved.insert(container.to_string(), now);
    }

    /// When the container's last migration succeeded.
    pub fn last_moved(&self, container: &str) -> Option<Millis> {
        self.last_moved.get(container).copied()
    }

    /// Job `job` left `node`'s allocation at `at` (its source was released after a move).
    pub fn departed(&mut self, job: u32, node: &str, at: Millis) {
        // Only recent departures matter (see `settle_after_departure`); keep the map small.
        self.departures
            .retain(|_, t| at.saturating_sub(*t) < 10 * DEPARTURE_SETTLE_MS);
        self.departures.insert((job, node.to_string()), at);
    }

    /// How long a migration of job `job` to `node` must wait at `now` before the job may hold
    /// the node again. slurmd refuses a job's credential created at or before the second in
    /// which it recorded the job's departure ("Job credential revoked"), so a move straight
    /// back waits until that second is safely past. Zero when the job did not leave it lately.
    /// The recent departures, (job, node, when): journaled, so that a restarted controller
    /// still waits before it moves a task into a node its job just left.
    pub fn departures(&self) -> Vec<(u32, String, Millis)> {
        self.departures
            .iter()
            .map(|((job, node), at)| (*job, node.clone(), *at))
            .collect()
    }

    pub fn settle_after_departure(&self, job: u32, node: &str, now: Millis) -> Millis {
        self.departures
            .get(&(job, node.to_string()))
            .map(|t| (t + DEPARTURE_SETTLE_MS).saturating_sub(now))
            .unwrap_or(0)
    }
}

/// How long after a job left a node its credentials there may still be refused: slurmd
/// compares creation and revocation times in whole seconds, and the revocation is stamped when
/// slurmctld tells slurmd, a moment after the allocation changed.
pub const DEPARTURE_SETTLE_MS: Millis = 2_000;

#[cfg(test)]
mod tests {
    use super::*;
    use rebalancer_proto::control::DecisionOutcome;

    #[test]
    fn a_move_back_waits_until_the_departure_is_past() {
        let mut m = Migrations::default();
        assert_eq!(m.settle_after_departure(4, "node1", 10_000), 0);
        m.departed(4, "node1", 10_000);
        assert_eq!(m.settle_after_departure(4, "node1", 10_500), 1_500);
        assert_eq!(m.settle_after_departure(4, "node1", 12_000), 0);
        // Another job, another node: no wait.
        assert_eq!(m.settle_after_departure(5, "node1", 10_500), 0);
        assert_eq!(m.settle_after_departure(4, "node2", 10_500), 0);
        // Old departures are forgotten.
        m.departed(6, "node3", 100_000);
        assert_eq!(m.settle_after_departure(4, "node1", 100_000), 0);
        assert!(!m.departures.contains_key(&(4, "node1".to_string())));
    }
    use rebalancer_proto::MigrationMode;

    const LIMITS: Limits = Limits {
        max_in_flight: 2,
        max_per_node: 1,
    };

    fn slot(container: &str, source: &str, destination: &str) -> InFlight {
        InFlight {
            decision: DecisionRecord {
                seq: 0,
                at: 0,
                policy: "p".into(),
                container: container.into(),
                task: None,
                uid: Some(1000),
                source: source.into(),
                destination: destination.into(),
                mode: MigrationMode::PostCopy,
                why: "test".into(),
                outcome: DecisionOutcome::Started,
                detail: None,
                migration: None,
            },
            entry: None,
            cpus: 1,
            rss_mb: 1,
            started: 0,
        }
    }

    fn expansion() -> Expansion {
        Expansion {
            job_id: 7,
            nodes_before: vec!["n1".into()],
        }
    }

    #[test]
    fn one_migration_per_container() {
        let mut m = Migrations::default();
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        let e = m
            .try_reserve(LIMITS, slot("c1", "n3", "n4"))
            .expect_err("the limits refuse it");
        assert_eq!(e, "container c1 is already migrating");
        assert_eq!(m.len(), 1);
        assert_eq!(m.get("c1").map(|f| f.decision.source.as_str()), Some("n1"));
    }

    #[test]
    fn per_node_limit_counts_source_and_destination() {
        let mut m = Migrations::default();
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        let e = m
            .try_reserve(LIMITS, slot("c2", "n3", "n1"))
            .expect_err("the limits refuse it");
        assert_eq!(e, "1 migrations in flight on n1 (max_per_node)");
        let e = m
            .try_reserve(LIMITS, slot("c2", "n2", "n3"))
            .expect_err("the limits refuse it");
        assert_eq!(e, "1 migrations in flight on n2 (max_per_node)");
        m.try_reserve(LIMITS, slot("c2", "n3", "n4"))
            .expect("the limits allow it");
        assert_eq!(
            (m.on_node("n1"), m.on_node("n4"), m.on_node("n5")),
            (1, 1, 0)
        );
    }

    #[test]
    fn cluster_limit_and_freeing_a_slot() {
        let mut m = Migrations::default();
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        m.try_reserve(LIMITS, slot("c2", "n3", "n4"))
            .expect("the limits allow it");
        let e = m
            .try_reserve(LIMITS, slot("c3", "n5", "n6"))
            .expect_err("the limits refuse it");
        assert_eq!(e, "2 migrations in flight (max_in_flight)");
        assert_eq!(m.remove("c1"), 1);
        assert!(!m.contains_key("c1"));
        m.try_reserve(LIMITS, slot("c3", "n5", "n6"))
            .expect("the limits allow it");
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn adopted_migrations_ignore_the_limits_but_count() {
        let mut m = Migrations::default();
        m.adopt(slot("c1", "n1", "n2"));
        m.adopt(slot("c2", "n1", "n3"));
        assert_eq!(m.on_node("n1"), 2);
        assert!(m.try_reserve(LIMITS, slot("c3", "n4", "n5")).is_err());
    }

    #[test]
    fn failed_start_frees_the_slot_and_backs_off() {
        let mut m = Migrations::default();
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        assert!(!m.backing_off("c1", 1_000));
        assert_eq!(m.start_failed("c1", 1_000), 0);
        assert!(!m.contains_key("c1"));
        assert!(m.backing_off("c1", 1_000 + RETRY_AFTER_FAILURE_MS - 1));
        assert!(!m.backing_off("c1", 1_000 + RETRY_AFTER_FAILURE_MS));
        assert!(!m.backing_off("c2", 1_000));
        assert_eq!(
            m.backing_off_until("c1", 1_000),
            Some(1_000 + RETRY_AFTER_FAILURE_MS)
        );
        assert_eq!(
            m.backing_off_until("c1", 1_000 + RETRY_AFTER_FAILURE_MS),
            None
        );
    }

    #[test]
    fn expansion_needs_a_slot_and_is_undone_once() {
        let mut m = Migrations::default();
        assert!(!m.expanded("c1", expansion()));
        assert_eq!(m.take_expansion("c1"), None);
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        assert!(m.expanded("c1", expansion()));
        assert_eq!(m.take_expansion("c1"), Some(expansion()));
        assert_eq!(m.take_expansion("c1"), None);
    }

    #[test]
    fn freeing_a_slot_forgets_its_expansion() {
        let mut m = Migrations::default();
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        assert!(m.expanded("c1", expansion()));
        m.remove("c1");
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        assert_eq!(m.take_expansion("c1"), None);
    }

    #[test]
    fn success_keeps_the_expansion_and_records_the_move() {
        let mut m = Migrations::default();
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        assert!(m.expanded("c1", expansion()));
        assert_eq!(m.last_moved("c1"), None);
        m.succeeded("c1", 5_000);
        assert_eq!(m.take_expansion("c1"), None);
        assert_eq!(m.last_moved("c1"), Some(5_000));
        assert!(
            m.contains_key("c1"),
            "the slot stays until the end is journaled"
        );
        m.remove("c1");
        assert_eq!(m.last_moved("c1"), Some(5_000));
    }

    #[test]
    fn decision_and_entry_update_only_held_slots() {
        let mut m = Migrations::default();
        let mut d = slot("c1", "n1", "n2").decision;
        d.seq = 9;
        m.set_decision(&d);
        assert!(m.is_empty());
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        m.set_decision(&d);
        assert_eq!(m.get("c1").map(|f| f.decision.seq), Some(9));
    }

    #[test]
    fn only_a_confirmed_rollback_undoes_the_allocation() {
        let mut rec = crate::journal::tests::record("m1", MigrationState::Succeeded);
        assert_eq!(Outcome::of(&rec), Outcome::Succeeded);
        rec.state = MigrationState::RolledBack;
        assert_eq!(Outcome::of(&rec), Outcome::RolledBack);
        for s in [
            MigrationState::Unknown,
            MigrationState::Failed,
            MigrationState::Running,
            MigrationState::Pending,
        ] {
            rec.state = s;
            assert_eq!(Outcome::of(&rec), Outcome::Unknown, "{s}");
        }
    }

    #[test]
    fn an_unknown_outcome_resolves_to_where_the_task_runs() {
        use ContainerState::*;
        use Resolution::*;
        let cases = [
            ((Some(Migrating), Some(Running)), Moved),
            ((Some(MigratedAway), Some(Running)), Moved),
            ((None, Some(Running)), Moved),
            ((Some(Running), None), Stayed),
            ((Some(Running), Some(Exited)), Stayed),
            ((None, None), Gone),
            ((Some(MigratedAway), Some(Exited)), Gone),
            ((Some(Exited), None), Gone),
            // The source still holds its frozen copy and nothing runs: not known yet.
            ((Some(Migrating), None), Pending),
            ((None, Some(Migrating)), Pending),
            ((Some(Running), Some(Migrating)), Pending),
            // Two live copies: never acted on.
            ((Some(Running), Some(Running)), Pending),
        ];
        for ((src, dst), want) in cases {
            assert_eq!(Resolution::of(src, dst), want, "{src:?} {dst:?}");
        }
    }

    #[test]
    fn an_unknown_outcome_keeps_the_slot_and_hands_over_the_expansion() {
        let mut m = Migrations::default();
        m.try_reserve(LIMITS, slot("c1", "n1", "n2"))
            .expect("the limits allow it");
        assert!(m.expanded("c1", expansion()));
        assert_eq!(m.outcome_unknown("c1"), Some(expansion()));
        // Still held: the frozen container is not planned again, and the expansion is gone
        // from memory (journaled with the unknown outcome instead).
        assert!(m.contains_key("c1"));
        assert_eq!(
            m.try_reserve(LIMITS, slot("c1", "n3", "n4"))
                .expect_err("held"),
            "container c1 is already migrating"
        );
        assert_eq!(m.take_expansion("c1"), None);
        assert_eq!(m.remove("c1"), 0);
    }
}
