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
            "node = \"{name}\"\nlisten = \"{ip}:{port}\"\ncontrol_socket = \"{sock}\"\ncontainer_subnet = \"{subnet}\"\n\
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
        let n = &mut self.nodes[i];
        let _ = std::fs::remove_file(&n.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", n.netns))
            .arg(env!("CARGO_BIN_EXE_rebalancer-agent"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("REBALANCER_LOG", "info,rebalancer_agent=debug")
            .env("REBALANCER_KEEP_IMAGES", "1")
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

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agents();
    }
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
