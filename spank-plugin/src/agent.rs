//! Blocking client of the node agent's control socket (see rebalancer/proto/PROTOCOL.md).
//!
//! One connection per task, held by the waiter for the task's whole life: the agent sees the
//! task process as the peer (SO_PEERCRED) and learns of a dead waiter when the socket closes.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind};
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

pub struct Agent {
    stream: UnixStream,
    next_id: u32,
    path: PathBuf,
    node: String,
}

impl Agent {
    /// Connects and exchanges `Hello`s; `timeout` bounds every read and write until changed.
    pub fn connect(path: &Path, node: &str, timeout: Duration) -> Result<Agent, AgentError> {
        let connect_err = |source| AgentError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(connect_err)?;
        let mut a = Agent {
            stream,
            next_id: 1,
            path: path.to_path_buf(),
            node: node.into(),
        };
        let mut hello = Hello::new(
            Role::Spank,
            concat!("slurm-rebalancer-spank ", env!("CARGO_PKG_VERSION")),
        );
        hello.node = Some(node.into());
        write_frame(&mut a.stream, &Frame::json(FrameKind::Hello, 0, &hello)?)?;
        let f = read_frame(&mut a.stream, MAX_REPLY)?;
        if f.header.kind == FrameKind::Response {
            // The agent refused the handshake with an error response.
            let r: Response = f.decode(FrameKind::Response, "response")?;
            r.into_result()?;
            return Err(AgentError::Unexpected {
                op: "hello",
                got: "a response".into(),
            });
        }
        let _server: Hello = f.decode(FrameKind::Hello, "hello")?;
        Ok(a)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// `None` waits forever (used while the task runs).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(t)
    }

    pub fn call(&mut self, req: &Request) -> Result<Reply, AgentError> {
        self.send(req)?;
        self.recv()
    }

    /// Sends a request without waiting for its answer (see [`Agent::recv`]).
    pub fn send(&mut self, req: &Request) -> Result<(), AgentError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        write_frame(&mut self.stream, &Frame::json(FrameKind::Request, id, req)?)?;
        Ok(())
    }

    /// Whether an answer can be read within `timeout`.
    pub fn readable(&self, timeout: Duration) -> bool {
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.stream),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: p is one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        n > 0
    }

    /// Reads the answer to the last request sent.
    pub fn recv(&mut self) -> Result<Reply, AgentError> {
        loop {
            let f = read_frame(&mut self.stream, MAX_REPLY)?;
            match f.header.kind {
                // Events of other requests cannot arrive on this connection; skip defensively.
                FrameKind::Event => continue,
                _ => {
                    let r: Response = f.decode(FrameKind::Response, "response")?;
                    return Ok(r.into_result()?);
                }
            }
        }
    }
}

/// Name of a reply variant, for error messages.
pub fn reply_name(r: &Reply) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from))
        .unwrap_or_else(|| "an unknown reply".into())
}
