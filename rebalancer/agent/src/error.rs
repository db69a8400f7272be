//! The agent's error type and the helper that runs external tools.

use rebalancer_proto::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("criu {action} failed: {message}")]
    Criu {
        action: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    NoRoom(String),
    #[error("{0}")]
    Timeout(String),
    /// No common protocol version with a peer.
    #[error("{0}")]
    Version(String),
    #[error("peer: {0}")]
    Peer(String),
    /// An operator cancelled the migration before its commit point (`{0}`: who).
    #[error("cancelled by {0}")]
    Cancelled(String),
    #[error("protocol")]
    Proto(#[from] rebalancer_proto::ProtoError),
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::NotFound(_) => ErrorCode::NotFound,
            AgentError::Busy(_) => ErrorCode::Busy,
            AgentError::BadRequest(_) => ErrorCode::BadRequest,
            AgentError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            AgentError::Unreachable(_) => ErrorCode::Unreachable,
            AgentError::Unsupported(_) => ErrorCode::Unsupported,
            AgentError::NoRoom(_) => ErrorCode::NoRoom,
            AgentError::Timeout(_) => ErrorCode::Timeout,
            AgentError::Version(_) => ErrorCode::Version,
            AgentError::Cancelled(_) => ErrorCode::RolledBack,
            _ => ErrorCode::Internal,
        }
    }

    /// The whole chain of causes on one line.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}

/// Runs a tool to completion; non-zero exit becomes [`AgentError::Command`] with its stderr.
pub async fn run_cmd(prog: &str, args: &[&str]) -> Result<String, AgentError> {
    let command = format!("{prog} {}", args.join(" "));
    let out = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| AgentError::Io {
            what: format!("cannot run `{command}`"),
            source,
        })?;
    if !out.status.success() {
        return Err(AgentError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
