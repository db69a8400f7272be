//! Messages of the local control API (Unix socket of the agent) and the handshake.
//!
//! Agent ↔ agent messages live in the agent's peer module; controller API messages in
//! [`crate::control`].

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::frame::PROTOCOL_VERSION;
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

/// First frame in each direction. The server answers with its own `Hello` or an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    /// e.g. `rebalancer-agent 0.1.0`.
    pub software: String,
    pub role: Role,
    #[serde(default)]
    pub node: Option<String>,
    /// Authentication credential (a munge credential between nodes).
    #[serde(default)]
    pub credential: Option<String>,
}

impl Hello {
    pub fn new(role: Role, software: impl Into<String>) -> Self {
        Hello {
            protocol: PROTOCOL_VERSION,
            software: software.into(),
            role,
            node: None,
            credential: None,
        }
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
    RegisterTask {
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    Pong { software: String },
    Capabilities { capabilities: NodeCapabilities },
    Metrics { metrics: NodeMetrics },
    Containers { containers: Vec<ContainerInfo> },
    Container { container: ContainerInfo },
    Migration { migration: MigrationRecord },
    Migrations { migrations: Vec<MigrationRecord> },
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorReply {}

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
