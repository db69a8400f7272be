//! Keeps what must outlive the agent out of the agent's own cgroups.
//!
//! Under systemd the agent's unit is a cgroup (`name=systemd` on cgroup v1, the unified tree on
//! v2), and `systemctl kill`, or a stop with any `KillMode` but `process`, signals every process
//! in it. So containers, their stdio relays and the long-lived CRIU helpers (the lazy dump, the
//! lazy-pages daemon) start in `<hierarchy>/slurm-rebalancer/<node>/detached` of every hierarchy
//! where the agent itself is not in the root cgroup. A container's own memory and cpu cgroups
//! (`cgroup.rs`) take precedence in their hierarchies. Processes join between fork and exec by
//! writing "0" to a `cgroup.procs` opened at start-up, as in `cgroup.rs`.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::cgroup::{cgroup_mounts, DETACHED_LEAF as LEAF, PARENT};
use crate::error::AgentError;

/// One hierarchy's detached cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The hierarchy's mount point.
    pub root: PathBuf,
    /// `root/slurm-rebalancer/<node>/detached`.
    pub dir: PathBuf,
    /// A v1 cpuset hierarchy: each new level needs `cpuset.cpus` and `cpuset.mems`.
    pub cpuset: bool,
}

/// The detached cgroups for a process whose `/proc/self/cgroup` is `self_cgroup`, given
/// `/proc/self/mountinfo`: one per hierarchy the process is in below the root cgroup, mounted
/// with its root at `/` (a hierarchy seen through a cgroup namespace is left alone). Pure.
pub fn plan(self_cgroup: &str, mountinfo: &str, node: &str) -> Vec<Target> {
    let mounts = cgroup_mounts(mountinfo);
    let mut out: Vec<Target> = Vec::new();
    for line in self_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if path == "/" || path.is_empty() {
            continue;
        }
        let wanted: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
        let found = mounts.iter().find(|m| {
            if wanted.is_empty() {
                m.v2
            } else {
                !m.v2 && wanted.iter().all(|c| m.options.iter().any(|o| o == c))
            }
        });
        let Some(m) = found else {
            continue;
        };
        if m.root != "/" || out.iter().any(|t| t.root == m.mountpoint) {
            continue;
        }
        out.push(Target {
            root: m.mountpoint.clone(),
            dir: m.mountpoint.join(PARENT).join(node).join(LEAF),
            cpuset: !m.v2 && m.options.iter().any(|o| o == "cpuset"),
        });
    }
    out
}

/// The detached cgroups of this agent, with their `cgroup.procs` open for writing.
#[derive(Debug, Default)]
pub struct Detached {
    entries: Vec<(PathBuf, PathBuf, OwnedFd)>,
}

static DETACHED: OnceLock<Detached> = OnceLock::new();

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

/// Creates the detached cgroups `targets` and opens them; a level that exists is reused.
pub fn open(targets: &[Target]) -> Result<Detached, AgentError> {
    let mut entries = Vec::new();
    for t in targets {
        let mut levels = Vec::new();
        let mut d = t.dir.as_path();
        while d != t.root {
            levels.push(d.to_path_buf());
            d = d.parent().unwrap_or(&t.root);
        }
        for level in levels.iter().rev() {
            match std::fs::create_dir(level) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(format!("mkdir {}", level.display()))(e)),
            }
            if t.cpuset {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let have = std::fs::read_to_string(level.join(f)).unwrap_or_default();
                    if have.trim().is_empty() {
                        let v = std::fs::read_to_string(t.root.join(f))
                            .map_err(io(format!("read {}", t.root.join(f).display())))?;
                        std::fs::write(level.join(f), v.trim())
                            .map_err(io(format!("write {}", level.join(f).display())))?;
                    }
                }
            }
        }
        let procs = t.dir.join("cgroup.procs");
        let fd = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(io(format!("open {}", procs.display())))?;
        entries.push((t.root.clone(), t.dir.clone(), OwnedFd::from(fd)));
    }
    Ok(Detached { entries })
}

/// At start-up: plans and opens this agent's detached cgroups, once per process. Returns the
/// directories (for the log). An agent that cannot leave its cgroups still runs; its children
/// then share its unit's fate, which the caller logs. Cgroups that refuse a process are left
/// out (the others are used) and named in the error.
pub fn init(node: &str) -> Result<Vec<PathBuf>, AgentError> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(io("read /proc/self/cgroup".into()))?;
    let mi = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("read /proc/self/mountinfo".into()))?;
    let mut d = open(&plan(&own, &mi, node))?;
    // A hierarchy that refuses processes (a cpuset without cpus, a read-only or delegated tree)
    // would fail every container start: a short-lived child tries each one first.
    let mut refused = Vec::new();
    d.entries
        .retain(|(_, dir, fd)| match probe(fd.as_raw_fd()) {
            Ok(()) => true,
            Err(e) => {
                refused.push(format!("{}: {e}", dir.display()));
                false
            }
        });
    let dirs = d.entries.iter().map(|e| e.1.clone()).collect();
    let _ = DETACHED.set(d);
    if refused.is_empty() {
        Ok(dirs)
    } else {
        Err(AgentError::Internal(format!(
            "cgroups that refused a process, not used: {}",
            refused.join("; ")
        )))
    }
}

/// Runs `/bin/true` joined to the cgroup whose `cgroup.procs` is open on `fd`.
fn probe(fd: RawFd) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/bin/true");
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only write(2), which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || crate::cgroup::join_self(&[fd]));
    }
    match cmd.status() {
        Ok(_) => Ok(()),
        // No /bin/true to try with: the cgroup is used untried.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Raw `cgroup.procs` descriptors of the detached cgroups in every hierarchy but `covered` (the
/// roots of a container's own cgroups), for a `pre_exec` that calls
/// [`crate::cgroup::join_self`]. Empty before [`init`].
pub fn fds_except(covered: &[PathBuf]) -> Vec<RawFd> {
    DETACHED.get().map_or_else(Vec::new, |d| {
        d.entries
            .iter()
            .filter(|(root, _, _)| !covered.contains(root))
            .map(|(_, _, fd)| fd.as_raw_fd())
            .collect()
    })
}

/// At shutdown: removes the detached leaves that no process holds any more (best effort).
pub fn remove_empty() {
    if let Some(d) = DETACHED.get() {
        for (_, dir, _) in &d.entries {
            let _ = std::fs::remove_dir(dir);
            if let Some(node) = dir.parent() {
                let _ = std::fs::remove_dir(node);
                let _ = node.parent().map(std::fs::remove_dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
36 30 0:32 /ns /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
";

    #[test]
    fn every_hierarchy_the_agent_is_below_the_root_of_gets_a_detached_leaf() {
        let own = "\
7:pids:/system.slice/rebalancer-agent.service
6:cpuset:/system.slice
5:cpu,cpuacct:/system.slice/rebalancer-agent.service
4:memory:/
3:name=systemd:/system.slice/rebalancer-agent.service
0::/system.slice/rebalancer-agent.service
";
        let t = plan(own, MOUNTINFO, "node1");
        let dirs: Vec<String> = t.iter().map(|t| t.dir.display().to_string()).collect();
        assert_eq!(
            dirs,
            [
                "/sys/fs/cgroup/cpuset/slurm-rebalancer/node1/detached",
                "/sys/fs/cgroup/cpu,cpuacct/slurm-rebalancer/node1/detached",
                "/sys/fs/cgroup/systemd/slurm-rebalancer/node1/detached",
                "/sys/fs/cgroup/unified/slurm-rebalancer/node1/detached",
            ]
        );
        // Only the cpuset hierarchy needs its cpus and mems copied; memory is at the root and
        // pids is mounted from inside a cgroup namespace: both left alone.
        assert_eq!(
            t.iter().map(|t| t.cpuset).collect::<Vec<_>>(),
            [true, false, false, false]
        );
        assert!(plan("0::/\n3:name=systemd:/\n", MOUNTINFO, "n").is_empty());
        assert!(plan("garbage\n9:nosuch:/x\n", MOUNTINFO, "n").is_empty());
    }

    #[test]
    fn open_creates_every_level_and_reuses_what_exists() {
        let base = std::env::temp_dir().join(format!("rb-detach-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("mkdir");
        std::fs::write(base.join("cpuset.cpus"), "0-1\n").expect("write");
        std::fs::write(base.join("cpuset.mems"), "0\n").expect("write");
        let t = Target {
            root: base.clone(),
            dir: base.join(PARENT).join("node1").join(LEAF),
            cpuset: true,
        };
        // A plain directory stands in for a cgroup: the kernel would create cgroup.procs.
        std::fs::create_dir_all(&t.dir).expect("mkdir");
        std::fs::write(t.dir.join("cgroup.procs"), "").expect("write");
        let d = open(std::slice::from_ref(&t)).expect("open");
        assert_eq!(d.entries.len(), 1);
        for level in [
            base.join(PARENT),
            base.join(PARENT).join("node1"),
            t.dir.clone(),
        ] {
            let cpus = std::fs::read_to_string(level.join("cpuset.cpus")).unwrap_or_default();
            assert_eq!(cpus, "0-1", "{}", level.display());
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
