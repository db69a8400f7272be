//! Container runtime: namespaces, root file system, stdio, process tree.
//!
//! Lifecycle: `Starting` → `Running` → (`Migrating` → `Running` | `MigratedAway`) → `Exited`.
//! Pid 1 of each container is a child of the agent (child subreaper), also after a CRIU restore
//! with `--restore-detached`, so the agent reaps it (`reap`).

pub mod init;

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use rebalancer_proto::{ContainerSpec, ContainerState, Millis, RootfsSpec};
use serde::{Deserialize, Serialize};

use crate::error::AgentError;
use crate::netns::ContainerNet;
pub use init::{InitSpec, MountPlan};

/// What the destination needs to rebuild a container's surroundings before `criu restore`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerMeta {
    pub spec: ContainerSpec,
    pub address: Ipv4Addr,
    pub mounts: Vec<MountPlan>,
    pub symlinks: Vec<(String, String)>,
    /// CRIU identities of the stdio descriptors of pid 1 (`pipe:[INO]`, or `file[MNT:INO]` for
    /// files opened outside the container, dumped as external), for `--inherit-fd`.
    pub stdio_keys: Vec<String>,
    /// Paths of those that are files (empty for pipes and sockets).
    #[serde(default)]
    pub stdio_paths: Vec<String>,
    pub started_at: Millis,
}

#[derive(Debug)]
pub struct Container {
    pub meta: ContainerMeta,
    pub net: ContainerNet,
    pub root: PathBuf,
    /// Host directory holding the root skeleton and logs (removed when the container goes).
    pub dir: PathBuf,
    pub pid: i32,
    pub state: ContainerState,
    pub exit_status: Option<i32>,
    /// Pid 1 belongs to a Slurm task's waiter (SPANK path), not to the agent: the waiter reaps
    /// it and reports with `task-exited`.
    pub external: bool,
    /// Node the container moved to (state `MigratedAway`).
    pub migrated_to: Option<String>,
    /// Where it came from by migration: (node, agent address), told the final status.
    pub arrived_from: Option<(String, String)>,
    /// Final status of a task and the node it ended on, once known (also from downstream).
    pub final_status: Option<(i32, String)>,
    /// The cgroup carrying the container's limits (agent-run containers; Slurm tasks live in
    /// Slurm's cgroups).
    pub cgroup: Option<crate::cgroup::Cgroup>,
    /// The Slurm task the container runs in when not `meta.spec.task`: the restore step that
    /// took it in on this node.
    pub runs_in: Option<rebalancer_proto::TaskRef>,
    /// The task process that registered it (pid, start time): after an agent restart it may
    /// report the task's end on a new connection (`control_authz::check_task_exited`).
    pub waiter: Option<(i32, u64)>,
}

/// Mount table and root symlinks (link path, target) of a container.
pub type Layout = (Vec<MountPlan>, Vec<(String, String)>);

/// CRIU key of a bind mount (`--external mnt[TARGET]:KEY`).
pub fn mount_key(target: &str) -> String {
    let k: String = target
        .trim_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("rb-{k}")
}

/// The mount table and root symlinks for a spec. Pure: unit-tested.
///
/// `host_dirs` that are symlinks on the node (merged /usr: /bin -> usr/bin) become the same
/// symlinks in the root; `is_symlink` reports that for a path.
pub fn plan_mounts(
    spec: &ContainerSpec,
    host_dirs: &[PathBuf],
    is_symlink: &dyn Fn(&Path) -> Option<String>,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Layout, AgentError> {
    let mut mounts = Vec::new();
    let mut links = Vec::new();
    if let RootfsSpec::Host = spec.rootfs {
        for d in host_dirs {
            let target = d.to_string_lossy().to_string();
            if let Some(to) = is_symlink(d) {
                links.push((target, to));
            } else if exists(d) {
                mounts.push(MountPlan::Bind {
                    source: d.clone(),
                    target,
                    readonly: true,
                });
            }
        }
    }
    // The private /tmp goes in before the caller's binds: a bind under /tmp (a job's working
    // directory) must sit on top of it, not be hidden by it. A bind of /tmp itself replaces it.
    if !spec.binds.iter().any(|b| b.trim_end_matches('/') == "/tmp") {
        mounts.push(MountPlan::Tmpfs {
            target: "/tmp".into(),
            options: "mode=1777,size=1g".into(),
        });
    }
    for b in &spec.binds {
        let p = Path::new(b);
        if !p.is_absolute() || b.contains("..") {
            return Err(AgentError::BadRequest(format!(
                "bind mount {b:?} must be an absolute path without '..'"
            )));
        }
        if !exists(p) {
            return Err(AgentError::BadRequest(format!(
                "bind mount source {b} does not exist on this node"
            )));
        }
        mounts.push(MountPlan::Bind {
            source: p.to_path_buf(),
            target: b.clone(),
            readonly: false,
        });
    }
    mounts.push(MountPlan::Proc);
    mounts.push(MountPlan::Dev);
    Ok((mounts, links))
}

/// Makes the bind of a task's program directory read-only. The agent binds argv[0]'s directory
/// (a batch script sits in slurmd's spool) only so that slurmstepd can exec the program inside
/// the container; the task has no business writing there, and a writable bind made by root
/// would let it change what a later exec or restore of the step runs. The working directory
/// stays writable when it is the same directory (it is the user's own). Pure: unit-tested.
pub fn read_only_program_dir(
    mut mounts: Vec<MountPlan>,
    program: Option<&str>,
    cwd: &str,
) -> Vec<MountPlan> {
    let Some(dir) = program.and_then(|p| Path::new(p).parent()) else {
        return mounts;
    };
    if dir == Path::new(cwd) {
        return mounts;
    }
    for m in &mut mounts {
        if let MountPlan::Bind {
            target, readonly, ..
        } = m
        {
            if Path::new(target.as_str()) == dir {
                *readonly = true;
            }
        }
    }
    mounts
}

/// The bind mounts CRIU must treat as external: (target inside, key, host source).
pub fn external_mounts(mounts: &[MountPlan]) -> Vec<(String, String, PathBuf)> {
    mounts
        .iter()
        .filter_map(|m| match m {
            MountPlan::Bind { source, target, .. } => {
                Some((target.clone(), mount_key(target), source.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Creates the root skeleton (mountpoints, symlinks) so both `start` and `criu restore --root`
/// find every mountpoint.
pub fn prepare_root(
    root: &Path,
    mounts: &[MountPlan],
    links: &[(String, String)],
) -> Result<(), AgentError> {
    let io = |what: String| move |source| AgentError::Io { what, source };
    std::fs::create_dir_all(root).map_err(io(format!("mkdir {}", root.display())))?;
    for (link, to) in links {
        let p = root.join(link.trim_start_matches('/'));
        if std::fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink(to, &p).map_err(io(format!("symlink {}", p.display())))?;
        }
    }
    for m in mounts {
        let (target, is_dir) = match m {
            MountPlan::Bind { source, target, .. } => (target.as_str(), source.is_dir()),
            MountPlan::Tmpfs { target, .. } => (target.as_str(), true),
            MountPlan::Dev => ("/dev", true),
            MountPlan::Proc => ("/proc", true),
        };
        let p = root.join(target.trim_start_matches('/'));
        if is_dir {
            std::fs::create_dir_all(&p).map_err(io(format!("mkdir {}", p.display())))?;
        } else if !p.exists() {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io(format!("mkdir {}", parent.display())))?;
            }
            std::fs::File::create(&p).map_err(io(format!("create {}", p.display())))?;
        }
    }
    Ok(())
}

/// The CRIU identity of a descriptor as seen by this process (`pipe:[INO]`, a path, ...).
pub fn fd_key(fd: RawFd) -> Result<String, AgentError> {
    let p = format!("/proc/self/fd/{fd}");
    std::fs::read_link(&p)
        .map(|l| l.to_string_lossy().into_owned())
        .map_err(|source| AgentError::Io {
            what: format!("readlink {p}"),
            source,
        })
}

/// CRIU identities (see [`ContainerMeta::stdio_keys`]) and file paths of a process's fds 0-2.
/// A Slurm task's stdio are opened by slurmstepd outside the container's mounts (`/dev/null`, a
/// batch script's `slurm-%j.out`), which CRIU can only dump as external files.
pub fn stdio_ids(pid: i32) -> (Vec<String>, Vec<String>) {
    (0..3)
        .map(|f| {
            let fd = format!("/proc/{pid}/fd/{f}");
            let Ok(target) = std::fs::read_link(&fd).map(|l| l.to_string_lossy().into_owned())
            else {
                return (String::new(), String::new());
            };
            if !target.starts_with('/') {
                return (target, String::new());
            }
            let mnt_id = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{f}"))
                .ok()
                .and_then(|i| {
                    i.lines()
                        .find_map(|l| l.strip_prefix("mnt_id:"))
                        .and_then(|v| v.trim().parse::<u32>().ok())
                });
            let ino = std::fs::metadata(&fd).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            });
            match (mnt_id, ino) {
                (Some(m), Some(i)) => (external_file_key(m, i), target),
                _ => (target.clone(), target),
            }
        })
        .unzip()
}

/// CRIU's name for an external file (`--external file[MNT:INO]`, hexadecimal). Pure.
pub fn external_file_key(mnt_id: u32, ino: u64) -> String {
    format!("file[{mnt_id:x}:{ino:x}]")
}

/// Why the task's stdin (fd 0, as found by [`stdio_ids`]) cannot follow it to another node, if
/// it cannot. The destination reopens a stdin file by its path, as the job's user, and checks
/// it is the same inode; a path that is not absolute, or that the kernel marks " (deleted)"
/// (unlinked or replaced since the task opened it: the user controls it), names nothing the
/// task had. Pure.
pub fn stdin_refusal(keys: &[String], paths: &[String]) -> Option<String> {
    let key = keys.first()?;
    if !is_external_file_key(key) {
        return None;
    }
    let path = paths.first().map(String::as_str).unwrap_or("");
    if path.is_empty() || !path.starts_with('/') || path.ends_with(" (deleted)") {
        return Some(format!(
            "the task's stdin is a file that no longer has its name ({path:?}); it cannot be \
             reopened on another node"
        ));
    }
    None
}

/// Whether a stdio key is an [`external_file_key`]. Pure.
pub fn is_external_file_key(key: &str) -> bool {
    key.starts_with("file[")
}

/// The regular file a stdio key names (Slurm's `--output`/`--error` files, a batch job's
/// `slurm-%j.out`), or `None` for pipes, sockets, terminals and devices.
pub fn stdio_file(key: &str) -> Option<&Path> {
    let p = Path::new(key);
    (p.is_absolute() && !key.starts_with("/dev/") && !key.ends_with(" (deleted)")).then_some(p)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), AgentError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| AgentError::Io {
        what: "pipe".into(),
        source: e.into(),
    })
}

/// The container's stdio: the ends handed to the container and the keys CRIU will see.
pub struct StdioSet {
    pub child: [OwnedFd; 3],
    pub keys: Vec<String>,
}

/// Pipes for stdin (writer closed: EOF), stdout and stderr; stdout/stderr are copied to the
/// given files by relay processes ([`relay_main`]) for as long as any writer (also a restored
/// one) lives. The relays are processes of their own, not agent threads, so that an agent restart
/// or upgrade neither loses output nor leaves the container writing into a pipe without reader
/// (SIGPIPE).
pub fn stdio_pipes(stdout: &Path, stderr: &Path) -> Result<StdioSet, AgentError> {
    let (in_r, in_w) = pipe()?;
    drop(in_w);
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    relay(out_r, stdout)?;
    relay(err_r, stderr)?;
    let keys = vec![
        fd_key(in_r.as_raw_fd())?,
        fd_key(out_w.as_raw_fd())?,
        fd_key(err_w.as_raw_fd())?,
    ];
    Ok(StdioSet {
        child: [in_r, out_w, err_w],
        keys,
    })
}

/// Name of the hidden subcommand that runs [`relay_main`].
pub const RELAY_COMMAND: &str = "__stdio-relay";

fn relay(from: OwnedFd, to: &Path) -> Result<(), AgentError> {
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p).map_err(|source| AgentError::Io {
            what: format!("mkdir {}", p.display()),
            source,
        })?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(to)
        .map_err(|source| AgentError::Io {
            what: format!("open {}", to.display()),
            source,
        })?;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg(RELAY_COMMAND)
        .stdin(std::process::Stdio::from(from))
        .stdout(std::process::Stdio::from(out))
        .stderr(std::process::Stdio::null());
    let detached = crate::detach::fds_except(&[]);
    // SAFETY: setsid and write are async-signal-safe. A session of its own keeps a terminal's
    // ^C (sent to the agent's process group) away from the relay; the detached cgroups keep a
    // kill of the agent's unit away from it.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            crate::cgroup::join_self(&detached)
        });
    }
    let mut child = cmd.spawn().map_err(|source| AgentError::Io {
        what: format!("spawn stdio relay for {}", to.display()),
        source,
    })?;
    // Reaped by a thread while this agent lives; after a restart the relay's new parent
    // (systemd, or the next subreaper) reaps it.
    std::thread::Builder::new()
        .name("stdio-relay-wait".into())
        .spawn(move || {
            let _ = child.wait();
        })
        .map_err(|source| AgentError::Io {
            what: "spawn relay waiter thread".into(),
            source,
        })?;
    Ok(())
}

/// Body of a stdio relay process: copies stdin to stdout until every writer is gone. Survives
/// the agent (SIGTERM, SIGINT and SIGHUP are ignored: the relay ends when the container does).
pub fn relay_main() -> std::io::Result<()> {
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) }
            .map_err(std::io::Error::from)?;
    }
    // The raw descriptors: std's stdout is line-buffered, which would hold back partial lines.
    use std::os::fd::AsFd;
    let mut input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut output = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    std::io::copy(&mut input, &mut output)?;
    Ok(())
}

fn dup_high(fd: &OwnedFd) -> Result<OwnedFd, AgentError> {
    let n = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).map_err(
        |e| AgentError::Io {
            what: "dup".into(),
            source: e.into(),
        },
    )?;
    // SAFETY: n is a fresh descriptor returned by F_DUPFD_CLOEXEC that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Starts pid 1 of a container in new pid/mount/uts/ipc namespaces joined to `netns`, inside
/// the cgroup whose `cgroup.procs` files are open on `cgroup_procs`, and the agent's detached
/// cgroups of the other hierarchies (`detached`, from `crate::detach`), joined before the init
/// process forks pid 1, so the workload never runs outside them.
/// Blocking (fork/exec and pipe reads): call from `spawn_blocking`. Returns pid 1's host pid.
pub fn spawn(
    spec: &InitSpec,
    netns: &Path,
    stdio: [OwnedFd; 3],
    cgroup_procs: &[OwnedFd],
    detached: &[RawFd],
) -> Result<i32, AgentError> {
    let json = serde_json::to_string(spec).map_err(|e| AgentError::Internal(e.to_string()))?;
    let net = std::fs::File::open(netns).map_err(|source| AgentError::Io {
        what: format!("open {}", netns.display()),
        source,
    })?;
    let (status_r, status_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let status_w_hi = dup_high(&status_w)?;
    let go_r_hi = dup_high(&go_r)?;
    drop((status_w, go_r));
    let (net_fd, sw, gr) = (
        net.as_raw_fd(),
        status_w_hi.as_raw_fd(),
        go_r_hi.as_raw_fd(),
    );
    let [i, o, e] = stdio;
    let mut cg_fds = crate::cgroup::raw(cgroup_procs);
    cg_fds.extend_from_slice(detached);
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg("__container-init")
        .arg(json)
        .stdin(std::process::Stdio::from(i))
        .stdout(std::process::Stdio::from(o))
        .stderr(std::process::Stdio::from(e));
    // SAFETY: the closure only calls async-signal-safe syscalls (write, setns, unshare, dup2).
    unsafe {
        cmd.pre_exec(move || {
            crate::cgroup::join_self(&cg_fds)?;
            if libc::setns(net_fd, libc::CLONE_NEWNET) != 0
                || libc::unshare(
                    libc::CLONE_NEWNS
                        | libc::CLONE_NEWPID
                        | libc::CLONE_NEWUTS
                        | libc::CLONE_NEWIPC,
                ) != 0
                || libc::dup2(sw, init::STATUS_FD) < 0
                || libc::dup2(gr, init::GO_FD) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| AgentError::Io {
        what: "spawn container init".into(),
        source,
    })?;
    drop((status_w_hi, go_r_hi, net));
    let mut reader = BufReader::new(std::fs::File::from(status_r));
    let mut line = String::new();
    let _ = reader.read_line(&mut line);
    let _ = child.wait();
    let pid: i32 = match line
        .trim()
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
    {
        Some(p) => p,
        None => {
            return Err(AgentError::Internal(format!(
                "container init failed: {}",
                line.trim().trim_start_matches("err ")
            )))
        }
    };
    let mut go = std::fs::File::from(go_w);
    let _ = go.write_all(b"g");
    drop(go);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    if let Some(err) = rest.lines().find_map(|l| l.strip_prefix("err ")) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        return Err(AgentError::Internal(format!(
            "container set-up failed: {err}"
        )));
    }
    Ok(pid)
}

/// All pids of the tree rooted at `pid` (host pid namespace), parents first.
pub fn tree_pids(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                    out.extend(s.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
                }
            }
        }
        i += 1;
    }
    out
}

/// Sends a signal to every process of the tree.
pub fn signal_tree(pid: i32, sig: nix::sys::signal::Signal) {
    for p in tree_pids(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

/// Turns TCP repair mode off on every TCP socket of the tree.
///
/// `criu dump --leave-stopped` leaves established sockets in repair mode (recv/send fail with
/// EPERM); a rollback must undo that before resuming. The sockets are borrowed with
/// pidfd_getfd(2) (the same socket object, so the option applies to the process's socket).
/// Returns how many sockets were switched.
pub fn release_tcp_repair(pid: i32) -> usize {
    let mut n = 0;
    for p in tree_pids(pid) {
        // SAFETY: pidfd_open with a pid and no flags; the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) } as i32;
        if pidfd < 0 {
            continue;
        }
        // SAFETY: pidfd is a fresh descriptor we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for e in fds.flatten() {
            let is_socket = std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("socket:"))
                .unwrap_or(false);
            let Some(target) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if !is_socket {
                continue;
            }
            // SAFETY: pidfd_getfd duplicates the target's descriptor into ours; checked below.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) }
                as i32;
            if fd < 0 {
                continue;
            }
            // SAFETY: fd is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut proto: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: proto/len are valid for writing an int.
            let r = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PROTOCOL,
                    (&mut proto as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if r != 0 || proto != libc::IPPROTO_TCP {
                continue;
            }
            let off: libc::c_int = 0; // TCP_REPAIR_OFF
                                      // SAFETY: off is a valid int option value.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_REPAIR,
                    (&off as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                n += 1;
            }
        }
    }
    n
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    crate::procstat::ProcStat::of(pid).is_some_and(|s| !s.ended())
}

/// Resident set size of the tree in bytes.
pub fn tree_rss(pid: i32) -> u64 {
    tree_pids(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/statm")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum::<u64>()
        * 4096
}

/// Non-blocking reap of pid 1: `Some(status)` once it exited (exit code, or 128+signal).
pub fn reap(pid: i32) -> Option<i32> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, c)) => Some(c),
        Ok(WaitStatus::Signaled(_, s, _)) => Some(128 + s as i32),
        Err(nix::errno::Errno::ECHILD) => {
            // Not our child: a container adopted from a previous agent process, whose new
            // parent (pid 1) reaps it, or not (a zombie counts as ended). Its status is unknown.
            if alive(pid) {
                None
            } else {
                Some(-1)
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stdin_that_lost_its_name_cannot_follow() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let file = "file[1a:2b]";
        // Pipes and named files follow; /dev/null too.
        assert_eq!(super::stdin_refusal(&v(&["pipe:[5]"]), &v(&[""])), None);
        assert_eq!(super::stdin_refusal(&v(&[file]), &v(&["/home/u/in"])), None);
        assert_eq!(super::stdin_refusal(&v(&[file]), &v(&["/dev/null"])), None);
        assert_eq!(super::stdin_refusal(&[], &[]), None);
        // An unlinked (or replaced) file, whose name the user may now point anywhere.
        for p in ["/home/u/in (deleted)", "in", ""] {
            let why = super::stdin_refusal(&v(&[file]), &v(&[p])).expect(p);
            assert!(why.contains("no longer has its name"), "{why}");
        }
        assert!(super::stdin_refusal(&v(&[file]), &[]).is_some());
    }

    #[test]
    fn stdio_ids_name_files_as_external_and_pipes_by_inode() {
        let (r, w) = pipe().expect("pipe");
        let file = std::fs::File::open("/proc/self/status").expect("open");
        // A child whose fds 0-2 are a file, a pipe and /dev/null.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .stdin(std::process::Stdio::from(file))
            .stdout(std::process::Stdio::from(w))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let (keys, paths) = stdio_ids(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            keys[0].starts_with("file[") && keys[0].ends_with(']'),
            "{keys:?}"
        );
        assert!(keys[1].starts_with("pipe:["), "{keys:?}");
        assert!(keys[2].starts_with("file["), "{keys:?}");
        assert_eq!(paths[1], "");
        assert_eq!(paths[2], "/dev/null");
        assert!(paths[0].ends_with("/status"), "{paths:?}");
        drop(r);
        assert_eq!(external_file_key(0x1c, 42), "file[1c:2a]");
        assert!(is_external_file_key(&keys[0]) && !is_external_file_key(&keys[1]));
    }

    use super::*;

    fn spec(rootfs: RootfsSpec, binds: Vec<String>) -> ContainerSpec {
        ContainerSpec {
            id: "j1.s0.t0".into(),
            task: None,
            uid: 0,
            gid: 0,
            argv: vec!["/bin/true".into()],
            env: vec![],
            cwd: "/".into(),
            rootfs,
            binds,
            memory_limit: None,
            cpus: None,
            class: None,
            address: None,
            stdout: None,
            stderr: None,
        }
    }

    #[test]
    fn host_mode_binds_dirs_and_copies_symlinks() {
        let dirs = vec![
            PathBuf::from("/usr"),
            PathBuf::from("/bin"),
            PathBuf::from("/nonexistent"),
        ];
        let is_link = |p: &Path| (p == Path::new("/bin")).then(|| "usr/bin".to_string());
        let exists = |p: &Path| p != Path::new("/nonexistent");
        let (mounts, links) = plan_mounts(
            &spec(RootfsSpec::Host, vec!["/work/j1".into()]),
            &dirs,
            &is_link,
            &exists,
        )
        .expect("plan");
        assert_eq!(links, vec![("/bin".to_string(), "usr/bin".to_string())]);
        assert_eq!(
            mounts[0],
            MountPlan::Bind {
                source: "/usr".into(),
                target: "/usr".into(),
                readonly: true
            }
        );
        assert!(mounts.contains(&MountPlan::Bind {
            source: "/work/j1".into(),
            target: "/work/j1".into(),
            readonly: false
        }));
        assert!(mounts.contains(&MountPlan::Proc));
        let ext = external_mounts(&mounts);
        assert_eq!(ext.len(), 2);
        assert_eq!(ext[1].1, "rb-work_j1");
    }

    #[test]
    fn the_program_directory_is_bound_read_only_and_the_cwd_stays_writable() {
        let (mounts, _) = plan_mounts(
            &spec(
                RootfsSpec::Host,
                vec!["/home/u/run".into(), "/var/spool/slurmd/job00021".into()],
            ),
            &[],
            &|_| None,
            &|_| true,
        )
        .expect("plan");
        let ro = |ms: &[MountPlan], t: &str| {
            ms.iter().find_map(|m| match m {
                MountPlan::Bind {
                    target, readonly, ..
                } if target == t => Some(*readonly),
                _ => None,
            })
        };
        assert_eq!(ro(&mounts, "/var/spool/slurmd/job00021"), Some(false));
        let sealed = read_only_program_dir(
            mounts.clone(),
            Some("/var/spool/slurmd/job00021/slurm_script"),
            "/home/u/run",
        );
        assert_eq!(ro(&sealed, "/var/spool/slurmd/job00021"), Some(true));
        assert_eq!(ro(&sealed, "/home/u/run"), Some(false));
        // A program in the working directory: the cwd bind stays writable.
        let same = read_only_program_dir(mounts.clone(), Some("/home/u/run/a.out"), "/home/u/run");
        assert_eq!(same, mounts);
        assert_eq!(read_only_program_dir(mounts.clone(), None, "/"), mounts);
    }

    #[test]
    fn binds_under_tmp_are_mounted_over_the_private_tmp() {
        let pos =
            |mounts: &[MountPlan], want: &dyn Fn(&MountPlan) -> bool| mounts.iter().position(want);
        let is_tmpfs =
            |m: &MountPlan| matches!(m, MountPlan::Tmpfs { target, .. } if target == "/tmp");
        let (mounts, _) = plan_mounts(
            &spec(RootfsSpec::Host, vec!["/tmp".into(), "/var".into()]),
            &[],
            &|_| None,
            &|_| true,
        )
        .expect("plan");
        // Binding /tmp itself: no tmpfs underneath to be overmounted.
        assert_eq!(pos(&mounts, &is_tmpfs), None);
        let (mounts, _) = plan_mounts(
            &spec(RootfsSpec::Host, vec!["/tmp/job7".into()]),
            &[],
            &|_| None,
            &|_| true,
        )
        .expect("plan");
        let tmpfs = pos(&mounts, &is_tmpfs).expect("private /tmp");
        let bind = pos(
            &mounts,
            &|m: &MountPlan| matches!(m, MountPlan::Bind { target, .. } if target == "/tmp/job7"),
        )
        .expect("bind");
        assert!(tmpfs < bind, "{mounts:?}");
    }

    #[test]
    fn dir_mode_has_no_host_binds_and_rejects_relative_binds() {
        let (mounts, links) = plan_mounts(
            &spec(
                RootfsSpec::Dir {
                    path: "/srv/root".into(),
                },
                vec![],
            ),
            &[PathBuf::from("/usr")],
            &|_| None,
            &|_| true,
        )
        .expect("plan");
        assert!(links.is_empty());
        assert!(external_mounts(&mounts).is_empty());
        let e = plan_mounts(
            &spec(RootfsSpec::Host, vec!["work".into()]),
            &[],
            &|_| None,
            &|_| true,
        )
        .expect_err("relative");
        assert!(e.to_string().contains("absolute"), "{e}");
    }
}
