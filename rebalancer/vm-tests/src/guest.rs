//! Host side of the qemu tests: Debian's kernel package (downloaded once into a cache), the
//! workspace's agent binary, the guest's initramfs (this machine's busybox, CRIU, ip, nft,
//! munge, the agent and `vm-guest`), and qemu itself with its serial console read line by
//! line. Used by `tests/precopy_vm.rs` (one guest) and `tests/two_guests.rs` (two guests on a
//! tap bridge).

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cpio::{ImageError, Initramfs};
use crate::kmod::{self, ModError};
use crate::report::{self, GuestEvent};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cannot run {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{guest}: cannot write to its serial console")]
    Serial {
        guest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Missing(String),
    #[error("building the initramfs")]
    Image(#[from] ImageError),
    #[error("resolving kernel modules")]
    Modules(#[from] ModError),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HarnessError + 'a {
    move |source| HarnessError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Runs a command to completion; its stdout on success.
pub fn run(cmd: &mut Command) -> Result<String, HarnessError> {
    let name = format!("{cmd:?}");
    let o = cmd.output().map_err(|source| HarnessError::Spawn {
        cmd: name.clone(),
        source,
    })?;
    if !o.status.success() {
        return Err(HarnessError::Failed {
            cmd: name,
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `VM_CACHE`, default `/var/cache/rebalancer-vm-tests` (scripts/setup.sh fills it).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/rebalancer-vm-tests"))
}

/// An unpacked Debian kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>`.
    pub moddir: PathBuf,
    /// The `CONFIG_*` lines of its `boot/config-*`.
    pub config: String,
}

impl Kernel {
    pub fn has(&self, option: &str) -> bool {
        self.config.lines().any(|l| l == format!("{option}=y"))
    }
}

fn find_prefixed(dir: &Path, prefix: &str) -> Result<PathBuf, HarnessError> {
    std::fs::read_dir(dir)
        .map_err(io("read unpacked kernel", dir))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .starts_with(prefix)
        })
        .ok_or_else(|| HarnessError::Missing(format!("no {prefix}* in {}", dir.display())))
}

/// The kernel package that `VM_KERNEL` (default `linux-image-amd64`, Debian 12's 6.1)
/// depends on, downloaded with apt and unpacked once into `cache`.
pub fn debian_kernel(cache: &Path) -> Result<Kernel, HarnessError> {
    std::fs::create_dir_all(cache).map_err(io("create the cache dir", cache))?;
    let meta = std::env::var("VM_KERNEL").unwrap_or_else(|_| "linux-image-amd64".into());
    let deps = run(Command::new("apt-cache").args(["depends", &meta]))?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            HarnessError::Missing(format!("{meta} does not depend on a kernel image:\n{deps}"))
        })?
        .to_string();
    let root = cache.join(&pkg);
    if !root.join("boot").is_dir() {
        let find_deb = || {
            std::fs::read_dir(cache).ok().and_then(|rd| {
                rd.flatten().map(|e| e.path()).find(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb")
                })
            })
        };
        let deb = match find_deb() {
            Some(d) => d,
            None => {
                run(Command::new("apt-get")
                    .args(["download", &pkg])
                    .current_dir(cache))?;
                find_deb().ok_or_else(|| {
                    HarnessError::Missing(format!("apt-get download {pkg} left no .deb"))
                })?
            }
        };
        let tmp = cache.join(format!("{pkg}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        std::fs::rename(&tmp, &root).map_err(io("rename the unpacked kernel", &root))?;
    }
    let boot = root.join("boot");
    let config_path = find_prefixed(&boot, "config-")?;
    Ok(Kernel {
        vmlinuz: find_prefixed(&boot, "vmlinuz-")?,
        moddir: find_prefixed(&root.join("lib/modules"), "6.")?,
        config: std::fs::read_to_string(&config_path)
            .map_err(io("read the kernel config", &config_path))?,
    })
}

/// The workspace's agent binary (`VM_AGENT_BIN`, or built with the calling test's profile into
/// its target dir).
pub fn agent_binary(test_exe: &Path) -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("VM_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    // <target>/<profile>/deps/<test>
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| HarnessError::Missing(format!("no profile dir above {test_exe:?}")))?
        .to_path_buf();
    let target = profile_dir
        .parent()
        .ok_or_else(|| HarnessError::Missing(format!("no target dir above {profile_dir:?}")))?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(p) => p.to_string(),
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
        .current_dir(ws))?;
    Ok(profile_dir.join("rebalancer-agent"))
}

/// Modules every guest loads, in this order with their dependencies: the lab's links, CRIU's
/// nftables network lock, the agent's lazy-port guard (`reject`, post-copy without TLS), and
/// the sock_diag modules CRIU dumps sockets with.
pub const LAB_MODULES: &[&str] = &[
    "veth",
    "bridge",
    "nf_tables",
    "nft_ct",
    "nf_conntrack_netlink",
    "nft_reject_ipv4",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "raw_diag",
    "unix_diag",
    "netlink_diag",
    "af_packet_diag",
    "tun",
];

/// `/init`: stage 1 copies the initramfs into a tmpfs and switches to it (pivot_root, which
/// the agent's containers and CRIU's restore use, does not work on the initramfs itself);
/// stage 2 mounts the usual file systems, loads the modules and runs `__RUN__`.
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
__RUN__
echo "@@vmtest-exit $?"
sync
poweroff -f
"#;

/// What goes into a guest's initramfs besides the common tools.
pub struct ImageSpec<'a> {
    pub kernel: &'a Kernel,
    pub agent: &'a Path,
    /// `vm-guest` (the test's `CARGO_BIN_EXE_vm-guest`).
    pub vm_guest: &'a Path,
    /// Modules beyond [`LAB_MODULES`] (a NIC driver).
    pub extra_modules: &'a [&'a str],
    /// The shell line `/init` runs once the guest is up; its exit status is printed.
    pub run: &'a str,
    /// Adds munged, munge, unmunge and this key as `/etc/munge/munge.key`.
    pub munge_key: Option<&'a [u8]>,
}

/// Adds a stripped copy of a workspace binary (debug builds are large) and its libraries.
fn stripped(img: &mut Initramfs, bin: &Path, dest: &str, work: &Path) -> Result<(), HarnessError> {
    let out = work.join(
        bin.file_name()
            .ok_or_else(|| HarnessError::Missing(format!("{bin:?} has no file name")))?,
    );
    run(Command::new("strip").arg("-o").arg(&out).arg(bin))?;
    img.binary(&out, dest)?;
    Ok(())
}

fn host_tool(img: &mut Initramfs, path: &str, hint: &str) -> Result<(), HarnessError> {
    img.binary(Path::new(path), path.trim_start_matches('/'))
        .map_err(|e| HarnessError::Missing(format!("{path} ({hint}): {e}")))
}

/// Writes the guest's initramfs into `work` and returns its path.
pub fn build_initramfs(spec: &ImageSpec<'_>, work: &Path) -> Result<PathBuf, HarnessError> {
    let mut img = Initramfs::new();
    img.mirror_root_links(&["bin", "sbin", "lib", "lib64"])?;
    for d in ["proc", "sys", "run", "tmp", "root", "opt", "var/tmp", "etc"] {
        img.dir(d)?;
    }
    img.char_dev("dev/console", 5, 1)?;
    img.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bb/sh\n".to_vec(),
        0o644,
    )?;
    img.file("etc/group", b"root:x:0:\n".to_vec(), 0o644)?;
    // /bin/sh is needed too: GNU tar runs its compressor through it.
    img.host_file(Path::new("/bin/busybox"), "usr/bin/busybox")
        .map_err(|e| {
            HarnessError::Missing(format!(
                "busybox-static (Debian package busybox-static) at /bin/busybox: {e}"
            ))
        })?;
    img.symlink("usr/bin/sh", "busybox")?;
    img.symlink("bb/busybox", "../usr/bin/busybox")?;
    host_tool(
        &mut img,
        "/usr/local/sbin/criu",
        "CRIU 4.2, scripts/setup.sh",
    )?;
    host_tool(&mut img, "/usr/bin/ip", "iproute2")?;
    host_tool(&mut img, "/usr/sbin/nft", "nftables")?;
    // CRIU saves and restores the container's tmpfs mounts (/dev, /tmp) with GNU tar + gzip.
    host_tool(&mut img, "/usr/bin/tar", "tar")?;
    host_tool(&mut img, "/usr/bin/gzip", "gzip")?;
    if let Some(key) = spec.munge_key {
        for t in ["/usr/sbin/munged", "/usr/bin/munge", "/usr/bin/unmunge"] {
            host_tool(&mut img, t, "Debian package munge")?;
        }
        img.file("etc/munge/munge.key", key.to_vec(), 0o400)?;
    }
    stripped(&mut img, spec.agent, "usr/local/bin/rebalancer-agent", work)?;
    stripped(&mut img, spec.vm_guest, "usr/bin/vm-guest", work)?;
    let names: Vec<&str> = LAB_MODULES
        .iter()
        .chain(spec.extra_modules)
        .copied()
        .collect();
    for (i, m) in kmod::resolve(&spec.kernel.moddir, &names)?
        .into_iter()
        .enumerate()
    {
        img.file(&format!("modules/{i:02}-{}.ko", m.name), m.data, 0o644)?;
    }
    img.file(
        "init",
        INIT.replace("__RUN__", spec.run).into_bytes(),
        0o755,
    )?;
    let out = work.join("initramfs.cpio");
    std::fs::write(&out, img.to_newc()).map_err(io("write the initramfs", &out))?;
    Ok(out)
}

/// "kernel PATH, initramfs N MiB", for the tests' logs.
pub fn image_summary(kernel: &Kernel, initrd: &Path) -> String {
    format!(
        "kernel {}, initramfs {} MiB",
        kernel.vmlinuz.display(),
        std::fs::metadata(initrd)
            .map(|m| m.len() >> 20)
            .unwrap_or(0)
    )
}

/// One qemu guest (software emulation).
pub struct QemuSpec<'a> {
    /// Prefix of its echoed console lines.
    pub label: String,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub mem_mib: u32,
    pub cpus: u32,
    /// Appended to the kernel command line (the guest's identity).
    pub cmdline: String,
    /// A virtio NIC on this existing tap device, with this MAC.
    pub tap: Option<(String, String)>,
    /// Network namespace (a `/run/netns/NAME` file) qemu runs in, where the tap lives.
    pub netns: Option<PathBuf>,
}

/// A running guest: its console (every line echoed to stderr with the label as it arrives)
/// and its serial input.
pub struct Guest {
    pub label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Console lines with the time since qemu started at which each arrived.
    lines: Receiver<(Duration, String)>,
    console: Arc<Mutex<String>>,
    pub started: Instant,
}

impl Guest {
    pub fn spawn(spec: QemuSpec<'_>) -> Result<Guest, HarnessError> {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "accel=tcg", "-cpu", "max"])
            .arg("-smp")
            .arg(spec.cpus.to_string())
            .arg("-m")
            .arg(spec.mem_mib.to_string())
            .args(["-display", "none", "-vga", "none", "-monitor", "none"])
            .args(["-serial", "stdio", "-no-reboot"]);
        match &spec.tap {
            Some((ifname, mac)) => {
                cmd.arg("-netdev")
                    .arg(format!("tap,id=n0,ifname={ifname},script=no,downscript=no"))
                    .arg("-device")
                    .arg(format!("virtio-net-pci,netdev=n0,mac={mac}"));
            }
            None => {
                cmd.args(["-nic", "none"]);
            }
        }
        cmd.arg("-kernel")
            .arg(spec.vmlinuz)
            .arg("-initrd")
            .arg(spec.initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off rdinit=/init {}",
                spec.cmdline
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let ns = match &spec.netns {
            Some(p) => Some(std::fs::File::open(p).map_err(io("open the netns", p))?),
            None => None,
        };
        // SAFETY: prctl(2) and setns(2) are async-signal-safe and the closure allocates
        // nothing; `ns` stays open in the parent until spawn returns. PR_SET_PDEATHSIG: a
        // test killed outright (no Drop) does not leave its guests running.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(ns) = &ns {
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            cmd: "qemu-system-x86_64 (Debian package qemu-system-x86)".into(),
            source,
        })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| HarnessError::Missing("qemu has no stdout".into()))?;
        let stdin = child.stdin.take();
        let started = Instant::now();
        let console = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = std::sync::mpsc::channel();
        let (label, all) = (spec.label.clone(), console.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end().to_string();
                eprintln!("{label} {:>6.1}s| {line}", started.elapsed().as_secs_f64());
                if let Ok(mut c) = all.lock() {
                    c.push_str(&line);
                    c.push('\n');
                }
                // Nobody may read events any more (the test waits for exit): keep echoing.
                let _ = tx.send((started.elapsed(), line));
            }
        });
        Ok(Guest {
            label: spec.label,
            child,
            stdin,
            lines,
            console,
            started,
        })
    }

    /// Sends one command line to the guest's serial console (`vm-guest node` reads it).
    pub fn send(&mut self, line: &str) -> Result<(), HarnessError> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| HarnessError::Missing(format!("{}: serial input closed", self.label)))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|source| HarnessError::Serial {
                guest: self.label.clone(),
                source,
            })
    }

    /// The next `@@vmtest` event the guest prints within `timeout`, skipping other lines, with
    /// the time since qemu started at which it was printed. `None` on timeout or when the
    /// guest's console closed (it powered off).
    pub fn next_event(&self, timeout: Duration) -> Option<(Duration, GuestEvent)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    if let Some(e) = report::parse(&line).into_iter().next() {
                        return Some((at, e));
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits until qemu exits (the guest powered off) or `timeout`, then kills it; returns the
    /// whole console output.
    pub fn wait(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        drop(self.stdin.take());
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.kill();
        // The reader thread ends with qemu's stdout; give it a moment to push the last lines.
        std::thread::sleep(Duration::from_millis(200));
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}
