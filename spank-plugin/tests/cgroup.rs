//! The plugin under `ProctrackType=proctrack/cgroup` and `TaskPlugin=task/cgroup` (cgroup v1),
//! as most sites run Slurm: the container must be in the step's and the task's cgroups, or Slurm
//! can neither signal, limit nor account it.

mod common;

use std::time::Duration;

use common::*;

fn cgroup_of(cgroup_file: &str, controller: &str) -> Option<String> {
    let tag = format!(":{controller}:");
    cgroup_file.lines().find_map(|l| {
        l.split_once(tag.as_str())
            .map(|(_, p)| p.trim().to_string())
    })
}

#[test]
#[ignore = "needs root, network namespaces, cgroup v1 and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn container_is_tracked_in_the_steps_cgroup() {
    let _l = lock();
    assert!(is_root(), "needs root");
    cluster_with("cgroup", "cgroup");
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
    let path = cgroup_of(&so, "freezer").unwrap_or_default();
    assert!(
        path.contains("/job_") && path.ends_with("/step_0"),
        "pid 1 is not in the step's freezer cgroup: {path:?}\n{so}"
    );
    // task/cgroup moves the task process into step_0/task_0 after the fork; the container must
    // follow it there (memory limits and accounting are per task).
    let path = cgroup_of(&so, "memory").unwrap_or_default();
    assert!(
        path.ends_with("/step_0/task_0"),
        "pid 1 is not in the task's memory cgroup: {path:?}\n{so}"
    );
    assert_eq!(
        agent
            .wait_for("task-exited", 1, Duration::from_secs(5))
            .len(),
        1
    );
}

/// The mechanism behind the above when the race goes the other way: a process is moved into
/// every cgroup of another one (here a v1 memory cgroup made for the test).
#[test]
#[ignore = "needs root and a cgroup v1 memory hierarchy; .ci/run runs it with --include-ignored"]
fn follow_moves_a_process_into_anothers_cgroups() {
    assert!(is_root(), "needs root");
    let mem = std::path::Path::new("/sys/fs/cgroup/memory");
    assert!(
        mem.join("cgroup.procs").exists(),
        "no cgroup v1 memory hierarchy"
    );
    let cg = mem.join(format!("rbsp-follow-{}", std::process::id()));
    std::fs::create_dir_all(&cg).expect("create a memory cgroup");
    let mut leader = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    let mut follower = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    std::fs::write(cg.join("cgroup.procs"), leader.id().to_string()).expect("move the leader");
    let moved = slurm_rebalancer_spank::cgroups::follow_from(
        &leader.id().to_string(),
        follower.id() as i32,
    );
    let now =
        std::fs::read_to_string(format!("/proc/{}/cgroup", follower.id())).unwrap_or_default();
    let _ = leader.kill();
    let _ = follower.kill();
    let _ = leader.wait();
    let _ = follower.wait();
    let _ = std::fs::remove_dir(&cg);
    let name = cg
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(moved.iter().any(|m| m.starts_with("memory:")), "{moved:?}");
    assert!(
        now.lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&name)),
        "follower not moved: {now}"
    );
}
