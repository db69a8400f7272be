//! Controller configuration: raw TOML structs (`deny_unknown_fields`), then [`RawConfig::validate`]
//! which checks every value and reports `file:line:column` for the offending one.

pub mod ipam;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rebalancer_proto::MigrationMode;
use serde::Deserialize;
use toml::Spanned;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/rebalancer/rebalancerd.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax or type error, or an unknown key, found by the TOML parser.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A well-formed value that is out of range or inconsistent.
    #[error("{path}:{line}:{column}: invalid {field}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        field: &'static str,
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub controller: RawController,
    #[serde(default)]
    pub slurm: RawSlurm,
    #[serde(default)]
    pub agents: RawAgents,
    #[serde(default)]
    pub migration: RawMigration,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub ipam: ipam::RawIpam,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawController {
    pub socket: Option<Spanned<String>>,
    pub journal: Option<Spanned<String>>,
    /// A policy file or a directory of `*.toml` policy files.
    pub policies: Option<Spanned<String>>,
    /// Uids besides root and the SlurmUser that may change things.
    #[serde(default)]
    pub operators: Vec<Spanned<u32>>,
    /// User name or uid of Slurm's SlurmUser.
    pub slurm_user: Option<Spanned<String>>,
    /// Seconds between evaluations when nothing changed.
    pub evaluate_interval_s: Option<Spanned<u64>>,
    /// `text` or `json`.
    pub log_format: Option<Spanned<String>>,
    /// Decisions and ended migrations kept in the journal (each).
    pub journal_keep: Option<Spanned<u64>>,
    /// Connections open at once on the control socket (default 256).
    pub max_connections: Option<Spanned<u64>>,
    /// Connections open at once per non-root uid on the control socket (default 32).
    pub max_connections_per_uid: Option<Spanned<u64>>,
    /// Seconds a control connection may stay silent between requests (default 300).
    pub idle_timeout_s: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSlurm {
    /// Watch Slurm at all (false: manual migrations and agent metrics only).
    pub enabled: Option<bool>,
    /// `libslurm` or `scontrol`.
    pub backend: Option<Spanned<String>>,
    pub poll_interval_ms: Option<Spanned<u64>>,
    pub reconcile_interval_s: Option<Spanned<u64>>,
    /// Expand a job to the destination and shrink it from the source after a migration.
    pub sync_allocation: Option<bool>,
    /// After each move, hold the moved task's CPUs on its destination with an allocation of
    /// the controller's own (Slurm does not count them after an expansion).
    pub holder: Option<bool>,
    /// Account of the holder allocations (default: the controller user's default account).
    pub holder_account: Option<Spanned<String>>,
    /// `slurm.conf` to use instead of the default (sets SLURM_CONF).
    pub conf: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgents {
    /// Local socket of a node's agent; `{node}` is replaced by the node name.
    pub socket_template: Option<Spanned<String>>,
    /// TCP address of a node's agent; `{node}` is replaced. Used when no socket applies.
    pub address_template: Option<Spanned<String>>,
    pub poll_interval_ms: Option<Spanned<u64>>,
    pub timeout_ms: Option<Spanned<u64>>,
    /// munged socket for the credentials of TCP agent connections, when not the default.
    pub munge_socket: Option<Spanned<String>>,
    /// This controller's name in its credentials to agents over TCP (default: the host name).
    pub name: Option<Spanned<String>>,
    /// `[lowest, highest]` TCP control protocol versions offered to agents (default `[1, 2]`):
    /// 2 is encrypted (TLS 1.3), 1 only authenticated; `[2, 2]` refuses unencrypted agents.
    pub control_protocol: Option<Spanned<[u16; 2]>>,
    /// Per-node overrides.
    #[serde(default)]
    pub nodes: BTreeMap<String, Spanned<RawAgentAddr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentAddr {
    pub socket: Option<String>,
    pub address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMigration {
    pub max_in_flight: Option<Spanned<u32>>,
    pub max_per_node: Option<Spanned<u32>>,
    pub default_mode: Option<Spanned<String>>,
    pub timeout_s: Option<Spanned<u64>>,
    pub max_downtime_ms: Option<Spanned<u64>>,
    /// **Test only** (slurm-tests/tests/controller_faults.rs): wait this long after a job was
    /// expanded onto the destination, before the migration is sent to the source agent, so that
    /// a test can kill the controller while an expansion is in flight.
    pub test_pause_before_start_ms: Option<Spanned<u64>>,
    /// **Test only**: wait this long after a successful move's allocation update, before its
    /// holder is asked for (a test kills the controller there).
    pub test_pause_before_holder_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `host:port` of the Prometheus endpoint; absent: no endpoint.
    pub listen: Option<Spanned<String>>,
}

/// Where a node's agent is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::Unix(p) => write!(f, "{}", p.display()),
            AgentAddr::Tcp(a) => f.write_str(a),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlurmBackendKind {
    Libslurm,
    Scontrol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub journal: PathBuf,
    pub journal_keep: usize,
    pub policies: PathBuf,
    pub operators: Vec<u32>,
    pub slurm_user: Option<u32>,
    pub evaluate_interval: Duration,
    pub log_format: LogFormat,
    pub slurm: SlurmConfig,
    pub agents: AgentsConfig,
    pub migration: MigrationConfig,
    pub metrics_listen: Option<SocketAddr>,
    /// `[ipam]`: container address blocks (`config/ipam.rs`).
    pub ipam: ipam::IpamConfig,
    /// Limits of the control socket.
    pub control: ControlLimits,
}

/// Limits of the controller's control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlLimits {
    pub gate: rebalancer_proto::gate::GateConfig,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SlurmConfig {
    pub enabled: bool,
    pub backend: SlurmBackendKind,
    pub poll_interval: Duration,
    pub reconcile_interval: Duration,
    pub sync_allocation: bool,
    /// Hold moved tasks' CPUs with holder allocations (`slurm.holder`, default true).
    pub holder: bool,
    pub holder_account: Option<String>,
    pub conf: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct AgentsConfig {
    pub socket_template: Option<String>,
    pub address_template: Option<String>,
    pub poll_interval: Duration,
    pub timeout: Duration,
    pub nodes: BTreeMap<String, AgentAddr>,
    pub munge_socket: Option<PathBuf>,
    /// This controller's name in bound credentials (TCP agents).
    pub name: String,
    /// TCP control protocol versions offered ([`rebalancer_proto::CONTROL_TCP_VERSIONS`]).
    pub control_protocol: rebalancer_proto::VersionRange,
}

impl AgentsConfig {
    /// The node → agent address map: explicit entry, else socket template, else TCP template.
    pub fn address_of(&self, node: &str) -> Option<AgentAddr> {
        if let Some(a) = self.nodes.get(node) {
            return Some(a.clone());
        }
        if let Some(t) = &self.socket_template {
            return Some(AgentAddr::Unix(PathBuf::from(t.replace("{node}", node))));
        }
        self.address_template
            .as_ref()
            .map(|t| AgentAddr::Tcp(t.replace("{node}", node)))
    }
}

#[derive(Debug, Clone)]
pub struct MigrationConfig {
    pub max_in_flight: u32,
    pub max_per_node: u32,
    pub default_mode: MigrationMode,
    pub timeout: Duration,
    pub max_downtime_ms: Option<u64>,
    /// Test-only pause points (zero: none); see [`RawMigration`].
    pub test_pause_before_start: Duration,
    pub test_pause_before_holder: Duration,
}

pub use rebalancer_proto::position::line_col;

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn invalid(
        &self,
        span: std::ops::Range<usize>,
        field: &'static str,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_col(self.text, span.start);
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            field,
            message: message.into(),
        }
    }

    fn ms(
        &self,
        v: &Option<Spanned<u64>>,
        field: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(Duration::from_millis(default)),
            Some(s) if range.contains(s.get_ref()) => Ok(Duration::from_millis(*s.get_ref())),
            Some(s) => Err(self.invalid(
                s.span(),
                field,
                format!(
                    "{} is outside {}..={}",
                    s.get_ref(),
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    fn count(
        &self,
        v: &Option<Spanned<u64>>,
        field: &'static str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) if (1..=100_000).contains(s.get_ref()) => Ok(*s.get_ref() as usize),
            Some(s) => Err(self.invalid(
                s.span(),
                field,
                format!("{} is outside 1..=100000", s.get_ref()),
            )),
        }
    }

    fn abs_path(
        &self,
        v: &Option<Spanned<String>>,
        field: &'static str,
        default: &str,
    ) -> Result<PathBuf, ConfigError> {
        match v {
            None => Ok(PathBuf::from(default)),
            Some(s) if s.get_ref().starts_with('/') => Ok(PathBuf::from(s.get_ref())),
            Some(s) => Err(self.invalid(
                s.span(),
                field,
                format!("'{}' is not an absolute path", s.get_ref()),
            )),
        }
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_str_at(&text, path)
    }

    /// Parses and validates `text`, naming `path` in errors.
    pub fn from_str_at(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: Some(e.message().trim().replace('\n', "; "))
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| {
                        let at = e.span().map_or(0, |s| s.start);
                        rebalancer_policy::config::toml_error_fallback(text, at)
                    }),
            }
        })?;
        raw.validate(path, text)
    }

    /// Configuration with every default (no file).
    pub fn defaults() -> Config {
        // The empty document has no values to reject.
        match RawConfig::default().validate(Path::new("<defaults>"), "") {
            Ok(c) => c,
            Err(e) => unreachable!("defaults are valid: {e}"),
        }
    }
}

impl RawConfig {
    pub fn validate(self, path: &Path, text: &str) -> Result<Config, ConfigError> {
        let cx = Ctx { path, text };
        let c = &self.controller;
        let socket = cx.abs_path(
            &c.socket,
            "controller.socket",
            "/run/rebalancer/controller.sock",
        )?;
        let journal = cx.abs_path(
            &c.journal,
            "controller.journal",
            "/var/lib/rebalancer/controller.redb",
        )?;
        let policies = cx.abs_path(
            &c.policies,
            "controller.policies",
            "/etc/rebalancer/policies.d",
        )?;
        let mut operators = Vec::new();
        for o in &c.operators {
            if *o.get_ref() == 0 {
                return Err(cx.invalid(
                    o.span(),
                    "controller.operators",
                    "uid 0 is always an operator; remove it",
                ));
            }
            operators.push(*o.get_ref());
        }
        let slurm_user = match &c.slurm_user {
            None => resolve_user("slurm").ok(),
            Some(s) => Some(
                resolve_user(s.get_ref())
                    .map_err(|m| cx.invalid(s.span(), "controller.slurm_user", m))?,
            ),
        };
        let evaluate_interval = match &c.evaluate_interval_s {
            None => Duration::from_secs(10),
            Some(s) if (1..=3600).contains(s.get_ref()) => Duration::from_secs(*s.get_ref()),
            Some(s) => {
                return Err(cx.invalid(
                    s.span(),
                    "controller.evaluate_interval_s",
                    format!("{} is outside 1..=3600", s.get_ref()),
                ))
            }
        };
        let journal_keep = match &c.journal_keep {
            None => 100_000,
            Some(v) if (10..=100_000_000).contains(v.get_ref()) => *v.get_ref() as usize,
            Some(v) => {
                return Err(cx.invalid(
                    v.span(),
                    "controller.journal_keep",
                    format!("{} is outside 10..=100000000", v.get_ref()),
                ))
            }
        };
        let log_format = match c
            .log_format
            .as_ref()
            .map(|s| (s.get_ref().as_str(), s.span()))
        {
            None | Some(("text", _)) => LogFormat::Text,
            Some(("json", _)) => LogFormat::Json,
            Some((other, span)) => {
                return Err(cx.invalid(
                    span,
                    "controller.log_format",
                    format!("'{other}' is neither text nor json"),
                ))
            }
        };

        let s = &self.slurm;
        let backend = match s.backend.as_ref().map(|b| (b.get_ref().as_str(), b.span())) {
            None | Some(("libslurm", _)) => SlurmBackendKind::Libslurm,
            Some(("scontrol", _)) => SlurmBackendKind::Scontrol,
            Some((other, span)) => {
                return Err(cx.invalid(
                    span,
                    "slurm.backend",
                    format!("'{other}' is neither libslurm nor scontrol"),
                ))
            }
        };
        let slurm = SlurmConfig {
            enabled: s.enabled.unwrap_or(true),
            backend,
            poll_interval: cx.ms(
                &s.poll_interval_ms,
                "slurm.poll_interval_ms",
                500,
                50..=60_000,
            )?,
            reconcile_interval: match &s.reconcile_interval_s {
                None => Duration::from_secs(30),
                Some(v) if (1..=86_400).contains(v.get_ref()) => Duration::from_secs(*v.get_ref()),
                Some(v) => {
                    return Err(cx.invalid(
                        v.span(),
                        "slurm.reconcile_interval_s",
                        format!("{} is outside 1..=86400", v.get_ref()),
                    ))
                }
            },
            sync_allocation: s.sync_allocation.unwrap_or(true),
            holder: s.holder.unwrap_or(true),
            holder_account: match &s.holder_account {
                None => None,
                Some(a) if valid_account(a.get_ref()) => Some(a.get_ref().clone()),
                Some(a) => {
                    return Err(cx.invalid(
                        a.span(),
                        "slurm.holder_account",
                        format!(
                            "'{}' is not a Slurm account name (letters, digits, '_', '-', '.')",
                            a.get_ref()
                        ),
                    ))
                }
            },
            conf: match &s.conf {
                None => None,
                Some(_) => Some(cx.abs_path(&s.conf, "slurm.conf", "")?),
            },
        };

        let a = &self.agents;
        for t in [&a.socket_template, &a.address_template]
            .into_iter()
            .flatten()
        {
            if !t.get_ref().contains("{node}") && a.nodes.is_empty() {
                // A template without {node} maps every node to one agent: fine for a one-node setup only.
                tracing::debug!(template = %t.get_ref(), "agent template has no {{node}}");
            }
        }
        if let Some(t) = &a.socket_template {
            if !t.get_ref().starts_with('/') {
                return Err(cx.invalid(
                    t.span(),
                    "agents.socket_template",
                    format!("'{}' is not an absolute path", t.get_ref()),
                ));
            }
        }
        if let Some(t) = &a.address_template {
            check_host_port(&t.get_ref().replace("{node}", "node"))
                .map_err(|m| cx.invalid(t.span(), "agents.address_template", m))?;
        }
        let mut nodes = BTreeMap::new();
        for (name, v) in &a.nodes {
            let addr = match (&v.get_ref().socket, &v.get_ref().address) {
                (Some(p), None) if p.starts_with('/') => AgentAddr::Unix(PathBuf::from(p)),
                (Some(p), None) => {
                    return Err(cx.invalid(
                        v.span(),
                        "agents.nodes.socket",
                        format!("'{p}' is not an absolute path"),
                    ))
                }
                (None, Some(h)) => {
                    check_host_port(h)
                        .map_err(|m| cx.invalid(v.span(), "agents.nodes.address", m))?;
                    AgentAddr::Tcp(h.clone())
                }
                _ => {
                    return Err(cx.invalid(
                        v.span(),
                        "agents.nodes",
                        format!("node '{name}' needs exactly one of socket or address"),
                    ))
                }
            };
            nodes.insert(name.clone(), addr);
        }
        let socket_template = match (&a.socket_template, &a.address_template, nodes.is_empty()) {
            // Nothing configured: the agent's default socket, for a controller on a one-node setup.
            (None, None, true) => Some("/run/rebalancer/agent.sock".to_string()),
            (t, _, _) => t.as_ref().map(|s| s.get_ref().clone()),
        };
        let agents = AgentsConfig {
            socket_template,
            address_template: a.address_template.as_ref().map(|s| s.get_ref().clone()),
            poll_interval: cx.ms(
                &a.poll_interval_ms,
                "agents.poll_interval_ms",
                2000,
                100..=600_000,
            )?,
            timeout: cx.ms(&a.timeout_ms, "agents.timeout_ms", 3000, 100..=600_000)?,
            nodes,
            munge_socket: match &a.munge_socket {
                None => None,
                some => Some(cx.abs_path(some, "agents.munge_socket", "")?),
            },
            name: match &a.name {
                None => host_name(),
                Some(n) => {
                    let v = n.get_ref();
                    if v.is_empty()
                        || v.len() > 64
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    {
                        return Err(cx.invalid(
                            n.span(),
                            "agents.name",
                            format!("'{v}' must be 1-64 letters, digits, '-', '_' or '.'"),
                        ));
                    }
                    v.clone()
                }
            },
            control_protocol: {
                let known = rebalancer_proto::CONTROL_TCP_VERSIONS;
                match &a.control_protocol {
                    None => known,
                    Some(v) => match *v.get_ref() {
                        [lo, hi] if lo <= hi && lo >= known.min && hi <= known.max => {
                            rebalancer_proto::VersionRange::new(lo, hi)
                        }
                        [lo, hi] => {
                            return Err(cx.invalid(
                                v.span(),
                                "agents.control_protocol",
                                format!(
                                    "[{lo}, {hi}] must be [lowest, highest] within {}..={} (2: encrypted)",
                                    known.min, known.max
                                ),
                            ))
                        }
                    },
                }
            },
        };

        let m = &self.migration;
        let max_in_flight = match &m.max_in_flight {
            None => 4,
            Some(v) if (1..=1024).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                return Err(cx.invalid(
                    v.span(),
                    "migration.max_in_flight",
                    format!("{} is outside 1..=1024", v.get_ref()),
                ))
            }
        };
        let max_per_node = match &m.max_per_node {
            None => 2,
            Some(v) if (1..=max_in_flight).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                return Err(cx.invalid(
                    v.span(),
                    "migration.max_per_node",
                    format!(
                        "{} is outside 1..={max_in_flight} (max_in_flight)",
                        v.get_ref()
                    ),
                ))
            }
        };
        let default_mode = match &m.default_mode {
            None => MigrationMode::Auto,
            Some(v) => v
                .get_ref()
                .parse()
                .map_err(|e: String| cx.invalid(v.span(), "migration.default_mode", e))?,
        };
        let timeout = match &m.timeout_s {
            None => Duration::from_secs(600),
            Some(v) if (1..=86_400).contains(v.get_ref()) => Duration::from_secs(*v.get_ref()),
            Some(v) => {
                return Err(cx.invalid(
                    v.span(),
                    "migration.timeout_s",
                    format!("{} is outside 1..=86400", v.get_ref()),
                ))
            }
        };
        let max_downtime_ms = match &m.max_downtime_ms {
            None => None,
            Some(v) if *v.get_ref() > 0 => Some(*v.get_ref()),
            Some(v) => {
                return Err(cx.invalid(v.span(), "migration.max_downtime_ms", "must be positive"))
            }
        };
        let test_pause = |v: &Option<Spanned<u64>>, field: &'static str| match v {
            None => Ok(Duration::ZERO),
            Some(v) if *v.get_ref() <= 60_000 => Ok(Duration::from_millis(*v.get_ref())),
            Some(v) => Err(cx.invalid(
                v.span(),
                field,
                format!("{} is over 60000 (a test-only pause)", v.get_ref()),
            )),
        };
        let test_pause_before_start = test_pause(
            &m.test_pause_before_start_ms,
            "migration.test_pause_before_start_ms",
        )?;
        let test_pause_before_holder = test_pause(
            &m.test_pause_before_holder_ms,
            "migration.test_pause_before_holder_ms",
        )?;

        let metrics_listen = match &self.metrics.listen {
            None => None,
            Some(v) => Some(v.get_ref().parse::<SocketAddr>().map_err(|_| {
                cx.invalid(
                    v.span(),
                    "metrics.listen",
                    format!("'{}' is not an IP:port address", v.get_ref()),
                )
            })?),
        };

        let ipam = self
            .ipam
            .validate()
            .map_err(|(span, key, m)| cx.invalid(span, key, m))?;
        Ok(Config {
            ipam,
            socket,
            journal,
            journal_keep,
            policies,
            operators,
            slurm_user,
            evaluate_interval,
            log_format,
            slurm,
            agents,
            migration: MigrationConfig {
                max_in_flight,
                max_per_node,
                default_mode,
                timeout,
                max_downtime_ms,
                test_pause_before_start,
                test_pause_before_holder,
            },
            metrics_listen,
            control: ControlLimits {
                gate: rebalancer_proto::gate::GateConfig {
                    max_total: cx.count(&c.max_connections, "controller.max_connections", 256)?,
                    max_per_key: cx.count(
                        &c.max_connections_per_uid,
                        "controller.max_connections_per_uid",
                        32,
                    )?,
                },
                idle_timeout: match &c.idle_timeout_s {
                    None => Duration::from_secs(300),
                    Some(v) if (1..=86_400).contains(v.get_ref()) => {
                        Duration::from_secs(*v.get_ref())
                    }
                    Some(v) => {
                        return Err(cx.invalid(
                            v.span(),
                            "controller.idle_timeout_s",
                            format!("{} is outside 1..=86400", v.get_ref()),
                        ))
                    }
                },
            },
        })
    }
}

/// The host name (a name credentials can carry), else `rebalancerd`.
/// A name slurmdbd accepts as an account: non-empty, at most 64 characters of letters, digits,
/// `_`, `-` and `.`. Pure.
fn valid_account(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 64
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 64
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        .unwrap_or_else(|| "rebalancerd".to_string())
}

fn check_host_port(s: &str) -> Result<(), String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!("'{s}' is not HOST:PORT")),
    }
}

/// Uid of a user name or numeric uid.
pub fn resolve_user(s: &str) -> Result<u32, String> {
    if let Ok(uid) = s.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("no user named '{s}'")),
        Err(e) => Err(format!("cannot look up user '{s}': {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_at(text, Path::new("/etc/rebalancer/rebalancerd.toml"))
    }

    #[test]
    fn defaults_are_sane() {
        let c = parse("").expect("empty file is valid");
        assert_eq!(c.slurm.poll_interval, Duration::from_millis(500));
        assert_eq!(c.migration.max_in_flight, 4);
        assert_eq!(c.migration.default_mode, MigrationMode::Auto);
        assert!(c.metrics_listen.is_none());
        assert_eq!(
            c.agents.address_of("node1"),
            Some(AgentAddr::Unix("/run/rebalancer/agent.sock".into()))
        );
    }

    #[test]
    fn holders_default_on_and_their_account_is_checked() {
        let c = parse("").expect("empty is valid");
        assert!(c.slurm.holder);
        assert_eq!(c.slurm.holder_account, None);
        let c = parse("[slurm]\nholder = false\nholder_account = \"ops-1\"\n").expect("valid");
        assert!(!c.slurm.holder);
        assert_eq!(c.slurm.holder_account.as_deref(), Some("ops-1"));
        let e = parse("[slurm]\nholder_account = \"ops 1\"\n")
            .expect_err("a space is no account name")
            .to_string();
        assert!(
            e.contains("slurm.holder_account") && e.contains("'ops 1'"),
            "{e}"
        );
    }

    #[test]
    fn full_file_and_address_map() {
        let c = parse(
            r#"
[controller]
socket = "/run/rb/ctl.sock"
operators = [1000, 1001]
slurm_user = "root"
[slurm]
backend = "scontrol"
poll_interval_ms = 250
[agents]
socket_template = "/run/rb/{node}/agent.sock"
nodes.node9 = { address = "198.18.48.9:7878" }
[migration]
max_in_flight = 8
max_per_node = 3
default_mode = "post-copy"
[metrics]
listen = "127.0.0.1:9464"
"#,
        )
        .expect("valid");
        assert_eq!(c.operators, vec![1000, 1001]);
        assert_eq!(c.slurm_user, Some(0));
        assert_eq!(c.slurm.backend, SlurmBackendKind::Scontrol);
        assert_eq!(
            c.agents.address_of("node2"),
            Some(AgentAddr::Unix("/run/rb/node2/agent.sock".into()))
        );
        assert_eq!(
            c.agents.address_of("node9"),
            Some(AgentAddr::Tcp("198.18.48.9:7878".into()))
        );
        assert_eq!(c.migration.default_mode, MigrationMode::PostCopy);
        assert_eq!(
            c.metrics_listen,
            Some("127.0.0.1:9464".parse().expect("addr"))
        );
    }

    #[test]
    fn unknown_key_reports_position() {
        let e =
            parse("[slurm]\npoll_interval_ms = 500\npol_interval = 3\n").expect_err("unknown key");
        let s = e.to_string();
        assert!(
            s.starts_with("/etc/rebalancer/rebalancerd.toml:3:1: "),
            "{s}"
        );
        assert!(s.contains("pol_interval"), "{s}");
    }

    #[test]
    fn out_of_range_value_reports_position_and_field() {
        let e = parse("[migration]\nmax_in_flight = 2\nmax_per_node = 5\n").expect_err("range");
        match &e {
            ConfigError::Invalid {
                line,
                column,
                field,
                ..
            } => {
                assert_eq!((*line, *column, *field), (3, 16, "migration.max_per_node"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(e.to_string().contains("outside 1..=2"), "{e}");
    }

    #[test]
    fn bad_mode_user_and_address_are_rejected() {
        let e = parse("[migration]\ndefault_mode = \"live\"\n").expect_err("mode");
        assert!(
            e.to_string()
                .contains(":2:16: invalid migration.default_mode"),
            "{e}"
        );
        let e = parse("[controller]\nslurm_user = \"no-such-user-rb\"\n").expect_err("user");
        assert!(e.to_string().contains("no user named"), "{e}");
        let e = parse("[agents.nodes]\nn1 = { socket = \"/a\", address = \"h:1\" }\n")
            .expect_err("both");
        assert!(e.to_string().contains(":2:6: "), "{e}");
        let e = parse("[metrics]\nlisten = \"localhost\"\n").expect_err("listen");
        assert!(e.to_string().contains("metrics.listen"), "{e}");
        let e = parse("[controller]\njournal = \"rel/path\"\n").expect_err("relative");
        assert!(e.to_string().contains("not an absolute path"), "{e}");
    }

    #[test]
    fn control_limits_and_tcp_identity() {
        let c = parse("").expect("defaults");
        assert_eq!(
            (c.control.gate.max_total, c.control.gate.max_per_key),
            (256, 32)
        );
        assert_eq!(c.control.idle_timeout, Duration::from_secs(300));
        assert!(!c.agents.name.is_empty());
        assert_eq!(c.agents.munge_socket, None);
        let c = parse(
            "[controller]\nmax_connections = 10\nidle_timeout_s = 7\n[agents]\nname = \"admin1\"\nmunge_socket = \"/run/m.sock\"\n",
        )
        .expect("valid");
        assert_eq!(c.control.gate.max_total, 10);
        assert_eq!(c.control.idle_timeout, Duration::from_secs(7));
        assert_eq!(c.agents.name, "admin1");
        assert_eq!(c.agents.munge_socket, Some(PathBuf::from("/run/m.sock")));
        let e = parse("[controller]\nmax_connections = 0\n").expect_err("zero");
        assert!(
            e.to_string()
                .contains(":2:19: invalid controller.max_connections"),
            "{e}"
        );
        let e = parse("[agents]\nname = \"a b\"\n").expect_err("name");
        assert!(e.to_string().contains("invalid agents.name"), "{e}");
        let e = parse("[agents]\nmunge_socket = \"m.sock\"\n").expect_err("relative");
        assert!(e.to_string().contains("agents.munge_socket"), "{e}");
    }

    #[test]
    fn the_control_protocol_defaults_to_both_versions_and_can_require_encryption() {
        let v = rebalancer_proto::VersionRange::new;
        assert_eq!(
            parse("").expect("defaults").agents.control_protocol,
            v(1, 2)
        );
        let c = parse("[agents]\ncontrol_protocol = [2, 2]\n").expect("encrypted only");
        assert_eq!(c.agents.control_protocol, v(2, 2));
        for bad in ["[2, 1]", "[0, 1]", "[1, 3]"] {
            let e = parse(&format!("[agents]\ncontrol_protocol = {bad}\n")).expect_err(bad);
            assert!(
                e.to_string()
                    .contains(":2:20: invalid agents.control_protocol"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn type_error_reports_position() {
        let e = parse("[agents]\ntimeout_ms = \"fast\"\n").expect_err("type");
        assert!(
            e.to_string()
                .starts_with("/etc/rebalancer/rebalancerd.toml:2:"),
            "{e}"
        );
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../rebalancerd.example.toml");
        let c = Config::from_str_at(text, Path::new("rebalancerd.example.toml")).expect("example");
        assert_eq!(c.operators, vec![1500]);
        assert_eq!(
            c.agents.address_of("node3"),
            Some(AgentAddr::Unix("/run/rebalancer/node3/agent.sock".into()))
        );
        assert_eq!(
            c.agents.address_of("node9"),
            Some(AgentAddr::Tcp("198.18.48.9:7879".into()))
        );
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("", 0), (1, 1));
    }
}
