//! slurmstepd (remote context): the task side. See `container` for the process layout and
//! `restore` for restore steps.

use rebalancer_proto::TaskRef;

use crate::agent::Agent;
use crate::config::Config;
use crate::container::{self, task_name, TaskInfo};
use crate::ffi::{self, Spank};
use crate::state::{config_or_complain, state};
use crate::{chain, restore};

pub fn init_post_opt(_sp: Spank) -> libc::c_int {
    0
}

pub fn user_init(_sp: Spank) -> libc::c_int {
    0
}

/// The Slurm node name of this slurmstepd (several slurmd may share a host).
fn node_name() -> String {
    std::env::var("SLURMD_NODENAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn task_info(sp: Spank, cfg: &Config) -> Result<TaskInfo, String> {
    let opts = state().opts.clone();
    let get = |what: &str, r: Result<u32, ffi::SpankError>| {
        r.map_err(|e| format!("cannot read the {what} from Slurm: {e}"))
    };
    let task = TaskRef {
        job_id: get("job id", sp.job_id())?,
        step_id: get("step id", sp.step_id())?,
        task_id: get("task id", sp.task_global_id())?,
    };
    let mem_mb = sp.step_mem_mb().unwrap_or(0);
    Ok(TaskInfo {
        task,
        uid: get("user id", sp.uid())?,
        gid: get("group id", sp.gid())?,
        node: node_name(),
        class: opts.class(cfg),
        mode: opts.mode(cfg),
        cpus: sp.cpus_per_task().ok().filter(|c| *c > 0).map(f64::from),
        memory_limit: (mem_mb > 0).then(|| mem_mb * 1024 * 1024),
        program: sp.argv0().ok().filter(|p| p.starts_with('/')),
    })
}

pub fn task_init_privileged(sp: Spank) -> libc::c_int {
    let opts = state().opts.clone();
    let Some(Ok(cfg)) = state().config.clone() else {
        if opts.restore.is_some() || opts.migratable.is_some() || opts.mode.is_some() {
            config_or_complain("--migratable");
            return -1;
        }
        return 0;
    };
    if opts.restore.is_none() && !opts.wants_container(&cfg) {
        return 0;
    }
    let info = match task_info(sp, &cfg) {
        Ok(i) => i,
        Err(e) => {
            ffi::log_error(&format!(
                "rebalancer: {e}; the task cannot be made migratable"
            ));
            return -1;
        }
    };
    // The extern step has no task of the user's; the interactive step is a shell on a pty,
    // which cannot follow a task to another node.
    if matches!(
        info.task.step_id,
        ffi::SLURM_EXTERN_CONT | ffi::SLURM_INTERACTIVE_STEP
    ) {
        return 0;
    }
    let name = task_name(&info.task);
    let socket = cfg.socket_for(&info.node);
    let mut agent = match Agent::connect(&socket, &info.node, cfg.timeout) {
        Ok(a) => a,
        Err(e) => {
            ffi::log_error(&format!(
                "rebalancer: task {name} on {}: {}; the task cannot be made migratable",
                info.node,
                chain(&e)
            ));
            return -1;
        }
    };

    if let Some(migration) = &opts.restore {
        return match restore::run(agent, &info, migration, cfg.timeout) {
            Ok(()) => 0,
            Err(e) => {
                ffi::log_error(&format!(
                    "rebalancer: restore of migration {migration} as task {name} failed: {}",
                    chain(&e)
                ));
                -1
            }
        };
    }

    let prepared = match container::prepare(&mut agent, &info) {
        Ok(p) => p,
        Err(e) => {
            ffi::log_error(&format!(
                "rebalancer: task {name} on {}: {}; the task cannot be made migratable",
                info.node,
                chain(&e)
            ));
            return -1;
        }
    };
    // Visible to the program; set before the fork so pid 1 inherits it.
    let _ = sp.setenv("REBALANCER_CONTAINER", &prepared.container);
    let _ = sp.setenv("REBALANCER_ADDRESS", &prepared.address);
    match container::launch(agent, &info, &prepared) {
        Ok(()) => 0,
        Err(e) => {
            ffi::log_error(&format!(
                "rebalancer: task {name}: {}; the task cannot be made migratable",
                chain(&e)
            ));
            -1
        }
    }
}

/// As the user, past Slurm's exec barrier and after it set up the task's stdio: the restore
/// helper hands the stdio over; a container's pid 1 has the waiter move it into the task's
/// cgroups.
pub fn task_init(_sp: Spank) -> libc::c_int {
    restore::hand_over_stdio();
    crate::cgroups::child_reached();
    0
}
