//! Policies and the migration planner of slurm-rebalancer.
//!
//! The controller builds a [`ClusterView`] each evaluation, calls [`plan()`] with the current
//! [`PolicySet`] and the [`PolicyState`] kept from the previous evaluation, and executes the
//! [`Decision`]s whose action is [`DecisionAction::Migrate`] (in plan order). Policies come from a
//! directory of TOML files: [`load_dir`], or [`PolicyStore`] to reload while keeping the last
//! good set. The file format is documented in `docs/policies.md`.
//!
//! The crate does no I/O besides reading policy files and needs no privileges.
//!
//! ```
//! use rebalancer_policy::*;
//!
//! let set = load_sources(&[("policies/drain.toml", "kind = \"drain\"\naction = \"automatic\"\n")])
//!     .map_err(|e| e.to_string())?;
//! let node = |name: &str, drain: bool| NodeView {
//!     name: name.into(),
//!     flags: NodeFlags { drain, ..NodeFlags::default() },
//!     partitions: vec!["batch".into()],
//!     features: vec![],
//!     cpus_total: 16,
//!     cpus_alloc: 0,
//!     mem_total_mb: 65536,
//!     mem_alloc_mb: 0,
//!     load: 0.0,
//!     temperature_c: None,
//!     modes: vec![MigrationMode::PostCopy, MigrationMode::StopAndCopy],
//! };
//! let view = ClusterView {
//!     nodes: vec![node("n1", true), node("n2", false)],
//!     containers: vec![ContainerView {
//!         id: "c1".into(), job_id: 42, step_id: 0, user: "alice".into(),
//!         account: "physics".into(), partition: "batch".into(), node: "n1".into(),
//!         cpus: 4, rss_mb: 1024, class: None, migratable: true, last_moved: None,
//!     }],
//!     in_flight: vec![],
//!     now: 1_700_000_000,
//! };
//! let mut state = PolicyState::default();
//! let plan = plan(&set, &view, &mut state);
//! let d = plan.migrations().next().ok_or("expected a migration")?;
//! assert_eq!((d.source.as_str(), d.destination.as_str(), d.mode), ("n1", "n2", MigrationMode::PostCopy));
//! println!("{}", d.why.summary);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod hostlist;
pub mod model;
pub mod plan;
pub mod planner;
pub mod policy;
pub mod reload;
pub mod state;

pub use config::{check_sources, load_dir, load_sources, parse_policy, LoadError, Problem};
pub use model::{
    ClusterView, ContainerView, InFlight, MigrationMode, NodeFlags, NodeView, Timestamp,
};
pub use plan::{
    Decision, DecisionAction, DestinationSearch, Metric, Plan, PolicyReport, RankedCandidate,
    RejectCode, RejectedCandidate, Skip, SkipCode, TriggerReason, Why,
};
pub use planner::{plan, REJECT_EXAMPLES, RUNNERS_UP, SEARCH_BUDGET};
pub use policy::{Action, Basis, DrainState, Policy, PolicyKind, PolicySet};
pub use reload::{PolicyStore, ReloadOutcome};
pub use state::{NodeTrack, PolicyState};
