//! Channel tests over real sockets: Unix socket pairs and TCP on 127.0.0.1.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;

use super::*;
use crate::frame::{read_frame, FrameHeader, HEADER_LEN};
use crate::messages::{Reply, Request, Role};

const MS: Duration = Duration::from_millis(1);

fn cfg(min: u16, max: u16) -> ChannelConfig {
    ChannelConfig::default()
        .versions(VersionRange::new(min, max))
        .idle_timeout(Some(2000 * MS))
        .call_timeout(Some(2000 * MS))
}

fn hello(role: Role) -> Hello {
    Hello::new(role, "test")
}

/// Serves `n` requests on a blocking channel, answering `ping` with `pong` and one event.
fn serve_blocking<S: BlockingStream>(s: S, c: ChannelConfig, n: usize) -> Result<u16, ProtoError> {
    let mut ch = Channel::accept(s, c, hello(Role::Agent), |_| Ok(()))?;
    for _ in 0..n {
        let f = ch.recv_frame()?;
        let _req: Request = f.decode(FrameKind::Request, "request")?;
        ch.send(FrameKind::Event, f.header.id + 100, &"not ours")?;
        ch.send(
            FrameKind::Response,
            f.header.id,
            &Response::Ok(Reply::Pong {
                software: "srv".into(),
            }),
        )?;
    }
    Ok(ch.negotiated().version)
}

#[test]
fn blocking_negotiates_highest_common_version_and_calls() {
    let (a, b) = UnixStream::pair().expect("pair");
    let srv = thread::spawn(move || serve_blocking(b, cfg(1, 3), 2));
    let mut ch = Channel::connect(a, cfg(2, 5), hello(Role::Cli)).expect("connect");
    assert_eq!(ch.negotiated().version, 3);
    assert_eq!(ch.negotiated().peer.role, Role::Agent);
    for _ in 0..2 {
        let r: Response = ch.call(&Request::Ping).expect("call");
        assert!(matches!(r, Response::Ok(Reply::Pong { .. })));
    }
    assert_eq!(srv.join().expect("thread").expect("server"), 3);
}

#[test]
fn blocking_over_tcp() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let srv = thread::spawn(move || serve_blocking(l.accept().expect("accept").0, cfg(1, 1), 1));
    let s = std::net::TcpStream::connect(addr).expect("connect");
    let mut ch = Channel::connect(s, cfg(1, 1), hello(Role::Agent)).expect("handshake");
    assert_eq!(ch.negotiated().version, 1);
    let r: Response = ch.call(&Request::Ping).expect("call");
    assert!(matches!(r, Response::Ok(Reply::Pong { .. })));
    assert_eq!(srv.join().expect("thread").expect("server"), 1);
}

#[test]
fn no_common_version_gets_an_error_reply_naming_both() {
    let (a, b) = UnixStream::pair().expect("pair");
    let srv = thread::spawn(move || serve_blocking(b, cfg(1, 1), 0));
    let err = Channel::connect(a, cfg(2, 3), hello(Role::Cli)).expect_err("no common version");
    let ProtoError::Refused(reply) = err else {
        panic!("expected a refusal, got {err:?}");
    };
    assert_eq!(reply.code, ErrorCode::Version);
    assert!(
        reply.message.contains("versions 2..=3"),
        "{}",
        reply.message
    );
    assert!(reply.message.contains("version 1"), "{}", reply.message);
    let server_err = srv.join().expect("thread").expect_err("server refuses");
    assert!(matches!(server_err, ProtoError::NoCommonVersion { .. }));
}

#[test]
fn version_one_hello_without_range_is_accepted() {
    let (mut a, b) = UnixStream::pair().expect("pair");
    let srv = thread::spawn(move || serve_blocking(b, cfg(1, 2), 0));
    // Exactly what a version-1 release sends: no `protocol_max`.
    let raw = serde_json::json!({"protocol": 1, "software": "old", "role": "agent"});
    let f = Frame::json(FrameKind::Hello, 0, &raw).expect("frame");
    a.write_all(&f.to_bytes()).expect("write");
    let back = read_frame(&mut a, MAX_FRAME_LEN).expect("reply");
    let h: Hello = back.decode(FrameKind::Hello, "hello").expect("hello");
    // A version-1 peer checks `protocol == 1` exactly and ignores the rest.
    assert_eq!(h.protocol, 1);
    assert_eq!(h.protocol_max, None);
    assert_eq!(srv.join().expect("thread").expect("server"), 1);
}

#[test]
fn multi_version_client_reaches_a_version_one_server() {
    // A version-1 server checks `protocol == 1` and answers with its own plain Hello.
    let (a, mut b) = UnixStream::pair().expect("pair");
    let srv = thread::spawn(move || {
        let f = read_frame(&mut b, MAX_FRAME_LEN).expect("hello");
        let h: serde_json::Value = f.decode(FrameKind::Hello, "hello").expect("json");
        let old = serde_json::json!({"protocol": 1, "software": "old", "role": "agent"});
        crate::frame::write_frame(&mut b, &Frame::json(FrameKind::Hello, 0, &old).expect("f"))
            .expect("write");
        h
    });
    let ch = Channel::connect(a, cfg(1, 4), hello(Role::Cli)).expect("connect");
    assert_eq!(ch.negotiated().version, 1);
    let sent = srv.join().expect("thread");
    assert_eq!(sent["protocol"], 1);
    assert_eq!(sent["protocol_max"], 4);
}

#[test]
fn client_rejects_server_agreeing_to_a_version_it_does_not_speak() {
    let (a, mut b) = UnixStream::pair().expect("pair");
    let srv = thread::spawn(move || {
        let _ = read_frame(&mut b, MAX_FRAME_LEN).expect("hello");
        let h = hello(Role::Agent).with_versions(VersionRange::new(9, 9));
        crate::frame::write_frame(&mut b, &Frame::json(FrameKind::Hello, 0, &h).expect("f"))
            .expect("write");
    });
    let err = Channel::connect(a, cfg(1, 2), hello(Role::Cli)).expect_err("bad agreement");
    assert!(matches!(err, ProtoError::NoCommonVersion { .. }), "{err:?}");
    srv.join().expect("thread");
}

fn raw_header_reply(bytes: [u8; HEADER_LEN], max: u32) -> (ErrorReply, ProtoError) {
    let (mut a, b) = UnixStream::pair().expect("pair");
    let srv = thread::spawn(move || serve_blocking(b, cfg(1, 1).max_frame(max), 0));
    a.write_all(&bytes).expect("write");
    let f = read_frame(&mut a, MAX_FRAME_LEN).expect("error reply");
    let r: Response = f.decode(FrameKind::Response, "response").expect("response");
    let Response::Error(e) = r else {
        panic!("expected an error reply");
    };
    (e, srv.join().expect("thread").expect_err("server fails"))
}

#[test]
fn bad_magic_and_bad_version_get_the_promised_error_reply() {
    let (reply, err) = raw_header_reply(*b"GET / HTTP/1.1\r\n", MAX_FRAME_LEN);
    assert_eq!(reply.code, ErrorCode::BadRequest);
    assert!(matches!(err, ProtoError::BadMagic(_)));
    let mut h = FrameHeader {
        kind: FrameKind::Hello,
        len: 0,
        id: 0,
    }
    .encode();
    h[5] = 7;
    let (reply, err) = raw_header_reply(h, MAX_FRAME_LEN);
    assert_eq!(reply.code, ErrorCode::Version);
    assert!(reply.message.contains('7'), "{}", reply.message);
    assert!(matches!(err, ProtoError::Version { got: 7, want: 1 }));
}

#[test]
fn oversized_header_is_refused_with_a_reply() {
    let h = FrameHeader {
        kind: FrameKind::Hello,
        len: 1 << 20,
        id: 0,
    };
    let (reply, err) = raw_header_reply(h.encode(), 1024);
    assert_eq!(reply.code, ErrorCode::BadRequest);
    assert!(matches!(err, ProtoError::TooLarge { max: 1024, .. }));
}

#[test]
fn blocking_call_timeout_and_idle_timeout() {
    let (a, b) = UnixStream::pair().expect("pair");
    let quick = cfg(1, 1).call_timeout(Some(150 * MS));
    // The server's idle limit is longer, so the client's call times out first.
    let patient = cfg(1, 1).idle_timeout(Some(400 * MS));
    let srv = thread::spawn(move || {
        let mut ch = Channel::accept(b, patient, hello(Role::Agent), |_| Ok(())).expect("accept");
        let f = ch.recv_frame().expect("request");
        assert_eq!(f.header.kind, FrameKind::Request);
        // Never answer: the client's call times out, then ours waits idle.
        let started = Instant::now();
        let e = ch.recv_frame().expect_err("idle");
        (e, started.elapsed())
    });
    let mut ch = Channel::connect(a, quick, hello(Role::Cli)).expect("connect");
    let started = Instant::now();
    let err = ch
        .call::<Response>(&Request::Ping)
        .expect_err("call timeout");
    assert!(
        matches!(
            err,
            ProtoError::Timeout {
                what: "call",
                ms: 150
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() >= 150 * MS);
    let (idle, waited) = srv.join().expect("thread");
    assert!(
        matches!(idle, ProtoError::Timeout { what: "idle", .. }),
        "{idle:?}"
    );
    assert!(waited >= 390 * MS, "{waited:?}");
    drop(ch);
}

#[test]
fn trickled_bytes_do_not_extend_the_idle_timeout() {
    let (mut a, b) = UnixStream::pair().expect("pair");
    let srv = thread::spawn(move || {
        let started = Instant::now();
        let e = Channel::accept(
            b,
            cfg(1, 1).idle_timeout(Some(200 * MS)),
            hello(Role::Agent),
            |_| Ok(()),
        )
        .expect_err("idle");
        (e, started.elapsed())
    });
    let f = Frame::json(FrameKind::Hello, 0, &hello(Role::Cli)).expect("hello");
    for b in f.to_bytes() {
        if a.write_all(&[b]).is_err() {
            break;
        }
        thread::sleep(30 * MS);
    }
    let (e, waited) = srv.join().expect("thread");
    assert!(
        matches!(e, ProtoError::Timeout { what: "idle", .. }),
        "{e:?}"
    );
    assert!(waited < 600 * MS, "{waited:?}");
}

#[test]
fn response_with_another_id_is_an_error() {
    let (a, b) = UnixStream::pair().expect("pair");
    let srv = thread::spawn(move || {
        let mut ch = Channel::accept(b, cfg(1, 1), hello(Role::Agent), |_| Ok(())).expect("acc");
        let f = ch.recv_frame().expect("request");
        ch.send(
            FrameKind::Response,
            f.header.id + 1,
            &Response::Ok(Reply::Done),
        )
        .expect("send");
    });
    let mut ch = Channel::connect(a, cfg(1, 1), hello(Role::Cli)).expect("connect");
    let err = ch.call::<Response>(&Request::Ping).expect_err("mismatch");
    assert!(
        matches!(err, ProtoError::IdMismatch { got: 2, want: 1 }),
        "{err:?}"
    );
    srv.join().expect("thread");
}

#[test]
fn check_refusal_reaches_the_client() {
    let (a, b) = UnixStream::pair().expect("pair");
    let srv = thread::spawn(move || {
        Channel::accept(b, cfg(1, 1), hello(Role::Agent), |h| {
            Err(ErrorReply {
                code: ErrorCode::PermissionDenied,
                message: format!("{:?} may not connect", h.role),
            })
        })
        .map(|_| ())
    });
    let err = Channel::connect(a, cfg(1, 1), hello(Role::Cli)).expect_err("refused");
    assert!(
        matches!(&err, ProtoError::Refused(e) if e.code == ErrorCode::PermissionDenied),
        "{err:?}"
    );
    assert!(matches!(
        srv.join().expect("thread"),
        Err(ProtoError::Refused(_))
    ));
}

#[test]
fn invalid_config_is_rejected() {
    assert!(ChannelConfig::default().max_frame(0).validate().is_err());
    assert!(ChannelConfig::default()
        .versions(VersionRange::new(3, 2))
        .validate()
        .is_err());
    assert!(ChannelConfig::default().validate().is_ok());
}

#[cfg(feature = "async")]
mod async_flavour {
    use tokio::io::AsyncWriteExt;

    use super::*;

    async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        s: S,
        c: ChannelConfig,
    ) -> Result<(u16, Vec<Frame>), ProtoError> {
        let mut ch = AsyncChannel::accept(s, c, hello(Role::Agent), |_| Ok(())).await?;
        let mut got = Vec::new();
        loop {
            let f = match ch.recv_frame().await {
                Ok(f) => f,
                Err(ProtoError::Closed) => return Ok((ch.negotiated().version, got)),
                Err(e) => return Err(e),
            };
            if f.header.kind == FrameKind::Request {
                ch.send(FrameKind::Response, f.header.id, &Response::Ok(Reply::Done))
                    .await?;
            }
            got.push(f);
        }
    }

    #[tokio::test]
    async fn unix_pair_negotiates_and_matches_ids() {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(serve(b, cfg(1, 4)));
        let mut ch = AsyncChannel::connect(a, cfg(3, 6), hello(Role::Controller))
            .await
            .expect("connect");
        assert_eq!(ch.negotiated().version, 4);
        for _ in 0..3 {
            let r: Response = ch.call(&Request::Ping).await.expect("call");
            assert_eq!(r, Response::Ok(Reply::Done));
        }
        drop(ch);
        let (v, frames) = srv.await.expect("task").expect("server");
        assert_eq!(v, 4);
        let ids: Vec<u32> = frames.iter().map(|f| f.header.id).collect();
        assert_eq!(ids, [1, 2, 3]);
    }

    #[tokio::test]
    async fn tcp_round_trip() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let srv = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            serve(s, cfg(1, 1)).await
        });
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut ch = AsyncChannel::connect(s, cfg(1, 1), hello(Role::Agent))
            .await
            .expect("handshake");
        let r: Response = ch.call(&Request::Ping).await.expect("call");
        assert_eq!(r, Response::Ok(Reply::Done));
        drop(ch);
        let (v, frames) = srv.await.expect("task").expect("server");
        assert_eq!((v, frames.len()), (1, 1));
    }

    #[tokio::test]
    async fn slow_partial_payload_is_reassembled() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(serve(a, cfg(1, 1)));
        let h = Frame::json(FrameKind::Hello, 0, &hello(Role::Cli)).expect("hello");
        b.write_all(&h.to_bytes()).await.expect("hello");
        let _ = crate::frame::read_frame_async(&mut b, MAX_FRAME_LEN)
            .await
            .expect("server hello");
        let data = Frame::data(5, vec![0xab; 10_000]).expect("data").to_bytes();
        for piece in data.chunks(997) {
            b.write_all(piece).await.expect("piece");
            tokio::time::sleep(2 * MS).await;
        }
        drop(b);
        let (_, frames) = srv.await.expect("task").expect("server");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].header.id, 5);
        assert_eq!(frames[0].payload, vec![0xab; 10_000]);
    }

    #[tokio::test]
    async fn truncated_frame_is_not_a_clean_close() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(serve(a, cfg(1, 1)));
        let h = Frame::json(FrameKind::Hello, 0, &hello(Role::Cli)).expect("hello");
        let bytes = h.to_bytes();
        b.write_all(&bytes[..bytes.len() - 3]).await.expect("part");
        drop(b);
        let err = srv.await.expect("task").expect_err("truncated");
        assert!(matches!(err, ProtoError::Truncated), "{err:?}");
    }

    #[tokio::test]
    async fn call_timeout_then_idle_timeout() {
        let quick = cfg(1, 1).call_timeout(Some(120 * MS));
        let patient = cfg(1, 1).idle_timeout(Some(300 * MS));
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(async move {
            let mut ch = AsyncChannel::accept(b, patient, hello(Role::Agent), |_| Ok(()))
                .await
                .expect("accept");
            let f = ch.recv_frame().await.expect("request");
            assert_eq!(f.header.kind, FrameKind::Request);
            let started = Instant::now();
            let e = ch.recv_frame().await.expect_err("idle");
            (e, started.elapsed())
        });
        let mut ch = AsyncChannel::connect(a, quick, hello(Role::Cli))
            .await
            .expect("connect");
        let started = Instant::now();
        let err = ch
            .call::<Response>(&Request::Ping)
            .await
            .expect_err("call timeout");
        assert!(
            matches!(
                err,
                ProtoError::Timeout {
                    what: "call",
                    ms: 120
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() >= 120 * MS);
        let (idle, waited) = srv.await.expect("task");
        assert!(
            matches!(idle, ProtoError::Timeout { what: "idle", .. }),
            "{idle:?}"
        );
        assert!(waited >= 290 * MS, "{waited:?}");
    }

    #[tokio::test]
    async fn async_no_common_version_reply() {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(serve(b, cfg(2, 2)));
        let err = AsyncChannel::connect(a, cfg(1, 1), hello(Role::Cli))
            .await
            .expect_err("no common");
        let ProtoError::Refused(reply) = err else {
            panic!("expected a refusal, got {err:?}");
        };
        assert_eq!(reply.code, ErrorCode::Version);
        assert!(
            reply.message.contains("peer speaks version 1"),
            "{}",
            reply.message
        );
        assert!(
            reply.message.contains("this side speaks version 2"),
            "{}",
            reply.message
        );
        assert!(matches!(
            srv.await.expect("task"),
            Err(ProtoError::NoCommonVersion { .. })
        ));
    }

    #[tokio::test]
    async fn a_channel_taken_apart_and_rebuilt_keeps_its_negotiation_and_ids() {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(async move {
            let ch = AsyncChannel::accept(b, cfg(1, 3), hello(Role::Agent), |_| Ok(())).await?;
            let (s, core) = ch.into_parts()?;
            let mut ch = AsyncChannel::from_parts(s, core);
            let mut ids = Vec::new();
            for _ in 0..2 {
                let f = ch.recv_frame().await?;
                ids.push(f.header.id);
                ch.send(FrameKind::Response, f.header.id, &Response::Ok(Reply::Done))
                    .await?;
            }
            Ok::<_, ProtoError>((ch.negotiated().version, ids))
        });
        let mut ch = AsyncChannel::connect(a, cfg(1, 3), hello(Role::Agent))
            .await
            .expect("connect");
        let r: Response = ch.call(&Request::Ping).await.expect("first call");
        assert_eq!(r, Response::Ok(Reply::Done));
        let (s, core) = ch.into_parts().expect("idle");
        let mut ch = AsyncChannel::from_parts(s, core);
        assert_eq!(ch.negotiated().version, 3);
        let r: Response = ch.call(&Request::Ping).await.expect("second call");
        assert_eq!(r, Response::Ok(Reply::Done));
        let (v, ids) = srv.await.expect("task").expect("server");
        assert_eq!((v, ids), (3, vec![1, 2]));
    }

    #[tokio::test]
    async fn a_channel_is_not_taken_apart_inside_a_frame() {
        use tokio::io::AsyncWriteExt;
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(AsyncChannel::accept(
            b,
            cfg(1, 1),
            hello(Role::Agent),
            |_| Ok(()),
        ));
        let ch = AsyncChannel::connect(a, cfg(1, 1), hello(Role::Agent))
            .await
            .expect("connect");
        let mut srv = srv.await.expect("task").expect("accept");
        let (mut raw, _core) = ch.into_parts().expect("idle");
        // Half a header: the server's read times out with the partial frame kept.
        let f = Frame::json(FrameKind::Request, 1, &Request::Ping).expect("frame");
        raw.write_all(&f.to_bytes()[..8]).await.expect("write");
        srv.set_idle_timeout(Some(50 * MS));
        assert!(matches!(
            srv.recv_frame().await,
            Err(ProtoError::Timeout { .. })
        ));
        assert!(matches!(srv.into_parts(), Err(ProtoError::Config(_))));
    }

    #[tokio::test]
    async fn accept_with_answers_from_the_clients_hello() {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(async move {
            let (mut ch, seen) = AsyncChannel::accept_with(b, cfg(1, 3), |peer, v| async move {
                // The answer depends on what the client sent (as a credential naming its nonce).
                let mut mine = hello(Role::Agent);
                mine.nonce = peer.nonce.as_ref().map(|n| format!("re:{n}"));
                Ok((mine, (peer.node.clone(), v)))
            })
            .await?;
            let f = ch.recv_frame().await?;
            ch.send(FrameKind::Response, f.header.id, &Response::Ok(Reply::Done))
                .await?;
            Ok::<_, ProtoError>(seen)
        });
        let mut h = hello(Role::Agent);
        h.node = Some("n7".into());
        h.nonce = Some("abc".into());
        let mut ch = AsyncChannel::connect(a, cfg(2, 5), h)
            .await
            .expect("connect");
        assert_eq!(ch.negotiated().version, 3);
        assert_eq!(ch.negotiated().peer.nonce.as_deref(), Some("re:abc"));
        let r: Response = ch.call(&Request::Ping).await.expect("call");
        assert_eq!(r, Response::Ok(Reply::Done));
        let seen = srv.await.expect("task").expect("server");
        assert_eq!(seen, (Some("n7".into()), 3));
    }

    #[tokio::test]
    async fn accept_with_refusal_reaches_the_client_and_no_common_version_skips_the_answer() {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(AsyncChannel::accept_with(b, cfg(1, 1), |_, _| async {
            Err::<(Hello, ()), _>(ErrorReply {
                code: ErrorCode::PermissionDenied,
                message: "bad credential".into(),
            })
        }));
        let err = AsyncChannel::connect(a, cfg(1, 1), hello(Role::Agent))
            .await
            .expect_err("refused");
        let ProtoError::Refused(reply) = err else {
            panic!("expected a refusal, got {err:?}");
        };
        assert_eq!(reply.code, ErrorCode::PermissionDenied);
        assert_eq!(reply.message, "bad credential");
        assert!(matches!(
            srv.await.expect("task"),
            Err(ProtoError::Refused(_))
        ));

        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c2 = called.clone();
        let srv = tokio::spawn(AsyncChannel::accept_with(b, cfg(2, 2), move |_, _| {
            c2.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok((hello(Role::Agent), ())) }
        }));
        let err = AsyncChannel::connect(a, cfg(1, 1), hello(Role::Agent))
            .await
            .expect_err("no common");
        assert!(
            matches!(&err, ProtoError::Refused(r) if r.code == ErrorCode::Version),
            "{err:?}"
        );
        assert!(matches!(
            srv.await.expect("task"),
            Err(ProtoError::NoCommonVersion { .. })
        ));
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
    }

    fn record(id: &str) -> crate::models::MigrationRecord {
        crate::models::MigrationRecord {
            id: id.into(),
            container: "j1.s0.t0".into(),
            task: None,
            source: "n1".into(),
            destination: "n2".into(),
            requested_mode: crate::models::MigrationMode::PostCopy,
            mode: None,
            mode_reason: None,
            state: crate::models::MigrationState::Pending,
            phases: vec![],
            stats: Default::default(),
            error: None,
            started_at: 1,
            ended_at: None,
            cancelled_by: None,
        }
    }

    #[tokio::test]
    async fn events_of_the_call_reach_the_caller_and_others_are_dropped() {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let srv = tokio::spawn(async move {
            let mut ch = AsyncChannel::accept(b, cfg(1, 1), hello(Role::Agent), |_| Ok(()))
                .await
                .expect("accept");
            let f = ch.recv_frame().await.expect("request");
            let id = f.header.id;
            let ev = |m: &str| Event::MigrationProgress {
                migration: record(m),
                progress_bytes: None,
            };
            ch.send(FrameKind::Event, id, &ev("m1")).await.expect("e1");
            ch.send(FrameKind::Event, id + 7, &ev("other"))
                .await
                .expect("e2");
            ch.send(FrameKind::Event, id, &"malformed")
                .await
                .expect("e3");
            ch.send(FrameKind::Event, id, &ev("m2")).await.expect("e4");
            ch.send(FrameKind::Response, id, &Response::Ok(Reply::Done))
                .await
                .expect("response");
        });
        let mut ch = AsyncChannel::connect(a, cfg(1, 1), hello(Role::Controller))
            .await
            .expect("connect");
        let mut seen = Vec::new();
        let r: Response = ch
            .call_with(&Request::Ping, Some(2000 * MS), |ev| {
                let Event::MigrationProgress { migration, .. } = ev;
                seen.push(migration.id);
            })
            .await
            .expect("call");
        assert_eq!(r, Response::Ok(Reply::Done));
        assert_eq!(seen, ["m1", "m2"]);
        srv.await.expect("task");
    }
}
