//! Client end of a peer connection: the source of a migration, or a destination telling the
//! source that a migrated task ended. It speaks through [`AsyncChannel`]: request ids, the
//! frame limit checked before allocation, and a deadline on every call and write.

use std::time::Duration;

use rebalancer_proto::channel::AsyncChannel;
use rebalancer_proto::frame::{Frame, FrameKind};
use rebalancer_proto::peer::PeerEvent;
use rebalancer_proto::{ChannelConfig, Hello, ProtoError, Role, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use super::errors::error_from_reply;
use super::tls::PeerStream;
use super::wire::{ImageFile, PeerReply, PeerRequest, PeerResponse, CHUNK, PEER_MAX_FRAME};
use crate::config::AgentConfig;
use crate::error::AgentError;

/// Client end of a peer connection (source side). Generic over the stream so that unit tests
/// run it over an in-memory pipe.
pub struct PeerConn<S = TcpStream> {
    ch: AsyncChannel<PeerStream<S>>,
    /// Bytes written so far, headers included.
    pub bytes_sent: u64,
    /// Bound on each call (request to response) and each write.
    pub timeout: Duration,
    /// The agreed peer protocol version.
    pub version: u16,
    /// The node the server proved it is (version 2 or 3 with munge; `None` otherwise).
    pub peer_node: Option<String>,
}

/// The version-3 upgrade of a channel whose hellos were exchanged in clear: the same channel
/// state on a TLS stream, and the session's exporter.
pub(crate) async fn upgrade<S, F, Fut>(
    ch: AsyncChannel<PeerStream<S>>,
    tls: F,
) -> Result<(AsyncChannel<PeerStream<S>>, String), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(S) -> Fut,
    Fut: std::future::Future<Output = Result<(PeerStream<S>, String), AgentError>>,
{
    let (stream, core) = ch.into_parts()?;
    let PeerStream::Plain(raw) = stream else {
        return Err(AgentError::Internal(
            "the peer connection is already in TLS".into(),
        ));
    };
    let (stream, exporter) = tls(raw).await?;
    Ok((AsyncChannel::from_parts(stream, core), exporter))
}

/// Logs the protocol in use when it leaves the connection in clear.
pub(crate) fn note_unencrypted(version: u16, peer: Option<&str>, role: &str) {
    if version < 3 {
        tracing::warn!(peer = ?peer, version, "peer protocol {version}: the connection with the {role} agent is not encrypted (an agent of an earlier release?)");
    }
}

/// The channel's errors in the agent's terms: a refusal keeps the peer's code and sentence.
pub(crate) fn from_proto(e: ProtoError, peer: &str) -> AgentError {
    match e {
        ProtoError::Refused(reply) => error_from_reply(reply),
        ProtoError::NoCommonVersion {
            peer: theirs,
            local,
        } => AgentError::Version(format!(
            "no common peer protocol version: {peer} speaks {theirs}, this agent speaks {local}"
        )),
        ProtoError::Timeout { what, ms } => AgentError::Timeout(format!(
            "{peer} did not answer within the {what} timeout of {ms} ms"
        )),
        e => AgentError::Proto(e),
    }
}

impl PeerConn<TcpStream> {
    /// Connects to the agent at `addr` and exchanges hellos (with this node's credential).
    pub async fn connect(
        cfg: &AgentConfig,
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<PeerConn, AgentError> {
        let stream = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
            .await
            .map_err(|_| {
                AgentError::Unreachable(format!(
                    "destination agent {addr} did not answer within 3 s"
                ))
            })?
            .map_err(|e| {
                AgentError::Unreachable(format!("cannot connect to destination agent {addr}: {e}"))
            })?;
        let _ = stream.set_nodelay(true);
        PeerConn::handshake(cfg, stream, timeout).await
    }
}

/// The range this node's hello offered, stated in its credential when the destination's nonce
/// states one (a current agent); an agent of an earlier release gets none, which its strict
/// credential parser would refuse.
fn stated_offer(cfg: &AgentConfig, their_nonce: &str) -> Option<rebalancer_proto::VersionRange> {
    matches!(
        rebalancer_proto::auth::nonce_range(their_nonce),
        Ok(Some(_))
    )
    .then_some(cfg.peer_protocol)
}

impl<S: AsyncRead + AsyncWrite + Unpin> PeerConn<S> {
    /// Sends this node's hello on an open stream and checks the answer.
    pub async fn handshake(
        cfg: &AgentConfig,
        stream: S,
        timeout: Duration,
    ) -> Result<PeerConn<S>, AgentError> {
        let ours = cfg.peer_protocol;
        let nonce = crate::auth::nonce();
        let mut hello = Hello::new(Role::Agent, crate::SOFTWARE);
        hello.node = Some(cfg.node.clone());
        // A version-1 credential too, so that an agent of the previous release accepts us.
        hello.credential =
            crate::auth::credential(cfg.auth, cfg.munge_socket.as_deref(), &cfg.node).await?;
        hello.nonce = (ours.max >= 2).then(|| nonce.clone());
        let hello_len = serde_json::to_vec(&hello.clone().with_versions(ours))
            .map(|v| v.len())
            .unwrap_or(0);
        let ch_cfg = ChannelConfig::default()
            .max_frame(PEER_MAX_FRAME)
            .call_timeout(Some(timeout))
            .idle_timeout(Some(timeout))
            .versions(ours);
        let ch = AsyncChannel::connect(PeerStream::Plain(stream), ch_cfg, hello)
            .await
            .map_err(|e| from_proto(e, "the destination agent"))?;
        let h = ch.negotiated().peer.clone();
        let version = ch.negotiated().version;
        // Downgrade protection: a current destination's nonce states its range, which comes
        // back to it inside our credential; the version it agreed to must be the best of both.
        rebalancer_proto::auth::check_agreed(ours, version, h.nonce.as_deref())
            .map_err(|e| AgentError::Version(format!("the destination agent {:?}: {e}", h.node)))?;
        note_unencrypted(version, h.node.as_deref(), "destination");
        let (ch, session) = if version >= 3 {
            let (ch, e) = upgrade(ch, |raw| super::tls::connect(raw, timeout)).await?;
            (ch, Some(e))
        } else {
            (ch, None)
        };
        let mut c = PeerConn {
            version,
            ch,
            bytes_sent: (HEADER_LEN + hello_len) as u64,
            timeout,
            peer_node: None,
        };
        if c.version >= 3 {
            c.authenticate_in_tls(cfg, &h, &nonce, session.as_deref().unwrap_or_default())
                .await?;
        } else if c.version == 2 {
            c.authenticate(cfg, &h, &nonce).await?;
        } else {
            tracing::warn!(peer = ?h.node, "peer protocol 1: the destination agent is not authenticated (an agent of the previous release?)");
        }
        Ok(c)
    }

    /// Version 2: checks the server's credential (bound to our nonce), then proves this node
    /// with a credential bound to the server's nonce.
    async fn authenticate(
        &mut self,
        cfg: &AgentConfig,
        h: &Hello,
        our_nonce: &str,
    ) -> Result<(), AgentError> {
        let sock = cfg.munge_socket.as_deref();
        let server = crate::auth::verify_bound(
            cfg.auth,
            sock,
            h.credential.as_deref(),
            None,
            &cfg.node,
            our_nonce,
        )
        .await
        .map_err(|e| AgentError::PermissionDenied(format!("the destination agent: {e}")))?;
        let claimed = h.node.clone().unwrap_or_default();
        if let Some(s) = &server {
            if *s != claimed {
                return Err(AgentError::PermissionDenied(format!(
                    "the destination's credential is from {s}, its hello says {claimed}"
                )));
            }
        }
        let their_nonce = h.nonce.as_deref().ok_or_else(|| {
            AgentError::PermissionDenied("the destination sent no nonce with protocol 2".into())
        })?;
        let credential = crate::auth::bound_credential(
            cfg.auth,
            sock,
            &crate::auth::Binding {
                from: cfg.node.clone(),
                to: claimed,
                nonce: their_nonce.to_string(),
                session: None,
                offer: stated_offer(cfg, their_nonce),
            },
        )
        .await?;
        match self.call(&PeerRequest::Authenticate { credential }).await? {
            PeerReply::Authenticated { .. } => {}
            other => {
                return Err(AgentError::Peer(format!(
                    "unexpected answer to authenticate: {other:?}"
                )))
            }
        }
        self.peer_node = server;
        Ok(())
    }

    /// Version 3, inside TLS: proves this node with a credential bound to the server's nonce
    /// and this TLS session, then checks the server's, bound to our nonce and the same session.
    async fn authenticate_in_tls(
        &mut self,
        cfg: &AgentConfig,
        h: &Hello,
        our_nonce: &str,
        session: &str,
    ) -> Result<(), AgentError> {
        let sock = cfg.munge_socket.as_deref();
        let claimed = h.node.clone().unwrap_or_default();
        let their_nonce = h.nonce.as_deref().ok_or_else(|| {
            AgentError::PermissionDenied("the destination sent no nonce with protocol 3".into())
        })?;
        let credential = crate::auth::bound_credential(
            cfg.auth,
            sock,
            &crate::auth::Binding {
                from: cfg.node.clone(),
                to: claimed.clone(),
                nonce: their_nonce.to_string(),
                session: Some(session.to_string()),
                offer: stated_offer(cfg, their_nonce),
            },
        )
        .await?;
        let theirs = match self.call(&PeerRequest::Authenticate { credential }).await? {
            PeerReply::Authenticated { credential } => credential,
            other => {
                return Err(AgentError::Peer(format!(
                    "unexpected answer to authenticate: {other:?}"
                )))
            }
        };
        let server = crate::auth::verify_bound_in(
            cfg.auth,
            sock,
            theirs.as_deref(),
            (Some(&claimed), &cfg.node, our_nonce),
            Some(session),
            None,
        )
        .await
        .map_err(|e| AgentError::PermissionDenied(format!("the destination agent: {e}")))?;
        tracing::debug!(peer = %claimed, "destination authenticated inside TLS (peer protocol 3)");
        self.peer_node = server;
        Ok(())
    }

    /// Whether the connection runs inside TLS (protocol 3).
    pub fn is_encrypted(&self) -> bool {
        self.ch.get_ref().is_encrypted()
    }

    async fn send_request(&mut self, req: &PeerRequest) -> Result<u32, AgentError> {
        // The channel serializes again; the length is what crosses the wire.
        let len = serde_json::to_vec(req).map(|v| v.len()).unwrap_or(0);
        let id = self
            .ch
            .send_request(req)
            .await
            .map_err(|e| from_proto(e, "the destination agent"))?;
        self.bytes_sent += (HEADER_LEN + len) as u64;
        Ok(id)
    }

    async fn reply(&mut self, id: u32) -> Result<PeerReply, AgentError> {
        let t = Some(self.timeout);
        match self
            .ch
            .recv_response::<PeerResponse>(id, t, |_| {})
            .await
            .map_err(|e| from_proto(e, "the destination agent"))?
        {
            PeerResponse::Ok(r) => Ok(r),
            PeerResponse::Error(e) => Err(error_from_reply(e)),
        }
    }

    /// Sends a heartbeat event (request id 0): this side is alive and in `phase`.
    pub async fn beat(&mut self, phase: &str, bytes: u64) -> Result<(), AgentError> {
        let ev = PeerEvent::Heartbeat {
            phase: phase.to_string(),
            bytes,
        };
        let f = Frame::json(FrameKind::Event, 0, &ev)?;
        let len = f.payload.len();
        self.ch
            .write(&f)
            .await
            .map_err(|e| from_proto(e, "the destination agent"))?;
        self.bytes_sent += (HEADER_LEN + len) as u64;
        Ok(())
    }

    /// Waits for the next frame outside a call: the destination's answer to a heartbeat.
    pub async fn heard(&mut self) -> Result<(), AgentError> {
        let f = self
            .ch
            .next_frame(Some(self.timeout))
            .await
            .map_err(|e| from_proto(e, "the destination agent"))?;
        match f.header.kind {
            FrameKind::Event => Ok(()),
            other => Err(AgentError::Peer(format!(
                "the destination sent a {other:?} frame between requests"
            ))),
        }
    }

    /// Sends a request without waiting for its reply (a watched call: [`PeerConn::next_of`]).
    pub async fn send_req(&mut self, req: &PeerRequest) -> Result<u32, AgentError> {
        self.send_request(req).await
    }

    /// The next frame of request `id`: `None` for an event (a heartbeat, or an answer to one
    /// sent before the request), else its reply.
    pub async fn next_of(&mut self, id: u32) -> Result<Option<PeerReply>, AgentError> {
        let f = self
            .ch
            .next_frame(Some(self.timeout))
            .await
            .map_err(|e| from_proto(e, "the destination agent"))?;
        match f.header.kind {
            FrameKind::Event => Ok(None),
            FrameKind::Response if f.header.id == id => {
                match f.decode::<PeerResponse>(FrameKind::Response, "response")? {
                    PeerResponse::Ok(r) => Ok(Some(r)),
                    PeerResponse::Error(e) => Err(error_from_reply(e)),
                }
            }
            FrameKind::Response => Err(AgentError::Proto(ProtoError::IdMismatch {
                got: f.header.id,
                want: id,
            })),
            other => Err(AgentError::Peer(format!(
                "the destination sent a {other:?} frame instead of the answer to request {id}"
            ))),
        }
    }

    /// Sends a request and waits for its reply.
    pub async fn call(&mut self, req: &PeerRequest) -> Result<PeerReply, AgentError> {
        let id = self.send_request(req).await?;
        self.reply(id).await
    }

    /// Sends every file of `dir` (CRIU's non-memory images) and waits for the receipt.
    pub async fn send_images(&mut self, dir: &std::path::Path) -> Result<u64, AgentError> {
        let mut files = Vec::new();
        let rd = std::fs::read_dir(dir).map_err(|source| AgentError::Io {
            what: format!("read {}", dir.display()),
            source,
        })?;
        for e in rd.flatten() {
            let md = e.metadata().map_err(|source| AgentError::Io {
                what: format!("stat {}", e.path().display()),
                source,
            })?;
            let name = e.file_name().to_string_lossy().into_owned();
            // Logs and stats stay with the source.
            if md.is_file() && !name.ends_with(".log") && !name.starts_with("stats-") {
                files.push(ImageFile {
                    name,
                    size: md.len(),
                });
            }
        }
        let id = self
            .send_request(&PeerRequest::Images {
                files: files.clone(),
            })
            .await?;
        let mut total = 0;
        for f in &files {
            // One chunk in memory at a time, as the destination writes them.
            let path = dir.join(&f.name);
            let io = |source| AgentError::Io {
                what: format!("read image {}", path.display()),
                source,
            };
            let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
            let mut left = f.size;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
                let mut buf = vec![0u8; want];
                file.read_exact(&mut buf).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        AgentError::Internal(format!("image {} changed while sending", f.name))
                    } else {
                        io(e)
                    }
                })?;
                let frame = Frame::data(id, buf)?;
                self.ch
                    .write(&frame)
                    .await
                    .map_err(|e| from_proto(e, "the destination agent"))?;
                self.bytes_sent += (HEADER_LEN + want) as u64;
                left -= want as u64;
            }
            total += f.size;
        }
        match self.reply(id).await? {
            PeerReply::ImagesReceived { bytes } if bytes == total => Ok(total),
            other => Err(AgentError::Peer(format!(
                "unexpected answer to images: {other:?}"
            ))),
        }
    }
}
