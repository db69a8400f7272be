//! Simulated migrations through peer protocol 4's lazy-page link and the destination's room
//! checks (announced image sizes, other arrivals' reservations).

use super::*;

/// Peer protocol 4 links the lazy pages' connection before the freeze; a destination of
/// protocol 3 gets CRIU's listener as before. Both commit.
#[tokio::test]
async fn post_copy_links_its_page_connection_with_a_version_4_peer_only() {
    for (b_cfg, linked) in [("", true), ("peer_protocol = [1, 3]", false)] {
        let (a, b) = pair_configured("link", false, "", b_cfg);
        let rec = migrate(&a, &b, MigrationMode::PostCopy)
            .await
            .expect("preflight");
        let log = format!(
            "{b_cfg:?}
source: {:?}
destination: {:?}",
            a.host.state().log,
            b.host.state().log
        );
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{:?}
{log}",
            rec.error
        );
        let dlog = b.host.state().log.clone();
        assert!(
            dlog.iter()
                .any(|l| *l == format!("lazy-pages linked={linked}")),
            "{log}"
        );
        // The link is made while the tree still runs: before the dump freezes it.
        let slog = a.host.state().log.clone();
        let at = |what: &str| slog.iter().position(|l| l == what);
        let dump = at("dump-lazy").expect("the source dumped");
        match at("lazy-link") {
            Some(link) => assert!(linked && link < dump, "{log}"),
            None => assert!(!linked, "{log}"),
        }
    }
}

/// Announced image sizes the destination cannot hold are refused before any is received, the
/// source resumes, and no reservation outlives an arrival.
#[tokio::test]
async fn images_that_cannot_fit_are_refused_before_receiving_and_reservations_end() {
    for mode in MODES {
        let (a, b) = pair("room");
        // The sim writes one small image file: no byte of room for it.
        b.host.set_room(64 << 30, 0);
        let rec = migrate(&a, &b, mode).await.expect("preflight");
        let log = format!("{mode}: {:?}", rec.error);
        assert_eq!(rec.state, MigrationState::RolledBack, "{log}");
        assert!(
            rec.error
                .as_deref()
                .is_some_and(|e| e.contains("image tmpfs has 0 bytes free")
                    || e.contains("more than the 0 bytes free")),
            "{log}"
        );
        assert_rolled_back(&a, &b, &log);
        assert!(b.agent.reserved().is_empty(), "reservation left: {log}");
    }
    // Memory other arrivals reserved is not this one's: refused at prepare, naming them.
    let (a, b) = pair("room2");
    b.host.set_room(2 << 30, 32 << 30);
    b.agent.reserved().insert("other".into(), 1900 << 20);
    let e = migrate(&a, &b, MigrationMode::PostCopy)
        .await
        .expect_err("no room left by the other arrival");
    assert!(e.contains("reserved by 1 other incoming migration"), "{e}");
    assert_eq!(source_state(&a), ContainerState::Running);
    b.agent.reserved().remove("other");
    let rec = migrate(&a, &b, MigrationMode::PostCopy)
        .await
        .expect("room once the other arrival ended");
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    assert!(
        b.agent.reserved().is_empty(),
        "reservation outlived the commit"
    );
}
