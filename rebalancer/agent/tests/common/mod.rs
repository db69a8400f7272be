//! Test lab: node network namespaces on a bridge (TEAM.md network plan, block [rbt]) and a
//! private munged, from rebalancer-testkit's `NetLab` (the controller's tests use the same), and
//! real `rebalancer-agent` daemons entered into the node namespaces with nsenter. Everything is
//! torn down by `Drop`, also when a test fails.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rebalancer_agent::procstat::ProcStat;
use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind};
use rebalancer_proto::*;
use rebalancer_testkit::{NetLab, NetPlan};

pub const REASON: &str =
    "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored";

pub struct Node {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub port: u16,
    pub socket: PathBuf,
    pub agent: Option<Child>,
    pub log: PathBuf,
    /// A cgroup standing in for the agent's systemd unit: the agent starts inside it.
    pub unit: Option<PathBuf>,
}

pub struct Lab {
    pub k: u8,
    pub prefix: String,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub client_ns: String,
    pub subnet: String,
    /// Extra TOML lines per node index (before the [auth] table).
    pub extra_config: Vec<String>,
    /// Whether agents keep migration images (`REBALANCER_KEEP_IMAGES`, for debugging); the
    /// fault matrix turns it off to check that nothing is left.
    pub keep_images: bool,
    /// Dropped after the agents stopped (field order does not matter: `Drop for Lab` runs first).
    pub net: NetLab,
}

impl Lab {
    /// Builds block `k` (0..16): nodes 198.18.(16+k).0/24, containers 198.19.(16+k).0/24.
    pub fn new(k: u8, agents: usize) -> Lab {
        Lab::with_config(k, agents, Vec::new())
    }

    /// Like `new`, with extra TOML lines for node i in `extra[i]`.
    pub fn with_config(k: u8, agents: usize, extra: Vec<String>) -> Lab {
        assert!(k < 16);
        let subnet = format!("198.19.{}.0/24", 16 + k);
        Lab::build_with(&format!("rbt{k}"), k, 16 + k, &subnet, agents, extra)
    }

    /// `prefix` names every link and namespace (<= 6 characters); nodes get 198.18.`b`.0/24.
    pub fn build(prefix: &str, k: u8, b: u8, subnet: &str, agents: usize) -> Lab {
        Lab::build_with(prefix, k, b, subnet, agents, Vec::new())
    }

    fn build_with(
        prefix: &str,
        k: u8,
        b: u8,
        subnet: &str,
        agents: usize,
        extra: Vec<String>,
    ) -> Lab {
        let dir = PathBuf::from(format!("/tmp/{prefix}-lab"));
        let net = NetLab::up(NetPlan {
            prefix: prefix.to_string(),
            block: b,
            subnet: subnet.to_string(),
            nodes: agents,
            dir: dir.clone(),
        });
        let nodes = net
            .nodes
            .iter()
            .map(|n| Node {
                name: n.netns.clone(),
                netns: n.netns.clone(),
                ip: n.ip.clone(),
                port: 7878,
                socket: dir.join(format!("{}.sock", n.netns)),
                agent: None,
                log: dir.join(format!("{}.log", n.netns)),
                unit: None,
            })
            .collect();
        let mut lab = Lab {
            k,
            prefix: prefix.to_string(),
            dir,
            nodes,
            client_ns: net.client_ns.clone(),
            subnet: subnet.to_string(),
            extra_config: extra,
            keep_images: true,
            net,
        };
        for i in 0..agents {
            lab.start_agent(i);
        }
        lab
    }

    pub fn config(&self, i: usize) -> String {
        let n = &self.nodes[i];
        let d = &self.dir;
        let mut peers = String::new();
        for (j, m) in self.nodes.iter().enumerate() {
            if j != i {
                peers.push_str(&format!("{} = \"{}:{}\"\n", m.name, m.ip, m.port));
            }
        }
        format!(
            "node = \"{name}\"\nlisten = \"{ip}:{port}\"\ncontrol_socket = \"{sock}\"\ncontainer_subnet = \"{subnet}\"\nipam = \"local\"\n\
             state_dir = \"{d}/{name}/state\"\nrun_dir = \"{d}/{name}/run\"\nmigration_timeout_ms = 30000\n{extra}\n\
             [auth]\nmethod = \"munge\"\nmunge_socket = \"{munge}\"\n[peers]\n{peers}",
            name = n.name,
            ip = n.ip,
            port = n.port,
            sock = n.socket.display(),
            subnet = self.subnet,
            d = d.display(),
            munge = self.net.munge_socket().display(),
            extra = self.extra_config.get(i).cloned().unwrap_or_default(),
        )
    }

    pub fn start_agent(&mut self, i: usize) {
        let cfg = self.dir.join(format!("{}.toml", self.nodes[i].name));
        std::fs::write(&cfg, self.config(i)).expect("write config");
        let keep_images = self.keep_images;
        let n = &mut self.nodes[i];
        let _ = std::fs::remove_file(&n.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", n.netns))
            .arg(env!("CARGO_BIN_EXE_rebalancer-agent"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("REBALANCER_LOG", "info,rebalancer_agent=debug");
        if keep_images {
            cmd.env("REBALANCER_KEEP_IMAGES", "1");
        } else {
            cmd.env_remove("REBALANCER_KEEP_IMAGES");
        }
        // Kept open until the spawn below: the child writes "0" to it between fork and exec.
        let unit_procs = n.unit.as_ref().map(|unit| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(unit.join("cgroup.procs"))
                .expect("open the unit's cgroup.procs")
        });
        if let Some(procs) = &unit_procs {
            let fd = std::os::fd::AsRawFd::as_raw_fd(procs);
            // SAFETY: join_self only calls write(2), which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || rebalancer_agent::cgroup::join_self(&[fd]));
            }
        }
        let child = cmd
            // Its own process group, so that `kill_agent` takes its CRIU helpers too.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start agent");
        n.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if n.socket.exists() {
                if let Ok(mut c) = Client::connect(&n.socket) {
                    if c.call(&Request::Ping).is_ok() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent {} did not start; log:\n{}",
                n.name,
                std::fs::read_to_string(&n.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs an agent and the CRIU processes it runs (its page server, a restore), as on a
    /// crashed node (failure injection). Containers have their own session and survive.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let pg = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn client(&self, i: usize) -> Client {
        Client::connect(&self.nodes[i].socket).expect("connect control socket")
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// Stops the agents, gracefully first. An agent leaves its containers running on SIGTERM
    /// (restarts must not kill jobs), so `NetLab` kills what runs in the lab's namespaces and
    /// removes the rest.
    fn stop_agents(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(mut c) = self.nodes[i].agent.take() {
                let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Running (not stopped, not zombie) processes inside the network namespaces of container `id`
/// on node `node` (`rb-<node>-<id>-*`): a live copy has at least one. A frozen copy (stopped by
/// CRIU, or restored and not resumed yet) has none.
pub fn live_copies(node: &str, id: &str) -> usize {
    use std::os::unix::fs::MetadataExt;
    let prefix = format!("rb-{node}-{id}-");
    let inodes: Vec<u64> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| std::fs::metadata(e.path()).ok().map(|m| m.ino()))
        .collect();
    if inodes.is_empty() {
        return 0;
    }
    // Containers have a pid namespace of their own; helpers the agent runs in a container's
    // network namespace (`ip netns exec ... nft`) are in the node's and do not count.
    let own_pid_ns = std::fs::read_link("/proc/self/ns/pid").ok();
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<i32>().is_err() {
            continue;
        }
        if std::fs::read_link(format!("/proc/{name}/ns/pid")).ok() == own_pid_ns {
            continue;
        }
        let Ok(link) = std::fs::read_link(format!("/proc/{name}/ns/net")) else {
            continue;
        };
        // "net:[INODE]"
        let ino = link
            .to_string_lossy()
            .trim_start_matches("net:[")
            .trim_end_matches(']')
            .parse::<u64>()
            .unwrap_or(0);
        if !inodes.contains(&ino) {
            continue;
        }
        if ProcStat::read(Path::new("/proc"), &name).is_some_and(|s| !s.stopped() && !s.ended()) {
            n += 1;
        }
    }
    n
}

/// Fault injection and leak checks for the fault matrix (`fault_matrix.rs`).
impl Lab {
    /// Restarts every agent inside a cgroup of its own in the hierarchy systemd tracks units in
    /// (`<hierarchy>/rbc-unit-K/<node>`), as a systemd unit would run it.
    pub fn run_agents_in_units(&mut self) {
        let h = unit_hierarchy().expect("a name=systemd or cgroup2 hierarchy");
        for i in 0..self.nodes.len() {
            let unit = h
                .join(format!("rbc-unit-{}", self.k))
                .join(&self.nodes[i].name);
            std::fs::create_dir_all(&unit).expect("create the unit cgroup");
            self.kill_agent(i);
            self.nodes[i].unit = Some(unit);
            self.start_agent(i);
        }
    }

    /// SIGKILLs every process in agent `i`'s unit cgroup until it is empty, as `systemctl kill
    /// --signal=KILL` does whatever `KillMode` says. Returns the pids killed.
    pub fn kill_unit(&mut self, i: usize) -> Vec<i32> {
        let unit = self.nodes[i]
            .unit
            .clone()
            .expect("the agent runs in a unit cgroup");
        let mut killed = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = std::fs::read_to_string(unit.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
                if !killed.contains(&p) {
                    killed.push(p);
                }
            }
            if let Some(c) = self.nodes[i].agent.as_mut() {
                let _ = c.try_wait();
            }
            assert!(
                Instant::now() < deadline,
                "the unit {} does not empty",
                unit.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(mut c) = self.nodes[i].agent.take() {
            let _ = c.wait();
        }
        killed
    }

    /// SIGTERM, then a fresh start with the current configuration (containers keep running
    /// and are re-adopted).
    pub fn restart_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start_agent(i);
    }

    /// Whether agent `i` runs (started and not killed).
    pub fn agent_up(&self, i: usize) -> bool {
        self.nodes[i].agent.is_some()
    }

    /// Runs `nft -f -` with `script` in node `i`'s network namespace.
    fn nft(&self, i: usize, script: &str) -> Result<(), String> {
        use std::io::Write;
        let mut c = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.nodes[i].netns))
            .args(["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        c.stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .map_err(|e| format!("nft stdin: {e}"))?;
        let out = c.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Partitions nodes `a` and `b`: nftables drop rules in both node namespaces drop every
    /// packet between their addresses (no reset, no ICMP: a silent partition). [`Lab::heal`]
    /// removes them.
    pub fn partition(&self, a: usize, b: usize) {
        for (me, other) in [(a, b), (b, a)] {
            let ip = &self.nodes[other].ip;
            self.nft(
                me,
                &format!(
                    "add table inet rbc_partition
                     add chain inet rbc_partition in {{ type filter hook input priority -300 ; }}
                     add chain inet rbc_partition out {{ type filter hook output priority -300 ; }}
                     add rule inet rbc_partition in ip saddr {ip} drop
                     add rule inet rbc_partition out ip daddr {ip} drop
"
                ),
            )
            .unwrap_or_else(|e| panic!("partition rules on node {me}: {e}"));
        }
    }

    /// Removes every partition rule.
    pub fn heal(&self) {
        for i in 0..self.nodes.len() {
            let _ = self.nft(
                i,
                "delete table inet rbc_partition
",
            );
        }
    }

    /// Limits what node `i` sends to `mbit` Mbit/s (tc tbf on its uplink), so that a dump or a
    /// post-copy page transfer lasts long enough to be hit; `None` removes the limit.
    pub fn shape(&self, i: usize, mbit: Option<u32>) {
        let ns = format!("--net=/run/netns/{}", self.nodes[i].netns);
        let _ = Command::new("nsenter")
            .args([ns.as_str(), "tc", "qdisc", "del", "dev", "eth0", "root"])
            .stderr(Stdio::null())
            .status();
        if let Some(m) = mbit {
            let rate = format!("{m}mbit");
            let st = Command::new("nsenter")
                .args([
                    ns.as_str(),
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "eth0",
                    "root",
                    "tbf",
                    "rate",
                    &rate,
                    "burst",
                    "256kb",
                    "latency",
                    "500ms",
                ])
                .status()
                .expect("tc");
            assert!(st.success(), "tc tbf on node {i}");
        }
    }

    /// Pids of the `criu` processes working for node `i` (their command line names the node's
    /// run directory) whose command line contains `action` (`dump`, `restore`, `lazy-pages`).
    pub fn criu_pids(&self, i: usize, action: &str) -> Vec<i32> {
        let run = format!("{}/{}/run", self.dir.display(), self.nodes[i].name);
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_criu = args.first().is_some_and(|a| a.ends_with("criu"));
            if is_criu && args.iter().any(|a| a == action) && args.iter().any(|a| a.contains(&run))
            {
                out.push(pid);
            }
        }
        out
    }

    /// Network namespaces of container `id` on node `i` (`rb-<node>-<id>-*`).
    pub fn container_netns(&self, i: usize, id: &str) -> Vec<String> {
        let prefix = format!("rb-{}-{id}-", self.nodes[i].name);
        std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    /// Running processes of container `id` on node `i` ([`live_copies`]).
    pub fn live_processes(&self, i: usize, id: &str) -> usize {
        live_copies(&self.nodes[i].name, id)
    }

    /// What container `id` (address `addr`) still holds on node `i`, when it does not run
    /// there: its network namespaces, a route to its address, the node's veths, nftables tables
    /// of a migration (CRIU's lock, the lazy-port guard), its cgroups and the node's migration
    /// images. Empty when nothing is left.
    pub fn leftovers(&self, i: usize, id: &str, addr: &str) -> Vec<String> {
        let mut left: Vec<String> = self
            .container_netns(i, id)
            .into_iter()
            .map(|n| format!("netns {n}"))
            .collect();
        let ns = format!("--net=/run/netns/{}", self.nodes[i].netns);
        let sh = |args: &[&str]| -> String {
            Command::new("nsenter")
                .arg(&ns)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for l in sh(&["ip", "route", "show", addr]).lines() {
            left.push(format!("route {l}"));
        }
        for l in sh(&["ip", "-o", "link", "show"]).lines() {
            if let Some(name) = l.split(": ").nth(1) {
                if name.starts_with("rbv") {
                    left.push(format!("veth {name}"));
                }
            }
        }
        for l in sh(&["nft", "list", "tables"]).lines() {
            if l.contains("CRIU") || l.contains("rebalancer_lazy") || l.contains("rebalancer_ps_") {
                left.push(format!("nft {l}"));
            }
        }
        for h in ["memory", "cpu", "unified"] {
            let cg = format!(
                "/sys/fs/cgroup/{h}/slurm-rebalancer/{}/{id}",
                self.nodes[i].name
            );
            if std::path::Path::new(&cg).exists() {
                // The tasks it still holds, to tell a leak from a tree not yet gone.
                let procs = std::fs::read_to_string(format!("{cg}/cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(|p| {
                        let st = ProcStat::read(Path::new("/proc"), p).map_or('?', |s| s.state);
                        format!("{p}:{st}")
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                left.push(format!("cgroup {cg} [{procs}]"));
            }
        }
        let images = self.dir.join(&self.nodes[i].name).join("run/images");
        for e in std::fs::read_dir(&images).into_iter().flatten().flatten() {
            left.push(format!("images {}", e.path().display()));
        }
        left
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agents();
        for n in &self.nodes {
            if let Some(unit) = &n.unit {
                let _ = std::fs::remove_dir(unit);
                let _ = unit.parent().map(std::fs::remove_dir);
            }
        }
    }
}

/// The hierarchy systemd tracks units in: `name=systemd` on cgroup v1, else the unified one.
pub fn unit_hierarchy() -> Option<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = |want: &dyn Fn(&str, &str) -> bool| {
        mi.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut post = post.split_whitespace();
            let (fstype, _, opts) = (post.next()?, post.next()?, post.next()?);
            let at = pre.split_whitespace().nth(4)?;
            want(fstype, opts).then(|| PathBuf::from(at))
        })
    };
    mount(&|t, o| t == "cgroup" && o.split(',').any(|x| x == "name=systemd"))
        .or_else(|| mount(&|t, _| t == "cgroup2"))
}

/// Blocking control-socket client.
pub struct Client {
    s: UnixStream,
    id: u32,
}

impl Client {
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let h = Hello::new(Role::Cli, "agent-tests");
        write_frame(
            &mut s,
            &Frame::json(FrameKind::Hello, 0, &h).expect("hello"),
        )
        .map_err(std::io::Error::other)?;
        let f = read_frame(&mut s, MAX_FRAME_LEN).map_err(std::io::Error::other)?;
        if f.header.kind != FrameKind::Hello {
            return Err(std::io::Error::other("no hello"));
        }
        Ok(Client { s, id: 1 })
    }

    pub fn call(&mut self, req: &Request) -> Result<Reply, ErrorReply> {
        self.call_events(req, |_| {})
    }

    /// Sends a request; `on_event` sees each progress event before the response.
    pub fn call_events(
        &mut self,
        req: &Request,
        mut on_event: impl FnMut(&MigrationRecord),
    ) -> Result<Reply, ErrorReply> {
        let id = self.id;
        self.id += 1;
        write_frame(
            &mut self.s,
            &Frame::json(FrameKind::Request, id, req).expect("encode"),
        )
        .expect("send");
        loop {
            let f = read_frame(&mut self.s, MAX_FRAME_LEN).expect("read response");
            match f.header.kind {
                FrameKind::Event => {
                    let Event::MigrationProgress { migration, .. } =
                        f.decode(FrameKind::Event, "event").expect("event");
                    on_event(&migration);
                }
                _ => {
                    let r: Response = f.decode(FrameKind::Response, "response").expect("response");
                    return r.into_result();
                }
            }
        }
    }

    pub fn container(&mut self, id: &str) -> Result<ContainerInfo, ErrorReply> {
        match self.call(&Request::GetContainer { id: id.into() })? {
            Reply::Container { container } => Ok(container),
            other => panic!("unexpected {other:?}"),
        }
    }

    pub fn migrate(
        &mut self,
        id: &str,
        dest: &str,
        mode: MigrationMode,
    ) -> Result<MigrationRecord, ErrorReply> {
        let req = Request::Migrate {
            request: MigrateRequest {
                container: id.into(),
                destination: dest.into(),
                destination_addr: None,
                mode,
                max_downtime_ms: None,
                timeout_ms: None,
            },
            watch: true,
        };
        match self.call(&req)? {
            Reply::Migration { migration } => Ok(migration),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A TCP counter server: answers each line with the number of lines seen so far on that
/// connection. `mem_mib` > 0 adds a thread that keeps dirtying that much memory.
pub fn server_spec(id: &str, address: &str, mem_mib: u64) -> ContainerSpec {
    let prog = format!(
        r#"
import socket, threading, time
MEM = {mem_mib} * 1024 * 1024
if MEM:
    buf = bytearray(MEM)
    for i in range(0, MEM, 4096):
        buf[i] = 1
    def dirty():
        v = 0
        while True:
            v = (v + 1) & 255
            for i in range(0, MEM, 4096 * 16):
                buf[i] = v
            time.sleep(0.05)
    threading.Thread(target=dirty, daemon=True).start()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000))
s.listen(4)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    f = c.makefile("rb")
    n = 0
    for line in f:
        n += 1
        c.sendall(b"%d\n" % n)
    c.close()
"#
    );
    ContainerSpec {
        id: id.into(),
        task: None,
        uid: 0,
        gid: 0,
        argv: vec!["python3".into(), "-u".into(), "-c".into(), prog],
        env: vec![],
        cwd: "/".into(),
        rootfs: RootfsSpec::Host,
        binds: vec![],
        memory_limit: None,
        cpus: None,
        class: None,
        address: Some(address.into()),
        stdout: None,
        stderr: None,
    }
}

pub use rebalancer_testkit::ProbeStats;

/// rebalancer-testkit's probe, started in the lab's client namespace.
pub struct TcpProbe(rebalancer_testkit::TcpProbe);

impl TcpProbe {
    pub fn start(client_ns: &str, addr: &str) -> TcpProbe {
        TcpProbe(rebalancer_testkit::TcpProbe::start(Some(client_ns), addr))
    }

    pub fn stop(self) -> ProbeStats {
        self.0.stop()
    }
}

impl std::ops::Deref for TcpProbe {
    type Target = rebalancer_testkit::TcpProbe;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

pub fn summary(rec: &MigrationRecord) -> String {
    let phases: Vec<String> = rec
        .phases
        .iter()
        .map(|p| format!("{}={}ms", p.phase, p.duration_ms().unwrap_or(0)))
        .collect();
    format!(
        "mode={} downtime={:?}ms frozen={:?}ms total={:?}ms pages_written={} pages_lazy={} bytes={} phases=[{}]",
        rec.mode.map(|m| m.to_string()).unwrap_or_default(),
        rec.stats.downtime_ms,
        rec.stats.frozen_ms,
        rec.stats.total_ms,
        rec.stats.pages_written,
        rec.stats.pages_lazy,
        rec.stats.bytes_sent,
        phases.join(" ")
    )
}
