//! A TCP server container migrates stop-and-copy and post-copy while a client keeps talking.

mod common;
use common::*;
use rebalancer_proto::*;
use std::time::Duration;

#[test]
#[ignore = "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn tcp_server_survives_both_modes() {
    let _ = REASON;
    let lab = Lab::new(0, 2);
    let addr = "198.19.16.10";
    let mut c0 = lab.client(0);
    let info = c0
        .call(&Request::CreateContainer {
            spec: server_spec("tcp1", addr, 0),
        })
        .expect("create");
    let Reply::Container { container } = info else {
        panic!("reply")
    };
    assert_eq!(container.state, ContainerState::Running);
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(50, Duration::from_secs(20)),
        "client never got answers: {:?}\n{}",
        probe.stats.lock().map(|s| s.errors.clone()),
        lab.log(0)
    );
    probe.reset_gap();

    let rec = c0.migrate("tcp1", &lab.nodes[1].name, MigrationMode::StopAndCopy);
    let rec = rec.unwrap_or_else(|e| {
        panic!(
            "stop-and-copy failed: {e}\n--- n0\n{}\n--- n1\n{}",
            lab.log(0),
            lab.log(1)
        )
    });
    assert_eq!(rec.state, MigrationState::Succeeded);
    assert!(
        probe.advance(50, Duration::from_secs(10)),
        "client stalled after stop-and-copy: {:?}",
        probe.stats.lock().map(|s| s.errors.clone())
    );
    let gap1 = probe.stats.lock().expect("stats").max_gap;
    eprintln!("stop-and-copy: {} client_gap={gap1:?}", summary(&rec));
    let on1 = lab.client(1).container("tcp1").expect("on n1");
    assert_eq!(on1.state, ContainerState::Running);
    assert_eq!(
        c0.container("tcp1").expect("on n0").state,
        ContainerState::MigratedAway
    );
    probe.reset_gap();

    let mut c1 = lab.client(1);
    let rec = c1.migrate("tcp1", &lab.nodes[0].name, MigrationMode::PostCopy);
    let rec = rec.unwrap_or_else(|e| {
        panic!(
            "post-copy failed: {e}\n--- n0\n{}\n--- n1\n{}",
            lab.log(0),
            lab.log(1)
        )
    });
    assert_eq!(rec.state, MigrationState::Succeeded);
    assert!(
        probe.advance(50, Duration::from_secs(10)),
        "client stalled after post-copy: {:?}",
        probe.stats.lock().map(|s| s.errors.clone())
    );
    let gap2 = probe.stats.lock().expect("stats").max_gap;
    eprintln!("post-copy: {} client_gap={gap2:?}", summary(&rec));
    assert_eq!(
        lab.client(0).container("tcp1").expect("back on n0").state,
        ContainerState::Running
    );

    // auto on a small container picks stop-and-copy and says why.
    probe.reset_gap();
    let rec = lab
        .client(0)
        .migrate("tcp1", &lab.nodes[1].name, MigrationMode::Auto)
        .unwrap_or_else(|e| {
            panic!(
                "auto failed: {e}\n--- n0\n{}\n--- n1\n{}",
                lab.log(0),
                lab.log(1)
            )
        });
    assert_eq!(rec.mode, Some(MigrationMode::StopAndCopy));
    let why = rec.mode_reason.clone().unwrap_or_default();
    assert!(why.starts_with("auto: stop-and-copy"), "{why}");
    assert!(
        probe.advance(50, Duration::from_secs(10)),
        "client stalled after auto"
    );
    eprintln!("auto: {} ({why})", summary(&rec));

    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    assert!(stats.last_counter > 150, "counter {}", stats.last_counter);
}
