//! What the guest prints on the serial console: one `@@vmtest <json>` line per event, so that
//! kernel messages or shell noise on the same console never break the parse.

use rebalancer_proto::{ContainerInfo, MigrationRecord, NodeCapabilities};
use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "@@vmtest ";

/// The TCP client's view of one migration (a request every 10 ms, counter checked).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub requests: u64,
    pub max_gap_ms: u64,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum GuestEvent {
    Kernel {
        release: String,
    },
    Capabilities {
        capabilities: NodeCapabilities,
    },
    Container {
        id: String,
        rss_bytes: u64,
    },
    Migration {
        label: String,
        record: Box<MigrationRecord>,
        probe: ProbeReport,
    },
    /// Two-guest lab: this guest's agent answers (`uptime_s`: the guest kernel's uptime then).
    NodeUp {
        node: String,
        uptime_s: f64,
        auth: String,
    },
    /// Two-guest lab: the counter server container started.
    Created {
        container: ContainerInfo,
    },
    /// Two-guest lab: a migration this guest's agent ran as the source (the client is on the
    /// host, which keeps its own figures).
    Migrated {
        label: String,
        record: Box<MigrationRecord>,
    },
    /// Two-guest lab: what this kernel runs, for the host to compare across guests.
    NodeState {
        node: String,
        containers: Vec<ContainerInfo>,
        /// Pids of `vm-guest workload` processes in this kernel.
        workload_pids: Vec<i32>,
    },
    Log {
        message: String,
    },
    Done {
        ok: bool,
        error: Option<String>,
    },
}

impl GuestEvent {
    pub fn line(&self) -> String {
        // Serializing these plain structs cannot fail; an empty object is still a parseable line.
        format!(
            "{PREFIX}{}",
            serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
        )
    }
}

/// `phase=ms` for each phase of a migration, space-separated.
pub fn phases(rec: &MigrationRecord) -> String {
    let each: Vec<String> = rec
        .phases
        .iter()
        .map(|p| format!("{}={}ms", p.phase, p.duration_ms().unwrap_or(0)))
        .collect();
    each.join(" ")
}

/// Extracts the events from console output; other lines are ignored.
pub fn parse(console: &str) -> Vec<GuestEvent> {
    console
        .lines()
        .filter_map(|l| {
            let i = l.find(PREFIX)?;
            serde_json::from_str(l[i + PREFIX.len()..].trim_end_matches('\r')).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_console_noise() {
        let e = GuestEvent::Container {
            id: "mem".into(),
            rss_bytes: 5,
        };
        let console = format!(
            "[    1.0] random: crng init done\r\n{}\r\nnoise {}\nhalf {{\n",
            e.line(),
            GuestEvent::Done {
                ok: true,
                error: None
            }
            .line()
        );
        let got = parse(&console);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], e);
        assert!(matches!(got[1], GuestEvent::Done { ok: true, .. }));
    }
}
