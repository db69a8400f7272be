//! Shared data models: containers, migrations, node capabilities and metrics.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Cluster-unique container id, e.g. `j42.s0.t0`.
pub type ContainerId = String;
/// Migration id (a UUID in text form).
pub type MigrationId = String;
/// Milliseconds since the Unix epoch.
pub type Millis = u64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-24T20:01:02Z` (ISO 8601, UTC) from Unix milliseconds.
pub fn iso8601(ms: Millis) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The Slurm task a container runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskRef {
    pub job_id: u32,
    pub step_id: u32,
    /// Global task id within the step.
    pub task_id: u32,
}

impl TaskRef {
    /// The default container id for this task.
    pub fn container_id(&self) -> ContainerId {
        format!("j{}.s{}.t{}", self.job_id, self.step_id, self.task_id)
    }
}

/// A live-migration mode: what an agent can perform (its capabilities), what a policy may use,
/// and what a migration request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// Freeze, stream every page to the destination's page server, restore.
    StopAndCopy,
    /// Resume on the destination first; pages follow over userfaultfd.
    PostCopy,
    /// Iterative pre-dump rounds while running, then a short final dump (needs soft-dirty).
    PreCopy,
    /// Let the agent pick from both nodes' features and the caller's limits.
    Auto,
}

impl MigrationMode {
    pub const ALL: [MigrationMode; 4] = [
        MigrationMode::StopAndCopy,
        MigrationMode::PostCopy,
        MigrationMode::PreCopy,
        MigrationMode::Auto,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::StopAndCopy => "stop-and-copy",
            MigrationMode::PostCopy => "post-copy",
            MigrationMode::PreCopy => "pre-copy",
            MigrationMode::Auto => "auto",
        }
    }
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    /// Case-insensitive, as scontrol's values are (`Mode=Post-Copy`). Policy files stay exact:
    /// they are deserialized, not parsed with this.
    fn from_str(s: &str) -> Result<Self, String> {
        MigrationMode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown migration mode '{s}' (expected stop-and-copy, post-copy, pre-copy or auto)")
            })
    }
}

/// Slurm node state flags relevant to rebalancing, as the controller reads them from Slurm and
/// the policies see them.
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
    /// Parses a Slurm state string such as `MIXED+DRAIN` or `DOWN*+DRAIN`.
    pub fn from_state(state: &str) -> NodeFlags {
        let upper = state.to_ascii_uppercase();
        let parts: Vec<&str> = upper
            .split('+')
            .map(|p| p.trim_end_matches(['*', '~', '#', '!', '%', '$', '@', '^', '-']))
            .collect();
        let has = |w: &str| parts.contains(&w);
        let drain = has("DRAIN") || has("DRAINING") || has("DRAINED");
        let busy = has("ALLOCATED") || has("MIXED") || has("COMPLETING") || has("DRAINING");
        NodeFlags {
            drain,
            draining: drain && busy,
            drained: drain && !busy,
            down: has("DOWN"),
            reboot_asap: parts.iter().any(|p| p.starts_with("REBOOT")),
        }
    }

    /// The reason a node should be evacuated, if any (Slurm's spelling).
    pub fn evacuate_reason(&self) -> Option<&'static str> {
        if self.down {
            Some("DOWN")
        } else if self.draining {
            Some("DRAINING")
        } else if self.drain {
            Some("DRAIN")
        } else if self.reboot_asap {
            Some("REBOOT ASAP")
        } else {
            None
        }
    }

    /// Why the node must not receive work, if it must not (the policies' spelling).
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

/// How the container's root file system is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RootfsSpec {
    /// An existing root directory (for example an OCI bundle's `rootfs`), present on every node.
    Dir { path: String },
    /// A private root assembled from read-only bind mounts of the node's system directories.
    Host,
}

/// One mount of a container's root, in mount order (the same JSON as the agent's mount plan).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum MountSpec {
    /// Bind mount of a node path at the same place inside; external to CRIU
    /// (`--external mnt[TARGET]:KEY`).
    Bind {
        source: String,
        target: String,
        readonly: bool,
    },
    Tmpfs {
        target: String,
        options: String,
    },
    /// tmpfs on /dev with the minimal device nodes.
    Dev,
    Proc,
}

/// Everything needed to start (or restore) a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub id: ContainerId,
    pub task: Option<TaskRef>,
    pub uid: u32,
    pub gid: u32,
    /// Program and arguments run as the container's first process.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub rootfs: RootfsSpec,
    /// Node directories bind-mounted read-write at the same path (work and output dirs).
    #[serde(default)]
    pub binds: Vec<String>,
    /// Memory limit in bytes (cgroup), if any.
    pub memory_limit: Option<u64>,
    /// CPU limit in CPUs (cgroup cpu.max), if any.
    pub cpus: Option<f64>,
    /// Policy class given with `--migratable=CLASS`.
    #[serde(default)]
    pub class: Option<String>,
    /// Requested container address; the agent allocates one from its subnet when absent.
    #[serde(default)]
    pub address: Option<String>,
    /// Where stdout/stderr go when no descriptors are passed.
    #[serde(default)]
    pub stdout: Option<String>,
    #[serde(default)]
    pub stderr: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerState {
    Starting,
    Running,
    /// Frozen by a migration in progress.
    Migrating,
    /// Moved away; kept briefly for `show`.
    MigratedAway,
    Exited,
}

impl ContainerState {
    /// Whether the container occupies its node: starting, running or frozen by a migration.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            ContainerState::Starting | ContainerState::Running | ContainerState::Migrating
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: ContainerId,
    pub task: Option<TaskRef>,
    pub uid: u32,
    pub gid: u32,
    pub node: String,
    pub address: String,
    /// Pid of the container's first process, in the agent's pid namespace.
    pub pid: Option<i32>,
    pub state: ContainerState,
    pub rss_bytes: u64,
    pub cpus: Option<f64>,
    pub class: Option<String>,
    pub exit_status: Option<i32>,
    pub started_at: Millis,
    /// The Slurm task the container runs in now when that is not `task`: after a move, the
    /// destination's restore step (`task` stays the step the user started). Absent when it
    /// never moved, and from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_in: Option<TaskRef>,
}

/// Phases of a migration, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    Prepare,
    PrecopyRound {
        round: u32,
    },
    Freeze,
    Dump,
    Transfer,
    Restore,
    NetworkSwitch,
    /// Post-copy: remaining pages pushed/pulled after resume.
    LazyPages,
    Cleanup,
    Rollback,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Prepare => f.write_str("prepare"),
            Phase::PrecopyRound { round } => write!(f, "precopy-round-{round}"),
            Phase::Freeze => f.write_str("freeze"),
            Phase::Dump => f.write_str("dump"),
            Phase::Transfer => f.write_str("transfer"),
            Phase::Restore => f.write_str("restore"),
            Phase::NetworkSwitch => f.write_str("network-switch"),
            Phase::LazyPages => f.write_str("lazy-pages"),
            Phase::Cleanup => f.write_str("cleanup"),
            Phase::Rollback => f.write_str("rollback"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseRecord {
    #[serde(flatten)]
    pub phase: Phase,
    pub started_at: Millis,
    pub ended_at: Option<Millis>,
}

impl PhaseRecord {
    pub fn duration_ms(&self) -> Option<u64> {
        self.ended_at.map(|e| e.saturating_sub(self.started_at))
    }
}

/// Figures of one pre-copy round.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundStats {
    pub round: u32,
    pub pages_scanned: u64,
    pub pages_written: u64,
    /// Pages skipped because the parent round already sent them.
    pub pages_skipped_parent: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// From the freeze of the source to the resume on the destination.
    pub downtime_ms: Option<u64>,
    /// Time the source tree spent frozen (until rollback or kill).
    pub frozen_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub pages_scanned: u64,
    pub pages_written: u64,
    pub pages_lazy: u64,
    /// Bytes sent between the nodes (page server + image transfer).
    pub bytes_sent: u64,
    pub rss_bytes: u64,
    #[serde(default)]
    pub rounds: Vec<RoundStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    Pending,
    Running,
    Succeeded,
    /// Failed before the destination took over: the container runs on the source again.
    RolledBack,
    /// Failed after the point of no return (post-copy only).
    Failed,
    /// Commit may have reached the destination and neither side could learn whether it did:
    /// the source keeps its copy frozen (never resumed by a timer) and the job's allocation
    /// stays on both nodes until the outcome is resolved by asking the destination again.
    Unknown,
}

impl MigrationState {
    /// The state as the CLI and the journal's JSON spell it (`rolled-back`).
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Pending => "pending",
            MigrationState::Running => "running",
            MigrationState::Succeeded => "succeeded",
            MigrationState::RolledBack => "rolled-back",
            MigrationState::Failed => "failed",
            MigrationState::Unknown => "unknown",
        }
    }

    /// The migration's run has ended (an `Unknown` end still awaits its resolution).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationState::Succeeded
                | MigrationState::RolledBack
                | MigrationState::Failed
                | MigrationState::Unknown
        )
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: MigrationId,
    pub container: ContainerId,
    pub task: Option<TaskRef>,
    pub source: String,
    pub destination: String,
    pub requested_mode: MigrationMode,
    /// Mode actually used, and why `auto` or a fallback chose it.
    pub mode: Option<MigrationMode>,
    pub mode_reason: Option<String>,
    pub state: MigrationState,
    pub phases: Vec<PhaseRecord>,
    pub stats: MigrationStats,
    pub error: Option<String>,
    pub started_at: Millis,
    pub ended_at: Option<Millis>,
    /// Who cancelled the migration (`rebalctl cancel`), when a cancel ended it: the state is
    /// then `rolled-back` (the container runs on its source again). Absent otherwise, and in
    /// records of agents that predate cancelling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<String>,
}

/// What a node's kernel and CRIU can do, found by the agent's start-up checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapabilities {
    pub node: String,
    pub criu_version: Option<String>,
    pub criu_path: Option<String>,
    pub uffd: bool,
    pub tcp_established: bool,
    pub nftables_lock: bool,
    pub dirty_tracking: bool,
    /// Modes this node can take part in.
    pub modes: Vec<MigrationMode>,
    /// Why a mode or feature is missing, in words an admin can act on.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Periodic node metrics pushed to or polled by the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeMetrics {
    pub node: String,
    pub at: Millis,
    pub load1: f64,
    pub cpus: u32,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub temperature_c: Option<f64>,
    pub containers: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_parses_and_prints() {
        for m in MigrationMode::ALL {
            assert_eq!(m.as_str().parse::<MigrationMode>().expect("parse"), m);
        }
        let err = "live".parse::<MigrationMode>().expect_err("unknown");
        assert!(err.contains("'live'"), "{err}");
    }

    #[test]
    fn task_container_id() {
        let t = TaskRef {
            job_id: 42,
            step_id: 0,
            task_id: 3,
        };
        assert_eq!(t.container_id(), "j42.s0.t3");
    }

    #[test]
    fn phase_serializes_tagged() {
        let p = PhaseRecord {
            phase: Phase::PrecopyRound { round: 2 },
            started_at: 1,
            ended_at: Some(4),
        };
        let v = serde_json::to_value(&p).expect("ser");
        assert_eq!(v["phase"], "precopy-round");
        assert_eq!(v["round"], 2);
        assert_eq!(p.duration_ms(), Some(3));
        let back: PhaseRecord = serde_json::from_value(v).expect("de");
        assert_eq!(back, p);
    }
}
