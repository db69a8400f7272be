//! Lookups and compact node facts built once per evaluation.

use std::hash::{BuildHasherDefault, Hasher};

use super::*;

/// Multiply-rotate hasher for the planner's lookup tables: SipHash's DoS resistance buys nothing
/// for names the controller supplies, and hashing 100k names per evaluation shows in profiles.
/// Iteration order of these maps never reaches the output.
#[derive(Default, Clone, Copy)]
pub(super) struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub(super) type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FastHasher>>;
pub(super) type HashSet<K> = std::collections::HashSet<K, BuildHasherDefault<FastHasher>>;

/// Lookups built once per evaluation.
pub(super) struct Index<'v> {
    /// Node indices sorted by name; `rank[i]` is node i's position.
    pub(super) by_name: Vec<usize>,
    pub(super) rank: Vec<usize>,
    pub(super) node_of: HashMap<&'v str, usize>,
    /// Container indices per node, in view order (sorted by id only for source nodes).
    pub(super) containers_on: Vec<Vec<usize>>,
    pub(super) in_flight: HashSet<&'v str>,
    /// Last move per job and node from the view (container.last_moved, in-flight starts).
    pub(super) job_moved: HashMap<u64, Timestamp>,
    pub(super) node_moved: Vec<Option<Timestamp>>,
    /// Compact per-node facts for the destination scan (cache-friendly).
    pub(super) facts: Vec<Fact>,
    pub(super) warnings: Vec<String>,
    pub(super) part_ids: HashMap<&'v str, u32>,
    pub(super) feat_ids: HashMap<&'v str, u32>,
}

/// Names interned to bit positions; names past 64 fall back to string comparison.
pub(super) const MASK_BITS: u32 = 64;

/// What the destination scan needs of a node, without pointer chasing.
#[derive(Clone, Copy)]
pub(super) struct Fact {
    /// Index into UNAVAILABLE, 0 when the node can receive work.
    pub(super) unavailable: u8,
    pub(super) modes: u8,
    pub(super) part_mask: u64,
    pub(super) feat_mask: u64,
    pub(super) cpus_total: u32,
    pub(super) free_cpus: i64,
    pub(super) free_mem: i64,
    pub(super) load: f64,
    /// NaN when the node reports no temperature.
    pub(super) temp: f64,
}

pub(super) const UNAVAILABLE: [&str; 6] =
    ["", "down", "drained", "draining", "drain", "reboot-asap"];

pub(super) fn mode_bit(m: MigrationMode) -> u8 {
    match m {
        MigrationMode::StopAndCopy => 1,
        MigrationMode::PostCopy => 2,
        MigrationMode::PreCopy => 4,
        // The agent's choice, never a node's capability in a view.
        MigrationMode::Auto => 0,
    }
}

pub(super) fn intern<'v>(ids: &mut HashMap<&'v str, u32>, name: &'v str) -> u32 {
    let next = ids.len() as u32;
    *ids.entry(name).or_insert(next)
}

pub(super) fn mask_of(ids: &HashMap<&str, u32>, names: &[String]) -> (u64, bool) {
    let mut mask = 0u64;
    let mut slow = false;
    for n in names {
        match ids.get(n.as_str()) {
            Some(&b) if b < MASK_BITS => mask |= 1 << b,
            _ => slow = true,
        }
    }
    (mask, slow)
}

impl<'v> Index<'v> {
    pub(super) fn new(view: &'v ClusterView) -> Self {
        let n = view.nodes.len();
        let mut by_name: Vec<usize> = (0..n).collect();
        by_name.par_sort_unstable_by(|&a, &b| view.nodes[a].name.cmp(&view.nodes[b].name));
        let mut rank = vec![0; n];
        for (r, &i) in by_name.iter().enumerate() {
            rank[i] = r;
        }
        let node_of: HashMap<&str, usize> = view
            .nodes
            .iter()
            .enumerate()
            .map(|(i, nv)| (nv.name.as_str(), i))
            .collect();
        let mut containers_on = vec![Vec::new(); n];
        let mut job_moved: HashMap<u64, Timestamp> = HashMap::default();
        let mut moved_in = Vec::new();
        let (mut orphans, mut first_orphan) = (0usize, None);
        // Views usually list a node's containers together: reuse the previous lookup.
        let mut last: Option<(&str, usize)> = None;
        for (ci, c) in view.containers.iter().enumerate() {
            let ni = match last {
                Some((name, ni)) if name == c.node => Some(ni),
                _ => node_of.get(c.node.as_str()).copied(),
            };
            if let Some(ni) = ni {
                containers_on[ni].push(ci);
                last = Some((c.node.as_str(), ni));
            } else {
                orphans += 1;
                first_orphan.get_or_insert(c.id.as_str());
            }
            if let Some(t) = c.last_moved {
                let e = job_moved.entry(c.job_id).or_insert(t);
                *e = (*e).max(t);
                // The node it runs on received it then.
                if let Some(ni) = ni {
                    moved_in.push((ni, t));
                }
            }
        }
        let mut node_moved: Vec<Option<Timestamp>> = vec![None; n];
        for (ni, t) in moved_in {
            node_moved[ni] = Some(node_moved[ni].map_or(t, |x| x.max(t)));
        }
        let mut in_flight = HashSet::default();
        for f in &view.in_flight {
            in_flight.insert(f.container.as_str());
            let e = job_moved.entry(f.job_id).or_insert(f.started);
            *e = (*e).max(f.started);
            for name in [&f.source, &f.destination] {
                if let Some(&ni) = node_of.get(name.as_str()) {
                    let slot: &mut Option<Timestamp> = &mut node_moved[ni];
                    *slot = Some(slot.map_or(f.started, |t| t.max(f.started)));
                }
            }
        }
        let mut part_ids = HashMap::default();
        let mut feat_ids = HashMap::default();
        for nv in &view.nodes {
            for p in &nv.partitions {
                intern(&mut part_ids, p);
            }
            for f in &nv.features {
                intern(&mut feat_ids, f);
            }
        }
        let facts = view
            .nodes
            .par_iter()
            .map(|nv| {
                // Names past MASK_BITS are left out of the masks; checks for such names compare
                // strings instead.
                let (part_mask, _) = mask_of(&part_ids, &nv.partitions);
                let (feat_mask, _) = mask_of(&feat_ids, &nv.features);
                let unavailable = nv.flags.unavailable().map_or(0, |s| {
                    UNAVAILABLE.iter().position(|u| *u == s).unwrap_or(1) as u8
                });
                Fact {
                    unavailable,
                    modes: nv.modes.iter().fold(0, |m, x| m | mode_bit(*x)),
                    part_mask,
                    feat_mask,
                    cpus_total: nv.cpus_total,
                    free_cpus: i64::from(nv.cpus_total) - i64::from(nv.cpus_alloc),
                    free_mem: nv.mem_total_mb as i64 - nv.mem_alloc_mb as i64,
                    load: nv.load,
                    temp: nv.temperature_c.unwrap_or(f64::NAN),
                }
            })
            .collect();
        let mut warnings = Vec::new();
        if node_of.len() != n {
            warnings.push(format!(
                "{} duplicate node name(s) in the view; the last entry of each is used",
                n - node_of.len()
            ));
        }
        if orphans > 0 {
            warnings.push(format!(
                "{orphans} container(s) on nodes missing from the view (first: {}); they are not considered",
                first_orphan.unwrap_or("?")
            ));
        }
        Index {
            warnings,
            by_name,
            rank,
            node_of,
            containers_on,
            in_flight,
            job_moved,
            node_moved,
            facts,
            part_ids,
            feat_ids,
        }
    }
}
