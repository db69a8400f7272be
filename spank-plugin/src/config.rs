//! Plugin arguments (plugstack.conf) and user options (`--migratable` and friends).
//!
//! Pure parsing, no Slurm calls: unit-tested without root.

use std::path::PathBuf;
use std::time::Duration;

use rebalancer_proto::MigrationMode;

pub const DEFAULT_SOCKET: &str = "/run/slurm-rebalancer/agent.sock";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const CLASS_MAX: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("plugin argument '{0}' is not KEY=VALUE (expected socket=, default_class=, default_mode=, enforce=, timeout=)")]
    NotKeyValue(String),
    #[error("unknown plugin argument '{0}' (expected socket=, default_class=, default_mode=, enforce=, timeout=)")]
    UnknownKey(String),
    #[error("plugin argument socket='{0}' must be an absolute path of at most 107 bytes")]
    Socket(String),
    #[error("plugin argument default_class: {0}")]
    Class(#[source] OptionError),
    #[error("plugin argument default_mode: {0}")]
    Mode(#[source] OptionError),
    #[error("plugin argument enforce='{0}' must be 'yes' (every step is migratable unless --no-migrate) or 'no'")]
    Enforce(String),
    #[error("plugin argument timeout='{0}' must be a whole number of seconds from 1 to 600")]
    Timeout(String),
    #[error("plugin argument '{0}' is given twice")]
    Duplicate(String),
}

/// What plugstack.conf says, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Agent control socket; `%n` is replaced by the Slurm node name (several slurmd per host).
    pub socket: String,
    pub default_class: Option<String>,
    pub default_mode: Option<MigrationMode>,
    /// Steps are migratable unless they opt out with `--no-migrate`.
    pub enforce: bool,
    /// Bound on connecting to the agent and on each of its answers before the task starts.
    pub timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: DEFAULT_SOCKET.into(),
            default_class: None,
            default_mode: None,
            enforce: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl Config {
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        let mut seen: Vec<String> = Vec::new();
        for arg in args {
            let arg = arg.as_ref();
            let (k, v) = arg
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(arg.into()))?;
            if seen.iter().any(|s| s == k) {
                return Err(ConfigError::Duplicate(k.into()));
            }
            seen.push(k.into());
            match k {
                "socket" => {
                    if !v.starts_with('/') || v.len() > 107 {
                        return Err(ConfigError::Socket(v.into()));
                    }
                    c.socket = v.into();
                }
                "default_class" => {
                    c.default_class = Some(parse_class(v).map_err(ConfigError::Class)?);
                }
                "default_mode" => c.default_mode = Some(parse_mode(v).map_err(ConfigError::Mode)?),
                "enforce" => {
                    c.enforce = match v {
                        "yes" | "true" | "1" => true,
                        "no" | "false" | "0" => false,
                        _ => return Err(ConfigError::Enforce(v.into())),
                    }
                }
                "timeout" => {
                    let secs: u64 = v
                        .parse()
                        .ok()
                        .filter(|s| (1..=600).contains(s))
                        .ok_or_else(|| ConfigError::Timeout(v.into()))?;
                    c.timeout = Duration::from_secs(secs);
                }
                _ => return Err(ConfigError::UnknownKey(k.into())),
            }
        }
        Ok(c)
    }

    /// The socket path for `node` (`%n` expanded).
    pub fn socket_for(&self, node: &str) -> PathBuf {
        PathBuf::from(self.socket.replace("%n", node))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("invalid class '{0}': use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit")]
    Class(String),
    #[error("invalid migration mode '{0}': expected stop-and-copy, post-copy or auto")]
    Mode(String),
    #[error("--no-migrate conflicts with --{0}")]
    Conflict(&'static str),
    #[error("invalid migration id '{0}'")]
    MigrationId(String),
}

pub fn parse_class(s: &str) -> Result<String, OptionError> {
    let ok = !s.is_empty()
        && s.len() <= CLASS_MAX
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.into())
    } else {
        Err(OptionError::Class(s.into()))
    }
}

/// Modes a user may ask for. Pre-copy needs soft-dirty tracking, which the agent picks itself
/// under `auto` where the kernel has it.
pub fn parse_mode(s: &str) -> Result<MigrationMode, OptionError> {
    match s {
        "stop-and-copy" => Ok(MigrationMode::StopAndCopy),
        "post-copy" => Ok(MigrationMode::PostCopy),
        "auto" => Ok(MigrationMode::Auto),
        _ => Err(OptionError::Mode(s.into())),
    }
}

/// Migration ids are UUIDs in text form; anything else never reaches the agent.
pub fn parse_migration_id(s: &str) -> Result<String, OptionError> {
    let ok = (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if ok {
        Ok(s.into())
    } else {
        Err(OptionError::MigrationId(s.into()))
    }
}

/// The options a user gave, as accumulated by the option callbacks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserOptions {
    /// `--migratable` given; `Some(class)` when it carried one.
    pub migratable: Option<Option<String>>,
    pub mode: Option<MigrationMode>,
    pub no_migrate: bool,
    /// Hidden `--rebalancer-restore=ID`.
    pub restore: Option<String>,
}

/// Option ids (`spank_option.val`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum OptId {
    Migratable = 1,
    Mode = 2,
    NoMigrate = 3,
    Restore = 4,
}

impl OptId {
    pub fn from_val(v: i32) -> Option<OptId> {
        [
            OptId::Migratable,
            OptId::Mode,
            OptId::NoMigrate,
            OptId::Restore,
        ]
        .into_iter()
        .find(|o| *o as i32 == v)
    }
}

impl UserOptions {
    /// Applies one option occurrence, rejecting bad values and conflicts at once so that srun,
    /// sbatch and salloc refuse the submission.
    pub fn apply(&mut self, id: OptId, arg: Option<&str>) -> Result<(), OptionError> {
        match id {
            OptId::Migratable => {
                if self.no_migrate {
                    return Err(OptionError::Conflict("migratable"));
                }
                let class = match arg {
                    None | Some("") => None,
                    Some(c) => Some(parse_class(c)?),
                };
                self.migratable = Some(class);
            }
            OptId::Mode => {
                if self.no_migrate {
                    return Err(OptionError::Conflict("migration-mode"));
                }
                self.mode = Some(parse_mode(arg.unwrap_or(""))?);
            }
            OptId::NoMigrate => {
                if self.migratable.is_some() {
                    return Err(OptionError::Conflict("migratable"));
                }
                if self.mode.is_some() {
                    return Err(OptionError::Conflict("migration-mode"));
                }
                self.no_migrate = true;
            }
            OptId::Restore => self.restore = Some(parse_migration_id(arg.unwrap_or(""))?),
        }
        Ok(())
    }

    /// Whether the step's tasks go into containers, given the site's `enforce`.
    pub fn wants_container(&self, cfg: &Config) -> bool {
        if self.no_migrate {
            return false;
        }
        self.migratable.is_some() || self.mode.is_some() || cfg.enforce
    }

    pub fn class(&self, cfg: &Config) -> Option<String> {
        self.migratable
            .clone()
            .flatten()
            .or_else(|| cfg.default_class.clone())
    }

    pub fn mode(&self, cfg: &Config) -> Option<MigrationMode> {
        self.mode.or(cfg.default_mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_arguments_give_defaults() {
        let c = Config::parse::<&str>(&[]).expect("defaults");
        assert_eq!(c, Config::default());
        assert_eq!(c.socket_for("node1"), PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn every_argument_parses() {
        let c = Config::parse(&[
            "socket=/run/rb/%n/agent.sock",
            "default_class=batch",
            "default_mode=post-copy",
            "enforce=yes",
            "timeout=3",
        ])
        .expect("valid");
        assert_eq!(
            c.socket_for("node2"),
            PathBuf::from("/run/rb/node2/agent.sock")
        );
        assert_eq!(c.default_class.as_deref(), Some("batch"));
        assert_eq!(c.default_mode, Some(MigrationMode::PostCopy));
        assert!(c.enforce);
        assert_eq!(c.timeout, Duration::from_secs(3));
    }

    #[test]
    fn bad_arguments_name_the_offender() {
        let cases: &[(&str, &str)] = &[
            ("sockett=/x", "unknown plugin argument 'sockett'"),
            ("verbose", "'verbose' is not KEY=VALUE"),
            (
                "socket=relative.sock",
                "socket='relative.sock' must be an absolute path",
            ),
            ("default_class=a b", "invalid class 'a b'"),
            ("default_mode=live", "invalid migration mode 'live'"),
            ("enforce=maybe", "enforce='maybe'"),
            ("timeout=0", "timeout='0'"),
            ("timeout=ten", "timeout='ten'"),
        ];
        for (arg, want) in cases {
            let e = Config::parse(&[*arg]).expect_err(arg).to_string();
            assert!(e.contains(want), "{arg}: {e}");
        }
        let e = Config::parse(&["enforce=no", "enforce=yes"]).expect_err("dup");
        assert_eq!(e, ConfigError::Duplicate("enforce".into()));
    }

    #[test]
    fn class_rules() {
        for ok in ["a", "batch", "gpu-2", "x.y_z", &"c".repeat(63)] {
            assert_eq!(parse_class(ok).expect(ok), ok);
        }
        for bad in ["", "bogus!", "-lead", ".x", "a/b", "é", &"c".repeat(64)] {
            assert!(parse_class(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn modes_users_may_request() {
        assert_eq!(parse_mode("stop-and-copy"), Ok(MigrationMode::StopAndCopy));
        assert_eq!(parse_mode("post-copy"), Ok(MigrationMode::PostCopy));
        assert_eq!(parse_mode("auto"), Ok(MigrationMode::Auto));
        let e = parse_mode("pre-copy").expect_err("not offered").to_string();
        assert!(
            e.contains("'pre-copy'") && e.contains("stop-and-copy"),
            "{e}"
        );
    }

    #[test]
    fn options_accumulate_and_conflict() {
        let cfg = Config::default();
        let mut o = UserOptions::default();
        assert!(!o.wants_container(&cfg));
        o.apply(OptId::Migratable, None).expect("bare");
        assert!(o.wants_container(&cfg));
        assert_eq!(o.class(&cfg), None);
        o.apply(OptId::Migratable, Some("long")).expect("class");
        assert_eq!(o.class(&cfg).as_deref(), Some("long"));
        o.apply(OptId::Mode, Some("auto")).expect("mode");
        assert_eq!(o.mode(&cfg), Some(MigrationMode::Auto));
        assert_eq!(
            o.apply(OptId::NoMigrate, None),
            Err(OptionError::Conflict("migratable"))
        );

        let mut n = UserOptions::default();
        n.apply(OptId::NoMigrate, None).expect("opt out");
        let enforced = Config {
            enforce: true,
            default_class: Some("dflt".into()),
            ..Config::default()
        };
        assert!(!n.wants_container(&enforced));
        assert!(n.apply(OptId::Migratable, Some("x")).is_err());
        assert!(n.apply(OptId::Mode, Some("auto")).is_err());

        let plain = UserOptions::default();
        assert!(plain.wants_container(&enforced));
        assert_eq!(plain.class(&enforced).as_deref(), Some("dflt"));
    }

    #[test]
    fn bad_option_values_are_refused() {
        let mut o = UserOptions::default();
        let e = o.apply(OptId::Migratable, Some("bogus!")).expect_err("bad");
        assert!(e.to_string().contains("invalid class 'bogus!'"), "{e}");
        assert!(o.apply(OptId::Mode, Some("fast")).is_err());
        assert!(o.apply(OptId::Mode, None).is_err());
        assert!(o.apply(OptId::Restore, Some("../../etc")).is_err());
        o.apply(OptId::Restore, Some("0b6f1c2e-1111-4a2b-9c3d-123456789abc"))
            .expect("uuid");
        assert_eq!(
            o,
            UserOptions {
                restore: Some("0b6f1c2e-1111-4a2b-9c3d-123456789abc".into()),
                ..UserOptions::default()
            }
        );
    }
}
