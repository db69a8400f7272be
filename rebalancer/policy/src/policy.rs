//! Validated policies. Built only by [`crate::config`], so every value here has been checked.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hostlist::HostFilter;
use crate::model::{ContainerView, MigrationMode, NodeFlags};
use rebalancer_proto::DowntimeModel;

/// What makes a policy act. Declaration order is the priority order across kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Evacuate nodes in a drain-like state.
    Drain,
    /// Move work off hot nodes.
    Thermal,
    /// Move work off overloaded nodes.
    Load,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Drain => "drain",
            PolicyKind::Thermal => "thermal",
            PolicyKind::Load => "load",
        }
    }
}

/// What a policy does with the moves it plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// The controller executes the migrations.
    Automatic,
    /// Plan only; shown to the admin as a recommendation.
    Recommend,
    /// Evaluate and log; nothing is recommended or executed.
    DryRun,
}

/// Whether thresholds are absolute values or deviations from the cluster mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Basis {
    Absolute,
    Deviation,
}

/// Node states a drain policy reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainState {
    Drain,
    Draining,
    Drained,
    Down,
    RebootAsap,
}

impl DrainState {
    pub fn as_str(self) -> &'static str {
        match self {
            DrainState::Drain => "drain",
            DrainState::Draining => "draining",
            DrainState::Drained => "drained",
            DrainState::Down => "down",
            DrainState::RebootAsap => "reboot-asap",
        }
    }

    pub fn is_set(self, f: &NodeFlags) -> bool {
        match self {
            DrainState::Drain => f.drain,
            DrainState::Draining => f.draining,
            DrainState::Drained => f.drained,
            DrainState::Down => f.down,
            DrainState::RebootAsap => f.reboot_asap,
        }
    }
}

/// Which containers of a triggered node go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerOrder {
    /// Most CPUs first (sheds the most heat/load per move).
    MostCpus,
    /// Smallest resident memory first (fastest moves first).
    LeastMemory,
}

/// How destinations are ranked among those that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prefer {
    /// Lowest temperature (unknown temperatures rank last).
    Coolest,
    /// Lowest projected load per CPU.
    LeastLoaded,
    /// Most free CPUs after the move.
    MostFree,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// Drain only.
    pub states: Vec<DrainState>,
    /// Thermal and load only.
    pub basis: Basis,
    pub high: f64,
    pub low: f64,
    /// Consecutive evaluations the condition must hold before acting.
    pub samples: u32,
    /// Seconds the condition must hold before acting.
    pub min_duration_s: u64,
}

/// Include/exclude lists of exact names. An empty include list admits everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameFilter {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl NameFilter {
    pub fn admits(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|i| i == name))
            && !self.exclude.iter().any(|e| e == name)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scope {
    pub partitions: NameFilter,
    pub nodes: HostFilter,
    pub users: NameFilter,
    pub accounts: NameFilter,
    pub classes: NameFilter,
}

impl Scope {
    /// Why the container is out of scope, or None when it is in scope.
    pub fn rejects(&self, c: &ContainerView) -> Option<String> {
        if !self.partitions.admits(&c.partition) {
            return Some(format!("partition {} out of scope", c.partition));
        }
        if !self.users.admits(&c.user) {
            return Some(format!("user {} out of scope", c.user));
        }
        if !self.accounts.admits(&c.account) {
            return Some(format!("account {} out of scope", c.account));
        }
        let class = c.class.as_deref().unwrap_or("");
        if !self.classes.admits(class) {
            return Some(format!("class {:?} out of scope", class));
        }
        None
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Moves per source node per evaluation from this policy; 0 means no cap.
    pub max_per_node: u32,
    pub order: ContainerOrder,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    pub nodes: HostFilter,
    pub same_partition: bool,
    pub require_features: Vec<String>,
    pub min_free_cpus: u32,
    pub min_free_mem_mb: u64,
    pub max_temperature_c: Option<f64>,
    pub temperature_headroom_c: f64,
    pub max_load_per_cpu: Option<f64>,
    pub prefer: Prefer,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MigrationSettings {
    /// Modes in order of preference.
    pub modes: Vec<MigrationMode>,
    pub max_downtime_ms: Option<u64>,
    pub bandwidth_mib_s: f64,
    pub fixed_downtime_ms: u64,
    pub pre_copy_dirty_fraction: f64,
    pub timeout_base_s: u64,
    pub timeout_per_gib_s: u64,
}

impl MigrationSettings {
    /// The downtime model these settings describe (shared with the agent's `auto` mode).
    pub fn downtime_model(&self) -> DowntimeModel {
        DowntimeModel {
            fixed_ms: self.fixed_downtime_ms,
            bandwidth_mib_s: self.bandwidth_mib_s,
            pre_copy_dirty_fraction: self.pre_copy_dirty_fraction,
        }
    }

    /// Estimated freeze time of `mode` for `rss_mb` resident MiB under these settings.
    pub fn estimated_downtime_ms(&self, mode: MigrationMode, rss_mb: u64) -> u64 {
        self.downtime_model().downtime_ms(mode, rss_mb)
    }

    /// Seconds the controller lets the migration run before aborting it.
    pub fn timeout_s(&self, rss_mb: u64) -> u64 {
        let gib = (rss_mb as f64 / 1024.0).ceil() as u64;
        self.timeout_base_s
            .saturating_add(gib.saturating_mul(self.timeout_per_gib_s))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_concurrent: u32,
    pub max_per_source: u32,
    pub max_per_destination: u32,
    pub max_per_cycle: u32,
    pub job_cooldown_s: u64,
    pub node_cooldown_s: u64,
}

/// One validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub kind: PolicyKind,
    pub enabled: bool,
    pub action: Action,
    /// Higher runs first within a kind.
    pub priority: i32,
    pub description: String,
    pub trigger: Trigger,
    pub scope: Scope,
    pub selection: Selection,
    pub destination: Destination,
    pub migration: MigrationSettings,
    pub limits: Limits,
    /// File the policy came from.
    pub source: PathBuf,
}

/// A validated set of policies in evaluation order: kind (drain, thermal, load), then priority
/// (highest first), then name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicySet {
    pub(crate) policies: Vec<Policy>,
}

impl PolicySet {
    /// Builds a set from already validated policies (sorts them into evaluation order).
    pub(crate) fn new(mut policies: Vec<Policy>) -> Self {
        policies.sort_by(|a, b| {
            a.kind
                .cmp(&b.kind)
                .then(b.priority.cmp(&a.priority))
                .then(a.name.cmp(&b.name))
        });
        PolicySet { policies }
    }

    /// Policies in evaluation order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Run-time switch (`rebalctl update policy=NAME state=...`); false when no such policy.
    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> bool {
        self.policies
            .iter_mut()
            .find(|p| p.name == name)
            .map(|p| p.enabled = enabled)
            .is_some()
    }

    /// Run-time override of a policy's action (e.g. force dry-run); false when no such policy.
    pub fn set_action(&mut self, name: &str, action: Action) -> bool {
        self.policies
            .iter_mut()
            .find(|p| p.name == name)
            .map(|p| p.action = action)
            .is_some()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }
}
