//! The destination side of a migration: a restore step's task (`--rebalancer-restore=ID`).
//!
//! The agent (or controller) starts `srun --jobid=J --overlap -w NODE -n1 --rebalancer-restore=ID
//! true`. In `task_init_privileged` the task process becomes a waiter again:
//! 1. `prepare-restore` gives the CRIU command line.
//! 2. The task's stdio exists only after Slurm's `prepare_stdio`, which runs after this callback.
//!    So a helper child returns to Slurm, gets its stdio set up, and in `slurm_spank_task_init`
//!    (as the user) passes fds 0-2 back over a socketpair (SCM_RIGHTS) and exits.
//! 3. The waiter puts them on its own fds 0-2 and runs `criu restore --restore-detached
//!    --restore-sibling`, so the restored pid 1 becomes the waiter's child, with the restore
//!    step's stdio in place of the dumped task's (`--inherit-fd`).
//! 4. `register-task`, then forward signals, reap, `task-exited`, exit with the status.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use libc::{c_int, pid_t};
use rebalancer_proto::{Reply, Request, RestorePlan};

use crate::agent::{reply_name, Agent};
use crate::container::{supervise_and_exit, task_name, TaskError, TaskInfo};
use crate::ffi;
use crate::sys;
use crate::user_file::{self, Creds};
use crate::verify::{ProcView, RealProc};

/// The helper child's end of the stdio socketpair, used in `slurm_spank_task_init`.
static STDIO_FD: AtomicI32 = AtomicI32::new(-1);
/// Longest wait for the restore plan: the agent answers when the migration's images are in, or
/// fails the request when the migration ends otherwise (its own timeout is shorter).
const RESTORE_PLAN_WAIT: Duration = Duration::from_secs(900);
const PIDFILE_DIR: &str = "/run/slurm-rebalancer-spank";

fn sys_err(what: &'static str) -> impl FnOnce(io::Error) -> TaskError {
    move |source| TaskError::Sys { what, source }
}

/// Criu's argv for `plan`; stdio sits on fds 0-2 of the criu process, and `inherited[i]` is the
/// descriptor number of `plan.inherit_files[i]` in it.
pub fn criu_argv(plan: &RestorePlan, pidfile: &str, inherited: &[RawFd]) -> Vec<String> {
    let mut argv = vec![plan.criu.clone()];
    argv.extend(plan.args.iter().cloned());
    for a in [
        "--restore-detached",
        "--restore-sibling",
        "--pidfile",
        pidfile,
    ] {
        argv.push(a.into());
    }
    for (fd, key) in plan.stdio_keys.iter().enumerate().take(3) {
        if let Some(k) = key {
            argv.push("--inherit-fd".into());
            argv.push(format!("fd[{fd}]:{k}"));
        }
    }
    for ((key, _), fd) in plan.inherit_files.iter().zip(inherited) {
        argv.push("--inherit-fd".into());
        argv.push(format!("fd[{fd}]:{key}"));
    }
    argv
}

/// Whether an inherited file is one of the task's (CRIU's `file[MNT:INO]`), not the agent's.
fn is_task_file_key(key: &str) -> bool {
    key.starts_with("file[")
}

/// Opens one of the agent's own files without close-on-exec, so that criu inherits it.
fn open_inheritable(path: &str) -> io::Result<OwnedFd> {
    let p =
        std::ffi::CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: p is a valid NUL-terminated path.
    let fd = sys::cvt(unsafe { libc::open(p.as_ptr(), libc::O_RDONLY) })?;
    // SAFETY: open returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs the restore. Returns `Ok(())` only in the helper child (which goes back to Slurm).
pub fn run(
    mut agent: Agent,
    info: &TaskInfo,
    migration: &str,
    timeout: Duration,
) -> Result<(), TaskError> {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    // Everything that does not need the images happens first (the helper's trip through Slurm's
    // stdio set-up included): the agent starts this step before the source freezes the task.
    let (mine, theirs) = sys::socketpair().map_err(sys_err("create a socketpair"))?;
    let mask = sys::block_waiter_signals().map_err(sys_err("block signals"))?;
    // SAFETY: the task process is single-threaded, so fork is sound.
    let helper = unsafe { libc::fork() };
    if helper < 0 {
        let e = io::Error::last_os_error();
        sys::restore_mask(&mask);
        return Err(TaskError::Sys {
            what: "fork the stdio helper",
            source: e,
        });
    }
    if helper == 0 {
        drop(mine);
        drop(agent);
        sys::restore_mask(&mask);
        // Kept open (and out of the way of stdio) until slurm_spank_task_init.
        STDIO_FD.store(
            std::os::fd::IntoRawFd::into_raw_fd(theirs),
            Ordering::SeqCst,
        );
        return Ok(());
    }
    drop(theirs);
    crate::container::name_waiter();
    let name = task_name(&info.task);
    let fail = |agent: Agent, msg: String| -> ! {
        ffi::log_error(&format!(
            "rebalancer: restore of migration {migration} as task {name} failed: {msg}"
        ));
        drop(agent);
        sys::exit_now(1)
    };
    let stdio = match sys::recv_fds(&mine, Duration::from_secs(120), 3) {
        Ok((f, _)) if f.len() == 3 => f,
        Ok((f, _)) => fail(
            agent,
            format!("the helper passed {} descriptors, not 3", f.len()),
        ),
        Err(e) => fail(agent, format!("no stdio from the helper: {e}")),
    };
    let _ = sys::blocking_wait(helper);
    for (i, fd) in stdio.iter().enumerate() {
        // SAFETY: fd is a received open descriptor; dup2 onto 0-2 replaces our own stdio.
        unsafe { libc::dup2(fd.as_raw_fd(), i as c_int) };
    }
    drop(stdio);

    // The agent answers once the images are in; it bounds that wait by its migration timeout
    // (and the socket closes if it dies).
    if let Err(e) = agent.set_read_timeout(Some(RESTORE_PLAN_WAIT)) {
        fail(agent, format!("cannot set the agent socket's timeout: {e}"));
    }
    let asked = agent.call(&Request::PrepareRestore {
        migration: migration.into(),
        registration: info.registration(me),
    });
    let plan = match asked {
        Ok(Reply::RestorePlan { plan }) => plan,
        Ok(other) => fail(
            agent,
            format!(
                "the agent answered {} to prepare-restore",
                reply_name(&other)
            ),
        ),
        Err(e) => fail(agent, crate::chain(&e)),
    };
    if let Err(e) = agent.set_read_timeout(Some(timeout)) {
        fail(agent, format!("cannot set the agent socket's timeout: {e}"));
    }

    if let Err(e) = std::fs::create_dir_all(PIDFILE_DIR) {
        fail(agent, format!("cannot create {PIDFILE_DIR}: {e}"));
    }
    let pidfile = format!("{PIDFILE_DIR}/{migration}.{me}.pid");
    let _ = std::fs::remove_file(&pidfile);
    let mut files = Vec::new();
    let creds = Creds {
        uid: info.uid,
        gid: info.gid,
    };
    for (key, path) in &plan.inherit_files {
        // A task's own file (its stdin) is opened as the job's user and checked; only the
        // agent's own files (the container's network namespace) are opened as root.
        let opened = if is_task_file_key(key) {
            user_file::open_task_file(path, key, creds).map_err(|e| e.to_string())
        } else {
            open_inheritable(path).map_err(|e| format!("cannot open {path}: {e}"))
        };
        match opened {
            Ok(f) => files.push(f),
            Err(e) => fail(agent, format!("criu's {key}: {e}")),
        }
    }
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let argv = criu_argv(&plan, &pidfile, &fds);
    let status = match std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
    {
        Ok(s) => s,
        Err(e) => fail(agent, format!("cannot run {}: {e}", plan.criu)),
    };
    drop(files);
    if !status.success() {
        fail(agent, format!("{} restore exited with {status}", plan.criu));
    }
    let root: pid_t = match std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        Some(p) => p,
        None => fail(agent, format!("criu wrote no pid to {pidfile}")),
    };
    let _ = std::fs::remove_file(&pidfile);
    if parent_of(root) != Some(me) {
        fail(
            agent,
            format!(
                "restored pid {root} is not a child of the task (is --restore-sibling honoured?)"
            ),
        );
    }
    let mut reg = info.registration(root);
    reg.container = Some(plan.container.clone());
    reg.rss_bytes = sys::rss_bytes(root);
    match agent.call(&Request::RegisterTask { registration: reg }) {
        Ok(_) => {}
        Err(e) => ffi::log_error(&format!(
            "rebalancer: restored container {} is not registered: {}",
            plan.container,
            crate::chain(&e)
        )),
    }
    ffi::log_verbose(&format!(
        "rebalancer: migration {migration}: container {} restored as task {name} (pid {root})",
        plan.container
    ));
    supervise_and_exit(agent, root, &plan.container, info.task.step_id, &mask)
}

/// In the helper child, in `slurm_spank_task_init` (stdio is now the step's): hand fds 0-2 to
/// the waiter and end. Returns if this process is not a restore helper.
pub fn hand_over_stdio() {
    let fd = STDIO_FD.swap(-1, Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    let rc = sys::send_fds(fd, &[0, 1, 2], b"s");
    sys::exit_now(if rc.is_ok() { 0 } else { 1 })
}

fn parent_of(pid: pid_t) -> Option<pid_t> {
    RealProc.parent(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_argv_appends_sibling_pidfile_and_stdio() {
        let plan = RestorePlan {
            migration: "m1".into(),
            container: "j1.s0.t0".into(),
            criu: "/usr/local/sbin/criu".into(),
            args: vec!["restore".into(), "-D".into(), "/run/img".into()],
            stdio_keys: vec![None, Some("pipe:[11]".into()), Some("pipe:[12]".into())],
            inherit_files: vec![("extnet".into(), "/run/netns/c1".into())],
        };
        let argv = criu_argv(&plan, "/run/x.pid", &[7]);
        assert_eq!(
            argv,
            [
                "/usr/local/sbin/criu",
                "restore",
                "-D",
                "/run/img",
                "--restore-detached",
                "--restore-sibling",
                "--pidfile",
                "/run/x.pid",
                "--inherit-fd",
                "fd[1]:pipe:[11]",
                "--inherit-fd",
                "fd[2]:pipe:[12]",
                "--inherit-fd",
                "fd[7]:extnet",
            ]
        );
    }

    #[test]
    fn stdio_descriptors_cross_a_socketpair() {
        let (a, b) = sys::socketpair().expect("socketpair");
        let (r, w) = sys::pipe().expect("pipe");
        let fds = [r.as_raw_fd(), w.as_raw_fd(), w.as_raw_fd()];
        sys::send_fds(a.as_raw_fd(), &fds, b"s").expect("send");
        let (got, data) = sys::recv_fds(&b, Duration::from_secs(5), 3).expect("recv");
        assert_eq!((got.len(), data.as_slice()), (3, &b"s"[..]));
        sys::write_all(got[1].as_raw_fd(), b"hi").expect("write through the received fd");
        drop(got);
        drop(w);
        assert_eq!(sys::read_to_end(&r, 16).expect("read"), b"hi");
    }

    #[test]
    fn parent_of_self_is_our_parent() {
        // SAFETY: getpid/getppid have no preconditions.
        let (me, pp) = unsafe { (libc::getpid(), libc::getppid()) };
        assert_eq!(parent_of(me), Some(pp));
        assert_eq!(parent_of(-5), None);
    }
}
