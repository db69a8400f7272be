//! Holder allocations: after a move, an allocation of the controller's own on the destination
//! that holds exactly the moved task's CPUs, so that slurmctld counts them there.
//!
//! Slurm (22.05 to 26.05) merges an expansion's cores into the job at the wrong offset
//! (`job_resources_bits_copy`, docs/slurm-releases.md): after expand-then-shrink the destination
//! shows `CPUAlloc=0` while the task runs there, and Slurm grants its cores to another job. A
//! holder (`rebal-hold:<job>:<container>`, no process, the job's partition, at most the job's
//! remaining time, 1 MB of memory) fills exactly that gap. Its life:
//!
//! - asked for right after the allocation update of a successful move, journaled (intent first)
//!   before it is relied on; a refusal (a competitor raced in) is logged, counted
//!   (`rebalancer_slurm_holders_refused_total`), shown in `rebalctl show job`, asked for again at each
//!   reconcile, and never fails the migration;
//! - released when the task ends or moves again (the next destination gets its own) or the
//!   job ends; its time limit ends it with the job at the latest;
//! - reconciled at every full Slurm reconcile, the first one after a (re)start included: holders
//!   Slurm runs but the journal does not know are cancelled, live ones kept.
//!
//! This module holds the record and the rules (pure); `holder_watch.rs` drives them.

use std::collections::BTreeMap;

use rebalancer_proto::{ContainerInfo, Millis};
use serde::{Deserialize, Serialize};

use crate::slurm_sync::{parse_holder_name, SlurmJob};

/// One moved task's holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The moved container (the journal's key: one holder per task).
    pub container: String,
    pub job_id: u32,
    /// Where the holder is (the move's destination).
    pub node: String,
    /// CPUs it holds (asks for). 0: none is needed, Slurm counts the task's CPUs there itself
    /// (kept, so the planner does not add them again, until the task leaves).
    pub cpus: u32,
    /// The move it was asked for after.
    pub migration: String,
    /// The holder's Slurm job id; None while it is being asked for, or when Slurm refused it.
    pub holder_job: Option<u32>,
    pub since: Millis,
    /// Why Slurm did not grant it (asked for again at each reconcile).
    #[serde(default)]
    pub refused: Option<String>,
}

impl Holder {
    /// One line for `rebalctl show job` / `show migration` (`SlurmHolder=`).
    pub fn status(&self) -> String {
        if self.cpus == 0 {
            return format!(
                "none needed: Slurm counts {}'s CPUs on {}",
                self.container, self.node
            );
        }
        match (&self.holder_job, &self.refused) {
            (Some(id), _) => format!(
                "job {id} holds {} CPU(s) on {} for {}",
                self.cpus, self.node, self.container
            ),
            (None, Some(why)) => {
                format!("not granted on {} ({} CPU(s)): {why}", self.node, self.cpus)
            }
            (None, None) => format!("being asked for on {}", self.node),
        }
    }
}

/// CPUs of one container as the planner counts them: its CPU count rounded up, at least 1.
pub(crate) fn container_cpus(c: &ContainerInfo) -> u32 {
    c.cpus.map(|c| c.ceil().max(1.0) as u32).unwrap_or(1)
}

/// CPUs a holder must hold on `node` for the moved task: what the job's live containers there
/// need, less what Slurm already counts for the job there (`credited`) and what the job's other
/// holders there hold; at most the moved task's own CPUs. 0: Slurm counts them already (an
/// expansion onto the job's lowest-numbered node, whose cores the merge copies at the right
/// offset, or a move into a node the job holds with room). Pure.
pub fn holder_cpus(task_cpus: u32, needed_on_node: u32, credited: u32, held_by_others: u32) -> u32 {
    needed_on_node
        .saturating_sub(credited)
        .saturating_sub(held_by_others)
        .min(task_cpus)
}

/// What a reconcile does with one journaled holder. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderAction {
    Keep,
    /// Cancel it in Slurm (if granted) and forget it, with the reason.
    Release(String),
    /// Slurm no longer runs it (time limit, scancel): forget it.
    Forget(String),
    /// Ask Slurm for it again (refused, or a restart interrupted the request).
    Ask,
}

/// The reconcile rule. `job_running`: the holder's job runs; `task_here`: whether the moved
/// task runs live on the holder's node (None: that node's agent did not answer, so nothing is
/// judged on it); `holder_running`: the holder's Slurm job runs. Pure.
pub fn holder_action(
    h: &Holder,
    job_running: bool,
    task_here: Option<bool>,
    holder_running: bool,
) -> HolderAction {
    if !job_running {
        return HolderAction::Release(format!("job {} ended", h.job_id));
    }
    match task_here {
        Some(false) => {
            return HolderAction::Release(format!(
                "{} no longer runs on {} (ended or moved)",
                h.container, h.node
            ))
        }
        None => return HolderAction::Keep,
        Some(true) => {}
    }
    match h.holder_job {
        None if h.cpus == 0 => HolderAction::Keep,
        Some(_) if holder_running => HolderAction::Keep,
        Some(id) => HolderAction::Forget(format!("holder job {id} no longer runs in Slurm")),
        None => HolderAction::Ask,
    }
}

/// Slurm jobs that look like holders (by name) of the controller's user but are none of the
/// journaled ones: left by a request whose answer a crash lost, or by another controller's
/// journal. Pure.
pub fn orphan_holders<'a>(
    jobs: &'a [SlurmJob],
    uid: u32,
    journaled: &[Holder],
) -> Vec<&'a SlurmJob> {
    jobs.iter()
        .filter(|j| j.uid == uid && parse_holder_name(&j.name).is_some())
        .filter(|j| !journaled.iter().any(|h| h.holder_job == Some(j.job_id)))
        .collect()
}

/// Whether Slurm counts `container`'s CPUs on `node`, through a granted holder or by itself
/// (then Slurm's `CPUAlloc` there is taken as it is: `planner::allocated_cpus` must not add
/// them again). Pure.
pub fn held_on(holders: &BTreeMap<String, Holder>, container: &str, node: &str) -> bool {
    holders
        .get(container)
        .is_some_and(|h| h.node == node && (h.holder_job.is_some() || h.cpus == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(job: Option<u32>, refused: Option<&str>) -> Holder {
        Holder {
            container: "j4.s0.t0".into(),
            job_id: 4,
            node: "node2".into(),
            cpus: 1,
            migration: "m1".into(),
            holder_job: job,
            since: 0,
            refused: refused.map(str::to_string),
        }
    }

    #[test]
    fn a_holder_fills_exactly_what_slurm_misses() {
        // The merge left the destination without a core: the whole task is held.
        assert_eq!(holder_cpus(1, 1, 0, 0), 1);
        assert_eq!(holder_cpus(2, 2, 0, 0), 2);
        // The merge copied the cores at the right offset (lowest-numbered node): none.
        assert_eq!(holder_cpus(1, 1, 1, 0), 0);
        // A second task moved next to a first one that already has its holder.
        assert_eq!(holder_cpus(1, 2, 0, 1), 1);
        // The job's own task there is counted by Slurm; only the moved one is missing.
        assert_eq!(holder_cpus(1, 2, 1, 0), 1);
        // Never more than the moved task's CPUs, whatever else is short on the node.
        assert_eq!(holder_cpus(1, 4, 0, 0), 1);
    }

    #[test]
    fn the_reconcile_releases_what_is_gone_and_keeps_what_runs() {
        let granted = holder(Some(9), None);
        assert_eq!(
            holder_action(&granted, true, Some(true), true),
            HolderAction::Keep
        );
        assert!(matches!(
            holder_action(&granted, false, Some(true), true),
            HolderAction::Release(w) if w.contains("job 4 ended")
        ));
        assert!(matches!(
            holder_action(&granted, true, Some(false), true),
            HolderAction::Release(w) if w.contains("no longer runs on node2")
        ));
        // The node's agent did not answer: nothing is judged on it.
        assert_eq!(
            holder_action(&granted, true, None, true),
            HolderAction::Keep
        );
        assert!(matches!(
            holder_action(&granted, true, Some(true), false),
            HolderAction::Forget(_)
        ));
        assert_eq!(
            holder_action(&holder(None, Some("busy")), true, Some(true), false),
            HolderAction::Ask
        );
        assert_eq!(
            holder_action(&holder(None, None), true, Some(true), false),
            HolderAction::Ask
        );
        // None needed (Slurm counts the task itself): kept until the task or the job goes.
        let none = Holder {
            cpus: 0,
            ..holder(None, None)
        };
        assert_eq!(
            holder_action(&none, true, Some(true), false),
            HolderAction::Keep
        );
        assert!(matches!(
            holder_action(&none, true, Some(false), false),
            HolderAction::Release(_)
        ));
    }

    #[test]
    fn the_planner_adds_only_what_slurm_does_not_count() {
        let mut all = BTreeMap::new();
        all.insert("j4.s0.t0".to_string(), holder(Some(9), None));
        all.insert(
            "j4.s0.t1".to_string(),
            Holder {
                container: "j4.s0.t1".into(),
                cpus: 0,
                ..holder(None, None)
            },
        );
        all.insert(
            "j4.s0.t2".to_string(),
            Holder {
                container: "j4.s0.t2".into(),
                ..holder(None, Some("busy"))
            },
        );
        assert!(held_on(&all, "j4.s0.t0", "node2"));
        assert!(!held_on(&all, "j4.s0.t0", "node3"));
        assert!(held_on(&all, "j4.s0.t1", "node2"));
        // Refused: Slurm does not count it, the planner still adds it.
        assert!(!held_on(&all, "j4.s0.t2", "node2"));
        assert!(!held_on(&all, "j9.s0.t0", "node2"));
    }

    #[test]
    fn only_the_controllers_unjournaled_holders_are_orphans() {
        let job = |id: u32, name: &str, uid: u32| SlurmJob {
            job_id: id,
            name: name.into(),
            uid,
            state: "RUNNING".into(),
            ..Default::default()
        };
        let jobs = vec![
            job(9, "rebal-hold:4:j4.s0.t0", 0),
            job(10, "rebal-hold:5:j5.s0.t0", 0),
            job(11, "rebal-hold:6:j6.s0.t0", 1000),
            job(12, "server", 0),
        ];
        let o = orphan_holders(&jobs, 0, &[holder(Some(9), None)]);
        assert_eq!(o.iter().map(|j| j.job_id).collect::<Vec<_>>(), [10]);
    }

    #[test]
    fn the_status_line_says_what_holds_what() {
        assert_eq!(
            holder(Some(9), None).status(),
            "job 9 holds 1 CPU(s) on node2 for j4.s0.t0"
        );
        assert!(holder(None, Some("Requested nodes are busy"))
            .status()
            .contains("not granted on node2 (1 CPU(s)): Requested nodes are busy"));
    }
}
