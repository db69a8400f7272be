//! Container addresses on this node: allocated from the address blocks the controller leases
//! (`address-blocks`, PROTOCOL.md), with no round trip at task start, so tasks start while the
//! controller is down. The blocks and the addresses lent to containers that moved away are
//! kept in `<state_dir>/ipam.json` (written before the lease is answered), so a restarted agent
//! allocates from the same blocks and never reuses a lent address.
//!
//! What is in use is read from the node itself at each allocation (containers, arrivals,
//! tasks being prepared, adopted containers after a restart), plus the addresses handed out in
//! the last [`RECENT`] (handed out but not yet visible in any of those), so nothing here can
//! drift from what runs. The rules themselves are `rebalancer_ipam::NodeAddresses`, which the
//! ipam crate's simulation and property tests exercise.
//!
//! `ipam = "local"` keeps the old random pick over the whole subnet (single-agent labs).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rebalancer_ipam::{IpamError, NodeAddresses, Pool};
use rebalancer_proto::{
    BlockLease, BlockState, ContainerId, ContainerState, IpamMode, LentAddress,
};
use serde::{Deserialize, Serialize};

use crate::agent::Agent;
use crate::error::AgentError;

/// How long an address handed out stays reserved before it must show up as used (a task being
/// built, a container starting). Longer than any start; an address that ended is reusable
/// after it.
pub const RECENT: Duration = Duration::from_secs(120);

/// `ipam.json`'s layout version.
pub const IPAM_VERSION: u32 = 1;

/// How long a new container waits for an address when the node has no free one from its
/// blocks (a node that never had a block, or whose blocks are full) before it is refused. The
/// controller leases within one poll of reaching the agent (2 s by default), so a task started
/// just after a new node came up waits instead of failing; with the controller down, the user
/// gets the refusal after this, well inside the SPANK plugin's 10 s call timeout.
pub const LEASE_WAIT: Duration = Duration::from_secs(5);

/// What `ipam.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub version: u32,
    pub addresses: NodeAddresses,
    /// Which container holds each lent address (reported to the controller).
    #[serde(default)]
    pub lent_to: BTreeMap<Ipv4Addr, ContainerId>,
}

#[derive(Debug, Default)]
struct Inner {
    /// `None` until the controller leased this node a block (or `ipam.json` said it had).
    addrs: Option<NodeAddresses>,
    lent_to: BTreeMap<Ipv4Addr, ContainerId>,
    recent: BTreeMap<Ipv4Addr, Instant>,
    /// What was last written, to write only on change.
    written: Option<Persisted>,
}

/// The node's address state (a field of [`Agent`]).
#[derive(Debug, Default)]
pub struct AgentIpam {
    inner: Mutex<Inner>,
    /// Woken by every lease, for allocations waiting for a block ([`allocate_waiting`]).
    leased: tokio::sync::Notify,
}

impl AgentIpam {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blocks this node allocates from (empty before its first lease).
    pub fn blocks(&self) -> Vec<u32> {
        self.lock()
            .addrs
            .as_ref()
            .map(|a| a.blocks().collect())
            .unwrap_or_default()
    }

    /// Addresses of this node's blocks lent to containers that moved away.
    pub fn lent(&self) -> BTreeSet<Ipv4Addr> {
        self.lock()
            .addrs
            .as_ref()
            .map(|a| a.lent().clone())
            .unwrap_or_default()
    }
}

/// Addresses in use on the node now, and the containers that moved away (address → id).
fn in_use(agent: &Agent) -> (BTreeSet<Ipv4Addr>, BTreeMap<Ipv4Addr, ContainerId>) {
    let mut live = BTreeSet::new();
    let mut moved = BTreeMap::new();
    for c in agent.containers().values() {
        match c.state {
            ContainerState::MigratedAway => {
                moved.insert(c.net.address, c.meta.spec.id.clone());
            }
            ContainerState::Exited => {}
            _ if c.exit_status.is_some() => {}
            _ => {
                live.insert(c.net.address);
            }
        }
    }
    live.extend(agent.incoming().iter().map(|(_, a)| *a));
    live.extend(agent.pending_tasks().values().map(|p| p.net.address));
    // An address live here is not "moved" even if an older record of it moved away.
    moved.retain(|a, _| !live.contains(a));
    (live, moved)
}

/// Brings `inner` up to date with the node; returns the live set without the reservations.
fn sync_locked(agent: &Agent, inner: &mut Inner) -> BTreeSet<Ipv4Addr> {
    let (live, moved) = in_use(agent);
    let now = Instant::now();
    inner
        .recent
        .retain(|a, at| now.duration_since(*at) < RECENT && !live.contains(a));
    let Inner {
        addrs,
        lent_to,
        recent,
        ..
    } = inner;
    if let Some(addrs) = addrs {
        let mut all = live.clone();
        all.extend(recent.keys().copied());
        let moved_set: BTreeSet<Ipv4Addr> = moved.keys().copied().collect();
        addrs.sync(all, &moved_set);
        for (a, id) in moved {
            if addrs.lent().contains(&a) {
                lent_to.insert(a, id);
            }
        }
        lent_to.retain(|a, _| addrs.lent().contains(a));
    }
    live
}

/// Writes `ipam.json` when it changed. Errors are returned: a lease is not answered before
/// it is stored.
fn persist_locked(agent: &Agent, inner: &mut Inner) -> Result<(), AgentError> {
    let Some(addrs) = &inner.addrs else {
        return Ok(());
    };
    let p = Persisted {
        version: IPAM_VERSION,
        addresses: addrs.clone(),
        lent_to: inner.lent_to.clone(),
    };
    if inner.written.as_ref() == Some(&p) {
        return Ok(());
    }
    if let Some(store) = agent.store.get() {
        store
            .put_ipam(&p)
            .map_err(|e| AgentError::Internal(format!("cannot store the address blocks: {e}")))?;
    }
    inner.written = Some(p);
    Ok(())
}

/// Start-up: the blocks and lent addresses of the previous agent process (before adoption
/// finishes, so that no request is answered without them).
pub fn load(agent: &Agent, store: &crate::store::Store) {
    match store.load_ipam::<Persisted>() {
        Ok(None) => {}
        Ok(Some(p)) if p.version > IPAM_VERSION => {
            tracing::error!(
                version = p.version,
                "ipam.json is newer than this agent: ignored; tasks wait for the controller's lease"
            );
        }
        Ok(Some(p)) => {
            tracing::info!(node = %agent.cfg.node, blocks = ?p.addresses.blocks().collect::<Vec<_>>(), lent = p.addresses.lent().len(), "address blocks restored");
            let mut inner = agent.ipam.lock();
            inner.addrs = Some(p.addresses.clone());
            inner.lent_to = p.lent_to.clone();
            inner.written = Some(p);
        }
        Err(e) => {
            tracing::error!(error = %e, "ipam.json unreadable: tasks wait for the controller's lease");
        }
    }
}

/// Notes containers that moved away (their addresses stay lent) and ended (free again); called
/// whenever the agent persists its containers.
pub fn sync(agent: &Agent) {
    if agent.cfg.ipam == IpamMode::Local {
        return;
    }
    let mut inner = agent.ipam.lock();
    sync_locked(agent, &mut inner);
    if let Err(e) = persist_locked(agent, &mut inner) {
        tracing::error!(error = %e, "address state not stored");
    }
}

/// An address for a new container (a task or a container of the control API).
pub fn allocate(agent: &Agent) -> Result<Ipv4Addr, AgentError> {
    if agent.cfg.ipam == IpamMode::Local {
        return allocate_local(agent);
    }
    let node = agent.cfg.node.clone();
    let mut inner = agent.ipam.lock();
    sync_locked(agent, &mut inner);
    let Some(addrs) = inner.addrs.as_mut() else {
        return Err(AgentError::NoRoom(format!(
            "{node} has no container address block yet: the controller leases one when it \
             reaches this agent (check that rebalancerd runs and reaches {node}; \
             `ipam = \"local\"` picks addresses alone, for single-agent labs only)"
        )));
    };
    let a = addrs.allocate().map_err(|e| match e {
        IpamError::NodeExhausted { .. } => AgentError::NoRoom(format!(
            "{e} (the controller leases one on its next poll when the pool has a free block)"
        )),
        e => AgentError::Internal(e.to_string()),
    })?;
    inner.recent.insert(a, Instant::now());
    if let Err(e) = persist_locked(agent, &mut inner) {
        tracing::warn!(error = %e, "address state not stored");
    }
    tracing::debug!(node = %node, address = %a, "container address allocated from the node's blocks");
    Ok(a)
}

/// [`allocate`], waiting up to `wait` for the controller's lease when the node has no free
/// address from its blocks (none leased yet, or all in use): the refusal after the wait says
/// how long it waited.
pub async fn allocate_waiting(agent: &Agent, wait: Duration) -> Result<Ipv4Addr, AgentError> {
    let t0 = tokio::time::Instant::now();
    let deadline = t0 + wait;
    let mut waited = false;
    loop {
        // Registered before the check, so that a lease between the check and the wait wakes it.
        let notified = agent.ipam.leased.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match allocate(agent) {
            Err(AgentError::NoRoom(m)) if agent.cfg.ipam == IpamMode::Leased => {
                if tokio::time::Instant::now() >= deadline {
                    let secs = t0.elapsed().as_secs_f64();
                    return Err(AgentError::NoRoom(format!(
                        "{m}; waited {secs:.1} s for a lease"
                    )));
                }
                if !waited {
                    tracing::info!(node = %agent.cfg.node, wait_ms = wait.as_millis() as u64, "no free container address; waiting for the controller's lease");
                    waited = true;
                }
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
            Ok(a) if waited => {
                tracing::info!(node = %agent.cfg.node, address = %a, waited_ms = t0.elapsed().as_millis() as u64, "container address allocated after waiting for a lease");
                return Ok(a);
            }
            r => return r,
        }
    }
}

/// `ipam = "local"`: a random free address of the whole subnet (what every agent did before
/// blocks; two nodes can pick the same one).
fn allocate_local(agent: &Agent) -> Result<Ipv4Addr, AgentError> {
    let hosts: Vec<Ipv4Addr> = agent.cfg.container_subnet.hosts().collect();
    let start = crate::agent::random_u32() as usize % hosts.len().max(1);
    let (live, _) = in_use(agent);
    (0..hosts.len())
        .map(|i| hosts[(start + i) % hosts.len()])
        .find(|ip| !live.contains(ip) && !agent.address_in_use(*ip))
        .ok_or_else(|| {
            AgentError::NoRoom(format!("no free address in {}", agent.cfg.container_subnet))
        })
}

/// The controller's `address-blocks`: adopt the leased set and the released addresses, store
/// them, and say what the node holds.
pub fn lease(agent: &Agent, lease: BlockLease) -> Result<BlockState, AgentError> {
    if agent.cfg.ipam == IpamMode::Local {
        let (live, _) = in_use(agent);
        return Ok(BlockState {
            mode: IpamMode::Local,
            blocks: Vec::new(),
            free: 0,
            used: live.len() as u32,
            lent: Vec::new(),
            want_block: false,
        });
    }
    let subnet = crate::config::Subnet::parse(&lease.pool)
        .map_err(|r| AgentError::BadRequest(format!("lease pool {:?}: {r}", lease.pool)))?;
    let pool = Pool::new(subnet.base, subnet.prefix, lease.block_prefix)
        .map_err(|e| AgentError::BadRequest(format!("lease: {e}")))?;
    let mine = agent.cfg.container_subnet;
    if !pool.within(mine.base, mine.prefix) {
        return Err(AgentError::BadRequest(format!(
            "the controller's container pool {pool} is not inside this node's container_subnet \
             {mine}: set both to the same subnet"
        )));
    }
    if let Some(b) = lease.blocks.iter().find(|b| **b >= pool.blocks()) {
        return Err(AgentError::BadRequest(format!(
            "block {b} is not a block of {pool} (it has {} /{} blocks)",
            pool.blocks(),
            pool.block
        )));
    }
    let mut released = Vec::new();
    for r in &lease.released {
        released.push(r.parse::<Ipv4Addr>().map_err(|_| {
            AgentError::BadRequest(format!("released address {r:?} is not an IPv4 address"))
        })?);
    }
    let node = agent.cfg.node.clone();
    let mut inner = agent.ipam.lock();
    let before: Vec<u32> = inner
        .addrs
        .as_ref()
        .map(|a| a.blocks().collect())
        .unwrap_or_default();
    let addrs = match inner.addrs.take() {
        // Another pool: nothing of the old one is ours any more (live containers keep theirs).
        Some(a) if a.pool == pool => a,
        Some(a) => {
            tracing::warn!(node = %node, old = %format!("{}/{}", a.pool, a.pool.block), new = %format!("{pool}/{}", pool.block), "the controller's container pool changed");
            NodeAddresses::new(&node, pool)
        }
        None => NodeAddresses::new(&node, pool),
    };
    inner.addrs = Some(addrs);
    let live = sync_locked(agent, &mut inner);
    let Inner { addrs, lent_to, .. } = &mut *inner;
    let Some(addrs) = addrs.as_mut() else {
        return Err(AgentError::Internal("address state vanished".into()));
    };
    addrs.set_blocks(lease.blocks.iter().copied());
    for a in released {
        if addrs.lent().contains(&a) {
            tracing::info!(node = %node, address = %a, container = ?lent_to.get(&a), "lent address released by the controller");
        }
        addrs.returned(a);
    }
    lent_to.retain(|a, _| addrs.lent().contains(a));
    let state = BlockState {
        mode: IpamMode::Leased,
        blocks: addrs.blocks().collect(),
        free: addrs.free() as u32,
        used: live.len() as u32,
        lent: addrs
            .lent()
            .iter()
            .map(|a| LentAddress {
                address: a.to_string(),
                container: lent_to.get(a).cloned().unwrap_or_default(),
            })
            .collect(),
        want_block: (addrs.free() as u32) < lease.low_water,
    };
    if state.blocks != before {
        let cidrs: Vec<String> = state.blocks.iter().map(|b| pool.block_cidr(*b)).collect();
        tracing::info!(node = %node, blocks = ?cidrs, free = state.free, "address blocks leased by the controller");
    }
    persist_locked(agent, &mut inner)?;
    drop(inner);
    agent.ipam.leased.notify_waiters();
    Ok(state)
}

#[cfg(test)]
mod tests;
