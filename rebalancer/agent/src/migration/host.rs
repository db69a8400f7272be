//! The seam between the migration state machines and the host. Every effect a migration has —
//! CRIU, network namespaces, routes and ARP, CRIU's nftables lock, cgroups, processes, Slurm
//! restore steps, the clock and the peer connection — goes through one of these small traits.
//! [`System`] runs the real tools; the `sim` module's `SimHost` simulates a node in memory for
//! unit tests without root.
//!
//! Methods are deliberately coarse (one CRIU action, one network step) so that a simulation can
//! model what each does to the node and fail any one of them.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rebalancer_proto::ContainerSpec;

use crate::agent::Agent;
use crate::cgroup::Cgroup;
use crate::config::AgentConfig;
use crate::container;
use crate::criu::{self, CriuStats, DumpArgs};
use crate::error::AgentError;
use crate::netns::{self, ContainerNet};
use crate::peer::{PeerConn, PeerReply, PeerRequest};

/// Where a post-copy restore's lazy-pages daemon gets its pages.
#[derive(Debug)]
pub enum LazySource {
    /// The source's CRIU listens there (peer protocol < 4).
    Listener((Ipv4Addr, u16)),
    /// The connection the agents linked before the dump (peer protocol 4,
    /// [`crate::lazy_link`]).
    Link(OwnedFd),
}

/// The source's pending accept of a lazy-page link ([`Criu::lazy_link_listen`]).
pub type LazyAccept = tokio::task::JoinHandle<Result<OwnedFd, AgentError>>;

/// A long-running helper process (a CRIU page server, lazy-pages daemon or lazy dump).
pub trait Helper: Send + 'static {
    /// Waits until the helper exits.
    fn wait(&mut self) -> impl Future<Output = std::io::Result<ExitStatus>> + Send;
    /// Asks the helper to stop now (SIGKILL); [`Helper::wait`] then reaps it.
    fn start_kill(&mut self);
}

impl Helper for tokio::process::Child {
    fn wait(&mut self) -> impl Future<Output = std::io::Result<ExitStatus>> + Send {
        tokio::process::Child::wait(self)
    }
    fn start_kill(&mut self) {
        let _ = tokio::process::Child::start_kill(self);
    }
}

/// A CRIU helper on the real node: a page server waiting for the dump's connection (its
/// process starts once the agent accepted it), or a running process.
pub struct CriuProcess {
    pending: Option<tokio::task::JoinHandle<Result<tokio::process::Child, AgentError>>>,
    child: Option<tokio::process::Child>,
    /// An encrypted lazy-pages daemon's relay over the lazy-page link, ended with the daemon.
    relay: Option<tokio::task::AbortHandle>,
}

impl From<tokio::process::Child> for CriuProcess {
    fn from(c: tokio::process::Child) -> CriuProcess {
        CriuProcess {
            pending: None,
            child: Some(c),
            relay: None,
        }
    }
}

impl Drop for CriuProcess {
    fn drop(&mut self) {
        // Like the child's kill_on_drop: a page server nobody holds stops waiting for the dump.
        if let Some(p) = self.pending.take() {
            p.abort();
        }
    }
}

impl Helper for CriuProcess {
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(p) = self.pending.take() {
            match p.await {
                Ok(Ok(c)) => self.child = Some(c),
                Ok(Err(e)) => return Err(std::io::Error::other(e.chain())),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        match &mut self.child {
            Some(c) => c.wait().await,
            None => Err(std::io::Error::other("the helper was stopped")),
        }
    }
    fn start_kill(&mut self) {
        if let Some(p) = self.pending.take() {
            // Dropping the accept task also drops the listener and any child it started.
            p.abort();
        }
        if let Some(c) = &mut self.child {
            let _ = c.start_kill();
        }
        if let Some(r) = self.relay.take() {
            // Closes the link too, so that the source's lazy dump ends at once.
            r.abort();
        }
    }
}

/// CRIU's actions, one method each.
pub trait Criu: Send + Sync {
    type Helper: Helper;
    /// `criu pre-dump` of a running tree into `dir`, pages to the page server at `ps`
    /// (`tls`: [`crate::tls::criu_options`], empty for plain TCP).
    fn pre_dump(
        &self,
        pid: i32,
        dir: &Path,
        ps: (Ipv4Addr, u16),
        parent: Option<&str>,
        tls: &[String],
    ) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// `criu dump` to completion; on success the tree is frozen (`--leave-stopped`) behind
    /// CRIU's network lock, on failure CRIU has resumed it.
    fn dump(&self, args: &DumpArgs) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// Post-copy `criu dump --lazy-pages`: returns once the tree is dumped and frozen and the
    /// dump serves its pages (the helper ends when they are all sent).
    fn dump_lazy(
        &self,
        args: &DumpArgs,
    ) -> impl Future<Output = Result<Self::Helper, AgentError>> + Send;
    /// A page server receiving into `dir` on a port of `ip` bound before this returns;
    /// returns its address. It listens at once, or with `gate` once the gate is opened (the
    /// sender it gets is told whether `listen` worked): until then a connection attempt is
    /// reset by the kernel. With `from`, connections from any other address are closed
    /// unserved.
    fn page_server(
        &self,
        dir: &Path,
        ip: Ipv4Addr,
        parent: Option<&str>,
        tls: &[String],
        from: Option<std::net::IpAddr>,
        gate: Option<PageServerGate>,
    ) -> impl Future<Output = Result<((Ipv4Addr, u16), Self::Helper), AgentError>> + Send;
    /// The lazy-pages daemon serving a post-copy restore from `src`'s dump.
    fn lazy_pages(
        &self,
        dir: &Path,
        src: LazySource,
        tls: &[String],
    ) -> impl Future<Output = Result<Self::Helper, AgentError>> + Send;
    /// Post-copy, peer protocol 4, source: binds the link port on `ip` (returned) and accepts
    /// in the background the one connection from `from` that sends `token` within `within`
    /// ([`crate::lazy_link`]).
    fn lazy_link_listen(
        &self,
        ip: Ipv4Addr,
        from: std::net::IpAddr,
        token: crate::lazy_link::Token,
        within: Duration,
    ) -> Result<(u16, LazyAccept), AgentError>;
    /// Post-copy, peer protocol 4, source: the socket CRIU's lazy dump serves on, for `link`.
    /// Plain (`tls_dir` `None`): the link itself. Encrypted: a relay's end
    /// ([`crate::lazy_link::source_relay`]), which ends CRIU cleanly if the destination leaves
    /// before it spoke.
    fn lazy_link_for_dump(
        &self,
        link: OwnedFd,
        _tls_dir: Option<&Path>,
    ) -> impl Future<Output = Result<OwnedFd, AgentError>> + Send {
        async { Ok(link) }
    }
    /// Post-copy, peer protocol 4, destination: connects to the source agent's link port and
    /// writes `token`.
    fn lazy_link_connect(
        &self,
        to: SocketAddr,
        token: crate::lazy_link::Token,
        within: Duration,
    ) -> impl Future<Output = Result<OwnedFd, AgentError>> + Send;
    /// `criu restore` (built `args`) inside the cgroups open on `cgroup_procs`; the restored
    /// tree stays stopped. Returns its pid 1.
    fn restore(
        &self,
        args: &[String],
        keep_fds: &[i32],
        cgroup_procs: &[i32],
        dir: &Path,
        pidfile: &Path,
    ) -> impl Future<Output = Result<i32, AgentError>> + Send;
    /// The statistics image `name` CRIU left in `dir`.
    fn stats(&self, dir: &Path, name: &str) -> Option<CriuStats>;
    /// (pages, lazy pages) from a finished lazy dump's log.
    fn lazy_totals(&self, dir: &Path) -> (u64, u64);
    /// A free port on `ip` for the lazy dump (which binds it itself).
    fn pick_port(&self, ip: Ipv4Addr) -> Result<u16, AgentError>;
    /// Lets only `peer` reach the lazy dump's `listen` for at most `within` (see
    /// [`crate::lazy_guard`]). Simulated hosts have no listener to guard.
    fn guard_lazy_port(
        &self,
        _listen: (Ipv4Addr, u16),
        _peer: Option<Ipv4Addr>,
        _within: Duration,
        _encrypted: bool,
    ) -> impl Future<Output = Result<(), AgentError>> + Send {
        async { Ok(()) }
    }
    /// Lets only root's sockets on this node reach the destination's page server at `to`,
    /// until [`Self::unguard_page_server`] or `within` (see [`crate::ps_guard`]). An error
    /// means nothing was installed.
    fn guard_page_server(
        &self,
        to: (Ipv4Addr, u16),
        within: Duration,
    ) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// Removes the guard of [`Self::guard_page_server`] once the transfer to `to` is over.
    fn unguard_page_server(&self, to: (Ipv4Addr, u16)) -> impl Future<Output = ()> + Send;
    /// Waits until CRIU runs cut by a deadline have left through CRIU's own failure path
    /// (interrupted, never SIGKILLed mid-parasite); a rollback calls it before touching the tree.
    fn settle(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Network namespaces, routes, gratuitous ARP and CRIU's nftables lock.
pub trait Net: Send + Sync {
    fn create_net(
        &self,
        net: &ContainerNet,
        route: bool,
    ) -> impl Future<Output = Result<(), AgentError>> + Send;
    fn add_route(&self, net: &ContainerNet) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// This node stops answering for the address (the source's commit).
    fn withdraw_route(&self, net: &ContainerNet) -> impl Future<Output = ()> + Send;
    /// Route, veth and namespace gone; errors are logged.
    fn destroy_net(&self, net: &ContainerNet) -> impl Future<Output = ()> + Send;
    /// Removes CRIU's network lock (nftables tables) after a dump; returns how many.
    fn unlock(&self, net: &ContainerNet) -> impl Future<Output = Result<usize, AgentError>> + Send;
    /// The namespace's inode (CRIU's external key).
    fn net_inode(&self, net: &ContainerNet) -> Result<u64, AgentError>;
    /// The namespace opened for CRIU to inherit.
    fn open_net(&self, net: &ContainerNet) -> Result<OwnedFd, AgentError>;
    /// Gratuitous ARPs for `ip` on `uplink`, in the background.
    fn announce(&self, uplink: &str, ip: Ipv4Addr);
    /// Connects to `addr` and hangs up: wakes a lazy dump still waiting in accept().
    /// `tls`: the migration's TLS directory ([`crate::tls::write_files`]) when the lazy dump
    /// speaks TLS; the poke then completes a handshake as the source itself, so that CRIU's page
    /// server ends normally (a failed handshake would send CRIU down its error path, which
    /// resumes the tree without releasing its network lock and TCP repair mode).
    fn poke(&self, addr: (Ipv4Addr, u16), tls: Option<&Path>) -> impl Future<Output = ()> + Send;
    /// Prepares holding `net`'s inbound packets arriving on `uplink` from CRIU's network lock
    /// on ([`super::hold`]); returns the action script for the dump, written into `dir`.
    fn hold_inbound(
        &self,
        net: &ContainerNet,
        uplink: &str,
        dir: &Path,
    ) -> impl Future<Output = Result<PathBuf, AgentError>> + Send;
    /// Hands what the hold holds on to wherever the node routes the address now, and removes
    /// the hold (also one that never started).
    fn release_inbound(
        &self,
        net: &ContainerNet,
        uplink: &str,
    ) -> impl Future<Output = super::hold::Released> + Send;
}

/// The container's processes and the node's memory.
pub trait Procs: Send + Sync {
    fn signal_tree(&self, pid: i32, sig: Signal);
    /// SIGKILL to pid 1 only (the reaper collects it).
    fn kill(&self, pid: i32);
    /// SIGKILL to pid 1 and reaping it (it is this agent's child).
    fn kill_and_reap(&self, pid: i32) -> impl Future<Output = ()> + Send;
    /// Turns TCP repair mode off on the tree's sockets (after a dump that did not commit).
    fn release_tcp_repair(&self, pid: i32) -> usize;
    fn tree_rss(&self, pid: i32) -> u64;
    /// CRIU keys and paths of a Slurm task's fds 0-2 (known only once Slurm set them up).
    fn stdio_ids(&self, pid: i32) -> (Vec<String>, Vec<String>);
    fn alive(&self, pid: i32) -> bool;
    /// `MemAvailable` in bytes, if known.
    fn mem_available(&self) -> Option<u64>;
    /// Bytes free for an unprivileged writer on the file system of `dir` (the image tmpfs).
    fn space_free(&self, dir: &Path) -> Option<u64>;
}

/// Container cgroups.
pub trait Cgroups: Send + Sync {
    fn create_cgroup(
        &self,
        agent: &Agent,
        spec: &ContainerSpec,
    ) -> Result<Option<Cgroup>, AgentError>;
    fn remove_cgroup(&self, cg: Cgroup) -> impl Future<Output = ()> + Send;
}

/// Slurm restore steps (srun), which restore a task's tree inside its job.
pub trait Steps: Send + Sync {
    type Step: Helper;
    /// Starts `argv` (the restore command for `migration`, whose entry in
    /// `agent.restore_steps()` exists) as `user`, output to `log`.
    fn start_step(
        &self,
        agent: &Arc<Agent>,
        migration: &str,
        argv: &[String],
        user: &super::step_user::StepUser,
        log: std::fs::File,
    ) -> Result<Self::Step, AgentError>;
}

/// Monotonic time.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send;
}

/// `fut`'s output, or `None` once `d` has passed on `clock` (a timeout that a simulated clock
/// controls).
pub async fn within<C: Clock + ?Sized, F: Future>(
    clock: &C,
    d: Duration,
    fut: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        r = fut => Some(r),
        _ = clock.sleep(d) => None,
    }
}

/// The source's end of a peer connection.
pub trait PeerLink: Send {
    fn call(
        &mut self,
        req: &PeerRequest,
    ) -> impl Future<Output = Result<PeerReply, AgentError>> + Send;
    /// Sends CRIU's non-memory images in `dir`; returns their size.
    fn send_images(&mut self, dir: &Path) -> impl Future<Output = Result<u64, AgentError>> + Send;
    /// Bytes written so far (frames and headers).
    fn bytes_sent(&self) -> u64;
    /// The node the peer proved it is (peer protocol 2 with munge), if it proved one.
    fn proven_node(&self) -> Option<&str>;
    /// Heartbeats ([`super::heartbeat`]): sends one (event frame, id 0), awaiting nothing.
    fn beat(
        &mut self,
        phase: &str,
        bytes: u64,
    ) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// Waits for the peer's next frame between requests (the answer to a heartbeat).
    fn heard(&mut self) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// Sends a request whose answer [`PeerLink::next_of`] waits for, frame by frame.
    fn send_req(
        &mut self,
        req: &PeerRequest,
    ) -> impl Future<Output = Result<u32, AgentError>> + Send;
    /// The next frame of request `id`: `None` for a heartbeat, else the reply.
    fn next_of(
        &mut self,
        id: u32,
    ) -> impl Future<Output = Result<Option<PeerReply>, AgentError>> + Send;
    /// The agreed peer protocol version.
    fn version(&self) -> u16;
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> PeerLink for PeerConn<S> {
    fn call(
        &mut self,
        req: &PeerRequest,
    ) -> impl Future<Output = Result<PeerReply, AgentError>> + Send {
        PeerConn::call(self, req)
    }
    fn send_images(&mut self, dir: &Path) -> impl Future<Output = Result<u64, AgentError>> + Send {
        PeerConn::send_images(self, dir)
    }
    fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }
    fn proven_node(&self) -> Option<&str> {
        self.peer_node.as_deref()
    }
    fn beat(
        &mut self,
        phase: &str,
        bytes: u64,
    ) -> impl Future<Output = Result<(), AgentError>> + Send {
        PeerConn::beat(self, phase, bytes)
    }
    fn heard(&mut self) -> impl Future<Output = Result<(), AgentError>> + Send {
        PeerConn::heard(self)
    }
    fn send_req(
        &mut self,
        req: &PeerRequest,
    ) -> impl Future<Output = Result<u32, AgentError>> + Send {
        PeerConn::send_req(self, req)
    }
    fn next_of(
        &mut self,
        id: u32,
    ) -> impl Future<Output = Result<Option<PeerReply>, AgentError>> + Send {
        PeerConn::next_of(self, id)
    }
    fn version(&self) -> u16 {
        self.version
    }
}

/// Opens peer connections.
pub trait Connector: Send + Sync {
    type Link: PeerLink;
    fn connect(
        &self,
        cfg: &AgentConfig,
        addr: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Link, AgentError>> + Send;
}

pub use super::page_server::PageServerGate;

/// Everything a migration reaches on its node.
pub trait Host: Criu + Net + Procs + Cgroups + Steps + Clock + Connector + 'static {}
impl<T: Criu + Net + Procs + Cgroups + Steps + Clock + Connector + 'static> Host for T {}

/// The real node: runs criu, ip, nft, and talks TCP.
#[derive(Debug, Clone)]
pub struct System {
    criu: PathBuf,
    /// [`criu::kdat_run_dir`]: a private /run for the destination's CRIU actions.
    private_run: Option<PathBuf>,
    /// Dumps cut by a deadline, still leaving through CRIU's failure path.
    interrupted: criu::Interrupted,
}

impl System {
    pub fn new(cfg: &AgentConfig) -> System {
        System {
            criu: cfg.criu.clone(),
            private_run: criu::kdat_run_dir(&cfg.run_dir),
            interrupted: Default::default(),
        }
    }
}

impl Criu for System {
    type Helper = CriuProcess;

    async fn pre_dump(
        &self,
        pid: i32,
        dir: &Path,
        ps: (Ipv4Addr, u16),
        parent: Option<&str>,
        tls: &[String],
    ) -> Result<(), AgentError> {
        let args = criu::pre_dump_args(pid, dir, ps, parent, tls);
        criu::run_interruptible(
            &self.criu,
            "pre-dump",
            &args,
            dir,
            "pre-dump.log",
            &self.interrupted,
        )
        .await
    }

    async fn dump(&self, args: &DumpArgs) -> Result<(), AgentError> {
        criu::run_interruptible(
            &self.criu,
            "dump",
            &args.build(),
            &args.images_dir,
            "dump.log",
            &self.interrupted,
        )
        .await
    }

    async fn settle(&self) {
        self.interrupted.settle().await
    }

    async fn dump_lazy(&self, args: &DumpArgs) -> Result<CriuProcess, AgentError> {
        let mut args = args.clone();
        let dir = args.images_dir.clone();
        let keep: Vec<i32> = args.lazy_socket.into_iter().collect();
        // No readiness limit: the dump is ready once the whole tree is dumped, however large.
        criu::spawn_ready(
            &self.criu,
            |fd| {
                args.status_fd = Some(fd);
                args.build()
            },
            "dump",
            &dir,
            "dump.log",
            criu::SpawnOpts {
                keep_fds: &keep,
                ..Default::default()
            },
        )
        .await
        .map(CriuProcess::from)
    }

    async fn page_server(
        &self,
        dir: &Path,
        ip: Ipv4Addr,
        parent: Option<&str>,
        tls: &[String],
        from: Option<std::net::IpAddr>,
        gate: Option<PageServerGate>,
    ) -> Result<((Ipv4Addr, u16), CriuProcess), AgentError> {
        let (addr, pending) =
            super::page_server::serve(&self.criu, dir, ip, parent, tls, from, gate).await?;
        Ok((
            addr,
            CriuProcess {
                pending: Some(pending),
                child: None,
                relay: None,
            },
        ))
    }

    async fn lazy_pages(
        &self,
        dir: &Path,
        src: LazySource,
        tls: &[String],
    ) -> Result<CriuProcess, AgentError> {
        // Either an address the daemon connects to, or the linked socket it reads itself
        // (kept open here until the daemon has its copy).
        let mut relay = None;
        let (to, link): (Option<(Ipv4Addr, u16)>, Option<OwnedFd>) = match src {
            LazySource::Listener(a) => (Some(a), None),
            LazySource::Link(fd) if tls.is_empty() => (None, Some(fd)),
            // CRIU's client runs TLS only on a socket it connects itself: it connects to the
            // agent's loopback relay, which forwards the ciphertext over the link.
            LazySource::Link(fd) => {
                let (port, r) = crate::lazy_link::relay(fd.into(), crate::lazy_link::RELAY_WITHIN)?;
                relay = Some(r);
                (Some((Ipv4Addr::LOCALHOST, port)), None)
            }
        };
        let keep: Vec<i32> = link.iter().map(|l| l.as_raw_fd()).collect();
        let sock = keep.first().copied();
        let child = criu::spawn_ready(
            &self.criu,
            |fd| match (to, sock) {
                (Some((ip, port)), _) => criu::lazy_pages_args(dir, ip, port, fd, tls),
                (None, sock) => criu::lazy_pages_on_socket_args(dir, fd, sock.unwrap_or(-1)),
            },
            "lazy-pages",
            dir,
            "lazy-pages.log",
            criu::SpawnOpts {
                ready_within: Some(criu::READY_WITHIN),
                keep_fds: &keep,
                detach: true,
                private_run: self.private_run.as_deref(),
            },
        )
        .await;
        match child {
            Ok(c) => Ok(CriuProcess {
                pending: None,
                child: Some(c),
                relay,
            }),
            Err(e) => {
                if let Some(r) = relay {
                    r.abort();
                }
                Err(e)
            }
        }
    }

    fn lazy_link_listen(
        &self,
        ip: Ipv4Addr,
        from: std::net::IpAddr,
        token: crate::lazy_link::Token,
        within: Duration,
    ) -> Result<(u16, LazyAccept), AgentError> {
        let (l, port) = crate::lazy_link::listen(ip)?;
        let pending = tokio::spawn(async move {
            crate::lazy_link::accept(l, from, token, within)
                .await
                .map(OwnedFd::from)
        });
        Ok((port, pending))
    }

    async fn lazy_link_connect(
        &self,
        to: SocketAddr,
        token: crate::lazy_link::Token,
        within: Duration,
    ) -> Result<OwnedFd, AgentError> {
        crate::lazy_link::connect(to, token, within)
            .await
            .map(OwnedFd::from)
    }

    async fn lazy_link_for_dump(
        &self,
        link: OwnedFd,
        tls_dir: Option<&Path>,
    ) -> Result<OwnedFd, AgentError> {
        match tls_dir {
            None => Ok(link),
            Some(dir) => crate::lazy_link::source_relay(link.into(), dir.to_path_buf())
                .await
                .map(OwnedFd::from),
        }
    }

    async fn restore(
        &self,
        args: &[String],
        keep_fds: &[i32],
        cgroup_procs: &[i32],
        dir: &Path,
        pidfile: &Path,
    ) -> Result<i32, AgentError> {
        criu::run_in(
            &self.criu,
            "restore",
            args,
            keep_fds,
            cgroup_procs,
            dir,
            "restore.log",
            self.private_run.as_deref().filter(|_| !reaches_run(args)),
        )
        .await?;
        std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| AgentError::Criu {
                action: "restore",
                message: format!("no pid in {}", pidfile.display()),
            })
    }

    fn stats(&self, dir: &Path, name: &str) -> Option<CriuStats> {
        criu::read_stats(dir, name)
    }

    fn lazy_totals(&self, dir: &Path) -> (u64, u64) {
        let log = std::fs::read_to_string(dir.join("dump.log")).unwrap_or_default();
        criu::pagemap_totals(&log)
    }

    fn pick_port(&self, ip: Ipv4Addr) -> Result<u16, AgentError> {
        criu::pick_port(ip)
    }

    async fn guard_lazy_port(
        &self,
        listen: (Ipv4Addr, u16),
        peer: Option<Ipv4Addr>,
        within: Duration,
        encrypted: bool,
    ) -> Result<(), AgentError> {
        crate::lazy_guard::guard(listen, peer, within, encrypted).await
    }

    async fn guard_page_server(
        &self,
        to: (Ipv4Addr, u16),
        within: Duration,
    ) -> Result<(), AgentError> {
        crate::ps_guard::install(to, within).await
    }

    async fn unguard_page_server(&self, to: (Ipv4Addr, u16)) {
        crate::ps_guard::remove(to).await
    }
}

impl Net for System {
    async fn create_net(&self, net: &ContainerNet, route: bool) -> Result<(), AgentError> {
        netns::create(net, route).await
    }
    async fn add_route(&self, net: &ContainerNet) -> Result<(), AgentError> {
        netns::add_route(net).await
    }
    async fn withdraw_route(&self, net: &ContainerNet) {
        netns::withdraw_route(net).await
    }
    async fn destroy_net(&self, net: &ContainerNet) {
        netns::destroy(net).await
    }
    async fn unlock(&self, net: &ContainerNet) -> Result<usize, AgentError> {
        netns::unlock_criu_tables(net).await
    }
    fn net_inode(&self, net: &ContainerNet) -> Result<u64, AgentError> {
        net.inode()
    }
    fn open_net(&self, net: &ContainerNet) -> Result<OwnedFd, AgentError> {
        std::fs::File::open(net.path())
            .map(OwnedFd::from)
            .map_err(|source| AgentError::Io {
                what: format!("open {}", net.path().display()),
                source,
            })
    }
    fn announce(&self, uplink: &str, ip: Ipv4Addr) {
        let uplink = uplink.to_string();
        // Several announcements: a neighbour entry refreshed within its locktime ignores one.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::garp::announce(&uplink, ip, 3, Duration::from_millis(300)) {
                tracing::warn!(error = %e.chain(), "gratuitous ARP failed");
            }
        });
    }
    async fn poke(&self, addr: (Ipv4Addr, u16), tls: Option<&Path>) {
        let Some(dir) = tls else {
            let _ = tokio::net::TcpStream::connect(addr).await;
            return;
        };
        let f = |n: &str| dir.join(n);
        let mut cmd = tokio::process::Command::new("openssl");
        cmd.arg("s_client")
            .arg("-connect")
            .arg(format!("{}:{}", addr.0, addr.1))
            .arg("-cert")
            .arg(f("cert.pem"))
            .arg("-key")
            .arg(f("key.pem"))
            .arg("-CAfile")
            .arg(f("cert.pem"))
            .args(["-verify_return_error", "-brief", "-no_ign_eof"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(5), cmd.status()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot run openssl to end the lazy page server")
            }
            Err(_) => tracing::warn!("openssl did not end the lazy page server within 5 s"),
        }
    }
    async fn hold_inbound(
        &self,
        net: &ContainerNet,
        uplink: &str,
        dir: &Path,
    ) -> Result<PathBuf, AgentError> {
        super::hold::prepare(&super::hold::Hold::new(uplink, net.address)?, dir).await
    }
    async fn release_inbound(&self, net: &ContainerNet, uplink: &str) -> super::hold::Released {
        match super::hold::Hold::new(uplink, net.address) {
            Ok(h) => super::hold::release(&h).await,
            Err(_) => super::hold::Released::default(),
        }
    }
}

impl Procs for System {
    fn signal_tree(&self, pid: i32, sig: Signal) {
        container::signal_tree(pid, sig)
    }
    fn kill(&self, pid: i32) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    async fn kill_and_reap(&self, pid: i32) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        // Pid 1 of a restored tree is our child (subreaper): reap it.
        let _ = tokio::task::spawn_blocking(move || {
            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
        })
        .await;
    }
    fn release_tcp_repair(&self, pid: i32) -> usize {
        container::release_tcp_repair(pid)
    }
    fn tree_rss(&self, pid: i32) -> u64 {
        container::tree_rss(pid)
    }
    fn stdio_ids(&self, pid: i32) -> (Vec<String>, Vec<String>) {
        container::stdio_ids(pid)
    }
    fn alive(&self, pid: i32) -> bool {
        container::alive(pid)
    }
    fn mem_available(&self) -> Option<u64> {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| mem_available(&m))
    }
    fn space_free(&self, dir: &Path) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(dir).ok()?;
        Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }
}

/// Whether a restore's arguments name anything under /run (a bind source, the root), which a
/// private /run ([`criu::with_private_run`]) would hide.
fn reaches_run(args: &[String]) -> bool {
    args.iter()
        .any(|a| a.starts_with("/run") || a.contains(":/run"))
}

/// `MemAvailable` of a /proc/meminfo text, in bytes. Pure.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

impl Cgroups for System {
    fn create_cgroup(
        &self,
        agent: &Agent,
        spec: &ContainerSpec,
    ) -> Result<Option<Cgroup>, AgentError> {
        agent.create_cgroup(spec)
    }
    async fn remove_cgroup(&self, cg: Cgroup) {
        cg.remove().await
    }
}

impl Steps for System {
    type Step = tokio::process::Child;
    fn start_step(
        &self,
        _agent: &Arc<Agent>,
        _migration: &str,
        argv: &[String],
        user: &super::step_user::StepUser,
        log: std::fs::File,
    ) -> Result<tokio::process::Child, AgentError> {
        let program = argv
            .first()
            .ok_or_else(|| AgentError::BadRequest("empty restore command".into()))?;
        let log2 = log.try_clone().map_err(|source| AgentError::Io {
            what: "dup log".into(),
            source,
        })?;
        let mut cmd = tokio::process::Command::new(program);
        // Tells the plugin in srun that the agent started this restore step (it refuses a
        // user's own `--rebalancer-restore`); spank-plugin/src/local.rs reads it.
        cmd.args(&argv[1..])
            .env("SLURM_REBALANCER_AGENT_RESTORE", "1")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        if user.needs_switch(nix::unistd::getuid().as_raw()) {
            let user = user.clone();
            // "/" because the agent's directory may be closed to the user (slurmstepd would
            // then log a chdir error into the task's output).
            cmd.envs(user.env.clone()).current_dir("/");
            // SAFETY: the hook only calls StepUser::switch, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || user.switch());
            }
        }
        cmd.spawn().map_err(|source| AgentError::Io {
            what: format!("cannot run {program}"),
            source,
        })
    }
}

impl Clock for System {
    fn now(&self) -> Instant {
        Instant::now()
    }
    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
}

impl Connector for System {
    type Link = PeerConn;
    async fn connect(
        &self,
        cfg: &AgentConfig,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<PeerConn, AgentError> {
        PeerConn::connect(cfg, addr, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// A node whose "CRIU" is /bin/false (it exits at once: enough to show that a page
    /// server's connection reached it), and a scratch directory named for `tag`.
    fn false_criu(tag: &str) -> (System, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("rb-ps-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let sys = System {
            criu: "/bin/false".into(),
            private_run: None,
            interrupted: Default::default(),
        };
        (sys, dir)
    }

    #[test]
    fn restores_that_reach_run_keep_the_real_run() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(reaches_run(&a(&["--external", "mnt[k]:/run/munge"])));
        assert!(reaches_run(&a(&["--root", "/run/rebalancer/c/root"])));
        assert!(!reaches_run(&a(&[
            "--external",
            "mnt[k]:/usr",
            "--root",
            "/dev/shm/r"
        ])));
    }

    #[test]
    fn mem_available_reads_kib() {
        let m = "MemTotal:  100 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(mem_available(m), Some(2 << 20));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    /// A connection to a page server from anywhere but the source is closed unserved, and the
    /// page server still waits for the source's.
    #[tokio::test]
    async fn page_servers_take_the_sources_connection_only() {
        use tokio::io::AsyncReadExt;
        let (sys, dir) = false_criu("from");
        let lo = Ipv4Addr::LOCALHOST;
        let source = std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let ((ip, port), mut helper) = sys
            .page_server(&dir, lo, None, &[], Some(source), None)
            .await
            .expect("page server");
        let connect_from = |from: Ipv4Addr| async move {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            s.bind((from, 0).into()).expect("bind");
            s.connect((ip, port).into()).await.expect("connect")
        };
        let mut intruder = connect_from(Ipv4Addr::new(127, 0, 0, 3)).await;
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), intruder.read(&mut buf))
            .await
            .expect("the intruder's connection is closed, not kept")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), helper.wait())
                .await
                .is_err(),
            "the page server must still wait for the source"
        );
        let _source = connect_from(Ipv4Addr::new(127, 0, 0, 2)).await;
        let r = tokio::time::timeout(Duration::from_secs(10), helper.wait())
            .await
            .expect("the source's connection reaches criu");
        assert!(
            r.is_err() || r.is_ok_and(|s| !s.success()),
            "/bin/false serves nothing"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A gated page server refuses every connection (the kernel resets it) until it is opened,
    /// and listens once it is.
    #[tokio::test]
    async fn a_gated_page_server_listens_only_once_opened() {
        let (sys, dir) = false_criu("gated");
        let lo = Ipv4Addr::LOCALHOST;
        let (opener, gate) = oneshot::channel();
        let ((ip, port), mut helper) = sys
            .page_server(&dir, lo, None, &[], None, Some(gate))
            .await
            .expect("page server");
        let early = tokio::net::TcpStream::connect((ip, port)).await;
        assert_eq!(
            early.map(|_| ()).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionRefused),
            "a connection before the opening"
        );
        let (tx, rx) = oneshot::channel();
        opener.send(tx).expect("the page server waits for its gate");
        let listened = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("answered")
            .expect("an answer");
        assert_eq!(listened, Ok(()));
        let _source = tokio::net::TcpStream::connect((ip, port))
            .await
            .expect("connects once opened");
        let r = tokio::time::timeout(Duration::from_secs(10), helper.wait())
            .await
            .expect("the connection reaches criu");
        assert!(r.is_err() || r.is_ok_and(|s| !s.success()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A page server whose gate is dropped (the arrival undone before the source opened it)
    /// ends without ever listening.
    #[tokio::test]
    async fn a_page_server_never_opened_ends() {
        let (sys, dir) = false_criu("closed");
        let (opener, gate) = oneshot::channel::<oneshot::Sender<Result<(), String>>>();
        let (_, mut helper) = sys
            .page_server(&dir, Ipv4Addr::LOCALHOST, None, &[], None, Some(gate))
            .await
            .expect("page server");
        drop(opener);
        let r = tokio::time::timeout(Duration::from_secs(5), helper.wait())
            .await
            .expect("ends");
        assert!(r.as_ref().map_or(true, |s| !s.success()), "{r:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
