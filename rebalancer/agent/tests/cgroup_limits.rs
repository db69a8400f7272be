//! A container's cgroup carries its limits on the node it starts on and on every node it
//! migrates to (stop-and-copy and post-copy); the node it left removes its cgroup; a container
//! going over its memory limit is OOM-killed, one spinning under a CPU limit is throttled.

mod common;
use common::*;
use rebalancer_agent::cgroup::{self, Hierarchy, Limits};
use rebalancer_proto::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MEM: u64 = 256 << 20;
const CPUS: f64 = 0.5;

fn hierarchy() -> Hierarchy {
    cgroup::detect_system().expect("this machine has a memory+cpu cgroup hierarchy")
}

fn usage_file(h: &Hierarchy) -> &'static str {
    match h {
        Hierarchy::V2 { .. } => "memory.current",
        Hierarchy::V1 { .. } => "memory.usage_in_bytes",
    }
}

/// Asserts that container `id` on `node` has its cgroup with the limits, holding `pid`, and
/// that at least `min_usage` bytes are charged to it.
fn assert_cgroup(h: &Hierarchy, node: &str, id: &str, pid: i32, min_usage: u64) {
    let dirs = cgroup::dirs(h, node, id);
    let limits = Limits::from_spec(Some(MEM), Some(CPUS)).expect("limits");
    for s in cgroup::settings(h, &limits).iter().filter(|s| !s.optional) {
        let p = dirs[s.dir].join(s.file);
        let got =
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        assert_eq!(got.trim(), s.value, "{}", p.display());
    }
    for d in &dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).expect("cgroup.procs");
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "pid {pid} not in {}: {procs:?}",
            d.display()
        );
    }
    let usage: u64 = std::fs::read_to_string(dirs[0].join(usage_file(h)))
        .expect("usage")
        .trim()
        .parse()
        .expect("number");
    assert!(
        usage >= min_usage,
        "{} charges only {} MiB",
        dirs[0].display(),
        usage >> 20
    );
}

fn assert_gone(dirs: &[PathBuf]) {
    for d in dirs {
        assert!(!d.exists(), "{} still exists", d.display());
    }
}

fn wait_exit(c: &mut Client, id: &str, within: Duration) -> ContainerInfo {
    let deadline = Instant::now() + within;
    loop {
        let info = c.container(id).expect("info");
        if info.exit_status.is_some() {
            return info;
        }
        assert!(Instant::now() < deadline, "{id} still runs: {info:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root, CRIU 4.2, cgroups, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn limits_follow_the_container_and_are_enforced() {
    let h = hierarchy();
    let lab = Lab::new(5, 2);
    let n0 = lab.nodes[0].name.clone();
    let addr = "198.19.21.10";
    let mut spec = server_spec("cg1", addr, 64);
    spec.memory_limit = Some(MEM);
    spec.cpus = Some(CPUS);
    let mut c0 = lab.client(0);
    c0.call(&Request::CreateContainer { spec }).expect("create");
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(20, Duration::from_secs(60)),
        "client never got answers: {:?}",
        probe.stats.lock().map(|s| s.errors.clone())
    );
    let pid = c0.container("cg1").expect("info").pid.expect("pid");
    assert_cgroup(&h, &n0, "cg1", pid, 64 << 20);

    for (from, to, mode) in [
        (0, 1, MigrationMode::StopAndCopy),
        (1, 0, MigrationMode::PostCopy),
    ] {
        let (src, dst) = (&lab.nodes[from].name, &lab.nodes[to].name);
        let rec = lab
            .client(from)
            .migrate("cg1", dst, mode)
            .unwrap_or_else(|e| {
                panic!(
                    "{mode} failed: {e}\n--- n0\n{}\n--- n1\n{}",
                    lab.log(0),
                    lab.log(1)
                )
            });
        assert_eq!(rec.state, MigrationState::Succeeded, "{}", summary(&rec));
        assert!(
            probe.advance(20, Duration::from_secs(15)),
            "client stalled after {mode}: {:?}",
            probe.stats.lock().map(|s| s.errors.clone())
        );
        let info = lab.client(to).container("cg1").expect("on destination");
        assert_eq!(info.state, ContainerState::Running);
        // Restored memory is charged to the limited cgroup, not to the agent's.
        assert_cgroup(&h, dst, "cg1", info.pid.expect("pid"), 64 << 20);
        assert_gone(&cgroup::dirs(&h, src, "cg1"));
    }
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    c0.call(&Request::KillContainer {
        id: "cg1".into(),
        signal: 9,
    })
    .expect("kill");
    wait_exit(&mut c0, "cg1", Duration::from_secs(10));

    // Over the limit: the kernel kills it (SIGKILL) instead of letting it grow.
    let mut oom = server_spec("oom1", "198.19.21.11", 0);
    oom.argv = vec![
        "python3".into(),
        "-c".into(),
        "import time\nb = b'x' * (512 << 20)\nprint('survived', flush=True)\ntime.sleep(60)".into(),
    ];
    oom.memory_limit = Some(MEM);
    c0.call(&Request::CreateContainer { spec: oom })
        .expect("create oom1");
    let info = wait_exit(&mut c0, "oom1", Duration::from_secs(30));
    assert_eq!(info.exit_status, Some(128 + 9), "{info:?}");
    // The reaper removes an ended container's cgroup.
    let dirs = cgroup::dirs(&h, &n0, "oom1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while dirs.iter().any(|d| d.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_gone(&dirs);
    assert_gone(&cgroup::dirs(&h, &n0, "cg1"));

    // A busy loop under cpus = 0.5 gets throttled by the CFS quota.
    let mut spin = server_spec("spin1", "198.19.21.12", 0);
    spin.argv = vec!["python3".into(), "-c".into(), "while True: pass".into()];
    spin.cpus = Some(CPUS);
    c0.call(&Request::CreateContainer { spec: spin })
        .expect("create spin1");
    let cpu_dir = cgroup::dirs(&h, &n0, "spin1").pop().expect("cpu dir");
    let throttled = |d: &PathBuf| -> u64 {
        std::fs::read_to_string(d.join("cpu.stat"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while throttled(&cpu_dir) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        throttled(&cpu_dir) > 0,
        "{} never throttled",
        cpu_dir.display()
    );
    c0.call(&Request::KillContainer {
        id: "spin1".into(),
        signal: 9,
    })
    .expect("kill spin1");
    wait_exit(&mut c0, "spin1", Duration::from_secs(10));
}
