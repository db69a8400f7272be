//! Container address blocks: the controller leases each agent blocks of `[ipam] subnet`
//! (`rebalancer_ipam::BlockTable`), journals every lease before the agent hears of it, and
//! sends each agent that answered a poll its whole set (`address-blocks`), so a reconnected or
//! restarted agent has its blocks again at once. An agent asks for another block when it runs
//! low (`want_block`); it allocates addresses itself (the agent's `agent/ipam.rs`).
//!
//! Two things need the whole cluster's view, which only the controller has:
//! - **Lent addresses.** A container that moved keeps its address; its block's owner keeps it
//!   lent until the controller releases it. The controller releases an address once two
//!   complete rounds of polls (every member agent answered) saw no live container with that
//!   address or that container id, and no migration of the container is in flight: a container
//!   between its source's commit and the destination's listing is covered by the second round.
//! - **Reclaim.** A node that left (no longer in Slurm or in `[agents.nodes]`, or whose agent
//!   has not answered for `[ipam] grace_s`) gives its blocks back once no live container the
//!   controller knows of (on the nodes still members) holds an address of them. The containers
//!   last listed by a departed node count as gone: `grace_s` must be longer than an outage
//!   after which a node comes back with its containers still running.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rebalancer_ipam::BlockTable;
use rebalancer_proto::control::BlockStatus;
use rebalancer_proto::{
    BlockLease, BlockState, ContainerState, ErrorCode, ErrorReply, IpamMode, Millis, Reply, Request,
};
use tracing::{debug, error, info, warn};

use crate::agents::AgentError;
pub use crate::config::ipam::{Invalid, IpamConfig, RawIpam};
use crate::daemon::Controller;
use crate::journal::Journal;

/// Complete rounds in which a lent address must be seen unused before it is released.
pub const QUIET_ROUNDS: u32 = 2;

/// How long an agent that does not know `address-blocks` is left alone before it is asked again.
pub const UNSUPPORTED_RETRY: Duration = Duration::from_secs(600);

/// A node's blocks and last answer, for views (`show blocks` in logs and docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBlocks {
    pub node: String,
    pub blocks: Vec<String>,
    pub reply: Option<BlockState>,
}

#[derive(Debug)]
struct Inner {
    table: BlockTable,
    /// When each node's agent last answered (the controller's start for nodes not seen yet).
    last_seen: BTreeMap<String, Instant>,
    /// Lent addresses each node reported last: address → container.
    lent: BTreeMap<String, BTreeMap<Ipv4Addr, String>>,
    /// Complete rounds in a row in which a lent address was seen unused.
    quiet: BTreeMap<Ipv4Addr, u32>,
    /// Each node's last `address-blocks` answer.
    replies: BTreeMap<String, BlockState>,
    /// Nodes whose agent does not know `address-blocks` (an earlier release), and since when:
    /// asked again after [`UNSUPPORTED_RETRY`] (it may have been upgraded).
    unsupported: BTreeMap<String, Instant>,
    /// The last failure per node, so that one that repeats every poll is logged once.
    failed: BTreeMap<String, String>,
    /// When each block was leased (unix ms), as journaled; absent for leases journaled before
    /// the time was kept.
    leased_at: BTreeMap<u32, Millis>,
}

/// The controller's leases (a field of [`Controller`]).
#[derive(Debug)]
pub struct Leases {
    pub cfg: IpamConfig,
    started: Instant,
    inner: Mutex<Inner>,
}

/// What one round knows of the cluster (built from the controller's views).
#[derive(Debug, Default, Clone)]
pub struct Round {
    /// Nodes whose agent answered this round's poll.
    pub answered: BTreeSet<String>,
    /// Nodes that are members (Slurm or config); `None`: membership unknown (no Slurm view
    /// and no `[agents.nodes]`), nobody leaves on that ground.
    pub members: Option<BTreeSet<String>>,
    /// Every node the controller polls.
    pub polled: BTreeSet<String>,
    /// Live containers by node: (address, container id).
    pub live: BTreeMap<String, Vec<(Ipv4Addr, String)>>,
    /// Containers with a migration in flight.
    pub in_flight: BTreeSet<String>,
}

impl Leases {
    /// The leases as journaled. A journal of another pool is refused: its blocks would be
    /// wrong, and leasing over them could give one address twice.
    pub fn load(cfg: IpamConfig, journal: &Journal) -> Result<Leases, String> {
        let leases = journal
            .block_leases()
            .map_err(|e| format!("cannot read the block leases from the journal: {e}"))?;
        let leased_at = journal
            .block_lease_times()
            .map_err(|e| format!("cannot read the block lease times from the journal: {e}"))?;
        let table = BlockTable::from_leases(cfg.pool, leases).map_err(|e| {
            format!(
                "{e}: the journal's block leases were made with another [ipam] subnet or \
                 block_prefix; restore the old values (or start with a new journal once no \
                 container runs)"
            )
        })?;
        Ok(Leases {
            cfg,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                table,
                last_seen: BTreeMap::new(),
                lent: BTreeMap::new(),
                quiet: BTreeMap::new(),
                replies: BTreeMap::new(),
                unsupported: BTreeMap::new(),
                failed: BTreeMap::new(),
                leased_at,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Block → node, as `first/prefix`.
    pub fn view(&self) -> Vec<NodeBlocks> {
        let inner = self.lock();
        let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (b, n) in inner.table.leases() {
            by.entry(n.to_string())
                .or_default()
                .push(inner.table.block_cidr(b));
        }
        by.into_iter()
            .map(|(node, blocks)| NodeBlocks {
                reply: inner.replies.get(&node).cloned(),
                node,
                blocks,
            })
            .collect()
    }

    pub fn blocks_of(&self, node: &str) -> Vec<u32> {
        self.lock().table.blocks_of(node)
    }

    /// The node's blocks as `first/prefix` (`rebalctl show nodes --json`: `address_blocks`).
    pub fn cidrs_of(&self, node: &str) -> Vec<String> {
        let inner = self.lock();
        inner
            .table
            .blocks_of(node)
            .into_iter()
            .map(|b| inner.table.block_cidr(b))
            .collect()
    }

    /// Every leased block, in block order (`rebalctl show blocks`): its node, when it was
    /// leased, the live containers holding one of its addresses (`live`: every address the
    /// controller knows live, on any node) and its addresses its node reported lent.
    pub fn statuses(&self, live: &BTreeSet<Ipv4Addr>) -> Vec<BlockStatus> {
        let inner = self.lock();
        let pool = self.cfg.pool;
        let mut live_in: BTreeMap<u32, u32> = BTreeMap::new();
        for b in live.iter().filter_map(|a| pool.block_of(*a)) {
            *live_in.entry(b).or_default() += 1;
        }
        inner
            .table
            .leases()
            .map(|(b, node)| BlockStatus {
                block: inner.table.block_cidr(b),
                node: node.to_string(),
                leased_at: inner.leased_at.get(&b).copied(),
                addresses: pool.addresses(b).count() as u32,
                live: live_in.get(&b).copied().unwrap_or(0),
                lent: inner.lent.get(node).map_or(0, |m| {
                    m.keys().filter(|a| pool.block_of(**a) == Some(b)).count() as u32
                }),
            })
            .collect()
    }

    /// Nodes that left: not a member any more, or unanswered past the grace.
    fn departed(&self, inner: &Inner, round: &Round, now: Instant) -> BTreeSet<String> {
        inner
            .table
            .nodes()
            .into_iter()
            .filter(|n| {
                let gone = round.members.as_ref().is_some_and(|m| !m.contains(*n));
                let seen = inner.last_seen.get(*n).copied().unwrap_or(self.started);
                gone || now.duration_since(seen) > self.cfg.grace
            })
            .map(str::to_string)
            .collect()
    }

    /// Reclaims what departed nodes hold and decides what to release; returns, per answering
    /// node, the lease to send. Journals the reclaims. Pure apart from the journal.
    pub fn plan(
        &self,
        round: &Round,
        journal: &Journal,
        now: Instant,
    ) -> BTreeMap<String, BlockLease> {
        let mut inner = self.lock();
        for n in &round.answered {
            inner.last_seen.insert(n.clone(), now);
        }
        let departed = self.departed(&inner, round, now);
        // Live on the nodes still members: what a departed node listed counts as gone.
        let mut live: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let mut live_ids: BTreeSet<&str> = BTreeSet::new();
        for (node, cs) in &round.live {
            if departed.contains(node) {
                continue;
            }
            for (a, id) in cs {
                live.insert(*a);
                live_ids.insert(id.as_str());
            }
        }
        for node in &departed {
            let freed = inner.table.reclaim(node, &live);
            for b in &freed {
                let cidr = inner.table.block_cidr(*b);
                match journal.remove_block_lease(*b) {
                    Ok(_) => {
                        inner.leased_at.remove(b);
                        info!(node = %node, block = %cidr, "address block of a departed node reclaimed")
                    }
                    Err(e) => {
                        // Kept leased in the table too: a reclaim the journal lacks would be
                        // undone by a restart, and the block might be leased twice meanwhile.
                        error!(node = %node, block = %cidr, error = %e, "cannot journal a reclaim; the block stays leased");
                        let _ = inner.table.adopt(*b, node);
                    }
                }
            }
            if inner.table.blocks_of(node).is_empty() {
                inner.lent.remove(node);
                inner.replies.remove(node);
            }
        }
        // Lent addresses: quiet for QUIET_ROUNDS complete rounds → released.
        let members_answered = round
            .polled
            .iter()
            .filter(|n| !departed.contains(*n))
            .all(|n| round.answered.contains(n));
        let lent: Vec<(Ipv4Addr, String)> = inner
            .lent
            .values()
            .flat_map(|m| m.iter().map(|(a, c)| (*a, c.clone())))
            .collect();
        let mut quiet = BTreeMap::new();
        for (a, c) in lent {
            let unused = members_answered
                && !live.contains(&a)
                && !live_ids.contains(c.as_str())
                && !round.in_flight.contains(&c);
            if unused {
                quiet.insert(a, inner.quiet.get(&a).copied().unwrap_or(0) + 1);
            }
        }
        inner.quiet = quiet;
        let mut out = BTreeMap::new();
        for node in &round.answered {
            let skip = inner
                .unsupported
                .get(node)
                .is_some_and(|t| now.duration_since(*t) < UNSUPPORTED_RETRY);
            if departed.contains(node) || skip {
                continue;
            }
            let released: Vec<String> = inner
                .lent
                .get(node)
                .map(|m| {
                    m.keys()
                        .filter(|a| inner.quiet.get(*a).is_some_and(|q| *q >= QUIET_ROUNDS))
                        .map(|a| a.to_string())
                        .collect()
                })
                .unwrap_or_default();
            out.insert(node.clone(), self.lease_for(&inner, node, released));
        }
        out
    }

    fn lease_for(&self, inner: &Inner, node: &str, released: Vec<String>) -> BlockLease {
        BlockLease {
            pool: self.cfg.pool.to_string(),
            block_prefix: self.cfg.pool.block,
            blocks: inner.table.blocks_of(node),
            released,
            low_water: self.cfg.low_water,
        }
    }

    /// An agent's answer: note its lent addresses; when it wants a block, lease one (journaled
    /// first) and return the lease to send again. `live`: every address the controller knows
    /// live, so that no block holding one is leased.
    pub fn answered(
        &self,
        node: &str,
        reply: BlockState,
        live: &BTreeSet<Ipv4Addr>,
        journal: &Journal,
    ) -> Option<BlockLease> {
        let mut inner = self.lock();
        if reply.mode == IpamMode::Local {
            inner.replies.insert(node.to_string(), reply);
            return None;
        }
        let lent: BTreeMap<Ipv4Addr, String> = reply
            .lent
            .iter()
            .filter_map(|l| Some((l.address.parse().ok()?, l.container.clone())))
            .collect();
        inner.lent.insert(node.to_string(), lent);
        let want = reply.want_block;
        inner.replies.insert(node.to_string(), reply);
        if !want {
            return None;
        }
        let b = match inner.table.lease_clear_of(node, live) {
            Ok(b) => b,
            Err(e) => {
                warn!(node = %node, error = %e, "the agent wants another address block and none is free");
                return None;
            }
        };
        let cidr = inner.table.block_cidr(b);
        let at = rebalancer_proto::now_millis();
        if let Err(e) = journal.put_block_lease_at(b, node, at) {
            error!(node = %node, block = %cidr, error = %e, "cannot journal the lease; not leased");
            inner.table.release(b);
            return None;
        }
        inner.leased_at.insert(b, at);
        info!(node = %node, block = %cidr, "address block leased");
        Some(self.lease_for(&inner, node, Vec::new()))
    }

    /// A failed exchange; true when it differs from the node's last one (worth a warning).
    fn failed(&self, node: &str, why: String) -> bool {
        self.lock().failed.insert(node.to_string(), why.clone()) != Some(why)
    }

    fn succeeded(&self, node: &str) {
        if self.lock().failed.remove(node).is_some() {
            info!(node = %node, "address blocks sent again");
        }
    }

    /// The agent does not know `address-blocks` (an earlier release).
    fn unsupported(&self, node: &str, why: &str) {
        let first = self
            .lock()
            .unsupported
            .insert(node.to_string(), Instant::now())
            .is_none();
        if first {
            warn!(node = %node, "the agent does not take address blocks ({why}); it picks addresses alone");
        }
    }
}

/// This round's view, from the controller's state after a poll.
fn round(ctl: &Controller) -> Round {
    let names = ctl.node_names();
    let st = ctl.state();
    let mut r = Round::default();
    // Membership is known from Slurm once its node list is loaded (before that, nobody leaves
    // on that ground), or from `[agents.nodes]` when Slurm is off.
    let mut members: BTreeSet<String> = ctl.cfg.agents.nodes.keys().cloned().collect();
    members.extend(st.nodes.keys().cloned());
    let known = if ctl.cfg.slurm.enabled {
        !st.nodes.is_empty()
    } else {
        !members.is_empty()
    };
    r.members = known.then_some(members);
    for n in names {
        if ctl.agent(&n).is_none() {
            continue;
        }
        let view = st.agents.get(&n);
        if view.is_some_and(|v| matches!(v.health, Some(Ok(())))) {
            r.answered.insert(n.clone());
        }
        if let Some(v) = view {
            let cs = v
                .containers
                .iter()
                .filter(|c| {
                    !matches!(
                        c.state,
                        ContainerState::Exited | ContainerState::MigratedAway
                    )
                })
                .filter_map(|c| Some((c.address.parse().ok()?, c.id.clone())))
                .collect();
            r.live.insert(n.clone(), cs);
        }
        r.polled.insert(n);
    }
    r.in_flight = st
        .in_flight
        .values()
        .map(|f| f.decision.container.clone())
        .collect();
    r
}

/// `rebalctl show blocks [node=N]`: the leased blocks as the controller sees them now.
pub fn show(ctl: &Controller, node: Option<&str>) -> Result<Vec<BlockStatus>, ErrorReply> {
    let fail = |code, message: String| ErrorReply { code, message };
    let leases = match ctl.ipam.as_ref() {
        Some(l) if l.cfg.enabled => l,
        Some(_) => {
            return Err(fail(
                ErrorCode::Unsupported,
                "address blocks are off ([ipam] enabled = false): agents pick addresses alone"
                    .into(),
            ))
        }
        None => {
            return Err(fail(
                ErrorCode::Internal,
                "no address blocks are leased: the journal's block leases could not be loaded \
                 (the controller's log says why)"
                    .into(),
            ))
        }
    };
    let live: BTreeSet<Ipv4Addr> = round(ctl)
        .live
        .values()
        .flatten()
        .map(|(a, _)| *a)
        .collect();
    let mut blocks = leases.statuses(&live);
    if let Some(n) = node {
        blocks.retain(|b| b.node == n);
        if blocks.is_empty() {
            let message = if ctl.node_names().iter().any(|k| k == n) {
                format!(
                    "no address block is leased to {n} (its agent was not reached yet, or it \
                     takes addresses alone: ipam = \"local\")"
                )
            } else {
                format!("no node named '{n}'")
            };
            return Err(fail(ErrorCode::NotFound, message));
        }
    }
    Ok(blocks)
}

/// After each poll: reclaim, release, and send every answering agent its blocks.
pub async fn sync(ctl: &Arc<Controller>) {
    let Some(leases) = ctl.ipam.as_ref() else {
        return;
    };
    if !leases.cfg.enabled {
        return;
    }
    let r = round(ctl);
    let live: Arc<BTreeSet<Ipv4Addr>> =
        Arc::new(r.live.values().flatten().map(|(a, _)| *a).collect());
    let plan = leases.plan(&r, &ctl.journal, Instant::now());
    // Bounded fan-out, as the poll: one slow agent must not hold the others' blocks back.
    let permits = Arc::new(tokio::sync::Semaphore::new(EXCHANGE_CONCURRENCY));
    let mut tasks = Vec::new();
    for (node, lease) in plan {
        let (ctl, live, permits) = (ctl.clone(), live.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            exchange(&ctl, &node, lease, &live).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Agents sent their blocks at the same time.
const EXCHANGE_CONCURRENCY: usize = 64;

/// Sends one node its lease; at most two exchanges: the set, then the set with the block it
/// asked for.
async fn exchange(ctl: &Controller, node: &str, lease: BlockLease, live: &BTreeSet<Ipv4Addr>) {
    let (Some(leases), Some(agent)) = (ctl.ipam.as_ref(), ctl.agent(node)) else {
        return;
    };
    let mut next = Some(lease);
    for _ in 0..2 {
        let Some(lease) = next.take() else { break };
        match agent.call(Request::AddressBlocks { lease }).await {
            Ok(Reply::AddressBlocks { blocks }) => {
                debug!(node = %node, blocks = ?blocks.blocks, free = blocks.free, lent = blocks.lent.len(), "address blocks sent");
                leases.succeeded(node);
                next = leases.answered(node, blocks, live, &ctl.journal);
            }
            Ok(_) => leases.unsupported(node, "unexpected reply"),
            // An agent of an earlier release: unknown op (or a stand-in that does not
            // implement it).
            Err(AgentError::Remote(e))
                if e.code == ErrorCode::Unsupported
                    || (e.code == ErrorCode::BadRequest
                        && e.message.contains("address-blocks")) =>
            {
                leases.unsupported(node, &e.message)
            }
            Err(e) => {
                let why = e.to_string();
                if leases.failed(node, why.clone()) {
                    warn!(node = %node, error = %why, "address blocks not sent");
                } else {
                    debug!(node = %node, error = %why, "address blocks not sent");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
