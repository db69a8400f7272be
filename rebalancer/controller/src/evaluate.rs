//! Evaluation: the planner's moves turned into decisions, advice journaled once, and
//! automatic moves started within the in-flight limits.

use std::sync::Arc;

use rebalancer_proto::control::{DecisionOutcome, DecisionRecord, PolicyState};
use rebalancer_proto::now_millis;
use tracing::{debug, error, info, warn};

use crate::daemon::{write, Controller, PLANNER_STATE};
use crate::inflight::{InFlight, Limits};
use crate::planner::{ContainerSnap, PlanAction, PlannedMove, SkipNote};

/// The same advice or skip is journaled again only after this long.
const ADVICE_REPEAT_MS: u64 = 600_000;

/// Skips worth a line in the journal: not the quiet ones (`worth_telling`), nor a trigger that
/// waits for its hysteresis or a node without a temperature reading (repeated and transient).
fn journal_worthy(s: &SkipNote) -> bool {
    s.worth_telling() && !matches!(s.code.as_str(), "hysteresis-pending" | "no-reading")
}

impl Controller {
    /// Runs the policies once and acts on their moves.
    pub async fn evaluate(self: &Arc<Self>) {
        let input = self.plan_input();
        let states = self.state().policy_states.clone();
        let (moves, skips, saved) = {
            let mut p = self.planner();
            let moves = p.plan(&input, &states);
            (moves, p.take_skips(), p.save_state())
        };
        for s in skips.iter().filter(|s| journal_worthy(s)) {
            self.note_skip(s, &input);
        }
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
            }
            let Some(c) = input.containers.iter().find(|c| c.id == mv.container) else {
                continue;
            };
            // A start that failed (agent unreachable, refused) is retried after a pause, not
            // at every evaluation; the pause is journaled once, so `history` says why.
            let until = self
                .state()
                .in_flight
                .backing_off_until(&mv.container, now_millis());
            if let Some(until) = until {
                if action == PlanAction::Automatic {
                    let why = format!(
                        "backing off after a failed start until {}",
                        rebalancer_proto::iso8601(until)
                    );
                    self.advise(&mv, c, DecisionOutcome::Skipped, Some(why));
                    continue;
                }
            }
            match action {
                PlanAction::DryRun => self.advise(&mv, c, DecisionOutcome::DryRun, None),
                PlanAction::Recommend => self.advise(&mv, c, DecisionOutcome::Recommended, None),
                PlanAction::Automatic => {
                    if let Err(why) = self.try_reserve(&mv, c) {
                        self.advise(&mv, c, DecisionOutcome::Skipped, Some(why));
                        continue;
                    }
                    let d = self.decision(&mv, c, DecisionOutcome::Started, None);
                    // Whatever held the move back before is news again once it has started.
                    write(&self.state)
                        .last_advice
                        .remove(&(mv.policy.clone(), mv.container.clone()));
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
        // The same destination for the same reason is the same advice.
        let subject = format!("{}\n{}", mv.destination, detail.as_deref().unwrap_or(""));
        let now = now_millis();
        {
            let st = self.state();
            if let Some((seen, o, at)) = st.last_advice.get(&key) {
                if *seen == subject && *o == outcome && now.saturating_sub(*at) < ADVICE_REPEAT_MS {
                    return;
                }
            }
        }
        write(&self.state)
            .last_advice
            .insert(key, (subject, outcome, now));
        let d = self.decision(mv, c, outcome, detail);
        match self.journal.record_decision(d) {
            Ok(d) => self.count_decision(&d),
            Err(e) => error!(container = %mv.container, "cannot journal a decision: {e}"),
        }
    }

    /// Journals a policy's skip (no destination, not migratable, cooldown, limit) as a skipped
    /// decision, once per policy, container (or node) and reason code within ten minutes.
    fn note_skip(&self, s: &SkipNote, input: &crate::planner::PlanInput) {
        let subject = s
            .container
            .clone()
            .unwrap_or_else(|| format!("node:{}", s.node));
        let key = (s.policy.clone(), subject.clone());
        let now = now_millis();
        {
            let st = self.state();
            if let Some((code, o, at)) = st.last_advice.get(&key) {
                if *code == s.code
                    && *o == DecisionOutcome::Skipped
                    && now.saturating_sub(*at) < ADVICE_REPEAT_MS
                {
                    return;
                }
            }
        }
        write(&self.state)
            .last_advice
            .insert(key, (s.code.clone(), DecisionOutcome::Skipped, now));
        let c = s
            .container
            .as_ref()
            .and_then(|id| input.containers.iter().find(|c| c.id == *id));
        let task = c.and_then(|c| {
            self.state()
                .agents
                .get(&c.node)
                .and_then(|a| a.containers.iter().find(|x| x.id == c.id))
                .and_then(|x| x.task.clone())
        });
        let d = DecisionRecord {
            seq: 0,
            at: now,
            policy: s.policy.clone(),
            container: subject,
            task,
            uid: c.map(|c| c.uid),
            source: s.node.clone(),
            destination: "-".into(),
            mode: rebalancer_proto::MigrationMode::Auto,
            why: s.reason.clone(),
            outcome: DecisionOutcome::Skipped,
            detail: Some(s.code.clone()),
            migration: None,
        };
        match self.journal.record_decision(d) {
            Ok(d) => self.count_decision(&d),
            Err(e) => error!(policy = %s.policy, node = %s.node, "cannot journal a skip: {e}"),
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
