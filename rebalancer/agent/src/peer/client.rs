//! Client end of a peer connection: the source of a migration, or a destination telling the
//! source that a migrated task ended.

use std::time::Duration;

use rebalancer_proto::frame::{read_frame_async, write_frame_async, Frame, FrameKind};
use rebalancer_proto::{Hello, Role};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::errors::error_from_reply;
use super::wire::{ImageFile, PeerReply, PeerRequest, PeerResponse, CHUNK, PEER_MAX_FRAME};
use crate::config::AgentConfig;
use crate::error::AgentError;

/// Client end of a peer connection (source side). Generic over the stream so that unit tests
/// run it over an in-memory pipe.
pub struct PeerConn<S = TcpStream> {
    pub stream: S,
    next_id: u32,
    pub bytes_sent: u64,
    pub timeout: Duration,
    /// The agreed peer protocol version.
    pub version: u16,
    /// The node the server proved it is (version 2 with munge; `None` otherwise).
    pub peer_node: Option<String>,
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

impl<S: AsyncRead + AsyncWrite + Unpin> PeerConn<S> {
    /// Sends this node's hello on an open stream and checks the answer.
    pub async fn handshake(
        cfg: &AgentConfig,
        stream: S,
        timeout: Duration,
    ) -> Result<PeerConn<S>, AgentError> {
        let mut c = PeerConn {
            stream,
            next_id: 1,
            bytes_sent: 0,
            timeout,
            version: 1,
            peer_node: None,
        };
        let ours = cfg.peer_protocol;
        let nonce = crate::auth::nonce();
        let mut hello = Hello::new(Role::Agent, crate::SOFTWARE).with_versions(ours);
        hello.node = Some(cfg.node.clone());
        // A version-1 credential too, so that an agent of the previous release accepts us.
        hello.credential =
            crate::auth::credential(cfg.auth, cfg.munge_socket.as_deref(), &cfg.node).await?;
        hello.nonce = (ours.max >= 2).then(|| nonce.clone());
        c.send(&Frame::json(FrameKind::Hello, 0, &hello)?).await?;
        let f = c.recv().await?;
        match f.header.kind {
            FrameKind::Hello => {
                let h: Hello = f.decode(FrameKind::Hello, "hello")?;
                // The server states the version it agreed to (a version-1 server: 1).
                let agreed = h.protocol;
                if agreed < ours.min || agreed > ours.max {
                    return Err(AgentError::Peer(format!(
                        "destination agreed to peer protocol {agreed}; this agent speaks {ours}"
                    )));
                }
                c.version = agreed;
                if agreed >= 2 {
                    c.authenticate(cfg, &h, &nonce).await?;
                } else {
                    tracing::warn!(peer = ?h.node, "peer protocol 1: the destination agent is not authenticated (an agent of the previous release?)");
                }
            }
            FrameKind::Response => {
                let r: PeerResponse = f.decode(FrameKind::Response, "response")?;
                if let PeerResponse::Error(e) = r {
                    return Err(error_from_reply(e));
                }
                return Err(AgentError::Peer(
                    "destination answered the hello with a response".into(),
                ));
            }
            k => {
                return Err(AgentError::Peer(format!(
                    "destination answered the hello with {k:?}"
                )))
            }
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
            },
        )
        .await?;
        match self.call(&PeerRequest::Authenticate { credential }).await? {
            PeerReply::Authenticated => {}
            other => {
                return Err(AgentError::Peer(format!(
                    "unexpected answer to authenticate: {other:?}"
                )))
            }
        }
        self.peer_node = server;
        Ok(())
    }

    async fn send(&mut self, f: &Frame) -> Result<(), AgentError> {
        self.bytes_sent += (rebalancer_proto::HEADER_LEN + f.payload.len()) as u64;
        tokio::time::timeout(self.timeout, write_frame_async(&mut self.stream, f))
            .await
            .map_err(|_| AgentError::Timeout("sending to the destination timed out".into()))??;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Frame, AgentError> {
        Ok(tokio::time::timeout(
            self.timeout,
            read_frame_async(&mut self.stream, PEER_MAX_FRAME),
        )
        .await
        .map_err(|_| AgentError::Timeout("the destination did not answer in time".into()))??)
    }

    /// Sends a request and waits for its reply.
    pub async fn call(&mut self, req: &PeerRequest) -> Result<PeerReply, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&Frame::json(FrameKind::Request, id, req)?)
            .await?;
        self.reply(id).await
    }

    async fn reply(&mut self, id: u32) -> Result<PeerReply, AgentError> {
        let f = self.recv().await?;
        if f.header.id != id {
            return Err(AgentError::Peer(format!(
                "reply to request {} while waiting for {id}",
                f.header.id
            )));
        }
        match f.decode::<PeerResponse>(FrameKind::Response, "response")? {
            PeerResponse::Ok(r) => Ok(r),
            PeerResponse::Error(e) => Err(error_from_reply(e)),
        }
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
        let id = self.next_id;
        self.next_id += 1;
        self.send(&Frame::json(
            FrameKind::Request,
            id,
            &PeerRequest::Images {
                files: files.clone(),
            },
        )?)
        .await?;
        let mut total = 0;
        for f in &files {
            let data =
                tokio::fs::read(dir.join(&f.name))
                    .await
                    .map_err(|source| AgentError::Io {
                        what: format!("read image {}", f.name),
                        source,
                    })?;
            if data.len() as u64 != f.size {
                return Err(AgentError::Internal(format!(
                    "image {} changed while sending",
                    f.name
                )));
            }
            for chunk in data.chunks(CHUNK) {
                self.send(&Frame::data(id, chunk.to_vec())?).await?;
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
