//! Writes `downtime-vs-memory.svg` from the JSON of a `rebalancer-bench` run.

use anyhow::Context;
use clap::Parser;
use rebalancer_bench::report::RunReport;
use rebalancer_bench::svg::downtime_chart;

#[derive(Parser, Debug)]
#[command(about = "Downtime-vs-memory SVG chart from rebalancer-bench JSON")]
struct Args {
    /// JSON written by `rebalancer-bench --json`.
    json: std::path::PathBuf,
    /// Output SVG file.
    #[arg(long, short)]
    output: std::path::PathBuf,
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
    std::fs::write(&args.output, downtime_chart(&run.rows, &subtitle))
        .with_context(|| format!("write {}", args.output.display()))?;
    Ok(())
}
