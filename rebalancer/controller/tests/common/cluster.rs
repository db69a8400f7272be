//! The Slurm labs: slurm-tests' cluster (cluster.sh builds its hosts isolated like machines:
//! own network, mount and UTS namespaces, /run, spool, state and munged), real agents on its
//! nodes with their default paths, and `rebalancerd` on its admin host, reaching them over
//! their TCP control ports with munge as cluster.sh configures them, never by a socket path.
//! The test's files (configs, logs, the controller's journal and operator socket) live in a
//! directory under the cluster's shared directory, which every host sees at the same path.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use slurm_tests::{Cluster, ADMIN_HOST, AGENT_SOCKET};

use super::{agent_bin, KillOnDrop};

/// `name` under the cluster's shared directory, emptied.
pub fn shared_work_dir(cluster: &Cluster, name: &str) -> PathBuf {
    let d = cluster.shared_dir().expect("shared dir").join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d).expect("remove the previous work dir");
    }
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

/// NODE's agent socket as a process on NODE sees it (what the test uses to act there, as the
/// SPANK plugin would).
pub fn node_sock(cluster: &Cluster, node: &str) -> PathBuf {
    cluster.host_path(node, Path::new(AGENT_SOCKET))
}

/// The agents on every node of `cluster`, configs and logs (`<node>.toml`, `<node>.log`) in
/// `dir`. Dropping them kills the agents and what they left of `containers` on the nodes.
pub struct ClusterAgents<'a> {
    cluster: &'a Cluster,
    children: Vec<KillOnDrop>,
    /// Container ids whose namespaces go on drop.
    pub containers: Vec<String>,
}

impl Drop for ClusterAgents<'_> {
    fn drop(&mut self) {
        self.children.clear();
        clean_nodes(self.cluster, &self.containers);
    }
}

/// Kills what stopped agents left of `containers` on the cluster's nodes (their namespaces and
/// processes) and unmounts what they left under the nodes' /run/rebalancer.
pub fn clean_nodes(cluster: &Cluster, containers: &[String]) {
    for node in cluster.node_names() {
        let mut script = String::new();
        for c in containers {
            script += &format!(
                "for n in $(ls /run/netns | grep -F -- '-{c}-'); do ip netns pids $n | xargs -r kill -9; ip netns del $n; done; "
            );
        }
        script +=
            "grep -o ' /run/rebalancer/[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l";
        let _ = cluster
            .host_command(&node, Path::new("/"), "sh")
            .args(["-c", &script])
            .output();
    }
}

/// Starts an agent on each node of `cluster` and waits until each answers on its node.
/// `extra(node)` is appended to its config (after `[peers]`: whole sections).
pub fn start_cluster_agents<'a>(
    cluster: &'a Cluster,
    dir: &Path,
    extra: impl Fn(&str) -> String,
) -> ClusterAgents<'a> {
    ClusterAgents {
        cluster,
        children: spawn_cluster_agents(cluster, dir, extra),
        containers: vec![],
    }
}

/// What [`start_cluster_agents`] starts, for a caller that keeps the agents itself (stop them
/// before [`clean_nodes`]).
pub fn spawn_cluster_agents(
    cluster: &Cluster,
    dir: &Path,
    extra: impl Fn(&str) -> String,
) -> Vec<KillOnDrop> {
    let names = cluster.node_names();
    // On each node, the state dir's munge socket is that node's own munged.
    let munge = cluster.state_dir().join("munge/munge.socket");
    let mut children = vec![];
    for (k, node) in names.iter().enumerate() {
        let peers: String = names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != k)
            .map(|(j, n)| format!("{n} = \"198.18.0.{}:7878\"\n", 11 + j))
            .collect();
        let control = cluster
            .agent_control_toml(node)
            .expect("the cluster's [control] section for the agent");
        let cfg = dir.join(format!("{node}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "node = \"{node}\"\nlisten = \"198.18.0.{ip}:7878\"\ncontainer_subnet = \"198.19.0.0/20\"\nipam = \"local\"\n\
                 migration_timeout_ms = 30000\n[auth]\nmethod = \"munge\"\nmunge_socket = \"{}\"\n[peers]\n{peers}{control}\n{}\n",
                munge.display(),
                extra(node),
                ip = 11 + k
            ),
        )
        .expect("agent config");
        let log = std::fs::File::create(dir.join(format!("{node}.log"))).expect("agent log");
        let child = cluster
            .host_command(node, Path::new("/"), agent_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("agent log"))
            .stderr(log)
            .spawn()
            .expect("rebalancer-agent");
        children.push(KillOnDrop(child));
    }
    for node in &names {
        let sock = node_sock(cluster, node);
        let deadline = Instant::now() + Duration::from_secs(20);
        while super::agent_call(&sock, &rebalancer_proto::Request::Ping).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent {node} did not start:\n{}",
                std::fs::read_to_string(dir.join(format!("{node}.log"))).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    children
}

/// Starts rebalancerd on the cluster's admin host with the libslurm backend: `[controller]`
/// file paths in `dir` plus `controller` lines, `[slurm]` conf plus `slurm` lines, `[agents]`
/// as cluster.sh says (TCP, munge) plus `agents` lines, then `rest` (whole sections).
pub fn start_cluster_controller(
    cluster: &Cluster,
    dir: &Path,
    controller: &str,
    slurm: &str,
    agents: &str,
    rest: &str,
) -> KillOnDrop {
    let d = dir.display();
    let to_agents = cluster
        .controller_agents_toml()
        .expect("the cluster's controller-agents.toml");
    let config = format!(
        "[controller]\nsocket = \"{d}/ctl.sock\"\njournal = \"{d}/journal.redb\"\npolicies = \"{d}/policies\"\n{controller}\n\
         [slurm]\nbackend = \"libslurm\"\nconf = \"{}\"\n{slurm}\n\
         [agents]\n{to_agents}{agents}\n{rest}\n",
        cluster.slurm_conf().display()
    );
    // What the lab claims: the controller is given no agent socket at all.
    assert!(
        !config.contains("socket_template") && !config.contains(AGENT_SOCKET),
        "{config}"
    );
    std::fs::create_dir_all(dir.join("policies")).expect("policies");
    std::fs::write(dir.join("rebalancerd.toml"), config).expect("config");
    let log = std::fs::File::create(dir.join("rebalancerd.log")).expect("log");
    KillOnDrop(
        cluster
            .host_command(
                ADMIN_HOST,
                Path::new("/"),
                env!("CARGO_BIN_EXE_rebalancerd"),
            )
            .arg("--config")
            .arg(dir.join("rebalancerd.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("rebalancerd"),
    )
}
