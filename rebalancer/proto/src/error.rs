use serde::{Deserialize, Serialize};

// This module depends only on `kind`, never on `frame`: frame.rs builds on the errors.
use crate::kind::FrameKind;

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
        got: FrameKind,
    },
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("no common protocol version: peer speaks {peer}, this side speaks {local}")]
    NoCommonVersion {
        peer: VersionRange,
        local: VersionRange,
    },
    #[error("peer refused: {0}")]
    Refused(ErrorReply),
    #[error("reply carries request id {got}, expected {want}")]
    IdMismatch { got: u32, want: u32 },
    #[error("no frame within the {what} timeout of {ms} ms")]
    Timeout { what: &'static str, ms: u128 },
    #[error("invalid channel configuration: {0}")]
    Config(&'static str),
}

impl ProtoError {
    /// The error code a server reports for this error, and a client maps to an exit code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::Version { .. } | ProtoError::NoCommonVersion { .. } => ErrorCode::Version,
            ProtoError::Refused(e) => e.code,
            ProtoError::Timeout { .. } => ErrorCode::Timeout,
            ProtoError::Io(_) | ProtoError::Closed | ProtoError::Truncated => {
                ErrorCode::Unreachable
            }
            ProtoError::BadMagic(_)
            | ProtoError::BadKind(_)
            | ProtoError::TooLarge { .. }
            | ProtoError::Payload { .. }
            | ProtoError::Unexpected { .. }
            | ProtoError::IdMismatch { .. } => ErrorCode::BadRequest,
            ProtoError::Config(_) => ErrorCode::Internal,
        }
    }
}

/// An inclusive range of message-set versions a side speaks (see [`crate::Hello`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

impl VersionRange {
    pub const fn new(min: u16, max: u16) -> Self {
        VersionRange { min, max }
    }

    /// The highest version both ranges contain.
    pub fn highest_common(&self, other: &VersionRange) -> Option<u16> {
        let hi = self.max.min(other.max);
        let lo = self.min.max(other.min);
        (hi >= lo).then_some(hi)
    }
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.max)
        } else {
            write!(f, "versions {}..={}", self.min, self.max)
        }
    }
}

/// The payload of an error response: a stable code and a sentence for humans.
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
