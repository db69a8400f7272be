//! The test cluster's hosts are isolated like separate machines: each node (and the admin host)
//! has its own hostname, /run, /tmp, spool and munged; `down` leaves nothing of them behind. The
//! controller on the admin host reaches the agents over their TCP control ports only: no agent
//! socket is reachable there.

// The end-to-end fixture serves several test files; this one uses part of it.
#![allow(dead_code)]

include!("common/e2e.rs");

use std::collections::BTreeSet;

use slurm_tests::{cluster_script, run_command, Run, ADMIN_HOST, AGENT_SOCKET};

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

/// The (device, inode, path) of every Unix socket HOST's mount namespace reaches, outside the
/// OS image (/usr), the kernel's file systems and /work (other checkouts; no agent socket lives
/// there), plus the state dir and the test's work dir wherever they are.
fn sockets_seen_on(c: &Cluster, host: &str, extra: &[&Path]) -> Vec<(u64, u64, String)> {
    let roots: Vec<String> = std::iter::once("/".to_owned())
        .chain(extra.iter().map(|p| p.display().to_string()))
        .collect();
    let script = format!(
        "find {} \\( -path /proc -o -path /sys -o -path /usr -o -path /work \\) -prune \
         -o -type s -printf '%D %i %p\\n' 2>/dev/null; true",
        roots.join(" ")
    );
    on_ok(c, host, &script)
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ' ');
            let dev = f.next()?.parse().ok()?;
            let ino = f.next()?.parse().ok()?;
            Some((dev, ino, f.next()?.to_owned()))
        })
        .collect()
}

#[test]
#[ignore = "needs root, network namespaces, CRIU and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn the_controller_reaches_every_agent_over_tcp_with_no_agent_socket_in_reach() {
    let mut e = E2e::start("tcp-control-plane");
    let work = e.work.clone();
    // The controller's config names no socket for any agent: its agents are TCP addresses.
    let cfg = e.read("rebalancerd.toml");
    assert!(
        cfg.contains("address_template") && !cfg.contains("socket_template"),
        "rebalancerd.toml still reaches agents through a socket:\n{cfg}"
    );

    // Each agent's control socket as the login host sees it (the hosts' backing dirs).
    let c = e.cluster();
    let state = c.state_dir().to_owned();
    let mut agent_sockets: BTreeSet<(u64, u64)> = BTreeSet::new();
    for node in c.node_names() {
        let p = c.host_path(&node, Path::new(AGENT_SOCKET));
        let m = std::fs::metadata(&p).unwrap_or_else(|err| panic!("{}: {err}", p.display()));
        agent_sockets.insert((m.dev(), m.ino()));
    }
    // The search finds an agent's socket where one is in reach: on its own node.
    let t = Instant::now();
    let on_node1 = sockets_seen_on(c, "node1", &[&state, &work]);
    let found = on_node1
        .iter()
        .filter(|(d, i, _)| agent_sockets.contains(&(*d, *i)))
        .count();
    assert_eq!(
        found, 1,
        "node1 should reach exactly its own agent's socket: {on_node1:?}"
    );
    e.log(&format!(
        "socket search on node1: {} sockets, {found} of an agent ({:.1} s)",
        on_node1.len(),
        t.elapsed().as_secs_f64()
    ));
    // The admin host reaches none, by any path; nor the backing dirs of the hosts.
    let on_admin = sockets_seen_on(c, ADMIN_HOST, &[&state, &work]);
    let reached: Vec<_> = on_admin
        .iter()
        .filter(|(d, i, _)| agent_sockets.contains(&(*d, *i)))
        .collect();
    assert!(
        reached.is_empty(),
        "the admin host reaches agent sockets: {reached:?}"
    );
    e.log(&format!(
        "socket search on the admin host: {} sockets, none of an agent",
        on_admin.len()
    ));
    let backing = on(
        c,
        ADMIN_HOST,
        &format!("ls -A {}", state.join("host").display()),
    );
    assert!(
        backing.stdout.trim().is_empty(),
        "the admin host sees the hosts' backing dirs: {backing:?}"
    );
    for node in c.node_names() {
        let p = c.host_path(&node, Path::new(AGENT_SOCKET));
        let r = on(c, ADMIN_HOST, &format!("test -e {}", p.display()));
        assert!(!r.success, "the admin host reaches {}", p.display());
    }

    // And still the controller sees every node's containers: one task on each node.
    let job = e.salloc(&["-N3", "-n3", "-w", "node[1-3]", "-J", "rb-tcp"]);
    let mem = "8".to_owned();
    let port = PORT.to_string();
    let w = work.display().to_string();
    e.spawn(
        "server-srun",
        "srun",
        &[
            &format!("--jobid={job}"),
            "-N3",
            "-n3",
            "--migratable",
            &format!("--output={w}/out-%t.txt"),
            "/usr/bin/python3",
            "-u",
            "server.py",
            &mem,
            &port,
        ],
    );
    let mut seen = BTreeSet::new();
    for task in 0..3u64 {
        // srun places task k on the k-th node of the allocation.
        let node = format!("node{}", task + 1);
        let ct = e.wait_container(job, task, &node, STARTUP);
        seen.insert(ct["node"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(seen.len(), 3, "containers seen on {seen:?}");
    // Every agent served the controller over TCP, authenticated as the admin host.
    for node in e.cluster().node_names() {
        let log =
            std::fs::read_to_string(work.join(format!("agents/{node}.log"))).unwrap_or_default();
        assert!(
            log.lines().any(
                |l| l.contains("controller authenticated on the TCP control port")
                    && l.contains("198.18.0.2:")
                    && l.contains("admin")
            ),
            "{node}'s agent never authenticated the controller from the admin host:\n{}",
            tail(&work.join(format!("agents/{node}.log")), 20)
        );
    }
    e.log("the controller lists a container on each of node1..node3, over TCP only");
}
