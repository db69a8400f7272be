//! `plan()`: evaluates every enabled policy in priority order against one cluster view.
//!
//! Determinism: nodes are ranked by name once; every choice breaks ties on that rank, containers
//! on their id, so the output depends only on the inputs (rayon only splits the destination scan,
//! whose reduction is order-independent).

use std::hash::{BuildHasherDefault, Hasher};

use rayon::prelude::*;

use crate::model::{ClusterView, ContainerView, MigrationMode, NodeView, Timestamp};
use crate::plan::{
    Decision, DecisionAction, DestinationSearch, Metric, Plan, PolicyReport, RankedCandidate,
    RejectCode, RejectedCandidate, Skip, SkipCode, TriggerReason, Why,
};
use crate::policy::{Action, Basis, ContainerOrder, Policy, PolicyKind, PolicySet, Prefer};
use crate::state::{NodeTrack, PolicyState};

/// Multiply-rotate hasher for the planner's lookup tables: SipHash's DoS resistance buys nothing
/// for names the controller supplies, and hashing 100k names per evaluation shows in profiles.
/// Iteration order of these maps never reaches the output.
#[derive(Default, Clone, Copy)]
struct FastHasher(u64);

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

type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FastHasher>>;
type HashSet<K> = std::collections::HashSet<K, BuildHasherDefault<FastHasher>>;

/// Fitting destinations listed in a decision's reasons.
pub const RUNNERS_UP: usize = 3;
/// Rejected destinations listed by name in a decision's or skip's reasons (all are counted).
pub const REJECT_EXAMPLES: usize = 8;
/// Destination searches one policy may run per evaluation; bounds the cost when nothing fits.
pub const SEARCH_BUDGET: usize = 128;
/// Nodes per parallel work item of the destination scan.
const SCAN_CHUNK: usize = 1024;

/// Evaluates `set` against `view`, updating `state` (hysteresis, and cooldowns of automatic moves).
pub fn plan(set: &PolicySet, view: &ClusterView, state: &mut PolicyState) -> Plan {
    let idx = Index::new(view);
    let mut ledger = Ledger::new(view, &idx);
    let mut out = Plan {
        evaluated_at: view.now,
        warnings: idx.warnings.clone(),
        ..Plan::default()
    };
    for w in &out.warnings {
        tracing::warn!(warning = %w, "inconsistent cluster view");
    }
    let mut hysteresis = std::collections::BTreeMap::new();
    let horizon = set
        .policies()
        .iter()
        .map(|p| p.limits.job_cooldown_s.max(p.limits.node_cooldown_s))
        .max()
        .unwrap_or(0);

    // Phase 1: every policy's triggers, so that phase 2 knows which nodes are being relieved.
    let mut triggered: Vec<Option<Triggered>> = Vec::with_capacity(set.len());
    for policy in set.policies() {
        if !policy.enabled {
            triggered.push(None);
            continue;
        }
        let tracks = state.hysteresis.remove(&policy.name).unwrap_or_default();
        let t = triggers(policy, view, &idx, tracks);
        if !t.tracks.is_empty() {
            hysteresis.insert(policy.name.clone(), t.tracks.clone());
        }
        triggered.push(Some(t));
    }
    // Removed or disabled policies lose their hysteresis progress.
    state.hysteresis = hysteresis;
    // Nodes some policy is relieving do not receive work: by automatic policies (binding on
    // everyone), and by any policy (binding on trial policies only).
    let mut relieved_auto: Vec<Option<u32>> = vec![None; view.nodes.len()];
    let mut relieved_any: Vec<Option<u32>> = vec![None; view.nodes.len()];
    for (pi, t) in triggered.iter().enumerate() {
        let Some(t) = t else { continue };
        let auto = set.policies()[pi].action == Action::Automatic;
        for s in &t.sources {
            relieved_any[s.node].get_or_insert(pi as u32);
            if auto {
                relieved_auto[s.node].get_or_insert(pi as u32);
            }
        }
    }

    // Phase 2: act, policy by policy in priority order.
    for (policy, t) in set.policies().iter().zip(triggered) {
        let Some(mut t) = t else {
            out.reports.push(PolicyReport {
                policy: policy.name.clone(),
                kind: policy.kind,
                enabled: false,
                nodes_in_scope: 0,
                mean: None,
                nodes_active: 0,
                nodes_pending: 0,
                nodes_quiet: 0,
                decisions: 0,
                skips: 0,
            });
            continue;
        };
        let automatic = policy.action == Action::Automatic;
        let mut run = PolicyRun {
            set,
            policy,
            view,
            idx: &idx,
            state,
            ledger: &mut ledger,
            relieved: if automatic {
                &relieved_auto
            } else {
                &relieved_any
            },
            decisions: Vec::new(),
            skips: std::mem::take(&mut t.skips),
            searches: 0,
            cycle: 0,
            dest: DestStatic::default(),
        };
        run.act(&t.sources);
        let PolicyRun {
            decisions, skips, ..
        } = run;
        t.report.decisions = decisions.len();
        t.report.skips = skips.len();
        tracing::debug!(
            policy = %policy.name,
            decisions = decisions.len(),
            skips = skips.len(),
            active = t.report.nodes_active,
            "policy evaluated"
        );
        out.decisions.extend(decisions);
        out.skips.extend(skips);
        out.reports.push(t.report);
    }
    state.prune_moves(view.now, horizon);
    out
}

/// Lookups built once per evaluation.
struct Index<'v> {
    /// Node indices sorted by name; `rank[i]` is node i's position.
    by_name: Vec<usize>,
    rank: Vec<usize>,
    node_of: HashMap<&'v str, usize>,
    /// Container indices per node, in view order (sorted by id only for source nodes).
    containers_on: Vec<Vec<usize>>,
    in_flight: HashSet<&'v str>,
    /// Last move per job and node from the view (container.last_moved, in-flight starts).
    job_moved: HashMap<u64, Timestamp>,
    node_moved: Vec<Option<Timestamp>>,
    /// Compact per-node facts for the destination scan (cache-friendly).
    facts: Vec<Fact>,
    warnings: Vec<String>,
    part_ids: HashMap<&'v str, u32>,
    feat_ids: HashMap<&'v str, u32>,
}

/// Names interned to bit positions; names past 64 fall back to string comparison.
const MASK_BITS: u32 = 64;

/// What the destination scan needs of a node, without pointer chasing.
#[derive(Clone, Copy)]
struct Fact {
    /// Index into UNAVAILABLE, 0 when the node can receive work.
    unavailable: u8,
    modes: u8,
    part_mask: u64,
    feat_mask: u64,
    cpus_total: u32,
    free_cpus: i64,
    free_mem: i64,
    load: f64,
    /// NaN when the node reports no temperature.
    temp: f64,
}

const UNAVAILABLE: [&str; 6] = ["", "down", "drained", "draining", "drain", "reboot-asap"];

fn mode_bit(m: MigrationMode) -> u8 {
    match m {
        MigrationMode::StopAndCopy => 1,
        MigrationMode::PostCopy => 2,
        MigrationMode::PreCopy => 4,
    }
}

fn intern<'v>(ids: &mut HashMap<&'v str, u32>, name: &'v str) -> u32 {
    let next = ids.len() as u32;
    *ids.entry(name).or_insert(next)
}

fn mask_of(ids: &HashMap<&str, u32>, names: &[String]) -> (u64, bool) {
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
    fn new(view: &'v ClusterView) -> Self {
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

/// Migration counts and reservations of this evaluation. Automatic decisions ("real") bind
/// everyone; recommend/dry-run decisions ("shadow") only bind other non-automatic decisions, so
/// trying out a policy never changes what automatic policies do.
struct Ledger {
    real: Layer,
    shadow: Layer,
}

#[derive(Clone)]
struct Layer {
    total: u32,
    per_source: Vec<u32>,
    per_dest: Vec<u32>,
    cpus: Vec<u32>,
    mem_mb: Vec<u64>,
    claimed: HashSet<usize>,
}

impl Layer {
    fn new(n: usize) -> Self {
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
struct View2<'l> {
    real: &'l Layer,
    shadow: Option<&'l Layer>,
}

impl View2<'_> {
    fn sum<T: std::ops::Add<Output = T> + Copy + Default>(&self, f: impl Fn(&Layer) -> T) -> T {
        f(self.real) + self.shadow.map(f).unwrap_or_default()
    }
    fn claimed(&self, c: usize) -> bool {
        self.real.claimed.contains(&c) || self.shadow.is_some_and(|s| s.claimed.contains(&c))
    }
}

impl Ledger {
    fn new(view: &ClusterView, idx: &Index<'_>) -> Self {
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

    fn view(&self, automatic: bool) -> View2<'_> {
        View2 {
            real: &self.real,
            shadow: (!automatic).then_some(&self.shadow),
        }
    }

    fn commit(&mut self, automatic: bool, c: usize, cv: &ContainerView, src: usize, dst: usize) {
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

/// What phase 1 found for one policy.
struct Triggered {
    report: PolicyReport,
    tracks: std::collections::BTreeMap<String, NodeTrack>,
    /// Active source nodes, most urgent first.
    sources: Vec<Source>,
    skips: Vec<Skip>,
}

fn metric_value(metric: Metric, n: &NodeView) -> Option<f64> {
    match metric {
        Metric::TemperatureC => n.temperature_c.filter(|t| t.is_finite()),
        Metric::LoadPerCpu => Some(n.load_per_cpu()).filter(|l| l.is_finite()),
    }
}

fn node_in_scope(p: &Policy, n: &NodeView) -> bool {
    let s = &p.scope;
    s.nodes.admits(&n.name)
        && (s.partitions.include.is_empty()
            || n.partitions
                .iter()
                .any(|x| s.partitions.include.contains(x)))
}

/// Phase 1 for one policy: hysteresis update and the list of active source nodes.
fn triggers(
    p: &Policy,
    view: &ClusterView,
    idx: &Index<'_>,
    mut tracks: std::collections::BTreeMap<String, NodeTrack>,
) -> Triggered {
    let now = view.now;
    let mut skips = Vec::new();
    let mut skip = |ni: usize, code: SkipCode, reason: String| {
        skips.push(Skip {
            policy: p.name.clone(),
            node: view.nodes[ni].name.clone(),
            container: None,
            code,
            reason,
            search: None,
        })
    };
    let in_scope: Vec<usize> = idx
        .by_name
        .iter()
        .copied()
        .filter(|&i| node_in_scope(p, &view.nodes[i]))
        .collect();
    let metric = match p.kind {
        PolicyKind::Drain => None,
        PolicyKind::Thermal => Some(Metric::TemperatureC),
        PolicyKind::Load => Some(Metric::LoadPerCpu),
    };
    let mean = metric.and_then(|m| {
        let vals: Vec<f64> = in_scope
            .iter()
            .filter(|&&i| !view.nodes[i].flags.down)
            .filter_map(|&i| metric_value(m, &view.nodes[i]))
            .collect();
        (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
    });
    let thresholds = match (p.trigger.basis, mean) {
        (Basis::Deviation, Some(m)) => Some(Thresholds {
            high: m + p.trigger.high,
            low: m + p.trigger.low,
        }),
        (Basis::Deviation, None) => None,
        (Basis::Absolute, _) => Some(Thresholds {
            high: p.trigger.high,
            low: p.trigger.low,
        }),
    };

    let mut new_tracks = std::collections::BTreeMap::new();
    let mut sources = Vec::new();
    let (mut pending, mut quiet) = (0, 0);
    for &ni in &in_scope {
        let node = &view.nodes[ni];
        let prev = tracks.remove(&node.name);
        // (condition holds, still active if already active, value for reasons)
        let (hot, keep, value) = match metric {
            None => {
                let on: Vec<_> = p
                    .trigger
                    .states
                    .iter()
                    .copied()
                    .filter(|s| s.is_set(&node.flags))
                    .collect();
                let hot = !on.is_empty();
                (hot, hot, TriggerReason::NodeState { states: on })
            }
            Some(m) => {
                let Some(v) = metric_value(m, node) else {
                    quiet += 1;
                    if prev.is_some() {
                        skip(
                            ni,
                            SkipCode::NoReading,
                            "no temperature reading; hysteresis reset".into(),
                        );
                    }
                    continue;
                };
                let Some(t) = thresholds else {
                    quiet += 1;
                    continue;
                };
                let reason = TriggerReason::Threshold {
                    metric: m,
                    value: v,
                    basis: p.trigger.basis,
                    mean: if p.trigger.basis == Basis::Deviation {
                        mean
                    } else {
                        None
                    },
                    high: t.high,
                    low: t.low,
                    samples: 0,
                    since: now,
                };
                (v >= t.high, v >= t.low, reason)
            }
        };
        let track = match prev {
            Some(tr) if tr.active && keep => Some(tr),
            _ if hot => {
                let mut tr = match prev {
                    Some(tr) if !tr.active => tr,
                    _ => NodeTrack {
                        since: now,
                        samples: 0,
                        active: false,
                        last_sample: now,
                    },
                };
                if tr.samples == 0 || now > tr.last_sample {
                    tr.samples += 1;
                    tr.last_sample = now;
                }
                if tr.samples >= p.trigger.samples
                    && now.saturating_sub(tr.since) >= p.trigger.min_duration_s
                {
                    tr.active = true;
                }
                Some(tr)
            }
            _ => None,
        };
        let Some(track) = track else {
            if keep && metric.is_some() {
                // Between low and high without having triggered: the band keeps it quiet.
                skip(ni, SkipCode::InBand, format!(
                        "{} is inside the hysteresis band (low {:.2}, high {:.2}) and the node was not active",
                        fmt_value(&value), thresholds.map_or(0.0, |t| t.low), thresholds.map_or(0.0, |t| t.high)));
            }
            quiet += 1;
            continue;
        };
        new_tracks.insert(node.name.clone(), track);
        let value = match value {
            TriggerReason::Threshold {
                metric,
                value,
                basis,
                mean,
                high,
                low,
                ..
            } => TriggerReason::Threshold {
                metric,
                value,
                basis,
                mean,
                high,
                low,
                samples: track.samples,
                since: track.since,
            },
            other => other,
        };
        if !track.active {
            pending += 1;
            skip(
                ni,
                SkipCode::HysteresisPending,
                format!(
                    "{} triggers, but only for {} of {} samples and {} of {} s",
                    fmt_value(&value),
                    track.samples,
                    p.trigger.samples,
                    now.saturating_sub(track.since),
                    p.trigger.min_duration_s
                ),
            );
            continue;
        }
        let urgency = match &value {
            TriggerReason::Threshold { value, .. } => *value,
            TriggerReason::NodeState { .. } => 0.0,
        };
        sources.push(Source {
            node: ni,
            trigger: value,
            urgency,
        });
    }
    // Most urgent first; name rank breaks ties (sources are already in name order and the
    // sort is stable).
    sources.sort_by(|a, b| b.urgency.total_cmp(&a.urgency));
    let report = PolicyReport {
        policy: p.name.clone(),
        kind: p.kind,
        enabled: true,
        nodes_in_scope: in_scope.len(),
        mean,
        nodes_active: sources.len(),
        nodes_pending: pending,
        nodes_quiet: quiet,
        decisions: 0,
        skips: 0,
    };
    Triggered {
        report,
        tracks: new_tracks,
        sources,
        skips,
    }
}

/// A source node the policy acts on this evaluation.
struct Source {
    node: usize,
    trigger: TriggerReason,
    /// Sort key: most urgent first.
    urgency: f64,
}

/// Trigger thresholds converted to the metric's absolute scale.
#[derive(Clone, Copy)]
struct Thresholds {
    high: f64,
    low: f64,
}

struct PolicyRun<'a, 'v> {
    set: &'a PolicySet,
    policy: &'a Policy,
    view: &'v ClusterView,
    idx: &'a Index<'v>,
    state: &'a mut PolicyState,
    ledger: &'a mut Ledger,
    /// Per node: the policy (index in `set`) relieving it, if any.
    relieved: &'a [Option<u32>],
    decisions: Vec<Decision>,
    skips: Vec<Skip>,
    searches: usize,
    cycle: u32,
    dest: DestStatic,
}

/// Per-policy destination facts that do not depend on the container.
#[derive(Default)]
struct DestStatic {
    /// Empty when the policy has no destination node filter.
    scope_ok: Vec<bool>,
    /// Empty when the policy has no node cooldown.
    cooldown_until: Vec<Timestamp>,
    feat_mask: u64,
    /// A required feature is interned past MASK_BITS (or unknown): compare strings.
    feat_slow: bool,
}

enum Stop {
    /// Stop the whole policy for this evaluation.
    Policy(SkipCode, String),
}

impl<'v> PolicyRun<'_, 'v> {
    fn automatic(&self) -> bool {
        self.policy.action == Action::Automatic
    }

    fn skip(&mut self, node: usize, container: Option<usize>, code: SkipCode, reason: String) {
        self.skips.push(Skip {
            policy: self.policy.name.clone(),
            node: self.view.nodes[node].name.clone(),
            container: container.map(|c| self.view.containers[c].id.clone()),
            code,
            reason,
            search: None,
        });
    }

    fn act(&mut self, sources: &[Source]) {
        if !sources.is_empty() {
            self.dest = self.dest_static();
        }
        for (k, s) in sources.iter().enumerate() {
            if let Err(Stop::Policy(code, reason)) = self.act_on(s) {
                // Name the nodes left untouched so the report stays complete.
                for rest in &sources[k..] {
                    self.skip(rest.node, None, code, reason.clone());
                }
                break;
            }
        }
    }

    fn dest_static(&self) -> DestStatic {
        let p = self.policy;
        let nodes = &self.view.nodes;
        let d = &p.destination;
        let scope_ok = if d.nodes.include.is_empty() && d.nodes.exclude.is_empty() {
            Vec::new()
        } else {
            nodes.par_iter().map(|n| d.nodes.admits(&n.name)).collect()
        };
        let cd = p.limits.node_cooldown_s;
        let cooldown_until = if cd == 0 {
            Vec::new()
        } else {
            (0..nodes.len())
                .map(|i| self.last_node_move(i).map_or(0, |t| t + cd))
                .collect()
        };
        let (feat_mask, feat_slow) = mask_of(&self.idx.feat_ids, &d.require_features);
        DestStatic {
            scope_ok,
            cooldown_until,
            feat_mask,
            feat_slow,
        }
    }

    fn last_node_move(&self, ni: usize) -> Option<Timestamp> {
        let a = self.idx.node_moved[ni];
        let b = self
            .state
            .node_moved
            .get(&self.view.nodes[ni].name)
            .copied();
        a.max(b)
    }

    fn act_on(&mut self, s: &Source) -> Result<(), Stop> {
        let p = self.policy;
        let view = self.view;
        let now = view.now;
        let src = s.node;
        let node = &view.nodes[src];
        if p.kind != PolicyKind::Drain {
            if node.flags.down {
                self.skip(
                    src,
                    None,
                    SkipCode::SourceDown,
                    "source node is down; only drain policies act on down nodes".into(),
                );
                return Ok(());
            }
            if let Some(t) = self.last_node_move(src) {
                let left = (t + p.limits.node_cooldown_s).saturating_sub(now);
                if left > 0 {
                    self.skip(src, None, SkipCode::SourceCooldown, format!(
                        "node took part in a migration {} s ago; node cooldown {} s ({left} s left)",
                        now.saturating_sub(t), p.limits.node_cooldown_s));
                    return Ok(());
                }
            }
        }
        let mut on = self.idx.containers_on[src].clone();
        on.sort_by(|&a, &b| view.containers[a].id.cmp(&view.containers[b].id));
        let mut cands: Vec<usize> = Vec::new();
        for c in on {
            let cv = &view.containers[c];
            let skip = if !cv.migratable {
                Some((
                    SkipCode::NotMigratable,
                    "container is not migratable".to_owned(),
                ))
            } else if let Some(r) = p.scope.rejects(cv) {
                Some((SkipCode::OutOfScope, r))
            } else if self.idx.in_flight.contains(cv.id.as_str()) {
                Some((
                    SkipCode::InFlight,
                    "container is already being migrated".to_owned(),
                ))
            } else if self.ledger.view(self.automatic()).claimed(c) {
                Some((
                    SkipCode::AlreadyPlanned,
                    "container is already in an earlier decision of this plan".to_owned(),
                ))
            } else {
                let last = self
                    .idx
                    .job_moved
                    .get(&cv.job_id)
                    .copied()
                    .max(self.state.job_moved.get(&cv.job_id).copied());
                match last {
                    Some(t) if t + p.limits.job_cooldown_s > now => Some((
                        SkipCode::JobCooldown,
                        format!(
                            "job {} moved {} s ago; job cooldown {} s",
                            cv.job_id,
                            now.saturating_sub(t),
                            p.limits.job_cooldown_s
                        ),
                    )),
                    _ => None,
                }
            };
            match skip {
                Some((code, reason)) => self.skip(src, Some(c), code, reason),
                None => cands.push(c),
            }
        }
        let cs = &view.containers;
        match p.selection.order {
            ContainerOrder::MostCpus => {
                cands.sort_by(|&a, &b| cs[b].cpus.cmp(&cs[a].cpus).then(cs[a].id.cmp(&cs[b].id)))
            }
            ContainerOrder::LeastMemory => cands.sort_by(|&a, &b| {
                cs[a]
                    .rss_mb
                    .cmp(&cs[b].rss_mb)
                    .then(cs[a].id.cmp(&cs[b].id))
            }),
        }
        let order_txt = match p.selection.order {
            ContainerOrder::MostCpus => "most CPUs first",
            ContainerOrder::LeastMemory => "least memory first",
        };
        let mut moved_here = 0u32;
        for (pos, &c) in cands.iter().enumerate() {
            let cv = &view.containers[c];
            let auto = self.automatic();
            let l = &p.limits;
            let counts = self.ledger.view(auto);
            if self.cycle >= l.max_per_cycle {
                return Err(Stop::Policy(
                    SkipCode::CycleLimit,
                    format!("policy reached max_per_cycle = {}", l.max_per_cycle),
                ));
            }
            if counts.sum(|x| x.total) >= l.max_concurrent {
                return Err(Stop::Policy(
                    SkipCode::ConcurrencyLimit,
                    format!(
                        "{} migrations in flight or planned; max_concurrent = {}",
                        counts.sum(|x| x.total),
                        l.max_concurrent
                    ),
                ));
            }
            if p.selection.max_per_node > 0 && moved_here >= p.selection.max_per_node {
                self.skip(
                    src,
                    Some(c),
                    SkipCode::NodeQuotaReached,
                    format!(
                        "max_per_node = {} move(s) already planned from this node",
                        p.selection.max_per_node
                    ),
                );
                continue;
            }
            if counts.sum(|x| x.per_source[src]) >= l.max_per_source {
                self.skip(
                    src,
                    Some(c),
                    SkipCode::SourceLimit,
                    format!(
                        "source has {} migration(s) in flight or planned; max_per_source = {}",
                        counts.sum(|x| x.per_source[src]),
                        l.max_per_source
                    ),
                );
                continue;
            }
            let source_modes: Vec<MigrationMode> = p
                .migration
                .modes
                .iter()
                .copied()
                .filter(|m| node.supports(*m))
                .filter(|m| {
                    p.migration
                        .max_downtime_ms
                        .is_none_or(|max| p.migration.estimated_downtime_ms(*m, cv.rss_mb) <= max)
                })
                .collect();
            if source_modes.is_empty() {
                self.skip(src, Some(c), SkipCode::NoSourceMode, format!(
                    "no allowed mode ({}) is supported by the source within max_downtime_ms for {} MiB",
                    p.migration.modes.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "), cv.rss_mb));
                continue;
            }
            if self.searches >= SEARCH_BUDGET {
                self.skip(
                    src,
                    Some(c),
                    SkipCode::SearchBudget,
                    format!("policy ran {SEARCH_BUDGET} destination searches this evaluation"),
                );
                continue;
            }
            self.searches += 1;
            let search = self.search(c, src, &source_modes, s);
            let Some(best) = search.ranked.first().cloned() else {
                let mut reasons: Vec<String> = search
                    .rejected
                    .iter()
                    .map(|(k, n)| format!("{n} {}", code_text(*k)))
                    .collect();
                if reasons.is_empty() {
                    reasons.push("no other node".into());
                }
                self.skips.push(Skip {
                    policy: p.name.clone(),
                    node: node.name.clone(),
                    container: Some(cv.id.clone()),
                    code: SkipCode::NoDestination,
                    reason: format!("no destination fits: {}", reasons.join(", ")),
                    search: Some(search),
                });
                continue;
            };
            let Some(&dst) = self.idx.node_of.get(best.node.as_str()) else {
                continue;
            };
            self.ledger.commit(auto, c, cv, src, dst);
            self.cycle += 1;
            moved_here += 1;
            let action = match p.action {
                Action::Automatic => DecisionAction::Migrate,
                Action::Recommend => DecisionAction::Recommend,
                Action::DryRun => DecisionAction::DryRun,
            };
            if auto {
                self.state
                    .record_move(cv.job_id, &node.name, &best.node, now);
            }
            let downtime = p.migration.estimated_downtime_ms(best.mode, cv.rss_mb);
            let summary = format!(
                "{}: move {} (job {}.{}, {} CPUs, {} MiB) from {} to {} by {}: {}; {}",
                p.name,
                cv.id,
                cv.job_id,
                cv.step_id,
                cv.cpus,
                cv.rss_mb,
                node.name,
                best.node,
                best.mode,
                trigger_text(&s.trigger),
                prefer_text(p.destination.prefer, &view.nodes[dst], search.fitting),
            );
            let mode_txt = format!(
                "{} is the first of [{}] supported by both nodes within limits; estimated downtime {} ms",
                best.mode,
                p.migration.modes.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "),
                downtime
            );
            tracing::info!(policy = %p.name, container = %cv.id, job = cv.job_id, step = cv.step_id,
                source = %node.name, destination = %best.node, mode = %best.mode, action = ?action, "planned migration");
            self.decisions.push(Decision {
                container: cv.id.clone(),
                job_id: cv.job_id,
                step_id: cv.step_id,
                source: node.name.clone(),
                destination: best.node.clone(),
                mode: best.mode,
                policy: p.name.clone(),
                kind: p.kind,
                priority: p.priority,
                action,
                estimated_downtime_ms: downtime,
                timeout_s: p.migration.timeout_s(cv.rss_mb),
                why: Why {
                    summary,
                    trigger: s.trigger.clone(),
                    selection: format!(
                        "candidate {} of {} on the source ({order_txt})",
                        pos + 1,
                        cands.len()
                    ),
                    mode: mode_txt,
                    destination: search,
                },
            });
        }
        Ok(())
    }

    /// Scans every node as a destination for container `c` (in parallel) and ranks those that fit.
    fn search(
        &self,
        c: usize,
        src: usize,
        source_modes: &[MigrationMode],
        s: &Source,
    ) -> DestinationSearch {
        let view = self.view;
        let cv = &view.containers[c];
        let counts = self.ledger.view(self.automatic());
        let ctx = FitCtx {
            p: self.policy,
            cv,
            counts,
            modes: source_modes,
            idx: self.idx,
            nodes: &view.nodes,
            dest: &self.dest,
            relieved: self.relieved,
            part: match self.idx.part_ids.get(cv.partition.as_str()) {
                Some(&b) if b < MASK_BITS => PartCheck::Bit(1 << b),
                Some(_) => PartCheck::Slow,
                None => PartCheck::Nowhere,
            },
            now: view.now,
            thermal_limit: match &s.trigger {
                TriggerReason::Threshold {
                    metric: Metric::TemperatureC,
                    low,
                    ..
                } => Some(low - self.policy.destination.temperature_headroom_c),
                _ => None,
            },
            load_limit: match &s.trigger {
                TriggerReason::Threshold {
                    metric: Metric::LoadPerCpu,
                    low,
                    ..
                } => Some(*low),
                _ => None,
            },
        };
        // Fixed-size chunks with a plain loop each: a per-node rayon fold moves the accumulator
        // through every call, which costs more than the fit check itself.
        let n = view.nodes.len();
        let acc = (0..n.div_ceil(SCAN_CHUNK))
            .into_par_iter()
            .map(|chunk| {
                let mut acc = Acc::default();
                for i in chunk * SCAN_CHUNK..n.min((chunk + 1) * SCAN_CHUNK) {
                    if i == src {
                        continue;
                    }
                    acc.candidates += 1;
                    match ctx.fit(i) {
                        Ok((score, mode)) => acc.add_fit(score, self.idx.rank[i], i, mode),
                        Err(r) => acc.add_reject(r, self.idx.rank[i], i),
                    }
                }
                acc
            })
            .reduce(Acc::default, Acc::merge);
        DestinationSearch {
            candidates: acc.candidates,
            fitting: acc.fitting,
            ranked: acc
                .best
                .iter()
                .map(|&(score, _, i, mode)| RankedCandidate {
                    node: view.nodes[i].name.clone(),
                    mode,
                    score,
                })
                .collect(),
            rejected: acc
                .counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (ALL_CODES[k], *n))
                .collect(),
            rejected_examples: acc
                .examples
                .iter()
                .map(|&(_, i, r)| RejectedCandidate {
                    node: view.nodes[i].name.clone(),
                    code: r.code(),
                    reason: r.text(self.policy, self.set),
                })
                .collect(),
        }
    }
}

/// Why one node does not fit; numbers kept so text is only built for the listed examples.
#[derive(Debug, Clone, Copy)]
enum Reject {
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

const ALL_CODES: [RejectCode; 13] = [
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
    fn code(self) -> RejectCode {
        ALL_CODES[self.slot()]
    }

    fn slot(self) -> usize {
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

    fn text(self, p: &Policy, set: &PolicySet) -> String {
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

fn code_text(c: RejectCode) -> &'static str {
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
enum PartCheck {
    Bit(u64),
    /// Interned past MASK_BITS: compare strings.
    Slow,
    /// No node has the partition.
    Nowhere,
}

struct FitCtx<'a> {
    p: &'a Policy,
    cv: &'a ContainerView,
    counts: View2<'a>,
    modes: &'a [MigrationMode],
    idx: &'a Index<'a>,
    nodes: &'a [NodeView],
    dest: &'a DestStatic,
    relieved: &'a [Option<u32>],
    part: PartCheck,
    now: Timestamp,
    /// Thermal policies: the destination must be at or below this temperature.
    thermal_limit: Option<f64>,
    /// Load policies: the destination's projected load per CPU must stay at or below this.
    load_limit: Option<f64>,
}

impl FitCtx<'_> {
    fn fit(&self, i: usize) -> Result<([f64; 2], MigrationMode), Reject> {
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
struct Acc {
    candidates: usize,
    fitting: usize,
    /// (score, name rank, node, mode), best first, at most RUNNERS_UP.
    best: Vec<([f64; 2], usize, usize, MigrationMode)>,
    counts: [u32; ALL_CODES.len()],
    /// (name rank, node, reason), lowest rank first, at most REJECT_EXAMPLES.
    examples: Vec<(usize, usize, Reject)>,
}

fn better(a: &([f64; 2], usize), b: &([f64; 2], usize)) -> std::cmp::Ordering {
    a.0[0]
        .total_cmp(&b.0[0])
        .then(a.0[1].total_cmp(&b.0[1]))
        .then(a.1.cmp(&b.1))
}

impl Acc {
    fn add_fit(&mut self, score: [f64; 2], rank: usize, i: usize, mode: MigrationMode) {
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

    fn add_reject(&mut self, r: Reject, rank: usize, i: usize) {
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

    fn merge(mut self, other: Acc) -> Acc {
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

fn fmt_value(t: &TriggerReason) -> String {
    match t {
        TriggerReason::Threshold {
            metric: Metric::TemperatureC,
            value,
            ..
        } => format!("temperature {value:.1} °C"),
        TriggerReason::Threshold {
            metric: Metric::LoadPerCpu,
            value,
            ..
        } => format!("load per CPU {value:.2}"),
        TriggerReason::NodeState { states } => format!(
            "node state {}",
            states
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("+")
        ),
    }
}

fn trigger_text(t: &TriggerReason) -> String {
    match t {
        TriggerReason::NodeState { .. } => fmt_value(t),
        TriggerReason::Threshold {
            high,
            low,
            samples,
            mean,
            ..
        } => {
            let m = mean
                .map(|m| format!(", cluster mean {m:.2}"))
                .unwrap_or_default();
            format!(
                "{} reached high {high:.2} (releases below {low:.2}{m}) for {samples} sample(s)",
                fmt_value(t)
            )
        }
    }
}

fn prefer_text(p: Prefer, n: &NodeView, fitting: usize) -> String {
    let what = match p {
        Prefer::Coolest => format!(
            "coolest fitting node ({})",
            n.temperature_c
                .map_or("no reading".to_owned(), |t| format!("{t:.1} °C"))
        ),
        Prefer::LeastLoaded => format!(
            "least loaded fitting node (load per CPU {:.2} now)",
            n.load_per_cpu()
        ),
        Prefer::MostFree => format!(
            "fitting node with most free CPUs ({} free now)",
            n.cpus_total.saturating_sub(n.cpus_alloc)
        ),
    };
    format!("{what} of {fitting}")
}
