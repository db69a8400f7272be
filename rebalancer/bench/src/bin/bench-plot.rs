//! Writes `downtime-vs-memory.svg` (or, with `--client-gap`, the client's largest gap) from
//! the JSON of a `rebalancer-bench` run.

use anyhow::Context;
use clap::Parser;
use rebalancer_bench::report::RunReport;
use rebalancer_bench::svg::{chart, Metric};

#[derive(Parser, Debug)]
#[command(about = "Downtime-vs-memory SVG chart from rebalancer-bench JSON")]
struct Args {
    /// JSON written by `rebalancer-bench --json`.
    json: std::path::PathBuf,
    /// Output SVG file.
    #[arg(long, short)]
    output: std::path::PathBuf,
    /// Plot the client's largest gap instead of the downtime.
    #[arg(long)]
    client_gap: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.json)
        .with_context(|| format!("read {}", args.json.display()))?;
    let run: RunReport = serde_json::from_str(&text).context("parse benchmark JSON")?;
    let subtitle = format!(
        "kernel {}, CRIU {}, runc {}; lower is better",
        run.kernel, run.criu_version, run.runc_version
    );
    let metric = if args.client_gap {
        Metric::ClientGap
    } else {
        Metric::Downtime
    };
    let subtitle = match run.bandwidth_mb_s.first() {
        Some(bw) => format!("{subtitle}; source→destination TCP {bw:.0} MB/s"),
        None => subtitle,
    };
    std::fs::write(&args.output, chart(&run.rows, &subtitle, metric))
        .with_context(|| format!("write {}", args.output.display()))?;
    Ok(())
}
