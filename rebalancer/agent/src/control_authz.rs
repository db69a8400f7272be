//! Who may report a task's end or signal a container on the control socket.
//!
//! `task-exited` destroys the task's network namespace and sends its wait status upstream (to
//! the source node, then to srun). Only the party that reaped pid 1 can know that status: the
//! task's waiter, a root child of the step's slurmstepd that the SPANK checks
//! (`spank::verify`) accepted when it registered the task. The report is therefore bound to
//! the very control connection that registered the task: a user, even the task's owner, never
//! holds that connection (the waiter's fd is closed in pid 1 before the user's program runs), so
//! a forged report is refused whatever it claims. Where the agent can observe the truth itself
//! it checks it too: pid 1 must no longer run as the waiter's child, and the status must be one
//! `waitpid` can return.
//!
//! `kill-container` stays a user's right for their own containers (it is what `kill(2)` already
//! allows them); other users' containers are invisible and answer "not found".

use std::sync::Mutex;

use crate::error::AgentError;

/// Containers a control connection registered (`register-task`), in registration order. One
/// per connection: the waiter's.
#[derive(Debug, Default)]
pub struct Registered(Mutex<Vec<String>>);

impl Registered {
    /// Notes that this connection registered `container`.
    pub fn add(&self, container: &str) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !v.iter().any(|c| c == container) {
            v.push(container.to_string());
        }
    }

    pub fn contains(&self, container: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|c| c == container)
    }
}

/// What the agent sees of a container's pid 1 when its end is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid1 {
    /// Gone, a zombie, or no longer the reporter's child (its pid was reused): it ended.
    Ended,
    /// Runs, as a child of the reporting process.
    RunsUnder(i32),
}

/// Reads /proc for `pid`: still running, and whose child? Zombies count as ended (the waiter
/// is about to reap, or just reaped, them).
pub fn observe_pid1(pid: i32) -> Pid1 {
    match crate::procstat::ProcStat::of(pid) {
        Some(s) if !s.ended() => Pid1::RunsUnder(s.ppid),
        _ => Pid1::Ended,
    }
}

/// Whether `status` is a value `waitpid` can return for a process that ended: an exit
/// (`WIFEXITED`, code 0-255) or a death by signal (`WIFSIGNALED`, signal 1-64, optional core
/// flag). Stopped/continued encodings and anything larger are not an end.
pub fn is_end_status(status: i32) -> bool {
    if !(0..=0xffff).contains(&status) {
        return false;
    }
    let sig = status & 0x7f;
    if sig == 0 {
        return true;
    }
    // 0x7f is "stopped"; a signalled status has no exit code bits.
    sig != 0x7f && sig <= 64 && (status >> 8) == 0
}

/// Checks a `task-exited` report. Pure over the facts passed in (unit-tested):
/// `caller_uid`/`caller_pid` from SO_PEERCRED, `registered` the containers this connection
/// registered, `pid1` what the agent sees of the container's pid 1 (`None` when the container
/// has no local pid 1 any more: it moved away), `same_waiter` whether the caller is the very
/// process that registered the container (its recorded pid and start time): after an agent
/// restart that process reports on a new connection.
pub fn check_task_exited(
    caller_uid: u32,
    caller_pid: Option<i32>,
    registered: &Registered,
    container: &str,
    wait_status: i32,
    pid1: Option<(i32, Pid1)>,
    same_waiter: bool,
) -> Result<(), AgentError> {
    if caller_uid != 0 {
        return Err(AgentError::PermissionDenied(format!(
            "task-exited for {container} refused: uid {caller_uid} is not the task's waiter \
             (only the root task process that registered {container} reports its end)"
        )));
    }
    if !registered.contains(container) && !same_waiter {
        return Err(AgentError::PermissionDenied(format!(
            "task-exited for {container} refused: this connection did not register it \
             (only the task process that registered {container} reports its end: on the same \
             connection, or after an agent restart as that same process)"
        )));
    }
    if !is_end_status(wait_status) {
        return Err(AgentError::BadRequest(format!(
            "task-exited for {container}: wait status {wait_status:#x} is not the status of an \
             ended process"
        )));
    }
    if let (Some((pid, Pid1::RunsUnder(ppid))), Some(me)) = (pid1, caller_pid) {
        if ppid == me {
            return Err(AgentError::PermissionDenied(format!(
                "task-exited for {container} refused: its pid 1 ({pid}) still runs as a child \
                 of the reporting process {me}"
            )));
        }
    }
    Ok(())
}

/// `task-exited` against the agent's records: the container, its state and its pid 1.
pub fn authorize_task_exited(
    agent: &crate::agent::Agent,
    caller_uid: u32,
    caller_pid: Option<i32>,
    registered: &Registered,
    container: &str,
    wait_status: i32,
) -> Result<(), AgentError> {
    let (pid1, waiter) = agent.containers().get(container).map_or((None, None), |c| {
        let pid1 = (c.state != rebalancer_proto::ContainerState::MigratedAway)
            .then(|| (c.pid, observe_pid1(c.pid)));
        (pid1, c.waiter)
    });
    let same_waiter = match (caller_pid, waiter) {
        (Some(p), Some((wp, start))) => {
            p == wp && crate::procstat::live_start_time(p) == Some(start)
        }
        _ => false,
    };
    let r = check_task_exited(
        caller_uid,
        caller_pid,
        registered,
        container,
        wait_status,
        pid1,
        same_waiter,
    );
    if r.is_ok() && !registered.contains(container) {
        tracing::info!(container, pid = ?caller_pid, "task-exited from the registering task process on a new connection (the agent restarted since)");
        registered.add(container);
    }
    if let Err(e) = &r {
        tracing::warn!(container, uid = caller_uid, pid = ?caller_pid, error = %e, "refused a task-exited report");
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(ids: &[&str]) -> Registered {
        let r = Registered::default();
        for i in ids {
            r.add(i);
        }
        r
    }

    #[test]
    fn only_the_registering_connection_of_root_reports_an_end() {
        let mine = reg(&["j7.s0.t0"]);
        assert!(check_task_exited(0, Some(50), &mine, "j7.s0.t0", 0, None, false).is_ok());
        // The owner (or anyone) who is not root.
        let e =
            check_task_exited(1000, Some(50), &mine, "j7.s0.t0", 0, None, false).expect_err("uid");
        assert!(
            e.to_string().contains("uid 1000 is not the task's waiter"),
            "{e}"
        );
        assert!(matches!(e, AgentError::PermissionDenied(_)));
        // Root, but another connection (an admin tool, another task's waiter).
        let e = check_task_exited(0, Some(50), &reg(&[]), "j7.s0.t0", 0, None, false)
            .expect_err("conn");
        assert!(e.to_string().contains("did not register it"), "{e}");
        let e = check_task_exited(0, Some(50), &reg(&["j8.s0.t0"]), "j7.s0.t0", 0, None, false)
            .expect_err("other task");
        assert!(e.to_string().contains("j7.s0.t0"), "{e}");
        // After an agent restart: the process that registered it, on a new connection.
        assert!(check_task_exited(0, Some(50), &reg(&[]), "j7.s0.t0", 0, None, true).is_ok());
        let e = check_task_exited(1000, Some(50), &reg(&[]), "j7.s0.t0", 0, None, true)
            .expect_err("uid");
        assert!(e.to_string().contains("uid 1000"), "{e}");
    }

    #[test]
    fn a_running_pid_1_is_no_end() {
        let mine = reg(&["j7.s0.t0"]);
        let e = check_task_exited(
            0,
            Some(50),
            &mine,
            "j7.s0.t0",
            0,
            Some((51, Pid1::RunsUnder(50))),
            false,
        )
        .expect_err("still runs");
        assert!(e.to_string().contains("pid 1 (51) still runs"), "{e}");
        // A reused pid under someone else, or a zombie: it ended.
        for seen in [Pid1::RunsUnder(1), Pid1::Ended] {
            assert!(
                check_task_exited(0, Some(50), &mine, "j7.s0.t0", 9, Some((51, seen)), false)
                    .is_ok()
            );
        }
    }

    #[test]
    fn end_statuses_are_what_waitpid_returns_for_an_end() {
        for ok in [0, 1 << 8, 255 << 8, 9, 15, 0x80 | 11, 64] {
            assert!(is_end_status(ok), "{ok:#x}");
        }
        // stopped (0x7f | sig << 8), continued (0xffff), signal with exit bits, out of range.
        for bad in [0x137f, 0xffff, (1 << 8) | 9, -1, 0x10000, 65] {
            assert!(!is_end_status(bad), "{bad:#x}");
        }
        let e = check_task_exited(0, Some(50), &reg(&["x"]), "x", 0x137f, None, false)
            .expect_err("stop");
        assert!(e.to_string().contains("0x137f"), "{e}");
    }

    #[test]
    fn own_pid1_runs_under_its_parent() {
        assert_eq!(
            observe_pid1(std::process::id() as i32),
            Pid1::RunsUnder(std::os::unix::process::parent_id() as i32)
        );
        assert_eq!(observe_pid1(i32::MAX), Pid1::Ended);
    }
}
