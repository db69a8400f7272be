//! Agent configuration: raw TOML (`deny_unknown_fields`), then [`AgentConfig::validate`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors found while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}invalid `{field}` = {value:?}: {reason}", at_prefix(.at))]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
        /// `file:line:column` of the key, once the file's text is known.
        at: Option<(PathBuf, usize, usize)>,
    },
}

/// The file as written. Every field has a default except `node`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node: String,
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address peers use to reach this node's CRIU page servers (defaults to the listen IP).
    #[serde(default)]
    pub advertise: Option<String>,
    #[serde(default = "default_control")]
    pub control_socket: PathBuf,
    #[serde(default = "default_subnet")]
    pub container_subnet: String,
    /// How container addresses are picked: `leased` (default) from the address blocks the
    /// controller leases this node (docs/deploy.md "Container addresses"); `local`: a random
    /// free address of `container_subnet`, chosen alone, for single-agent labs only (two nodes
    /// can pick the same one).
    #[serde(default = "default_ipam")]
    pub ipam: rebalancer_proto::IpamMode,
    #[serde(default = "default_state")]
    pub state_dir: PathBuf,
    /// Where per-migration image directories go; must be a tmpfs for diskless migration.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    #[serde(default = "default_criu")]
    pub criu: PathBuf,
    /// Node-side interface that faces the other nodes (gratuitous ARP goes out of it).
    #[serde(default = "default_uplink")]
    pub uplink: String,
    /// Uids besides root allowed to migrate and to manage every container.
    #[serde(default)]
    pub admin_uids: Vec<u32>,
    #[serde(default)]
    pub auth: RawAuth,
    /// Read-only node directories bind-mounted into `host`-mode containers.
    #[serde(default = "default_host_dirs")]
    pub host_dirs: Vec<PathBuf>,
    /// Peer agents by node name (`name = "ip:port"`), used when a request gives no address.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
    /// Whole-migration timeout in milliseconds.
    #[serde(default = "default_timeout")]
    pub migration_timeout_ms: u64,
    /// Encrypt memory pages between nodes (CRIU's TLS, a key pair per migration). Both nodes
    /// of a migration must agree; `false` on both saves the cipher's CPU on a trusted network.
    #[serde(default = "default_true")]
    pub encrypt_memory: bool,
    /// Hold the container's inbound packets on the source node from the freeze until the
    /// switch instead of letting CRIU's lock drop them (migration/hold.rs): the client's
    /// requests wait instead of waiting for its retransmission timeout. Needs `tc` and IFB.
    #[serde(default = "default_true")]
    pub hold_inbound: bool,
    /// Agent ↔ agent protocol versions spoken (`[1, 4]`; see docs/security.md). Raise the
    /// lowest to 3 once every node runs a release that speaks it: version 1 does not
    /// authenticate the destination, and 1 and 2 are not encrypted (3 is TLS).
    #[serde(default = "default_peer_protocol")]
    pub peer_protocol: [u16; 2],
    /// Peer connections served at once, from all addresses together; more are refused `busy`.
    #[serde(default = "default_peer_max_connections")]
    pub peer_max_connections: usize,
    /// Peer connections served at once from one IP address (a flood from one host cannot take
    /// every slot).
    #[serde(default = "default_peer_max_per_host")]
    pub peer_max_per_host: usize,
    /// How long a peer connection may take to send its hello and prove who it is (each frame a
    /// deadline of its own: trickling bytes does not extend it), in milliseconds.
    #[serde(default = "default_peer_idle_timeout_ms")]
    pub peer_idle_timeout_ms: u64,
    /// Progress heartbeats on the peer connection during long phases, in milliseconds
    /// (`0`: none; then a stalled peer is found by the timeouts only). See
    /// docs/fault-tolerance.md.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Heartbeat intervals without a frame from the peer after which it counts as stalled.
    #[serde(default = "default_heartbeat_misses")]
    pub heartbeat_misses: u32,
    /// **Test only** (the fault matrix): pause `test_pause_ms` after entering this migration
    /// phase (`migration::pause`). Never set on a real node.
    #[serde(default)]
    pub test_pause_phase: Option<String>,
    #[serde(default)]
    pub test_pause_ms: u64,
    /// Command that starts the restore step of a migrated Slurm task on this node, run as the
    /// job's user (uid, gid and the user's groups); `{job}`, `{step}`, `{task}`, `{uid}`,
    /// `{gid}`, `{node}` and `{migration}` are substituted.
    #[serde(default = "default_restore_command")]
    pub restore_command: Vec<String>,
    /// slurmd's `SlurmdSpoolDir` on this node (without `%n`/`%h`: give it expanded). A batch
    /// task's job directory there travels with its images (docs/agent.md).
    #[serde(default = "default_spool")]
    pub slurmd_spool_dir: PathBuf,
    #[serde(default)]
    pub metrics: RawMetrics,
    /// `IP:PORT` of the Prometheus endpoint (`GET /metrics`); absent: none. Not `[metrics]`.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// `[control]`: the TCP control listener for the controller, and the limits of both
    /// control listeners (docs/agent.md).
    #[serde(default)]
    pub control: RawControl,
}

/// `[control]` as written; every key has a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    /// `IP:PORT` of the TCP control listener (controller only, munge-authenticated); absent:
    /// none. Its own port, not the peer port: a firewall can then open it to the admin host
    /// only.
    #[serde(default)]
    pub listen: Option<String>,
    /// Uids whose munge credential may act as the controller over TCP (default `[0]`; add
    /// the SlurmUser's uid when rebalancerd runs as SlurmUser).
    #[serde(default)]
    pub controller_uids: Option<Vec<u32>>,
    /// Connections open at once on the control socket (default 2048: every task's waiter
    /// holds one for the task's life).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Connections open at once per non-root uid on the control socket (default 64).
    #[serde(default)]
    pub max_connections_per_uid: Option<usize>,
    /// Connections open at once on the TCP control listener (default 16), and per peer
    /// address (default 8).
    #[serde(default)]
    pub tcp_max_connections: Option<usize>,
    #[serde(default)]
    pub tcp_max_connections_per_address: Option<usize>,
    /// Seconds a connection may stay silent between requests, or take to send one request
    /// (default 60). Connections of registered tasks (the waiter) are exempt.
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Seconds a client has to send its hello, and over TCP to authenticate (default 10).
    #[serde(default)]
    pub hello_timeout_s: Option<u64>,
    /// `[lowest, highest]` TCP control protocol versions accepted (default `[1, 2]`): 2 is
    /// encrypted (TLS 1.3), 1 only authenticated; `[2, 2]` refuses unencrypted controllers.
    #[serde(default)]
    pub tcp_protocol: Option<[u16; 2]>,
}

/// Validated `[control]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    pub listen: Option<SocketAddr>,
    pub controller_uids: Vec<u32>,
    pub local: rebalancer_proto::gate::GateConfig,
    pub tcp: rebalancer_proto::gate::GateConfig,
    pub idle_timeout: std::time::Duration,
    pub hello_timeout: std::time::Duration,
    /// TCP control protocol versions accepted ([`rebalancer_proto::CONTROL_TCP_VERSIONS`]).
    pub tcp_protocol: rebalancer_proto::VersionRange,
}

impl RawControl {
    fn validate(&self, auth: AuthMethod) -> Result<ControlConfig, ConfigError> {
        use rebalancer_proto::gate::GateConfig;
        let count = |field: &'static str, v: Option<usize>, default: usize| match v {
            None => Ok(default),
            Some(n) if (1..=100_000).contains(&n) => Ok(n),
            Some(n) => Err(invalid(field, n, "must be 1..=100000")),
        };
        let secs = |field: &'static str, v: Option<u64>, default: u64| match v {
            None => Ok(std::time::Duration::from_secs(default)),
            Some(n) if (1..=86_400).contains(&n) => Ok(std::time::Duration::from_secs(n)),
            Some(n) => Err(invalid(field, n, "must be 1..=86400 seconds")),
        };
        let listen = match &self.listen {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "control.listen",
                    a,
                    "expected IP:PORT of the TCP control listener, e.g. \"0.0.0.0:7879\"",
                )
            })?),
        };
        if listen.is_some() && auth == AuthMethod::None {
            return Err(invalid(
                "control.listen",
                self.listen.as_deref().unwrap_or_default(),
                "the TCP control listener gives root's authority and needs auth.method = \"munge\"",
            ));
        }
        let controller_uids = self.controller_uids.clone().unwrap_or_else(|| vec![0]);
        if controller_uids.is_empty() {
            return Err(invalid(
                "control.controller_uids",
                &controller_uids,
                "must name at least one uid (root: 0)",
            ));
        }
        let known = rebalancer_proto::CONTROL_TCP_VERSIONS;
        let tcp_protocol = match self.tcp_protocol {
            None => known,
            Some([lo, hi]) if lo <= hi && lo >= known.min && hi <= known.max => {
                rebalancer_proto::VersionRange::new(lo, hi)
            }
            Some(v) => {
                return Err(invalid(
                    "control.tcp_protocol",
                    v,
                    format!(
                        "must be [lowest, highest] within {}..={} (2: encrypted)",
                        known.min, known.max
                    ),
                ))
            }
        };
        Ok(ControlConfig {
            tcp_protocol,
            listen,
            controller_uids,
            local: GateConfig {
                max_total: count("control.max_connections", self.max_connections, 2048)?,
                max_per_key: count(
                    "control.max_connections_per_uid",
                    self.max_connections_per_uid,
                    64,
                )?,
            },
            tcp: GateConfig {
                max_total: count("control.tcp_max_connections", self.tcp_max_connections, 16)?,
                max_per_key: count(
                    "control.tcp_max_connections_per_address",
                    self.tcp_max_connections_per_address,
                    8,
                )?,
            },
            idle_timeout: secs("control.idle_timeout_s", self.idle_timeout_s, 60)?,
            hello_timeout: secs("control.hello_timeout_s", self.hello_timeout_s, 10)?,
        })
    }
}

/// `[metrics]`: sources of the temperature and load in `NodeMetrics` (docs/agent.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `auto` (default), `none`, `hwmon`, `thermal-zone`, `file:/PATH`, `command:/PATH ARGS`.
    #[serde(default)]
    pub temperature: Option<String>,
    /// `loadavg` (default) or `containers`.
    #[serde(default)]
    pub load: Option<String>,
    /// Window of `load = "containers"` in seconds (default 60, like load1).
    #[serde(default)]
    pub load_window_s: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// `munge` (default) or `none` (tests on one machine only; logged loudly).
    #[serde(default)]
    pub method: Option<String>,
    /// munged socket, when not the default one.
    #[serde(default)]
    pub munge_socket: Option<PathBuf>,
}

fn default_listen() -> String {
    "0.0.0.0:7878".into()
}
fn default_control() -> PathBuf {
    "/run/rebalancer/agent.sock".into()
}
fn default_ipam() -> rebalancer_proto::IpamMode {
    rebalancer_proto::IpamMode::Leased
}

fn default_subnet() -> String {
    "198.19.0.0/20".into()
}
fn default_state() -> PathBuf {
    "/var/lib/rebalancer".into()
}
fn default_spool() -> PathBuf {
    "/var/spool/slurmd".into()
}
fn default_criu() -> PathBuf {
    "/usr/local/sbin/criu".into()
}
fn default_uplink() -> String {
    "eth0".into()
}
fn default_host_dirs() -> Vec<PathBuf> {
    ["/usr", "/etc", "/bin", "/lib", "/lib64", "/sbin", "/opt"]
        .iter()
        .map(PathBuf::from)
        .collect()
}
fn default_restore_command() -> Vec<String> {
    [
        "srun",
        "--jobid={job}",
        // No --uid/--gid (srun lost them after 22.05): the agent runs this command as the job's
        // user itself (`restore_step::StepUser`), since slurmctld refuses root's step in a
        // user's job.
        "--overlap",
        "--job-name=rebalancer-restore:{step}.{task}",
        "-w",
        "{node}",
        "-N1",
        "-n1",
        "--rebalancer-restore={migration}",
        "true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn default_peer_protocol() -> [u16; 2] {
    [
        crate::peer::PEER_VERSIONS.min,
        crate::peer::PEER_VERSIONS.max,
    ]
}

fn default_peer_max_connections() -> usize {
    64
}

fn default_peer_max_per_host() -> usize {
    8
}

fn default_peer_idle_timeout_ms() -> u64 {
    10_000
}

fn default_heartbeat_interval_ms() -> u64 {
    2_000
}

fn default_heartbeat_misses() -> u32 {
    3
}

fn default_true() -> bool {
    true
}

fn default_timeout() -> u64 {
    60_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Munge,
    None,
}

/// An IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(s: &str) -> Result<Subnet, String> {
        let (a, p) = s.split_once('/').ok_or("expected ADDRESS/PREFIX")?;
        let base: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("'{a}' is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("'{p}' is not a prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("prefix /{prefix} is outside /8../30"));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(base) & !mask != 0 {
            return Err(format!("{base} has host bits set for /{prefix}"));
        }
        Ok(Subnet { base, prefix })
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.base)
    }
    /// Usable host addresses (network and broadcast excluded).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.base);
        let size = 1u32 << (32 - self.prefix);
        (1..size - 1).map(move |i| Ipv4Addr::from(base + i))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub listen: SocketAddr,
    pub advertise: Ipv4Addr,
    pub control_socket: PathBuf,
    pub container_subnet: Subnet,
    pub ipam: rebalancer_proto::IpamMode,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub criu: PathBuf,
    pub uplink: String,
    pub admin_uids: Vec<u32>,
    pub auth: AuthMethod,
    pub munge_socket: Option<PathBuf>,
    pub host_dirs: Vec<PathBuf>,
    pub peers: std::collections::BTreeMap<String, SocketAddr>,
    pub migration_timeout_ms: u64,
    pub encrypt_memory: bool,
    pub hold_inbound: bool,
    pub peer_protocol: rebalancer_proto::VersionRange,
    pub peer_limits: crate::peer::listener::Limits,
    /// Deadline of an unauthenticated peer connection's hello and `authenticate`.
    pub peer_idle_timeout: std::time::Duration,
    pub restore_command: Vec<String>,
    pub slurmd_spool_dir: PathBuf,
    /// Peer heartbeat interval (0: off) and misses before a peer counts as stalled.
    pub heartbeat_interval_ms: u64,
    pub heartbeat_misses: u32,
    /// Test-only pause point (`migration::pause`).
    pub test_pause_phase: Option<String>,
    pub test_pause_ms: u64,
    pub metrics: crate::metrics::MetricsConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub control: ControlConfig,
}

fn invalid(
    field: &'static str,
    value: impl std::fmt::Debug,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: format!("{value:?}"),
        reason: reason.into(),
        at: None,
    }
}

fn at_prefix(at: &Option<(PathBuf, usize, usize)>) -> String {
    at.as_ref()
        .map(|(p, l, c)| format!("{}:{l}:{c}: ", p.display()))
        .unwrap_or_default()
}

/// Where `field` (`key` or `table.key`) is set, as the line and column of its key.
fn key_position(text: &str, field: &str) -> Option<(usize, usize)> {
    let (table, key) = match field.rsplit_once('.') {
        Some((t, k)) => (Some(t), k),
        None => (None, field),
    };
    let mut current: Option<&str> = None;
    for (i, l) in text.lines().enumerate() {
        let t = l.trim_start();
        if let Some(h) = t.strip_prefix('[') {
            current = h.split(']').next().map(str::trim);
            continue;
        }
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        if k.trim() == key && (table.is_none() || current == table) {
            return Some((i + 1, l.len() - t.len() + 1));
        }
    }
    // A whole table (`[peers]`): its header.
    text.lines().enumerate().find_map(|(i, l)| {
        let t = l.trim_start();
        let name = t.strip_prefix('[')?.split(']').next()?.trim();
        (name == field).then(|| (i + 1, l.len() - t.len() + 1))
    })
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Errors name `file:line:column`: TOML's own position, or where the invalid key is set.
    pub fn from_toml(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| rebalancer_proto::position::line_col(text, s.start))
                .unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        raw.validate().map_err(|mut e| {
            if let ConfigError::Invalid { field, at, .. } = &mut e {
                let (line, column) = key_position(text, field).unwrap_or((1, 1));
                *at = Some((path.to_owned(), line, column));
            }
            e
        })
    }
}

impl RawConfig {
    pub fn validate(self) -> Result<AgentConfig, ConfigError> {
        let node_ok = !self.node.is_empty()
            && self.node.len() <= 64
            && self
                .node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !node_ok {
            return Err(invalid(
                "node",
                &self.node,
                "must be 1-64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| invalid("listen", &self.listen, "expected IP:PORT"))?;
        let advertise = match &self.advertise {
            Some(a) => a
                .parse()
                .map_err(|_| invalid("advertise", a, "expected an IPv4 address"))?,
            None => match listen.ip() {
                std::net::IpAddr::V4(v4) if !v4.is_unspecified() => v4,
                _ => {
                    return Err(invalid(
                        "advertise",
                        "",
                        "required when `listen` is not a specific IPv4 address",
                    ))
                }
            },
        };
        let container_subnet = Subnet::parse(&self.container_subnet)
            .map_err(|r| invalid("container_subnet", &self.container_subnet, r))?;
        if !self.control_socket.is_absolute() {
            return Err(invalid(
                "control_socket",
                &self.control_socket,
                "must be an absolute path",
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                &self.state_dir,
                "must be an absolute path",
            ));
        }
        if !self.slurmd_spool_dir.is_absolute()
            || self.slurmd_spool_dir.to_string_lossy().contains('%')
        {
            return Err(invalid(
                "slurmd_spool_dir",
                &self.slurmd_spool_dir,
                "must be an absolute path with %n/%h expanded",
            ));
        }
        let run_dir = self
            .run_dir
            .unwrap_or_else(|| PathBuf::from(format!("/run/rebalancer/{}", self.node)));
        if !run_dir.is_absolute() {
            return Err(invalid("run_dir", &run_dir, "must be an absolute path"));
        }
        for d in &self.host_dirs {
            if !d.is_absolute() || d == Path::new("/") {
                return Err(invalid(
                    "host_dirs",
                    d,
                    "each entry must be an absolute path other than /",
                ));
            }
        }
        if self.uplink.is_empty() || self.uplink.len() > 15 {
            return Err(invalid(
                "uplink",
                &self.uplink,
                "must be an interface name (1-15 characters)",
            ));
        }
        let auth = match self.auth.method.as_deref() {
            None | Some("munge") => AuthMethod::Munge,
            Some("none") => AuthMethod::None,
            Some(other) => {
                return Err(invalid(
                    "auth.method",
                    other,
                    "expected \"munge\" or \"none\"",
                ))
            }
        };
        let mut peers = std::collections::BTreeMap::new();
        for (name, addr) in &self.peers {
            let a: SocketAddr = addr
                .parse()
                .map_err(|_| invalid("peers", format!("{name} = {addr}"), "expected IP:PORT"))?;
            peers.insert(name.clone(), a);
        }
        let [lo, hi] = self.peer_protocol;
        let known = crate::peer::PEER_VERSIONS;
        if lo > hi || lo < known.min || hi > known.max {
            return Err(invalid(
                "peer_protocol",
                self.peer_protocol,
                format!(
                    "must be [lowest, highest] within {}..={}",
                    known.min, known.max
                ),
            ));
        }
        if !(1..=65_536).contains(&self.peer_max_connections) {
            return Err(invalid(
                "peer_max_connections",
                self.peer_max_connections,
                "must be 1..=65536",
            ));
        }
        if self.peer_max_per_host == 0 || self.peer_max_per_host > self.peer_max_connections {
            return Err(invalid(
                "peer_max_per_host",
                self.peer_max_per_host,
                format!(
                    "must be 1..=peer_max_connections ({})",
                    self.peer_max_connections
                ),
            ));
        }
        if !(100..=600_000).contains(&self.peer_idle_timeout_ms) {
            return Err(invalid(
                "peer_idle_timeout_ms",
                self.peer_idle_timeout_ms,
                "must be 100..=600000 (0.1 s to 10 min)",
            ));
        }
        if self.heartbeat_interval_ms != 0 && !(100..=60_000).contains(&self.heartbeat_interval_ms)
        {
            return Err(invalid(
                "heartbeat_interval_ms",
                self.heartbeat_interval_ms,
                "must be 0 (off) or 100..=60000 (0.1 s to 1 min)",
            ));
        }
        if !(2..=100).contains(&self.heartbeat_misses) {
            return Err(invalid(
                "heartbeat_misses",
                self.heartbeat_misses,
                "must be 2..=100",
            ));
        }
        if let Some(p) = &self.test_pause_phase {
            if !PAUSE_PHASES.contains(&p.as_str()) {
                return Err(invalid(
                    "test_pause_phase",
                    p,
                    format!("must be one of {}", PAUSE_PHASES.join(", ")),
                ));
            }
        }
        if self.test_pause_ms > 60_000 {
            return Err(invalid(
                "test_pause_ms",
                self.test_pause_ms,
                "must be at most 60000",
            ));
        }
        if self.migration_timeout_ms < 1000 {
            return Err(invalid(
                "migration_timeout_ms",
                self.migration_timeout_ms,
                "must be at least 1000",
            ));
        }
        if self.restore_command.is_empty()
            || !self
                .restore_command
                .iter()
                .any(|a| a.contains("{migration}"))
        {
            return Err(invalid(
                "restore_command",
                &self.restore_command,
                "must be a non-empty command containing {migration}",
            ));
        }
        let metrics = self.metrics.validate()?;
        let metrics_listen = match &self.metrics_listen {
            Some(a) => Some(a.parse().map_err(|_| {
                invalid(
                    "metrics_listen",
                    a,
                    "expected IP:PORT of the Prometheus endpoint, e.g. \"127.0.0.1:9641\"",
                )
            })?),
            None => None,
        };
        let control = self.control.validate(auth)?;
        Ok(AgentConfig {
            control,
            metrics,
            metrics_listen,
            node: self.node,
            listen,
            advertise,
            control_socket: self.control_socket,
            container_subnet,
            ipam: self.ipam,
            state_dir: self.state_dir,
            run_dir,
            criu: self.criu,
            uplink: self.uplink,
            admin_uids: self.admin_uids,
            auth,
            munge_socket: self.auth.munge_socket,
            host_dirs: self.host_dirs,
            peers,
            migration_timeout_ms: self.migration_timeout_ms,
            encrypt_memory: self.encrypt_memory,
            hold_inbound: self.hold_inbound,
            peer_protocol: rebalancer_proto::VersionRange::new(
                self.peer_protocol[0],
                self.peer_protocol[1],
            ),
            peer_limits: crate::peer::listener::Limits {
                total: self.peer_max_connections,
                per_host: self.peer_max_per_host,
            },
            peer_idle_timeout: std::time::Duration::from_millis(self.peer_idle_timeout_ms),
            restore_command: self.restore_command,
            slurmd_spool_dir: self.slurmd_spool_dir,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            heartbeat_misses: self.heartbeat_misses,
            test_pause_phase: self.test_pause_phase,
            test_pause_ms: self.test_pause_ms,
        })
    }
}

impl RawMetrics {
    fn validate(&self) -> Result<crate::metrics::MetricsConfig, ConfigError> {
        let mut m = crate::metrics::MetricsConfig::default();
        if let Some(t) = &self.temperature {
            m.temperature = t
                .parse()
                .map_err(|r| invalid("metrics.temperature", t, r))?;
        }
        if let Some(l) = &self.load {
            m.load = l.parse().map_err(|r| invalid("metrics.load", l, r))?;
        }
        if let Some(w) = self.load_window_s {
            if !(1..=3600).contains(&w) {
                return Err(invalid("metrics.load_window_s", w, "must be 1..=3600"));
            }
            m.load_window = std::time::Duration::from_secs(w);
        }
        Ok(m)
    }
}

/// Phases the test-only pause point (`test_pause_phase`, migration/pause.rs) exists for.
pub const PAUSE_PHASES: &[&str] = &[
    "prepare",
    "freeze",
    "dump",
    "transfer",
    "restore",
    "network-switch",
    "lazy-pages",
    "cleanup",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_file_line_and_column() {
        let p = Path::new("/etc/rebalancer/agent.toml");
        let e = AgentConfig::from_toml("node = \"n1\"\nbogus = 3\n", p).expect_err("unknown key");
        let m = e.to_string();
        assert!(
            m.starts_with("/etc/rebalancer/agent.toml:2:1: unknown field `bogus`"),
            "{m}"
        );
        let e = AgentConfig::from_toml("node = \"n1\"\n\n  listen = \"nowhere\"\n", p)
            .expect_err("bad listen");
        let m = e.to_string();
        assert!(
            m.starts_with("/etc/rebalancer/agent.toml:3:3: invalid `listen`"),
            "{m}"
        );
        assert!(m.contains("expected IP:PORT"), "{m}");
    }

    fn parse(s: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_toml(s, Path::new("test.toml"))
    }

    #[test]
    fn peer_listener_limits_default_and_bad_values_are_named() {
        let base = "node = \"n1\"\nlisten = \"198.18.16.2:7878\"\n";
        let c = parse(base).expect("valid");
        assert_eq!(c.peer_limits.total, 64);
        assert_eq!(c.peer_limits.per_host, 8);
        assert_eq!(c.peer_idle_timeout, std::time::Duration::from_secs(10));
        let c = parse(&format!(
            "{base}peer_max_connections = 5\npeer_max_per_host = 5\npeer_idle_timeout_ms = 250\n"
        ))
        .expect("valid");
        assert_eq!((c.peer_limits.total, c.peer_limits.per_host), (5, 5));
        assert_eq!(c.peer_idle_timeout, std::time::Duration::from_millis(250));
        for (line, field) in [
            ("peer_max_connections = 0", "peer_max_connections"),
            ("peer_max_per_host = 65", "peer_max_per_host"),
            ("peer_max_per_host = 0", "peer_max_per_host"),
            ("peer_idle_timeout_ms = 0", "peer_idle_timeout_ms"),
        ] {
            let e = parse(&format!("{base}{line}\n")).expect_err(line);
            assert!(
                matches!(&e, ConfigError::Invalid { field: f, .. } if *f == field),
                "{line}: {e}"
            );
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("node = \"n1\"\nlisten = \"198.18.16.2:7878\"\n").expect("valid");
        assert_eq!(c.node, "n1");
        assert_eq!(c.advertise, Ipv4Addr::new(198, 18, 16, 2));
        assert_eq!(c.container_subnet.to_string(), "198.19.0.0/20");
        assert_eq!(c.run_dir, PathBuf::from("/run/rebalancer/n1"));
        assert_eq!(c.auth, AuthMethod::Munge);
        assert!(c
            .restore_command
            .iter()
            .any(|a| a == "--rebalancer-restore={migration}"));
    }

    /// The default restore command runs on every release: srun has no --uid/--gid after 22.05
    /// (the agent runs it as the job's user instead).
    #[test]
    fn default_restore_command_has_no_uid_options() {
        let c = parse("node = \"n1\"\nlisten = \"198.18.16.2:7878\"\n").expect("valid");
        assert!(
            c.restore_command
                .iter()
                .all(|a| !a.starts_with("--uid") && !a.starts_with("--gid")),
            "{:?}",
            c.restore_command
        );
        assert_eq!(c.restore_command[0], "srun");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e =
            parse("node = \"n1\"\nlisten = \"1.2.3.4:1\"\nsubnet = \"x\"\n").expect_err("unknown");
        assert!(e.to_string().contains("subnet"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = parse("node = \"n 1\"\nlisten = \"198.18.16.2:1\"\n").expect_err("bad node");
        assert!(e.to_string().contains("`node`"), "{e}");
        let e = parse("node = \"n1\"\nlisten = \"0.0.0.0:1\"\n").expect_err("needs advertise");
        assert!(e.to_string().contains("`advertise`"), "{e}");
        let e = parse(
            "node = \"n1\"\nlisten = \"198.18.16.2:1\"\ncontainer_subnet = \"198.19.16.1/20\"\n",
        )
        .expect_err("host bits");
        assert!(e.to_string().contains("host bits"), "{e}");
        let e = parse("node = \"n1\"\nlisten = \"198.18.16.2:1\"\n[auth]\nmethod = \"kerberos\"\n")
            .expect_err("auth");
        assert!(e.to_string().contains("auth.method"), "{e}");
    }

    #[test]
    fn metrics_listen_is_a_socket_address() {
        let base = "node = \"n1\"\nlisten = \"198.18.16.2:1\"\n";
        assert_eq!(parse(base).expect("defaults").metrics_listen, None);
        let c = parse(&format!("metrics_listen = \"127.0.0.1:9641\"\n{base}")).expect("valid");
        assert_eq!(
            c.metrics_listen,
            Some("127.0.0.1:9641".parse().expect("addr"))
        );
        let e = parse(&format!("metrics_listen = \"localhost\"\n{base}")).expect_err("bad");
        assert!(e.to_string().contains("`metrics_listen`"), "{e}");
        assert!(e.to_string().contains("IP:PORT"), "{e}");
    }

    #[test]
    fn control_section() {
        let base = "node = \"n1\"\nlisten = \"198.18.16.2:1\"\n";
        let c = parse(base).expect("defaults").control;
        assert_eq!(c.listen, None);
        assert_eq!(c.controller_uids, vec![0]);
        assert_eq!((c.local.max_total, c.local.max_per_key), (2048, 64));
        assert_eq!((c.tcp.max_total, c.tcp.max_per_key), (16, 8));
        assert_eq!(c.idle_timeout.as_secs(), 60);
        let c = parse(&format!(
            "{base}[control]\nlisten = \"198.18.16.2:7879\"\ncontroller_uids = [0, 64030]\nmax_connections = 10\nidle_timeout_s = 5\n"
        ))
        .expect("valid")
        .control;
        assert_eq!(c.listen, Some("198.18.16.2:7879".parse().expect("addr")));
        assert_eq!(c.controller_uids, vec![0, 64030]);
        assert_eq!(c.local.max_total, 10);
        assert_eq!(c.idle_timeout.as_secs(), 5);
        let e = parse(&format!("{base}[control]\nlisten = \"node1:7879\"\n")).expect_err("name");
        assert!(e.to_string().contains("`control.listen`"), "{e}");
        let e = parse(&format!(
            "{base}[auth]\nmethod = \"none\"\n[control]\nlisten = \"198.18.16.2:7879\"\n"
        ))
        .expect_err("tcp without munge");
        assert!(e.to_string().contains("needs auth.method"), "{e}");
        let e = parse(&format!("{base}[control]\nmax_connections = 0\n")).expect_err("zero");
        assert!(e.to_string().contains("control.max_connections"), "{e}");
        let e = parse(&format!("{base}[control]\ncontroller_uids = []\n")).expect_err("empty");
        assert!(e.to_string().contains("control.controller_uids"), "{e}");
    }

    #[test]
    fn the_tcp_control_protocol_defaults_to_both_versions_and_can_require_encryption() {
        let base = "node = \"n1\"\nlisten = \"198.18.16.2:1\"\n";
        let c = parse(base).expect("defaults").control;
        assert_eq!(c.tcp_protocol, rebalancer_proto::VersionRange::new(1, 2));
        let c = parse(&format!("{base}[control]\ntcp_protocol = [2, 2]\n"))
            .expect("encrypted only")
            .control;
        assert_eq!(c.tcp_protocol, rebalancer_proto::VersionRange::new(2, 2));
        for bad in ["[2, 1]", "[0, 2]", "[1, 3]"] {
            let e = parse(&format!("{base}[control]\ntcp_protocol = {bad}\n")).expect_err(bad);
            assert!(e.to_string().contains("control.tcp_protocol"), "{bad}: {e}");
        }
    }

    #[test]
    fn metrics_section() {
        use crate::metrics::{LoadSource, TemperatureSource};
        let base = "node = \"n1\"\nlisten = \"198.18.16.2:1\"\n";
        let c = parse(base).expect("defaults");
        assert_eq!(c.metrics, crate::metrics::MetricsConfig::default());
        let c = parse(&format!(
            "{base}[metrics]\ntemperature = \"file:/run/t\"\nload = \"containers\"\nload_window_s = 5\n"
        ))
        .expect("valid");
        assert_eq!(
            c.metrics.temperature,
            TemperatureSource::File("/run/t".into())
        );
        assert_eq!(c.metrics.load, LoadSource::Containers);
        assert_eq!(c.metrics.load_window, std::time::Duration::from_secs(5));
        let e = parse(&format!("{base}[metrics]\ntemperature = \"ipmi\"\n")).expect_err("bad");
        assert!(e.to_string().contains("metrics.temperature"), "{e}");
        let e = parse(&format!("{base}[metrics]\nload_window_s = 0\n")).expect_err("bad");
        assert!(e.to_string().contains("metrics.load_window_s"), "{e}");
    }

    #[test]
    fn subnet_hosts_and_contains() {
        let s = Subnet::parse("198.19.16.0/30").expect("valid");
        let hosts: Vec<_> = s.hosts().collect();
        assert_eq!(
            hosts,
            vec![Ipv4Addr::new(198, 19, 16, 1), Ipv4Addr::new(198, 19, 16, 2)]
        );
        assert!(s.contains(Ipv4Addr::new(198, 19, 16, 3)));
        assert!(!s.contains(Ipv4Addr::new(198, 19, 16, 4)));
    }
}
