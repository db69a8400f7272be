//! **Test-only** pause points, for the fault matrix (`tests/fault_matrix.rs`): with
//! `test_pause_phase = "P"` and `test_pause_ms = N` in its configuration, the agent waits N ms
//! right after it entered phase P of a migration (as source, and for `restore` also as the
//! destination, before CRIU runs), so that a test can inject a fault while that phase is
//! certainly in progress. Unset (the default) it does nothing. Never set it on a real node: a
//! pause longer than the peer's stall limit fails the migration.

use std::time::Duration;

use super::host::Clock;
use crate::config::AgentConfig;

/// Phases a pause point exists for (the configuration validates against the same list).
pub use crate::config::PAUSE_PHASES as PHASES;

/// Waits `test_pause_ms` if `phase` is the configured pause phase.
pub async fn point<C: Clock + ?Sized>(clock: &C, cfg: &AgentConfig, phase: &str) {
    if cfg.test_pause_phase.as_deref() == Some(phase) && cfg.test_pause_ms > 0 {
        tracing::warn!(
            phase,
            ms = cfg.test_pause_ms,
            "test pause point (test_pause_phase is set)"
        );
        clock.sleep(Duration::from_millis(cfg.test_pause_ms)).await;
    }
}
