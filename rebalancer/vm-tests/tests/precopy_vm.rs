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

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rebalancer_proto::{MigrationMode, MigrationRecord, MigrationState};
use rebalancer_vm_tests::cpio::Initramfs;
use rebalancer_vm_tests::kmod;
use rebalancer_vm_tests::report::{self, GuestEvent};

/// Loaded in this order with their dependencies: the lab's links, CRIU's nftables network
/// lock, and the sock_diag modules CRIU dumps sockets with.
const MODULES: &[&str] = &[
    "veth",
    "bridge",
    "nf_tables",
    "nft_ct",
    "nf_conntrack_netlink",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "raw_diag",
    "unix_diag",
    "netlink_diag",
    "af_packet_diag",
    "tun",
];

const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// `/init`: stage 1 copies the initramfs into a tmpfs and switches to it (pivot_root, which
/// the agent's containers and CRIU's restore use, does not work on the initramfs itself);
/// stage 2 mounts the usual file systems, loads the modules and runs the scenario.
const INIT: &str = r#"#!/bb/busybox sh
B=/bb/busybox
if [ ! -e /.stage2 ]; then
  $B mkdir -p /proc /newroot
  $B mount -t tmpfs -o size=1g,mode=755 tmpfs /newroot
  for e in /*; do
    case "$e" in /proc|/newroot) ;; *) $B cp -a "$e" /newroot/ ;; esac
  done
  $B mkdir -p /newroot/proc
  $B touch /newroot/.stage2
  exec $B switch_root /newroot /init
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/bb
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
$B mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
$B mount -t devpts devpts /dev/pts
$B mount -t tmpfs tmpfs /run
$B mount -t tmpfs tmpfs /tmp
$B mount -t cgroup2 cgroup2 /sys/fs/cgroup
$B --install -s /bb
for m in /modules/*.ko; do
  insmod "$m" || echo "@@vmtest-warn insmod $m failed"
done
echo 8388608 > /proc/sys/fs/pipe-max-size
/usr/bin/ip link set lo up
echo "@@vmtest-boot $(cut -d' ' -f1 /proc/uptime)"
/usr/bin/vm-guest scenario /usr/local/bin/rebalancer-agent __MEM__ __DIRTY__
echo "@@vmtest-exit $?"
sync
poweroff -f
"#;

fn run(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Debian 12's current 6.1 kernel package, downloaded and unpacked once into the cache.
/// Returns (vmlinuz, lib/modules/<version>).
fn debian_kernel(cache: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(cache).expect("cache dir");
    let meta = std::env::var("VM_KERNEL").unwrap_or_else(|_| "linux-image-amd64".into());
    let deps = run(Command::new("apt-cache").args(["depends", &meta]));
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .unwrap_or_else(|| panic!("{meta} does not depend on a kernel image:\n{deps}"))
        .to_string();
    let root = cache.join(&pkg);
    if !root.join("boot").is_dir() {
        let has_deb = |c: &Path| {
            std::fs::read_dir(c).ok().and_then(|rd| {
                rd.flatten().map(|e| e.path()).find(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb")
                })
            })
        };
        let deb = match has_deb(cache) {
            Some(d) => d,
            None => {
                run(Command::new("apt-get")
                    .args(["download", &pkg])
                    .current_dir(cache));
                has_deb(cache).expect("apt-get download left no .deb")
            }
        };
        let tmp = cache.join(format!("{pkg}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp));
        std::fs::rename(&tmp, &root).expect("rename unpacked kernel");
    }
    let find = |dir: &Path, prefix: &str| {
        std::fs::read_dir(dir)
            .expect("read unpacked kernel")
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .starts_with(prefix)
            })
            .unwrap_or_else(|| panic!("no {prefix}* in {}", dir.display()))
    };
    let vmlinuz = find(&root.join("boot"), "vmlinuz-");
    let config = std::fs::read_to_string(find(&root.join("boot"), "config-")).expect("config");
    assert!(
        config.lines().any(|l| l == "CONFIG_MEM_SOFT_DIRTY=y"),
        "{pkg} lacks CONFIG_MEM_SOFT_DIRTY"
    );
    let moddir = find(&root.join("lib/modules"), "6.");
    (vmlinuz, moddir)
}

/// The workspace's agent binary, built with this test's profile into this test's target dir.
fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VM_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test exe");
    // <target>/<profile>/deps/<test>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("profile dir")
        .to_path_buf();
    let target = profile_dir.parent().expect("target dir");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(p) => p.to_string(),
        None => "dev".to_string(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    run(Command::new(cargo)
        .args([
            "build",
            "-p",
            "rebalancer-agent",
            "--bin",
            "rebalancer-agent",
            "--profile",
            &profile,
        ])
        .env("CARGO_TARGET_DIR", target)
        .current_dir(ws));
    profile_dir.join("rebalancer-agent")
}

/// Adds a stripped copy of a workspace binary (debug builds are large) and its libraries.
fn stripped(img: &mut Initramfs, bin: &Path, dest: &str, work: &Path) {
    let out = work.join(bin.file_name().expect("binary name"));
    run(Command::new("strip").arg("-o").arg(&out).arg(bin));
    img.binary(&out, dest).expect("add binary");
}

fn build_initramfs(moddir: &Path, agent: &Path, work: &Path, mem: u64, dirty: f64) -> PathBuf {
    let mut img = Initramfs::new();
    img.mirror_root_links(&["bin", "sbin", "lib", "lib64"])
        .expect("root links");
    for d in ["proc", "sys", "run", "tmp", "root", "opt", "var/tmp", "etc"] {
        img.dir(d).expect("dir");
    }
    img.char_dev("dev/console", 5, 1).expect("console");
    img.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bb/sh\n".to_vec(),
        0o644,
    )
    .expect("passwd");
    img.file("etc/group", b"root:x:0:\n".to_vec(), 0o644)
        .expect("group");
    // /bin/sh is needed too: GNU tar runs its compressor through it.
    img.host_file(Path::new("/bin/busybox"), "usr/bin/busybox")
        .expect("busybox-static (Debian package busybox-static) at /bin/busybox");
    img.symlink("usr/bin/sh", "busybox").expect("sh");
    img.symlink("bb/busybox", "../usr/bin/busybox").expect("bb");
    img.binary(Path::new("/usr/local/sbin/criu"), "usr/local/sbin/criu")
        .expect("CRIU 4.2 at /usr/local/sbin/criu (scripts/setup.sh)");
    img.binary(Path::new("/usr/bin/ip"), "usr/bin/ip")
        .expect("ip");
    img.binary(Path::new("/usr/sbin/nft"), "usr/sbin/nft")
        .expect("nft");
    // CRIU saves and restores the container's tmpfs mounts (/dev, /tmp) with GNU tar + gzip.
    img.binary(Path::new("/usr/bin/tar"), "usr/bin/tar")
        .expect("tar");
    img.binary(Path::new("/usr/bin/gzip"), "usr/bin/gzip")
        .expect("gzip");
    stripped(&mut img, agent, "usr/local/bin/rebalancer-agent", work);
    stripped(
        &mut img,
        Path::new(env!("CARGO_BIN_EXE_vm-guest")),
        "usr/bin/vm-guest",
        work,
    );
    let mods = kmod::resolve(moddir, MODULES).expect("kernel modules");
    for (i, m) in mods.into_iter().enumerate() {
        img.file(&format!("modules/{i:02}-{}.ko", m.name), m.data, 0o644)
            .expect("module");
    }
    let init = INIT
        .replace("__MEM__", &mem.to_string())
        .replace("__DIRTY__", &dirty.to_string());
    img.file("init", init.into_bytes(), 0o755).expect("init");
    let out = work.join("initramfs.cpio");
    std::fs::write(&out, img.to_newc()).expect("write initramfs");
    out
}

/// Boots the VM and returns its console output; every line is echoed as it arrives.
fn boot(vmlinuz: &Path, initrd: &Path) -> String {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "accel=tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1536",
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-nic",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 (Debian package qemu-system-x86)");
    let stdout = child.stdout.take().expect("qemu stdout");
    let started = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            eprintln!(
                "vm {:>6.1}s| {}",
                started.elapsed().as_secs_f64(),
                line.trim_end()
            );
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    loop {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    reader.join().unwrap_or_default()
}

fn rounds_table(rec: &MigrationRecord) -> String {
    let phases: Vec<String> = rec
        .phases
        .iter()
        .map(|p| format!("{}={}ms", p.phase, p.duration_ms().unwrap_or(0)))
        .collect();
    let mut s = format!("phases: {}\n", phases.join(" "));
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
    let cache = std::env::var_os("VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/rebalancer-vm-tests"));
    let (vmlinuz, moddir) = debian_kernel(&cache);
    let agent = agent_binary();
    let work = std::env::temp_dir().join(format!("rebalancer-vm-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let initrd = build_initramfs(&moddir, &agent, &work, mem, dirty);
    eprintln!(
        "kernel {}, initramfs {} MiB, prepared in {:.1}s",
        vmlinuz.display(),
        std::fs::metadata(&initrd)
            .map(|m| m.len() >> 20)
            .unwrap_or(0),
        t0.elapsed().as_secs_f64()
    );
    let console = boot(&vmlinuz, &initrd);
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
