//! srun (local context): options were checked by their callbacks as srun parsed them; here the
//! step as a whole is checked before it is launched.

use crate::dispatch::{config_or_complain, state};
use crate::ffi::{self, Spank};

pub fn init_post_opt(_sp: Spank) -> libc::c_int {
    let opts = state().opts.clone();
    if opts.restore.is_some() {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            ffi::log_error(
                "rebalancer: --rebalancer-restore is used by the rebalancer itself (root only)",
            );
            return -1;
        }
        return 0;
    }
    let asked = opts.migratable.is_some() || opts.mode.is_some();
    if asked && config_or_complain("--migratable").is_none() {
        return -1;
    }
    0
}

pub fn user_init(sp: Spank) -> libc::c_int {
    let mut st = state();
    let Some(Ok(cfg)) = st.config.clone() else {
        return 0;
    };
    if st.opts.wants_container(&cfg) && st.opts.restore.is_none() {
        // Slurm passes no job to the exit callback in srun: keep the ids for it.
        if let (Ok(job), Ok(step)) = (sp.job_id(), sp.step_id()) {
            st.launched = Some((job, step, crate::follow::OutputFiles::default()));
            watch_output_files();
        }
        ffi::log_verbose(&format!(
            "rebalancer: tasks will run in migratable containers (class {}, mode {})",
            st.opts.class(&cfg).as_deref().unwrap_or("default"),
            st.opts.mode(&cfg).map_or("default", |m| m.as_str())
        ));
    }
    0
}

/// At srun's exit: if tasks of this step moved and run on as restore steps, follow them (their
/// output and status become srun's). srun's own exit code is then replaced by the tasks'.
pub fn exit(_sp: Spank) -> libc::c_int {
    let launched = state().launched.take();
    let Some((job, step, files)) = launched else {
        return 0;
    };
    if let Some(code) = crate::follow::follow(job, step, &files) {
        // SAFETY: fflush(NULL) flushes every stdio stream; _exit ends srun with the task's code
        // (srun calls this from its atexit handler, where exit() must not be called again).
        unsafe {
            libc::fflush(std::ptr::null_mut());
            libc::_exit(code);
        }
    }
    0
}

/// srun opens `--output`/`--error` files just after this callback and closes them before its
/// exit callback: note them from a short-lived thread while they are open.
fn watch_output_files() {
    let spawned = std::thread::Builder::new()
        .name("rebalancer-io".into())
        .spawn(|| {
            for _ in 0..50 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let files = crate::follow::OutputFiles::of_this_process();
                if files.stdout.is_some() {
                    if let Some(l) = state().launched.as_mut() {
                        l.2 = files;
                    }
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        ffi::log_verbose(&format!(
            "rebalancer: cannot watch srun's output files: {e}"
        ));
    }
}
