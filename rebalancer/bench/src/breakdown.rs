//! Sub-phase breakdowns of a migration's downtime, from the logs each toolchain leaves: the
//! agents' `sub-phases` lines (rebalancer-agent's `migration::timing`) and CRIU's own log
//! timestamps (`(SS.uuuuuu)` prefixes, written at `-v3` and above).

/// Removes ANSI escape sequences (tracing's fmt layer colours its fields even into files).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                // Parameters and intermediates up to the final byte (0x40..=0x7e).
                for d in it.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The value of `key=` in a tracing fmt line (up to the next space, without quotes).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let at = line.find(&pat)? + pat.len();
    let rest = &line[at..];
    Some(
        rest.split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches('"'),
    )
}

/// The `sub-phases` lines of an agent's log: (phase, [(step, ms)]) in log order. Steps are
/// prefixed with the line's phase (`restore.criu-restore`) by [`prefixed`].
pub fn agent_sub_phases(log: &str) -> Vec<(String, Vec<(String, f64)>)> {
    let mut out = Vec::new();
    for raw in log.lines() {
        let line = strip_ansi(raw);
        if !line.contains("sub-phases") {
            continue;
        }
        let (Some(phase), Some(steps)) = (field(&line, "phase"), field(&line, "steps")) else {
            continue;
        };
        let steps = steps
            .split(',')
            .filter_map(|s| {
                let (n, v) = s.rsplit_once(':')?;
                Some((n.to_string(), v.parse::<f64>().ok()?))
            })
            .collect();
        out.push((phase.to_string(), steps));
    }
    out
}

/// Flattens [`agent_sub_phases`] into `phase.step` names, with a `side` prefix (`src`, `dst`).
pub fn prefixed(side: &str, lines: &[(String, Vec<(String, f64)>)]) -> Vec<(String, f64)> {
    lines
        .iter()
        .flat_map(|(phase, steps)| {
            steps
                .iter()
                .map(move |(n, v)| (format!("{side}:{phase}.{n}"), *v))
        })
        .collect()
}

fn log_time_ms(line: &str) -> Option<f64> {
    let rest = line.strip_prefix('(')?;
    let end = rest.find(')')?;
    let (s, us) = rest[..end].split_once('.')?;
    Some(s.trim().parse::<u64>().ok()? as f64 * 1000.0 + us.parse::<u64>().ok()? as f64 / 1000.0)
}

/// The time of the first line containing `marker` in a CRIU log, in ms since CRIU started.
pub fn criu_mark_ms(log: &str, marker: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains(marker))
        .find_map(log_time_ms)
}

/// The last timestamp of a CRIU log: CRIU's own run time, in ms.
pub fn criu_span_ms(log: &str) -> Option<f64> {
    log.lines().rev().find_map(log_time_ms)
}

/// CRIU's figures of a dump log: seized (tree stops), network locked, done, total.
pub fn criu_dump_marks(prefix: &str, log: &str) -> Vec<(String, f64)> {
    marks(
        prefix,
        log,
        &[
            ("seized", "Seized task"),
            ("net-locked", "net: Lock network"),
            ("done", "Dumping finished successfully"),
        ],
    )
}

/// CRIU's figures of a restore log: network unlocked, restore finished, total.
pub fn criu_restore_marks(prefix: &str, log: &str) -> Vec<(String, f64)> {
    marks(
        prefix,
        log,
        &[
            ("net-unlocked", "net: Unlock network"),
            ("restored", "Restore finished successfully"),
        ],
    )
}

fn marks(prefix: &str, log: &str, list: &[(&str, &str)]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = list
        .iter()
        .filter_map(|(name, m)| Some((format!("{prefix}.{name}"), criu_mark_ms(log, m)?)))
        .collect();
    if let Some(t) = criu_span_ms(log) {
        out.push((format!("{prefix}.total"), t));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_lines_are_read_through_the_colours() {
        let log = "2026-12-07T12:00:00Z  INFO \u{1b}[2mrebalancer_agent::migration::timing\u{1b}[0m\u{1b}[2m:\u{1b}[0m sub-phases \
                   \u{1b}[3mmigration\u{1b}[0m\u{1b}[2m=\u{1b}[0mabc \u{1b}[3mside\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"destination\" \
                   \u{1b}[3mphase\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"restore\" \u{1b}[3msteps\u{1b}[0m\u{1b}[2m=\u{1b}[0mlazy-daemon:20.5,criu-restore:41.0\n\
                   2026-12-07T12:00:01Z  INFO other line steps=x:1\n";
        let got = agent_sub_phases(log);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "restore");
        assert_eq!(
            got[0].1,
            vec![
                ("lazy-daemon".to_string(), 20.5),
                ("criu-restore".to_string(), 41.0)
            ]
        );
        let flat = prefixed("dst", &got);
        assert_eq!(flat[1], ("dst:restore.criu-restore".to_string(), 41.0));
    }

    #[test]
    fn criu_marks_come_from_the_timestamps() {
        let log = "(00.000000) CRIU run id = x\n(00.070100) Seized task 42, state 1\n\
                   (00.070300) net: Lock network\n(00.103502) Dumping finished successfully\n";
        let m = criu_dump_marks("dump", log);
        assert_eq!(
            m,
            vec![
                ("dump.seized".to_string(), 70.1),
                ("dump.net-locked".to_string(), 70.3),
                ("dump.done".to_string(), 103.502),
                ("dump.total".to_string(), 103.502),
            ]
        );
        assert!(criu_restore_marks("restore", "Error: no times\n").is_empty());
    }
}
