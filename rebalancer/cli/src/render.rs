//! Tables (default), `key=value` detail blocks (one named object) and JSON (`--json`).

use rebalancer_proto::control::{
    DecisionRecord, MigrationEntry, NodeStatus, PlanItem, PolicyStatus, Unmoved,
};
use rebalancer_proto::{ContainerInfo, MigrationRecord, MigrationState, Millis};
use serde_json::Value;

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            s.push_str(c);
            if i + 1 < n {
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// scontrol-style `Key=Value` lines of one object (nested keys dotted, lists comma-joined).
pub fn detail(v: &Value) -> String {
    fn flat(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flat(&key, x, out);
                }
            }
            Value::Array(a) if a.iter().all(|x| !x.is_object()) => {
                let items: Vec<String> = a.iter().map(scalar).collect();
                out.push((
                    prefix.to_string(),
                    if items.is_empty() {
                        "-".into()
                    } else {
                        items.join(",")
                    },
                ));
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    flat(&format!("{prefix}[{i}]"), x, out);
                }
            }
            Value::Number(n) if is_time_key(prefix) && n.as_u64().is_some() => {
                out.push((prefix.to_string(), time_ms(n.as_u64().unwrap_or_default())))
            }
            other => out.push((prefix.to_string(), scalar(other))),
        }
    }
    // Times on the wire are Unix milliseconds (`at`, `started_at`, ...): shown as ISO 8601.
    fn is_time_key(key: &str) -> bool {
        let last = key.rsplit(['.', ']']).next().unwrap_or(key);
        last == "at" || last.ends_with("_at")
    }
    fn scalar(v: &Value) -> String {
        match v {
            Value::Null => "-".into(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    let mut pairs = Vec::new();
    flat("", v, &mut pairs);
    let mut out = String::new();
    let mut width = 0;
    for (k, val) in pairs {
        let item = format!("{k}={val}");
        if width > 0 && width + item.len() + 1 > 100 {
            out.push('\n');
            width = 0;
        }
        if width == 0 {
            out.push_str("   ");
            width = 3;
        } else {
            out.push(' ');
            width += 1;
        }
        width += item.len();
        out.push_str(&item);
    }
    out.push('\n');
    out
}

/// `2026-11-24T20:01:02Z` from Unix milliseconds.
pub fn time(ms: Millis) -> String {
    rebalancer_proto::iso8601(ms)
}

pub fn bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", U[i])
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

/// A migration's outcome as the tables show it: its state, or `cancelled` for a rollback an
/// operator's cancel caused (`cancelled_by`).
pub fn outcome(r: &MigrationRecord) -> &'static str {
    match (r.state, &r.cancelled_by) {
        (MigrationState::RolledBack, Some(_)) => "cancelled",
        (s, _) => s.as_str(),
    }
}

/// `2026-11-24T20:01:02.123Z`: phases are milliseconds apart.
pub fn time_ms(ms: Millis) -> String {
    let t = time(ms);
    format!("{}.{:03}Z", t.trim_end_matches('Z'), ms % 1000)
}

/// `325 ms` below ten seconds, `12.4 s` above.
pub fn duration(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// One line of at most `max` characters for a table cell; the detail view shows all of it.
pub fn clip(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        line
    } else {
        let mut s: String = line.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// Why a migration ended as it did: its error, or `-` when it succeeded or still runs.
pub fn migration_reason(r: &MigrationRecord) -> String {
    match (&r.error, r.state) {
        (Some(e), _) => e.clone(),
        (None, MigrationState::RolledBack | MigrationState::Failed) => "no detail recorded".into(),
        _ => "-".into(),
    }
}

/// A decision's outcome and its reason. A started decision takes its migration's state once
/// known, so that a rolled-back move does not read `started`.
pub fn decision_result(d: &DecisionRecord, m: Option<&MigrationRecord>) -> (String, String) {
    match (d.outcome, m) {
        (rebalancer_proto::control::DecisionOutcome::Started, Some(r)) => {
            let reason = match r.state {
                MigrationState::Succeeded => match r.stats.downtime_ms {
                    Some(ms) => format!("moved, downtime {ms} ms"),
                    None => "moved".into(),
                },
                MigrationState::Pending | MigrationState::Running => r
                    .phases
                    .last()
                    .map(|p| format!("in phase {}", p.phase))
                    .unwrap_or_else(|| "starting".into()),
                _ => migration_reason(r),
            };
            (outcome(r).into(), reason)
        }
        (o, _) => (
            o.as_str().into(),
            d.detail.clone().unwrap_or_else(|| "-".into()),
        ),
    }
}

fn json_str<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

pub fn nodes(ns: &[NodeStatus]) -> String {
    let rows = ns
        .iter()
        .map(|n| {
            let m = n.metrics.as_ref();
            vec![
                n.name.clone(),
                n.slurm_state.clone(),
                json_str(&n.agent),
                format!("{}/{}", n.cpus_alloc, n.cpus_total),
                opt(m.map(|m| format!("{:.2}", m.load1))),
                opt(m.and_then(|m| m.temperature_c).map(|t| format!("{t:.0}C"))),
                opt(m.map(|m| bytes(m.mem_available_bytes))),
                n.containers.to_string(),
                n.in_flight.to_string(),
                n.capabilities
                    .as_ref()
                    .map(|c| {
                        c.modes
                            .iter()
                            .map(|m| m.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "NODE",
            "STATE",
            "AGENT",
            "CPUS(A/T)",
            "LOAD",
            "TEMP",
            "MEM_AVAIL",
            "CONTAINERS",
            "MIGRATING",
            "MODES",
        ],
        &rows,
    )
}

/// The Slurm step a container runs in now; after a move the destination's restore step, with
/// the step the user started: `8 (from 0)`.
pub fn container_step(c: &ContainerInfo) -> String {
    match (&c.task, &c.runs_in) {
        (Some(t), Some(now)) if now.step_id != t.step_id => {
            format!("{} (from {})", now.step_id, t.step_id)
        }
        (_, Some(now)) => now.step_id.to_string(),
        (t, None) => opt(t.as_ref().map(|t| t.step_id)),
    }
}

pub fn containers(cs: &[ContainerInfo]) -> String {
    let rows = cs
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                opt(c.task.as_ref().map(|t| t.job_id)),
                container_step(c),
                c.uid.to_string(),
                c.node.clone(),
                json_str(&c.state),
                bytes(c.rss_bytes),
                c.address.clone(),
                opt(c.class.clone()),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "CONTAINER",
            "JOB",
            "STEP",
            "UID",
            "NODE",
            "STATE",
            "RSS",
            "ADDRESS",
            "CLASS",
        ],
        &rows,
    )
}

pub fn migrations(ms: &[MigrationEntry]) -> String {
    let rows = ms
        .iter()
        .map(|e| {
            let r = &e.record;
            vec![
                short_id(&r.id),
                r.container.clone(),
                r.source.clone(),
                r.destination.clone(),
                r.mode.unwrap_or(r.requested_mode).to_string(),
                outcome(r).into(),
                r.phases
                    .last()
                    .map(|p| p.phase.to_string())
                    .unwrap_or_else(|| "-".into()),
                opt(r.stats.downtime_ms.map(|d| format!("{d}ms"))),
                bytes(r.stats.bytes_sent),
                e.policy.clone(),
                time(r.started_at),
                clip(&migration_reason(r), 60),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "MIGRATION",
            "CONTAINER",
            "SOURCE",
            "DEST",
            "MODE",
            "STATE",
            "PHASE",
            "DOWNTIME",
            "BYTES",
            "POLICY",
            "STARTED",
            "REASON",
        ],
        &rows,
    )
}

pub fn short_id(id: &str) -> String {
    id.chars().take(8).collect()
}

pub fn policies(ps: &[PolicyStatus]) -> String {
    let rows = ps
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.kind.clone(),
                p.action.clone(),
                p.state.as_str().into(),
                p.priority.to_string(),
                p.decisions.to_string(),
                p.source.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "POLICY",
            "KIND",
            "ACTION",
            "STATE",
            "PRIORITY",
            "DECISIONS",
            "SOURCE",
        ],
        &rows,
    )
}

/// Decisions with their outcome: `migrations` maps a migration id to its record, so that a
/// started decision shows how its migration ended and why.
pub fn history(
    ds: &[DecisionRecord],
    migrations: &std::collections::HashMap<String, MigrationRecord>,
) -> String {
    let rows = ds
        .iter()
        .map(|d| {
            let m = d.migration.as_ref().and_then(|id| migrations.get(id));
            let (outcome, reason) = decision_result(d, m);
            vec![
                d.seq.to_string(),
                time(d.at),
                d.policy.clone(),
                d.container.clone(),
                format!("{}->{}", d.source, d.destination),
                d.mode.to_string(),
                outcome,
                opt(d.migration.as_deref().map(short_id)),
                clip(&reason, 60),
                clip(&d.why, 80),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "SEQ",
            "TIME",
            "POLICY",
            "CONTAINER",
            "MOVE",
            "MODE",
            "OUTCOME",
            "MIGRATION",
            "REASON",
            "WHY",
        ],
        &rows,
    )
}

/// `show migration ID`: scontrol-style header lines, then a table of the phases with ISO-8601
/// times and durations, then the pre-copy rounds.
pub fn migration_detail(e: &MigrationEntry) -> String {
    let r = &e.record;
    let mut lines: Vec<Vec<String>> = Vec::new();
    let task = r
        .task
        .as_ref()
        .map(|t| {
            vec![
                format!("JobId={}", t.job_id),
                format!("StepId={}.{}", t.job_id, t.step_id),
                format!("Task={}", t.task_id),
            ]
        })
        .unwrap_or_default();
    let mut l1 = vec![format!("Container={}", r.container)];
    l1.extend(task);
    l1.push(format!("Policy={}", e.policy));
    l1.push(format!("Decision={}", e.decision));
    if let Some(u) = e.uid {
        l1.push(format!("Uid={u}"));
    }
    lines.push(l1);
    let mode = match r.mode {
        Some(m) if m != r.requested_mode => format!("{m} (requested {})", r.requested_mode),
        Some(m) => m.to_string(),
        None => format!("{} (requested; not chosen yet)", r.requested_mode),
    };
    lines.push(vec![
        format!("Source={}", r.source),
        format!("Destination={}", r.destination),
        format!("Mode={mode}"),
        format!("State={}", outcome(r)),
    ]);
    let mut times = vec![format!("Started={}", time_ms(r.started_at))];
    times.push(format!("Ended={}", opt(r.ended_at.map(time_ms))));
    let st = &r.stats;
    let total = st
        .total_ms
        .or_else(|| r.ended_at.map(|x| x.saturating_sub(r.started_at)));
    times.push(format!("Total={}", opt(total.map(duration))));
    times.push(format!("Downtime={}", opt(st.downtime_ms.map(duration))));
    times.push(format!("Frozen={}", opt(st.frozen_ms.map(duration))));
    lines.push(times);
    lines.push(vec![
        format!("Sent={}", bytes(st.bytes_sent)),
        format!("Rss={}", bytes(st.rss_bytes)),
        format!("PagesWritten={}", st.pages_written),
        format!("PagesLazy={}", st.pages_lazy),
    ]);
    let mut slurm = vec![format!(
        "SlurmSynced={}",
        if e.slurm_synced { "yes" } else { "no" }
    )];
    if let Some(k) = &e.slurm_kept_source {
        slurm.push(format!("SlurmKeptSource={}", clip(k, 200)));
    }
    lines.push(slurm);
    let mut out = format!("Migration={}\n", r.id);
    for l in lines {
        out.push_str("   ");
        out.push_str(&l.join(" "));
        out.push('\n');
    }
    // Free text goes on lines of its own, one line each, so that it never breaks a block.
    for (k, v) in [
        ("ModeReason", r.mode_reason.as_deref()),
        ("CancelledBy", r.cancelled_by.as_deref()),
        ("Error", r.error.as_deref()),
        ("SlurmError", e.slurm_error.as_deref()),
        ("SlurmHolder", e.slurm_holder.as_deref()),
    ] {
        if let Some(v) = v {
            out.push_str(&format!("   {k}={}\n", clip(v, usize::MAX)));
        }
    }
    if !r.phases.is_empty() {
        let now = rebalancer_proto::now_millis();
        let rows: Vec<Vec<String>> = r
            .phases
            .iter()
            .map(|p| {
                let dur = match p.duration_ms() {
                    Some(d) => duration(d),
                    None if r.state.is_terminal() => "-".into(),
                    None => format!("{} so far", duration(now.saturating_sub(p.started_at))),
                };
                vec![
                    p.phase.to_string(),
                    time_ms(p.started_at),
                    opt(p.ended_at.map(time_ms)),
                    dur,
                ]
            })
            .collect();
        out.push('\n');
        for line in table(&["PHASE", "STARTED", "ENDED", "DURATION"], &rows).lines() {
            out.push_str("   ");
            out.push_str(line);
            out.push('\n');
        }
    }
    if !st.rounds.is_empty() {
        let rows: Vec<Vec<String>> = st
            .rounds
            .iter()
            .map(|x| {
                vec![
                    x.round.to_string(),
                    x.pages_scanned.to_string(),
                    x.pages_written.to_string(),
                    x.pages_skipped_parent.to_string(),
                    duration(x.duration_ms),
                ]
            })
            .collect();
        out.push('\n');
        for line in table(
            &[
                "ROUND",
                "PAGES_SCANNED",
                "PAGES_WRITTEN",
                "SKIPPED_PARENT",
                "DURATION",
            ],
            &rows,
        )
        .lines()
        {
            out.push_str("   ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub fn plan(ms: &[PlanItem]) -> String {
    let held = ms.iter().any(|m| m.held.is_some());
    let rows = ms
        .iter()
        .map(|m| {
            let mut r = vec![
                m.policy.clone(),
                m.action.clone(),
                m.container.clone(),
                opt(m.job_id),
                format!("{}->{}", m.source, m.destination),
                m.mode.to_string(),
            ];
            if held {
                r.push(clip(m.held.as_deref().unwrap_or("-"), 70));
            }
            r.push(m.why.clone());
            r
        })
        .collect::<Vec<_>>();
    let mut headers = vec!["POLICY", "ACTION", "CONTAINER", "JOB", "MOVE", "MODE"];
    if held {
        headers.push("HELD");
    }
    headers.push("WHY");
    table(&headers, &rows)
}

/// What the policies considered and leave where it is, with why.
pub fn unmoved(us: &[Unmoved]) -> String {
    let rows = us
        .iter()
        .map(|u| {
            vec![
                u.policy.clone(),
                u.node.clone(),
                u.container.clone().unwrap_or_else(|| "(node)".into()),
                opt(u.job_id),
                u.code.clone(),
                match u.until {
                    Some(t) => format!("{} (until {})", u.reason, time(t)),
                    None => u.reason.clone(),
                },
            ]
        })
        .collect::<Vec<_>>();
    table(
        &["POLICY", "NODE", "CONTAINER", "JOB", "NOT MOVED", "WHY"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebalancer_proto::control::{AgentHealth, PolicyState};

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
    }

    #[test]
    fn times_and_sizes() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_795_550_462_000), "2026-11-24T20:01:02Z");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5MiB");
    }

    #[test]
    fn node_table_and_detail() {
        let n = NodeStatus {
            name: "node1".into(),
            slurm_state: "MIXED+DRAIN".into(),
            cpus_total: 4,
            cpus_alloc: 2,
            mem_total_mb: 1000,
            mem_alloc_mb: 0,
            partitions: vec!["debug".into(), "long".into()],
            agent: AgentHealth::Unreachable,
            agent_address: Some("/run/rb/node1.sock".into()),
            agent_error: None,
            metrics: None,
            capabilities: None,
            containers: 3,
            in_flight: 1,
            address_blocks: vec![],
        };
        let t = nodes(std::slice::from_ref(&n));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NODE   STATE        AGENT"), "{t}");
        assert!(
            lines[1].starts_with("node1  MIXED+DRAIN  unreachable  2/4"),
            "{t}"
        );
        let d = detail(&serde_json::to_value(&n).expect("json"));
        assert!(d.contains(" name=node1"), "{d}");
        assert!(d.contains("partitions=debug,long"), "{d}");
        assert!(d.contains("metrics=-"), "{d}");
        let at = detail(&serde_json::json!({
            "metrics": {"at": 1_796_612_627_831u64, "load1": 0.5},
            "phases": [{"ended_at": 1_796_612_627_831u64}],
            "started_at": null
        }));
        assert!(at.contains("metrics.at=2026-12-07T"), "{at}");
        assert!(at.contains(".831Z"), "{at}");
        assert!(at.contains("phases[0].ended_at=2026-12-07T"), "{at}");
        assert!(
            at.contains("metrics.load1=0.5") && at.contains("started_at=-"),
            "{at}"
        );
        let p = PolicyStatus {
            name: "drain".into(),
            kind: "drain".into(),
            action: "automatic".into(),
            state: PolicyState::DryRun,
            priority: 10,
            description: String::new(),
            source: "/etc/p.toml".into(),
            decisions: 7,
        };
        assert!(policies(&[p])
            .contains("drain   drain  automatic  dry-run  10        7          /etc/p.toml"));
    }

    #[test]
    fn a_cancelled_rollback_reads_cancelled_with_who() {
        let rec: MigrationRecord = serde_json::from_value(serde_json::json!({
            "id": "feedface0001", "container": "j7.s0.t0", "task": null, "source": "n1",
            "destination": "n2", "requested_mode": "stop-and-copy", "mode": "stop-and-copy",
            "mode_reason": null, "state": "rolled-back", "phases": [], "stats": {
                "downtime_ms": null, "frozen_ms": null, "total_ms": 40, "pages_scanned": 0,
                "pages_written": 0, "pages_lazy": 0, "bytes_sent": 0, "rss_bytes": 0},
            "error": "cancelled by uid 0 (root) before the commit point; the container runs on the source again",
            "started_at": 1_795_550_462_000u64, "ended_at": 1_795_550_462_040u64,
            "cancelled_by": "uid 0 (root)"
        }))
        .expect("record");
        assert_eq!(outcome(&rec), "cancelled");
        let e = MigrationEntry {
            record: rec.clone(),
            decision: 1,
            policy: "operator:0".into(),
            uid: Some(0),
            slurm_synced: false,
            slurm_error: None,
            slurm_kept_source: None,
            slurm_holder: None,
        };
        let d = migration_detail(&e);
        assert!(d.contains("State=cancelled"), "{d}");
        assert!(d.contains("   CancelledBy=uid 0 (root)\n"), "{d}");
        assert!(migrations(&[e]).contains(" cancelled "));
        // Without a cancel a rollback stays a rollback.
        let plain = MigrationRecord {
            cancelled_by: None,
            ..rec
        };
        assert_eq!(outcome(&plain), "rolled-back");
    }

    #[test]
    fn a_moved_container_shows_the_step_it_runs_in_now() {
        let mut c: ContainerInfo = serde_json::from_value(serde_json::json!({
            "id": "j4.s0.t0", "task": {"job_id": 4, "step_id": 0, "task_id": 0},
            "uid": 0, "gid": 0, "node": "node2", "address": "198.19.0.5", "pid": 4242,
            "state": "running", "rss_bytes": 0, "cpus": null, "class": null,
            "exit_status": null, "started_at": 0,
        }))
        .expect("container");
        assert_eq!(container_step(&c), "0");
        c.runs_in = Some(rebalancer_proto::TaskRef {
            job_id: 4,
            step_id: 8,
            task_id: 0,
        });
        assert_eq!(container_step(&c), "8 (from 0)");
        let t = containers(&[c]);
        let row = t.lines().nth(1).expect("a row");
        assert!(row.contains(" 4    8 (from 0) "), "{t}");
    }
}
