//! Failure injection: the destination agent is killed mid-migration; the container keeps
//! running on the source and its client never notices more than a pause.

mod common;
use common::*;
use rebalancer_proto::*;
use std::sync::mpsc;
use std::time::Duration;

fn migrate_and_kill_destination(
    lab: &mut Lab,
    id: &str,
    mode: MigrationMode,
    kill_at: Phase,
    delay: Duration,
) -> ErrorReply {
    let sock = lab.nodes[0].socket.clone();
    let dest = lab.nodes[1].name.clone();
    let id = id.to_string();
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut c = Client::connect(&sock).expect("client");
        let req = Request::Migrate {
            request: MigrateRequest {
                container: id,
                destination: dest,
                destination_addr: None,
                mode,
                max_downtime_ms: None,
                timeout_ms: Some(20_000),
            },
            watch: true,
        };
        c.call_events(&req, |rec| {
            if let Some(p) = rec.phases.last() {
                let _ = tx.send(p.phase.clone());
            }
        })
    });
    loop {
        let p = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("phase events");
        if p == kill_at {
            break;
        }
    }
    std::thread::sleep(delay);
    lab.kill_agent(1);
    let r = h.join().expect("migrate thread");
    r.expect_err("migration must fail when the destination dies")
}

#[test]
#[ignore = "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn destination_killed_mid_migration_rolls_back() {
    let mut lab = Lab::new(2, 2);
    let addr = "198.19.18.10";
    let mut c0 = lab.client(0);
    c0.call(&Request::CreateContainer {
        spec: server_spec("victim", addr, 400),
    })
    .expect("create");
    let pid = c0.container("victim").expect("info").pid;
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(20, Duration::from_secs(60)),
        "no answers: {:?}",
        probe.stats.lock().map(|s| s.errors.clone())
    );

    // Stop-and-copy: killed while the pages stream to its page server.
    let e = migrate_and_kill_destination(
        &mut lab,
        "victim",
        MigrationMode::StopAndCopy,
        Phase::Dump,
        Duration::from_millis(300),
    );
    assert_eq!(e.code, ErrorCode::RolledBack, "{e}");
    let info = c0.container("victim").expect("still here");
    assert_eq!(info.state, ContainerState::Running);
    assert_eq!(info.pid, pid, "same process, resumed");
    assert!(
        probe.advance(100, Duration::from_secs(20)),
        "client stalled after rollback: {:?}\n{}",
        probe.stats.lock().map(|s| s.errors.clone()),
        lab.log(0)
    );
    eprintln!(
        "stop-and-copy rollback: {e}; client max gap {:?}",
        probe.stats.lock().expect("stats").max_gap
    );

    // Post-copy: killed while the images are on their way (before the restore).
    lab.start_agent(1);
    probe.reset_gap();
    let e = migrate_and_kill_destination(
        &mut lab,
        "victim",
        MigrationMode::PostCopy,
        Phase::Dump,
        Duration::ZERO,
    );
    assert_eq!(e.code, ErrorCode::RolledBack, "{e}");
    let info = c0.container("victim").expect("still here");
    assert_eq!(info.state, ContainerState::Running);
    assert_eq!(info.pid, pid);
    assert!(
        probe.advance(100, Duration::from_secs(20)),
        "client stalled after post-copy rollback: {:?}\n{}",
        probe.stats.lock().map(|s| s.errors.clone()),
        lab.log(0)
    );
    eprintln!(
        "post-copy rollback: {e}; client max gap {:?}",
        probe.stats.lock().expect("stats").max_gap
    );

    // The source is healthy: a real migration still works afterwards.
    lab.start_agent(1);
    let rec = c0
        .migrate("victim", &lab.nodes[1].name, MigrationMode::StopAndCopy)
        .unwrap_or_else(|e| {
            panic!(
                "migration after rollbacks failed: {e}\n{}\n{}",
                lab.log(0),
                lab.log(1)
            )
        });
    assert_eq!(rec.state, MigrationState::Succeeded);
    assert!(
        probe.advance(50, Duration::from_secs(20)),
        "client stalled after final migration"
    );
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
}
