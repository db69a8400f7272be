//! Progress of watched migrations (`--wait`, `rebalctl wait`).

use std::collections::HashMap;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rebalancer_proto::Event;

use crate::render;

/// Progress of watched migrations: a live line per migration on a terminal, a line per phase
/// otherwise, or (`--json`) each event as one JSON line on stdout.
pub struct Watch {
    on: bool,
    json: bool,
    tty: bool,
    mp: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    last: HashMap<String, String>,
    /// When each migration was first seen and its bytes then, for the rate.
    first: HashMap<String, (std::time::Instant, u64)>,
    /// Whether each migration seen was still running at its last event.
    running: HashMap<String, bool>,
}

impl Watch {
    pub fn new(on: bool, json: bool) -> Self {
        use std::io::IsTerminal;
        Watch {
            on,
            json,
            tty: std::io::stderr().is_terminal(),
            mp: MultiProgress::new(),
            bars: HashMap::new(),
            last: HashMap::new(),
            first: HashMap::new(),
            running: HashMap::new(),
        }
    }

    pub fn event(&mut self, ev: Event) {
        if !self.on {
            return;
        }
        let Event::MigrationProgress { migration, .. } = &ev;
        self.running
            .insert(migration.id.clone(), !migration.state.is_terminal());
        if self.json {
            if let Ok(line) = serde_json::to_string(&ev) {
                outln!("{line}");
            }
            return;
        }
        let Event::MigrationProgress {
            migration: r,
            progress_bytes,
        } = ev;
        let phase = if r.state.is_terminal() {
            render::outcome(&r).to_string()
        } else {
            r.phases
                .last()
                .map(|p| p.phase.to_string())
                .unwrap_or_else(|| "pending".into())
        };
        let sent_bytes = progress_bytes
            .unwrap_or(r.stats.bytes_sent)
            .max(r.stats.bytes_sent);
        let sent = render::bytes(sent_bytes);
        let now = std::time::Instant::now();
        let (t0, b0) = *self.first.entry(r.id.clone()).or_insert((now, sent_bytes));
        let rate = rate_and_eta(
            now.duration_since(t0),
            sent_bytes.saturating_sub(b0),
            r.stats.rss_bytes.saturating_sub(sent_bytes),
        )
        .filter(|_| !r.state.is_terminal())
        .unwrap_or_default();
        let mode = r.mode.unwrap_or(r.requested_mode);
        let msg = format!(
            "{} {} {}->{} [{mode}] {phase}, {sent} sent{rate}{}",
            render::short_id(&r.id),
            r.container,
            r.source,
            r.destination,
            r.stats
                .downtime_ms
                .map(|d| format!(", downtime {d} ms"))
                .unwrap_or_default()
        );
        if self.tty {
            let bar = self.bars.entry(r.id.clone()).or_insert_with(|| {
                let b = self.mp.add(ProgressBar::new_spinner());
                if let Ok(s) = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
                    b.set_style(s);
                }
                b.enable_steady_tick(std::time::Duration::from_millis(120));
                b
            });
            bar.set_message(msg.clone());
            if r.state.is_terminal() {
                bar.finish_with_message(msg);
            }
        } else if self.last.get(&r.id) != Some(&phase) {
            eprintln!("{msg}");
            self.last.insert(r.id.clone(), phase);
        }
    }

    /// Migrations seen that had not ended at their last event.
    pub fn running(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .running
            .iter()
            .filter(|(_, on)| **on)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    pub fn finish(&mut self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.finish();
            }
        }
    }
}

/// `, 120.0MiB/s, ETA 3 s` once bytes have moved for a while; the ETA when what is left is known.
pub fn rate_and_eta(elapsed: std::time::Duration, moved: u64, left: u64) -> Option<String> {
    let secs = elapsed.as_secs_f64();
    if secs < 0.5 || moved == 0 {
        return None;
    }
    let bps = moved as f64 / secs;
    let eta = if left > 0 {
        format!(", ETA {} s", (left as f64 / bps).ceil() as u64)
    } else {
        String::new()
    };
    Some(format!(", {}/s{eta}", render::bytes(bps as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_shows_rate_and_eta_once_bytes_move() {
        use std::time::Duration;
        assert_eq!(rate_and_eta(Duration::from_millis(100), 1 << 20, 0), None);
        assert_eq!(rate_and_eta(Duration::from_secs(2), 0, 1 << 20), None);
        assert_eq!(
            rate_and_eta(Duration::from_secs(2), 200 << 20, 300 << 20).as_deref(),
            Some(", 100.0MiB/s, ETA 3 s")
        );
        assert_eq!(
            rate_and_eta(Duration::from_secs(1), 64 << 20, 0).as_deref(),
            Some(", 64.0MiB/s")
        );
    }
}
