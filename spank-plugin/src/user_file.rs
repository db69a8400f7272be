//! Opening a task's own stdin file again on the destination, on the user's behalf.
//!
//! The path comes from the source node's `/proc/PID/fd/0`, which the user controls (`--input`,
//! or any file dup2'd onto fd 0 and then replaced). The waiter runs as root, so it never opens
//! that path itself: a child that has dropped to the job's uid, gid and groups opens it without
//! following a final symlink, and the waiter accepts the descriptor only if it is the file the
//! task had (same inode as recorded in CRIU's `file[MNT:INO]` key) or `/dev/null`.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use libc::{c_int, gid_t, uid_t};

use crate::sys;

/// Whom to open as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    pub uid: uid_t,
    pub gid: gid_t,
}

/// Why a user's file was not handed to CRIU.
#[derive(Debug)]
pub enum Refusal {
    /// The key is not CRIU's external-file key (`file[MNT:INO]`).
    BadKey(String),
    /// The job's user cannot open the path (or it is a symlink now).
    Open { path: String, source: io::Error },
    /// The path now names something other than the file the task had.
    NotTheSame {
        path: String,
        found: String,
        expected: String,
    },
    /// Forking, dropping privileges or passing the descriptor failed.
    Sys {
        what: &'static str,
        source: io::Error,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadKey(k) => write!(f, "{k:?} is not an external file key"),
            Refusal::Open { path, source } if source.raw_os_error() == Some(libc::ELOOP) => {
                write!(f, "{path} is a symbolic link now; refusing to follow it")
            }
            Refusal::Open { path, source } => {
                write!(f, "the job's user cannot open {path}: {source}")
            }
            Refusal::NotTheSame {
                path,
                found,
                expected,
            } => write!(
                f,
                "{path} is no longer the task's stdin file ({found}, the task had {expected})"
            ),
            Refusal::Sys { what, source } => write!(f, "cannot {what}: {source}"),
        }
    }
}

impl std::error::Error for Refusal {}

/// The inode in CRIU's external-file key `file[MNT:INO]` (both hexadecimal). Pure.
pub fn key_inode(key: &str) -> Option<u64> {
    let inner = key.strip_prefix("file[")?.strip_suffix(']')?;
    let (mnt, ino) = inner.split_once(':')?;
    u32::from_str_radix(mnt, 16).ok()?;
    u64::from_str_radix(ino, 16).ok()
}

/// /dev/null's device number (1, 3) on every Linux.
fn is_dev_null(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
}

/// Checks that `st` is the file recorded on the source: `/dev/null` (whose inode differs from
/// node to node), or a regular file with the recorded inode (a shared file system keeps it).
/// Pure.
pub fn check_identity(path: &str, st: &libc::stat, inode: u64) -> Result<(), Refusal> {
    let kind = st.st_mode & libc::S_IFMT;
    if path == "/dev/null" && is_dev_null(st) {
        return Ok(());
    }
    if kind == libc::S_IFREG && st.st_ino == inode {
        return Ok(());
    }
    let found = if kind == libc::S_IFREG {
        format!("inode {}", st.st_ino)
    } else if is_dev_null(st) {
        "/dev/null".to_string()
    } else {
        format!("file type {:o}", kind >> 12)
    };
    Err(Refusal::NotTheSame {
        path: path.to_string(),
        found,
        expected: format!("inode {inode}"),
    })
}

/// Opens `path` read-only as `creds` and returns a descriptor criu can inherit (no
/// close-on-exec), after checking it is the file CRIU's `key` names.
pub fn open_task_file(path: &str, key: &str, creds: Creds) -> Result<OwnedFd, Refusal> {
    let inode = key_inode(key).ok_or_else(|| Refusal::BadKey(key.to_string()))?;
    let fd = open_as(path, creds)?;
    // SAFETY: stat is plain data, filled in by fstat on a descriptor we own.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        sys::cvt(libc::fstat(fd.as_raw_fd(), &mut st)).map_err(|source| Refusal::Sys {
            what: "fstat the stdin file",
            source,
        })?;
        st
    };
    check_identity(path, &st, inode)?;
    // Inherited by criu, and blocking again for the task (O_NONBLOCK only kept a FIFO from
    // hanging the open).
    // SAFETY: fcntl on a descriptor we own.
    sys::cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) })
        .and_then(|_| {
            // SAFETY: as above.
            let fl = sys::cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
            // SAFETY: as above.
            sys::cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) })
        })
        .map_err(|source| Refusal::Sys {
            what: "set the stdin file's flags",
            source,
        })?;
    Ok(fd)
}

/// The user's supplementary groups (just `gid` if the user is unknown to this node's NSS).
fn user_groups(creds: Creds) -> Vec<gid_t> {
    // SAFETY: getpwuid_r writes into pw and buf, both valid for the sizes given; the result
    // pointer is either null or &pw.
    let name = unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut res: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(creds.uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut res);
        if rc != 0 || res.is_null() || pw.pw_name.is_null() {
            return vec![creds.gid];
        }
        std::ffi::CStr::from_ptr(pw.pw_name).to_owned()
    };
    let mut n: c_int = 64;
    loop {
        let mut groups = vec![0 as gid_t; n as usize];
        let want = n;
        // SAFETY: groups has room for n entries; getgrouplist writes at most n and sets n.
        let rc =
            unsafe { libc::getgrouplist(name.as_ptr(), creds.gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        if n <= want || n > 65536 {
            return vec![creds.gid];
        }
    }
}

/// Opens `path` in a child that runs as `creds`, and receives the descriptor over a socketpair.
fn open_as(path: &str, creds: Creds) -> Result<OwnedFd, Refusal> {
    let sys_err = |what| move |source| Refusal::Sys { what, source };
    let cpath = CString::new(path).map_err(|_| Refusal::Open {
        path: path.to_string(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    let groups = user_groups(creds);
    let (mine, theirs) = sys::socketpair().map_err(sys_err("create a socketpair"))?;
    // SAFETY: the waiter is single-threaded, so the child may run arbitrary code; it only
    // makes async-signal-safe calls anyway and leaves with _exit.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(Refusal::Sys {
            what: "fork to open the stdin file as the user",
            source: io::Error::last_os_error(),
        });
    }
    if child == 0 {
        drop(mine);
        // SAFETY: plain syscalls on valid arguments; groups outlives setgroups. Order matters:
        // groups and gid while still root, uid last.
        let fd = unsafe {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(creds.gid, creds.gid, creds.gid) != 0
                || libc::setresuid(creds.uid, creds.uid, creds.uid) != 0
            {
                -1
            } else {
                libc::open(
                    cpath.as_ptr(),
                    libc::O_RDONLY
                        | libc::O_NOFOLLOW
                        | libc::O_NOCTTY
                        | libc::O_NONBLOCK
                        | libc::O_CLOEXEC,
                )
            }
        };
        let rc = if fd < 0 {
            let errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            sys::send_fds(theirs.as_raw_fd(), &[], &errno.to_ne_bytes())
        } else {
            sys::send_fds(theirs.as_raw_fd(), &[fd], &0i32.to_ne_bytes())
        };
        sys::exit_now(if rc.is_ok() { 0 } else { 1 })
    }
    drop(theirs);
    let got = sys::recv_fds(&mine, Duration::from_secs(30), 1);
    let _ = sys::blocking_wait(child);
    let (mut fds, data) = got.map_err(sys_err("receive the stdin file from the opener"))?;
    let errno = data
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(i32::from_ne_bytes)
        .unwrap_or(libc::EIO);
    match fds.pop() {
        Some(fd) if errno == 0 => Ok(fd),
        _ => Err(Refusal::Open {
            path: path.to_string(),
            source: io::Error::from_raw_os_error(if errno == 0 { libc::EIO } else { errno }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_of(path: &str) -> libc::stat {
        let c = CString::new(path).expect("path");
        // SAFETY: st is filled in by stat on a valid path.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::stat(c.as_ptr(), &mut st), 0, "stat {path}");
            st
        }
    }

    #[test]
    fn key_inode_parses_criu_external_file_keys() {
        assert_eq!(key_inode("file[1a:2b3c]"), Some(0x2b3c));
        assert_eq!(key_inode("file[1a:2b3c"), None);
        assert_eq!(key_inode("pipe:[123]"), None);
        assert_eq!(key_inode("file[zz:12]"), None);
        assert_eq!(key_inode("file[1:]"), None);
    }

    #[test]
    fn identity_accepts_the_recorded_inode_and_dev_null_only() {
        let dir = tempdir();
        let a = format!("{dir}/a");
        std::fs::write(&a, b"x").expect("write");
        let st = stat_of(&a);
        assert!(check_identity(&a, &st, st.st_ino).is_ok());
        let e = check_identity(&a, &st, st.st_ino + 1).expect_err("another inode");
        assert!(
            e.to_string().contains("no longer the task's stdin file"),
            "{e}"
        );
        let null = stat_of("/dev/null");
        assert!(check_identity("/dev/null", &null, 12345).is_ok());
        // /dev/null's device behind another name is not what the task had.
        assert!(check_identity(&a, &null, 12345).is_err());
        // A directory with the right inode is not a stdin file.
        let d = stat_of(&dir);
        assert!(check_identity(&dir, &d, d.st_ino).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    const NOBODY: Creds = Creds {
        uid: 65534,
        gid: 65534,
    };

    /// A root-only file and a file the user may read, in a directory the user may traverse.
    fn files() -> (String, String, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let secret = format!("{dir}/secret");
        std::fs::write(&secret, b"root only").expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let input = format!("{dir}/input");
        std::fs::write(&input, b"the task's input").expect("write");
        std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        (dir, secret, input)
    }

    fn key_of(path: &str) -> String {
        format!("file[1:{:x}]", stat_of(path).st_ino)
    }

    #[test]
    #[ignore = "needs root: drops to uid 65534 to open"]
    fn opens_the_users_own_file_as_the_user() {
        let (dir, _, input) = files();
        let fd = open_task_file(&input, &key_of(&input), NOBODY).expect("open as nobody");
        // SAFETY: fcntl on a descriptor we own.
        let fdflags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(fdflags & libc::FD_CLOEXEC, 0, "criu must inherit it");
        assert_eq!(
            sys::read_to_end(&fd, 64).expect("read"),
            b"the task's input"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    #[ignore = "needs root: drops to uid 65534 to open"]
    fn a_root_only_file_is_refused_even_with_its_own_inode() {
        let (dir, secret, _) = files();
        let e = open_task_file(&secret, &key_of(&secret), NOBODY).expect_err("root only");
        assert!(
            matches!(&e, Refusal::Open { source, .. } if source.raw_os_error() == Some(libc::EACCES)),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    #[ignore = "needs root: drops to uid 65534 to open"]
    fn a_deleted_name_symlinked_to_a_secret_is_refused() {
        let (dir, secret, input) = files();
        let key = key_of(&input);
        // The attack: the task's file is unlinked and `NAME (deleted)` points at root's file.
        std::fs::remove_file(&input).expect("unlink");
        let fake = format!("{input} (deleted)");
        std::os::unix::fs::symlink(&secret, &fake).expect("symlink");
        let e = open_task_file(&fake, &key, NOBODY).expect_err("a symlink");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // Even as root itself (a root job), the link is not followed.
        let root = Creds { uid: 0, gid: 0 };
        let e = open_task_file(&fake, &key, root).expect_err("a symlink, as root");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    #[ignore = "needs root: drops to uid 65534 to open"]
    fn a_replaced_file_is_refused() {
        let (dir, _, input) = files();
        let key = key_of(&input);
        // Replaced by another readable file: the user could read it, but it is not the
        // task's stdin, and CRIU would restore the task on the wrong data.
        let other = format!("{dir}/other");
        std::fs::write(&other, b"the task's input").expect("write");
        std::fs::rename(&other, &input).expect("rename");
        let e = open_task_file(&input, &key, Creds { uid: 0, gid: 0 }).expect_err("replaced");
        assert!(matches!(e, Refusal::NotTheSame { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    #[ignore = "needs root: drops to uid 65534 to open"]
    fn dev_null_opens_whatever_its_inode_on_the_source() {
        let fd = open_task_file("/dev/null", "file[5:999999]", NOBODY).expect("/dev/null");
        assert_eq!(sys::read_to_end(&fd, 8).expect("read"), b"");
    }

    fn tempdir() -> String {
        let d = std::env::temp_dir().join(format!(
            "user-file-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).expect("mkdir");
        d.display().to_string()
    }
}
