//! Harness helpers for tests on a real Slurm cluster.
