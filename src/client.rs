//! Process-wide libslurm initialisation and the [`Slurm`] handle that proves it happened.

use std::ffi::CString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::ffi::cstring;
use crate::sys;

/// Where Debian's (and the default upstream) libslurm looks when neither a path nor SLURM_CONF is given.
pub const DEFAULT_CONF: &str = "/etc/slurm/slurm.conf";
/// Where a configless slurmd caches the configuration; libslurm tries it after [`DEFAULT_CONF`].
const CONFIGLESS_CACHE: &str = "/run/slurm/conf/slurm.conf";

/// `None`: not initialised; `Some(conf)`: initialised with `conf` (None = libslurm's own lookup).
static INIT: Mutex<Option<Option<PathBuf>>> = Mutex::new(None);

/// A Slurm release number as in `slurm_version.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlurmVersion {
    /// Year-based major (22 for 22.05).
    pub major: u8,
    /// Month-based minor (5 for 22.05).
    pub minor: u8,
    /// Maintenance release.
    pub micro: u8,
}

impl SlurmVersion {
    /// The headers this crate was built against (`SLURM_VERSION_NUMBER` of `slurm_version.h`).
    pub const BUILT_AGAINST: SlurmVersion = SlurmVersion::from_number(sys::BINDINGS_SLURM_VERSION);

    /// Decodes `SLURM_VERSION_NUMBER` (0xMMmmuu).
    pub const fn from_number(n: u32) -> Self {
        SlurmVersion {
            major: ((n >> 16) & 0xff) as u8,
            minor: ((n >> 8) & 0xff) as u8,
            micro: (n & 0xff) as u8,
        }
    }
}

impl fmt::Display for SlurmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}.{}", self.major, self.minor, self.micro)
    }
}

/// Handle to an initialised libslurm. Cheap to clone; every RPC wrapper hangs off it.
///
/// libslurm keeps one configuration per process: [`Slurm::init`] runs `slurm_init` once and later
/// calls with the same configuration return another handle.
#[derive(Debug, Clone)]
pub struct Slurm {
    conf: Option<PathBuf>,
}

impl Slurm {
    /// Initialises libslurm with `conf`, or with libslurm's own lookup (SLURM_CONF, then
    /// [`DEFAULT_CONF`], then a configless cache / SLURM_CONF_SERVER) when `None`.
    ///
    /// libslurm calls `exit()` when it cannot find or parse its configuration, so the file's
    /// existence is checked here first; a file that exists but does not parse still ends the
    /// process. `slurm_init` also sets SLURM_CONF in the environment: call this before spawning
    /// threads that read the environment.
    pub fn init(conf: Option<&Path>) -> Result<Slurm> {
        let requested = conf.map(Path::to_path_buf);
        let mut state = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(active) = state.as_ref() {
            if *active == requested {
                return Ok(Slurm { conf: requested });
            }
            return Err(Error::AlreadyInitialised {
                active: active.clone(),
                requested,
            });
        }

        check_config_source(conf, std::env::var_os("SLURM_CONF").map(PathBuf::from))?;
        let c_conf: Option<CString> = match conf {
            Some(p) => Some(cstring(&p.to_string_lossy(), "configuration path")?),
            None => None,
        };
        let ptr = c_conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: `ptr` is NULL or a valid C string that outlives the call; slurm_init copies it.
        // We serialise initialisation through INIT; libslurm itself ignores repeated calls.
        unsafe { sys::slurm_init(ptr) };
        *state = Some(requested.clone());
        Ok(Slurm { conf: requested })
    }

    /// The configuration path given to [`Slurm::init`] (None: libslurm's own lookup).
    pub fn conf(&self) -> Option<&Path> {
        self.conf.as_deref()
    }

    /// A handle for unit tests of code paths that fail before any RPC.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Slurm {
        Slurm { conf: None }
    }

    /// The Slurm release whose headers this crate was compiled against.
    pub fn built_against() -> SlurmVersion {
        SlurmVersion::BUILT_AGAINST
    }
}

/// Mirrors libslurm's `_establish_config_source()` so that a missing file is an error, not exit(1).
fn check_config_source(conf: Option<&Path>, env_conf: Option<PathBuf>) -> Result<()> {
    if let Some(p) = conf.map(Path::to_path_buf).or(env_conf) {
        return if p.is_file() {
            Ok(())
        } else {
            Err(Error::ConfigMissing { path: p })
        };
    }
    if Path::new(DEFAULT_CONF).is_file()
        || Path::new(CONFIGLESS_CACHE).is_file()
        || std::env::var_os("SLURM_CONF_SERVER").is_some()
    {
        return Ok(());
    }
    Err(Error::NoConfig {
        default: DEFAULT_CONF,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_decodes_slurm_number() {
        let v = SlurmVersion::from_number(0x16_05_08);
        assert_eq!(v.to_string(), "22.05.8");
        assert!(v < SlurmVersion::from_number(0x17_0b_00));
        assert!(SlurmVersion::BUILT_AGAINST >= SlurmVersion::from_number(0x16_05_00));
        assert_eq!(
            env!("SLURM_VERSION_STRING"),
            SlurmVersion::BUILT_AGAINST.to_string()
        );
    }

    #[test]
    fn missing_config_is_an_error_not_an_exit() {
        let dir = std::env::temp_dir().join("rebalancer-slurm-no-such-dir");
        let missing = dir.join("slurm.conf");
        match check_config_source(Some(&missing), None) {
            Err(Error::ConfigMissing { path }) => assert_eq!(path, missing),
            other => panic!("expected ConfigMissing, got {other:?}"),
        }
        // SLURM_CONF is honoured when no explicit path is given.
        match check_config_source(None, Some(missing.clone())) {
            Err(Error::ConfigMissing { path }) => assert_eq!(path, missing),
            other => panic!("expected ConfigMissing, got {other:?}"),
        }
        // An explicit path wins over SLURM_CONF.
        let exe = std::env::current_exe().expect("test binary path");
        assert!(check_config_source(Some(&exe), Some(missing)).is_ok());
    }
}
