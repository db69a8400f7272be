use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::*;

fn pool() -> Pool {
    Pool::new(Ipv4Addr::new(198, 19, 0, 0), 20, 26).expect("pool")
}

#[test]
fn pools_are_checked() {
    assert!(Pool::new(Ipv4Addr::new(198, 19, 0, 1), 20, 26).is_err());
    assert!(Pool::new(Ipv4Addr::new(198, 19, 0, 0), 26, 20).is_err());
    assert!(Pool::new(Ipv4Addr::new(198, 19, 0, 0), 20, 31).is_err());
    let p = pool();
    assert_eq!(p.blocks(), 64);
    assert_eq!(p.block_of(Ipv4Addr::new(198, 19, 0, 70)), Some(1));
    assert_eq!(p.block_of(Ipv4Addr::new(198, 19, 16, 0)), None);
    assert_eq!(p.block_of(Ipv4Addr::new(198, 18, 255, 255)), None);
    // The pool's network and broadcast addresses are never handed out.
    assert_eq!(p.addresses(0).next(), Some(Ipv4Addr::new(198, 19, 0, 1)));
    assert_eq!(
        p.addresses(63).last(),
        Some(Ipv4Addr::new(198, 19, 15, 254))
    );
    assert_eq!(p.addresses(1).count(), 64);
}

#[test]
fn leases_are_exclusive_and_reclaimed_only_when_empty() {
    let mut t = BlockTable::new(Pool::new(Ipv4Addr::new(198, 19, 0, 0), 24, 26).expect("pool"));
    let a = t.lease("n1").expect("a");
    let b = t.lease("n2").expect("b");
    assert_ne!(a, b);
    t.lease("n1").expect("c");
    t.lease("n3").expect("d");
    let e = t.lease("n4").expect_err("four /26 in a /24");
    assert!(e.to_string().contains("every /26 block"), "{e}");
    // n1 leaves while one of its addresses lives on elsewhere (a moved container).
    let moved: BTreeSet<_> = t.pool.addresses(a).take(1).collect();
    assert_eq!(t.reclaim("n1", &moved).len(), 1);
    assert_eq!(t.owner(a), Some("n1"));
    assert_eq!(t.reclaim("n1", &BTreeSet::new()), vec![a]);
    assert_eq!(t.owner(a), None);
    assert_eq!(t.lease("n4").expect("freed block"), a);
}

#[test]
fn a_lent_address_is_not_reused_until_it_comes_back() {
    let p = pool();
    let (mut n1, mut n2) = (NodeAddresses::new("n1", p), NodeAddresses::new("n2", p));
    n1.add_block(0);
    n2.add_block(1);
    let a = n1.allocate().expect("a");
    n1.moved_away(a);
    n2.arrived(a).expect("arrives with its address");
    let b = n1.allocate().expect("b");
    assert_ne!(a, b, "lent to n2");
    // It ends on n2; n1 must be told before it reuses it.
    assert_eq!(n2.ended(a), Some(a));
    n1.ended(b);
    assert_eq!(n1.allocate().expect("b again"), b);
    n1.returned(a);
    n1.returned(a);
    assert_eq!(n1.allocate().expect("a again"), a);
    // A foreign address that is live here is refused; one outside the pool too.
    assert!(n1.arrived(a).is_err());
    assert!(n1.arrived(Ipv4Addr::new(10, 0, 0, 1)).is_err());
}

#[test]
fn a_full_node_says_it_needs_a_block() {
    let p = Pool::new(Ipv4Addr::new(198, 19, 0, 0), 24, 30).expect("pool");
    let mut n = NodeAddresses::new("n1", p);
    n.add_block(1);
    n.allocate().expect("1");
    n.allocate().expect("2");
    n.allocate().expect("3");
    n.allocate().expect("4");
    let e = n.allocate().expect_err("full");
    assert!(e.to_string().contains("needs another block"), "{e}");
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
        (self.next() % n as u64) as usize
    }
}

/// A cluster of agents, a controller's block table, containers, and delayed "address returned"
/// messages (delivered in random order, some twice).
struct Sim {
    table: BlockTable,
    nodes: Vec<NodeAddresses>,
    /// Live containers: address → node index.
    live: BTreeMap<Ipv4Addr, usize>,
    mail: VecDeque<(usize, Ipv4Addr)>,
    rng: Rng,
    started: u64,
    moved: u64,
    ended: u64,
    leased: u64,
}

impl Sim {
    fn new(nodes: usize, pool: Pool, seed: u64) -> Sim {
        let mut table = BlockTable::new(pool);
        let nodes = (0..nodes)
            .map(|i| {
                let name = format!("n{i}");
                let mut n = NodeAddresses::new(&name, pool);
                n.add_block(table.lease(&name).expect("one block per node"));
                n
            })
            .collect::<Vec<_>>();
        Sim {
            table,
            leased: nodes.len() as u64,
            nodes,
            live: BTreeMap::new(),
            mail: VecDeque::new(),
            rng: Rng(seed | 1),
            started: 0,
            moved: 0,
            ended: 0,
        }
    }

    fn owner_index(&self, a: Ipv4Addr) -> Option<usize> {
        let b = self.table.pool.block_of(a)?;
        let name = self.table.owner(b)?;
        self.nodes.iter().position(|n| n.node == name)
    }

    fn start(&mut self, i: usize) {
        let a = match self.nodes[i].allocate() {
            Ok(a) => a,
            Err(IpamError::NodeExhausted { .. }) => {
                let Ok(b) = self.table.lease(&self.nodes[i].node) else {
                    return;
                };
                self.leased += 1;
                self.nodes[i].add_block(b);
                self.nodes[i].allocate().expect("a fresh block has room")
            }
            Err(e) => panic!("{e}"),
        };
        assert!(
            self.live.insert(a, i).is_none(),
            "{a} handed out while live (seed {:x})",
            self.rng.0
        );
        self.started += 1;
    }

    fn step(&mut self) {
        let n = self.nodes.len();
        match self.rng.below(10) {
            0..=3 => {
                let i = self.rng.below(n);
                self.start(i)
            }
            4..=6 if !self.live.is_empty() => {
                let k = self.rng.below(self.live.len());
                let (&a, &from) = self.live.iter().nth(k).expect("k < len");
                let to = self.rng.below(n);
                if to != from {
                    self.nodes[from].moved_away(a);
                    self.nodes[to].arrived(a).expect("arrival");
                    self.live.insert(a, to);
                    self.moved += 1;
                }
            }
            7..=8 if !self.live.is_empty() => {
                let k = self.rng.below(self.live.len());
                let (&a, &at) = self.live.iter().nth(k).expect("k < len");
                self.live.remove(&a);
                if let Some(addr) = self.nodes[at].ended(a) {
                    let owner = self.owner_index(addr).expect("an owned block");
                    self.mail.push_back((owner, addr));
                }
                self.ended += 1;
            }
            _ => {
                // Deliver a message late, maybe twice.
                if let Some(m) = self.mail.pop_front() {
                    self.nodes[m.0].returned(m.1);
                    if self.rng.below(4) == 0 {
                        self.nodes[m.0].returned(m.1);
                    }
                }
            }
        }
    }

    /// No two live containers share an address; each node's view agrees with the cluster.
    fn check(&self) {
        let mut seen = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for a in n.live() {
                assert!(seen.insert(*a), "{a} live twice");
                assert_eq!(self.live.get(a), Some(&i), "{a} on {}", n.node);
            }
            for a in n.lent() {
                assert!(!n.live().contains(a), "{a} lent and live on {}", n.node);
            }
        }
        assert_eq!(seen.len(), self.live.len());
    }
}

#[test]
fn ten_thousand_containers_over_a_hundred_nodes_never_share_an_address() {
    let pool = Pool::new(Ipv4Addr::new(198, 19, 0, 0), 16, 26).expect("pool");
    for seed in [1u64, 0x5eed, 0xdead_beef] {
        let mut s = Sim::new(100, pool, seed);
        let mut steps = 0u64;
        // Every start asserts that its address is not live; the whole view is checked often.
        while s.started < 10_000 {
            s.step();
            steps += 1;
            if steps.is_multiple_of(1000) {
                s.check();
            }
        }
        while let Some(m) = s.mail.pop_front() {
            s.nodes[m.0].returned(m.1);
        }
        s.check();
        eprintln!(
            "seed {seed:#x}: {steps} steps, {} started, {} moved, {} ended, {} live, {} blocks leased, 0 collisions",
            s.started,
            s.moved,
            s.ended,
            s.live.len(),
            s.leased
        );
        // Once every report arrived, nothing stays lent for a container that ended.
        for n in &s.nodes {
            for a in n.lent() {
                assert!(s.live.contains_key(a), "{a} still lent by {}", n.node);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any order of starts, moves, ends and late reports over a few nodes and tiny blocks.
    #[test]
    fn no_sequence_of_operations_gives_an_address_twice(seed in any::<u64>(), ops in 50usize..400) {
        let pool = Pool::new(Ipv4Addr::new(198, 19, 0, 0), 24, 29).expect("pool");
        let mut s = Sim::new(4, pool, seed);
        for _ in 0..ops {
            s.step();
            s.check();
        }
    }

    /// Leases never give one block to two nodes, and reclaiming frees only empty blocks.
    #[test]
    fn blocks_have_one_owner(nodes in prop::collection::vec(0u8..6, 1..60)) {
        let mut t = BlockTable::new(Pool::new(Ipv4Addr::new(198, 19, 0, 0), 24, 28).expect("pool"));
        for n in nodes {
            let name = format!("n{n}");
            if n == 5 {
                t.reclaim("n0", &BTreeSet::new());
            } else if let Ok(b) = t.lease(&name) {
                prop_assert_eq!(t.owner(b), Some(name.as_str()));
            }
            let owned: usize = (0..6).map(|i| t.blocks_of(&format!("n{i}")).len()).sum();
            prop_assert!(owned <= 16);
        }
    }
}

#[test]
fn a_journaled_table_replays_to_the_same_leases_and_refuses_another_pool() {
    let p = Pool::new(Ipv4Addr::new(198, 19, 0, 0), 24, 26).expect("pool");
    let mut t = BlockTable::new(p);
    let a = t.lease("node1").expect("lease");
    let b = t.lease("node2").expect("lease");
    let journaled: Vec<(BlockId, String)> = t.leases().map(|(k, n)| (k, n.to_owned())).collect();
    let mut back = BlockTable::from_leases(p, journaled.clone()).expect("replay");
    assert_eq!(back, t);
    assert_eq!(
        (back.owner(a), back.owner(b)),
        (Some("node1"), Some("node2"))
    );
    // The replayed table goes on leasing where the old one would have.
    assert_eq!(back.lease("node3"), t.lease("node3"));
    // A /24 of /26 blocks has 4: block 4 belongs to another pool.
    let e = BlockTable::from_leases(p, [(4, "node9".to_string())]).expect_err("outside");
    assert!(e.to_string().contains("block 4 leased to node9"), "{e}");
}

/// The simulated cluster of `sim.rs` (what `--example ipam-sim` prints): 10,000 containers over
/// 100 nodes with nodes leaving and joining, every address checked against every live one.
#[test]
fn a_simulated_cluster_of_ten_thousand_containers_has_no_collision() {
    for seed in [1u64, 2, 3] {
        let f = crate::sim::run(crate::sim::SimConfig::standard(seed));
        eprintln!("seed {seed}: {f}");
        assert_eq!(f.collisions, 0, "seed {seed}: {f}");
        assert!(f.violations.is_empty(), "seed {seed}: {:?}", f.violations);
        assert_eq!(f.started, 10_000, "seed {seed}: {f}");
        // The run exercised what it claims to: moves, departures, and reclaimed blocks.
        assert!(f.moved > 1000 && f.nodes_left > 10, "seed {seed}: {f}");
        assert!(f.blocks_reclaimed > 0 && f.releases > 0, "seed {seed}: {f}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Any seed, a few nodes and tiny blocks in a small pool (so blocks run out, nodes ask for
    /// more, leave, and their blocks are reclaimed and leased again): never an address twice.
    #[test]
    fn lease_allocate_move_free_reclaim_never_give_an_address_twice(
        seed in any::<u64>(),
        nodes in 3usize..8,
        containers in 20u64..400,
        churn_every in 0u64..30,
        low_water in 0usize..4,
    ) {
        let cfg = crate::sim::SimConfig {
            nodes,
            containers,
            seed,
            pool: Pool::new(Ipv4Addr::new(198, 19, 0, 0), 24, 29).expect("pool"),
            low_water,
            churn_every,
        };
        let f = crate::sim::run(cfg);
        prop_assert_eq!(f.collisions, 0, "{}", f);
        prop_assert!(f.violations.is_empty(), "{:?}", f.violations);
    }
}

#[test]
fn a_block_with_a_live_address_is_never_leased_and_blocks_are_adopted_once() {
    let p = Pool::new(Ipv4Addr::new(198, 19, 0, 0), 24, 26).expect("pool");
    let mut t = BlockTable::new(p);
    let live: BTreeSet<_> = p.addresses(0).take(1).collect();
    assert_eq!(t.lease_clear_of("n1", &live).expect("lease"), 1);
    assert_eq!(t.adopt(0, "n2"), Ok(true));
    assert_eq!(t.adopt(0, "n2"), Ok(false));
    assert_eq!(t.adopt(1, "n2"), Err("n1".to_string()));
    assert!(t.adopt(9, "n2").is_err());
    assert_eq!(t.block_cidr(1), "198.19.0.64/26");
    assert!(p.within(Ipv4Addr::new(198, 19, 0, 0), 20));
    assert!(!p.within(Ipv4Addr::new(198, 18, 0, 0), 24));
}

#[test]
fn a_node_syncs_its_live_set_and_lends_what_moved_away() {
    let p = pool();
    let mut n = NodeAddresses::new("n1", p);
    n.set_blocks([0, 1]);
    let a = n.allocate().expect("a");
    let b = n.allocate().expect("b");
    // b moved away, a still runs; an address of another block arrived.
    let foreign = p.addresses(5).next().expect("foreign");
    n.sync([a, foreign].into(), &[b].into());
    assert!(n.lent().contains(&b));
    // Block 0 lacks the pool's network address: 63 + 64 addresses, a and b taken.
    assert_eq!(n.free(), 127 - 2);
    assert_ne!(n.allocate().expect("c"), b);
    // Released by the controller: the record of the move, still there, does not lend it again.
    n.returned(b);
    let c = n
        .live()
        .iter()
        .copied()
        .find(|x| *x != a && *x != foreign)
        .expect("c");
    n.sync([a, c, foreign].into(), &[b].into());
    assert!(!n.lent().contains(&b));
    // The controller drops block 1 and keeps block 0; nothing of block 1 stays lent.
    n.set_blocks([0]);
    assert_eq!(n.blocks().collect::<Vec<_>>(), vec![0]);
}
