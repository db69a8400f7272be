//! Execution: a reserved migration sent to the source agent, followed to its end (by its
//! progress stream, or by polling after a lost stream or a restart), journaled, and its slot
//! freed.

use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::control::{DecisionOutcome, DecisionRecord, MigrationEntry};
use rebalancer_proto::{
    now_millis, ContainerState, ErrorCode, ErrorReply, Event, MigrateRequest, MigrationRecord,
    MigrationState,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::agents::AgentError;
use crate::daemon::{err, read, write, Controller, Progress};
use crate::inflight::{Outcome, Resolution};
use crate::journal::Unresolved;

/// Pauses between two looks at an unknown outcome: doubling from the first to the last.
pub const RESOLVE_FIRST_PAUSE: Duration = Duration::from_secs(5);
pub const RESOLVE_MAX_PAUSE: Duration = Duration::from_secs(120);

impl Controller {
    /// Sends the migration to the source agent and follows it in a task. The slot must have
    /// been reserved with [`Self::try_reserve`].
    pub fn launch(
        self: &Arc<Self>,
        mut decision: DecisionRecord,
        max_downtime_ms: Option<u64>,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) {
        write(&self.state).in_flight.set_decision(&decision);
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
            // Before anything is frozen: a move straight back to a node the job just left
            // waits until slurmd there accepts the job's credentials again.
            if let Some(job) = decision.task.as_ref().map(|t| t.job_id) {
                let wait = read(&this.state).in_flight.settle_after_departure(
                    job,
                    &decision.destination,
                    now_millis(),
                );
                if wait > 0 {
                    info!(container = %container, job, destination = %decision.destination, wait_ms = wait, "the job left the destination a moment ago: waiting until slurmd there takes its credentials again");
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
            // A Slurm task is restored by a step on the destination, which Slurm allows only
            // on a node of the job: the job must hold the destination before the migration.
            if let Err(e) = this.expand_before(&decision).await {
                this.fail_start(&mut decision, e, progress);
                return;
            }
            let pause = this.cfg.migration.test_pause_before_start;
            if !pause.is_zero() {
                warn!(container = %container, ms = pause.as_millis() as u64, "test pause before the migration is sent (migration.test_pause_before_start_ms is set)");
                tokio::time::sleep(pause).await;
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
                    this.undo_expansion(&container, &decision.destination).await;
                    this.fail_start(&mut decision, e, progress)
                }
                (Err(e), None) => {
                    this.undo_expansion(&container, &decision.destination).await;
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
            slurm_holder: None,
        };
        if let Err(e) = self.journal.put_migration(&entry) {
            error!(migration = %entry.record.id, "cannot journal a migration: {e}");
        }
        info!(
            migration = %entry.record.id, container = %decision.container, policy = %decision.policy,
            job = decision.task.as_ref().map(|t| t.job_id), step = decision.task.as_ref().map(|t| t.step_id),
            source = %decision.source, destination = %decision.destination, "migration started"
        );
        {
            let mut st = write(&self.state);
            st.in_flight.set_decision(decision);
            st.in_flight.set_entry(&decision.container, &entry);
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
        write(&self.state)
            .in_flight
            .set_entry(&migration.container, e);
    }

    pub(crate) fn fail_start(
        &self,
        decision: &mut DecisionRecord,
        e: ErrorReply,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) {
        warn!(container = %decision.container, source = %decision.source, destination = %decision.destination, policy = %decision.policy, "migration not started: {e}");
        decision.outcome = DecisionOutcome::Failed;
        decision.detail = Some(e.to_string());
        if let Err(je) = self.journal.update_decision(decision) {
            error!(container = %decision.container, "cannot journal a decision: {je}");
        }
        self.metrics.record_decision(&decision.policy, "failed");
        // Frees the slot and holds the container back from automatic moves for a while; an
        // operator's failed request does not hold back the policies.
        let left = if decision.policy.starts_with("operator:") {
            write(&self.state).in_flight.remove(&decision.container)
        } else {
            write(&self.state)
                .in_flight
                .start_failed(&decision.container, now_millis())
        };
        self.metrics.in_flight.set(left as i64);
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
        let outcome = Outcome::of(rec);
        // Whether the job was expanded onto the destination for this move (then Slurm does not
        // count the task's CPUs there: `holder.rs`).
        let expanded = outcome == Outcome::Succeeded
            && write(&self.state)
                .in_flight
                .take_expansion(&rec.container)
                .is_some();
        if outcome == Outcome::Succeeded {
            {
                // Until the next poll the cached lists still show the container on its source,
                // and an evaluation would plan the same move again.
                let mut st = write(&self.state);
                // The job keeps the destination it was expanded onto.
                st.in_flight.succeeded(&rec.container, now_millis());
                let moved = st.agents.get_mut(&rec.source).and_then(|a| {
                    let i = a.containers.iter().position(|c| c.id == rec.container)?;
                    Some(a.containers.remove(i))
                });
                if let Some(mut c) = moved {
                    c.node = rec.destination.clone();
                    c.state = ContainerState::Running;
                    // The source's pid means nothing there; the next poll brings the real one.
                    c.pid = None;
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
            self.sync_slurm(&mut entry, expanded).await;
        } else if outcome == Outcome::RolledBack {
            self.undo_expansion(&entry.record.container, &entry.record.destination)
                .await;
        }
        if let Err(e) = self.journal.put_migration(&entry) {
            error!(migration = %entry.record.id, "cannot journal the end of a migration: {e}");
        }
        if outcome == Outcome::Unknown {
            // The allocation stays on both nodes and the slot stays held until it is known
            // where the task runs: undoing the expansion could kill the only copy.
            let x = write(&self.state)
                .in_flight
                .outcome_unknown(&entry.record.container);
            let u = Unresolved {
                migration: entry.record.id.clone(),
                container: entry.record.container.clone(),
                job_id: entry
                    .record
                    .task
                    .as_ref()
                    .or(decision.task.as_ref())
                    .map(|t| t.job_id)
                    .or(x.as_ref().map(|x| x.job_id)),
                source: entry.record.source.clone(),
                destination: entry.record.destination.clone(),
                nodes_before: x.map(|x| x.nodes_before),
                since: now_millis(),
                decision: decision.seq,
            };
            warn!(migration = %u.migration, container = %u.container, job = u.job_id, source = %u.source, destination = %u.destination, state = %entry.record.state, "migration outcome unknown: the job keeps both nodes until it is known where the task runs");
            if let Err(e) = self.journal.put_unresolved(&u) {
                error!(migration = %u.migration, "cannot journal an unknown outcome: {e}");
            }
            let this = self.clone();
            tokio::spawn(async move { this.resolve_later(u).await });
        } else {
            let left = write(&self.state).in_flight.remove(&entry.record.container);
            self.metrics.in_flight.set(left as i64);
        }
        // The end (with its allocation update, or the unknown outcome carrying the nodes to give
        // back) is journaled: the expansion's own record is no longer needed.
        if let Err(e) = self.journal.remove_expansion(&entry.record.container) {
            error!(migration = %entry.record.id, "cannot journal: {e}");
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
}

impl Controller {
    /// Looks at an unknown outcome until it is known where the task runs, then makes Slurm's
    /// allocation match: moved → as after a success (the source leaves the job when nothing
    /// else of it is there); stayed or gone → the expansion is undone. Frees the slot then.
    pub async fn resolve_later(self: &Arc<Self>, u: Unresolved) {
        self.metrics.unresolved.inc();
        let mut pause = RESOLVE_FIRST_PAUSE;
        loop {
            let r = self.look(&u).await;
            if r != Resolution::Pending {
                self.resolved(&u, r).await;
                self.metrics.unresolved.dec();
                return;
            }
            debug!(migration = %u.migration, container = %u.container, "outcome still unknown");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RESOLVE_MAX_PAUSE);
        }
    }

    /// One look: the source agent's record if it has resolved it, else both agents' lists.
    async fn look(&self, u: &Unresolved) -> Resolution {
        if let Some(a) = self.agent(&u.source) {
            if let Ok(rec) = a.migration(&u.migration).await {
                match Outcome::of(&rec) {
                    Outcome::Succeeded => return Resolution::Moved,
                    Outcome::RolledBack => return Resolution::Stayed,
                    Outcome::Unknown => {}
                }
            }
        }
        let state_on = |node: &str| {
            let a = self.agent(node);
            let id = u.container.clone();
            async move {
                let list = a?.containers().await.ok()?;
                Some(list.into_iter().find(|c| c.id == id).map(|c| c.state))
            }
        };
        // An agent that does not answer tells nothing: never act on half the picture.
        match (state_on(&u.source).await, state_on(&u.destination).await) {
            (Some(s), Some(d)) => Resolution::of(s, d),
            _ => Resolution::Pending,
        }
    }

    async fn resolved(self: &Arc<Self>, u: &Unresolved, r: Resolution) {
        info!(migration = %u.migration, container = %u.container, job = u.job_id, resolution = ?r, "unknown migration outcome resolved");
        match r {
            Resolution::Moved => {
                if let Ok(Some(mut e)) = self.journal.migration(&u.migration) {
                    self.sync_slurm(&mut e, u.nodes_before.is_some()).await;
                    if let Err(err) = self.journal.put_migration(&e) {
                        error!(migration = %u.migration, "cannot journal: {err}");
                    }
                } else {
                    // Recovered from an expansion alone (`recovery.rs`): no record to sync from.
                    warn!(migration = %u.migration, container = %u.container, job = u.job_id, source = %u.source, "the task moved, but its migration record never reached the journal: the job keeps its source node until the next move or its end");
                }
            }
            Resolution::Stayed | Resolution::Gone => {
                if let (Some(job), Some(nodes)) = (u.job_id, u.nodes_before.clone()) {
                    if self.cfg.slurm.enabled && self.cfg.slurm.sync_allocation {
                        match self.restore_job_nodes(job, &nodes, &u.destination).await {
                            Ok(()) => {
                                info!(job, nodes = %nodes.join(","), "job's allocation restored after the resolution")
                            }
                            Err(e) => warn!(job, "cannot restore the job's allocation: {e}"),
                        }
                    }
                }
            }
            Resolution::Pending => return,
        }
        self.metrics.record_resolution(match r {
            Resolution::Moved => "succeeded",
            Resolution::Stayed => "rolled-back",
            // The task runs nowhere: lost, as a failure after the point of no return is.
            Resolution::Gone | Resolution::Pending => "failed",
        });
        if let Err(e) = self.journal.remove_unresolved(&u.migration) {
            error!(migration = %u.migration, "cannot journal the resolution: {e}");
        }
        let left = write(&self.state).in_flight.remove(&u.container);
        self.metrics.in_flight.set(left as i64);
        self.eval.notify_one();
    }
}

fn mark_lost(entry: &mut MigrationEntry, why: &str) {
    warn!(migration = %entry.record.id, container = %entry.record.container, "migration lost: {why}");
    entry.record.state = MigrationState::Failed;
    entry.record.error = Some(format!("controller lost track: {why}"));
    entry.record.ended_at = Some(now_millis());
}
