//! The controller's lab: nodes isolated like machines, each a real `rebalancer-agent`, and
//! `rebalancerd` on an admin host that reaches them over the TCP control protocol with munge,
//! never by a socket path (issue #13).
//!
//! On top of rebalancer-testkit's `NetLab` (node network namespaces `<prefix>n<i>` at
//! 198.18.`block`.(10 + i) on a bridge, the client namespace `<prefix>cl` that routes the
//! containers' subnet 198.19.`block`.0/24), every node and the admin host (in the client's
//! network namespace) are `Hosts`: own mount and UTS namespace, a fresh /run, their own
//! /var/lib/rebalancer (backed by `DIR/<host>/state`) and their own munged with the lab's key.
//! The agents run with their default paths (socket `/run/rebalancer/agent.sock`, state
//! `/var/lib/rebalancer`, run dir `/run/rebalancer/<node>`), as on a site's nodes. The lab
//! directory plays the cluster's shared file system (configs, logs, the controller's journal
//! and its own operator socket, a fake `scontrol`).
//!
//! A test that acts on a node (what the SPANK plugin does there: create a container, read it)
//! reaches that node's agent through [`Lab::sock`], the socket as seen from inside the node
//! (`/proc/<agent>/root/...`); the controller never does.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rebalancer_testkit::{HostPlan, Hosts, NetLab, NetPlan, HOST_MUNGE};

use super::{agent_bin, agent_call, KillOnDrop};
use rebalancer_proto::Request;

/// The agents' socket on their own node (the agent's default).
pub const AGENT_SOCKET: &str = "/run/rebalancer/agent.sock";
/// The agents' TCP control port.
pub const CONTROL_PORT: u16 = 7879;
/// The admin host, where the controller runs.
pub const ADMIN: &str = "admin";

/// What a test needs of its lab.
#[derive(Debug, Clone)]
pub struct LabPlan {
    prefix: String,
    block: u8,
    nodes: usize,
    migration_timeout_ms: u64,
    leased: bool,
    agent_extra: String,
    control_extra: String,
}

impl LabPlan {
    /// Block `block` of the network plan, named `prefix` (at most 6 characters): two nodes,
    /// 30 s migration timeout, node-local addresses (`ipam = "local"`).
    pub fn new(prefix: &str, block: u8) -> LabPlan {
        LabPlan {
            prefix: prefix.into(),
            block,
            nodes: 2,
            migration_timeout_ms: 30_000,
            leased: false,
            agent_extra: String::new(),
            control_extra: String::new(),
        }
    }

    pub fn nodes(mut self, n: usize) -> LabPlan {
        self.nodes = n;
        self
    }

    /// The agents' `migration_timeout_ms`.
    pub fn migration_timeout_ms(mut self, ms: u64) -> LabPlan {
        self.migration_timeout_ms = ms;
        self
    }

    /// Agents take their container addresses from blocks the controller leases (no `ipam` key).
    pub fn leased_addresses(mut self) -> LabPlan {
        self.leased = true;
        self
    }

    /// Extra top-level lines of every agent's config.
    pub fn agent_config(mut self, lines: &str) -> LabPlan {
        self.agent_extra = lines.into();
        self
    }

    /// Extra `[control]` lines of every agent's config.
    pub fn control_config(mut self, lines: &str) -> LabPlan {
        self.control_extra = lines.into();
        self
    }

    pub fn up(self) -> Lab {
        Lab::up(self)
    }
}

/// What the controller is given besides its agents (see [`Lab::controller`]).
#[derive(Debug, Default, Clone)]
pub struct ControllerPlan<'a> {
    /// Names its files: ctl{tag}.sock, journal{tag}.redb, rebalancerd{tag}.toml and .log.
    pub tag: &'a str,
    /// Extra `[controller]` lines.
    pub controller: &'a str,
    /// Extra `[agents]` lines after the name, munge socket and nodes.
    pub agents: &'a str,
    /// `[agents]` node lines instead of [`Lab::agents_toml`]'s.
    pub nodes: Option<&'a str>,
    /// Further sections (`[slurm]`, `[migration]`, `[ipam]`); `[slurm] enabled = false` when
    /// they have no `[slurm]`.
    pub rest: &'a str,
    /// Put first on the controller's PATH (a fake `scontrol`).
    pub path: Option<PathBuf>,
}

/// The built lab. Dropping it stops the agents, then the hosts and the network go.
pub struct Lab {
    /// The lab's shared directory.
    pub dir: PathBuf,
    pub prefix: String,
    /// "198.18.`block`": the nodes' network.
    pub net_prefix: String,
    /// The containers' subnet.
    pub subnet: String,
    agents: Vec<Child>,
    /// Dropped before `net`: declaration order.
    pub hosts: Hosts,
    pub net: NetLab,
}

impl Lab {
    fn up(plan: LabPlan) -> Lab {
        let t0 = Instant::now();
        let p = plan.prefix.clone();
        let b = plan.block;
        let dir = PathBuf::from(format!("/tmp/{p}-lab"));
        let ns_dir = PathBuf::from(format!("/tmp/{p}-lab.ns"));
        // Hosts of an earlier run go before the network under them.
        Hosts::clean(&ns_dir);
        let subnet = format!("198.19.{b}.0/24");
        let net = NetLab::up(NetPlan {
            prefix: p.clone(),
            block: b,
            subnet: subnet.clone(),
            nodes: plan.nodes,
            dir: dir.clone(),
        });
        let mut hp: Vec<HostPlan> = net
            .nodes
            .iter()
            .map(|n| HostPlan {
                name: n.netns.clone(),
                netns: n.netns.clone(),
                state: dir.join(&n.netns).join("state"),
            })
            .collect();
        hp.push(HostPlan {
            name: ADMIN.into(),
            netns: net.client_ns.clone(),
            state: dir.join(ADMIN).join("state"),
        });
        let hosts = Hosts::up(&ns_dir, &dir.join("munge.key"), hp);
        let mut lab = Lab {
            dir,
            prefix: p.clone(),
            net_prefix: format!("198.18.{b}"),
            subnet,
            agents: vec![],
            hosts,
            net,
        };
        let np = lab.net_prefix.clone();
        for i in 0..plan.nodes {
            let peers: String = (0..plan.nodes)
                .filter(|o| *o != i)
                .map(|o| format!("{p}n{o} = \"{np}.{}:7878\"\n", 10 + o))
                .collect();
            let ipam = if plan.leased {
                ""
            } else {
                "ipam = \"local\"\n"
            };
            let cfg = lab.dir.join(format!("node{i}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "node = \"{p}n{i}\"\nlisten = \"{np}.{ip}:7878\"\ncontainer_subnet = \"{sub}\"\n{ipam}\
                     migration_timeout_ms = {t}\n{extra}\n\
                     [auth]\nmethod = \"munge\"\nmunge_socket = \"{HOST_MUNGE}\"\n[peers]\n{peers}\
                     [control]\nlisten = \"{np}.{ip}:{CONTROL_PORT}\"\n{control}\n",
                    ip = 10 + i,
                    sub = lab.subnet,
                    t = plan.migration_timeout_ms,
                    extra = plan.agent_extra,
                    control = plan.control_extra,
                ),
            )
            .expect("agent config");
            let log = std::fs::File::create(lab.dir.join(format!("node{i}.log"))).expect("log");
            let child = lab
                .hosts
                .command(&lab.node(i), agent_bin())
                .args(["run", "--config"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("agent");
            lab.agents.push(child);
        }
        for i in 0..plan.nodes {
            let deadline = Instant::now() + Duration::from_secs(20);
            while agent_call(&lab.sock(i), &Request::Ping).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "agent {} did not start:\n{}",
                    lab.node(i),
                    lab.log(&format!("node{i}.log"))
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        eprintln!(
            "lab {p}: {} isolated nodes and the admin host up in {:?}",
            plan.nodes,
            t0.elapsed()
        );
        lab
    }

    /// Node i's name (= its hostname and network namespace).
    pub fn node(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    /// Node i's address.
    pub fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.net_prefix, 10 + i)
    }

    /// Node i's agent socket as a process on node i sees it.
    pub fn sock(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{AGENT_SOCKET}", self.agents[i].id()))
    }

    /// The backing directory of node i's /var/lib/rebalancer (the agent's state).
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.join(self.node(i)).join("state")
    }

    /// A file of the lab directory (a daemon's log) without its colour codes, empty if absent.
    pub fn log(&self, name: &str) -> String {
        let raw = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters final-letter
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// The controller's and every agent's log.
    pub fn logs(&self) -> String {
        let mut s = format!("--- rebalancerd\n{}", self.log("rebalancerd.log"));
        for i in 0..self.agents.len() {
            s += &format!("\n--- node{i}\n{}", self.log(&format!("node{i}.log")));
        }
        s
    }

    /// The `[agents]` node lines: each agent by its TCP control address.
    pub fn agents_toml(&self) -> String {
        (0..self.agents.len())
            .map(|i| {
                format!(
                    "nodes.{} = {{ address = \"{}:{CONTROL_PORT}\" }}\n",
                    self.node(i),
                    self.ip(i)
                )
            })
            .collect()
    }

    /// Starts rebalancerd on the admin host. Its agents are TCP addresses with munge (the
    /// admin host's own munged); it is given no agent socket at all.
    pub fn controller(&self, c: ControllerPlan<'_>) -> KillOnDrop {
        let d = self.dir.display();
        let tag = c.tag;
        let nodes = c
            .nodes
            .map(str::to_owned)
            .unwrap_or_else(|| self.agents_toml());
        let slurm = if c.rest.contains("[slurm]") {
            ""
        } else {
            "[slurm]\nenabled = false\n"
        };
        let config = format!(
            "[controller]\nsocket = \"{d}/ctl{tag}.sock\"\njournal = \"{d}/journal{tag}.redb\"\npolicies = \"{d}/policies\"\n{}\n\
             [agents]\nname = \"{ADMIN}\"\nmunge_socket = \"{HOST_MUNGE}\"\n{nodes}{}\n{slurm}{}\n",
            c.controller, c.agents, c.rest
        );
        // What the lab claims: the controller is given no agent socket at all.
        assert!(
            !config.contains("socket_template") && !config.contains(AGENT_SOCKET),
            "{config}"
        );
        std::fs::create_dir_all(self.dir.join("policies")).expect("policies");
        let toml = self.dir.join(format!("rebalancerd{tag}.toml"));
        std::fs::write(&toml, config).expect("config");
        // Appended: a restarted controller keeps its predecessor's lines.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("rebalancerd{tag}.log")))
            .expect("log");
        let mut cmd = self.hosts.command(ADMIN, env!("CARGO_BIN_EXE_rebalancerd"));
        cmd.arg("--config")
            .arg(&toml)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(p) = c.path {
            cmd.env(
                "PATH",
                format!(
                    "{}:{}",
                    p.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            );
        }
        KillOnDrop(cmd.spawn().expect("rebalancerd"))
    }

    /// A munge credential of PAYLOAD from HOST's munged, encoded as root or as uid 65534.
    pub fn munge_on(&self, host: &str, payload: &str, as_nobody: bool) -> String {
        let pre = if as_nobody {
            "setpriv --reuid=65534 --regid=65534 --clear-groups "
        } else {
            ""
        };
        let out = self.hosts.sh(
            host,
            &format!("printf %s '{payload}' | {pre}munge --socket {HOST_MUNGE}"),
        );
        assert!(out.status.success(), "munge on {host}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Device and inode of every Unix socket HOST sees under /run, /tmp and /var/lib.
    pub fn sockets_seen_on(&self, host: &str) -> Vec<(u64, u64)> {
        let o = self.hosts.sh(
            host,
            "find /run /tmp /var/lib -xdev -type s -printf '%D %i\\n' 2>/dev/null; true",
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| {
                let (d, i) = l.split_once(' ')?;
                Some((d.parse().ok()?, i.parse().ok()?))
            })
            .collect()
    }

    /// Device and inode of node i's agent socket.
    pub fn agent_socket_id(&self, i: usize) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(self.sock(i)).expect("agent socket");
        (m.dev(), m.ino())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
