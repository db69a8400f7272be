//! Prometheus metrics and the small HTTP endpoint that serves them (`GET /metrics`).

use std::sync::Arc;

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

pub struct Metrics {
    registry: Registry,
    pub migrations: Family<OutcomeLabel, Counter>,
    pub downtime: Histogram,
    pub bytes: Counter,
    pub decisions: Family<DecisionLabels, Counter>,
    pub in_flight: Gauge,
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
        Metrics {
            registry,
            migrations,
            downtime,
            bytes,
            decisions,
            in_flight,
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

    pub fn record_decision(&self, policy: &str, outcome: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                policy: policy.into(),
                outcome: outcome.into(),
            })
            .inc();
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
