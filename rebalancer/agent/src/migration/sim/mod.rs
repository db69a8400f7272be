//! A simulated node for the migration state machines: processes, namespaces, routes and CRIU's
//! network lock are entries in memory, CRIU's actions change them the way the real ones do, and
//! any one action can be made to fail ([`Fault`]). Deterministic: no real processes, network or
//! sleeps; the simulated clock moves only when a test advances it ([`SimHost::advance`]), so a
//! timeout fires exactly when the test says. Peer connections are in-memory
//! pipes to the destination's real server running on another [`SimHost`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rebalancer_proto::ContainerSpec;
use tokio::io::DuplexStream;

use super::host::{Cgroups, Clock, Connector, Criu, Helper, Net, PeerLink, Procs, Steps};
use crate::agent::Agent;
use crate::cgroup::Cgroup;
use crate::config::AgentConfig;
use crate::criu::{CriuStats, DumpArgs};
use crate::error::AgentError;
use crate::netns::ContainerNet;
use crate::peer::{PeerConn, PeerReply, PeerRequest};

mod link;
pub use link::SimLink;

/// A simulated process tree's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    Running,
    /// Frozen by a dump or restored with `--leave-stopped`.
    Stopped,
    Dead,
}

/// Where a simulated failure strikes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The host action of that name fails (`create-net`, `page-server`, `pre-dump`, `dump`,
    /// `dump-lazy`, `lazy-pages`, `restore`, `cgroup`, `net-inode`, `connect`, `start-step`,
    /// `restore-step`, `hold`, `lazy-link`, `lazy-connect`; `lazy-link-accept`: the source never gets
    /// the destination's link; `lazy-serve`: the post-copy dump exits with an error once serving;
    /// `lazy-lost`: the destination's lazy-pages daemon exits with an error after commit).
    Action(&'static str),
    /// The source's peer connection breaks before it sends this request (`prepare`, `images`,
    /// `restore`, `commit`, `precopy-round`, `capabilities`).
    LinkBefore(&'static str),
    /// The request is delivered and handled, then the connection breaks before the answer.
    LinkAfter(&'static str),
    /// The host action of that name never returns (a stuck CRIU); only `pre-dump` and `dump`.
    Hang(&'static str),
    /// The request is delivered and handled, then its answer never comes (the source's call
    /// waits until its own timer ends it).
    LinkStall(&'static str),
    /// The request is held back (the call waits until the source's timer ends it) and
    /// delivered late, just before the link's next request.
    LinkLate(&'static str),
    /// Like `LinkAfter`, and from then on this node is partitioned from its peers
    /// ([`SimHost::partition`]).
    PartitionAfter(&'static str),
    /// A silent partition from this host action (`dump`, `pre-dump`, `dump-lazy`: it then
    /// hangs, its pages cannot leave) or peer request (`images`, `restore`, `precopy-round`:
    /// not delivered) on: the link stays open and delivers nothing either way, as when a
    /// firewall drops every packet; only heartbeats and timers find it. Healed by
    /// [`SimHost::partition`]`(false)`.
    Silence(&'static str),
}

/// The simulated node's state, for assertions.
#[derive(Debug, Default)]
pub struct SimState {
    pub procs: BTreeMap<i32, Proc>,
    pub netns: BTreeSet<String>,
    /// Namespaces whose address this node routes (answers ARP for).
    pub routes: BTreeSet<String>,
    /// Namespaces behind CRIU's nftables lock.
    pub locked: BTreeSet<String>,
    /// Namespaces whose inbound packets a hold is prepared for ([`Net::hold_inbound`]).
    pub held: BTreeSet<String>,
    /// Of those, the ones a dump's action script started diverting (at its network lock).
    pub holding: BTreeSet<String>,
    /// Holds released, in order: (namespace, whether it was diverting).
    pub released: Vec<(String, bool)>,
    /// Running helper processes (page servers, lazy daemons, lazy dumps), by id.
    pub helpers: BTreeSet<u32>,
    /// Page-server guards installed and not yet removed (`ps_guard`).
    pub ps_guards: BTreeSet<(Ipv4Addr, u16)>,
    pub announced: Vec<Ipv4Addr>,
    /// Every action in order, for failure messages.
    pub log: Vec<String>,
    /// Page-moving CRIU actions and whether each ran with TLS options.
    pub tls: Vec<(&'static str, bool)>,
    /// A peer call of this node waits for a timer (a stalled or held-back request).
    pub stalled: bool,
    next_id: u32,
}

struct Inner {
    state: Mutex<SimState>,
    /// Armed faults, each striking once (the first that matches).
    faults: Mutex<Vec<Fault>>,
    /// While set, this node reaches no peer: connects fail, a link breaks at its next call.
    partitioned: std::sync::atomic::AtomicBool,
    /// While set, this node's links deliver nothing and stay open ([`Fault::Silence`]).
    silent: std::sync::atomic::AtomicBool,
    start: Instant,
    /// Simulated time since `start`; moves only by [`SimHost::advance`].
    clock: tokio::sync::watch::Sender<Duration>,
    /// The destination this node's connector reaches.
    peer: Mutex<Option<(Arc<Agent>, SimHost)>>,
    /// Peer connections this node serves (as a destination).
    served: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    mem_available: std::sync::atomic::AtomicU64,
    /// What `space_free` reports for the image tmpfs.
    space_free: std::sync::atomic::AtomicU64,
    /// A restore step whose restore fails hangs instead of exiting.
    hang_steps: std::sync::atomic::AtomicBool,
}

/// One simulated node. Cheap to clone (shared state).
#[derive(Clone)]
pub struct SimHost(Arc<Inner>);

impl SimHost {
    pub fn new() -> SimHost {
        SimHost(Arc::new(Inner {
            state: Mutex::new(SimState {
                next_id: 1000,
                ..Default::default()
            }),
            faults: Mutex::new(Vec::new()),
            partitioned: std::sync::atomic::AtomicBool::new(false),
            silent: std::sync::atomic::AtomicBool::new(false),
            start: Instant::now(),
            clock: tokio::sync::watch::channel(Duration::ZERO).0,
            peer: Mutex::new(None),
            served: Mutex::new(Vec::new()),
            mem_available: std::sync::atomic::AtomicU64::new(64 << 30),
            space_free: std::sync::atomic::AtomicU64::new(32 << 30),
            hang_steps: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Sets what `mem_available` and `space_free` (the image tmpfs) report from now on.
    pub fn set_room(&self, memory: u64, image_space: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0.mem_available.store(memory, Relaxed);
        self.0.space_free.store(image_space, Relaxed);
    }

    pub fn state(&self) -> MutexGuard<'_, SimState> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next matching action fail (once); several faults may be armed.
    pub fn inject(&self, f: Fault) {
        self.0
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(f);
    }

    /// Cuts (`true`) or heals this node's links to its peers.
    pub fn partition(&self, cut: bool) {
        self.0
            .partitioned
            .store(cut, std::sync::atomic::Ordering::SeqCst);
        if !cut {
            self.0
                .silent
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether this node's links are silent ([`Fault::Silence`]).
    pub fn is_silent(&self) -> bool {
        self.0.silent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes the links silent if a [`Fault::Silence`] is armed for `at`; returns whether
    /// they are silent now.
    fn silence_at(&self, at: &'static str) -> bool {
        if self.take_fault(|f| *f == Fault::Silence(at)) {
            self.state().log.push(format!("{at}: link silent"));
            self.0
                .silent
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.is_silent()
    }

    /// Whether a peer call of this node waits for its timer, or the node is partitioned: a
    /// test moves the clock on only then, so that nothing else times out.
    pub fn waiting_for_a_timer(&self) -> bool {
        self.is_partitioned() || self.is_silent() || self.state().stalled
    }

    fn is_partitioned(&self) -> bool {
        self.0.partitioned.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections opened from this node reach `agent`'s peer server on `host`.
    pub fn connect_to(&self, agent: Arc<Agent>, host: SimHost) {
        *self.0.peer.lock().unwrap_or_else(|p| p.into_inner()) = Some((agent, host));
    }

    /// From now on a restore step whose restore fails neither registers nor exits.
    pub fn hang_steps(&self) {
        self.0
            .hang_steps
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Moves the simulated clock on by `d`, waking the sleeps that end by then.
    pub fn advance(&self, d: Duration) {
        self.0.clock.send_modify(|t| *t += d);
    }

    /// Waits until every connection this node serves has ended (and undone what it must).
    pub async fn settle(&self) {
        loop {
            let h = self
                .0
                .served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            match h {
                Some(h) => {
                    let _ = h.await;
                }
                None => return,
            }
        }
    }

    /// A running tree with pid 1 `pid`, in namespace `net` with its route.
    pub fn add_container(&self, pid: i32, net: &ContainerNet) {
        let mut s = self.state();
        s.procs.insert(pid, Proc::Running);
        s.netns.insert(net.name.clone());
        s.routes.insert(net.name.clone());
    }

    /// Pid 1's trees that are running or stopped.
    pub fn live(&self) -> Vec<(i32, Proc)> {
        let s = self.state();
        s.procs
            .iter()
            .filter(|(_, p)| **p != Proc::Dead)
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    fn take_fault(&self, matches: impl Fn(&Fault) -> bool) -> bool {
        let mut f = self.0.faults.lock().unwrap_or_else(|p| p.into_inner());
        match f.iter().position(matches) {
            Some(i) => {
                f.remove(i);
                true
            }
            None => false,
        }
    }

    /// Logs `action` and fails it if a fault is armed for it.
    fn act(&self, action: &'static str) -> Result<(), AgentError> {
        let failed = self.take_fault(|f| *f == Fault::Action(action));
        self.state()
            .log
            .push(format!("{action}{}", if failed { " (failed)" } else { "" }));
        if failed {
            return Err(AgentError::Criu {
                action,
                message: "simulated failure".into(),
            });
        }
        Ok(())
    }

    /// Never returns if a hang is armed for `action`.
    async fn hang(&self, action: &'static str) {
        if self.take_fault(|f| *f == Fault::Hang(action)) {
            self.state().log.push(format!("{action} (hangs)"));
            std::future::pending::<()>().await;
        }
    }

    /// A page-moving action under a silent partition never ends (its writes find no peer).
    async fn silent_hang(&self, action: &'static str) {
        if self.silence_at(action) {
            self.state()
                .log
                .push(format!("{action} (hangs: link silent)"));
            std::future::pending::<()>().await;
        }
    }

    fn helper(&self) -> SimHelper {
        let mut s = self.state();
        s.next_id += 1;
        let id = s.next_id;
        s.helpers.insert(id);
        SimHelper {
            host: self.clone(),
            id,
            status: 0,
        }
    }
}

impl Default for SimHost {
    fn default() -> Self {
        SimHost::new()
    }
}

/// A simulated helper: it has done its work by the time anyone waits for it.
pub struct SimHelper {
    host: SimHost,
    id: u32,
    /// Its wait status when it ends.
    status: i32,
}

impl Helper for SimHelper {
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.host.state().helpers.remove(&self.id);
        Ok(ExitStatus::from_raw(self.status))
    }
    fn start_kill(&mut self) {
        self.host.state().helpers.remove(&self.id);
    }
}

impl Criu for SimHost {
    type Helper = SimHelper;

    async fn pre_dump(
        &self,
        _pid: i32,
        dir: &Path,
        _ps: (Ipv4Addr, u16),
        _parent: Option<&str>,
        tls: &[String],
    ) -> Result<(), AgentError> {
        self.state().tls.push(("pre-dump", !tls.is_empty()));
        self.hang("pre-dump").await;
        self.silent_hang("pre-dump").await;
        self.act("pre-dump")?;
        write_image(dir, "pagemap-1.img")
    }

    async fn dump(&self, args: &DumpArgs) -> Result<(), AgentError> {
        // A failed dump leaves the tree running (CRIU resumes it on its failure path).
        self.state().tls.push(("dump", !args.tls.is_empty()));
        self.hang("dump").await;
        self.silent_hang("dump").await;
        self.act("dump")?;
        self.freeze(args.pid);
        self.start_hold(args);
        write_image(&args.images_dir, "inventory.img")
    }

    async fn dump_lazy(&self, args: &DumpArgs) -> Result<SimHelper, AgentError> {
        self.state().tls.push(("dump-lazy", !args.tls.is_empty()));
        self.silent_hang("dump-lazy").await;
        self.act("dump-lazy")?;
        self.freeze(args.pid);
        self.start_hold(args);
        write_image(&args.images_dir, "inventory.img")?;
        let mut h = self.helper();
        if self.take_fault(|f| *f == Fault::Action("lazy-serve")) {
            // Serving the pages fails later, after the destination resumed.
            h.status = 1 << 8;
        }
        Ok(h)
    }

    async fn page_server(
        &self,
        _dir: &Path,
        ip: Ipv4Addr,
        _parent: Option<&str>,
        tls: &[String],
        _from: Option<std::net::IpAddr>,
        gate: Option<super::host::PageServerGate>,
    ) -> Result<((Ipv4Addr, u16), SimHelper), AgentError> {
        self.state().tls.push(("page-server", !tls.is_empty()));
        self.act("page-server")?;
        let port = self.pick_port(ip)?;
        if let Some(gate) = gate {
            let host = self.clone();
            tokio::spawn(async move {
                if let Ok(answer) = gate.await {
                    let r = host.act("page-server-listen").map_err(|e| e.chain());
                    let _ = answer.send(r);
                }
            });
        }
        Ok(((ip, port), self.helper()))
    }

    fn guard_page_server(
        &self,
        to: (Ipv4Addr, u16),
        _within: Duration,
    ) -> impl std::future::Future<Output = Result<(), AgentError>> + Send {
        let r = self.act("ps-guard");
        if r.is_ok() {
            self.state().ps_guards.insert(to);
        }
        async move { r }
    }

    fn unguard_page_server(
        &self,
        to: (Ipv4Addr, u16),
    ) -> impl std::future::Future<Output = ()> + Send {
        let mut s = self.state();
        if s.ps_guards.remove(&to) {
            s.log.push("ps-unguard".into());
        }
        async {}
    }

    async fn lazy_pages(
        &self,
        _dir: &Path,
        src: super::host::LazySource,
        tls: &[String],
    ) -> Result<SimHelper, AgentError> {
        let linked = matches!(src, super::host::LazySource::Link(_));
        self.state().tls.push(("lazy-pages", !tls.is_empty()));
        self.state().log.push(format!("lazy-pages linked={linked}"));
        self.act("lazy-pages")?;
        let mut h = self.helper();
        if self.take_fault(|f| *f == Fault::Action("lazy-lost")) {
            // The page source vanishes after the container resumed: the daemon exits 1.
            self.state()
                .log
                .push("lazy-pages loses its page source".into());
            h.status = 1 << 8;
        }
        Ok(h)
    }

    async fn restore(
        &self,
        _args: &[String],
        _keep_fds: &[i32],
        _cgroup_procs: &[i32],
        dir: &Path,
        _pidfile: &Path,
    ) -> Result<i32, AgentError> {
        self.act("restore")?;
        if !dir.join("inventory.img").is_file() {
            return Err(AgentError::Criu {
                action: "restore",
                message: "no images".into(),
            });
        }
        let mut s = self.state();
        s.next_id += 1;
        let pid = s.next_id as i32;
        s.procs.insert(pid, Proc::Stopped);
        Ok(pid)
    }

    fn stats(&self, _dir: &Path, _name: &str) -> Option<CriuStats> {
        None
    }

    fn lazy_totals(&self, _dir: &Path) -> (u64, u64) {
        (0, 0)
    }

    fn pick_port(&self, _ip: Ipv4Addr) -> Result<u16, AgentError> {
        let mut s = self.state();
        s.next_id += 1;
        Ok((20000 + s.next_id % 10000) as u16)
    }

    fn lazy_link_listen(
        &self,
        ip: Ipv4Addr,
        _from: std::net::IpAddr,
        _token: crate::lazy_link::Token,
        _within: Duration,
    ) -> Result<(u16, super::host::LazyAccept), AgentError> {
        self.act("lazy-link")?;
        let port = self.pick_port(ip)?;
        // The simulated destination's connect is not matched to this listener: the link is
        // a socket pair, and `lazy-link-accept` fails the accept.
        let fail = self.take_fault(|f| *f == Fault::Action("lazy-link-accept"));
        let pending = tokio::spawn(async move {
            if fail {
                return Err(AgentError::Timeout(
                    "simulated: the destination did not open the lazy-page link".into(),
                ));
            }
            sim_socket()
        });
        Ok((port, pending))
    }

    async fn lazy_link_connect(
        &self,
        _to: SocketAddr,
        _token: crate::lazy_link::Token,
        _within: Duration,
    ) -> Result<OwnedFd, AgentError> {
        self.act("lazy-connect")?;
        sim_socket()
    }
}

/// One end of a fresh Unix socket pair: a real descriptor for the simulated link.
fn sim_socket() -> Result<OwnedFd, AgentError> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, _b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| AgentError::Io {
        what: "socketpair".into(),
        source: e.into(),
    })?;
    Ok(a)
}

impl SimHost {
    fn freeze(&self, pid: i32) {
        let mut s = self.state();
        if let Some(p) = s.procs.get_mut(&pid) {
            *p = Proc::Stopped;
        }
        // CRIU locks the network of the container it dumped; the sim has one per node here.
        let names: Vec<String> = s.netns.iter().cloned().collect();
        s.locked.extend(names);
    }

    /// A dump with the hold's action script starts the hold at its network lock.
    fn start_hold(&self, args: &DumpArgs) {
        if args.action_script.is_some() {
            let mut s = self.state();
            let held: Vec<String> = s.held.iter().cloned().collect();
            s.holding.extend(held);
        }
    }
}

fn write_image(dir: &Path, name: &str) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join(name), b"sim"))
        .map_err(|source| AgentError::Io {
            what: format!("write {}", dir.join(name).display()),
            source,
        })
}

impl Net for SimHost {
    async fn create_net(&self, net: &ContainerNet, route: bool) -> Result<(), AgentError> {
        self.act("create-net")?;
        let mut s = self.state();
        s.netns.insert(net.name.clone());
        if route {
            s.routes.insert(net.name.clone());
        }
        Ok(())
    }
    async fn add_route(&self, net: &ContainerNet) -> Result<(), AgentError> {
        self.act("add-route")?;
        self.state().routes.insert(net.name.clone());
        Ok(())
    }
    async fn withdraw_route(&self, net: &ContainerNet) {
        let mut s = self.state();
        s.log.push("withdraw-route".into());
        s.routes.remove(&net.name);
    }
    async fn destroy_net(&self, net: &ContainerNet) {
        let mut s = self.state();
        s.log.push("destroy-net".into());
        s.routes.remove(&net.name);
        s.locked.remove(&net.name);
        s.netns.remove(&net.name);
    }
    async fn unlock(&self, net: &ContainerNet) -> Result<usize, AgentError> {
        let mut s = self.state();
        s.log.push("unlock".into());
        Ok(usize::from(s.locked.remove(&net.name)))
    }
    fn net_inode(&self, _net: &ContainerNet) -> Result<u64, AgentError> {
        self.act("net-inode")?;
        Ok(4026531840)
    }
    fn open_net(&self, _net: &ContainerNet) -> Result<OwnedFd, AgentError> {
        std::fs::File::open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|source| AgentError::Io {
                what: "open /dev/null".into(),
                source,
            })
    }
    fn announce(&self, _uplink: &str, ip: Ipv4Addr) {
        self.state().announced.push(ip);
    }
    async fn poke(&self, _addr: (Ipv4Addr, u16), _tls: Option<&Path>) {}
    async fn hold_inbound(
        &self,
        net: &ContainerNet,
        _uplink: &str,
        dir: &Path,
    ) -> Result<std::path::PathBuf, AgentError> {
        self.act("hold")?;
        self.state().held.insert(net.name.clone());
        Ok(dir.join("hold.sh"))
    }
    async fn release_inbound(&self, net: &ContainerNet, _uplink: &str) -> super::hold::Released {
        let mut s = self.state();
        s.log.push("release-hold".into());
        let holding = s.holding.remove(&net.name);
        if s.held.remove(&net.name) {
            s.released.push((net.name.clone(), holding));
        }
        super::hold::Released {
            drained: true,
            ..Default::default()
        }
    }
}

impl Procs for SimHost {
    fn signal_tree(&self, pid: i32, sig: Signal) {
        let mut s = self.state();
        s.log.push(format!("{sig} {pid}"));
        if let Some(p) = s.procs.get_mut(&pid) {
            *p = match (sig, *p) {
                (_, Proc::Dead) => Proc::Dead,
                (Signal::SIGCONT, _) => Proc::Running,
                (Signal::SIGKILL, _) => Proc::Dead,
                (_, p) => p,
            };
        }
    }
    fn kill(&self, pid: i32) {
        self.signal_tree(pid, Signal::SIGKILL);
    }
    async fn kill_and_reap(&self, pid: i32) {
        self.signal_tree(pid, Signal::SIGKILL);
    }
    fn release_tcp_repair(&self, _pid: i32) -> usize {
        0
    }
    fn tree_rss(&self, _pid: i32) -> u64 {
        16 << 20
    }
    fn stdio_ids(&self, _pid: i32) -> (Vec<String>, Vec<String>) {
        // Pipes to slurmstepd: nothing CRIU must treat as an external file.
        (vec![], vec![])
    }
    fn alive(&self, pid: i32) -> bool {
        self.state()
            .procs
            .get(&pid)
            .is_some_and(|p| *p != Proc::Dead)
    }
    fn mem_available(&self) -> Option<u64> {
        Some(
            self.0
                .mem_available
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }
    fn space_free(&self, _dir: &Path) -> Option<u64> {
        Some(self.0.space_free.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Cgroups for SimHost {
    fn create_cgroup(
        &self,
        _agent: &Agent,
        _spec: &ContainerSpec,
    ) -> Result<Option<Cgroup>, AgentError> {
        self.act("cgroup")?;
        Ok(None)
    }
    async fn remove_cgroup(&self, _cg: Cgroup) {}
}

/// A simulated restore step (srun): it lives until killed, or until its restore failed.
pub struct SimStep {
    exited: tokio::sync::watch::Receiver<bool>,
    kill: tokio::sync::watch::Sender<bool>,
}

impl Helper for SimStep {
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let _ = self.exited.wait_for(|e| *e).await;
        Ok(ExitStatus::from_raw(1 << 8))
    }
    fn start_kill(&mut self) {
        let _ = self.kill.send(true);
    }
}

impl Steps for SimHost {
    type Step = SimStep;
    /// Plays the step's task: once the images are in (the entry's `ready`), "restores" the tree
    /// (action `restore-step`, which can fail: the step then exits) and registers its pid.
    fn start_step(
        &self,
        agent: &Arc<Agent>,
        migration: &str,
        argv: &[String],
        _user: &super::step_user::StepUser,
        _log: std::fs::File,
    ) -> Result<SimStep, AgentError> {
        self.act("start-step")?;
        let mut ready = agent
            .restore_steps()
            .get(migration)
            .map(|s| s.ready.clone())
            .ok_or_else(|| AgentError::Internal("no restore step entry".into()))?;
        // The job the step's `--jobid=` names; Slurm numbers the step after the job's steps so
        // far (8 here).
        let step_task = argv
            .iter()
            .find_map(|a| a.strip_prefix("--jobid=")?.parse().ok())
            .map(|job_id| rebalancer_proto::TaskRef {
                job_id,
                step_id: 8,
                task_id: 0,
            });
        let (exit_tx, exited) = tokio::sync::watch::channel(false);
        let (kill, mut killed) = tokio::sync::watch::channel(false);
        let (host, agent, migration) = (self.clone(), agent.clone(), migration.to_string());
        tokio::spawn(async move {
            let go = tokio::select! {
                r = ready.wait_for(|g| *g) => r.is_ok(),
                _ = killed.wait_for(|k| *k) => false,
            };
            let restored = go && host.act("restore-step").is_ok();
            if go && !restored && host.0.hang_steps.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = killed.wait_for(|k| *k).await;
            }
            if restored {
                let pid = {
                    let mut s = host.state();
                    s.next_id += 1;
                    let pid = s.next_id as i32;
                    s.procs.insert(pid, Proc::Stopped);
                    pid
                };
                let tx = agent.restore_steps().get_mut(&migration).and_then(|s| {
                    s.task = step_task;
                    s.registered.take()
                });
                if let Some(tx) = tx {
                    let _ = tx.send(pid);
                }
                let _ = killed.wait_for(|k| *k).await;
            }
            let _ = exit_tx.send(true);
        });
        Ok(SimStep { exited, kill })
    }
}

impl Clock for SimHost {
    fn now(&self) -> Instant {
        self.0.start + *self.0.clock.borrow()
    }
    /// Ends once the simulated clock has moved `d` on (never by itself: a timeout in the state
    /// machine fires only when a test advances the clock past it).
    async fn sleep(&self, d: Duration) {
        let until = *self.0.clock.borrow() + d;
        let mut rx = self.0.clock.subscribe();
        let _ = rx.wait_for(|t| *t >= until).await;
    }
}
