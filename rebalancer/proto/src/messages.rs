//! Messages of the local control API (Unix socket of the agent) and the handshake.
//!
//! Agent ↔ agent messages live in the agent's peer module; controller API messages in
//! [`crate::control`].

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
pub use crate::error::ErrorReply;
use crate::error::VersionRange;
use crate::models::*;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Agent,
    Controller,
    Cli,
    Spank,
    /// The restore shim started as a Slurm task on the destination node.
    Shim,
}

/// The message-set version of today's messages. Version 1 is what every release so far speaks.
pub const MESSAGE_VERSION: u16 = 1;
/// The message-set versions this build speaks; negotiation picks the highest common one.
pub const MESSAGE_VERSIONS: VersionRange = VersionRange::new(1, MESSAGE_VERSION);

/// Versions of the agent's TCP control port (controller ↔ agent), negotiated in the hellos;
/// both carry message set 1. 1: munge credentials bound to the connection, the channel in
/// clear. 2: after the hellos the connection continues inside TLS 1.3 ([`crate::tls`]), and
/// both credentials also name the TLS session's exporter value. The local sockets speak
/// [`MESSAGE_VERSIONS`].
pub const CONTROL_TCP_VERSIONS: VersionRange = VersionRange::new(1, 2);

/// The first control TCP version that is encrypted.
pub const CONTROL_TCP_ENCRYPTED: u16 = 2;

/// First frame in each direction. The server answers with its own `Hello` or an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Client: the lowest message-set version it speaks (what a version-1 server checks for
    /// equality, so a client speaking 1..=N still reaches it). Server: the version it agreed to.
    pub protocol: u16,
    /// The highest message-set version the sender speaks. Absent (version-1 peers): exactly
    /// `protocol`. Omitted on the wire when equal to `protocol`, so a single-version Hello is
    /// byte-for-byte what version-1 releases send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_max: Option<u16>,
    /// e.g. `rebalancer-agent 0.1.0`.
    pub software: String,
    pub role: Role,
    #[serde(default)]
    pub node: Option<String>,
    /// Authentication credential (a munge credential between nodes).
    #[serde(default)]
    pub credential: Option<String>,
    /// A fresh value for this connection that the other side's credential must name (agent
    /// peer protocol version 2: mutual authentication). Ignored by version-1 peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

impl Hello {
    pub fn new(role: Role, software: impl Into<String>) -> Self {
        Hello {
            protocol: MESSAGE_VERSIONS.min,
            protocol_max: (MESSAGE_VERSIONS.max > MESSAGE_VERSIONS.min)
                .then_some(MESSAGE_VERSIONS.max),
            software: software.into(),
            role,
            node: None,
            credential: None,
            nonce: None,
        }
    }

    /// Sets the range of message-set versions this Hello announces.
    pub fn with_versions(mut self, v: VersionRange) -> Self {
        self.protocol = v.min;
        self.protocol_max = (v.max > v.min).then_some(v.max);
        self
    }

    /// The message-set versions the sender speaks.
    pub fn versions(&self) -> VersionRange {
        let max = self
            .protocol_max
            .unwrap_or(self.protocol)
            .max(self.protocol);
        VersionRange::new(self.protocol, max)
    }
}

/// A task of a migratable step, announced by the SPANK plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRegistration {
    pub task: TaskRef,
    /// Pid of the task (in the node's pid namespace); must belong to the job step.
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub node: String,
    pub class: Option<String>,
    #[serde(default)]
    pub mode: Option<MigrationMode>,
    pub cpus: Option<f64>,
    pub memory_limit: Option<u64>,
    /// Container id the plugin uses (`TaskRef::container_id` unless restoring).
    #[serde(default)]
    pub container: Option<ContainerId>,
    /// Container address given by `PrepareTask`.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Pid of the Slurm task process (the waiter, a child of slurmstepd) that connects.
    #[serde(default)]
    pub waiter_pid: Option<i32>,
    /// The step's working directory (the agent may bind it into the container's root).
    #[serde(default)]
    pub cwd: Option<String>,
    /// The program Slurm execs for the task (argv[0]; for batch steps the script in slurmd's
    /// spool directory). The agent binds its directory when it is an absolute path.
    #[serde(default)]
    pub program: Option<String>,
}

/// Answer to `PrepareTask`: the network namespace the container's pid 1 joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedTask {
    pub container: ContainerId,
    /// Path of a bind-mounted network namespace (kept by the agent), e.g. `/run/netns/j42.s0.t0`.
    pub netns: String,
    /// The container's /32 address.
    pub address: String,
    /// Host name set in the container's UTS namespace; the node's when absent.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Root to pivot into, prepared by the agent (mountpoints and symlinks exist), as for the
    /// agent's own containers so dump and restore treat both alike. `None`: the container keeps
    /// the node's file system with a private /proc (not restorable by CRIU).
    #[serde(default)]
    pub root: Option<String>,
    /// Mounts made under `root` before the pivot, in order.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
}

/// Answer to `PrepareRestore`: how the restore step's task runs CRIU so that the restored tree
/// becomes its child (and so part of the destination step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePlan {
    pub migration: MigrationId,
    pub container: ContainerId,
    /// CRIU binary.
    pub criu: String,
    /// Arguments after the binary, starting with `restore` (images or page server, `--join-ns`
    /// or external net, lazy pages...). The plugin appends `--restore-detached --restore-sibling
    /// --pidfile FILE` and one `--inherit-fd fd[N]:KEY` per entry of `stdio_keys`.
    pub args: Vec<String>,
    /// CRIU keys of the dumped pid 1's fds 0, 1, 2 (e.g. `pipe:[1234]`); the restore task's own
    /// stdio takes their place. `None` leaves that fd to the images.
    #[serde(default)]
    pub stdio_keys: Vec<Option<String>>,
    /// Files the plugin opens and hands to CRIU as `--inherit-fd fd[N]:KEY`, as (KEY, PATH):
    /// e.g. the container's external network namespace (`/run/netns/...`) under the key the dump
    /// used in `--external net[INODE]:KEY`.
    #[serde(default)]
    pub inherit_files: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    pub container: ContainerId,
    /// Destination node name.
    pub destination: String,
    /// Destination agent address (`host:port`); resolved from the node name when absent.
    #[serde(default)]
    pub destination_addr: Option<String>,
    pub mode: MigrationMode,
    /// Upper bound on the downtime the caller accepts (guides `auto`).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Whole-migration timeout; after it the migration rolls back.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Requests on the agent's local control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    Capabilities,
    Metrics,
    ListContainers,
    GetContainer {
        id: ContainerId,
    },
    CreateContainer {
        spec: ContainerSpec,
    },
    /// SPANK plugin, in the task process before the container's pid 1 exists: create the
    /// container's network namespace. `registration.pid` is the task process (the waiter).
    PrepareTask {
        registration: TaskRegistration,
    },
    /// `registration.pid` is the container's pid 1; answered with `Reply::Container`.
    RegisterTask {
        registration: TaskRegistration,
    },
    /// The waiter reaped the container's pid 1 (`wait_status` as from waitpid). Answered with
    /// `Reply::TaskFinished` once the task's final status is known: at once, or, when the
    /// container was dumped by a migration, after its restored copy ended on the destination.
    TaskExited {
        container: ContainerId,
        wait_status: i32,
    },
    /// Restore step (`--rebalancer-restore=ID`): the plan for restoring migration `migration`
    /// under this task; `registration` describes the restore step's task.
    PrepareRestore {
        migration: MigrationId,
        registration: TaskRegistration,
    },
    KillContainer {
        id: ContainerId,
        signal: i32,
    },
    /// Starts a migration and answers with its record; progress follows as events when `watch`.
    Migrate {
        request: MigrateRequest,
        #[serde(default)]
        watch: bool,
    },
    GetMigration {
        id: MigrationId,
    },
    ListMigrations,
    /// Controller only: the address blocks leased to this node (the whole set, every time),
    /// and the addresses of its blocks the controller frees. Answered with
    /// [`Reply::AddressBlocks`]: what the agent holds now and whether it wants another block.
    AddressBlocks {
        lease: BlockLease,
    },
    /// Cancels a running migration this node is the source of, answered with its record as it
    /// stands. Accepted before the commit point: the source rolls back as on any failure (the
    /// record ends `rolled-back` with `cancelled_by`). Refused (`busy`) once the source has
    /// reached its commit point, and (`not_found`) when no migration of that id runs here.
    /// Administrators only.
    CancelMigration {
        id: MigrationId,
        /// Who asked, as the record's `cancelled_by` will say (e.g. `uid 1000 (rebalctl)`).
        by: String,
    },
    /// TCP control port only, first request after the hellos: the controller proves itself
    /// with a munge credential bound to the agent's hello nonce
    /// ([`crate::auth::CONTROL_DOMAIN`], from the controller's name to the agent's node), and
    /// sends its own nonce, which the agent's answer ([`Reply::Authenticated`]) must name.
    Authenticate {
        credential: Option<String>,
        nonce: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    Pong {
        software: String,
    },
    Capabilities {
        capabilities: NodeCapabilities,
    },
    Metrics {
        metrics: NodeMetrics,
    },
    Containers {
        containers: Vec<ContainerInfo>,
    },
    Container {
        container: ContainerInfo,
    },
    Migration {
        migration: MigrationRecord,
    },
    Migrations {
        migrations: Vec<MigrationRecord>,
    },
    TaskPrepared {
        prepared: PreparedTask,
    },
    /// Final status of a task (`wait_status` as from waitpid) and where it ended.
    TaskFinished {
        wait_status: i32,
        #[serde(default)]
        migrated_to: Option<String>,
    },
    RestorePlan {
        plan: RestorePlan,
    },
    Done,
    /// Answer to `AddressBlocks`.
    AddressBlocks {
        blocks: BlockState,
    },
    /// Answer to `Authenticate`: the agent's credential, bound to the controller's nonce
    /// (from the agent's node to the controller's name).
    Authenticated {
        credential: Option<String>,
    },
}

/// The controller's lease of address blocks to one node (`address-blocks`). Blocks are indices
/// of `block_prefix`-sized blocks of `pool`, counted from its first address (block 1 of
/// `198.19.0.0/20` in /26 blocks is `198.19.0.64/26`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLease {
    /// The cluster's container subnet, e.g. `198.19.0.0/20`; must lie inside the agent's
    /// `container_subnet`.
    pub pool: String,
    /// Prefix length of one block, e.g. 26.
    pub block_prefix: u8,
    /// Every block leased to the node, journaled by the controller before it sends them. A
    /// block the agent held and that is missing here is no longer its own.
    pub blocks: Vec<u32>,
    /// Addresses of the node's blocks that a container which moved away held, and that the
    /// controller saw end: the agent may hand them out again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<String>,
    /// The agent asks for another block (`want_block`) when fewer addresses are free.
    #[serde(default)]
    pub low_water: u32,
}

/// How an agent picks container addresses (`ipam` in its configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpamMode {
    /// From blocks the controller leases (the default).
    Leased,
    /// A random free address of the whole subnet, chosen alone (single-agent labs only).
    Local,
}

/// An address of the node's blocks held by a container that moved to another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LentAddress {
    pub address: String,
    pub container: ContainerId,
}

/// An agent's addresses after an `address-blocks` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub mode: IpamMode,
    /// The blocks the agent now allocates from (none in `local` mode).
    pub blocks: Vec<u32>,
    /// Addresses of those blocks a new container could have.
    pub free: u32,
    /// Addresses in use by containers on this node (from any block).
    pub used: u32,
    /// Addresses of its blocks held by containers that moved away; the controller releases
    /// each once it saw the container end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lent: Vec<LentAddress>,
    /// The agent asks for one more block: `free` is below the lease's `low_water`.
    pub want_block: bool,
}

// Messages are short-lived and moved once; boxing would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Ok(Reply),
    Error(ErrorReply),
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error(ErrorReply {
            code,
            message: message.into(),
        })
    }
    pub fn into_result(self) -> Result<Reply, ErrorReply> {
        match self {
            Response::Ok(r) => Ok(r),
            Response::Error(e) => Err(e),
        }
    }
}

/// Pushed by a server while a watched operation runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A migration entered a phase or made progress.
    MigrationProgress {
        migration: MigrationRecord,
        /// Bytes moved so far in the current phase, when known.
        #[serde(default)]
        progress_bytes: Option<u64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, FrameKind};

    #[test]
    fn request_round_trip_through_a_frame() {
        let req = Request::Migrate {
            request: MigrateRequest {
                container: "j1.s0.t0".into(),
                destination: "node2".into(),
                destination_addr: None,
                mode: MigrationMode::PostCopy,
                max_downtime_ms: Some(500),
                timeout_ms: None,
            },
            watch: true,
        };
        let f = Frame::json(FrameKind::Request, 9, &req).expect("encode");
        let back: Request = f.decode(FrameKind::Request, "request").expect("decode");
        assert_eq!(back, req);
        let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("json");
        assert_eq!(v["op"], "migrate");
        assert_eq!(v["request"]["mode"], "post-copy");
    }

    #[test]
    fn spank_task_messages_round_trip() {
        let reg = TaskRegistration {
            task: TaskRef {
                job_id: 7,
                step_id: 0,
                task_id: 1,
            },
            pid: 4242,
            uid: 1000,
            gid: 1000,
            node: "node1".into(),
            class: Some("batch".into()),
            mode: Some(MigrationMode::PostCopy),
            cpus: Some(2.0),
            memory_limit: None,
            container: Some("j7.s0.t1".into()),
            address: None,
            rss_bytes: None,
            waiter_pid: Some(4241),
            cwd: Some("/home/u".into()),
            program: None,
        };
        let req = Request::PrepareTask {
            registration: reg.clone(),
        };
        let v = serde_json::to_value(&req).expect("ser");
        assert_eq!(v["op"], "prepare-task");
        assert_eq!(v["registration"]["waiter_pid"], 4241);
        let back: Request = serde_json::from_value(v).expect("de");
        assert_eq!(back, req);
        // Older senders omit the optional registration fields.
        let old = serde_json::json!({"op": "register-task", "registration": {
            "task": {"job_id": 7, "step_id": 0, "task_id": 1}, "pid": 5, "uid": 0, "gid": 0,
            "node": "n", "class": null, "cpus": null, "memory_limit": null}});
        assert!(matches!(
            serde_json::from_value::<Request>(old).expect("old registration"),
            Request::RegisterTask { registration } if registration.container.is_none()
        ));
        let fin = Response::Ok(Reply::TaskFinished {
            wait_status: 256,
            migrated_to: Some("node2".into()),
        });
        let s = serde_json::to_string(&fin).expect("ser");
        assert!(s.contains("task-finished"), "{s}");
        assert_eq!(serde_json::from_str::<Response>(&s).expect("de"), fin);
    }

    #[test]
    fn unknown_op_is_a_payload_error() {
        let f = Frame::json(
            FrameKind::Request,
            1,
            &serde_json::json!({"op": "format-disk"}),
        )
        .expect("encode");
        assert!(f.decode::<Request>(FrameKind::Request, "request").is_err());
    }

    #[test]
    fn error_response_round_trip() {
        let r = Response::error(ErrorCode::NotFound, "no container 'x' on node1");
        let s = serde_json::to_string(&r).expect("ser");
        let back: Response = serde_json::from_str(&s).expect("de");
        let e = back.into_result().expect_err("error");
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.code.exit_code(), 3);
    }
}
