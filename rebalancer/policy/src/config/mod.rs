//! Policy files: stage 1 parses raw serde structs (`deny_unknown_fields`, spans kept), stage 2
//! `validate()` checks values and builds [`Policy`]. Because serde stops at the first unknown key,
//! a key-only pass runs first and reports all of them. Every problem is reported as
//! `path:line:column: message`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

mod keys;

use keys::fields_of;

use crate::hostlist::{HostFilter, HostPattern};
use crate::model::MigrationMode;
use crate::policy::{
    Action, Basis, ContainerOrder, Destination, DrainState, Limits, MigrationSettings, NameFilter,
    Policy, PolicyKind, PolicySet, Prefer, Scope, Selection, Trigger,
};

/// One thing wrong with a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    /// 1-based line and column (in characters); None when the problem is not inside the file.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// Loading failed; lists every problem found, one per line when displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Stage 1: raw structs.

type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<S<String>>,
    kind: S<PolicyKind>,
    enabled: Option<bool>,
    action: Option<Action>,
    priority: Option<S<i64>>,
    description: Option<String>,
    trigger: Option<S<RawTrigger>>,
    scope: Option<RawScope>,
    selection: Option<RawSelection>,
    destination: Option<RawDestination>,
    migration: Option<RawMigration>,
    limits: Option<RawLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    states: Option<S<Vec<S<DrainState>>>>,
    basis: Option<S<Basis>>,
    high: Option<S<f64>>,
    low: Option<S<f64>>,
    samples: Option<S<i64>>,
    min_duration_s: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    partitions: Option<Vec<S<String>>>,
    exclude_partitions: Option<Vec<S<String>>>,
    nodes: Option<Vec<S<String>>>,
    exclude_nodes: Option<Vec<S<String>>>,
    users: Option<Vec<S<String>>>,
    exclude_users: Option<Vec<S<String>>>,
    accounts: Option<Vec<S<String>>>,
    exclude_accounts: Option<Vec<S<String>>>,
    classes: Option<Vec<S<String>>>,
    exclude_classes: Option<Vec<S<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelection {
    max_per_node: Option<S<i64>>,
    order: Option<ContainerOrder>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    nodes: Option<Vec<S<String>>>,
    exclude_nodes: Option<Vec<S<String>>>,
    same_partition: Option<bool>,
    require_features: Option<Vec<S<String>>>,
    min_free_cpus: Option<S<i64>>,
    min_free_mem_mb: Option<S<i64>>,
    max_temperature_c: Option<S<f64>>,
    temperature_headroom_c: Option<S<f64>>,
    max_load_per_cpu: Option<S<f64>>,
    prefer: Option<Prefer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMigration {
    modes: Option<S<Vec<S<MigrationMode>>>>,
    max_downtime_ms: Option<S<i64>>,
    bandwidth_mib_s: Option<S<f64>>,
    fixed_downtime_ms: Option<S<i64>>,
    pre_copy_dirty_fraction: Option<S<f64>>,
    timeout_base_s: Option<S<i64>>,
    timeout_per_gib_s: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_concurrent: Option<S<i64>>,
    max_per_source: Option<S<i64>>,
    max_per_destination: Option<S<i64>>,
    max_per_cycle: Option<S<i64>>,
    job_cooldown_s: Option<S<i64>>,
    node_cooldown_s: Option<S<i64>>,
}

// ---------------------------------------------------------------------------------------------
// Stage 2: validation.

/// Byte offsets to 1-based line:column (columns count characters).
struct Positions<'a> {
    text: &'a str,
}

impl Positions<'_> {
    fn at(&self, offset: usize) -> (usize, usize) {
        rebalancer_proto::position::line_col(self.text, offset)
    }
}

struct Validator<'a> {
    path: &'a Path,
    pos: Positions<'a>,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        let position = Some(self.pos.at(span.start));
        self.problems.push(Problem {
            path: self.path.to_owned(),
            position,
            message: message.into(),
        });
    }

    /// An integer within `[min, max]`, else `default` and a problem.
    fn int(&mut self, v: &Option<S<i64>>, key: &str, min: i64, max: i64, default: i64) -> i64 {
        match v {
            None => default,
            Some(s) if (min..=max).contains(s.get_ref()) => *s.get_ref(),
            Some(s) => {
                let msg = if max >= i64::from(u32::MAX) {
                    format!("`{key}` must be at least {min}, got {}", s.get_ref())
                } else {
                    format!(
                        "`{key}` must be between {min} and {max}, got {}",
                        s.get_ref()
                    )
                };
                self.err(s.span(), msg);
                default
            }
        }
    }

    fn uint(&mut self, v: &Option<S<i64>>, key: &str, min: i64, default: u64) -> u64 {
        let d = i64::try_from(default).unwrap_or(i64::MAX);
        u64::try_from(self.int(v, key, min, i64::MAX, d)).unwrap_or(default)
    }

    fn u32(&mut self, v: &Option<S<i64>>, key: &str, min: i64, default: u32) -> u32 {
        u32::try_from(self.int(v, key, min, i64::from(u32::MAX), i64::from(default)))
            .unwrap_or(default)
    }

    fn finite(&mut self, v: &S<f64>, key: &str) -> Option<f64> {
        if v.get_ref().is_finite() {
            Some(*v.get_ref())
        } else {
            self.err(v.span(), format!("`{key}` must be a finite number"));
            None
        }
    }

    fn positive(&mut self, v: &Option<S<f64>>, key: &str, default: f64) -> f64 {
        match v {
            None => default,
            Some(s) => match self.finite(s, key) {
                Some(x) if x > 0.0 => x,
                Some(x) => {
                    self.err(s.span(), format!("`{key}` must be greater than 0, got {x}"));
                    default
                }
                None => default,
            },
        }
    }

    fn names(&mut self, v: &Option<Vec<S<String>>>, key: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in v.iter().flatten() {
            if s.get_ref().trim().is_empty() {
                self.err(s.span(), format!("`{key}` holds an empty name"));
            } else if out.contains(s.get_ref()) {
                self.err(s.span(), format!("`{key}` lists {:?} twice", s.get_ref()));
            } else {
                out.push(s.get_ref().clone());
            }
        }
        out
    }

    fn name_filter(
        &mut self,
        inc: &Option<Vec<S<String>>>,
        exc: &Option<Vec<S<String>>>,
        key: &str,
    ) -> NameFilter {
        NameFilter {
            include: self.names(inc, key),
            exclude: self.names(exc, &format!("exclude_{key}")),
        }
    }

    fn patterns(&mut self, v: &Option<Vec<S<String>>>) -> Vec<HostPattern> {
        let mut out = Vec::new();
        for s in v.iter().flatten() {
            match HostPattern::parse(s.get_ref()) {
                Ok(p) => out.push(p),
                Err(e) => self.err(s.span(), e.to_string()),
            }
        }
        out
    }

    fn host_filter(
        &mut self,
        inc: &Option<Vec<S<String>>>,
        exc: &Option<Vec<S<String>>>,
    ) -> HostFilter {
        HostFilter {
            include: self.patterns(inc),
            exclude: self.patterns(exc),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl RawPolicy {
    fn validate(self, v: &mut Validator<'_>) -> Policy {
        let kind = *self.kind.get_ref();
        let is_drain = kind == PolicyKind::Drain;
        let stem = v
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = match &self.name {
            Some(n) => {
                if !valid_name(n.get_ref()) {
                    v.err(
                        n.span(),
                        format!(
                            "invalid policy name {:?}: use 1-64 letters, digits, `-`, `_` or `.`",
                            n.get_ref()
                        ),
                    );
                }
                n.get_ref().clone()
            }
            None => {
                if !valid_name(&stem) {
                    v.err(
                        0..0,
                        format!("file name {stem:?} is not a valid policy name; set `name`"),
                    );
                }
                stem
            }
        };
        let priority = v.int(&self.priority, "priority", -1_000_000, 1_000_000, 0) as i32;

        // Trigger.
        let trigger = match &self.trigger {
            Some(t) => t.get_ref().validate(t.span(), kind, v),
            None => {
                if !is_drain {
                    v.err(
                        0..0,
                        format!(
                            "a {} policy needs a [trigger] table with `high`",
                            kind.as_str()
                        ),
                    );
                }
                RawTrigger::default_for(kind)
            }
        };

        let scope = self.scope.unwrap_or_default();
        let scope = Scope {
            partitions: v.name_filter(&scope.partitions, &scope.exclude_partitions, "partitions"),
            nodes: v.host_filter(&scope.nodes, &scope.exclude_nodes),
            users: v.name_filter(&scope.users, &scope.exclude_users, "users"),
            accounts: v.name_filter(&scope.accounts, &scope.exclude_accounts, "accounts"),
            classes: v.name_filter(&scope.classes, &scope.exclude_classes, "classes"),
        };

        let sel = self.selection.unwrap_or_default();
        let selection = Selection {
            max_per_node: v.u32(
                &sel.max_per_node,
                "max_per_node",
                0,
                if is_drain { 0 } else { 1 },
            ),
            order: sel.order.unwrap_or(if is_drain {
                ContainerOrder::LeastMemory
            } else {
                ContainerOrder::MostCpus
            }),
        };

        let d = self.destination.unwrap_or_default();
        let max_temperature_c = d
            .max_temperature_c
            .as_ref()
            .and_then(|s| v.finite(s, "max_temperature_c"));
        if let (Some(h), false) = (&d.temperature_headroom_c, kind == PolicyKind::Thermal) {
            v.err(
                h.span(),
                format!(
                    "`temperature_headroom_c` applies only to thermal policies, not {} (use `max_temperature_c`)",
                    kind.as_str()
                ),
            );
        }
        let temperature_headroom_c = match &d.temperature_headroom_c {
            None => 5.0,
            Some(s) => match v.finite(s, "temperature_headroom_c") {
                Some(x) if x >= 0.0 => x,
                Some(x) => {
                    v.err(
                        s.span(),
                        format!("`temperature_headroom_c` must not be negative, got {x}"),
                    );
                    5.0
                }
                None => 5.0,
            },
        };
        let max_load_per_cpu = match &d.max_load_per_cpu {
            None => None,
            Some(_) => Some(v.positive(&d.max_load_per_cpu, "max_load_per_cpu", 1.0)),
        };
        let destination = Destination {
            nodes: v.host_filter(&d.nodes, &d.exclude_nodes),
            same_partition: d.same_partition.unwrap_or(true),
            require_features: v.names(&d.require_features, "require_features"),
            min_free_cpus: v.u32(&d.min_free_cpus, "min_free_cpus", 0, 0),
            min_free_mem_mb: v.uint(&d.min_free_mem_mb, "min_free_mem_mb", 0, 0),
            max_temperature_c,
            temperature_headroom_c,
            max_load_per_cpu,
            prefer: d.prefer.unwrap_or(match kind {
                PolicyKind::Drain => Prefer::MostFree,
                PolicyKind::Thermal => Prefer::Coolest,
                PolicyKind::Load => Prefer::LeastLoaded,
            }),
        };

        let m = self.migration.unwrap_or_default();
        let mut modes = Vec::new();
        match &m.modes {
            None => modes = vec![MigrationMode::PostCopy, MigrationMode::StopAndCopy],
            Some(list) => {
                if list.get_ref().is_empty() {
                    v.err(list.span(), "`modes` must list at least one migration mode");
                }
                for s in list.get_ref() {
                    if *s.get_ref() == MigrationMode::Auto {
                        v.err(
                            s.span(),
                            "`modes` lists auto, the agent's choice: list the modes the policy may use",
                        );
                    } else if modes.contains(s.get_ref()) {
                        v.err(s.span(), format!("`modes` lists {} twice", s.get_ref()));
                    } else {
                        modes.push(*s.get_ref());
                    }
                }
            }
        }
        let model = rebalancer_proto::DowntimeModel::default();
        let pre_copy_dirty_fraction = match &m.pre_copy_dirty_fraction {
            None => model.pre_copy_dirty_fraction,
            Some(s) => match v.finite(s, "pre_copy_dirty_fraction") {
                Some(x) if (0.0..=1.0).contains(&x) => x,
                Some(x) => {
                    v.err(
                        s.span(),
                        format!("`pre_copy_dirty_fraction` must be between 0 and 1, got {x}"),
                    );
                    model.pre_copy_dirty_fraction
                }
                None => model.pre_copy_dirty_fraction,
            },
        };
        let migration = MigrationSettings {
            modes,
            max_downtime_ms: m
                .max_downtime_ms
                .as_ref()
                .map(|_| v.uint(&m.max_downtime_ms, "max_downtime_ms", 1, 1)),
            bandwidth_mib_s: v.positive(
                &m.bandwidth_mib_s,
                "bandwidth_mib_s",
                model.bandwidth_mib_s,
            ),
            fixed_downtime_ms: v.uint(&m.fixed_downtime_ms, "fixed_downtime_ms", 0, model.fixed_ms),
            pre_copy_dirty_fraction,
            timeout_base_s: v.uint(&m.timeout_base_s, "timeout_base_s", 1, 60),
            timeout_per_gib_s: v.uint(&m.timeout_per_gib_s, "timeout_per_gib_s", 0, 30),
        };

        let l = self.limits.unwrap_or_default();
        let (conc, src, dst, cyc, jcd, ncd) = if is_drain {
            (8, 4, 2, 8, 0, 0)
        } else {
            (4, 1, 1, 4, 600, 300)
        };
        let limits = Limits {
            max_concurrent: v.u32(&l.max_concurrent, "max_concurrent", 1, conc),
            max_per_source: v.u32(&l.max_per_source, "max_per_source", 1, src),
            max_per_destination: v.u32(&l.max_per_destination, "max_per_destination", 1, dst),
            max_per_cycle: v.u32(&l.max_per_cycle, "max_per_cycle", 1, cyc),
            job_cooldown_s: v.uint(&l.job_cooldown_s, "job_cooldown_s", 0, jcd),
            node_cooldown_s: v.uint(&l.node_cooldown_s, "node_cooldown_s", 0, ncd),
        };

        Policy {
            name,
            kind,
            enabled: self.enabled.unwrap_or(true),
            action: self.action.unwrap_or(Action::Recommend),
            priority,
            description: self.description.unwrap_or_default(),
            trigger,
            scope,
            selection,
            destination,
            migration,
            limits,
            source: v.path.to_owned(),
        }
    }
}

impl RawTrigger {
    fn default_for(kind: PolicyKind) -> Trigger {
        Trigger {
            states: vec![
                DrainState::Drain,
                DrainState::Draining,
                DrainState::RebootAsap,
                DrainState::Down,
            ],
            basis: Basis::Absolute,
            high: 0.0,
            low: 0.0,
            samples: if kind == PolicyKind::Drain { 1 } else { 3 },
            min_duration_s: if kind == PolicyKind::Load { 120 } else { 0 },
        }
    }

    fn validate(&self, table: Range<usize>, kind: PolicyKind, v: &mut Validator<'_>) -> Trigger {
        let mut t = Self::default_for(kind);
        let k = kind.as_str();
        if kind == PolicyKind::Drain {
            for (key, span) in [
                ("basis", self.basis.as_ref().map(|s| s.span())),
                ("high", self.high.as_ref().map(|s| s.span())),
                ("low", self.low.as_ref().map(|s| s.span())),
            ] {
                if let Some(span) = span {
                    v.err(
                        span,
                        format!("`{key}` does not apply to a drain policy (use `states`)"),
                    );
                }
            }
            if let Some(states) = &self.states {
                if states.get_ref().is_empty() {
                    v.err(states.span(), "`states` must list at least one node state");
                }
                t.states.clear();
                for s in states.get_ref() {
                    if t.states.contains(s.get_ref()) {
                        v.err(
                            s.span(),
                            format!("`states` lists {} twice", s.get_ref().as_str()),
                        );
                    } else {
                        t.states.push(*s.get_ref());
                    }
                }
            }
        } else {
            if let Some(s) = &self.states {
                v.err(
                    s.span(),
                    format!("`states` applies only to drain policies, not {k}"),
                );
            }
            t.states.clear();
            t.basis = self
                .basis
                .as_ref()
                .map_or(Basis::Absolute, |b| *b.get_ref());
            match &self.high {
                None => v.err(
                    table.clone(),
                    format!("a {k} policy needs `high` in [trigger]"),
                ),
                Some(h) => {
                    if let Some(x) = v.finite(h, "high") {
                        t.high = x;
                        if t.basis == Basis::Absolute && x < 0.0 && kind == PolicyKind::Load {
                            v.err(h.span(), format!("`high` must not be negative for an absolute load trigger, got {x}"));
                        }
                    }
                }
            }
            t.low = t.high;
            if let Some(l) = &self.low {
                if let Some(x) = v.finite(l, "low") {
                    if self.high.is_some() && x > t.high {
                        v.err(
                            l.span(),
                            format!(
                                "`low` ({x}) must not exceed `high` ({}); the band is low..high",
                                t.high
                            ),
                        );
                    }
                    t.low = x;
                }
            }
        }
        t.samples = v.u32(&self.samples, "samples", 1, t.samples);
        t.min_duration_s = v.uint(&self.min_duration_s, "min_duration_s", 0, t.min_duration_s);
        t
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// What to say where the TOML parser gives a position but no message (it does so for a
/// carriage return without a newline, which the fuzz test found).
pub fn toml_error_fallback(text: &str, at: usize) -> String {
    if text.get(at..).is_some_and(|r| r.starts_with('\r')) {
        "a carriage return must be followed by a newline".into()
    } else {
        "invalid TOML here".into()
    }
}

/// Parses and validates one policy file's text. `path` is used for messages and the default name.
pub fn parse_policy(path: &Path, text: &str) -> Result<Policy, Vec<Problem>> {
    let mut v = Validator {
        path,
        pos: Positions { text },
        problems: Vec::new(),
    };
    let tables: [(&str, &'static [&'static str]); 6] = [
        ("trigger", fields_of::<RawTrigger>()),
        ("scope", fields_of::<RawScope>()),
        ("selection", fields_of::<RawSelection>()),
        ("destination", fields_of::<RawDestination>()),
        ("migration", fields_of::<RawMigration>()),
        ("limits", fields_of::<RawLimits>()),
    ];
    for (span, message) in keys::unknown_keys(text, fields_of::<RawPolicy>(), &tables) {
        v.err(span, message);
    }
    if !v.problems.is_empty() {
        return Err(v.problems);
    }
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            // Serde names Rust types; say what goes in the file.
            let msg = e
                .message()
                .trim()
                .lines()
                .collect::<Vec<_>>()
                .join("; ")
                .replace("expected i64", "expected an integer")
                .replace("expected f64", "expected a number")
                .replace("expected a boolean", "expected true or false");
            let msg = if msg.is_empty() {
                toml_error_fallback(text, span.start)
            } else {
                msg
            };
            v.err(span, msg);
            return Err(v.problems);
        }
    };
    let policy = raw.validate(&mut v);
    if v.problems.is_empty() {
        Ok(policy)
    } else {
        Err(v.problems)
    }
}

/// Checks policy texts as `rebalancerd` would load them: the valid policies' names, or every
/// problem as `file:line:column: message`. What `rebalctl policy check` and the controller's
/// `policy-check` request answer.
pub fn check_sources(
    sources: &[rebalancer_proto::control::PolicySource],
) -> rebalancer_proto::control::PolicyCheckReport {
    use rebalancer_proto::control::PolicyCheckReport;
    let files: Vec<(std::path::PathBuf, &str)> = sources
        .iter()
        .map(|s| (std::path::PathBuf::from(&s.path), s.text.as_str()))
        .collect();
    match load_sources(&files) {
        Ok(set) => PolicyCheckReport {
            ok: true,
            policies: set.policies().iter().map(|p| p.name.clone()).collect(),
            errors: vec![],
        },
        Err(e) => PolicyCheckReport {
            ok: false,
            policies: vec![],
            errors: e.problems.iter().map(|p| p.to_string()).collect(),
        },
    }
}

/// Builds a set from in-memory files (path, text); checks every file and duplicate names.
pub fn load_sources<P: AsRef<Path>, T: AsRef<str>>(
    files: &[(P, T)],
) -> Result<PolicySet, LoadError> {
    let mut problems = Vec::new();
    let mut policies: Vec<Policy> = Vec::new();
    let mut seen: BTreeMap<String, (PathBuf, Option<(usize, usize)>)> = BTreeMap::new();
    for (path, text) in files {
        let (path, text) = (path.as_ref(), text.as_ref());
        match parse_policy(path, text) {
            Ok(p) => {
                let at = name_position(text);
                if let Some((first, first_at)) = seen.get(&p.name) {
                    let where_ = match first_at {
                        Some((l, c)) => format!("{}:{l}:{c}", first.display()),
                        None => first.display().to_string(),
                    };
                    problems.push(Problem {
                        path: path.to_owned(),
                        position: at.or(Some((1, 1))),
                        message: format!(
                            "duplicate policy name {:?} (first defined at {where_})",
                            p.name
                        ),
                    });
                } else {
                    seen.insert(p.name.clone(), (path.to_owned(), at));
                    policies.push(p);
                }
            }
            Err(mut ps) => problems.append(&mut ps),
        }
    }
    if problems.is_empty() {
        Ok(PolicySet::new(policies))
    } else {
        Err(LoadError { problems })
    }
}

/// Where `name = ...` sits, for duplicate-name messages.
fn name_position(text: &str) -> Option<(usize, usize)> {
    #[derive(Deserialize)]
    struct OnlyName {
        name: Option<S<String>>,
    }
    let n: OnlyName = toml::from_str(text).ok()?;
    let span = n.name?.span();
    Some(Positions { text }.at(span.start))
}

/// Loads every `*.toml` file of `dir` (not recursive; hidden files ignored), in file-name order.
pub fn load_dir(dir: &Path) -> Result<PolicySet, LoadError> {
    let io_problem = |path: &Path, e: std::io::Error| LoadError {
        problems: vec![Problem {
            path: path.to_owned(),
            position: None,
            message: format!("cannot read: {e}"),
        }],
    };
    let entries = std::fs::read_dir(dir).map_err(|e| io_problem(dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_problem(dir, e))?;
        let path = entry.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push((path, text)),
            Err(e) => problems.extend(io_problem(&path, e).problems),
        }
    }
    match load_sources(&files) {
        Ok(set) if problems.is_empty() => Ok(set),
        Ok(_) => Err(LoadError { problems }),
        Err(mut e) => {
            problems.append(&mut e.problems);
            problems.sort_by(|a, b| a.path.cmp(&b.path).then(a.position.cmp(&b.position)));
            Err(LoadError { problems })
        }
    }
}
