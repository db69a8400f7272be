//! Upgrade under running jobs (issue #12's upgrade test): with three containers running and a
//! fourth migrating, held in its dump by the test-only pause point, the agent binary is replaced
//! and the agent restarted (SIGTERM, then the new binary). The containers keep running, their
//! clients see no error, the cut migration rolls back (or, if Commit may have been sent, ends on
//! exactly one node) and the new agent's record of it says so, and the new agent lists them.

mod common;
use common::*;
use rebalancer_proto::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Lab block of this file (see `Lab::new`; other files use 0-6, 9, 10).
const K: u8 = 12;
/// How long the source's pause point holds the migration in its dump: the agent is stopped
/// inside it.
const UPGRADE_PAUSE_MS: u64 = 8000;

fn stop_agent(lab: &mut Lab, i: usize) {
    let mut c = lab.nodes[i].agent.take().expect("agent runs");
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !matches!(c.try_wait(), Ok(None)),
        "agent ignored SIGTERM\n{}",
        lab.log(i)
    );
}

/// Starts node `i`'s agent from `binary` (the lab's config file is already written).
fn start_agent_from(lab: &mut Lab, i: usize, binary: &std::path::Path) {
    let cfg = lab.dir.join(format!("{}.toml", lab.nodes[i].name));
    let n = &mut lab.nodes[i];
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&n.log)
        .expect("log");
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n.netns))
        .arg(binary)
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("REBALANCER_LOG", "info,rebalancer_agent=debug")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start upgraded agent");
    n.agent = Some(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut c) = Client::connect(&n.socket) {
            if c.call(&Request::Ping).is_ok() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("upgraded agent did not start\n{}", lab.log(i));
}

fn list(lab: &Lab, i: usize) -> Vec<ContainerInfo> {
    match lab.client(i).call(&Request::ListContainers) {
        Ok(Reply::Containers { containers }) => containers,
        other => panic!("list containers: {other:?}"),
    }
}

#[test]
#[ignore = "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn containers_survive_an_agent_upgrade_with_a_migration_in_flight() {
    let _ = REASON;
    let mut lab = Lab::with_config(
        K,
        2,
        vec![format!(
            "test_pause_phase = \"dump\"\ntest_pause_ms = {UPGRADE_PAUSE_MS}"
        )],
    );
    // up1..up3 keep running; up4 migrates while the agent is replaced.
    let ids = ["up1", "up2", "up3", "up4"];
    let addrs = [
        "198.19.28.11",
        "198.19.28.12",
        "198.19.28.13",
        "198.19.28.14",
    ];
    let mut c0 = lab.client(0);
    let mut pids = Vec::new();
    for (i, (id, addr)) in ids.iter().zip(addrs).enumerate() {
        let mem = if i == 3 { 64 } else { 0 };
        match c0.call(&Request::CreateContainer {
            spec: server_spec(id, addr, mem),
        }) {
            Ok(Reply::Container { container }) => pids.push(container.pid),
            other => panic!("create {id}: {other:?}\n{}", lab.log(0)),
        }
    }
    let probes: Vec<TcpProbe> = addrs
        .iter()
        .map(|a| TcpProbe::start(&lab.client_ns, a))
        .collect();
    for (p, id) in probes.iter().zip(ids) {
        assert!(
            p.advance(20, Duration::from_secs(20)),
            "{id}: client never got answers: {:?}\n{}",
            p.state(),
            lab.log(0)
        );
    }

    // Start migrating up4 and restart the agent while the pause point holds it in its dump.
    let req = Request::Migrate {
        request: MigrateRequest {
            container: "up4".into(),
            destination: lab.nodes[1].name.clone(),
            destination_addr: None,
            mode: MigrationMode::StopAndCopy,
            max_downtime_ms: None,
            timeout_ms: None,
        },
        watch: false,
    };
    let migration = match c0.call(&req) {
        Ok(Reply::Migration { migration }) => migration.id,
        other => panic!("migration not accepted: {other:?}\n{}", lab.log(0)),
    };
    let journal = lab.dir.join(&lab.nodes[0].name).join("state/migrations");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    while Instant::now() < deadline {
        seen = std::fs::read_dir(&journal)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect();
        if seen.contains("\"dump\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("journal when the agent was stopped: {seen}");
    assert!(
        seen.contains("\"dump\""),
        "the migration never reached its dump: the restart would not cut it\n{}",
        lab.log(0)
    );
    drop(c0);

    // The upgrade: a new binary in place of the old one (and the test's pause point gone, so
    // that the moves below are not held).
    let upgraded = lab.dir.join("rebalancer-agent-upgraded");
    std::fs::copy(env!("CARGO_BIN_EXE_rebalancer-agent"), &upgraded).expect("copy binary");
    let t_stop = Instant::now();
    stop_agent(&mut lab, 0);
    lab.extra_config[0].clear();
    let cfg = lab.dir.join(format!("{}.toml", lab.nodes[0].name));
    std::fs::write(&cfg, lab.config(0)).expect("write config");
    // While no agent runs, the containers run and answer.
    for (p, id) in probes.iter().zip(ids).take(3) {
        assert!(
            p.advance(20, Duration::from_secs(10)),
            "{id} stalled while the agent was down: {:?}",
            p.state()
        );
    }
    start_agent_from(&mut lab, 0, &upgraded);
    eprintln!(
        "agent down and up again in {} ms",
        t_stop.elapsed().as_millis()
    );

    // Every container is back in the new agent's list, with the same pid 1.
    let listed = list(&lab, 0);
    let log0 = lab.log(0);
    for (id, pid) in ids.iter().zip(&pids).take(3) {
        let c = listed
            .iter()
            .find(|c| c.id == *id)
            .unwrap_or_else(|| panic!("{id} not listed after the restart: {listed:?}\n{log0}"));
        assert_eq!(c.state, ContainerState::Running, "{c:?}");
        assert_eq!(c.pid, *pid, "{c:?}");
    }
    // The cut migration: rolled back here, or (Commit may have been sent) kept frozen here
    // and running there; never running on both nodes.
    let up3_here = listed.iter().find(|c| c.id == "up4").cloned();
    let there = list(&lab, 1);
    let up3_there = there
        .iter()
        .find(|c| c.id == "up4" && c.state == ContainerState::Running)
        .cloned();
    eprintln!("up4 here: {up3_here:?}; there: {up3_there:?}");
    match (&up3_here, &up3_there) {
        (Some(h), None) => assert_eq!(h.state, ContainerState::Running, "{h:?}\n{log0}"),
        (Some(h), Some(_)) => assert_eq!(
            h.state,
            ContainerState::Migrating,
            "two live copies\n{log0}\n{}",
            lab.log(1)
        ),
        (None, _) => panic!("up4 lost from n0's list\n{log0}"),
    }
    // The new agent's record of the cut migration ends: rolled back, or (Commit may have been
    // sent) succeeded; never left in flight. An agent of this release may also have resolved it
    // at its start and kept no record (NotFound): then where up4 runs (below) is the outcome.
    let deadline = Instant::now() + Duration::from_secs(60);
    let rec = loop {
        let r = lab.client(0).call(&Request::GetMigration {
            id: migration.clone(),
        });
        match &r {
            Ok(Reply::Migration { migration: m }) if m.state.is_terminal() => {
                break Some(m.clone())
            }
            Err(e) if e.code == ErrorCode::NotFound => break None,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the cut migration did not end after the restart: {r:?}\n{}",
            lab.log(0)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    match &rec {
        Some(rec) => {
            eprintln!(
                "cut migration: {} {} ms after the stop",
                summary(rec),
                t_stop.elapsed().as_millis()
            );
            assert!(
                matches!(
                    rec.state,
                    MigrationState::RolledBack | MigrationState::Succeeded
                ),
                "the cut migration ended {:?}, not rolled back or moved: {}\n{}",
                rec.state,
                summary(rec),
                lab.log(0)
            );
        }
        None => eprintln!("cut migration: the new agent keeps no record of it"),
    }

    // Exactly where the record says: here after a rollback, there after a move.
    let up3_here = list(&lab, 0).into_iter().find(|c| c.id == "up4");
    let up3_there = list(&lab, 1)
        .into_iter()
        .find(|c| c.id == "up4" && c.state == ContainerState::Running);
    let runs_here = up3_here.as_ref().map(|c| c.state) == Some(ContainerState::Running);
    assert!(
        runs_here != up3_there.is_some(),
        "up4 runs on {} nodes: here {up3_here:?}, there {up3_there:?}\n{log0}",
        usize::from(runs_here) + usize::from(up3_there.is_some())
    );
    if let Some(rec) = &rec {
        assert_eq!(
            runs_here,
            rec.state == MigrationState::RolledBack,
            "the record says {:?}, up4 here {up3_here:?}, there {up3_there:?}\n{log0}",
            rec.state
        );
    }
    // A new migration works with the new agent (up4 leaves only if it runs here).
    if runs_here {
        let rec = lab
            .client(0)
            .migrate("up4", &lab.nodes[1].name, MigrationMode::StopAndCopy)
            .unwrap_or_else(|e| panic!("migration after the restart: {e}\n{}", lab.log(0)));
        assert_eq!(rec.state, MigrationState::Succeeded, "{}", summary(&rec));
    }

    // The explicit drain empties the node: what still runs on n0 moves to n1.
    let out = Command::new(&upgraded)
        .arg("drain")
        .arg("--config")
        .arg(lab.dir.join(format!("{}.toml", lab.nodes[0].name)))
        .arg("--to")
        .arg(&lab.nodes[1].name)
        .arg("--mode")
        .arg("stop-and-copy")
        .output()
        .expect("run drain");
    assert!(
        out.status.success(),
        "drain failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        lab.log(0)
    );
    let there = list(&lab, 1);
    for id in ids {
        assert!(
            there
                .iter()
                .any(|c| c.id == id && c.state == ContainerState::Running),
            "{id} not running on n1 after the drain: {there:?}"
        );
    }

    for (p, id) in probes.into_iter().zip(ids) {
        assert!(
            p.advance(20, Duration::from_secs(15)),
            "{id} stalled after the restart: {:?}\n{}",
            p.state(),
            lab.log(0)
        );
        let stats = p.stop();
        assert!(
            stats.errors.is_empty(),
            "{id}: client errors {:?}",
            stats.errors
        );
    }
    // The stdio relays outlived the old agent (each container's stdout and stderr have one,
    // now on n1), and what was written before the restart is in n0's log file.
    let relays = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("__stdio-relay"))
        })
        .count();
    assert!(relays >= 4, "{relays} stdio relays run");
    let out = lab
        .dir
        .join(&lab.nodes[0].name)
        .join("state/logs/up1.stdout");
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(text.contains("listening"), "{}: {text:?}", out.display());
}

/// Lab block of the crash test (its own, so both tests may run at once).
const K_CRASH: u8 = 13;

#[test]
#[ignore = "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn containers_survive_an_agent_crash_and_are_readopted() {
    let mut lab = Lab::new(K_CRASH, 2);
    let addr = "198.19.29.21";
    let (pid, probe) = serve(&mut lab, "cr1", addr);
    // SIGKILL, agent and its process group (CRIU helpers): no chance to write anything.
    lab.kill_agent(0);
    runs_on_and_is_readopted(&mut lab, "cr1", pid, &probe, "after the crash");
    // Its address stays taken: a new container cannot have it.
    let dup = lab.client(0).call(&Request::CreateContainer {
        spec: server_spec("cr2", addr, 0),
    });
    assert!(
        matches!(&dup, Err(e) if e.code == ErrorCode::Busy),
        "{dup:?}"
    );
    // The container ends while the agent is down: the next start releases it.
    lab.kill_agent(0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid.expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill pid 1");
    lab.start_agent(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = list(&lab, 0);
        if !listed
            .iter()
            .any(|c| c.id == "cr1" && c.state == ContainerState::Running)
        {
            break;
        }
        assert!(Instant::now() < deadline, "cr1 still running: {listed:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let netns = std::fs::read_dir("/run/netns")
        .expect("/run/netns")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("rb-{}-cr1-", lab.nodes[0].name))
        })
        .count();
    assert_eq!(netns, 0, "cr1's namespace survived its end");
    let _ = probe.stop();
}

/// A TCP server container `id` at `addr` on node 0, answering a client: its pid 1 and the probe.
fn serve(lab: &mut Lab, id: &str, addr: &str) -> (Option<i32>, TcpProbe) {
    let pid = match lab.client(0).call(&Request::CreateContainer {
        spec: server_spec(id, addr, 0),
    }) {
        Ok(Reply::Container { container }) => container.pid,
        other => panic!("create: {other:?}\n{}", lab.log(0)),
    };
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(20, Duration::from_secs(20)),
        "no answers: {:?}",
        probe.state()
    );
    (pid, probe)
}

/// With agent 0 gone: container `id` keeps answering its client, and the agent started again
/// lists it running with the same pid 1.
fn runs_on_and_is_readopted(
    lab: &mut Lab,
    id: &str,
    pid: Option<i32>,
    probe: &TcpProbe,
    when: &str,
) {
    assert!(
        probe.advance(20, Duration::from_secs(10)),
        "{id} stalled {when}: {:?}",
        probe.state()
    );
    lab.start_agent(0);
    let c = lab
        .client(0)
        .container(id)
        .unwrap_or_else(|e| panic!("{id} not listed {when}: {e:?}"));
    assert_eq!(c.state, ContainerState::Running, "{c:?}");
    assert_eq!(c.pid, pid);
}

/// Lab block of the unit-kill test.
const K_UNIT: u8 = 15;

/// `systemctl kill` of the agent's unit (every process in its cgroup SIGKILLed, whatever
/// `KillMode` says) leaves the containers and their stdio relays running: they start in the
/// agent's detached cgroups (`detach.rs`), not in the unit's. The restarted agent re-adopts them.
#[test]
#[ignore = "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn a_kill_of_the_agents_unit_cgroup_leaves_its_containers_running() {
    let h = unit_hierarchy().expect("a name=systemd or cgroup2 hierarchy");
    let mut lab = Lab::new(K_UNIT, 1);
    let node = lab.nodes[0].name.clone();
    lab.run_agents_in_units();
    let unit = lab.nodes[0].unit.clone().expect("unit");
    let agent_pid = lab.nodes[0].agent.as_ref().map(|c| c.id() as i32);
    let (pid, probe) = serve(&mut lab, "u1", "198.19.31.21");
    let pid = pid.expect("pid");
    // Only the agent is in its unit; the container sits in the detached leaf of that hierarchy.
    let in_unit: Vec<i32> = std::fs::read_to_string(unit.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(
        in_unit,
        agent_pid.into_iter().collect::<Vec<_>>(),
        "{}",
        lab.log(0)
    );
    let detached = h.join("slurm-rebalancer").join(&node).join("detached");
    let held = std::fs::read_to_string(detached.join("cgroup.procs")).unwrap_or_default();
    assert!(
        held.split_whitespace().any(|p| p == pid.to_string()),
        "pid {pid} is not in {}: {held:?}\n{}",
        detached.display(),
        lab.log(0)
    );
    let killed = lab.kill_unit(0);
    assert!(
        !killed.contains(&pid),
        "the container was in the unit: {killed:?}"
    );
    runs_on_and_is_readopted(
        &mut lab,
        "u1",
        Some(pid),
        &probe,
        "after the unit was killed",
    );
    let st = probe.stop();
    assert!(st.errors.is_empty(), "the client saw errors: {st:?}");
    drop(lab);
    // The leaf empties once the lab killed the container.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(&detached).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = detached.parent().map(std::fs::remove_dir);
    let _ = std::fs::remove_dir(h.join("slurm-rebalancer"));
}
