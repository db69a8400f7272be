//! Policies and the migration planner of slurm-rebalancer.
//!
//! The controller builds a [`ClusterView`] each evaluation, calls [`plan`] with the current
//! [`PolicySet`] and the [`PolicyState`] kept from the previous evaluation, and acts on the
//! [`Decision`]s whose action is [`DecisionAction::Migrate`]. Policies are loaded from a directory
//! of TOML files with [`load_dir`] or kept current with [`PolicyStore`]. See `docs/policies.md`.

pub mod config;
pub mod hostlist;
pub mod model;
pub mod policy;

pub use config::{load_dir, load_sources, parse_policy, LoadError, Problem};
pub use model::{
    ClusterView, ContainerView, InFlight, MigrationMode, NodeFlags, NodeView, Timestamp,
};
pub use policy::{Action, Basis, Policy, PolicyKind, PolicySet};
pub mod plan;
pub mod planner;
pub mod state;

pub use plan::{
    Decision, DecisionAction, DestinationSearch, Metric, Plan, PolicyReport, RejectCode, Skip,
    SkipCode, TriggerReason, Why,
};
pub use planner::{plan, REJECT_EXAMPLES, RUNNERS_UP, SEARCH_BUDGET};
pub use state::{NodeTrack, PolicyState};
pub mod reload;
pub use reload::{PolicyStore, ReloadOutcome};
