//! The whole path but the SPANK plugin: a real Slurm 22.05 cluster (slurm-tests' `cluster.sh`,
//! block 198.18.0.0/24, containers 198.19.0.0/20), real agents in the node namespaces, and
//! `rebalancerd` with the libslurm backend and the shipped drain policy. A node drained with
//! scontrol is evacuated by a real CRIU migration and the job's allocation follows the container.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rebalancer_controller::slurm_sync::expand_hostlist;
use rebalancer_proto::control::{ControlReply, ControlRequest};
use rebalancer_proto::*;

mod common;
use common::*;

/// Kills the agents and removes what they leave behind (image tmpfs mounts, container
/// namespaces of this test's container).
struct Agents {
    children: Vec<KillOnDrop>,
    dir: PathBuf,
    container: String,
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.children.clear();
        let _ = sh(&format!(
            "for n in $(ls /run/netns | grep -F -- '-{}-'); do ip netns pids $n | xargs -r kill -9; ip netns del $n; done",
            self.container
        ));
        let _ = sh(&format!(
            "grep -o ' {}/[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
            self.dir.display()
        ));
    }
}

fn start_agents(cluster: &slurm_tests::Cluster, dir: &Path, container: &str) -> Agents {
    let mut agents = Agents {
        children: vec![],
        dir: dir.to_path_buf(),
        container: container.into(),
    };
    let names = cluster.node_names();
    let munge = cluster.state_dir().join("munge/munge.socket");
    for (k, node) in names.iter().enumerate() {
        let peers: String = names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != k)
            .map(|(j, n)| format!("{n} = \"198.18.0.{}:7878\"\n", 11 + j))
            .collect();
        let d = dir.display();
        let cfg = dir.join(format!("{node}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "node = \"{node}\"\nlisten = \"198.18.0.{ip}:7878\"\ncontrol_socket = \"{d}/{node}.sock\"\n\
                 container_subnet = \"198.19.0.0/20\"\nstate_dir = \"{d}/{node}/state\"\nrun_dir = \"{d}/{node}/run\"\n\
                 migration_timeout_ms = 30000\n[auth]\nmethod = \"munge\"\nmunge_socket = \"{}\"\n[peers]\n{peers}",
                munge.display(),
                ip = 11 + k
            ),
        )
        .expect("agent config");
        let log = dir.join(format!("{node}.log"));
        agents
            .children
            .push(KillOnDrop(spawn_agent(node, &cfg, &log)));
    }
    for node in &names {
        let sock = dir.join(format!("{node}.sock"));
        wait_agent(&sock, node, || {
            std::fs::read_to_string(dir.join(format!("{node}.log"))).unwrap_or_default()
        });
    }
    agents
}

#[test]
#[ignore = "needs root, CRIU 4.2, a real Slurm cluster (slurm-tests/cluster.sh) and network namespaces; .ci/run runs it with --include-ignored"]
fn slurm_drain_moves_the_container_and_the_allocation() {
    let cluster = slurm_tests::Cluster::up(3).expect("cluster up");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
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
    let _agents = start_agents(&cluster, dir, &cid);
    let created = agent_call(
        &dir.join("node2.sock"),
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
    let d = dir.display();
    std::fs::write(
        dir.join("rebalancerd.toml"),
        format!(
            "[controller]\nsocket = \"{d}/ctl.sock\"\njournal = \"{d}/journal.redb\"\npolicies = \"{d}/policies\"\n\
             [slurm]\nbackend = \"libslurm\"\nconf = \"{}\"\n\
             [agents]\nsocket_template = \"{d}/{{node}}.sock\"\npoll_interval_ms = 500\n[migration]\ntimeout_s = 60\n",
            cluster.slurm_conf().display()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("rebalancerd.log")).expect("log");
    let _daemon = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_rebalancerd"))
            .arg("--config")
            .arg(dir.join("rebalancerd.toml"))
            .env("SLURM_CONF", cluster.slurm_conf())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("rebalancerd"),
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
        &dir.join(format!("{dest}.sock")),
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
