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
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
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

/// Device nodes of the minimal /dev: (name, major, minor).
pub const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

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

fn inside(root: &Path, target: &str) -> PathBuf {
    root.join(target.trim_start_matches('/'))
}

fn setup_and_exec(spec: &InitSpec) -> Result<Never, String> {
    let root = &spec.root;
    ctx(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
        || "make / private".into(),
    )?;
    ctx(
        mount(
            Some(root.as_path()),
            root.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
        || format!("bind root {}", root.display()),
    )?;
    for m in &spec.mounts {
        mount_one(root, m)?;
    }
    ctx(nix::unistd::chdir(root.as_path()), || "chdir root".into())?;
    ctx(nix::unistd::pivot_root(".", "."), || "pivot_root".into())?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detach old root".into()
    })?;
    ctx(nix::unistd::chdir("/"), || "chdir /".into())?;
    for m in &spec.mounts {
        if let MountPlan::Proc = m {
            ctx(
                mount(
                    Some("proc"),
                    "/proc",
                    Some("proc"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    None::<&str>,
                ),
                || "mount /proc".into(),
            )?;
        }
    }
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

fn mount_one(root: &Path, m: &MountPlan) -> Result<(), String> {
    match m {
        MountPlan::Bind {
            source,
            target,
            readonly,
        } => {
            let dst = inside(root, target);
            let is_dir = std::fs::metadata(source)
                .map(|md| md.is_dir())
                .unwrap_or(true);
            if is_dir {
                ctx(std::fs::create_dir_all(&dst), || {
                    format!("mkdir {}", dst.display())
                })?;
            } else if !dst.exists() {
                if let Some(p) = dst.parent() {
                    ctx(std::fs::create_dir_all(p), || {
                        format!("mkdir {}", p.display())
                    })?;
                }
                ctx(std::fs::File::create(&dst), || {
                    format!("create {}", dst.display())
                })?;
            }
            ctx(
                mount(
                    Some(source.as_path()),
                    &dst,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                ),
                || format!("bind {} on {}", source.display(), dst.display()),
            )?;
            if *readonly {
                ctx(
                    mount(
                        None::<&str>,
                        &dst,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    ),
                    || format!("remount {} read-only", dst.display()),
                )?;
            }
        }
        MountPlan::Tmpfs { target, options } => {
            let dst = inside(root, target);
            ctx(std::fs::create_dir_all(&dst), || {
                format!("mkdir {}", dst.display())
            })?;
            ctx(
                mount(
                    Some("tmpfs"),
                    &dst,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(options.as_str()),
                ),
                || format!("mount tmpfs on {}", dst.display()),
            )?;
        }
        MountPlan::Dev => {
            let dev = inside(root, "/dev");
            ctx(std::fs::create_dir_all(&dev), || "mkdir /dev".into())?;
            ctx(
                mount(
                    Some("tmpfs"),
                    &dev,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
                    Some("mode=755,size=65536k"),
                ),
                || "mount /dev".into(),
            )?;
            for (name, major, minor) in DEVICES {
                let p = dev.join(name);
                ctx(
                    nix::sys::stat::mknod(
                        &p,
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::from_bits_truncate(0o666),
                        nix::sys::stat::makedev(major, minor),
                    ),
                    || format!("mknod {}", p.display()),
                )?;
                // mknod honours the umask; the nodes must be world-usable.
                let cpath = CString::new(p.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
                // SAFETY: cpath is a valid NUL-terminated path.
                if unsafe { libc::chmod(cpath.as_ptr(), 0o666) } != 0 {
                    return Err(format!("chmod {}", p.display()));
                }
            }
            for (link, to) in [
                ("fd", "/proc/self/fd"),
                ("stdin", "/proc/self/fd/0"),
                ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"),
                ("ptmx", "pts/ptmx"),
            ] {
                ctx(std::os::unix::fs::symlink(to, dev.join(link)), || {
                    format!("link /dev/{link}")
                })?;
            }
            let shm = dev.join("shm");
            ctx(std::fs::create_dir_all(&shm), || "mkdir /dev/shm".into())?;
            ctx(
                mount(
                    Some("shm"),
                    &shm,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    Some("mode=1777,size=65536k"),
                ),
                || "mount /dev/shm".into(),
            )?;
        }
        MountPlan::Proc => {
            // Mounted after pivot_root (needs the new pid namespace's view); only the mountpoint here.
            let dst = inside(root, "/proc");
            ctx(std::fs::create_dir_all(&dst), || "mkdir /proc".into())?;
        }
    }
    Ok(())
}
