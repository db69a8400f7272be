//! Cluster-wide container addresses: blocks leased per node, addresses allocated locally.
//!
//! The container subnet is cut into blocks (e.g. /26). The controller leases blocks to nodes and
//! journals the leases ([`BlockTable`]); an agent allocates from its own blocks without a round
//! trip ([`NodeAddresses`]), so tasks start while the controller is down. A container keeps its
//! address when it moves: the address stays *lent* out of its owner's block until the owner hears
//! that it ended, and is never handed out meanwhile. A block returns to the pool only when its
//! node left and no live container holds an address of it.
//!
//! No two live containers share an address as long as (1) blocks have one owner at a time
//! ([`BlockTable`]), (2) an agent allocates only from its own blocks and never an address it has
//! lent ([`NodeAddresses`]), and (3) the end of a moved container is reported to the block's
//! owner before the owner reuses it (at-least-once delivery; [`NodeAddresses::returned`] is
//! idempotent). The simulation in the tests drives 10,000 containers over 100 nodes and checks it.
//!
//! Pure: no I/O, serde for the journal and the agent's state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Why an address or a block could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("invalid pool {subnet}/{prefix} with /{block} blocks: {why}")]
    BadPool {
        subnet: Ipv4Addr,
        prefix: u8,
        block: u8,
        why: &'static str,
    },
    #[error("every /{block} block of {pool} is leased")]
    PoolExhausted { pool: String, block: u8 },
    #[error("node {node} has no free address in its {blocks} block(s); it needs another block from the controller")]
    NodeExhausted { node: String, blocks: usize },
    #[error("{addr} is not in {pool}")]
    OutsidePool { addr: Ipv4Addr, pool: String },
    #[error("{addr} is already in use on {node}")]
    InUse { addr: Ipv4Addr, node: String },
    #[error("block {block} leased to {node} is not a block of {pool} (it has {blocks}); was the pool changed?")]
    BlockOutsidePool {
        block: BlockId,
        node: String,
        pool: String,
        blocks: u32,
    },
}

/// The container subnet and the size of its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub base: Ipv4Addr,
    pub prefix: u8,
    /// Prefix length of one block (`prefix` ≤ `block` ≤ 32).
    pub block: u8,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// A block by its index in the pool.
pub type BlockId = u32;

impl Pool {
    pub fn new(base: Ipv4Addr, prefix: u8, block: u8) -> Result<Pool, IpamError> {
        let bad = |why| IpamError::BadPool {
            subnet: base,
            prefix,
            block,
            why,
        };
        if prefix > 32 || block > 32 || block < prefix {
            return Err(bad("the block must be inside the pool"));
        }
        if block > 30 {
            return Err(bad("blocks smaller than /30 hold no usable address"));
        }
        if block - prefix > 24 {
            return Err(bad("more than 2^24 blocks"));
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        if u32::from(base) & !mask != 0 {
            return Err(bad("the base address has host bits set"));
        }
        Ok(Pool {
            base,
            prefix,
            block,
        })
    }

    pub fn blocks(&self) -> u32 {
        1 << (self.block - self.prefix)
    }

    fn block_size(&self) -> u32 {
        1 << (32 - self.block)
    }

    /// The block holding `addr`, if the pool does.
    pub fn block_of(&self, addr: Ipv4Addr) -> Option<BlockId> {
        let off = u32::from(addr).checked_sub(u32::from(self.base))?;
        let id = off / self.block_size();
        (id < self.blocks()).then_some(id)
    }

    /// Block `id` as `first-address/prefix`.
    pub fn block_cidr(&self, id: BlockId) -> String {
        let first = Ipv4Addr::from(u32::from(self.base) + id * self.block_size());
        format!("{first}/{}", self.block)
    }

    /// Whether every address of `self` is inside `outer` (an agent checks that the controller's
    /// pool is inside its own container subnet).
    pub fn within(&self, outer_base: Ipv4Addr, outer_prefix: u8) -> bool {
        let mask = if outer_prefix == 0 {
            0
        } else {
            u32::MAX << (32 - outer_prefix)
        };
        self.prefix >= outer_prefix && u32::from(self.base) & mask == u32::from(outer_base) & mask
    }

    /// The addresses of block `id` that containers may have: not the pool's network address,
    /// not the pool's last address (broadcast), all others (containers are /32s on-link).
    pub fn addresses(&self, id: BlockId) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.base) + id * self.block_size();
        let (net, last) = (
            u32::from(self.base),
            u32::from(self.base) + (self.blocks() * self.block_size() - 1),
        );
        (first..first + self.block_size())
            .filter(move |a| *a != net && *a != last)
            .map(Ipv4Addr::from)
    }
}

/// The controller's block leases (journaled: serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockTable {
    pub pool: Pool,
    /// Block → node that owns it.
    owners: BTreeMap<BlockId, String>,
}

impl BlockTable {
    pub fn new(pool: Pool) -> BlockTable {
        BlockTable {
            pool,
            owners: BTreeMap::new(),
        }
    }

    /// The table as journaled (block → node). A block the pool does not have is refused: the
    /// journal belongs to another pool.
    pub fn from_leases(
        pool: Pool,
        leases: impl IntoIterator<Item = (BlockId, String)>,
    ) -> Result<BlockTable, IpamError> {
        let mut t = BlockTable::new(pool);
        for (block, node) in leases {
            if block >= pool.blocks() {
                return Err(IpamError::BlockOutsidePool {
                    block,
                    node,
                    pool: pool.to_string(),
                    blocks: pool.blocks(),
                });
            }
            t.owners.insert(block, node);
        }
        Ok(t)
    }

    /// Every lease, block → node (what the controller journals).
    pub fn leases(&self) -> impl Iterator<Item = (BlockId, &str)> + '_ {
        self.owners.iter().map(|(b, n)| (*b, n.as_str()))
    }

    pub fn owner(&self, id: BlockId) -> Option<&str> {
        self.owners.get(&id).map(String::as_str)
    }

    pub fn blocks_of(&self, node: &str) -> Vec<BlockId> {
        self.owners
            .iter()
            .filter(|(_, n)| n.as_str() == node)
            .map(|(b, _)| *b)
            .collect()
    }

    /// Leases a free block to `node`: the lowest free one, so that a journal replay gives the
    /// same answer.
    pub fn lease(&mut self, node: &str) -> Result<BlockId, IpamError> {
        let id = (0..self.pool.blocks())
            .find(|b| !self.owners.contains_key(b))
            .ok_or_else(|| IpamError::PoolExhausted {
                pool: self.pool.to_string(),
                block: self.pool.block,
            })?;
        self.owners.insert(id, node.to_string());
        Ok(id)
    }

    /// Like [`BlockTable::lease`], but never a block holding an address in `live`: a live
    /// container (one that moved off a reclaimed block, or that a returning agent still runs)
    /// keeps its address, so its block must not go to another node.
    pub fn lease_clear_of(
        &mut self,
        node: &str,
        live: &BTreeSet<Ipv4Addr>,
    ) -> Result<BlockId, IpamError> {
        let busy: BTreeSet<BlockId> = live.iter().filter_map(|a| self.pool.block_of(*a)).collect();
        let id = (0..self.pool.blocks())
            .find(|b| !self.owners.contains_key(b) && !busy.contains(b))
            .ok_or_else(|| IpamError::PoolExhausted {
                pool: self.pool.to_string(),
                block: self.pool.block,
            })?;
        self.owners.insert(id, node.to_string());
        Ok(id)
    }

    /// Records that `node` holds `block` (an agent reported a block the journal lacks, e.g.
    /// after the journal was lost). Refused with the current owner when another node has it.
    pub fn adopt(&mut self, block: BlockId, node: &str) -> Result<bool, String> {
        if block >= self.pool.blocks() {
            return Err(format!("no block {block} in {}", self.pool));
        }
        match self.owners.get(&block) {
            Some(n) if n == node => Ok(false),
            Some(n) => Err(n.clone()),
            None => {
                self.owners.insert(block, node.to_string());
                Ok(true)
            }
        }
    }

    /// The first address of `block` and its prefix, e.g. `198.19.0.64/26`.
    pub fn block_cidr(&self, block: BlockId) -> String {
        self.pool.block_cidr(block)
    }

    /// Nodes holding at least one block.
    pub fn nodes(&self) -> BTreeSet<&str> {
        self.owners.values().map(String::as_str).collect()
    }

    /// Gives `block` back to the pool whoever holds it (a lease whose journal write failed).
    pub fn release(&mut self, block: BlockId) -> Option<String> {
        self.owners.remove(&block)
    }

    /// A node left the cluster: its blocks return to the pool, except those with an address a
    /// live container still holds (it moved elsewhere); those stay leased to the departed node
    /// until a later call finds them empty. Returns the blocks freed.
    pub fn reclaim(&mut self, node: &str, live: &BTreeSet<Ipv4Addr>) -> Vec<BlockId> {
        let busy: BTreeSet<BlockId> = live.iter().filter_map(|a| self.pool.block_of(*a)).collect();
        let freed: Vec<BlockId> = self
            .blocks_of(node)
            .into_iter()
            .filter(|b| !busy.contains(b))
            .collect();
        for b in &freed {
            self.owners.remove(b);
        }
        freed
    }
}

/// One agent's addresses (persisted in its state directory: serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddresses {
    pub node: String,
    pub pool: Pool,
    blocks: BTreeSet<BlockId>,
    /// Addresses of the containers running here (from any block).
    live: BTreeSet<Ipv4Addr>,
    /// Addresses of this node's blocks held by containers that moved away.
    lent: BTreeSet<Ipv4Addr>,
}

impl NodeAddresses {
    pub fn new(node: &str, pool: Pool) -> NodeAddresses {
        NodeAddresses {
            node: node.to_string(),
            pool,
            blocks: BTreeSet::new(),
            live: BTreeSet::new(),
            lent: BTreeSet::new(),
        }
    }

    /// A block the controller leased to this node.
    pub fn add_block(&mut self, id: BlockId) {
        self.blocks.insert(id);
    }

    pub fn blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.blocks.iter().copied()
    }

    /// The blocks the controller says this node holds now (it sends the whole set each time).
    /// A block that is dropped keeps nothing here: addresses of it that containers here still
    /// hold stay live (and the controller does not lease a block with a live address).
    pub fn set_blocks(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        self.blocks = blocks
            .into_iter()
            .filter(|b| *b < self.pool.blocks())
            .collect();
        let blocks = self.blocks.clone();
        let pool = self.pool;
        self.lent
            .retain(|a| pool.block_of(*a).is_some_and(|b| blocks.contains(&b)));
    }

    /// Brings the live set up to date from what the node runs now (the agent's containers,
    /// arrivals and tasks being prepared): an address of our blocks that was live and left the
    /// set because its container moved away (`moved`) becomes lent (only on that transition: a
    /// record of the move that outlives the release does not lend it again); an address of ours
    /// that is live here again is ours, not lent.
    pub fn sync(&mut self, live: BTreeSet<Ipv4Addr>, moved: &BTreeSet<Ipv4Addr>) {
        for a in moved {
            if self.live.contains(a) && !live.contains(a) && self.owns(*a) {
                self.lent.insert(*a);
            }
        }
        self.lent.retain(|a| !live.contains(a));
        self.live = live;
    }

    /// Addresses of our blocks that a new container could have now.
    pub fn free(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| self.pool.addresses(*b))
            .filter(|a| !self.live.contains(a) && !self.lent.contains(a))
            .count()
    }

    fn owns(&self, a: Ipv4Addr) -> bool {
        self.pool
            .block_of(a)
            .is_some_and(|b| self.blocks.contains(&b))
    }

    /// An address for a new container: the lowest one of this node's blocks that no container
    /// here holds and none that moved away holds.
    pub fn allocate(&mut self) -> Result<Ipv4Addr, IpamError> {
        let free = self
            .blocks
            .iter()
            .flat_map(|b| self.pool.addresses(*b))
            .find(|a| !self.live.contains(a) && !self.lent.contains(a))
            .ok_or_else(|| IpamError::NodeExhausted {
                node: self.node.clone(),
                blocks: self.blocks.len(),
            })?;
        self.live.insert(free);
        Ok(free)
    }

    /// A container of ours ended here: its address is free again if the block is ours, or must
    /// be returned to the block's owner (`Some(addr)`: tell it, see [`NodeAddresses::returned`]).
    pub fn ended(&mut self, addr: Ipv4Addr) -> Option<Ipv4Addr> {
        self.live.remove(&addr);
        (!self.owns(addr)).then_some(addr)
    }

    /// A container left for another node, keeping its address.
    pub fn moved_away(&mut self, addr: Ipv4Addr) {
        if self.live.remove(&addr) && self.owns(addr) {
            self.lent.insert(addr);
        }
    }

    /// A container arrived with its address (from any block). Refused if a container here holds
    /// it, or if it is one of ours that was never lent (it would then be handed out twice).
    pub fn arrived(&mut self, addr: Ipv4Addr) -> Result<(), IpamError> {
        if self.pool.block_of(addr).is_none() {
            return Err(IpamError::OutsidePool {
                addr,
                pool: self.pool.to_string(),
            });
        }
        if self.live.contains(&addr) {
            return Err(IpamError::InUse {
                addr,
                node: self.node.clone(),
            });
        }
        // One of ours coming back: it is ours again, not lent.
        self.lent.remove(&addr);
        self.live.insert(addr);
        Ok(())
    }

    /// Another node reports that a container holding one of our addresses ended there.
    /// Idempotent (reports may be repeated).
    pub fn returned(&mut self, addr: Ipv4Addr) {
        self.lent.remove(&addr);
    }

    pub fn live(&self) -> &BTreeSet<Ipv4Addr> {
        &self.live
    }

    pub fn lent(&self) -> &BTreeSet<Ipv4Addr> {
        &self.lent
    }
}

pub mod sim;

#[cfg(test)]
mod tests;
