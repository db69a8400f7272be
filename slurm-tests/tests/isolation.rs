//! The test cluster's hosts are isolated like separate machines: each node (and the admin host)
//! has its own hostname, /run, /tmp, spool and munged; `down` leaves nothing of them behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use slurm_tests::{cluster_script, run_command, Cluster, Run, ADMIN_HOST, AGENT_SOCKET};

/// `sh -c SCRIPT` on HOST.
fn on(c: &Cluster, host: &str, script: &str) -> Run {
    let mut cmd = c.host_command(host, Path::new("/"), "sh");
    cmd.args(["-c", script]);
    run_command(cmd).expect("nsenter runs")
}

fn on_ok(c: &Cluster, host: &str, script: &str) -> String {
    let r = on(c, host, script);
    assert!(r.success, "on {host}: `{script}`: {r:?}");
    r.stdout.trim().to_owned()
}

fn mount_lines_naming(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("/proc/self/mountinfo")
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs root, namespaces and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn each_host_is_its_own_machine_and_down_leaves_nothing() {
    let c = Cluster::up(3).expect("cluster up");
    let dir = c.state_dir().to_owned();
    let hosts = c.host_names();

    // Every host names itself, and writes a mark into its own /run, /tmp and spool.
    for h in &hosts {
        assert_eq!(on_ok(&c, h, "hostname"), *h, "hostname of {h}");
        on_ok(
            &c,
            h,
            &format!(
                "echo {h} >/run/rbc-iso-mark && echo {h} >/tmp/rbc-iso-mark && \
                 mkdir -p /var/spool/slurmd && echo {h} >/var/spool/slurmd/rbc-iso-mark"
            ),
        );
    }
    // Each host sees only its own mark; the login host (this test) sees none at those paths.
    for h in &hosts {
        for d in ["/run", "/tmp", "/var/spool/slurmd"] {
            let seen = on_ok(&c, h, &format!("cat {d}/rbc-iso-mark"));
            assert_eq!(seen, *h, "{h}'s {d} holds another host's file");
            assert!(
                !Path::new(d).join("rbc-iso-mark").exists(),
                "the login host sees {h}'s {d}"
            );
        }
    }
    // No node sees another host's private directories, nor their backing dirs.
    let backing = dir.join("host");
    for h in c.node_names() {
        let r = on(&c, &h, &format!("ls -A {}", backing.display()));
        assert!(
            r.stdout.trim().is_empty(),
            "{h} sees the hosts' backing dirs: {r:?}"
        );
        for other in hosts.iter().filter(|o| **o != h) {
            let sock = c.host_path(other, Path::new(AGENT_SOCKET));
            let r = on(&c, &h, &format!("test -e {}", sock.display()));
            assert!(!r.success, "{h} reaches {other}'s {}", sock.display());
        }
    }

    // A munged of its own per host: distinct live pids in distinct mount namespaces, each
    // serving the cluster's key (a credential made on one host decodes on another).
    let mut seen: Vec<(String, String)> = Vec::new();
    for h in &hosts {
        let pid_file = c.host_path(h, Path::new("/run/munge/munged.pid"));
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
            .trim()
            .to_owned();
        let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .unwrap_or_else(|e| panic!("munged of {h} (pid {pid}) is not running: {e}"))
            .display()
            .to_string();
        assert!(
            !seen.iter().any(|(p, m)| *p == pid || *m == mnt),
            "{h}'s munged (pid {pid}, {mnt}) is shared: {seen:?}"
        );
        seen.push((pid, mnt));
    }
    let sock = dir.join("munge/munge.socket");
    let cred = on_ok(&c, "node1", &format!("munge -n -S {}", sock.display()));
    let decoded = on(
        &c,
        ADMIN_HOST,
        &format!("echo '{cred}' | unmunge -S {}", sock.display()),
    );
    assert!(
        decoded.success,
        "node1's credential does not decode on the admin host: {decoded:?}"
    );

    // Slurm's own files are node-local: each slurmd writes into its own spool only.
    let out = c
        .run_ok("srun", ["-N3", "sh", "-c", "ls /var/spool/slurmd"])
        .expect("srun on every node");
    for h in c.node_names() {
        let spool = on_ok(&c, &h, "ls /var/spool/slurmd");
        for other in c.node_names().iter().filter(|o| **o != h) {
            assert!(
                !spool.contains(&format!("{other}_")),
                "{h}'s spool holds {other}'s files:\n{spool}"
            );
        }
    }
    eprintln!("spools after srun -N3:\n{out}");

    // down, while this guard still holds the machine lock.
    let mut cmd = Command::new(cluster_script());
    cmd.arg("down").arg("--state-dir").arg(&dir);
    let down = run_command(cmd).expect("cluster.sh down runs");
    assert!(down.success, "{down:?}");
    assert!(!dir.exists(), "state dir {} left behind", dir.display());
    assert!(
        mount_lines_naming(&dir).is_empty(),
        "mounts left: {:?}",
        mount_lines_naming(&dir)
    );
    for ns in ["rbc-admin", "node1", "node2", "node3"] {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "netns {ns} left"
        );
    }
    for (pid, _) in &seen {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        assert!(stat.is_empty() || zombie, "munged {pid} left: {stat}");
    }
}

#[test]
#[ignore = "needs root and munged; .ci/run runs it with --include-ignored"]
fn down_kills_daemons_whose_state_dir_is_gone() {
    // The guard holds the machine's cluster lock (up also kills orphans: start ours after it).
    let c = Cluster::up(1).expect("cluster up");
    // An "orphan": a munged of a cluster whose state dir was deleted under it.
    let gone = PathBuf::from(format!("/tmp/rbc-orphan-{}", std::process::id()));
    std::fs::create_dir_all(gone.join("munge")).expect("orphan's dir");
    std::fs::write(gone.join("munge/munge.key"), [7u8; 1024]).expect("orphan's key");
    let run = |args: &[&str]| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &args.join(" ")]).stdin(Stdio::null());
        run_command(cmd).expect("sh runs")
    };
    let d = gone.display();
    let started = run(&[&format!(
        "chmod 0700 {d}/munge && chmod 0400 {d}/munge/munge.key && \
         munged --force --socket={d}/munge/s --key-file={d}/munge/munge.key \
         --pid-file={d}/munge/pid --log-file={d}/munge/log --seed-file={d}/munge/seed && cat {d}/munge/pid"
    )]);
    assert!(started.success, "{started:?}");
    let pid = started.stdout.trim().to_owned();
    std::fs::remove_dir_all(&gone).expect("delete the orphan's state dir");
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    // Any cluster's down kills it.
    let mut cmd = Command::new(cluster_script());
    cmd.arg("down").arg("--state-dir").arg(c.state_dir());
    let down = run_command(cmd).expect("cluster.sh down runs");
    assert!(down.success, "{down:?}");
    assert!(
        down.stderr
            .contains(&format!("killing orphaned munged (pid {pid})")),
        "{down:?}"
    );
    slurm_tests::wait_until("the orphan to die", Duration::from_secs(5), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let dead = stat.is_empty()
            || stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'));
        Ok(if dead {
            slurm_tests::Poll::Done(())
        } else {
            slurm_tests::Poll::Pending(stat)
        })
    })
    .expect("the orphaned munged is gone");
}
