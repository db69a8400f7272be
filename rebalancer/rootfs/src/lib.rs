//! A container's file system, built by its pid 1 in its own mount namespace from a mount plan:
//! bind mounts of node paths (external to CRIU, `--external mnt[TARGET]:KEY`), tmpfs, a minimal
//! `/dev`, then `pivot_root` and a `/proc` of the container's pid namespace.
//!
//! One implementation for both kinds of container, so that the agent dumps and restores them the
//! same way: the agent's own containers (`rebalancer-agent __container-init`) and the tasks of
//! `--migratable` Slurm steps (the SPANK plugin, in the task's pid 1). It runs between fork and
//! exec, so it only makes system calls and allocates.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rebalancer_proto::MountSpec;

#[derive(Debug, thiserror::Error)]
#[error("cannot {what}")]
pub struct RootfsError {
    what: String,
    #[source]
    source: io::Error,
}

/// One entry of a mount plan, borrowed from the agent's plan or the wire's [`MountSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mount<'a> {
    Bind {
        source: &'a Path,
        target: &'a str,
        readonly: bool,
    },
    Tmpfs {
        target: &'a str,
        options: &'a str,
    },
    /// tmpfs on /dev with [`DEVICES`], the usual links and /dev/shm.
    Dev,
    /// Mounted after the pivot, so that it shows the container's pid namespace.
    Proc,
}

impl<'a> From<&'a MountSpec> for Mount<'a> {
    fn from(m: &'a MountSpec) -> Self {
        match m {
            MountSpec::Bind {
                source,
                target,
                readonly,
            } => Mount::Bind {
                source: Path::new(source),
                target,
                readonly: *readonly,
            },
            MountSpec::Tmpfs { target, options } => Mount::Tmpfs { target, options },
            MountSpec::Dev => Mount::Dev,
            MountSpec::Proc => Mount::Proc,
        }
    }
}

/// Device nodes of the minimal /dev: (name, major, minor).
pub const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Links of the minimal /dev: (name, target).
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RootfsError {
    let what = what.into();
    move |source| RootfsError { what, source }
}

fn cstr(s: &[u8], what: impl FnOnce() -> String) -> Result<CString, RootfsError> {
    CString::new(s).map_err(|_| RootfsError {
        what: what(),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

fn cpath(p: &Path) -> Result<CString, RootfsError> {
    cstr(p.as_os_str().as_bytes(), || {
        format!("use path {}", p.display())
    })
}

fn mount(
    src: Option<&[u8]>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
    what: impl Fn() -> String,
) -> Result<(), RootfsError> {
    let src = src.map(|s| cstr(s, &what)).transpose()?;
    let fstype = fstype.map(|s| cstr(s.as_bytes(), &what)).transpose()?;
    let data = data.map(|s| cstr(s.as_bytes(), &what)).transpose()?;
    let dst = cpath(dst)?;
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a valid C string or null, as mount(2) allows.
    cvt(unsafe { libc::mount(p(&src), dst.as_ptr(), p(&fstype), flags, p(&data).cast()) })
        .map(drop)
        .map_err(err(what()))
}

fn inside(root: &Path, target: &str) -> PathBuf {
    root.join(target.trim_start_matches('/'))
}

fn mkdir_p(p: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(p).map_err(err(format!("mkdir {}", p.display())))
}

/// Makes every mount of this (new) mount namespace private, so that nothing below propagates to
/// the node.
pub fn make_private() -> Result<(), RootfsError> {
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        || "make the mounts private".into(),
    )
}

/// Mounts `mounts` under `root`, pivots into it and mounts /proc of the current pid namespace if
/// the plan has one. Runs in the container's pid 1, in its own private mount namespace.
pub fn enter(root: &Path, mounts: &[Mount<'_>]) -> Result<(), RootfsError> {
    mount(
        Some(root.as_os_str().as_bytes()),
        root,
        None,
        libc::MS_BIND,
        None,
        || format!("bind the container root {} on itself", root.display()),
    )?;
    for m in mounts {
        mount_one(root, m)?;
    }
    let r = cpath(root)?;
    // SAFETY: r is a valid path; chdir, pivot_root and umount2 take C strings and change only
    // this process's view of the file system.
    unsafe {
        cvt(libc::chdir(r.as_ptr())).map_err(err(format!("chdir {}", root.display())))?;
        cvt(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)
            .map_err(err("pivot_root into the container root"))?;
        cvt(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))
            .map_err(err("detach the node's root"))?;
        cvt(libc::chdir(c"/".as_ptr())).map_err(err("chdir /"))?;
    }
    if mounts.iter().any(|m| matches!(m, Mount::Proc)) {
        mount_proc(Path::new("/proc"))?;
    }
    Ok(())
}

/// A /proc of the current pid namespace at `at`.
pub fn mount_proc(at: &Path) -> Result<(), RootfsError> {
    mount(
        Some(b"proc"),
        at,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
        || format!("mount proc on {}", at.display()),
    )
}

fn mount_one(root: &Path, m: &Mount<'_>) -> Result<(), RootfsError> {
    match *m {
        Mount::Bind {
            source,
            target,
            readonly,
        } => {
            let dst = inside(root, target);
            if std::fs::metadata(source).map_or(true, |md| md.is_dir()) {
                mkdir_p(&dst)?;
            } else if !dst.exists() {
                if let Some(parent) = dst.parent() {
                    mkdir_p(parent)?;
                }
                std::fs::File::create(&dst).map_err(err(format!("create {}", dst.display())))?;
            }
            // Not recursive: a mount below the source would be a mount CRIU does not know as
            // external, and the dump would fail.
            mount(
                Some(source.as_os_str().as_bytes()),
                &dst,
                None,
                libc::MS_BIND,
                None,
                || format!("bind {} on {}", source.display(), dst.display()),
            )?;
            if readonly {
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
        Mount::Tmpfs { target, options } => {
            let dst = inside(root, target);
            mkdir_p(&dst)?;
            mount(
                Some(b"tmpfs"),
                &dst,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some(options),
                || format!("mount tmpfs on {}", dst.display()),
            )?;
        }
        Mount::Dev => mount_dev(&inside(root, "/dev"))?,
        Mount::Proc => mkdir_p(&inside(root, "/proc"))?,
    }
    Ok(())
}

fn mount_dev(dev: &Path) -> Result<(), RootfsError> {
    mkdir_p(dev)?;
    mount(
        Some(b"tmpfs"),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
        || "mount /dev".into(),
    )?;
    for (name, major, minor) in DEVICES {
        let p = dev.join(name);
        let c = cpath(&p)?;
        // SAFETY: c is a valid path; mknod and chmod only create and modify that node.
        unsafe {
            cvt(libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            ))
            .map_err(err(format!("mknod {}", p.display())))?;
            // mknod honours the umask; the nodes must be world-usable.
            cvt(libc::chmod(c.as_ptr(), 0o666)).map_err(err(format!("chmod {}", p.display())))?;
        }
    }
    for (link, to) in DEV_LINKS {
        std::os::unix::fs::symlink(to, dev.join(link)).map_err(err(format!("link /dev/{link}")))?;
    }
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    mount(
        Some(b"shm"),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
        || "mount /dev/shm".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_mounts_convert_to_the_plan() {
        let spec = [
            MountSpec::Bind {
                source: "/usr".into(),
                target: "/usr".into(),
                readonly: true,
            },
            MountSpec::Tmpfs {
                target: "/tmp".into(),
                options: "mode=1777".into(),
            },
            MountSpec::Dev,
            MountSpec::Proc,
        ];
        let plan: Vec<Mount<'_>> = spec.iter().map(Mount::from).collect();
        assert_eq!(
            plan,
            [
                Mount::Bind {
                    source: Path::new("/usr"),
                    target: "/usr",
                    readonly: true
                },
                Mount::Tmpfs {
                    target: "/tmp",
                    options: "mode=1777"
                },
                Mount::Dev,
                Mount::Proc
            ]
        );
    }

    #[test]
    fn targets_land_under_the_root() {
        assert_eq!(
            inside(Path::new("/run/c/root"), "/var/tmp/x"),
            Path::new("/run/c/root/var/tmp/x")
        );
        let e = cstr(b"a\0b", || "use a path".into()).expect_err("NUL");
        assert_eq!(e.to_string(), "cannot use a path");
    }
}
