//! Prometheus metrics of the agent and the small HTTP endpoint that serves them
//! (`metrics_listen`, `GET /metrics`). Not to be confused with `[metrics]` (crate::metrics), the
//! temperature and load sources reported to the controller.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rebalancer_proto::{MigrationMode, MigrationRecord, MigrationState};

/// Downtime and frozen-time buckets: 50 ms .. 30 s.
const SECONDS_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    pub role: String,
    pub outcome: String,
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
}

pub struct AgentMetrics {
    registry: Registry,
    pub migrations: Family<MigrationLabels, Counter>,
    pub downtime: Histogram,
    pub frozen: Histogram,
    pub bytes: Counter,
    pub containers: Gauge,
    pub modes: Family<ModeLabel, Gauge>,
}

impl AgentMetrics {
    /// `modes`: the modes this node supports (its capabilities), exported as an info gauge.
    pub fn new(modes: &[MigrationMode]) -> Self {
        let mut registry = Registry::with_prefix("rebalancer_agent");
        let migrations = Family::<MigrationLabels, Counter>::default();
        registry.register(
            "migrations",
            "Migrations ended on this node, by role, outcome and mode",
            migrations.clone(),
        );
        let downtime = Histogram::new(SECONDS_BUCKETS);
        registry.register(
            "migration_downtime_seconds",
            "Downtime of successful migrations from this node",
            downtime.clone(),
        );
        let frozen = Histogram::new(SECONDS_BUCKETS);
        registry.register(
            "migration_frozen_seconds",
            "Time the source tree spent frozen, migrations from this node",
            frozen.clone(),
        );
        let bytes = Counter::default();
        registry.register(
            "migration_bytes",
            "Bytes sent to other nodes by migrations from this node",
            bytes.clone(),
        );
        let containers = Gauge::default();
        registry.register(
            "containers_running",
            "Containers running on this node (migrating ones included)",
            containers.clone(),
        );
        let supported = Family::<ModeLabel, Gauge>::default();
        registry.register(
            "supported_modes",
            "Migration modes this node supports (1 each)",
            supported.clone(),
        );
        for m in modes {
            supported
                .get_or_create(&ModeLabel {
                    mode: m.as_str().into(),
                })
                .set(1);
        }
        AgentMetrics {
            registry,
            migrations,
            downtime,
            frozen,
            bytes,
            containers,
            modes: supported,
        }
    }

    /// Records a terminal record once; `node` is this agent's node (decides the role).
    /// Downtime, frozen time and bytes are the source's measures, so only source records add them.
    pub fn record_migration(&self, rec: &MigrationRecord, node: &str) {
        let outcome = match rec.state {
            MigrationState::Succeeded => "succeeded",
            MigrationState::RolledBack => "rolled_back",
            MigrationState::Failed => "failed",
            _ => return,
        };
        let source = rec.source == node;
        let mode = rec.mode.unwrap_or(rec.requested_mode);
        self.migrations
            .get_or_create(&MigrationLabels {
                role: if source { "source" } else { "destination" }.into(),
                outcome: outcome.into(),
                mode: mode.as_str().into(),
            })
            .inc();
        if !source {
            return;
        }
        if let Some(ms) = rec.stats.downtime_ms.filter(|_| outcome == "succeeded") {
            self.downtime.observe(ms as f64 / 1000.0);
        }
        if let Some(ms) = rec.stats.frozen_ms {
            self.frozen.observe(ms as f64 / 1000.0);
        }
        self.bytes.inc_by(rec.stats.bytes_sent);
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

// The HTTP side is the server the controller uses too.
pub use rebalancer_telemetry::{serve, Render};

#[cfg(test)]
mod tests {
    use super::*;
    use rebalancer_proto::{now_millis, MigrationStats};
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::time::Duration;

    fn record(state: MigrationState, source: &str) -> MigrationRecord {
        MigrationRecord {
            id: "m1".into(),
            container: "c1".into(),
            task: None,
            source: source.into(),
            destination: "other".into(),
            requested_mode: MigrationMode::Auto,
            mode: Some(MigrationMode::StopAndCopy),
            mode_reason: None,
            state,
            phases: vec![],
            stats: MigrationStats::default(),
            error: None,
            started_at: now_millis(),
            ended_at: None,
            cancelled_by: None,
        }
    }

    #[test]
    fn the_shipped_dashboards_query_only_what_the_agent_exports() {
        let m = AgentMetrics::new(&[MigrationMode::PostCopy]);
        let mut ok = record(MigrationState::Succeeded, "n1");
        ok.stats.downtime_ms = Some(300);
        ok.stats.frozen_ms = Some(250);
        m.record_migration(&ok, "n1");
        m.containers.set(1);
        let exported = rebalancer_telemetry::names::exported(&m.render());
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let files =
            rebalancer_telemetry::names::monitoring_files(&repo).expect("deploy/monitoring");
        assert!(files.len() >= 2, "{files:?}");
        let missing =
            rebalancer_telemetry::names::missing(&files, &exported, "rebalancer_agent_", None);
        assert!(
            missing.is_empty(),
            "not exported by the agent: {missing:?}\nexported: {exported:?}"
        );
    }

    #[test]
    fn renders_outcomes_times_bytes_and_modes() {
        let m = AgentMetrics::new(&[MigrationMode::StopAndCopy, MigrationMode::PostCopy]);
        let mut ok = record(MigrationState::Succeeded, "n1");
        ok.stats.downtime_ms = Some(300);
        ok.stats.frozen_ms = Some(250);
        ok.stats.bytes_sent = 4096;
        m.record_migration(&ok, "n1");
        let mut back = record(MigrationState::RolledBack, "n1");
        back.mode = Some(MigrationMode::PostCopy);
        back.stats.frozen_ms = Some(40_000);
        back.stats.bytes_sent = 100;
        m.record_migration(&back, "n1");
        // Another node's migration to this one: counted, but its measures are the source's.
        let mut incoming = record(MigrationState::Succeeded, "n2");
        incoming.stats.bytes_sent = 1_000_000;
        m.record_migration(&incoming, "n1");
        // Not terminal: ignored.
        m.record_migration(&record(MigrationState::Running, "n1"), "n1");
        m.containers.set(3);
        let text = m.render();
        for want in [
            "rebalancer_agent_migrations_total{role=\"source\",outcome=\"succeeded\",mode=\"stop-and-copy\"} 1\n",
            "rebalancer_agent_migrations_total{role=\"source\",outcome=\"rolled_back\",mode=\"post-copy\"} 1\n",
            "rebalancer_agent_migrations_total{role=\"destination\",outcome=\"succeeded\",mode=\"stop-and-copy\"} 1\n",
            "rebalancer_agent_migration_downtime_seconds_count 1\n",
            "rebalancer_agent_migration_downtime_seconds_sum 0.3\n",
            "rebalancer_agent_migration_downtime_seconds_bucket{le=\"0.2\"} 0\n",
            "rebalancer_agent_migration_downtime_seconds_bucket{le=\"0.3\"} 1\n",
            "rebalancer_agent_migration_frozen_seconds_count 2\n",
            "rebalancer_agent_migration_frozen_seconds_bucket{le=\"30.0\"} 1\n",
            "rebalancer_agent_migration_frozen_seconds_bucket{le=\"+Inf\"} 2\n",
            "rebalancer_agent_migration_bytes_total 4196\n",
            "rebalancer_agent_containers_running 3\n",
            "rebalancer_agent_supported_modes{mode=\"stop-and-copy\"} 1\n",
            "rebalancer_agent_supported_modes{mode=\"post-copy\"} 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("mode=\"pre-copy\""), "{text}");
        assert!(!text.contains("outcome=\"failed\""), "{text}");
    }

    fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(request).expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_serves_metrics_and_404() {
        let m = Arc::new(AgentMetrics::new(&[MigrationMode::StopAndCopy]));
        m.record_migration(&record(MigrationState::Failed, "n1"), "n1");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let r = m.clone();
        let server = tokio::spawn(serve(listener, Arc::new(move || r.render())));

        let ok = tokio::task::spawn_blocking(move || {
            get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        })
        .await
        .expect("join");
        let (head, body) = ok.split_once("\r\n\r\n").expect("head");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.contains("rebalancer_agent_migrations_total{role=\"source\",outcome=\"failed\",mode=\"stop-and-copy\"} 1\n"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");

        let missing =
            tokio::task::spawn_blocking(move || get(addr, b"GET /other HTTP/1.1\r\n\r\n"))
                .await
                .expect("join");
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );

        server.abort();
    }
}
