use serde::{Deserialize, Serialize};

/// Errors raised while encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("i/o error on the wire")]
    Io(#[from] std::io::Error),
    #[error("bad magic {0:#010x}: peer does not speak the slurm-rebalancer protocol")]
    BadMagic(u32),
    #[error("unsupported protocol version {got} (this side speaks {want})")]
    Version { got: u16, want: u16 },
    #[error("invalid frame kind {0}")]
    BadKind(u16),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    #[error("malformed {what} payload")]
    Payload {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("expected a {expected} frame, got {got:?}")]
    Unexpected {
        expected: &'static str,
        got: crate::frame::FrameKind,
    },
    #[error("peer closed the connection")]
    Closed,
}

/// Stable error codes carried in error responses; scripts and the CLI map them to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was malformed or a value is out of range.
    BadRequest,
    /// The named container, job, node, migration or policy does not exist.
    NotFound,
    /// The container is already being migrated.
    Busy,
    /// The caller may not do this.
    PermissionDenied,
    /// The destination cannot be reached.
    Unreachable,
    /// A node lacks a kernel or CRIU feature the request needs.
    Unsupported,
    /// The destination has no room (CPUs, memory, addresses).
    NoRoom,
    /// The operation did not finish in time.
    Timeout,
    /// The migration failed and was rolled back: the container still runs on its source.
    RolledBack,
    /// The peer speaks another protocol version.
    Version,
    /// An unexpected internal failure.
    Internal,
}

impl ErrorCode {
    /// Process exit code used by the command-line tools (documented in their man pages).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::BadRequest => 2,
            ErrorCode::NotFound => 3,
            ErrorCode::PermissionDenied => 4,
            ErrorCode::Busy => 5,
            ErrorCode::Unreachable => 6,
            ErrorCode::Unsupported => 7,
            ErrorCode::NoRoom => 8,
            ErrorCode::Timeout => 9,
            ErrorCode::RolledBack => 10,
            ErrorCode::Version => 11,
            ErrorCode::Internal => 1,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotFound => "not found",
            ErrorCode::Busy => "busy",
            ErrorCode::PermissionDenied => "permission denied",
            ErrorCode::Unreachable => "unreachable",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::NoRoom => "no room",
            ErrorCode::Timeout => "timeout",
            ErrorCode::RolledBack => "rolled back",
            ErrorCode::Version => "protocol version mismatch",
            ErrorCode::Internal => "internal error",
        };
        f.write_str(s)
    }
}
