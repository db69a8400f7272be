//! Slurm tasks on the destination: restored by a restore step (srun) that the destination
//! starts at prepare, so that the restored tree is part of the job (see `LIFECYCLE.md`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::MigrationMode;

use super::host::{Helper, Host};
pub use super::step_user::StepUser;
use crate::agent::Agent;
use crate::container::{self, ContainerMeta};
use crate::criu;
use crate::error::AgentError;

/// The restore plan a restore step's waiter runs (it adds --restore-detached --restore-sibling
/// --pidfile and its stdio). Pure.
pub fn restore_plan(
    criu_path: &std::path::Path,
    migration: &str,
    meta: &ContainerMeta,
    images: &std::path::Path,
    root: &std::path::Path,
    netns_path: &std::path::Path,
    lazy: bool,
) -> rebalancer_proto::RestorePlan {
    // A stdin file is handed to CRIU by the waiter, not inherited from the restore step.
    let waiter_opens = |fd: usize| fd == 0 && stdin_file(meta).is_some();
    let args = criu::RestoreArgs {
        images_dir: images.to_path_buf(),
        root: root.to_path_buf(),
        ext_mounts: container::external_mounts(&meta.mounts)
            .into_iter()
            .map(|(_, key, src)| (key, src))
            .collect(),
        inherit: Vec::new(),
        pidfile: PathBuf::new(),
        lazy,
        leave_stopped: true,
        // The restore step's tree belongs in the step's (Slurm's) cgroups.
        ignore_cgroups: false,
    }
    .build();
    rebalancer_proto::RestorePlan {
        migration: migration.to_string(),
        container: meta.spec.id.clone(),
        criu: criu_path.display().to_string(),
        args,
        stdio_keys: meta
            .stdio_keys
            .iter()
            .enumerate()
            .map(|(fd, k)| (!k.is_empty() && !waiter_opens(fd)).then(|| k.clone()))
            .collect(),
        inherit_files: std::iter::once((
            criu::NET_KEY.to_string(),
            netns_path.display().to_string(),
        ))
        .chain(stdin_file(meta).map(|p| (meta.stdio_keys[0].clone(), p.to_string())))
        .collect(),
    }
}

/// A task's stdin that was a file (a batch script's `/dev/null`, `srun --input=FILE%t`): the
/// restore step's waiter opens it for CRIU itself. Slurm 22.05's slurmstepd crashes on a step
/// whose stdin and stdout are both per-task files, so the restore step cannot be given it.
fn stdin_file(meta: &ContainerMeta) -> Option<&str> {
    let path = meta.stdio_paths.first()?;
    let key = meta.stdio_keys.first()?;
    (container::is_external_file_key(key)
        && container::stdin_refusal(&meta.stdio_keys, &meta.stdio_paths).is_none())
    .then_some(path.as_str())
}

/// Substitutes `{job}`, `{step}`, `{task}`, `{uid}`, `{gid}`, `{node}` and `{migration}` in the
/// configured restore command. Pure.
pub fn restore_command(
    template: &[String],
    spec: &rebalancer_proto::ContainerSpec,
    task: &rebalancer_proto::TaskRef,
    node: &str,
    migration: &str,
) -> Vec<String> {
    template
        .iter()
        .map(|a| {
            a.replace("{job}", &task.job_id.to_string())
                .replace("{step}", &task.step_id.to_string())
                .replace("{task}", &task.task_id.to_string())
                .replace("{uid}", &spec.uid.to_string())
                .replace("{gid}", &spec.gid.to_string())
                .replace("{node}", node)
                .replace("{migration}", migration)
        })
        .collect()
}

/// How the restore step gets the task's stdio files back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPlan {
    /// srun options (`--output`, `--error`, `--open-mode=append`).
    pub options: Vec<String>,
    /// Symlinks to create first: (link, target).
    pub links: Vec<(PathBuf, PathBuf)>,
}

/// Plans the restore step's stdout/stderr from the files the task had on the source
/// (`stdio_paths`, empty for pipes; a stdin file is opened by the waiter, see [`restore_plan`]).
/// CRIU puts an inherited file back at its old offset, so each must again be a file that
/// slurmstepd opens for the task — srun opens plain `--output` names itself and hands the task a
/// pipe. A `%t` in the name makes slurmstepd open it (the restore step has one task, 0), so
/// the name is a symlink `<link_dir>/out-0` to the real file. Output files are appended to, so an
/// `--output` file or a batch job's `slurm-%j.out` holds the whole output. Pure.
pub fn restore_stdio_plan(stdio_paths: &[String], link_dir: &Path) -> StdioPlan {
    let file = |i: usize| {
        stdio_paths
            .get(i)
            .and_then(|k| container::stdio_file(k).or((k == "/dev/null").then_some(Path::new(k))))
    };
    let mut plan = StdioPlan::default();
    let mut add = |opt: &str, name: &str, target: &Path| {
        plan.links
            .push((link_dir.join(format!("{name}-0")), target.to_path_buf()));
        plan.options
            .push(format!("--{opt}={}/{name}-%t", link_dir.display()));
    };
    let (out, err) = (file(1), file(2));
    if let Some(o) = out {
        add("output", "out", o);
    }
    if let Some(e) = err.filter(|e| Some(*e) != out) {
        add("error", "err", e);
    }
    if out.is_some() || err.is_some() {
        plan.options.push("--open-mode=append".into());
    }
    plan
}

/// Files of the task's stdio that this node cannot see: the restore would fail on them.
pub fn missing_stdio_files(stdio_paths: &[String]) -> Vec<String> {
    stdio_paths
        .iter()
        .filter(|k| container::stdio_file(k).is_some_and(|p| !p.is_file()))
        .cloned()
        .collect()
}

struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where restore steps' stdio symlinks go: outside the agent's run directory, which is root-only
/// (0700) on a real node, since slurmstepd opens `--output` as the job's user.
pub const STDIO_LINK_ROOT: &str = "/run/slurm-rebalancer-stdio";

/// Creates the symlinks of a [`StdioPlan`] in `dir`, which slurmstepd traverses as the job's
/// user: its parents are root's and only searchable (0711), `dir` itself is the user's (0700),
/// so other users cannot list which files a job writes.
fn make_stdio_links(
    dir: &Path,
    links: &[(PathBuf, PathBuf)],
    (uid, gid): (u32, u32),
) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: String| move |source| AgentError::Io { what, source };
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io(format!("mkdir {}", dir.display())))?;
    let mut d = dir.parent();
    while let Some(p) = d.filter(|p| p.starts_with(STDIO_LINK_ROOT)) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711))
            .map_err(io(format!("chmod {}", p.display())))?;
        d = p.parent();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("chmod {}", dir.display())))?;
    for (link, target) in links {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(target, link).map_err(io(format!(
            "symlink {} -> {}",
            link.display(),
            target.display()
        )))?;
    }
    // Last: once it is the user's, the links are the user's to change (slurmstepd opens them
    // as the user, so only the user's own files can be reached through them).
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .map_err(io(format!("chown {}", dir.display())))?;
    Ok(())
}

/// A restore step started at prepare, waiting for its go.
pub(super) struct StepLaunch {
    /// Lets the step's `prepare-restore` be answered: the images are in.
    go: tokio::sync::watch::Sender<bool>,
    registered: tokio::sync::oneshot::Receiver<i32>,
    log: PathBuf,
    program: String,
    /// The stdio symlinks, until slurmstepd opened them.
    _links: Option<RemoveDirOnDrop>,
}

/// Starts the restore step (srun) while the source still runs: Slurm's step launch (slurmctld,
/// slurmd, slurmstepd, the plugin's set-up) then costs no downtime. The step's `prepare-restore`
/// is answered once the images are in ([`restore`]).
/// What the step is started for: the incoming migration's identity and where its pieces are.
pub(super) struct StepTarget<'a> {
    pub migration: &'a str,
    pub meta: &'a ContainerMeta,
    pub images: &'a Path,
    pub root: &'a Path,
    pub netns: &'a Path,
    pub mode: MigrationMode,
}

pub(super) fn start<H: Host>(
    host: &H,
    agent: &Arc<Agent>,
    inc: &StepTarget<'_>,
) -> Result<(StepLaunch, H::Step), AgentError> {
    let task = inc.meta.spec.task.clone().ok_or_else(|| {
        AgentError::BadRequest("restore step for a container without a Slurm task".into())
    })?;
    let plan = restore_plan(
        &agent.cfg.criu,
        inc.migration,
        inc.meta,
        inc.images,
        inc.root,
        inc.netns,
        inc.mode == MigrationMode::PostCopy,
    );
    let (tx, registered) = tokio::sync::oneshot::channel();
    let (go, ready) = tokio::sync::watch::channel(false);
    agent.restore_steps().insert(
        inc.migration.to_string(),
        crate::agent::RestoreStep {
            plan,
            registered: Some(tx),
            ready,
            task: None,
            waiter: None,
        },
    );
    let mut links = None;
    let mut argv = restore_command(
        &agent.cfg.restore_command,
        &inc.meta.spec,
        &task,
        &agent.cfg.node,
        inc.migration,
    );
    if Path::new(&argv[0]).file_name() == Some(std::ffi::OsStr::new("srun")) {
        let link_dir = Path::new(STDIO_LINK_ROOT)
            .join(&agent.cfg.node)
            .join(inc.migration);
        let stdio = restore_stdio_plan(&inc.meta.stdio_paths, &link_dir);
        if !stdio.links.is_empty() {
            links = Some(RemoveDirOnDrop(link_dir.clone()));
            make_stdio_links(
                &link_dir,
                &stdio.links,
                (inc.meta.spec.uid, inc.meta.spec.gid),
            )?;
        }
        argv.splice(1..1, stdio.options);
    }
    let log_path = inc.images.join("restore-step.log");
    let log = std::fs::File::create(&log_path).map_err(|source| AgentError::Io {
        what: format!("create {}", log_path.display()),
        source,
    })?;
    let user = StepUser::of_job(inc.meta.spec.uid, inc.meta.spec.gid);
    tracing::info!(migration = %inc.migration, command = ?argv, uid = user.uid, gid = user.gid,
        "starting the restore step");
    let child = host.start_step(agent, inc.migration, &argv, &user, log)?;
    let step = StepLaunch {
        go,
        registered,
        log: log_path,
        program: argv[0].clone(),
        _links: links,
    };
    Ok((step, child))
}

/// Lets the restore step started at prepare restore the tree, and waits until its waiter
/// registered it. Returns the restored pid 1 and the pages CRIU restored.
pub(super) async fn restore<H: Host>(
    host: &H,
    step: StepLaunch,
    child: &mut H::Step,
    images: &Path,
    migration: &str,
) -> Result<(i32, u64), AgentError> {
    let StepLaunch {
        go,
        registered,
        log,
        program,
        _links,
    } = step;
    let _ = go.send(true);
    let pid = tokio::select! {
        r = registered => r.map_err(|_| AgentError::Internal("restore step registration lost".into()))?,
        st = child.wait() => {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            let criu_log = images.join("restore.log");
            let criu = if criu_log.exists() { format!("; criu: {}", criu::log_tail(images, "restore.log")) } else { String::new() };
            return Err(AgentError::Criu {
                action: "restore (restore step)",
                message: format!("{program} {} before registering: {}{criu}", criu::exit_text(&st), criu::one_line(&out)),
            });
        }
        _ = host.sleep(Duration::from_secs(60)) => {
            return Err(AgentError::Timeout("the restore step did not register within 60 s".into()));
        }
    };
    let stats = criu::read_stats(images, "stats-restore").unwrap_or_default();
    tracing::info!(migration = %migration, pid, "restored by the restore step (stopped), waiting for commit");
    Ok((pid, stats.pages_restored))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn restore_step_plan_and_command() {
        let meta = ContainerMeta {
            spec: crate::spank::task_spec(
                "j7.s0.t0",
                &rebalancer_proto::TaskRegistration {
                    task: rebalancer_proto::TaskRef {
                        job_id: 7,
                        step_id: 0,
                        task_id: 0,
                    },
                    pid: 1,
                    uid: 0,
                    gid: 0,
                    node: "n".into(),
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
                },
                "198.19.0.9",
                &[],
            ),
            address: Ipv4Addr::new(198, 19, 0, 9),
            mounts: vec![container::MountPlan::Bind {
                source: "/usr".into(),
                target: "/usr".into(),
                readonly: true,
            }],
            symlinks: vec![],
            stdio_keys: vec!["".into(), "pipe:[5]".into(), "pipe:[6]".into()],
            stdio_paths: vec![],
            started_at: 0,
        };
        let plan = restore_plan(
            std::path::Path::new("/usr/local/sbin/criu"),
            "m1",
            &meta,
            std::path::Path::new("/run/i"),
            std::path::Path::new("/run/r"),
            std::path::Path::new("/run/netns/x"),
            false,
        );
        let a = plan.args.join(" ");
        assert!(a.starts_with("restore --images-dir /run/i"), "{a}");
        assert!(
            a.contains("--external mnt[rb-usr]:/usr") && a.contains("--leave-stopped"),
            "{a}"
        );
        assert!(!a.contains("--restore-detached"), "{a}");
        assert_eq!(
            plan.stdio_keys,
            vec![None, Some("pipe:[5]".into()), Some("pipe:[6]".into())]
        );
        assert_eq!(
            plan.inherit_files,
            vec![("rb-net".to_string(), "/run/netns/x".to_string())]
        );
        // A batch script's stdin (/dev/null from slurmstepd): the waiter opens it for CRIU.
        let mut batch = meta.clone();
        batch.stdio_keys = vec![
            "file[1c:2a]".into(),
            "file[1d:2b]".into(),
            "file[1d:2b]".into(),
        ];
        batch.stdio_paths = vec![
            "/dev/null".into(),
            "/w/slurm-7.out".into(),
            "/w/slurm-7.out".into(),
        ];
        let plan = restore_plan(
            std::path::Path::new("/usr/local/sbin/criu"),
            "m1",
            &batch,
            std::path::Path::new("/run/i"),
            std::path::Path::new("/run/r"),
            std::path::Path::new("/run/netns/x"),
            false,
        );
        assert_eq!(
            plan.stdio_keys,
            vec![None, Some("file[1d:2b]".into()), Some("file[1d:2b]".into())]
        );
        assert_eq!(
            plan.inherit_files,
            vec![
                ("rb-net".to_string(), "/run/netns/x".to_string()),
                ("file[1c:2a]".to_string(), "/dev/null".to_string())
            ]
        );
        let mut spec = meta.spec.clone();
        (spec.uid, spec.gid) = (1000, 100);
        let cmd = restore_command(
            &[
                "srun".into(),
                "--jobid={job}".into(),
                "--uid={uid}".into(),
                "--gid={gid}".into(),
                "--job-name=r:{step}.{task}".into(),
                "-w".into(),
                "{node}".into(),
                "--rebalancer-restore={migration}".into(),
            ],
            &spec,
            &rebalancer_proto::TaskRef {
                job_id: 7,
                step_id: 2,
                task_id: 1,
            },
            "n2",
            "m1",
        );
        assert_eq!(
            cmd,
            [
                "srun",
                "--jobid=7",
                "--uid=1000",
                "--gid=100",
                "--job-name=r:2.1",
                "-w",
                "n2",
                "--rebalancer-restore=m1"
            ]
        );
    }

    /// The restore step runs as the job's user with the user's groups and login variables; a
    /// uid unknown to the name service still gets its gid, and root's agent switches only for a
    /// non-root job.
    #[test]
    fn restore_step_runs_as_the_jobs_user() {
        let root = StepUser::of_job(0, 0);
        assert!(root.groups.contains(&0), "{root:?}");
        assert!(
            root.env.contains(&("USER".into(), "root".into())),
            "{root:?}"
        );
        assert!(!root.needs_switch(0));
        let ghost = StepUser::of_job(3_999_999_917, 4242);
        assert_eq!(ghost.groups, vec![4242]);
        assert!(ghost.env.is_empty(), "{ghost:?}");
        assert!(ghost.needs_switch(0));
        assert!(!ghost.needs_switch(1000));
    }

    /// Root's child becomes the job's user, groups included, before it execs (what the restore
    /// step's srun runs as).
    #[test]
    #[ignore = "needs root: the child changes its uid, gid and groups"]
    fn a_root_child_switches_to_the_jobs_user() {
        use std::os::unix::process::CommandExt;
        let user = StepUser {
            uid: 65534,
            gid: 65533,
            groups: vec![65533, 65532],
            env: vec![],
        };
        assert!(
            user.needs_switch(nix::unistd::getuid().as_raw()),
            "run as root"
        );
        let u = user.clone();
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "id -u; id -g; id -G"]);
        // SAFETY: the hook only calls StepUser::switch, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || u.switch());
        }
        let out = cmd.output().expect("run sh");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["65534", "65533"], "{text}");
        let mut groups: Vec<&str> = lines[2].split_whitespace().collect();
        groups.sort();
        assert_eq!(groups, ["65532", "65533"], "{text}");
    }

    #[test]
    fn restore_step_reopens_the_tasks_files_through_slurmstepd() {
        let dir = std::env::temp_dir().join(format!("rb-stdio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let out = dir.join("out.txt");
        let err = dir.join("err.txt");
        std::fs::write(&out, "a").expect("out");
        std::fs::write(&err, "b").expect("err");
        let s = |p: &Path| p.display().to_string();
        let paths = |k: [&str; 3]| k.map(String::from).to_vec();
        let links = Path::new("/run/rb/stdio/m1");
        // A batch script: stdin /dev/null, stdout and stderr in two files.
        let plan = restore_stdio_plan(&paths(["/dev/null", &s(&out), &s(&err)]), links);
        assert_eq!(
            plan.options,
            [
                "--output=/run/rb/stdio/m1/out-%t",
                "--error=/run/rb/stdio/m1/err-%t",
                "--open-mode=append"
            ]
        );
        assert_eq!(
            plan.links,
            [
                (links.join("out-0"), out.clone()),
                (links.join("err-0"), err.clone())
            ]
        );
        // One file for both streams: --output alone (slurmstepd sends stderr there too).
        let plan = restore_stdio_plan(&paths(["", &s(&out), &s(&out)]), links);
        assert_eq!(
            plan.options,
            ["--output=/run/rb/stdio/m1/out-%t", "--open-mode=append"]
        );
        // Pipes (srun's own I/O): nothing to reopen.
        assert_eq!(
            restore_stdio_plan(&paths(["", "", ""]), links),
            StdioPlan::default()
        );
        // A file this node cannot see is reported before anything starts.
        let gone = s(&dir.join("missing.txt"));
        assert_eq!(
            missing_stdio_files(&paths(["/dev/null", &s(&out), &gone])),
            [gone]
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
