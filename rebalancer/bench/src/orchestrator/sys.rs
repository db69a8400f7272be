//! Running external tools: commands with captured output, long-running children in their own
//! process groups (so a terminal Ctrl-C reaches only the orchestrator, which then tears down),
//! descriptors handed to children at fixed numbers, and the interrupt flag.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SysError {
    #[error("interrupted")]
    Interrupted,
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` did not finish within {secs} s")]
    Timeout { cmd: String, secs: u64 },
    #[error("cannot start `{cmd}`")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, SysError>;

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SysError {
    let what = what.into();
    move |source| SysError::Io { what, source }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP set a flag that every wait in the orchestrator checks.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        Err(SysError::Interrupted)
    } else {
        Ok(())
    }
}

/// Sleeps in small steps so that Ctrl-C is noticed.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupt()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    Ok(())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A command run inside a node's network namespace.
pub fn in_netns(netns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{netns}")).arg(program);
    c
}

/// Runs to completion; returns stdout. Fails with stderr on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<String> {
    let d = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SysError::Spawn {
            cmd: d.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(SysError::Failed {
            cmd: d,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `run` on a whitespace-separated command line (no quoting needed by our callers).
pub fn sh(line: &str) -> Result<String> {
    let mut parts = line.split_whitespace();
    let prog = parts
        .next()
        .ok_or_else(|| SysError::Other("empty command".into()))?;
    run(Command::new(prog).args(parts))
}

/// Like `sh` but a failure is ignored (teardown of things that may not exist).
pub fn sh_quiet(line: &str) {
    let _ = sh(line);
}

/// Descriptors to place at fixed numbers in a child (e.g. CRIU's `--status-fd 3`).
pub fn with_fds(cmd: &mut Command, fds: Vec<(RawFd, RawFd)>) {
    // SAFETY: the closure runs between fork and exec and only calls dup2/fcntl, which are
    // async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &(src, dst) in &fds {
                if src == dst {
                    if libc::fcntl(dst, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(src, dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A pipe whose write end a child gets as a status descriptor; the parent learns when the
/// child wrote to it (CRIU writes one byte when its server is ready).
pub struct StatusPipe {
    pub write: OwnedFd,
    rx: Receiver<bool>,
}

impl StatusPipe {
    pub fn new() -> Result<StatusPipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io("pipe2")(std::io::Error::last_os_error()));
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (r, w) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = r;
            let mut b = [0u8; 1];
            let _ = tx.send(matches!(r.read(&mut b), Ok(1)));
        });
        Ok(StatusPipe { write: w, rx })
    }

    pub fn raw(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// Drops the parent's write end (call after spawning) and waits for the status byte.
    pub fn wait(self, what: &str, child: &mut Proc, timeout: Duration) -> Result<()> {
        let StatusPipe { write, rx } = self;
        drop(write);
        let end = Instant::now() + timeout;
        loop {
            check_interrupt()?;
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(true) => return Ok(()),
                Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = child.wait_timeout(Duration::from_secs(5)).ok();
                    return Err(SysError::Other(format!(
                        "{what} exited before it was ready ({})",
                        st.map(|s| s.to_string())
                            .unwrap_or_else(|| "still running".into())
                    )));
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > end => {
                    return Err(SysError::Timeout {
                        cmd: what.into(),
                        secs: timeout.as_secs(),
                    })
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// A long-running child in its own process group; killed (whole group) on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    done: Option<ExitStatus>,
    stderr: Option<Receiver<String>>,
}

impl Proc {
    /// Spawns with stdin/stdout null unless the caller set them; stderr is collected.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        cmd.stderr(Stdio::piped());
        Self::spawn_raw(name, cmd)
    }

    /// Like `spawn`, with stdout and stderr appended to `log`.
    pub fn spawn_logged(name: &str, cmd: &mut Command, log: &std::path::Path) -> Result<Proc> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("open {}", log.display())))?;
        let f2 = f.try_clone().map_err(io("dup log"))?;
        cmd.stdout(f).stderr(f2);
        Self::spawn_raw(name, cmd)
    }

    fn spawn_raw(name: &str, cmd: &mut Command) -> Result<Proc> {
        let d = describe(cmd);
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|source| SysError::Spawn { cmd: d, source })?;
        let stderr = child.stderr.take().map(|e| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = BufReader::new(e).read_to_string(&mut s);
                let _ = tx.send(s);
            });
            rx
        });
        Ok(Proc {
            name: name.into(),
            child,
            done: None,
            stderr,
        })
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.done.is_none() {
            self.done = self.child.try_wait().ok().flatten();
        }
        self.done
    }

    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Ok(s);
            }
            check_interrupt()?;
            if Instant::now() > end {
                return Err(SysError::Timeout {
                    cmd: self.name.clone(),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for a successful exit; the error carries the child's stderr.
    pub fn wait_ok(&mut self, timeout: Duration) -> Result<()> {
        let st = self.wait_timeout(timeout)?;
        if st.success() {
            return Ok(());
        }
        Err(SysError::Failed {
            cmd: self.name.clone(),
            status: st.to_string(),
            stderr: self.stderr_text(),
        })
    }

    pub fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|rx| rx.recv_timeout(Duration::from_secs(1)).ok())
            .map(|s| s.trim().chars().take(600).collect())
            .unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            // SAFETY: signalling the process group this Proc created (pgid = child pid).
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads one line from a child's stdout with a timeout.
pub fn line_reader(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn recv_line(rx: &Receiver<String>, what: &str, timeout: Duration) -> Result<String> {
    let end = Instant::now() + timeout;
    loop {
        check_interrupt()?;
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(l) => return Ok(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(SysError::Other(format!("{what} closed its output")))
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > end => {
                return Err(SysError::Timeout {
                    cmd: what.into(),
                    secs: timeout.as_secs(),
                })
            }
            Err(_) => {}
        }
    }
}

/// The `Error` lines of a CRIU log, for failure reports.
pub fn criu_log_errors(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
                .take(4)
                .collect::<Vec<_>>()
                .join(" / ")
        })
        .unwrap_or_default()
}
