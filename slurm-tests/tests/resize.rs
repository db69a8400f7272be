//! Slurm 22.05's job resizing as the rebalancer uses it to move an allocation from node1 to node2.
//! docs/slurm-resize-observed.md records the same behaviour with the exact command output.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use slurm_tests::{Cluster, JobId};

const WAIT: Duration = Duration::from_secs(30);

/// A background `srun` step, killed if the test ends first.
struct Step(Child);

impl Step {
    fn start(c: &Cluster, args: &[&str]) -> Step {
        let mut cmd: Command = c.command("srun");
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Step(cmd.spawn().expect("srun starts"))
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_steps(c: &Cluster, job: JobId, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(s, n)| ((*s).to_owned(), (*n).to_owned()))
        .collect();
    slurm_tests::wait_until(&format!("steps {want:?}"), WAIT, || {
        let mut seen = c.steps(job)?;
        seen.sort();
        Ok(if seen == want {
            slurm_tests::Poll::Done(())
        } else {
            slurm_tests::Poll::Pending(format!("{seen:?}"))
        })
    })
    .expect("steps as expected");
}

/// The expansion half of the recipe: job J gains `node` (and as many CPUs as `ntasks`).
fn expand(c: &Cluster, job: JobId, node: &str, ntasks: &str) -> JobId {
    let dep = format!("--dependency=expand:{job}");
    let new = c
        .salloc_no_shell(&["-N1", "-n", ntasks, "-w", node, "-J", "expander", &dep])
        .expect("expansion job granted");
    c.scontrol(&["update", &format!("jobid={new}"), "NumNodes=0"])
        .expect("hand the expansion job's resources over");
    c.scontrol(&["update", &format!("jobid={job}"), "NumNodes=ALL"])
        .expect("the job takes them");
    new
}

#[test]
#[ignore = "needs root, network namespaces and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn allocation_moves_from_node1_to_node2() {
    let c = Cluster::up(3).expect("cluster up");
    let job = c
        .salloc_no_shell(&["-N1", "-n2", "-w", "node1", "-J", "mover"])
        .expect("salloc on node1");
    let _source = Step::start(
        &c,
        &[
            &format!("--jobid={job}"),
            "-w",
            "node1",
            "-n1",
            "sleep",
            "600",
        ],
    );
    wait_steps(&c, job, &[(&format!("{job}.0"), "node1")]);

    let new = expand(&c, job, "node2", "2");
    assert_eq!(c.job_nodes(job).expect("nodes"), "node[1-2]");
    assert_eq!(c.job_field(job, "NumCPUs").expect("cpus"), "4");
    assert_eq!(c.job_state(new).expect("state"), "COMPLETED");
    // The source step is untouched by the expansion.
    wait_steps(&c, job, &[(&format!("{job}.0"), "node1")]);

    // A step on the added node: where the rebalancer restores the task.
    let out = c
        .run_ok(
            "srun",
            [
                &format!("--jobid={job}"),
                "--overlap",
                "-w",
                "node2",
                "-N1",
                "-n1",
                "printenv",
                "SLURMD_NODENAME",
            ],
        )
        .expect("a step runs on the added node");
    assert_eq!(out.trim(), "node2");
    let _dest = Step::start(
        &c,
        &[
            &format!("--jobid={job}"),
            "--overlap",
            "-w",
            "node2",
            "-N1",
            "-n1",
            "sleep",
            "600",
        ],
    );
    wait_steps(
        &c,
        job,
        &[
            (&format!("{job}.0"), "node1"),
            (&format!("{job}.2"), "node2"),
        ],
    );

    // Shrink off node1: its steps are killed, the node2 step and the job live on.
    c.scontrol(&["update", &format!("jobid={job}"), "NodeList=node2"])
        .expect("shrink to node2");
    assert_eq!(c.job_nodes(job).expect("nodes"), "node2");
    assert_eq!(c.job_field(job, "NumCPUs").expect("cpus"), "2");
    assert_eq!(c.job_state(job).expect("state"), "RUNNING");
    wait_steps(&c, job, &[(&format!("{job}.2"), "node2")]);
    c.wait_node_state("node1", "idle", WAIT)
        .expect("node1 freed");

    // New steps land on node2 without naming it, and see the new node list.
    let out = c
        .run_ok(
            "srun",
            [
                &format!("--jobid={job}"),
                "--overlap",
                "sh",
                "-c",
                "echo $SLURMD_NODENAME $SLURM_JOB_NODELIST",
            ],
        )
        .expect("step after the move");
    assert_eq!(out.trim(), "node2 node2");

    // Accounting keeps one job-level row per size; rows written within the same second merge, and
    // then the newest row can stay RESIZING although the job runs (see the observation notes).
    let row = c
        .wait_sacct_state(job, &["RUNNING", "RESIZING"], WAIT)
        .expect("sacct follows the job");
    slurm_tests::wait_until("sacct's newest row on node2", WAIT, || {
        let rows = c.sacct(job)?;
        Ok(
            match rows.iter().rev().find(|r| r.job_id == job.to_string()) {
                Some(r) if r.node_list == "node2" => slurm_tests::Poll::Done(()),
                _ => slurm_tests::Poll::Pending(format!("{rows:?} (first match {row:?})")),
            },
        )
    })
    .expect("sacct shows the job on node2");
    c.run_ok("scancel", [job.to_string()]).expect("scancel");
    c.wait_sacct_state(job, &["CANCELLED"], WAIT)
        .expect("the moved job ends normally");
}

#[test]
#[ignore = "needs root, network namespaces and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn batch_host_cannot_be_removed() {
    let c = Cluster::up(3).expect("cluster up");
    let job = c
        .sbatch(&["-N1", "-w", "node1", "--wrap", "sleep 600"])
        .expect("sbatch");
    c.wait_job_state(job, &["RUNNING"], WAIT).expect("running");
    expand(&c, job, "node2", "1");
    assert_eq!(c.job_nodes(job).expect("nodes"), "node[1-2]");

    let run = c
        .run(
            "scontrol",
            ["update", &format!("jobid={job}"), "NodeList=node2"],
        )
        .expect("scontrol runs");
    assert!(!run.success, "{run:?}");
    assert_eq!(
        format!("{}{}", run.stdout, run.stderr).trim(),
        format!("Invalid node name specified for job {job}")
    );
    assert_eq!(c.job_nodes(job).expect("nodes"), "node[1-2]");
    // Dropping the other node works.
    c.scontrol(&["update", &format!("jobid={job}"), "NodeList=node1"])
        .expect("shrink to the batch host");
    assert_eq!(c.job_nodes(job).expect("nodes"), "node1");
    assert_eq!(c.job_state(job).expect("state"), "RUNNING");
}

#[test]
#[ignore = "needs root, network namespaces and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn srun_job_dies_when_its_first_node_is_removed() {
    let c = Cluster::up(3).expect("cluster up");
    let _srun = Step::start(&c, &["-N1", "-w", "node1", "-J", "srunjob", "sleep", "600"]);
    let job = slurm_tests::wait_until("the srun job", WAIT, || {
        let out = c.run_ok("squeue", ["-h", "-n", "srunjob", "-t", "R", "-o", "%i"])?;
        Ok(match out.trim().parse() {
            Ok(id) => slurm_tests::Poll::Done(JobId(id)),
            Err(_) => slurm_tests::Poll::Pending(out),
        })
    })
    .expect("srun job runs");
    expand(&c, job, "node2", "1");
    c.scontrol(&["update", &format!("jobid={job}"), "NodeList=node2"])
        .expect("the update itself is accepted");
    // srun's step on node1 is killed, srun gives up and the job fails.
    let state = c
        .wait_job_state(job, &["FAILED", "CANCELLED", "COMPLETED"], WAIT)
        .expect("job ends");
    assert_eq!(state, "FAILED");
}

#[test]
#[ignore = "needs root, network namespaces and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn srun_job_keeps_running_when_a_later_node_is_removed() {
    let c = Cluster::up(3).expect("cluster up");
    let mut srun = Step::start(&c, &["-N2", "-w", "node[1-2]", "-J", "two", "sleep", "600"]);
    let job = slurm_tests::wait_until("the srun job", WAIT, || {
        let out = c.run_ok("squeue", ["-h", "-n", "two", "-t", "R", "-o", "%i"])?;
        Ok(match out.trim().parse() {
            Ok(id) => slurm_tests::Poll::Done(JobId(id)),
            Err(_) => slurm_tests::Poll::Pending(out),
        })
    })
    .expect("srun job runs");
    c.scontrol(&["update", &format!("jobid={job}"), "NodeList=node1"])
        .expect("drop node2");
    assert_eq!(c.job_nodes(job).expect("nodes"), "node1");
    c.wait_node_state("node2", "idle", WAIT)
        .expect("node2 freed");
    // Instead of a pause: a new step in the job round-trips through slurmctld and slurmd on
    // node1 after the shrink was processed, so a job about to be killed for it would show.
    c.run_ok(
        "srun",
        [
            &format!("--jobid={job}"),
            "--overlap",
            "-N1",
            "-n1",
            "-w",
            "node1",
            "true",
        ],
    )
    .expect("a new step in the shrunk job");
    assert_eq!(c.job_state(job).expect("state"), "RUNNING");
    // The original step too: its srun still waits for `sleep 600`.
    assert!(
        matches!(srun.0.try_wait(), Ok(None)),
        "the first step's srun ended: {:?}",
        srun.0.try_wait()
    );
}

#[test]
#[ignore = "needs root, network namespaces and the Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn expansion_onto_a_busy_node_fails_with_immediate() {
    let c = Cluster::up(3).expect("cluster up");
    let busy = c
        .salloc_no_shell(&["-N1", "-n2", "-w", "node3"])
        .expect("fill node3");
    let job = c.salloc_no_shell(&["-N1", "-w", "node1"]).expect("job");
    let run = c
        .run(
            "salloc",
            [
                "--no-shell",
                "--immediate=2",
                "-N1",
                "-w",
                "node3",
                &format!("--dependency=expand:{job}"),
            ],
        )
        .expect("salloc runs");
    assert!(!run.success, "{run:?}");
    assert!(
        run.stderr
            .contains("Unable to allocate resources: Connection timed out"),
        "{}",
        run.stderr
    );
    // No pending expansion job is left behind; both jobs keep their nodes.
    let queue = c
        .run_ok("squeue", ["-h", "-o", "%i %T %N"])
        .expect("squeue");
    let mut lines: Vec<&str> = queue.lines().map(str::trim).collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            format!("{busy} RUNNING node3"),
            format!("{job} RUNNING node1")
        ]
    );
}
