//! Line protocol between `bench-client` and `bench-workload`.
//!
//! One request per line: `inc` answers the incremented counter as a decimal line, `stats`
//! answers one JSON line ([`ServerStats`]), `reset` clears the heartbeat statistics and
//! answers `ok`. Anything else answers `error`.

use serde::{Deserialize, Serialize};

/// What the workload reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    /// All memory allocated and touched.
    pub ready: bool,
    pub mib: u64,
    pub counter: u64,
    /// Largest interval between two heartbeats (1 ms apart while running): the time the
    /// process was frozen, as seen by the process itself.
    pub max_heartbeat_gap_us: u64,
    /// Wall-clock time (Unix µs) of the heartbeat that ended the largest gap.
    pub max_gap_end_unix_us: u64,
    /// Pages written by the dirtying thread since start.
    pub pages_dirtied: u64,
}

/// What the client reports when told to stop.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientReport {
    pub requests: u64,
    /// Largest interval between two consecutive answers.
    pub max_gap_us: u64,
    /// Wall-clock time (Unix µs) of the answer that ended the largest gap.
    pub max_gap_end_unix_us: u64,
    pub errors: Vec<String>,
    /// A counter lower than or equal to its predecessor was seen.
    pub counter_went_backwards: bool,
    pub first_counter: u64,
    pub last_counter: u64,
    /// The workload's own statistics, fetched at stop (absent if it could not be reached).
    pub server: Option<ServerStats>,
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
