//! rebalancer-agent: per-node daemon that runs job containers and live-migrates them with CRIU.
//! See `LIFECYCLE.md` next to this file's crate for the daemon's and a migration's life cycle.

pub mod adopt;
pub mod agent;
pub mod auth;
pub mod caps;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod control;
pub mod control_authz;
pub mod criu;
pub mod daemon;
pub mod detach;
pub mod drain;
pub mod error;
pub mod garp;
pub mod lazy_guard;
pub mod lazy_link;
pub mod metrics;
pub mod migration;
pub mod netns;
pub mod peer;
pub mod procstat;
pub mod prom;
pub mod ps_guard;
pub mod rtnl;
pub mod spank;
pub mod store;
pub mod tls;

/// The pure migration decisions under their former path (`migrate::choose_mode`).
pub use migration::policy as migrate;

pub const SOFTWARE: &str = concat!("rebalancer-agent ", env!("CARGO_PKG_VERSION"));
