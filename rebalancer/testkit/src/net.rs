//! Node network namespaces on a bridge and a private munged, for the agents of a test.
//!
//! Names and addresses follow the network plan: namespace `<prefix>n<i>` is node i at
//! 198.18.`block`.(10 + i), `<prefix>cl` is the client at the next address and routes the
//! container subnet over the bridge `<prefix>br` (198.18.`block`.1). Everything the lab made,
//! and what agents left in it (container namespaces `rb-<prefix>n...`, tmpfs mounts under its
//! directory), goes on drop, also when the test fails; an earlier run's leftovers go first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{must, sh};

/// What to build.
#[derive(Debug, Clone)]
pub struct NetPlan {
    /// Names every namespace and link (at most 6 characters: link names are short).
    pub prefix: String,
    /// Third octet of the node network 198.18.`block`.0/24.
    pub block: u8,
    /// The containers' subnet, routed from the client namespace.
    pub subnet: String,
    /// Node namespaces.
    pub nodes: usize,
    /// The lab's directory (munge key and socket, whatever the test puts there); emptied first.
    pub dir: PathBuf,
}

/// One node namespace.
#[derive(Debug, Clone)]
pub struct NetNode {
    pub netns: String,
    pub ip: String,
}

/// The built lab. Dropping it tears everything down.
#[derive(Debug)]
pub struct NetLab {
    pub prefix: String,
    pub bridge: String,
    pub dir: PathBuf,
    pub nodes: Vec<NetNode>,
    pub client_ns: String,
    pub subnet: String,
    block: u8,
    munged_pid: Option<i32>,
}

impl NetLab {
    pub fn up(plan: NetPlan) -> NetLab {
        assert!(plan.prefix.len() <= 6, "prefix {} too long", plan.prefix);
        let p = &plan.prefix;
        let b = plan.block;
        let mut lab = NetLab {
            prefix: p.clone(),
            bridge: format!("{p}br"),
            dir: plan.dir.clone(),
            nodes: (0..plan.nodes)
                .map(|i| NetNode {
                    netns: format!("{p}n{i}"),
                    ip: format!("198.18.{b}.{}", 10 + i),
                })
                .collect(),
            client_ns: format!("{p}cl"),
            subnet: plan.subnet.clone(),
            block: b,
            munged_pid: None,
        };
        lab.teardown();
        if lab.dir.exists() {
            std::fs::remove_dir_all(&lab.dir).expect("remove the previous lab dir");
        }
        std::fs::create_dir_all(&lab.dir).expect("lab dir");
        let br = &lab.bridge;
        must(&format!(
            "ip link add {br} type bridge && ip addr add 198.18.{b}.1/24 dev {br} && ip link set {br} up"
        ));
        let mut all: Vec<String> = lab.nodes.iter().map(|n| n.netns.clone()).collect();
        all.push(lab.client_ns.clone());
        for (i, ns) in all.iter().enumerate() {
            let ip = format!("198.18.{b}.{}", 10 + i);
            must(&format!(
                "ip netns add {ns} && ip link add {ns}h type veth peer name eth0 netns {ns} && \
                 ip link set {ns}h master {br} up && ip -n {ns} addr add {ip}/24 dev eth0 && \
                 ip -n {ns} link set eth0 up && ip -n {ns} link set lo up"
            ));
        }
        must(&format!(
            "ip -n {} route add {} dev eth0",
            lab.client_ns, lab.subnet
        ));
        lab.start_munged();
        lab
    }

    /// The private munged's socket (for the agents' `[auth] munge_socket`).
    pub fn munge_socket(&self) -> PathBuf {
        self.dir.join("munge.sock")
    }

    /// The client namespace's address (after the nodes').
    pub fn client_ip(&self) -> String {
        format!("198.18.{}.{}", self.block, 10 + self.nodes.len())
    }

    fn start_munged(&mut self) {
        let d = self.dir.display();
        must(&format!("dd if=/dev/urandom of={d}/munge.key bs=1024 count=1 2>/dev/null && chmod 600 {d}/munge.key"));
        must(&format!(
            "munged --force -S {d}/munge.sock --key-file={d}/munge.key --pid-file={d}/munged.pid --log-file={d}/munged.log --seed-file={d}/munged.seed"
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.munged_pid.is_none() {
            self.munged_pid = std::fs::read_to_string(self.dir.join("munged.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok());
            assert!(Instant::now() < deadline, "munged did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes what this lab (or an earlier run with the same prefix) left. Stop the agents
    /// first: this kills what still runs in the namespaces.
    pub fn teardown(&mut self) {
        unmount_under(&self.dir);
        if let Some(pid) = self.munged_pid.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let p = &self.prefix;
        if let Ok(rd) = std::fs::read_dir("/run/netns") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("rb-{p}n"))
                    || name.starts_with(&format!("{p}n"))
                    || name == self.client_ns
                {
                    // Restored trees of a dead agent may still run there.
                    let _ = sh(&format!(
                        "ip netns pids {name} | xargs -r kill -9; ip netns del {name}"
                    ));
                }
            }
        }
        // A namespace another process's mount namespace still pins outlives `ip netns del`;
        // its host-side veth must go explicitly.
        let _ = sh(&format!("ip link del {} 2>/dev/null", self.bridge));
        let _ = sh(&format!(
            "for l in $(ip -o link show | awk -F': ' '{{print $2}}' | grep -E '^{p}(n|cl)' | cut -d@ -f1); do ip link del $l; done"
        ));
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first (the agents' image tmpfs).
fn unmount_under(dir: &Path) {
    let Ok(m) = std::fs::read_to_string("/proc/mounts") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<&str> = m
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}
