//! What does not move and why: the work no policy can move (`unmovable`, named by `migrate` and
//! `evacuate`) and `rebalctl plan`'s explanation of the policies' moves and skips (`explain`).

use std::collections::BTreeMap;

use rebalancer_proto::control::{DecisionOutcome, DecisionRecord, PlanItem, Unmoved};
use rebalancer_proto::{now_millis, ContainerState, MigrationMode};

use crate::auth::Caller;
use crate::daemon::Controller;
use crate::planner::PlanAction;

/// Work the rebalancer cannot move, as skipped decisions (not journaled): Slurm jobs running
/// on `node` (or the job `job`) without a container — started without `--migratable` — and
/// containers that are not running (exited, being restored, moved away).
pub(crate) fn unmovable(
    ctl: &Controller,
    node: Option<&str>,
    job: Option<u32>,
    step: Option<u32>,
) -> Vec<DecisionRecord> {
    let containers = ctl.containers();
    let st = ctl.state();
    let mut out = Vec::new();
    let note = |subject: String, uid: Option<u32>, source: &str, detail: String| DecisionRecord {
        seq: 0,
        at: now_millis(),
        policy: "-".into(),
        container: subject,
        task: None,
        uid,
        source: source.into(),
        destination: "-".into(),
        mode: MigrationMode::Auto,
        why: "not movable".into(),
        outcome: DecisionOutcome::Skipped,
        detail: Some(detail),
        migration: None,
    };
    for j in st.jobs.values() {
        if job.is_some_and(|x| x != j.job_id) || !j.state.eq_ignore_ascii_case("RUNNING") {
            continue;
        }
        for n in &j.nodes {
            if node.is_some_and(|x| x != n) {
                continue;
            }
            let here: Vec<_> = containers
                .iter()
                .filter(|c| {
                    c.node == *n
                        && c.task.as_ref().is_some_and(|t| {
                            t.job_id == j.job_id && step.is_none_or(|s| s == t.step_id)
                        })
                })
                .collect();
            if here.is_empty() {
                out.push(note(
                    format!("job {}", j.job_id),
                    Some(j.uid),
                    n,
                    format!(
                        "job {} runs on {n} without a container: it was not started with \
                         --migratable, so its tasks cannot move",
                        j.job_id
                    ),
                ));
            }
            for c in here
                .into_iter()
                .filter(|c| c.state != ContainerState::Running)
            {
                out.push(note(
                    c.id.clone(),
                    Some(c.uid),
                    n,
                    format!(
                        "container {} is {}, not running",
                        c.id,
                        container_state(c.state)
                    ),
                ));
            }
        }
    }
    if job.is_none() {
        // Containers outside any Slurm job the controller knows (agent-run containers).
        for c in containers.iter().filter(|c| {
            node.is_some_and(|n| n == c.node)
                && c.state != ContainerState::Running
                && c.task
                    .as_ref()
                    .is_none_or(|t| !st.jobs.contains_key(&t.job_id))
        }) {
            out.push(note(
                c.id.clone(),
                Some(c.uid),
                &c.node,
                format!(
                    "container {} is {}, not running",
                    c.id,
                    container_state(c.state)
                ),
            ));
        }
    }
    out
}

fn container_state(s: ContainerState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}"))
}

/// What the policies would do now, each move with why the controller holds it back (if it
/// does), and what they considered and leave where it is, with why; only what the caller may
/// see, and only one job's or one node's when asked.
pub(crate) fn explain(
    ctl: &Controller,
    caller: &Caller,
    job_id: Option<u32>,
    node: Option<&str>,
) -> (Vec<PlanItem>, Vec<Unmoved>) {
    let input = ctl.plan_input();
    let states = ctl.state().policy_states.clone();
    let (moves, skips) = ctl.planner().explain(&input, &states);
    let now = now_millis();
    let limits = &ctl.cfg.migration;
    // The reason of each container's last failed start, for the back-off's explanation.
    let failures: BTreeMap<String, String> = ctl
        .journal
        .decisions(1000)
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.outcome == DecisionOutcome::Failed)
        .map(|d| (d.container, d.detail.unwrap_or_default()))
        .collect();
    let wanted = |job: u32, nodes: &[&str]| {
        job_id.is_none_or(|j| j == job) && node.is_none_or(|n| nodes.contains(&n))
    };
    let st = ctl.state();
    let moves = moves
        .into_iter()
        .filter_map(|m| {
            let c = input.containers.iter().find(|c| c.id == m.container)?;
            if !ctl.access.sees(caller, Some(c.uid))
                || !wanted(c.job_id, &[&m.source, &m.destination])
            {
                return None;
            }
            let action = match states.get(&m.policy) {
                Some(rebalancer_proto::control::PolicyState::DryRun) => PlanAction::DryRun,
                _ => m.action,
            };
            let held = if let Some(f) = st.in_flight.get(&m.container) {
                Some(match f.entry.as_ref() {
                    Some(e) => format!("already migrating (migration {})", e.record.id),
                    None => "already migrating".to_string(),
                })
            } else if let Some(until) = st.in_flight.backing_off_until(&m.container, now) {
                Some(format!(
                    "backing off after a failed start until {}{}",
                    rebalancer_proto::iso8601(until),
                    failures
                        .get(&m.container)
                        .filter(|e| !e.is_empty())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ))
            } else if action != PlanAction::Automatic {
                None
            } else if st.in_flight.len() as u32 >= limits.max_in_flight {
                Some(format!(
                    "{} migrations in flight; max_in_flight = {}",
                    st.in_flight.len(),
                    limits.max_in_flight
                ))
            } else {
                [&m.source, &m.destination]
                    .into_iter()
                    .find(|n| st.in_flight.on_node(n) >= limits.max_per_node)
                    .map(|n| {
                        format!(
                            "{n} takes part in {} migrations; max_per_node = {}",
                            st.in_flight.on_node(n),
                            limits.max_per_node
                        )
                    })
            };
            Some(PlanItem {
                job_id: (c.job_id > 0).then_some(c.job_id),
                action: action.as_str().into(),
                policy: m.policy,
                container: m.container,
                source: m.source,
                destination: m.destination,
                mode: m.mode,
                why: m.why,
                held,
            })
        })
        .collect();
    drop(st);
    let mut unmoved: Vec<Unmoved> = skips
        .into_iter()
        .filter(|s| s.worth_telling())
        .filter_map(|s| {
            let c = s
                .container
                .as_ref()
                .and_then(|id| input.containers.iter().find(|c| c.id == *id));
            match (s.container.is_some(), c) {
                // A container the caller may not see, or one gone since.
                (true, None) => return None,
                (true, Some(c)) if !ctl.access.sees(caller, Some(c.uid)) => return None,
                _ => {}
            }
            let job = c.map(|c| c.job_id).filter(|j| *j > 0);
            if node.is_some_and(|n| n != s.node) {
                return None;
            }
            // A node's skip concerns every job with a container there.
            let job_there = |j: u32| {
                input
                    .containers
                    .iter()
                    .any(|x| x.node == s.node && x.job_id == j)
            };
            if let Some(j) = job_id {
                if job.map_or(s.container.is_some() || !job_there(j), |x| x != j) {
                    return None;
                }
            }
            Some(Unmoved {
                policy: s.policy,
                node: s.node,
                container: s.container,
                job_id: job,
                code: s.code,
                reason: s.reason,
                until: None,
            })
        })
        .collect();
    // CRIU runs on the source: nothing leaves a node whose agent does not answer, whatever the
    // policy (the planners leave such containers out of their view).
    for n in input.nodes.iter().filter(|n| !n.agent_up) {
        for c in input.containers.iter().filter(|c| c.node == n.name) {
            if !ctl.access.sees(caller, Some(c.uid)) || !wanted(c.job_id, &[&n.name]) {
                continue;
            }
            unmoved.push(Unmoved {
                policy: "controller".into(),
                node: n.name.clone(),
                container: Some(c.id.clone()),
                job_id: (c.job_id > 0).then_some(c.job_id),
                code: "agent-unreachable".into(),
                reason: format!(
                    "the agent on {} does not answer; CRIU runs on the source",
                    n.name
                ),
                until: None,
            });
        }
    }
    (moves, unmoved)
}
