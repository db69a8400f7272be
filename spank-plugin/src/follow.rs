//! srun follows a task that moved off its node.
//!
//! When the rebalancer releases a step's source node, Slurm kills what is left of the step there
//! (the waiter), and srun ends with `Force Terminated` while the task runs on as the *restore step*
//! `J.K` on another node, named `rebalancer-restore:S.T` (step S, task T). At srun's exit the
//! plugin looks for such steps and attaches to each with `sattach`, so the user's terminal gets
//! the task's further output and srun exits with the task's real status. Its one line about the
//! move carries the downtime from the job's AdminComment trail ([`move_downtime`]). A task that moved again
//! (from J.K to J.L) is followed along the chain. A task whose waiter stayed (no release) already
//! gave srun its status: then the restore step has ended and nothing is followed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

/// Prefix of the restore step's name (the agent's `restore_command`).
pub const RESTORE_STEP_PREFIX: &str = "rebalancer-restore:";

/// A restore step of job J that carries task `task` of step `origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreStep {
    pub step: u32,
    pub origin: u32,
    pub task: u32,
}

/// Parses `squeue -h -s -j J -o %i|%j` lines ("J.K|NAME") into the job's restore steps. Pure.
pub fn parse_steps(job: u32, text: &str) -> Vec<RestoreStep> {
    text.lines()
        .filter_map(|l| {
            let (id, name) = l.trim().split_once('|')?;
            let (j, k) = id.split_once('.')?;
            if j.parse::<u32>().ok()? != job {
                return None;
            }
            let (origin, task) = name.strip_prefix(RESTORE_STEP_PREFIX)?.split_once('.')?;
            Some(RestoreStep {
                step: k.parse().ok()?,
                origin: origin.parse().ok()?,
                task: task.parse().ok()?,
            })
        })
        .collect()
}

/// The restore steps to follow next: those carrying a task of a step in `chain` that were not
/// followed yet. Pure.
pub fn next_steps(
    steps: &[RestoreStep],
    chain: &BTreeSet<u32>,
    followed: &BTreeSet<u32>,
) -> Vec<RestoreStep> {
    steps
        .iter()
        .filter(|s| chain.contains(&s.origin) && !followed.contains(&s.step))
        .cloned()
        .collect()
}

/// What one stderr line of `sattach -v` tells. sattach's own lines start with `sattach: `; the
/// rest is the task's stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SattachLine {
    /// The task's own stderr: passed on.
    Task,
    /// `N tasks finished (rc=STATUS)`: a raw wait status.
    Finished(i32),
    /// An error sattach reports (passed on), except task ends, which `Finished` covers.
    Error,
    /// sattach's chatter (`-v`): dropped.
    Verbose,
}

/// Classifies a line of `sattach -v`'s stderr. Pure.
pub fn classify(line: &str) -> SattachLine {
    let Some(rest) = line.strip_prefix("sattach: ") else {
        return SattachLine::Task;
    };
    if let Some(rc) = rest
        .split_once(" tasks finished (rc=")
        .and_then(|(_, r)| r.strip_suffix(')'))
        .and_then(|r| r.parse::<i32>().ok())
    {
        return SattachLine::Finished(rc);
    }
    if rest.starts_with("error: task ") {
        return SattachLine::Verbose;
    }
    if rest.starts_with("error:") || rest.starts_with("fatal:") {
        return SattachLine::Error;
    }
    SattachLine::Verbose
}

/// srun's exit code for a task's raw wait status: the exit code, or 128 + the signal. Pure.
pub fn exit_code(status: i32) -> i32 {
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

/// Slurm's user commands next to this srun (Debian: /usr/bin), else from PATH.
fn slurm_command(name: &str) -> PathBuf {
    std::fs::read_link("/proc/self/exe")
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

pub fn restore_steps(job: u32) -> Vec<RestoreStep> {
    let out = Command::new(slurm_command("squeue"))
        .args(["-h", "-s", "-j", &job.to_string(), "-o", "%i|%j"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => parse_steps(job, &String::from_utf8_lossy(&o.stdout)),
        _ => Vec::new(),
    }
}

/// The node step `job.step` runs on (`squeue -s -o "%i %N"`).
fn step_node(job: u32, step: u32) -> Option<String> {
    let out = Command::new(slurm_command("squeue"))
        .args(["-h", "-s", "-j", &job.to_string(), "-o", "%i %N"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let id = format!("{job}.{step}");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (i, n) = l.trim().split_once(' ')?;
        (i == id && !n.is_empty()).then(|| n.to_string())
    })
}

/// The job's AdminComment in `scontrol show job J`'s multi-line form (its value may hold
/// spaces), empty when unset. Pure.
pub fn admin_comment(text: &str) -> String {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("AdminComment="))
        .map(|c| c.trim_end().to_string())
        .filter(|c| c != "(null)")
        .unwrap_or_default()
}

/// The downtime of task `task`'s move to `to`, from the rebalancer's notes in the job's
/// AdminComment (`rebalancer: task T of step J.S moved A -> B (downtime N ms)`, written by the
/// controller from the source agent's figure before the source leaves the job). The newest
/// matching note wins: a task that moved twice has two. Pure.
pub fn move_downtime(comment: &str, job: u32, task: u32, to: Option<&str>) -> Option<u64> {
    let head = format!("rebalancer: task {task} of step {job}.");
    comment
        .split("; ")
        .filter_map(|n| n.trim().strip_prefix(head.as_str()))
        .filter_map(|rest| {
            let (_, route) = rest.split_once(" moved ")?;
            let (path, figure) = route.split_once(" (downtime ")?;
            let dest = path.rsplit_once(" -> ")?.1;
            if to.is_some_and(|t| t != dest) {
                return None;
            }
            figure.strip_suffix(" ms)")?.parse().ok()
        })
        .last()
}

/// The job's AdminComment (`scontrol show job J`), empty when it cannot be read.
fn job_admin_comment(job: u32) -> String {
    let out = Command::new(slurm_command("scontrol"))
        .args(["show", "job", &job.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => admin_comment(&String::from_utf8_lossy(&o.stdout)),
        _ => String::new(),
    }
}

/// Where srun sends the step's output: `srun --output=FILE` (without %-patterns) makes srun
/// write FILE itself, from descriptors it opens before launching the step; otherwise srun's own
/// stdout/stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputFiles {
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
}

impl OutputFiles {
    /// From `(fd, path, writable)` of srun's descriptors: the regular files it holds open for
    /// writing above 2, in the order srun opened them (output first, then error). Pure.
    pub fn from_fds(fds: &[(i32, PathBuf, bool)]) -> OutputFiles {
        let mut files: Vec<&(i32, PathBuf, bool)> =
            fds.iter().filter(|(fd, _, w)| *fd > 2 && *w).collect();
        files.sort_by_key(|(fd, _, _)| *fd);
        let mut paths: Vec<PathBuf> = Vec::new();
        for (_, p, _) in files {
            if !paths.contains(p) {
                paths.push(p.clone());
            }
        }
        OutputFiles {
            stdout: paths.first().cloned(),
            stderr: paths.get(1).or(paths.first()).cloned(),
        }
    }

    /// srun's open output files, read from /proc/self.
    pub fn of_this_process() -> OutputFiles {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return OutputFiles::default();
        };
        let fds: Vec<(i32, PathBuf, bool)> = dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                let fd: i32 = e.file_name().to_str()?.parse().ok()?;
                let path = std::fs::read_link(e.path()).ok()?;
                if !std::fs::metadata(&path).ok()?.is_file() {
                    return None;
                }
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())?;
                Some((fd, path, flags & libc::O_ACCMODE != libc::O_RDONLY))
            })
            .collect();
        OutputFiles::from_fds(&fds)
    }
}

fn append(path: &Option<PathBuf>) -> Option<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path.as_ref()?)
        .ok()
}

/// Runs `sattach -v J.K` with its stdout on srun's output; passes on the task's stderr and
/// sattach's errors. Returns the highest exit code of the tasks it saw end (`None`: it attached
/// to nothing, e.g. the step had just ended).
fn attach(job: u32, step: u32, files: &OutputFiles) -> Option<i32> {
    let stdout = append(&files.stdout).map_or_else(Stdio::inherit, Stdio::from);
    let mut task_err: Box<dyn Write> = match append(&files.stderr) {
        Some(f) => Box::new(f),
        None => Box::new(std::io::stderr()),
    };
    let mut cmd = Command::new(slurm_command("sattach"));
    cmd.arg("-v")
        .arg(format!("{job}.{step}"))
        // Its own process group: a Ctrl-C on the terminal reaches srun only, which passes it on
        // to the task (sattach would otherwise end and stop following).
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped());
    // Out of srun's process group, sattach would outlive an srun that is killed (seen: orphans
    // attached for good to a step of a torn-down cluster): it dies with srun instead.
    let srun = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only async-signal-safe functions
    // (prctl, getppid, _exit) and touches no memory shared with other threads.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != srun {
                // srun ended before the death signal was armed.
                libc::_exit(0);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().ok()?;
    let mut code: Option<i32> = None;
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            match classify(&line) {
                SattachLine::Task => {
                    let _ = writeln!(task_err, "{line}");
                }
                SattachLine::Error => {
                    let _ = writeln!(std::io::stderr(), "{line}");
                }
                SattachLine::Finished(st) => {
                    code = Some(code.map_or(exit_code(st), |c| c.max(exit_code(st))));
                }
                SattachLine::Verbose => {}
            }
        }
    }
    let _ = child.wait();
    code
}

/// Follows the tasks of step `step` of job `job` that moved; returns the highest task status if
/// any was followed.
pub fn follow(job: u32, step: u32, files: &OutputFiles) -> Option<i32> {
    let following: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    forward_signals(job, following.clone());
    let mut chain = BTreeSet::from([step]);
    let mut followed = BTreeSet::new();
    let mut steps_followed: Vec<RestoreStep> = Vec::new();
    let mut codes: BTreeMap<u32, i32> = BTreeMap::new();
    // Where each followed step ran, for the route of the next move of its task.
    let mut nodes: BTreeMap<u32, String> = BTreeMap::new();
    loop {
        let next = next_steps(&restore_steps(job), &chain, &followed);
        if next.is_empty() {
            return chain_status(&codes, &steps_followed);
        }
        following
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(next.iter().map(|s| s.step));
        // The move's downtime, as the source agent measured it, is in the job's trail.
        let comment = job_admin_comment(job);
        let handles: Vec<_> = next
            .iter()
            .map(|s| {
                let to = step_node(job, s.step);
                // A task that moves again is restored by a new step named for the same
                // origin: its last step's node is where it came from.
                let from = steps_followed
                    .iter()
                    .filter(|p| p.origin == s.origin && p.task == s.task && p.step < s.step)
                    .max_by_key(|p| p.step)
                    .and_then(|p| nodes.get(&p.step))
                    .or_else(|| nodes.get(&s.origin))
                    .cloned()
                    .or_else(|| crate::quiet::sources().first().cloned());
                if let Some(t) = &to {
                    nodes.insert(s.step, t.clone());
                }
                let route = match (from, &to) {
                    (Some(from), Some(to)) => format!(" {from} -> {to}"),
                    (None, Some(to)) => format!(" to {to}"),
                    _ => String::new(),
                };
                let downtime = move_downtime(&comment, job, s.task, to.as_deref())
                    .map(|ms| format!(" (downtime {ms} ms)"))
                    .unwrap_or_default();
                crate::ffi::log_user(&format!(
                    "rebalancer: task {} of step {job}.{} moved{route} and runs on as step {job}.{}{downtime}; following it",
                    s.task, s.origin, s.step
                ));
                let (k, files) = (s.step, files.clone());
                std::thread::spawn(move || attach(job, k, &files))
            })
            .collect();
        for (s, h) in next.iter().zip(handles) {
            followed.insert(s.step);
            chain.insert(s.step);
            let code = h.join();
            // Signals go to a step only while srun is attached to it.
            following
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&s.step);
            if let Ok(Some(c)) = code {
                codes.insert(s.step, c);
            }
            steps_followed.push(s.clone());
        }
    }
}

/// The status of a task that moved, from its restore steps' statuses: the highest of the steps
/// whose task did not move on again. A step whose task moved once more was killed by that move;
/// the later step (named for the same origin and task, or for this step) has the task's real
/// end. Pure.
pub fn chain_status(codes: &BTreeMap<u32, i32>, followed: &[RestoreStep]) -> Option<i32> {
    let superseded = |step: u32| {
        let me = followed.iter().find(|s| s.step == step);
        followed.iter().any(|o| {
            o.origin == step
                || me.is_some_and(|m| o.origin == m.origin && o.task == m.task && o.step > m.step)
        })
    };
    codes
        .iter()
        .filter(|(step, _)| !superseded(**step))
        .map(|(_, c)| *c)
        .max()
}

/// Signals srun passes on to its tasks (srun's own set, as for a step it launched).
pub const FORWARDED_SIGNALS: [libc::c_int; 8] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGCONT,
];

/// Write end of the pipe the signal handler writes signal numbers to (-1: none).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; b lives for the call. A full pipe drops the
        // signal, as a busy kernel queue would.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// `scancel --signal=SIG J.K`: Slurm delivers it to the restore step's task like any other
/// step's, wherever it runs.
/// Returns whether Slurm accepted the signal.
pub fn signal_step(job: u32, step: u32, sig: libc::c_int) -> bool {
    let out = Command::new(slurm_command("scancel"))
        .arg(format!("--signal={sig}"))
        .arg(format!("{job}.{step}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            crate::ffi::log_error(&format!(
                "rebalancer: cannot pass signal {sig} on to step {job}.{step}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            false
        }
        Err(e) => {
            crate::ffi::log_error(&format!(
                "rebalancer: cannot pass signal {sig} on to step {job}.{step}: scancel: {e}"
            ));
            false
        }
    }
}

/// While srun follows moved tasks, the signals it would forward to its step (Ctrl-C, `kill`)
/// go to the restore steps it follows. srun's own handlers are replaced: its step is gone.
fn forward_signals(job: u32, following: Arc<Mutex<BTreeSet<u32>>>) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    // SAFETY: pipe2 returned two fresh descriptors; the write end is kept for the process.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
    for sig in FORWARDED_SIGNALS {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask is well-formed.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
    let spawned = std::thread::Builder::new()
        .name("rebalancer-signals".into())
        .spawn(move || {
            let mut b = 0u8;
            loop {
                // SAFETY: reads one byte into b from the pipe this thread owns.
                let n = unsafe { libc::read(read.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                if n != 1 {
                    return;
                }
                let steps: Vec<u32> = following
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied()
                    .collect();
                for step in steps {
                    signal_step(job, step, libc::c_int::from(b));
                }
            }
        });
    if let Err(e) = spawned {
        crate::ffi::log_error(&format!(
            "rebalancer: cannot pass srun's signals on to moved tasks: {e}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_whose_task_moved_on_does_not_count() {
        let step = |step, origin, task| RestoreStep { step, origin, task };
        // Task 0 moved twice; step 1 was killed by the second move. The agent names both
        // restore steps for the original step 0.
        let twice = [step(1, 0, 0), step(2, 0, 0)];
        let codes = BTreeMap::from([(1, 137), (2, 3)]);
        assert_eq!(chain_status(&codes, &twice), Some(3));
        // A chain named step by step supersedes the same way.
        let chain = [step(1, 0, 0), step(2, 1, 0)];
        assert_eq!(chain_status(&codes, &chain), Some(3));
        // Two tasks of step 0 moved once each: both count.
        let both = [step(1, 0, 0), step(2, 0, 1)];
        let codes = BTreeMap::from([(1, 0), (2, 5)]);
        assert_eq!(chain_status(&codes, &both), Some(5));
        assert_eq!(chain_status(&BTreeMap::new(), &[]), None);
    }

    #[test]
    fn restore_steps_are_found_by_name() {
        let text = "12.0|python3\n12.1|rebalancer-restore:0.0\n12.3|rebalancer-restore:1.0\n\
                    12.4|rebalancer-restore:x.0\n13.2|rebalancer-restore:0.1\n12.5|other:0.0\n";
        assert_eq!(
            parse_steps(12, text),
            [
                RestoreStep {
                    step: 1,
                    origin: 0,
                    task: 0
                },
                RestoreStep {
                    step: 3,
                    origin: 1,
                    task: 0
                }
            ]
        );
    }

    #[test]
    fn the_chain_of_moves_is_followed_once() {
        let steps = parse_steps(
            5,
            "5.1|rebalancer-restore:0.0\n5.2|rebalancer-restore:0.1\n5.3|rebalancer-restore:7.0\n",
        );
        let mut chain = BTreeSet::from([0]);
        let mut followed = BTreeSet::new();
        let first: Vec<u32> = next_steps(&steps, &chain, &followed)
            .iter()
            .map(|s| s.step)
            .collect();
        assert_eq!(first, [1, 2]);
        chain.extend([1, 2]);
        followed.extend([1, 2]);
        assert!(next_steps(&steps, &chain, &followed).is_empty());
        // Step 1 moved again, as step 6.
        let steps = parse_steps(5, "5.6|rebalancer-restore:1.0\n");
        let again: Vec<u32> = next_steps(&steps, &chain, &followed)
            .iter()
            .map(|s| s.step)
            .collect();
        assert_eq!(again, [6]);
    }

    #[test]
    fn the_moves_downtime_comes_from_the_jobs_trail() {
        let show = "JobId=4 JobName=x\n   AdminComment=site note; rebalancer: task 0 of step 4.0 \
                    moved node1 -> node2 (downtime 185 ms); rebalancer: task 1 of step 4.0 moved \
                    node1 -> node3 (downtime 240 ms)\n   Comment=(null)\n";
        let c = admin_comment(show);
        assert!(c.starts_with("site note; rebalancer: task 0"), "{c}");
        assert_eq!(move_downtime(&c, 4, 0, Some("node2")), Some(185));
        assert_eq!(move_downtime(&c, 4, 1, None), Some(240));
        // Another destination, task or job: not this move.
        assert_eq!(move_downtime(&c, 4, 0, Some("node3")), None);
        assert_eq!(move_downtime(&c, 4, 2, None), None);
        assert_eq!(move_downtime(&c, 5, 0, None), None);
        // A task that moved twice: the newest note; a note without a figure gives none.
        let twice = "rebalancer: task 0 of step 4.0 moved node1 -> node2 (downtime 185 ms); \
                     rebalancer: task 0 of step 4.0 moved node2 -> node1 (downtime 90 ms)";
        assert_eq!(move_downtime(twice, 4, 0, None), Some(90));
        assert_eq!(
            move_downtime(
                "rebalancer: task 0 of step 4.0 moved node1 -> node2",
                4,
                0,
                None
            ),
            None
        );
        assert_eq!(admin_comment("JobId=4\n   AdminComment=(null)\n"), "");
    }

    #[test]
    fn srun_output_files_come_from_its_writable_descriptors() {
        let f = |fd, p: &str, w| (fd, PathBuf::from(p), w);
        // srun -o out.txt: one descriptor for both streams.
        let o = OutputFiles::from_fds(&[
            f(1, "/dev/pts/0", true),
            f(4, "/work/out.txt", true),
            f(5, "/etc/slurm/slurm.conf", false),
        ]);
        assert_eq!(
            o.stdout.as_deref(),
            Some(std::path::Path::new("/work/out.txt"))
        );
        assert_eq!(o.stderr, o.stdout);
        // srun -o out -e err: opened in that order.
        let o = OutputFiles::from_fds(&[f(7, "/w/err", true), f(6, "/w/out", true)]);
        assert_eq!(o.stdout.as_deref(), Some(std::path::Path::new("/w/out")));
        assert_eq!(o.stderr.as_deref(), Some(std::path::Path::new("/w/err")));
        // Output to the terminal or a shell redirection (fd 1): sattach inherits it.
        assert_eq!(
            OutputFiles::from_fds(&[f(1, "/w/redirected", true)]),
            OutputFiles::default()
        );
    }

    #[test]
    fn sattach_lines_are_sorted_out() {
        assert_eq!(
            classify("sattach: 1 tasks finished (rc=768)"),
            SattachLine::Finished(768)
        );
        assert_eq!(exit_code(768), 3);
        assert_eq!(exit_code(9), 137);
        assert_eq!(classify("served 100"), SattachLine::Task);
        assert_eq!(
            classify("sattach: error: task 0 exited with exit code 3"),
            SattachLine::Verbose
        );
        assert_eq!(
            classify("sattach: error: Could not get job step info: Invalid job id"),
            SattachLine::Error
        );
        assert_eq!(
            classify("sattach: Node node2: no tasks running"),
            SattachLine::Verbose
        );
    }
}
