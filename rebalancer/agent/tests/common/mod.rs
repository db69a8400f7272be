//! Test lab: node network namespaces on a bridge (TEAM.md network plan, block [rbt]), a private
//! munged, and real `rebalancer-agent` daemons entered into the node namespaces with nsenter.
//! Everything is torn down by `Drop`, also when a test fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind};
use rebalancer_proto::*;

pub const REASON: &str =
    "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored";

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh")
}

fn must(cmd: &str) {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

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
    pub bridge: String,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub client_ns: String,
    pub munged_pid: Option<i32>,
    pub subnet: String,
    /// Extra TOML lines per node index (before the [auth] table).
    pub extra_config: Vec<String>,
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
        let bridge = format!("{prefix}br");
        let dir = PathBuf::from(format!("/tmp/{prefix}-lab"));
        let mut lab = Lab {
            k,
            prefix: prefix.to_string(),
            bridge: bridge.clone(),
            dir: dir.clone(),
            nodes: Vec::new(),
            client_ns: format!("{prefix}cl"),
            munged_pid: None,
            subnet: subnet.to_string(),
            extra_config: extra,
        };
        lab.teardown();
        std::fs::create_dir_all(&dir).expect("lab dir");
        must(&format!("ip link add {bridge} type bridge && ip addr add 198.18.{b}.1/24 dev {bridge} && ip link set {bridge} up"));
        // Node namespaces n0..n(agents-1) and the client namespace.
        let mut names: Vec<String> = (0..agents).map(|i| format!("{prefix}n{i}")).collect();
        names.push(lab.client_ns.clone());
        for (i, ns) in names.iter().enumerate() {
            let ip = format!("198.18.{b}.{}", 10 + i);
            must(&format!(
                "ip netns add {ns} && ip link add {ns}h type veth peer name eth0 netns {ns} && \
                 ip link set {ns}h master {bridge} up && ip -n {ns} addr add {ip}/24 dev eth0 && \
                 ip -n {ns} link set eth0 up && ip -n {ns} link set lo up"
            ));
            if *ns == lab.client_ns {
                must(&format!("ip -n {ns} route add {} dev eth0", lab.subnet));
            }
        }
        lab.start_munged();
        for (i, name) in names.iter().take(agents).enumerate() {
            let name = name.clone();
            let ip = format!("198.18.{b}.{}", 10 + i);
            let node = Node {
                name: name.clone(),
                netns: name.clone(),
                ip,
                port: 7878,
                socket: dir.join(format!("{name}.sock")),
                agent: None,
                log: dir.join(format!("{name}.log")),
            };
            lab.nodes.push(node);
        }
        for i in 0..agents {
            lab.start_agent(i);
        }
        lab
    }

    fn start_munged(&mut self) {
        let d = &self.dir;
        // A pid file from an earlier run would name the wrong process.
        let _ = std::fs::remove_file(d.join("munged.pid"));
        must(&format!("dd if=/dev/urandom of={0}/munge.key bs=1024 count=1 2>/dev/null && chmod 600 {0}/munge.key", d.display()));
        must(&format!(
            "munged --force -S {0}/munge.sock --key-file={0}/munge.key --pid-file={0}/munged.pid --log-file={0}/munged.log --seed-file={0}/munged.seed",
            d.display()
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(p) = std::fs::read_to_string(d.join("munged.pid")) {
                self.munged_pid = p.trim().parse().ok();
                if self.munged_pid.is_some() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("munged did not start");
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
             [auth]\nmethod = \"munge\"\nmunge_socket = \"{d}/munge.sock\"\n[peers]\n{peers}",
            name = n.name,
            ip = n.ip,
            port = n.port,
            sock = n.socket.display(),
            subnet = self.subnet,
            d = d.display(),
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

    fn teardown(&mut self) {
        for i in 0..self.nodes.len() {
            // Graceful first: the agent stops its containers and unmounts its images tmpfs.
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
        // Mounts left by agents that were killed (failure injection).
        if let Ok(m) = std::fs::read_to_string("/proc/mounts") {
            let dir = format!("{}/", self.dir.display());
            let mut points: Vec<&str> = m
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|p| p.starts_with(&dir))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Some(pid) = self.munged_pid.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        // Container netns of agents that died (named rb-<node>-...), then the nodes.
        let k = &self.prefix;
        if let Ok(rd) = std::fs::read_dir("/run/netns") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("rb-{k}n"))
                    || name.starts_with(&format!("{k}n"))
                    || name == self.client_ns
                {
                    // Kill leftover processes in the namespace first (restored trees of a dead agent).
                    let _ = sh(&format!("ip netns pids {name} | xargs -r kill -9"));
                    let _ = sh(&format!("ip netns del {name}"));
                }
            }
        }
        let _ = sh(&format!("ip link del {}", self.bridge));
        let _ = sh(&format!("for l in $(ip -o link show | awk -F': ' '{{print $2}}' | grep -E '^{k}(n|cl)' | cut -d@ -f1); do ip link del $l; done"));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
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

/// Result of a [`TcpProbe`] run.
#[derive(Debug, Default)]
pub struct ProbeStats {
    pub requests: u64,
    pub last_counter: u64,
    pub errors: Vec<String>,
    pub max_gap: Duration,
}

/// A client in the client namespace sending one request every 10 ms and checking that the
/// counter goes up by one each time.
pub struct TcpProbe {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<Mutex<ProbeStats>>,
    pub count: Arc<AtomicU64>,
}

impl TcpProbe {
    pub fn start(client_ns: &str, addr: &str) -> TcpProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(ProbeStats::default()));
        let count = Arc::new(AtomicU64::new(0));
        let (st, s2, c2) = (stop.clone(), stats.clone(), count.clone());
        let ns = format!("/run/netns/{client_ns}");
        let addr = format!("{addr}:8000");
        let handle = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).expect("client netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let _ = f.as_raw_fd();
            let deadline = Instant::now() + Duration::from_secs(20);
            let stream = loop {
                match std::net::TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(e) => {
                        if Instant::now() > deadline {
                            s2.lock()
                                .expect("stats")
                                .errors
                                .push(format!("connect: {e}"));
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(15)))
                .expect("timeout");
            let mut w = stream.try_clone().expect("clone");
            let mut r = BufReader::new(stream);
            let mut last = Instant::now();
            let mut expect = 1u64;
            while !st.load(Ordering::Relaxed) {
                let mut line = String::new();
                let res = w.write_all(b"x\n").and_then(|_| r.read_line(&mut line));
                let mut s = s2.lock().expect("stats");
                match res {
                    Ok(0) => {
                        s.errors.push("connection closed".into());
                        return;
                    }
                    Ok(_) => {
                        let v: u64 = line.trim().parse().unwrap_or(0);
                        if v != expect {
                            s.errors.push(format!("counter {v}, expected {expect}"));
                            return;
                        }
                        expect += 1;
                        let gap = last.elapsed();
                        if gap > s.max_gap {
                            s.max_gap = gap;
                        }
                        last = Instant::now();
                        s.requests += 1;
                        s.last_counter = v;
                        c2.store(v, Ordering::Relaxed);
                    }
                    Err(e) => {
                        s.errors.push(format!("i/o: {e}"));
                        return;
                    }
                }
                drop(s);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        TcpProbe {
            stop,
            handle: Some(handle),
            stats,
            count,
        }
    }

    /// Waits until the counter reached `n` more answers than now.
    pub fn advance(&self, n: u64, within: Duration) -> bool {
        let start = self.count.load(Ordering::Relaxed);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.count.load(Ordering::Relaxed) >= start + n {
                return true;
            }
            if !self.stats.lock().expect("stats").errors.is_empty() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn reset_gap(&self) {
        self.stats.lock().expect("stats").max_gap = Duration::ZERO;
    }

    pub fn stop(mut self) -> ProbeStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        std::mem::take(&mut *self.stats.lock().expect("stats"))
    }
}

impl Drop for TcpProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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
