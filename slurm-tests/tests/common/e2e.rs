// The end-to-end fixture shared by migration.rs and user_view.rs (textually included, so the
// tests keep using its private items as before).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use slurm_tests::{Cluster, JobId, Options, Poll};

/// The server's port; each container has its own address, so every server uses the same one.
const PORT: u16 = 8000;
/// Memory the server holds.
const SERVER_MIB: u32 = 64;
const STARTUP: Duration = Duration::from_secs(60);
const MIGRATION: Duration = Duration::from_secs(150);
const SLURM: Duration = Duration::from_secs(60);
/// Accounting is written asynchronously by slurmctld through slurmdbd.
const ACCOUNTING: Duration = Duration::from_secs(90);

const SERVER_PY: &str = r#"# TCP counter server: answers each request line with the number of requests served so far
# (one counter for the whole server), prints "served N" every 100 requests, and on a line "quit"
# prints and answers "bye N" and exits with code 3.
import socket, sys
mem = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(mem), 4096):
    mem[i] = 1
port = int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(4)
print("listening on port %d, holding %s MiB" % (port, sys.argv[1]), flush=True)
n = 0
while True:
    c, _ = s.accept()
    try:
        for line in c.makefile("rb"):
            if line.strip() == b"quit":
                print("bye %d" % n, flush=True)
                c.sendall(b"bye %d\n" % n)
                c.close()
                sys.exit(3)
            n += 1
            c.sendall(b"%d\n" % n)
            if n % 100 == 0:
                print("served %d" % n, flush=True)
    except OSError:
        pass
    c.close()
"#;

/// The TCP test client, shared with scripts/demo.sh.
const CLIENT_PY: &str = include_str!("../../workload/client.py");

// ----- binaries -----------------------------------------------------------------------------------

/// `target/<profile>/` of this test executable (`target/<profile>/deps/migration-HASH`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("the test executable lives in target/<profile>/deps")
}

fn binary(env: &str, name: &str, package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} is not a file", p.display());
        return p;
    }
    let dir = target_profile_dir();
    // Binaries are in target/<profile>/. The plugin (a cdylib) is there after `cargo build`, but
    // `cargo test --workspace` (CI) only builds it into deps/: take the newer of the two.
    let mut candidates = vec![dir.join(name)];
    if name.ends_with(".so") {
        candidates.push(dir.join("deps").join(name));
    }
    let found = candidates
        .iter()
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    match found {
        Some(p) => p.clone(),
        None => panic!(
            "{} missing: run `cargo build -p {package}` with the same CARGO_TARGET_DIR as the tests, or set {env}",
            dir.join(name).display()
        ),
    }
}

struct Bins {
    agent: PathBuf,
    rebalancerd: PathBuf,
    rebalctl: PathBuf,
    spank: PathBuf,
}

impl Bins {
    fn find() -> Bins {
        Bins {
            agent: binary(
                "REBALANCER_AGENT_BIN",
                "rebalancer-agent",
                "rebalancer-agent",
            ),
            rebalancerd: binary("REBALANCERD_BIN", "rebalancerd", "rebalancer-controller"),
            rebalctl: binary("REBALCTL_BIN", "rebalctl", "rebalancer-cli"),
            spank: binary(
                "REBALANCER_SPANK_SO",
                "libslurm_rebalancer_spank.so",
                "slurm-rebalancer-spank",
            ),
        }
    }
}

// ----- processes ----------------------------------------------------------------------------------

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// SIGTERM, up to 3 s, then SIGKILL; always reaps.
fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) of our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            _ => return None,
        }
    }
}

fn sh(cmd: &str) -> String {
    match Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("sh: {e}"),
    }
}

/// Removes terminal colour sequences (`ESC [ ... m`) from a log.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path).map(|s| strip_ansi(&s)) {
        Ok(s) => {
            let all: Vec<&str> = s.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// A process as /proc shows it.
#[derive(Debug, Clone)]
struct Proc {
    pid: i32,
    ppid: i32,
    comm: String,
    cmdline: String,
}

impl std::fmt::Display for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}) {:?}", self.pid, self.comm, self.cmdline)
    }
}

fn proc_info(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
            .replace('\0', " ")
            .trim()
            .to_owned();
    Some(Proc {
        pid,
        ppid,
        comm,
        cmdline,
    })
}

/// PID and its ancestors up to (excluding) pid 1 of the machine.
fn ancestry(pid: i32) -> Vec<Proc> {
    let mut out = Vec::new();
    let mut p = pid;
    while p > 1 && out.len() < 64 {
        let Some(info) = proc_info(p) else { break };
        p = info.ppid;
        out.push(info);
    }
    out
}

/// What /proc/PID/fd/FD points to, for the test's log.
fn fd_target(pid: i32, fd: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("({e})"))
}

fn netns_inode_of_pid(pid: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let s = link.to_string_lossy();
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

fn netns_inode_of_node(node: &str) -> u64 {
    std::fs::metadata(format!("/run/netns/{node}"))
        .unwrap_or_else(|e| panic!("/run/netns/{node}: {e}"))
        .ino()
}

/// Where a container's pid 1 runs in Slurm's terms.
#[derive(Debug)]
struct Placement {
    /// The slurmstepd the tree hangs under, and its step (`J.k`).
    stepd: Proc,
    step: String,
    chain: String,
}

/// Walks PID's ancestry to the `slurmstepd: [J.k]` it runs under and checks that this slurmstepd
/// is the one of NODE (same network namespace as /run/netns/NODE).
fn placement(pid: i32, job: JobId, node: &str) -> Result<Placement, String> {
    let chain = ancestry(pid);
    let text = chain
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n  <- ");
    let Some(first) = chain.first() else {
        return Err(format!("process {pid} does not exist"));
    };
    let stepd = chain
        .iter()
        .skip(1)
        .find(|p| p.comm.starts_with("slurmstepd") && p.cmdline.starts_with("slurmstepd: ["))
        .ok_or_else(|| format!("no slurmstepd above {first}:\n  {text}"))?;
    let step = stepd
        .cmdline
        .strip_prefix("slurmstepd: [")
        .and_then(|s| s.split(']').next())
        .unwrap_or_default()
        .to_owned();
    if step.split('.').next() != Some(job.to_string().as_str()) {
        return Err(format!(
            "{first} runs under step [{step}], not a step of job {job}:\n  {text}"
        ));
    }
    let want = netns_inode_of_node(node);
    let got = netns_inode_of_pid(stepd.pid);
    if got != Some(want) {
        let names = sh("for n in /run/netns/*; do echo \"$n $(stat -c %i $n)\"; done");
        return Err(format!(
            "slurmstepd {stepd} is in network namespace {got:?}, {node}'s is {want} ({}):\n  {text}",
            names.trim().replace('\n', ", ")
        ));
    }
    Ok(Placement {
        stepd: stepd.clone(),
        step,
        chain: text,
    })
}

// ----- the server's output ------------------------------------------------------------------------

/// Checks the server's whole output: "listening ...", then `served 100`, `served 200`, ... without a
/// gap, then `bye N` (N at or past the last `served`). Lines of others (Slurm's messages) are
/// returned apart. Returns (last served, N, foreign lines).
fn check_server_output(text: &str) -> Result<(u64, u64, Vec<String>), String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut foreign = Vec::new();
    let first = lines.next().ok_or("the output is empty")?;
    if !first.starts_with("listening on port") {
        return Err(format!(
            "the first line is {first:?}, not the server's \"listening\""
        ));
    }
    let mut served = 0u64;
    let mut bye = None;
    for l in lines {
        if let Some(n) = l.strip_prefix("served ") {
            let n: u64 = n.parse().map_err(|_| format!("bad line {l:?}"))?;
            if bye.is_some() {
                return Err(format!("{l:?} after the \"bye\" line"));
            }
            if n != served + 100 {
                return Err(format!(
                    "\"served {n}\" follows \"served {served}\": output lost"
                ));
            }
            served = n;
        } else if let Some(n) = l.strip_prefix("bye ") {
            let n: u64 = n.parse().map_err(|_| format!("bad line {l:?}"))?;
            if bye.is_some() {
                return Err("two \"bye\" lines".into());
            }
            bye = Some(n);
        } else if l.starts_with("listening") {
            return Err(format!("{l:?} again: the server started twice"));
        } else {
            foreign.push(l.to_owned());
        }
    }
    let bye = bye.ok_or(format!(
        "no \"bye\" line (last: \"served {served}\"): the end of the output is missing"
    ))?;
    if served == 0 {
        return Err("no \"served\" line".into());
    }
    if bye < served || bye >= served + 100 {
        return Err(format!(
            "\"bye {bye}\" does not follow \"served {served}\": output lost"
        ));
    }
    Ok((served, bye, foreign))
}

// ----- the fixture --------------------------------------------------------------------------------

/// The client's figures (its JSON status file).
#[derive(Debug, Clone)]
struct ClientStatus {
    raw: Value,
}

impl ClientStatus {
    fn int(&self, k: &str) -> u64 {
        self.raw.get(k).and_then(Value::as_u64).unwrap_or(0)
    }
    fn answers(&self) -> u64 {
        self.int("answers")
    }
    fn errors(&self) -> u64 {
        self.int("errors")
    }
    fn connections(&self) -> u64 {
        self.int("connections")
    }
    fn last_answer(&self) -> u64 {
        self.int("last_answer")
    }
    fn done(&self) -> bool {
        self.raw.get("done").and_then(Value::as_bool) == Some(true)
    }
    fn bye(&self) -> Option<&str> {
        self.raw.get("bye").and_then(Value::as_str)
    }
}

fn client_status(path: &Path) -> Option<ClientStatus> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text)
        .ok()
        .map(|raw| ClientStatus { raw })
}

/// A background Slurm client (srun) this test started.
struct Spawned {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Everything one test starts: the cluster (taken down last), agents, controller, its sruns and
/// jobs, and a working directory under /var/tmp (a container's /tmp is private, and the job's
/// working directory must be visible inside it). Dropped in reverse order, also on panic.
struct E2e {
    name: &'static str,
    work: PathBuf,
    bins: Bins,
    cluster: Option<Cluster>,
    agents: Vec<(String, Child)>,
    controller: Option<Child>,
    procs: Vec<Spawned>,
    jobs: Vec<JobId>,
    t0: Instant,
    /// Uid and gid the user's Slurm commands run as (`None`: root).
    user: Option<(u32, u32)>,
}

impl E2e {
    fn start(name: &'static str) -> E2e {
        assert!(
            is_root(),
            "run as root: the test starts Slurm daemons, agents and CRIU"
        );
        let bins = Bins::find();
        let work = PathBuf::from(format!("/var/tmp/rb-e2e-{name}-{}", std::process::id()));
        if work.exists() {
            std::fs::remove_dir_all(&work)
                .unwrap_or_else(|e| panic!("remove old {}: {e}", work.display()));
        }
        for d in ["agents", "policies"] {
            std::fs::create_dir_all(work.join(d))
                .unwrap_or_else(|e| panic!("create {}/{d}: {e}", work.display()));
        }
        let mut e = E2e {
            name,
            work,
            bins,
            cluster: None,
            agents: Vec::new(),
            controller: None,
            procs: Vec::new(),
            jobs: Vec::new(),
            t0: Instant::now(),
            user: None,
        };
        e.write("server.py", SERVER_PY);
        e.write("client.py", CLIENT_PY);
        let plugstack = e.work.join("plugstack.conf");
        e.write(
            "plugstack.conf",
            &format!(
                "required {} socket={}\n",
                e.bins.spank.display(),
                slurm_tests::AGENT_SOCKET
            ),
        );
        let cluster = Cluster::up_with(Options {
            nodes: 3,
            plugstack: Some(plugstack),
            ..Options::default()
        })
        .expect("cluster up with the SPANK plugin in plugstack.conf");
        e.cluster = Some(cluster);
        e.log(&format!(
            "cluster up at {}",
            e.cluster().state_dir().display()
        ));
        // We hold the machine's cluster lock: container namespaces left by an earlier run that was
        // killed hard belong to nobody.
        remove_container_netns();
        e.start_agents();
        e.start_controller();
        e
    }

    fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("cluster is up")
    }

    fn log(&self, msg: &str) {
        eprintln!(
            "[{} {:6.1}s] {msg}",
            self.name,
            self.t0.elapsed().as_secs_f64()
        );
    }

    /// Logs a measured figure, and appends it to the file named by `RBC_E2E_FIGURES` when set,
    /// so that CI prints each release's downtimes and client gaps (cargo captures the log).
    fn figure(&self, msg: &str) {
        self.log(msg);
        if let Some(path) = std::env::var_os("RBC_E2E_FIGURES") {
            use std::io::Write;
            let line = format!("{}: {msg}\n", self.name);
            let res = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = res {
                self.log(&format!("cannot append to {}: {e}", path.to_string_lossy()));
            }
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    fn write(&self, name: &str, text: &str) {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Waits until the work dir's file NAME contains NEEDLE (`what` names the wait in the
    /// failure, with the file's text and the test's context).
    fn wait_output(&self, name: &str, needle: &str, what: &str, timeout: Duration) {
        slurm_tests::wait_until(what, timeout, || {
            let text = self.read(name);
            Ok(if text.contains(needle) {
                Poll::Done(())
            } else {
                Poll::Pending(text)
            })
        })
        .unwrap_or_else(|err| panic!("{err}\n{}", self.context()));
    }

    /// One agent per node, on the node (its namespaces, private /run and state directory), as
    /// a site runs it; its config and log live in the shared work dir.
    fn start_agents(&mut self) {
        let nodes = self.cluster().node_names();
        // On each node, the state dir's munge socket is that node's own munged.
        let munge = self.cluster().state_dir().join("munge/munge.socket");
        let a = self.work.join("agents");
        for (k, node) in nodes.iter().enumerate() {
            let peers: String = nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != k)
                .map(|(j, n)| format!("{n} = \"198.18.0.{}:7878\"\n", 11 + j))
                .collect();
            let cfg = a.join(format!("{node}.toml"));
            // Container addresses from the blocks the controller leases this node, as a site
            // runs it (cluster.sh's lines).
            let ipam = self
                .cluster()
                .agent_ipam_toml()
                .expect("the cluster's container address lines for the agent");
            // The TCP control listener for the controller on the admin host (cluster.sh's).
            let control = self
                .cluster()
                .agent_control_toml(node)
                .expect("the cluster's [control] section for the agent");
            std::fs::write(
                &cfg,
                format!(
                    "node = \"{node}\"\nlisten = \"198.18.0.{ip}:7878\"\ncontrol_socket = \"{sock}\"\n\
                     {ipam}state_dir = \"/var/lib/rebalancer\"\nrun_dir = \"/run/rebalancer\"\n\
                     migration_timeout_ms = 60000\n[auth]\nmethod = \"munge\"\nmunge_socket = \"{}\"\n[peers]\n{peers}{control}",
                    munge.display(),
                    sock = slurm_tests::AGENT_SOCKET,
                    ip = 11 + k
                ),
            )
            .expect("write the agent's config");
            let log = std::fs::File::create(a.join(format!("{node}.log"))).expect("agent log");
            // The agent runs the restore step with srun, which finds the cluster through
            // SLURM_CONF (host_command sets it).
            let child = self
                .cluster()
                .host_command(node, Path::new("/"), &self.bins.agent)
                .args(["run", "--config"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("agent log"))
                .stderr(log)
                .spawn()
                .expect("start rebalancer-agent");
            self.agents.push((node.clone(), child));
        }
        for k in 0..self.agents.len() {
            let node = self.agents[k].0.clone();
            let sock = self
                .cluster()
                .host_path(&node, Path::new(slurm_tests::AGENT_SOCKET));
            let log = a.join(format!("{node}.log"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !sock.exists() {
                if let Ok(Some(st)) = self.agents[k].1.try_wait() {
                    panic!("the agent on {node} exited ({st}):\n{}", tail(&log, 30));
                }
                assert!(
                    Instant::now() < deadline,
                    "the agent on {node} has no control socket after 30 s:\n{}",
                    tail(&log, 30)
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
        self.log("agents up on node1..node3");
    }

    fn start_controller(&mut self) {
        let policy = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/drain.toml"),
        )
        .expect("read policies/drain.toml");
        let mut replaced = false;
        let policy: String = policy
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("action") && l.contains('=') && !replaced {
                    replaced = true;
                    "action = \"automatic\"".to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(replaced, "no `action =` line in policies/drain.toml");
        self.write("policies/drain.toml", &format!("{policy}\n"));
        let d = self.work.display();
        let conf = self.cluster().slurm_conf();
        // How the controller reaches the agents is the cluster's to say (cluster.sh): their TCP
        // control ports.
        let agents = self
            .cluster()
            .controller_agents_toml()
            .expect("the cluster's controller-agents.toml");
        let ipam = self
            .cluster()
            .controller_ipam_toml()
            .expect("the cluster's controller-ipam.toml");
        self.write(
            "rebalancerd.toml",
            &format!(
                "[controller]\nsocket = \"{d}/ctl.sock\"\njournal = \"{d}/journal.redb\"\npolicies = \"{d}/policies\"\n\
                 slurm_user = \"root\"\nevaluate_interval_s = 2\n\
                 [slurm]\nbackend = \"libslurm\"\nconf = \"{}\"\npoll_interval_ms = 300\nreconcile_interval_s = 5\n\
                 [agents]\n{agents}poll_interval_ms = 500\n\
                 [migration]\ntimeout_s = 120\n{ipam}",
                conf.display()
            ),
        );
        let log = std::fs::File::create(self.path("rebalancerd.log")).expect("controller log");
        // On the admin host, as a site runs it; its socket (for rebalctl here) is in the shared
        // work dir.
        let child = self
            .cluster()
            .host_command(slurm_tests::ADMIN_HOST, Path::new("/"), &self.bins.rebalancerd)
            .arg("--config")
            .arg(self.path("rebalancerd.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start rebalancerd");
        self.controller = Some(child);
        let seen =
            slurm_tests::wait_until("rebalancerd to see the three agents up, each with its leased address block", STARTUP, || {
                if let Some(Ok(Some(st))) = self.controller.as_mut().map(Child::try_wait) {
                    return Ok(Poll::Pending(format!("rebalancerd exited ({st})")));
                }
                Ok(match self.rebalctl(&["show", "nodes"]) {
                    Ok(v) => {
                        let up = v
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter(|n| {
                                        n.get("agent").and_then(Value::as_str) == Some("up")
                                            && n.get("address_blocks")
                                                .and_then(Value::as_array)
                                                .is_some_and(|b| !b.is_empty())
                                    })
                                    .count()
                            })
                            .unwrap_or(0);
                        if up == 3 {
                            Poll::Done(())
                        } else {
                            Poll::Pending(v.to_string())
                        }
                    }
                    Err(e) => Poll::Pending(e),
                })
            });
        if let Err(e) = seen {
            panic!("{e}\n{}", tail(&self.path("rebalancerd.log"), 40));
        }
        self.log("rebalancerd up with the drain policy set to automatic");
    }

    /// `rebalctl --socket S --json ARGS`.
    fn rebalctl(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(&self.bins.rebalctl)
            .arg("--socket")
            .arg(self.path("ctl.sock"))
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run rebalctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "rebalctl {args:?}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "rebalctl {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn containers(&self, job: JobId) -> Result<Vec<Value>, String> {
        let v = self.rebalctl(&["show", "containers", &format!("job={job}")])?;
        v.as_array()
            .cloned()
            .ok_or_else(|| format!("not a list: {v}"))
    }

    /// Waits until the controller shows task TASK of job JOB running on NODE; returns the
    /// container (id, address, pid...).
    fn wait_container(&self, job: JobId, task: u64, node: &str, timeout: Duration) -> Value {
        let r = slurm_tests::wait_until(
            &format!("task {task} of job {job} running on {node} (rebalctl show containers)"),
            timeout,
            || {
                Ok(match self.containers(job) {
                    Ok(list) => match list.iter().find(|c| {
                        c.pointer("/task/task_id").and_then(Value::as_u64) == Some(task)
                            && c.get("node").and_then(Value::as_str) == Some(node)
                            && c.get("state").and_then(Value::as_str) == Some("running")
                            && c.get("pid").and_then(Value::as_i64).is_some()
                    }) {
                        Some(c) => Poll::Done(c.clone()),
                        None => Poll::Pending(format!("{list:?}")),
                    },
                    Err(e) => Poll::Pending(e),
                })
            },
        );
        r.unwrap_or_else(|e| panic!("{e}\n{}", self.context()))
    }

    /// Waits for the end of the migration of CONTAINER: terminal and, if it succeeded, Slurm
    /// synced or a Slurm error recorded.
    fn wait_migration(&self, container: &str) -> Value {
        let r = slurm_tests::wait_until(
            &format!("the migration of {container} to end"),
            MIGRATION,
            || {
                let list = match self.rebalctl(&["show", "migrations"]) {
                    Ok(v) => v.as_array().cloned().unwrap_or_default(),
                    Err(e) => return Ok(Poll::Pending(e)),
                };
                let found = list.iter().rev().find(|m| {
                    m.pointer("/record/container").and_then(Value::as_str) == Some(container)
                });
                Ok(match found {
                    Some(m) => {
                        let state = m
                            .pointer("/record/state")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        let synced = m.get("slurm_synced").and_then(Value::as_bool) == Some(true);
                        let slurm_error = m.get("slurm_error").is_some_and(|e| !e.is_null());
                        let done = matches!(state, "rolled-back" | "failed")
                            || (state == "succeeded" && (synced || slurm_error));
                        if done {
                            Poll::Done(m.clone())
                        } else {
                            Poll::Pending(m.to_string())
                        }
                    }
                    None => Poll::Pending(format!("no migration of {container} yet")),
                })
            },
        );
        r.unwrap_or_else(|e| panic!("{e}\n{}", self.context()))
    }

    /// Asserts that the migration M succeeded from SOURCE to DEST and Slurm was synced.
    fn assert_migrated(&self, m: &Value, source: &str, dest: &str) {
        let ctx = || {
            format!(
                "{}\n{}",
                serde_json::to_string_pretty(m).unwrap_or_default(),
                self.context()
            )
        };
        let s = |p: &str| m.pointer(p).and_then(Value::as_str).unwrap_or_default();
        assert_eq!(
            s("/record/state"),
            "succeeded",
            "the migration did not succeed: {}\n{}",
            s("/record/error"),
            ctx()
        );
        assert_eq!(s("/record/source"), source, "{}", ctx());
        assert_eq!(s("/record/destination"), dest, "{}", ctx());
        assert!(
            m.get("slurm_error").is_none_or(Value::is_null),
            "the migration succeeded but Slurm was not updated: {}\n{}",
            m.get("slurm_error").unwrap_or(&Value::Null),
            ctx()
        );
        assert_eq!(
            m.get("slurm_synced").and_then(Value::as_bool),
            Some(true),
            "Slurm not synced\n{}",
            ctx()
        );
        self.figure(&format!(
            "migration {} {}: {source} -> {dest}, mode {}, downtime {} ms, {} bytes",
            s("/record/id"),
            s("/record/state"),
            s("/record/mode"),
            m.pointer("/record/stats/downtime_ms")
                .unwrap_or(&Value::Null),
            m.pointer("/record/stats/bytes_sent")
                .unwrap_or(&Value::Null)
        ));
    }

    /// Why the controller kept the source in the job's allocation after migration ID
    /// (`slurm_kept_source` of `rebalctl --json show migrations ID`).
    fn kept_source(&self, id: &str) -> Option<String> {
        let list = self.rebalctl(&["show", "migrations", id]).ok()?;
        list.as_array()?
            .first()?
            .get("slurm_kept_source")?
            .as_str()
            .map(str::to_owned)
    }

    /// Runs a Slurm client in the work dir with its output in LOG; killed at the end of the test.
    fn spawn(&mut self, name: &str, program: &str, args: &[&str]) {
        self.spawn_with_stdin(name, program, args, Stdio::null());
    }

    /// [`Self::spawn`] with `stdin` as the program's stdin (a pipe stays open while it runs).
    fn spawn_with_stdin(&mut self, name: &str, program: &str, args: &[&str], stdin: Stdio) {
        let log = self.path(&format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let mut cmd = self.cluster().command(program);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.args(args)
            .current_dir(&self.work)
            .stdin(stdin)
            .stdout(f.try_clone().expect("log file"))
            .stderr(f);
        self.log(&format!("$ {program} {} &", args.join(" ")));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        self.procs.push(Spawned {
            name: name.to_owned(),
            child,
            log,
        });
    }

    fn proc_mut(&mut self, name: &str) -> &mut Spawned {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// From now on the user's commands (`salloc`, `spawn`) run as `nobody`, who owns the
    /// work dir: the path a real user's job takes (restore steps as the job's user, sattach).
    fn as_nobody(&mut self) {
        let (uid, gid) = (65534, 65534);
        std::os::unix::fs::chown(&self.work, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", self.work.display()));
        self.user = Some((uid, gid));
        self.log("the user's commands run as nobody");
    }

    /// `salloc --no-shell`, as the test's user once [`E2e::as_nobody`] was called.
    fn salloc(&mut self, args: &[&str]) -> JobId {
        let granted = match self.user {
            None => self.cluster().salloc_no_shell(args),
            Some((uid, gid)) => {
                let mut cmd = self.cluster().command("salloc");
                cmd.arg("--no-shell")
                    .args(args)
                    .current_dir(&self.work)
                    .uid(uid)
                    .gid(gid);
                slurm_tests::run_command(cmd)
                    .and_then(slurm_tests::Run::ok)
                    .and_then(slurm_tests::granted_job)
            }
        };
        let job = granted.unwrap_or_else(|e| panic!("salloc --no-shell {args:?}: {e}"));
        self.jobs.push(job);
        let who = self
            .user
            .map_or(String::new(), |(uid, _)| format!(" (uid {uid})"));
        self.log(&format!(
            "$ salloc --no-shell {}{who} -> job {job}",
            args.join(" ")
        ));
        job
    }

    fn sbatch(&mut self, args: &[&str]) -> JobId {
        let job = self
            .cluster()
            .sbatch(args)
            .unwrap_or_else(|e| panic!("sbatch {args:?}: {e}"));
        self.jobs.push(job);
        self.log(&format!("$ sbatch {} -> job {job}", args.join(" ")));
        job
    }

    fn client_status(&self, status: &str) -> Option<ClientStatus> {
        client_status(&self.path(status))
    }

    /// Starts a client job's srun (JOB, one CPU per client or the whole node) towards ADDR and
    /// waits until it has 200 answers.
    fn start_client(&mut self, job: JobId, cpus: &str, name: &str, addr: &str) {
        let status = format!("{name}.json");
        let status_path = self.path(&status).display().to_string();
        let port = PORT.to_string();
        self.spawn(
            name,
            "srun",
            &[
                &format!("--jobid={job}"),
                "--overlap",
                "-N1",
                "-n1",
                "-c",
                cpus,
                "/usr/bin/python3",
                "-u",
                "client.py",
                addr,
                &port,
                &status_path,
            ],
        );
        let path = self.path(&status);
        let procs = &mut self.procs;
        let r = slurm_tests::wait_until(&format!("{name} to get 200 answers"), STARTUP, || {
            if let Ok(Some(st)) = procs.last_mut().map_or(Ok(None), |p| p.child.try_wait()) {
                return Ok(Poll::Pending(format!("the client's srun exited ({st})")));
            }
            Ok(match client_status(&path) {
                Some(s) if s.answers() >= 200 => Poll::Done(()),
                s => Poll::Pending(format!("{s:?}")),
            })
        });
        r.unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
    }

    /// The client kept its one connection without an error, and keeps getting answers now.
    fn assert_client_undisturbed(&self, name: &str) {
        let status = format!("{name}.json");
        let before = self
            .client_status(&status)
            .unwrap_or_else(|| panic!("{name} wrote no status\n{}", self.context()));
        let r = slurm_tests::wait_until(
            &format!("{name} to get 100 more answers after the move"),
            Duration::from_secs(30),
            || {
                Ok(match self.client_status(&status) {
                    Some(s) if s.answers() >= before.answers() + 100 => Poll::Done(s),
                    s => Poll::Pending(format!("{s:?}")),
                })
            },
        );
        let after = r.unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
        let ctx = || format!("{}: {}\n{}", name, after.raw, self.context());
        assert_eq!(after.errors(), 0, "the client saw errors\n{}", ctx());
        assert_eq!(after.connections(), 1, "the client reconnected\n{}", ctx());
        assert!(
            after.last_answer() > before.last_answer(),
            "the server's counter did not go on\n{}",
            ctx()
        );
        self.figure(&format!(
            "{name}: {} answers, 0 errors, 1 connection, largest gap {:.0} ms",
            after.answers(),
            after
                .raw
                .get("max_gap_ms")
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
        ));
    }

    /// Makes the client send `quit`; returns the server's "bye N" answer.
    fn quit_client(&mut self, name: &str) -> String {
        let status = format!("{name}.json");
        self.write(&format!("{status}.quit"), "");
        let r = slurm_tests::wait_until(
            &format!("{name} to send quit and get the server's answer"),
            Duration::from_secs(30),
            || {
                Ok(match self.client_status(&status) {
                    Some(s) if s.done() => Poll::Done(s),
                    s => Poll::Pending(format!("{s:?}")),
                })
            },
        );
        let s = r.unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
        let bye = s.bye().unwrap_or_default().to_owned();
        assert!(
            bye.starts_with("bye "),
            "the server answered {bye:?} to quit\n{}",
            self.context()
        );
        assert_eq!(s.errors(), 0, "{name}: {}\n{}", s.raw, self.context());
        if let Some(p) = self.procs.iter_mut().find(|p| p.name == name) {
            let _ = wait_exit(&mut p.child, Duration::from_secs(10));
        }
        bye
    }

    /// Waits for the srun NAME to exit; returns its exit code.
    fn wait_srun_exit(&mut self, name: &str, timeout: Duration) -> i32 {
        let p = self.proc_mut(name);
        let st = wait_exit(&mut p.child, timeout);
        let log = p.log.clone();
        match st {
            Some(st) => match st.code() {
                Some(c) => c,
                None => panic!(
                    "{name} ended by {st}\n{}\n{}",
                    tail(&log, 30),
                    self.context()
                ),
            },
            None => panic!(
                "{name} still runs {timeout:?} after the server quit\n{}\n{}",
                tail(&log, 30),
                self.context()
            ),
        }
    }

    fn drain(&self, node: &str, reason: &str) {
        self.cluster()
            .scontrol(&[
                "update",
                &format!("nodename={node}"),
                "state=drain",
                &format!("reason={reason}"),
            ])
            .unwrap_or_else(|e| panic!("drain {node}: {e}"));
        self.log(&format!(
            "$ scontrol update nodename={node} state=drain reason=\"{reason}\""
        ));
    }

    /// Waits until sacct has step STEP (`J.k`) with a row passing CHECK; returns it.
    fn wait_sacct_step(
        &self,
        job: JobId,
        step: &str,
        what: &str,
        check: impl Fn(&slurm_tests::SacctRow) -> bool,
    ) -> slurm_tests::SacctRow {
        let r = slurm_tests::wait_until(
            &format!("sacct to show step {step} {what}"),
            ACCOUNTING,
            || {
                let rows = self.cluster().sacct(job)?;
                Ok(
                    match rows.iter().rev().find(|r| r.job_id == step && check(r)) {
                        Some(r) => Poll::Done(r.clone()),
                        None => Poll::Pending(format!("{rows:?}")),
                    },
                )
            },
        );
        r.unwrap_or_else(|e| panic!("{e}\n{}", self.context()))
    }

    fn squeue_nodes(&self, job: JobId) -> String {
        self.cluster()
            .run_ok("squeue", ["-h", "-j", &job.to_string(), "-o", "%N"])
            .unwrap_or_else(|e| panic!("squeue: {e}"))
            .trim()
            .to_owned()
    }

    /// Slurm's and the rebalancer's view, for failure messages.
    fn context(&self) -> String {
        let mut out = String::new();
        if let Some(c) = &self.cluster {
            for (prog, args) in [
                ("squeue", vec!["-o", "%i %j %T %N"]),
                ("squeue", vec!["-s", "-o", "%i %j %N"]),
                ("sinfo", vec!["-N", "-o", "%N %T %C %E"]),
            ] {
                let r = c.run(prog, &args);
                out.push_str(&format!(
                    "$ {prog} {}\n{}\n",
                    args.join(" "),
                    r.map(|r| format!("{}{}", r.stdout, r.stderr))
                        .unwrap_or_else(|e| e.to_string())
                        .trim_end()
                ));
            }
        }
        for what in ["containers", "migrations"] {
            out.push_str(&format!(
                "$ rebalctl --json show {what}\n{}\n",
                self.rebalctl(&["show", what])
                    .map(|v| v.to_string())
                    .unwrap_or_else(|e| e)
            ));
        }
        out
    }

    /// Last lines of every log of this test (agents, controller, sruns, outputs, restore steps).
    fn dump_logs(&self) {
        let mut files: Vec<PathBuf> = Vec::new();
        let mut add_dir = |d: &Path, exts: &[&str]| {
            if let Ok(rd) = std::fs::read_dir(d) {
                let mut v: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| exts.contains(&e))
                    })
                    .collect();
                v.sort();
                files.extend(v);
            }
        };
        add_dir(&self.work, &["log", "out", "txt", "json"]);
        add_dir(&self.work.join("agents"), &["log"]);
        let nodes = self.cluster.as_ref().map(Cluster::node_names).unwrap_or_default();
        for node in &nodes {
            let Some(c) = &self.cluster else { break };
            let images = c.host_path(node, Path::new("/run/rebalancer/images"));
            if let Ok(rd) = std::fs::read_dir(&images) {
                for e in rd.flatten() {
                    add_dir(&e.path(), &["log"]);
                }
            }
        }
        for f in files {
            eprintln!("----- {} (tail) -----\n{}", f.display(), tail(&f, 40));
        }
    }
}

/// Removes the container network namespaces the agents made (`rb-nodeN-...`), killing what is
/// left in them. Only called while this test holds the machine's cluster lock.
fn remove_container_netns() {
    let Ok(rd) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.strip_prefix("rb-node").is_some_and(|r| {
            r.split('-')
                .next()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        });
        if ours {
            sh(&format!(
                "ip netns pids {name} | xargs -r kill -9; ip netns delete {name}"
            ));
        }
    }
}

impl Drop for E2e {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("===== {}: failed; logs follow =====", self.name);
            self.dump_logs();
            eprintln!("{}", self.context());
        }
        if let Some(c) = &self.cluster {
            for job in &self.jobs {
                let _ = c.run("scancel", [job.to_string()]);
            }
        }
        for p in &mut self.procs {
            stop_child(&mut p.child);
        }
        if let Some(c) = &mut self.controller {
            stop_child(c);
        }
        for (_, a) in &mut self.agents {
            stop_child(a);
        }
        if self.cluster.is_some() {
            remove_container_netns();
        }
        // The agents' tmpfs mounts (images) under the work dir, deepest first.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let prefix = format!("{}/", self.work.display());
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        ours.sort_unstable_by(|a, b| b.cmp(a));
        for m in ours {
            sh(&format!("umount -l '{m}'"));
        }
        // Cluster::drop takes the cluster down (and prints its daemons' logs on a panic).
        drop(self.cluster.take());
        if let Err(e) = std::fs::remove_dir_all(&self.work) {
            eprintln!("cannot remove {}: {e}", self.work.display());
        }
        self.log("cleaned up");
    }
}

/// Checks the server output file NAME once the server ended; returns the "bye" count.
fn assert_whole_output(e: &E2e, name: &str, bye_answer: &str) {
    let text = e.read(name);
    match check_server_output(&text) {
        Ok((served, bye, foreign)) => {
            assert_eq!(
                format!("bye {bye}"),
                bye_answer,
                "{name} and the client disagree on the last count"
            );
            if !foreign.is_empty() {
                e.log(&format!("{name}: lines not from the server: {foreign:?}"));
            }
            e.log(&format!(
                "{name}: whole output, served 100..{served}, bye {bye}"
            ));
        }
        Err(why) => panic!(
            "{name} does not hold the server's whole output: {why}\n----- {name} -----\n{text}\n{}",
            e.context()
        ),
    }
}


impl E2e {
    /// The test server as a migratable one-task step of a new allocation NAME on node1 (its
    /// stdout in `server.out`): returns the job and the server's container, as the controller
    /// lists it, once the server listens.
    fn start_server(&mut self, name: &str) -> (JobId, Value) {
        let work = self.work.display().to_string();
        let job = self.salloc(&["-N1", "-n1", "-w", "node1", "-J", name]);
        let mem = SERVER_MIB.to_string();
        let port = PORT.to_string();
        self.spawn(
            "server-srun",
            "srun",
            &[
                &format!("--jobid={job}"),
                "-w",
                "node1",
                "-N1",
                "-n1",
                "--migratable",
                &format!("--output={work}/server.out"),
                "/usr/bin/python3",
                "-u",
                "server.py",
                &mem,
                &port,
            ],
        );
        let c = self.wait_container(job, 0, "node1", STARTUP);
        self.wait_output("server.out", "listening", "the server to listen", STARTUP);
        (job, c)
    }
}
