//! Runs inside the test VMs (see `tests/precopy_vm.rs` and `tests/two_guests.rs`).
//! - `vm-guest scenario AGENT MEM_MIB DIRTY_PCT`: builds two agent nodes in network namespaces
//!   on a bridge, starts a container that keeps dirtying its memory, migrates it with pre-copy
//!   and back with stop-and-copy while a client sends a request every 10 ms, and prints
//!   `@@vmtest` result lines (`rebalancer_vm_tests::report`) on stdout (the serial console).
//! - `vm-guest node`: one node of the two-guest lab (`node.rs`, `rebalancer_vm_tests::pair`):
//!   its identity from the kernel command line, a munged and an agent on the guest's own
//!   network, then the commands the host types on the serial console.
//! - `vm-guest workload MEM_MIB DIRTY_PCT`: the container: touches MEM_MIB MiB, then rewrites a
//!   window sliding through it at DIRTY_PCT % of the pages per second, and serves a TCP counter
//!   on port 8000 (each line answered with the number of lines seen on that connection).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind};
use rebalancer_proto::*;
use rebalancer_vm_tests::probe::Probe;
use rebalancer_vm_tests::report::GuestEvent;

// The two-guest lab's node, in a directory of its own so that cargo does not take it for a
// binary.
#[path = "vm-guest/node.rs"]
mod node;

// Network plan: the last agent/engine block (the VM is isolated, the block only keeps names
// and addresses consistent with the host's tests).
const BRIDGE: &str = "rbvbr";
const NODE_NET: &str = "198.18.31";
const SUBNET: &str = "198.19.31.0/24";
const CONTAINER_IP: &str = "198.19.31.10";
const NODES: [&str; 2] = ["rbvn0", "rbvn1"];
const CLIENT_NS: &str = "rbvcl";
const LAB: &str = "/run/vmt";
/// iproute2's `ip` (busybox's shell would run its own `ip` applet for a bare `ip`).
const IP: &str = "/usr/bin/ip";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, default: f64| {
        args.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(default)
    };
    match args.get(1).map(String::as_str) {
        Some("workload") => {
            if let Err(e) = workload(num(2, 128.0) as usize, num(3, 5.0)) {
                eprintln!("vm-guest workload: {e:#}");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Some("scenario") => {
            let agent = PathBuf::from(
                args.get(2)
                    .map(String::as_str)
                    .unwrap_or("rebalancer-agent"),
            );
            finish(scenario(&agent, num(3, 192.0) as u64, num(4, 5.0)), || {
                for n in NODES {
                    log_tail(n, Path::new(&format!("{LAB}/{n}.log")), 40);
                }
                criu_log_errors(Path::new(LAB), Path::new(LAB));
            })
        }
        Some("node") => node::main(),
        _ => {
            eprintln!(
                "usage: vm-guest scenario AGENT MEM_MIB DIRTY_PCT | node | workload MEM_MIB DIRTY_PCT"
            );
            ExitCode::from(2)
        }
    }
}

/// Prints the `Done` event of a run; on failure `diagnose` prints logs first.
fn finish(r: anyhow::Result<()>, diagnose: impl FnOnce()) -> ExitCode {
    match r {
        Ok(()) => {
            emit(&GuestEvent::Done {
                ok: true,
                error: None,
            });
            ExitCode::SUCCESS
        }
        Err(e) => {
            diagnose();
            emit(&GuestEvent::Done {
                ok: false,
                error: Some(format!("{e:#}")),
            });
            ExitCode::from(1)
        }
    }
}

/// On failure: the error lines (and what precedes them) of every CRIU log the agents kept.
/// (`top`'s own `.log` files are the agents' logs, not CRIU's.)
fn criu_log_errors(dir: &Path, top: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            criu_log_errors(&p, top);
        } else if p.extension().is_some_and(|x| x == "log") && p.parent() != Some(top) {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            // The first error with what led to it, then the later error lines alone.
            let mut context = 25;
            for (i, l) in lines.iter().enumerate() {
                if l.contains("Error") {
                    for c in &lines[i.saturating_sub(context)..=i] {
                        emit(&GuestEvent::Log {
                            message: format!("{}: {c}", p.display()),
                        });
                    }
                    context = 0;
                }
            }
        }
    }
}

/// The last `n` lines of an agent's log, as `Log` events.
fn log_tail(label: &str, path: &Path, n: usize) {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(n).collect();
    for l in tail.into_iter().rev() {
        emit(&GuestEvent::Log {
            message: format!("{label}: {l}"),
        });
    }
}

fn emit(e: &GuestEvent) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", e.line());
    let _ = out.flush();
}

// ---------------------------------------------------------------------------------------------
// Workload (the container)

fn workload(mem_mib: usize, dirty_pct: f64) -> anyhow::Result<()> {
    const PAGE: usize = 4096;
    let pages = (mem_mib << 20) / PAGE;
    let mut buf = vec![0u8; pages * PAGE];
    let base = buf.as_mut_ptr() as usize;
    let touch = move |page: usize, v: u8| {
        // SAFETY: page < pages, so the byte lies inside `buf`, which lives until the process
        // ends (the dirtier loop never returns); only the dirtier thread writes after start-up.
        unsafe { std::ptr::write_volatile((base + page * PAGE) as *mut u8, v) };
    };
    for p in 0..pages {
        touch(p, 1);
    }
    // 10 ticks per second, each rewriting the next slice of the window.
    let per_tick = ((pages as f64 * dirty_pct / 100.0) / 10.0).ceil() as usize;
    std::thread::spawn(move || {
        let mut pos = 0usize;
        let mut v = 2u8;
        loop {
            for _ in 0..per_tick {
                touch(pos, v);
                pos += 1;
                if pos == pages {
                    pos = 0;
                    v = v.wrapping_add(1).max(1);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::mem::forget(buf);
    let l = std::net::TcpListener::bind(("0.0.0.0", 8000)).context("bind :8000")?;
    println!("listening");
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        std::thread::spawn(move || {
            let Ok(mut w) = c.try_clone() else { return };
            let mut n = 0u64;
            for line in BufReader::new(c).lines() {
                if line.is_err() {
                    return;
                }
                n += 1;
                if writeln!(w, "{n}").is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario (the lab in the VM)

fn sh(cmd: &str) -> anyhow::Result<()> {
    let o = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| format!("run `{cmd}`"))?;
    if !o.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

fn node_ip(i: usize) -> String {
    format!("{NODE_NET}.{}", 10 + i)
}

fn build_network() -> anyhow::Result<()> {
    sh(&format!(
        "mkdir -p /run/netns {LAB} && /usr/bin/ip link add {BRIDGE} type bridge && \
         /usr/bin/ip addr add {NODE_NET}.1/24 dev {BRIDGE} && /usr/bin/ip link set {BRIDGE} up"
    ))?;
    let mut names: Vec<&str> = NODES.to_vec();
    names.push(CLIENT_NS);
    for (i, ns) in names.iter().enumerate() {
        sh(&format!(
            "{IP} netns add {ns} && {IP} link add {ns}h type veth peer name eth0 netns {ns} && \
             {IP} link set {ns}h master {BRIDGE} up && {IP} -n {ns} addr add {ip}/24 dev eth0 && \
             {IP} -n {ns} link set eth0 up && {IP} -n {ns} link set lo up",
            ip = node_ip(i)
        ))?;
    }
    sh(&format!("{IP} -n {CLIENT_NS} route add {SUBNET} dev eth0"))
}

/// Pages in clear: this proves pre-copy's convergence, and under TLS the guest's third pre-dump
/// round failed with ENOSPC on its small tmpfs (docs/precopy.md).
fn agent_config(i: usize) -> String {
    let peers: String = NODES
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(j, n)| format!("{n} = \"{}:7878\"\n", node_ip(j)))
        .collect();
    format!(
        "node = \"{n}\"\nlisten = \"{ip}:7878\"\ncontrol_socket = \"{LAB}/{n}.sock\"\n\
         container_subnet = \"{SUBNET}\"\nipam = \"local\"\nstate_dir = \"{LAB}/{n}/state\"\nrun_dir = \"{LAB}/{n}/run\"\n\
         migration_timeout_ms = 600000\nhost_dirs = [\"/usr\", \"/etc\", \"/bin\", \"/lib\", \"/lib64\", \"/sbin\"]\n\
         encrypt_memory = false\n\
         [auth]\nmethod = \"none\"\n[peers]\n{peers}",
        n = NODES[i],
        ip = node_ip(i),
    )
}

fn start_agent(agent: &Path, i: usize) -> anyhow::Result<()> {
    spawn_agent(
        agent,
        Path::new(LAB),
        NODES[i],
        &agent_config(i),
        Some(Path::new(&format!("/run/netns/{}", NODES[i]))),
    )
}

/// Starts the agent `name` with `config` (written to `dir/NAME.toml`, log `dir/NAME.log`, its
/// control socket must be `dir/NAME.sock`), in `netns` if given, and waits until it answers.
fn spawn_agent(
    agent: &Path,
    dir: &Path,
    name: &str,
    config: &str,
    netns: Option<&Path>,
) -> anyhow::Result<()> {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).context("write agent config")?;
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).context("agent log")?;
    let mut cmd = Command::new(agent);
    cmd.arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("REBALANCER_LOG", "info,rebalancer_agent=debug")
        .env("NO_COLOR", "1")
        .env("REBALANCER_KEEP_IMAGES", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log")?)
        .stderr(log);
    if let Some(path) = netns {
        let ns = std::fs::File::open(path).context("node netns")?;
        // SAFETY: setns(2) is async-signal-safe; `ns` stays open in the parent until spawn
        // returns.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    }
    cmd.spawn().context("start agent")?;
    let sock = dir.join(format!("{name}.sock"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut c) = Client::connect(&sock) {
            if c.call(&Request::Ping).is_ok() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("agent {name} did not answer within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Client {
    s: UnixStream,
    id: u32,
}

impl Client {
    fn connect(path: &Path) -> anyhow::Result<Client> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(900)))?;
        let h = Hello::new(Role::Cli, "vm-guest");
        write_frame(&mut s, &Frame::json(FrameKind::Hello, 0, &h)?)?;
        let f = read_frame(&mut s, MAX_FRAME_LEN)?;
        if f.header.kind != FrameKind::Hello {
            bail!("agent did not answer with hello");
        }
        Ok(Client { s, id: 1 })
    }

    fn call(&mut self, req: &Request) -> anyhow::Result<Reply> {
        let id = self.id;
        self.id += 1;
        write_frame(&mut self.s, &Frame::json(FrameKind::Request, id, req)?)?;
        loop {
            let f = read_frame(&mut self.s, MAX_FRAME_LEN)?;
            if f.header.kind == FrameKind::Event {
                continue;
            }
            let r: Response = f.decode(FrameKind::Response, "response")?;
            return r.into_result().map_err(|e| anyhow!("{e}"));
        }
    }

    fn node(i: usize) -> anyhow::Result<Client> {
        Client::connect(Path::new(&format!("{LAB}/{}.sock", NODES[i])))
    }
}

/// A host-rootfs container running `vm-guest workload MEM_MIB DIRTY_PCT` at `address`.
fn spec(id: &str, mem_mib: u64, dirty_pct: f64, address: &str) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        task: None,
        uid: 0,
        gid: 0,
        argv: vec![
            "/usr/bin/vm-guest".into(),
            "workload".into(),
            mem_mib.to_string(),
            dirty_pct.to_string(),
        ],
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

fn rss(node: usize) -> anyhow::Result<u64> {
    match Client::node(node)?.call(&Request::GetContainer { id: "mem".into() })? {
        Reply::Container { container } => Ok(container.rss_bytes),
        other => bail!("unexpected answer {other:?}"),
    }
}

fn migrate(
    probe: &Probe,
    label: &str,
    from: usize,
    to: usize,
    mode: MigrationMode,
) -> anyhow::Result<()> {
    probe.take();
    let req = Request::Migrate {
        request: MigrateRequest {
            container: "mem".into(),
            destination: NODES[to].into(),
            destination_addr: None,
            mode,
            max_downtime_ms: None,
            timeout_ms: None,
        },
        watch: true,
    };
    let record = match Client::node(from)?.call(&req).context(label.to_string())? {
        Reply::Migration { migration } => migration,
        other => bail!("unexpected answer {other:?}"),
    };
    // Let the client see the container on its new node before reading its figures.
    probe.advance(50, Duration::from_secs(60));
    emit(&GuestEvent::Migration {
        label: label.into(),
        record: Box::new(record),
        probe: probe.take(),
    });
    Ok(())
}

fn scenario(agent: &Path, mem_mib: u64, dirty_pct: f64) -> anyhow::Result<()> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    emit(&GuestEvent::Kernel { release });
    build_network()?;
    for i in 0..NODES.len() {
        start_agent(agent, i)?;
    }
    match Client::node(0)?.call(&Request::Capabilities)? {
        Reply::Capabilities { capabilities } => emit(&GuestEvent::Capabilities { capabilities }),
        other => bail!("unexpected answer {other:?}"),
    }
    Client::node(0)?.call(&Request::CreateContainer {
        spec: spec("mem", mem_mib, dirty_pct, CONTAINER_IP),
    })?;
    let probe = Probe::start(
        Some(Path::new(&format!("/run/netns/{CLIENT_NS}"))),
        std::net::SocketAddr::new(CONTAINER_IP.parse().context("container address")?, 8000),
    );
    if !probe.advance(20, Duration::from_secs(120)) {
        bail!("the client got no answers: {:?}", probe.take().errors);
    }
    let want = mem_mib << 20;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut r = rss(0)?;
    while r < want {
        if Instant::now() > deadline {
            bail!("container RSS stayed at {} MiB", r >> 20);
        }
        std::thread::sleep(Duration::from_millis(500));
        r = rss(0)?;
    }
    emit(&GuestEvent::Container {
        id: "mem".into(),
        rss_bytes: r,
    });
    // A few seconds of steady dirtying before the first round.
    std::thread::sleep(Duration::from_secs(3));
    migrate(&probe, "pre-copy", 0, 1, MigrationMode::PreCopy)?;
    std::thread::sleep(Duration::from_secs(3));
    migrate(&probe, "stop-and-copy", 1, 0, MigrationMode::StopAndCopy)?;
    Ok(())
}
