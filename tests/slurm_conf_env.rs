//! `Slurm::init(None)` takes the configuration from SLURM_CONF, as libslurm's clients do. A test
//! binary of its own: libslurm's configuration is once per process.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use rebalancer_slurm::{Error, Slurm};
use slurm_tests::Cluster;

#[test]
#[ignore = "needs root and the slurm-tests cluster (slurmctld, slurmdbd, MariaDB, network namespaces); .ci/run runs it with --include-ignored"]
fn init_without_a_path_honours_slurm_conf() {
    let cluster = Cluster::up(2).unwrap();
    // Edition 2021: set_var is safe; no other thread of this process touches the environment.
    std::env::set_var("SLURM_CONF", cluster.slurm_conf());
    let slurm = Slurm::init(None).unwrap();
    let names: Vec<String> = slurm
        .load_nodes()
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["node1", "node2"]);

    // Same configuration again: another handle. A different one: refused, not silently ignored.
    assert!(Slurm::init(None).is_ok());
    assert!(matches!(
        Slurm::init(Some(Path::new("/etc/hostname"))),
        Err(Error::AlreadyInitialised { .. })
    ));
}
