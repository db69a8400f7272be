//! Hosts isolated like machines, on top of a [`NetLab`](crate::NetLab)'s network namespaces:
//! each host also gets its own mount and UTS namespace (its hostname is its name), a fresh
//! tmpfs on /run, its own /var/lib/rebalancer (backed by a directory the test names, so that
//! the test can read what an agent stores) and its own munged on `/run/munge/munge.sock` with
//! the lab's key, as slurm-tests/cluster.sh builds its Slurm hosts. What a real cluster shares
//! stays shared: the OS image and the rest of the file system (the lab directory plays the
//! shared file system: configs, logs).
//!
//! The mount and UTS namespaces persist as bind mounts of their ns files under `ns_dir` (as
//! `ip netns` keeps network namespaces) and are entered with nsenter ([`Hosts::command`]).
//! Dropping [`Hosts`] kills every process in them (and in the container namespaces agents made
//! in their private /run/netns), then removes them; an earlier run's leftovers go first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{must, sh};

/// The private state directory of a host (the agent's default `state_dir`).
pub const HOST_STATE: &str = "/var/lib/rebalancer";
/// Each host's own munged socket.
pub const HOST_MUNGE: &str = "/run/munge/munge.sock";

/// One host: its name (hostname), network namespace and the backing dir of its state.
#[derive(Debug, Clone)]
pub struct HostPlan {
    pub name: String,
    pub netns: String,
    /// Mounted on [`HOST_STATE`] inside the host.
    pub state: PathBuf,
}

/// The built hosts. Dropping them tears them down.
#[derive(Debug)]
pub struct Hosts {
    ns_dir: PathBuf,
    hosts: Vec<HostPlan>,
}

impl Hosts {
    /// Builds every host of `plan` (their network namespaces exist already), with ns files
    /// under `ns_dir` and a munged per host that reads `munge_key`.
    pub fn up(ns_dir: &Path, munge_key: &Path, plan: Vec<HostPlan>) -> Hosts {
        Hosts::clean(ns_dir);
        std::fs::create_dir_all(ns_dir).expect("ns dir");
        std::fs::create_dir_all(HOST_STATE).expect("mount point for the hosts' state");
        // Bind mounts of ns files need a private parent mount (see unshare(1) --mount).
        let n = ns_dir.display();
        must(&format!("mount --bind {n} {n} && mount --make-private {n}"));
        let hosts = Hosts {
            ns_dir: ns_dir.to_path_buf(),
            hosts: plan,
        };
        for h in &hosts.hosts {
            std::fs::create_dir_all(&h.state).expect("host state dir");
            let (mnt, uts) = hosts.ns_files(&h.name);
            std::fs::write(&mnt, "").expect("mnt file");
            std::fs::write(&uts, "").expect("uts file");
            // Copies of ns-file mounts (the other hosts', /run/netns/*) would pin those
            // namespaces as long as this one lives: unmount them in the copy.
            let script = format!(
                "set -e; hostname {name}; \
                 awk '{{for (i = 7; i <= NF; i++) if ($i == \"-\") {{ if ($(i + 1) == \"nsfs\") print $5; break }}}}' \
                 /proc/self/mountinfo | sort -r | while read -r m; do umount -l \"$m\" 2>/dev/null || true; done; \
                 mount -t tmpfs -o mode=0755,size=256m rbl-run /run; \
                 mkdir -p /run/munge /run/netns /run/rebalancer; \
                 mount --bind {state} {HOST_STATE}",
                name = h.name,
                state = h.state.display()
            );
            let o = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", h.netns))
                .arg("unshare")
                .arg(format!("--mount={}", mnt.display()))
                .arg(format!("--uts={}", uts.display()))
                .args(["--propagation", "private", "sh", "-c", &script])
                .output()
                .expect("unshare");
            assert!(
                o.status.success(),
                "setting up host {}: {}",
                h.name,
                String::from_utf8_lossy(&o.stderr)
            );
            hosts.start_munged(&h.name, munge_key);
        }
        hosts
    }

    fn ns_files(&self, host: &str) -> (PathBuf, PathBuf) {
        (
            self.ns_dir.join(format!("{host}.mnt")),
            self.ns_dir.join(format!("{host}.uts")),
        )
    }

    fn plan(&self, host: &str) -> &HostPlan {
        self.hosts
            .iter()
            .find(|h| h.name == host)
            .unwrap_or_else(|| panic!("no host {host} in this lab"))
    }

    /// A command that runs PROGRAM on HOST (its network, mount and UTS namespaces). nsenter
    /// execs PROGRAM, so the child's pid is PROGRAM's.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let h = self.plan(host);
        let (mnt, uts) = self.ns_files(host);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", h.netns))
            .arg(format!("--mount={}", mnt.display()))
            .arg(format!("--uts={}", uts.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `sh -c SCRIPT` on HOST.
    pub fn sh(&self, host: &str, script: &str) -> std::process::Output {
        self.command(host, "sh")
            .args(["-c", script])
            .output()
            .expect("nsenter")
    }

    fn start_munged(&self, host: &str, key: &Path) {
        let o = self.sh(
            host,
            &format!(
                "munged --force -S {HOST_MUNGE} --key-file={} --pid-file=/run/munge/munged.pid \
                 --log-file=/run/munge/munged.log --seed-file=/run/munge/munged.seed",
                key.display()
            ),
        );
        assert!(
            o.status.success(),
            "munged on {host}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self
            .sh(host, &format!("test -S {HOST_MUNGE}"))
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "munged on {host} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        Hosts::clean(&self.ns_dir);
    }
}

impl Hosts {
    /// Kills every process in the hosts' mount namespaces under `ns_dir` (and in the container
    /// network namespaces listed in their private /run/netns), then unmounts the ns files: what
    /// dropping them does, for an earlier run's leftovers.
    pub fn clean(ns_dir: &Path) {
        let Ok(rd) = std::fs::read_dir(ns_dir) else {
            return;
        };
        let files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        let mut inodes = Vec::new();
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "mnt"))
        {
            let fd = f.display();
            if !sh(&format!("mountpoint -q {fd}")).status.success() {
                continue;
            }
            let _ = sh(&format!(
                "nsenter --mount={fd} sh -c 'for n in $(ls /run/netns 2>/dev/null); do \
             ip netns pids \"$n\" 2>/dev/null | xargs -r kill -9; done' 2>/dev/null"
            ));
            if let Ok(o) = std::fs::metadata(f) {
                use std::os::unix::fs::MetadataExt;
                inodes.push(o.ino());
            }
        }
        if !inodes.is_empty() {
            let me = std::process::id();
            if let Ok(rd) = std::fs::read_dir("/proc") {
                for e in rd.flatten() {
                    let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                        continue;
                    };
                    let Ok(link) = std::fs::read_link(e.path().join("ns/mnt")) else {
                        continue;
                    };
                    let link = link.to_string_lossy().into_owned();
                    let ino = link
                        .trim_start_matches("mnt:[")
                        .trim_end_matches(']')
                        .parse::<u64>()
                        .ok();
                    if pid as u32 != me && ino.is_some_and(|i| inodes.contains(&i)) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        for f in &files {
            let _ = nix::mount::umount2(f, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = nix::mount::umount2(ns_dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(ns_dir);
    }
}
