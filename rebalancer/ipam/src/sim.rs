//! A simulated cluster: the controller's [`BlockTable`], one [`NodeAddresses`] per agent, and
//! containers that start, move, end, and nodes that leave and join, driven by a seed.
//!
//! It plays the protocol the daemons speak: an agent allocates from its own blocks with no
//! round trip and asks for another block when it runs low (`low_water`); a moved container keeps
//! its address, lent out of its owner's block; the controller, which sees every node, frees a
//! lent address at the owner only after the container ended (late, sometimes twice); a node
//! that leaves has its blocks reclaimed once no live container holds an address of them. Every
//! address handed out is checked against every live container: a collision is counted, not
//! hidden. `cargo run -p rebalancer-ipam --example ipam-sim` prints the figures.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::{BlockTable, IpamError, NodeAddresses, Pool};

/// What to simulate.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub nodes: usize,
    /// Containers started over the whole run.
    pub containers: u64,
    pub seed: u64,
    pub pool: Pool,
    /// An agent asks for another block when fewer addresses than this are free in its blocks.
    pub low_water: usize,
    /// A node leaves (its containers move off, or end) and a new one joins every this many
    /// container starts; 0: nodes never leave.
    pub churn_every: u64,
}

impl SimConfig {
    /// 10,000 containers over 100 nodes in a /16 of /26 blocks, a node leaving every 200 starts.
    pub fn standard(seed: u64) -> SimConfig {
        SimConfig {
            nodes: 100,
            containers: 10_000,
            seed,
            pool: Pool {
                base: Ipv4Addr::new(198, 19, 0, 0),
                prefix: 16,
                block: 26,
            },
            low_water: 4,
            churn_every: 200,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimFigures {
    pub steps: u64,
    pub started: u64,
    pub moved: u64,
    pub ended: u64,
    pub nodes_left: u64,
    pub nodes_joined: u64,
    pub blocks_leased: u64,
    pub blocks_reclaimed: u64,
    /// Releases the controller sent to a block's owner (some twice on purpose).
    pub releases: u64,
    /// Starts refused because the pool had no block left for a node.
    pub refused: u64,
    /// Most containers live at once.
    pub max_live: usize,
    /// An address handed out, or arriving, while another live container held it.
    pub collisions: u64,
    /// Inconsistencies between a node's view and the cluster's (each one is a bug).
    pub violations: Vec<String>,
    pub elapsed: Duration,
}

impl std::fmt::Display for SimFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} containers started, {} moves, {} ended, {} nodes left / {} joined, \
             {} blocks leased, {} reclaimed, {} releases, {} refused, max {} live, \
             {} collisions, {} violations, {} steps in {:.1} ms",
            self.started,
            self.moved,
            self.ended,
            self.nodes_left,
            self.nodes_joined,
            self.blocks_leased,
            self.blocks_reclaimed,
            self.releases,
            self.refused,
            self.max_live,
            self.collisions,
            self.violations.len(),
            self.steps,
            self.elapsed.as_secs_f64() * 1e3
        )
    }
}

/// xorshift64*: reproducible from a seed, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

struct Cluster {
    cfg: SimConfig,
    table: BlockTable,
    /// `None`: the slot's node left and no one joined in its place yet.
    nodes: Vec<Option<NodeAddresses>>,
    /// The truth: address → slot of the node whose container holds it.
    live: BTreeMap<Ipv4Addr, usize>,
    /// Releases in flight from the controller: (node name, address, step due).
    mail: VecDeque<(String, Ipv4Addr, u64)>,
    /// Nodes that left with blocks still leased (a moved container holds an address of them).
    departed: BTreeSet<String>,
    generation: u64,
    rng: Rng,
    fig: SimFigures,
}

/// Runs the simulation to `cfg.containers` starts and returns what happened.
pub fn run(cfg: SimConfig) -> SimFigures {
    let t0 = Instant::now();
    let mut c = Cluster {
        cfg,
        table: BlockTable::new(cfg.pool),
        nodes: (0..cfg.nodes)
            .map(|i| Some(NodeAddresses::new(&format!("n{i}"), cfg.pool)))
            .collect(),
        live: BTreeMap::new(),
        mail: VecDeque::new(),
        departed: BTreeSet::new(),
        generation: 0,
        // splitmix64 of the seed: nearby seeds give unrelated runs (and never the zero state).
        rng: Rng(splitmix(cfg.seed)),
        fig: SimFigures::default(),
    };
    while c.fig.started + c.fig.refused < cfg.containers {
        c.step();
        if c.fig.steps.is_multiple_of(997) {
            c.check();
        }
    }
    // Let every release arrive and every container end: nothing may stay lent or leased.
    while let Some(&a) = c.live.keys().next() {
        c.end(a);
    }
    while !c.mail.is_empty() {
        c.deliver(u64::MAX);
    }
    c.reclaim_departed();
    c.check();
    for n in c.nodes.iter().flatten() {
        if let Some(a) = n.lent().iter().next() {
            c.fig
                .violations
                .push(format!("{a} still lent by {} after every end", n.node));
        }
    }
    if !c.departed.is_empty() {
        c.fig.violations.push(format!(
            "blocks of departed nodes {:?} not reclaimed with nothing live",
            c.departed
        ));
    }
    c.fig.elapsed = t0.elapsed();
    c.fig
}

impl Cluster {
    fn present(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_some())
            .collect()
    }

    fn live_set(&self) -> BTreeSet<Ipv4Addr> {
        self.live.keys().copied().collect()
    }

    /// A live address picked at random: the first at or after a random point of the pool.
    fn pick_live(&mut self) -> Option<Ipv4Addr> {
        let span = self.cfg.pool.blocks() as u64 * (1u64 << (32 - self.cfg.pool.block));
        let at = Ipv4Addr::from(u32::from(self.cfg.pool.base) + (self.rng.next() % span) as u32);
        self.live
            .range(at..)
            .next()
            .or_else(|| self.live.iter().next())
            .map(|(a, _)| *a)
    }

    /// The agent asks for a block (it has none left, or is below its low-water mark).
    fn lease_to(&mut self, i: usize) -> bool {
        let live = self.live_set();
        let Some(n) = self.nodes[i].as_mut() else {
            return false;
        };
        match self.table.lease_clear_of(&n.node, &live) {
            Ok(b) => {
                let mut blocks: Vec<_> = n.blocks().collect();
                blocks.push(b);
                n.set_blocks(blocks);
                self.fig.blocks_leased += 1;
                true
            }
            Err(_) => false,
        }
    }

    fn start(&mut self, i: usize) {
        let Some(n) = self.nodes[i].as_mut() else {
            return;
        };
        let a = match n.allocate() {
            Ok(a) => a,
            Err(IpamError::NodeExhausted { .. }) => {
                if !self.lease_to(i) {
                    self.fig.refused += 1;
                    return;
                }
                match self.nodes[i].as_mut().map(NodeAddresses::allocate) {
                    Some(Ok(a)) => a,
                    _ => {
                        self.fig.refused += 1;
                        return;
                    }
                }
            }
            Err(e) => {
                self.fig.violations.push(format!("allocate: {e}"));
                return;
            }
        };
        if self.live.insert(a, i).is_some() {
            self.fig.collisions += 1;
        }
        self.fig.started += 1;
        self.fig.max_live = self.fig.max_live.max(self.live.len());
        if self.nodes[i]
            .as_ref()
            .is_some_and(|n| n.free() < self.cfg.low_water)
        {
            self.lease_to(i);
        }
    }

    fn move_to(&mut self, a: Ipv4Addr, to: usize) {
        let Some(&from) = self.live.get(&a) else {
            return;
        };
        if from == to || self.nodes[to].is_none() {
            return;
        }
        if let Some(n) = self.nodes[from].as_mut() {
            n.moved_away(a);
        }
        match self.nodes[to].as_mut().map(|n| n.arrived(a)) {
            Some(Ok(())) => {}
            Some(Err(IpamError::InUse { .. })) => self.fig.collisions += 1,
            Some(Err(e)) => self.fig.violations.push(format!("arrival of {a}: {e}")),
            None => {}
        }
        self.live.insert(a, to);
        self.fig.moved += 1;
    }

    fn end(&mut self, a: Ipv4Addr) {
        let Some(at) = self.live.remove(&a) else {
            return;
        };
        self.fig.ended += 1;
        let foreign = self.nodes[at].as_mut().and_then(|n| n.ended(a));
        // The controller sees the end and tells the block's owner, late and maybe twice.
        if let Some(addr) = foreign {
            if let Some(owner) = self
                .cfg
                .pool
                .block_of(addr)
                .and_then(|b| self.table.owner(b))
            {
                let due = self.fig.steps + self.rng.below(50) as u64;
                self.mail.push_back((owner.to_string(), addr, due));
                if self.rng.below(4) == 0 {
                    self.mail.push_back((owner.to_string(), addr, due + 7));
                }
            }
        }
    }

    /// Delivers the releases due by `now` (in order of sending; late ones wait their turn).
    fn deliver(&mut self, now: u64) {
        while let Some((node, addr, due)) = self.mail.front().cloned() {
            if due > now {
                return;
            }
            self.mail.pop_front();
            // The controller frees only what no live container holds (it sees every node).
            if self.live.contains_key(&addr) {
                continue;
            }
            if let Some(n) = self.nodes.iter_mut().flatten().find(|n| n.node == node) {
                n.returned(addr);
                self.fig.releases += 1;
            }
        }
    }

    fn reclaim_departed(&mut self) {
        if self.departed.is_empty() {
            return;
        }
        // Only the live addresses in departed nodes' blocks matter: one pass over the live set.
        let blocks: BTreeSet<_> = self
            .departed
            .iter()
            .flat_map(|n| self.table.blocks_of(n))
            .collect();
        let live: BTreeSet<Ipv4Addr> = self
            .live
            .keys()
            .filter(|a| {
                self.cfg
                    .pool
                    .block_of(**a)
                    .is_some_and(|b| blocks.contains(&b))
            })
            .copied()
            .collect();
        let departed: Vec<String> = self.departed.iter().cloned().collect();
        for name in departed {
            self.fig.blocks_reclaimed += self.table.reclaim(&name, &live).len() as u64;
            if self.table.blocks_of(&name).is_empty() {
                self.departed.remove(&name);
            }
        }
    }

    /// A node leaves: its containers move to other nodes (most) or end, then its agent is gone.
    /// Another node joins in its slot with no block.
    fn churn(&mut self) {
        let present = self.present();
        if present.len() < 3 {
            return;
        }
        let i = present[self.rng.below(present.len())];
        let mine: Vec<Ipv4Addr> = self
            .live
            .iter()
            .filter(|(_, at)| **at == i)
            .map(|(a, _)| *a)
            .collect();
        for a in mine {
            if self.rng.below(4) == 0 {
                self.end(a);
            } else {
                let mut to = present[self.rng.below(present.len())];
                if to == i {
                    to = present
                        [(present.iter().position(|p| *p == i).unwrap_or(0) + 1) % present.len()];
                }
                self.move_to(a, to);
            }
        }
        let Some(gone) = self.nodes[i].take() else {
            return;
        };
        self.fig.nodes_left += 1;
        self.departed.insert(gone.node.clone());
        self.reclaim_departed();
        self.generation += 1;
        self.nodes[i] = Some(NodeAddresses::new(
            &format!("n{i}.{}", self.generation),
            self.cfg.pool,
        ));
        self.fig.nodes_joined += 1;
    }

    fn step(&mut self) {
        self.fig.steps += 1;
        let present = self.present();
        match self.rng.below(20) {
            0..=7 => {
                let i = present[self.rng.below(present.len())];
                let before = self.fig.started + self.fig.refused;
                self.start(i);
                let after = self.fig.started + self.fig.refused;
                if self.cfg.churn_every > 0
                    && after != before
                    && after.is_multiple_of(self.cfg.churn_every)
                {
                    self.churn();
                }
            }
            8..=12 if !self.live.is_empty() => {
                if let Some(a) = self.pick_live() {
                    let to = present[self.rng.below(present.len())];
                    self.move_to(a, to);
                }
            }
            13..=16 if !self.live.is_empty() => {
                if let Some(a) = self.pick_live() {
                    self.end(a);
                }
            }
            17 => self.reclaim_departed(),
            _ => self.deliver(self.fig.steps),
        }
    }

    /// Every node's view agrees with the cluster's; blocks have one owner and nodes use only
    /// blocks the table gives them.
    fn check(&mut self) {
        let mut seen = BTreeSet::new();
        let mut bad = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            for a in n.live() {
                if !seen.insert(*a) {
                    bad.push(format!("{a} live on two nodes"));
                }
                if self.live.get(a) != Some(&i) {
                    bad.push(format!("{a} live on {} in its view only", n.node));
                }
            }
            for b in n.blocks() {
                if self.table.owner(b) != Some(n.node.as_str()) {
                    bad.push(format!(
                        "{} uses block {b} leased to {:?}",
                        n.node,
                        self.table.owner(b)
                    ));
                }
            }
            for a in n.lent() {
                if n.live().contains(a) {
                    bad.push(format!("{a} lent and live on {}", n.node));
                }
            }
        }
        if seen.len() != self.live.len() {
            bad.push(format!(
                "{} live addresses, {} in the nodes' views",
                self.live.len(),
                seen.len()
            ));
        }
        self.fig.violations.extend(bad);
    }
}
