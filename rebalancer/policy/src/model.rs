//! The cluster as the planner sees it: a snapshot assembled by the controller each evaluation.
//!
//! Times are whole seconds on one monotonic-enough clock chosen by the caller (Unix time in the
//! controller); the planner only compares and subtracts them.

use serde::{Deserialize, Serialize};

/// Seconds on the caller's clock.
pub type Timestamp = u64;

// The modes and node flags are the shared models of the protocol crate; `Auto` is never a
// mode a policy lists or a node offers (refused at load, filtered by the controller).
pub use rebalancer_proto::{MigrationMode, NodeFlags};

/// One compute node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Slurm node name; unique in a view.
    pub name: String,
    #[serde(default)]
    pub flags: NodeFlags,
    #[serde(default)]
    pub partitions: Vec<String>,
    #[serde(default)]
    pub features: Vec<String>,
    pub cpus_total: u32,
    #[serde(default)]
    pub cpus_alloc: u32,
    pub mem_total_mb: u64,
    #[serde(default)]
    pub mem_alloc_mb: u64,
    /// 1-minute load average.
    #[serde(default)]
    pub load: f64,
    /// Hottest sensor reading, if the node reports one.
    #[serde(default)]
    pub temperature_c: Option<f64>,
    /// Modes the node's agent can perform, as source and as destination.
    #[serde(default)]
    pub modes: Vec<MigrationMode>,
}

impl NodeView {
    /// 1-minute load divided by the CPU count (0 for a node without CPUs).
    pub fn load_per_cpu(&self) -> f64 {
        if self.cpus_total == 0 {
            0.0
        } else {
            self.load / f64::from(self.cpus_total)
        }
    }

    pub fn supports(&self, mode: MigrationMode) -> bool {
        self.modes.contains(&mode)
    }
}

/// One containerized job step that may be moved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerView {
    /// Container id; unique in a view.
    pub id: String,
    pub job_id: u64,
    pub step_id: u64,
    pub user: String,
    pub account: String,
    pub partition: String,
    /// Node currently running the container.
    pub node: String,
    pub cpus: u32,
    pub rss_mb: u64,
    /// Class from `--migratable=CLASS`, if any.
    #[serde(default)]
    pub class: Option<String>,
    /// False when the step opted out (or CRIU cannot handle it).
    pub migratable: bool,
    /// When the container last finished a migration.
    #[serde(default)]
    pub last_moved: Option<Timestamp>,
}

/// A migration already running (started by an earlier plan).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub container: String,
    pub job_id: u64,
    pub source: String,
    pub destination: String,
    /// CPUs and memory reserved on the destination until the restore completes.
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub rss_mb: u64,
    pub started: Timestamp,
}

/// Everything one evaluation looks at.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    pub containers: Vec<ContainerView>,
    #[serde(default)]
    pub in_flight: Vec<InFlight>,
    pub now: Timestamp,
}
