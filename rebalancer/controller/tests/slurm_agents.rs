//! The whole path but the SPANK plugin: a real Slurm 22.05 cluster (slurm-tests' `cluster.sh`,
//! block 198.18.0.0/24, containers 198.19.0.0/20, hosts isolated like machines), real agents on
//! the nodes, and `rebalancerd` on the admin host (libslurm backend, the shipped drain policy,
//! the agents over TCP). A node drained with
//! scontrol is evacuated by a real CRIU migration and the job's allocation follows the container.

use std::path::Path;
use std::time::{Duration, Instant};

use rebalancer_controller::slurm_sync::expand_hostlist;
use rebalancer_proto::control::{ControlReply, ControlRequest};
use rebalancer_proto::*;

mod common;
use common::cluster::{node_sock, shared_work_dir, start_cluster_agents, start_cluster_controller};
use common::*;

#[test]
#[ignore = "needs root, CRIU 4.2, a real Slurm cluster (slurm-tests/cluster.sh) and network namespaces; .ci/run runs it with --include-ignored"]
fn slurm_drain_moves_the_container_and_the_allocation() {
    let cluster = slurm_tests::Cluster::up(3).expect("cluster up");
    let work = shared_work_dir(&cluster, "ctl-slurm-agents");
    let dir = work.as_path();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();

    // A 2-node job (batch host node1) whose container runs on node2.
    let job = cluster
        .sbatch(&[
            "-N2",
            "-w",
            "node1,node2",
            "-J",
            "rebal",
            "--wrap",
            "sleep 600",
        ])
        .expect("sbatch");
    cluster
        .wait_job_state(job, &["RUNNING"], Duration::from_secs(30))
        .expect("job runs");
    let job_id = job.0;
    let cid = format!("j{job_id}.s0.t0");
    let mut agents = start_cluster_agents(&cluster, dir, |_| String::new());
    agents.containers.push(cid.clone());
    let created = agent_call(
        &node_sock(&cluster, "node2"),
        &Request::CreateContainer {
            spec: server(&cid, job_id, "198.19.0.60"),
        },
    );
    assert!(created.is_ok(), "{created:?}\n{}", read("node2.log"));

    std::fs::create_dir_all(dir.join("policies")).expect("policies");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/drain.toml"),
        dir.join("policies/drain.toml"),
    )
    .expect("policy");
    let _daemon = start_cluster_controller(
        &cluster,
        dir,
        "",
        "",
        "poll_interval_ms = 500",
        "[migration]\ntimeout_s = 60",
    );
    let ctl = dir.join("ctl.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = matches!(
            ctl_call(&ctl, &ControlRequest::ShowContainers { id: None, job_id: Some(job_id) }),
            Ok(ControlReply::Containers { ref containers }) if !containers.is_empty()
        );
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "container not seen:\n{}",
            read("rebalancerd.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    cluster
        .scontrol(&[
            "update",
            "nodename=node2",
            "state=drain",
            "reason=rebalancer-test",
        ])
        .expect("drain");
    let deadline = Instant::now() + Duration::from_secs(90);
    let entry = loop {
        if let Ok(ControlReply::Migrations { migrations }) = ctl_call(
            &ctl,
            &ControlRequest::ShowMigrations {
                id: None,
                active: false,
            },
        ) {
            if let Some(m) = migrations.into_iter().find(|m| {
                m.record.state.is_terminal()
                    && (m.slurm_synced
                        || m.slurm_error.is_some()
                        || m.record.state != MigrationState::Succeeded)
            }) {
                break m;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no migration ended:\n{}\n{}",
            read("rebalancerd.log"),
            read("node2.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let ctx = format!(
        "{entry:?}\n{}\n{}",
        read("rebalancerd.log"),
        read("node2.log")
    );
    assert_eq!(entry.record.state, MigrationState::Succeeded, "{ctx}");
    assert_eq!(entry.record.source, "node2", "{ctx}");
    let dest = entry.record.destination.clone();
    assert!(dest == "node1" || dest == "node3", "{ctx}");
    assert!(entry.slurm_synced && entry.slurm_error.is_none(), "{ctx}");

    // Slurm's view follows: node2 left the job, the destination is in it.
    let nodes = expand_hostlist(&cluster.job_nodes(job).expect("job nodes"));
    assert!(!nodes.contains(&"node2".to_string()), "{nodes:?}\n{ctx}");
    assert!(nodes.contains(&dest), "{nodes:?}\n{ctx}");
    match agent_call(
        &node_sock(&cluster, &dest),
        &Request::GetContainer { id: cid.clone() },
    ) {
        Ok(Reply::Container { container }) => {
            assert_eq!(container.state, ContainerState::Running)
        }
        other => panic!("not on {dest}: {other:?}"),
    }
    eprintln!(
        "job {job_id}: {cid} node2 -> {dest} ({:?}, downtime {:?} ms); job nodes now {nodes:?}",
        entry.record.mode, entry.record.stats.downtime_ms
    );
    let _ = cluster.run("scancel", [job.to_string()]);
}
