//! Issue #6, on this machine's kernel (no CONFIG_MEM_SOFT_DIRTY): the agent's real start-up
//! probe must leave pre-copy out and say why, an explicit pre-copy request must be refused
//! naming the kernel option, and `auto` must pick post-copy with its reason recorded.
//! (The control-socket path of the refusal is covered by rebalancer-agent's
//! `tests/bad_requests.rs`.) The probe's answer is checked against the kernel itself (the
//! soft-dirty bit of a page this test writes), and a kernel with soft-dirty has its own checks:
//! pre-copy offered and accepted.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use rebalancer_agent::migrate::{choose_mode, ModeModel};
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
    let kernel_tracks = kernel_marks_written_pages_soft_dirty();
    assert_eq!(
        caps.dirty_tracking, kernel_tracks,
        "the probe and the kernel's pagemap disagree on soft-dirty tracking: {caps:?}"
    );
    if kernel_tracks {
        with_soft_dirty_precopy_is_offered_and_accepted(&caps);
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
        &ModeModel::default(),
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
        &ModeModel::default(),
    )
    .expect("auto");
    eprintln!("pre-copy refused: {msg}\nauto: {mode} ({why})");
    assert_eq!(mode, MigrationMode::PostCopy, "{why}");
    assert!(why.starts_with("auto: post-copy"), "{why}");
}

/// The other branch: a kernel that tracks dirty pages must offer pre-copy, say nothing about
/// the kernel option, and accept an explicit pre-copy request between two such nodes.
fn with_soft_dirty_precopy_is_offered_and_accepted(caps: &rebalancer_proto::NodeCapabilities) {
    assert!(caps.modes.contains(&MigrationMode::PreCopy), "{caps:?}");
    assert!(
        !caps
            .notes
            .iter()
            .any(|n| n.contains("CONFIG_MEM_SOFT_DIRTY")),
        "a kernel with soft-dirty is said to lack it: {:?}",
        caps.notes
    );
    let (mode, why) = choose_mode(
        MigrationMode::PreCopy,
        512 << 20,
        None,
        &caps.modes,
        &caps.modes,
        &ModeModel::default(),
    )
    .expect("pre-copy between two soft-dirty nodes");
    assert_eq!(mode, MigrationMode::PreCopy, "{why}");
}

/// Whether the kernel sets the soft-dirty bit (bit 55 of /proc/self/pagemap) of a page after
/// the bits were cleared (`clear_refs` 4) and the page written. Without CONFIG_MEM_SOFT_DIRTY the
/// bit is always 0. Independent of CRIU, so it checks the agent's probe.
fn kernel_marks_written_pages_soft_dirty() -> bool {
    const PAGE: usize = 4096;
    let mut buf = vec![0u8; 2 * PAGE];
    let addr = (buf.as_ptr() as usize).next_multiple_of(PAGE);
    let off = addr - buf.as_ptr() as usize;
    // Without soft-dirty the write may be refused or ignored; the pagemap read decides.
    let _ = std::fs::write("/proc/self/clear_refs", "4");
    buf[off] = 1;
    std::hint::black_box(&mut buf);
    let mut pm = std::fs::File::open("/proc/self/pagemap").expect("open pagemap");
    pm.seek(SeekFrom::Start((addr / PAGE * 8) as u64))
        .expect("seek pagemap");
    let mut e = [0u8; 8];
    pm.read_exact(&mut e).expect("read pagemap");
    let entry = u64::from_le_bytes(e);
    assert!(
        entry & (1 << 63) != 0,
        "the written page is not present: {entry:#x}"
    );
    entry & (1 << 55) != 0
}
