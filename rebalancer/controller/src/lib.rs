//! `rebalancerd`: watches Slurm and the node agents, evaluates policies and drives migrations.
//! See `LIFECYCLE.md` next to this file for the daemon's lifecycle and `docs/admin-cli.md`.

pub mod agents;
mod attach;
pub mod auth;
mod cancel;
pub mod config;
pub mod daemon;
mod evaluate;
mod execute;
mod explain;
pub mod holder;
mod holder_watch;
pub mod inflight;
pub mod journal;
pub mod libslurm;
pub mod metrics;
mod operator;
pub mod planner;
pub mod policy_adapter;
mod recovery;
pub mod server;
pub mod slurm_sync;
mod slurm_watch;
