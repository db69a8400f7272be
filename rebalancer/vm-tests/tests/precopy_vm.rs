//! Issue #6: the agent's iterative pre-copy, proven on a kernel with soft-dirty tracking.
//! This machine's kernel lacks CONFIG_MEM_SOFT_DIRTY, so the test boots Debian 12's stock
//! kernel (linux-image-amd64, 6.1, soft-dirty on) under qemu with software emulation and an
//! initramfs built from this machine's files: busybox-static, CRIU and its libraries, ip, nft,
//! the kernel modules the lab needs, the workspace's `rebalancer-agent` and `vm-guest`.
//! Inside, `vm-guest scenario` migrates a memory-dirtying container with pre-copy, then back
//! with stop-and-copy, and prints its results on the serial console (`report::GuestEvent`).
//!
//! Knobs: `VM_CACHE` (downloaded kernel, default /var/cache/rebalancer-vm-tests),
//! `VM_AGENT_BIN` (agent binary instead of building it), `VM_MEM_MIB` (container size, 256),
//! `VM_DIRTY_PCT` (% of the container's pages dirtied per second, 5).

use std::path::Path;
use std::time::{Duration, Instant};

use rebalancer_proto::{MigrationMode, MigrationRecord, MigrationState};
use rebalancer_vm_tests::guest::{self, Guest, ImageSpec, QemuSpec};
use rebalancer_vm_tests::report::{self, GuestEvent};

const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);

fn rounds_table(rec: &MigrationRecord) -> String {
    let mut s = format!("phases: {}\n", report::phases(rec));
    s.push_str("round | scanned | written | skipped (parent has them) | ms\n");
    for r in &rec.stats.rounds {
        s.push_str(&format!(
            "{:>5} | {:>7} | {:>7} | {:>25} | {}\n",
            r.round, r.pages_scanned, r.pages_written, r.pages_skipped_parent, r.duration_ms
        ));
    }
    s.push_str(&format!(
        "final | {:>7} | {:>7} | {:>25} | frozen {:?} ms, downtime {:?} ms (final skipped = scanned - written)\n",
        rec.stats.pages_scanned,
        rec.stats.pages_written,
        rec.stats
            .pages_scanned
            .saturating_sub(rec.stats.pages_written),
        rec.stats.frozen_ms,
        rec.stats.downtime_ms
    ));
    s
}

#[test]
#[ignore = "boots a Debian kernel under qemu (TCG), needs root; .ci/run runs it"]
fn precopy_converges_and_freezes_shorter_than_stop_and_copy() {
    let t0 = Instant::now();
    let env_num = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(d)
    };
    let mem = env_num("VM_MEM_MIB", 256.0) as u64;
    let dirty = env_num("VM_DIRTY_PCT", 5.0);
    let kernel = guest::debian_kernel(&guest::cache_dir()).expect("Debian kernel");
    assert!(
        kernel.has("CONFIG_MEM_SOFT_DIRTY"),
        "{} lacks CONFIG_MEM_SOFT_DIRTY",
        kernel.vmlinuz.display()
    );
    let agent = guest::agent_binary(&std::env::current_exe().expect("test exe")).expect("agent");
    let work = std::env::temp_dir().join(format!("rebalancer-vm-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let run = format!("/usr/bin/vm-guest scenario /usr/local/bin/rebalancer-agent {mem} {dirty}");
    let initrd = guest::build_initramfs(
        &ImageSpec {
            kernel: &kernel,
            agent: &agent,
            vm_guest: Path::new(env!("CARGO_BIN_EXE_vm-guest")),
            extra_modules: &[],
            run: &run,
            munge_key: None,
        },
        &work,
    )
    .expect("initramfs");
    eprintln!(
        "{}, prepared in {:.1}s",
        guest::image_summary(&kernel, &initrd),
        t0.elapsed().as_secs_f64()
    );
    let console = Guest::spawn(QemuSpec {
        label: "vm".into(),
        vmlinuz: &kernel.vmlinuz,
        initrd: &initrd,
        mem_mib: 1536,
        cpus: 2,
        cmdline: String::new(),
        tap: None,
        netns: None,
    })
    .expect("start qemu")
    .wait(VM_TIMEOUT);
    let _ = std::fs::remove_dir_all(&work);
    let events = report::parse(&console);
    eprintln!("VM finished after {:.1}s", t0.elapsed().as_secs_f64());

    match events.iter().find_map(|e| match e {
        GuestEvent::Done { ok, error } => Some((*ok, error.clone())),
        _ => None,
    }) {
        Some((true, _)) => {}
        Some((false, err)) => panic!("scenario failed in the VM: {err:?}"),
        None => panic!("the VM printed no result (boot failure or timeout); console above"),
    }
    let caps = events
        .iter()
        .find_map(|e| match e {
            GuestEvent::Capabilities { capabilities } => Some(capabilities.clone()),
            _ => None,
        })
        .expect("capabilities");
    assert!(
        caps.dirty_tracking && caps.modes.contains(&MigrationMode::PreCopy),
        "the 6.1 kernel should offer pre-copy: {caps:?}"
    );
    let mig = |label: &str| {
        events
            .iter()
            .find_map(|e| match e {
                GuestEvent::Migration {
                    label: l,
                    record,
                    probe,
                } if l == label => Some((record.as_ref().clone(), probe.clone())),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no {label} result"))
    };
    let (pre, pre_probe) = mig("pre-copy");
    let (stop, stop_probe) = mig("stop-and-copy");
    for (label, rec, probe) in [
        ("pre-copy", &pre, &pre_probe),
        ("stop-and-copy", &stop, &stop_probe),
    ] {
        eprintln!(
            "{label}: state={:?} rss={} pages ({} MiB) downtime={:?}ms frozen={:?}ms total={:?}ms bytes={} reason={:?}\n  client: {} requests, largest gap {} ms, errors {:?}\n{}",
            rec.state,
            rec.stats.rss_bytes / 4096,
            rec.stats.rss_bytes >> 20,
            rec.stats.downtime_ms,
            rec.stats.frozen_ms,
            rec.stats.total_ms,
            rec.stats.bytes_sent,
            rec.mode_reason,
            probe.requests,
            probe.max_gap_ms,
            probe.errors,
            rounds_table(rec)
        );
        assert_eq!(
            rec.state,
            MigrationState::Succeeded,
            "{label}: {:?}",
            rec.error
        );
    }
    assert_eq!(pre.mode, Some(MigrationMode::PreCopy));
    assert_eq!(stop.mode, Some(MigrationMode::StopAndCopy));
    let rss_pages = pre.stats.rss_bytes / 4096;
    assert!(rss_pages >= (mem << 20) / 4096, "RSS {rss_pages} pages");
    // Round 0 copied the whole container while it ran.
    let r0 = pre
        .stats
        .rounds
        .first()
        .expect("at least one pre-dump round");
    assert!(
        r0.pages_written >= rss_pages * 9 / 10,
        "round 0 wrote {} of {rss_pages} pages",
        r0.pages_written
    );
    assert!(pre.stats.rounds.len() >= 2, "{:?}", pre.stats.rounds);
    // The final (frozen) dump moved only what was dirtied since the last round (measured: about
    // 7% of the RSS at 5%/s; the margin absorbs a slower host, the emulated guest then spends
    // more of its own time per round).
    assert!(
        pre.stats.pages_written * 100 <= rss_pages * 15,
        "final pre-copy dump wrote {} pages, RSS is {rss_pages} pages",
        pre.stats.pages_written
    );
    assert!(
        stop.stats.pages_written >= rss_pages * 9 / 10,
        "stop-and-copy wrote only {} pages",
        stop.stats.pages_written
    );
    let (pd, sd) = (
        pre.stats.downtime_ms.expect("pre-copy downtime"),
        stop.stats.downtime_ms.expect("stop-and-copy downtime"),
    );
    // The frozen dump is where pre-copy saves time; restore (longer with a parent chain)
    // narrows the gap in the whole downtime.
    let dump_ms = |r: &MigrationRecord| {
        r.phases
            .iter()
            .find(|p| p.phase == rebalancer_proto::Phase::Dump)
            .and_then(|p| p.duration_ms())
            .expect("dump phase")
    };
    let (pdump, sdump) = (dump_ms(&pre), dump_ms(&stop));
    assert!(
        pdump < sdump,
        "pre-copy's frozen dump took {pdump} ms, stop-and-copy's {sdump} ms"
    );
    // Freeze-to-resume also contains the restore, which reads the parent chain and is 0.3-1.6 s
    // slower under emulation; it was shorter in 4 of 5 measured runs (docs/precopy.md), so it is
    // reported, not asserted: a timing comparison under TCG on a shared host is not a test.
    eprintln!(
        "freeze->resume: pre-copy {pd} ms, stop-and-copy {sd} ms ({:+.0}%)",
        (pd as f64 - sd as f64) * 100.0 / sd.max(1) as f64
    );
    assert!(
        pre_probe.errors.is_empty() && pre_probe.requests > 0,
        "client across pre-copy: {pre_probe:?}"
    );
    assert!(
        stop_probe.errors.is_empty(),
        "client across stop-and-copy: {stop_probe:?}"
    );
    eprintln!("total test time {:.1}s", t0.elapsed().as_secs_f64());
}
