//! Shared daemon state: containers, migrations, configuration and capabilities.

pub mod ipam;

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rebalancer_proto::{
    now_millis, ContainerId, ContainerInfo, ContainerSpec, ContainerState, MigrationId,
    MigrationRecord, MigrationState, NodeCapabilities, RootfsSpec,
};
use tokio::sync::broadcast;

use crate::config::AgentConfig;
use crate::container::{self, Container, ContainerMeta, InitSpec};
use crate::error::AgentError;
use crate::netns::{self, ContainerNet};

/// Receives a task's final (wait status, node).
pub type FinalStatusTx = tokio::sync::oneshot::Sender<(i32, String)>;

/// A task between `prepare-task` and `register-task`.
#[derive(Debug, Clone)]
pub struct PendingTask {
    pub net: netns::ContainerNet,
    pub spec: ContainerSpec,
    pub mounts: Vec<container::MountPlan>,
    pub symlinks: Vec<(String, String)>,
    pub root: PathBuf,
}

/// A restore step the destination waits for.
pub struct RestoreStep {
    pub plan: rebalancer_proto::RestorePlan,
    /// Told the restored pid 1 once the step registered it.
    pub registered: Option<tokio::sync::oneshot::Sender<i32>>,
    /// True once the images are in: the step's `prepare-restore` is answered then.
    pub ready: tokio::sync::watch::Receiver<bool>,
    /// The step's own Slurm task, once it registered: where the container runs after the move.
    pub task: Option<rebalancer_proto::TaskRef>,
    /// The step's task process that registered the restored tree (`Container::waiter`).
    pub waiter: Option<(i32, u64)>,
}

pub struct Agent {
    pub cfg: AgentConfig,
    pub caps: NodeCapabilities,
    pub containers: Mutex<BTreeMap<ContainerId, Container>>,
    pub migrations: Mutex<BTreeMap<MigrationId, MigrationRecord>>,
    /// Netns prepared for Slurm tasks (`prepare-task`) until their pid 1 registers.
    pub pending_tasks: Mutex<BTreeMap<ContainerId, PendingTask>>,
    /// Incoming migrations of Slurm tasks waiting for their restore step (`prepare-restore`,
    /// then `register-task`), by migration id.
    pub restore_steps: Mutex<BTreeMap<MigrationId, RestoreStep>>,
    /// `task-exited` answers waiting for the final status of a task that moved away.
    pub held: Mutex<BTreeMap<ContainerId, Vec<FinalStatusTx>>>,
    /// Ids and addresses held by incoming migrations until they commit or abort.
    pub incoming: Mutex<HashSet<(ContainerId, Ipv4Addr)>>,
    /// Memory announced by incoming migrations (bytes, by migration id), held until they commit
    /// or abort (`migration::destination::Reservation`).
    pub reserved: Mutex<BTreeMap<MigrationId, u64>>,
    /// Every change of a migration record is published here (watchers filter by id).
    pub events: broadcast::Sender<MigrationRecord>,
    /// Where container cgroups go; `None`: no usable hierarchy (limits cannot be enforced).
    pub cgroups: Option<crate::cgroup::Hierarchy>,
    /// Prometheus metrics (served when `metrics_listen` is set).
    pub prom: crate::prom::AgentMetrics,
    /// Migrations this node is the source of that a cancel can still reach.
    pub cancels: Arc<crate::migration::cancel::Cancels>,
    /// Records that outlive this process (`store.rs`); unset in simulations.
    pub store: OnceLock<crate::store::Store>,
    /// Address blocks leased by the controller and addresses lent out (`agent/ipam.rs`).
    pub ipam: ipam::AgentIpam,
    /// Committed post-copy arrivals and how their page supply ended, for the source's
    /// `lazy-end` question (`migration::commit::answer_lazy_end`), by migration id.
    pub lazy_supply: Mutex<BTreeMap<MigrationId, tokio::sync::watch::Sender<LazySupply>>>,
    /// The container records last written, to write only what changed.
    persisted: Mutex<BTreeMap<ContainerId, crate::store::ContainerRecord>>,
}

/// A committed post-copy arrival's page supply, as its source may ask about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LazySupply {
    /// The lazy-pages daemon still runs.
    Serving,
    /// Every page arrived, or the container ended on its own first.
    Complete,
    /// The daemon ended first and the container was killed (why).
    Lost(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn random_u32() -> u32 {
    let b = uuid::Uuid::new_v4();
    let b = b.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl Agent {
    pub fn new(cfg: AgentConfig, caps: NodeCapabilities) -> Arc<Agent> {
        let (events, _) = broadcast::channel(256);
        let prom = crate::prom::AgentMetrics::new(&caps.modes);
        Arc::new(Agent {
            cfg,
            caps,
            containers: Mutex::new(BTreeMap::new()),
            migrations: Mutex::new(BTreeMap::new()),
            pending_tasks: Mutex::new(BTreeMap::new()),
            restore_steps: Mutex::new(BTreeMap::new()),
            held: Mutex::new(BTreeMap::new()),
            incoming: Mutex::new(HashSet::new()),
            reserved: Mutex::new(BTreeMap::new()),
            cancels: Default::default(),
            events,
            cgroups: crate::cgroup::detect_system(),
            prom,
            store: OnceLock::new(),
            ipam: Default::default(),
            lazy_supply: Mutex::new(BTreeMap::new()),
            persisted: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn containers(&self) -> MutexGuard<'_, BTreeMap<ContainerId, Container>> {
        lock(&self.containers)
    }
    /// The `cgroup.procs` descriptors of the detached cgroups (`crate::detach`) a container
    /// joins besides its own cgroups (`in_own`: it has some, in the hierarchies of
    /// [`Agent::cgroups`]).
    pub fn detached_fds(&self, in_own: bool) -> Vec<std::os::fd::RawFd> {
        let covered = match (&self.cgroups, in_own) {
            (Some(h), true) => crate::cgroup::roots(h),
            _ => Vec::new(),
        };
        crate::detach::fds_except(&covered)
    }

    pub fn migrations(&self) -> MutexGuard<'_, BTreeMap<MigrationId, MigrationRecord>> {
        lock(&self.migrations)
    }
    pub fn pending_tasks(&self) -> MutexGuard<'_, BTreeMap<ContainerId, PendingTask>> {
        lock(&self.pending_tasks)
    }
    pub fn restore_steps(&self) -> MutexGuard<'_, BTreeMap<MigrationId, RestoreStep>> {
        lock(&self.restore_steps)
    }
    pub fn lazy_supply(
        &self,
    ) -> MutexGuard<'_, BTreeMap<MigrationId, tokio::sync::watch::Sender<LazySupply>>> {
        lock(&self.lazy_supply)
    }
    pub fn incoming(&self) -> MutexGuard<'_, HashSet<(ContainerId, Ipv4Addr)>> {
        lock(&self.incoming)
    }
    pub fn reserved(&self) -> MutexGuard<'_, BTreeMap<MigrationId, u64>> {
        lock(&self.reserved)
    }

    pub fn publish(&self, rec: &MigrationRecord) {
        // Journaled before anything acts on the new phase: the source publishes
        // `network-switch` before it sends Commit, and a restarted agent must know that.
        if let (Some(store), true) = (self.store.get(), rec.source == self.cfg.node) {
            // An unknown outcome stays journaled: a restarted agent resolves it (adopt.rs).
            let r = if rec.state.is_terminal() && rec.state != MigrationState::Unknown {
                store.remove_migration(&rec.id)
            } else {
                store.put_migration(rec)
            };
            if let Err(e) = r {
                tracing::error!(migration = %rec.id, error = %e, "cannot journal the migration");
            }
        }
        let old = self.migrations().insert(rec.id.clone(), rec.clone());
        // Counted once, when the record turns terminal (it may be published again afterwards).
        if rec.state.is_terminal() && !old.is_some_and(|o| o.state.is_terminal()) {
            self.prom.record_migration(rec, &self.cfg.node);
        }
        let _ = self.events.send(rec.clone());
    }

    /// Writes the records of containers that changed since the last call and removes those of
    /// containers no longer live here. Called after each change that a restart must not miss
    /// (create, register, commit) and by the reaper for the rest.
    pub fn persist(&self) {
        let Some(store) = self.store.get() else {
            return;
        };
        // Moved away or ended: the node's blocks learn it at the same moments.
        ipam::sync(self);
        let now: BTreeMap<ContainerId, crate::store::ContainerRecord> = self
            .containers()
            .values()
            .filter_map(|c| {
                crate::store::ContainerRecord::of(c, &crate::procstat::live_start_time)
                    .map(|r| (c.meta.spec.id.clone(), r))
            })
            .collect();
        let mut done = lock(&self.persisted);
        for (id, rec) in &now {
            if done.get(id) != Some(rec) {
                match store.put(rec) {
                    Ok(()) => {
                        done.insert(id.clone(), rec.clone());
                    }
                    Err(e) => {
                        tracing::error!(container = %id, error = %e, "cannot record the container")
                    }
                }
            }
        }
        let gone: Vec<ContainerId> = done
            .keys()
            .filter(|id| !now.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            match store.remove(&id) {
                Ok(()) => {
                    done.remove(&id);
                }
                Err(e) => {
                    tracing::error!(container = %id, error = %e, "cannot remove the container's record")
                }
            }
        }
    }

    /// Records that this node received Commit for an incoming migration (see
    /// [`crate::store::Store::mark_committed`]).
    pub fn mark_committed(&self, migration: &str, container: &str, netns: &str) {
        if let Some(store) = self.store.get() {
            if let Err(e) = store.mark_committed(migration, container, netns) {
                tracing::error!(migration = %migration, container = %container, error = %e, "cannot record the commit");
            }
        }
    }

    /// Tells [`Agent::persist`] which records are on disk (found at start-up), so that it
    /// rewrites or removes them like its own.
    pub fn note_persisted(&self, recs: &[crate::store::ContainerRecord]) {
        let mut done = lock(&self.persisted);
        for r in recs {
            done.insert(r.meta.spec.id.clone(), r.clone());
        }
    }

    /// Takes back a container found by start-up re-adoption (`adopt.rs`).
    pub fn adopt_container(&self, c: Container) {
        self.containers().insert(c.meta.spec.id.clone(), c);
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.cfg.run_dir.join("containers").join(id)
    }

    pub fn info(&self, c: &Container) -> ContainerInfo {
        let live = matches!(c.state, ContainerState::Running | ContainerState::Migrating);
        ContainerInfo {
            id: c.meta.spec.id.clone(),
            task: c.meta.spec.task.clone(),
            uid: c.meta.spec.uid,
            gid: c.meta.spec.gid,
            node: self.cfg.node.clone(),
            address: c.net.address.to_string(),
            pid: live.then_some(c.pid),
            state: c.state,
            rss_bytes: if live { container::tree_rss(c.pid) } else { 0 },
            cpus: c.meta.spec.cpus,
            class: c.meta.spec.class.clone(),
            exit_status: c.exit_status,
            started_at: c.meta.started_at,
            runs_in: c.runs_in.clone(),
        }
    }

    /// Creates container `id`'s cgroup with the spec's limits. `None` when this node has no
    /// usable hierarchy and the spec asks for no limits; an error when it asks for some.
    pub fn create_cgroup(
        &self,
        spec: &ContainerSpec,
    ) -> Result<Option<crate::cgroup::Cgroup>, AgentError> {
        let limits = crate::cgroup::Limits::from_spec(spec.memory_limit, spec.cpus)?;
        let Some(h) = &self.cgroups else {
            if limits.is_empty() {
                return Ok(None);
            }
            return Err(AgentError::Unsupported(format!(
                "{} has no cgroup hierarchy with memory and cpu controllers: cannot enforce the container's limits",
                self.cfg.node
            )));
        };
        let cg = crate::cgroup::Cgroup::create(h, &self.cfg.node, &spec.id, &limits)?;
        tracing::debug!(container = %spec.id, cgroup = ?cg.dirs, ?limits, "cgroup created");
        Ok(Some(cg))
    }

    pub fn address_in_use(&self, ip: Ipv4Addr) -> bool {
        self.containers().values().any(|c| {
            c.net.address == ip
                && c.state != ContainerState::MigratedAway
                && c.state != ContainerState::Exited
        }) || self.incoming().iter().any(|(_, a)| *a == ip)
    }

    /// An address for a new container: from this node's leased blocks (waiting up to
    /// [`ipam::LEASE_WAIT`] for a lease when none is free), or a random free one with
    /// `ipam = "local"` (`agent/ipam.rs`).
    pub async fn allocate_address(&self) -> Result<Ipv4Addr, AgentError> {
        ipam::allocate_waiting(self, ipam::LEASE_WAIT).await
    }

    pub fn new_net(&self, id: &str, address: Ipv4Addr) -> ContainerNet {
        ContainerNet {
            name: format!("rb-{}-{}-{:08x}", self.cfg.node, id, random_u32()),
            veth: format!("rbv{:08x}", random_u32()),
            address,
        }
    }

    /// Builds mounts, links and root for a spec on this node.
    pub fn layout(&self, spec: &ContainerSpec) -> Result<container::Layout, AgentError> {
        container::plan_mounts(
            spec,
            &self.cfg.host_dirs,
            &|p: &Path| {
                std::fs::read_link(p)
                    .ok()
                    .map(|l| l.to_string_lossy().into_owned())
            },
            &|p: &Path| p.exists(),
        )
    }

    pub fn root_for(&self, spec: &ContainerSpec) -> PathBuf {
        match &spec.rootfs {
            RootfsSpec::Dir { path } => PathBuf::from(path),
            RootfsSpec::Host => self.container_dir(&spec.id).join("root"),
        }
    }

    pub fn stdio_paths(&self, spec: &ContainerSpec) -> (PathBuf, PathBuf) {
        let logs = self.cfg.state_dir.join("logs");
        (
            spec.stdout
                .as_ref()
                .map(PathBuf::from)
                .unwrap_or_else(|| logs.join(format!("{}.stdout", spec.id))),
            spec.stderr
                .as_ref()
                .map(PathBuf::from)
                .unwrap_or_else(|| logs.join(format!("{}.stderr", spec.id))),
        )
    }

    pub fn validate_spec(&self, spec: &ContainerSpec) -> Result<(), AgentError> {
        let id_ok = !spec.id.is_empty()
            && spec.id.len() <= 64
            && spec
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            && !spec.id.starts_with('.');
        if !id_ok {
            return Err(AgentError::BadRequest(format!(
                "container id {:?} must be 1-64 letters, digits, '.', '-' or '_'",
                spec.id
            )));
        }
        // Slurm tasks (SPANK path) have no argv of their own: Slurm execs the program.
        if spec.argv.is_empty() && spec.task.is_none() {
            return Err(AgentError::BadRequest("argv is empty".into()));
        }
        if !spec.cwd.starts_with('/') {
            return Err(AgentError::BadRequest(format!(
                "cwd {:?} must be absolute",
                spec.cwd
            )));
        }
        if let RootfsSpec::Dir { path } = &spec.rootfs {
            if !Path::new(path).is_dir() {
                return Err(AgentError::BadRequest(format!(
                    "rootfs {path} is not a directory on this node"
                )));
            }
        }
        Ok(())
    }

    /// Creates and starts a container.
    pub async fn create_container(
        self: &Arc<Self>,
        mut spec: ContainerSpec,
    ) -> Result<ContainerInfo, AgentError> {
        self.validate_spec(&spec)?;
        crate::cgroup::Limits::from_spec(spec.memory_limit, spec.cpus)?;
        let address = match &spec.address {
            Some(a) => {
                let ip: Ipv4Addr = a.parse().map_err(|_| {
                    AgentError::BadRequest(format!("address {a:?} is not an IPv4 address"))
                })?;
                if !self.cfg.container_subnet.contains(ip) {
                    return Err(AgentError::BadRequest(format!(
                        "address {ip} is outside the container subnet {}",
                        self.cfg.container_subnet
                    )));
                }
                if self.address_in_use(ip) {
                    return Err(AgentError::Busy(format!(
                        "address {ip} is already used on {}",
                        self.cfg.node
                    )));
                }
                ip
            }
            None => self.allocate_address().await?,
        };
        spec.address = Some(address.to_string());
        // Reserve id + address while we build.
        {
            let cs = self.containers();
            if let Some(c) = cs.get(&spec.id) {
                if c.state != ContainerState::Exited && c.state != ContainerState::MigratedAway {
                    return Err(AgentError::Busy(format!(
                        "container {} already exists on {}",
                        spec.id, self.cfg.node
                    )));
                }
            }
            let mut inc = self.incoming();
            if inc.iter().any(|(i, _)| *i == spec.id) {
                return Err(AgentError::Busy(format!(
                    "container {} is arriving on {}",
                    spec.id, self.cfg.node
                )));
            }
            inc.insert((spec.id.clone(), address));
        }
        let r = self.start(spec.clone(), address).await;
        self.incoming().remove(&(spec.id.clone(), address));
        let c = r?;
        let info = self.info(&c);
        self.containers().insert(spec.id.clone(), c);
        self.persist();
        Ok(info)
    }

    async fn start(&self, spec: ContainerSpec, address: Ipv4Addr) -> Result<Container, AgentError> {
        let (mounts, links) = self.layout(&spec)?;
        let root = self.root_for(&spec);
        let dir = self.container_dir(&spec.id);
        if let RootfsSpec::Host = spec.rootfs {
            let _ = std::fs::remove_dir_all(&dir);
        }
        container::prepare_root(&root, &mounts, &links)?;
        let cgroup = self.create_cgroup(&spec)?;
        let net = self.new_net(&spec.id, address);
        if let Err(e) = netns::create(&net, true).await {
            if let Some(cg) = &cgroup {
                cg.remove().await;
            }
            return Err(e);
        }
        let (out, err) = self.stdio_paths(&spec);
        let result = async {
            let stdio = container::stdio_pipes(&out, &err)?;
            let keys = stdio.keys.clone();
            let mut env = spec.env.clone();
            if !env.iter().any(|(k, _)| k == "PATH") {
                env.push((
                    "PATH".into(),
                    "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
                ));
            }
            let init = InitSpec {
                root: root.clone(),
                mounts: mounts.clone(),
                hostname: spec.id.clone(),
                argv: spec.argv.clone(),
                env,
                cwd: spec.cwd.clone(),
                uid: spec.uid,
                gid: spec.gid,
            };
            let path = net.path();
            let procs = match &cgroup {
                Some(cg) => cg.procs_files()?,
                None => Vec::new(),
            };
            let detached = self.detached_fds(cgroup.is_some());
            let pid = tokio::task::spawn_blocking(move || {
                container::spawn(&init, &path, stdio.child, &procs, &detached)
            })
            .await
            .map_err(|e| AgentError::Internal(format!("spawn task: {e}")))??;
            Ok::<_, AgentError>((pid, keys))
        }
        .await;
        let (pid, keys) = match result {
            Ok(v) => v,
            Err(e) => {
                netns::destroy(&net).await;
                if let Some(cg) = &cgroup {
                    cg.remove().await;
                }
                return Err(e);
            }
        };
        tracing::info!(container = %spec.id, pid, address = %address, cgroup = ?cgroup.as_ref().map(|c| &c.dirs), "container started");
        Ok(Container {
            meta: ContainerMeta {
                spec,
                address,
                mounts,
                symlinks: links,
                stdio_keys: keys,
                stdio_paths: Vec::new(),
                started_at: now_millis(),
            },
            net,
            root,
            dir,
            pid,
            state: ContainerState::Running,
            exit_status: None,
            external: false,
            migrated_to: None,
            arrived_from: None,
            final_status: None,
            cgroup,
            runs_in: None,
            waiter: None,
        })
    }

    /// Reaps exited containers and releases their resources. Runs periodically.
    pub async fn reap(self: &Arc<Self>) {
        let mut gone = Vec::new();
        {
            let mut cs = self.containers();
            for c in cs.values_mut() {
                if c.exit_status.is_some() {
                    continue;
                }
                if c.external {
                    // The waiter reaps pid 1 and sends task-exited; only notice a vanished tree.
                    if c.state == ContainerState::Running
                        && !std::path::Path::new(&format!("/proc/{}", c.pid)).exists()
                    {
                        c.exit_status = Some(-1);
                        c.state = ContainerState::Exited;
                        gone.push((c.net.clone(), c.dir.clone(), false, None));
                    }
                    continue;
                }
                if let Some(st) = container::reap(c.pid) {
                    c.exit_status = Some(st);
                    if c.state != ContainerState::MigratedAway {
                        tracing::info!(container = %c.meta.spec.id, status = st, "container exited");
                        c.state = ContainerState::Exited;
                        gone.push((
                            c.net.clone(),
                            c.dir.clone(),
                            matches!(c.meta.spec.rootfs, RootfsSpec::Host),
                            c.cgroup.take(),
                        ));
                    }
                }
            }
        }
        for (net, dir, own_dir, cgroup) in gone {
            netns::destroy(&net).await;
            if own_dir {
                let _ = std::fs::remove_dir_all(&dir);
            }
            if let Some(cg) = cgroup {
                cg.remove().await;
            }
        }
    }

    pub fn kill(&self, id: &str, signal: i32) -> Result<(), AgentError> {
        let cs = self.containers();
        let c = cs.get(id).ok_or_else(|| {
            AgentError::NotFound(format!("no container {id} on {}", self.cfg.node))
        })?;
        if c.state != ContainerState::Running {
            return Err(AgentError::Busy(format!("container {id} is {:?}", c.state)));
        }
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| AgentError::BadRequest(format!("bad signal {signal}")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.pid), sig)
            .map_err(|e| AgentError::Internal(format!("kill {}: {e}", c.pid)))
    }

    /// Records a task's final status and answers held `task-exited` requests. Returns the node
    /// the task came from (name, peer address), which must be told in turn (the migration
    /// module's `task_final` does; the agent itself does not speak the peer protocol).
    pub fn record_final(&self, id: &str, status: i32, node: &str) -> Option<(String, String)> {
        let upstream = {
            let mut cs = self.containers();
            let c = cs.get_mut(id)?;
            c.final_status = Some((status, node.to_string()));
            c.arrived_from.take()
        };
        let waiters = lock(&self.held).remove(id).unwrap_or_default();
        for w in waiters {
            let _ = w.send((status, node.to_string()));
        }
        upstream
    }

    /// Daemon shutdown: the containers keep running (they do not belong to this process; a
    /// restarted agent re-adopts them from the store). Records are brought up to date.
    pub fn shutdown(&self) {
        self.persist();
        let live = self
            .containers()
            .values()
            .filter(|c| matches!(c.state, ContainerState::Running | ContainerState::Migrating))
            .count();
        tracing::info!(node = %self.cfg.node, containers = live, "agent stopping; containers keep running");
    }

    /// Stops every container and releases its namespace and cgroup (for an embedder that owns
    /// the node outright; the `drain` command goes through the control socket instead).
    pub async fn stop_all(&self) {
        let nets: Vec<(i32, ContainerNet, Option<crate::cgroup::Cgroup>)> = self
            .containers()
            .values_mut()
            .filter(|c| c.exit_status.is_none())
            .map(|c| {
                c.state = ContainerState::Exited;
                c.exit_status = Some(128 + libc::SIGKILL);
                (c.pid, c.net.clone(), c.cgroup.take())
            })
            .collect();
        for (pid, net, cgroup) in nets {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            netns::destroy(&net).await;
            if let Some(cg) = cgroup {
                // Pid 1 is our child (unless adopted): reap it so that the cgroup empties.
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                cg.remove().await;
            }
        }
        crate::detach::remove_empty();
        if let Some(h) = &self.cgroups {
            crate::cgroup::remove_node_dirs(h, &self.cfg.node);
        }
        self.persist();
    }
}
