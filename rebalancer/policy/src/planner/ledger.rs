//! Migration counts and reservations of one evaluation.

use super::*;

/// Migration counts and reservations of this evaluation. Automatic decisions ("real") bind
/// everyone; recommend/dry-run decisions ("shadow") only bind other non-automatic decisions, so
/// trying out a policy never changes what automatic policies do.
pub(super) struct Ledger {
    pub(super) real: Layer,
    pub(super) shadow: Layer,
}

#[derive(Clone)]
pub(super) struct Layer {
    pub(super) total: u32,
    pub(super) per_source: Vec<u32>,
    pub(super) per_dest: Vec<u32>,
    pub(super) cpus: Vec<u32>,
    pub(super) mem_mb: Vec<u64>,
    pub(super) claimed: HashSet<usize>,
}

impl Layer {
    pub(super) fn new(n: usize) -> Self {
        Layer {
            total: 0,
            per_source: vec![0; n],
            per_dest: vec![0; n],
            cpus: vec![0; n],
            mem_mb: vec![0; n],
            claimed: HashSet::default(),
        }
    }
}

/// Counts a check sees: the real layer, plus the shadow layer for non-automatic policies.
#[derive(Clone, Copy)]
pub(super) struct View2<'l> {
    pub(super) real: &'l Layer,
    pub(super) shadow: Option<&'l Layer>,
}

impl View2<'_> {
    pub(super) fn sum<T: std::ops::Add<Output = T> + Copy + Default>(
        &self,
        f: impl Fn(&Layer) -> T,
    ) -> T {
        f(self.real) + self.shadow.map(f).unwrap_or_default()
    }
    pub(super) fn claimed(&self, c: usize) -> bool {
        self.real.claimed.contains(&c) || self.shadow.is_some_and(|s| s.claimed.contains(&c))
    }
}

impl Ledger {
    pub(super) fn new(view: &ClusterView, idx: &Index<'_>) -> Self {
        let mut real = Layer::new(view.nodes.len());
        for f in &view.in_flight {
            real.total += 1;
            if let Some(&s) = idx.node_of.get(f.source.as_str()) {
                real.per_source[s] += 1;
            }
            if let Some(&d) = idx.node_of.get(f.destination.as_str()) {
                real.per_dest[d] += 1;
                real.cpus[d] += f.cpus;
                real.mem_mb[d] += f.rss_mb;
            }
        }
        Ledger {
            real,
            shadow: Layer::new(view.nodes.len()),
        }
    }

    pub(super) fn view(&self, automatic: bool) -> View2<'_> {
        View2 {
            real: &self.real,
            shadow: (!automatic).then_some(&self.shadow),
        }
    }

    pub(super) fn commit(
        &mut self,
        automatic: bool,
        c: usize,
        cv: &ContainerView,
        src: usize,
        dst: usize,
    ) {
        let l = if automatic {
            &mut self.real
        } else {
            &mut self.shadow
        };
        l.total += 1;
        l.per_source[src] += 1;
        l.per_dest[dst] += 1;
        l.cpus[dst] += cv.cpus;
        l.mem_mb[dst] += cv.rss_mb;
        l.claimed.insert(c);
    }
}
