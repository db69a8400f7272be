//! A container with >= 512 MiB of memory that it keeps dirtying migrates in both modes.

mod common;
use common::*;
use rebalancer_proto::*;
use std::time::Duration;

#[test]
#[ignore = "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn memory_heavy_container_migrates_both_ways() {
    let lab = Lab::new(1, 2);
    let addr = "198.19.17.10";
    let mut c0 = lab.client(0);
    c0.call(&Request::CreateContainer {
        spec: server_spec("mem1", addr, 544),
    })
    .expect("create");
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(20, Duration::from_secs(60)),
        "client never got answers: {:?}",
        probe.stats.lock().map(|s| s.errors.clone())
    );
    let rss = c0.container("mem1").expect("info").rss_bytes;
    assert!(rss >= 512 << 20, "rss only {} MiB", rss >> 20);
    probe.reset_gap();

    let rec = c0
        .migrate("mem1", &lab.nodes[1].name, MigrationMode::StopAndCopy)
        .unwrap_or_else(|e| {
            panic!(
                "stop-and-copy failed: {e}\n--- n0\n{}\n--- n1\n{}",
                lab.log(0),
                lab.log(1)
            )
        });
    assert!(
        probe.advance(20, Duration::from_secs(15)),
        "client stalled: {:?}",
        probe.stats.lock().map(|s| s.errors.clone())
    );
    let gap = probe.stats.lock().expect("stats").max_gap;
    eprintln!(
        "stop-and-copy rss={}MiB: {} client_gap={gap:?}",
        rss >> 20,
        summary(&rec)
    );
    assert!(
        rec.stats.pages_written * 4096 >= 512 << 20,
        "only {} pages written",
        rec.stats.pages_written
    );
    assert!(rec.stats.bytes_sent >= 512 << 20);
    probe.reset_gap();

    let mut c1 = lab.client(1);
    let rec = c1
        .migrate("mem1", &lab.nodes[0].name, MigrationMode::PostCopy)
        .unwrap_or_else(|e| {
            panic!(
                "post-copy failed: {e}\n--- n0\n{}\n--- n1\n{}",
                lab.log(0),
                lab.log(1)
            )
        });
    assert!(
        probe.advance(20, Duration::from_secs(15)),
        "client stalled: {:?}",
        probe.stats.lock().map(|s| s.errors.clone())
    );
    let gap = probe.stats.lock().expect("stats").max_gap;
    eprintln!(
        "post-copy rss={}MiB: {} client_gap={gap:?}",
        rss >> 20,
        summary(&rec)
    );
    assert!(
        rec.stats.pages_lazy * 4096 >= 256 << 20,
        "only {} lazy pages",
        rec.stats.pages_lazy
    );
    // The memory really arrived: the container still holds it on n0.
    let back = lab.client(0).container("mem1").expect("on n0");
    assert_eq!(back.state, ContainerState::Running);
    assert!(
        back.rss_bytes >= 512 << 20,
        "rss after post-copy {} MiB",
        back.rss_bytes >> 20
    );
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
}
