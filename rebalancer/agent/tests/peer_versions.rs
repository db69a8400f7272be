//! Agents of two releases migrate to each other: peer protocol 2 (mutual, connection-bound
//! munge credentials) between current agents, version 1 with an agent that speaks only it (the
//! previous release's hello and messages), and a clear refusal with no common version.

mod common;
use common::*;
use rebalancer_proto::*;
use std::time::Duration;

const V1_WARNING: &str = "peer protocol 1";
const CLEAR_WARNING: &str = "is not encrypted";

fn serve(lab: &Lab, addr: &str) -> TcpProbe {
    lab.client(0)
        .call(&Request::CreateContainer {
            spec: server_spec("pv1", addr, 0),
        })
        .expect("create");
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(20, Duration::from_secs(60)),
        "no answers\n{}",
        lab.log(0)
    );
    probe
}

fn move_ok(lab: &Lab, from: usize, to: usize, probe: &TcpProbe) {
    let rec = lab
        .client(from)
        .migrate("pv1", &lab.nodes[to].name, MigrationMode::StopAndCopy)
        .unwrap_or_else(|e| {
            panic!(
                "n{from} -> n{to} failed: {e}\n--- n{from}\n{}\n--- n{to}\n{}",
                lab.log(from),
                lab.log(to)
            )
        });
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    assert!(
        probe.advance(20, Duration::from_secs(10)),
        "client stalled after n{from} -> n{to}"
    );
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn current_agents_authenticate_each_other_and_move_both_ways() {
    let _ = REASON;
    let lab = Lab::new(11, 2);
    let probe = serve(&lab, "198.19.27.10");
    move_ok(&lab, 0, 1, &probe);
    move_ok(&lab, 1, 0, &probe);
    for i in 0..2 {
        assert!(
            !lab.log(i).contains(V1_WARNING),
            "n{i} fell back to protocol 1:\n{}",
            lab.log(i)
        );
        assert!(
            !lab.log(i).contains(CLEAR_WARNING),
            "n{i} spoke with its peer in clear (not protocol 3):\n{}",
            lab.log(i)
        );
    }
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn an_agent_of_the_previous_protocol_migrates_both_ways() {
    // n0 speaks only version 1 (the previous release's hello: one version, a credential that
    // names only its node, no nonce); n1 speaks 1 and 2.
    let lab = Lab::with_config(12, 2, vec!["peer_protocol = [1, 1]".into(), String::new()]);
    let probe = serve(&lab, "198.19.28.10");
    move_ok(&lab, 0, 1, &probe); // old source, new destination
    move_ok(&lab, 1, 0, &probe); // new source, old destination
    for i in 0..2 {
        assert!(
            lab.log(i).contains(V1_WARNING),
            "n{i} does not say it spoke protocol 1 with its peer:\n{}",
            lab.log(i)
        );
    }
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn no_common_version_is_refused_naming_both_and_the_job_stays() {
    // n0 speaks only 1, n1 insists on 2 (a site that finished its upgrade).
    let lab = Lab::with_config(
        13,
        2,
        vec![
            "peer_protocol = [1, 1]".into(),
            "peer_protocol = [2, 2]".into(),
        ],
    );
    let probe = serve(&lab, "198.19.29.10");
    let e = lab
        .client(0)
        .migrate("pv1", &lab.nodes[1].name, MigrationMode::StopAndCopy)
        .expect_err("no common version");
    assert!(
        e.message.contains("version 1") && e.message.contains("version 2"),
        "the refusal does not name both versions: {e}"
    );
    let info = lab.client(0).container("pv1").expect("still on n0");
    assert_eq!(info.state, ContainerState::Running);
    assert!(probe.advance(20, Duration::from_secs(10)), "client stalled");
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn an_agent_of_protocol_2_migrates_both_ways_with_one_of_protocol_3_in_clear() {
    // n0 is the previous release (versions 1 and 2, no TLS); n1 speaks 1 to 3.
    let lab = Lab::with_config(15, 2, vec!["peer_protocol = [1, 2]".into(), String::new()]);
    let probe = serve(&lab, "198.19.31.10");
    move_ok(&lab, 0, 1, &probe); // v2 source, v3 destination
    move_ok(&lab, 1, 0, &probe); // v3 source, v2 destination
    for i in 0..2 {
        assert!(
            !lab.log(i).contains(V1_WARNING),
            "n{i} fell back to protocol 1:\n{}",
            lab.log(i)
        );
    }
    // The current agent says, as source and as destination, that the connection is in clear.
    let log = lab.log(1);
    assert!(
        log.contains("with the source agent is not encrypted")
            && log.contains("with the destination agent is not encrypted"),
        "n1 does not log the unencrypted protocol-2 connections:\n{log}"
    );
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
}
