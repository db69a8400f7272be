//! Slurm sync: reading Slurm's nodes and jobs into the controller's state, and keeping a
//! migrated job's allocation true (expanded onto the destination before the migration, shrunk
//! from the source after it, given back when the migration fails).

use std::collections::BTreeMap;
use std::sync::Arc;

use rebalancer_proto::control::{DecisionRecord, MigrationEntry};
use rebalancer_proto::{ContainerInfo, ContainerState, ErrorCode, ErrorReply, MigrationState};
use tracing::{error, info, warn};

use crate::daemon::{err, read, write, Controller};
use crate::inflight::Expansion;
use crate::journal::JournaledExpansion;
use crate::slurm_sync::{allocation_change, SlurmNode};

impl Controller {
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
        let (fresh, triggered) = merge_nodes(&st.nodes, nodes);
        st.nodes = fresh;
        triggered
    }

    /// Adds the destination to the job of a Slurm task before its migration and remembers the
    /// job's nodes so that [`Self::undo_expansion`] can restore them.
    pub(crate) async fn expand_before(
        self: &Arc<Self>,
        decision: &DecisionRecord,
    ) -> Result<(), ErrorReply> {
        if !self.cfg.slurm.enabled || !self.cfg.slurm.sync_allocation {
            return Ok(());
        }
        let Some(job_id) = decision.task.as_ref().map(|t| t.job_id) else {
            return Ok(());
        };
        let destination = decision.destination.clone();
        let slurm = self.slurm.clone();
        let dest = destination.clone();
        let s1 = slurm.clone();
        let job = match tokio::task::spawn_blocking(move || s1.job(job_id)).await {
            Ok(Ok(Some(job))) if !job.nodes.contains(&dest) => job,
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => {
                return Err(err(
                    ErrorCode::NoRoom,
                    format!("cannot add {destination} to job {job_id} before the migration: {e}"),
                ))
            }
            Err(e) => {
                return Err(err(
                    ErrorCode::Internal,
                    format!("expansion task failed: {e}"),
                ))
            }
        };
        // Intent first: a controller killed after the expansion must find it to undo it.
        let intent = JournaledExpansion {
            container: decision.container.clone(),
            job_id,
            nodes_before: job.nodes.clone(),
            source: decision.source.clone(),
            destination: destination.clone(),
            decision: decision.seq,
            since: rebalancer_proto::now_millis(),
        };
        if let Err(e) = self.journal.put_expansion(&intent) {
            error!(container = %intent.container, job = job_id, "cannot journal an expansion: {e}");
        }
        let res = tokio::task::spawn_blocking(move || {
            slurm.expand_job(job_id, &dest)?;
            Ok::<_, crate::slurm_sync::SlurmError>(Some(job.nodes))
        })
        .await;
        if !matches!(res, Ok(Ok(_))) {
            if let Err(e) = self.journal.remove_expansion(&decision.container) {
                error!(container = %decision.container, "cannot journal: {e}");
            }
        }
        match res {
            Ok(Ok(Some(before))) => {
                info!(container = %decision.container, job = job_id, destination = %destination, "job expanded onto the destination before the migration");
                let x = Expansion {
                    job_id,
                    nodes_before: before,
                };
                if !write(&self.state)
                    .in_flight
                    .expanded(&decision.container, x)
                {
                    warn!(container = %decision.container, job = job_id, "job expanded for a migration that holds no slot; a failure will not undo it");
                }
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
    pub(crate) async fn undo_expansion(self: &Arc<Self>, container: &str, destination: &str) {
        let Some(Expansion {
            job_id,
            nodes_before: before,
        }) = write(&self.state).in_flight.take_expansion(container)
        else {
            return;
        };
        let res = self.restore_job_nodes(job_id, &before, destination).await;
        // Tried once: a failure is logged, and a restart would not do better.
        if let Err(e) = self.journal.remove_expansion(container) {
            error!(container, "cannot journal an undone expansion: {e}");
        }
        match res {
            Ok(()) => {
                info!(container, job = job_id, nodes = %before.join(","), "migration failed: job's allocation restored")
            }
            Err(e) => warn!(
                container,
                job = job_id,
                "cannot restore the job's allocation after a failed migration: {e}"
            ),
        }
    }

    /// Sets job `job_id`'s nodes back to `nodes`, taking `dropped` from it. slurmd on `dropped`
    /// revokes the job's credentials when it leaves, so the departure is recorded: a migration
    /// there a moment later waits (`Migrations::settle_after_departure`) instead of failing
    /// with "Job credential revoked".
    pub(crate) async fn restore_job_nodes(
        self: &Arc<Self>,
        job_id: u32,
        nodes: &[String],
        dropped: &str,
    ) -> Result<(), String> {
        let slurm = self.slurm.clone();
        let n = nodes.to_vec();
        let res = tokio::task::spawn_blocking(move || slurm.set_job_nodes(job_id, &n)).await;
        // Recorded whatever the answer: a refused update may still have reached slurmd, and a
        // needless wait costs two seconds at most.
        if !nodes.iter().any(|n| n == dropped) {
            write(&self.state)
                .in_flight
                .departed(job_id, dropped, rebalancer_proto::now_millis());
            self.journal_departures();
        }
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("allocation task failed: {e}")),
        }
    }

    /// Expands the job to the destination and shrinks it from the source when nothing of the
    /// job is left there. `expanded`: the job was expanded onto the destination before the
    /// migration; then, or when this sync expands it, a holder is asked for (`holder.rs`): the
    /// merge does not count the task's CPUs there. A move into a node the job already held uses
    /// the job's own allocation there.
    pub(crate) async fn sync_slurm(self: &Arc<Self>, entry: &mut MigrationEntry, expanded: bool) {
        self.sync_allocation(entry, false, expanded).await
    }

    /// [`Self::sync_slurm`] for a migration that just ended (`retry` false), or again later for
    /// one whose source was kept (`retry` true: see [`Self::retry_kept_sources`]).
    async fn sync_allocation(
        self: &Arc<Self>,
        entry: &mut MigrationEntry,
        retry: bool,
        expanded: bool,
    ) {
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
        // Count what the job still has on the source, from a fresh list, and what of it is on
        // its way there: releasing the source under a move back would make slurmd there revoke
        // the job's credentials after the restore step got its own, and the restore step's
        // launch fails with "Job credential revoked".
        let incoming = incoming_moves(
            read(&self.state).in_flight.values().map(|f| &f.decision),
            job_id,
            &source,
        );
        let remaining = match self.agent(&source) {
            Some(a) => match a.containers().await {
                Ok(list) => remaining_on_source(&list, job_id, &moved, retry) + incoming,
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
            // The second value: whether the job runs (a holder makes sense), and whether this
            // sync expanded it.
            let Some(job) = slurm.job(job_id)? else {
                return Ok::<_, crate::slurm_sync::SlurmError>((
                    Some(format!("job {job_id} is not in Slurm")),
                    None,
                    Vec::new(),
                ));
            };
            if job.state != "RUNNING" {
                return Ok((
                    Some(format!("job {job_id} is {}", job.state)),
                    None,
                    Vec::new(),
                ));
            }
            let change = allocation_change(
                &job,
                &source,
                &destination,
                remaining,
                step_elsewhere.as_deref(),
            );
            // A later look at a kept source only releases it: the job may have left the old
            // destination since, and must not be put back there.
            let expands = change.expand_to.is_some() && !retry;
            if let Some(d) = change.expand_to.as_ref().filter(|_| !retry) {
                slurm.expand_job(job_id, d)?;
            }
            let mut left = Vec::new();
            if let Some(nodes) = &change.shrink_to {
                slurm.set_job_nodes(job_id, nodes)?;
                left = job
                    .nodes
                    .iter()
                    .filter(|n| !nodes.contains(n))
                    .cloned()
                    .collect();
            }
            Ok((change.keep_reason, Some(expands), left))
        })
        .await;
        match res {
            Ok(Ok((keep, expands, left))) => {
                let now = rebalancer_proto::now_millis();
                for node in &left {
                    write(&self.state).in_flight.departed(job_id, node, now);
                }
                if !left.is_empty() {
                    self.journal_departures();
                }
                entry.slurm_synced = true;
                entry.slurm_kept_source.clone_from(&keep);
                info!(migration = %entry.record.id, job = job_id, kept_source = keep.as_deref().unwrap_or("no"), "Slurm allocation updated");
                if let Some(expands) = expands.filter(|_| !retry) {
                    if expanded || expands {
                        let pause = self.cfg.migration.test_pause_before_holder;
                        if !pause.is_zero() {
                            warn!(migration = %entry.record.id, ms = pause.as_millis() as u64, "test pause before the holder (migration.test_pause_before_holder_ms is set)");
                            tokio::time::sleep(pause).await;
                        }
                        self.hold_after_move(entry).await;
                    }
                }
            }
            Ok(Err(e)) => {
                warn!(migration = %entry.record.id, job = job_id, "cannot update Slurm's allocation: {e}");
                entry.slurm_error = Some(e.to_string());
            }
            Err(e) => entry.slurm_error = Some(format!("sync task failed: {e}")),
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
            self.sync_allocation(&mut e, true, false).await;
            if e.slurm_kept_source != before {
                info!(migration = %e.record.id, source = %e.record.source, now = e.slurm_kept_source.as_deref().unwrap_or("released"), "kept source node re-examined");
                if let Err(err) = self.journal.put_migration(&e) {
                    error!(migration = %e.record.id, "cannot journal: {err}");
                }
            }
        }
    }
}

/// Live containers of job `job_id` in `list` (the source's containers), not counting the moved
/// one right after its move (the source's copy of it is on its way out); at a `retry` it counts
/// too when it runs there again (moved back). Pure.
fn remaining_on_source(list: &[ContainerInfo], job_id: u32, moved: &str, retry: bool) -> usize {
    list.iter()
        .filter(|c| {
            (c.id != moved || (retry && c.state == ContainerState::Running))
                && c.task.as_ref().is_some_and(|t| t.job_id == job_id)
                && c.state.is_live()
        })
        .count()
}

/// Migrations in flight that move a container of job `job_id` to `node`. Pure.
fn incoming_moves<'a>(
    in_flight: impl Iterator<Item = &'a DecisionRecord>,
    job_id: u32,
    node: &str,
) -> usize {
    in_flight
        .filter(|d| d.destination == node && d.task.as_ref().is_some_and(|t| t.job_id == job_id))
        .count()
}

/// Slurm's fresh node list replacing the known one; true when a node entered an evacuation
/// state or changed to another one (DRAIN → DOWN), which triggers an evaluation at once.
fn merge_nodes(
    known: &BTreeMap<String, SlurmNode>,
    nodes: Vec<SlurmNode>,
) -> (BTreeMap<String, SlurmNode>, bool) {
    let mut triggered = false;
    for n in &nodes {
        let old = known.get(&n.name).map(|o| o.flags).unwrap_or_default();
        if n.flags != old {
            info!(node = %n.name, state = %n.state, "node state changed");
            if n.flags.evacuate_reason().is_some()
                && old.evacuate_reason() != n.flags.evacuate_reason()
            {
                triggered = true;
            }
        }
    }
    let fresh = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
    (fresh, triggered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slurm_sync::NodeFlags;

    fn node(name: &str, state: &str) -> SlurmNode {
        SlurmNode {
            name: name.into(),
            state: state.into(),
            flags: NodeFlags::from_state(state),
            ..Default::default()
        }
    }

    fn known(nodes: &[SlurmNode]) -> BTreeMap<String, SlurmNode> {
        nodes.iter().map(|n| (n.name.clone(), n.clone())).collect()
    }

    fn info(id: &str, job: u32, state: ContainerState) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            task: Some(rebalancer_proto::TaskRef {
                job_id: job,
                step_id: 0,
                task_id: 0,
            }),
            uid: 0,
            gid: 0,
            node: "n1".into(),
            address: String::new(),
            pid: None,
            state,
            rss_bytes: 0,
            cpus: None,
            class: None,
            exit_status: None,
            started_at: 0,
            runs_in: None,
        }
    }

    fn decision(container: &str, job: u32, source: &str, destination: &str) -> DecisionRecord {
        DecisionRecord {
            seq: 1,
            at: 0,
            policy: "operator:0".into(),
            container: container.into(),
            task: Some(rebalancer_proto::TaskRef {
                job_id: job,
                step_id: 0,
                task_id: 0,
            }),
            uid: None,
            source: source.into(),
            destination: destination.into(),
            mode: rebalancer_proto::MigrationMode::StopAndCopy,
            why: String::new(),
            outcome: rebalancer_proto::control::DecisionOutcome::Started,
            detail: None,
            migration: None,
        }
    }

    /// Right after a move the source's copy of the moved container does not hold the source;
    /// when a kept source is looked at again, the moved container running there again (moved
    /// back) does; other jobs' and ended containers never do.
    #[test]
    fn a_container_moved_back_keeps_its_source_in_the_job() {
        let list = vec![
            info("j4.s0.t0", 4, ContainerState::Running),
            info("j4.s0.t1", 4, ContainerState::Exited),
            info("j5.s0.t0", 5, ContainerState::Running),
        ];
        assert_eq!(remaining_on_source(&list, 4, "j4.s0.t0", false), 0);
        assert_eq!(remaining_on_source(&list, 4, "j4.s0.t0", true), 1);
        let away = vec![info("j4.s0.t0", 4, ContainerState::MigratedAway)];
        assert_eq!(remaining_on_source(&away, 4, "j4.s0.t0", true), 0);
        assert_eq!(remaining_on_source(&list, 5, "j4.s0.t0", false), 1);
    }

    /// A move of the job back to the source in flight counts as the job's: releasing the source
    /// then would revoke the restore step's credential there.
    #[test]
    fn a_move_back_in_flight_counts_on_its_destination() {
        let d = [
            decision("j4.s0.t0", 4, "n2", "n1"),
            decision("j5.s0.t0", 5, "n2", "n1"),
            decision("j4.s0.t1", 4, "n1", "n3"),
        ];
        assert_eq!(incoming_moves(d.iter(), 4, "n1"), 1);
        assert_eq!(incoming_moves(d.iter(), 4, "n2"), 0);
        assert_eq!(incoming_moves(d.iter(), 6, "n1"), 0);
    }

    #[test]
    fn entering_or_changing_an_evacuation_state_triggers() {
        let before = known(&[node("n1", "MIXED"), node("n2", "IDLE")]);
        let (fresh, t) = merge_nodes(&before, vec![node("n1", "MIXED+DRAIN"), node("n2", "IDLE")]);
        assert!(t);
        assert!(fresh["n1"].flags.draining);
        let (_, t) = merge_nodes(&fresh, vec![node("n1", "DOWN+DRAIN"), node("n2", "IDLE")]);
        assert!(t, "DRAINING to DOWN is a new reason");
    }

    #[test]
    fn other_changes_do_not_trigger_and_gone_nodes_are_dropped() {
        let before = known(&[node("n1", "MIXED+DRAIN"), node("n2", "IDLE")]);
        // n1 keeps its reason (DRAINING), n2 is gone, n3 is new and idle.
        let (fresh, t) = merge_nodes(
            &before,
            vec![node("n1", "ALLOCATED+DRAIN"), node("n3", "IDLE")],
        );
        assert!(!t);
        assert_eq!(fresh.keys().collect::<Vec<_>>(), ["n1", "n3"]);
        // Leaving a drain is not a reason to evacuate.
        let (_, t) = merge_nodes(&fresh, vec![node("n1", "IDLE"), node("n3", "IDLE")]);
        assert!(!t);
        // A node first seen drained triggers.
        let (_, t) = merge_nodes(&BTreeMap::new(), vec![node("n4", "IDLE+DRAIN")]);
        assert!(t);
    }
}
