//! libslurm bindings.
