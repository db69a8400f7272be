//! The libslurm wrappers against a real Slurm 22.05 cluster (slurm-tests' `Cluster` guard:
//! slurmctld, slurmdbd and one slurmd per network namespace). One test run in stages: only one such
//! cluster can be up on the machine at a time, and `Slurm::init` is once per process.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use rebalancer_slurm::{DrainPhase, Error, ExpandOptions, JobUpdate, NodeCount, Slurm, StepId};
use slurm_tests::{Cluster, JobId};

const WAIT: Duration = Duration::from_secs(30);

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// `scontrol show -o node NODE` as key/value pairs.
fn show_node(cluster: &Cluster, node: &str) -> HashMap<String, String> {
    let out = cluster.scontrol(&["show", "-o", "node", node]).unwrap();
    // Reason=... is the last field and may contain spaces.
    let (head, reason) = match out.split_once(" Reason=") {
        Some((h, r)) => (h.to_owned(), Some(r.trim().to_owned())),
        None => (out.clone(), None),
    };
    let mut map: HashMap<String, String> = head
        .split_whitespace()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if let Some(r) = reason {
        map.insert("Reason".into(), r);
    }
    map
}

fn job_field(cluster: &Cluster, job: u32, field: &str) -> String {
    cluster.job_field(JobId(job), field).unwrap()
}

/// Our one-word state must be sinfo's (`%T`), where sinfo adds no suffix character.
fn assert_state_matches_sinfo(slurm: &Slurm, cluster: &Cluster) {
    for node in slurm.load_nodes().unwrap() {
        let sinfo = cluster.node_state(&node.name).unwrap();
        assert_eq!(
            node.state.summary().to_ascii_lowercase(),
            sinfo,
            "{}: ours {} ({}), sinfo {sinfo}",
            node.name,
            node.state.summary(),
            node.state
        );
    }
}

#[test]
#[ignore = "needs root and the slurm-tests cluster (slurmctld, slurmdbd, MariaDB, network namespaces); .ci/run runs it with --include-ignored"]
fn libslurm_against_a_real_cluster() {
    let cluster = Cluster::up(3).unwrap();
    let slurm = Slurm::init(Some(&cluster.slurm_conf())).unwrap();

    nodes_are_listed(&slurm, &cluster);
    drain_and_resume(&slurm, &cluster);
    batch_job_and_its_steps(&slurm, &cluster);
    expand_then_shrink(&slurm, &cluster);
    merge_step_by_step(&slurm, &cluster);
    expansion_onto_a_busy_node_times_out(&slurm, &cluster);
}

fn nodes_are_listed(slurm: &Slurm, cluster: &Cluster) {
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
        assert_eq!(n.alloc_memory_mb, 0);
        let scontrol = show_node(cluster, &n.name);
        assert_eq!(scontrol["RealMemory"], n.real_memory_mb.to_string());
        assert!(n.real_memory_mb > 0);
        assert_eq!(n.partitions, ["debug"]);
        assert_eq!(
            n.addr.as_deref(),
            Some(format!("198.18.0.{}", 11 + k).as_str())
        );
        assert!(n.reason.is_none());
    }
    assert_state_matches_sinfo(slurm, cluster);
}

fn drain_and_resume(slurm: &Slurm, cluster: &Cluster) {
    // slurmctld answers "no change" only when nothing changed since a second before the snapshot;
    // right after start-up registrations still arrive, so wait for a quiet second.
    let mut before = slurm.load_nodes_since(0).unwrap().unwrap();
    assert!(before.last_update > 0);
    wait_until("an unchanged node table", || {
        match slurm.load_nodes_since(before.last_update).unwrap() {
            None => true,
            Some(newer) => {
                assert!(newer.last_update >= before.last_update);
                before = newer;
                false
            }
        }
    });

    slurm.drain_nodes("node3", "libslurm test drain").unwrap();
    let after = slurm.load_nodes_since(before.last_update).unwrap().unwrap();
    assert!(after
        .nodes
        .iter()
        .any(|n| n.name == "node3" && n.state.is_drain()));

    let scontrol = show_node(cluster, "node3");
    assert_eq!(scontrol["State"], "IDLE+DRAIN");
    assert!(
        scontrol["Reason"].starts_with("libslurm test drain"),
        "{}",
        scontrol["Reason"]
    );
    let node = slurm.load_node("node3").unwrap().unwrap();
    assert_eq!(node.state.drain_phase(), Some(DrainPhase::Drained));
    assert_eq!(node.reason.as_deref(), Some("libslurm test drain"));
    assert!(!node.state.accepts_work());
    assert_state_matches_sinfo(slurm, cluster);

    slurm.resume_nodes("node3").unwrap();
    let state = show_node(cluster, "node3")["State"].clone();
    assert!(!state.contains("DRAIN"), "{state}");
    assert!(slurm
        .load_node("node3")
        .unwrap()
        .unwrap()
        .state
        .drain_phase()
        .is_none());
    // slurmctld 22.05 marks a resumed node NOT_RESPONDING until slurmd registers again.
    wait_until("node3 to register after resume", || {
        show_node(cluster, "node3")["State"] == "IDLE"
    });
    let node = slurm.load_node("node3").unwrap().unwrap();
    assert!(node.state.accepts_work(), "{}", node.state);

    // A drain without a reason never reaches slurmctld.
    assert!(matches!(
        slurm.drain_nodes("node3", ""),
        Err(Error::InvalidRequest(_))
    ));
    // An unknown node is slurmctld's error, with its text.
    let err = slurm.drain_nodes("node9", "x").unwrap_err();
    let cause = err.slurm_errno().unwrap();
    assert!(cause.message.contains("node name"), "{cause}");
}

fn batch_job_and_its_steps(slurm: &Slurm, cluster: &Cluster) {
    let JobId(job_id) = cluster
        .sbatch(&[
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
        ])
        .unwrap();

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
    assert!(job.is_batch);
    assert_eq!(job.num_nodes, 1);
    assert_eq!(
        job.num_cpus.to_string(),
        job_field(cluster, job_id, "NumCPUs")
    );
    assert!(slurm
        .jobs_on_node("node1")
        .unwrap()
        .iter()
        .any(|j| j.id == job_id));
    assert!(slurm
        .jobs_on_node("node2")
        .unwrap()
        .iter()
        .all(|j| j.id != job_id));

    let node1 = slurm.load_node("node1").unwrap().unwrap();
    assert_eq!(node1.alloc_cpus, job.num_cpus);
    assert!(!node1.state.is_idle(), "{}", node1.state);
    assert_state_matches_sinfo(slurm, cluster);

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
    assert_eq!(step0.name.as_deref(), Some("sleep"));
    assert!(step0.state.is_running());
    let batch = steps.iter().find(|s| s.step_id == StepId::Batch).unwrap();
    assert_eq!(batch.nodes.as_deref(), Some("node1"));
    let squeue = cluster.steps(JobId(job_id)).unwrap();
    assert!(squeue
        .iter()
        .any(|(id, nodes)| *id == format!("{job_id}.0") && nodes == "node1"));

    // Moving a batch job off its batch host is refused before slurmctld sees it.
    match slurm.shrink_job(job_id, "node2") {
        Err(Error::BatchHostPinned { job, host }) => {
            assert_eq!((job, host.as_str()), (job_id, "node1"));
        }
        other => panic!("expected BatchHostPinned, got {other:?}"),
    }
    assert_eq!(job_field(cluster, job_id, "NodeList"), "node1");

    slurm.cancel_job(job_id).unwrap();
    wait_until("the batch job to end", || {
        slurm.load_job(job_id).unwrap().state.is_finished()
    });
    assert!(matches!(
        slurm.load_job(999_999),
        Err(Error::JobNotFound { job: 999_999 })
    ));
}

fn expand_then_shrink(slurm: &Slurm, cluster: &Cluster) {
    let JobId(job_id) = cluster
        .salloc_no_shell(&["-N1", "-w", "node1", "-J", "libslurm-expand"])
        .unwrap();
    let job = slurm.load_job(job_id).unwrap();
    assert!(job.state.is_running());
    assert_eq!(job.node_names, ["node1"]);
    assert!(!job.is_batch);

    let exp = slurm
        .expand_job(job_id, "node2", &ExpandOptions::default())
        .unwrap();
    assert_eq!(exp.job_id, job_id);
    assert_eq!(exp.node_names, ["node1", "node2"]);
    assert_eq!(exp.refresh_refused, None, "NumNodes=ALL was refused");
    assert_eq!(job_field(cluster, job_id, "NodeList"), "node[1-2]");
    assert_eq!(job_field(cluster, job_id, "NumNodes"), "2");
    let helper = slurm.load_job(exp.helper_job_id).unwrap();
    assert!(helper.state.is_finished(), "helper is {}", helper.state);
    assert_eq!(
        job_field(cluster, exp.helper_job_id, "JobState"),
        "COMPLETED"
    );

    // Expanding onto a node the job already has is refused before any allocation.
    assert!(matches!(
        slurm.expand_job(job_id, "node2", &ExpandOptions::default()),
        Err(Error::InvalidRequest(_))
    ));

    slurm.shrink_job(job_id, "node2").unwrap();
    assert_eq!(job_field(cluster, job_id, "NodeList"), "node2");
    assert_eq!(job_field(cluster, job_id, "NumNodes"), "1");
    let job = slurm.load_job(job_id).unwrap();
    assert_eq!(job.node_names, ["node2"]);
    assert!(job.state.is_running());
    wait_until("node1 to be released", || {
        slurm.load_node("node1").unwrap().unwrap().state.is_idle()
    });

    slurm.cancel_job(job_id).unwrap();
    wait_until("the moved job to end", || {
        slurm.load_job(job_id).unwrap().state.is_finished()
    });
}

fn expansion_onto_a_busy_node_times_out(slurm: &Slurm, cluster: &Cluster) {
    let JobId(busy) = cluster
        .salloc_no_shell(&["-N1", "-n2", "-w", "node3", "-J", "libslurm-busy"])
        .unwrap();
    let JobId(job_id) = cluster
        .salloc_no_shell(&["-N1", "-w", "node1", "-J", "libslurm-stay"])
        .unwrap();

    let opts = ExpandOptions {
        timeout: Duration::from_secs(3),
        ..ExpandOptions::default()
    };
    let err = slurm.expand_job(job_id, "node3", &opts).unwrap_err();
    let Error::AllocationTimeout {
        job, allocation, ..
    } = err
    else {
        panic!("expected AllocationTimeout, got {err:?}");
    };
    assert_eq!(job, job_id);
    // The helper was withdrawn and the job is untouched.
    wait_until("the helper allocation to be cancelled", || {
        slurm.load_job(allocation).unwrap().state.is_finished()
    });
    assert_eq!(job_field(cluster, allocation, "JobState"), "CANCELLED");
    assert_eq!(job_field(cluster, job_id, "NodeList"), "node1");
    assert_eq!(job_field(cluster, busy, "NodeList"), "node3");

    slurm.cancel_job(job_id).unwrap();
    slurm.cancel_job(busy).unwrap();
}

/// The expansion's updates one by one through `update_job`: the merge happens at `NumNodes=0` on the
/// helper, before `NumNodes=ALL` on the job; a shrink by count keeps the job running.
fn merge_step_by_step(slurm: &Slurm, cluster: &Cluster) {
    let JobId(job_id) = cluster
        .salloc_no_shell(&["-N1", "-w", "node1", "-J", "libslurm-merge"])
        .unwrap();
    let dependency = format!("--dependency=expand:{job_id}");
    let JobId(helper) = cluster
        .salloc_no_shell(&["-N1", "-w", "node3", &dependency])
        .unwrap();

    slurm
        .update_job(helper, &JobUpdate::num_nodes(NodeCount::Zero))
        .unwrap();
    assert_eq!(job_field(cluster, job_id, "NodeList"), "node[1,3]");
    assert_eq!(job_field(cluster, helper, "JobState"), "COMPLETED");
    slurm
        .update_job(job_id, &JobUpdate::num_nodes(NodeCount::All))
        .unwrap();
    assert_eq!(job_field(cluster, job_id, "NodeList"), "node[1,3]");
    assert_eq!(
        slurm.load_job(job_id).unwrap().node_names,
        ["node1", "node3"]
    );

    slurm
        .update_job(job_id, &JobUpdate::num_nodes(NodeCount::Exactly(1)))
        .unwrap();
    assert_eq!(job_field(cluster, job_id, "NumNodes"), "1");
    let job = slurm.load_job(job_id).unwrap();
    assert_eq!(job.node_names.len(), 1);
    assert!(job.state.is_running());

    // Updating a job slurmctld does not know is a typed error.
    assert!(matches!(
        slurm.update_job(999_999, &JobUpdate::node_list("node1")),
        Err(Error::JobNotFound { job: 999_999 })
    ));
    slurm.cancel_job(job_id).unwrap();
}
