//! `show` and `history` filters (`job=`, `node=`, `state=`, `policy=`, `limit=`), applied to the
//! controller's reply. The controller already limits what a user sees to their own; these only
//! narrow it further.

use rebalancer_proto::control::{ControlReply, DecisionRecord, MigrationEntry, NodeStatus};
use rebalancer_proto::ContainerInfo;

use crate::kv::{get, parse_job, parse_kv};

/// History filters look at this many newest decisions (the controller's frame bound allows it).
pub const HISTORY_SCAN: u32 = 10_000;
/// `history`'s default number of rows.
pub const HISTORY_DEFAULT: usize = 50;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub job: Option<u32>,
    /// Source or destination (migrations, decisions), the node (containers), the name (nodes).
    pub node: Option<String>,
    pub state: Option<String>,
    pub policy: Option<String>,
    /// The newest N rows.
    pub limit: Option<usize>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Parses KEY=VALUE filter words with the keys `allowed` (first spelling canonical).
    pub fn parse(words: &[String], allowed: &[&[&'static str]]) -> Result<Filter, String> {
        let kv = parse_kv(words, allowed)?;
        Ok(Filter {
            job: get(&kv, "job").map(parse_job).transpose()?,
            node: get(&kv, "node").map(str::to_string),
            state: get(&kv, "state").map(str::to_string),
            policy: get(&kv, "policy").map(str::to_string),
            limit: get(&kv, "limit").map(parse_limit).transpose()?,
        })
    }

    fn node_is(&self, n: &str) -> bool {
        self.node.as_deref().is_none_or(|f| f == n)
    }

    fn state_is(&self, s: &str) -> bool {
        self.state
            .as_deref()
            .is_none_or(|f| f.eq_ignore_ascii_case(s))
    }

    fn job_is(&self, j: Option<u32>) -> bool {
        self.job.is_none_or(|f| j == Some(f))
    }

    fn policy_is(&self, p: &str) -> bool {
        self.policy
            .as_deref()
            .is_none_or(|f| f.eq_ignore_ascii_case(p))
    }

    fn keep_last<T>(&self, v: &mut Vec<T>, default: Option<usize>) {
        if let Some(n) = self.limit.or(default) {
            if v.len() > n {
                v.drain(..v.len() - n);
            }
        }
    }

    pub fn apply(&self, reply: ControlReply) -> ControlReply {
        if self.is_empty() && !matches!(reply, ControlReply::History { .. }) {
            return reply;
        }
        match reply {
            ControlReply::Nodes { mut nodes } => {
                nodes.retain(|n| self.node_is(&n.name) && self.node_state_is(n));
                self.keep_last(&mut nodes, None);
                ControlReply::Nodes { nodes }
            }
            ControlReply::Containers { mut containers } => {
                containers.retain(|c| self.container_matches(c));
                self.keep_last(&mut containers, None);
                ControlReply::Containers { containers }
            }
            ControlReply::Migrations { mut migrations } => {
                migrations.retain(|m| self.migration_matches(m));
                self.keep_last(&mut migrations, None);
                ControlReply::Migrations { migrations }
            }
            ControlReply::History { mut decisions } => {
                decisions.retain(|d| self.decision_matches(d));
                self.keep_last(&mut decisions, Some(HISTORY_DEFAULT));
                ControlReply::History { decisions }
            }
            other => other,
        }
    }

    /// A Slurm state such as `IDLE+DRAIN` matches `state=drain` and `state=idle`.
    fn node_state_is(&self, n: &NodeStatus) -> bool {
        self.state.as_deref().is_none_or(|f| {
            n.slurm_state.split(['+', ' ']).any(|p| {
                p.trim_end_matches(['*', '~', '#', '!', '%', '$', '@', '^', '-'])
                    .eq_ignore_ascii_case(f)
            })
        })
    }

    fn container_matches(&self, c: &ContainerInfo) -> bool {
        let state = serde_json::to_value(c.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.node_is(&c.node)
            && self.job_is(c.task.as_ref().map(|t| t.job_id))
            && self.state_is(&state)
    }

    fn migration_matches(&self, m: &MigrationEntry) -> bool {
        let r = &m.record;
        (self.node_is(&r.source) || self.node_is(&r.destination))
            && self.job_is(r.task.as_ref().map(|t| t.job_id))
            // `state=rolled-back` takes the cancelled ones too, `state=cancelled` only them.
            && (self.state_is(r.state.as_str()) || self.state_is(crate::render::outcome(r)))
            && self.policy_is(&m.policy)
    }

    fn decision_matches(&self, d: &DecisionRecord) -> bool {
        (self.node_is(&d.source) || self.node_is(&d.destination))
            && self.job_is(d.task.as_ref().map(|t| t.job_id))
            && self.state_is(d.outcome.as_str())
            && self.policy_is(&d.policy)
    }
}

pub fn parse_limit(v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("limit '{v}' is not a positive number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebalancer_proto::control::DecisionOutcome;

    fn decision(
        seq: u64,
        job: u32,
        policy: &str,
        src: &str,
        outcome: DecisionOutcome,
    ) -> DecisionRecord {
        serde_json::from_value(serde_json::json!({
            "seq": seq, "at": 0, "policy": policy, "container": format!("j{job}.s0.t0"),
            "task": {"job_id": job, "step_id": 0, "task_id": 0}, "uid": 0,
            "source": src, "destination": "dst", "mode": "post-copy", "why": "w",
            "outcome": outcome.as_str(),
        }))
        .expect("decision")
    }

    fn w(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    const HISTORY_KEYS: &[&[&str]] = &[
        &["limit"],
        &["job", "jobid"],
        &["node", "nodename"],
        &["policy"],
        &["state", "outcome"],
    ];

    #[test]
    fn history_filters_before_it_limits() {
        let mut d = Vec::new();
        for seq in 0..120 {
            let job = if seq % 2 == 0 { 4 } else { 5 };
            let outcome = if seq % 3 == 0 {
                DecisionOutcome::Failed
            } else {
                DecisionOutcome::Started
            };
            d.push(decision(
                seq,
                job,
                if seq < 60 { "drain" } else { "thermal" },
                "node1",
                outcome,
            ));
        }
        let f = Filter::parse(&w("JobId=4 limit=3"), HISTORY_KEYS).expect("parse");
        let ControlReply::History { decisions } = f.apply(ControlReply::History {
            decisions: d.clone(),
        }) else {
            panic!("not history");
        };
        assert_eq!(
            decisions.iter().map(|d| d.seq).collect::<Vec<_>>(),
            [114, 116, 118]
        );
        let f = Filter::parse(&w("policy=DRAIN outcome=failed node=node1"), HISTORY_KEYS)
            .expect("parse");
        let ControlReply::History { decisions } = f.apply(ControlReply::History {
            decisions: d.clone(),
        }) else {
            panic!("not history");
        };
        assert_eq!(decisions.len(), 20, "every third of the first 60");
        assert!(decisions
            .iter()
            .all(|d| d.policy == "drain" && d.outcome == DecisionOutcome::Failed));
        // No filter: the default number of rows, the newest.
        let ControlReply::History { decisions } =
            Filter::default().apply(ControlReply::History { decisions: d })
        else {
            panic!("not history");
        };
        assert_eq!(decisions.len(), HISTORY_DEFAULT);
        assert_eq!(decisions.last().map(|d| d.seq), Some(119));
        // Another node matches nothing.
        let f = Filter::parse(&w("node=node9"), HISTORY_KEYS).expect("parse");
        assert!(f.node_is("node9") && !f.node_is("node1"));
    }

    #[test]
    fn bad_filters_name_the_key_or_value() {
        assert!(Filter::parse(&w("job=x"), HISTORY_KEYS).is_err());
        assert!(Filter::parse(&w("limit=0"), HISTORY_KEYS)
            .expect_err("zero")
            .contains("limit '0'"));
        assert!(Filter::parse(&w("colour=red"), HISTORY_KEYS)
            .expect_err("key")
            .contains("unknown key 'colour'"));
    }
}
