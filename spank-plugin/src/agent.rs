//! Blocking client of the node agent's control socket (see rebalancer/proto/PROTOCOL.md).
//!
//! One connection per task, held by the waiter for the task's whole life: the agent sees the
//! task process as the peer (SO_PEERCRED) and learns of a dead waiter when the socket closes.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rebalancer_proto::channel::{Channel, ChannelConfig};
use rebalancer_proto::{ErrorReply, Hello, ProtoError, Reply, Request, Response, Role};

/// Control messages are small; anything larger is a confused peer.
const MAX_REPLY: u32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the node agent at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("conversation with the node agent failed")]
    Proto(#[from] ProtoError),
    #[error("the node agent refused")]
    Refused(#[from] ErrorReply),
    #[error("the node agent answered {got} to {op}")]
    Unexpected { op: &'static str, got: String },
}

/// A refused handshake is the agent's answer, not a broken conversation.
fn refused(e: ProtoError) -> AgentError {
    match e {
        ProtoError::Refused(r) => AgentError::Refused(r),
        other => AgentError::Proto(other),
    }
}

pub struct Agent {
    ch: Channel<UnixStream>,
    /// Bound on each call; `None` waits forever.
    timeout: Option<Duration>,
    path: PathBuf,
    node: String,
}

impl Agent {
    /// Connects and exchanges `Hello`s; `timeout` bounds every call until changed.
    pub fn connect(path: &Path, node: &str, timeout: Duration) -> Result<Agent, AgentError> {
        let stream = UnixStream::connect(path).map_err(|source| AgentError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut hello = Hello::new(
            Role::Spank,
            concat!("slurm-rebalancer-spank ", env!("CARGO_PKG_VERSION")),
        );
        hello.node = Some(node.into());
        // The waiter holds the connection for the task's whole life: no idle limit.
        let cfg = ChannelConfig::default()
            .max_frame(MAX_REPLY)
            .idle_timeout(None)
            .call_timeout(Some(timeout));
        let ch = Channel::connect(stream, cfg, hello).map_err(refused)?;
        Ok(Agent {
            ch,
            timeout: Some(timeout),
            path: path.to_path_buf(),
            node: node.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Bound on the calls that follow; `None` waits forever (used while the task runs).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> std::io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a zero timeout",
            ));
        }
        self.timeout = t;
        Ok(())
    }

    pub fn call(&mut self, req: &Request) -> Result<Reply, AgentError> {
        self.send(req)?;
        self.recv()
    }

    /// Sends a request without waiting for its answer (see [`Agent::recv`]).
    pub fn send(&mut self, req: &Request) -> Result<(), AgentError> {
        self.ch.send_request(req)?;
        Ok(())
    }

    /// Whether an answer can be read within `timeout`.
    pub fn readable(&self, timeout: Duration) -> bool {
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(self.ch.get_ref()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: p is one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        n > 0
    }

    /// Reads the answer to the last request sent (its events, which this API never asks
    /// for, are dropped).
    pub fn recv(&mut self) -> Result<Reply, AgentError> {
        let Some(id) = self.ch.last_sent() else {
            return Err(AgentError::Unexpected {
                op: "recv",
                got: "no request sent".into(),
            });
        };
        let r: Response = self.ch.recv_response(id, self.timeout, |_| {})?;
        Ok(r.into_result()?)
    }
}

/// Name of a reply variant, for error messages.
pub fn reply_name(r: &Reply) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from))
        .unwrap_or_else(|| "an unknown reply".into())
}
