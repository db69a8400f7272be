//! `plan()`: evaluates every enabled policy in priority order against one cluster view.
//!
//! Determinism: nodes are ranked by name once; every choice breaks ties on that rank, containers
//! on their id, so the output depends only on the inputs (rayon only splits the destination scan,
//! whose reduction is order-independent).

use rayon::prelude::*;

use crate::model::{ClusterView, ContainerView, MigrationMode, NodeView, Timestamp};
use crate::plan::{
    Decision, DecisionAction, DestinationSearch, Metric, Plan, PolicyReport, RankedCandidate,
    RejectCode, RejectedCandidate, Skip, SkipCode, TriggerReason, Why,
};
use crate::policy::{Action, Basis, ContainerOrder, Policy, PolicyKind, PolicySet, Prefer};
use crate::state::{NodeTrack, PolicyState};

mod index;
mod ledger;
mod scan;
mod triggers;

use index::*;
use ledger::*;
use scan::*;
use triggers::*;

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
                .map(|i| self.last_node_move(i).map_or(0, |t| t.saturating_add(cd)))
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
                let left = t
                    .saturating_add(p.limits.node_cooldown_s)
                    .saturating_sub(now);
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
                    Some(t) if t.saturating_add(p.limits.job_cooldown_s) > now => Some((
                        SkipCode::JobCooldown,
                        format!(
                            "job {} moved {} s ago; job cooldown {} s ({} s left)",
                            cv.job_id,
                            now.saturating_sub(t),
                            p.limits.job_cooldown_s,
                            t.saturating_add(p.limits.job_cooldown_s)
                                .saturating_sub(now)
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
                // Each rejected node by name (the first REJECT_EXAMPLES), then the counts, so
                // that an operator sees why node3 was not taken without a debug log.
                let mut reasons: Vec<String> = search
                    .rejected_examples
                    .iter()
                    .map(|r| format!("{}: {}", r.node, r.reason))
                    .collect();
                let named = search.rejected_examples.len() as u32;
                let total: u32 = search.rejected.values().sum();
                if total > named {
                    let counts: Vec<String> = search
                        .rejected
                        .iter()
                        .map(|(k, n)| format!("{n} {}", code_text(*k)))
                        .collect();
                    reasons.push(format!(
                        "{} more; in all {}",
                        total - named,
                        counts.join(", ")
                    ));
                }
                if reasons.is_empty() {
                    reasons.push("no other node".into());
                }
                self.skips.push(Skip {
                    policy: p.name.clone(),
                    node: node.name.clone(),
                    container: Some(cv.id.clone()),
                    code: SkipCode::NoDestination,
                    reason: format!("no destination fits: {}", reasons.join("; ")),
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
                // Later searches of this policy see the new cooldowns too.
                if !self.dest.cooldown_until.is_empty() {
                    let until = now.saturating_add(p.limits.node_cooldown_s);
                    self.dest.cooldown_until[src] = until;
                    self.dest.cooldown_until[dst] = until;
                }
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
            // DEBUG: the planner runs at every evaluation; the controller logs each decision
            // once at INFO when it journals it.
            tracing::debug!(policy = %p.name, container = %cv.id, job = cv.job_id, step = cv.step_id,
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
