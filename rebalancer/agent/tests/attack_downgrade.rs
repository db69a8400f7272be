//! Issue #11: downgrade by rewriting the hellos. A man in the middle between two current
//! agents (a proxy in the source node's namespace, so the destination still sees the source's
//! address) rewrites the peer hellos so that they agree on an older peer protocol. Both ends
//! must refuse before anything is frozen: the source when the destination's signed range says
//! a better version was possible, the destination when the source's credential names its nonce
//! as rewritten. The same proxy, rewriting nothing, passes the migration.

mod common;
#[path = "common/rewrite_proxy.rs"]
mod rewrite_proxy;

use common::*;
use rebalancer_proto::*;
use rewrite_proxy::{rewriting_proxy, strip_range, unchanged, From, Rewrite};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// One stop-and-copy of `id` from n0 to n1 through a proxy applying `rewrite`; the outcome as
/// text (`Ok` with the state, or the error) and how many hellos the proxy saw.
fn migrate_through(
    lab: &Lab,
    id: &str,
    rewrite: Rewrite,
) -> (Result<MigrationState, String>, usize) {
    let dest = format!("{}:{}", lab.nodes[1].ip, lab.nodes[1].port);
    let (port, hellos) = rewriting_proxy(Some(&lab.nodes[0].netns), &dest, rewrite);
    let req = Request::Migrate {
        request: MigrateRequest {
            container: id.into(),
            destination: lab.nodes[1].name.clone(),
            destination_addr: Some(format!("127.0.0.1:{port}")),
            mode: MigrationMode::StopAndCopy,
            max_downtime_ms: None,
            timeout_ms: None,
        },
        watch: true,
    };
    let out = match lab.client(0).call(&req) {
        Ok(Reply::Migration { migration }) if migration.state == MigrationState::Succeeded => {
            Ok(migration.state)
        }
        Ok(Reply::Migration { migration }) => Err(format!("{:?}", migration.error)),
        Ok(other) => Err(format!("unexpected {other:?}")),
        Err(e) => Err(e.to_string()),
    };
    (out, hellos.load(Ordering::SeqCst))
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn rewritten_peer_hellos_are_refused_by_both_agents() {
    let lab = Lab::with_config(13, 2, vec![String::new(), String::new()]);
    let addr = "198.19.29.40";
    lab.client(0)
        .call(&Request::CreateContainer {
            spec: server_spec("dg1", addr, 0),
        })
        .expect("create");
    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(10, Duration::from_secs(60)),
        "no answers\n{}",
        lab.log(0)
    );

    // 1. The source's range rewritten to 1..=2: the destination agrees to 2 and states 1..=4
    //    in its nonce, so the source sees that 4 was possible.
    let lower: Rewrite = Arc::new(|side, h: &mut Hello| {
        if side == From::Client {
            *h = h.clone().with_versions(VersionRange::new(1, 2));
        }
    });
    let (out, n) = migrate_through(&lab, "dg1", lower.clone());
    println!("source range rewritten: {out:?} ({n} hellos)");
    let e = out.expect_err("a migration over rewritten hellos");
    assert!(
        e.contains("downgrade") && e.contains("instead of 4"),
        "{e}\n{}",
        lab.log(0)
    );
    assert_eq!(n, 2, "the proxy did not see both hellos");

    // 2. Also the destination's nonce stripped of its range, so that it looks like an agent
    //    of protocol 2: the source accepts that, but its credential names the stripped nonce,
    //    and the destination refuses it.
    let strip: Rewrite = Arc::new(move |side, h: &mut Hello| {
        lower(side, h);
        if side == From::Server {
            h.nonce = h.nonce.as_deref().map(strip_range);
        }
    });
    let (out, _) = migrate_through(&lab, "dg1", strip);
    println!("and the destination made to look old: {out:?}");
    let e = out.expect_err("a migration with the destination made to look old");
    assert!(e.contains("downgrade"), "{e}\n{}", lab.log(1));
    assert!(
        lab.log(1).contains("protocol downgrade"),
        "the destination did not refuse:\n{}",
        lab.log(1)
    );
    // Nothing was frozen: the container still answers on the source.
    assert!(
        probe.advance(10, Duration::from_secs(10)),
        "the client stalled"
    );
    assert_eq!(
        lab.client(0).container("dg1").expect("still on n0").state,
        ContainerState::Running
    );

    // 3. The same proxy, changing nothing: the move succeeds (protocol 4, encrypted).
    let (out, n) = migrate_through(&lab, "dg1", unchanged());
    assert_eq!(
        out,
        Ok(MigrationState::Succeeded),
        "{}\n{}",
        lab.log(0),
        lab.log(1)
    );
    assert_eq!(n, 2);
    assert!(
        probe.advance(10, Duration::from_secs(10)),
        "client stalled after the move"
    );
}
