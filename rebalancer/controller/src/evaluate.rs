//! Evaluation: the planner's moves turned into decisions, advice journaled once, and
//! automatic moves started within the in-flight limits.

use std::sync::Arc;

use rebalancer_proto::control::{DecisionOutcome, DecisionRecord, PolicyState};
use rebalancer_proto::now_millis;
use tracing::{debug, error, info, warn};

use crate::daemon::{write, Controller, PLANNER_STATE};
use crate::inflight::{InFlight, Limits};
use crate::planner::{ContainerSnap, PlanAction, PlannedMove};

impl Controller {
    /// Runs the policies once and acts on their moves.
    pub async fn evaluate(self: &Arc<Self>) {
        let input = self.plan_input();
        let states = self.state().policy_states.clone();
        let (moves, saved) = {
            let mut p = self.planner();
            let moves = p.plan(&input, &states);
            (moves, p.save_state())
        };
        if let Some(saved) = saved {
            let changed = self.state().planner_saved.as_deref() != Some(saved.as_str());
            if changed {
                if let Err(e) = self.journal.put_meta(PLANNER_STATE, &saved) {
                    warn!("cannot journal the planner's state: {e}");
                }
                write(&self.state).planner_saved = Some(saved);
            }
        }
        if moves.is_empty() {
            debug!("evaluation: nothing to do");
            return;
        }
        for mv in moves {
            // A policy disabled or set to dry-run at run time wins over the planner's own view.
            let action = match states.get(&mv.policy) {
                Some(PolicyState::Disabled) => continue,
                Some(PolicyState::DryRun) => PlanAction::DryRun,
                _ => mv.action,
            };
            {
                let st = self.state();
                if st.in_flight.contains_key(&mv.container) {
                    continue;
                }
                // A start that failed (agent unreachable, refused) is retried after a pause,
                // not at every evaluation.
                if st.in_flight.backing_off(&mv.container, now_millis()) {
                    continue;
                }
            }
            let Some(c) = input.containers.iter().find(|c| c.id == mv.container) else {
                continue;
            };
            match action {
                PlanAction::DryRun => self.advise(&mv, c, DecisionOutcome::DryRun, None),
                PlanAction::Recommend => self.advise(&mv, c, DecisionOutcome::Recommended, None),
                PlanAction::Automatic => {
                    if let Err(why) = self.try_reserve(&mv, c) {
                        self.advise(&mv, c, DecisionOutcome::Skipped, Some(why));
                        continue;
                    }
                    let d = self.decision(&mv, c, DecisionOutcome::Started, None);
                    match self.journal.record_decision(d) {
                        Ok(d) => {
                            self.count_decision(&d);
                            self.launch(d, mv.max_downtime_ms, None);
                        }
                        Err(e) => {
                            error!(container = %mv.container, "cannot journal a decision, not acting on it: {e}");
                            let left = write(&self.state).in_flight.remove(&mv.container);
                            self.metrics.in_flight.set(left as i64);
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn decision(
        &self,
        mv: &PlannedMove,
        c: &ContainerSnap,
        outcome: DecisionOutcome,
        detail: Option<String>,
    ) -> DecisionRecord {
        let task = self
            .state()
            .agents
            .get(&c.node)
            .and_then(|a| a.containers.iter().find(|x| x.id == c.id))
            .and_then(|x| x.task.clone());
        DecisionRecord {
            seq: 0,
            at: now_millis(),
            policy: mv.policy.clone(),
            container: mv.container.clone(),
            task,
            uid: Some(c.uid),
            source: mv.source.clone(),
            destination: mv.destination.clone(),
            mode: mv.mode,
            why: mv.why.clone(),
            outcome,
            detail,
            migration: None,
        }
    }

    fn count_decision(&self, d: &DecisionRecord) {
        self.metrics.record_decision(&d.policy, d.outcome.as_str());
        *write(&self.state)
            .decision_counts
            .entry(d.policy.clone())
            .or_default() += 1;
        info!(
            policy = %d.policy, container = %d.container,
            job = d.task.as_ref().map(|t| t.job_id), step = d.task.as_ref().map(|t| t.step_id),
            source = %d.source, destination = %d.destination, mode = %d.mode,
            outcome = d.outcome.as_str(), detail = d.detail.as_deref().unwrap_or(""),
            "decision: {}", d.why
        );
    }

    /// Journals a decision that is not executed, unless the same advice was given recently.
    fn advise(
        &self,
        mv: &PlannedMove,
        c: &ContainerSnap,
        outcome: DecisionOutcome,
        detail: Option<String>,
    ) {
        let key = (mv.policy.clone(), mv.container.clone());
        let now = now_millis();
        {
            let st = self.state();
            if let Some((dest, o, at)) = st.last_advice.get(&key) {
                if *dest == mv.destination && *o == outcome && now.saturating_sub(*at) < 600_000 {
                    return;
                }
            }
        }
        write(&self.state)
            .last_advice
            .insert(key, (mv.destination.clone(), outcome, now));
        let d = self.decision(mv, c, outcome, detail);
        match self.journal.record_decision(d) {
            Ok(d) => self.count_decision(&d),
            Err(e) => error!(container = %mv.container, "cannot journal a decision: {e}"),
        }
    }

    /// Checks the in-flight limits and, when they allow, holds a slot for the container.
    pub fn try_reserve(&self, mv: &PlannedMove, c: &ContainerSnap) -> Result<(), String> {
        let m = &self.cfg.migration;
        let limits = Limits {
            max_in_flight: m.max_in_flight,
            max_per_node: m.max_per_node,
        };
        // Replaced by the journaled decision when the migration is launched.
        let placeholder = self.decision(mv, c, DecisionOutcome::Started, None);
        let mut st = write(&self.state);
        st.in_flight.try_reserve(
            limits,
            InFlight {
                decision: placeholder,
                entry: None,
                cpus: c.cpus,
                rss_mb: c.rss_mb,
                started: now_millis(),
            },
        )?;
        self.metrics.in_flight.set(st.in_flight.len() as i64);
        Ok(())
    }
}
