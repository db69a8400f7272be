//! The plugin's process-wide state: Slurm calls a plugin from one thread at a time in every
//! context, so one [`State`] behind a mutex serves every callback.

use std::sync::{Mutex, MutexGuard};

use crate::config::{Config, ConfigError, UserOptions};
use crate::ffi;

pub struct State {
    /// `None` before `slurm_spank_init`; an error when plugstack.conf's arguments are bad.
    pub config: Option<Result<Config, ConfigError>>,
    pub opts: UserOptions,
    /// srun: the job and step of a launched migratable step, for [`crate::follow`] at exit.
    pub launched: Option<(u32, u32, crate::follow::OutputFiles)>,
}

static STATE: Mutex<State> = Mutex::new(State {
    config: None,
    opts: UserOptions {
        migratable: None,
        mode: None,
        no_migrate: false,
        restore: None,
    },
    launched: None,
});

pub fn state() -> MutexGuard<'static, State> {
    // A panic while holding the lock leaves plain data behind; keep using it.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The validated configuration, or the message for a user who asked for migration.
pub fn config_or_complain(what: &str) -> Option<Config> {
    match state().config.clone() {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            ffi::log_error(&format!(
                "rebalancer: {what}: the plugin is misconfigured ({e}); ask an administrator"
            ));
            None
        }
        None => None,
    }
}
