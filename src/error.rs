//! Typed errors. Failures reported by libslurm carry its errno and `slurm_strerror` text.

use std::ffi::CStr;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::sys;

/// Result of every fallible call in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error number from libslurm (a Slurm `ESLURM_*` code or a plain `errno`), with its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmErrno {
    /// Raw code as returned by `slurm_get_errno()`.
    pub code: i32,
    /// `slurm_strerror(code)`.
    pub message: String,
}

impl SlurmErrno {
    /// Describes `code` with `slurm_strerror`.
    pub fn from_code(code: i32) -> Self {
        // SAFETY: slurm_strerror returns a pointer to a static string (or NULL); it neither needs
        // slurm_init nor keeps the argument.
        let text = unsafe { sys::slurm_strerror(code) };
        let message = if text.is_null() {
            format!("unknown error {code}")
        } else {
            // SAFETY: non-NULL, NUL-terminated static string owned by libslurm/libc.
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        };
        SlurmErrno { code, message }
    }

    /// The error left by the last failing libslurm call on this thread (libslurm reports through
    /// `errno`; `slurm_get_errno()` only returned it and is gone from 24.11).
    pub fn last() -> Self {
        let code = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        Self::from_code(code)
    }

    /// Slurm's `ESLURM_JOB_SETTING_DB_INX` (a job update refused while, or because, the job has no
    /// accounting index; permanent after a resize under `accounting_storage/none`).
    /// The code does not exist from Slurm 24.11 on.
    pub fn is_setting_db_index(&self) -> bool {
        #[cfg(slurm_db_inx_errno)]
        {
            self.code == sys::ESLURM_JOB_SETTING_DB_INX as i32
        }
        #[cfg(not(slurm_db_inx_errno))]
        {
            false
        }
    }

    /// `SLURM_NO_CHANGE_IN_DATA`: a load with an update time found nothing newer.
    pub fn is_no_change(&self) -> bool {
        self.code == sys::SLURM_NO_CHANGE_IN_DATA as i32
    }

    /// Slurm's `ESLURM_INVALID_JOB_ID`.
    pub fn is_invalid_job_id(&self) -> bool {
        self.code == sys::ESLURM_INVALID_JOB_ID as i32
    }
}

impl fmt::Display for SlurmErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (slurm error {})", self.message, self.code)
    }
}

impl std::error::Error for SlurmErrno {}

/// Everything that can go wrong talking to Slurm through this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A libslurm call returned failure.
    #[error("{call} failed")]
    Api {
        /// The libslurm function.
        call: &'static str,
        /// What libslurm said.
        #[source]
        source: SlurmErrno,
    },
    /// libslurm would `fatal()` (exit the process) without a configuration, so this is checked first.
    #[error("no Slurm configuration at {}", .path.display())]
    ConfigMissing {
        /// Where the configuration was looked for.
        path: PathBuf,
    },
    /// No explicit path, no SLURM_CONF and no default configuration file.
    #[error("no Slurm configuration: pass a path, set SLURM_CONF or create {default}")]
    NoConfig {
        /// The default path that was checked.
        default: &'static str,
    },
    /// slurm_init is process-wide and cannot be re-run with another configuration.
    #[error("libslurm already initialised with {}, not {}", fmt_conf(.active), fmt_conf(.requested))]
    AlreadyInitialised {
        /// Configuration the process was initialised with (None: libslurm's own lookup).
        active: Option<PathBuf>,
        /// Configuration asked for now.
        requested: Option<PathBuf>,
    },
    /// A string handed to Slurm contains a NUL byte.
    #[error("{what} contains a NUL byte")]
    InteriorNul {
        /// Which argument.
        what: &'static str,
    },
    /// A hostlist expression libslurm cannot parse.
    #[error("invalid hostlist expression {0:?}")]
    InvalidHostlist(String),
    /// A request that makes no sense before it reaches Slurm.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The job is not (or no longer) known to slurmctld.
    #[error("job {job} not found")]
    JobNotFound {
        /// Job id.
        job: u32,
    },
    /// A batch job's batch host cannot be removed from its allocation.
    #[error("job {job} is a batch job and cannot leave its batch host {host}")]
    BatchHostPinned {
        /// Job id.
        job: u32,
        /// Node running the batch script.
        host: String,
    },
    /// The helper allocation for an expansion did not start in time (it has been cancelled).
    #[error("allocation {allocation} to expand job {job} did not start within {waited:?}")]
    AllocationTimeout {
        /// Job being expanded.
        job: u32,
        /// The helper job.
        allocation: u32,
        /// How long we waited.
        waited: Duration,
    },
    /// The helper allocation for an expansion ended without running (e.g. dependency never satisfied).
    #[error("allocation {allocation} to expand job {job} ended in state {state}")]
    AllocationFailed {
        /// Job being expanded.
        job: u32,
        /// The helper job.
        allocation: u32,
        /// Its final state.
        state: String,
    },
}

fn fmt_conf(p: &Option<PathBuf>) -> String {
    match p {
        Some(p) => p.display().to_string(),
        None => "the default configuration".to_owned(),
    }
}

impl Error {
    /// The libslurm error behind this one, if any.
    pub fn slurm_errno(&self) -> Option<&SlurmErrno> {
        match self {
            Error::Api { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Captures the last libslurm error for `call`.
    pub(crate) fn last(call: &'static str) -> Self {
        Error::Api {
            call,
            source: SlurmErrno::last(),
        }
    }
}

/// Maps a libslurm return code (0 success, -1 with errno set) to a Result.
pub(crate) fn check(rc: i32, call: &'static str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::last(call))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_text_is_slurms() {
        let e = SlurmErrno::from_code(sys::ESLURM_INVALID_JOB_ID as i32);
        assert!(e.is_invalid_job_id());
        assert_eq!(e.message, "Invalid job id specified");
        #[cfg(slurm_db_inx_errno)]
        {
            let e = SlurmErrno::from_code(sys::ESLURM_JOB_SETTING_DB_INX as i32);
            assert!(e.is_setting_db_index());
            assert!(e.message.contains("DB index"), "{}", e.message);
        }
        // Plain errno values fall through to strerror.
        let e = SlurmErrno::from_code(libc::ENOENT);
        assert_eq!(e.message, "No such file or directory");
    }

    #[test]
    fn api_error_chains_its_cause() {
        let err = Error::Api {
            call: "slurm_update_job",
            source: SlurmErrno::from_code(sys::ESLURM_INVALID_JOB_ID as i32),
        };
        assert_eq!(err.to_string(), "slurm_update_job failed");
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(
            cause.as_deref(),
            Some(
                format!(
                    "Invalid job id specified (slurm error {})",
                    sys::ESLURM_INVALID_JOB_ID
                )
                .as_str()
            )
        );
    }
}
