//! The libslurm wrappers against a real Slurm 22.05 cluster (slurm-tests/cluster.sh: slurmctld,
//! slurmdbd and one slurmd per network namespace). One test, run in stages, because only one such
//! cluster can be up on the machine at a time.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use rebalancer_slurm::{DrainPhase, ExpandOptions, Slurm, StepId};

const STATE_DIR: &str = "/tmp/slurm-rbc-libslurm-test";
const WAIT: Duration = Duration::from_secs(30);
/// The machine-wide lock slurm-tests' cluster guards take: clusters share bridge, netns and ports.
const LOCK_PATH: &str = "/run/slurm-rbc.lock";
const LOCK_WAIT: Duration = Duration::from_secs(900);

/// Brings the harness cluster up in its own state dir; takes it down on drop (also on panic).
struct TestCluster {
    script: PathBuf,
    conf: PathBuf,
    // Dropped after `drop()` has taken the cluster down.
    _lock: File,
}

fn lock_machine() -> File {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .unwrap();
    let start = Instant::now();
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return file;
        }
        let err = std::io::Error::last_os_error();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::WouldBlock,
            "flock {LOCK_PATH}: {err}"
        );
        assert!(
            start.elapsed() < LOCK_WAIT,
            "{LOCK_PATH} held for {LOCK_WAIT:?}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

impl TestCluster {
    fn up() -> Self {
        let lock = lock_machine();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm-tests/cluster.sh");
        // The guard exists before `up` so that a failed start is cleaned up too.
        let cluster = TestCluster {
            script,
            conf: Path::new(STATE_DIR).join("slurm.conf"),
            _lock: lock,
        };
        let status = Command::new(&cluster.script)
            .args(["up", "--nodes", "3", "--state-dir", STATE_DIR])
            .status()
            .unwrap();
        assert!(status.success(), "cluster.sh up failed: {status}");
        cluster
    }

    /// Runs a Slurm command-line tool against this cluster and returns its stdout.
    fn run(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // salloc reports the job id on stderr.
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        text
    }

    /// `scontrol show KIND ID` as key=value tokens.
    fn show(&self, kind: &str, id: &str) -> Vec<String> {
        self.run("scontrol", &["show", "-o", kind, id])
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    fn field(&self, kind: &str, id: &str, key: &str) -> String {
        let prefix = format!("{key}=");
        self.show(kind, id)
            .into_iter()
            .find_map(|t| t.strip_prefix(&prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("scontrol show {kind} {id} has no {key}="))
    }

    /// `salloc --no-shell` with `args`; returns the job id.
    fn salloc(&self, args: &[&str]) -> u32 {
        let mut all = vec!["--no-shell"];
        all.extend_from_slice(args);
        let text = self.run("salloc", &all);
        text.split_whitespace()
            .skip_while(|w| *w != "allocation")
            .nth(1)
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no job id in salloc output: {text}"))
    }
}

/// cluster.sh records the state dir of the cluster that is up here.
const CURRENT: &str = "/run/slurm-rbc.current";

impl Drop for TestCluster {
    fn drop(&mut self) {
        // `down` removes the node namespaces and the bridge whoever owns them: only call it for a
        // cluster this guard started (cluster.sh up refuses, and records nothing, when another is up).
        let current = std::fs::read_to_string(CURRENT).unwrap_or_default();
        if current.trim() != STATE_DIR {
            eprintln!(
                "not taking down {:?}: it is not this test's cluster",
                current.trim()
            );
            return;
        }
        let _ = Command::new(&self.script)
            .args(["down", "--state-dir", STATE_DIR])
            .status();
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs root and the slurm-tests cluster (slurmctld, slurmdbd, MariaDB, network namespaces); .ci/run runs it with --include-ignored"]
fn libslurm_against_a_real_cluster() {
    let cluster = TestCluster::up();
    let slurm = Slurm::init(Some(&cluster.conf)).unwrap();

    nodes_are_listed(&slurm);
    drain_and_resume(&slurm, &cluster);
    batch_job_and_its_steps(&slurm, &cluster);
    expand_then_shrink(&slurm, &cluster);
}

fn nodes_are_listed(slurm: &Slurm) {
    let nodes = slurm.load_nodes().unwrap();
    let names: Vec<_> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node1", "node2", "node3"]);
    for (k, n) in nodes.iter().enumerate() {
        assert!(
            n.state.is_idle() && n.state.accepts_work(),
            "{}: {}",
            n.name,
            n.state
        );
        assert_eq!(n.state.to_string(), "IDLE");
        assert_eq!(n.cpus, 2);
        assert_eq!(n.alloc_cpus, 0);
        assert!(n.real_memory_mb > 0);
        assert_eq!(n.partitions, ["debug"]);
        assert_eq!(
            n.addr.as_deref(),
            Some(format!("198.18.0.{}", 11 + k).as_str())
        );
        assert!(n.reason.is_none());
    }
}

fn drain_and_resume(slurm: &Slurm, cluster: &TestCluster) {
    let before = slurm.load_nodes_since(0).unwrap().unwrap();
    assert!(before.last_update > 0);
    assert_eq!(slurm.load_nodes_since(before.last_update).unwrap(), None);

    slurm.drain_nodes("node3", "libslurm test drain").unwrap();
    let after = slurm.load_nodes_since(before.last_update).unwrap().unwrap();
    assert!(after.last_update >= before.last_update);
    assert!(after
        .nodes
        .iter()
        .any(|n| n.name == "node3" && n.state.is_drain()));
    assert_eq!(cluster.field("node", "node3", "State"), "IDLE+DRAIN");
    let reason = cluster.show("node", "node3").join(" ");
    assert!(reason.contains("Reason=libslurm test drain"), "{reason}");

    let node = slurm.load_node("node3").unwrap().unwrap();
    assert_eq!(node.state.drain_phase(), Some(DrainPhase::Drained));
    assert_eq!(node.state.summary(), "DRAINED");
    assert_eq!(node.reason.as_deref(), Some("libslurm test drain"));
    assert!(!node.state.accepts_work());

    slurm.resume_nodes("node3").unwrap();
    assert_eq!(cluster.field("node", "node3", "State"), "IDLE");
    assert!(slurm
        .load_node("node3")
        .unwrap()
        .unwrap()
        .state
        .drain_phase()
        .is_none());
}

fn batch_job_and_its_steps(slurm: &Slurm, cluster: &TestCluster) {
    let out = cluster.run(
        "sbatch",
        &[
            "--parsable",
            "-N1",
            "-w",
            "node1",
            "-J",
            "libslurm-steps",
            "-o",
            "/dev/null",
            "--chdir=/tmp",
            "--wrap",
            "srun sleep 300",
        ],
    );
    let job_id: u32 = out.trim().parse().unwrap();

    wait_until("the batch job to run", || {
        slurm.load_job(job_id).unwrap().state.is_running()
    });
    let job = slurm.load_job(job_id).unwrap();
    assert_eq!(job.name.as_deref(), Some("libslurm-steps"));
    assert_eq!(job.user_id, 0);
    assert_eq!(job.user_name.as_deref(), Some("root"));
    assert_eq!(job.partition.as_deref(), Some("debug"));
    assert_eq!(job.nodes.as_deref(), Some("node1"));
    assert_eq!(job.node_names, ["node1"]);
    assert_eq!(job.batch_host.as_deref(), Some("node1"));
    assert_eq!(job.num_nodes, 1);
    assert!(job.num_cpus >= 1);
    let on_node1 = slurm.jobs_on_node("node1").unwrap();
    assert!(on_node1.iter().any(|j| j.id == job_id));
    assert!(slurm
        .jobs_on_node("node2")
        .unwrap()
        .iter()
        .all(|j| j.id != job_id));
    assert!(!slurm.load_node("node1").unwrap().unwrap().state.is_idle());

    wait_until("the srun step to start", || {
        slurm
            .job_steps(job_id)
            .unwrap()
            .iter()
            .any(|s| s.step_id == StepId::Numbered(0))
    });
    let steps = slurm.job_steps(job_id).unwrap();
    let step0 = steps
        .iter()
        .find(|s| s.step_id == StepId::Numbered(0))
        .unwrap();
    assert_eq!(step0.job_id, job_id);
    assert_eq!(step0.node_names, ["node1"]);
    assert_eq!(step0.num_tasks, 1);
    assert!(step0.state.is_running());
    let batch = steps.iter().find(|s| s.step_id == StepId::Batch).unwrap();
    assert_eq!(batch.nodes.as_deref(), Some("node1"));

    slurm.cancel_job(job_id).unwrap();
    wait_until("the batch job to end", || {
        slurm.load_job(job_id).unwrap().state.is_finished()
    });
}

fn expand_then_shrink(slurm: &Slurm, cluster: &TestCluster) {
    let job_id = cluster.salloc(&["-N1", "-w", "node1", "-J", "libslurm-expand"]);
    let job = slurm.load_job(job_id).unwrap();
    assert!(job.state.is_running());
    assert_eq!(job.node_names, ["node1"]);
    assert_eq!(job.batch_host, None);

    let exp = slurm
        .expand_job(job_id, "node2", &ExpandOptions::default())
        .unwrap();
    assert_eq!(exp.job_id, job_id);
    assert_eq!(exp.node_names, ["node1", "node2"]);
    assert_eq!(exp.refresh_refused, None, "NumNodes=ALL was refused");
    assert_eq!(
        cluster.field("job", &job_id.to_string(), "NodeList"),
        "node[1-2]"
    );
    assert_eq!(cluster.field("job", &job_id.to_string(), "NumNodes"), "2");
    let helper = slurm.load_job(exp.helper_job_id).unwrap();
    assert!(helper.state.is_finished(), "helper is {}", helper.state);
    assert_eq!(
        helper.dependency, None,
        "the expand dependency should be cleared once satisfied"
    );

    slurm.shrink_job(job_id, "node2").unwrap();
    assert_eq!(
        cluster.field("job", &job_id.to_string(), "NodeList"),
        "node2"
    );
    assert_eq!(cluster.field("job", &job_id.to_string(), "NumNodes"), "1");
    let job = slurm.load_job(job_id).unwrap();
    assert_eq!(job.node_names, ["node2"]);
    assert!(job.state.is_running());
    wait_until("node1 to be released", || {
        slurm.load_node("node1").unwrap().unwrap().state.is_idle()
    });

    slurm.cancel_job(job_id).unwrap();
}
