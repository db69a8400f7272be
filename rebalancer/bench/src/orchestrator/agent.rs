//! Toolchain (a): the project's node agent. Two `rebalancer-agent` daemons run in the two node
//! namespaces (with a private munged for their peer credentials); the workload is started with
//! `Request::CreateContainer` and moved with `Request::Migrate` on the source agent's control
//! socket, framed with rebalancer-proto.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rebalancer_bench::report::Row;
use rebalancer_proto::frame::{read_frame, write_frame, Frame};
use rebalancer_proto::{
    ContainerSpec, Event, FrameKind, Hello, MigrateRequest, MigrationMode, MigrationRecord,
    MigrationState, Reply, Request, Response, Role, RootfsSpec, MAX_FRAME_LEN,
};

use crate::net::{CONTAINER_IP, CONTAINER_NET, DST, SRC};
use crate::sys::{self, Proc, Result, SysError};
use crate::{Ctx, Mode};

const AGENT_PORT: u16 = 7878;
const CONTAINER: &str = "bench";

fn proto_err(what: &str) -> impl FnOnce(rebalancer_proto::ProtoError) -> SysError + '_ {
    move |e| SysError::Other(format!("{what}: {e}"))
}

/// Blocking control-socket client.
struct Control {
    s: UnixStream,
    next_id: u32,
}

impl Control {
    fn connect(path: &Path) -> Result<Control> {
        let mut s =
            UnixStream::connect(path).map_err(sys::io(format!("connect {}", path.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(sys::io("socket timeout"))?;
        let hello = Frame::json(
            FrameKind::Hello,
            0,
            &Hello::new(Role::Cli, "rebalancer-bench"),
        )
        .map_err(proto_err("encode hello"))?;
        write_frame(&mut s, &hello).map_err(proto_err("send hello"))?;
        let f = read_frame(&mut s, MAX_FRAME_LEN).map_err(proto_err("read hello"))?;
        if f.header.kind != FrameKind::Hello {
            return Err(SysError::Other("agent did not answer hello".into()));
        }
        Ok(Control { s, next_id: 1 })
    }

    /// One request; progress events are skipped (the final record carries every phase).
    fn call(&mut self, req: &Request) -> Result<Reply> {
        let id = self.next_id;
        self.next_id += 1;
        let f = Frame::json(FrameKind::Request, id, req).map_err(proto_err("encode request"))?;
        write_frame(&mut self.s, &f).map_err(proto_err("send request"))?;
        loop {
            let f = read_frame(&mut self.s, MAX_FRAME_LEN).map_err(proto_err("read response"))?;
            match f.header.kind {
                FrameKind::Event => {
                    let _: Event = f
                        .decode(FrameKind::Event, "event")
                        .map_err(proto_err("event"))?;
                }
                _ => {
                    let r: Response = f
                        .decode(FrameKind::Response, "response")
                        .map_err(proto_err("response"))?;
                    return r
                        .into_result()
                        .map_err(|e| SysError::Other(format!("agent: {e}")));
                }
            }
        }
    }
}

fn dir(ctx: &Ctx) -> PathBuf {
    ctx.workdir.join("agent")
}

fn socket(ctx: &Ctx, node: &str) -> PathBuf {
    dir(ctx).join(format!("{node}.sock"))
}

struct Lab {
    munged_pid: Option<i32>,
    _agents: Vec<Proc>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(pid) = self.munged_pid.take() {
            // SAFETY: kill(2) of the munged this lab started (pid from its pid file).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

fn start_munged(ctx: &Ctx) -> Result<i32> {
    let d = dir(ctx);
    let key = d.join("munge.key");
    let mut k = vec![0u8; 1024];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut k))
        .map_err(sys::io("read /dev/urandom"))?;
    std::fs::write(&key, &k).map_err(sys::io("write munge key"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .map_err(sys::io("chmod munge key"))?;
    let pidfile = d.join("munged.pid");
    sys::run(
        Command::new("munged")
            .arg("--force")
            .arg("-S")
            .arg(d.join("munge.sock"))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--pid-file={}", pidfile.display()))
            .arg(format!(
                "--log-file={}",
                ctx.log_dir.join("munged.log").display()
            ))
            .arg(format!("--seed-file={}", d.join("munged.seed").display())),
    )?;
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Ok(pid);
        }
        if Instant::now() > end {
            return Err(SysError::Other("munged wrote no pid file".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How the agents of one toolchain run.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// `encrypt_memory` (TLS page transfer).
    pub encrypt: bool,
    /// Run `--baseline-agent` instead (a before/after comparison within one run).
    pub baseline: bool,
    /// `hold_inbound` (the client's packets held during the freeze); written only when off,
    /// so that a baseline agent without the key still starts.
    pub hold: bool,
}

fn config(ctx: &Ctx, node: crate::net::Node, peer: crate::net::Node, v: Variant) -> String {
    let d = dir(ctx);
    format!(
        "node = \"{n}\"\nlisten = \"{ip}:{AGENT_PORT}\"\ncontrol_socket = \"{sock}\"\n\
         encrypt_memory = {encrypt}\n{hold}\
         container_subnet = \"{CONTAINER_NET}\"\nipam = \"local\"\nstate_dir = \"{d}/{n}/state\"\nrun_dir = \"{d}/{n}/run\"\n\
         migration_timeout_ms = 300000\n\
         host_dirs = [\"/usr\", \"/etc\", \"/bin\", \"/lib\", \"/lib64\", \"/sbin\", \"{bins}\"]\n\
         [auth]\nmethod = \"munge\"\nmunge_socket = \"{d}/munge.sock\"\n\
         [peers]\n\"{p}\" = \"{pip}:{AGENT_PORT}\"\n",
        n = node.name,
        ip = node.ip,
        encrypt = v.encrypt,
        hold = if v.hold { "" } else { "hold_inbound = false\n" },
        sock = socket(ctx, node.name).display(),
        d = d.display(),
        bins = ctx.bins.display(),
        p = peer.name,
        pip = peer.ip,
    )
}

fn start_agents(ctx: &Ctx, logs: &Path, v: Variant) -> Result<Lab> {
    let d = dir(ctx);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(sys::io("create agent dir"))?;
    let mut lab = Lab {
        munged_pid: Some(start_munged(ctx)?),
        _agents: Vec::new(),
    };
    let agent = if v.baseline {
        ctx.baseline_agent.clone().ok_or_else(|| {
            SysError::Other("the -base toolchains need --baseline-agent PATH".into())
        })?
    } else {
        ctx.agent_bin
            .clone()
            .ok_or_else(|| SysError::Other("no agent binary".into()))?
    };
    if !agent.exists() {
        return Err(SysError::Other(format!("{} not built", agent.display())));
    }
    for (node, peer) in [(SRC, DST), (DST, SRC)] {
        let cfg = d.join(format!("{}.toml", node.name));
        std::fs::write(&cfg, config(ctx, node, peer, v)).map_err(sys::io("write agent config"))?;
        let mut c = sys::in_netns(node.name, &agent.to_string_lossy());
        c.arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("REBALANCER_LOG", "info")
            .stdin(Stdio::null());
        lab._agents.push(Proc::spawn_logged(
            &format!("agent {}", node.name),
            &mut c,
            &logs.join(format!("agent-{}.log", node.name)),
        )?);
    }
    for node in [SRC, DST] {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            sys::check_interrupt()?;
            if let Ok(mut c) = Control::connect(&socket(ctx, node.name)) {
                if c.call(&Request::Ping).is_ok() {
                    break;
                }
            }
            if Instant::now() > end {
                return Err(SysError::Other(format!(
                    "agent on {} did not answer (log in {})",
                    node.name,
                    logs.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(lab)
}

fn spec(ctx: &Ctx, mib: u64) -> ContainerSpec {
    ContainerSpec {
        id: CONTAINER.into(),
        task: None,
        uid: 0,
        gid: 0,
        argv: vec![
            ctx.bins
                .join("bench-workload")
                .to_string_lossy()
                .into_owned(),
            "--detach-stdio".into(),
            "--listen".into(),
            "0.0.0.0:7000".into(),
            "--mib".into(),
            mib.to_string(),
            "--dirty-percent-per-sec".into(),
            ctx.dirty_percent_per_sec.to_string(),
        ],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        rootfs: RootfsSpec::Host,
        binds: vec![],
        memory_limit: None,
        cpus: None,
        class: None,
        address: Some(CONTAINER_IP.into()),
        stdout: None,
        stderr: None,
    }
}

fn migrate(ctx: &Ctx, mode: Mode) -> Result<MigrationRecord> {
    let mode = match mode {
        Mode::StopAndCopy => MigrationMode::StopAndCopy,
        Mode::PostCopy => MigrationMode::PostCopy,
        Mode::PreCopy => MigrationMode::PreCopy,
    };
    let mut c = Control::connect(&socket(ctx, SRC.name))?;
    let req = Request::Migrate {
        request: MigrateRequest {
            container: CONTAINER.into(),
            destination: DST.name.into(),
            destination_addr: Some(format!("{}:{AGENT_PORT}", DST.ip)),
            mode,
            max_downtime_ms: None,
            timeout_ms: Some(300_000),
        },
        watch: true,
    };
    match c.call(&req)? {
        Reply::Migration { migration } => Ok(migration),
        other => Err(SysError::Other(format!("unexpected reply {other:?}"))),
    }
}

/// One migration by the agents of variant `v`.
pub fn run(ctx: &Ctx, mode: Mode, mib: u64, idx: usize, row: &mut Row, v: Variant) -> Result<()> {
    let logs = ctx
        .log_dir
        .join(format!("{idx:02}-{}-{}-{mib}M", row.toolchain, mode.name()));
    std::fs::create_dir_all(&logs).map_err(sys::io("create log dir"))?;
    let _lab = start_agents(ctx, &logs, v)?;
    if mode == Mode::PreCopy {
        let mut c = Control::connect(&socket(ctx, SRC.name))?;
        if let Reply::Capabilities { capabilities } = c.call(&Request::Capabilities)? {
            if !capabilities.modes.contains(&MigrationMode::PreCopy) {
                return Err(SysError::Other(format!(
                    "unsupported: {}",
                    if capabilities.dirty_tracking {
                        "agent does not offer pre-copy".to_string()
                    } else {
                        "kernel lacks soft-dirty (agent capabilities)".to_string()
                    }
                )));
            }
        }
    }
    let mut c = Control::connect(&socket(ctx, SRC.name))?;
    c.call(&Request::CreateContainer {
        spec: spec(ctx, mib),
    })?;
    let (mut client, rx) = crate::start_client(ctx, mib)?;
    sys::sleep(Duration::from_millis(ctx.settle_ms))?;
    let b0 = crate::net::node_bytes()?;
    let mem = crate::mem::MemSampler::start([SRC, DST].map(|n| crate::mem::NodeDirs {
        netns: n.name,
        dirs: vec![dir(ctx).join(n.name)],
    }));
    let t0 = Instant::now();
    let rec = migrate(ctx, mode);
    [row.mem_src_extra_mib, row.mem_dst_extra_mib] = mem.stop();
    let total = t0.elapsed().as_secs_f64() * 1000.0;
    let outcome = match rec {
        Ok(rec) if rec.state == MigrationState::Succeeded => {
            row.total_ms = Some(rec.stats.total_ms.map(|t| t as f64).unwrap_or(total));
            row.phases = rec
                .phases
                .iter()
                .map(|p| (p.phase.to_string(), p.duration_ms().unwrap_or(0) as f64))
                .collect();
            if let Some(d) = rec.stats.downtime_ms {
                row.phases.push(("agent-downtime".into(), d as f64));
            }
            row.breakdown = sub_phases(&logs);
            Ok(())
        }
        Ok(rec) => Err(SysError::Other(format!(
            "migration {:?}: {}",
            rec.state,
            rec.error.unwrap_or_default()
        ))),
        Err(e) => Err(e),
    };
    if outcome.is_ok() {
        sys::sleep(Duration::from_millis(ctx.after_ms))?;
    }
    row.bytes_between_nodes = crate::net::node_bytes()
        .ok()
        .map(|b1| b1.saturating_sub(b0));
    match crate::stop_client(&mut client, &rx) {
        Ok(rep) => crate::fill_from_client(row, &rep),
        Err(e) if outcome.is_ok() => return Err(e),
        Err(_) => {}
    }
    outcome
}

/// The agents' `sub-phases` lines: source first (its switch line also carries CRIU's dump
/// marks), then the destination's restore and commit.
fn sub_phases(logs: &Path) -> Vec<(String, f64)> {
    use rebalancer_bench::breakdown::{agent_sub_phases, prefixed};
    let read =
        |n: &str| std::fs::read_to_string(logs.join(format!("agent-{n}.log"))).unwrap_or_default();
    let mut out = prefixed("src", &agent_sub_phases(&read(SRC.name)));
    out.extend(prefixed("dst", &agent_sub_phases(&read(DST.name))));
    out
}

/// Container namespaces the agents made (`rb-<node>-<id>-<hex>`); the agents themselves die
/// with their `Proc`s.
pub fn cleanup(_ctx: &Ctx) {
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("rb-rbb-n") {
                crate::net::delete_netns(&n);
            }
        }
    }
}
