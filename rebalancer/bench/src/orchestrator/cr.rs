//! Toolchains (b) plain CRIU command line and (c) runc + CRIU: start the workload, migrate it
//! between the two node namespaces by stop-and-copy (diskless: page server on the destination)
//! or post-copy (lazy pages), and clean up.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::net::{ContainerNet, DST, SRC};
use crate::sys::{self, criu_log_errors, in_netns, run, Proc, Result, StatusPipe, SysError};
use crate::{Ctx, Migration, Mode};

const CONTAINER: &str = "rbbw";
const NET_KEY: &str = "rbbnet";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Criu,
    Runc,
}

/// Per-run directories: images and work dirs on the tmpfs, logs on disk.
pub struct Dirs {
    pub src_img: PathBuf,
    pub dst_img: PathBuf,
    pub src_work: PathBuf,
    pub dst_work: PathBuf,
    pub logs: PathBuf,
}

impl Dirs {
    pub fn new(ctx: &Ctx, run_name: &str) -> Result<Dirs> {
        let base = ctx.workdir.join("run");
        let _ = std::fs::remove_dir_all(&base);
        let d = Dirs {
            src_img: base.join("src-img"),
            dst_img: base.join("dst-img"),
            src_work: base.join("src-work"),
            dst_work: base.join("dst-work"),
            logs: ctx.log_dir.join(run_name),
        };
        for p in [&d.src_img, &d.dst_img, &d.src_work, &d.dst_work, &d.logs] {
            std::fs::create_dir_all(p).map_err(sys::io(format!("create {}", p.display())))?;
        }
        Ok(d)
    }
}

/// The running workload of one run.
pub struct Workload {
    tool: Tool,
    /// The `unshare` parent for the CRIU toolchain; runc detaches.
    _parent: Option<Proc>,
    pub pid: i32,
}

fn runc(ctx: &Ctx, netns: Option<&str>, root: &Path) -> Command {
    let mut c = match netns {
        Some(n) => in_netns(n, "runc"),
        None => Command::new("runc"),
    };
    c.arg("--root").arg(root).arg("--criu").arg(&ctx.criu);
    c
}

fn runc_root(ctx: &Ctx, node: &str) -> PathBuf {
    ctx.workdir.join(format!("runc-{node}"))
}

fn bundle_dir(ctx: &Ctx, node: &str) -> PathBuf {
    ctx.workdir.join(format!("bundle-{node}"))
}

/// An OCI bundle whose root file system is bind mounts of the host's /usr and the directory
/// holding the benchmark binaries; the network namespace is given by path (external to CRIU).
pub fn write_bundle(ctx: &Ctx, node: &str, netns_path: &str, mib: u64) -> Result<PathBuf> {
    let dir = bundle_dir(ctx, node);
    let rootfs = dir.join("rootfs");
    for d in ["proc", "dev", "usr", "opt/bench", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(sys::io("create rootfs"))?;
    }
    for (l, t) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        let p = rootfs.join(l);
        if std::fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink(t, &p).map_err(sys::io("create rootfs link"))?;
        }
    }
    let config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/opt/bench/bench-workload", "--detach-stdio", "--listen", "0.0.0.0:7000",
                     "--mib", mib.to_string(),
                     "--dirty-percent-per-sec", ctx.dirty_percent_per_sec.to_string()],
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/",
            "noNewPrivileges": true,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
        },
        "root": {"path": rootfs, "readonly": true},
        "hostname": "rbb-workload",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=16m"]},
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
            {"destination": "/opt/bench", "type": "bind", "source": ctx.bins, "options": ["bind", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": netns_path}
            ],
            "cgroupsPath": format!("/rbb-bench/{node}"),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]}
        }
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| SysError::Other(e.to_string()))?;
    std::fs::write(dir.join("config.json"), text).map_err(sys::io("write config.json"))?;
    Ok(dir)
}

/// Root directory of the plain-CRIU workload. On the disk, not on a tmpfs: the root mount is
/// given back to CRIU with `--root` at restore rather than dumped.
pub fn plain_root_dir(ctx: &Ctx) -> PathBuf {
    ctx.disk_dir.join("plain-root")
}

fn plain_root(ctx: &Ctx) -> Result<PathBuf> {
    let root = plain_root_dir(ctx);
    for d in ["proc", "dev", "usr", "opt/bench", "tmp", ".oldroot"] {
        std::fs::create_dir_all(root.join(d)).map_err(sys::io("create plain root"))?;
    }
    for (l, t) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        let p = root.join(l);
        if std::fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink(t, &p).map_err(sys::io("create plain root link"))?;
        }
    }
    Ok(root)
}

/// Host pid of the child of `parent` (the workload under `unshare --fork`).
fn child_of(parent: u32, timeout: Duration) -> Result<i32> {
    let end = Instant::now() + timeout;
    loop {
        let p = format!("/proc/{parent}/task/{parent}/children");
        if let Some(pid) = std::fs::read_to_string(&p)
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        {
            return Ok(pid);
        }
        sys::check_interrupt()?;
        if Instant::now() > end {
            return Err(SysError::Other(format!(
                "no workload process under pid {parent}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn start_workload(ctx: &Ctx, tool: Tool, net: &ContainerNet, mib: u64) -> Result<Workload> {
    match tool {
        Tool::Criu => {
            // Own pid, mount, uts and ipc namespaces like a container, and a private root as
            // runc and the agent build it: a bind-mounted directory with /usr and the binaries
            // bound read-only, /proc, a small /dev tmpfs, then pivot_root. A copy of the host's
            // mount table instead would make CRIU dump (and tar the tmpfs contents of) every
            // mount the other users of this machine have at that moment.
            let root = plain_root(ctx)?;
            let script = format!(
                "set -e; R={r}; mount --bind $R $R; \
                 mount --bind /usr $R/usr; mount -o remount,bind,ro $R/usr; \
                 mount --bind {bins} $R/opt/bench; mount -o remount,bind,ro $R/opt/bench; \
                 mount -t proc proc $R/proc; \
                 mount -t tmpfs -o size=1m,mode=755 rbbdev $R/dev; mknod -m 666 $R/dev/null c 1 3; \
                 cd $R; pivot_root . .oldroot; umount -l /.oldroot; \
                 exec /opt/bench/bench-workload --detach-stdio --listen 0.0.0.0:7000 --mib {mib} --dirty-percent-per-sec {d}",
                r = root.display(),
                bins = ctx.bins.display(),
                d = ctx.dirty_percent_per_sec
            );
            let mut cmd = in_netns(&net.netns, "unshare");
            cmd.args([
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--ipc",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
            let parent = Proc::spawn("unshare workload", &mut cmd)?;
            let pid = child_of(parent.pid(), Duration::from_secs(10))?;
            Ok(Workload {
                tool,
                _parent: Some(parent),
                pid,
            })
        }
        Tool::Runc => {
            let bundle = write_bundle(ctx, SRC.name, &net.path(), mib)?;
            write_bundle(ctx, DST.name, "/run/netns/rbb-cd", mib)?;
            let root = runc_root(ctx, SRC.name);
            run(runc(ctx, None, &root)
                .args(["run", "-d", "-b"])
                .arg(&bundle)
                .arg(CONTAINER)
                .stdout(Stdio::null()))?;
            let state = run(runc(ctx, None, &root).args(["state", CONTAINER]))?;
            let pid = serde_json::from_str::<serde_json::Value>(&state)
                .ok()
                .and_then(|v| v["pid"].as_i64())
                .ok_or_else(|| SysError::Other(format!("no pid in runc state: {state}")))?;
            Ok(Workload {
                tool,
                _parent: None,
                pid: pid as i32,
            })
        }
    }
}

pub fn cleanup(ctx: &Ctx, tool: Tool) {
    if tool == Tool::Runc {
        for node in [SRC.name, DST.name] {
            let root = runc_root(ctx, node);
            let _ = run(runc(ctx, None, &root).args(["delete", "-f", CONTAINER]));
        }
    }
}

fn phase(m: &mut Migration, name: &str, since: &mut Instant) {
    let now = Instant::now();
    m.phases
        .push((name.to_string(), (now - *since).as_secs_f64() * 1000.0));
    *since = now;
}

fn fail_with_log(e: SysError, log: &Path) -> SysError {
    let errs = criu_log_errors(log);
    if errs.is_empty() {
        e
    } else {
        SysError::Other(format!("{e}; log: {errs}"))
    }
}

fn start_receiver(ctx: &Ctx, dirs: &Dirs, port: u16) -> Result<Proc> {
    let mut cmd = in_netns(
        DST.name,
        &ctx.bins.join("rebalancer-bench").to_string_lossy(),
    );
    cmd.args([
        "recv-dir",
        "--listen",
        &format!("{}:{port}", DST.ip),
        "--dir",
    ])
    .arg(&dirs.dst_img)
    .stdout(Stdio::piped());
    let mut p = Proc::spawn("recv-dir", &mut cmd)?;
    let out = p
        .child()
        .stdout
        .take()
        .ok_or_else(|| SysError::Other("recv-dir has no stdout".into()))?;
    sys::recv_line(&sys::line_reader(out), "recv-dir", Duration::from_secs(10))?;
    Ok(p)
}

fn send_images(ctx: &Ctx, dirs: &Dirs, port: u16, recv: &mut Proc) -> Result<()> {
    run(in_netns(
        SRC.name,
        &ctx.bins.join("rebalancer-bench").to_string_lossy(),
    )
    .args(["send-dir", "--to", &format!("{}:{port}", DST.ip), "--dir"])
    .arg(&dirs.src_img))?;
    recv.wait_ok(Duration::from_secs(60))
}

fn dump_cmd(
    ctx: &Ctx,
    tool: Tool,
    w: &Workload,
    src: &ContainerNet,
    dirs: &Dirs,
    mode: Mode,
    port: u16,
) -> Result<Command> {
    let mut c = match tool {
        Tool::Criu => {
            let mut c = in_netns(SRC.name, &ctx.criu.to_string_lossy());
            c.args(["dump", "-t", &w.pid.to_string(), "-D"])
                .arg(&dirs.src_img)
                .args([
                    "--tcp-established",
                    "--network-lock",
                    "nftables",
                    "-v3",
                    "-o",
                ])
                .arg(dirs.logs.join("dump.log"))
                .arg(format!("--external=net[{}]:{NET_KEY}", src.inode()?))
                .args([
                    "--external=mnt[/usr]:rbb-usr",
                    "--external=mnt[/opt/bench]:rbb-bench",
                ]);
            match mode {
                Mode::StopAndCopy => c.args([
                    "--page-server",
                    "--address",
                    DST.ip,
                    "--port",
                    &port.to_string(),
                ]),
                _ => c.args([
                    "--lazy-pages",
                    "--address",
                    SRC.ip,
                    "--port",
                    &port.to_string(),
                    "--status-fd",
                    "3",
                ]),
            };
            c
        }
        Tool::Runc => {
            let mut c = runc(ctx, Some(SRC.name), &runc_root(ctx, SRC.name));
            c.args(["checkpoint", "--image-path"])
                .arg(&dirs.src_img)
                .arg("--work-path")
                .arg(&dirs.src_work)
                .arg("--tcp-established");
            match mode {
                Mode::StopAndCopy => c.args(["--page-server", &format!("{}:{port}", DST.ip)]),
                _ => c.args([
                    "--lazy-pages",
                    "--page-server",
                    &format!("{}:{port}", SRC.ip),
                    "--status-fd",
                    "3",
                ]),
            };
            c.arg(CONTAINER);
            c
        }
    };
    c.stdin(Stdio::null()).stdout(Stdio::null());
    Ok(c)
}

fn dump_log(tool: Tool, dirs: &Dirs) -> PathBuf {
    match tool {
        Tool::Criu => dirs.logs.join("dump.log"),
        Tool::Runc => dirs.src_work.join("dump.log"),
    }
}

fn restore(ctx: &Ctx, tool: Tool, dst: &ContainerNet, dirs: &Dirs, lazy: bool) -> Result<()> {
    let (mut c, _netns_file) = match tool {
        Tool::Criu => {
            let f = File::open(dst.path()).map_err(sys::io(format!("open {}", dst.path())))?;
            let mut c = in_netns(DST.name, &ctx.criu.to_string_lossy());
            c.args(["restore", "-d", "-D"])
                .arg(&dirs.dst_img)
                .args([
                    "--tcp-established",
                    "--network-lock",
                    "nftables",
                    "-v3",
                    "-o",
                ])
                .arg(dirs.logs.join("restore.log"))
                .arg(format!("--inherit-fd=fd[3]:{NET_KEY}"))
                .arg("--root")
                .arg(plain_root_dir(ctx))
                .arg("--external=mnt[rbb-usr]:/usr")
                .arg(format!("--external=mnt[rbb-bench]:{}", ctx.bins.display()));
            if lazy {
                c.arg("--lazy-pages");
            }
            sys::with_fds(&mut c, vec![(f.as_raw_fd(), 3)]);
            (c, Some(f))
        }
        Tool::Runc => {
            let mut c = runc(ctx, Some(DST.name), &runc_root(ctx, DST.name));
            c.args(["restore", "-d", "--image-path"])
                .arg(&dirs.dst_img)
                .arg("--work-path")
                .arg(&dirs.dst_work)
                .args(["--tcp-established", "-b"])
                .arg(bundle_dir(ctx, DST.name));
            if lazy {
                c.arg("--lazy-pages");
            }
            c.arg(CONTAINER);
            (c, None)
        }
    };
    c.stdin(Stdio::null()).stdout(Stdio::null());
    let log = match tool {
        Tool::Criu => dirs.logs.join("restore.log"),
        Tool::Runc => dirs.dst_work.join("restore.log"),
    };
    // Ran as a Proc (not `run`) so that a Ctrl-C during a long restore is noticed.
    let mut p = Proc::spawn("restore", &mut c)?;
    p.wait_ok(Duration::from_secs(300))
        .map_err(|e| fail_with_log(e, &log))
}

fn remove_source_route(src: &ContainerNet) {
    sys::sh_quiet(&format!(
        "ip -n {} route del {}/32 dev {}",
        SRC.name,
        crate::net::CONTAINER_IP,
        src.veth
    ));
}

/// One migration; `port` is a free base port for the page server (+1 image copy).
pub fn migrate(
    ctx: &Ctx,
    tool: Tool,
    mode: Mode,
    w: &Workload,
    src: &ContainerNet,
    dirs: &Dirs,
    port: u16,
) -> Result<Migration> {
    debug_assert_eq!(w.tool, tool);
    let mut m = Migration::default();
    let t0 = Instant::now();
    let mut t = t0;
    let dst = ContainerNet::create("rbb-cd", DST, "rbbv-d")?;
    let mut recv = start_receiver(ctx, dirs, port + 1)?;
    match mode {
        Mode::StopAndCopy => {
            let status = StatusPipe::new()?;
            let mut ps_cmd = in_netns(DST.name, &ctx.criu.to_string_lossy());
            ps_cmd
                .args(["page-server", "-D"])
                .arg(&dirs.dst_img)
                .args([
                    "--address",
                    DST.ip,
                    "--port",
                    &port.to_string(),
                    "--status-fd",
                    "3",
                    "-v3",
                    "-o",
                ])
                .arg(dirs.logs.join("page-server.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            sys::with_fds(&mut ps_cmd, vec![(status.raw(), 3)]);
            let mut ps = Proc::spawn("criu page-server", &mut ps_cmd)?;
            status.wait("criu page-server", &mut ps, Duration::from_secs(10))?;
            phase(&mut m, "prepare", &mut t);
            let freeze = Instant::now();
            let mut dump =
                Proc::spawn("dump", &mut dump_cmd(ctx, tool, w, src, dirs, mode, port)?)?;
            dump.wait_ok(Duration::from_secs(300))
                .map_err(|e| fail_with_log(e, &dump_log(tool, dirs)))?;
            ps.wait_ok(Duration::from_secs(30))
                .map_err(|e| fail_with_log(e, &dirs.logs.join("page-server.log")))?;
            phase(&mut m, "dump", &mut t);
            send_images(ctx, dirs, port + 1, &mut recv)?;
            phase(&mut m, "copy", &mut t);
            remove_source_route(src);
            restore(ctx, tool, &dst, dirs, false)?;
            phase(&mut m, "restore", &mut t);
            // Only now: a packet reaching the new namespace before its socket exists gets a RST.
            dst.route_add()?;
            let mut arp = dst.announce()?;
            phase(&mut m, "net-switch", &mut t);
            m.resumed_ms = Some(freeze.elapsed().as_secs_f64() * 1000.0);
            src.delete();
            phase(&mut m, "cleanup", &mut t);
            m.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
            arp.wait_ok(Duration::from_secs(5))?;
        }
        Mode::PostCopy => {
            phase(&mut m, "prepare", &mut t);
            let freeze = Instant::now();
            let status = StatusPipe::new()?;
            let mut dc = dump_cmd(ctx, tool, w, src, dirs, mode, port)?;
            sys::with_fds(&mut dc, vec![(status.raw(), 3)]);
            let mut dump = Proc::spawn("dump --lazy-pages", &mut dc)?;
            status
                .wait("dump --lazy-pages", &mut dump, Duration::from_secs(120))
                .map_err(|e| fail_with_log(e, &dump_log(tool, dirs)))?;
            phase(&mut m, "dump", &mut t);
            send_images(ctx, dirs, port + 1, &mut recv)?;
            phase(&mut m, "copy", &mut t);
            let mut lc = in_netns(DST.name, &ctx.criu.to_string_lossy());
            // The restore looks for the daemon's socket in its work directory.
            let work = match tool {
                Tool::Criu => &dirs.dst_img,
                Tool::Runc => &dirs.dst_work,
            };
            lc.args([
                "lazy-pages",
                "--page-server",
                "--address",
                SRC.ip,
                "--port",
                &port.to_string(),
                "-D",
            ])
            .arg(&dirs.dst_img)
            .arg("-W")
            .arg(work)
            .args(["-v3", "-o"])
            .arg(dirs.logs.join("lazy-pages.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
            let mut lazy = Proc::spawn("criu lazy-pages", &mut lc)?;
            let sock = work.join("lazy-pages.socket");
            let end = Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                sys::check_interrupt()?;
                if lazy.try_wait().is_some() || Instant::now() > end {
                    return Err(fail_with_log(
                        SysError::Other("criu lazy-pages did not start".into()),
                        &dirs.logs.join("lazy-pages.log"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            phase(&mut m, "lazy-daemon", &mut t);
            remove_source_route(src);
            restore(ctx, tool, &dst, dirs, true)?;
            phase(&mut m, "restore", &mut t);
            dst.route_add()?;
            let mut arp = dst.announce()?;
            phase(&mut m, "net-switch", &mut t);
            m.resumed_ms = Some(freeze.elapsed().as_secs_f64() * 1000.0);
            lazy.wait_ok(Duration::from_secs(600))
                .map_err(|e| fail_with_log(e, &dirs.logs.join("lazy-pages.log")))?;
            dump.wait_ok(Duration::from_secs(60))
                .map_err(|e| fail_with_log(e, &dump_log(tool, dirs)))?;
            phase(&mut m, "lazy-transfer", &mut t);
            src.delete();
            phase(&mut m, "cleanup", &mut t);
            m.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
            arp.wait_ok(Duration::from_secs(5))?;
        }
        Mode::PreCopy => return Err(SysError::Other("pre-copy is not driven here".into())),
    }
    m.breakdown = criu_marks(tool, dirs);
    Ok(m)
}

/// CRIU's own timestamps in the dump and restore logs (ms since that CRIU started).
fn criu_marks(tool: Tool, dirs: &Dirs) -> Vec<(String, f64)> {
    use rebalancer_bench::breakdown::{criu_dump_marks, criu_restore_marks};
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let restore_log = match tool {
        Tool::Criu => dirs.logs.join("restore.log"),
        Tool::Runc => dirs.dst_work.join("restore.log"),
    };
    let mut out = criu_dump_marks("dump", &read(dump_log(tool, dirs)));
    out.extend(criu_restore_marks("restore", &read(restore_log)));
    out
}
