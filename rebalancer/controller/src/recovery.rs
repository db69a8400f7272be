//! Recovery at start-up: the journal's unfinished migrations followed to their end, and
//! allocation updates that a stop interrupted done again.

use std::collections::HashMap;
use std::sync::Arc;

use rebalancer_proto::control::{DecisionOutcome, DecisionRecord, MigrationEntry};
use rebalancer_proto::MigrationState;
use tracing::{error, info, warn};

use crate::daemon::{read, write, Controller};

/// Journal meta key of the recent departures (JSON list of (job, node, ms)).
const DEPARTURES: &str = "departures";
use crate::inflight::{Expansion, InFlight};
use crate::journal::{JournaledExpansion, Unresolved};

impl Controller {
    /// Start-up: finish or clean up what the journal says was in flight.
    pub async fn recover(self: &Arc<Self>) {
        // Holders are judged against Slurm at the first full reconcile.
        self.load_holders();
        self.load_departures();
        let unfinished = match self.journal.unfinished() {
            Ok(u) => u,
            Err(e) => {
                error!("cannot read the journal: {e}");
                return;
            }
        };
        let expansions = self.recover_expansions(&unfinished);
        for entry in unfinished {
            let decision = self
                .journal
                .decisions(usize::MAX)
                .ok()
                .and_then(|ds| ds.into_iter().find(|d| d.seq == entry.decision))
                .unwrap_or_else(|| recovered_decision(&entry));
            info!(migration = %entry.record.id, container = %entry.record.container, source = %entry.record.source, "recovering a migration that was in flight at the last stop");
            write(&self.state).in_flight.adopt(InFlight {
                decision: decision.clone(),
                entry: Some(entry.clone()),
                cpus: 1,
                rss_mb: entry.record.stats.rss_bytes >> 20,
                started: entry.record.started_at,
            });
            // Its end undoes or keeps the expansion as if the controller had never stopped.
            if let Some(x) = expansions.get(&entry.record.container) {
                write(&self.state).in_flight.expanded(
                    &entry.record.container,
                    Expansion {
                        job_id: x.job_id,
                        nodes_before: x.nodes_before.clone(),
                    },
                );
            }
            let this = self.clone();
            tokio::spawn(async move { this.follow(entry, decision, None).await });
        }
        // Unknown outcomes: the job keeps both nodes, the container its slot, until resolved.
        match self.journal.unresolved() {
            Ok(all) => {
                for u in all {
                    info!(migration = %u.migration, container = %u.container, "resolving an unknown migration outcome from before the last stop");
                    if let Ok(Some(entry)) = self.journal.migration(&u.migration) {
                        let decision = recovered_decision(&entry);
                        write(&self.state).in_flight.adopt(InFlight {
                            decision,
                            entry: Some(entry.clone()),
                            cpus: 1,
                            rss_mb: entry.record.stats.rss_bytes >> 20,
                            started: entry.record.started_at,
                        });
                    } else if let Some(decision) = self.journaled_decision(u.decision) {
                        // Expanded, but no migration record came back before the stop: the slot
                        // stays held until it is known where the task runs.
                        write(&self.state).in_flight.adopt(InFlight {
                            decision,
                            entry: None,
                            cpus: 1,
                            rss_mb: 0,
                            started: u.since,
                        });
                    }
                    let this = self.clone();
                    tokio::spawn(async move { this.resolve_later(u).await });
                }
            }
            Err(e) => error!("cannot read the journal's unknown outcomes: {e}"),
        }
        // Successful migrations whose allocation update was interrupted.
        if let Ok(all) = self.journal.migrations() {
            for mut e in all.into_iter().filter(|e| {
                e.record.state == MigrationState::Succeeded
                    && !e.slurm_synced
                    && e.slurm_error.is_none()
            }) {
                // Expanded before the move (journaled): the holder is still owed.
                let expanded = expansions
                    .get(&e.record.container)
                    .is_some_and(|x| x.decision == e.decision);
                let this = self.clone();
                tokio::spawn(async move {
                    this.sync_slurm(&mut e, expanded).await;
                    if let Err(err) = this.journal.put_migration(&e) {
                        error!(migration = %e.record.id, "cannot journal: {err}");
                    }
                    if expanded {
                        if let Err(err) = this.journal.remove_expansion(&e.record.container) {
                            error!(migration = %e.record.id, "cannot journal: {err}");
                        }
                    }
                });
            }
        }
    }
}

impl Controller {
    /// The journaled expansions, by container, after handing over those no migration record
    /// owns: a stop between the expansion and the source agent's answer leaves a job expanded
    /// with nothing journaled about the move. Such a one becomes an unknown outcome (the agent
    /// may have started the move, or not): resolved from the two agents' lists, the expansion
    /// then kept or given back (`execute.rs`). Never undone blindly: the task may run there.
    fn recover_expansions(
        self: &Arc<Self>,
        unfinished: &[MigrationEntry],
    ) -> HashMap<String, JournaledExpansion> {
        let all = match self.journal.expansions() {
            Ok(all) => all,
            Err(e) => {
                error!("cannot read the journal's expansions: {e}");
                return HashMap::new();
            }
        };
        let migrations = self.journal.migrations().unwrap_or_default();
        let unresolved = self.journal.unresolved().unwrap_or_default();
        let mut kept = HashMap::new();
        for x in all {
            let followed = unfinished.iter().any(|e| e.record.container == x.container)
                || migrations.iter().any(|e| {
                    e.record.container == x.container
                        && e.decision == x.decision
                        && e.record.state == MigrationState::Succeeded
                        && !e.slurm_synced
                });
            if followed {
                kept.insert(x.container.clone(), x);
                continue;
            }
            // An unknown outcome carries the nodes to give back itself; an ended migration
            // of this decision whose end was journaled owes nothing.
            let ended = migrations.iter().any(|e| {
                e.record.container == x.container
                    && e.decision == x.decision
                    && e.record.state.is_terminal()
            });
            if unresolved.iter().any(|u| u.container == x.container) || ended {
                if let Err(e) = self.journal.remove_expansion(&x.container) {
                    error!(container = %x.container, "cannot journal: {e}");
                }
                continue;
            }
            warn!(container = %x.container, job = x.job_id, source = %x.source, destination = %x.destination, nodes_before = %x.nodes_before.join(","), "the job was expanded for a migration the controller never heard back about: resolving where the task runs");
            let u = Unresolved {
                migration: format!("decision-{}", x.decision),
                container: x.container.clone(),
                job_id: Some(x.job_id),
                source: x.source.clone(),
                destination: x.destination.clone(),
                nodes_before: Some(x.nodes_before.clone()),
                since: x.since,
                decision: x.decision,
            };
            match self.journal.put_unresolved(&u) {
                Ok(()) => {
                    if let Err(e) = self.journal.remove_expansion(&x.container) {
                        error!(container = %x.container, "cannot journal: {e}");
                    }
                }
                Err(e) => {
                    error!(container = %x.container, "cannot journal an unknown outcome: {e}")
                }
            }
        }
        kept
    }

    /// Journals the recent departures (`Migrations::departures`).
    pub(crate) fn journal_departures(&self) {
        let all = read(&self.state).in_flight.departures();
        match serde_json::to_string(&all) {
            Ok(text) => {
                if let Err(e) = self.journal.put_meta(DEPARTURES, &text) {
                    error!("cannot journal the jobs' departures: {e}");
                }
            }
            Err(e) => error!("cannot encode the jobs' departures: {e}"),
        }
    }

    /// A task moved into a node its job left a moment before the stop must still wait until
    /// slurmd there takes the job's credentials again (found by controller_faults.rs: the
    /// restore step was killed on a move right after a restart).
    fn load_departures(&self) {
        let Ok(Some(text)) = self.journal.meta(DEPARTURES) else {
            return;
        };
        match serde_json::from_str::<Vec<(u32, String, rebalancer_proto::Millis)>>(&text) {
            Ok(all) => {
                let mut st = write(&self.state);
                for (job, node, at) in all {
                    st.in_flight.departed(job, &node, at);
                }
            }
            Err(e) => warn!("ignoring the journal's departures: {e}"),
        }
    }

    fn journaled_decision(&self, seq: u64) -> Option<DecisionRecord> {
        if seq == 0 {
            return None;
        }
        self.journal
            .decisions(usize::MAX)
            .ok()?
            .into_iter()
            .find(|d| d.seq == seq)
    }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rebalancer_proto::control::MigrationEntry;
    use rebalancer_proto::MigrationState;

    use super::*;
    use crate::slurm_sync::{SlurmBackend, SlurmError, SlurmJob, SlurmNode};

    /// Slurm is not asked anything while the journal is read.
    struct NoSlurm;

    impl SlurmBackend for NoSlurm {
        fn name(&self) -> &'static str {
            "none"
        }
        fn poll_nodes(&self, _force: bool) -> Result<Option<Vec<SlurmNode>>, SlurmError> {
            Ok(None)
        }
        fn jobs(&self) -> Result<Vec<SlurmJob>, SlurmError> {
            Ok(Vec::new())
        }
        fn expand_job(&self, _job_id: u32, _node: &str) -> Result<(), SlurmError> {
            Err(SlurmError::Disabled)
        }
        fn set_job_nodes(&self, _job_id: u32, _nodes: &[String]) -> Result<(), SlurmError> {
            Err(SlurmError::Disabled)
        }
    }

    fn expansion(container: &str, decision: u64) -> JournaledExpansion {
        JournaledExpansion {
            container: container.into(),
            job_id: 5,
            nodes_before: vec!["node1".into()],
            source: "node1".into(),
            destination: "node2".into(),
            decision,
            since: 10,
        }
    }

    fn entry(id: &str, container: &str, decision: u64, state: MigrationState) -> MigrationEntry {
        let mut record = crate::journal::tests::record(id, state);
        record.container = container.into();
        MigrationEntry {
            record,
            decision,
            policy: "operator:0".into(),
            uid: None,
            slurm_synced: false,
            slurm_error: None,
            slurm_kept_source: None,
            slurm_holder: None,
        }
    }

    /// A controller killed with expansions journaled: each goes back to the migration that
    /// owns it, is dropped when its migration's end (or an unknown outcome) carries it, and one
    /// no migration record owns becomes an unknown outcome with the nodes to give back.
    #[tokio::test]
    async fn journaled_expansions_go_back_to_their_migrations_or_become_unknown_outcomes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::config::Config::from_str_at("", Path::new("/etc/rebalancerd.toml"))
            .expect("default config");
        let journal = crate::journal::Journal::open(&dir.path().join("j.redb")).expect("journal");
        let ctl = Controller::new(
            cfg,
            journal,
            Arc::new(NoSlurm),
            Box::new(crate::planner::BuiltinPlanner::new(None)),
        );
        let j = &ctl.journal;
        // Running when the controller stopped: followed, the expansion with it.
        j.put_expansion(&expansion("running", 1)).expect("put");
        j.put_migration(&entry("m1", "running", 1, MigrationState::Running))
            .expect("put");
        // Succeeded, the allocation update (and holder) still owed.
        j.put_expansion(&expansion("unsynced", 2)).expect("put");
        j.put_migration(&entry("m2", "unsynced", 2, MigrationState::Succeeded))
            .expect("put");
        // Rolled back and journaled: nothing owed.
        j.put_expansion(&expansion("ended", 3)).expect("put");
        j.put_migration(&entry("m3", "ended", 3, MigrationState::RolledBack))
            .expect("put");
        // An unknown outcome already carries the nodes.
        j.put_expansion(&expansion("unknown", 4)).expect("put");
        let mut u = Unresolved {
            migration: "m4".into(),
            container: "unknown".into(),
            job_id: Some(5),
            source: "node1".into(),
            destination: "node2".into(),
            nodes_before: Some(vec!["node1".into()]),
            since: 1,
            decision: 4,
        };
        j.put_unresolved(&u).expect("put");
        // Expanded, and the source agent never answered: no migration record.
        j.put_expansion(&expansion("orphan", 5)).expect("put");

        let unfinished = j.unfinished().expect("unfinished");
        let kept = ctl.recover_expansions(&unfinished);
        let mut names: Vec<&str> = kept.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["running", "unsynced"]);
        let mut left: Vec<String> = j
            .expansions()
            .expect("list")
            .into_iter()
            .map(|x| x.container)
            .collect();
        left.sort();
        assert_eq!(left, ["running", "unsynced"]);
        let mut all = j.unresolved().expect("unresolved");
        all.sort_by(|a, b| a.container.cmp(&b.container));
        u.migration = "m4".into();
        let orphan = Unresolved {
            migration: "decision-5".into(),
            container: "orphan".into(),
            job_id: Some(5),
            source: "node1".into(),
            destination: "node2".into(),
            nodes_before: Some(vec!["node1".into()]),
            since: 10,
            decision: 5,
        };
        assert_eq!(all, vec![orphan, u]);
    }

    /// A departure journaled before a stop still holds back a move into that node after it.
    #[tokio::test]
    async fn departures_outlive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j.redb");
        let ctl = |journal| {
            Controller::new(
                crate::config::Config::from_str_at("", Path::new("/etc/rebalancerd.toml"))
                    .expect("default config"),
                journal,
                Arc::new(NoSlurm),
                Box::new(crate::planner::BuiltinPlanner::new(None)),
            )
        };
        let now = rebalancer_proto::now_millis();
        {
            let first = ctl(crate::journal::Journal::open(&path).expect("journal"));
            write(&first.state).in_flight.departed(9, "node2", now);
            first.journal_departures();
        }
        let second = ctl(crate::journal::Journal::open(&path).expect("journal"));
        assert_eq!(
            read(&second.state)
                .in_flight
                .settle_after_departure(9, "node2", now),
            0,
            "nothing loaded yet"
        );
        second.load_departures();
        assert_eq!(
            read(&second.state)
                .in_flight
                .settle_after_departure(9, "node2", now),
            crate::inflight::DEPARTURE_SETTLE_MS
        );
    }

    /// An allocation given back after a failed or unknown migration takes the destination from
    /// the job: slurmd there revokes the job's credentials, so a move into it waits, even when
    /// Slurm refused the update (it may have reached slurmd).
    #[tokio::test]
    async fn a_given_back_destination_holds_back_a_move_into_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctl = Controller::new(
            crate::config::Config::from_str_at("", Path::new("/etc/rebalancerd.toml"))
                .expect("default config"),
            crate::journal::Journal::open(&dir.path().join("j.redb")).expect("journal"),
            Arc::new(NoSlurm),
            Box::new(crate::planner::BuiltinPlanner::new(None)),
        );
        let nodes = vec!["node1".to_string()];
        assert!(ctl.restore_job_nodes(7, &nodes, "node2").await.is_err());
        let now = rebalancer_proto::now_millis();
        let wait = read(&ctl.state)
            .in_flight
            .settle_after_departure(7, "node2", now);
        assert!(wait > 0, "no wait after the job left node2");
        // Journaled like the departures of a completed move.
        let journaled = ctl.journal.meta(DEPARTURES).expect("meta");
        assert!(journaled.is_some_and(|t| t.contains("node2")));
        // A node the job keeps did not leave it.
        let _ = ctl.restore_job_nodes(7, &nodes, "node1").await;
        assert_eq!(
            read(&ctl.state)
                .in_flight
                .settle_after_departure(7, "node1", now),
            0
        );
    }
}
