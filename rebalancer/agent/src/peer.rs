//! Agent ↔ agent protocol (TCP, rebalancer-proto framing), destination side.
//!
//! One connection per migration, opened by the source:
//! ```text
//! source                                   destination
//! Hello{role=agent, node, munge cred} ──→  verify credential (before anything else)
//!                                     ←──  Hello
//! Capabilities                        ──→  ← capabilities
//! Prepare{migration, mode, meta}      ──→  check room/features; netns (no route yet), root
//!                                          skeleton; stop-and-copy: criu page-server
//!                                     ←──  Prepared{page_server_port}
//!   (criu dump streams pages to the page server)
//! Images{files}  + Data frames        ──→  write non-memory images into the tmpfs dir
//!                                     ←──  ImagesReceived
//! Restore{lazy}                       ──→  post-copy: criu lazy-pages; criu restore
//!                                          --leave-stopped (tree stays stopped)
//!                                     ←──  Restored{pid, stats}
//! Commit  (source's point of no return)──→ route + SIGCONT + gratuitous ARP
//!                                     ←──  Committed
//! ```
//! Abort, EOF, an error or the timeout before Commit make the destination kill whatever it
//! restored and remove the netns, images and reservation: the source resumes its copy.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rebalancer_proto::frame::{read_frame_async, write_frame_async, Frame, FrameKind};
use rebalancer_proto::{
    now_millis, ContainerState, ErrorReply, Hello, MigrationId, MigrationMode, NodeCapabilities,
    Role, PROTOCOL_VERSION,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::agent::Agent;
use crate::container::{self, Container, ContainerMeta};
use crate::criu;
use crate::error::AgentError;
use crate::netns::{self, ContainerNet};

/// Upper bound of one peer frame (image chunks are 1 MiB).
pub const PEER_MAX_FRAME: u32 = 4 << 20;
pub const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum PeerRequest {
    Capabilities,
    Prepare {
        migration: MigrationId,
        mode: MigrationMode,
        source_node: String,
        meta: Box<ContainerMeta>,
        /// A Slurm task: restored by a restore step on this node (`prepare-restore`), not by
        /// the agent, so that it becomes part of the job.
        #[serde(default)]
        restore_step: bool,
        /// The source agent's peer address, told the task's final status later.
        #[serde(default)]
        source_addr: Option<String>,
        /// Resident memory of the container, for the destination's room check.
        #[serde(default)]
        rss_bytes: u64,
    },
    Images {
        files: Vec<ImageFile>,
    },
    Restore {
        /// Post-copy: the source's lazy page server.
        lazy_pages: Option<(Ipv4Addr, u16)>,
    },
    /// Pre-copy: start a page server for round `round` (`last`: the final, frozen dump, whose
    /// images are the ones restored; its parent is round `round - 1`).
    PrecopyRound {
        round: u32,
        last: bool,
    },
    Commit,
    /// Destination → source, after commit: the migrated task ended (`node` is where).
    TaskEnded {
        container: String,
        wait_status: i32,
        node: String,
    },
    Abort {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PeerReply {
    Capabilities {
        capabilities: NodeCapabilities,
    },
    Prepared {
        page_server: Option<(Ipv4Addr, u16)>,
    },
    ImagesReceived {
        bytes: u64,
    },
    Restored {
        pid: i32,
        restore_ms: u64,
        pages_restored: u64,
    },
    Committed {
        resumed_at: u64,
    },
    RoundReady {
        page_server: (Ipv4Addr, u16),
    },
    Aborted,
    Ack,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerResponse {
    Ok(PeerReply),
    Error(ErrorReply),
}

pub fn reply_error(e: &AgentError) -> PeerResponse {
    PeerResponse::Error(ErrorReply {
        code: e.code(),
        message: e.chain(),
    })
}

pub fn error_from_reply(e: ErrorReply) -> AgentError {
    use rebalancer_proto::ErrorCode as C;
    let m = e.message;
    match e.code {
        C::NotFound => AgentError::NotFound(m),
        C::Busy => AgentError::Busy(m),
        C::BadRequest => AgentError::BadRequest(m),
        C::PermissionDenied => AgentError::PermissionDenied(m),
        C::Unsupported => AgentError::Unsupported(m),
        C::NoRoom => AgentError::NoRoom(m),
        C::Timeout => AgentError::Timeout(m),
        C::Unreachable => AgentError::Unreachable(m),
        _ => AgentError::Peer(m),
    }
}

/// Client end of a peer connection (source side).
pub struct PeerConn {
    pub stream: TcpStream,
    next_id: u32,
    pub bytes_sent: u64,
    pub timeout: Duration,
}

impl PeerConn {
    pub async fn connect(
        agent: &Agent,
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
        let mut c = PeerConn {
            stream,
            next_id: 1,
            bytes_sent: 0,
            timeout,
        };
        let mut hello = Hello::new(Role::Agent, crate::SOFTWARE);
        hello.node = Some(agent.cfg.node.clone());
        hello.credential = crate::auth::credential(
            agent.cfg.auth,
            agent.cfg.munge_socket.as_deref(),
            &agent.cfg.node,
        )
        .await?;
        c.send(&Frame::json(FrameKind::Hello, 0, &hello)?).await?;
        let f = c.recv().await?;
        match f.header.kind {
            FrameKind::Hello => {
                let h: Hello = f.decode(FrameKind::Hello, "hello")?;
                if h.protocol != PROTOCOL_VERSION {
                    return Err(AgentError::Peer(format!(
                        "destination speaks protocol {}",
                        h.protocol
                    )));
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

/// An incoming migration on the destination, and what to undo if it does not commit.
struct Incoming {
    migration: MigrationId,
    mode: MigrationMode,
    meta: ContainerMeta,
    net: ContainerNet,
    root: PathBuf,
    dir: PathBuf,
    /// Per-migration tmpfs directory: `img` (restored images) and `pre-K` (pre-copy rounds).
    mig_dir: PathBuf,
    images: PathBuf,
    page_server: Option<tokio::process::Child>,
    lazy_daemon: Option<tokio::process::Child>,
    restored_pid: Option<i32>,
    committed: bool,
    restore_step: bool,
    /// The restore step (srun), started at prepare so that its launch is out of the downtime.
    step: Option<StepLaunch>,
    step_child: Option<tokio::process::Child>,
    source: Option<(String, String)>,
    /// The container's cgroup here (agent-restored containers); criu restore runs inside it.
    cgroup: Option<crate::cgroup::Cgroup>,
}

impl Incoming {
    async fn undo(&mut self, agent: &Agent, why: &str) {
        tracing::warn!(migration = %self.migration, container = %self.meta.spec.id, reason = why, "incoming migration aborted");
        agent.restore_steps().remove(&self.migration);
        if let Some(mut c) = self.step_child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        if let Some(pid) = self.restored_pid.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Pid 1 of a restored tree is our child (subreaper): reap it.
            let _ = tokio::task::spawn_blocking(move || {
                nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
            })
            .await;
        }
        for c in [self.page_server.take(), self.lazy_daemon.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        netns::destroy(&self.net).await;
        if let Some(cg) = self.cgroup.take() {
            cg.remove().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.mig_dir);
        agent
            .incoming()
            .remove(&(self.meta.spec.id.clone(), self.meta.address));
    }
}

/// Serves one peer connection (destination side).
pub async fn serve(agent: Arc<Agent>, mut stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let mut incoming: Option<Incoming> = None;
    let r = serve_inner(&agent, &mut stream, &mut incoming).await;
    if let Some(mut inc) = incoming {
        if !inc.committed {
            let why = match &r {
                Ok(()) => "source closed the connection before commit".to_string(),
                Err(e) => e.chain(),
            };
            inc.undo(&agent, &why).await;
        }
    }
    if let Err(e) = r {
        tracing::info!(peer = ?peer, error = %e.chain(), "peer connection ended");
    }
}

async fn write_resp<S: AsyncWrite + Unpin>(
    s: &mut S,
    id: u32,
    r: &PeerResponse,
) -> Result<(), AgentError> {
    write_frame_async(s, &Frame::json(FrameKind::Response, id, r)?).await?;
    Ok(())
}

async fn read_timeout<S: AsyncRead + Unpin>(s: &mut S, t: Duration) -> Result<Frame, AgentError> {
    Ok(tokio::time::timeout(t, read_frame_async(s, PEER_MAX_FRAME))
        .await
        .map_err(|_| AgentError::Timeout("source went silent".into()))??)
}

async fn serve_inner(
    agent: &Arc<Agent>,
    s: &mut TcpStream,
    incoming: &mut Option<Incoming>,
) -> Result<(), AgentError> {
    let timeout = Duration::from_millis(agent.cfg.migration_timeout_ms);
    // AWAIT_HELLO: nothing but a hello with a valid credential gets further.
    let f = read_timeout(s, Duration::from_secs(10)).await?;
    let hello: Hello = match f.decode(FrameKind::Hello, "hello") {
        Ok(h) => h,
        Err(e) => {
            let err = AgentError::PermissionDenied(format!("expected a hello first: {e}"));
            write_resp(s, f.header.id, &reply_error(&err)).await?;
            return Err(err);
        }
    };
    if hello.protocol != PROTOCOL_VERSION || hello.role != Role::Agent {
        let err = AgentError::BadRequest(format!(
            "peer speaks protocol {} as {:?}; this agent speaks {PROTOCOL_VERSION} with agents",
            hello.protocol, hello.role
        ));
        write_resp(s, 0, &reply_error(&err)).await?;
        return Err(err);
    }
    if let Err(e) = crate::auth::verify(
        agent.cfg.auth,
        agent.cfg.munge_socket.as_deref(),
        hello.node.as_deref(),
        hello.credential.as_deref(),
    )
    .await
    {
        tracing::warn!(peer = ?s.peer_addr().ok(), node = ?hello.node, error = %e, "rejected unauthenticated peer");
        write_resp(s, 0, &reply_error(&e)).await?;
        return Err(e);
    }
    let mut me = Hello::new(Role::Agent, crate::SOFTWARE);
    me.node = Some(agent.cfg.node.clone());
    write_frame_async(s, &Frame::json(FrameKind::Hello, 0, &me)?).await?;
    let source_node = hello.node.unwrap_or_default();

    loop {
        let f = match read_timeout(s, timeout).await {
            Ok(f) => f,
            Err(AgentError::Proto(rebalancer_proto::ProtoError::Closed)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let id = f.header.id;
        let req: PeerRequest = match f.decode(FrameKind::Request, "request") {
            Ok(r) => r,
            Err(e) => {
                write_resp(s, id, &reply_error(&AgentError::BadRequest(e.to_string()))).await?;
                continue;
            }
        };
        let result = handle(agent, s, incoming, req, &source_node, timeout).await;
        let done = matches!(
            result,
            Ok(PeerReply::Committed { .. }) | Ok(PeerReply::Aborted)
        );
        match result {
            Ok(r) => write_resp(s, id, &PeerResponse::Ok(r)).await?,
            Err(e) => {
                tracing::warn!(error = %e.chain(), "peer request failed");
                write_resp(s, id, &reply_error(&e)).await?;
                // A failed step leaves nothing half-done behind.
                if let Some(mut inc) = incoming.take() {
                    if !inc.committed {
                        inc.undo(agent, &e.chain()).await;
                    }
                }
            }
        }
        if done {
            return Ok(());
        }
    }
}

fn pick_port(ip: Ipv4Addr) -> Result<u16, AgentError> {
    let l = std::net::TcpListener::bind((ip, 0)).map_err(|source| AgentError::Io {
        what: format!("bind {ip}:0"),
        source,
    })?;
    Ok(l.local_addr()
        .map_err(|source| AgentError::Io {
            what: "local_addr".into(),
            source,
        })?
        .port())
}

/// Starts a criu helper that reports readiness on `--status-fd` and waits for it.
pub async fn spawn_ready(
    agent: &Agent,
    args_for_fd: impl FnOnce(i32) -> Vec<String>,
    what: &'static str,
    log_dir: &std::path::Path,
    log: &str,
) -> Result<tokio::process::Child, AgentError> {
    let (r, w): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| AgentError::Io {
            what: "pipe".into(),
            source: e.into(),
        })?;
    let wfd = w.as_raw_fd();
    let args = args_for_fd(wfd);
    let mut child = criu::command(&agent.cfg.criu, &args, &[wfd])
        .current_dir(log_dir)
        .spawn()
        .map_err(|source| AgentError::Io {
            what: format!("cannot start criu {what}"),
            source,
        })?;
    drop(w);
    let mut rf = tokio::fs::File::from_std(std::fs::File::from(r));
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut rf, &mut b),
    )
    .await
    .map_err(|_| AgentError::Criu {
        action: what,
        message: "not ready after 10 s".into(),
    })?
    .unwrap_or(0);
    if n == 0 {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(AgentError::Criu {
            action: what,
            message: criu::log_tail(log_dir, log),
        });
    }
    Ok(child)
}

async fn handle(
    agent: &Arc<Agent>,
    s: &mut TcpStream,
    incoming: &mut Option<Incoming>,
    req: PeerRequest,
    source_node: &str,
    timeout: Duration,
) -> Result<PeerReply, AgentError> {
    match req {
        PeerRequest::Capabilities => Ok(PeerReply::Capabilities {
            capabilities: agent.caps.clone(),
        }),
        PeerRequest::Prepare {
            migration,
            mode,
            meta,
            source_node: claimed,
            restore_step,
            source_addr,
            rss_bytes,
        } => {
            if incoming.is_some() {
                return Err(AgentError::BadRequest("prepare sent twice".into()));
            }
            if claimed != source_node {
                return Err(AgentError::BadRequest(format!(
                    "prepare names source {claimed}, hello said {source_node}"
                )));
            }
            if !agent.caps.modes.contains(&mode) {
                return Err(AgentError::Unsupported(format!(
                    "destination {} does not support {mode}: {}",
                    agent.cfg.node,
                    agent.caps.notes.join("; ")
                )));
            }
            let meta = *meta;
            let id = meta.spec.id.clone();
            {
                let cs = agent.containers();
                if cs.get(&id).is_some_and(|c| c.state.is_live()) {
                    return Err(AgentError::Busy(format!(
                        "container {id} already runs on {}",
                        agent.cfg.node
                    )));
                }
            }
            if agent.address_in_use(meta.address) {
                return Err(AgentError::NoRoom(format!(
                    "address {} is in use on {}",
                    meta.address, agent.cfg.node
                )));
            }
            agent.validate_spec(&meta.spec)?;
            let available = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines()
                        .find_map(|l| l.strip_prefix("MemAvailable:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
                .map(|kb| kb * 1024);
            if let Some(avail) = available {
                room_check(mode, rss_bytes, avail, &agent.cfg.node)?;
            }
            agent.incoming().insert((id.clone(), meta.address));
            let dir = agent.container_dir(&id);
            let mig_dir = agent.cfg.run_dir.join("images").join(&migration);
            let images = mig_dir.join("img");
            let root = agent.root_for(&meta.spec);
            let net = agent.new_net(&id, meta.address);
            let mut inc = Incoming {
                migration: migration.clone(),
                mode,
                meta: meta.clone(),
                net: net.clone(),
                root: root.clone(),
                dir: dir.clone(),
                mig_dir: mig_dir.clone(),
                images: images.clone(),
                page_server: None,
                lazy_daemon: None,
                restored_pid: None,
                committed: false,
                restore_step,
                step: None,
                step_child: None,
                source: source_addr.map(|a| (source_node.to_string(), a)),
                cgroup: None,
            };
            let r = async {
                if let rebalancer_proto::RootfsSpec::Host = meta.spec.rootfs {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                std::fs::create_dir_all(&images).map_err(|source| AgentError::Io {
                    what: format!("mkdir {}", images.display()),
                    source,
                })?;
                container::prepare_root(&root, &meta.mounts, &meta.symlinks)?;
                if restore_step {
                    // The source refuses these first; a peer that did not is refused here.
                    if let Some(why) = container::stdin_refusal(&meta.stdio_keys, &meta.stdio_paths) {
                        return Err(AgentError::Unsupported(why));
                    }
                    let missing = missing_stdio_files(&meta.stdio_paths);
                    if !missing.is_empty() {
                        return Err(AgentError::NoRoom(format!(
                            "the task's output file(s) {} do not exist on {}; the restored task could not write to them",
                            missing.join(", "),
                            agent.cfg.node
                        )));
                    }
                }
                for b in &meta.spec.binds {
                    if !std::path::Path::new(b).exists() {
                        return Err(AgentError::NoRoom(format!(
                            "bind source {b} does not exist on {}",
                            agent.cfg.node
                        )));
                    }
                }
                if !restore_step {
                    // Same limits as on the source, or no migration.
                    inc.cgroup = agent.create_cgroup(&meta.spec)?;
                }
                netns::create(&net, false).await?;
                let mut page_server = None;
                if mode == MigrationMode::StopAndCopy {
                    let ip = agent.cfg.advertise;
                    let port = pick_port(ip)?;
                    let imgs = images.clone();
                    let child = spawn_ready(
                        agent,
                        |fd| criu::page_server_args(&imgs, ip, port, fd, None),
                        "page-server",
                        &images,
                        "page-server.log",
                    )
                    .await?;
                    page_server = Some((child, (ip, port)));
                }
                if restore_step {
                    start_restore_step(agent, &mut inc)?;
                }
                Ok::<_, AgentError>(page_server)
            }
            .await;
            match r {
                Ok(ps) => {
                    let addr = ps.as_ref().map(|(_, a)| *a);
                    inc.page_server = ps.map(|(c, _)| c);
                    tracing::info!(migration = %migration, container = %id, mode = %mode, "incoming migration prepared");
                    *incoming = Some(inc);
                    Ok(PeerReply::Prepared { page_server: addr })
                }
                Err(e) => {
                    inc.undo(agent, &e.chain()).await;
                    Err(e)
                }
            }
        }
        PeerRequest::Images { files } => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("images before prepare".into()))?;
            let mut total = 0u64;
            for f in &files {
                if f.name.contains('/') || f.name.starts_with('.') || f.name.is_empty() {
                    return Err(AgentError::BadRequest(format!(
                        "bad image name {:?}",
                        f.name
                    )));
                }
                let mut data =
                    Vec::with_capacity(usize::try_from(f.size.min(64 << 20)).unwrap_or(0));
                while (data.len() as u64) < f.size {
                    let fr = read_timeout(s, timeout).await?;
                    if fr.header.kind != FrameKind::Data {
                        return Err(AgentError::BadRequest("expected image data".into()));
                    }
                    data.extend_from_slice(&fr.payload);
                }
                if data.len() as u64 != f.size {
                    return Err(AgentError::BadRequest(format!(
                        "image {} longer than announced",
                        f.name
                    )));
                }
                tokio::fs::write(inc.images.join(&f.name), &data)
                    .await
                    .map_err(|source| AgentError::Io {
                        what: format!("write image {}", f.name),
                        source,
                    })?;
                total += f.size;
            }
            Ok(PeerReply::ImagesReceived { bytes: total })
        }
        PeerRequest::Restore { lazy_pages } => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("restore before prepare".into()))?;
            restore(agent, inc, lazy_pages).await
        }
        PeerRequest::Commit => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("commit before prepare".into()))?;
            let pid = inc
                .restored_pid
                .ok_or_else(|| AgentError::BadRequest("commit before restore".into()))?;
            inc.committed = true;
            // Resume first, then take the address over.
            container::signal_tree(pid, nix::sys::signal::Signal::SIGCONT);
            let resumed_at = now_millis();
            if let Err(e) = netns::add_route(&inc.net).await {
                tracing::error!(migration = %inc.migration, error = %e.chain(), "cannot add the container route");
            }
            let uplink = agent.cfg.uplink.clone();
            let ip = inc.meta.address;
            // Several announcements: a neighbour entry refreshed within its locktime ignores one.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = crate::garp::announce(&uplink, ip, 3, Duration::from_millis(300)) {
                    tracing::warn!(error = %e.chain(), "gratuitous ARP failed");
                }
            });
            let mut meta = inc.meta.clone();
            meta.started_at = inc.meta.started_at;
            let c = Container {
                meta,
                net: inc.net.clone(),
                root: inc.root.clone(),
                dir: inc.dir.clone(),
                pid,
                state: ContainerState::Running,
                exit_status: None,
                external: inc.restore_step,
                migrated_to: None,
                arrived_from: if inc.restore_step {
                    inc.source.clone()
                } else {
                    None
                },
                final_status: None,
                cgroup: inc.cgroup.take(),
            };
            agent.containers().insert(inc.meta.spec.id.clone(), c);
            agent.restore_steps().remove(&inc.migration);
            if let Some(mut child) = inc.step_child.take() {
                // srun lives as long as the restored task; reap it when it ends.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
            }
            agent
                .incoming()
                .remove(&(inc.meta.spec.id.clone(), inc.meta.address));
            let images = inc.mig_dir.clone();
            let daemon = inc.lazy_daemon.take();
            let mig = inc.migration.clone();
            // The images go once the lazy daemon is done (it reads them); a daemon whose
            // container ended has nothing left to serve and is stopped.
            tokio::spawn(async move {
                if let Some(mut d) = daemon {
                    loop {
                        tokio::select! {
                            st = d.wait() => {
                                tracing::info!(migration = %mig, status = ?st, "lazy-pages daemon finished");
                                break;
                            }
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                                if !container::alive(pid) {
                                    tracing::warn!(migration = %mig, "container ended before all pages arrived; stopping lazy-pages");
                                    let _ = d.start_kill();
                                    let _ = d.wait().await;
                                    break;
                                }
                            }
                        }
                    }
                }
                let _ = std::fs::remove_dir_all(images);
            });
            tracing::info!(migration = %inc.migration, container = %inc.meta.spec.id, pid, "migration committed: container runs here");
            Ok(PeerReply::Committed { resumed_at })
        }
        PeerRequest::PrecopyRound { round, last } => {
            let inc = incoming
                .as_mut()
                .ok_or_else(|| AgentError::BadRequest("pre-copy round before prepare".into()))?;
            if inc.mode != MigrationMode::PreCopy {
                return Err(AgentError::BadRequest(format!(
                    "pre-copy round in a {} migration",
                    inc.mode
                )));
            }
            if let Some(mut ps) = inc.page_server.take() {
                // The previous round's page server ends when its pre-dump closed the connection.
                let st = tokio::time::timeout(Duration::from_secs(30), ps.wait())
                    .await
                    .map_err(|_| {
                        AgentError::Timeout("previous round's page server still running".into())
                    })?
                    .map_err(|source| AgentError::Io {
                        what: "wait page server".into(),
                        source,
                    })?;
                if !st.success() {
                    return Err(AgentError::Criu {
                        action: "page-server",
                        message: format!("round {} failed", round.saturating_sub(1)),
                    });
                }
            }
            let dir = if last {
                inc.images.clone()
            } else {
                inc.mig_dir.join(format!("pre-{round}"))
            };
            std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
                what: format!("mkdir {}", dir.display()),
                source,
            })?;
            let prev = (round > 0).then(|| format!("../pre-{}", round - 1));
            let ip = agent.cfg.advertise;
            let port = pick_port(ip)?;
            let d2 = dir.clone();
            let child = spawn_ready(
                agent,
                |fd| criu::page_server_args(&d2, ip, port, fd, prev.as_deref()),
                "page-server",
                &dir,
                "page-server.log",
            )
            .await?;
            inc.page_server = Some(child);
            Ok(PeerReply::RoundReady {
                page_server: (ip, port),
            })
        }
        PeerRequest::TaskEnded {
            container,
            wait_status,
            node,
        } => {
            let known = agent
                .containers()
                .get(&container)
                .is_some_and(|c| c.state == ContainerState::MigratedAway);
            if !known {
                return Err(AgentError::NotFound(format!(
                    "no migrated-away task {container} on {}",
                    agent.cfg.node
                )));
            }
            tracing::info!(container = %container, wait_status, node = %node, "migrated task ended");
            agent.task_final(&container, wait_status, &node);
            Ok(PeerReply::Ack)
        }
        PeerRequest::Abort { reason } => {
            if let Some(mut inc) = incoming.take() {
                if !inc.committed {
                    inc.undo(agent, &reason).await;
                }
            }
            Ok(PeerReply::Aborted)
        }
    }
}

async fn restore(
    agent: &Arc<Agent>,
    inc: &mut Incoming,
    lazy_pages: Option<(Ipv4Addr, u16)>,
) -> Result<PeerReply, AgentError> {
    let started = Instant::now();
    if let Some(mut ps) = inc.page_server.take() {
        // The page server exits once the dump closed its connection.
        let st = tokio::time::timeout(Duration::from_secs(30), ps.wait())
            .await
            .map_err(|_| AgentError::Timeout("page server still running after the dump".into()))?
            .map_err(|source| AgentError::Io {
                what: "wait page server".into(),
                source,
            })?;
        if !st.success() {
            return Err(AgentError::Criu {
                action: "page-server",
                message: criu::log_tail(&inc.images, "page-server.log"),
            });
        }
    }
    let lazy = inc.mode == MigrationMode::PostCopy;
    if lazy {
        let (src, port) = lazy_pages.ok_or_else(|| {
            AgentError::BadRequest("post-copy restore without page server".into())
        })?;
        let imgs = inc.images.clone();
        let d = spawn_ready(
            agent,
            |fd| criu::lazy_pages_args(&imgs, src, port, fd),
            "lazy-pages",
            &inc.images,
            "lazy-pages.log",
        )
        .await?;
        inc.lazy_daemon = Some(d);
    }
    if inc.restore_step {
        return restore_via_step(inc, started).await;
    }
    let (out, err) = agent.stdio_paths(&inc.meta.spec);
    let stdio = container::stdio_pipes(&out, &err)?;
    let net = std::fs::File::open(inc.net.path()).map_err(|source| AgentError::Io {
        what: format!("open {}", inc.net.path().display()),
        source,
    })?;
    let mut inherit = vec![(net.as_raw_fd(), criu::NET_KEY.to_string())];
    for (fd, key) in stdio.child.iter().zip(inc.meta.stdio_keys.iter()) {
        inherit.push((fd.as_raw_fd(), key.clone()));
    }
    let keep: Vec<i32> = inherit.iter().map(|(fd, _)| *fd).collect();
    let pidfile = inc.images.join("restored.pid");
    let args = criu::RestoreArgs {
        images_dir: inc.images.clone(),
        root: inc.root.clone(),
        ext_mounts: container::external_mounts(&inc.meta.mounts)
            .into_iter()
            .map(|(_, key, src)| (key, src))
            .collect(),
        inherit,
        pidfile: pidfile.clone(),
        lazy,
        leave_stopped: true,
        ignore_cgroups: true,
    }
    .build();
    let procs = match &inc.cgroup {
        Some(cg) => cg.procs_files()?,
        None => Vec::new(),
    };
    let r = criu::run_in(
        &agent.cfg.criu,
        "restore",
        &args,
        &keep,
        &crate::cgroup::raw(&procs),
        &inc.images,
        "restore.log",
    )
    .await;
    drop(procs);
    drop(stdio);
    drop(net);
    r?;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| AgentError::Criu {
            action: "restore",
            message: format!("no pid in {}", pidfile.display()),
        })?;
    inc.restored_pid = Some(pid);
    let stats = criu::read_stats(&inc.images, "stats-restore").unwrap_or_default();
    tracing::info!(migration = %inc.migration, pid, "restored (stopped), waiting for commit");
    Ok(PeerReply::Restored {
        pid,
        restore_ms: started.elapsed().as_millis() as u64,
        pages_restored: stats.pages_restored,
    })
}

/// Whether this node can take a container of `rss` bytes: stop-and-copy and pre-copy hold the
/// pages twice for a while (tmpfs images and the restored copy), post-copy once; plus 256 MiB
/// of headroom. Pure.
pub fn room_check(
    mode: MigrationMode,
    rss: u64,
    available: u64,
    node: &str,
) -> Result<(), AgentError> {
    let copies = if mode == MigrationMode::PostCopy {
        1
    } else {
        2
    };
    let need = rss.saturating_mul(copies) + (256 << 20);
    if available < need {
        return Err(AgentError::NoRoom(format!(
            "{node} has {} MiB of memory available, a {mode} migration of {} MiB needs {} MiB",
            available >> 20,
            rss >> 20,
            need >> 20
        )));
    }
    Ok(())
}

/// The restore plan a restore step's waiter runs (it adds --restore-detached --restore-sibling
/// --pidfile and its stdio). Pure.
pub fn restore_plan(
    criu_path: &std::path::Path,
    migration: &str,
    meta: &ContainerMeta,
    images: &std::path::Path,
    root: &std::path::Path,
    netns_path: &std::path::Path,
    lazy: bool,
) -> rebalancer_proto::RestorePlan {
    // A stdin file is handed to CRIU by the waiter, not inherited from the restore step.
    let waiter_opens = |fd: usize| fd == 0 && stdin_file(meta).is_some();
    let args = criu::RestoreArgs {
        images_dir: images.to_path_buf(),
        root: root.to_path_buf(),
        ext_mounts: container::external_mounts(&meta.mounts)
            .into_iter()
            .map(|(_, key, src)| (key, src))
            .collect(),
        inherit: Vec::new(),
        pidfile: PathBuf::new(),
        lazy,
        leave_stopped: true,
        // The restore step's tree belongs in the step's (Slurm's) cgroups.
        ignore_cgroups: false,
    }
    .build();
    rebalancer_proto::RestorePlan {
        migration: migration.to_string(),
        container: meta.spec.id.clone(),
        criu: criu_path.display().to_string(),
        args,
        stdio_keys: meta
            .stdio_keys
            .iter()
            .enumerate()
            .map(|(fd, k)| (!k.is_empty() && !waiter_opens(fd)).then(|| k.clone()))
            .collect(),
        inherit_files: std::iter::once((
            criu::NET_KEY.to_string(),
            netns_path.display().to_string(),
        ))
        .chain(stdin_file(meta).map(|p| (meta.stdio_keys[0].clone(), p.to_string())))
        .collect(),
    }
}

/// A task's stdin that was a file (a batch script's `/dev/null`, `srun --input=FILE%t`): the
/// restore step's waiter opens it for CRIU itself. Slurm 22.05's slurmstepd crashes on a step
/// whose stdin and stdout are both per-task files, so the restore step cannot be given it.
fn stdin_file(meta: &ContainerMeta) -> Option<&str> {
    let path = meta.stdio_paths.first()?;
    let key = meta.stdio_keys.first()?;
    (container::is_external_file_key(key)
        && container::stdin_refusal(&meta.stdio_keys, &meta.stdio_paths).is_none())
    .then_some(path.as_str())
}

/// Substitutes `{job}`, `{step}`, `{task}`, `{uid}`, `{gid}`, `{node}` and `{migration}` in the
/// configured restore command. Pure.
pub fn restore_command(
    template: &[String],
    spec: &rebalancer_proto::ContainerSpec,
    task: &rebalancer_proto::TaskRef,
    node: &str,
    migration: &str,
) -> Vec<String> {
    template
        .iter()
        .map(|a| {
            a.replace("{job}", &task.job_id.to_string())
                .replace("{step}", &task.step_id.to_string())
                .replace("{task}", &task.task_id.to_string())
                .replace("{uid}", &spec.uid.to_string())
                .replace("{gid}", &spec.gid.to_string())
                .replace("{node}", node)
                .replace("{migration}", migration)
        })
        .collect()
}

/// How the restore step gets the task's stdio files back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPlan {
    /// srun options (`--output`, `--error`, `--open-mode=append`).
    pub options: Vec<String>,
    /// Symlinks to create first: (link, target).
    pub links: Vec<(PathBuf, PathBuf)>,
}

/// Plans the restore step's stdout/stderr from the files the task had on the source
/// (`stdio_paths`, empty for pipes; a stdin file is opened by the waiter, see [`restore_plan`]).
/// CRIU puts an inherited file back at its old offset, so each must again be a file that
/// slurmstepd opens for the task — srun opens plain `--output` names itself and hands the task a
/// pipe. A `%t` in the name makes slurmstepd open it (the restore step has one task, 0), so
/// the name is a symlink `<link_dir>/out-0` to the real file. Output files are appended to, so an
/// `--output` file or a batch job's `slurm-%j.out` holds the whole output. Pure.
pub fn restore_stdio_plan(stdio_paths: &[String], link_dir: &Path) -> StdioPlan {
    let file = |i: usize| {
        stdio_paths
            .get(i)
            .and_then(|k| container::stdio_file(k).or((k == "/dev/null").then_some(Path::new(k))))
    };
    let mut plan = StdioPlan::default();
    let mut add = |opt: &str, name: &str, target: &Path| {
        plan.links
            .push((link_dir.join(format!("{name}-0")), target.to_path_buf()));
        plan.options
            .push(format!("--{opt}={}/{name}-%t", link_dir.display()));
    };
    let (out, err) = (file(1), file(2));
    if let Some(o) = out {
        add("output", "out", o);
    }
    if let Some(e) = err.filter(|e| Some(*e) != out) {
        add("error", "err", e);
    }
    if out.is_some() || err.is_some() {
        plan.options.push("--open-mode=append".into());
    }
    plan
}

/// Files of the task's stdio that this node cannot see: the restore would fail on them.
pub fn missing_stdio_files(stdio_paths: &[String]) -> Vec<String> {
    stdio_paths
        .iter()
        .filter(|k| container::stdio_file(k).is_some_and(|p| !p.is_file()))
        .cloned()
        .collect()
}

struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates the symlinks of a [`StdioPlan`] in a directory slurmstepd can traverse as the job's
/// user.
fn make_stdio_links(dir: &Path, links: &[(PathBuf, PathBuf)]) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: String| move |source| AgentError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("mkdir {}", dir.display())))?;
    for d in [dir, dir.parent().unwrap_or(dir)] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("chmod {}", d.display())))?;
    }
    for (link, target) in links {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(target, link).map_err(io(format!(
            "symlink {} -> {}",
            link.display(),
            target.display()
        )))?;
    }
    Ok(())
}

/// A restore step started at prepare, waiting for its go.
struct StepLaunch {
    /// Lets the step's `prepare-restore` be answered: the images are in.
    go: tokio::sync::watch::Sender<bool>,
    registered: tokio::sync::oneshot::Receiver<i32>,
    log: PathBuf,
    program: String,
    /// The stdio symlinks, until slurmstepd opened them.
    _links: Option<RemoveDirOnDrop>,
}

/// Starts the restore step (srun) while the source still runs: Slurm's step launch (slurmctld,
/// slurmd, slurmstepd, the plugin's set-up) then costs no downtime. The step's `prepare-restore`
/// is answered once the images are in ([`restore_via_step`]).
fn start_restore_step(agent: &Arc<Agent>, inc: &mut Incoming) -> Result<(), AgentError> {
    let task = inc.meta.spec.task.clone().ok_or_else(|| {
        AgentError::BadRequest("restore step for a container without a Slurm task".into())
    })?;
    let plan = restore_plan(
        &agent.cfg.criu,
        &inc.migration,
        &inc.meta,
        &inc.images,
        &inc.root,
        &inc.net.path(),
        inc.mode == MigrationMode::PostCopy,
    );
    let (tx, registered) = tokio::sync::oneshot::channel();
    let (go, ready) = tokio::sync::watch::channel(false);
    agent.restore_steps().insert(
        inc.migration.clone(),
        crate::agent::RestoreStep {
            plan,
            registered: Some(tx),
            ready,
        },
    );
    let mut links = None;
    let mut argv = restore_command(
        &agent.cfg.restore_command,
        &inc.meta.spec,
        &task,
        &agent.cfg.node,
        &inc.migration,
    );
    if Path::new(&argv[0]).file_name() == Some(std::ffi::OsStr::new("srun")) {
        let link_dir = agent.cfg.run_dir.join("stdio").join(&inc.migration);
        let stdio = restore_stdio_plan(&inc.meta.stdio_paths, &link_dir);
        if !stdio.links.is_empty() {
            links = Some(RemoveDirOnDrop(link_dir.clone()));
            make_stdio_links(&link_dir, &stdio.links)?;
        }
        argv.splice(1..1, stdio.options);
    }
    let log_path = inc.images.join("restore-step.log");
    let log = std::fs::File::create(&log_path).map_err(|source| AgentError::Io {
        what: format!("create {}", log_path.display()),
        source,
    })?;
    let log2 = log.try_clone().map_err(|source| AgentError::Io {
        what: "dup log".into(),
        source,
    })?;
    tracing::info!(migration = %inc.migration, command = ?argv, "starting the restore step");
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|source| AgentError::Io {
            what: format!("cannot run {}", argv[0]),
            source,
        })?;
    inc.step_child = Some(child);
    inc.step = Some(StepLaunch {
        go,
        registered,
        log: log_path,
        program: argv[0].clone(),
        _links: links,
    });
    Ok(())
}

/// Lets the restore step started at prepare restore the tree, and waits until its waiter
/// registered it.
async fn restore_via_step(inc: &mut Incoming, started: Instant) -> Result<PeerReply, AgentError> {
    let (Some(step), Some(child)) = (inc.step.take(), inc.step_child.as_mut()) else {
        return Err(AgentError::Internal("no restore step was started".into()));
    };
    let StepLaunch {
        go,
        registered,
        log,
        program,
        _links,
    } = step;
    let _ = go.send(true);
    let pid = tokio::select! {
        r = registered => r.map_err(|_| AgentError::Internal("restore step registration lost".into()))?,
        st = child.wait() => {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            let criu_log = inc.images.join("restore.log");
            let criu = if criu_log.exists() { format!("; criu: {}", criu::log_tail(&inc.images, "restore.log")) } else { String::new() };
            return Err(AgentError::Criu {
                action: "restore (restore step)",
                message: format!("{program} exited with {:?} before registering: {}{criu}", st.ok(), out.trim()),
            });
        }
        _ = tokio::time::sleep(Duration::from_secs(60)) => {
            return Err(AgentError::Timeout("the restore step did not register within 60 s".into()));
        }
    };
    inc.restored_pid = Some(pid);
    let stats = criu::read_stats(&inc.images, "stats-restore").unwrap_or_default();
    tracing::info!(migration = %inc.migration, pid, "restored by the restore step (stopped), waiting for commit");
    Ok(PeerReply::Restored {
        pid,
        restore_ms: started.elapsed().as_millis() as u64,
        pages_restored: stats.pages_restored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_check_counts_image_copies() {
        let gib = 1u64 << 30;
        assert!(room_check(MigrationMode::PostCopy, gib, 2 * gib, "n").is_ok());
        assert!(room_check(MigrationMode::StopAndCopy, gib, 2 * gib, "n").is_err());
        let e = room_check(MigrationMode::StopAndCopy, gib, gib, "n2").expect_err("no room");
        assert!(matches!(e, AgentError::NoRoom(_)));
        assert!(e.to_string().contains("n2 has 1024 MiB"), "{e}");
    }

    #[test]
    fn restore_step_plan_and_command() {
        let meta = ContainerMeta {
            spec: crate::spank::task_spec(
                "j7.s0.t0",
                &rebalancer_proto::TaskRegistration {
                    task: rebalancer_proto::TaskRef {
                        job_id: 7,
                        step_id: 0,
                        task_id: 0,
                    },
                    pid: 1,
                    uid: 0,
                    gid: 0,
                    node: "n".into(),
                    class: None,
                    mode: None,
                    cpus: None,
                    memory_limit: None,
                    container: None,
                    address: None,
                    rss_bytes: None,
                    waiter_pid: None,
                    cwd: None,
                    program: None,
                },
                "198.19.0.9",
                &[],
            ),
            address: Ipv4Addr::new(198, 19, 0, 9),
            mounts: vec![container::MountPlan::Bind {
                source: "/usr".into(),
                target: "/usr".into(),
                readonly: true,
            }],
            symlinks: vec![],
            stdio_keys: vec!["".into(), "pipe:[5]".into(), "pipe:[6]".into()],
            stdio_paths: vec![],
            started_at: 0,
        };
        let plan = restore_plan(
            std::path::Path::new("/usr/local/sbin/criu"),
            "m1",
            &meta,
            std::path::Path::new("/run/i"),
            std::path::Path::new("/run/r"),
            std::path::Path::new("/run/netns/x"),
            false,
        );
        let a = plan.args.join(" ");
        assert!(a.starts_with("restore --images-dir /run/i"), "{a}");
        assert!(
            a.contains("--external mnt[rb-usr]:/usr") && a.contains("--leave-stopped"),
            "{a}"
        );
        assert!(!a.contains("--restore-detached"), "{a}");
        assert_eq!(
            plan.stdio_keys,
            vec![None, Some("pipe:[5]".into()), Some("pipe:[6]".into())]
        );
        assert_eq!(
            plan.inherit_files,
            vec![("rb-net".to_string(), "/run/netns/x".to_string())]
        );
        // A batch script's stdin (/dev/null from slurmstepd): the waiter opens it for CRIU.
        let mut batch = meta.clone();
        batch.stdio_keys = vec![
            "file[1c:2a]".into(),
            "file[1d:2b]".into(),
            "file[1d:2b]".into(),
        ];
        batch.stdio_paths = vec![
            "/dev/null".into(),
            "/w/slurm-7.out".into(),
            "/w/slurm-7.out".into(),
        ];
        let plan = restore_plan(
            std::path::Path::new("/usr/local/sbin/criu"),
            "m1",
            &batch,
            std::path::Path::new("/run/i"),
            std::path::Path::new("/run/r"),
            std::path::Path::new("/run/netns/x"),
            false,
        );
        assert_eq!(
            plan.stdio_keys,
            vec![None, Some("file[1d:2b]".into()), Some("file[1d:2b]".into())]
        );
        assert_eq!(
            plan.inherit_files,
            vec![
                ("rb-net".to_string(), "/run/netns/x".to_string()),
                ("file[1c:2a]".to_string(), "/dev/null".to_string())
            ]
        );
        let mut spec = meta.spec.clone();
        (spec.uid, spec.gid) = (1000, 100);
        let cmd = restore_command(
            &[
                "srun".into(),
                "--jobid={job}".into(),
                "--uid={uid}".into(),
                "--gid={gid}".into(),
                "--job-name=r:{step}.{task}".into(),
                "-w".into(),
                "{node}".into(),
                "--rebalancer-restore={migration}".into(),
            ],
            &spec,
            &rebalancer_proto::TaskRef {
                job_id: 7,
                step_id: 2,
                task_id: 1,
            },
            "n2",
            "m1",
        );
        assert_eq!(
            cmd,
            [
                "srun",
                "--jobid=7",
                "--uid=1000",
                "--gid=100",
                "--job-name=r:2.1",
                "-w",
                "n2",
                "--rebalancer-restore=m1"
            ]
        );
    }

    #[test]
    fn restore_step_reopens_the_tasks_files_through_slurmstepd() {
        let dir = std::env::temp_dir().join(format!("rb-stdio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let out = dir.join("out.txt");
        let err = dir.join("err.txt");
        std::fs::write(&out, "a").expect("out");
        std::fs::write(&err, "b").expect("err");
        let s = |p: &Path| p.display().to_string();
        let paths = |k: [&str; 3]| k.map(String::from).to_vec();
        let links = Path::new("/run/rb/stdio/m1");
        // A batch script: stdin /dev/null, stdout and stderr in two files.
        let plan = restore_stdio_plan(&paths(["/dev/null", &s(&out), &s(&err)]), links);
        assert_eq!(
            plan.options,
            [
                "--output=/run/rb/stdio/m1/out-%t",
                "--error=/run/rb/stdio/m1/err-%t",
                "--open-mode=append"
            ]
        );
        assert_eq!(
            plan.links,
            [
                (links.join("out-0"), out.clone()),
                (links.join("err-0"), err.clone())
            ]
        );
        // One file for both streams: --output alone (slurmstepd sends stderr there too).
        let plan = restore_stdio_plan(&paths(["", &s(&out), &s(&out)]), links);
        assert_eq!(
            plan.options,
            ["--output=/run/rb/stdio/m1/out-%t", "--open-mode=append"]
        );
        // Pipes (srun's own I/O): nothing to reopen.
        assert_eq!(
            restore_stdio_plan(&paths(["", "", ""]), links),
            StdioPlan::default()
        );
        // A file this node cannot see is reported before anything starts.
        let gone = s(&dir.join("missing.txt"));
        assert_eq!(
            missing_stdio_files(&paths(["/dev/null", &s(&out), &gone])),
            [gone]
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
