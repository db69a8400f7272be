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
) -> ErrorReply {
    let sock = lab.nodes[0].socket.clone();
    let dest = lab.nodes[1].name.clone();
    let container = id.to_string();
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut c = Client::connect(&sock).expect("client");
        let req = Request::Migrate {
            request: MigrateRequest {
                container,
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
    // Killed as soon as the phase begins; the record below shows the kill landed in it.
    lab.kill_agent(1);
    let r = h.join().expect("migrate thread");
    let e = r.expect_err("migration must fail when the destination dies");
    let rec = last_migration(lab, id);
    let phases: Vec<&Phase> = rec.phases.iter().map(|p| &p.phase).collect();
    let at = phases
        .iter()
        .position(|p| **p == kill_at)
        .unwrap_or_else(|| panic!("never reached {kill_at}: {phases:?}"));
    // The kill hit `kill_at`: nothing but the rollback (and its cleanup) ran after it.
    assert!(
        phases[at + 1..]
            .iter()
            .all(|p| matches!(p, Phase::Rollback | Phase::Cleanup)),
        "the destination died after {kill_at}, not during it: {phases:?}"
    );
    assert_eq!(rec.state, MigrationState::RolledBack, "{}", summary(&rec));
    e
}

/// The source's newest migration record of container `id`.
fn last_migration(lab: &Lab, id: &str) -> MigrationRecord {
    match lab.client(0).call(&Request::ListMigrations) {
        Ok(Reply::Migrations { migrations }) => migrations
            .into_iter()
            .filter(|m| m.container == id)
            .max_by_key(|m| m.started_at)
            .unwrap_or_else(|| panic!("no migration of {id} on the source")),
        other => panic!("list migrations: {other:?}"),
    }
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

    // Stop-and-copy: killed while the pages stream to its page server (the dump fails).
    let e =
        migrate_and_kill_destination(&mut lab, "victim", MigrationMode::StopAndCopy, Phase::Dump);
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
    let e =
        migrate_and_kill_destination(&mut lab, "victim", MigrationMode::PostCopy, Phase::Transfer);
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
