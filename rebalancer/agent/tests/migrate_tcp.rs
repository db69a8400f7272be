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
    let retrans0 = client_retrans(&lab.client_ns);

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
    eprintln!(
        "stop-and-copy: {} client_gap={gap1:?} client_retransmissions={:?}",
        summary(&rec),
        client_retrans(&lab.client_ns)
            .zip(retrans0)
            .map(|(n, b)| n - b)
    );
    assert_hold_released(&lab, 0, 1, "stop-and-copy");
    let on1 = lab.client(1).container("tcp1").expect("on n1");
    assert_eq!(on1.state, ContainerState::Running);
    assert_eq!(
        c0.container("tcp1").expect("on n0").state,
        ContainerState::MigratedAway
    );
    probe.reset_gap();
    let retrans1 = client_retrans(&lab.client_ns);

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
    eprintln!(
        "post-copy: {} client_gap={gap2:?} client_retransmissions={:?}",
        summary(&rec),
        client_retrans(&lab.client_ns)
            .zip(retrans1)
            .map(|(n, b)| n - b)
    );
    assert_hold_released(&lab, 1, 1, "post-copy");
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
    assert_hold_released(&lab, 0, 2, "auto");

    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    assert!(stats.last_counter > 150, "counter {}", stats.last_counter);
}

/// The inbound hold (`hold_inbound`, on by default) of the source node `i`'s `n`-th migration:
/// it held the client's request (the probe always has one in flight, far shorter apart than a
/// freeze), handed the whole queue on, and left no IFB and no uplink filter behind.
fn assert_hold_released(lab: &Lab, i: usize, n: usize, what: &str) {
    let log = strip_ansi(&lab.log(i));
    let released: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("inbound hold released"))
        .collect();
    assert_eq!(
        released.len(),
        n,
        "{what}: hold releases on node {i}:\n{log}"
    );
    let last = released[n - 1];
    let field = |k: &str| {
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_string()
    };
    let held: u64 = field("held_packets").parse().unwrap_or(0);
    assert!(
        held >= 1,
        "{what}: the client's request was not held: {last}"
    );
    assert_eq!(
        field("drained"),
        "true",
        "{what}: held packets lost: {last}"
    );
    let ns = &lab.nodes[i].netns;
    let out = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let ifbs = out(&["ip", "-n", ns, "-o", "link", "show", "type", "ifb"]);
    assert!(
        ifbs.trim().is_empty(),
        "{what}: IFB left on node {i}: {ifbs}"
    );
    let filters = out(&["tc", "-n", ns, "filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.trim().is_empty(),
        "{what}: uplink filter left on node {i}: {filters}"
    );
}

/// The client namespace's TCP `RetransSegs` so far (a figure, printed).
fn client_retrans(ns: &str) -> Option<u64> {
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|w| w == "RetransSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}
