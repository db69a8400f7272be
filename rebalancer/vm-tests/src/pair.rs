//! The two-guest lab (`tests/two_guests.rs`, `vm-guest node`): its addresses, the guests'
//! identity on the kernel command line, and the commands the host types on a guest's serial
//! console. The host owns the plan's timing (it has the client); each guest acts only through
//! its own agent's control socket, as a controller would.
//!
//! Network: a namespace on the host with bridge `BRIDGE` (198.18.32.1/24) and one tap per
//! guest; guest K is node `rbvgK` at 198.18.32.(10+K) on its virtio NIC `eth0`; containers
//! get addresses from 198.19.32.0/24, on-link on the bridge (the agents answer ARP for their
//! containers and announce a moved one with gratuitous ARP).

use std::net::{Ipv4Addr, SocketAddr};

use rebalancer_proto::MigrationMode;

pub const NODES: [&str; 2] = ["rbvg0", "rbvg1"];
pub const HOST_NETNS: &str = "rbvk";
pub const BRIDGE: &str = "rbvkbr";
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 32, 1);
pub const PREFIX: u8 = 24;
pub const CONTAINER_SUBNET: &str = "198.19.32.0/24";
pub const CONTAINER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 32, 10);
pub const CONTAINER_PORT: u16 = 8000;
pub const CONTAINER_ID: &str = "echo";
pub const PEER_PORT: u16 = 7878;

pub fn node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 32, 10 + k as u8)
}

pub fn tap(k: usize) -> String {
    format!("rbvkt{k}")
}

/// Locally administered MACs, one per guest.
pub fn mac(k: usize) -> String {
    format!("52:54:00:32:00:{:02x}", 0x10 + k)
}

pub fn container_addr() -> SocketAddr {
    SocketAddr::from((CONTAINER_IP, CONTAINER_PORT))
}

/// How the guests' agents authenticate each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// A munged per guest, one shared key (in the initramfs).
    Munge,
    /// The lab's no-auth mode.
    None,
}

/// The guest's identity, from the kernel command line:
/// `rbv.node=K rbv.auth=munge|none rbv.encrypt=0|1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub index: usize,
    pub auth: Auth,
    /// The agents' `encrypt_memory` (CRIU's TLS for pages); default off in the lab.
    pub encrypt_memory: bool,
}

impl Identity {
    pub fn cmdline(&self) -> String {
        let auth = match self.auth {
            Auth::Munge => "munge",
            Auth::None => "none",
        };
        format!(
            "rbv.node={} rbv.auth={auth} rbv.encrypt={}",
            self.index,
            u8::from(self.encrypt_memory)
        )
    }

    pub fn parse(cmdline: &str) -> Result<Identity, String> {
        let mut index = None;
        let mut auth = Auth::Munge;
        let mut encrypt_memory = false;
        for w in cmdline.split_whitespace() {
            if let Some(v) = w.strip_prefix("rbv.node=") {
                let k: usize = v
                    .parse()
                    .map_err(|_| format!("rbv.node={v:?} is not a number"))?;
                if k >= NODES.len() {
                    return Err(format!("rbv.node={k}: the lab has nodes 0 and 1"));
                }
                index = Some(k);
            } else if let Some(v) = w.strip_prefix("rbv.auth=") {
                auth = match v {
                    "munge" => Auth::Munge,
                    "none" => Auth::None,
                    _ => return Err(format!("rbv.auth={v:?}: expected munge or none")),
                };
            } else if let Some(v) = w.strip_prefix("rbv.encrypt=") {
                encrypt_memory = match v {
                    "1" => true,
                    "0" => false,
                    _ => return Err(format!("rbv.encrypt={v:?}: expected 0 or 1")),
                };
            }
        }
        let index = index.ok_or("no rbv.node=K on the kernel command line")?;
        Ok(Identity {
            index,
            auth,
            encrypt_memory,
        })
    }

    pub fn node(&self) -> &'static str {
        NODES[self.index]
    }
}

/// One line the host writes on a guest's serial console.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestCommand {
    /// Start the counter server container (`vm-guest workload MIB 1`) at `CONTAINER_IP`.
    Create { mem_mib: u64 },
    /// Ask the local agent to migrate the container to `destination` and wait for the end.
    Migrate {
        destination: String,
        mode: MigrationMode,
        label: String,
    },
    /// Print the agent's container list and the workload processes of this kernel.
    Report,
    /// Stop the agent and power off.
    Exit,
}

/// The mode as the protocol spells it (`stop-and-copy`).
pub fn mode_name(mode: MigrationMode) -> String {
    serde_json::to_value(mode)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{mode:?}"))
}

impl GuestCommand {
    pub fn line(&self) -> String {
        match self {
            GuestCommand::Create { mem_mib } => format!("create {mem_mib}"),
            GuestCommand::Migrate {
                destination,
                mode,
                label,
            } => format!("migrate {destination} {} {label}", mode_name(*mode)),
            GuestCommand::Report => "report".into(),
            GuestCommand::Exit => "exit".into(),
        }
    }

    pub fn parse(line: &str) -> Result<GuestCommand, String> {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["create", mib] => Ok(GuestCommand::Create {
                mem_mib: mib
                    .parse()
                    .map_err(|_| format!("create {mib:?}: not a size in MiB"))?,
            }),
            ["migrate", dest, mode, label] => Ok(GuestCommand::Migrate {
                destination: dest.to_string(),
                mode: serde_json::from_value(serde_json::Value::String(mode.to_string()))
                    .map_err(|_| format!("migrate: {mode:?} is not a migration mode"))?,
                label: label.to_string(),
            }),
            ["report"] => Ok(GuestCommand::Report),
            ["exit"] => Ok(GuestCommand::Exit),
            _ => Err(format!("unknown command {line:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_through_their_line() {
        for c in [
            GuestCommand::Create { mem_mib: 32 },
            GuestCommand::Migrate {
                destination: "rbvg1".into(),
                mode: MigrationMode::PostCopy,
                label: "post-copy".into(),
            },
            GuestCommand::Report,
            GuestCommand::Exit,
        ] {
            assert_eq!(
                GuestCommand::parse(&c.line()),
                Ok(c.clone()),
                "{}",
                c.line()
            );
        }
        assert!(GuestCommand::parse("migrate rbvg1 sideways x")
            .expect_err("an unknown mode")
            .contains("sideways"));
        assert!(GuestCommand::parse("create lots").is_err());
    }

    #[test]
    fn identity_comes_from_the_kernel_command_line() {
        let id = Identity {
            index: 1,
            auth: Auth::None,
            encrypt_memory: true,
        };
        let line = format!("console=ttyS0 quiet {} rdinit=/init", id.cmdline());
        assert_eq!(Identity::parse(&line), Ok(id));
        assert_eq!(
            Identity::parse("rbv.node=0").map(|i| i.auth),
            Ok(Auth::Munge)
        );
        assert!(Identity::parse("quiet").is_err());
        assert!(Identity::parse("rbv.node=2")
            .expect_err("a third node")
            .contains("0 and 1"));
        assert!(Identity::parse("rbv.node=0 rbv.auth=kerberos").is_err());
        assert_eq!(
            Identity::parse("rbv.node=0").map(|i| i.encrypt_memory),
            Ok(false)
        );
        assert!(Identity::parse("rbv.node=0 rbv.encrypt=yes").is_err());
    }
}
