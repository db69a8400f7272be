//! Issue #6, on this machine's kernel (no CONFIG_MEM_SOFT_DIRTY): the agent's real start-up
//! probe must leave pre-copy out and say why, an explicit pre-copy request must be refused
//! naming the kernel option, and `auto` must pick post-copy with its reason recorded.
//! (The control-socket path of the refusal is covered by rebalancer-agent's
//! `tests/bad_requests.rs`.)

use std::path::Path;

use rebalancer_agent::migrate::choose_mode;
use rebalancer_proto::MigrationMode;

#[test]
#[ignore = "needs root and CRIU 4.2 (criu check); .ci/run runs it with --include-ignored"]
fn without_soft_dirty_precopy_is_refused_and_auto_takes_post_copy() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let caps = rt.block_on(rebalancer_agent::caps::probe(
        "host",
        Path::new("/usr/local/sbin/criu"),
    ));
    eprintln!("capabilities: {caps:?}");
    if caps.dirty_tracking {
        eprintln!("this kernel has soft-dirty tracking: nothing to check here");
        return;
    }
    assert!(!caps.modes.contains(&MigrationMode::PreCopy), "{caps:?}");
    assert!(
        caps.notes
            .iter()
            .any(|n| n.contains("CONFIG_MEM_SOFT_DIRTY")),
        "no note names the kernel option: {:?}",
        caps.notes
    );
    // The destination may well have soft-dirty: the source's kernel alone decides.
    let remote = [
        MigrationMode::StopAndCopy,
        MigrationMode::PostCopy,
        MigrationMode::PreCopy,
        MigrationMode::Auto,
    ];
    let e = choose_mode(
        MigrationMode::PreCopy,
        512 << 20,
        None,
        &caps.modes,
        &remote,
    )
    .expect_err("pre-copy must be refused");
    let msg = e.to_string();
    assert!(msg.contains("CONFIG_MEM_SOFT_DIRTY"), "{msg}");
    assert!(caps.uffd, "post-copy needs userfaultfd here: {caps:?}");
    let (mode, why) = choose_mode(
        MigrationMode::Auto,
        512 << 20,
        Some(100),
        &caps.modes,
        &remote,
    )
    .expect("auto");
    eprintln!("pre-copy refused: {msg}\nauto: {mode} ({why})");
    assert_eq!(mode, MigrationMode::PostCopy, "{why}");
    assert!(why.starts_with("auto: post-copy"), "{why}");
}
