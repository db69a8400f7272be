//! Prometheus metrics and the small HTTP endpoint that serves them (`GET /metrics`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub policy: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

/// What the controller last saw of one node, for the per-node gauges.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSample {
    pub node: String,
    /// The agent answered the last poll.
    pub agent_up: bool,
    /// Containers the agent reported at the last successful poll.
    pub containers: usize,
    /// Slurm has the node DRAIN (draining or drained).
    pub draining: bool,
}

pub struct Metrics {
    registry: Registry,
    pub agent_up: Family<NodeLabel, Gauge>,
    pub node_containers: Family<NodeLabel, Gauge>,
    pub node_draining: Family<NodeLabel, Gauge>,
    /// Nodes with series now, so that a node that left the configuration loses its series.
    nodes: Mutex<BTreeSet<String>>,
    pub migrations: Family<OutcomeLabel, Counter>,
    pub downtime: Histogram,
    pub bytes: Counter,
    pub decisions: Family<DecisionLabels, Counter>,
    pub in_flight: Gauge,
    /// Migrations whose outcome is not known yet (kept frozen, the job on both nodes).
    pub unresolved: Gauge,
    /// Holder allocations (holder.rs) held now.
    pub holders: Gauge,
    /// Holder allocations Slurm did not grant at once.
    pub holders_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rebalancer");
        let migrations = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "migrations",
            "Migrations ended, by outcome",
            migrations.clone(),
        );
        let downtime = Histogram::new([0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0]);
        registry.register(
            "migration_downtime_seconds",
            "Downtime of successful migrations",
            downtime.clone(),
        );
        let bytes = Counter::default();
        registry.register(
            "migration_bytes",
            "Bytes sent between nodes by migrations",
            bytes.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "policy_decisions",
            "Policy and operator decisions, by outcome",
            decisions.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "migrations_in_flight",
            "Migrations running now",
            in_flight.clone(),
        );
        let unresolved = Gauge::default();
        registry.register(
            "migrations_unresolved",
            "Migrations whose outcome is not known yet: the job keeps both nodes until the controller learns where the task runs",
            unresolved.clone(),
        );
        let agent_up = Family::<NodeLabel, Gauge>::default();
        registry.register(
            "node_agent_up",
            "1 if the node's agent answered the controller's last poll, else 0",
            agent_up.clone(),
        );
        let node_containers = Family::<NodeLabel, Gauge>::default();
        registry.register(
            "node_containers",
            "Containers the node's agent reported at its last successful poll",
            node_containers.clone(),
        );
        let node_draining = Family::<NodeLabel, Gauge>::default();
        registry.register(
            "node_draining",
            "1 if Slurm has the node DRAIN (an evacuation is wanted), else 0",
            node_draining.clone(),
        );
        let holders = Gauge::default();
        registry.register(
            "slurm_holders",
            "Holder allocations held now: they make Slurm count the CPUs of moved tasks",
            holders.clone(),
        );
        let holders_refused = Counter::default();
        registry.register(
            "slurm_holders_refused",
            "Holder allocations Slurm did not grant at once (another job took the CPUs first)",
            holders_refused.clone(),
        );
        Metrics {
            registry,
            holders,
            holders_refused,
            agent_up,
            node_containers,
            node_draining,
            nodes: Mutex::new(BTreeSet::new()),
            migrations,
            downtime,
            bytes,
            decisions,
            in_flight,
            unresolved,
        }
    }

    pub fn record_migration(&self, rec: &rebalancer_proto::MigrationRecord) {
        let outcome = match rec.state {
            rebalancer_proto::MigrationState::Succeeded => "succeeded",
            rebalancer_proto::MigrationState::RolledBack => "rolled-back",
            rebalancer_proto::MigrationState::Failed => "failed",
            _ => return,
        };
        self.migrations
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
        if let Some(ms) = rec.stats.downtime_ms.filter(|_| outcome == "succeeded") {
            self.downtime.observe(ms as f64 / 1000.0);
        }
        self.bytes.inc_by(rec.stats.bytes_sent);
    }

    /// The end of a migration whose outcome was unknown, counted once it is known (it was not
    /// counted when it ended unknown).
    pub fn record_resolution(&self, outcome: &str) {
        self.migrations
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn record_decision(&self, policy: &str, outcome: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                policy: policy.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Replaces the per-node gauges with `samples` (every configured node, once per poll).
    pub fn set_nodes(&self, samples: &[NodeSample]) {
        let mut known = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let now: BTreeSet<String> = samples.iter().map(|s| s.node.clone()).collect();
        for gone in known.difference(&now) {
            let l = NodeLabel { node: gone.clone() };
            self.agent_up.remove(&l);
            self.node_containers.remove(&l);
            self.node_draining.remove(&l);
        }
        for s in samples {
            let l = NodeLabel {
                node: s.node.clone(),
            };
            self.agent_up.get_or_create(&l).set(i64::from(s.agent_up));
            self.node_containers
                .get_or_create(&l)
                .set(i64::try_from(s.containers).unwrap_or(i64::MAX));
            self.node_draining
                .get_or_create(&l)
                .set(i64::from(s.draining));
        }
        *known = now;
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if prometheus_client::encoding::text::encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}

/// Serves `GET /metrics` until the task is dropped (the server the agent uses too).
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    rebalancer_telemetry::serve(listener, Arc::new(move || metrics.render())).await
}

pub use rebalancer_telemetry::bind;

#[cfg(test)]
mod tests {
    use super::*;
    use rebalancer_proto::{MigrationState, MigrationStats};

    fn sample(node: &str, up: bool, containers: usize, draining: bool) -> NodeSample {
        NodeSample {
            node: node.into(),
            agent_up: up,
            containers,
            draining,
        }
    }

    #[test]
    fn node_gauges_follow_the_last_poll_and_forget_removed_nodes() {
        let m = Metrics::new();
        m.set_nodes(&[
            sample("node1", true, 2, true),
            sample("node2", false, 0, false),
        ]);
        let text = m.render();
        for want in [
            "rebalancer_node_agent_up{node=\"node1\"} 1\n",
            "rebalancer_node_agent_up{node=\"node2\"} 0\n",
            "rebalancer_node_containers{node=\"node1\"} 2\n",
            "rebalancer_node_draining{node=\"node1\"} 1\n",
            "rebalancer_node_draining{node=\"node2\"} 0\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        m.set_nodes(&[sample("node1", true, 0, true)]);
        let text = m.render();
        assert!(
            text.contains("rebalancer_node_containers{node=\"node1\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("node2"), "{text}");
    }

    #[test]
    fn the_shipped_dashboards_query_only_what_the_controller_exports() {
        let m = Metrics::new();
        let mut rec = crate::journal::tests::record("m1", MigrationState::Succeeded);
        rec.stats.downtime_ms = Some(300);
        m.record_migration(&rec);
        m.record_decision("drain", "started");
        m.set_nodes(&[sample("node1", true, 1, true)]);
        let exported = rebalancer_telemetry::names::exported(&m.render());
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let files =
            rebalancer_telemetry::names::monitoring_files(&repo).expect("deploy/monitoring");
        assert!(files.len() >= 2, "{files:?}");
        let missing = rebalancer_telemetry::names::missing(
            &files,
            &exported,
            "rebalancer_",
            Some("rebalancer_agent_"),
        );
        assert!(
            missing.is_empty(),
            "not exported by rebalancerd: {missing:?}\nexported: {exported:?}"
        );
    }

    #[test]
    fn an_unknown_outcome_is_counted_once_it_is_resolved() {
        let m = Metrics::new();
        m.record_migration(&crate::journal::tests::record(
            "m1",
            MigrationState::Unknown,
        ));
        m.unresolved.inc();
        let text = m.render();
        assert!(!text.contains("rebalancer_migrations_total{"), "{text}");
        assert!(
            text.contains("rebalancer_migrations_unresolved 1"),
            "{text}"
        );
        m.record_resolution("succeeded");
        m.unresolved.dec();
        let text = m.render();
        assert!(
            text.contains("rebalancer_migrations_total{outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rebalancer_migrations_unresolved 0"),
            "{text}"
        );
    }

    #[test]
    fn renders_outcomes_downtime_and_bytes() {
        let m = Metrics::new();
        let mut rec = crate::journal::tests::record("m1", MigrationState::Succeeded);
        rec.stats = MigrationStats {
            downtime_ms: Some(300),
            bytes_sent: 4096,
            ..Default::default()
        };
        m.record_migration(&rec);
        m.record_decision("drain", "started");
        let text = m.render();
        assert!(
            text.contains("rebalancer_migrations_total{outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rebalancer_migration_bytes_total 4096"),
            "{text}"
        );
        assert!(
            text.contains("rebalancer_migration_downtime_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "rebalancer_policy_decisions_total{policy=\"drain\",outcome=\"started\"} 1"
            ),
            "{text}"
        );
    }
}
