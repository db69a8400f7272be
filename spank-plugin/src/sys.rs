//! Small syscall helpers shared by the container and restore paths (single-threaded task
//! process only: both run in the child slurmstepd forked for a task).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use libc::{c_int, pid_t};

pub fn cvt(rc: c_int) -> io::Result<c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Signals the waiter takes with sigtimedwait instead of dying from them: drained while its
/// container runs here (Slurm signals the container itself), passed on through the agent once
/// the container runs elsewhere. SIGKILL and SIGSTOP act on the waiter as on any task.
pub const FORWARDED: [c_int; 11] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGCONT,
    libc::SIGTSTP,
    libc::SIGWINCH,
    libc::SIGXCPU,
];

pub struct SigMask {
    pub set: libc::sigset_t,
    pub old: libc::sigset_t,
}

/// Blocks the forwarded signals and SIGCHLD (taken with sigtimedwait); SIGCHLD gets its default
/// disposition so that the child is not auto-reaped.
pub fn block_waiter_signals() -> io::Result<SigMask> {
    // SAFETY: zeroed sigset_t is a valid argument for sigemptyset, which initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set points to a live sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
    }
    // SAFETY: both pointers refer to live sigset_t values.
    cvt(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) })?;
    Ok(SigMask { set, old })
}

/// Restores the mask saved by [`block_waiter_signals`] (in the container's pid 1).
pub fn restore_mask(m: &SigMask) {
    // SAFETY: m.old is the mask sigprocmask returned earlier.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &m.old, std::ptr::null_mut()) };
}

/// Waits up to `timeout` for one signal of `set`; `None` on timeout.
pub fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<c_int> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: set and ts are valid; a null siginfo pointer is allowed.
    let s = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (s > 0).then_some(s)
}

/// Non-blocking waitpid; `Some(status)` once `pid` ended.
pub fn try_wait(pid: pid_t) -> io::Result<Option<c_int>> {
    let mut status: c_int = 0;
    loop {
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(Some(status));
        }
        if r == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn blocking_wait(pid: pid_t) -> io::Result<c_int> {
    let mut status: c_int = 0;
    loop {
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Ends this process the way a child with wait status `status` ended: same exit code, or the
/// same signal (re-raised with its default action) so that Slurm records it faithfully.
pub fn exit_like(status: c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: resetting a disposition, unblocking and raising are async-signal-safe and
        // affect only this process, which is about to end.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            // No core dump of the waiter: its image says nothing about the task.
            let lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &lim);
            libc::raise(sig);
        }
        exit_now(128 + sig)
    }
    exit_now(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    })
}

/// `_exit`: the waiter lives in a forked copy of slurmstepd and must not run its atexit code.
pub fn exit_now(code: c_int) -> ! {
    // SAFETY: _exit never returns and is always safe to call.
    unsafe { libc::_exit(code) }
}

pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded; the descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: fds has room for two descriptors.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: fresh descriptors from socketpair.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Most descriptors one [`send_fds`] message carries.
pub const MAX_PASSED_FDS: usize = 4;
/// Most bytes of data alongside them.
const MAX_PASSED_DATA: usize = 16;
const CMSG_BUF: usize = 64;

/// Sends `data` (1 to 16 bytes) and `fds` (at most [`MAX_PASSED_FDS`]) in one SCM_RIGHTS message.
pub fn send_fds(sock: RawFd, fds: &[RawFd], data: &[u8]) -> io::Result<()> {
    if fds.len() > MAX_PASSED_FDS || data.is_empty() || data.len() > MAX_PASSED_DATA {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut bytes = [0u8; MAX_PASSED_DATA];
    bytes[..data.len()].copy_from_slice(data);
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cbuf = [0u8; CMSG_BUF];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call, and
    // the control buffer is large enough for one SCM_RIGHTS header with MAX_PASSED_FDS
    // descriptors.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let size = std::mem::size_of_val(fds) as u32;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(size) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(size) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
        cvt(libc::sendmsg(sock, &msg, 0) as c_int)?;
    }
    Ok(())
}

/// Receives one [`send_fds`] message: its descriptors (close-on-exec; more than `max_fds`
/// is an error, and all are closed) and its data.
pub fn recv_fds(
    sock: &OwnedFd,
    timeout: Duration,
    max_fds: usize,
) -> io::Result<(Vec<OwnedFd>, Vec<u8>)> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
    cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    })?;
    let mut bytes = [0u8; MAX_PASSED_DATA];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    let mut cbuf = [0u8; CMSG_BUF];
    let mut out = Vec::new();
    // SAFETY: as in send_fds; CMSG_* walk only the control buffer the kernel filled in, and
    // every descriptor it holds is fresh and ours.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.len() as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    out.push(OwnedFd::from_raw_fd(*data.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        n as usize
    };
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"));
    }
    if out.len() > max_fds {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected at most {max_fds} descriptors, got {}", out.len()),
        ));
    }
    Ok((out, bytes[..n].to_vec()))
}

pub fn open_ro(path: &str) -> io::Result<OwnedFd> {
    let p = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: p is a valid NUL-terminated path.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
    // SAFETY: open returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Reads until EOF (at most `max` bytes).
pub fn read_to_end(fd: &OwnedFd, max: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while out.len() < max {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    Ok(out)
}

/// VmRSS of `pid` in bytes.
pub fn rss_bytes(pid: pid_t) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn describe_status(status: c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}
