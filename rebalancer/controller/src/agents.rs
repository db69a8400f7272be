//! Client side of the agent's control API: its Unix socket, or its TCP control port for
//! agents on other machines. Over TCP both sides prove themselves with munge credentials
//! bound to this connection (see [`rebalancer_proto::auth`] and PROTOCOL.md): the agent's
//! hello carries its nonce, the controller's `authenticate` answers it with a credential from
//! this controller's name to the node and carries the controller's nonce, and the agent's
//! answer must be root's credential from that node bound to it. With TCP control protocol 2
//! (the default when both ends speak it) the connection continues inside TLS 1.3 after the
//! hellos ([`rebalancer_proto::tls`]) and both credentials also name the TLS session's
//! exporter, so that they are valid inside that one session only; protocol 1 (an agent of an
//! earlier release) stays in clear and is logged.
//!
//! Over a Unix socket, one connection per call: calls are rare (a poll every few seconds, a
//! migration now and then) and a fresh connection never inherits a broken stream. Over TCP,
//! authenticating costs two munge and two unmunge runs on each side, too much for every poll:
//! up to [`POOL_PER_AGENT`] authenticated connections per agent are kept between calls, and a
//! call that finds its kept connection closed (the agent restarted, or its idle timeout passed)
//! is sent once more on a fresh one. Only the read-only `call` requests use kept connections; a
//! migration has a connection of its own.

use std::time::Duration;

use rebalancer_proto::auth::{AuthError, Binding, Expect, CONTROL_DOMAIN};
use rebalancer_proto::channel::{AsyncChannel, ChannelConfig};
use rebalancer_proto::tls::{self, MaybeTls, Side, TlsError};
use rebalancer_proto::{
    ContainerInfo, ErrorReply, Event, Hello, MigrateRequest, MigrationRecord, NodeCapabilities,
    NodeMetrics, ProtoError, Reply, Request, Response, Role, VersionRange, CONTROL_TCP_ENCRYPTED,
    CONTROL_TCP_VERSIONS,
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
    #[error("authentication with the agent at {addr} failed")]
    Auth {
        addr: String,
        #[source]
        source: AuthError,
    },
    #[error("the agent at {addr} is node {got}, expected {want}")]
    WrongNode {
        addr: String,
        got: String,
        want: String,
    },
    #[error("no encrypted channel with the agent at {addr}")]
    Tls {
        addr: String,
        #[source]
        source: TlsError,
    },
}

impl AgentError {
    /// The error code reported to controller clients.
    pub fn code(&self) -> rebalancer_proto::ErrorCode {
        use rebalancer_proto::ErrorCode;
        match self {
            AgentError::Connect { .. }
            | AgentError::Timeout { .. }
            | AgentError::Tls {
                source: TlsError::Timeout { .. },
                ..
            } => ErrorCode::Unreachable,
            AgentError::Tls { .. } => ErrorCode::Internal,
            AgentError::Proto {
                source: ProtoError::Version { .. } | ProtoError::NoCommonVersion { .. },
                ..
            } => ErrorCode::Version,
            AgentError::Proto { .. } | AgentError::UnexpectedReply { .. } => ErrorCode::Internal,
            AgentError::Remote(e) => e.code,
            AgentError::Auth {
                source: AuthError::Busy(_),
                ..
            } => ErrorCode::Busy,
            AgentError::Auth {
                source: AuthError::Timeout { .. },
                ..
            } => ErrorCode::Timeout,
            AgentError::Auth { .. } | AgentError::WrongNode { .. } => ErrorCode::PermissionDenied,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Debug, Clone)]
pub struct AgentClient {
    pub addr: AgentAddr,
    pub timeout: Duration,
    /// Who is who in credentials over TCP.
    pub identity: Option<TcpIdentity>,
}

/// The names a TCP connection's credentials carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpIdentity {
    /// The node whose agent this client means to reach.
    pub node: String,
    /// This controller's name.
    pub controller: String,
    pub munge_socket: Option<std::path::PathBuf>,
    /// TCP control protocol versions offered (`agents.control_protocol`).
    pub versions: VersionRange,
}

/// Kept authenticated TCP connections per agent address (see the module docs).
pub const POOL_PER_AGENT: usize = 2;

type Pool = std::sync::Mutex<std::collections::HashMap<String, Vec<Conn>>>;

fn pool() -> &'static Pool {
    static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
    POOL.get_or_init(Default::default)
}

/// Whether a failure on a kept connection means it was closed under us.
fn stale(e: &ProtoError) -> bool {
    matches!(
        e,
        ProtoError::Closed | ProtoError::Truncated | ProtoError::Io(_)
    )
}

/// One connection to an agent: the channel (in TLS with control protocol 2) plus the address
/// for error messages.
struct Conn {
    ch: AsyncChannel<MaybeTls<Box<dyn Stream>>>,
    addr: String,
    /// This connection's TLS exporter (protocol 2), which both credentials name.
    session: Option<String>,
}

impl Conn {
    fn proto(&self, source: ProtoError) -> AgentError {
        proto_err(&self.addr, source)
    }
}

/// The agent's own refusal and a timeout keep their meaning; the rest is a protocol failure.
fn proto_err(addr: &str, source: ProtoError) -> AgentError {
    match source {
        ProtoError::Refused(e) => AgentError::Remote(e),
        ProtoError::Timeout { ms, .. } => AgentError::Timeout {
            addr: addr.to_string(),
            ms,
        },
        source => AgentError::Proto {
            addr: addr.to_string(),
            source,
        },
    }
}

impl AgentClient {
    pub fn new(addr: AgentAddr, timeout: Duration) -> Self {
        AgentClient {
            addr,
            timeout,
            identity: None,
        }
    }

    /// The client of `node`'s agent as the configuration says to reach it.
    pub fn for_node(node: &str, cfg: &crate::config::AgentsConfig) -> Option<Self> {
        cfg.address_of(node).map(|addr| AgentClient {
            addr,
            timeout: cfg.timeout,
            identity: Some(TcpIdentity {
                node: node.to_string(),
                controller: cfg.name.clone(),
                munge_socket: cfg.munge_socket.clone(),
                versions: cfg.control_protocol,
            }),
        })
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
        // The handshake and every call are bounded by the client's timeout.
        let mut cfg = ChannelConfig::default()
            .idle_timeout(Some(self.timeout))
            .call_timeout(Some(self.timeout));
        let mut hello = Hello::new(Role::Controller, SOFTWARE);
        let tcp = matches!(self.addr, AgentAddr::Tcp(_));
        let offered = self
            .identity
            .as_ref()
            .map_or(CONTROL_TCP_VERSIONS, |i| i.versions);
        if tcp {
            hello.node = self.identity.as_ref().map(|i| i.controller.clone());
            cfg = cfg.versions(offered);
        }
        let ch = AsyncChannel::connect(s, cfg, hello)
            .await
            .map_err(|e| proto_err(&addr, e))?;
        let version = ch.negotiated().version;
        if tcp {
            // Downgrade protection: a current agent's nonce states its range, which comes back
            // to it inside our credential; the version it agreed to must be the best of both.
            let nonce = ch.negotiated().peer.nonce.as_deref();
            rebalancer_proto::auth::check_agreed(offered, version, nonce).map_err(|source| {
                AgentError::Auth {
                    addr: addr.clone(),
                    source,
                }
            })?;
        }
        let tls_err = |source| AgentError::Tls {
            addr: addr.clone(),
            source,
        };
        let (ch, session) = if tcp && version >= CONTROL_TCP_ENCRYPTED {
            let (ch, e) = tls::upgrade(ch, Side::Client, self.timeout, tls::CONTROL)
                .await
                .map_err(tls_err)?;
            (ch, Some(e))
        } else {
            if tcp {
                tracing::warn!(agent = %addr, version, "TCP control protocol {version}: the connection with the agent is not encrypted (an agent of an earlier release?)");
            }
            (tls::plain(ch).map_err(tls_err)?, None)
        };
        let mut c = Conn { ch, addr, session };
        if tcp {
            self.authenticate(&mut c).await?;
        }
        Ok(c)
    }

    /// Mutual authentication on a fresh TCP connection (see the module docs).
    async fn authenticate(&self, c: &mut Conn) -> Result<(), AgentError> {
        let auth = |source| AgentError::Auth {
            addr: c.addr.clone(),
            source,
        };
        let id = self.identity.as_ref().ok_or_else(|| {
            auth(AuthError::Munge(
                "no node name for a TCP agent connection".into(),
            ))
        })?;
        let peer = c.ch.negotiated().peer.clone();
        let got = peer.node.clone().unwrap_or_default();
        if got != id.node {
            return Err(AgentError::WrongNode {
                addr: c.addr.clone(),
                got,
                want: id.node.clone(),
            });
        }
        let their_nonce = peer.nonce.clone().ok_or_else(|| {
            auth(AuthError::Malformed(
                "the agent's hello carries no nonce: no TCP control port there?".into(),
            ))
        })?;
        let sock = id.munge_socket.as_deref();
        // The range our hello offered, for an agent whose nonce states its own (a current
        // one: an earlier release's strict parser would refuse the field).
        let offer = matches!(
            rebalancer_proto::auth::nonce_range(&their_nonce),
            Ok(Some(_))
        )
        .then_some(id.versions);
        let binding = Binding {
            domain: CONTROL_DOMAIN,
            from: id.controller.clone(),
            to: id.node.clone(),
            nonce: their_nonce,
            session: c.session.clone(),
            offer,
        };
        let ours = rebalancer_proto::munge::bound_credential(sock, &binding)
            .await
            .map_err(auth)?;
        let our_nonce = rebalancer_proto::auth::nonce();
        let req = Request::Authenticate {
            credential: Some(ours),
            nonce: our_nonce.clone(),
        };
        let r: Response = c.ch.call(&req).await.map_err(|e| c.proto(e))?;
        let credential = match r.into_result().map_err(AgentError::Remote)? {
            Reply::Authenticated { credential } => credential,
            _ => return Err(self.unexpected("authenticate")),
        };
        // Agents run as root: only root's credential from that node proves it.
        let expect = Expect {
            domain: CONTROL_DOMAIN,
            uids: &[0],
            from: Some(&id.node),
            to: &id.controller,
            nonce: &our_nonce,
            session: c.session.as_deref(),
            offer: None,
        };
        rebalancer_proto::munge::verify(sock, credential.as_deref(), &expect)
            .await
            .map_err(auth)?;
        Ok(())
    }

    /// The key of this client's kept connections: TCP only, per address and identity.
    fn pool_key(&self) -> Option<String> {
        match (&self.addr, &self.identity) {
            (AgentAddr::Tcp(a), Some(id)) => Some(format!("{a} {} {}", id.node, id.controller)),
            _ => None,
        }
    }

    fn checkout(&self) -> Option<Conn> {
        let key = self.pool_key()?;
        let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
        p.get_mut(&key).and_then(Vec::pop)
    }

    fn checkin(&self, c: Conn) {
        if let Some(key) = self.pool_key() {
            let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
            let kept = p.entry(key).or_default();
            if kept.len() < POOL_PER_AGENT {
                kept.push(c);
            }
        }
    }

    /// One request, one response, within the timeout. Only for requests that may be sent twice
    /// (reads): a kept connection found closed is retried once on a fresh one.
    pub async fn call(&self, req: Request) -> Result<Reply, AgentError> {
        let work = async {
            if let Some(mut c) = self.checkout() {
                match c.ch.call::<Response>(&req).await {
                    Ok(r) => {
                        self.checkin(c);
                        return r.into_result().map_err(AgentError::Remote);
                    }
                    Err(e) if stale(&e) => {
                        tracing::debug!(agent = %self.addr, "kept connection closed: {e}; reconnecting")
                    }
                    Err(e) => return Err(c.proto(e)),
                }
            }
            let mut c = self.connect().await?;
            let r: Response = c.ch.call(&req).await.map_err(|e| c.proto(e))?;
            self.checkin(c);
            r.into_result().map_err(AgentError::Remote)
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
        let req = Request::Migrate {
            request,
            watch: true,
        };
        let answer =
            c.ch.call_with::<Response>(&req, Some(overall), |ev| {
                let Event::MigrationProgress { migration, .. } = &ev;
                if let Some(tx) = started.take() {
                    let _ = tx.send(migration.clone());
                }
                let _ = events.send(ev);
            })
            .await
            .map_err(|e| c.proto(e))?;
        let mut rec = match answer.into_result().map_err(AgentError::Remote)? {
            Reply::Migration { migration } => {
                if let Some(tx) = started.take() {
                    let _ = tx.send(migration.clone());
                }
                migration
            }
            _ => return Err(self.unexpected("migrate")),
        };
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
