//! Controller API: `rebalctl` (and scripts) → `rebalancerd` over the controller's Unix socket.
//!
//! Same framing and handshake as the agent's local API (see `PROTOCOL.md`): `Hello` in each
//! direction, then [`ControlRequest`] frames answered by exactly one [`ControlResponse`] with the
//! same id. A request with `watch: true` (migrate, evacuate) also gets [`crate::Event`] frames with
//! that id while its migrations run, and its response only once they have all ended.
//! Callers are identified by `SO_PEERCRED`; see `ControlRequest::is_mutating`.

use serde::{Deserialize, Serialize};

use crate::messages::ErrorReply;
use crate::models::*;

/// What to migrate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum MigrateTarget {
    /// Every container of the job.
    Job {
        job_id: u32,
    },
    /// Every container of one step.
    Step {
        job_id: u32,
        step_id: u32,
    },
    Container {
        id: ContainerId,
    },
}

impl std::fmt::Display for MigrateTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrateTarget::Job { job_id } => write!(f, "job {job_id}"),
            MigrateTarget::Step { job_id, step_id } => write!(f, "step {job_id}.{step_id}"),
            MigrateTarget::Container { id } => write!(f, "container {id}"),
        }
    }
}

/// Which running migrations `rebalctl cancel` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum CancelTarget {
    /// One migration, by id or a unique prefix of it.
    Migration { id: MigrationId },
    /// Every running migration of the job.
    Job { job_id: u32 },
}

impl std::fmt::Display for CancelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CancelTarget::Migration { id } => write!(f, "migration {id}"),
            CancelTarget::Job { job_id } => write!(f, "job {job_id}"),
        }
    }
}

/// What became of one migration a cancel named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOutcome {
    pub migration: MigrationId,
    pub container: ContainerId,
    /// The source node, which rolls the migration back.
    pub source: String,
    /// The source accepted the cancel: it rolls back, and the record ends `rolled-back` with
    /// `cancelled_by`. False: refused, `message` says why (`too late: ... is committing`).
    pub accepted: bool,
    pub message: String,
    /// A refusal's error code (`busy` for too late, `unreachable`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<crate::ErrorCode>,
}

/// Run-time state of a policy, set with `rebalctl update policy=NAME state=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyState {
    /// Acts as its file says (automatic or recommend).
    Enabled,
    /// Not evaluated.
    Disabled,
    /// Evaluated and logged; nothing executed.
    DryRun,
}

impl PolicyState {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyState::Enabled => "enabled",
            PolicyState::Disabled => "disabled",
            PolicyState::DryRun => "dry-run",
        }
    }
}

impl std::str::FromStr for PolicyState {
    type Err = String;
    /// Case-insensitive, as scontrol's values are (`State=Dry-Run`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "enabled" | "enable" => Ok(PolicyState::Enabled),
            "disabled" | "disable" => Ok(PolicyState::Disabled),
            "dry-run" | "dryrun" => Ok(PolicyState::DryRun),
            _ => Err(format!(
                "unknown policy state '{s}' (expected enabled, disabled or dry-run)"
            )),
        }
    }
}

/// A policy file's text, sent by the client so that the controller never opens paths a caller
/// names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySource {
    /// Name shown in error positions (the client's path).
    pub path: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ControlRequest {
    Ping,
    ShowNodes {
        #[serde(default)]
        name: Option<String>,
    },
    ShowContainers {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        job_id: Option<u32>,
    },
    ShowMigrations {
        #[serde(default)]
        id: Option<String>,
        /// Only migrations that have not ended.
        #[serde(default)]
        active: bool,
    },
    ShowPolicies {
        #[serde(default)]
        name: Option<String>,
    },
    Migrate {
        target: MigrateTarget,
        /// Destination node; the controller picks one when absent.
        #[serde(default)]
        destination: Option<String>,
        #[serde(default)]
        mode: Option<MigrationMode>,
        #[serde(default)]
        watch: bool,
    },
    /// Moves every container off a node (does not drain it in Slurm).
    Evacuate {
        node: String,
        #[serde(default)]
        mode: Option<MigrationMode>,
        #[serde(default)]
        watch: bool,
    },
    /// Validates policy files; without sources, the controller's configured policy path.
    PolicyCheck {
        #[serde(default)]
        sources: Vec<PolicySource>,
    },
    PolicyReload,
    UpdatePolicy {
        name: String,
        state: PolicyState,
    },
    History {
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Runs the policies on the current view without acting or advancing their memory.
    Plan,
    /// Cancels running migrations (answered with [`ControlReply::Cancelled`]): each is
    /// forwarded to its source agent, which rolls it back if it has not reached its commit
    /// point. One named migration that cannot be cancelled is an error reply (`busy`: too
    /// late; `not_found`: not running).
    Cancel {
        target: CancelTarget,
    },
    /// Attaches to a migration (id or unique prefix): [`crate::Event`] frames with this
    /// request's id while it runs, then its final entry as [`ControlReply::Migrations`] (an
    /// ended one at once). Detaching (closing the connection) changes nothing.
    Watch {
        id: MigrationId,
    },
    /// Like [`ControlRequest::Plan`], with why each planned move is held back and why
    /// everything the policies considered and did not move stays (answered with
    /// [`ControlReply::Explanation`]). Optionally only one job's or one node's.
    Explain {
        #[serde(default)]
        job_id: Option<u32>,
        #[serde(default)]
        node: Option<String>,
    },
    /// The container address blocks the controller leased (answered with
    /// [`ControlReply::Blocks`]), optionally only one node's.
    ShowBlocks {
        #[serde(default)]
        node: Option<String>,
    },
}

impl ControlRequest {
    /// Requests that change something: only root, the SlurmUser and configured operators.
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            ControlRequest::Migrate { .. }
                | ControlRequest::Evacuate { .. }
                | ControlRequest::PolicyReload
                | ControlRequest::UpdatePolicy { .. }
                | ControlRequest::Cancel { .. }
        )
    }

    pub fn op(&self) -> &'static str {
        match self {
            ControlRequest::Ping => "ping",
            ControlRequest::ShowNodes { .. } => "show-nodes",
            ControlRequest::ShowContainers { .. } => "show-containers",
            ControlRequest::ShowMigrations { .. } => "show-migrations",
            ControlRequest::ShowPolicies { .. } => "show-policies",
            ControlRequest::Migrate { .. } => "migrate",
            ControlRequest::Evacuate { .. } => "evacuate",
            ControlRequest::PolicyCheck { .. } => "policy-check",
            ControlRequest::PolicyReload => "policy-reload",
            ControlRequest::UpdatePolicy { .. } => "update-policy",
            ControlRequest::History { .. } => "history",
            ControlRequest::Plan => "plan",
            ControlRequest::Explain { .. } => "explain",
            ControlRequest::Cancel { .. } => "cancel",
            ControlRequest::Watch { .. } => "watch",
            ControlRequest::ShowBlocks { .. } => "show-blocks",
        }
    }
}

/// Whether the controller can talk to a node's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentHealth {
    Up,
    Unreachable,
    /// No address configured or not polled yet.
    Unknown,
}

/// A node as the controller sees it (Slurm's view plus its agent's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    /// Slurm's state string, e.g. `MIXED+DRAIN`.
    pub slurm_state: String,
    pub cpus_total: u32,
    pub cpus_alloc: u32,
    pub mem_total_mb: u64,
    pub mem_alloc_mb: u64,
    #[serde(default)]
    pub partitions: Vec<String>,
    pub agent: AgentHealth,
    /// Where the controller reaches the agent (socket path or host:port).
    pub agent_address: Option<String>,
    #[serde(default)]
    pub agent_error: Option<String>,
    pub metrics: Option<NodeMetrics>,
    pub capabilities: Option<NodeCapabilities>,
    pub containers: u32,
    /// Migrations in flight from or to this node.
    pub in_flight: u32,
    /// Container address blocks leased to the node, e.g. `198.19.0.64/26` (omitted when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub address_blocks: Vec<String>,
}

/// One leased block of container addresses (`rebalctl show blocks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStatus {
    /// `first/prefix`, e.g. `198.19.0.64/26`.
    pub block: String,
    /// The node it is leased to.
    pub node: String,
    /// When it was leased (absent for a lease journaled before the controller kept the time).
    #[serde(default)]
    pub leased_at: Option<Millis>,
    /// Addresses in the block.
    pub addresses: u32,
    /// Live containers, on any node, holding an address of the block (as last polled).
    pub live: u32,
    /// Addresses of the block lent to containers that moved to another node, as the node's
    /// agent last reported them (the controller releases each once its container ended).
    pub lent: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub name: String,
    /// drain, thermal, load, ...
    pub kind: String,
    /// automatic, recommend or dry-run, as written in the file.
    pub action: String,
    pub state: PolicyState,
    pub priority: i32,
    pub description: String,
    pub source: String,
    /// Decisions recorded since the controller started.
    pub decisions: u64,
}

/// Result of validating policy files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCheckReport {
    pub ok: bool,
    /// Names of the valid policies found.
    pub policies: Vec<String>,
    /// `path:line:column: message` for each problem.
    pub errors: Vec<String>,
}

/// A move the policies would make now (`rebalctl plan`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanItem {
    pub policy: String,
    pub container: ContainerId,
    pub job_id: Option<u32>,
    pub source: String,
    pub destination: String,
    pub mode: MigrationMode,
    /// automatic, recommend or dry-run (after run-time states).
    pub action: String,
    pub why: String,
    /// Why the controller does not start this move now although the policy wants it: the
    /// container is migrating, a failed start holds it back (and until when), an in-flight
    /// limit is reached. Only in [`ControlReply::Explanation`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// Something a policy considered and did not move, or a node nothing can leave, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmoved {
    /// The policy, or `controller` for what holds for every policy (an unreachable agent).
    pub policy: String,
    pub node: String,
    /// None when the whole node was skipped.
    #[serde(default)]
    pub container: Option<ContainerId>,
    #[serde(default)]
    pub job_id: Option<u32>,
    /// Stable kebab-case code: `no-destination`, `not-migratable`, `job-cooldown`,
    /// `backing-off`, `agent-unreachable`, ... (docs/policies.md lists them).
    pub code: String,
    pub reason: String,
    /// When the condition ends, if it has a known end (cooldowns, back-offs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Millis>,
}

/// How a decision was carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionOutcome {
    /// A migration was started (see `migration`).
    Started,
    /// Recorded as a recommendation only.
    Recommended,
    /// Dry run: logged only.
    DryRun,
    /// Not executed: in-flight limits, agent unreachable, ...
    Skipped,
    /// The agent refused or the migration could not start.
    Failed,
}

impl DecisionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionOutcome::Started => "started",
            DecisionOutcome::Recommended => "recommended",
            DecisionOutcome::DryRun => "dry-run",
            DecisionOutcome::Skipped => "skipped",
            DecisionOutcome::Failed => "failed",
        }
    }
}

/// One journaled decision: a policy's (or an operator's) intent to move a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Monotonic journal sequence number.
    pub seq: u64,
    pub at: Millis,
    /// Policy name, or `operator:<uid>` for `rebalctl migrate/evacuate`.
    pub policy: String,
    pub container: ContainerId,
    pub task: Option<TaskRef>,
    /// Owner of the container.
    #[serde(default)]
    pub uid: Option<u32>,
    pub source: String,
    pub destination: String,
    pub mode: MigrationMode,
    /// Why, in words.
    pub why: String,
    pub outcome: DecisionOutcome,
    #[serde(default)]
    pub detail: Option<String>,
    pub migration: Option<MigrationId>,
}

/// A migration as the controller journals it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationEntry {
    pub record: MigrationRecord,
    /// Decision that started it.
    pub decision: u64,
    pub policy: String,
    #[serde(default)]
    pub uid: Option<u32>,
    /// Slurm allocation updated after success (expanded to destination, shrunk from source).
    #[serde(default)]
    pub slurm_synced: bool,
    #[serde(default)]
    pub slurm_error: Option<String>,
    /// Why the source node stayed in the job's allocation after a successful migration.
    #[serde(default)]
    pub slurm_kept_source: Option<String>,
    /// The holder allocation that makes Slurm count the moved task's CPUs on the destination
    /// (granted, refused, released), or None when none was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_holder: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ControlReply {
    Pong {
        software: String,
    },
    Nodes {
        nodes: Vec<NodeStatus>,
    },
    Containers {
        containers: Vec<ContainerInfo>,
    },
    Migrations {
        migrations: Vec<MigrationEntry>,
    },
    Policies {
        policies: Vec<PolicyStatus>,
    },
    PolicyCheck {
        report: PolicyCheckReport,
    },
    /// Answer to migrate/evacuate: the decisions taken and the migrations (final records when
    /// the request watched them).
    Migrated {
        decisions: Vec<DecisionRecord>,
        migrations: Vec<MigrationEntry>,
    },
    History {
        decisions: Vec<DecisionRecord>,
    },
    Plan {
        moves: Vec<PlanItem>,
    },
    /// Answer to [`ControlRequest::Explain`].
    Explanation {
        moves: Vec<PlanItem>,
        unmoved: Vec<Unmoved>,
    },
    Done,
    /// Answer to [`ControlRequest::Cancel`]: one outcome per migration it named.
    Cancelled {
        cancels: Vec<CancelOutcome>,
    },
    /// Answer to [`ControlRequest::ShowBlocks`], by block.
    Blocks {
        blocks: Vec<BlockStatus>,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlResponse {
    Ok(ControlReply),
    Error(ErrorReply),
}

impl ControlResponse {
    pub fn error(code: crate::ErrorCode, message: impl Into<String>) -> Self {
        ControlResponse::Error(ErrorReply {
            code,
            message: message.into(),
        })
    }
    pub fn into_result(self) -> Result<ControlReply, ErrorReply> {
        match self {
            ControlResponse::Ok(r) => Ok(r),
            ControlResponse::Error(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, FrameKind};

    #[test]
    fn migrate_request_round_trip() {
        let req = ControlRequest::Migrate {
            target: MigrateTarget::Step {
                job_id: 7,
                step_id: 0,
            },
            destination: Some("node2".into()),
            mode: Some(MigrationMode::PostCopy),
            watch: true,
        };
        let f = Frame::json(FrameKind::Request, 3, &req).expect("encode");
        let back: ControlRequest = f.decode(FrameKind::Request, "request").expect("decode");
        assert_eq!(back, req);
        let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("json");
        assert_eq!(v["op"], "migrate");
        assert_eq!(v["target"]["by"], "step");
        assert!(req.is_mutating());
        assert!(!ControlRequest::ShowNodes { name: None }.is_mutating());
    }

    #[test]
    fn policy_state_parses() {
        assert_eq!(
            "dry-run".parse::<PolicyState>().expect("parse"),
            PolicyState::DryRun
        );
        assert!("on".parse::<PolicyState>().is_err());
    }
}
