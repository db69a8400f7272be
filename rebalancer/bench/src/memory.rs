//! The extra memory a migration takes on each node: pure parts of the orchestrator's sampler
//! (which reads `/proc` and the image directories while a migration runs).
//!
//! A node's figure at one instant is the private memory of the processes in the node's network
//! namespace (the agent, every CRIU process, runc; not the workload, which lives in the
//! container's namespace) plus the bytes of that node's image and work directories (tmpfs).
//! The extra memory is the largest rise of that figure above its value when the migration
//! started.

/// Private memory of one process from its `/proc/PID/status`, bytes: `RssAnon` + `RssShmem`
/// (anonymous pages, and shared memory it created such as CRIU's restorer areas; not the
/// binary's file pages, which the page cache holds anyway). `None` for a kernel thread or an
/// unreadable text. Pure.
pub fn private_rss_bytes(status: &str) -> Option<u64> {
    let kib = |key: &str| -> Option<u64> {
        status.lines().find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let anon = kib("RssAnon:")?;
    Some((anon + kib("RssShmem:").unwrap_or(0)) * 1024)
}

/// The largest rise of a sampled figure above its first sample (0 when it never rose). Pure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeakRise {
    base: Option<u64>,
    peak: u64,
}

impl PeakRise {
    pub fn add(&mut self, v: u64) {
        let base = *self.base.get_or_insert(v);
        self.peak = self.peak.max(v.saturating_sub(base));
    }

    /// Bytes; `None` before the first sample.
    pub fn rise(&self) -> Option<u64> {
        self.base.map(|_| self.peak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_memory_is_anonymous_plus_shmem() {
        let s = "Name:\tcriu\nVmRSS:\t  9000 kB\nRssAnon:\t  1000 kB\nRssFile:\t  7000 kB\n\
                 RssShmem:\t    24 kB\n";
        assert_eq!(private_rss_bytes(s), Some(1024 * 1024));
        assert_eq!(private_rss_bytes("Name:\tkthreadd\n"), None);
        assert_eq!(
            private_rss_bytes("RssAnon:\t 2 kB\n"),
            Some(2048),
            "RssShmem missing counts as 0"
        );
    }

    #[test]
    fn the_rise_is_measured_from_the_first_sample() {
        let mut p = PeakRise::default();
        assert_eq!(p.rise(), None);
        for v in [100, 90, 250, 120] {
            p.add(v);
        }
        assert_eq!(p.rise(), Some(150));
        let mut down = PeakRise::default();
        down.add(500);
        down.add(10);
        assert_eq!(down.rise(), Some(0));
    }
}
