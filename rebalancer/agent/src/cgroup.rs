//! Per-container cgroups carrying a container's memory and CPU limits.
//!
//! Layout: `<hierarchy>/slurm-rebalancer/<node>/<container id>` (the node level keeps several
//! agents on one machine apart, and lets a destination build its cgroup while the source's
//! frozen copy still holds its own). cgroup v2 is used when a cgroup2 mount offers both the
//! memory and cpu controllers; otherwise the v1 memory and cpu hierarchies
//! (`memory.limit_in_bytes`, `cpu.cfs_period_us` + `cpu.cfs_quota_us`).
//!
//! Processes join by writing "0" to an already opened `cgroup.procs` between fork and exec, so
//! a container's pid 1 (and a restoring criu with everything it forks) is born inside.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::AgentError;

/// First path component below the hierarchy root.
pub const PARENT: &str = "slurm-rebalancer";
/// The node-level leaf that holds what outlives the agent outside any container (`detach.rs`).
pub const DETACHED_LEAF: &str = "detached";
/// CFS period used for CPU limits (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CFS quota the kernel accepts.
const MIN_QUOTA_US: u64 = 1_000;

/// Where container cgroups are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// A cgroup2 mount whose root offers memory and cpu.
    V2 { root: PathBuf },
    /// The mount points of the v1 memory and cpu hierarchies.
    V1 { memory: PathBuf, cpu: PathBuf },
}

impl std::fmt::Display for Hierarchy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hierarchy::V2 { root } => write!(f, "cgroup v2 at {}", root.display()),
            Hierarchy::V1 { memory, cpu } => write!(
                f,
                "cgroup v1 memory at {}, cpu at {}",
                memory.display(),
                cpu.display()
            ),
        }
    }
}

/// A container's limits in kernel units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CFS quota per [`CPU_PERIOD_US`].
    pub cpu_quota_us: Option<u64>,
}

impl Limits {
    /// From a spec's `memory_limit` (bytes) and `cpus` (CPUs, fractional). Pure.
    pub fn from_spec(memory: Option<u64>, cpus: Option<f64>) -> Result<Limits, AgentError> {
        if memory == Some(0) {
            return Err(AgentError::BadRequest(
                "memory_limit must be more than 0 bytes".into(),
            ));
        }
        let cpu_quota_us = match cpus {
            None => None,
            Some(c) if c.is_finite() && c > 0.0 && c <= 4096.0 => {
                // Rounded up: a limit never comes out tighter than asked.
                let q = (c * CPU_PERIOD_US as f64).ceil() as u64;
                Some(q.max(MIN_QUOTA_US))
            }
            Some(c) => {
                return Err(AgentError::BadRequest(format!(
                    "cpus {c} must be a number above 0 and at most 4096"
                )))
            }
        };
        Ok(Limits {
            memory_bytes: memory,
            cpu_quota_us,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.memory_bytes.is_none() && self.cpu_quota_us.is_none()
    }
}

/// One control file to write: index into [`dirs`], file name, value; `optional` files may be
/// missing (no swap accounting) without failing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub dir: usize,
    pub file: &'static str,
    pub value: String,
    pub optional: bool,
}

/// Unescapes the octal escapes (`\040`) of a mountinfo path.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup (v1) or cgroup2 mount from `/proc/self/mountinfo`.
pub(crate) struct CgroupMount {
    pub mountpoint: PathBuf,
    /// The mount's root within its hierarchy (not `/` when seen through a cgroup namespace).
    pub root: String,
    pub v2: bool,
    /// Its super options: the v1 controllers and `name=...` among them.
    pub options: Vec<String>,
}

/// The cgroup and cgroup2 mounts of `/proc/self/mountinfo` text, in order. Pure.
pub(crate) fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split_whitespace().collect();
        let (Some(root), Some(mountpoint)) = (pre.get(3), pre.get(4)) else {
            continue;
        };
        let mut post = post.split_whitespace();
        let (Some(fstype), _, Some(opts)) = (post.next(), post.next(), post.next()) else {
            continue;
        };
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        out.push(CgroupMount {
            mountpoint: PathBuf::from(unescape(mountpoint)),
            root: (*root).to_string(),
            v2,
            options: opts.split(',').map(str::to_string).collect(),
        });
    }
    out
}

/// Picks the hierarchy from `/proc/self/mountinfo` text; `controllers` returns the contents of
/// a cgroup2 mount's `cgroup.controllers`. Prefers v2 with memory and cpu. Pure.
pub fn detect(mountinfo: &str, controllers: &dyn Fn(&Path) -> Option<String>) -> Option<Hierarchy> {
    let mut v1_memory = None;
    let mut v1_cpu = None;
    for m in cgroup_mounts(mountinfo) {
        let has = |c: &str| m.options.iter().any(|o| o == c);
        if m.v2 {
            let both = controllers(&m.mountpoint).is_some_and(|c| {
                let set: Vec<&str> = c.split_whitespace().collect();
                set.contains(&"memory") && set.contains(&"cpu")
            });
            if both {
                return Some(Hierarchy::V2 { root: m.mountpoint });
            }
            continue;
        }
        if has("memory") && v1_memory.is_none() {
            v1_memory = Some(m.mountpoint.clone());
        }
        if has("cpu") && v1_cpu.is_none() {
            v1_cpu = Some(m.mountpoint);
        }
    }
    Some(Hierarchy::V1 {
        memory: v1_memory?,
        cpu: v1_cpu?,
    })
}

/// The hierarchy of this machine, if any.
pub fn detect_system() -> Option<Hierarchy> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    detect(&mi, &|p: &Path| {
        std::fs::read_to_string(p.join("cgroup.controllers")).ok()
    })
}

/// The directories of a container's cgroup: one for v2; memory, then cpu for v1. Pure.
pub fn dirs(h: &Hierarchy, node: &str, id: &str) -> Vec<PathBuf> {
    let rel = Path::new(PARENT).join(node).join(id);
    match h {
        Hierarchy::V2 { root } => vec![root.join(rel)],
        Hierarchy::V1 { memory, cpu } => {
            if memory == cpu {
                // Co-mounted controllers: one directory.
                vec![memory.join(rel)]
            } else {
                vec![memory.join(&rel), cpu.join(rel)]
            }
        }
    }
}

/// The control files that carry `limits`, in write order. Unset limits are written as
/// "unlimited" so that a reused directory carries no stale value. Pure.
pub fn settings(h: &Hierarchy, limits: &Limits) -> Vec<Setting> {
    let s = |dir, file, value: String, optional| Setting {
        dir,
        file,
        value,
        optional,
    };
    match h {
        Hierarchy::V2 { .. } => {
            let mem = limits
                .memory_bytes
                .map_or_else(|| "max".to_string(), |b| b.to_string());
            let quota = limits
                .cpu_quota_us
                .map_or_else(|| "max".to_string(), |q| q.to_string());
            vec![
                s(0, "memory.max", mem, false),
                // Exceeding the limit must kill, not swap.
                s(
                    0,
                    "memory.swap.max",
                    if limits.memory_bytes.is_some() {
                        "0".into()
                    } else {
                        "max".into()
                    },
                    true,
                ),
                s(0, "cpu.max", format!("{quota} {CPU_PERIOD_US}"), false),
            ]
        }
        Hierarchy::V1 { memory, cpu } => {
            let cpu_dir = usize::from(memory != cpu);
            let mem = limits
                .memory_bytes
                .map_or_else(|| "-1".to_string(), |b| b.to_string());
            let quota = limits
                .cpu_quota_us
                .map_or_else(|| "-1".to_string(), |q| q.to_string());
            vec![
                s(0, "memory.limit_in_bytes", mem.clone(), false),
                // memory+swap no lower than memory (the kernel refuses that), so no swapping.
                s(0, "memory.memsw.limit_in_bytes", mem, true),
                s(
                    cpu_dir,
                    "cpu.cfs_period_us",
                    CPU_PERIOD_US.to_string(),
                    false,
                ),
                s(cpu_dir, "cpu.cfs_quota_us", quota, false),
            ]
        }
    }
}

/// A container's cgroup (its directories in every hierarchy used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub dirs: Vec<PathBuf>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

impl Cgroup {
    /// Creates (or takes over an empty leftover of) the cgroup of container `id` and writes
    /// its limits. Blocking file-system calls only.
    pub fn create(
        h: &Hierarchy,
        node: &str,
        id: &str,
        limits: &Limits,
    ) -> Result<Cgroup, AgentError> {
        let dirs = dirs(h, node, id);
        if let Hierarchy::V2 { root } = h {
            // Each level must hand memory and cpu down to the next.
            let mut level = root.clone();
            for part in [PARENT, node] {
                enable_v2_controllers(&level)?;
                level = level.join(part);
                create_dir(&level)?;
            }
            enable_v2_controllers(&level)?;
        }
        for d in &dirs {
            if let Some(p) = d.parent() {
                std::fs::create_dir_all(p).map_err(io(format!("mkdir {}", p.display())))?;
            }
            create_dir(d)?;
            let procs = d.join("cgroup.procs");
            let busy =
                std::fs::read_to_string(&procs).map_err(io(format!("read {}", procs.display())))?;
            if !busy.trim().is_empty() {
                return Err(AgentError::Busy(format!(
                    "cgroup {} still has processes",
                    d.display()
                )));
            }
        }
        let cg = Cgroup { dirs };
        for s in settings(h, limits) {
            let p = cg.dirs[s.dir].join(s.file);
            match std::fs::write(&p, &s.value) {
                Ok(()) => {}
                Err(e) if s.optional && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let err = AgentError::Io {
                        what: format!("write {} to {}", s.value, p.display()),
                        source: e,
                    };
                    cg.remove_now();
                    return Err(err);
                }
            }
        }
        Ok(cg)
    }

    /// `cgroup.procs` of every directory, opened for writing (for [`join_self`]).
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>, AgentError> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(io(format!("open {}", p.display())))
            })
            .collect()
    }

    /// Moves `pid` (a whole process) into this cgroup.
    pub fn add(&self, pid: i32) -> Result<(), AgentError> {
        for d in &self.dirs {
            let p = d.join("cgroup.procs");
            std::fs::write(&p, pid.to_string())
                .map_err(io(format!("add {pid} to {}", p.display())))?;
        }
        Ok(())
    }

    /// Reads one control file of the directory that holds it (tests, logs).
    pub fn read(&self, file: &str) -> Option<String> {
        self.dirs
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .map(|s| s.trim().to_string())
    }

    /// One attempt at removing every directory; true when none is left.
    fn remove_now(&self) -> bool {
        self.dirs.iter().all(|d| match std::fs::remove_dir(d) {
            Ok(()) => true,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        })
    }

    /// Removes the cgroup once its processes are gone (they may take a moment to leave after
    /// SIGKILL); gives up after about 5 s and logs it.
    pub async fn remove(&self) {
        for _ in 0..250 {
            if self.remove_now() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(cgroup = ?self.dirs, "cgroup still busy; left behind");
    }
}

/// One pass over this node's cgroups: how many were removed (empty ones a previous agent left),
/// and those that refused rmdir with the pids their `cgroup.procs` lists.
fn stale_pass(h: &Hierarchy, node: &str) -> (usize, Vec<(PathBuf, Vec<i32>)>) {
    let mut n = 0;
    let mut left = Vec::new();
    for r in roots(h) {
        let Ok(rd) = std::fs::read_dir(r.join(PARENT).join(node)) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() || e.file_name() == DETACHED_LEAF {
                continue;
            }
            if std::fs::remove_dir(&p).is_ok() {
                n += 1;
            } else {
                let procs = std::fs::read_to_string(p.join("cgroup.procs")).unwrap_or_default();
                let pids = procs.split_whitespace().filter_map(|x| x.parse().ok());
                left.push((p, pids.collect()));
            }
        }
    }
    (n, left)
}

/// Whether `pid` is on its way out: gone, a zombie, inside `do_exit` (`PF_EXITING`), or with a
/// SIGKILL pending. Such a task may still be listed in (and hold) its cgroup.
fn dying(pid: i32) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    if crate::procstat::ProcStat::of(pid).is_none_or(|s| s.exiting()) {
        return true;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().any(|l| {
        let (k, v) = l.split_once(':').unwrap_or(("", ""));
        matches!(k, "SigPnd" | "ShdPnd")
            && u64::from_str_radix(v.trim(), 16).is_ok_and(|m| m & SIGKILL_BIT != 0)
    })
}

/// What [`sweep_stale`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StaleSweep {
    pub removed: usize,
    /// Cgroups given up at the deadline: no task listed, or a dying one (with the pids).
    pub busy: Vec<(PathBuf, Vec<i32>)>,
    /// Cgroups of live tasks (adopted containers), with the pids.
    pub kept: Vec<(PathBuf, Vec<i32>)>,
}

/// Removes the cgroups a previous agent of this node left (killed before it could clean up),
/// after the start-up sweep killed the trees no record owns: a cgroup whose tasks were killed
/// refuses rmdir until they have left it, which a loaded machine can take seconds to do, and
/// nothing would remove it later. Retries while some refusing cgroup holds
/// no task or a dying one, up to `within`; cgroups of live tasks (adopted containers) are left
/// at once. Runs before the listeners open, so it cannot remove a new container's cgroup.
pub async fn sweep_stale(h: &Hierarchy, node: &str, within: Duration) -> StaleSweep {
    let deadline = std::time::Instant::now() + within;
    let mut removed = 0;
    loop {
        let (n, left) = stale_pass(h, node);
        removed += n;
        let (busy, kept): (Vec<_>, Vec<_>) = left
            .into_iter()
            .partition(|(_, pids)| pids.is_empty() || pids.iter().any(|p| dying(*p)));
        if busy.is_empty() || std::time::Instant::now() >= deadline {
            return StaleSweep {
                removed,
                busy,
                kept,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The mount points a container's cgroups live under.
pub fn roots(h: &Hierarchy) -> Vec<PathBuf> {
    match h {
        Hierarchy::V2 { root } => vec![root.clone()],
        Hierarchy::V1 { memory, cpu } if memory == cpu => vec![memory.clone()],
        Hierarchy::V1 { memory, cpu } => vec![memory.clone(), cpu.clone()],
    }
}

/// Removes this node's level (and the top level when no other node uses it); best effort,
/// at agent shutdown.
pub fn remove_node_dirs(h: &Hierarchy, node: &str) {
    for r in roots(h) {
        let _ = std::fs::remove_dir(r.join(PARENT).join(node));
        let _ = std::fs::remove_dir(r.join(PARENT));
    }
}

fn create_dir(d: &Path) -> Result<(), AgentError> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(AgentError::Io {
            what: format!("mkdir {}", d.display()),
            source: e,
        }),
    }
}

fn enable_v2_controllers(dir: &Path) -> Result<(), AgentError> {
    let p = dir.join("cgroup.subtree_control");
    let on = std::fs::read_to_string(&p).unwrap_or_default();
    let on: Vec<&str> = on.split_whitespace().collect();
    if on.contains(&"memory") && on.contains(&"cpu") {
        return Ok(());
    }
    std::fs::write(&p, "+memory +cpu")
        .map_err(io(format!("enable memory and cpu in {}", p.display())))
}

/// Joins the calling process to every cgroup whose `cgroup.procs` is open on `fds`.
/// Async-signal-safe (write(2) only): meant for `pre_exec`.
pub fn join_self(fds: &[RawFd]) -> std::io::Result<()> {
    for fd in fds {
        // SAFETY: writes one byte from a static buffer to a descriptor the caller keeps open.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raw descriptors of opened `cgroup.procs` files, for a `pre_exec` closure.
pub fn raw(fds: &[OwnedFd]) -> Vec<RawFd> {
    fds.iter().map(|f| f.as_raw_fd()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_without_v2_controllers_uses_v1_memory_and_cpu() {
        let h = detect(HYBRID, &|_| Some("hugetlb\n".into())).expect("found");
        assert_eq!(
            h,
            Hierarchy::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu".into()
            }
        );
        assert_eq!(
            dirs(&h, "n0", "j1.s0"),
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/slurm-rebalancer/n0/j1.s0"),
                PathBuf::from("/sys/fs/cgroup/cpu/slurm-rebalancer/n0/j1.s0"),
            ]
        );
    }

    #[test]
    fn v2_with_memory_and_cpu_wins_and_comounted_v1_is_one_dir() {
        let h = detect(HYBRID, &|p| {
            (p == Path::new("/sys/fs/cgroup/unified")).then(|| "cpuset cpu io memory pids".into())
        })
        .expect("found");
        assert_eq!(
            h,
            Hierarchy::V2 {
                root: "/sys/fs/cgroup/unified".into()
            }
        );
        assert_eq!(
            dirs(&h, "n1", "c"),
            vec![PathBuf::from(
                "/sys/fs/cgroup/unified/slurm-rebalancer/n1/c"
            )]
        );
        let co =
            "5 1 0:5 / /sys/fs/cgroup/cpu\\054cpuacct rw - cgroup cgroup rw,cpu,cpuacct,memory\n";
        let h = detect(co, &|_| None).expect("found");
        assert_eq!(dirs(&h, "n", "c").len(), 1);
        assert_eq!(
            dirs(&h, "n", "c")[0],
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/slurm-rebalancer/n/c")
        );
        assert!(detect("1 0 0:1 / / rw - ext4 /dev/sda rw\n", &|_| None).is_none());
        // cpuacct or cpuset alone is not cpu.
        let no_cpu = "1 0 0:1 / /m rw - cgroup cgroup rw,memory\n2 0 0:2 / /a rw - cgroup cgroup rw,cpuacct,cpuset\n";
        assert!(detect(no_cpu, &|_| None).is_none());
    }

    #[test]
    fn limits_in_kernel_units() {
        let l = Limits::from_spec(Some(256 << 20), Some(0.5)).expect("valid");
        assert_eq!(l.memory_bytes, Some(268_435_456));
        assert_eq!(l.cpu_quota_us, Some(50_000));
        assert_eq!(
            Limits::from_spec(None, Some(2.0))
                .expect("valid")
                .cpu_quota_us,
            Some(200_000)
        );
        // Tiny fractions round up to the kernel's minimum quota.
        assert_eq!(
            Limits::from_spec(None, Some(0.001))
                .expect("valid")
                .cpu_quota_us,
            Some(1_000)
        );
        assert!(Limits::from_spec(None, None).expect("valid").is_empty());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = Limits::from_spec(None, Some(bad)).expect_err("invalid");
            assert!(matches!(e, AgentError::BadRequest(_)), "{e}");
        }
        assert!(Limits::from_spec(Some(0), None).is_err());
    }

    #[test]
    fn settings_per_version() {
        let l = Limits::from_spec(Some(256 << 20), Some(0.5)).expect("valid");
        let v1 = Hierarchy::V1 {
            memory: "/m".into(),
            cpu: "/c".into(),
        };
        let all = settings(&v1, &l);
        let s: Vec<(usize, &str, &str)> = all
            .iter()
            .map(|s| (s.dir, s.file, s.value.as_str()))
            .collect();
        assert_eq!(
            s,
            vec![
                (0, "memory.limit_in_bytes", "268435456"),
                (0, "memory.memsw.limit_in_bytes", "268435456"),
                (1, "cpu.cfs_period_us", "100000"),
                (1, "cpu.cfs_quota_us", "50000"),
            ]
        );
        let v2 = Hierarchy::V2 { root: "/u".into() };
        let s = settings(&v2, &l);
        assert_eq!(s[0].value, "268435456");
        assert_eq!(s[2].file, "cpu.max");
        assert_eq!(s[2].value, "50000 100000");
        let none = settings(&v2, &Limits::default());
        assert_eq!(none[0].value, "max");
        assert_eq!(none[2].value, "max 100000");
        let none = settings(&v1, &Limits::default());
        assert_eq!(none[0].value, "-1");
        assert_eq!(none[3].value, "-1");
    }

    #[test]
    fn stale_leftovers_go_populated_ones_stay() {
        let tmp = std::env::temp_dir().join(format!("rb-cg-test-{}", std::process::id()));
        let node = tmp.join(PARENT).join("n0");
        std::fs::create_dir_all(node.join("gone")).expect("mkdir");
        std::fs::create_dir_all(node.join("busy")).expect("mkdir");
        // A non-empty directory refuses rmdir, like a cgroup with processes.
        std::fs::write(node.join("busy").join("cgroup.procs"), "42\n").expect("write");
        let h = Hierarchy::V1 {
            memory: tmp.clone(),
            cpu: tmp.clone(),
        };
        let (removed, left) = stale_pass(&h, "n0");
        assert_eq!(removed, 1);
        assert_eq!(left, vec![(node.join("busy"), vec![42])]);
        assert!(!node.join("gone").exists());
        assert!(node.join("busy").exists());
        assert_eq!(stale_pass(&h, "other").0, 0);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[tokio::test]
    async fn sweep_waits_for_dying_tasks_not_for_live_ones() {
        let tmp = std::env::temp_dir().join(format!("rb-cg-sweep-{}", std::process::id()));
        let node = tmp.join(PARENT).join("n0");
        // An empty cgroup.procs that refuses rmdir: tasks killed but not yet gone.
        std::fs::create_dir_all(node.join("dying")).expect("mkdir");
        std::fs::write(node.join("dying").join("cgroup.procs"), "").expect("write");
        std::fs::create_dir_all(node.join("live")).expect("mkdir");
        // Listed by a live process (this test): an adopted container's cgroup.
        let me = std::process::id() as i32;
        std::fs::write(node.join("live").join("cgroup.procs"), format!("{me}\n")).expect("write");
        let h = Hierarchy::V1 {
            memory: tmp.clone(),
            cpu: tmp.clone(),
        };
        let gone = node.join("dying").join("cgroup.procs");
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::remove_file(gone).expect("rm");
        });
        let s = sweep_stale(&h, "n0", Duration::from_secs(10)).await;
        t.join().expect("thread");
        assert_eq!(s.removed, 1);
        assert!(!node.join("dying").exists());
        assert_eq!(s.kept, vec![(node.join("live"), vec![me])]);
        assert!(s.busy.is_empty());

        assert!(!dying(me));
        // Tasks that never leave: given up at the deadline, reported with no pid.
        std::fs::create_dir_all(node.join("stuck")).expect("mkdir");
        std::fs::write(node.join("stuck").join("cgroup.procs"), "").expect("write");
        let t0 = std::time::Instant::now();
        let s = sweep_stale(&h, "n0", Duration::from_millis(300)).await;
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(s.busy, vec![(node.join("stuck"), vec![])]);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn mountinfo_octal_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/trail\\"), "/trail\\");
    }
}
