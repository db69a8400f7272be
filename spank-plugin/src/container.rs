//! The task side of a migratable step (remote context, `slurm_spank_task_init_privileged`).
//!
//! ```text
//! slurmstepd ── task process (the waiter: root, never returns to Slurm)
//!                 └── pid 1 of a new pid namespace, own mount/uts/ipc namespaces, joined to the
//!                     agent's netns; returns from the callback and becomes the user's program
//! ```
//! The tree under pid 1 is what CRIU dumps; it stays a child of slurmstepd's task process, so it
//! is tracked, signalled and accounted as the step's task. The waiter reaps pid 1, asks the
//! agent for the task's final status (it may have moved to another node), passes signals on
//! through the agent while it waits for that, and exits with the status.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use libc::{c_int, pid_t};
use rebalancer_proto::{
    ContainerId, MigrationMode, PreparedTask, Reply, Request, TaskRef, TaskRegistration,
};

use crate::agent::{reply_name, Agent, AgentError};
use crate::ffi;
use crate::sys;

/// What the plugin knows about the task it runs in.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub task: TaskRef,
    pub uid: u32,
    pub gid: u32,
    pub node: String,
    pub class: Option<String>,
    pub mode: Option<MigrationMode>,
    pub cpus: Option<f64>,
    pub memory_limit: Option<u64>,
    /// argv[0] of the task.
    pub program: Option<String>,
}

impl TaskInfo {
    pub fn registration(&self, pid: pid_t) -> TaskRegistration {
        TaskRegistration {
            task: self.task.clone(),
            pid,
            uid: self.uid,
            gid: self.gid,
            node: self.node.clone(),
            class: self.class.clone(),
            mode: self.mode,
            cpus: self.cpus,
            memory_limit: self.memory_limit,
            container: Some(self.task.container_id()),
            address: None,
            rss_bytes: None,
            // SAFETY: getpid has no preconditions.
            waiter_pid: Some(unsafe { libc::getpid() }),
            cwd: std::env::current_dir()
                .ok()
                .map(|d| d.to_string_lossy().into_owned()),
            program: self.program.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Rootfs(#[from] rebalancer_rootfs::RootfsError),
    #[error("the agent answered {0} where task-prepared was expected")]
    NotPrepared(String),
    #[error("cannot open the container network namespace {path}")]
    Netns {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn sys_err(what: &'static str) -> impl FnOnce(io::Error) -> TaskError {
    move |source| TaskError::Sys { what, source }
}

/// Asks the agent for the container's network namespace.
pub fn prepare(agent: &mut Agent, info: &TaskInfo) -> Result<PreparedTask, TaskError> {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    match agent.call(&Request::PrepareTask {
        registration: info.registration(me),
    })? {
        Reply::TaskPrepared { prepared } => Ok(prepared),
        other => Err(TaskError::NotPrepared(reply_name(&other))),
    }
}

/// Creates the container and turns this process into its waiter. Returns `Ok(())` only in the
/// container's pid 1, which then continues into Slurm's exec of the user's program. Errors are
/// returned only while nothing has been forked, so the caller can still fail the task cleanly.
pub fn launch(mut agent: Agent, info: &TaskInfo, prepared: &PreparedTask) -> Result<(), TaskError> {
    let netns = sys::open_ro(&prepared.netns).map_err(|source| TaskError::Netns {
        path: prepared.netns.clone(),
        source,
    })?;
    let hostname = match &prepared.hostname {
        Some(h) => Some(CString::new(h.as_str()).map_err(|_| TaskError::Sys {
            what: "use the host name the agent gave",
            source: io::ErrorKind::InvalidInput.into(),
        })?),
        None => None,
    };
    // Children of this process are born in the new pid namespace; the waiter itself stays.
    // SAFETY: unshare with a namespace flag only changes this process's namespace for children.
    sys::cvt(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map_err(sys_err("create a pid namespace (unshare CLONE_NEWPID)"))?;
    let (setup_r, setup_w) = sys::pipe().map_err(sys_err("create a pipe"))?;
    let (go_r, go_w) = sys::pipe().map_err(sys_err("create a pipe"))?;
    let (barrier, barrier_child) = crate::cgroups::pipes().map_err(sys_err("create a pipe"))?;
    let mask = sys::block_waiter_signals().map_err(sys_err("block signals"))?;

    // SAFETY: the task process is single-threaded (a fresh fork of slurmstepd), so fork is sound.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = io::Error::last_os_error();
        sys::restore_mask(&mask);
        return Err(TaskError::Sys {
            what: "fork the container's first process",
            source: e,
        });
    }
    if pid == 0 {
        drop(setup_r);
        drop(go_w);
        drop(barrier);
        crate::cgroups::child_side(barrier_child);
        sys::restore_mask(&mask);
        drop(agent);
        let res = enter_container(&netns, hostname.as_ref(), prepared);
        drop(netns);
        let msg = match &res {
            Ok(()) => String::new(),
            Err(e) => crate::chain(e),
        };
        let _ = sys::write_all(setup_w.as_raw_fd(), msg.as_bytes());
        drop(setup_w);
        if res.is_err() {
            sys::exit_now(1);
        }
        // Wait for the waiter to register us: the user's program never runs unannounced.
        match sys::read_to_end(&go_r, 1) {
            Ok(b) if b == b"g" => return Ok(()),
            _ => sys::exit_now(1),
        }
    }

    // The waiter. From here on this process never returns to Slurm.
    name_waiter();
    drop(barrier_child);
    drop(setup_w);
    drop(go_r);
    drop(netns);
    let container = prepared.container.clone();
    let setup = sys::read_to_end(&setup_r, 4096).unwrap_or_default();
    drop(setup_r);
    if !setup.is_empty() {
        ffi::log_error(&format!(
            "rebalancer: container {container} for task {}: {}",
            task_name(&info.task),
            String::from_utf8_lossy(&setup)
        ));
        let status = sys::blocking_wait(pid).unwrap_or(1 << 8);
        // Never registered: closing the connection tells the agent to drop what it prepared.
        drop(agent);
        sys::exit_like(status);
    }
    let mut reg = info.registration(pid);
    reg.container = Some(container.clone());
    reg.address = Some(prepared.address.clone());
    reg.rss_bytes = sys::rss_bytes(pid);
    match agent.call(&Request::RegisterTask { registration: reg }) {
        Ok(Reply::Container { .. }) | Ok(Reply::Done) => {}
        Ok(other) => fail_child(
            agent,
            pid,
            &container,
            &format!("the agent answered {} to register-task", reply_name(&other)),
        ),
        Err(e) => fail_child(agent, pid, &container, &crate::chain(&e)),
    }
    ffi::log_verbose(&format!(
        "rebalancer: task {} runs in container {container} (pid {pid}, address {})",
        task_name(&info.task),
        prepared.address
    ));
    let _ = sys::write_all(go_w.as_raw_fd(), b"g");
    drop(go_w);
    // Slurm may move this process into per-task cgroups only now; pid 1 must follow.
    let moved = barrier.parent(pid, Duration::from_secs(60));
    if !moved.is_empty() {
        ffi::log_verbose(&format!(
            "rebalancer: container {container} moved into the task's cgroups {}",
            moved.join(", ")
        ));
    }
    supervise_and_exit(agent, pid, &container, info.task.step_id, &mask)
}

/// Runs in the new pid 1 before it returns to Slurm.
fn enter_container(
    netns: &OwnedFd,
    hostname: Option<&CString>,
    prepared: &PreparedTask,
) -> Result<(), TaskError> {
    // If the waiter is killed, the container must not outlive it unnoticed.
    // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // SAFETY: netns is an open nsfs descriptor; setns only changes this process's namespace.
    sys::cvt(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) })
        .map_err(sys_err("join the container network namespace"))?;
    // SAFETY: unshare only detaches this process from the listed namespaces.
    sys::cvt(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC) })
        .map_err(sys_err("create mount, uts and ipc namespaces"))?;
    // Mounts made here must not propagate back to the node.
    rebalancer_rootfs::make_private()?;
    // The agent's root (its plan, exactly as for its own containers), or the node's file system
    // with a /proc of the new pid namespace (`ps` and $$ inside show container pids).
    match &prepared.root {
        Some(root) => {
            let plan: Vec<rebalancer_rootfs::Mount<'_>> =
                prepared.mounts.iter().map(Into::into).collect();
            rebalancer_rootfs::enter(std::path::Path::new(root), &plan)?
        }
        None => rebalancer_rootfs::mount_proc(std::path::Path::new("/proc"))?,
    }
    // Its own session and process group: CRIU refuses a tree whose session leader is outside
    // its pid namespace. (Hence proctrack/pgid cannot track containers; cgroup and linuxproc can.)
    // SAFETY: setsid has no memory effects; pid 1 of a new namespace is never a group leader yet.
    sys::cvt(unsafe { libc::setsid() }).map_err(sys_err("start a session for the container"))?;
    if let Some(h) = hostname {
        // SAFETY: h is a valid C string of the given length.
        sys::cvt(unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) })
            .map_err(sys_err("set the container's host name"))?;
    }
    Ok(())
}

fn fail_child(agent: Agent, pid: pid_t, container: &ContainerId, why: &str) -> ! {
    ffi::log_error(&format!(
        "rebalancer: the agent did not register container {container}: {why}; stopping the task"
    ));
    // SAFETY: pid is our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = sys::blocking_wait(pid);
    drop(agent);
    sys::exit_now(1)
}

pub fn task_name(t: &TaskRef) -> String {
    format!("{}.{}.{}", t.job_id, step_name(t.step_id), t.task_id)
}

pub fn step_name(step: u32) -> String {
    match step {
        ffi::SLURM_BATCH_SCRIPT => "batch".into(),
        ffi::SLURM_EXTERN_CONT => "extern".into(),
        ffi::SLURM_INTERACTIVE_STEP => "interactive".into(),
        s => s.to_string(),
    }
}

/// Marks this process as the task's stand-in: Slurm's process tracking skips processes named
/// `slurmstepd` when it signals a step, and the waiter must get the step's signals once its
/// container runs elsewhere.
pub fn name_waiter() {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"rebalancer-wait".as_ptr()) };
}

/// Waits for `pid` to end, then reports to the agent and exits.
pub fn supervise_and_exit(
    agent: Agent,
    pid: pid_t,
    container: &ContainerId,
    own_step: u32,
    mask: &sys::SigMask,
) -> ! {
    let status = loop {
        // Slurm signals the container's processes itself (they are the step's user processes);
        // passing signals on as well would deliver them twice. They are only drained here.
        if let Some(s) = sys::wait_signal(&mask.set, Duration::from_secs(1)) {
            if s != libc::SIGCHLD {
                continue;
            }
        }
        match sys::try_wait(pid) {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => {
                ffi::log_error(&format!(
                    "rebalancer: lost track of container {container} (pid {pid}): {e}"
                ));
                break 1 << 8;
            }
        }
    };
    report_and_exit(agent, container, status, own_step, mask)
}

/// Tells the agent pid 1 ended and exits with the task's final status. When a migration dumped
/// the container, the agent answers only once its restored copy ended on the destination;
/// meanwhile signals sent to this task (scancel, srun's Ctrl-C) are passed on with
/// `kill-container`, which the agent delivers wherever the container now runs.
fn report_and_exit(
    mut agent: Agent,
    container: &ContainerId,
    status: c_int,
    own_step: u32,
    mask: &sys::SigMask,
) -> ! {
    let _ = agent.set_read_timeout(None);
    // A write to the socket of an agent that died must fail, not kill the waiter.
    // SAFETY: signal() with SIG_IGN has no preconditions; this process never execs the task.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // On the connection that registered the task, or, when the agent restarted meanwhile
    // (the connection is gone), on a new one from this same process: the agent accepts the
    // report from nobody else (rebalancer/agent/src/control_authz.rs), so nobody else can end
    // the task's netns or forge its status.
    let deadline = std::time::Instant::now() + AGENT_RESTART_WAIT;
    let answer = loop {
        match report_once(&mut agent, container, status, own_step, mask) {
            Err(e @ AgentError::Proto(_)) if std::time::Instant::now() < deadline => {
                ffi::log_info(&format!(
                    "rebalancer: lost the node agent while reporting the end of container \
                     {container} ({}); reporting again once it is back",
                    crate::chain(&e)
                ));
                match reconnect(&agent, deadline, container, own_step, mask) {
                    Some(a) => agent = a,
                    None => break Err(e),
                }
            }
            other => break other,
        }
    };
    let final_status = match answer {
        Ok(Reply::TaskFinished {
            wait_status,
            migrated_to,
        }) => {
            if let Some(node) = migrated_to {
                ffi::log_info(&format!(
                    "rebalancer: container {container} ended on {node} with {}",
                    sys::describe_status(wait_status)
                ));
            }
            wait_status
        }
        Ok(Reply::Done) => status,
        Ok(other) => {
            ffi::log_error(&format!(
                "rebalancer: the agent answered {} to task-exited for {container}",
                reply_name(&other)
            ));
            status
        }
        Err(e) => {
            ffi::log_error(&format!(
                "rebalancer: could not report the end of container {container} to the agent: {}",
                crate::chain(&e)
            ));
            status
        }
    };
    drop(agent);
    sys::exit_like(final_status)
}

/// How long a waiter whose agent went away keeps trying to report the task's end (an agent's
/// unit restarts it 5 s after a crash; its start-up re-adopts the task first).
const AGENT_RESTART_WAIT: Duration = Duration::from_secs(120);

/// Sends `task-exited` and waits for the answer, passing signals on meanwhile.
fn report_once(
    agent: &mut Agent,
    container: &ContainerId,
    status: c_int,
    own_step: u32,
    mask: &sys::SigMask,
) -> Result<Reply, AgentError> {
    agent.send(&Request::TaskExited {
        container: container.clone(),
        wait_status: status,
    })?;
    loop {
        if agent.readable(Duration::from_millis(500)) {
            return agent.recv();
        }
        pass_on_signals(agent, container, own_step, mask, Duration::ZERO);
    }
}

/// Passes on the signals this task received (waiting up to `wait` for the first one) to
/// wherever the container runs now.
fn pass_on_signals(
    agent: &Agent,
    container: &ContainerId,
    own_step: u32,
    mask: &sys::SigMask,
    wait: Duration,
) {
    let mut next = sys::wait_signal(&mask.set, wait);
    while let Some(sig) = next {
        if sig != libc::SIGCHLD {
            forward_elsewhere(agent, container, own_step, sig);
        }
        next = sys::wait_signal(&mask.set, Duration::ZERO);
    }
}

/// A new connection to the agent at `old`'s socket, tried every second until `deadline`
/// (signals keep being passed on meanwhile).
fn reconnect(
    old: &Agent,
    deadline: std::time::Instant,
    container: &ContainerId,
    own_step: u32,
    mask: &sys::SigMask,
) -> Option<Agent> {
    while std::time::Instant::now() < deadline {
        pass_on_signals(old, container, own_step, mask, Duration::from_secs(1));
        if let Ok(mut a) = Agent::connect(old.path(), old.node(), Duration::from_secs(5)) {
            let _ = a.set_read_timeout(None);
            return Some(a);
        }
    }
    None
}

/// A signal for a container that no longer runs here: Slurm delivers it to the newest restore
/// step of the task (where the container runs now, as that step's task); without one, the agent
/// is asked, on a second connection.
fn forward_elsewhere(agent: &Agent, container: &ContainerId, own_step: u32, sig: c_int) {
    if let Some(task) = task_of_container(container) {
        let steps = crate::follow::restore_steps(task.job_id);
        if let Some(step) = newest_restore_step(&steps, &task, own_step) {
            if crate::follow::signal_step(task.job_id, step, sig) {
                return;
            }
        }
    }
    let res =
        Agent::connect(agent.path(), agent.node(), Duration::from_secs(5)).and_then(|mut a| {
            a.call(&Request::KillContainer {
                id: container.clone(),
                signal: sig,
            })
        });
    if let Err(e) = res {
        ffi::log_error(&format!(
            "rebalancer: could not pass signal {sig} on to container {container}: {}",
            crate::chain(&e)
        ));
    }
}

/// The task of a container named by [`TaskRef::container_id`] (`jJ.sS.tT`). Pure.
pub fn task_of_container(id: &str) -> Option<TaskRef> {
    let rest = id.strip_prefix('j')?;
    let (job, rest) = rest.split_once(".s")?;
    let (step, task) = rest.split_once(".t")?;
    Some(TaskRef {
        job_id: job.parse().ok()?,
        step_id: step.parse().ok()?,
        task_id: task.parse().ok()?,
    })
}

/// The restore step carrying `task` now: the newest (highest id) restore step named after it,
/// never the caller's own step (a restore waiter signalling itself would loop). Pure.
pub fn newest_restore_step(
    steps: &[crate::follow::RestoreStep],
    task: &TaskRef,
    own_step: u32,
) -> Option<u32> {
    steps
        .iter()
        .filter(|s| s.origin == task.step_id && s.task == task.task_id && s.step != own_step)
        .map(|s| s.step)
        .max()
        .filter(|s| *s > own_step || own_step == task.step_id)
}

#[cfg(test)]
mod forward_tests {
    use super::*;
    use crate::follow::parse_steps;

    #[test]
    fn signals_go_to_the_newest_restore_step_of_the_task() {
        let t = task_of_container("j5.s0.t1").expect("a task's container id");
        assert_eq!(
            t,
            TaskRef {
                job_id: 5,
                step_id: 0,
                task_id: 1
            }
        );
        assert_eq!(task_of_container("web-1"), None);
        assert_eq!(task_of_container("j5.s0.tx"), None);
        // Task 1 moved to step 2, then again to step 4; step 3 carries task 0.
        let steps = parse_steps(
            5,
            "5.2|rebalancer-restore:0.1\n5.3|rebalancer-restore:0.0\n5.4|rebalancer-restore:0.1\n",
        );
        // The original waiter (step 0) and the first restore waiter (step 2) both reach step 4.
        assert_eq!(newest_restore_step(&steps, &t, 0), Some(4));
        assert_eq!(newest_restore_step(&steps, &t, 2), Some(4));
        // The newest restore waiter itself has nowhere to send it (never to itself).
        assert_eq!(newest_restore_step(&steps, &t, 4), None);
        assert_eq!(newest_restore_step(&steps[..1], &t, 2), None);
    }
}
