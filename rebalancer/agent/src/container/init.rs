//! Code that runs inside the new namespaces, in a freshly exec'd copy of the agent binary
//! (`rebalancer-agent __container-init`): never in the multi-threaded daemon.
//!
//! The agent spawns this process with `setns(net)` + `unshare(mnt|pid|uts|ipc)` done in
//! `pre_exec`, fd 3 = status pipe (write end), fd 4 = go pipe (read end). This process forks the
//! container's pid 1, reports its pid ("pid N\n") on fd 3 and exits; pid 1 is re-parented to
//! the agent (a child subreaper). Pid 1 waits for a byte on fd 4, builds the mount tree, pivots
//! and execs the workload. Failures before exec are reported as "err MESSAGE\n" on fd 3;
//! a successful exec closes fd 3 (close-on-exec).

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const STATUS_FD: i32 = 3;
pub const GO_FD: i32 = 4;

/// One entry of the container's mount table, in mount order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum MountPlan {
    /// Bind mount of a node path; CRIU sees it as external (`mnt[target]:key`).
    Bind {
        source: PathBuf,
        target: String,
        readonly: bool,
    },
    Tmpfs {
        target: String,
        options: String,
    },
    /// tmpfs with the minimal device nodes and links.
    Dev,
    Proc,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitSpec {
    pub root: PathBuf,
    pub mounts: Vec<MountPlan>,
    pub hostname: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
}

impl<'a> From<&'a MountPlan> for rebalancer_rootfs::Mount<'a> {
    fn from(m: &'a MountPlan) -> Self {
        match m {
            MountPlan::Bind {
                source,
                target,
                readonly,
            } => rebalancer_rootfs::Mount::Bind {
                source,
                target,
                readonly: *readonly,
            },
            MountPlan::Tmpfs { target, options } => {
                rebalancer_rootfs::Mount::Tmpfs { target, options }
            }
            MountPlan::Dev => rebalancer_rootfs::Mount::Dev,
            MountPlan::Proc => rebalancer_rootfs::Mount::Proc,
        }
    }
}

fn status_pipe() -> std::fs::File {
    // SAFETY: fd 3 was set up by the agent's pre_exec as the status pipe and nothing else owns it.
    std::fs::File::from(unsafe { OwnedFd::from_raw_fd(STATUS_FD) })
}

/// Entry point of `__container-init`. Never returns.
pub fn run(spec_json: &str) -> ! {
    // Descriptors leaked by whoever started the agent must not reach the container (CRIU
    // cannot dump files from mounts outside it).
    // SAFETY: close_range on fds this process does not use (everything above the go pipe).
    unsafe {
        libc::syscall(libc::SYS_close_range, GO_FD as u32 + 1, u32::MAX, 0u32);
    }
    let mut status = status_pipe();
    let spec: InitSpec = match serde_json::from_str(spec_json) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(status, "err bad init spec: {e}");
            std::process::exit(2);
        }
    };
    // SAFETY: this process is single-threaded (freshly exec'd, no runtime started), so fork is sound.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            let _ = writeln!(status, "err fork: {e}");
            std::process::exit(2);
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = writeln!(status, "pid {child}");
            std::process::exit(0);
        }
        Ok(nix::unistd::ForkResult::Child) => {}
    }
    // Pid 1 of the container from here on.
    let mut go = [0u8; 1];
    match nix::unistd::read(GO_FD, &mut go) {
        Ok(1) => {}
        _ => std::process::exit(1),
    }
    let _ = nix::unistd::close(GO_FD);
    let err = match setup_and_exec(&spec) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let _ = writeln!(status, "err {err}");
    std::process::exit(127);
}

enum Never {}

fn ctx<T, E: std::fmt::Display>(
    r: Result<T, E>,
    what: impl FnOnce() -> String,
) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// "cannot bind X on Y: No such file or directory": the error and its cause.
fn rootfs_err(e: rebalancer_rootfs::RootfsError) -> String {
    match std::error::Error::source(&e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn setup_and_exec(spec: &InitSpec) -> Result<Never, String> {
    let plan: Vec<rebalancer_rootfs::Mount<'_>> = spec.mounts.iter().map(Into::into).collect();
    rebalancer_rootfs::make_private().map_err(rootfs_err)?;
    rebalancer_rootfs::enter(&spec.root, &plan).map_err(rootfs_err)?;
    ctx(nix::unistd::sethostname(&spec.hostname), || {
        "sethostname".into()
    })?;
    ctx(nix::unistd::setsid(), || "setsid".into())?;
    let gid = nix::unistd::Gid::from_raw(spec.gid);
    let uid = nix::unistd::Uid::from_raw(spec.uid);
    ctx(nix::unistd::setgroups(&[gid]), || "setgroups".into())?;
    ctx(nix::unistd::setgid(gid), || "setgid".into())?;
    ctx(nix::unistd::setuid(uid), || "setuid".into())?;
    ctx(nix::unistd::chdir(spec.cwd.as_str()), || {
        format!("chdir {}", spec.cwd)
    })?;
    ctx(
        nix::fcntl::fcntl(
            STATUS_FD,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        ),
        || "cloexec status".into(),
    )?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| "argv contains a NUL byte".to_string())?;
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<_, _>>()
        .map_err(|_| "env contains a NUL byte".to_string())?;
    let prog = argv.first().ok_or("empty argv")?;
    let e = nix::unistd::execvpe(prog, &argv, &env).map_err(|e| e.to_string());
    Err(format!(
        "exec {}: {}",
        spec.argv[0],
        e.err().unwrap_or_default()
    ))
}
