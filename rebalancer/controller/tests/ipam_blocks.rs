//! Cluster-wide container addresses with real agents and a real `rebalancerd` (block [rbi] of
//! the network plan: nodes 198.18.56.0/24, containers 198.19.56.0/24, leased in /28 blocks).
//! Slurm is a fake `scontrol` on PATH. The nodes are the common `Lab`'s, isolated like
//! machines; the controller on the admin host reaches them over TCP.
//!
//! Shows: an agent with no block refuses a container with a clear error; the controller leases
//! each agent its own block (journaled); a container gets an address of its node's block; a
//! migration keeps the address (the destination accepts one outside its blocks) and the
//! source keeps it lent until the container ended, when the controller releases it; a
//! container starts while the controller is down.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rebalancer_proto::control::{ControlReply, ControlRequest, MigrateTarget};
use rebalancer_proto::*;

mod common;
use common::*;
use rebalancer_testkit::TcpProbe;

const P: &str = "rbi";
const SUBNET: &str = "198.19.56.0/24";

/// Node i's `ipam.json`: (blocks, lent addresses).
fn blocks(lab: &Lab, i: usize) -> (Vec<u64>, Vec<String>) {
    let p = lab.state_dir(i).join("ipam.json");
    let Ok(b) = std::fs::read(&p) else {
        return (vec![], vec![]);
    };
    let v: serde_json::Value = serde_json::from_slice(&b).expect("ipam.json is JSON");
    let list = |k: &str| v["addresses"][k].as_array().cloned().unwrap_or_default();
    (
        list("blocks").iter().filter_map(|b| b.as_u64()).collect(),
        list("lent")
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
    )
}

fn create(sock: &Path, id: &str, job: u32) -> Result<ContainerInfo, String> {
    let mut spec = server(id, job, "");
    spec.address = None;
    match agent_call(sock, &Request::CreateContainer { spec })? {
        Reply::Container { container } => Ok(container),
        other => Err(format!("unexpected {other:?}")),
    }
}

/// The /28 block of `SUBNET` holding `addr`.
fn block_of(addr: &str) -> u64 {
    let last: u64 = addr
        .rsplit('.')
        .next()
        .and_then(|o| o.parse().ok())
        .expect("an IPv4 address");
    last / 16
}

fn wait<T>(what: &str, secs: u64, lab: &Lab, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}:\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The controller on the admin host; a second start appends to the same log.
fn start_controller(lab: &Lab, bin: &Path) -> KillOnDrop {
    lab.controller(ControllerPlan {
        agents: "poll_interval_ms = 300",
        rest: &format!(
            "[slurm]\nbackend = \"scontrol\"\n[migration]\ntimeout_s = 60\n[ipam]\nsubnet = \"{SUBNET}\"\nblock_prefix = 28\nlow_water = 2\n"
        ),
        path: Some(bin.to_path_buf()),
        ..Default::default()
    })
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn agents_get_blocks_from_the_controller_and_a_moved_container_keeps_its_address() {
    let lab = LabPlan::new(P, 56).leased_addresses().up();
    let d = lab.dir.clone();

    // No controller yet: no block, and the agent says what is missing.
    let e = create(&lab.sock(0), "j56.s0.t0", 56).expect_err("no block yet");
    assert!(
        e.contains("has no container address block yet"),
        "{e}\n{}",
        lab.logs()
    );

    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let scontrol = format!(
        "#!/bin/sh\ncase \"$1 $2\" in\n  'show node') cat {0}/nodes.txt ;;\n  'show job') cat {0}/jobs.txt ;;\n  *) echo \"$*\" >> {0}/updates.log ;;\nesac\n",
        d.display()
    );
    std::fs::write(bin.join("scontrol"), scontrol).expect("scontrol");
    std::fs::set_permissions(bin.join("scontrol"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let node = |n: &str| {
        format!("NodeName={n} CPUAlloc=1 CPUTot=4 RealMemory=4000 AllocMem=0 State=MIXED Partitions=debug\n")
    };
    std::fs::write(d.join("nodes.txt"), node("rbin0") + &node("rbin1")).expect("nodes");
    std::fs::write(
        d.join("jobs.txt"),
        "JobId=56 UserId=root(0) Account=a JobState=RUNNING Partition=debug NodeList=rbin[0-1] BatchHost=rbin1\n\
         JobId=57 UserId=root(0) Account=a JobState=RUNNING Partition=debug NodeList=rbin1 BatchHost=rbin1\n",
    )
    .expect("jobs");
    std::fs::create_dir_all(d.join("policies")).expect("policies");
    // A container asked for just before the controller starts (a task on a node that just
    // came up) waits for the node's first lease instead of failing.
    let early = {
        let sock = lab.sock(1);
        std::thread::spawn(move || {
            let t = Instant::now();
            (create(&sock, "j57.s0.t9", 57), t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let daemon = start_controller(&lab, &bin);

    // Each agent gets its own block, stored in its state directory.
    let (b0, b1) = wait("the agents never got a block", 20, &lab, || {
        let (b0, _) = blocks(&lab, 0);
        let (b1, _) = blocks(&lab, 1);
        (!b0.is_empty() && !b1.is_empty()).then_some((b0, b1))
    });
    eprintln!(
        "blocks leased {:?} after the controller started: node0 {b0:?}, node1 {b1:?}",
        t0.elapsed()
    );
    assert!(b0.iter().all(|b| !b1.contains(b)), "{b0:?} {b1:?}");
    let (early, waited) = early.join().expect("join");
    let early = early.unwrap_or_else(|e| panic!("the early container failed: {e}\n{}", lab.logs()));
    assert!(
        blocks(&lab, 1).0.contains(&block_of(&early.address)),
        "{} outside node1's blocks",
        early.address
    );
    eprintln!(
        "a container asked for 300 ms before the controller started got {} after {waited:?}",
        early.address
    );
    agent_call(
        &lab.sock(1),
        &Request::KillContainer {
            id: early.id.clone(),
            signal: 9,
        },
    )
    .expect("kill the early container");
    // The controller shows who holds which block (`rebalctl show nodes --json`).
    let ctl = d.join("ctl.sock");
    let Ok(ControlReply::Nodes { nodes }) =
        ctl_call(&ctl, &ControlRequest::ShowNodes { name: None })
    else {
        panic!("show nodes:\n{}", lab.logs());
    };
    let shown = |n: &str| {
        nodes
            .iter()
            .find(|s| s.name == n)
            .map(|s| s.address_blocks.clone())
            .unwrap_or_default()
    };
    let cidr = |b: u64| format!("198.19.56.{}/28", b * 16);
    assert_eq!(
        shown("rbin0"),
        b0.iter().map(|b| cidr(*b)).collect::<Vec<_>>()
    );
    assert_eq!(
        shown("rbin1"),
        b1.iter().map(|b| cidr(*b)).collect::<Vec<_>>()
    );

    let c = create(&lab.sock(0), "j56.s0.t0", 56).expect("container on node0");
    assert!(
        b0.contains(&block_of(&c.address)),
        "{} outside node0's blocks {b0:?}",
        c.address
    );
    let other = create(&lab.sock(1), "j57.s0.t0", 57).expect("container on node1");
    assert!(b1.contains(&block_of(&other.address)), "{}", other.address);
    assert_ne!(c.address, other.address);

    let probe = TcpProbe::start(Some(&lab.net.client_ns), &c.address);
    wait("probe got no answers", 15, &lab, || {
        (probe.state().0 >= 20).then_some(())
    });
    wait("controller never saw the container", 15, &lab, || {
        matches!(
            ctl_call(&ctl, &ControlRequest::ShowContainers { id: None, job_id: Some(56) }),
            Ok(ControlReply::Containers { containers }) if !containers.is_empty()
        )
        .then_some(())
    });
    let r = ctl_call(
        &ctl,
        &ControlRequest::Migrate {
            target: MigrateTarget::Container {
                id: "j56.s0.t0".into(),
            },
            destination: Some("rbin1".into()),
            mode: Some(MigrationMode::StopAndCopy),
            watch: true,
        },
    );
    let Ok(ControlReply::Migrated { migrations, .. }) = r else {
        panic!("migrate: {r:?}\n{}", lab.logs());
    };
    assert_eq!(
        migrations.first().map(|m| m.record.state),
        Some(MigrationState::Succeeded),
        "{migrations:?}\n{}",
        lab.logs()
    );

    // Same address on node1, outside node1's own blocks; the TCP client never noticed.
    let moved = match agent_call(&lab.sock(1), &Request::GetContainer { id: c.id.clone() }) {
        Ok(Reply::Container { container }) => container,
        other => panic!("not on node1: {other:?}\n{}", lab.logs()),
    };
    assert_eq!(moved.state, ContainerState::Running);
    assert_eq!(
        moved.address, c.address,
        "the address moved with the container"
    );
    assert!(!blocks(&lab, 1).0.contains(&block_of(&moved.address)));
    let before = probe.state().0;
    wait("no answers after the migration", 10, &lab, || {
        (probe.state().0 >= before + 20).then_some(())
    });
    assert!(
        probe.state().1.is_empty(),
        "client errors: {:?}",
        probe.state().1
    );

    // node0 keeps the address lent while the container lives, and hands out others.
    wait("node0 never marked the address lent", 10, &lab, || {
        blocks(&lab, 0).1.contains(&c.address).then_some(())
    });
    // `rebalctl show blocks`: node0's block holds the moved container's address, live on
    // node1 and lent by node0.
    let home = cidr(block_of(&c.address));
    let shown = wait(
        "show blocks never showed the lent address",
        10,
        &lab,
        || {
            let Ok(ControlReply::Blocks { blocks }) = ctl_call(
                &ctl,
                &ControlRequest::ShowBlocks {
                    node: Some("rbin0".into()),
                },
            ) else {
                return None;
            };
            blocks
                .into_iter()
                .find(|b| b.block == home && b.lent == 1 && b.live >= 1)
        },
    );
    assert_eq!(shown.node, "rbin0");
    // A /28 holds 16 addresses; the subnet's own network and broadcast addresses (in its first
    // and last block) are no container's.
    let b = block_of(&c.address);
    assert_eq!(shown.addresses, 16 - u32::from(b == 0) - u32::from(b == 15));
    assert!(shown.leased_at.is_some(), "{shown:?}");
    let none = ctl_call(
        &ctl,
        &ControlRequest::ShowBlocks {
            node: Some("nosuchnode".into()),
        },
    );
    assert!(
        matches!(&none, Err(e) if e.message.contains("no node named 'nosuchnode'")),
        "{none:?}"
    );
    let next = create(&lab.sock(0), "j56.s0.t1", 56).expect("another container on node0");
    assert_ne!(next.address, c.address);
    // The container ends on node1: the controller, which sees both, releases it on node0.
    agent_call(
        &lab.sock(1),
        &Request::KillContainer {
            id: c.id.clone(),
            signal: 9,
        },
    )
    .expect("kill");
    let t1 = Instant::now();
    wait(
        "the controller never released the lent address",
        20,
        &lab,
        || (!blocks(&lab, 0).1.contains(&c.address)).then_some(()),
    );
    eprintln!(
        "lent address released {:?} after the container ended",
        t1.elapsed()
    );

    // The controller stops: node1 still starts a container from its blocks, with no round trip.
    drop(daemon);
    let down = create(&lab.sock(1), "j57.s0.t1", 57).expect("a container with the controller down");
    assert!(
        blocks(&lab, 1).0.contains(&block_of(&down.address)),
        "{}",
        down.address
    );
    let journal = lab.log("rebalancerd.log");
    assert!(journal.contains("address block leased"), "{journal}");
}
