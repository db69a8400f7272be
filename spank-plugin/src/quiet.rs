//! srun's stderr while a migratable step runs: when a task moved and its source node leaves the
//! job, Slurm kills what is left of the step there and srun reports `srun: error: NODE: task T:
//! Killed` and `srun: Force Terminated StepId=J.S`, which reads as if the job had been killed.
//! srun's fd 2 goes through a pipe; a copying thread drops those two lines when a restore step
//! of the step exists (the kill is the move's), and passes everything else on unchanged.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// A line of srun's that a move causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillLine {
    /// `srun: error: NODE: task(s) T: Killed`.
    TaskKilled { node: String },
    /// `srun: Force Terminated StepId=J.S` (or `job step J.S`).
    ForceTerminated,
}

/// Classifies one line of srun's stderr for step `job.step`. Pure.
pub fn kill_line(line: &str, job: u32, step: u32) -> Option<KillLine> {
    let line = line.trim_end();
    if let Some(rest) = line.strip_prefix("srun: error: ") {
        let (node, what) = rest.split_once(": ")?;
        let (tasks, end) = what.rsplit_once(": ")?;
        if end == "Killed" && (tasks.starts_with("task ") || tasks.starts_with("tasks ")) {
            return Some(KillLine::TaskKilled {
                node: node.to_string(),
            });
        }
        return None;
    }
    let id = format!("{job}.{step}");
    let rest = line.strip_prefix("srun: Force Terminated ")?;
    let named = rest
        .strip_prefix("StepId=")
        .or(rest.strip_prefix("job step "))?;
    (named == id).then_some(KillLine::ForceTerminated)
}

struct Filter {
    /// srun's real stderr, put back at exit.
    saved: RawFd,
    /// Closed by the copying thread when it has passed everything on.
    done: std::sync::mpsc::Receiver<()>,
}

/// Longest wait for the copying thread at exit: a copy of the pipe's write end that something
/// else still holds must not keep srun from exiting.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

static FILTER: Mutex<Option<Filter>> = Mutex::new(None);
/// Nodes whose kill lines were dropped: where the moved tasks came from.
static SOURCES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The nodes tasks moved away from, as srun's dropped lines named them.
pub fn sources() -> Vec<String> {
    SOURCES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Whether step `step` of job `job` has moved (has a restore step): asked when a kill line
/// appears, since only then is the kill the move's.
pub type MovedCheck = fn(job: u32, step: u32) -> bool;

/// Puts srun's fd 2 behind the filter. On failure srun's stderr stays as it was.
pub fn install(job: u32, step: u32, moved: MovedCheck) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    // SAFETY: dup of srun's fd 2, an open descriptor.
    let saved = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
    // SAFETY: pipe2 returned two fresh descriptors owned here.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if saved < 0 {
        return;
    }
    // SAFETY: dup of saved, an open descriptor.
    let copy_fd = unsafe { libc::dup(saved) };
    if copy_fd < 0 {
        // SAFETY: saved is ours and no longer needed.
        unsafe { libc::close(saved) };
        return;
    }
    // SAFETY: copy_fd is a fresh duplicate of fd 2, owned by the copying thread's File.
    let out = unsafe { std::fs::File::from_raw_fd(copy_fd) };
    let (tx, done) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("rebalancer-stderr".into())
        .spawn(move || {
            copy(read, out, job, step, moved);
            drop(tx);
        });
    if spawned.is_err() {
        // SAFETY: saved is ours and no longer needed.
        unsafe { libc::close(saved) };
        return;
    };
    // SAFETY: both descriptors are open; dup2 makes fd 2 the pipe's write end (fd 2 is not
    // close-on-exec, as before).
    unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&write), 2) };
    drop(write);
    *FILTER.lock().unwrap_or_else(|e| e.into_inner()) = Some(Filter { saved, done });
}

/// Puts srun's stderr back and waits until the filter has passed everything on.
pub fn remove() {
    let Some(f) = FILTER.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    // SAFETY: flushes stdio's buffered stderr into the pipe first; then fd 2 becomes srun's
    // stderr again, which closes the pipe's last write end, so the thread sees its end.
    unsafe {
        libc::fflush(std::ptr::null_mut());
        libc::dup2(f.saved, 2);
        libc::close(f.saved);
    }
    let _ = f.done.recv_timeout(DRAIN_WAIT);
}

fn copy(read: OwnedFd, mut out: std::fs::File, job: u32, step: u32, has_moved: MovedCheck) {
    let mut moved = false;
    for line in BufReader::new(std::fs::File::from(read)).split(b'\n') {
        let Ok(mut line) = line else { return };
        let text = String::from_utf8_lossy(&line).into_owned();
        if let Some(k) = kill_line(&text, job, step) {
            // The kill is the move's if the step has a restore step (created before the
            // source is released).
            moved = moved || has_moved(job, step);
            if moved {
                if let KillLine::TaskKilled { node } = k {
                    SOURCES.lock().unwrap_or_else(|e| e.into_inner()).push(node);
                }
                continue;
            }
        }
        line.push(b'\n');
        let _ = out.write_all(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_moves_kill_lines_are_recognised() {
        assert_eq!(
            kill_line("srun: error: node1: task 0: Killed", 1, 0),
            Some(KillLine::TaskKilled {
                node: "node1".into()
            })
        );
        assert_eq!(
            kill_line("srun: error: node1: tasks 0-1: Killed\n", 1, 0),
            Some(KillLine::TaskKilled {
                node: "node1".into()
            })
        );
        assert_eq!(
            kill_line("srun: Force Terminated StepId=1.0", 1, 0),
            Some(KillLine::ForceTerminated)
        );
        assert_eq!(
            kill_line("srun: Force Terminated job step 1.0", 1, 0),
            Some(KillLine::ForceTerminated)
        );
        // Other steps, other errors and the task's own output pass.
        assert_eq!(kill_line("srun: Force Terminated StepId=1.2", 1, 0), None);
        assert_eq!(
            kill_line("srun: error: node1: task 0: Exited with exit code 3", 1, 0),
            None
        );
        assert_eq!(kill_line("Killed", 1, 0), None);
        assert_eq!(kill_line("task 0: Killed", 1, 0), None);
    }
}
