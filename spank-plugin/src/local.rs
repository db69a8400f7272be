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

pub fn user_init(_sp: Spank) -> libc::c_int {
    let st = state();
    if let Some(Ok(cfg)) = &st.config {
        if st.opts.wants_container(cfg) {
            ffi::log_verbose(&format!(
                "rebalancer: tasks will run in migratable containers (class {}, mode {})",
                st.opts.class(cfg).as_deref().unwrap_or("default"),
                st.opts.mode(cfg).map_or("default", |m| m.as_str())
            ));
        }
    }
    0
}
