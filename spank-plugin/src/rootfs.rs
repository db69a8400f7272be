//! The container's file system, built in its pid 1 before it returns to Slurm: the same mount
//! plan the agent uses for its own containers (`PreparedTask.root` + `mounts`), so the agent's
//! dump and restore (external bind mounts, `criu restore --root`) work on SPANK containers too.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use rebalancer_proto::MountSpec;

use crate::sys::cvt;

#[derive(Debug, thiserror::Error)]
#[error("cannot {what}")]
pub struct RootfsError {
    what: String,
    #[source]
    source: io::Error,
}

/// Device nodes of the minimal /dev: (name, major, minor).
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn cs(p: &Path) -> Result<CString, RootfsError> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| RootfsError {
        what: format!("use path {}", p.display()),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

fn mount(
    src: Option<&str>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
    what: impl FnOnce() -> String,
) -> Result<(), RootfsError> {
    let c = |s: Option<&str>| s.map(CString::new).transpose();
    let (src, fstype, data) = match (c(src), c(fstype), c(data)) {
        (Ok(a), Ok(b), Ok(d)) => (a, b, d),
        _ => {
            return Err(RootfsError {
                what: what(),
                source: io::ErrorKind::InvalidInput.into(),
            })
        }
    };
    let dst = cs(dst)?;
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a valid C string or null, as mount(2) allows.
    cvt(unsafe { libc::mount(p(&src), dst.as_ptr(), p(&fstype), flags, p(&data).cast()) })
        .map(drop)
        .map_err(|source| RootfsError {
            what: what(),
            source,
        })
}

fn inside(root: &Path, target: &str) -> PathBuf {
    root.join(target.trim_start_matches('/'))
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> RootfsError {
    move |source| RootfsError { what, source }
}

/// Mounts `mounts` under `root`, pivots into it and mounts /proc of the new pid namespace.
/// Runs in the container's pid 1, in its own (private) mount namespace.
pub fn enter(root: &str, mounts: &[MountSpec]) -> Result<(), RootfsError> {
    let root = Path::new(root);
    mount(
        Some(&root.to_string_lossy()),
        root,
        None,
        libc::MS_BIND,
        None,
        || format!("bind the container root {} on itself", root.display()),
    )?;
    for m in mounts {
        mount_one(root, m)?;
    }
    let r = cs(root)?;
    // SAFETY: r is a valid path; chdir/pivot_root/umount2 take C strings and change only this
    // process's view of the file system.
    unsafe {
        cvt(libc::chdir(r.as_ptr())).map_err(io_err(format!("chdir {}", root.display())))?;
        cvt(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)
            .map_err(io_err("pivot_root into the container root".into()))?;
        cvt(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))
            .map_err(io_err("detach the node's root".into()))?;
        cvt(libc::chdir(c"/".as_ptr())).map_err(io_err("chdir /".into()))?;
    }
    if mounts.iter().any(|m| matches!(m, MountSpec::Proc)) {
        mount_proc(Path::new("/proc"))?;
    }
    Ok(())
}

/// A /proc of the current pid namespace at `at`.
pub fn mount_proc(at: &Path) -> Result<(), RootfsError> {
    mount(
        Some("proc"),
        at,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
        || format!("mount proc on {}", at.display()),
    )
}

fn mount_one(root: &Path, m: &MountSpec) -> Result<(), RootfsError> {
    match m {
        MountSpec::Bind {
            source,
            target,
            readonly,
        } => {
            let dst = inside(root, target);
            let is_dir = std::fs::metadata(source)
                .map(|m| m.is_dir())
                .unwrap_or(true);
            if is_dir {
                std::fs::create_dir_all(&dst)
                    .map_err(io_err(format!("mkdir {}", dst.display())))?;
            } else if !dst.exists() {
                std::fs::File::create(&dst).map_err(io_err(format!("create {}", dst.display())))?;
            }
            mount(
                Some(source),
                &dst,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
                || format!("bind {source} on {}", dst.display()),
            )?;
            if *readonly {
                mount(
                    None,
                    &dst,
                    None,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    None,
                    || format!("remount {} read-only", dst.display()),
                )?;
            }
        }
        MountSpec::Tmpfs { target, options } => {
            let dst = inside(root, target);
            std::fs::create_dir_all(&dst).map_err(io_err(format!("mkdir {}", dst.display())))?;
            mount(
                Some("tmpfs"),
                &dst,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some(options),
                || format!("mount tmpfs on {}", dst.display()),
            )?;
        }
        MountSpec::Dev => {
            let dev = inside(root, "/dev");
            std::fs::create_dir_all(&dev).map_err(io_err("mkdir /dev".into()))?;
            mount(
                Some("tmpfs"),
                &dev,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_STRICTATIME,
                Some("mode=755,size=65536k"),
                || "mount /dev".into(),
            )?;
            for (name, major, minor) in DEVICES {
                let p = dev.join(name);
                let c = cs(&p)?;
                // SAFETY: c is a valid path; mknod and chmod only create/modify that node.
                unsafe {
                    cvt(libc::mknod(
                        c.as_ptr(),
                        libc::S_IFCHR | 0o666,
                        libc::makedev(major, minor),
                    ))
                    .map_err(io_err(format!("mknod {}", p.display())))?;
                    // mknod honours the umask; the nodes must be world-usable.
                    cvt(libc::chmod(c.as_ptr(), 0o666))
                        .map_err(io_err(format!("chmod {}", p.display())))?;
                }
            }
            for (link, to) in [
                ("fd", "/proc/self/fd"),
                ("stdin", "/proc/self/fd/0"),
                ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"),
                ("ptmx", "pts/ptmx"),
            ] {
                std::os::unix::fs::symlink(to, dev.join(link))
                    .map_err(io_err(format!("link /dev/{link}")))?;
            }
            let shm = dev.join("shm");
            std::fs::create_dir_all(&shm).map_err(io_err("mkdir /dev/shm".into()))?;
            mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("mode=1777,size=65536k"),
                || "mount /dev/shm".into(),
            )?;
        }
        MountSpec::Proc => {
            // Mounted after the pivot; only the mountpoint here.
            let p = inside(root, "/proc");
            std::fs::create_dir_all(&p).map_err(io_err("mkdir /proc".into()))?;
        }
    }
    Ok(())
}
