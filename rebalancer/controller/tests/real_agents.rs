//! `rebalancerd` driving real `rebalancer-agent`s (real CRIU migrations) on nodes isolated like
//! machines (the common `Lab`: own network, mount and UTS namespaces; the controller on the
//! admin host reaches them over TCP with munge), block [rbp] of the network plan: nodes
//! 198.18.48.0/24, containers 198.19.48.0/24. Slurm is a fake `scontrol` on PATH so that the
//! test decides when a node drains.
//!
//! The agent binary is taken from the same target directory (`cargo test --workspace` builds
//! it), or from `REBALANCER_AGENT_BIN`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rebalancer_proto::control::{ControlReply, ControlRequest};
use rebalancer_proto::*;

mod common;
use common::*;
use rebalancer_testkit::TcpProbe;

#[test]
#[ignore = "needs root, CRIU 4.2, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn a_drained_node_is_evacuated_with_real_migrations_and_tcp_survives() {
    let lab = LabPlan::new("rbp", 48).up();
    let d = lab.dir.clone();
    let created = agent_call(
        &lab.sock(0),
        &Request::CreateContainer {
            spec: server("j31.s0.t0", 31, "198.19.48.31"),
        },
    );
    assert!(created.is_ok(), "{created:?}\n{}", lab.log("node0.log"));
    // The probe retries its connection while the server fills its memory and starts listening.
    let probe = TcpProbe::start(Some(&lab.net.client_ns), "198.19.48.31");
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe.state().0 < 20 {
        assert!(
            Instant::now() < deadline,
            "probe got no answers: {:?}",
            probe.state()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Fake Slurm: node0 healthy at first.
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let scontrol = format!(
        "#!/bin/sh\ncase \"$1 $2\" in\n  'show node') cat {0}/nodes.txt ;;\n  'show job') cat {0}/jobs.txt ;;\n  *) echo \"$*\" >> {0}/updates.log ;;\nesac\n",
        d.display()
    );
    std::fs::write(bin.join("scontrol"), scontrol).expect("scontrol");
    std::fs::set_permissions(bin.join("scontrol"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let node = |n: &str, st: &str| {
        format!("NodeName={n} CPUAlloc=1 CPUTot=2 RealMemory=4000 AllocMem=0 State={st} Partitions=debug\n")
    };
    let write_nodes = |a: &str| {
        let tmp = d.join("nodes.tmp");
        std::fs::write(&tmp, node("rbpn0", a) + &node("rbpn1", "IDLE")).expect("nodes");
        std::fs::rename(&tmp, d.join("nodes.txt")).expect("rename");
    };
    write_nodes("MIXED");
    std::fs::write(d.join("jobs.txt"), "JobId=31 UserId=root(0) Account=a JobState=RUNNING Partition=debug NodeList=rbpn[0-1] BatchHost=rbpn1\n").expect("jobs");
    std::fs::create_dir_all(d.join("policies")).expect("policies");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/drain.toml"),
        d.join("policies/drain.toml"),
    )
    .expect("policy");
    let _daemon = lab.controller(ControllerPlan {
        agents: "poll_interval_ms = 500",
        rest: "[slurm]\nbackend = \"scontrol\"\n[migration]\ntimeout_s = 60\n",
        path: Some(bin.clone()),
        ..Default::default()
    });
    let ctl = d.join("ctl.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(ControlReply::Containers { containers }) = ctl_call(
            &ctl,
            &ControlRequest::ShowContainers {
                id: None,
                job_id: None,
            },
        ) {
            if !containers.is_empty() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "controller never saw the container:\n{}",
            lab.log("rebalancerd.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    write_nodes("MIXED+DRAIN");
    let deadline = Instant::now() + Duration::from_secs(40);
    let entry = loop {
        if let Ok(ControlReply::Migrations { migrations }) = ctl_call(
            &ctl,
            &ControlRequest::ShowMigrations {
                id: None,
                active: false,
            },
        ) {
            if let Some(m) = migrations
                .into_iter()
                .find(|m| m.record.state.is_terminal())
            {
                break m;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no migration ended:\n{}\n{}",
            lab.log("rebalancerd.log"),
            lab.log("node0.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = lab.log("rebalancerd.log");
    assert_eq!(
        entry.record.state,
        MigrationState::Succeeded,
        "{entry:?}\n{log}\n{}",
        lab.log("node0.log")
    );
    assert_eq!(
        (
            entry.record.source.as_str(),
            entry.record.destination.as_str()
        ),
        ("rbpn0", "rbpn1")
    );
    assert_eq!(entry.policy, "drain");

    // The container answers from node1 on the same TCP connection.
    let before = probe.state().0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe.state().0 < before + 20 {
        assert!(
            Instant::now() < deadline,
            "no answers after the migration: {:?}",
            probe.state()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        probe.state().1.is_empty(),
        "client errors: {:?}",
        probe.state().1
    );
    match agent_call(
        &lab.sock(1),
        &Request::GetContainer {
            id: "j31.s0.t0".into(),
        },
    ) {
        Ok(Reply::Container { container }) => assert_eq!(container.state, ContainerState::Running),
        other => panic!("not on node1: {other:?}"),
    }
    // Slurm: node0 holds nothing of job 31 any more and node1 is the batch host: shrink.
    let updates = lab.log("updates.log");
    assert!(
        updates.contains("update jobid=31 NodeList=rbpn1"),
        "updates: {updates}"
    );
}
