//! Keeping the container in the task's cgroups.
//!
//! slurmstepd moves each task process into its per-task cgroups (task/cgroup: `step_N/task_M`)
//! *after* forking it, from its own loop, while the task may already be in
//! `task_init_privileged` forking the container. A container forked before that move would stay
//! one level up. Slurm lets a task exec only after that loop (its exec barrier), so pid 1, once
//! past the barrier (in `slurm_spank_task_init`), asks the waiter to copy the waiter's final
//! cgroups onto it and waits for the answer before the user's program starts.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use crate::sys;

/// Pid 1's ends: write a byte when past Slurm's barrier, then read the waiter's answer.
static BARRIER_W: AtomicI32 = AtomicI32::new(-1);
static ACK_R: AtomicI32 = AtomicI32::new(-1);

/// The waiter's ends.
pub struct Barrier {
    reached_r: OwnedFd,
    ack_w: OwnedFd,
}

/// Pipes for the barrier; call before forking pid 1, then [`child_side`] / [`Barrier::parent`].
pub fn pipes() -> io::Result<(Barrier, (OwnedFd, OwnedFd))> {
    let (reached_r, reached_w) = sys::pipe()?;
    let (ack_r, ack_w) = sys::pipe()?;
    Ok((Barrier { reached_r, ack_w }, (reached_w, ack_r)))
}

/// In pid 1: keep its ends for `slurm_spank_task_init`.
pub fn child_side(ends: (OwnedFd, OwnedFd)) {
    BARRIER_W.store(ends.0.into_raw_fd(), Ordering::SeqCst);
    ACK_R.store(ends.1.into_raw_fd(), Ordering::SeqCst);
}

/// In pid 1, in `slurm_spank_task_init` (past Slurm's barrier): ask and wait. No-op elsewhere.
pub fn child_reached() {
    let w = BARRIER_W.swap(-1, Ordering::SeqCst);
    let r = ACK_R.swap(-1, Ordering::SeqCst);
    if w < 0 || r < 0 {
        return;
    }
    // SAFETY: both descriptors were stored by child_side and are owned by nobody else now.
    let (w, r) = unsafe { (OwnedFd::from_raw_fd(w), OwnedFd::from_raw_fd(r)) };
    if sys::write_all(w.as_raw_fd(), b"b").is_ok() {
        // The answer, or EOF if the waiter is gone: either way the program may start.
        let _ = sys::read_to_end(&r, 1);
    }
}

impl Barrier {
    /// In the waiter: wait (bounded) for pid 1 to pass Slurm's barrier, move it into this
    /// process's cgroups, and let it go on. Returns what was moved, for the log.
    pub fn parent(self, pid: libc::pid_t, timeout: Duration) -> Vec<String> {
        let mut moved = Vec::new();
        if wait_readable(&self.reached_r, timeout) {
            let got = sys::read_to_end(&self.reached_r, 1).unwrap_or_default();
            if got == b"b" {
                moved = follow(pid);
            }
        }
        let _ = sys::write_all(self.ack_w.as_raw_fd(), b"a");
        moved
    }
}

fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: p is one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n >= 0 {
            return n > 0;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// `/proc/PID/cgroup` as (hierarchy id, controllers, path).
fn memberships(pid: &str) -> Vec<(String, String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            Some((
                it.next()?.to_string(),
                it.next()?.to_string(),
                it.next()?.to_string(),
            ))
        })
        .collect()
}

/// Mount point of the hierarchy with `controllers` (v1: "memory", "cpu,cpuacct",
/// "name=systemd"; empty: the cgroup2 hierarchy), from this process's mountinfo.
fn mount_point(controllers: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let fstype = post.next()?;
        let _source = post.next()?;
        let opts = post.next().unwrap_or("");
        let mnt = pre.split_whitespace().nth(4)?;
        let ok = if controllers.is_empty() {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup"
                && controllers
                    .split(',')
                    .all(|c| opts.split(',').any(|o| o == c))
        };
        ok.then(|| PathBuf::from(mnt))
    })
}

/// Moves `pid` into every cgroup of this process it is not in yet.
pub fn follow(pid: libc::pid_t) -> Vec<String> {
    follow_from("self", pid)
}

/// Moves `pid` into every cgroup of process `from` (a pid, or "self") it is not in yet; returns
/// the hierarchies it was moved in.
pub fn follow_from(from: &str, pid: libc::pid_t) -> Vec<String> {
    let mine = memberships(from);
    let theirs = memberships(&pid.to_string());
    let mut moved = Vec::new();
    for (id, ctrl, path) in mine {
        if theirs.iter().any(|(i, _, p)| *i == id && *p == path) {
            continue;
        }
        let Some(mnt) = mount_point(&ctrl) else {
            continue;
        };
        let procs = mnt.join(path.trim_start_matches('/')).join("cgroup.procs");
        if std::fs::write(&procs, pid.to_string()).is_ok() {
            moved.push(format!(
                "{}:{path}",
                if ctrl.is_empty() { "unified" } else { &ctrl }
            ));
        }
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cgroups_and_follows_itself() {
        let m = memberships("self");
        assert!(!m.is_empty(), "no /proc/self/cgroup");
        // Already in every cgroup of its own: nothing to move.
        // SAFETY: getpid has no preconditions.
        assert!(follow(unsafe { libc::getpid() }).is_empty());
    }

    #[test]
    fn barrier_lets_the_child_go_even_without_a_move() {
        let (b, ends) = pipes().expect("pipes");
        let t = std::thread::spawn(move || {
            child_side(ends);
            child_reached();
        });
        // SAFETY: getpid has no preconditions.
        let moved = b.parent(unsafe { libc::getpid() }, Duration::from_secs(5));
        t.join().expect("child side");
        assert!(moved.is_empty(), "{moved:?}");
    }
}
