//! `rebalancer-bench`: migrates a TCP counter workload between two node namespaces with each
//! toolchain and mode, per memory size, and reports downtime, the client's largest gap, total
//! time, bytes between the nodes and per-phase times. Needs root. See docs/benchmarks.md.

mod agent;
mod cr;
mod mem;
mod net;
mod sys;
mod xfer;

use std::io::Write;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use rebalancer_bench::report::{combine, markdown_table, size_label, Outcome, Row, RunReport};
use rebalancer_bench::wire::ClientReport;

use crate::net::{ContainerNet, CLIENT, CONTAINER_IP, DST, SRC};
use crate::sys::{Proc, SysError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    StopAndCopy,
    PostCopy,
    PreCopy,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::StopAndCopy => "stop-and-copy",
            Mode::PostCopy => "post-copy",
            Mode::PreCopy => "pre-copy",
        }
    }
}

/// What one migration measured from the orchestrator's side.
#[derive(Debug, Default)]
pub struct Migration {
    pub phases: Vec<(String, f64)>,
    pub total_ms: f64,
    /// Freeze started → the restore command returned and the address was announced.
    pub resumed_ms: Option<f64>,
    /// CRIU's own log marks of the dump and the restore.
    pub breakdown: Vec<(String, f64)>,
}

/// Settings shared by every run.
pub struct Ctx {
    /// Directory holding this crate's binaries.
    pub bins: PathBuf,
    pub criu: PathBuf,
    /// tmpfs directory for images, bundles and runc state.
    pub workdir: PathBuf,
    pub log_dir: PathBuf,
    /// Directory on a disk file system (root of the plain-CRIU workload).
    pub disk_dir: PathBuf,
    pub dirty_percent_per_sec: f64,
    pub agent_bin: Option<PathBuf>,
    /// `--baseline-agent`, for the `-base` toolchains.
    pub baseline_agent: Option<PathBuf>,
    pub settle_ms: u64,
    pub after_ms: u64,
}

#[derive(Parser, Debug)]
#[command(about = "Live-migration benchmark: rebalancer-agent vs plain CRIU vs runc (needs root)")]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Memory sizes (RSS of the workload): the issue's five by default. A size without room
    /// for three copies of it (`memory_needed_mib`) is skipped and says so.
    #[arg(long, value_delimiter = ',', default_value = "64M,256M,1G,2G,4G")]
    sizes: Vec<String>,
    /// Toolchains to compare: `agent` (encrypted pages, the agent's default), `agent-plain`
    /// (`encrypt_memory = false`), `agent-nohold` (`hold_inbound = false`: CRIU's lock drops
    /// the client's packets during the freeze), `criu` (by hand), `runc`; `agent-base` and
    /// `agent-plain-base` run `--baseline-agent`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "agent,agent-plain,criu,runc"
    )]
    toolchains: Vec<String>,
    /// Migration modes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "stop-and-copy,post-copy,pre-copy"
    )]
    modes: Vec<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the Markdown table here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// tmpfs directory for images and bundles (removed at exit).
    #[arg(long, default_value = "/dev/shm/rbb-bench")]
    workdir: PathBuf,
    /// CRIU and agent logs of every run are kept here.
    #[arg(long, default_value = "/tmp/rbb-bench-logs")]
    log_dir: PathBuf,
    #[arg(long, default_value = "/usr/local/sbin/criu")]
    criu: PathBuf,
    /// The agent binary (default: rebalancer-agent next to this binary).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// An older agent binary for the `agent-base` and `agent-plain-base` toolchains, so that a
    /// change is measured against its baseline in the same run.
    #[arg(long)]
    baseline_agent: Option<PathBuf>,
    /// Share of the workload's pages written per second, in percent.
    #[arg(long, default_value_t = 2.0)]
    dirty_percent_per_sec: f64,
    /// Migrations per cell; the table shows the run with the median downtime and the range.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
    /// Client traffic before the migration starts, in ms.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Client traffic after the migration ends, in ms.
    #[arg(long, default_value_t = 1000)]
    after_ms: u64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// (internal) receive an image directory over TCP.
    RecvDir {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// (internal) send an image directory over TCP.
    SendDir {
        #[arg(long)]
        to: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// (internal) bandwidth sink: read one connection, print `BYTES MICROS`.
    Sink {
        #[arg(long)]
        listen: String,
    },
    /// (internal) bandwidth source: send MIB MiB.
    Blast {
        #[arg(long)]
        to: String,
        #[arg(long)]
        mib: u64,
    },
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim().to_ascii_uppercase();
    let s = s.trim_end_matches("IB").trim_end_matches('B');
    let (num, mult) = match s.chars().last() {
        Some('G') => (&s[..s.len() - 1], 1024),
        Some('M') => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad memory size `{s}`"))?;
    anyhow::ensure!(n > 0, "memory size must be positive");
    Ok(n * mult)
}

fn first_line(mut c: std::process::Command) -> String {
    sys::run(&mut c)
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default()
}

/// Starts the client in its own node namespace and waits until the workload is ready.
pub fn start_client(
    ctx: &Ctx,
    mib: u64,
) -> Result<(Proc, std::sync::mpsc::Receiver<String>), SysError> {
    let mut cmd = sys::in_netns(
        CLIENT.name,
        &ctx.bins.join("bench-client").to_string_lossy(),
    );
    cmd.args([
        "--server",
        &format!("{CONTAINER_IP}:7000"),
        "--read-timeout-s",
        "30",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped());
    CLIENT_RETRANS_AT_START.store(
        client_retrans_segs().unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut p = Proc::spawn("bench-client", &mut cmd)?;
    let out = p
        .child()
        .stdout
        .take()
        .ok_or_else(|| SysError::Other("client has no stdout".into()))?;
    let rx = sys::line_reader(out);
    let wait = Duration::from_secs(30 + mib / 64);
    let line = sys::recv_line(&rx, "bench-client", wait).map_err(|e| {
        let err = p.stderr_text();
        let err = err.lines().next().unwrap_or_default();
        SysError::Other(format!("{e}: {err}"))
    })?;
    if line != "ready" {
        return Err(SysError::Other(format!("client said `{line}`")));
    }
    Ok((p, rx))
}

pub fn stop_client(
    p: &mut Proc,
    rx: &std::sync::mpsc::Receiver<String>,
) -> Result<ClientReport, SysError> {
    if let Some(stdin) = p.child().stdin.as_mut() {
        let _ = stdin.write_all(b"stop\n");
        let _ = stdin.flush();
    }
    let line = sys::recv_line(rx, "bench-client report", Duration::from_secs(45))?;
    serde_json::from_str(&line).map_err(|e| SysError::Other(format!("client report: {e}: {line}")))
}

/// The client namespace's `RetransSegs` when its client started (`u64::MAX`: unknown).
static CLIENT_RETRANS_AT_START: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(u64::MAX);

/// TCP segments retransmitted from the client's namespace so far (/proc/net/snmp there).
fn client_retrans_segs() -> Option<u64> {
    let out = sys::in_netns(CLIENT.name, "cat")
        .arg("/proc/net/snmp")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    rebalancer_bench::report::retrans_segs(&String::from_utf8_lossy(&out.stdout))
}

pub fn fill_from_client(row: &mut Row, rep: &ClientReport) {
    let at_start = CLIENT_RETRANS_AT_START.load(std::sync::atomic::Ordering::Relaxed);
    row.client_retrans = client_retrans_segs()
        .filter(|_| at_start != u64::MAX)
        .map(|n| n.saturating_sub(at_start));
    row.client_gap_ms = Some(rep.max_gap_us as f64 / 1000.0);
    row.client_errors = rep.errors.clone();
    row.downtime_ms = rep
        .server
        .as_ref()
        .map(|s| s.max_heartbeat_gap_us as f64 / 1000.0);
    row.counter_ok =
        Some(!rep.counter_went_backwards && rep.errors.is_empty() && rep.server.is_some());
}

fn run_cr(
    ctx: &Ctx,
    tool: cr::Tool,
    mode: Mode,
    mib: u64,
    idx: usize,
    row: &mut Row,
) -> Result<(), SysError> {
    let run_name = format!("{idx:02}-{}-{}-{mib}M", row.toolchain, mode.name());
    let dirs = cr::Dirs::new(ctx, &run_name)?;
    let src = ContainerNet::create("rbb-cs", SRC, "rbbv-s")?;
    src.route_add()?;
    let w = cr::start_workload(ctx, tool, &src, mib)?;
    let (mut client, rx) = start_client(ctx, mib)?;
    sys::sleep(Duration::from_millis(ctx.settle_ms))?;
    let b0 = net::node_bytes()?;
    let port = 20000 + (idx as u16 % 1000) * 4;
    let mem = mem::MemSampler::start([
        mem::NodeDirs {
            netns: SRC.name,
            dirs: vec![dirs.src_img.clone(), dirs.src_work.clone()],
        },
        mem::NodeDirs {
            netns: DST.name,
            dirs: vec![dirs.dst_img.clone(), dirs.dst_work.clone()],
        },
    ]);
    let res = cr::migrate(ctx, tool, mode, &w, &src, &dirs, port);
    [row.mem_src_extra_mib, row.mem_dst_extra_mib] = mem.stop();
    let outcome = match res {
        Ok(m) => {
            row.total_ms = Some(m.total_ms);
            row.phases = m.phases;
            row.breakdown = m.breakdown;
            if let Some(r) = m.resumed_ms {
                row.phases.push(("frozen→announced".into(), r));
            }
            Ok(())
        }
        Err(e) => Err(e),
    };
    if outcome.is_ok() {
        sys::sleep(Duration::from_millis(ctx.after_ms))?;
    }
    row.bytes_between_nodes = net::node_bytes().ok().map(|b1| b1.saturating_sub(b0));
    match stop_client(&mut client, &rx) {
        Ok(rep) => fill_from_client(row, &rep),
        Err(e) if outcome.is_ok() => return Err(e),
        Err(_) => {}
    }
    outcome
}

/// One TCP stream of `mib` MiB from the source node to the destination node (the path every
/// page takes), in MB/s.
fn bandwidth(ctx: &Ctx, mib: u64) -> Result<f64, SysError> {
    let me = ctx.bins.join("rebalancer-bench");
    let addr = format!("{}:19999", DST.ip);
    let mut cmd = sys::in_netns(DST.name, &me.to_string_lossy());
    cmd.args(["sink", "--listen", &addr]).stdout(Stdio::piped());
    let mut sink = Proc::spawn("bandwidth sink", &mut cmd)?;
    let out = sink
        .child()
        .stdout
        .take()
        .ok_or_else(|| SysError::Other("sink has no stdout".into()))?;
    let rx = sys::line_reader(out);
    sys::recv_line(&rx, "bandwidth sink", Duration::from_secs(10))?;
    sys::run(sys::in_netns(SRC.name, &me.to_string_lossy()).args([
        "blast",
        "--to",
        &addr,
        "--mib",
        &mib.to_string(),
    ]))?;
    let line = sys::recv_line(&rx, "bandwidth sink", Duration::from_secs(60))?;
    xfer::rate_mb_s(&line).ok_or_else(|| SysError::Other(format!("sink said `{line}`")))
}

struct Settings {
    ctx: Ctx,
    sizes: Vec<u64>,
    toolchains: Vec<String>,
    modes: Vec<Mode>,
    repeat: u32,
}

impl std::ops::Deref for Settings {
    type Target = Ctx;
    fn deref(&self) -> &Ctx {
        &self.ctx
    }
}

fn cleanup_run(ctx: &Ctx, tool: &str) {
    match tool {
        "criu" => cr::cleanup(ctx, cr::Tool::Criu),
        "runc" => cr::cleanup(ctx, cr::Tool::Runc),
        t if t.starts_with("agent") => agent::cleanup(ctx),
        _ => {}
    }
    // The veths first: a namespace whose dying processes still hold it outlives `ip netns
    // del`, and its veth would keep answering ARP for the container address.
    net::flush_node_links(net::SRC);
    net::flush_node_links(net::DST);
    net::delete_netns("rbb-cs");
    net::delete_netns("rbb-cd");
}

/// MemAvailable in MiB.
fn mem_available_mib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemAvailable:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
                .map(|kb| kb / 1024)
        })
}

/// A migration holds the workload up to three times at once (source, images on tmpfs,
/// restored copy); starting one without that much free memory wakes the OOM killer, which
/// may pick anybody's process on this shared machine.
fn memory_needed_mib(mib: u64) -> u64 {
    mib * 3 + 512
}

/// Samples MemAvailable every 5 ms while a cell runs: the node's largest drop below its
/// level at the start (the workload, its images on tmpfs, the restored copy, CRIU's buffers;
/// and whatever else the machine's other users allocated meanwhile).
struct MemSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<u64>>,
}

impl MemSampler {
    fn start() -> MemSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = mem_available_mib()?;
            let mut low = start;
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(m) = mem_available_mib() {
                    low = low.min(m);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Some(start.saturating_sub(low))
        });
        MemSampler { stop, thread }
    }

    fn stop(self) -> Option<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().ok().flatten().map(|m| m as f64)
    }
}

/// One migration of one cell; `Err` only when interrupted.
fn run_cell(s: &Settings, tool: &str, mode: Mode, mib: u64, idx: usize) -> Result<Row, SysError> {
    let mut row = Row::new(mib, tool, mode.name(), Outcome::Ok);
    let started = Instant::now();
    if let Some(avail) = mem_available_mib() {
        if avail < memory_needed_mib(mib) {
            row.outcome = Outcome::Failed(format!(
                "skipped: {avail} MiB available, a {mib} MiB migration needs {} MiB",
                memory_needed_mib(mib)
            ));
            eprintln!("    {:?}", row.outcome);
            return Ok(row);
        }
    }
    let sampler = MemSampler::start();
    let res = match tool {
        "criu" if mode != Mode::PreCopy => run_cr(&s.ctx, cr::Tool::Criu, mode, mib, idx, &mut row),
        "runc" if mode != Mode::PreCopy => run_cr(&s.ctx, cr::Tool::Runc, mode, mib, idx, &mut row),
        t if t.starts_with("agent") => {
            let v = agent::Variant {
                encrypt: !t.contains("-plain"),
                baseline: t.ends_with("-base"),
                hold: t != "agent-nohold",
            };
            agent::run(&s.ctx, mode, mib, idx, &mut row, v)
        }
        _ => Err(SysError::Other(format!(
            "{tool} does not drive {}",
            mode.name()
        ))),
    };
    row.mem_peak_mib = sampler.stop();
    cleanup_run(&s.ctx, tool);
    match res {
        Ok(()) => {}
        Err(SysError::Interrupted) => return Err(SysError::Interrupted),
        Err(SysError::Other(m)) if m.starts_with("unsupported: ") => {
            row.outcome = Outcome::Unsupported(m["unsupported: ".len()..].to_string())
        }
        Err(e) => row.outcome = Outcome::Failed(error_chain(&e)),
    }
    eprintln!(
        "    downtime {:?} ms, client gap {:?} ms, total {:?} ms, {:?} ({:.1} s)",
        row.downtime_ms.map(|v| v.round()),
        row.client_gap_ms.map(|v| v.round()),
        row.total_ms.map(|v| v.round()),
        row.outcome,
        started.elapsed().as_secs_f64()
    );
    Ok(row)
}

fn benchmark(
    s: &Settings,
    precopy_ok: Result<(), String>,
    report: &mut RunReport,
) -> Result<(), SysError> {
    let mut idx = 0;
    for &mib in &s.sizes {
        for tool in &s.toolchains {
            for &mode in &s.modes {
                sys::check_interrupt()?;
                if mode == Mode::PreCopy {
                    if let Err(why) = &precopy_ok {
                        let row =
                            Row::new(mib, tool, mode.name(), Outcome::Unsupported(why.clone()));
                        report.rows.push(row);
                        continue;
                    }
                }
                let mut runs = Vec::new();
                for r in 0..s.repeat {
                    idx += 1;
                    eprintln!(
                        "[{idx}] {} {tool} {} (run {}/{}) ...",
                        size_label(mib),
                        mode.name(),
                        r + 1,
                        s.repeat
                    );
                    let row = run_cell(s, tool, mode, mib, idx)?;
                    let stop = row.outcome != Outcome::Ok;
                    runs.push(row);
                    if stop {
                        break;
                    }
                }
                if let Some(row) = combine(runs) {
                    report.rows.push(row);
                }
            }
        }
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rebalancer-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    match &args.cmd {
        Some(Cmd::RecvDir { listen, dir }) => {
            xfer::receive(listen, dir)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::SendDir { to, dir }) => {
            xfer::send(dir, to)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Sink { listen }) => {
            xfer::sink(listen)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Blast { to, mib }) => {
            xfer::blast(to, *mib)?;
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "the benchmark needs root");
    let sizes = args
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let modes = args
        .modes
        .iter()
        .map(|m| match m.as_str() {
            "stop-and-copy" => Ok(Mode::StopAndCopy),
            "post-copy" => Ok(Mode::PostCopy),
            "pre-copy" => Ok(Mode::PreCopy),
            o => anyhow::bail!("unknown mode `{o}` (stop-and-copy, post-copy, pre-copy)"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for t in &args.toolchains {
        anyhow::ensure!(
            matches!(
                t.as_str(),
                "agent"
                    | "agent-plain"
                    | "agent-nohold"
                    | "agent-base"
                    | "agent-plain-base"
                    | "criu"
                    | "runc"
            ),
            "unknown toolchain `{t}` (agent, agent-plain, agent-nohold, agent-base, agent-plain-base, criu, runc)"
        );
        anyhow::ensure!(
            !t.ends_with("-base") || args.baseline_agent.is_some(),
            "toolchain `{t}` needs --baseline-agent PATH"
        );
    }
    let bins = std::env::current_exe()
        .context("locate this binary")?
        .parent()
        .map(PathBuf::from)
        .context("binary has no directory")?;
    let ctx = Ctx {
        agent_bin: Some(
            args.agent
                .clone()
                .unwrap_or_else(|| bins.join("rebalancer-agent")),
        ),
        baseline_agent: args.baseline_agent.clone(),
        bins,
        criu: args.criu.clone(),
        workdir: args.workdir.clone(),
        log_dir: args.log_dir.clone(),
        disk_dir: PathBuf::from("/var/tmp/rbb-bench"),
        dirty_percent_per_sec: args.dirty_percent_per_sec,
        settle_ms: args.settle_ms,
        after_ms: args.after_ms,
    };
    std::fs::create_dir_all(&ctx.workdir).context("create work directory")?;
    std::fs::create_dir_all(&ctx.log_dir).context("create log directory")?;
    // CRIU's page pipes need 4 MiB pipes; without CAP_SYS_RESOURCE the limit must allow it.
    if std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|v| v < 8 << 20)
    {
        let _ = std::fs::write("/proc/sys/fs/pipe-max-size", "8388608");
    }
    sys::install_signal_handlers();

    let precopy_ok = match sys::run(std::process::Command::new(&ctx.criu).args([
        "check",
        "--feature",
        "mem_dirty_track",
    ])) {
        Ok(_) => Ok(()),
        Err(_) => Err("kernel lacks soft-dirty (criu check --feature mem_dirty_track)".to_string()),
    };
    let mut report = RunReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_s: rebalancer_bench::wire::unix_us() / 1_000_000,
        kernel: first_line({
            let mut c = std::process::Command::new("uname");
            c.arg("-r");
            c
        }),
        criu_version: first_line({
            let mut c = std::process::Command::new(&ctx.criu);
            c.arg("--version");
            c
        })
        .trim_start_matches("Version: ")
        .to_string(),
        runc_version: first_line({
            let mut c = std::process::Command::new("runc");
            c.arg("--version");
            c
        })
        .trim_start_matches("runc version ")
        .to_string(),
        ..Default::default()
    };
    let settings = Settings {
        ctx,
        sizes,
        toolchains: args.toolchains.clone(),
        modes,
        repeat: args.repeat,
    };
    let started = Instant::now();
    let res = net::setup().and_then(|_| {
        // Bandwidth in the same run as the migrations, before and after them.
        report.bandwidth_mb_s.push(bandwidth(&settings.ctx, 1024)?);
        eprintln!(
            "bandwidth source → destination: {:.0} MB/s",
            report.bandwidth_mb_s[0]
        );
        benchmark(&settings, precopy_ok, &mut report)?;
        report.bandwidth_mb_s.push(bandwidth(&settings.ctx, 1024)?);
        Ok(())
    });
    for t in &settings.toolchains {
        cleanup_run(&settings.ctx, t);
    }
    net::teardown();
    let _ = std::fs::remove_dir_all(&settings.workdir);
    let _ = std::fs::remove_dir_all(&settings.disk_dir);
    report.wall_clock_s = started.elapsed().as_secs_f64();

    let table = markdown_table(&report.rows);
    println!("{table}");
    println!("wall clock: {:.0} s", report.wall_clock_s);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    if let Some(p) = &args.markdown {
        std::fs::write(p, &table).with_context(|| format!("write {}", p.display()))?;
    }
    match res {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(SysError::Interrupted) => {
            eprintln!("rebalancer-bench: interrupted; everything torn down");
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(anyhow::anyhow!(error_chain(&e))).context("benchmark aborted"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").ok(), Some(64));
        assert_eq!(parse_size("2G").ok(), Some(2048));
        assert_eq!(parse_size("1GiB").ok(), Some(1024));
        assert_eq!(parse_size("300").ok(), Some(300));
        assert!(parse_size("0M").is_err());
        assert!(parse_size("lots").is_err());
    }
}
