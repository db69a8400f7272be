//! Phase 1: hysteresis and the active source nodes of each policy.

use super::*;

/// What phase 1 found for one policy.
pub(super) struct Triggered {
    pub(super) report: PolicyReport,
    pub(super) tracks: std::collections::BTreeMap<String, NodeTrack>,
    /// Active source nodes, most urgent first.
    pub(super) sources: Vec<Source>,
    pub(super) skips: Vec<Skip>,
}

pub(super) fn metric_value(metric: Metric, n: &NodeView) -> Option<f64> {
    match metric {
        Metric::TemperatureC => n.temperature_c.filter(|t| t.is_finite()),
        Metric::LoadPerCpu => Some(n.load_per_cpu()).filter(|l| l.is_finite()),
    }
}

pub(super) fn node_in_scope(p: &Policy, n: &NodeView) -> bool {
    let s = &p.scope;
    s.nodes.admits(&n.name)
        && (s.partitions.include.is_empty()
            || n.partitions
                .iter()
                .any(|x| s.partitions.include.contains(x)))
}

/// Phase 1 for one policy: hysteresis update and the list of active source nodes.
pub(super) fn triggers(
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
pub(super) struct Source {
    pub(super) node: usize,
    pub(super) trigger: TriggerReason,
    /// Sort key: most urgent first.
    pub(super) urgency: f64,
}

/// Trigger thresholds converted to the metric's absolute scale.
#[derive(Clone, Copy)]
pub(super) struct Thresholds {
    pub(super) high: f64,
    pub(super) low: f64,
}

pub(super) fn fmt_value(t: &TriggerReason) -> String {
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
