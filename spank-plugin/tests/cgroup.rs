//! The plugin under `ProctrackType=proctrack/cgroup` (cgroup v1 freezer), as most sites run
//! Slurm: the container must be in the step's cgroup, or Slurm can neither signal nor account it.

mod common;

use std::time::Duration;

use common::*;

fn freezer_of(cgroup_file: &str) -> Option<String> {
    cgroup_file
        .lines()
        .find_map(|l| l.split_once(":freezer:").map(|(_, p)| p.trim().to_string()))
}

#[test]
#[ignore = "needs root, network namespaces, cgroup v1 and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn container_is_tracked_in_the_steps_cgroup() {
    let _l = lock();
    assert!(is_root(), "needs root");
    cluster_with("cgroup");
    let args = default_args();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    set_plugstack("required", &refs);
    let agent = FakeAgent::start(&agent_socket());
    let out = slurm(&[
        "srun",
        "--migratable",
        "sh",
        "-c",
        "echo pid=$$; cat /proc/self/cgroup; sleep 1",
    ]);
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}{se}");
    assert!(so.contains("pid=1\n"), "{so}{se}");
    let path = freezer_of(&so).unwrap_or_default();
    assert!(
        path.contains("/job_") && path.contains("/step_0"),
        "pid 1 is not in the step's freezer cgroup: {path:?}\n{so}"
    );
    assert_eq!(
        agent
            .wait_for("task-exited", 1, Duration::from_secs(5))
            .len(),
        1
    );
}
