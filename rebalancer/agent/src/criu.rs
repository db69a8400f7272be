//! CRIU command lines (pure builders, unit-tested), the runner, and the stats image decoder.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::AgentError;

/// Key under which the container netns is external in dump images.
pub const NET_KEY: &str = "rb-net";

#[derive(Debug, Clone, Default)]
pub struct DumpArgs {
    pub pid: i32,
    pub images_dir: PathBuf,
    pub net_inode: u64,
    /// (mountpoint inside the container, key)
    pub ext_mounts: Vec<(String, String)>,
    /// External files (`file[MNT:INO]`): a Slurm task's stdio opened outside the container.
    pub ext_files: Vec<String>,
    /// Stream pages to this page server (stop-and-copy).
    pub page_server: Option<(Ipv4Addr, u16)>,
    /// Serve pages lazily from this address (post-copy, CRIU listens: peer protocol < 4).
    pub lazy_serve: Option<(Ipv4Addr, u16)>,
    /// Serve pages lazily on this connected socket (post-copy, peer protocol 4: the agents'
    /// link, `--ps-socket`; CRIU neither binds nor accepts, and runs its TLS server on it).
    pub lazy_socket: Option<i32>,
    pub status_fd: Option<i32>,
    /// Pre-copy: the last round's directory relative to `images_dir` (`--prev-images-dir`).
    pub prev: Option<String>,
    /// [`crate::tls::criu_options`] of an encrypted transfer (empty: plain TCP).
    pub tls: Vec<String>,
    /// `--action-script`: the inbound hold's ([`crate::migration::hold::script`]).
    pub action_script: Option<PathBuf>,
}

impl DumpArgs {
    pub fn build(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "dump".into(),
            "--tree".into(),
            self.pid.to_string(),
            "--images-dir".into(),
            self.images_dir.display().to_string(),
            "--log-file".into(),
            "dump.log".into(),
            // Info level: timestamps and `Pagemap generated` (pagemap_totals) are info lines;
            // debug lines (per VMA, fd and page run) are written while the tree is frozen.
            "-v3".into(),
            "--tcp-established".into(),
            "--network-lock".into(),
            "nftables".into(),
            "--leave-stopped".into(),
            "--external".into(),
            format!("net[{}]:{}", self.net_inode, NET_KEY),
        ];
        for (target, key) in &self.ext_mounts {
            a.push("--external".into());
            a.push(format!("mnt[{target}]:{key}"));
        }
        for key in &self.ext_files {
            a.push("--external".into());
            a.push(key.clone());
        }
        if let Some((addr, port)) = self.page_server {
            a.extend([
                "--page-server".into(),
                "--address".into(),
                addr.to_string(),
                "--port".into(),
                port.to_string(),
            ]);
        }
        if let Some((addr, port)) = self.lazy_serve {
            a.extend([
                "--lazy-pages".into(),
                "--address".into(),
                addr.to_string(),
                "--port".into(),
                port.to_string(),
            ]);
        }
        if let Some(fd) = self.lazy_socket {
            a.extend(["--lazy-pages".into(), "--ps-socket".into(), fd.to_string()]);
        }
        if let Some(fd) = self.status_fd {
            a.extend(["--status-fd".into(), fd.to_string()]);
        }
        if let Some(p) = &self.prev {
            a.extend(["--track-mem".into(), "--prev-images-dir".into(), p.clone()]);
        }
        if self.page_server.is_some() || self.lazy_serve.is_some() || self.lazy_socket.is_some() {
            a.extend(self.tls.iter().cloned());
        }
        if let Some(s) = &self.action_script {
            a.extend(["--action-script".into(), s.display().to_string()]);
        }
        a
    }
}

#[derive(Debug, Clone, Default)]
pub struct RestoreArgs {
    pub images_dir: PathBuf,
    pub root: PathBuf,
    /// (key, host source)
    pub ext_mounts: Vec<(String, PathBuf)>,
    /// (fd in the criu process, key): netns and stdio.
    pub inherit: Vec<(i32, String)>,
    pub pidfile: PathBuf,
    pub lazy: bool,
    pub leave_stopped: bool,
    /// `--manage-cgroups=ignore`: the tree stays in the cgroups of the restoring criu (which
    /// the agent starts inside the container's cgroup) instead of the source's paths.
    pub ignore_cgroups: bool,
}

impl RestoreArgs {
    pub fn build(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "restore".into(),
            "--images-dir".into(),
            self.images_dir.display().to_string(),
            "--log-file".into(),
            "restore.log".into(),
            // Info level keeps CRIU's timestamps; debug lines (one per VMA and page run) cost
            // restore time, and nothing reads them from a restore log.
            "-v3".into(),
            "--root".into(),
            self.root.display().to_string(),
            "--tcp-established".into(),
            "--network-lock".into(),
            "nftables".into(),
        ];
        // A restore step's waiter adds --restore-detached --restore-sibling --pidfile itself.
        if !self.pidfile.as_os_str().is_empty() {
            a.extend([
                "--restore-detached".into(),
                "--pidfile".into(),
                self.pidfile.display().to_string(),
            ]);
        }
        for (key, src) in &self.ext_mounts {
            a.push("--external".into());
            a.push(format!("mnt[{key}]:{}", src.display()));
        }
        for (fd, key) in &self.inherit {
            a.push("--inherit-fd".into());
            a.push(format!("fd[{fd}]:{key}"));
        }
        if self.lazy {
            a.push("--lazy-pages".into());
        }
        if self.leave_stopped {
            a.push("--leave-stopped".into());
        }
        if self.ignore_cgroups {
            // Optional-argument option: the value must be attached.
            a.push("--manage-cgroups=ignore".into());
        }
        a
    }
}

/// `criu page-server` on the destination (stop-and-copy: receives every page; pre-copy: one
/// round, `prev` naming the previous round's directory relative to `images_dir`).
pub fn page_server_args(
    images_dir: &Path,
    addr: Ipv4Addr,
    port: u16,
    status_fd: i32,
    prev: Option<&str>,
    tls: &[String],
) -> Vec<String> {
    let mut a = vec![
        "page-server".into(),
        "--images-dir".into(),
        images_dir.display().to_string(),
        "--log-file".into(),
        "page-server.log".into(),
        // Info level: at debug the page server logs every page run it receives, which the
        // frozen tree waits for; errors, the only thing read from this log, are kept.
        "-v3".into(),
        "--address".into(),
        addr.to_string(),
        "--port".into(),
        port.to_string(),
        "--status-fd".into(),
        status_fd.to_string(),
    ];
    if let Some(p) = prev {
        a.extend(["--prev-images-dir".into(), p.to_string()]);
    }
    a.extend(tls.iter().cloned());
    a
}

/// [`page_server_args`] serving the dump's connection that the agent accepted on `socket`
/// (`--ps-socket`: CRIU neither binds nor accepts, and ignores `--address`/`--port`).
pub fn page_server_on_socket_args(
    images_dir: &Path,
    addr: Ipv4Addr,
    port: u16,
    status_fd: i32,
    socket: i32,
    prev: Option<&str>,
    tls: &[String],
) -> Vec<String> {
    let mut a = page_server_args(images_dir, addr, port, status_fd, prev, tls);
    a.extend(["--ps-socket".into(), socket.to_string()]);
    a
}

/// `criu pre-dump` of one pre-copy round: memory only, to the destination's page server; the
/// task keeps running. `prev` is the previous round's directory relative to `images_dir`.
pub fn pre_dump_args(
    pid: i32,
    images_dir: &Path,
    page_server: (Ipv4Addr, u16),
    prev: Option<&str>,
    tls: &[String],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "pre-dump".into(),
        "--tree".into(),
        pid.to_string(),
        "--images-dir".into(),
        images_dir.display().to_string(),
        "--log-file".into(),
        "pre-dump.log".into(),
        "-v3".into(),
        "--track-mem".into(),
        "--page-server".into(),
        "--address".into(),
        page_server.0.to_string(),
        "--port".into(),
        page_server.1.to_string(),
    ];
    if let Some(p) = prev {
        a.extend(["--prev-images-dir".into(), p.to_string()]);
    }
    a.extend(tls.iter().cloned());
    a
}

/// `criu lazy-pages` on the destination (post-copy: fetches pages from the source's dump).
pub fn lazy_pages_args(
    images_dir: &Path,
    src: Ipv4Addr,
    port: u16,
    status_fd: i32,
    tls: &[String],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "lazy-pages".into(),
        "--images-dir".into(),
        images_dir.display().to_string(),
        "--log-file".into(),
        "lazy-pages.log".into(),
        "-v3".into(),
        "--page-server".into(),
        "--address".into(),
        src.to_string(),
        "--port".into(),
        port.to_string(),
        "--status-fd".into(),
        status_fd.to_string(),
    ];
    a.extend(tls.iter().cloned());
    a
}

/// `criu lazy-pages` fetching pages over the agents' link `socket` (plain post-copy, peer
/// protocol 4). No TLS options: CRIU's client runs no TLS on a socket it did not connect
/// itself (`connect_to_page_server`), so an encrypted transfer uses [`lazy_pages_args`] to the
/// agent's relay instead (`crate::lazy_link::relay`).
pub fn lazy_pages_on_socket_args(images_dir: &Path, status_fd: i32, socket: i32) -> Vec<String> {
    vec![
        "lazy-pages".into(),
        "--images-dir".into(),
        images_dir.display().to_string(),
        "--log-file".into(),
        "lazy-pages.log".into(),
        "-v3".into(),
        // Sets use_page_server: without it the daemon never reads the socket.
        "--page-server".into(),
        "--ps-socket".into(),
        socket.to_string(),
        "--status-fd".into(),
        status_fd.to_string(),
    ]
}

/// Builds a criu command whose listed descriptors survive exec (their CLOEXEC flag is cleared
/// in the child only).
pub fn command(criu: &Path, args: &[String], keep_fds: &[i32]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(criu);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let fds = keep_fds.to_vec();
    // SAFETY: only fcntl(2), which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// A free TCP port on `ip` for CRIU's lazy dump, which binds it itself (bound here, released,
/// then bound by CRIU). Page servers do not need it: they get an accepted socket.
pub fn pick_port(ip: Ipv4Addr) -> Result<u16, AgentError> {
    let l = std::net::TcpListener::bind((ip, 0)).map_err(|source| AgentError::Io {
        what: format!("bind {ip}:0"),
        source,
    })?;
    Ok(l.local_addr()
        .map_err(|source| AgentError::Io {
            what: "local_addr".into(),
            source,
        })?
        .port())
}

fn on_tmpfs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Where CRIU can keep its kernel-feature cache when the node cannot: CRIU writes
/// `/run/criu.kdat` only when /run is a tmpfs, and otherwise probes the kernel again at every
/// start (about 20 ms per CRIU process on this project's VMs, whose /run is on the root disk).
/// `None` when /run is a tmpfs (CRIU caches by itself) or `run_dir` is not on one, or lies
/// under /run (a private /run would hide it). Otherwise `run_dir/criu-run`, created here.
pub fn kdat_run_dir(run_dir: &Path) -> Option<PathBuf> {
    if on_tmpfs(Path::new("/run")) || run_dir.starts_with("/run") || !on_tmpfs(run_dir) {
        return None;
    }
    let dir = run_dir.join("criu-run");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// Starts the command in a mount namespace of its own (a slave of the node's, so it still sees
/// new mounts) where `dir`, a directory on a tmpfs, is bound over /run: CRIU then keeps its
/// kernel-feature cache there between runs. Only for CRIU actions that reach nothing under
/// /run (restore and lazy-pages take their namespace as an fd and their images elsewhere).
/// Any failure leaves the command as it was (CRIU then probes the kernel itself).
pub fn with_private_run(cmd: &mut tokio::process::Command, dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(src) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: only unshare(2) and mount(2), async-signal-safe system calls, run between fork
    // and exec, on strings allocated before the fork; failures are ignored, never unwound.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ) == 0
            {
                libc::mount(
                    src.as_ptr(),
                    c"/run".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                );
            }
            Ok(())
        });
    }
}

/// How long a page server or lazy-pages daemon may take to report readiness.
pub const READY_WITHIN: Duration = Duration::from_secs(10);

/// How [`spawn_ready`] starts a CRIU helper.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpawnOpts<'a> {
    /// How long it may take to report ready (`None`: as long as it takes).
    pub ready_within: Option<Duration>,
    /// Descriptors it inherits.
    pub keep_fds: &'a [i32],
    /// Its own process group, not killed when its handle is dropped (outlives the agent).
    pub detach: bool,
    /// A directory bound over its /run ([`kdat_run_dir`]).
    pub private_run: Option<&'a Path>,
}

/// Starts a criu helper that reports readiness on `--status-fd` and waits for it (at most
/// `ready_within`). A helper that exits first fails with its log's tail.
pub async fn spawn_ready(
    criu: &Path,
    args_for_fd: impl FnOnce(i32) -> Vec<String>,
    what: &'static str,
    log_dir: &Path,
    log: &str,
    opts: SpawnOpts<'_>,
) -> Result<tokio::process::Child, AgentError> {
    let SpawnOpts {
        ready_within,
        keep_fds,
        detach,
        private_run,
    } = opts;
    let (r, w): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| AgentError::Io {
            what: "pipe".into(),
            source: e.into(),
        })?;
    let wfd = w.as_raw_fd();
    let args = args_for_fd(wfd);
    let keep: Vec<i32> = std::iter::once(wfd)
        .chain(keep_fds.iter().copied())
        .collect();
    let mut cmd = command(criu, &args, &keep);
    if detach {
        // Its own process group and the detached cgroups, and not killed with its handle: a
        // restart of the agent (or a signal to its group or unit) does not end it while it
        // serves a running container.
        cmd.process_group(0).kill_on_drop(false);
        let join = crate::detach::fds_except(&[]);
        // SAFETY: only write(2), which is async-signal-safe, runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || crate::cgroup::join_self(&join));
        }
    }
    if let Some(dir) = private_run {
        with_private_run(&mut cmd, dir);
    }
    let mut child = cmd
        .current_dir(log_dir)
        .spawn()
        .map_err(|source| AgentError::Io {
            what: format!("cannot start criu {what}"),
            source,
        })?;
    drop(w);
    let mut rf = tokio::fs::File::from_std(std::fs::File::from(r));
    let mut b = [0u8; 1];
    let read = tokio::io::AsyncReadExt::read(&mut rf, &mut b);
    let n = match ready_within {
        Some(limit) => match tokio::time::timeout(limit, read).await {
            Ok(r) => r.unwrap_or(0),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(AgentError::Criu {
                    action: what,
                    message: format!("not ready after {} s", limit.as_secs()),
                });
            }
        },
        None => read.await.unwrap_or(0),
    };
    if n == 0 {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(AgentError::Criu {
            action: what,
            message: log_tail(log_dir, log),
        });
    }
    Ok(child)
}

/// The lazy-pages daemon's page accounting from its log: the sums over its processes of the
/// pages copied through userfaultfd and of the pages there were. At `-v3` (the agent's level:
/// `-v4` writes a line per page run and fault, which slowed the daemon) CRIU logs them only for a
/// process that got fewer than it had (`Only COPIED of TOTAL pages transferred via UFFD`); at
/// `-v4` for every process (`UFFD transferred pages: (COPIED/TOTAL)`). Fewer copied is normal
/// when a process unmapped memory or exited first (CRIU does not treat it as an error), so this
/// is a figure for the log, while the daemon's exit status decides. Pure.
pub fn lazy_transfer_totals(log: &str) -> Option<(u64, u64)> {
    let mut found = None;
    for l in log.lines() {
        let pair = if let Some(rest) = l.split("UFFD transferred pages: (").nth(1) {
            rest.split(')').next().and_then(|x| x.split_once('/'))
        } else if let Some(rest) = l.split("Only ").nth(1) {
            rest.split(" pages transferred via UFFD")
                .next()
                .and_then(|x| x.split_once(" of "))
        } else {
            None
        };
        let Some((copied, total)) = pair else {
            continue;
        };
        if let (Ok(c), Ok(t)) = (copied.trim().parse::<u64>(), total.trim().parse::<u64>()) {
            let (sc, st) = found.unwrap_or((0, 0));
            found = Some((sc + c, st + t));
        }
    }
    found
}

/// The last error lines of a CRIU log, for error messages.
pub fn log_tail(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_default();
    let errs: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .collect();
    let pick: Vec<&str> = if errs.is_empty() {
        text.lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    } else {
        errs.iter().rev().take(3).rev().copied().collect()
    };
    format!("{} (log: {})", pick.join(" | "), p.display())
}

/// How a child process ended, in words for an error message: `exited with status 168`,
/// `was killed by signal 9` (never Rust's `ExitStatus(unix_wait_status(..))` Debug text).
pub fn exit_text(st: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match st {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            (None, None) => format!("ended ({s})"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// Joins a tool's multi-line output into one line, so that an error stays one line in the
/// journal, in `rebalctl show migration` and in logs.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Runs criu to completion and maps failure to an error naming the log.
pub async fn run(
    criu: &Path,
    action: &'static str,
    args: &[String],
    keep_fds: &[i32],
    log_dir: &Path,
    log_name: &str,
) -> Result<(), AgentError> {
    run_in(criu, action, args, keep_fds, &[], log_dir, log_name, None).await
}

/// Like [`run`], with criu started inside the cgroups whose `cgroup.procs` are open on
/// `cgroup_procs` (so that everything it forks is born there), and with `private_run` as its
/// /run ([`kdat_run_dir`]).
#[allow(clippy::too_many_arguments)]
pub async fn run_in(
    criu: &Path,
    action: &'static str,
    args: &[String],
    keep_fds: &[i32],
    cgroup_procs: &[i32],
    log_dir: &Path,
    log_name: &str,
    private_run: Option<&Path>,
) -> Result<(), AgentError> {
    let mut cmd = command(criu, args, keep_fds);
    if let Some(dir) = private_run {
        with_private_run(&mut cmd, dir);
    }
    let join = cgroup_procs.to_vec();
    // SAFETY: only write(2), which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || crate::cgroup::join_self(&join));
    }
    let out = cmd.output().await.map_err(|source| AgentError::Io {
        what: format!("cannot run {}", criu.display()),
        source,
    })?;
    if !out.status.success() {
        return Err(AgentError::Criu {
            action,
            message: format!(
                "{}: {}",
                exit_text(&Ok(out.status)),
                log_tail(log_dir, log_name)
            ),
        });
    }
    Ok(())
}

/// How long an interrupted CRIU gets to leave through its own failure path (its SIGALRM
/// handler retries the interruption 5 times, 1 s apart) before it is SIGKILLed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(10);

/// CRIU runs cut by a deadline that are still leaving through their own failure path; a
/// rollback waits for them ([`Interrupted::settle`]) before it touches the tree.
#[derive(Debug, Clone, Default)]
pub struct Interrupted(std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>);

impl Interrupted {
    fn push(&self, h: tokio::task::JoinHandle<()>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(h);
    }

    /// Waits until every interrupted CRIU has exited (or was killed after the grace).
    pub async fn settle(&self) {
        loop {
            let h = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match h {
                Some(h) => {
                    let _ = h.await;
                }
                None => return,
            }
        }
    }
}

/// A running CRIU whose future may be dropped (a deadline): then it is not SIGKILLed, which
/// would leave its parasite in the tree, but interrupted the way CRIU provides for: SIGALRM,
/// which its dump installs a handler for (`alarm_handler` in `cr-dump.c`: the current syscall
/// fails with EINTR and the dump takes its failure path, curing the tree and resuming it).
struct Interruptible {
    child: Option<tokio::process::Child>,
    action: &'static str,
    pending: Interrupted,
}

impl Drop for Interruptible {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let action = self.action;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            let _ = child.start_kill();
            return;
        };
        if let Some(pid) = child.id() {
            tracing::warn!(action, pid, "criu cut by the migration's deadline: interrupting it with SIGALRM (its own failure path), not SIGKILL");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGALRM,
            );
        }
        let h = rt.spawn(async move {
            match tokio::time::timeout(INTERRUPT_GRACE, child.wait()).await {
                Ok(st) => tracing::info!(action, status = ?st, "interrupted criu left through its failure path"),
                Err(_) => {
                    tracing::error!(action, "interrupted criu still runs after {INTERRUPT_GRACE:?}: killing it");
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
        });
        self.pending.push(h);
    }
}

/// Like [`run`] (no inherited descriptors), but a dropped future interrupts CRIU with SIGALRM
/// instead of killing it; `pending` then tracks it until it exits.
pub async fn run_interruptible(
    criu: &Path,
    action: &'static str,
    args: &[String],
    log_dir: &Path,
    log_name: &str,
    pending: &Interrupted,
) -> Result<(), AgentError> {
    let mut cmd = command(criu, args, &[]);
    // Nobody reads them while it runs (CRIU logs to its log file).
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = cmd.spawn().map_err(|source| AgentError::Io {
        what: format!("cannot run {}", criu.display()),
        source,
    })?;
    let mut run = Interruptible {
        child: Some(child),
        action,
        pending: pending.clone(),
    };
    let st = match run.child.as_mut() {
        Some(c) => c.wait().await,
        None => return Err(AgentError::Internal("criu was not started".into())),
    };
    // Ended by itself: nothing to interrupt.
    run.child = None;
    let st = st.map_err(|source| AgentError::Io {
        what: format!("wait for criu {action}"),
        source,
    })?;
    if !st.success() {
        return Err(AgentError::Criu {
            action,
            message: format!("{}: {}", exit_text(&Ok(st)), log_tail(log_dir, log_name)),
        });
    }
    Ok(())
}

/// Figures from CRIU's `stats-dump` / `stats-restore` images.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriuStats {
    pub freezing_time_us: u64,
    pub frozen_time_us: u64,
    pub memdump_time_us: u64,
    pub memwrite_time_us: u64,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
    pub pages_lazy: u64,
    pub pages_restored: u64,
    pub restore_time_us: u64,
    pub forking_time_us: u64,
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Decodes the varint fields of one protobuf message into (field number, value) pairs; nested
/// messages (wire type 2) are returned as byte ranges.
type Field<'a> = (u64, Result<u64, &'a [u8]>);

fn fields(b: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let (field, wt) = (key >> 3, key & 7);
        match wt {
            0 => out.push((field, Ok(varint(b, &mut i)?))),
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let end = i.checked_add(len).filter(|e| *e <= b.len())?;
                out.push((field, Err(&b[i..end])));
                i = end;
            }
            1 => i += 8,
            5 => i += 4,
            _ => return None,
        }
    }
    Some(out)
}

/// `InventoryEntry.network_lock_method` (field 11; CRIU's own values: 0 iptables, 1 nftables,
/// 2 skip). A restore takes its lock method from here, not from its command line.
const INVENTORY_LOCK_FIELD: u64 = 11;
const NETWORK_LOCK_SKIP: u8 = 2;

/// The inventory image `img` with its network lock method set to "skip", or `None` when it
/// already says so. The restore then neither locks nor unlocks the network: each costs a
/// libnftables run of about 20 ms on this kind of node, and the agent keeps the restored
/// namespace unreachable by itself (no node route to it until the commit resumes the tree).
pub fn inventory_skipping_lock(img: &[u8]) -> Result<Option<Vec<u8>>, String> {
    const INVENTORY_MAGIC: u32 = 0x5831_3116;
    let word = |o: usize| {
        img.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    if word(0) != Some(INVENTORY_MAGIC) {
        return Err("not a CRIU inventory image (bad magic)".into());
    }
    let len = word(4).ok_or("inventory image ends before its length")? as usize;
    let body = img
        .get(8..8 + len)
        .ok_or("inventory image shorter than its length")?;
    let mut i = 0;
    while i < body.len() {
        let key = varint(body, &mut i).ok_or("bad field key in inventory")?;
        let (field, wt) = (key >> 3, key & 7);
        let at = i;
        match wt {
            0 => {
                let v = varint(body, &mut i).ok_or("bad varint in inventory")?;
                if field == INVENTORY_LOCK_FIELD {
                    if v == u64::from(NETWORK_LOCK_SKIP) {
                        return Ok(None);
                    }
                    // Every method value is one varint byte: patch it in place.
                    if i - at != 1 {
                        return Err(format!("unexpected network lock method {v} in inventory"));
                    }
                    let mut out = img.to_vec();
                    out[8 + at] = NETWORK_LOCK_SKIP;
                    return Ok(Some(out));
                }
            }
            2 => {
                let l = usize::try_from(varint(body, &mut i).ok_or("bad length in inventory")?)
                    .map_err(|_| "inventory field too long")?;
                i = i
                    .checked_add(l)
                    .filter(|e| *e <= body.len())
                    .ok_or("inventory field past its end")?;
            }
            1 => i += 8,
            5 => i += 4,
            _ => return Err(format!("unknown wire type {wt} in inventory")),
        }
    }
    // No method recorded (CRIU's default): add the field at the end of the message.
    let mut out = Vec::with_capacity(img.len() + 2);
    out.extend_from_slice(&img[..4]);
    out.extend_from_slice(&((len + 2) as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&[(INVENTORY_LOCK_FIELD << 3) as u8, NETWORK_LOCK_SKIP]);
    out.extend_from_slice(&img[8 + len..]);
    Ok(Some(out))
}

/// [`inventory_skipping_lock`] on `dir/inventory.img`, in place.
pub fn skip_restore_network_lock(dir: &Path) -> Result<(), AgentError> {
    let p = dir.join("inventory.img");
    let io = |what: &str, source| AgentError::Io {
        what: format!("{what} {}", p.display()),
        source,
    };
    let img = std::fs::read(&p).map_err(|e| io("read", e))?;
    match inventory_skipping_lock(&img) {
        Ok(Some(out)) => std::fs::write(&p, out).map_err(|e| io("write", e)),
        Ok(None) => Ok(()),
        Err(message) => Err(AgentError::Criu {
            action: "restore",
            message: format!("{message} ({})", p.display()),
        }),
    }
}

/// Decodes a CRIU stats image (`stats-dump` or `stats-restore`): magic words, then one
/// length-prefixed `StatsEntry { dump = 1; restore = 2 }`.
pub fn decode_stats(img: &[u8]) -> Option<CriuStats> {
    const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
    const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
    let word = |o: usize| {
        img.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let mut off = 4;
    if matches!(word(0)?, IMG_COMMON_MAGIC | IMG_SERVICE_MAGIC) {
        off = 8;
    }
    let len = word(off)? as usize;
    let body = img.get(off + 4..off + 4 + len)?;
    let mut s = CriuStats::default();
    for (f, v) in fields(body)? {
        let Err(inner) = v else { continue };
        for (g, w) in fields(inner)? {
            let Ok(w) = w else { continue };
            match (f, g) {
                (1, 1) => s.freezing_time_us = w,
                (1, 2) => s.frozen_time_us = w,
                (1, 3) => s.memdump_time_us = w,
                (1, 4) => s.memwrite_time_us = w,
                (1, 5) => s.pages_scanned = w,
                (1, 6) => s.pages_skipped_parent = w,
                (1, 7) => s.pages_written = w,
                (1, 9) => s.pages_lazy = w,
                (2, 3) => s.forking_time_us = w,
                (2, 4) => s.restore_time_us = w,
                (2, 5) => s.pages_restored = w,
                _ => {}
            }
        }
    }
    Some(s)
}

/// Sums the `Pagemap generated: N pages (M lazy)` lines of a dump log: (pages, lazy pages).
/// CRIU 4.2 writes zero page counters into `stats-dump` for lazy dumps, so post-copy uses this.
pub fn pagemap_totals(log: &str) -> (u64, u64) {
    let mut pages = 0;
    let mut lazy = 0;
    for l in log.lines() {
        let Some(rest) = l.split("Pagemap generated: ").nth(1) else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let n = it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let m = it
            .nth(1)
            .and_then(|v| v.trim_start_matches('(').parse::<u64>().ok())
            .unwrap_or(0);
        pages += n;
        lazy += m;
    }
    (pages, lazy)
}

pub fn read_stats(dir: &Path, name: &str) -> Option<CriuStats> {
    decode_stats(&std::fs::read(dir.join(name)).ok()?)
}

#[cfg(test)]
mod tests {

    /// A CRIU cut by a deadline gets SIGALRM (its own interruption), not SIGKILL, and the
    /// rollback's settle waits until it left.
    #[tokio::test]
    async fn a_cut_criu_is_interrupted_with_sigalrm_and_settled() {
        let dir = std::env::temp_dir().join(format!("rb-alrm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mark = dir.join("got-alarm");
        // A stand-in for criu: notes SIGALRM and leaves, as CRIU's failure path does.
        let script = format!(
            "trap 'echo alarm > {}; exit 3' ALRM; echo ready > {}/ready; while :; do sleep 0.05; done",
            mark.display(),
            dir.display()
        );
        let args = vec!["-c".to_string(), script];
        let pending = super::Interrupted::default();
        let run = super::run_interruptible(
            std::path::Path::new("/bin/sh"),
            "dump",
            &args,
            &dir,
            "dump.log",
            &pending,
        );
        let ready = dir.join("ready");
        let cut = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::pin!(run);
            loop {
                tokio::select! {
                    r = &mut run => return Some(r),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                        if ready.exists() {
                            return None;
                        }
                    }
                }
            }
        })
        .await
        .expect("the stand-in starts");
        assert!(cut.is_none(), "it must still run when cut: {cut:?}");
        tokio::time::timeout(std::time::Duration::from_secs(8), pending.settle())
            .await
            .expect("it leaves within the grace");
        assert_eq!(
            std::fs::read_to_string(&mark).unwrap_or_default().trim(),
            "alarm"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    use super::lazy_transfer_totals;

    #[test]
    fn lazy_page_accounting_sums_the_daemons_summary_lines() {
        let log = "(00.5) uffd: 12-5: UFFD transferred pages: (100/120)\n\
                   (00.6) uffd: other line\n\
                   (00.7) uffd: 13-6: UFFD transferred pages: (20/20)\n";
        assert_eq!(lazy_transfer_totals(log), Some((120, 140)));
        assert_eq!(lazy_transfer_totals("no summary"), None);
        assert_eq!(lazy_transfer_totals("UFFD transferred pages: (x/2)"), None);
        let v3 = "(01.2) lazy-pages: 12-5: Only 90 of 100 pages transferred via UFFD\n\
                  (01.3) lazy-pages: Only the first line counts\n";
        assert_eq!(lazy_transfer_totals(v3), Some((90, 100)));
    }
    use super::*;

    #[test]
    fn exit_text_is_words_not_debug() {
        use std::os::unix::process::ExitStatusExt;
        let st = |raw| Ok(std::process::ExitStatus::from_raw(raw));
        // 43008 is the wait status the issue quoted: exit status 168.
        assert_eq!(exit_text(&st(43008)), "exited with status 168");
        assert_eq!(exit_text(&st(9)), "was killed by signal 9");
        let e = exit_text(&Err(std::io::Error::other("gone")));
        assert_eq!(e, "could not be waited for: gone");
        assert_eq!(one_line("a\n\n  b  \nc\n"), "a | b | c");
    }

    #[test]
    fn dump_args_mark_net_and_mounts_external() {
        let a = DumpArgs {
            pid: 42,
            images_dir: "/run/x/img".into(),
            net_inode: 4026532000,
            ext_mounts: vec![("/usr".into(), "rb-usr".into())],
            ext_files: vec!["file[1c:2a]".into()],
            page_server: Some((Ipv4Addr::new(198, 18, 16, 3), 2000)),
            lazy_serve: None,
            lazy_socket: None,
            status_fd: None,
            prev: None,
            tls: vec![],
            action_script: Some("/run/x/hold.sh".into()),
        }
        .build();
        let s = a.join(" ");
        assert!(
            s.starts_with("dump --tree 42 --images-dir /run/x/img"),
            "{s}"
        );
        assert!(s.contains("--action-script /run/x/hold.sh"), "{s}");
        assert!(s.contains("--external net[4026532000]:rb-net"), "{s}");
        assert!(s.contains("--external mnt[/usr]:rb-usr"), "{s}");
        assert!(s.contains("--external file[1c:2a]"), "{s}");
        assert!(
            s.contains("--page-server --address 198.18.16.3 --port 2000"),
            "{s}"
        );
        assert!(
            s.contains("--leave-stopped") && s.contains("--network-lock nftables"),
            "{s}"
        );
        assert!(!s.contains("--lazy-pages"), "{s}");
    }

    #[test]
    fn precopy_rounds_chain_parents() {
        let a = pre_dump_args(
            7,
            Path::new("/r/m-src/pre-1"),
            (Ipv4Addr::new(198, 18, 16, 3), 9),
            Some("../pre-0"),
            &[],
        )
        .join(" ");
        assert!(
            a.starts_with("pre-dump --tree 7 --images-dir /r/m-src/pre-1"),
            "{a}"
        );
        assert!(
            a.contains("--track-mem --page-server --address 198.18.16.3 --port 9"),
            "{a}"
        );
        assert!(a.ends_with("--prev-images-dir ../pre-0"), "{a}");
        let ps = page_server_args(
            Path::new("/r/m/img"),
            Ipv4Addr::new(198, 18, 16, 3),
            9,
            5,
            Some("../pre-1"),
            &[],
        )
        .join(" ");
        assert!(
            ps.ends_with("--status-fd 5 --prev-images-dir ../pre-1"),
            "{ps}"
        );
        let on = page_server_on_socket_args(
            Path::new("/r/m/img"),
            Ipv4Addr::new(198, 18, 16, 3),
            9,
            5,
            7,
            None,
            &[],
        )
        .join(" ");
        assert!(on.ends_with("--status-fd 5 --ps-socket 7"), "{on}");
        let d = DumpArgs {
            pid: 7,
            prev: Some("../pre-1".into()),
            ..Default::default()
        }
        .build()
        .join(" ");
        assert!(d.contains("--track-mem --prev-images-dir ../pre-1"), "{d}");
    }

    #[test]
    fn a_linked_lazy_dump_serves_on_the_socket_and_listens_nowhere() {
        let tls = crate::tls::criu_options(Path::new("/r/m/tls"));
        let d = DumpArgs {
            pid: 7,
            lazy_socket: Some(9),
            tls: tls.clone(),
            ..Default::default()
        }
        .build();
        let s = d.join(" ");
        assert!(s.contains("--lazy-pages --ps-socket 9"), "{s}");
        assert!(!s.contains("--address") && !s.contains("--port"), "{s}");
        // CRIU's TLS server runs on a passed socket: the options stay.
        assert!(d.windows(tls.len()).any(|w| w == tls.as_slice()), "{s}");
        let l = lazy_pages_on_socket_args(Path::new("/r/m/img"), 5, 8).join(" ");
        assert!(
            l.contains("--page-server --ps-socket 8 --status-fd 5"),
            "{l}"
        );
        assert!(!l.contains("--address") && !l.contains("--tls"), "{l}");
    }

    #[test]
    fn tls_options_go_to_every_page_moving_command_and_only_those() {
        let tls = crate::tls::criu_options(Path::new("/r/m/tls"));
        let has = |a: &[String]| a.windows(tls.len()).any(|w| w == tls.as_slice());
        let ip = Ipv4Addr::new(198, 18, 16, 3);
        let mut d = DumpArgs {
            pid: 7,
            page_server: Some((ip, 9)),
            tls: tls.clone(),
            ..Default::default()
        };
        assert!(has(&d.build()));
        d.page_server = None;
        d.lazy_serve = Some((ip, 9));
        assert!(has(&d.build()));
        // A dump to the agent's own image directory has no peer to encrypt for.
        d.lazy_serve = None;
        assert!(!d.build().iter().any(|a| a == "--tls"));
        assert!(has(&pre_dump_args(7, Path::new("/d"), (ip, 9), None, &tls)));
        assert!(has(&page_server_args(
            Path::new("/d"),
            ip,
            9,
            5,
            None,
            &tls
        )));
        let on = page_server_on_socket_args(Path::new("/d"), ip, 9, 5, 7, None, &tls);
        assert!(has(&on) && on.ends_with(&["--ps-socket".to_string(), "7".to_string()]));
        assert!(has(&lazy_pages_args(Path::new("/d"), ip, 9, 5, &tls)));
    }

    #[test]
    fn restore_args_map_mounts_and_inherit_fds() {
        let a = RestoreArgs {
            images_dir: "/run/y/img".into(),
            root: "/run/y/root".into(),
            ext_mounts: vec![("rb-usr".into(), "/usr".into())],
            inherit: vec![(7, NET_KEY.into()), (8, "pipe:[123]".into())],
            pidfile: "/run/y/pid".into(),
            lazy: true,
            leave_stopped: false,
            ignore_cgroups: true,
        }
        .build();
        let s = a.join(" ");
        assert!(s.contains("--root /run/y/root"), "{s}");
        assert!(s.contains("--external mnt[rb-usr]:/usr"), "{s}");
        assert!(
            s.contains("--inherit-fd fd[7]:rb-net --inherit-fd fd[8]:pipe:[123]"),
            "{s}"
        );
        assert!(
            s.contains("--lazy-pages") && s.contains("--restore-detached"),
            "{s}"
        );
        assert!(!s.contains("--leave-stopped"), "{s}");
        assert!(s.ends_with("--manage-cgroups=ignore"), "{s}");
    }

    #[test]
    fn stats_image_decodes() {
        // StatsEntry{ dump { freezing_time=5 frozen_time=300 pages_scanned=1000 pages_written=900 pages_lazy=7 } }
        let dump: Vec<u8> = vec![
            0x08, 5, 0x10, 0xac, 0x02, 0x28, 0xe8, 0x07, 0x38, 0x84, 0x07, 0x48, 7,
        ];
        let mut entry = vec![0x0a, dump.len() as u8];
        entry.extend(&dump);
        let mut img = 0x5510_5940u32.to_le_bytes().to_vec();
        img.extend(0x5755_7555u32.to_le_bytes());
        img.extend((entry.len() as u32).to_le_bytes());
        img.extend(&entry);
        let s = decode_stats(&img).expect("decodes");
        assert_eq!(s.freezing_time_us, 5);
        assert_eq!(s.frozen_time_us, 300);
        assert_eq!(s.pages_scanned, 1000);
        assert_eq!(s.pages_written, 900);
        assert_eq!(s.pages_lazy, 7);
        assert!(decode_stats(&img[..10]).is_none());
    }

    #[test]
    fn restore_plan_args_leave_detach_and_pidfile_to_the_step() {
        let a = RestoreArgs {
            images_dir: "/run/y/img".into(),
            root: "/run/y/root".into(),
            leave_stopped: true,
            ..Default::default()
        }
        .build()
        .join(" ");
        assert!(
            !a.contains("--restore-detached") && !a.contains("--pidfile"),
            "{a}"
        );
        assert!(a.contains("--leave-stopped"), "{a}");
        assert!(!a.contains("--manage-cgroups"), "{a}");
    }

    #[test]
    fn inventory_lock_method_becomes_skip() {
        // inventory.img of `criu dump --network-lock nftables` (CRIU 4.2.1), shortened: magic,
        // length, img_version 2, ns_per_id, network_lock_method 1, a run id string.
        let mut img = vec![0x16, 0x31, 0x31, 0x58, 9, 0, 0, 0];
        img.extend_from_slice(&[0x08, 0x02, 0x20, 0x01, 0x58, 0x01, 0x6a, 0x01, b'x']);
        let out = inventory_skipping_lock(&img)
            .ok()
            .flatten()
            .unwrap_or_default();
        assert_eq!(out.len(), img.len());
        assert_eq!(out[12], 0x58);
        assert_eq!(out[8 + 5], 0x02, "method byte patched to skip");
        assert_eq!(out[..13], img[..13]);
        assert_eq!(out[14..], img[14..]);
        // Already skip: nothing to write.
        assert_eq!(inventory_skipping_lock(&out), Ok(None));
        // No method recorded: the field is appended and the length grows.
        let mut bare = vec![0x16, 0x31, 0x31, 0x58, 2, 0, 0, 0, 0x08, 0x02];
        let added = inventory_skipping_lock(&bare)
            .ok()
            .flatten()
            .unwrap_or_default();
        assert_eq!(added[4], 4);
        assert_eq!(added[8..], [0x08, 0x02, 0x58, 0x02]);
        bare[0] = 0;
        assert!(inventory_skipping_lock(&bare).is_err());
        assert!(inventory_skipping_lock(&img[..10]).is_err());
    }

    #[test]
    fn pagemap_log_totals() {
        let log = "(00.065054) Pagemap generated: 2 pages (0 lazy) 0 holes\n(00.065060) Pagemap generated: 10 pages (10 lazy) 0 holes\nother\n";
        assert_eq!(pagemap_totals(log), (12, 10));
    }

    #[test]
    fn real_stats_dump_from_criu_4_2_decodes() {
        // stats-dump written by CRIU 4.2.1 for a sleeping process (30 pages).
        let img: [u8; 44] = [
            0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x20, 0x00, 0x00, 0x00, 0x0a, 0x1e,
            0x08, 0x4a, 0x10, 0x9e, 0x3f, 0x18, 0x9f, 0x02, 0x20, 0x4a, 0x28, 0x39, 0x30, 0x00,
            0x38, 0x1e, 0x40, 0x00, 0x48, 0x00, 0x50, 0x06, 0x58, 0x06, 0x60, 0x00, 0x68, 0x00,
            0x70, 0x00,
        ];
        let s = decode_stats(&img).expect("decodes");
        assert_eq!(s.pages_scanned, 0x39);
        assert_eq!(s.pages_written, 0x1e);
        assert_eq!(s.frozen_time_us, 0x1f9e);
    }
}
