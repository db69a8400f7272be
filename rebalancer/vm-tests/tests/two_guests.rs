//! Issue #13 item 5, "two real kernels": two qemu guests, each with its own Debian 6.1 kernel,
//! memory, munged and agent, on a tap bridge in a network namespace of the host, where this
//! test's TCP client runs. Guest 0 runs a counter server in a container; the client sends a
//! request every 10 ms and checks every reply in sequence; guest 0 asks its agent to migrate
//! the container to guest 1 (stop-and-copy), then guest 1 asks its own to bring it back
//! (post-copy). The agents talk over the bridge (peer protocol, munge-authenticated), the
//! container's address moves with it (the destination announces it with gratuitous ARP).
//! The host types each step on the guest's serial console (`pair::GuestCommand`); the guest
//! acts only through its agent's control socket, the role a controller plays.
//!
//! Asserts what can be observed: both migrations succeed, the client's counter never skips or
//! repeats and it keeps getting answers after each move, the workload process runs in the
//! destination kernel and not in the source, the destination's agent lists the container, and
//! the host's neighbour entry for the container's address is the destination guest's MAC.
//! Timings are printed, never asserted (docs/two-kernels.md records them).
//!
//! Knobs: `VM_CACHE`, `VM_KERNEL`, `VM_AGENT_BIN` (as `precopy_vm.rs`); `VM2_MEM_MIB`
//! (container size, 32), `VM2_GUEST_MIB` (guest RAM, 512), `VM2_MODES` (comma-separated
//! modes, alternating direction; default `stop-and-copy,post-copy`), `VM2_AUTH` (`munge`
//! or `none`), `VM2_ENCRYPT=1` (the agents' `encrypt_memory`, off by default).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rebalancer_proto::{
    ContainerInfo, ContainerState, MigrationMode, MigrationRecord, MigrationState,
};
use rebalancer_vm_tests::guest::{self, Guest, ImageSpec, QemuSpec};
use rebalancer_vm_tests::pair::{self, Auth, GuestCommand, Identity};
use rebalancer_vm_tests::probe::Probe;
use rebalancer_vm_tests::report::{self, GuestEvent, ProbeReport};

/// Budget of one guest's boot up to its agent answering (TCG on a loaded 2-core host).
const BOOT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Budget of one step (a migration included).
const STEP_TIMEOUT: Duration = Duration::from_secs(15 * 60);

fn sh(cmd: &str) {
    guest::run(Command::new("sh").arg("-c").arg(cmd)).unwrap_or_else(|e| panic!("{e}"));
}

/// The host side of the lab network: a namespace with the bridge and one tap per guest.
/// Dropping it removes the namespace (and the taps and bridge with it).
struct HostNet;

impl HostNet {
    fn create() -> HostNet {
        let ns = pair::HOST_NETNS;
        let br = pair::BRIDGE;
        // A namespace left by an interrupted run (under the lock, nobody else uses it).
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
        sh(&format!(
            "ip netns add {ns} && ip -n {ns} link set lo up && \
             ip -n {ns} link add {br} type bridge && \
             ip -n {ns} addr add {host}/{p} dev {br} && ip -n {ns} link set {br} up && \
             ip -n {ns} route add {sub} dev {br}",
            host = pair::HOST_IP,
            p = pair::PREFIX,
            sub = pair::CONTAINER_SUBNET,
        ));
        for k in 0..pair::NODES.len() {
            let t = pair::tap(k);
            sh(&format!(
                "ip -n {ns} tuntap add dev {t} mode tap && ip -n {ns} link set {t} master {br} && \
                 ip -n {ns} link set {t} up"
            ));
        }
        HostNet
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", pair::HOST_NETNS))
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        let ns = pair::HOST_NETNS;
        for k in 0..pair::NODES.len() {
            let _ = Command::new("ip")
                .args(["-n", ns, "link", "del", &pair::tap(k)])
                .status();
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
}

/// The MAC the host's namespace has for the container's address (the guest that answers ARP
/// for it, or announced it).
fn neighbour_mac() -> Option<String> {
    let out = guest::run(Command::new("ip").args([
        "-n",
        pair::HOST_NETNS,
        "neigh",
        "show",
        &pair::CONTAINER_IP.to_string(),
        "dev",
        pair::BRIDGE,
    ]))
    .ok()?;
    let mut w = out.split_whitespace();
    w.find(|x| *x == "lladdr")?;
    w.next().map(str::to_string)
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The next event of `g` that `want` takes, with the time since qemu started at which the
/// guest printed it; fails the test on a guest-reported failure or a timeout.
fn expect_event_at<T>(
    g: &Guest,
    what: &str,
    timeout: Duration,
    mut want: impl FnMut(GuestEvent) -> Option<T>,
) -> (Duration, T) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match g.next_event(left) {
            Some((_, GuestEvent::Done { ok: false, error })) => {
                panic!("{}: failed while waiting for {what}: {error:?}", g.label)
            }
            Some((_, GuestEvent::Log { message })) => eprintln!("{} log| {message}", g.label),
            Some((at, e)) => {
                if let Some(v) = want(e) {
                    return (at, v);
                }
            }
            None => panic!(
                "{}: no {what} within {}s (console above)",
                g.label,
                timeout.as_secs()
            ),
        }
    }
}

fn expect_event<T>(
    g: &Guest,
    what: &str,
    timeout: Duration,
    want: impl FnMut(GuestEvent) -> Option<T>,
) -> T {
    expect_event_at(g, what, timeout, want).1
}

fn node_state(g: &mut Guest) -> (String, Vec<ContainerInfo>, Vec<i32>) {
    g.send(&GuestCommand::Report.line()).expect("send report");
    expect_event(g, "its node state", STEP_TIMEOUT, |e| match e {
        GuestEvent::NodeState {
            node,
            containers,
            workload_pids,
        } => Some((node, containers, workload_pids)),
        _ => None,
    })
}

/// The container is live on `on` (its agent lists it running, its kernel runs the workload)
/// and absent from `off` (no live container of that id, no workload process).
fn assert_runs_only_on(guests: &mut [Guest], on: usize, off: usize, after: &str) {
    let (node, containers, pids) = node_state(&mut guests[on]);
    eprintln!("after {after}: {node} lists {containers:?}, workload pids {pids:?}");
    assert!(
        containers
            .iter()
            .any(|c| c.id.as_str() == pair::CONTAINER_ID && c.state == ContainerState::Running),
        "after {after}: {node}'s agent does not list {} running: {containers:?}",
        pair::CONTAINER_ID
    );
    assert!(
        !pids.is_empty(),
        "after {after}: no workload process in {node}'s kernel"
    );
    let (node, containers, pids) = node_state(&mut guests[off]);
    eprintln!("after {after}: {node} lists {containers:?}, workload pids {pids:?}");
    assert!(
        pids.is_empty(),
        "after {after}: the workload still runs in {node}'s kernel: {pids:?}"
    );
    assert!(
        !containers
            .iter()
            .any(|c| c.id.as_str() == pair::CONTAINER_ID && c.state.is_live()),
        "after {after}: {node}'s agent still has {} live: {containers:?}",
        pair::CONTAINER_ID
    );
}

fn figures(label: &str, rec: &MigrationRecord, probe: &ProbeReport) -> String {
    format!(
        "{label}: {:?} mode={:?} rss={} KiB downtime={:?}ms frozen={:?}ms total={:?}ms \
         bytes={} pages written={} lazy={}\n  phases: {}\n  client: {} replies, largest gap {} ms, \
         errors {:?}",
        rec.state,
        rec.mode,
        rec.stats.rss_bytes >> 10,
        rec.stats.downtime_ms,
        rec.stats.frozen_ms,
        rec.stats.total_ms,
        rec.stats.bytes_sent,
        rec.stats.pages_written,
        rec.stats.pages_lazy,
        report::phases(rec),
        probe.requests,
        probe.max_gap_ms,
        probe.errors
    )
}

#[test]
#[ignore = "boots two Debian kernels under qemu (TCG, about 2 minutes), needs root and a tap \
            bridge; .ci/run runs it"]
fn a_tcp_server_moves_between_two_kernels_and_its_client_misses_no_reply() {
    let t0 = Instant::now();
    let mem_mib: u64 = env_or("VM2_MEM_MIB", 32);
    let guest_mib: u32 = env_or("VM2_GUEST_MIB", 512);
    let auth = match std::env::var("VM2_AUTH").as_deref() {
        Ok("none") => Auth::None,
        _ => Auth::Munge,
    };
    let encrypt_memory = std::env::var("VM2_ENCRYPT").is_ok_and(|v| v == "1");
    let modes: Vec<MigrationMode> = std::env::var("VM2_MODES")
        .unwrap_or_else(|_| "stop-and-copy,post-copy".into())
        .split(',')
        .map(|m| {
            serde_json::from_value(serde_json::Value::String(m.trim().into()))
                .unwrap_or_else(|_| panic!("VM2_MODES: {m:?} is not a migration mode"))
        })
        .collect();

    let kernel = guest::debian_kernel(&guest::cache_dir()).expect("Debian kernel");
    let agent = guest::agent_binary(&std::env::current_exe().expect("test exe")).expect("agent");
    let work = std::env::temp_dir().join(format!("rebalancer-vm2-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    // One key for both guests' munged, made for this run.
    let mut key = vec![0u8; 1024];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .expect("munge key from /dev/urandom");
    let initrd = guest::build_initramfs(
        &ImageSpec {
            kernel: &kernel,
            agent: &agent,
            vm_guest: Path::new(env!("CARGO_BIN_EXE_vm-guest")),
            extra_modules: &["virtio_pci", "virtio_net"],
            run: "/usr/bin/vm-guest node",
            munge_key: (auth == Auth::Munge).then_some(key.as_slice()),
        },
        &work,
    )
    .expect("initramfs");
    let prepared = t0.elapsed();
    eprintln!(
        "{}, prepared in {:.1}s",
        guest::image_summary(&kernel, &initrd),
        prepared.as_secs_f64()
    );

    let net = HostNet::create();
    let mut guests: Vec<Guest> = (0..pair::NODES.len())
        .map(|k| {
            Guest::spawn(QemuSpec {
                label: format!("g{k}"),
                vmlinuz: &kernel.vmlinuz,
                initrd: &initrd,
                mem_mib: guest_mib,
                cpus: 1,
                cmdline: Identity {
                    index: k,
                    auth,
                    encrypt_memory,
                }
                .cmdline(),
                tap: Some((pair::tap(k), pair::mac(k))),
                netns: Some(net.path()),
            })
            .expect("start qemu")
        })
        .collect();
    let mut boot = Vec::new();
    for g in &guests {
        let (at, (node, uptime, how)) =
            expect_event_at(g, "its agent up", BOOT_TIMEOUT, |e| match e {
                GuestEvent::NodeUp {
                    node,
                    uptime_s,
                    auth,
                } => Some((node, uptime_s, auth)),
                _ => None,
            });
        boot.push((node, at, uptime, how));
    }
    let booted = t0.elapsed();

    guests[0]
        .send(&GuestCommand::Create { mem_mib }.line())
        .expect("send create");
    let created = expect_event(&guests[0], "the container", STEP_TIMEOUT, |e| match e {
        GuestEvent::Created { container } => Some(container),
        _ => None,
    });
    eprintln!("container on {}: {created:?}", pair::NODES[0]);
    let probe = Probe::start(Some(&net.path()), pair::container_addr());
    assert!(
        probe.advance(20, Duration::from_secs(120)),
        "the host's client got no answers from {}: {:?}",
        pair::container_addr(),
        probe.take().errors
    );

    let mut results = Vec::new();
    let mut at = 0usize;
    for (i, mode) in modes.iter().enumerate() {
        let to = 1 - at;
        let label = format!("{}-{}", i + 1, pair::mode_name(*mode));
        // A few seconds of traffic before each move, and the figures of this move only.
        probe.advance(100, Duration::from_secs(60));
        probe.take();
        let started = Instant::now();
        guests[at]
            .send(
                &GuestCommand::Migrate {
                    destination: pair::NODES[to].into(),
                    mode: *mode,
                    label: label.clone(),
                }
                .line(),
            )
            .expect("send migrate");
        let record = expect_event(
            &guests[at],
            "the migration's end",
            STEP_TIMEOUT,
            |e| match e {
                GuestEvent::Migrated { label: l, record } if l == label => Some(*record),
                _ => None,
            },
        );
        let wall = started.elapsed();
        assert_eq!(
            record.state,
            MigrationState::Succeeded,
            "{label}: {:?}",
            record.error
        );
        assert_eq!(record.mode, Some(*mode), "{label}");
        // The client reaches the container on its new kernel.
        let resumed = probe.advance(50, Duration::from_secs(120));
        let seen = probe.take();
        eprintln!(
            "{}\n  wall clock (host) {:.1}s",
            figures(&label, &record, &seen),
            wall.as_secs_f64()
        );
        assert!(
            resumed && seen.errors.is_empty(),
            "{label}: the client lost the server or a reply: {seen:?}"
        );
        assert_runs_only_on(&mut guests, to, at, &label);
        // The address moved with it: the host reaches it at the destination guest's NIC.
        let mac = neighbour_mac();
        eprintln!(
            "after {label}: host neighbour {} lladdr {mac:?}",
            pair::CONTAINER_IP
        );
        assert_eq!(
            mac.as_deref(),
            Some(pair::mac(to).as_str()),
            "after {label}: the host does not reach {} at {}'s NIC",
            pair::CONTAINER_IP,
            pair::NODES[to]
        );
        results.push((label, record, seen, wall));
        at = to;
    }
    let total_replies = probe.answered();
    drop(probe);

    for g in &mut guests {
        g.send(&GuestCommand::Exit.line()).expect("send exit");
    }
    for g in guests {
        let label = g.label.clone();
        let console = g.wait(Duration::from_secs(120));
        assert!(
            report::parse(&console)
                .iter()
                .any(|e| matches!(e, GuestEvent::Done { ok: true, .. })),
            "{label} did not end cleanly"
        );
    }
    drop(net);
    let _ = std::fs::remove_dir_all(&work);

    eprintln!(
        "\n== two kernels: figures (container {mem_mib} MiB, guests {guest_mib} MiB, \
         encrypt_memory {encrypt_memory}) =="
    );
    eprintln!(
        "prepare (kernel, agent build, initramfs) {:.1}s; both guests up {:.1}s after start",
        prepared.as_secs_f64(),
        (booted - prepared).as_secs_f64()
    );
    for (node, host, uptime, how) in &boot {
        eprintln!(
            "boot {node}: agent up {:.1}s after qemu started (guest uptime {uptime:.1}s), auth {how}",
            host.as_secs_f64()
        );
    }
    eprintln!("migration | downtime ms | frozen ms | total ms | bytes | client largest gap ms | client errors | wall s");
    for (label, r, p, wall) in &results {
        eprintln!(
            "{label} | {:?} | {:?} | {:?} | {} | {} | {} | {:.1}",
            r.stats.downtime_ms,
            r.stats.frozen_ms,
            r.stats.total_ms,
            r.stats.bytes_sent,
            p.max_gap_ms,
            p.errors.len(),
            wall.as_secs_f64()
        );
    }
    eprintln!(
        "client: {total_replies} replies in sequence, none lost or repeated; whole test {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
