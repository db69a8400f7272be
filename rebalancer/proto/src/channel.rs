//! One typed, bounded channel for every client and server: [`Channel`] (blocking: SPANK
//! plugin, simple tools) and [`AsyncChannel`] (tokio: agent, controller, rebalctl), over Unix
//! sockets and TCP alike.
//!
//! Both flavours are thin I/O drivers around one sans-io [`Core`]: the frame decoder
//! ([`crate::codec::Decoder`]: maximum frame size checked before allocation, payload read in
//! bounded chunks), the `Hello` negotiation, request ids and reply matching. The drivers only
//! move bytes and apply the timeouts the core computes.
//!
//! Timeouts: while a call is outstanding, the call's deadline bounds every read (per-call
//! timeout); otherwise the idle timeout bounds the wait for the next frame. After any error
//! other than [`ProtoError::Refused`] the channel should be dropped.

use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Serialize};

use crate::codec::Decoder;
use crate::error::{ErrorCode, ErrorReply, ProtoError, VersionRange};
use crate::frame::{Frame, FrameKind, MAX_FRAME_LEN};
use crate::messages::{Event, Hello, Response, MESSAGE_VERSIONS};

/// Limits and timeouts of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Largest payload accepted; larger headers are refused before any allocation.
    pub max_frame: u32,
    /// Longest silence accepted while no call is outstanding (servers waiting for requests,
    /// and the wait for a client's `Hello`). `None`: wait forever.
    pub idle_timeout: Option<Duration>,
    /// Default bound on one call, from sending the request to its response. `None`: forever.
    pub call_timeout: Option<Duration>,
    /// Message-set versions this side speaks.
    pub versions: VersionRange,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_frame: MAX_FRAME_LEN,
            idle_timeout: Some(Duration::from_secs(300)),
            call_timeout: Some(Duration::from_secs(30)),
            versions: MESSAGE_VERSIONS,
        }
    }
}

impl ChannelConfig {
    pub fn max_frame(mut self, max: u32) -> Self {
        self.max_frame = max;
        self
    }
    pub fn idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.idle_timeout = t;
        self
    }
    pub fn call_timeout(mut self, t: Option<Duration>) -> Self {
        self.call_timeout = t;
        self
    }
    pub fn versions(mut self, v: VersionRange) -> Self {
        self.versions = v;
        self
    }

    pub fn validate(&self) -> Result<(), ProtoError> {
        if self.max_frame == 0 {
            return Err(ProtoError::Config("max_frame must be positive"));
        }
        if self.versions.min == 0 || self.versions.min > self.versions.max {
            return Err(ProtoError::Config(
                "versions must be a non-empty range starting at 1 or above",
            ));
        }
        if self.idle_timeout == Some(Duration::ZERO) || self.call_timeout == Some(Duration::ZERO) {
            return Err(ProtoError::Config("timeouts must be positive or absent"));
        }
        Ok(())
    }
}

/// Outcome of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The agreed message-set version; callers branch on it.
    pub version: u16,
    /// The peer's `Hello` (role, node, software, credential).
    pub peer: Hello,
}

/// What a frame read while waiting for the response to `want` is.
enum Incoming {
    Event(Frame),
    Response(Frame),
    /// An event of another request: not ours, dropped.
    Skip,
}

/// Framing, limits, negotiation and id logic shared by both flavours; performs no I/O.
#[derive(Debug)]
pub struct Core {
    cfg: ChannelConfig,
    decoder: Decoder,
    next_id: u32,
    last_sent: Option<u32>,
    negotiated: Option<Negotiated>,
}

impl Core {
    pub fn new(cfg: ChannelConfig) -> Result<Self, ProtoError> {
        cfg.validate()?;
        Ok(Core {
            decoder: Decoder::new(cfg.max_frame),
            cfg,
            next_id: 0,
            last_sent: None,
            negotiated: None,
        })
    }

    pub fn config(&self) -> &ChannelConfig {
        &self.cfg
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Next request id: never 0 (0 means "no request").
    fn alloc_id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    fn client_hello(&self, hello: Hello) -> Result<Frame, ProtoError> {
        Frame::json(FrameKind::Hello, 0, &hello.with_versions(self.cfg.versions))
    }

    /// The client's view of the server's answer to its `Hello`.
    fn on_server_hello(&mut self, f: Frame) -> Result<(), ProtoError> {
        match f.header.kind {
            FrameKind::Hello => {
                let peer: Hello = f.decode(FrameKind::Hello, "hello")?;
                // The server states the version it agreed to; it must be one we speak.
                let agreed = peer.protocol;
                if agreed < self.cfg.versions.min || agreed > self.cfg.versions.max {
                    return Err(ProtoError::NoCommonVersion {
                        peer: peer.versions(),
                        local: self.cfg.versions,
                    });
                }
                self.negotiated = Some(Negotiated {
                    version: agreed,
                    peer,
                });
                Ok(())
            }
            FrameKind::Response => Err(refusal(&f)),
            other => Err(ProtoError::Unexpected {
                expected: "hello",
                got: other,
            }),
        }
    }

    /// The server's view of a client's first frame: the `Hello` to answer with, or the error
    /// reply to send before closing.
    fn on_client_hello(
        &mut self,
        f: &Frame,
        mine: Hello,
        check: impl FnOnce(&Hello) -> Result<(), ErrorReply>,
    ) -> Result<Frame, (ProtoError, Frame)> {
        let (peer, version) = self.hello_version(f)?;
        if let Err(reply) = check(&peer) {
            let frame = response_frame(f.header.id, reply.clone());
            return Err((ProtoError::Refused(reply), frame));
        }
        self.answer_hello(f.header.id, version, peer, mine)
    }

    /// A client's first frame decoded as a `Hello`, with the highest version both sides speak;
    /// otherwise the error and the reply to send before closing.
    fn hello_version(&self, f: &Frame) -> Result<(Hello, u16), (ProtoError, Frame)> {
        let peer: Hello = match f.decode(FrameKind::Hello, "hello") {
            Ok(h) => h,
            Err(e) => {
                let reply = error_frame(f.header.id, ErrorCode::BadRequest, &e);
                return Err((e, reply));
            }
        };
        let Some(version) = self.cfg.versions.highest_common(&peer.versions()) else {
            let e = ProtoError::NoCommonVersion {
                peer: peer.versions(),
                local: self.cfg.versions,
            };
            let reply = error_frame(f.header.id, ErrorCode::Version, &e);
            return Err((e, reply));
        };
        Ok((peer, version))
    }

    /// The server's `Hello` stating the agreed `version`; records the negotiation.
    fn answer_hello(
        &mut self,
        id: u32,
        version: u16,
        peer: Hello,
        mine: Hello,
    ) -> Result<Frame, (ProtoError, Frame)> {
        let answer = Frame::json(
            FrameKind::Hello,
            0,
            &mine.with_versions(VersionRange::new(version, version)),
        )
        .map_err(|e| {
            let reply = error_frame(id, ErrorCode::Internal, &e);
            (e, reply)
        })?;
        self.negotiated = Some(Negotiated { version, peer });
        Ok(answer)
    }

    fn request(&mut self, req: &impl Serialize) -> Result<(u32, Frame), ProtoError> {
        let id = self.alloc_id();
        let f = Frame::json(FrameKind::Request, id, req)?;
        self.last_sent = Some(id);
        Ok((id, f))
    }

    fn classify(&self, want: u32, f: Frame) -> Result<Incoming, ProtoError> {
        match f.header.kind {
            FrameKind::Event if f.header.id == want => Ok(Incoming::Event(f)),
            FrameKind::Event => Ok(Incoming::Skip),
            FrameKind::Response if f.header.id == want => Ok(Incoming::Response(f)),
            FrameKind::Response => Err(ProtoError::IdMismatch {
                got: f.header.id,
                want,
            }),
            other => Err(ProtoError::Unexpected {
                expected: "response",
                got: other,
            }),
        }
    }

    /// The read timeout now: the call's remaining time while a call runs, else the idle one.
    fn read_timeout(&self, deadline: Option<Deadline>) -> Option<(Duration, &'static str, u128)> {
        match deadline {
            Some(d) => Some((
                d.at.saturating_duration_since(Instant::now()),
                "call",
                d.total.as_millis(),
            )),
            None => self.cfg.idle_timeout.map(|t| (t, "idle", t.as_millis())),
        }
    }

    fn write_timeout(&self) -> Option<Duration> {
        self.cfg.call_timeout.or(self.cfg.idle_timeout)
    }
}

#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    total: Duration,
}

fn deadline(t: Option<Duration>) -> Option<Deadline> {
    t.map(|total| Deadline {
        at: Instant::now() + total,
        total,
    })
}

/// Whether a read error means the stream can no longer be trusted and deserves an error reply.
fn is_framing_error(e: &ProtoError) -> bool {
    matches!(
        e,
        ProtoError::BadMagic(_)
            | ProtoError::Version { .. }
            | ProtoError::BadKind(_)
            | ProtoError::TooLarge { .. }
    )
}

fn response_frame(id: u32, reply: ErrorReply) -> Frame {
    Frame::json(FrameKind::Response, id, &Response::Error(reply)).unwrap_or_else(|_| Frame {
        header: crate::frame::FrameHeader {
            kind: FrameKind::Response,
            len: 0,
            id,
        },
        payload: Vec::new(),
    })
}

/// An error response naming `e`; `Response::Error` and `ControlResponse::Error` share this
/// JSON shape, so every client decodes it.
pub fn error_frame(id: u32, code: ErrorCode, e: &ProtoError) -> Frame {
    response_frame(
        id,
        ErrorReply {
            code,
            message: e.to_string(),
        },
    )
}

fn refusal(f: &Frame) -> ProtoError {
    match f.decode::<Response>(FrameKind::Response, "response") {
        Ok(Response::Error(e)) => ProtoError::Refused(e),
        Ok(Response::Ok(_)) => ProtoError::Unexpected {
            expected: "hello",
            got: FrameKind::Response,
        },
        Err(e) => e,
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

// ---------------------------------------------------------------------------------------------
// Blocking flavour.

/// A blocking stream whose read timeout the channel controls.
pub trait BlockingStream: std::io::Read + std::io::Write {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl BlockingStream for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_write_timeout(self, t)
    }
}

impl BlockingStream for std::net::TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, t)
    }
}

/// Blocking channel (SPANK plugin, synchronous tools).
#[derive(Debug)]
pub struct Channel<S> {
    s: S,
    core: Core,
}

impl<S: BlockingStream> Channel<S> {
    /// Client side: sends `hello` (with this side's versions) and waits for the server's.
    pub fn connect(s: S, cfg: ChannelConfig, hello: Hello) -> Result<Self, ProtoError> {
        let mut c = Channel {
            s,
            core: Core::new(cfg)?,
        };
        c.s.set_write_timeout(c.core.write_timeout())?;
        let f = c.core.client_hello(hello)?;
        c.write(&f)?;
        let reply = c.read(deadline(cfg.call_timeout.or(cfg.idle_timeout)))?;
        c.core.on_server_hello(reply)?;
        Ok(c)
    }

    /// Server side: waits for the client's `Hello`, negotiates, runs `check` on it and answers
    /// with `hello`, or with an error response before returning the error.
    pub fn accept(
        s: S,
        cfg: ChannelConfig,
        hello: Hello,
        check: impl FnOnce(&Hello) -> Result<(), ErrorReply>,
    ) -> Result<Self, ProtoError> {
        let mut c = Channel {
            s,
            core: Core::new(cfg)?,
        };
        c.s.set_write_timeout(c.core.write_timeout())?;
        let first = c.recv_frame()?;
        match c.core.on_client_hello(&first, hello, check) {
            Ok(answer) => c.write(&answer)?,
            Err((e, reply)) => {
                let _ = c.write(&reply);
                return Err(e);
            }
        }
        Ok(c)
    }

    pub fn negotiated(&self) -> &Negotiated {
        self.core
            .negotiated()
            .expect("a channel exists only after its handshake")
    }

    pub fn get_ref(&self) -> &S {
        &self.s
    }

    /// Changes the idle timeout, e.g. a short one for the `Hello`, none once it is in.
    pub fn set_idle_timeout(&mut self, t: Option<Duration>) {
        self.core.cfg.idle_timeout = t.filter(|t| !t.is_zero());
    }

    /// Changes the default per-call timeout.
    pub fn set_call_timeout(&mut self, t: Option<Duration>) {
        self.core.cfg.call_timeout = t.filter(|t| !t.is_zero());
    }

    pub fn into_inner(self) -> S {
        self.s
    }

    /// One request, one response (events of it are dropped), within the call timeout.
    pub fn call<T: DeserializeOwned>(&mut self, req: &impl Serialize) -> Result<T, ProtoError> {
        let t = self.core.cfg.call_timeout;
        self.call_with(req, t, |_| {})
    }

    /// As [`Channel::call`], with its own timeout and the request's events passed to `on_event`
    /// (malformed events are dropped).
    pub fn call_with<T: DeserializeOwned>(
        &mut self,
        req: &impl Serialize,
        timeout: Option<Duration>,
        on_event: impl FnMut(Event),
    ) -> Result<T, ProtoError> {
        let id = self.send_request(req)?;
        self.recv_response(id, timeout, on_event)
    }

    /// Sends a request without waiting; returns its id.
    pub fn send_request(&mut self, req: &impl Serialize) -> Result<u32, ProtoError> {
        let (id, f) = self.core.request(req)?;
        self.write(&f)?;
        Ok(id)
    }

    /// Id of the last request sent.
    pub fn last_sent(&self) -> Option<u32> {
        self.core.last_sent
    }

    /// Waits for the response to request `id`, passing its events to `on_event`.
    pub fn recv_response<T: DeserializeOwned>(
        &mut self,
        id: u32,
        timeout: Option<Duration>,
        mut on_event: impl FnMut(Event),
    ) -> Result<T, ProtoError> {
        let d = deadline(timeout);
        loop {
            let f = match d {
                Some(_) => self.read(d)?,
                None => self.read_forever()?,
            };
            match self.core.classify(id, f)? {
                Incoming::Event(f) => {
                    if let Ok(ev) = f.decode(FrameKind::Event, "event") {
                        on_event(ev);
                    }
                }
                Incoming::Response(f) => return f.decode(FrameKind::Response, "response"),
                Incoming::Skip => {}
            }
        }
    }

    /// Server side: the next frame within the idle timeout. A framing error gets an error
    /// response before it is returned.
    pub fn recv_frame(&mut self) -> Result<Frame, ProtoError> {
        match self.read(None) {
            Err(e) if is_framing_error(&e) => {
                let _ = self.write(&error_frame(0, e.code(), &e));
                Err(e)
            }
            other => other,
        }
    }

    /// Sends a JSON frame.
    pub fn send(
        &mut self,
        kind: FrameKind,
        id: u32,
        msg: &impl Serialize,
    ) -> Result<(), ProtoError> {
        let f = Frame::json(kind, id, msg)?;
        self.write(&f)
    }

    pub fn write(&mut self, f: &Frame) -> Result<(), ProtoError> {
        crate::frame::write_frame(&mut self.s, f).map_err(|e| match e {
            ProtoError::Io(io) if timed_out(&io) => ProtoError::Timeout {
                what: "write",
                ms: self.core.write_timeout().unwrap_or_default().as_millis(),
            },
            other => other,
        })
    }

    fn read_forever(&mut self) -> Result<Frame, ProtoError> {
        self.s.set_read_timeout(None)?;
        crate::codec::read_blocking(&mut self.core.decoder, &mut self.s)
    }

    fn read(&mut self, d: Option<Deadline>) -> Result<Frame, ProtoError> {
        let Some((total, what, ms)) = self.core.read_timeout(d) else {
            return self.read_forever();
        };
        // A deadline for the whole frame, as the async flavour has: the socket's own timeout
        // restarts on every byte, so a peer trickling bytes would otherwise never time out.
        let at = d.map_or_else(|| Instant::now() + total, |d| d.at);
        loop {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ProtoError::Timeout { what, ms });
            }
            self.s.set_read_timeout(Some(left))?;
            match crate::codec::read_once(&mut self.core.decoder, &mut self.s) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(ProtoError::Io(e)) if timed_out(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Async flavour.

#[cfg(feature = "async")]
pub use self::nonblocking::AsyncChannel;

#[cfg(feature = "async")]
mod nonblocking {
    use tokio::io::{AsyncRead, AsyncWrite};

    use super::*;

    /// Async channel (agent, controller, rebalctl).
    #[derive(Debug)]
    pub struct AsyncChannel<S> {
        s: S,
        core: Core,
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncChannel<S> {
        /// Client side: sends `hello` (with this side's versions) and waits for the server's.
        pub async fn connect(s: S, cfg: ChannelConfig, hello: Hello) -> Result<Self, ProtoError> {
            let mut c = AsyncChannel {
                s,
                core: Core::new(cfg)?,
            };
            let f = c.core.client_hello(hello)?;
            c.write(&f).await?;
            let reply = c
                .read(deadline(cfg.call_timeout.or(cfg.idle_timeout)))
                .await?;
            c.core.on_server_hello(reply)?;
            Ok(c)
        }

        /// Server side: see [`Channel::accept`].
        pub async fn accept(
            s: S,
            cfg: ChannelConfig,
            hello: Hello,
            check: impl FnOnce(&Hello) -> Result<(), ErrorReply>,
        ) -> Result<Self, ProtoError> {
            let mut c = AsyncChannel {
                s,
                core: Core::new(cfg)?,
            };
            let first = c.recv_frame().await?;
            match c.core.on_client_hello(&first, hello, check) {
                Ok(answer) => c.write(&answer).await?,
                Err((e, reply)) => {
                    let _ = c.write(&reply).await;
                    return Err(e);
                }
            }
            Ok(c)
        }

        /// Server side, for a handshake that needs the client's `Hello` (and time) to answer:
        /// reads the client's `Hello` within the idle timeout, agrees on the highest common
        /// version, then awaits `answer(peer_hello, version)`. `Ok((hello, value))` sends
        /// `hello` (stating the agreed version) and returns the channel with `value`; `Err`
        /// sends the error reply and closes, as does a bad first frame or no common version.
        /// The agent's peer server computes its munge credential from the client's nonce here.
        pub async fn accept_with<T, F, Fut>(
            s: S,
            cfg: ChannelConfig,
            answer: F,
        ) -> Result<(Self, T), ProtoError>
        where
            F: FnOnce(Hello, u16) -> Fut,
            Fut: std::future::Future<Output = Result<(Hello, T), ErrorReply>>,
        {
            let mut c = AsyncChannel {
                s,
                core: Core::new(cfg)?,
            };
            let first = c.recv_frame().await?;
            let id = first.header.id;
            let (peer, version) = match c.core.hello_version(&first) {
                Ok(v) => v,
                Err((e, reply)) => {
                    let _ = c.write(&reply).await;
                    return Err(e);
                }
            };
            let (mine, value) = match answer(peer.clone(), version).await {
                Ok(v) => v,
                Err(reply) => {
                    let _ = c.write(&response_frame(id, reply.clone())).await;
                    return Err(ProtoError::Refused(reply));
                }
            };
            match c.core.answer_hello(id, version, peer, mine) {
                Ok(f) => c.write(&f).await?,
                Err((e, reply)) => {
                    let _ = c.write(&reply).await;
                    return Err(e);
                }
            }
            Ok((c, value))
        }

        pub fn negotiated(&self) -> &Negotiated {
            self.core
                .negotiated()
                .expect("a channel exists only after its handshake")
        }

        pub fn get_ref(&self) -> &S {
            &self.s
        }

        /// See [`Channel::set_idle_timeout`].
        pub fn set_idle_timeout(&mut self, t: Option<Duration>) {
            self.core.cfg.idle_timeout = t.filter(|t| !t.is_zero());
        }

        /// See [`Channel::set_call_timeout`].
        pub fn set_call_timeout(&mut self, t: Option<Duration>) {
            self.core.cfg.call_timeout = t.filter(|t| !t.is_zero());
        }

        /// The stream, e.g. to hand it to code that still speaks raw frames.
        pub fn into_inner(self) -> S {
            self.s
        }

        /// The stream and the channel's state (negotiation, request ids, limits), to carry
        /// the channel over onto a wrapping of the stream (the peer protocol's TLS upgrade after
        /// the `Hello`). Refused while a frame is half received: its bytes would be lost.
        pub fn into_parts(self) -> Result<(S, Core), ProtoError> {
            if !self.core.decoder.is_idle() {
                return Err(ProtoError::Config(
                    "cannot take a channel apart in the middle of a frame",
                ));
            }
            Ok((self.s, self.core))
        }

        /// The channel again, on `s` (see [`AsyncChannel::into_parts`]).
        pub fn from_parts(s: S, core: Core) -> Self {
            AsyncChannel { s, core }
        }

        pub async fn call<T: DeserializeOwned>(
            &mut self,
            req: &impl Serialize,
        ) -> Result<T, ProtoError> {
            let t = self.core.cfg.call_timeout;
            self.call_with(req, t, |_| {}).await
        }

        pub async fn call_with<T: DeserializeOwned>(
            &mut self,
            req: &impl Serialize,
            timeout: Option<Duration>,
            on_event: impl FnMut(Event),
        ) -> Result<T, ProtoError> {
            let id = self.send_request(req).await?;
            self.recv_response(id, timeout, on_event).await
        }

        pub async fn send_request(&mut self, req: &impl Serialize) -> Result<u32, ProtoError> {
            let (id, f) = self.core.request(req)?;
            self.write(&f).await?;
            Ok(id)
        }

        pub async fn recv_response<T: DeserializeOwned>(
            &mut self,
            id: u32,
            timeout: Option<Duration>,
            mut on_event: impl FnMut(Event),
        ) -> Result<T, ProtoError> {
            let d = deadline(timeout);
            loop {
                let f = match d {
                    Some(_) => self.read(d).await?,
                    None => crate::codec::read_async(&mut self.core.decoder, &mut self.s).await?,
                };
                match self.core.classify(id, f)? {
                    Incoming::Event(f) => {
                        if let Ok(ev) = f.decode(FrameKind::Event, "event") {
                            on_event(ev);
                        }
                    }
                    Incoming::Response(f) => return f.decode(FrameKind::Response, "response"),
                    Incoming::Skip => {}
                }
            }
        }

        /// The next frame of any kind within `timeout` (`None`: the idle timeout), with no
        /// error reply on a framing error: a client reading the events (heartbeats) its peer
        /// sends between and during calls. Cancel-safe: a partial frame stays in the decoder.
        pub async fn next_frame(&mut self, timeout: Option<Duration>) -> Result<Frame, ProtoError> {
            self.read(deadline(timeout)).await
        }

        /// Server side: the next frame within the idle timeout. A framing error gets an error
        /// response before it is returned.
        pub async fn recv_frame(&mut self) -> Result<Frame, ProtoError> {
            match self.read(None).await {
                Err(e) if is_framing_error(&e) => {
                    let _ = self.write(&error_frame(0, e.code(), &e)).await;
                    Err(e)
                }
                other => other,
            }
        }

        pub async fn send(
            &mut self,
            kind: FrameKind,
            id: u32,
            msg: &impl Serialize,
        ) -> Result<(), ProtoError> {
            let f = Frame::json(kind, id, msg)?;
            self.write(&f).await
        }

        pub async fn write(&mut self, f: &Frame) -> Result<(), ProtoError> {
            let w = crate::frame::write_frame_async(&mut self.s, f);
            match self.core.write_timeout() {
                Some(t) => tokio::time::timeout(t, w)
                    .await
                    .map_err(|_| ProtoError::Timeout {
                        what: "write",
                        ms: t.as_millis(),
                    })?,
                None => w.await,
            }
        }

        async fn read(&mut self, d: Option<Deadline>) -> Result<Frame, ProtoError> {
            let t = self.core.read_timeout(d);
            let r = crate::codec::read_async(&mut self.core.decoder, &mut self.s);
            match t {
                // The decoder keeps a partial frame if the timeout drops the read.
                Some((left, what, ms)) => tokio::time::timeout(left, r)
                    .await
                    .map_err(|_| ProtoError::Timeout { what, ms })?,
                None => r.await,
            }
        }
    }
}

#[cfg(test)]
#[path = "channel_tests.rs"]
mod tests;
