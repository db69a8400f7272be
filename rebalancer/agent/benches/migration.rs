//! Migration benchmark: downtime, largest client gap, total time and bytes per RSS and mode,
//! measured through the real agents (lab block [rbb]: nodes 198.18.32.0/24, containers
//! 198.19.32.0/20), next to plain CRIU driven by hand on the same container kind.
//!
//! Run as root: `cargo bench -p rebalancer-agent --bench migration` (or with `-- 64,256` to pick
//! sizes in MiB; `RB_BENCH_TEST_BLOCK=15` to use agent-test block 15 instead of [rbb]). Prints a
//! Markdown table.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use rebalancer_proto::*;

struct Row {
    size: u64,
    tool: &'static str,
    mode: &'static str,
    downtime_ms: Option<u64>,
    gap: Duration,
    total_ms: Option<u64>,
    bytes: Option<u64>,
    note: String,
}

fn agent_case(lab: &Lab, size: u64, mode: MigrationMode, n: usize) -> Row {
    let id = format!("b{size}{}", n);
    let addr = lab_addr(lab, n);
    let mut c0 = lab.client(0);
    c0.call(&Request::CreateContainer {
        spec: server_spec(&id, &addr, size),
    })
    .expect("create");
    let probe = TcpProbe::start(&lab.client_ns, &addr);
    let warm = Duration::from_secs(30 + size / 64);
    assert!(probe.advance(50, warm), "container {id} never answered");
    probe.reset_gap();
    let started = Instant::now();
    let r = c0.migrate(&id, &lab.nodes[1].name, mode);
    let wall = started.elapsed();
    let ok = probe.advance(50, Duration::from_secs(30));
    let gap = probe.stats.lock().map(|s| s.max_gap).unwrap_or_default();
    let stats = probe.stop();
    let _ = lab.client(1).call(&Request::KillContainer {
        id: id.clone(),
        signal: 9,
    });
    let _ = lab.client(0).call(&Request::KillContainer {
        id: id.clone(),
        signal: 9,
    });
    std::thread::sleep(Duration::from_millis(500));
    match r {
        Ok(rec) => Row {
            size,
            tool: "agent",
            mode: mode.as_str(),
            downtime_ms: rec.stats.downtime_ms,
            gap,
            total_ms: rec.stats.total_ms.or(Some(wall.as_millis() as u64)),
            bytes: Some(rec.stats.bytes_sent),
            note: if ok && stats.errors.is_empty() {
                String::new()
            } else {
                format!("client: {:?}", stats.errors)
            },
        },
        Err(e) => Row {
            size,
            tool: "agent",
            mode: mode.as_str(),
            downtime_ms: None,
            gap,
            total_ms: None,
            bytes: None,
            note: format!("failed: {e}"),
        },
    }
}

/// Container address number `n` of the lab's subnet.
fn lab_addr(lab: &Lab, n: usize) -> String {
    let base: std::net::Ipv4Addr = lab
        .subnet
        .split('/')
        .next()
        .and_then(|b| b.parse().ok())
        .expect("subnet");
    std::net::Ipv4Addr::from(u32::from(base) + 10 + n as u32).to_string()
}

fn sh(cmd: &str) -> String {
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("sh");
    assert!(
        o.status.success(),
        "`{cmd}`: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The FIELD-NOTES procedure by hand: `criu page-server` in the destination node, `criu dump`
/// (tree killed after the dump), images copied, netns recreated with the same address, `criu
/// restore`, route switch and one gratuitous ARP. Same container kind as the agent's.
fn plain_criu_case(lab: &Lab, size: u64, n: usize) -> Row {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let id = format!("p{size}{n}");
    let addr = lab_addr(lab, n);
    let mut c0 = lab.client(0);
    let info = match c0.call(&Request::CreateContainer {
        spec: server_spec(&id, &addr, size),
    }) {
        Ok(Reply::Container { container }) => container,
        other => panic!("create: {other:?}"),
    };
    let pid = info.pid.expect("pid");
    let probe = TcpProbe::start(&lab.client_ns, &addr);
    assert!(
        probe.advance(50, Duration::from_secs(30 + size / 64)),
        "container {id} never answered"
    );
    let (n0, n1) = (&lab.nodes[0], &lab.nodes[1]);
    let d = lab.dir.join(format!("plain-{id}"));
    let (src, dst) = (d.join("src"), d.join("dst"));
    sh(&format!("rm -rf {0} && mkdir -p {1} {2} && mount -t tmpfs tmpfs {0}/src 2>/dev/null; mkdir -p {1} {2}", d.display(), src.display(), dst.display()));
    let keys: Vec<String> = (0..3)
        .map(|f| {
            std::fs::read_link(format!("/proc/{pid}/fd/{f}"))
                .expect("fd")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let netns = std::fs::read_dir("/run/netns")
        .expect("netns")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with(&format!("rb-{}-{id}-", n0.name)))
        .expect("container netns");
    let ino = std::fs::metadata(format!("/run/netns/{netns}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("ino");
    // A copy of the root skeleton (mountpoints and links only): the agent removes its own when
    // it reaps the dumped pid 1.
    let root = d.join("root");
    sh(&format!(
        "cp -a {} {}",
        lab.dir
            .join(format!("{}/run/containers/{id}/root", n0.name))
            .display(),
        root.display()
    ));
    let port = 27000 + n as u16;
    let mut ps = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n1.netns))
        .args(["/usr/local/sbin/criu", "page-server", "-D"])
        .arg(&dst)
        .args([
            "--address",
            &n1.ip,
            "--port",
            &port.to_string(),
            "-o",
            "ps.log",
        ])
        .spawn()
        .expect("page server");
    std::thread::sleep(Duration::from_millis(300));
    probe.reset_gap();
    let t0 = Instant::now();
    let ext = "--external mnt[/usr]:rb-usr --external mnt[/etc]:rb-etc --external mnt[/opt]:rb-opt";
    sh(&format!(
        "cd {s} && /usr/local/sbin/criu dump -t {pid} -D {s} -o dump.log --tcp-established --network-lock nftables --external net[{ino}]:rb-net {ext} --page-server --address {ip} --port {port} --leave-stopped",
        s = src.display(),
        ip = n1.ip
    ));
    let _ = ps.wait();
    // Stopped rather than killed by criu: the agent reaps its pid 1 and would race criu's detach.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    sh(&format!(
        "cp {}/*.img {}/ 2>/dev/null; cp {}/pstree.img {}/ 2>/dev/null; true",
        src.display(),
        dst.display(),
        src.display(),
        dst.display()
    ));
    let new_ns = format!("rb-{}-{id}-plain", n1.name);
    let veth = format!("rbp{n}");
    sh(&format!(
        "ip netns add {new_ns} && ip netns exec {n1ns} ip link add {veth} type veth peer name eth0 netns {new_ns} && \
         ip -n {new_ns} addr add {addr}/32 dev eth0 && ip -n {new_ns} link set eth0 up && ip -n {new_ns} link set lo up && \
         ip -n {new_ns} route add default dev eth0 && ip -n {n1ns} link set {veth} up && \
         ip netns exec {n1ns} sh -c 'echo 1 > /proc/sys/net/ipv4/conf/{veth}/proxy_arp'",
        n1ns = n1.netns
    ));
    let net = std::fs::File::open(format!("/run/netns/{new_ns}")).expect("netns");
    let (r0, w0) = nix::unistd::pipe().expect("pipe");
    drop(w0);
    let (r1, w1) = nix::unistd::pipe().expect("pipe");
    let (r2, w2) = nix::unistd::pipe().expect("pipe");
    let fds = [
        net.as_raw_fd(),
        r0.as_raw_fd(),
        w1.as_raw_fd(),
        w2.as_raw_fd(),
    ];
    let mut cmd = std::process::Command::new("/usr/local/sbin/criu");
    cmd.current_dir(&dst)
        .args(["restore", "-D"])
        .arg(&dst)
        .args(["-o", "restore.log", "--root"])
        .arg(&root);
    cmd.args([
        "--tcp-established",
        "--network-lock",
        "nftables",
        "--restore-detached",
    ]);
    for (k, h) in [("rb-usr", "/usr"), ("rb-etc", "/etc"), ("rb-opt", "/opt")] {
        cmd.arg("--external").arg(format!("mnt[{k}]:{h}"));
    }
    cmd.arg("--inherit-fd")
        .arg(format!("fd[{}]:rb-net", fds[0]));
    for (fd, key) in fds[1..].iter().zip(&keys) {
        cmd.arg("--inherit-fd").arg(format!("fd[{fd}]:{key}"));
    }
    // SAFETY: only fcntl between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for fd in fds {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
            Ok(())
        });
    }
    let st = cmd.status().expect("restore");
    sh(&format!(
        "ip -n {n0ns} route del {addr}/32 2>/dev/null; ip -n {n1ns} route replace {addr}/32 dev {veth}",
        n0ns = n0.netns,
        n1ns = n1.netns
    ));
    let ns1 = format!("/run/netns/{}", n1.netns);
    let ip: std::net::Ipv4Addr = addr.parse().expect("addr");
    std::thread::spawn(move || {
        let f = std::fs::File::open(ns1).expect("node netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        rebalancer_agent::garp::announce("eth0", ip, 1, Duration::ZERO).expect("gratuitous ARP");
    })
    .join()
    .expect("garp thread");
    let downtime = t0.elapsed();
    let ok = st.success() && probe.advance(50, Duration::from_secs(30));
    let gap = probe.stats.lock().map(|s| s.max_gap).unwrap_or_default();
    let stats = probe.stop();
    drop((r1, r2));
    let pages: u64 = std::fs::read_dir(&dst)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let others: u64 = std::fs::read_dir(&src)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let _ = sh(&format!("ip netns pids {new_ns} | xargs -r kill -9; ip netns del {new_ns}; umount {0}/src; rm -rf {0}", d.display()));
    std::thread::sleep(Duration::from_millis(300));
    Row {
        size,
        tool: "criu CLI",
        mode: "stop-and-copy",
        downtime_ms: Some(downtime.as_millis() as u64),
        gap,
        total_ms: Some(downtime.as_millis() as u64),
        bytes: Some(pages + others),
        note: if ok && stats.errors.is_empty() {
            "by hand, no rollback".into()
        } else {
            format!("restore {st}; client {:?}", stats.errors)
        },
    }
}

fn main() {
    // `cargo test --all-targets` runs bench binaries too: measure only under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("migration benchmark: skipped (run it with `cargo bench -p rebalancer-agent --bench migration`)");
        return;
    }
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| vec![64, 256, 1024, 2048]);
    // RB_BENCH_TEST_BLOCK=K runs in agent-test block K (198.18.(16+K).0/24) instead of [rbb],
    // for when someone else uses the benchmark block.
    let lab = match std::env::var("RB_BENCH_TEST_BLOCK")
        .ok()
        .and_then(|k| k.parse::<u8>().ok())
    {
        Some(k) => Lab::new(k, 2),
        None => Lab::build("rbb", 0, 32, "198.19.32.0/20", 2),
    };
    let mut rows = Vec::new();
    let mut n = 0;
    for &size in &sizes {
        for mode in [MigrationMode::StopAndCopy, MigrationMode::PostCopy] {
            n += 1;
            eprintln!("bench: {size} MiB {mode} ...");
            let row = agent_case(&lab, size, mode, n);
            eprintln!(
                "bench: {size} MiB {mode}: downtime {:?} ms, gap {:?}, total {:?} ms, bytes {:?} {}",
                row.downtime_ms, row.gap, row.total_ms, row.bytes, row.note
            );
            rows.push(row);
        }
        n += 1;
        eprintln!("bench: {size} MiB plain criu ...");
        let row = plain_criu_case(&lab, size, n);
        eprintln!(
            "bench: {size} MiB plain criu: downtime {:?} ms, gap {:?} {}",
            row.downtime_ms, row.gap, row.note
        );
        rows.push(row);
    }
    println!("| RSS MiB | tool | mode | downtime ms (freeze→resume) | largest client gap ms | total ms | bytes on the wire | note |");
    println!("|---:|---|---|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.size,
            r.tool,
            r.mode,
            r.downtime_ms.map(|v| v.to_string()).unwrap_or("-".into()),
            r.gap.as_millis(),
            r.total_ms.map(|v| v.to_string()).unwrap_or("-".into()),
            r.bytes.map(|v| v.to_string()).unwrap_or("-".into()),
            r.note
        );
    }
}
