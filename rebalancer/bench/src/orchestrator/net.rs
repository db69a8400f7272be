//! The benchmark's network, per the team's network plan (block 198.18.32.0/24 for nodes,
//! 198.19.32.0/20 for containers, names prefixed `rbb`): a bridge in the root namespace, one
//! namespace per node with `eth0` on the bridge, and per container a namespace with a /32
//! behind a veth whose node side answers ARP for it (proxy ARP).

use std::process::Command;

use crate::sys::{self, run, sh, sh_quiet, Result, SysError};

pub const BRIDGE: &str = "rbb0";
pub const BRIDGE_ADDR: &str = "198.18.32.1/24";
pub const CONTAINER_NET: &str = "198.19.32.0/20";
pub const CONTAINER_IP: &str = "198.19.32.10";
pub const NFT_TABLE: &str = "rbb_bench";

/// A node namespace: name (also the name of its bridge port in the root namespace) and address.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub name: &'static str,
    pub ip: &'static str,
}

pub const SRC: Node = Node {
    name: "rbb-n1",
    ip: "198.18.32.11",
};
pub const DST: Node = Node {
    name: "rbb-n2",
    ip: "198.18.32.12",
};
pub const CLIENT: Node = Node {
    name: "rbb-n3",
    ip: "198.18.32.13",
};
pub const NODES: [Node; 3] = [SRC, DST, CLIENT];

fn sysctl(netns: &str, kv: &str) -> Result<()> {
    run(sys::in_netns(netns, "sysctl").args(["-q", "-w", kv])).map(|_| ())
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Kills every process in a namespace of ours (workloads, restored trees, CRIU, clients).
pub fn kill_netns_pids(name: &str) {
    if let Ok(out) = sh(&format!("ip netns pids {name}")) {
        for pid in out.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: plain kill(2) of a process found in our own benchmark namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Kills the namespace's processes, waits (up to 10 s) until they are gone, so that the next
/// run does not share the machine with a dying multi-GiB process, and deletes it.
pub fn delete_netns(name: &str) {
    if netns_exists(name) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            kill_netns_pids(name);
            let left = sh(&format!("ip netns pids {name}")).unwrap_or_default();
            if left.trim().is_empty() || std::time::Instant::now() > end {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        sh_quiet(&format!("ip netns del {name}"));
    }
}

/// Deletes every link of a node namespace except `lo` and `eth0` (container veths of ours or
/// of the agents), so that no stale veth keeps the container address answered.
pub fn flush_node_links(node: Node) {
    let Ok(out) = sh(&format!("ip -n {} -o link show", node.name)) else {
        return;
    };
    for line in out.lines() {
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if name != "lo" && name != "eth0" {
            sh_quiet(&format!("ip -n {} link del {name}", node.name));
        }
    }
}

/// Removes everything `setup` and the container helpers create; safe to call at any time.
pub fn teardown() {
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            // Ours, and the agents' (rb-<node>-<container>-<hex>).
            if n.starts_with("rbb-c") || n.starts_with("rb-rbb-n") {
                delete_netns(&n);
            }
        }
    }
    for n in NODES {
        delete_netns(n.name);
        sh_quiet(&format!("ip link del {}", n.name));
    }
    sh_quiet(&format!("ip link del {BRIDGE}"));
    sh_quiet(&format!("nft delete table bridge {NFT_TABLE}"));
}

pub fn setup() -> Result<()> {
    teardown();
    sh(&format!(
        "ip link add {BRIDGE} type bridge stp_state 0 forward_delay 0"
    ))?;
    sh(&format!("ip addr add {BRIDGE_ADDR} dev {BRIDGE}"))?;
    sh(&format!("ip link set {BRIDGE} up"))?;
    sh(&format!("ip route replace {CONTAINER_NET} dev {BRIDGE}"))?;
    for n in NODES {
        sh(&format!("ip netns add {}", n.name))?;
        sh(&format!(
            "ip link add {} type veth peer name eth0 netns {}",
            n.name, n.name
        ))?;
        sh(&format!("ip link set {} master {BRIDGE} up", n.name))?;
        sh(&format!("ip -n {} addr add {}/24 dev eth0", n.name, n.ip))?;
        sh(&format!("ip -n {} link set eth0 up", n.name))?;
        sh(&format!("ip -n {} link set lo up", n.name))?;
        sh(&format!(
            "ip -n {} route add {CONTAINER_NET} dev eth0",
            n.name
        ))?;
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.eth0.proxy_arp=1",
            "net.ipv4.neigh.eth0.proxy_delay=0",
            // The gratuitous ARP after a restore is sent for a container address.
            "net.ipv4.ip_nonlocal_bind=1",
        ] {
            sysctl(n.name, kv)?;
        }
    }
    // Exact node-to-node byte counts (the client's traffic is not between the two nodes).
    let rules = format!(
        "table bridge {NFT_TABLE} {{\n\
           counter src_dst {{}}\n counter dst_src {{}}\n\
           chain count_fw {{ type filter hook forward priority 0; policy accept;\n\
             ip saddr {s} ip daddr {d} counter name src_dst\n\
             ip saddr {d} ip daddr {s} counter name dst_src\n }}\n}}\n",
        s = SRC.ip,
        d = DST.ip
    );
    let path = std::env::temp_dir().join("rbb-bench.nft");
    std::fs::write(&path, rules).map_err(sys::io("write nft rules"))?;
    run(Command::new("nft").arg("-f").arg(&path))?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// IP bytes between the source and destination node, both directions, since setup.
pub fn node_bytes() -> Result<u64> {
    let mut total = 0;
    for c in ["src_dst", "dst_src"] {
        let out = sh(&format!("nft list counter bridge {NFT_TABLE} {c}"))?;
        let bytes = out
            .split_whitespace()
            .skip_while(|w| *w != "bytes")
            .nth(1)
            .and_then(|b| b.parse::<u64>().ok())
            .ok_or_else(|| SysError::Other(format!("no byte count in nft output: {out}")))?;
        total += bytes;
    }
    Ok(total)
}

/// A container's network namespace attached to `node`. The /32 route on the node (which makes
/// the node answer ARP for the address) is added separately: only one node may own it.
pub struct ContainerNet {
    pub netns: String,
    pub node: Node,
    pub veth: String,
}

impl ContainerNet {
    pub fn create(netns: &str, node: Node, veth: &str) -> Result<ContainerNet> {
        sh_quiet(&format!("ip -n {} link del {veth}", node.name));
        delete_netns(netns);
        sh(&format!("ip netns add {netns}"))?;
        let c = ContainerNet {
            netns: netns.into(),
            node,
            veth: veth.into(),
        };
        sh(&format!(
            "ip link add {veth} netns {} type veth peer name eth0 netns {netns}",
            node.name
        ))?;
        sh(&format!(
            "ip -n {netns} addr add {CONTAINER_IP}/32 dev eth0"
        ))?;
        sh(&format!("ip -n {netns} link set eth0 up"))?;
        sh(&format!("ip -n {netns} link set lo up"))?;
        sh(&format!("ip -n {netns} route add default dev eth0"))?;
        sh(&format!("ip -n {} link set {veth} up", node.name))?;
        sysctl(node.name, &format!("net.ipv4.conf.{veth}.proxy_arp=1"))?;
        sysctl(node.name, &format!("net.ipv4.neigh.{veth}.proxy_delay=0"))?;
        Ok(c)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path())
            .map(|m| m.ino())
            .map_err(sys::io(format!("stat {}", self.path())))
    }

    pub fn route_add(&self) -> Result<()> {
        sh(&format!(
            "ip -n {} route replace {CONTAINER_IP}/32 dev {}",
            self.node.name, self.veth
        ))
        .map(|_| ())
    }

    /// Tells the peers on the bridge that the container address now lives behind this node.
    /// The ARP packet leaves at once; arping itself lingers for a second, so it is not awaited.
    pub fn announce(&self) -> Result<sys::Proc> {
        let mut c = sys::in_netns(self.node.name, "arping");
        c.args([
            "-q",
            "-U",
            "-c",
            "1",
            "-I",
            "eth0",
            "-s",
            CONTAINER_IP,
            CONTAINER_IP,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
        sys::Proc::spawn("arping", &mut c)
    }

    pub fn delete(&self) {
        sh_quiet(&format!("ip -n {} link del {}", self.node.name, self.veth));
        delete_netns(&self.netns);
    }
}
