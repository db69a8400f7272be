//! Container network namespaces, created by the agent and external to CRIU (TEAM.md network plan).
//!
//! Node netns: `<subnet> dev <uplink>` on-link, proxy_arp on the uplink and on every node-side
//! veth, and one `<ip>/32 dev <veth>` route per container. Container netns: `eth0` with the /32
//! and `default dev eth0`.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::config::Subnet;
use crate::error::{run_cmd, AgentError};

/// A container's network namespace and the node side of its veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerNet {
    /// Name under /run/netns.
    pub name: String,
    /// Node-side veth name (<= 15 characters).
    pub veth: String,
    pub address: Ipv4Addr,
}

impl ContainerNet {
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Inode of the namespace, the key CRIU uses in `--external net[INO]:KEY`.
    pub fn inode(&self) -> Result<u64, AgentError> {
        let p = self.path();
        std::fs::metadata(&p)
            .map(|m| m.ino())
            .map_err(|source| AgentError::Io {
                what: format!("stat {}", p.display()),
                source,
            })
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<(), AgentError> {
    std::fs::write(path, value).map_err(|source| AgentError::Io {
        what: format!("write {path}"),
        source,
    })
}

/// One-time node set-up, idempotent: forwarding, proxy ARP on the uplink, on-link subnet route.
pub async fn prepare_node(uplink: &str, subnet: Subnet) -> Result<(), AgentError> {
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    write_sysctl(&format!("/proc/sys/net/ipv4/conf/{uplink}/proxy_arp"), "1")?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{uplink}/proxy_delay"),
        "0",
    )?;
    run_cmd(
        "ip",
        &["route", "replace", &subnet.to_string(), "dev", uplink],
    )
    .await?;
    Ok(())
}

/// Creates the netns, the veth pair, addresses and routes. Undoes what it did on failure.
/// `route = false` leaves out the node route (an arriving container gets it at the switch, so
/// that this node does not answer ARP for an address whose process is not here yet).
pub async fn create(net: &ContainerNet, route: bool) -> Result<(), AgentError> {
    run_cmd("ip", &["netns", "add", &net.name]).await?;
    if let Err(e) = configure(net, route).await {
        destroy(net).await;
        return Err(e);
    }
    Ok(())
}

async fn configure(net: &ContainerNet, route: bool) -> Result<(), AgentError> {
    let ip = net.address.to_string();
    let cidr = format!("{ip}/32");
    run_cmd(
        "ip",
        &[
            "link", "add", &net.veth, "type", "veth", "peer", "name", "eth0", "netns", &net.name,
        ],
    )
    .await?;
    run_cmd("ip", &["-n", &net.name, "link", "set", "lo", "up"]).await?;
    run_cmd(
        "ip",
        &["-n", &net.name, "addr", "add", &cidr, "dev", "eth0"],
    )
    .await?;
    run_cmd("ip", &["-n", &net.name, "link", "set", "eth0", "up"]).await?;
    run_cmd(
        "ip",
        &["-n", &net.name, "route", "add", "default", "dev", "eth0"],
    )
    .await?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", net.veth),
        "1",
    )?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{}/proxy_delay", net.veth),
        "0",
    )?;
    run_cmd("ip", &["link", "set", &net.veth, "up"]).await?;
    if route {
        add_route(net).await?;
    }
    Ok(())
}

pub async fn add_route(net: &ContainerNet) -> Result<(), AgentError> {
    // In-process first: this runs between the destination's resume and the client's packets.
    match crate::rtnl::host_route(crate::rtnl::RouteOp::Replace, net.address, &net.veth) {
        Ok(()) => return Ok(()),
        Err(e) => tracing::debug!(error = %e.chain(), "netlink route failed; trying ip route"),
    }
    let cidr = format!("{}/32", net.address);
    run_cmd("ip", &["route", "replace", &cidr, "dev", &net.veth]).await?;
    Ok(())
}

/// Removes the route, the veth pair and the namespace; errors are logged, not returned.
pub async fn destroy(net: &ContainerNet) {
    let cidr = format!("{}/32", net.address);
    let _ = run_cmd("ip", &["route", "del", &cidr, "dev", &net.veth]).await;
    let _ = run_cmd("ip", &["link", "del", &net.veth]).await;
    if let Err(e) = run_cmd("ip", &["netns", "del", &net.name]).await {
        tracing::warn!(netns = %net.name, error = %e, "cannot delete container netns");
    }
}

/// Removes only the node-side route so that this node stops answering ARP for the address.
pub async fn withdraw_route(net: &ContainerNet) {
    // In-process first: the source withdraws while the tree is frozen. No such route (already
    // withdrawn) is as good as done, as with `ip route del`.
    match crate::rtnl::host_route(crate::rtnl::RouteOp::Delete, net.address, &net.veth) {
        Ok(()) => return,
        Err(AgentError::Io { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => return,
        Err(e) => tracing::debug!(error = %e.chain(), "netlink route failed; trying ip route"),
    }
    let cidr = format!("{}/32", net.address);
    let _ = run_cmd("ip", &["route", "del", &cidr, "dev", &net.veth]).await;
}

/// Deletes the nftables tables CRIU's network lock left in the container netns after a dump.
pub async fn unlock_criu_tables(net: &ContainerNet) -> Result<usize, AgentError> {
    let out = run_cmd("ip", &["netns", "exec", &net.name, "nft", "list", "tables"]).await?;
    let mut n = 0;
    for line in out.lines() {
        let mut it = line.split_whitespace();
        if let (Some("table"), Some(family), Some(name)) = (it.next(), it.next(), it.next()) {
            if name.starts_with("CRIU") {
                run_cmd(
                    "ip",
                    &[
                        "netns", "exec", &net.name, "nft", "delete", "table", family, name,
                    ],
                )
                .await?;
                n += 1;
            }
        }
    }
    Ok(n)
}
