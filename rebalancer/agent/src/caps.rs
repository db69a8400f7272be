//! Start-up checks: what this node's kernel and CRIU can do, reported as supported modes.

use std::path::Path;

use rebalancer_proto::{MigrationMode, NodeCapabilities};

/// Oldest CRIU that dumps TCP sockets on current kernels (FIELD-NOTES: 4.1.1 fails).
pub const CRIU_MIN: (u32, u32) = (4, 2);

pub fn parse_version(out: &str) -> Option<(u32, u32, u32)> {
    let v = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// Whether `criu check --feature` output says the feature works.
pub fn feature_ok(output: &str, success: bool) -> bool {
    success
        && !output.contains("OFF")
        && !output.contains("not supported")
        && !output.contains("Error")
        && (output.contains("is supported")
            || output.contains("Looks good")
            || output.contains("is ON"))
}

async fn criu_out(criu: &Path, args: &[&str]) -> (bool, String) {
    match tokio::process::Command::new(criu)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
    {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status.success(), s)
        }
        Err(e) => (false, format!("cannot run {}: {e}", criu.display())),
    }
}

/// Derives the supported modes from the feature flags. Pure.
pub fn modes(c: &NodeCapabilities, version_ok: bool) -> Vec<MigrationMode> {
    let mut m = Vec::new();
    if !version_ok || !c.tcp_established || !c.nftables_lock {
        return m;
    }
    m.push(MigrationMode::StopAndCopy);
    if c.uffd {
        m.push(MigrationMode::PostCopy);
    }
    if c.dirty_tracking {
        m.push(MigrationMode::PreCopy);
    }
    m.push(MigrationMode::Auto);
    m
}

/// `CAP_SYS_RESOURCE`: CRIU reads a task's rlimits with prlimit(2), which for another user's
/// task needs it (root in some containers and sandboxes runs without it).
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has capability `cap` in its effective set (`CapEff` of
/// /proc/self/status).
pub fn has_capability(cap: u32) -> bool {
    effective_caps(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
        .is_some_and(|set| set & (1u64 << cap) != 0)
}

/// The `CapEff` mask of a /proc/PID/status text. Pure.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Why a container of user `uid` cannot be dumped here, if it cannot.
pub fn dump_refusal(uid: u32, node: &str) -> Option<String> {
    (uid != 0 && !has_capability(CAP_SYS_RESOURCE)).then(|| {
        format!(
            "the agent on {node} lacks CAP_SYS_RESOURCE, which CRIU needs to read the limits of user {uid}'s task (prlimit); run the agent with full root capabilities"
        )
    })
}

pub async fn probe(node: &str, criu: &Path) -> NodeCapabilities {
    let mut notes = Vec::new();
    if !has_capability(CAP_SYS_RESOURCE) {
        notes.push(
            "no CAP_SYS_RESOURCE: only root's containers can be migrated (CRIU reads other users' rlimits with prlimit)".into(),
        );
    }
    let (ok, out) = criu_out(criu, &["--version"]).await;
    let version = if ok { parse_version(&out) } else { None };
    let version_ok = matches!(version, Some((a, b, _)) if (a, b) >= CRIU_MIN);
    match version {
        None => notes.push(format!(
            "CRIU not usable at {}: {}",
            criu.display(),
            out.trim()
        )),
        Some(v) if !version_ok => notes.push(format!(
            "CRIU {}.{}.{} is older than {}.{} (TCP dumps fail on this kernel): no migration",
            v.0, v.1, v.2, CRIU_MIN.0, CRIU_MIN.1
        )),
        _ => {}
    }
    let feat = |name: &'static str, why: &'static str| {
        let criu = criu.to_path_buf();
        async move {
            let (ok, out) = criu_out(&criu, &["check", "--feature", name]).await;
            let good = feature_ok(&out, ok);
            (
                good,
                if good {
                    None
                } else {
                    Some(format!(
                        "{name}: {why} ({})",
                        out.trim().lines().last().unwrap_or("")
                    ))
                },
            )
        }
    };
    let (uffd, n1) = feat("uffd-noncoop", "userfaultfd missing: no post-copy").await;
    let (tcp, n2) = feat(
        "tcp_half_closed",
        "TCP repair incomplete: no migration of TCP connections",
    )
    .await;
    let (nft, n3) = feat("network_lock_nftables", "nftables network lock unavailable").await;
    let (dirty, n4) = feat(
        "mem_dirty_track",
        "kernel lacks soft-dirty page tracking (CONFIG_MEM_SOFT_DIRTY): no pre-copy",
    )
    .await;
    notes.extend([n1, n2, n3, n4].into_iter().flatten());
    let pipe_max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let uffd_usable = uffd && pipe_max >= 4 << 20;
    if uffd && !uffd_usable {
        notes.push(format!(
            "fs.pipe-max-size is {pipe_max}, post-copy needs >= 4194304 (CRIU's lazy page pipes): no post-copy"
        ));
    }
    let mut caps = NodeCapabilities {
        node: node.to_string(),
        criu_version: version.map(|v| format!("{}.{}.{}", v.0, v.1, v.2)),
        criu_path: Some(criu.display().to_string()),
        uffd: uffd_usable,
        tcp_established: tcp,
        nftables_lock: nft,
        dirty_tracking: dirty,
        modes: Vec::new(),
        notes,
    };
    caps.modes = modes(&caps, version_ok);
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_capabilities_are_read_from_status() {
        let status = "Name:\tx\nCapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\n";
        let eff = effective_caps(status).expect("CapEff");
        assert_eq!(eff & (1 << CAP_SYS_RESOURCE), 0);
        assert_ne!(eff & (1 << 21), 0, "CAP_SYS_ADMIN");
        assert_eq!(effective_caps("Name:\tx\n"), None);
        assert!(
            dump_refusal(0, "n1").is_none(),
            "root's tasks need no extra capability"
        );
    }

    #[test]
    fn version_parsing() {
        assert_eq!(parse_version("Version: 4.2.1\nGitID: x\n"), Some((4, 2, 1)));
        assert_eq!(parse_version("Version: 4.2\n"), Some((4, 2, 0)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn dirty_tracking_off_is_not_supported() {
        let out =
            "Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work.\n";
        assert!(!feature_ok(out, true));
        assert!(feature_ok("uffd-noncoop is supported\n", true));
        assert!(!feature_ok("uffd-noncoop is supported\n", false));
    }

    #[test]
    fn modes_follow_features() {
        let mut c = NodeCapabilities {
            node: "n".into(),
            criu_version: None,
            criu_path: None,
            uffd: true,
            tcp_established: true,
            nftables_lock: true,
            dirty_tracking: false,
            modes: vec![],
            notes: vec![],
        };
        assert_eq!(
            modes(&c, true),
            vec![
                MigrationMode::StopAndCopy,
                MigrationMode::PostCopy,
                MigrationMode::Auto
            ]
        );
        assert!(modes(&c, false).is_empty());
        c.uffd = false;
        c.dirty_tracking = true;
        assert_eq!(
            modes(&c, true),
            vec![
                MigrationMode::StopAndCopy,
                MigrationMode::PreCopy,
                MigrationMode::Auto
            ]
        );
    }
}
