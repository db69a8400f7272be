//! The downtime model: one estimate of how long a container stays frozen, shared by the
//! controller's planner (per-policy parameters) and the agent's `auto` mode (the defaults).

use crate::models::MigrationMode;

/// Parameters of the estimate. `Default` is what a policy gets when it sets none of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DowntimeModel {
    /// Freeze cost besides memory: dumping and restoring everything else, the network switch.
    pub fixed_ms: u64,
    /// Assumed copy rate between nodes while frozen.
    pub bandwidth_mib_s: f64,
    /// Share of memory still dirty at the final pre-copy round.
    pub pre_copy_dirty_fraction: f64,
}

impl Default for DowntimeModel {
    fn default() -> Self {
        DowntimeModel {
            fixed_ms: 200,
            bandwidth_mib_s: 700.0,
            pre_copy_dirty_fraction: 0.25,
        }
    }
}

impl DowntimeModel {
    /// Estimated freeze time of `mode` for a container of `rss_mb` resident MiB: the fixed cost
    /// plus the memory copied while frozen (all of it for stop-and-copy and `auto`'s worst case,
    /// the dirty share for pre-copy, none for post-copy) over the bandwidth.
    pub fn downtime_ms(&self, mode: MigrationMode, rss_mb: u64) -> u64 {
        let frozen_mb = match mode {
            MigrationMode::StopAndCopy | MigrationMode::Auto => rss_mb as f64,
            MigrationMode::PreCopy => rss_mb as f64 * self.pre_copy_dirty_fraction,
            MigrationMode::PostCopy => 0.0,
        };
        self.fixed_ms
            .saturating_add((frozen_mb / self.bandwidth_mib_s * 1000.0).ceil() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_freezes_its_share_of_memory() {
        let m = DowntimeModel::default();
        assert_eq!(m.downtime_ms(MigrationMode::StopAndCopy, 700), 1200);
        assert_eq!(m.downtime_ms(MigrationMode::PreCopy, 700), 450);
        assert_eq!(m.downtime_ms(MigrationMode::PostCopy, 700), 200);
        assert_eq!(m.downtime_ms(MigrationMode::StopAndCopy, 3), 205);
    }
}
