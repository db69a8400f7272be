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
    /// Downtimes of every run of this cell when it was repeated, in run order.
    #[serde(default)]
    pub downtime_runs_ms: Vec<f64>,
    /// Sub-phases of the downtime from the toolchain's own logs (`src:`/`dst:` agent steps,
    /// `dump.`/`restore.` CRIU log marks in ms since that CRIU started), in order.
    #[serde(default)]
    pub breakdown: Vec<(String, f64)>,
    /// The node's largest MemAvailable drop during the cell, from its level at the start, MiB
    /// (the workload started inside the cell, so it includes the RSS once or twice).
    #[serde(default)]
    pub mem_peak_mib: Option<f64>,
    /// Client gaps of every run of this cell when it was repeated, in run order.
    #[serde(default)]
    pub client_gap_runs_ms: Vec<f64>,
    /// TCP segments the client retransmitted during the cell (`RetransSegs` of its namespace):
    /// 0 when nothing it sent was lost or held past its RTO.
    #[serde(default)]
    pub client_retrans: Option<u64>,
    /// Peak extra memory of the migration on the source node, MiB: the largest rise, above
    /// its level when the migration started, of the private memory of the node's processes
    /// (agent, CRIU, runc; not the workload) plus its image and work directories (tmpfs).
    #[serde(default)]
    pub mem_src_extra_mib: Option<f64>,
    /// The same on the destination node (page server or lazy-pages daemon, images, restore).
    #[serde(default)]
    pub mem_dst_extra_mib: Option<f64>,
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
            downtime_runs_ms: Vec::new(),
            breakdown: Vec::new(),
            mem_peak_mib: None,
            client_gap_runs_ms: Vec::new(),
            client_retrans: None,
            mem_src_extra_mib: None,
            mem_dst_extra_mib: None,
        }
    }
}

/// Folds the repeated runs of one cell into the row of the run with the median downtime,
/// carrying every run's downtime. A failed run wins: it is what needs reporting.
pub fn combine(mut runs: Vec<Row>) -> Option<Row> {
    if let Some(i) = runs.iter().position(|r| r.outcome != Outcome::Ok) {
        return Some(runs.swap_remove(i));
    }
    let all: Vec<f64> = runs.iter().filter_map(|r| r.downtime_ms).collect();
    let gaps: Vec<f64> = runs.iter().filter_map(|r| r.client_gap_ms).collect();
    runs.sort_by(|a, b| {
        a.downtime_ms
            .unwrap_or(0.0)
            .total_cmp(&b.downtime_ms.unwrap_or(0.0))
    });
    let mid = runs.len().checked_sub(1)? / 2;
    let mut row = runs.swap_remove(mid);
    if all.len() > 1 {
        row.downtime_runs_ms = all;
    }
    if gaps.len() > 1 {
        row.client_gap_runs_ms = gaps;
    }
    Some(row)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub command: String,
    pub started_unix_s: u64,
    pub wall_clock_s: f64,
    pub kernel: String,
    pub criu_version: String,
    pub runc_version: String,
    /// One TCP stream source → destination node, MB/s: before and after the migrations.
    #[serde(default)]
    pub bandwidth_mb_s: Vec<f64>,
    pub rows: Vec<Row>,
}

/// `RetransSegs` of the `Tcp:` lines of a /proc/net/snmp text. Pure.
pub fn retrans_segs(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|w| w == "RetransSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
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

fn downtime_cell(r: &Row) -> String {
    range_cell(r.downtime_ms, &r.downtime_runs_ms)
}

/// `v`, with the range of `runs` when the cell was repeated.
fn range_cell(v: Option<f64>, runs: &[f64]) -> String {
    let min = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = runs.iter().copied().fold(0.0, f64::max);
    if runs.len() > 1 {
        format!("{} ({min:.0}–{max:.0})", ms(v))
    } else {
        ms(v)
    }
}

/// Markdown table of every row.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| memory | toolchain | mode | downtime ms | client gap ms | client retrans | total ms | MiB between nodes | mem peak MiB | extra MiB src / dst | counter ok | phases (ms) | breakdown (ms) | notes |\n\
         |---|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|---|---|\n",
    );
    for r in rows {
        let phases = r
            .phases
            .iter()
            .map(|(n, v)| format!("{n} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        let breakdown = r
            .breakdown
            .iter()
            .map(|(n, v)| format!("{n} {v:.1}"))
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
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} |\n",
            size_label(r.mib),
            r.toolchain,
            r.mode,
            downtime_cell(r),
            range_cell(r.client_gap_ms, &r.client_gap_runs_ms),
            r.client_retrans
                .map(|n| n.to_string())
                .unwrap_or_else(|| "–".into()),
            ms(r.total_ms),
            r.bytes_between_nodes
                .map(|b| format!("{:.1}", b as f64 / 1048576.0))
                .unwrap_or_else(|| "–".into()),
            ms(r.mem_peak_mib),
            ms(r.mem_src_extra_mib),
            ms(r.mem_dst_extra_mib),
            match r.counter_ok {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "–",
            },
            phases,
            breakdown,
            notes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmissions_are_read_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin OutSegs RetransSegs InErrs\n\
                    Tcp: 1 200 532 7 0\nUdp: InDatagrams\nUdp: 3\n";
        assert_eq!(retrans_segs(snmp), Some(7));
        assert_eq!(retrans_segs("Ip: x\nIp: 1\n"), None);
    }

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
    fn combine_takes_the_median_run_or_the_failure() {
        let run = |d: f64, gap: f64| {
            let mut r = Row::new(64, "criu", "stop-and-copy", Outcome::Ok);
            r.downtime_ms = Some(d);
            r.client_gap_ms = Some(gap);
            r
        };
        let row = combine(vec![run(300.0, 1.0), run(100.0, 2.0), run(200.0, 3.0)]);
        let row = row.unwrap_or_else(|| Row::new(0, "", "", Outcome::Ok));
        assert_eq!(row.downtime_ms, Some(200.0));
        assert_eq!(row.client_gap_ms, Some(3.0));
        assert_eq!(row.downtime_runs_ms, vec![300.0, 100.0, 200.0]);
        assert_eq!(row.client_gap_runs_ms, vec![1.0, 2.0, 3.0]);
        let t = markdown_table(&[row]);
        assert!(t.contains("| 200 (100–300) | 3 (1–3) |"), "{t}");

        let failed = Row::new(64, "criu", "stop-and-copy", Outcome::Failed("boom".into()));
        let row = combine(vec![run(1.0, 1.0), failed.clone()]);
        assert_eq!(row, Some(failed));
        assert_eq!(combine(Vec::new()), None);
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
