//! The munge credential payloads' text is a wire format too (downgrade protection added
//! `offer=` and ranged nonces): today's code writes the frozen bytes from the same fields and
//! accepts an earlier release's payload (see `fixtures/README.md`, `auth/`).

use std::path::Path;

use rebalancer_proto::auth::{AuthError, Binding, Expect, CONTROL_DOMAIN, PEER_DOMAIN};
use rebalancer_proto::VersionRange;

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn expect<'a>(
    domain: &'static str,
    to: &'a str,
    nonce: &'a str,
    session: Option<&'a str>,
    offer: VersionRange,
) -> Expect<'a> {
    Expect {
        domain,
        uids: &[0],
        from: None,
        to,
        nonce,
        session,
        offer: Some(offer),
    }
}

#[test]
fn todays_payloads_keep_their_bytes_and_pass_their_checks() {
    let nonce = "5f0c3a9e2b7d41c8a6e19f04b3d25c77.v1-2";
    let tls = "00ff".repeat(16);
    let control = Binding {
        domain: CONTROL_DOMAIN,
        from: "admin".into(),
        to: "node1".into(),
        nonce: nonce.into(),
        session: Some(tls.clone()),
        offer: Some(VersionRange::new(1, 2)),
    };
    let frozen = fixture("control-payload-v2-offer.txt");
    assert_eq!(control.payload().expect("payload"), frozen);
    let e = expect(
        CONTROL_DOMAIN,
        "node1",
        nonce,
        Some(&tls),
        VersionRange::new(1, 2),
    );
    assert_eq!(e.check(0, &frozen).expect("accepted"), "admin");
    // The hello arrived stating another range: a downgrade.
    let e = expect(
        CONTROL_DOMAIN,
        "node1",
        nonce,
        Some(&tls),
        VersionRange::new(1, 1),
    );
    assert!(matches!(e.check(0, &frozen), Err(AuthError::Downgrade(_))));

    let nonce = "9a1b2c3d4e5f60718293a4b5c6d7e8f9.v1-4";
    let tls = "11aa".repeat(16);
    let peer = Binding {
        domain: PEER_DOMAIN,
        from: "node0".into(),
        to: "node1".into(),
        nonce: nonce.into(),
        session: Some(tls.clone()),
        offer: Some(VersionRange::new(1, 4)),
    };
    let frozen = fixture("peer-payload-v3-offer.txt");
    assert_eq!(peer.payload().expect("payload"), frozen);
    let e = expect(
        PEER_DOMAIN,
        "node1",
        nonce,
        Some(&tls),
        VersionRange::new(1, 4),
    );
    assert_eq!(e.check(0, &frozen).expect("accepted"), "node0");
}

#[test]
fn an_earlier_releases_payload_still_passes() {
    let old = fixture("control-payload-v1-earlier.txt");
    // It answered the plain nonce an agent of its time sent.
    let e = Expect {
        domain: CONTROL_DOMAIN,
        uids: &[0],
        from: None,
        to: "node1",
        nonce: "5f0c3a9e2b7d41c8a6e19f04b3d25c77",
        session: None,
        offer: Some(VersionRange::new(1, 1)),
    };
    assert_eq!(e.check(0, &old).expect("accepted"), "admin");
    // Against today's ranged nonce with the same random part it is a stripped nonce.
    let mut e = e;
    e.nonce = "5f0c3a9e2b7d41c8a6e19f04b3d25c77.v1-2";
    assert!(matches!(e.check(0, &old), Err(AuthError::Downgrade(_))));
}
