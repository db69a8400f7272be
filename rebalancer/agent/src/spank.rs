//! Slurm task containers announced by the SPANK plugin (`prepare-task`, `register-task`,
//! `task-exited`). The peer checks follow `spank-plugin/src/verify.rs` (copied rules): the peer
//! is root, a direct child of the step's `slurmstepd: [JOB.STEP]`, and `register-task`'s pid is
//! the peer's child.

use std::sync::Arc;

use std::path::PathBuf;

use rebalancer_proto::{
    now_millis, ContainerSpec, ContainerState, MountSpec, PreparedTask, RootfsSpec, TaskRef,
    TaskRegistration,
};

use crate::agent::Agent;
use crate::container::{self, Container, ContainerMeta, MountPlan};
use crate::error::AgentError;
use crate::netns;

pub use crate::agent::PendingTask;

/// The agent's mount plan in the protocol's terms (same JSON).
pub fn to_spec(m: &MountPlan) -> MountSpec {
    match m {
        MountPlan::Bind {
            source,
            target,
            readonly,
        } => MountSpec::Bind {
            source: source.display().to_string(),
            target: target.clone(),
            readonly: *readonly,
        },
        MountPlan::Tmpfs { target, options } => MountSpec::Tmpfs {
            target: target.clone(),
            options: options.clone(),
        },
        MountPlan::Dev => MountSpec::Dev,
        MountPlan::Proc => MountSpec::Proc,
    }
}

/// Directories a task needs besides the host dirs: its working directory and the directory of
/// its program when no host dir holds it (a batch script lives in slurmd's spool directory).
fn task_binds(cwd: Option<&str>, program: Option<&str>, host_dirs: &[PathBuf]) -> Vec<String> {
    let program_dir = program
        .filter(|p| p.starts_with('/') && !p.contains(".."))
        .and_then(|p| std::path::Path::new(p).parent())
        .filter(|d| !host_dirs.iter().any(|h| d.starts_with(h)))
        .map(|d| d.to_string_lossy().into_owned());
    let mut binds: Vec<String> = Vec::new();
    for d in [cwd.map(str::to_string), program_dir].into_iter().flatten() {
        if d != "/" && std::path::Path::new(&d).is_dir() && !binds.contains(&d) {
            binds.push(d);
        }
    }
    binds
}

/// The container spec a task runs under: a host-mode root with the step's cwd bound in.
pub fn task_spec(
    id: &str,
    reg: &TaskRegistration,
    address: &str,
    host_dirs: &[PathBuf],
) -> ContainerSpec {
    let cwd = reg
        .cwd
        .clone()
        .filter(|c| c.starts_with('/') && !c.contains(".."));
    ContainerSpec {
        id: id.to_string(),
        task: Some(reg.task.clone()),
        uid: reg.uid,
        gid: reg.gid,
        argv: Vec::new(),
        env: Vec::new(),
        cwd: cwd.clone().unwrap_or_else(|| "/".into()),
        rootfs: RootfsSpec::Host,
        binds: task_binds(cwd.as_deref(), reg.program.as_deref(), host_dirs),
        memory_limit: reg.memory_limit,
        cpus: reg.cpus,
        class: reg.class.clone(),
        address: Some(address.to_string()),
        stdout: None,
        stderr: None,
    }
}

fn parent(pid: i32) -> Option<i32> {
    crate::procstat::ProcStat::of(pid).map(|s| s.ppid)
}

/// The `[JOB.STEP]` label slurmstepd gives itself for `t`.
pub fn step_label(t: &TaskRef) -> String {
    let step = match t.step_id {
        0xffff_fffb => "batch".to_string(),
        0xffff_fffc => "extern".to_string(),
        0xffff_fffa => "interactive".to_string(),
        s => s.to_string(),
    };
    format!("[{}.{}]", t.job_id, step)
}

/// Checks a SPANK peer: root, child of the step's slurmstepd; for `register`, `reg.pid` is the
/// peer's child. Pure over the facts passed in (unit-tested).
pub fn check_peer(
    peer_uid: u32,
    peer_pid: i32,
    ppid: Option<i32>,
    parent_exe: Option<&str>,
    parent_cmdline: Option<&str>,
    register_parent: Option<Option<i32>>,
    reg: &TaskRegistration,
) -> Result<(), AgentError> {
    if peer_uid != 0 {
        return Err(AgentError::PermissionDenied(format!(
            "peer uid {peer_uid} is not root: only a Slurm task process may register"
        )));
    }
    let ppid = ppid.ok_or_else(|| {
        AgentError::PermissionDenied(format!("peer pid {peer_pid} has no parent"))
    })?;
    if !parent_exe.is_some_and(|e| e == "slurmstepd" || e.starts_with("slurmstepd-")) {
        return Err(AgentError::PermissionDenied(format!(
            "parent {ppid} of peer {peer_pid} is not slurmstepd ({parent_exe:?})"
        )));
    }
    let label = step_label(&reg.task);
    if !parent_cmdline.is_some_and(|c| c.contains(&label)) {
        return Err(AgentError::PermissionDenied(format!(
            "peer's slurmstepd is not step {label} ({parent_cmdline:?})"
        )));
    }
    if let Some(p) = register_parent {
        if p != Some(peer_pid) {
            return Err(AgentError::PermissionDenied(format!(
                "pid {} is not a child of the registering task process {peer_pid}",
                reg.pid
            )));
        }
    }
    Ok(())
}

pub fn verify(
    peer_uid: u32,
    peer_pid: Option<i32>,
    reg: &TaskRegistration,
    register: bool,
) -> Result<(), AgentError> {
    let peer_pid = peer_pid.ok_or_else(|| AgentError::PermissionDenied("no peer pid".into()))?;
    if !register && reg.pid != peer_pid {
        return Err(AgentError::PermissionDenied(format!(
            "registration names pid {}, the peer is {peer_pid}",
            reg.pid
        )));
    }
    let ppid = parent(peer_pid);
    let exe = ppid.and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok());
    let exe = exe
        .as_ref()
        .and_then(|e| e.file_name())
        .map(|f| f.to_string_lossy().into_owned());
    let cmd = ppid
        .and_then(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .replace('\0', " ")
                .trim()
                .to_string()
        });
    let reg_parent = register.then(|| parent(reg.pid));
    check_peer(
        peer_uid,
        peer_pid,
        ppid,
        exe.as_deref(),
        cmd.as_deref(),
        reg_parent,
        reg,
    )
}

/// `prepare-task`: the task's netns, veth and address, before its pid 1 exists.
pub async fn prepare(
    agent: &Arc<Agent>,
    peer_uid: u32,
    peer_pid: Option<i32>,
    reg: TaskRegistration,
) -> Result<PreparedTask, AgentError> {
    verify(peer_uid, peer_pid, &reg, false)?;
    let id = reg
        .container
        .clone()
        .unwrap_or_else(|| reg.task.container_id());
    if agent
        .containers()
        .get(&id)
        .is_some_and(|c| matches!(c.state, ContainerState::Running | ContainerState::Migrating))
    {
        return Err(AgentError::Busy(format!(
            "container {id} already runs on {}",
            agent.cfg.node
        )));
    }
    if agent.pending_tasks().contains_key(&id) {
        return Err(AgentError::Busy(format!(
            "container {id} is already being prepared"
        )));
    }
    let address = match &reg.address {
        Some(a) => a
            .parse()
            .map_err(|_| AgentError::BadRequest(format!("address {a:?} is not an IPv4 address")))?,
        None => agent.allocate_address().await?,
    };
    let net = agent.new_net(&id, address);
    let spec = task_spec(&id, &reg, &address.to_string(), &agent.cfg.host_dirs);
    let (mounts, symlinks) = agent.layout(&spec)?;
    let mounts = container::read_only_program_dir(mounts, reg.program.as_deref(), &spec.cwd);
    let root = agent.root_for(&spec);
    let _ = std::fs::remove_dir_all(agent.container_dir(&id));
    container::prepare_root(&root, &mounts, &symlinks)?;
    let pending = PendingTask {
        net: net.clone(),
        spec,
        mounts: mounts.clone(),
        symlinks,
        root: root.clone(),
    };
    agent.pending_tasks().insert(id.clone(), pending);
    if let Err(e) = netns::create(&net, true).await {
        agent.pending_tasks().remove(&id);
        return Err(e);
    }
    tracing::info!(container = %id, job = reg.task.job_id, step = reg.task.step_id, address = %address, "task netns and root prepared");
    Ok(PreparedTask {
        container: id.clone(),
        netns: net.path().display().to_string(),
        address: address.to_string(),
        hostname: Some(id),
        root: Some(root.display().to_string()),
        mounts: mounts.iter().map(to_spec).collect(),
    })
}

/// `register-task`: pid 1 of a prepared task exists; the agent tracks it from now on.
pub fn register(
    agent: &Arc<Agent>,
    peer_uid: u32,
    peer_pid: Option<i32>,
    reg: TaskRegistration,
) -> Result<Container, AgentError> {
    verify(peer_uid, peer_pid, &reg, true)?;
    let id = reg
        .container
        .clone()
        .unwrap_or_else(|| reg.task.container_id());
    let t = agent.pending_tasks().remove(&id).ok_or_else(|| {
        AgentError::NotFound(format!(
            "container {id} was not prepared (prepare-task) on {}",
            agent.cfg.node
        ))
    })?;
    Ok(Container {
        meta: ContainerMeta {
            spec: t.spec,
            address: t.net.address,
            mounts: t.mounts,
            symlinks: t.symlinks,
            // Slurm sets up the task's stdio after this registration: a migration reads them
            // when it starts (migrate::preflight).
            stdio_keys: Vec::new(),
            stdio_paths: Vec::new(),
            started_at: now_millis(),
        },
        net: t.net,
        root: t.root,
        dir: agent.container_dir(&id),
        pid: reg.pid,
        state: ContainerState::Running,
        exit_status: None,
        external: true,
        migrated_to: None,
        arrived_from: None,
        final_status: None,
        cgroup: None,
        runs_in: None,
        waiter: waiter_of(peer_pid),
    })
}

/// A registering task process as [`crate::container::Container::waiter`] records it: its pid
/// (SO_PEERCRED) and that pid's start time.
pub fn waiter_of(pid: Option<i32>) -> Option<(i32, u64)> {
    let pid = pid?;
    Some((pid, crate::procstat::live_start_time(pid)?))
}

/// Releases the netns of tasks that were prepared on a connection that closed unregistered.
pub async fn drop_pending(agent: &Arc<Agent>, ids: &[String]) {
    for id in ids {
        let t = agent.pending_tasks().remove(id);
        if let Some(t) = t {
            tracing::warn!(container = %id, "task never registered; releasing its netns and root");
            netns::destroy(&t.net).await;
            let _ = std::fs::remove_dir_all(agent.container_dir(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> TaskRegistration {
        TaskRegistration {
            task: TaskRef {
                job_id: 42,
                step_id: 0,
                task_id: 1,
            },
            pid: 101,
            uid: 1000,
            gid: 1000,
            node: "n1".into(),
            class: None,
            mode: None,
            cpus: None,
            memory_limit: None,
            container: None,
            address: None,
            rss_bytes: None,
            waiter_pid: None,
            cwd: Some("/tmp".into()),
            program: None,
        }
    }

    #[test]
    fn only_root_children_of_the_right_slurmstepd_pass() {
        let r = reg();
        let stepd = Some("slurmstepd: [42.0]");
        assert!(check_peer(0, 101, Some(50), Some("slurmstepd-wlm"), stepd, None, &r).is_ok());
        let e =
            check_peer(1000, 101, Some(50), Some("slurmstepd"), stepd, None, &r).expect_err("uid");
        assert!(e.to_string().contains("not root"), "{e}");
        let e = check_peer(0, 101, Some(50), Some("bash"), stepd, None, &r).expect_err("exe");
        assert!(e.to_string().contains("not slurmstepd"), "{e}");
        let e = check_peer(
            0,
            101,
            Some(50),
            Some("slurmstepd"),
            Some("slurmstepd: [7.0]"),
            None,
            &r,
        )
        .expect_err("step");
        assert!(e.to_string().contains("[42.0]"), "{e}");
        let e = check_peer(
            0,
            101,
            Some(50),
            Some("slurmstepd"),
            stepd,
            Some(Some(99)),
            &r,
        )
        .expect_err("child");
        assert!(e.to_string().contains("not a child"), "{e}");
        assert!(check_peer(
            0,
            101,
            Some(50),
            Some("slurmstepd"),
            stepd,
            Some(Some(101)),
            &r
        )
        .is_ok());
    }

    #[test]
    fn task_spec_binds_the_step_cwd() {
        let hosts = [PathBuf::from("/usr")];
        let s = task_spec("j42.s0.t1", &reg(), "198.19.0.5", &hosts);
        assert_eq!(s.binds, vec!["/tmp".to_string()]);
        assert_eq!(s.cwd, "/tmp");
        assert_eq!(s.rootfs, RootfsSpec::Host);
        // A batch script's directory is bound; a program under a host dir needs nothing more.
        let mut r = reg();
        r.program = Some("/proc/self/exe".into());
        assert_eq!(
            task_spec("x", &r, "198.19.0.5", &hosts).binds,
            ["/tmp", "/proc/self"]
        );
        r.program = Some("/usr/bin/python3".into());
        assert_eq!(task_spec("x", &r, "198.19.0.5", &hosts).binds, ["/tmp"]);
        let mut r = reg();
        r.cwd = Some("../etc".into());
        assert!(task_spec("x", &r, "198.19.0.5", &hosts).binds.is_empty());
        let json = serde_json::to_value(to_spec(&MountPlan::Bind {
            source: "/usr".into(),
            target: "/usr".into(),
            readonly: true,
        }))
        .expect("json");
        assert_eq!(json["kind"], "bind");
        assert_eq!(json["source"], "/usr");
    }

    #[test]
    fn special_steps_have_names() {
        let mut t = reg().task;
        t.step_id = 0xffff_fffb;
        assert_eq!(step_label(&t), "[42.batch]");
    }
}
