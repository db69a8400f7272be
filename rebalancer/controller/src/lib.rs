//! `rebalancerd`: watches Slurm and the node agents, evaluates policies and drives migrations.
//! See `LIFECYCLE.md` next to this file for the daemon's lifecycle and `docs/admin-cli.md`.

pub mod agents;
pub mod auth;
pub mod config;
pub mod daemon;
pub mod journal;
pub mod libslurm;
pub mod metrics;
pub mod planner;
pub mod policy_adapter;
pub mod server;
pub mod slurm_sync;
