//! cluster.sh itself: idempotent up, recovery from crashed daemons, complete down.

use std::path::Path;
use std::process::Command;

use slurm_tests::{cluster_script, run_command, Cluster, Run};

fn script(args: &[&str], state_dir: &Path) -> Run {
    let mut cmd = Command::new(cluster_script());
    cmd.args(args).arg("--state-dir").arg(state_dir);
    run_command(cmd).expect("cluster.sh runs")
}

fn pid_of(c: &Cluster, file: &str) -> i32 {
    let path = c.state_dir().join("run").join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("pid file holds a pid")
}

#[test]
#[ignore = "needs root, network namespaces and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn up_is_idempotent_recovers_and_down_cleans_everything() {
    let c = Cluster::up(2).expect("cluster up");
    let dir = c.state_dir().to_owned();

    let again = script(&["up"], &dir);
    assert!(again.success, "{again:?}");
    assert!(again.stderr.contains("already up"), "{}", again.stderr);

    // Crash two daemons: status reports a partial cluster, up repairs it.
    for pid in [pid_of(&c, "slurmctld.pid"), pid_of(&c, "slurmd-node1.pid")] {
        // SAFETY: plain kill(2) of a daemon this test's cluster started.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
    }
    slurm_tests::wait_until(
        "status to see the crash",
        std::time::Duration::from_secs(10),
        || {
            let st = script(&["status"], &dir);
            Ok(if st.status.contains("exit status: 2") {
                slurm_tests::Poll::Done(())
            } else {
                slurm_tests::Poll::Pending(st.status)
            })
        },
    )
    .expect("status exits 2 for a partial cluster");
    let repaired = script(&["up", "--nodes", "2"], &dir);
    assert!(repaired.success, "{repaired:?}");
    assert!(repaired.stderr.contains("partly up"), "{}", repaired.stderr);
    let out = c
        .run_ok("srun", ["-N2", "printenv", "SLURMD_NODENAME"])
        .expect("repaired cluster runs steps");
    let mut nodes: Vec<&str> = out.lines().collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["node1", "node2"]);

    // down (while this guard still holds the machine lock, so nobody else brings a cluster up).
    let down = script(&["down"], &dir);
    assert!(down.success, "{down:?}");
    assert!(!dir.exists(), "state dir {} left behind", dir.display());
    for node in ["node1", "node2"] {
        assert!(
            !Path::new("/run/netns").join(node).exists(),
            "netns {node} left"
        );
    }
    for link in ["rbc0", "rbc-node1", "rbc-node2"] {
        assert!(
            !Path::new("/sys/class/net").join(link).exists(),
            "link {link} left"
        );
    }
    let dir_str = format!("{}/", dir.display());
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(entry) = entry else { continue };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let zombie = state
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'));
            assert!(
                zombie || !cmdline.contains(&dir_str),
                "process left: {cmdline}"
            );
        }
    }
    let status = script(&["status"], &dir);
    assert!(!status.success);
    assert!(status.stdout.contains("no cluster at"), "{status:?}");
}
