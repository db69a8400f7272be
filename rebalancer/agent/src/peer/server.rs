//! Server end of a peer connection's handshake (the destination, or a source told that a
//! migrated task ended): the hello, version agreement and authentication of the connecting
//! agent, on [`AsyncChannel`]. What follows the handshake, the migration's requests, is
//! served by `migration::destination`.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rebalancer_proto::channel::AsyncChannel;
use rebalancer_proto::frame::FrameKind;
use rebalancer_proto::{ChannelConfig, ErrorReply, Hello, ProtoError, Role, VersionRange};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::client::{from_proto, note_unencrypted, upgrade};
use super::errors::reply_error;
use super::tls::PeerStream;
use super::wire::{
    ImageFile, PeerReply, PeerRequest, PeerResponse, MAX_IMAGE_FILES, PEER_MAX_FRAME,
};
use crate::config::AgentConfig;
use crate::error::AgentError;

fn refusal(e: &AgentError) -> ErrorReply {
    match reply_error(e) {
        PeerResponse::Error(r) => r,
        PeerResponse::Ok(_) => unreachable!("reply_error builds an error"),
    }
}

/// An accepted, authenticated peer connection.
pub struct Accepted<S> {
    pub ch: AsyncChannel<PeerStream<S>>,
    /// The node the client is: proven by its credential (munge), or as its hello claims
    /// (`auth.method = "none"`).
    pub node: String,
    pub version: u16,
}

/// Reads the client's hello within `hello_timeout`, agrees on the highest common peer protocol
/// version and authenticates the client (see `PROTOCOL.md`, "Agent ↔ agent"). Every refusal is
/// answered with an error reply before the connection closes.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin + Send>(
    cfg: &AgentConfig,
    stream: S,
    hello_timeout: Duration,
) -> Result<Accepted<S>, AgentError> {
    let ours = cfg.peer_protocol;
    let ch_cfg = ChannelConfig::default()
        .max_frame(PEER_MAX_FRAME)
        .idle_timeout(Some(hello_timeout))
        .call_timeout(Some(hello_timeout))
        .versions(ours);
    let (method, sock) = (cfg.auth, cfg.munge_socket.as_deref());
    let answered = AsyncChannel::accept_with(
        PeerStream::Plain(stream),
        ch_cfg,
        |hello: Hello, agreed| async move {
            answer_hello(cfg, &hello, agreed)
                .await
                .map(|(me, nonce)| (me, (hello, nonce)))
                .map_err(|e| refusal(&e))
        },
    )
    .await;
    let (mut ch, (hello, our_nonce)) = match answered {
        Ok(v) => v,
        Err(ProtoError::NoCommonVersion { peer, local }) => {
            return Err(AgentError::Version(format!(
                "peer speaks {peer}; this agent speaks peer protocol {local} with agents"
            )))
        }
        Err(e) => return Err(from_proto(e, "the connecting agent")),
    };
    let version = ch.negotiated().version;
    let claimed = hello.node.clone().unwrap_or_default();
    note_unencrypted(version, hello.node.as_deref(), "source");
    let session = if version >= 3 {
        let (upgraded, e) = upgrade(ch, |raw| super::tls::accept(raw, hello_timeout)).await?;
        ch = upgraded;
        Some(e)
    } else {
        None
    };
    let Some(our_nonce) = our_nonce else {
        return Ok(Accepted {
            ch,
            node: claimed,
            version,
        });
    };
    // Protocols 2 and 3: the first request proves the client, bound to our nonce (and, with 3,
    // to this TLS session).
    let f = ch
        .recv_frame()
        .await
        .map_err(|e| from_proto(e, "the connecting agent"))?;
    let id = f.header.id;
    let checked = match f.decode::<PeerRequest>(FrameKind::Request, "request") {
        Ok(PeerRequest::Authenticate { credential }) => {
            crate::auth::verify_bound_in(
                method,
                sock,
                credential.as_deref(),
                (Some(&claimed), &cfg.node, &our_nonce),
                session.as_deref(),
                // The range the client's hello stated as it arrived; its credential states
                // the one it sent.
                Some(hello.versions()),
            )
            .await
        }
        _ => Err(AgentError::PermissionDenied(format!(
            "the first request of protocol {version} must be authenticate"
        ))),
    };
    if let Err(e) = checked {
        let _ = ch.send(FrameKind::Response, id, &reply_error(&e)).await;
        return Err(e);
    }
    // Version 3: this node's proof comes now, bound to the client's nonce and this session.
    let credential = match (&session, &hello.nonce) {
        (Some(session), Some(their_nonce)) => {
            crate::auth::bound_credential(
                method,
                sock,
                &crate::auth::Binding {
                    from: cfg.node.clone(),
                    to: claimed.clone(),
                    nonce: their_nonce.clone(),
                    session: Some(session.clone()),
                    offer: None,
                },
            )
            .await?
        }
        _ => None,
    };
    ch.send(
        FrameKind::Response,
        id,
        &PeerResponse::Ok(PeerReply::Authenticated { credential }),
    )
    .await
    .map_err(|e| from_proto(e, "the connecting agent"))?;
    tracing::debug!(node = %claimed, version, "source authenticated");
    Ok(Accepted {
        ch,
        node: claimed,
        version,
    })
}

/// This node's hello for the agreed version, and (protocol 2) the nonce the client's
/// `authenticate` must answer. Version 1: the client's credential names it (replayable;
/// logged). Version 2: this node's credential answers the client's nonce. Version 3: none yet;
/// it comes inside TLS, bound to the session, in the answer to `authenticate`.
async fn answer_hello(
    cfg: &AgentConfig,
    hello: &Hello,
    agreed: u16,
) -> Result<(Hello, Option<String>), AgentError> {
    if hello.role != Role::Agent {
        return Err(AgentError::Version(format!(
            "peer speaks {} as {:?}; this agent speaks peer protocol {} with agents",
            hello.versions(),
            hello.role,
            cfg.peer_protocol
        )));
    }
    let (method, sock) = (cfg.auth, cfg.munge_socket.as_deref());
    let mut me =
        Hello::new(Role::Agent, crate::SOFTWARE).with_versions(VersionRange::new(agreed, agreed));
    me.node = Some(cfg.node.clone());
    if agreed < 2 {
        crate::auth::verify(
            method,
            sock,
            hello.node.as_deref(),
            hello.credential.as_deref(),
        )
        .await?;
        tracing::warn!(node = ?hello.node, "peer protocol 1: the source's credential is not bound to this node or connection (an agent of the previous release?)");
        return Ok((me, None));
    }
    let (Some(claimed), Some(their_nonce)) = (hello.node.clone(), hello.nonce.clone()) else {
        return Err(AgentError::PermissionDenied(
            "a hello of protocol 2 or later names its node and carries a nonce".into(),
        ));
    };
    // It states this node's range: the client's credential names it back (downgrade
    // protection, `rebalancer_proto::auth`).
    let our_nonce = rebalancer_proto::auth::ranged_nonce(cfg.peer_protocol);
    me.nonce = Some(our_nonce.clone());
    if agreed >= 3 {
        return Ok((me, Some(our_nonce)));
    }
    me.credential = crate::auth::bound_credential(
        method,
        sock,
        &crate::auth::Binding {
            from: cfg.node.clone(),
            to: claimed,
            nonce: their_nonce,
            session: None,
            offer: None,
        },
    )
    .await?;
    Ok((me, Some(our_nonce)))
}

/// Why an image name from the source is refused, if it is: a plain file name only, since it
/// names a file in the migration's image directory.
fn bad_image_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name.contains('/') || name.contains('\0') {
        Some("not a plain file name")
    } else if name.starts_with('.') {
        Some("starts with a dot")
    } else {
        None
    }
}

/// Receives the image files announced by the `images` request `id` into `dir`, writing each
/// data frame to its file as it arrives (never a whole file in memory). Every data frame must
/// carry the request's id and fit in what is left of the file being received; the announcement
/// is checked first (count, names, duplicates). Returns the bytes received.
pub async fn receive_images<S: AsyncRead + AsyncWrite + Unpin>(
    ch: &mut AsyncChannel<S>,
    id: u32,
    files: &[ImageFile],
    dir: &Path,
) -> Result<u64, AgentError> {
    if files.len() > MAX_IMAGE_FILES {
        return Err(AgentError::BadRequest(format!(
            "images announces {} files; at most {MAX_IMAGE_FILES} are accepted",
            files.len()
        )));
    }
    let mut seen = HashSet::new();
    for f in files {
        if let Some(why) = bad_image_name(&f.name) {
            return Err(AgentError::BadRequest(format!(
                "bad image name {:?}: {why}",
                f.name
            )));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(AgentError::BadRequest(format!(
                "image {:?} announced twice",
                f.name
            )));
        }
    }
    let mut total = 0u64;
    for f in files {
        let path = dir.join(&f.name);
        let mut out = tokio::fs::File::create(&path)
            .await
            .map_err(|source| AgentError::Io {
                what: format!("create image {}", path.display()),
                source,
            })?;
        let mut left = f.size;
        while left > 0 {
            let fr = ch
                .recv_frame()
                .await
                .map_err(|e| from_proto(e, "the source agent"))?;
            if fr.header.kind != FrameKind::Data {
                return Err(AgentError::BadRequest(format!(
                    "expected image data for {}, got a {:?} frame",
                    f.name, fr.header.kind
                )));
            }
            if fr.header.id != id {
                return Err(AgentError::BadRequest(format!(
                    "image data frame for request {} inside images request {id}",
                    fr.header.id
                )));
            }
            let n = fr.payload.len() as u64;
            if n > left {
                return Err(AgentError::BadRequest(format!(
                    "image {} longer than the {} bytes announced",
                    f.name, f.size
                )));
            }
            out.write_all(&fr.payload)
                .await
                .map_err(|source| AgentError::Io {
                    what: format!("write image {}", path.display()),
                    source,
                })?;
            left -= n;
        }
        out.flush().await.map_err(|source| AgentError::Io {
            what: format!("write image {}", path.display()),
            source,
        })?;
        total += f.size;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use rebalancer_proto::frame::Frame;
    use tokio::net::UnixStream;

    use super::*;

    fn cfg() -> ChannelConfig {
        ChannelConfig::default()
            .max_frame(PEER_MAX_FRAME)
            .versions(VersionRange::new(1, 1))
            .idle_timeout(Some(Duration::from_secs(5)))
    }

    /// A connected pair: (source's channel, destination's channel).
    async fn pair() -> (AsyncChannel<UnixStream>, AsyncChannel<UnixStream>) {
        let (a, b) = UnixStream::pair().expect("pair");
        let srv = tokio::spawn(AsyncChannel::accept(
            b,
            cfg(),
            Hello::new(Role::Agent, "dst"),
            |_| Ok(()),
        ));
        let c = AsyncChannel::connect(a, cfg(), Hello::new(Role::Agent, "src"))
            .await
            .expect("connect");
        (c, srv.await.expect("task").expect("accept"))
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("peer-images-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn file(name: &str, size: u64) -> ImageFile {
        ImageFile {
            name: name.into(),
            size,
        }
    }

    fn agent_cfg(node: &str, versions: &str) -> AgentConfig {
        let toml = format!(
            "node = \"{node}\"\nlisten = \"127.0.0.1:7878\"\npeer_protocol = {versions}\n[auth]\nmethod = \"none\"\n"
        );
        AgentConfig::from_toml(&toml, Path::new("t.toml")).expect("config")
    }

    /// A client of `client_versions` against a server of `server_versions`: the agreed version,
    /// whether the client runs in TLS, and what the server's first request reads as.
    async fn handshake(client_versions: &str, server_versions: &str) -> (u16, bool, String) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let scfg = agent_cfg("dst", server_versions);
        let srv = tokio::spawn(async move {
            let mut acc = accept(&scfg, b, Duration::from_secs(5)).await?;
            let f = acc.ch.recv_frame().await.map_err(AgentError::Proto)?;
            let r: PeerRequest = f
                .decode(FrameKind::Request, "request")
                .map_err(AgentError::Proto)?;
            acc.ch
                .send(
                    FrameKind::Response,
                    f.header.id,
                    &PeerResponse::Ok(PeerReply::Ack),
                )
                .await
                .map_err(AgentError::Proto)?;
            Ok::<_, AgentError>((acc.version, acc.node, acc.ch.get_ref().is_encrypted(), r))
        });
        let ccfg = agent_cfg("src", client_versions);
        let mut c = super::super::PeerConn::handshake(&ccfg, a, Duration::from_secs(5))
            .await
            .expect("handshake");
        assert_eq!(
            c.call(&PeerRequest::Commit {
                migration: None,
                epoch: None
            })
            .await
            .expect("call"),
            PeerReply::Ack
        );
        let (v, node, srv_tls, req) = srv.await.expect("task").expect("server");
        assert_eq!((v, node.as_str()), (c.version, "src"));
        assert_eq!(srv_tls, c.is_encrypted());
        (v, c.is_encrypted(), req.op().to_string())
    }

    #[tokio::test]
    async fn protocol_3_runs_inside_tls_and_2_with_an_older_agent_does_not() {
        assert_eq!(
            handshake("[1, 3]", "[1, 3]").await,
            (3, true, "commit".into())
        );
        assert_eq!(
            handshake("[1, 2]", "[1, 3]").await,
            (2, false, "commit".into())
        );
        assert_eq!(
            handshake("[1, 3]", "[1, 2]").await,
            (2, false, "commit".into())
        );
        assert_eq!(
            handshake("[3, 3]", "[1, 3]").await,
            (3, true, "commit".into())
        );
    }

    #[tokio::test]
    async fn an_agent_that_requires_3_refuses_an_older_one_naming_both() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let scfg = agent_cfg("dst", "[3, 3]");
        let srv = tokio::spawn(async move { accept(&scfg, b, Duration::from_secs(5)).await.err() });
        let ccfg = agent_cfg("src", "[1, 2]");
        let e = match super::super::PeerConn::handshake(&ccfg, a, Duration::from_secs(5)).await {
            Ok(_) => panic!("a version-2 agent got through to one that requires 3"),
            Err(e) => e,
        };
        let m = e.to_string();
        assert!(matches!(e, AgentError::Version(_)), "{m}");
        assert!(m.contains("1..=2") && m.contains('3'), "{m}");
        assert!(srv.await.expect("task").is_some());
    }

    #[tokio::test]
    async fn images_are_written_chunk_by_chunk_in_announcement_order() {
        let (mut src, mut dst) = pair().await;
        let dir = scratch("ok");
        let files = vec![
            file("core-1.img", 5),
            file("empty.img", 0),
            file("fdinfo.img", 3),
        ];
        for chunk in [&b"ab"[..], b"cde", b"xyz"] {
            src.write(&Frame::data(7, chunk.to_vec()).expect("frame"))
                .await
                .expect("send");
        }
        let n = receive_images(&mut dst, 7, &files, &dir)
            .await
            .expect("receive");
        assert_eq!(n, 8);
        assert_eq!(
            std::fs::read(dir.join("core-1.img")).expect("read"),
            b"abcde"
        );
        assert_eq!(std::fs::read(dir.join("empty.img")).expect("read"), b"");
        assert_eq!(std::fs::read(dir.join("fdinfo.img")).expect("read"), b"xyz");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_data_frame_of_another_request_is_refused() {
        let (mut src, mut dst) = pair().await;
        let dir = scratch("id");
        src.write(&Frame::data(8, b"abc".to_vec()).expect("frame"))
            .await
            .expect("send");
        let e = receive_images(&mut dst, 7, &[file("a.img", 3)], &dir)
            .await
            .expect_err("wrong id");
        assert!(
            matches!(&e, AgentError::BadRequest(m) if m.contains("request 8")),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_chunk_past_the_announced_size_is_refused() {
        let (mut src, mut dst) = pair().await;
        let dir = scratch("long");
        src.write(&Frame::data(7, b"abcd".to_vec()).expect("frame"))
            .await
            .expect("send");
        let e = receive_images(&mut dst, 7, &[file("a.img", 3)], &dir)
            .await
            .expect_err("too long");
        assert!(
            matches!(&e, AgentError::BadRequest(m) if m.contains("longer than the 3 bytes")),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_request_inside_the_data_is_refused() {
        let (mut src, mut dst) = pair().await;
        let dir = scratch("req");
        src.send_request(&PeerRequest::Commit {
            migration: None,
            epoch: None,
        })
        .await
        .expect("send");
        let e = receive_images(&mut dst, 7, &[file("a.img", 3)], &dir)
            .await
            .expect_err("not data");
        assert!(
            matches!(&e, AgentError::BadRequest(m) if m.contains("Request")),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn bad_announcements_are_refused_before_any_byte_is_read() {
        let (_src, mut dst) = pair().await;
        let dir = scratch("ann");
        let too_many: Vec<ImageFile> = (0..=MAX_IMAGE_FILES)
            .map(|i| file(&format!("f{i}"), 0))
            .collect();
        for (files, want) in [
            (too_many, "at most"),
            (vec![file("../etc/passwd", 1)], "not a plain file name"),
            (vec![file(".hidden", 1)], "starts with a dot"),
            (vec![file("", 1)], "empty"),
            (vec![file("a.img", 1), file("a.img", 1)], "announced twice"),
        ] {
            let e = receive_images(&mut dst, 7, &files, &dir)
                .await
                .expect_err("refused");
            assert!(
                matches!(&e, AgentError::BadRequest(m) if m.contains(want)),
                "{want}: {e}"
            );
        }
        assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
