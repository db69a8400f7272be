//! The planner's output: ordered decisions and skips, each with its reasons.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{MigrationMode, Timestamp};
use crate::policy::{Basis, DrainState, PolicyKind};

/// What the controller does with a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionAction {
    /// Execute the migration now.
    Migrate,
    /// Show to the admin; do not execute.
    Recommend,
    /// Log only; do not execute.
    DryRun,
}

/// What a thermal or load trigger measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    TemperatureC,
    LoadPerCpu,
}

/// Why the source node was acted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum TriggerReason {
    /// A drain policy matched these node states.
    NodeState { states: Vec<DrainState> },
    /// A thermal or load value crossed `high` and has not fallen below `low` since.
    Threshold {
        metric: Metric,
        value: f64,
        basis: Basis,
        /// Cluster mean for deviation triggers (the compared value is `value - mean`).
        mean: Option<f64>,
        high: f64,
        low: f64,
        samples: u32,
        since: Timestamp,
    },
}

/// Why a candidate destination was not chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectCode {
    OutOfDestinationScope,
    Unavailable,
    /// A thermal or load policy is moving work off this node.
    BeingRelieved,
    WrongPartition,
    MissingFeature,
    NodeCooldown,
    DestinationLimit,
    InsufficientCpus,
    InsufficientMemory,
    TooHot,
    UnknownTemperature,
    TooLoaded,
    NoCommonMode,
}

/// One rejected destination, kept as an example in a decision's or skip's reasons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedCandidate {
    pub node: String,
    pub code: RejectCode,
    pub reason: String,
}

/// A destination that fitted, with its rank key (lower is better, compared in order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankedCandidate {
    pub node: String,
    pub mode: MigrationMode,
    pub score: [f64; 2],
}

/// How the destination search went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationSearch {
    /// Nodes considered (every node except the source).
    pub candidates: usize,
    /// Nodes that fitted.
    pub fitting: usize,
    /// The best fitting nodes, best first (the chosen one first); at most [`crate::RUNNERS_UP`].
    pub ranked: Vec<RankedCandidate>,
    /// Number of rejected nodes per reason.
    pub rejected: BTreeMap<RejectCode, u32>,
    /// The first rejected nodes in name order; at most [`crate::REJECT_EXAMPLES`].
    pub rejected_examples: Vec<RejectedCandidate>,
}

/// Reasons for a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Why {
    /// One line for logs and `rebalctl`.
    pub summary: String,
    pub trigger: TriggerReason,
    /// Why this container on the source was picked.
    pub selection: String,
    /// Why this destination and mode.
    pub mode: String,
    pub destination: DestinationSearch,
}

/// One planned move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub container: String,
    pub job_id: u64,
    pub step_id: u64,
    pub source: String,
    pub destination: String,
    pub mode: MigrationMode,
    pub policy: String,
    pub kind: PolicyKind,
    pub priority: i32,
    pub action: DecisionAction,
    pub estimated_downtime_ms: u64,
    /// Abort the migration after this many seconds.
    pub timeout_s: u64,
    pub why: Why,
}

/// Why something was not moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipCode {
    /// The node's value crossed `high` but not for enough samples or seconds yet.
    HysteresisPending,
    /// The node is between `low` and `high` and was not already active.
    InBand,
    /// A thermal trigger but the node reports no temperature.
    NoReading,
    /// Source node is down (thermal/load do not act on down nodes).
    SourceDown,
    SourceCooldown,
    JobCooldown,
    NotMigratable,
    OutOfScope,
    InFlight,
    /// Already claimed by an earlier (higher priority) decision of this plan.
    AlreadyPlanned,
    NoSourceMode,
    NoDestination,
    NodeQuotaReached,
    SourceLimit,
    ConcurrencyLimit,
    CycleLimit,
    SearchBudget,
}

/// Something a policy considered and did not move, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skip {
    pub policy: String,
    pub node: String,
    /// None when the whole node was skipped.
    pub container: Option<String>,
    pub code: SkipCode,
    pub reason: String,
    /// For [`SkipCode::NoDestination`]: the search that found nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<DestinationSearch>,
}

/// Per-policy summary of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyReport {
    pub policy: String,
    pub kind: PolicyKind,
    pub enabled: bool,
    /// Source nodes in the policy's scope.
    pub nodes_in_scope: usize,
    /// Cluster mean of the metric over in-scope nodes (thermal and load).
    pub mean: Option<f64>,
    /// Nodes whose trigger is active (acted on).
    pub nodes_active: usize,
    /// Nodes above `high` waiting for hysteresis.
    pub nodes_pending: usize,
    /// Nodes that did not trigger at all (not listed as skips).
    pub nodes_quiet: usize,
    pub decisions: usize,
    pub skips: usize,
}

/// The result of one evaluation. Decisions are in execution order: drain, thermal, load; then
/// policy priority (highest first) and name; then source and container order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub evaluated_at: Timestamp,
    pub decisions: Vec<Decision>,
    pub skips: Vec<Skip>,
    pub reports: Vec<PolicyReport>,
    /// Inconsistencies in the cluster view that the planner worked around (containers on
    /// unknown nodes, duplicate names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Plan {
    /// Decisions the controller should execute.
    pub fn migrations(&self) -> impl Iterator<Item = &Decision> {
        self.decisions
            .iter()
            .filter(|d| d.action == DecisionAction::Migrate)
    }
}
