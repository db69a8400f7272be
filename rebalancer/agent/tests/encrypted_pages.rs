//! Memory pages cross the node network encrypted (CRIU's TLS with a key pair per migration and
//! side, certificates pinned over the agent channel), in both modes; `encrypt_memory = false`
//! on both nodes turns it off.

mod common;
use common::*;
use rebalancer_proto::*;
use std::path::PathBuf;
use std::time::Duration;

/// The source's dump log of migration `rec` (the lab keeps source images).
fn dump_log(lab: &Lab, node: usize, rec: &MigrationRecord) -> String {
    let p: PathBuf = lab
        .dir
        .join(&lab.nodes[node].name)
        .join("run/images")
        .join(format!("{}-src/img/dump.log", rec.id));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn migrate_ok(lab: &Lab, from: usize, to: usize, id: &str, mode: MigrationMode) -> MigrationRecord {
    let rec = lab
        .client(from)
        .migrate(id, &lab.nodes[to].name, mode)
        .unwrap_or_else(|e| {
            panic!(
                "{mode} failed: {e}\n--- n{from}\n{}\n--- n{to}\n{}",
                lab.log(from),
                lab.log(to)
            )
        });
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    rec
}

fn run(lab: &Lab, addr: &str, encrypted: bool) {
    let mut c0 = lab.client(0);
    c0.call(&Request::CreateContainer {
        spec: server_spec("tls1", addr, 32),
    })
    .expect("create");
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(20, Duration::from_secs(60)),
        "no answers\n{}",
        lab.log(0)
    );
    for (from, to, mode) in [
        (0, 1, MigrationMode::StopAndCopy),
        (1, 0, MigrationMode::PostCopy),
    ] {
        probe.reset_gap();
        let rec = migrate_ok(lab, from, to, "tls1", mode);
        assert!(
            probe.advance(20, Duration::from_secs(10)),
            "client stalled after {mode}"
        );
        let gap = probe.stats.lock().expect("stats").max_gap;
        eprintln!(
            "encrypted={encrypted} {mode}: {} client_gap={gap:?}",
            summary(&rec)
        );
        let log = dump_log(lab, from, &rec);
        assert_eq!(
            log.contains("TLS handshake completed"),
            encrypted,
            "{mode}: the dump's page transfer encryption is not {encrypted}:\n{log}"
        );
    }
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
}

#[test]
#[ignore = "needs root, CRIU 4.2 with GnuTLS, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn pages_are_encrypted_by_default_in_both_modes() {
    let _ = REASON;
    let lab = Lab::new(9, 2);
    run(&lab, "198.19.25.10", true);
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn encryption_off_on_both_nodes_moves_pages_in_the_clear() {
    let off = "encrypt_memory = false".to_string();
    let lab = Lab::with_config(10, 2, vec![off.clone(), off]);
    run(&lab, "198.19.26.10", false);
}
