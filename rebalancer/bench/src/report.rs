//! Results of a benchmark run: one [`Row`] per (memory size, toolchain, mode), written as JSON
//! and as a Markdown table.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "kebab-case")]
pub enum Outcome {
    Ok,
    Unsupported(String),
    Failed(String),
}

/// One migration (or the reason there was none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub mib: u64,
    /// `agent`, `criu` or `runc`.
    pub toolchain: String,
    /// `stop-and-copy`, `post-copy` or `pre-copy`.
    pub mode: String,
    pub outcome: Outcome,
    /// Freeze → running on the destination, measured by the workload's 1 ms heartbeat.
    pub downtime_ms: Option<f64>,
    /// Largest interval between two answers the TCP client saw.
    pub client_gap_ms: Option<f64>,
    /// Start of the migration → every page on the destination and the source cleaned up.
    pub total_ms: Option<f64>,
    /// IP bytes between the two node addresses, both directions, counted on the bridge.
    pub bytes_between_nodes: Option<u64>,
    /// Phase name and duration, in order.
    pub phases: Vec<(String, f64)>,
    pub client_errors: Vec<String>,
    /// The counter only ever went up (and the TCP connection survived).
    pub counter_ok: Option<bool>,
}

impl Row {
    pub fn new(mib: u64, toolchain: &str, mode: &str, outcome: Outcome) -> Row {
        Row {
            mib,
            toolchain: toolchain.into(),
            mode: mode.into(),
            outcome,
            downtime_ms: None,
            client_gap_ms: None,
            total_ms: None,
            bytes_between_nodes: None,
            phases: Vec::new(),
            client_errors: Vec::new(),
            counter_ok: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub command: String,
    pub started_unix_s: u64,
    pub wall_clock_s: f64,
    pub kernel: String,
    pub criu_version: String,
    pub runc_version: String,
    pub rows: Vec<Row>,
}

/// `64 MiB`, `1 GiB`, ...
pub fn size_label(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into())
}

/// Markdown table of every row.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| memory | toolchain | mode | downtime ms | client gap ms | total ms | MiB between nodes | counter ok | phases (ms) | notes |\n\
         |---|---|---|--:|--:|--:|--:|---|---|---|\n",
    );
    for r in rows {
        let phases = r
            .phases
            .iter()
            .map(|(n, v)| format!("{n} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut notes = match &r.outcome {
            Outcome::Ok => String::new(),
            Outcome::Unsupported(why) => format!("unsupported: {why}"),
            Outcome::Failed(why) => format!("FAILED: {why}"),
        };
        if !r.client_errors.is_empty() {
            if !notes.is_empty() {
                notes.push_str("; ");
            }
            notes.push_str(&format!("client: {}", r.client_errors.join(" / ")));
        }
        let notes = notes.replace('|', "/").replace('\n', " ");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            size_label(r.mib),
            r.toolchain,
            r.mode,
            ms(r.downtime_ms),
            ms(r.client_gap_ms),
            ms(r.total_ms),
            r.bytes_between_nodes
                .map(|b| format!("{:.1}", b as f64 / 1048576.0))
                .unwrap_or_else(|| "–".into()),
            match r.counter_ok {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "–",
            },
            phases,
            notes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(size_label(64), "64 MiB");
        assert_eq!(size_label(2048), "2 GiB");
        assert_eq!(size_label(1536), "1536 MiB");
    }

    #[test]
    fn table_shows_numbers_and_reasons() {
        let mut ok = Row::new(256, "criu", "post-copy", Outcome::Ok);
        ok.downtime_ms = Some(171.4);
        ok.bytes_between_nodes = Some(3 * 1048576);
        ok.phases = vec![("dump".into(), 80.0)];
        ok.counter_ok = Some(true);
        let un = Row::new(
            256,
            "criu",
            "pre-copy",
            Outcome::Unsupported("kernel lacks soft-dirty".into()),
        );
        let t = markdown_table(&[ok, un]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].contains("| 171 |"), "{}", lines[2]);
        assert!(lines[2].contains("| 3.0 |"));
        assert!(lines[2].contains("dump 80"));
        assert!(lines[3].contains("unsupported: kernel lacks soft-dirty"));
    }

    #[test]
    fn json_round_trip() {
        let r = Row::new(64, "runc", "stop-and-copy", Outcome::Failed("x".into()));
        let s = serde_json::to_string(&r).unwrap_or_default();
        let back: Row =
            serde_json::from_str(&s).unwrap_or_else(|_| Row::new(0, "", "", Outcome::Ok));
        assert_eq!(back, r);
    }
}
