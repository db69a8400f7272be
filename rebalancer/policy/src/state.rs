//! State the caller keeps between evaluations: hysteresis progress and recent moves.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::Timestamp;

/// Hysteresis progress of one node under one policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTrack {
    /// First evaluation of the current run of triggering samples.
    pub since: Timestamp,
    /// Consecutive triggering evaluations (each distinct `now` counts once).
    pub samples: u32,
    /// The node passed the trigger and stays a source until the value falls below `low`.
    pub active: bool,
    pub last_sample: Timestamp,
}

/// Opaque-ish state passed to every [`crate::plan()`] call. Serializable so the controller can
/// persist it across restarts; starting from `PolicyState::default()` is always safe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    /// policy name -> node name -> progress. Nodes with nothing to remember are absent.
    pub hysteresis: BTreeMap<String, BTreeMap<String, NodeTrack>>,
    /// job id -> time of the last automatic move planned for one of its steps.
    pub job_moved: BTreeMap<u64, Timestamp>,
    /// node -> time it was last the source or destination of an automatic move.
    pub node_moved: BTreeMap<String, Timestamp>,
}

impl PolicyState {
    /// Hysteresis progress of `node` under `policy`, if any.
    pub fn track(&self, policy: &str, node: &str) -> Option<&NodeTrack> {
        self.hysteresis.get(policy)?.get(node)
    }

    /// Records a move the controller made outside the planner (e.g. a manual `rebalctl migrate`),
    /// so cooldowns apply to it too.
    pub fn record_move(&mut self, job_id: u64, source: &str, destination: &str, at: Timestamp) {
        let j = self.job_moved.entry(job_id).or_insert(at);
        *j = (*j).max(at);
        for n in [source, destination] {
            let e = self.node_moved.entry(n.to_owned()).or_insert(at);
            *e = (*e).max(at);
        }
    }

    /// Drops move records older than `horizon` seconds before `now`.
    pub(crate) fn prune_moves(&mut self, now: Timestamp, horizon: u64) {
        let keep = |t: &Timestamp| now.saturating_sub(*t) < horizon;
        self.job_moved.retain(|_, t| keep(t));
        self.node_moved.retain(|_, t| keep(t));
    }
}
