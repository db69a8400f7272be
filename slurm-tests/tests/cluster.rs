//! The harness cluster itself: nodes, multi-node steps, batch jobs with accounting, draining.

use std::time::Duration;

use slurm_tests::{Cluster, JobId, Poll};

const WAIT: Duration = Duration::from_secs(30);

#[test]
#[ignore = "needs root, network namespaces and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn cluster_runs_steps_and_batch_jobs_with_accounting() {
    let c = Cluster::up(3).expect("cluster up");

    let sinfo = c
        .run_ok("sinfo", ["-h", "-N", "-o", "%N %T"])
        .expect("sinfo");
    let nodes: Vec<&str> = sinfo.lines().map(str::trim).collect();
    assert_eq!(nodes, ["node1 idle", "node2 idle", "node3 idle"], "{sinfo}");

    // Every node shares the machine's UTS namespace, so `hostname` prints the machine's name on each
    // node; SLURMD_NODENAME and the namespace's address tell the nodes apart.
    let out = c
        .run_ok("srun", ["-N2", "-l", "hostname"])
        .expect("srun hostname");
    assert_eq!(out.lines().count(), 2, "{out}");
    let out = c
        .run_ok(
            "srun",
            [
                "-N2",
                "-w",
                "node[1-2]",
                "sh",
                "-c",
                "echo $SLURMD_NODENAME $(ip -4 -o addr show dev eth0 | awk '{print $4}')",
            ],
        )
        .expect("srun on two nodes");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["node1 198.18.0.11/24", "node2 198.18.0.12/24"]);

    let job = c
        .sbatch(&["-N1", "-J", "batch-ok", "--wrap", "sleep 1; echo done"])
        .expect("sbatch");
    c.wait_job_state(job, &["COMPLETED"], WAIT)
        .expect("batch job completes");
    // sacct briefly showed the finished job under the name "allocation" before its real name: wait
    // for the settled row.
    let row = slurm_tests::wait_until("sacct's row of the batch job", WAIT, || {
        let rows = c.sacct(job)?;
        Ok(
            match rows
                .iter()
                .find(|r| r.job_id == job.to_string() && r.job_name == "batch-ok")
            {
                Some(r) if r.state == "COMPLETED" => Poll::Done(r.clone()),
                _ => Poll::Pending(format!("{rows:?}")),
            },
        )
    })
    .expect("sacct records the job as COMPLETED");
    assert_eq!(row.exit_code, "0:0", "{row:?}");

    let failing = c
        .sbatch(&["-N1", "--wrap", "exit 3"])
        .expect("sbatch failing job");
    let row = c
        .wait_sacct_state(failing, &["FAILED"], WAIT)
        .expect("sacct records the failure");
    assert_eq!(row.exit_code, "3:0", "{row:?}");
}

#[test]
#[ignore = "needs root, network namespaces and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn draining_a_node_idle_and_busy() {
    let c = Cluster::up(3).expect("cluster up");

    c.scontrol(&[
        "update",
        "nodename=node1",
        "state=drain",
        "reason=maintenance",
    ])
    .expect("drain node1");
    c.wait_node_state("node1", "drained", WAIT)
        .expect("an idle node drains at once");
    let reason = c
        .run_ok("sinfo", ["-h", "-R", "-n", "node1", "-o", "%E"])
        .expect("sinfo -R");
    assert_eq!(reason.trim(), "maintenance");
    // A drained node takes no new work.
    let run = c
        .run("srun", ["--immediate=2", "-w", "node1", "true"])
        .expect("srun runs");
    assert!(!run.success, "a job started on a drained node: {run:?}");
    c.scontrol(&["update", "nodename=node1", "state=resume"])
        .expect("resume node1");
    c.wait_node_state("node1", "idle", WAIT)
        .expect("node1 idle again");

    let job: JobId = c
        .sbatch(&["-N1", "-w", "node2", "--wrap", "sleep 3"])
        .expect("sbatch on node2");
    c.wait_job_state(job, &["RUNNING"], WAIT).expect("job runs");
    c.scontrol(&[
        "update",
        "nodename=node2",
        "state=drain",
        "reason=maintenance",
    ])
    .expect("drain node2");
    assert_eq!(c.node_state("node2").expect("sinfo"), "draining");
    assert_eq!(c.job_state(job).expect("job state"), "RUNNING");
    c.wait_job_state(job, &["COMPLETED"], WAIT)
        .expect("the job runs to its end on a draining node");
    c.wait_node_state("node2", "drained", WAIT)
        .expect("node2 drained after its job");
}
