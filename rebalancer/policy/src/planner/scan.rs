//! The destination scan: fit checks, rejection reasons and the parallel reduction.

use super::*;

/// Per-policy destination facts that do not depend on the container.
#[derive(Default)]
pub(super) struct DestStatic {
    /// Empty when the policy has no destination node filter.
    pub(super) scope_ok: Vec<bool>,
    /// Empty when the policy has no node cooldown.
    pub(super) cooldown_until: Vec<Timestamp>,
    pub(super) feat_mask: u64,
    /// A required feature is interned past MASK_BITS (or unknown): compare strings.
    pub(super) feat_slow: bool,
}

/// Why one node does not fit; numbers kept so text is only built for the listed examples.
#[derive(Debug, Clone, Copy)]
pub(super) enum Reject {
    Scope,
    Unavailable(&'static str),
    /// Index in the set of the policy relieving the node.
    Relieved(u32),
    Partition,
    Feature(usize),
    Cooldown(u64),
    DestLimit(u32),
    Cpus {
        free: i64,
        need: u32,
    },
    Memory {
        free: i64,
        need: u64,
    },
    Hot {
        temp: f64,
        limit: f64,
    },
    UnknownTemp,
    Loaded {
        projected: f64,
        limit: f64,
    },
    NoMode,
}

pub(super) const ALL_CODES: [RejectCode; 13] = [
    RejectCode::OutOfDestinationScope,
    RejectCode::Unavailable,
    RejectCode::BeingRelieved,
    RejectCode::WrongPartition,
    RejectCode::MissingFeature,
    RejectCode::NodeCooldown,
    RejectCode::DestinationLimit,
    RejectCode::InsufficientCpus,
    RejectCode::InsufficientMemory,
    RejectCode::TooHot,
    RejectCode::UnknownTemperature,
    RejectCode::TooLoaded,
    RejectCode::NoCommonMode,
];

impl Reject {
    pub(super) fn code(self) -> RejectCode {
        ALL_CODES[self.slot()]
    }

    pub(super) fn slot(self) -> usize {
        match self {
            Reject::Scope => 0,
            Reject::Unavailable(_) => 1,
            Reject::Relieved(_) => 2,
            Reject::Partition => 3,
            Reject::Feature(_) => 4,
            Reject::Cooldown(_) => 5,
            Reject::DestLimit(_) => 6,
            Reject::Cpus { .. } => 7,
            Reject::Memory { .. } => 8,
            Reject::Hot { .. } => 9,
            Reject::UnknownTemp => 10,
            Reject::Loaded { .. } => 11,
            Reject::NoMode => 12,
        }
    }

    pub(super) fn text(self, p: &Policy, set: &PolicySet) -> String {
        match self {
            Reject::Scope => "outside [destination] nodes".into(),
            Reject::Unavailable(s) => format!("node state {s}"),
            Reject::Relieved(i) => format!(
                "being relieved by policy {}",
                set.policies()
                    .get(i as usize)
                    .map_or("?", |x| x.name.as_str())
            ),
            Reject::Partition => "not in the container's partition".into(),
            Reject::Feature(i) => format!(
                "lacks feature {}",
                p.destination
                    .require_features
                    .get(i)
                    .map_or("?", |s| s.as_str())
            ),
            Reject::Cooldown(left) => format!("node cooldown, {left} s left"),
            Reject::DestLimit(n) => format!(
                "{n} migration(s) already heading there; max_per_destination = {}",
                p.limits.max_per_destination
            ),
            Reject::Cpus { free, need } => format!("{free} free CPUs, needs {need}"),
            Reject::Memory { free, need } => format!("{free} MiB free, needs {need}"),
            Reject::Hot { temp, limit } => format!("{temp:.1} °C, limit {limit:.1} °C"),
            Reject::UnknownTemp => "no temperature reading".into(),
            Reject::Loaded { projected, limit } => {
                format!("load per CPU would be {projected:.2}, limit {limit:.2}")
            }
            Reject::NoMode => "supports none of the allowed modes the source supports".into(),
        }
    }
}

pub(super) fn code_text(c: RejectCode) -> &'static str {
    match c {
        RejectCode::OutOfDestinationScope => "outside destination scope",
        RejectCode::Unavailable => "draining/down/drained/reboot",
        RejectCode::BeingRelieved => "being relieved by a policy",
        RejectCode::WrongPartition => "in another partition",
        RejectCode::MissingFeature => "missing a required feature",
        RejectCode::NodeCooldown => "in node cooldown",
        RejectCode::DestinationLimit => "at max_per_destination",
        RejectCode::InsufficientCpus => "without enough free CPUs",
        RejectCode::InsufficientMemory => "without enough free memory",
        RejectCode::TooHot => "too hot",
        RejectCode::UnknownTemperature => "without temperature reading",
        RejectCode::TooLoaded => "too loaded",
        RejectCode::NoCommonMode => "without a common migration mode",
    }
}

/// How to test the container's partition on a node.
#[derive(Clone, Copy)]
pub(super) enum PartCheck {
    Bit(u64),
    /// Interned past MASK_BITS: compare strings.
    Slow,
    /// No node has the partition.
    Nowhere,
}

pub(super) struct FitCtx<'a> {
    pub(super) p: &'a Policy,
    pub(super) cv: &'a ContainerView,
    pub(super) counts: View2<'a>,
    pub(super) modes: &'a [MigrationMode],
    pub(super) idx: &'a Index<'a>,
    pub(super) nodes: &'a [NodeView],
    pub(super) dest: &'a DestStatic,
    pub(super) relieved: &'a [Option<u32>],
    pub(super) part: PartCheck,
    pub(super) now: Timestamp,
    /// Thermal policies: the destination must be at or below this temperature.
    pub(super) thermal_limit: Option<f64>,
    /// Load policies: the destination's projected load per CPU must stay at or below this.
    pub(super) load_limit: Option<f64>,
}

impl FitCtx<'_> {
    pub(super) fn fit(&self, i: usize) -> Result<([f64; 2], MigrationMode), Reject> {
        let d = &self.p.destination;
        let f = &self.idx.facts[i];
        if self.dest.scope_ok.get(i) == Some(&false) {
            return Err(Reject::Scope);
        }
        if f.unavailable != 0 {
            return Err(Reject::Unavailable(UNAVAILABLE[usize::from(f.unavailable)]));
        }
        if let Some(pi) = self.relieved[i] {
            return Err(Reject::Relieved(pi));
        }
        if d.same_partition {
            let ok = match self.part {
                PartCheck::Bit(b) => f.part_mask & b != 0,
                PartCheck::Slow => self.nodes[i].partitions.contains(&self.cv.partition),
                PartCheck::Nowhere => false,
            };
            if !ok {
                return Err(Reject::Partition);
            }
        }
        if !d.require_features.is_empty() {
            let missing = if self.dest.feat_slow {
                let have = &self.nodes[i].features;
                d.require_features.iter().position(|x| !have.contains(x))
            } else if f.feat_mask & self.dest.feat_mask != self.dest.feat_mask {
                d.require_features.iter().position(|x| {
                    self.idx
                        .feat_ids
                        .get(x.as_str())
                        .is_none_or(|&b| f.feat_mask & (1 << b) == 0)
                })
            } else {
                None
            };
            if let Some(pos) = missing {
                return Err(Reject::Feature(pos));
            }
        }
        if let Some(&until) = self.dest.cooldown_until.get(i) {
            if until > self.now {
                return Err(Reject::Cooldown(until - self.now));
            }
        }
        let incoming = self.counts.sum(|l| l.per_dest[i]);
        if incoming >= self.p.limits.max_per_destination {
            return Err(Reject::DestLimit(incoming));
        }
        let reserved = self.counts.sum(|l| l.cpus[i]);
        let free_cpus = f.free_cpus - i64::from(reserved);
        let need_cpus = self.cv.cpus + d.min_free_cpus;
        if free_cpus < i64::from(need_cpus) {
            return Err(Reject::Cpus {
                free: free_cpus,
                need: need_cpus,
            });
        }
        let free_mem = f.free_mem - self.counts.sum(|l| l.mem_mb[i]) as i64;
        let need_mem = self.cv.rss_mb + d.min_free_mem_mb;
        if free_mem < need_mem as i64 {
            return Err(Reject::Memory {
                free: free_mem,
                need: need_mem,
            });
        }
        // NaN (no reading) compares false: unknown temperatures pass an absolute cap.
        if let Some(max) = d.max_temperature_c {
            if f.temp > max {
                return Err(Reject::Hot {
                    temp: f.temp,
                    limit: max,
                });
            }
        }
        if let Some(limit) = self.thermal_limit {
            if f.temp.is_nan() {
                return Err(Reject::UnknownTemp);
            }
            if f.temp > limit {
                return Err(Reject::Hot {
                    temp: f.temp,
                    limit,
                });
            }
        }
        // Assume a moved container keeps all its CPUs busy.
        let projected = if f.cpus_total == 0 {
            f64::INFINITY
        } else {
            (f.load + f64::from(reserved) + f64::from(self.cv.cpus)) / f64::from(f.cpus_total)
        };
        for limit in [d.max_load_per_cpu, self.load_limit].into_iter().flatten() {
            if projected > limit {
                return Err(Reject::Loaded { projected, limit });
            }
        }
        let Some(mode) = self
            .modes
            .iter()
            .copied()
            .find(|m| f.modes & mode_bit(*m) != 0)
        else {
            return Err(Reject::NoMode);
        };
        let free_after = (free_cpus - i64::from(self.cv.cpus)) as f64;
        let temp = if f.temp.is_nan() {
            f64::INFINITY
        } else {
            f.temp
        };
        let score = match d.prefer {
            Prefer::Coolest => [temp, -free_after],
            Prefer::LeastLoaded => [projected, -free_after],
            Prefer::MostFree => [-free_after, projected],
        };
        Ok((score, mode))
    }
}

/// Fold accumulator of one destination scan.
#[derive(Default)]
pub(super) struct Acc {
    pub(super) candidates: usize,
    pub(super) fitting: usize,
    /// (score, name rank, node, mode), best first, at most RUNNERS_UP.
    pub(super) best: Vec<([f64; 2], usize, usize, MigrationMode)>,
    pub(super) counts: [u32; ALL_CODES.len()],
    /// (name rank, node, reason), lowest rank first, at most REJECT_EXAMPLES.
    pub(super) examples: Vec<(usize, usize, Reject)>,
}

pub(super) fn better(a: &([f64; 2], usize), b: &([f64; 2], usize)) -> std::cmp::Ordering {
    a.0[0]
        .total_cmp(&b.0[0])
        .then(a.0[1].total_cmp(&b.0[1]))
        .then(a.1.cmp(&b.1))
}

impl Acc {
    pub(super) fn add_fit(&mut self, score: [f64; 2], rank: usize, i: usize, mode: MigrationMode) {
        self.fitting += 1;
        let item = (score, rank, i, mode);
        if self.best.len() == RUNNERS_UP {
            match self.best.last() {
                Some(last) if better(&(item.0, item.1), &(last.0, last.1)).is_lt() => {
                    self.best.pop();
                }
                _ => return,
            }
        }
        let at = self
            .best
            .partition_point(|b| better(&(b.0, b.1), &(item.0, item.1)).is_lt());
        self.best.insert(at, item);
    }

    pub(super) fn add_reject(&mut self, r: Reject, rank: usize, i: usize) {
        self.counts[r.slot()] += 1;
        if self.examples.len() == REJECT_EXAMPLES {
            match self.examples.last() {
                Some(last) if rank < last.0 => {
                    self.examples.pop();
                }
                _ => return,
            }
        }
        let at = self.examples.partition_point(|e| e.0 < rank);
        self.examples.insert(at, (rank, i, r));
    }

    pub(super) fn merge(mut self, other: Acc) -> Acc {
        self.candidates += other.candidates;
        self.fitting += other.fitting;
        for (k, n) in other.counts.iter().enumerate() {
            self.counts[k] += n;
        }
        // add_fit/add_reject would count twice; undo their counters.
        for (s, r, i, m) in other.best {
            self.add_fit(s, r, i, m);
            self.fitting -= 1;
        }
        for (r, i, rej) in other.examples {
            self.add_reject(rej, r, i);
            self.counts[rej.slot()] -= 1;
        }
        self
    }
}
