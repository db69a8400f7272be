//! Client side of the agent's local API (Unix socket, or TCP for agents on other machines).
//!
//! One connection per call: calls are rare (a poll every few seconds, a migration now and then)
//! and a fresh connection never inherits a broken stream.

use std::time::Duration;

use rebalancer_proto::frame::{read_frame_async, write_frame_async, Frame, FrameKind};
use rebalancer_proto::{
    ContainerInfo, ErrorReply, Event, Hello, MigrateRequest, MigrationRecord, NodeCapabilities,
    NodeMetrics, ProtoError, Reply, Request, Response, Role, MAX_FRAME_LEN,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::config::AgentAddr;

pub const SOFTWARE: &str = concat!("rebalancerd ", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the agent at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("protocol error talking to the agent at {addr}")]
    Proto {
        addr: String,
        #[source]
        source: ProtoError,
    },
    #[error("the agent at {addr} did not answer within {ms} ms")]
    Timeout { addr: String, ms: u128 },
    #[error("the agent refused: {0}")]
    Remote(ErrorReply),
    #[error("the agent at {addr} sent an unexpected reply to {op}")]
    UnexpectedReply { addr: String, op: &'static str },
}

impl AgentError {
    /// The error code reported to controller clients.
    pub fn code(&self) -> rebalancer_proto::ErrorCode {
        use rebalancer_proto::ErrorCode;
        match self {
            AgentError::Connect { .. } | AgentError::Timeout { .. } => ErrorCode::Unreachable,
            AgentError::Proto {
                source: ProtoError::Version { .. },
                ..
            } => ErrorCode::Version,
            AgentError::Proto { .. } | AgentError::UnexpectedReply { .. } => ErrorCode::Internal,
            AgentError::Remote(e) => e.code,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Debug, Clone)]
pub struct AgentClient {
    pub addr: AgentAddr,
    pub timeout: Duration,
}

struct Conn {
    s: Box<dyn Stream>,
    addr: String,
    next_id: u32,
}

impl Conn {
    fn proto(&self, source: ProtoError) -> AgentError {
        AgentError::Proto {
            addr: self.addr.clone(),
            source,
        }
    }

    async fn send(&mut self, req: &Request) -> Result<u32, AgentError> {
        self.next_id += 1;
        let id = self.next_id;
        let f = Frame::json(FrameKind::Request, id, req).map_err(|e| self.proto(e))?;
        write_frame_async(&mut self.s, &f)
            .await
            .map_err(|e| self.proto(e))?;
        Ok(id)
    }

    async fn recv(&mut self) -> Result<Frame, AgentError> {
        read_frame_async(&mut self.s, MAX_FRAME_LEN)
            .await
            .map_err(|e| self.proto(e))
    }
}

impl AgentClient {
    pub fn new(addr: AgentAddr, timeout: Duration) -> Self {
        AgentClient { addr, timeout }
    }

    async fn connect(&self) -> Result<Conn, AgentError> {
        let addr = self.addr.to_string();
        let connect = async {
            let s: Box<dyn Stream> = match &self.addr {
                AgentAddr::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
                AgentAddr::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a.as_str()).await?),
            };
            Ok::<_, std::io::Error>(s)
        };
        let s = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| AgentError::Timeout {
                addr: addr.clone(),
                ms: self.timeout.as_millis(),
            })?
            .map_err(|source| AgentError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let mut c = Conn {
            s,
            addr,
            next_id: 0,
        };
        let hello = Frame::json(FrameKind::Hello, 0, &Hello::new(Role::Controller, SOFTWARE))
            .map_err(|e| c.proto(e))?;
        let handshake = async {
            write_frame_async(&mut c.s, &hello)
                .await
                .map_err(|e| c.proto(e))?;
            let f = c.recv().await?;
            match f.header.kind {
                FrameKind::Hello => {
                    let h: Hello = f
                        .decode(FrameKind::Hello, "hello")
                        .map_err(|e| c.proto(e))?;
                    if h.protocol != rebalancer_proto::PROTOCOL_VERSION {
                        return Err(c.proto(ProtoError::Version {
                            got: h.protocol,
                            want: rebalancer_proto::PROTOCOL_VERSION,
                        }));
                    }
                    Ok(())
                }
                FrameKind::Response => {
                    let r: Response = f
                        .decode(FrameKind::Response, "response")
                        .map_err(|e| c.proto(e))?;
                    match r {
                        Response::Error(e) => Err(AgentError::Remote(e)),
                        Response::Ok(_) => Err(AgentError::UnexpectedReply {
                            addr: c.addr.clone(),
                            op: "hello",
                        }),
                    }
                }
                other => Err(c.proto(ProtoError::Unexpected {
                    expected: "hello",
                    got: other,
                })),
            }
        };
        tokio::time::timeout(self.timeout, handshake)
            .await
            .map_err(|_| AgentError::Timeout {
                addr: self.addr.to_string(),
                ms: self.timeout.as_millis(),
            })??;
        Ok(c)
    }

    /// One request, one response, within the timeout.
    pub async fn call(&self, req: Request) -> Result<Reply, AgentError> {
        let work = async {
            let mut c = self.connect().await?;
            let id = c.send(&req).await?;
            loop {
                let f = c.recv().await?;
                if f.header.kind == FrameKind::Event || f.header.id != id {
                    continue;
                }
                let r: Response = f
                    .decode(FrameKind::Response, "response")
                    .map_err(|e| c.proto(e))?;
                return r.into_result().map_err(AgentError::Remote);
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| AgentError::Timeout {
                addr: self.addr.to_string(),
                ms: self.timeout.as_millis(),
            })?
    }

    pub async fn metrics(&self) -> Result<NodeMetrics, AgentError> {
        match self.call(Request::Metrics).await? {
            Reply::Metrics { metrics } => Ok(metrics),
            _ => Err(self.unexpected("metrics")),
        }
    }

    pub async fn capabilities(&self) -> Result<NodeCapabilities, AgentError> {
        match self.call(Request::Capabilities).await? {
            Reply::Capabilities { capabilities } => Ok(capabilities),
            _ => Err(self.unexpected("capabilities")),
        }
    }

    pub async fn containers(&self) -> Result<Vec<ContainerInfo>, AgentError> {
        match self.call(Request::ListContainers).await? {
            Reply::Containers { containers } => Ok(containers),
            _ => Err(self.unexpected("list-containers")),
        }
    }

    pub async fn migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        match self
            .call(Request::GetMigration { id: id.to_string() })
            .await?
        {
            Reply::Migration { migration } => Ok(migration),
            _ => Err(self.unexpected("get-migration")),
        }
    }

    fn unexpected(&self, op: &'static str) -> AgentError {
        AgentError::UnexpectedReply {
            addr: self.addr.to_string(),
            op,
        }
    }

    /// Starts a migration on the source agent and follows it to its end, forwarding progress
    /// events; `started` receives the first record as soon as the agent accepted the request.
    /// Returns the final record. `overall` bounds the whole migration.
    pub async fn migrate(
        &self,
        request: MigrateRequest,
        events: mpsc::UnboundedSender<Event>,
        started: tokio::sync::oneshot::Sender<MigrationRecord>,
        overall: Duration,
    ) -> Result<MigrationRecord, AgentError> {
        let mut started = Some(started);
        let mut c = self.connect().await?;
        let id = c
            .send(&Request::Migrate {
                request,
                watch: true,
            })
            .await?;
        let follow = async {
            loop {
                let f = c.recv().await?;
                if f.header.id != id {
                    continue;
                }
                match f.header.kind {
                    FrameKind::Event => {
                        if let Ok(ev) = f.decode::<Event>(FrameKind::Event, "event") {
                            let Event::MigrationProgress { migration, .. } = &ev;
                            if let Some(tx) = started.take() {
                                let _ = tx.send(migration.clone());
                            }
                            let _ = events.send(ev);
                        }
                    }
                    _ => {
                        let r: Response = f
                            .decode(FrameKind::Response, "response")
                            .map_err(|e| c.proto(e))?;
                        match r.into_result().map_err(AgentError::Remote)? {
                            Reply::Migration { migration } => {
                                if let Some(tx) = started.take() {
                                    let _ = tx.send(migration.clone());
                                }
                                return Ok(migration);
                            }
                            _ => return Err(self.unexpected("migrate")),
                        }
                    }
                }
            }
        };
        let mut rec =
            tokio::time::timeout(overall, follow)
                .await
                .map_err(|_| AgentError::Timeout {
                    addr: self.addr.to_string(),
                    ms: overall.as_millis(),
                })??;
        // An agent that answers before the end: poll until the record is terminal.
        let deadline = tokio::time::Instant::now() + overall;
        while !rec.state.is_terminal() {
            if tokio::time::Instant::now() > deadline {
                return Err(AgentError::Timeout {
                    addr: self.addr.to_string(),
                    ms: overall.as_millis(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let next = self.migration(&rec.id).await?;
            if next != rec {
                let _ = events.send(Event::MigrationProgress {
                    migration: next.clone(),
                    progress_bytes: None,
                });
            }
            rec = next;
        }
        Ok(rec)
    }
}
