//! The cluster as the planner sees it: a snapshot assembled by the controller each evaluation.
//!
//! Times are whole seconds on one monotonic-enough clock chosen by the caller (Unix time in the
//! controller); the planner only compares and subtracts them.

use serde::{Deserialize, Serialize};

/// Seconds on the caller's clock.
pub type Timestamp = u64;

/// A live-migration mode, as supported by a node's agent (CRIU capabilities).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// Freeze, copy all memory, restore.
    StopAndCopy,
    /// Freeze, restore at once, fetch pages lazily from the source (CRIU lazy pages).
    PostCopy,
    /// Copy memory iteratively while running, then a short stop-and-copy (needs soft-dirty).
    PreCopy,
}

impl MigrationMode {
    /// The spelling used in policy files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::StopAndCopy => "stop-and-copy",
            MigrationMode::PostCopy => "post-copy",
            MigrationMode::PreCopy => "pre-copy",
        }
    }
}

impl std::fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Slurm node state flags relevant to rebalancing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeFlags {
    /// DRAIN flag set (jobs may still run).
    pub drain: bool,
    /// DRAINING: drain requested and jobs still running.
    pub draining: bool,
    /// DRAINED: drain requested and no job left.
    pub drained: bool,
    /// DOWN (slurmd not responding or set down).
    pub down: bool,
    /// REBOOT_ASAP requested.
    pub reboot_asap: bool,
}

impl NodeFlags {
    /// True when the node must not receive work.
    pub fn unavailable(&self) -> Option<&'static str> {
        if self.down {
            Some("down")
        } else if self.drained {
            Some("drained")
        } else if self.draining {
            Some("draining")
        } else if self.drain {
            Some("drain")
        } else if self.reboot_asap {
            Some("reboot-asap")
        } else {
            None
        }
    }
}

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
