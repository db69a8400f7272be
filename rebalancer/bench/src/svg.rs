//! Hand-written SVG line chart: downtime vs memory size, one line per (toolchain, mode).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::report::{size_label, Outcome, Row};

const W: f64 = 760.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

fn colour(toolchain: &str) -> &'static str {
    match toolchain {
        "agent" => "#1b9e77",
        "agent-plain" => "#66a61e",
        "agent-nohold" => "#e7298a",
        "agent-base" => "#a6761d",
        "agent-plain-base" => "#e6ab02",
        "criu" => "#d95f02",
        "runc" => "#7570b3",
        _ => "#666666",
    }
}

fn dash(mode: &str) -> &'static str {
    match mode {
        "stop-and-copy" => "",
        "post-copy" => " stroke-dasharray=\"7 4\"",
        _ => " stroke-dasharray=\"2 3\"",
    }
}

/// 1, 2, 5 × each power of ten from 10^lmin to 10^lmax.
fn log_ticks(lmin: f64, lmax: f64) -> Vec<f64> {
    let mut t = Vec::new();
    let mut d = lmin as i32;
    while d as f64 <= lmax {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(d);
            if v.log10() <= lmax + 1e-9 {
                t.push(v);
            }
        }
        d += 1;
    }
    t
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// What a chart plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Downtime,
    ClientGap,
}

impl Metric {
    fn of(self, r: &Row) -> Option<f64> {
        match self {
            Metric::Downtime => r.downtime_ms,
            Metric::ClientGap => r.client_gap_ms,
        }
    }
    fn title(self) -> &'static str {
        match self {
            Metric::Downtime => "Downtime (freeze → running on destination) vs memory",
            Metric::ClientGap => "Client's largest gap between two answers vs memory",
        }
    }
    fn axis(self) -> &'static str {
        match self {
            Metric::Downtime => "downtime (ms, log scale)",
            Metric::ClientGap => "client gap (ms, log scale)",
        }
    }
}

/// Renders the downtime chart; rows without a downtime are left out. `subtitle` goes under
/// the title.
pub fn downtime_chart(rows: &[Row], subtitle: &str) -> String {
    chart(rows, subtitle, Metric::Downtime)
}

/// Renders a chart of `metric`; rows without it are left out.
pub fn chart(rows: &[Row], subtitle: &str, metric: Metric) -> String {
    let mut sizes: Vec<u64> = rows.iter().map(|r| r.mib).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut series: BTreeMap<(String, String), Vec<(u64, f64)>> = BTreeMap::new();
    for r in rows {
        if let (Outcome::Ok, Some(d)) = (&r.outcome, metric.of(r)) {
            series
                .entry((r.toolchain.clone(), r.mode.clone()))
                .or_default()
                .push((r.mib, d));
        }
    }
    // Log scale: post-copy downtimes (~100 ms) and stop-and-copy ones (seconds) on one chart.
    let vals: Vec<f64> = series.values().flatten().map(|p| p.1.max(1.0)).collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(0.0f64, f64::max);
    let (lmin, lmax) = if vals.is_empty() {
        (1.0, 4.0)
    } else {
        (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        )
    };
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let xpos = |mib: u64| -> f64 {
        let i = sizes.iter().position(|s| *s == mib).unwrap_or(0) as f64;
        let n = (sizes.len().max(2) - 1) as f64;
        LEFT + 20.0 + i * (pw - 40.0) / n
    };
    let ypos = |v: f64| TOP + ph - (v.max(1.0).log10() - lmin) / (lmax - lmin) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"20\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        LEFT,
        metric.title()
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"34\" font-size=\"11\" fill=\"#555\">{}</text>",
        LEFT,
        esc(subtitle)
    );
    for v in log_ticks(lmin, lmax) {
        let y = ypos(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>",
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for m in &sizes {
        let x = xpos(*m);
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#999\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + ph,
            TOP + ph + 5.0,
            TOP + ph + 20.0,
            size_label(*m)
        );
    }
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">memory size (RSS)</text>",
        LEFT + pw / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        "<text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        TOP + ph / 2.0,
        metric.axis()
    );
    for (i, ((tool, mode), pts)) in series.iter().enumerate() {
        let c = colour(tool);
        let path = pts
            .iter()
            .map(|(m, d)| format!("{:.1},{:.1}", xpos(*m), ypos(*d)))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            s,
            "<polyline points=\"{path}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"{}/>",
            dash(mode)
        );
        for (m, d) in pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{c}\"><title>{tool} {mode} {}: {d:.0} ms</title></circle>",
                xpos(*m),
                ypos(*d),
                size_label(*m)
            );
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 15.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"{}/><text x=\"{}\" y=\"{}\">{} {}</text>",
            lx + 30.0,
            dash(mode),
            lx + 36.0,
            ly + 4.0,
            esc(tool),
            esc(mode)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_decades() {
        assert_eq!(
            log_ticks(2.0, 4.0),
            vec![100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0]
        );
    }

    #[test]
    fn chart_has_one_line_per_series_and_skips_failures() {
        let mut rows = Vec::new();
        for (mib, d) in [(64, 100.0), (256, 300.0)] {
            let mut r = Row::new(mib, "criu", "stop-and-copy", Outcome::Ok);
            r.downtime_ms = Some(d);
            rows.push(r);
        }
        rows.push(Row::new(
            64,
            "runc",
            "post-copy",
            Outcome::Failed("x".into()),
        ));
        let svg = downtime_chart(&rows, "test");
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("256 MiB"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
