//! Migration benchmark of slurm-rebalancer.
//!
//! Three toolchains move the same workload (a TCP counter server holding N MiB) between two
//! node network namespaces: the project's agent, the plain CRIU command line, and runc. The
//! binaries of this crate are the orchestrator (`rebalancer-bench`), the workload
//! (`bench-workload`), the client that measures what a peer sees (`bench-client`) and the
//! chart generator (`bench-plot`). See `docs/benchmarks.md`.

pub mod breakdown;
pub mod memory;
pub mod report;
pub mod svg;
pub mod wire;
