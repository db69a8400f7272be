//! Sub-phase timings inside a migration's phases (restore, network switch, commit), for the
//! benchmark's phase breakdown (docs/benchmarks.md). Each side logs one `sub-phases` line per
//! migration with a structured `steps` field, `name:ms,name:ms,...` in the order they ran:
//! tracing stays the only channel, and the peer protocol and the migration record are unchanged.

use std::time::Instant;

/// Consecutive named steps, each measured from the end of the previous one.
#[derive(Debug)]
pub struct SubPhases {
    migration: String,
    side: &'static str,
    last: Instant,
    steps: Vec<(&'static str, f64)>,
}

impl SubPhases {
    pub fn new(migration: &str, side: &'static str, now: Instant) -> SubPhases {
        SubPhases {
            migration: migration.to_string(),
            side,
            last: now,
            steps: Vec::new(),
        }
    }

    /// Ends step `name` at `now`; the next step starts here.
    pub fn mark(&mut self, name: &'static str, now: Instant) {
        let ms = now.saturating_duration_since(self.last).as_secs_f64() * 1000.0;
        self.steps.push((name, ms));
        self.last = now;
    }

    /// A figure that is not a consecutive step (e.g. CRIU's own time inside `criu-restore`).
    pub fn note(&mut self, name: &'static str, ms: f64) {
        self.steps.push((name, ms));
    }

    /// The `steps` field: `name:ms,...`, ms with one decimal.
    pub fn render(&self) -> String {
        self.steps
            .iter()
            .map(|(n, ms)| format!("{n}:{ms:.1}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Logs the line (at info: one per migration and side).
    pub fn log(&self, phase: &'static str) {
        tracing::info!(migration = %self.migration, side = self.side, phase, steps = %self.render(), "sub-phases");
    }
}

/// The last timestamp of a CRIU log written with `-v3` or more (`(SS.uuuuuu) ...` lines, seconds
/// since CRIU started), in ms: CRIU's own run time, without its exec and the caller's wait.
pub fn criu_log_span_ms(log: &str) -> Option<f64> {
    log.lines().rev().find_map(log_time_ms)
}

/// The timestamp of the first line of a CRIU log containing `marker`, in ms.
pub fn criu_log_mark_ms(log: &str, marker: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains(marker))
        .find_map(log_time_ms)
}

fn log_time_ms(line: &str) -> Option<f64> {
    let rest = line.strip_prefix('(')?;
    let end = rest.find(')')?;
    let (s, us) = rest[..end].split_once('.')?;
    let s: u64 = s.trim().parse().ok()?;
    let us: u64 = us.parse().ok()?;
    Some(s as f64 * 1000.0 + us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn steps_are_consecutive_and_rendered_in_order() {
        let t0 = Instant::now();
        let mut s = SubPhases::new("m", "destination", t0);
        s.mark("a", t0 + Duration::from_micros(1500));
        s.mark("b", t0 + Duration::from_millis(4));
        s.note("criu-internal", 2.26);
        assert_eq!(s.render(), "a:1.5,b:2.5,criu-internal:2.3");
    }

    #[test]
    fn criu_log_times_are_read_from_the_prefix() {
        let log = "(00.000000) CRIU run id = x\n(00.012345) Restore finished successfully. Tasks resumed.\n\
                   (01.500001) Writing stats\nError: trailing line without a time\n";
        assert_eq!(criu_log_span_ms(log), Some(1500.001));
        assert_eq!(criu_log_mark_ms(log, "Restore finished"), Some(12.345));
        assert_eq!(criu_log_mark_ms(log, "absent"), None);
        assert_eq!(criu_log_span_ms("no times here\n"), None);
    }
}
