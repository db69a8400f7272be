//! Samples the extra memory a migration takes on the source and on the destination node while
//! it runs (see `rebalancer_bench::memory` for what is counted).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rebalancer_bench::memory::{private_rss_bytes, PeakRise};

/// Between two samples: often enough for a page server's or restore's life of 100+ ms, rare
/// enough that walking /proc does not load the shared cores.
const EVERY: Duration = Duration::from_millis(20);

/// One node: its network namespace and the directories its migration writes.
pub struct NodeDirs {
    pub netns: &'static str,
    pub dirs: Vec<PathBuf>,
}

pub struct MemSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<[Option<u64>; 2]>,
}

fn netns_inode(name: &str) -> Option<u64> {
    std::fs::metadata(format!("/run/netns/{name}"))
        .ok()
        .map(|m| m.ino())
}

/// Bytes held by the files under `dir` (allocated blocks), without crossing into another file
/// system (a container root's bind mounts are not the migration's).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let dev = top.dev();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Private memory of the processes in each of the network namespaces `inos`, in one pass over
/// /proc, counting only processes of the node's own pid namespace `pid_ns`: the workload runs
/// in a pid namespace of its own, and the tree a `criu restore` builds is in it from its first
/// moment, so the restored copy (the workload itself, not extra memory) is never counted, even
/// before it joins the container's network namespace.
fn ns_rss(inos: &[Option<u64>; 2], pid_ns: Option<u64>) -> [u64; 2] {
    let mut total = [0, 0];
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return total;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let Some(i) = inos.iter().position(|n| *n == Some(m.ino())) else {
            continue;
        };
        let same_pid_ns = std::fs::metadata(format!("/proc/{pid}/ns/pid"))
            .ok()
            .map(|m| m.ino());
        if pid_ns.is_some() && same_pid_ns != pid_ns {
            continue;
        }
        if let Some(b) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| private_rss_bytes(&s))
        {
            total[i] += b;
        }
    }
    total
}

impl MemSampler {
    /// Starts sampling `[source, destination]`; the first sample is each node's baseline.
    pub fn start(nodes: [NodeDirs; 2]) -> MemSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let inos = nodes.each_ref().map(|n| netns_inode(n.netns));
            // The agents and CRIU helpers run in the benchmark's own pid namespace.
            let pid_ns = std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino());
            let mut peaks = [PeakRise::default(), PeakRise::default()];
            loop {
                let done = s2.load(Ordering::Relaxed);
                let rss = ns_rss(&inos, pid_ns);
                for (i, n) in nodes.iter().enumerate() {
                    if inos[i].is_none() {
                        continue;
                    }
                    let files: u64 = n.dirs.iter().map(|d| dir_bytes(d)).sum();
                    peaks[i].add(rss[i] + files);
                }
                if done {
                    break;
                }
                std::thread::sleep(EVERY);
            }
            peaks.map(|p| p.rise())
        });
        MemSampler { stop, thread }
    }

    /// Stops after one last sample: `[source, destination]` in MiB.
    pub fn stop(self) -> [Option<f64>; 2] {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or([None, None])
            .map(|b| b.map(|b| b as f64 / 1048576.0))
    }
}
