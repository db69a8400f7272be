//! `cancel-migration` mid-way through a slow migration: the source rolls back as on any
//! failure before the commit point, the container keeps running on the source with the same
//! pid, its TCP client carries on, and the record names who cancelled it.

mod common;
use common::*;
use rebalancer_proto::*;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Starts a watched migration of `id` to node 1 and cancels it as soon as the source enters
/// `cancel_at`; the migration's error reply, the cancel's answer and how long the rollback took
/// from the cancel to the final record.
fn migrate_and_cancel(
    lab: &Lab,
    id: &str,
    mode: MigrationMode,
    cancel_at: Phase,
) -> (ErrorReply, Result<Reply, ErrorReply>, Duration) {
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
                timeout_ms: Some(60_000),
            },
            watch: true,
        };
        let r = c.call_events(&req, |rec| {
            if let Some(p) = rec.phases.last() {
                let _ = tx.send((p.phase.clone(), rec.id.clone()));
            }
        });
        (r, Instant::now())
    });
    let mid = loop {
        let (p, mid) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("phase events");
        if p == cancel_at {
            break mid;
        }
    };
    let asked = Instant::now();
    let answer = lab.client(0).call(&Request::CancelMigration {
        id: mid,
        by: "uid 0 (migrate_cancel test)".into(),
    });
    let (r, ended) = h.join().expect("migrate thread");
    let e = r.expect_err("a cancelled migration answers with its rollback");
    (e, answer, ended.duration_since(asked))
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
fn a_cancelled_migration_leaves_the_container_running_on_the_source() {
    let lab = Lab::new(7, 2);
    let addr = "198.19.23.10";
    let mut c0 = lab.client(0);
    // Large enough that the dump takes a while: the cancel lands inside it.
    c0.call(&Request::CreateContainer {
        spec: server_spec("slow", addr, 1024),
    })
    .expect("create");
    let pid = c0.container("slow").expect("info").pid;
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(20, Duration::from_secs(120)),
        "no answers: {:?}",
        probe.stats.lock().map(|s| s.errors.clone())
    );

    for (mode, at) in [
        (MigrationMode::StopAndCopy, Phase::Dump),
        (MigrationMode::PostCopy, Phase::Transfer),
    ] {
        probe.reset_gap();
        let (e, answer, took) = migrate_and_cancel(&lab, "slow", mode, at.clone());
        let rec = last_migration(&lab, "slow");
        let log = format!("{mode} at {at}: {}\n{}", summary(&rec), lab.log(0));
        assert!(
            matches!(answer, Ok(Reply::Migration { .. })),
            "cancel refused: {answer:?}\n{log}"
        );
        assert_eq!(e.code, ErrorCode::RolledBack, "{e}\n{log}");
        assert_eq!(rec.state, MigrationState::RolledBack, "{log}");
        assert_eq!(
            rec.cancelled_by.as_deref(),
            Some("uid 0 (migrate_cancel test)"),
            "{log}"
        );
        assert!(
            rec.phases.iter().all(|p| p.phase != Phase::NetworkSwitch),
            "{log}"
        );
        let info = c0.container("slow").expect("still here");
        assert_eq!(info.state, ContainerState::Running, "{log}");
        assert_eq!(info.pid, pid, "same process, resumed: {log}");
        // Nothing arrived on the destination.
        let there = lab.client(1).call(&Request::ListContainers);
        assert!(
            matches!(&there, Ok(Reply::Containers { containers }) if containers.is_empty()),
            "{there:?}"
        );
        assert!(
            probe.advance(100, Duration::from_secs(20)),
            "client stalled after the cancel: {:?}\n{log}",
            probe.stats.lock().map(|s| s.errors.clone()),
        );
        eprintln!(
            "{mode} cancelled in {at}: rolled back {} ms after the cancel, frozen {:?} ms, \
             client max gap {:?}",
            took.as_millis(),
            rec.stats.frozen_ms,
            probe.stats.lock().expect("stats").max_gap
        );
    }

    // After the cancels the source is healthy: a migration completes, and a cancel of the
    // ended migration is refused as not running.
    let rec = c0
        .migrate("slow", &lab.nodes[1].name, MigrationMode::StopAndCopy)
        .unwrap_or_else(|e| panic!("migration after the cancels failed: {e}\n{}", lab.log(0)));
    assert_eq!(rec.state, MigrationState::Succeeded);
    let e = c0
        .call(&Request::CancelMigration {
            id: rec.id.clone(),
            by: "uid 0".into(),
        })
        .expect_err("ended");
    assert_eq!(e.code, ErrorCode::NotFound, "{e}");
    assert!(e.message.contains("already ended (succeeded)"), "{e}");
    assert!(
        probe.advance(50, Duration::from_secs(20)),
        "client stalled after the final migration"
    );
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
}
