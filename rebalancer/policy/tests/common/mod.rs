//! Builders shared by the integration tests.
#![allow(dead_code)]

use rebalancer_policy::{
    load_sources, ClusterView, ContainerView, MigrationMode, NodeFlags, NodeView, PolicySet,
};

pub fn node(name: &str) -> NodeView {
    NodeView {
        name: name.to_owned(),
        flags: NodeFlags::default(),
        partitions: vec!["batch".into()],
        features: vec![],
        cpus_total: 32,
        cpus_alloc: 0,
        mem_total_mb: 128 * 1024,
        mem_alloc_mb: 0,
        load: 0.0,
        temperature_c: Some(50.0),
        modes: vec![MigrationMode::StopAndCopy, MigrationMode::PostCopy],
    }
}

pub fn container(id: &str, job: u64, on: &str) -> ContainerView {
    ContainerView {
        id: id.to_owned(),
        job_id: job,
        step_id: 0,
        user: "alice".into(),
        account: "physics".into(),
        partition: "batch".into(),
        node: on.to_owned(),
        cpus: 4,
        rss_mb: 2048,
        class: None,
        migratable: true,
        last_moved: None,
    }
}

pub fn view(nodes: Vec<NodeView>, containers: Vec<ContainerView>, now: u64) -> ClusterView {
    ClusterView {
        nodes,
        containers,
        in_flight: vec![],
        now,
    }
}

/// A set from (file name, text) pairs; panics with every problem when it does not validate.
pub fn set(files: &[(&str, &str)]) -> PolicySet {
    load_sources(files).unwrap_or_else(|e| panic!("policies should validate:\n{e}"))
}

pub const THERMAL: &str = r#"
name = "thermal"
kind = "thermal"
action = "automatic"
[trigger]
high = 85.0
low = 78.0
samples = 2
min_duration_s = 0
[limits]
job_cooldown_s = 0
node_cooldown_s = 0
"#;

pub const LOAD: &str = r#"
name = "load"
kind = "load"
action = "automatic"
[trigger]
high = 1.2
low = 0.9
samples = 1
min_duration_s = 0
[limits]
job_cooldown_s = 0
node_cooldown_s = 0
"#;

pub const DRAIN: &str = r#"
name = "drain"
kind = "drain"
action = "automatic"
"#;
