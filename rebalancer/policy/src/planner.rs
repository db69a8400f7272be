//! `plan()`: evaluates every enabled policy in priority order against one cluster view.
//!
//! Determinism: nodes are ranked by name once; every choice breaks ties on that rank, containers
//! on their id, so the output depends only on the inputs (rayon only splits the destination scan,
//! whose reduction is order-independent).

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use crate::model::{ClusterView, ContainerView, MigrationMode, NodeView, Timestamp};
use crate::plan::{
    Decision, DecisionAction, DestinationSearch, Metric, Plan, PolicyReport, RankedCandidate,
    RejectCode, RejectedCandidate, Skip, SkipCode, TriggerReason, Why,
};
use crate::policy::{Action, Basis, ContainerOrder, Policy, PolicyKind, PolicySet, Prefer};
use crate::state::{NodeTrack, PolicyState};

/// Fitting destinations listed in a decision's reasons.
pub const RUNNERS_UP: usize = 3;
/// Rejected destinations listed by name in a decision's or skip's reasons (all are counted).
pub const REJECT_EXAMPLES: usize = 8;
/// Destination searches one policy may run per evaluation; bounds the cost when nothing fits.
pub const SEARCH_BUDGET: usize = 128;

/// Evaluates `set` against `view`, updating `state` (hysteresis, and cooldowns of automatic moves).
pub fn plan(set: &PolicySet, view: &ClusterView, state: &mut PolicyState) -> Plan {
    let idx = Index::new(view);
    let mut ledger = Ledger::new(view, &idx);
    let mut out = Plan {
        evaluated_at: view.now,
        ..Plan::default()
    };
    let mut hysteresis = std::collections::BTreeMap::new();
    let mut horizon = 0;
    for policy in set.policies() {
        horizon = horizon
            .max(policy.limits.job_cooldown_s)
            .max(policy.limits.node_cooldown_s);
        if !policy.enabled {
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
        }
        let tracks = state.hysteresis.remove(&policy.name).unwrap_or_default();
        let mut run = PolicyRun {
            policy,
            view,
            idx: &idx,
            state,
            ledger: &mut ledger,
            decisions: Vec::new(),
            skips: Vec::new(),
            searches: 0,
            cycle: 0,
        };
        let (report, tracks) = run.evaluate(tracks);
        let PolicyRun {
            decisions, skips, ..
        } = run;
        tracing::debug!(
            policy = %policy.name,
            decisions = decisions.len(),
            skips = skips.len(),
            active = report.nodes_active,
            "policy evaluated"
        );
        out.decisions.extend(decisions);
        out.skips.extend(skips);
        out.reports.push(report);
        if !tracks.is_empty() {
            hysteresis.insert(policy.name.clone(), tracks);
        }
    }
    // Policies that were removed or disabled lose their hysteresis progress.
    state.hysteresis = hysteresis;
    state.prune_moves(view.now, horizon);
    out
}

/// Lookups built once per evaluation.
struct Index<'v> {
    /// Node indices sorted by name; `rank[i]` is node i's position.
    by_name: Vec<usize>,
    rank: Vec<usize>,
    node_of: HashMap<&'v str, usize>,
    /// Container indices per node, sorted by container id.
    containers_on: Vec<Vec<usize>>,
    in_flight: HashSet<&'v str>,
    /// Last move per job and node from the view (container.last_moved, in-flight starts).
    job_moved: HashMap<u64, Timestamp>,
    node_moved: Vec<Option<Timestamp>>,
}

impl<'v> Index<'v> {
    fn new(view: &'v ClusterView) -> Self {
        let n = view.nodes.len();
        let mut by_name: Vec<usize> = (0..n).collect();
        by_name.sort_by(|&a, &b| view.nodes[a].name.cmp(&view.nodes[b].name));
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
        let mut job_moved: HashMap<u64, Timestamp> = HashMap::new();
        for (ci, c) in view.containers.iter().enumerate() {
            if let Some(&ni) = node_of.get(c.node.as_str()) {
                containers_on[ni].push(ci);
            }
            if let Some(t) = c.last_moved {
                let e = job_moved.entry(c.job_id).or_insert(t);
                *e = (*e).max(t);
            }
        }
        containers_on
            .par_iter_mut()
            .for_each(|v| v.sort_by(|&a, &b| view.containers[a].id.cmp(&view.containers[b].id)));
        let mut node_moved = vec![None; n];
        let mut in_flight = HashSet::new();
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
        Index {
            by_name,
            rank,
            node_of,
            containers_on,
            in_flight,
            job_moved,
            node_moved,
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
            claimed: HashSet::new(),
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
    policy: &'a Policy,
    view: &'v ClusterView,
    idx: &'a Index<'v>,
    state: &'a mut PolicyState,
    ledger: &'a mut Ledger,
    decisions: Vec<Decision>,
    skips: Vec<Skip>,
    searches: usize,
    cycle: u32,
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

    fn metric(&self) -> Option<Metric> {
        match self.policy.kind {
            PolicyKind::Drain => None,
            PolicyKind::Thermal => Some(Metric::TemperatureC),
            PolicyKind::Load => Some(Metric::LoadPerCpu),
        }
    }

    fn value(metric: Metric, n: &NodeView) -> Option<f64> {
        match metric {
            Metric::TemperatureC => n.temperature_c.filter(|t| t.is_finite()),
            Metric::LoadPerCpu => Some(n.load_per_cpu()).filter(|l| l.is_finite()),
        }
    }

    fn node_in_scope(&self, n: &NodeView) -> bool {
        let s = &self.policy.scope;
        s.nodes.admits(&n.name)
            && (s.partitions.include.is_empty()
                || n.partitions
                    .iter()
                    .any(|p| s.partitions.include.contains(p)))
    }

    fn evaluate(
        &mut self,
        mut tracks: std::collections::BTreeMap<String, NodeTrack>,
    ) -> (PolicyReport, std::collections::BTreeMap<String, NodeTrack>) {
        let p = self.policy;
        let view = self.view;
        let now = view.now;
        let in_scope: Vec<usize> = self
            .idx
            .by_name
            .iter()
            .copied()
            .filter(|&i| self.node_in_scope(&view.nodes[i]))
            .collect();
        let metric = self.metric();
        let mean = metric.and_then(|m| {
            let vals: Vec<f64> = in_scope
                .iter()
                .filter(|&&i| !view.nodes[i].flags.down)
                .filter_map(|&i| Self::value(m, &view.nodes[i]))
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
                    let Some(v) = Self::value(m, node) else {
                        quiet += 1;
                        if prev.is_some() {
                            self.skip(
                                ni,
                                None,
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
                    self.skip(ni, None, SkipCode::InBand, format!(
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
                self.skip(
                    ni,
                    None,
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
        let active = sources.len();

        let before = self.decisions.len();
        'sources: for s in &sources {
            match self.act_on(s) {
                Ok(()) => {}
                Err(Stop::Policy(code, reason)) => {
                    // Name the nodes left untouched so the report stays complete.
                    let from = sources.iter().position(|x| x.node == s.node).unwrap_or(0);
                    for rest in &sources[from..] {
                        self.skip(rest.node, None, code, reason.clone());
                    }
                    break 'sources;
                }
            }
        }
        let report = PolicyReport {
            policy: p.name.clone(),
            kind: p.kind,
            enabled: true,
            nodes_in_scope: in_scope.len(),
            mean,
            nodes_active: active,
            nodes_pending: pending,
            nodes_quiet: quiet,
            decisions: self.decisions.len() - before,
            skips: self.skips.len(),
        };
        (report, new_tracks)
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
        let mut cands: Vec<usize> = Vec::new();
        for &c in &self.idx.containers_on[src] {
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
            state: self.state,
            idx: self.idx,
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
        let acc = view
            .nodes
            .par_iter()
            .enumerate()
            .filter(|(i, _)| *i != src)
            .fold(Acc::default, |mut acc, (i, n)| {
                acc.candidates += 1;
                match ctx.fit(i, n) {
                    Ok((score, mode)) => acc.add_fit(score, self.idx.rank[i], i, mode),
                    Err(r) => acc.add_reject(r, self.idx.rank[i], i),
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
                    reason: r.text(self.policy),
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
    Partition,
    Feature(usize),
    Cooldown(u64),
    DestLimit(u32),
    Cpus { free: i64, need: u32 },
    Memory { free: i64, need: u64 },
    Hot { temp: f64, limit: f64 },
    UnknownTemp,
    Loaded { projected: f64, limit: f64 },
    NoMode,
}

const ALL_CODES: [RejectCode; 12] = [
    RejectCode::OutOfDestinationScope,
    RejectCode::Unavailable,
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
            Reject::Partition => 2,
            Reject::Feature(_) => 3,
            Reject::Cooldown(_) => 4,
            Reject::DestLimit(_) => 5,
            Reject::Cpus { .. } => 6,
            Reject::Memory { .. } => 7,
            Reject::Hot { .. } => 8,
            Reject::UnknownTemp => 9,
            Reject::Loaded { .. } => 10,
            Reject::NoMode => 11,
        }
    }

    fn text(self, p: &Policy) -> String {
        match self {
            Reject::Scope => "outside [destination] nodes".into(),
            Reject::Unavailable(s) => format!("node is {s}"),
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

struct FitCtx<'a> {
    p: &'a Policy,
    cv: &'a ContainerView,
    counts: View2<'a>,
    modes: &'a [MigrationMode],
    state: &'a PolicyState,
    idx: &'a Index<'a>,
    now: Timestamp,
    /// Thermal policies: the destination must be at or below this temperature.
    thermal_limit: Option<f64>,
    /// Load policies: the destination's projected load per CPU must stay at or below this.
    load_limit: Option<f64>,
}

impl FitCtx<'_> {
    fn fit(&self, i: usize, n: &NodeView) -> Result<([f64; 2], MigrationMode), Reject> {
        let d = &self.p.destination;
        if !d.nodes.admits(&n.name) {
            return Err(Reject::Scope);
        }
        if let Some(s) = n.flags.unavailable() {
            return Err(Reject::Unavailable(s));
        }
        if d.same_partition && !n.partitions.contains(&self.cv.partition) {
            return Err(Reject::Partition);
        }
        if let Some(f) = d
            .require_features
            .iter()
            .position(|f| !n.features.contains(f))
        {
            return Err(Reject::Feature(f));
        }
        if self.p.limits.node_cooldown_s > 0 {
            let by_view = self.idx.node_moved[i];
            let by_state = if self.state.node_moved.is_empty() {
                None
            } else {
                self.state.node_moved.get(&n.name).copied()
            };
            if let Some(t) = by_view.max(by_state) {
                let left = (t + self.p.limits.node_cooldown_s).saturating_sub(self.now);
                if left > 0 {
                    return Err(Reject::Cooldown(left));
                }
            }
        }
        let incoming = self.counts.sum(|l| l.per_dest[i]);
        if incoming >= self.p.limits.max_per_destination {
            return Err(Reject::DestLimit(incoming));
        }
        let free_cpus = i64::from(n.cpus_total)
            - i64::from(n.cpus_alloc)
            - i64::from(self.counts.sum(|l| l.cpus[i]));
        let need_cpus = self.cv.cpus + d.min_free_cpus;
        if free_cpus < i64::from(need_cpus) {
            return Err(Reject::Cpus {
                free: free_cpus,
                need: need_cpus,
            });
        }
        let free_mem =
            n.mem_total_mb as i64 - n.mem_alloc_mb as i64 - self.counts.sum(|l| l.mem_mb[i]) as i64;
        let need_mem = self.cv.rss_mb + d.min_free_mem_mb;
        if free_mem < need_mem as i64 {
            return Err(Reject::Memory {
                free: free_mem,
                need: need_mem,
            });
        }
        if let Some(max) = d.max_temperature_c {
            match n.temperature_c {
                Some(t) if t > max => {
                    return Err(Reject::Hot {
                        temp: t,
                        limit: max,
                    })
                }
                _ => {}
            }
        }
        if let Some(limit) = self.thermal_limit {
            match n.temperature_c {
                None => return Err(Reject::UnknownTemp),
                Some(t) if t > limit => return Err(Reject::Hot { temp: t, limit }),
                _ => {}
            }
        }
        // Assume a moved container keeps all its CPUs busy.
        let reserved = self.counts.sum(|l| l.cpus[i]);
        let projected = if n.cpus_total == 0 {
            f64::INFINITY
        } else {
            (n.load + f64::from(reserved) + f64::from(self.cv.cpus)) / f64::from(n.cpus_total)
        };
        for limit in [d.max_load_per_cpu, self.load_limit].into_iter().flatten() {
            if projected > limit {
                return Err(Reject::Loaded { projected, limit });
            }
        }
        let Some(mode) = self.modes.iter().copied().find(|m| n.supports(*m)) else {
            return Err(Reject::NoMode);
        };
        let free_after = (free_cpus - i64::from(self.cv.cpus)) as f64;
        let score = match d.prefer {
            Prefer::Coolest => [n.temperature_c.unwrap_or(f64::INFINITY), -free_after],
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
    counts: [u32; 12],
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
