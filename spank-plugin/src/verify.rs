//! How the agent checks that a SPANK request really comes from the step it names.
//!
//! Written here, next to the code that sends the requests, so both sides change together; the
//! agent can call [`verify_task_request`] with its peer's SO_PEERCRED (or copy the rules).
//! The facts relied on, all from Slurm 22.05's slurmstepd:
//! - a task process runs `task_init_privileged` as root, as a direct child of the step's
//!   slurmstepd, before it drops to the user's uid; a user's own processes are never root;
//! - slurmstepd sets its process title to `slurmstepd: [JOB.STEP]` (`JOB.batch`, `JOB.extern`,
//!   `JOB.interactive` for the special steps; heterogeneous components as `JOB+OFFSET.STEP`);
//! - the container's pid 1 (`register-task`) is a child of that task process.

use rebalancer_proto::TaskRegistration;

use crate::container::step_name;

/// What the agent reads from /proc; a trait so the rules are tested without a real step.
pub trait ProcView {
    fn parent(&self, pid: i32) -> Option<i32>;
    /// NUL-separated command line with the NULs turned into spaces, trimmed.
    fn cmdline(&self, pid: i32) -> Option<String>;
    /// File name of /proc/PID/exe's target.
    fn exe_name(&self, pid: i32) -> Option<String>;
}

pub struct RealProc;

impl ProcView for RealProc {
    fn parent(&self, pid: i32) -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses: fields follow the last ')'.
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        rest.split_whitespace().nth(1)?.parse().ok()
    }
    fn cmdline(&self, pid: i32) -> Option<String> {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let s: String = String::from_utf8_lossy(&raw).replace('\0', " ");
        Some(s.trim().to_string())
    }
    fn exe_name(&self, pid: i32) -> Option<String> {
        let p = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        Some(p.file_name()?.to_string_lossy().into_owned())
    }
}

/// Which request is being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRequest {
    /// `prepare-task` / `prepare-restore`: `registration.pid` is the peer itself.
    Prepare,
    /// `register-task`: `registration.pid` is the peer's child.
    Register,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("peer uid {0} is not root: only a Slurm task process before it drops privileges may register")]
    NotRoot(u32),
    #[error("peer pid {0} has no parent process")]
    NoParent(i32),
    #[error("parent {ppid} of peer {peer} is not slurmstepd (exe {exe:?})")]
    NotStepd {
        peer: i32,
        ppid: i32,
        exe: Option<String>,
    },
    #[error("peer {peer} belongs to step [{actual}], not [{claimed}]")]
    WrongStep {
        peer: i32,
        claimed: String,
        actual: String,
    },
    #[error("pid {pid} is not {expected}")]
    WrongPid { pid: i32, expected: &'static str },
}

/// `slurmstepd: [42.0]` → `42.0`.
fn step_of_title(title: &str) -> Option<&str> {
    let inner = title.strip_prefix("slurmstepd:")?.trim();
    inner.strip_prefix('[')?.strip_suffix(']')
}

pub fn verify_task_request(
    proc: &dyn ProcView,
    peer_pid: i32,
    peer_uid: u32,
    kind: TaskRequest,
    reg: &TaskRegistration,
) -> Result<(), VerifyError> {
    if peer_uid != 0 {
        return Err(VerifyError::NotRoot(peer_uid));
    }
    let ppid = proc
        .parent(peer_pid)
        .ok_or(VerifyError::NoParent(peer_pid))?;
    let exe = proc.exe_name(ppid);
    // Debian installs it as slurmstepd-wlm behind an alternatives link.
    if !exe
        .as_deref()
        .is_some_and(|e| e == "slurmstepd" || e.starts_with("slurmstepd-"))
    {
        return Err(VerifyError::NotStepd {
            peer: peer_pid,
            ppid,
            exe,
        });
    }
    let title = proc.cmdline(ppid).unwrap_or_default();
    let actual = step_of_title(&title).unwrap_or("?").to_string();
    let claimed = format!("{}.{}", reg.task.job_id, step_name(reg.task.step_id));
    // Heterogeneous job components show as JOB+OFFSET.STEP; the registration carries JOB.
    let matches = actual == claimed || {
        let want_step = format!(".{}", step_name(reg.task.step_id));
        actual.starts_with(&format!("{}+", reg.task.job_id)) && actual.ends_with(&want_step)
    };
    if !matches {
        return Err(VerifyError::WrongStep {
            peer: peer_pid,
            claimed,
            actual,
        });
    }
    match kind {
        TaskRequest::Prepare if reg.pid != peer_pid => Err(VerifyError::WrongPid {
            pid: reg.pid,
            expected: "the connecting task process",
        }),
        TaskRequest::Register if proc.parent(reg.pid) != Some(peer_pid) => {
            Err(VerifyError::WrongPid {
                pid: reg.pid,
                expected: "a child of the connecting task process",
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rebalancer_proto::TaskRef;

    use super::*;

    #[derive(Default)]
    struct Fake {
        procs: HashMap<i32, (i32, &'static str, &'static str)>,
    }
    impl ProcView for Fake {
        fn parent(&self, pid: i32) -> Option<i32> {
            self.procs.get(&pid).map(|p| p.0)
        }
        fn cmdline(&self, pid: i32) -> Option<String> {
            self.procs.get(&pid).map(|p| p.1.to_string())
        }
        fn exe_name(&self, pid: i32) -> Option<String> {
            self.procs.get(&pid).map(|p| p.2.to_string())
        }
    }

    fn tree() -> Fake {
        let mut f = Fake::default();
        f.procs.insert(100, (1, "slurmstepd: [42.0]", "slurmstepd"));
        f.procs
            .insert(200, (1, "slurmstepd: [42.batch]", "slurmstepd"));
        f.procs
            .insert(101, (100, "slurmstepd: [42.0]", "slurmstepd"));
        f.procs.insert(102, (101, "sleep 100", "sleep"));
        f.procs
            .insert(201, (200, "slurmstepd: [42.batch]", "slurmstepd"));
        f.procs.insert(300, (1, "bash", "bash"));
        f.procs.insert(301, (300, "python3 fake.py", "python3"));
        f.procs
            .insert(400, (1, "slurmstepd: [43+1.0]", "slurmstepd"));
        f.procs
            .insert(401, (400, "slurmstepd: [43+1.0]", "slurmstepd"));
        f
    }

    fn reg(job: u32, step: u32, pid: i32) -> TaskRegistration {
        TaskRegistration {
            task: TaskRef {
                job_id: job,
                step_id: step,
                task_id: 0,
            },
            pid,
            uid: 1000,
            gid: 1000,
            node: "node1".into(),
            class: None,
            mode: None,
            cpus: None,
            memory_limit: None,
            container: None,
            address: None,
            rss_bytes: None,
            waiter_pid: None,
            cwd: None,
            program: None,
        }
    }

    #[test]
    fn the_task_process_of_the_named_step_is_accepted() {
        let f = tree();
        verify_task_request(&f, 101, 0, TaskRequest::Prepare, &reg(42, 0, 101)).expect("prepare");
        verify_task_request(&f, 101, 0, TaskRequest::Register, &reg(42, 0, 102)).expect("register");
        let batch = reg(42, crate::ffi::SLURM_BATCH_SCRIPT, 201);
        verify_task_request(&f, 201, 0, TaskRequest::Prepare, &batch).expect("batch step");
        verify_task_request(&f, 401, 0, TaskRequest::Prepare, &reg(43, 0, 401)).expect("het");
    }

    #[test]
    fn impostors_are_refused() {
        let f = tree();
        assert_eq!(
            verify_task_request(&f, 101, 1000, TaskRequest::Prepare, &reg(42, 0, 101)),
            Err(VerifyError::NotRoot(1000))
        );
        // A root process that is not under slurmstepd.
        assert!(matches!(
            verify_task_request(&f, 301, 0, TaskRequest::Prepare, &reg(42, 0, 301)),
            Err(VerifyError::NotStepd { ppid: 300, .. })
        ));
        // A task of step 42.0 claiming job 7 or step 42.1.
        assert!(matches!(
            verify_task_request(&f, 101, 0, TaskRequest::Prepare, &reg(7, 0, 101)),
            Err(VerifyError::WrongStep { .. })
        ));
        assert!(matches!(
            verify_task_request(&f, 101, 0, TaskRequest::Prepare, &reg(42, 1, 101)),
            Err(VerifyError::WrongStep { .. })
        ));
        // Registering someone else's process as the container.
        assert!(matches!(
            verify_task_request(&f, 101, 0, TaskRequest::Register, &reg(42, 0, 301)),
            Err(VerifyError::WrongPid { pid: 301, .. })
        ));
        assert!(matches!(
            verify_task_request(&f, 101, 0, TaskRequest::Prepare, &reg(42, 0, 102)),
            Err(VerifyError::WrongPid { pid: 102, .. })
        ));
        assert!(matches!(
            verify_task_request(&f, 999, 0, TaskRequest::Prepare, &reg(42, 0, 999)),
            Err(VerifyError::NoParent(999))
        ));
    }

    #[test]
    fn real_proc_reads_this_process() {
        // SAFETY: getpid/getppid have no preconditions.
        let (me, pp) = unsafe { (libc::getpid(), libc::getppid()) };
        assert_eq!(RealProc.parent(me), Some(pp));
        assert!(RealProc.cmdline(me).is_some_and(|c| !c.is_empty()));
        assert!(RealProc.exe_name(me).is_some());
    }
}
