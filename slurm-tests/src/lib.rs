//! Harness helpers for tests on a real Slurm cluster.
//!
//! [`Cluster::up`] runs `cluster.sh up` with a fresh state dir and takes the cluster down again when
//! the guard is dropped. The cluster's bridge, node namespaces and ports are global to the machine, so
//! a guard also holds an exclusive lock (`/run/slurm-rbc.lock`): tests that each bring up a cluster run
//! one after another, whatever thread or process they are in.
//!
//! The helpers run the ordinary Slurm commands with `SLURM_CONF` pointing at the cluster, and every
//! wait is bounded.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Machine-wide lock serialising clusters (they share the bridge, namespaces and ports).
pub const LOCK_PATH: &str = "/run/slurm-rbc.lock";

/// The cluster's admin host (slurmctld, slurmdbd, MariaDB; the rebalancer controller goes there).
pub const ADMIN_HOST: &str = "admin";

/// Where a node's agent listens for its SPANK plugin, on that node (in its private /run).
pub const AGENT_SOCKET: &str = "/run/rebalancer/agent.sock";

/// A host's private directories (its own disk, like a machine's) and the name of their backing
/// directory under `STATE_DIR/host/HOST/`; the same list as cluster.sh's `PRIVATE_DIRS`.
const PRIVATE_DIRS: [(&str, &str); 4] = [
    ("/run", "run"),
    ("/tmp", "tmp"),
    ("/var/spool/slurmd", "spool"),
    ("/var/lib/rebalancer", "state"),
];

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("timed out after {waited:?} waiting for {what} (last seen: {last})")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    #[error("unexpected output of `{command}`: {output:?}")]
    Parse { command: String, output: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A Slurm job id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u32);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Output of a command that ran, successful or not.
#[derive(Debug, Clone)]
pub struct Run {
    pub command: String,
    pub success: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The output if the command succeeded, else an [`Error::Command`].
    pub fn ok(self) -> Result<Run> {
        if self.success {
            Ok(self)
        } else {
            Err(Error::Command {
                command: self.command,
                status: self.status,
                stderr: self.stderr.trim().to_owned(),
            })
        }
    }
}

/// One row of `sacct --parsable2 -o JobID,JobName,State,ExitCode,NodeList`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SacctRow {
    pub job_id: String,
    pub job_name: String,
    pub state: String,
    pub exit_code: String,
    pub node_list: String,
}

impl SacctRow {
    /// The state without its qualifier: `CANCELLED by 0` is `CANCELLED`.
    pub fn state_word(&self) -> &str {
        self.state.split_whitespace().next().unwrap_or_default()
    }
}

/// Options for [`Cluster::up_with`].
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    /// A plugstack.conf fragment the cluster's plugstack.conf includes.
    pub plugstack: Option<PathBuf>,
    /// Longest wait for another cluster (guard or not) to go down.
    pub lock_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            plugstack: None,
            lock_timeout: Duration::from_secs(600),
        }
    }
}

/// Path of `cluster.sh` (next to this crate's manifest).
pub fn cluster_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster.sh")
}

/// A running cluster; taken down (processes, namespaces, bridge, state dir) on drop.
pub struct Cluster {
    state_dir: PathBuf,
    nodes: usize,
    _lock: MachineLock,
}

impl Cluster {
    /// Brings up a cluster of `nodes` nodes (node1..nodeN) with a unique state dir.
    pub fn up(nodes: usize) -> Result<Cluster> {
        Self::up_with(Options {
            nodes,
            ..Options::default()
        })
    }

    pub fn up_with(options: Options) -> Result<Cluster> {
        let lock = MachineLock::acquire(options.lock_timeout)?;
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let state_dir = std::env::temp_dir().join(format!(
            "slurm-rbc-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let up = || {
            let mut cmd = Command::new(cluster_script());
            cmd.arg("up")
                .arg("--nodes")
                .arg(options.nodes.to_string())
                .arg("--state-dir")
                .arg(&state_dir);
            if let Some(p) = &options.plugstack {
                cmd.arg("--plugstack").arg(p);
            }
            run_command(cmd)
        };
        // From here on the guard exists, so a failed `up` is cleaned up by Drop.
        let cluster = Cluster {
            state_dir: state_dir.clone(),
            nodes: options.nodes,
            _lock: lock,
        };
        // A cluster brought up outside these guards (by hand, a demo) holds the machine's network:
        // wait for it to go down rather than fail at once.
        let started = Instant::now();
        loop {
            let run = up()?;
            if run.success {
                return Ok(cluster);
            }
            let busy = run.stderr.contains("a cluster is already up at");
            if !busy || started.elapsed() >= options.lock_timeout {
                run.ok()?;
            }
            thread::sleep(Duration::from_secs(2));
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A directory every host sees at the same path (inside the state dir, which cluster.sh
    /// re-exposes on every host), for jobs' working directories and output files.
    pub fn shared_dir(&self) -> Result<PathBuf> {
        let d = self.state_dir.join("shared");
        std::fs::create_dir_all(&d).map_err(|source| Error::Io {
            what: format!("create {}", d.display()),
            source,
        })?;
        Ok(d)
    }

    pub fn slurm_conf(&self) -> PathBuf {
        self.state_dir.join("slurm.conf")
    }

    /// node1..nodeN.
    pub fn node_names(&self) -> Vec<String> {
        (1..=self.nodes).map(|k| format!("node{k}")).collect()
    }

    /// Path of a daemon's log: `slurmctld`, `slurmdbd`, `slurmd-node1`, `munged`, `mariadbd`.
    pub fn log_path(&self, daemon: &str) -> PathBuf {
        self.state_dir.join("log").join(format!("{daemon}.log"))
    }

    /// A command for a Slurm client with this cluster's `SLURM_CONF`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", self.slurm_conf())
            // Keep a caller's job environment (tests started inside a job) from leaking in.
            .env_remove("SLURM_JOB_ID")
            .env_remove("SLURM_JOBID");
        cmd
    }

    /// Runs a Slurm client to completion; a non-zero exit is returned, not an error.
    pub fn run<I, S>(&self, program: &str, args: I) -> Result<Run>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_command(cmd)
    }

    /// Runs a Slurm client and fails on a non-zero exit; returns stdout.
    pub fn run_ok<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(self.run(program, args)?.ok()?.stdout)
    }

    /// `sbatch --parsable ARGS`; returns the job id. Without `-D`/`--chdir` in ARGS the job
    /// runs in [`Cluster::shared_dir`]: the submitting process's directory may be private to
    /// this machine (a checkout under /tmp), and a batch host cannot open its output there.
    pub fn sbatch(&self, args: &[&str]) -> Result<JobId> {
        let has_chdir = args.iter().any(|a| {
            *a == "-D" || a.starts_with("--chdir") || (a.starts_with("-D") && a.len() > 2)
        });
        let chdir = format!("--chdir={}", self.shared_dir()?.display());
        let mut all = vec!["--parsable"];
        if !has_chdir {
            all.push(&chdir);
        }
        all.extend_from_slice(args);
        let out = self.run_ok("sbatch", all)?;
        parse_job_id("sbatch", out.trim().split(';').next().unwrap_or_default())
    }

    /// The hosts: [`ADMIN_HOST`], then node1..nodeN.
    pub fn host_names(&self) -> Vec<String> {
        let mut v = vec![ADMIN_HOST.to_owned()];
        v.extend(self.node_names());
        v
    }

    /// A command that runs PROGRAM on HOST (its network, mount and UTS namespaces, as
    /// `cluster.sh exec` does), in directory WD there, with this cluster's `SLURM_CONF`.
    /// nsenter execs PROGRAM, so the child's pid is PROGRAM's. Descriptors other than stdio are
    /// closed in the child: a daemon must not hold a lock file or pipe of the test run.
    pub fn host_command(&self, host: &str, wd: &Path, program: impl AsRef<OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let netns = if host == ADMIN_HOST {
            "rbc-admin".to_owned()
        } else {
            host.to_owned()
        };
        let ns = self.state_dir.join("ns");
        let mut cmd = self.command("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg(format!(
                "--mount={}",
                ns.join(format!("{host}.mnt")).display()
            ))
            .arg(format!(
                "--uts={}",
                ns.join(format!("{host}.uts")).display()
            ))
            .arg(format!("--wd={}", wd.display()))
            .arg("--")
            .arg(program);
        // SAFETY: close_range(2) is async-signal-safe and touches no memory of the parent; it
        // runs in the forked child before exec.
        unsafe {
            cmd.pre_exec(|| {
                // Without close_range (kernels before 5.9) the descriptors stay: not fatal.
                let _ = libc::close_range(3, libc::c_uint::MAX, 0);
                Ok(())
            });
        }
        cmd
    }

    /// Where the test (on the login host) finds PATH of HOST: a path in one of the host's
    /// private directories maps to its backing directory under the state dir; any other path is
    /// shared by every host and is itself.
    pub fn host_path(&self, host: &str, path: &Path) -> PathBuf {
        backing_path(&self.state_dir, host, path)
    }

    /// The `[agents]` lines that tell a controller on the admin host how to reach each node's
    /// agent (written by cluster.sh): the agents' TCP control ports, munge-authenticated.
    pub fn controller_agents_toml(&self) -> Result<String> {
        let p = self.state_dir.join("controller-agents.toml");
        std::fs::read_to_string(&p).map_err(|source| Error::Io {
            what: format!("could not read {}", p.display()),
            source,
        })
    }

    /// The container-address lines every agent's config starts with (written by cluster.sh):
    /// `container_subnet` and `ipam = "leased"`, addresses from the blocks the controller leases.
    pub fn agent_ipam_toml(&self) -> Result<String> {
        self.state_file("agent-ipam.toml")
    }

    /// The controller's `[ipam]` section (written by cluster.sh): the subnet and block size it
    /// leases the agents.
    pub fn controller_ipam_toml(&self) -> Result<String> {
        self.state_file("controller-ipam.toml")
    }

    fn state_file(&self, name: &str) -> Result<String> {
        let p = self.state_dir.join(name);
        std::fs::read_to_string(&p).map_err(|source| Error::Io {
            what: format!("could not read {}", p.display()),
            source,
        })
    }

    /// The `[control]` section of NODE's agent config (written by cluster.sh): the TCP control
    /// listener through which the controller on the admin host reaches that agent.
    pub fn agent_control_toml(&self, node: &str) -> Result<String> {
        let p = self
            .state_dir
            .join("agent-control")
            .join(format!("{node}.toml"));
        std::fs::read_to_string(&p).map_err(|source| Error::Io {
            what: format!("could not read {}", p.display()),
            source,
        })
    }

    /// `salloc --no-shell ARGS`; returns the job id of the granted allocation.
    pub fn salloc_no_shell(&self, args: &[&str]) -> Result<JobId> {
        granted_job(self.run("salloc", [&["--no-shell"], args].concat())?.ok()?)
    }

    /// `scontrol ARGS`, failing on a non-zero exit.
    pub fn scontrol(&self, args: &[&str]) -> Result<String> {
        self.run_ok("scontrol", args)
    }

    /// `scontrol show job -o J` as key/value pairs; `None` once Slurm has forgotten the job.
    pub fn job(&self, job: JobId) -> Result<Option<HashMap<String, String>>> {
        let run = self.run("scontrol", ["show", "job", "-o", &job.to_string()])?;
        if !run.success {
            if run.stderr.contains("Invalid job id") {
                return Ok(None);
            }
            run.ok()?;
            return Ok(None);
        }
        Ok(Some(parse_key_values(&run.stdout)))
    }

    /// A field of `scontrol show job` (e.g. `JobState`, `NodeList`, `NumNodes`).
    pub fn job_field(&self, job: JobId, field: &str) -> Result<String> {
        let fields = self.job(job)?.ok_or_else(|| Error::Parse {
            command: format!("scontrol show job {job}"),
            output: "job not found".into(),
        })?;
        fields.get(field).cloned().ok_or_else(|| Error::Parse {
            command: format!("scontrol show job {job}"),
            output: format!("no field {field}"),
        })
    }

    pub fn job_state(&self, job: JobId) -> Result<String> {
        self.job_field(job, "JobState")
    }

    pub fn job_nodes(&self, job: JobId) -> Result<String> {
        self.job_field(job, "NodeList")
    }

    /// Running steps of a job as (step id, node list), from `squeue -s`.
    pub fn steps(&self, job: JobId) -> Result<Vec<(String, String)>> {
        let out = self.run_ok(
            "squeue",
            ["-h", "-s", "-j", &job.to_string(), "-o", "%i %N"],
        )?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (id, nodes) = l.trim().split_once(' ')?;
                Some((id.to_owned(), nodes.trim().to_owned()))
            })
            .collect())
    }

    /// A node's state in sinfo's long form (`idle`, `allocated`, `mixed`, `draining`, `drained`...).
    pub fn node_state(&self, node: &str) -> Result<String> {
        let out = self.run_ok("sinfo", ["-h", "-N", "-n", node, "-o", "%T"])?;
        let state = out.lines().next().unwrap_or_default().trim().to_owned();
        if state.is_empty() {
            return Err(Error::Parse {
                command: format!("sinfo -n {node}"),
                output: out,
            });
        }
        Ok(state)
    }

    /// Waits until the job's state is one of `states`; returns that state.
    pub fn wait_job_state(&self, job: JobId, states: &[&str], timeout: Duration) -> Result<String> {
        wait_until(&format!("job {job} to be {states:?}"), timeout, || {
            let state = self.job_state(job)?;
            Ok(if states.contains(&state.as_str()) {
                Poll::Done(state)
            } else {
                Poll::Pending(state)
            })
        })
    }

    /// Waits until the node's state is exactly `state` (sinfo long form).
    pub fn wait_node_state(&self, node: &str, state: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("node {node} to be {state}"), timeout, || {
            let seen = self.node_state(node)?;
            Ok(if seen == state {
                Poll::Done(())
            } else {
                Poll::Pending(seen)
            })
        })
    }

    /// `sacct -j J` rows (job and steps, all clusters' users).
    pub fn sacct(&self, job: JobId) -> Result<Vec<SacctRow>> {
        let out = self.run_ok(
            "sacct",
            [
                "-j",
                &job.to_string(),
                "--parsable2",
                "--noheader",
                "-o",
                "JobID,JobName,State,ExitCode,NodeList",
            ],
        )?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                match f.as_slice() {
                    [id, name, state, exit, nodes] => Ok(SacctRow {
                        job_id: (*id).to_owned(),
                        job_name: (*name).to_owned(),
                        state: (*state).to_owned(),
                        exit_code: (*exit).to_owned(),
                        node_list: (*nodes).to_owned(),
                    }),
                    _ => Err(Error::Parse {
                        command: "sacct".into(),
                        output: l.to_owned(),
                    }),
                }
            })
            .collect()
    }

    /// Waits until sacct has a job-level row (`JobID` == J) in one of `states` (compared without
    /// qualifiers such as `by 0`). A resized job has one job-level row per size it had.
    pub fn wait_sacct_state(
        &self,
        job: JobId,
        states: &[&str],
        timeout: Duration,
    ) -> Result<SacctRow> {
        let id = job.to_string();
        wait_until(
            &format!("sacct to show job {job} in {states:?}"),
            timeout,
            || {
                let rows = self.sacct(job)?;
                Ok(
                    match rows
                        .iter()
                        .rev()
                        .find(|r| r.job_id == id && states.contains(&r.state_word()))
                    {
                        Some(r) => Poll::Done(r.clone()),
                        None => Poll::Pending(format!("{rows:?}")),
                    },
                )
            },
        )
    }

    /// Last `lines` lines of a daemon's log (for failure messages).
    pub fn log_tail(&self, daemon: &str, lines: usize) -> String {
        match std::fs::read_to_string(self.log_path(daemon)) {
            Ok(s) => {
                let all: Vec<&str> = s.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("({}: {e})", self.log_path(daemon).display()),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            let mut daemons = vec!["slurmctld".to_owned(), "slurmdbd".to_owned()];
            daemons.extend(self.node_names().into_iter().map(|n| format!("slurmd-{n}")));
            for d in daemons {
                eprintln!("----- {d} log (tail) -----\n{}", self.log_tail(&d, 20));
            }
        }
        let result = Command::new(cluster_script())
            .arg("down")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdin(Stdio::null())
            .output();
        match result {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cluster.sh down failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cluster.sh down could not run: {e}"),
        }
    }
}

/// One poll of [`wait_until`].
#[derive(Debug)]
pub enum Poll<T> {
    Done(T),
    /// Not yet; the text (what was seen) ends up in the timeout error.
    Pending(String),
}

/// Polls `f` every 100 ms until it is [`Poll::Done`], for at most `timeout`. Errors from `f` are
/// retried too (a daemon may be briefly unreachable) and the last one is reported on timeout.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Poll<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let last = match f() {
            Ok(Poll::Done(v)) => return Ok(v),
            Ok(Poll::Pending(seen)) => seen,
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited: timeout,
                last,
            });
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command to completion with stdin closed.
pub fn run_command(mut cmd: Command) -> Result<Run> {
    let command = describe(&cmd);
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Io {
            what: format!("could not run `{command}`"),
            source,
        })?;
    Ok(Run {
        command,
        success: status.success(),
        status: status.to_string(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The job a successful `salloc` run granted (salloc reports on stderr: "salloc: Granted job
/// allocation 12").
pub fn granted_job(run: Run) -> Result<JobId> {
    let id = run
        .stderr
        .lines()
        .find_map(|l| l.split("Granted job allocation ").nth(1))
        .ok_or_else(|| Error::Parse {
            command: run.command.clone(),
            output: run.stderr.clone(),
        })?;
    parse_job_id("salloc", id.trim())
}

fn parse_job_id(command: &str, s: &str) -> Result<JobId> {
    s.parse().map(JobId).map_err(|_| Error::Parse {
        command: command.to_owned(),
        output: s.to_owned(),
    })
}

/// Parses `scontrol show -o` output: space-separated `Key=Value` pairs.
///
/// Values never contain spaces in the fields the tests read; a token without `=` is appended to the
/// previous value (e.g. `Command=` lines with arguments).
pub fn parse_key_values(s: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let mut last: Option<String> = None;
    for tok in s.split_whitespace() {
        match tok.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                map.insert(k.to_owned(), v.to_owned());
                last = Some(k.to_owned());
            }
            _ => {
                if let Some(v) = last.as_ref().and_then(|k| map.get_mut(k)) {
                    v.push(' ');
                    v.push_str(tok);
                }
            }
        }
    }
    map
}

/// [`Cluster::host_path`] of the cluster in STATE_DIR.
fn backing_path(state_dir: &Path, host: &str, path: &Path) -> PathBuf {
    for (dir, key) in PRIVATE_DIRS {
        if let Ok(rest) = path.strip_prefix(dir) {
            return state_dir.join("host").join(host).join(key).join(rest);
        }
    }
    path.to_owned()
}

/// An exclusive `flock` on [`LOCK_PATH`], released when the file closes.
struct MachineLock {
    _file: File,
}

impl MachineLock {
    fn acquire(timeout: Duration) -> Result<MachineLock> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .map_err(|source| Error::Io {
                what: format!("could not open {LOCK_PATH}"),
                source,
            })?;
        wait_until("the machine-wide cluster lock", timeout, || {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(Poll::Done(()));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                Ok(Poll::Pending("held by another cluster guard".into()))
            } else {
                Err(Error::Io {
                    what: format!("could not lock {LOCK_PATH}"),
                    source: err,
                })
            }
        })?;
        Ok(MachineLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_private_paths_map_to_its_backing_dirs_and_shared_ones_to_themselves() {
        let s = Path::new("/tmp/c");
        let p = |h: &str, x: &str| backing_path(s, h, Path::new(x));
        assert_eq!(
            p("node2", AGENT_SOCKET),
            Path::new("/tmp/c/host/node2/run/rebalancer/agent.sock")
        );
        assert_eq!(p("admin", "/tmp"), Path::new("/tmp/c/host/admin/tmp"));
        assert_eq!(
            p("node1", "/var/spool/slurmd/job00007/slurm_script"),
            Path::new("/tmp/c/host/node1/spool/job00007/slurm_script")
        );
        // A prefix of a name is not the directory: /running is shared.
        assert_eq!(p("node1", "/running/x"), Path::new("/running/x"));
        assert_eq!(p("node1", "/var/tmp/w"), Path::new("/var/tmp/w"));
    }

    #[test]
    fn key_values_of_scontrol_one_liner() {
        let m = parse_key_values(
            "JobId=4 JobName=mover JobState=RUNNING Reason=None NodeList=node[1-2] NumNodes=2 Command=/bin/sleep 100",
        );
        assert_eq!(m["JobId"], "4");
        assert_eq!(m["JobState"], "RUNNING");
        assert_eq!(m["NodeList"], "node[1-2]");
        assert_eq!(m["Command"], "/bin/sleep 100");
    }

    #[test]
    fn run_error_carries_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom >&2; exit 3"]);
        let run = run_command(cmd).expect("sh runs");
        let err = run.ok().expect_err("exit 3 is a failure");
        let msg = err.to_string();
        assert!(msg.contains("boom") && msg.contains('3'), "{msg}");
    }

    #[test]
    fn wait_until_times_out_with_last_error() {
        let err = wait_until::<()>("never", Duration::from_millis(150), || {
            Err(Error::Parse {
                command: "x".into(),
                output: "y".into(),
            })
        })
        .expect_err("never succeeds");
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("unexpected output"), "{err}");
    }
}
