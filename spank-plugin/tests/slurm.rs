//! The plugin inside real Slurm 22.05 daemons (a private one-node cluster, tests/minicluster.sh),
//! talking to a stand-in agent that applies the real registration checks (`verify`).

mod common;

use std::time::Duration;

use common::*;
use rebalancer_agent::container::MountPlan;

const IGNORE: &str = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored";

fn setup(kind: &str, extra: &[&str]) {
    assert!(is_root(), "{IGNORE}");
    cluster();
    let mut args = default_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    set_plugstack(kind, &refs);
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn migratable_task_is_pid_1_of_its_own_namespace_and_registered() {
    let _l = lock();
    setup("required", &[]);
    let agent = FakeAgent::start(&agent_socket());
    let out = slurm(&[
        "srun",
        "--migratable=long",
        "--migration-mode=post-copy",
        "sh",
        "-c",
        "echo pid=$$ host=$(hostname) c=$REBALANCER_CONTAINER; readlink /proc/1/ns/pid; readlink /proc/self/ns/net",
    ]);
    let (so, se) = text(&out);
    assert!(out.status.success(), "srun failed: {so}{se}");
    assert!(so.contains("pid=1 "), "task is not pid 1: {so}{se}");
    let job: u32 = so
        .split("c=j")
        .nth(1)
        .and_then(|r| r.split('.').next())
        .and_then(|j| j.trim().parse().ok())
        .unwrap_or_else(|| panic!("no container id in {so}"));
    let cid = format!("j{job}.s0.t0");
    assert!(
        so.contains(&format!("host={cid} ")),
        "hostname not the container's: {so}"
    );
    // Its own pid and network namespaces, not the node's.
    let node_pid_ns = std::fs::read_link("/proc/self/ns/pid").expect("own pid ns");
    assert!(
        !so.contains(&node_pid_ns.to_string_lossy().to_string()),
        "{so}"
    );

    let prepared = agent.wait_for("prepare-task", 1, Duration::from_secs(5));
    let registered = agent.wait_for("register-task", 1, Duration::from_secs(5));
    let exited = agent.wait_for("task-exited", 1, Duration::from_secs(5));
    assert_eq!(prepared.len(), 1, "{:?}", agent.seen());
    assert_eq!(registered.len(), 1, "{:?}", agent.seen());
    let (p, r) = (&prepared[0], &registered[0]);
    // The real checks passed: root task process under slurmstepd [job.0], pid 1 its child.
    assert_eq!(p.verified, Ok(()), "prepare-task check");
    assert_eq!(r.verified, Ok(()), "register-task check");
    assert_eq!(p.peer_uid, 0);
    let reg = r.registration.as_ref().expect("registration");
    assert_eq!(
        (reg.task.job_id, reg.task.step_id, reg.task.task_id),
        (job, 0, 0)
    );
    assert_eq!(reg.container.as_deref(), Some(cid.as_str()));
    assert_eq!(reg.address.as_deref(), Some("198.18.64.100"));
    assert_eq!(reg.node, NODE);
    assert_eq!(reg.class.as_deref(), Some("long"));
    assert_eq!(reg.mode, Some(rebalancer_proto::MigrationMode::PostCopy));
    assert_eq!(reg.waiter_pid, Some(p.peer_pid));
    assert_ne!(
        reg.pid, p.peer_pid,
        "pid 1 is a separate process from the waiter"
    );
    assert!(reg.cpus.is_some_and(|c| c >= 1.0), "{reg:?}");
    assert_eq!(exited.len(), 1);
    assert_eq!(exited[0].wait_status, Some(0));
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn plain_step_is_untouched_and_exit_codes_pass_through() {
    let _l = lock();
    setup("required", &[]);
    let agent = FakeAgent::start(&agent_socket());
    let out = slurm(&["srun", "hostname"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = slurm(&["srun", "--migratable", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    let exited = agent.wait_for("task-exited", 1, Duration::from_secs(5));
    assert_eq!(
        exited.len(),
        1,
        "only the --migratable step talks to the agent: {:?}",
        agent.seen()
    );
    assert_eq!(exited[0].wait_status, Some(3 << 8));
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn signals_reach_the_containers_pid_1() {
    let _l = lock();
    setup("required", &[]);
    let _agent = FakeAgent::start(&agent_socket());
    let ready = std::path::PathBuf::from(format!("{DIR}/sig-ready"));
    let _ = std::fs::remove_file(&ready);
    let child = std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/minicluster.sh"),
    )
    .args([
        "run",
        CLUSTER,
        "srun",
        "--migratable",
        "--job-name=rbsp-sig",
        "sh",
        "-c",
    ])
    .arg(format!(
        "trap 'echo got-usr1; exit 5' USR1; touch {DIR}/sig-ready; while :; do sleep 0.1; done"
    ))
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("spawn srun");
    // Wait until the trap is set (the container sees the node's /tmp here), then signal the
    // step the way a user would.
    let t0 = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "step never became ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let sc = slurm(&["scancel", "--signal=USR1", "-n", "rbsp-sig"]);
    assert!(sc.status.success(), "{:?}", text(&sc));
    let out = child.wait_with_output().expect("srun output");
    let (so, se) = text(&out);
    assert!(so.contains("got-usr1"), "{so}{se}");
    assert_eq!(out.status.code(), Some(5), "{so}{se}");
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn final_status_comes_from_the_agent_after_a_migration() {
    let _l = lock();
    setup("required", &[]);
    let agent = FakeAgent::start(&agent_socket());
    agent
        .behaviour
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .migrated_exit = Some((7 << 8, "node2".into()));
    let out = slurm(&["srun", "--migratable", "true"]);
    assert_eq!(out.status.code(), Some(7), "{:?}", text(&out));
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn bad_option_values_fail_the_submission() {
    let _l = lock();
    setup("optional", &[]);
    for (args, want) in [
        (
            vec!["srun", "--migratable=bogus!", "hostname"],
            "invalid class 'bogus!'",
        ),
        (
            vec!["srun", "--migration-mode=fast", "hostname"],
            "invalid migration mode 'fast'",
        ),
        (
            vec!["srun", "--migratable", "--no-migrate", "hostname"],
            "--no-migrate conflicts",
        ),
        (
            vec!["sbatch", "--migratable=a/b", "--wrap", "true"],
            "invalid class 'a/b'",
        ),
        (
            vec!["salloc", "--migration-mode=x", "true"],
            "invalid migration mode 'x'",
        ),
    ] {
        let out = slurm(&args);
        let (so, se) = text(&out);
        assert!(!out.status.success(), "{args:?} was accepted: {so}{se}");
        assert!(se.contains(want), "{args:?}: {se}");
    }
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn bad_plugin_arguments_are_reported() {
    let _l = lock();
    setup("optional", &["sockett=/x"]);
    // Optional: plain steps run, and srun says what is wrong with plugstack.conf.
    let out = slurm(&["srun", "hostname"]);
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}{se}");
    assert!(se.contains("unknown plugin argument 'sockett'"), "{se}");
    // ... and slurmstepd logged it in the node's log.
    let log =
        std::fs::read_to_string(format!("{CLUSTER}/log/slurmd-{NODE}.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("rebalancer: bad plugstack.conf arguments")
                && l.contains("'sockett'")),
        "not in the slurmd/slurmstepd log"
    );
    // Required: nothing runs, with the same message.
    setup("required", &["enforce=maybe"]);
    let out = slurm(&["srun", "hostname"]);
    let (so, se) = text(&out);
    assert!(!out.status.success(), "{so}{se}");
    assert!(se.contains("enforce='maybe'"), "{se}");
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn agent_down_optional_runs_unmigratable_required_fails() {
    let _l = lock();
    setup("optional", &[]);
    let _ = std::fs::remove_file(agent_socket());
    let out = slurm(&["srun", "--migratable", "sh", "-c", "echo pid=$$"]);
    let (so, se) = text(&out);
    assert!(
        out.status.success(),
        "optional plugin must not fail the job: {so}{se}"
    );
    assert!(
        !so.contains("pid=1\n"),
        "ran in a container without an agent: {so}"
    );
    assert!(se.contains("cannot connect to the node agent"), "{se}");
    assert!(se.contains("cannot be made migratable"), "{se}");

    setup("required", &[]);
    let out = slurm(&["srun", "--migratable", "hostname"]);
    let (so, se) = text(&out);
    assert!(
        !out.status.success(),
        "required plugin must fail the job: {so}{se}"
    );
    assert!(se.contains("cannot connect to the node agent"), "{se}");
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn agent_refusal_is_shown_to_the_user() {
    let _l = lock();
    setup("required", &[]);
    let agent = FakeAgent::start(&agent_socket());
    agent
        .behaviour
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .refuse_prepare = Some("no container address left".into());
    let out = slurm(&["srun", "--migratable", "hostname"]);
    let (so, se) = text(&out);
    assert!(!out.status.success(), "{so}{se}");
    assert!(se.contains("no container address left"), "{se}");
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn enforce_makes_steps_migratable_unless_they_opt_out() {
    let _l = lock();
    setup("required", &["enforce=yes", "default_class=std"]);
    let agent = FakeAgent::start(&agent_socket());
    let out = slurm(&["srun", "sh", "-c", "echo pid=$$"]);
    let (so, se) = text(&out);
    assert!(so.contains("pid=1\n"), "{so}{se}");
    let reg = agent.wait_for("register-task", 1, Duration::from_secs(5));
    assert_eq!(
        reg[0]
            .registration
            .as_ref()
            .and_then(|r| r.class.clone())
            .as_deref(),
        Some("std")
    );
    let out = slurm(&["srun", "--no-migrate", "sh", "-c", "echo pid=$$"]);
    let (so, se) = text(&out);
    assert!(out.status.success() && !so.contains("pid=1\n"), "{so}{se}");
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn batch_step_runs_in_a_container() {
    let _l = lock();
    setup("required", &[]);
    let agent = FakeAgent::start(&agent_socket());
    let out_file = format!("{DIR}/batch-%j.out");
    let out = slurm(&[
        "sbatch",
        "--wait",
        "--migratable",
        "-o",
        &out_file,
        "--wrap",
        "echo batch-pid=$$",
    ]);
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}{se}");
    let job: String = so.split_whitespace().last().unwrap_or_default().to_string();
    let body = std::fs::read_to_string(format!("{DIR}/batch-{job}.out")).unwrap_or_default();
    assert!(body.contains("batch-pid=1\n"), "{body}");
    let reg = agent.wait_for("register-task", 1, Duration::from_secs(5));
    assert_eq!(reg.len(), 1, "{:?}", agent.seen());
    assert_eq!(
        reg[0].verified,
        Ok(()),
        "batch step passes the registration check"
    );
}

/// Waits until the registered task `pid` runs the workload's loop: it is the shell with the
/// tick script (exec'd, its stdio set up by slurmstepd) and has forked its first `sleep`, so
/// "tick 0" is written.
fn wait_in_loop(pid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        // Slurm execs the resolved path (/usr/bin/sh): look for the script instead.
        let script = cmd.windows(9).any(|w| w == b"echo tick");
        if script && !children.trim().is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task {pid} never reached its loop: cmdline {:?}, children {children:?}, status {:?}",
            String::from_utf8_lossy(&cmd),
            std::fs::read_to_string(format!("/proc/{pid}/status"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn criu() -> String {
    ["/usr/local/sbin/criu", "/usr/sbin/criu"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("criu")
        .to_string()
}

/// The agent's view of a task container with the fake agent's private root
/// (`private_root_for`): its bind mounts of /usr and /etc, which CRIU treats as external.
fn private_root_mounts() -> Vec<MountPlan> {
    ["/usr", "/etc"]
        .into_iter()
        .map(|d| MountPlan::Bind {
            source: d.into(),
            target: d.into(),
            readonly: true,
        })
        .chain([MountPlan::Proc, MountPlan::Dev])
        .collect()
}

/// Dumps the container whose pid 1 is `pid` with the agent's own CRIU command line
/// (`rebalancer_agent::criu::DumpArgs`: netns and the root's bind mounts external, the tree left
/// stopped), then kills the stopped tree as the source agent does once the destination has it.
/// Returns the image dir and the stdio keys of pid 1.
fn dump(pid: i32, job: u32) -> (String, Vec<String>) {
    let img = format!("{DIR}/img-{job}");
    let _ = std::fs::remove_dir_all(&img);
    std::fs::create_dir_all(&img).expect("image dir");
    let link = |p: String| std::fs::read_link(p).map(|l| l.to_string_lossy().into_owned());
    let net = link(format!("/proc/{pid}/ns/net")).expect("netns of pid 1");
    let net_inode: u64 = net
        .trim_start_matches("net:[")
        .trim_end_matches(']')
        .parse()
        .unwrap_or_else(|e| panic!("netns link {net}: {e}"));
    let stdio: Vec<String> = (0..3)
        .map(|fd| {
            link(format!("/proc/{pid}/fd/{fd}"))
                .ok()
                .filter(|l| l.starts_with("pipe:"))
                .unwrap_or_default()
        })
        .collect();
    let args = rebalancer_agent::criu::DumpArgs {
        pid,
        images_dir: img.clone().into(),
        net_inode,
        ext_mounts: rebalancer_agent::container::external_mounts(&private_root_mounts())
            .into_iter()
            .map(|(target, key, _)| (target, key))
            .collect(),
        ..Default::default()
    }
    .build();
    let out = std::process::Command::new(criu())
        .args(&args)
        .output()
        .expect("run criu dump");
    let log = std::fs::read_to_string(format!("{img}/dump.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "criu {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log.lines()
            .filter(|l| l.contains("rror ("))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // pid 1 of the container's pid namespace: its whole tree goes with it.
    kill_tree_root(pid);
    (img, stdio)
}

/// The restored tree is left stopped (the agent's restore plan says `--leave-stopped`); the
/// destination agent continues it at the commit. Here the test is that agent: once the
/// restored task registered, it continues its tree.
fn resume_restored(agent: &FakeAgent, n: usize) -> rebalancer_proto::TaskRegistration {
    let regs = agent.wait_for("register-task", n, Duration::from_secs(20));
    assert_eq!(regs.len(), n, "{:?}", agent.seen());
    let restored = regs[n - 1].registration.clone().expect("registration");
    for p in rebalancer_agent::container::tree_pids(restored.pid) {
        // SAFETY: kill(2) takes plain integers; a pid that is gone only makes it fail.
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    restored
}

/// The test as the destination agent: once the restored copy ended (its task-exited reached the
/// fake agent), its status is the moved container's final status, which the source's held
/// task-exited is answered with.
fn report_final_status(agent: &FakeAgent) {
    let exits = agent.wait_for("task-exited", 2, Duration::from_secs(40));
    assert_eq!(exits.len(), 2, "{:?}", agent.seen());
    let status = exits[1]
        .wait_status
        .expect("the restored copy's wait status");
    agent
        .behaviour
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .migrated_exit = Some((status, NODE.into()));
}

fn kill_tree_root(pid: i32) {
    // SAFETY: kill(2) takes plain integers; a stale pid only makes it fail.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(r, 0, "kill {pid}: {}", std::io::Error::last_os_error());
}

/// The restore plan the agent would hand the restore step: `rebalancer_agent::migration::restore_step::restore_plan`
/// on the container as the agent records it.
fn restore_plan(
    migration: &str,
    r: &rebalancer_proto::TaskRegistration,
    img: &str,
    stdio: Vec<String>,
) -> rebalancer_proto::RestorePlan {
    let container = r.container.clone().expect("container id");
    let t = &r.task;
    let meta = rebalancer_agent::container::ContainerMeta {
        spec: rebalancer_proto::ContainerSpec {
            id: container.clone(),
            task: Some(t.clone()),
            uid: r.uid,
            gid: r.gid,
            argv: Vec::new(),
            env: Vec::new(),
            cwd: "/tmp".into(),
            rootfs: rebalancer_proto::RootfsSpec::Host,
            binds: Vec::new(),
            memory_limit: None,
            cpus: None,
            class: None,
            address: r.address.clone(),
            stdout: None,
            stderr: None,
        },
        address: std::net::Ipv4Addr::UNSPECIFIED,
        mounts: private_root_mounts(),
        symlinks: Vec::new(),
        stdio_paths: vec![String::new(); stdio.len()],
        stdio_keys: stdio,
        started_at: 0,
    };
    rebalancer_agent::migration::restore_step::restore_plan(
        std::path::Path::new(&criu()),
        migration,
        &meta,
        std::path::Path::new(img),
        std::path::Path::new(&private_root_for(&container).0),
        std::path::Path::new(&format!(
            "/run/netns/rbsp-j{}-s{}-t{}",
            t.job_id, t.step_id, t.task_id
        )),
        false,
    )
}

fn spawn_slurm(args: &[&str]) -> std::process::Child {
    std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/minicluster.sh"),
    )
    .args(["run", CLUSTER])
    .args(args)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("spawn a Slurm command")
}

/// The whole Slurm side of a migration on one node: dump a migratable task with CRIU, restore it
/// as the task of a restore step (`--rebalancer-restore`), and check that the restored tree is
/// the restore step's child, its output goes to the restore step, and both sruns end with the
/// workload's exit code.
#[test]
#[ignore = "needs root, CRIU 4.2, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn dumped_task_is_restored_under_a_restore_step() {
    let _l = lock();
    setup("required", &[]);
    let agent = FakeAgent::start(&agent_socket());
    {
        let mut b = agent.behaviour.lock().unwrap_or_else(|e| e.into_inner());
        b.hold_first_exit = true;
        b.private_root = true;
    }
    let src = spawn_slurm(&[
        "srun",
        "--migratable",
        "--chdir=/tmp",
        "--input=none",
        "-J",
        "rbsp-mig",
        "sh",
        "-c",
        "i=0; while [ $i -lt 30 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done; exit 6",
    ]);
    let reg = agent.wait_for("register-task", 1, Duration::from_secs(20));
    assert_eq!(reg.len(), 1, "{:?}", agent.seen());
    let r = reg[0].registration.clone().expect("registration");
    let (pid, job) = (r.pid, r.task.job_id);
    wait_in_loop(pid);

    let (img, stdio) = dump(pid, job);

    // The source task now waits for the agent; a signal for it goes to wherever the container
    // lives, through the agent.
    let sc = slurm(&["scancel", "--signal=USR2", "-n", "rbsp-mig"]);
    assert!(sc.status.success(), "{:?}", text(&sc));
    let kills = agent.wait_for("kill-container", 1, Duration::from_secs(10));
    assert_eq!(kills.len(), 1, "{:?}", agent.seen());
    assert_eq!(kills[0].wait_status, Some(libc::SIGUSR2));

    let migration = "0b6f1c2e-1111-4a2b-9c3d-123456789abc";
    agent
        .behaviour
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore_plan = Some(restore_plan(migration, &r, &img, stdio));
    let jobs = job.to_string();
    let dst = spawn_slurm(&[
        "srun",
        "--jobid",
        &jobs,
        "--overlap",
        "-N1",
        "-n1",
        "--input=none",
        "--chdir=/tmp",
        "-J",
        "rebalancer-restore",
        &format!("--rebalancer-restore={migration}"),
        "true",
    ]);
    resume_restored(&agent, 2);
    let dst_out = dst.wait_with_output().expect("restore srun");
    report_final_status(&agent);
    let src_out = src.wait_with_output().expect("source srun");
    let (dso, dse) = text(&dst_out);
    let (sso, sse) = text(&src_out);
    let restore_log = std::fs::read_to_string(format!("{img}/restore.log")).unwrap_or_default();
    let errs: Vec<&str> = restore_log.lines().filter(|l| l.contains("rror")).collect();
    assert_eq!(
        dst_out.status.code(),
        Some(6),
        "restore step: {dso}{dse}\nrestore.log errors:\n{}",
        errs.join("\n")
    );
    // Output before the dump went to the original srun, after the restore to the restore step.
    assert!(sso.contains("tick 0\n"), "{sso}{sse}");
    assert!(
        dso.contains("tick 29\n") && !dso.contains("tick 0\n"),
        "{dso}{dse}"
    );
    // The source srun ends with the workload's status, relayed by the agent.
    assert_eq!(src_out.status.code(), Some(6), "{sso}{sse}");
    let regs = agent.wait_for("register-task", 2, Duration::from_secs(5));
    assert_eq!(regs.len(), 2, "{:?}", agent.seen());
    assert_eq!(
        regs[1].verified,
        Ok(()),
        "restored pid 1 is the restore task's child"
    );
    let restored = regs[1].registration.clone().expect("registration");
    assert_eq!(restored.container, r.container);
    assert_eq!(restored.task.job_id, job);
    assert_ne!(
        restored.task.step_id, 0,
        "registered under the restore step"
    );
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn every_task_of_a_step_gets_its_own_container() {
    let _l = lock();
    setup("required", &[]);
    let agent = FakeAgent::start(&agent_socket());
    let out = slurm(&[
        "srun",
        "-n2",
        "--migratable",
        "sh",
        "-c",
        "echo task=$SLURM_PROCID pid=$$ c=$REBALANCER_CONTAINER",
    ]);
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}{se}");
    let mut lines: Vec<&str> = so.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 2, "{so}");
    for (i, l) in lines.iter().enumerate() {
        assert!(l.starts_with(&format!("task={i} pid=1 c=j")), "{l}");
        assert!(l.ends_with(&format!(".s0.t{i}")), "{l}");
    }
    let regs = agent.wait_for("register-task", 2, Duration::from_secs(5));
    assert_eq!(regs.len(), 2, "{:?}", agent.seen());
    let mut tasks: Vec<u32> = regs
        .iter()
        .map(|r| {
            assert_eq!(r.verified, Ok(()));
            r.registration.as_ref().map_or(99, |g| g.task.task_id)
        })
        .collect();
    tasks.sort();
    assert_eq!(tasks, [0, 1]);
}

/// A real agent, SIGKILLed when dropped (also when the test fails); the killed agent's image
/// tmpfs is unmounted.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::process::Command::new("umount")
            .args(["-l", &format!("{DIR}/agent-run/images")])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Starts the real agent (target/<profile>/rebalancer-agent) in the cluster's namespace, its
/// log in `log`, and waits for its socket.
fn start_real_agent(log: &str) -> std::process::Child {
    let exe = std::env::current_exe().expect("test path");
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|d| d.join("rebalancer-agent"))
        .expect("target dir");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build -p rebalancer-agent` with the same target dir",
        bin.display()
    );
    let sock = agent_socket();
    let _ = std::fs::remove_file(&sock);
    let cfg = format!("{DIR}/agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "node = \"{NODE}\"\nlisten = \"198.18.64.1:7878\"\ncontrol_socket = \"{sock}\"\n\
             state_dir = \"{DIR}/agent-state\"\nrun_dir = \"{DIR}/agent-run\"\n\
             container_subnet = \"198.19.64.0/20\"\nipam = \"local\"\n\
             uplink = \"rbsp0\"\n[auth]\nmethod = \"none\"\n"
        ),
    )
    .expect("agent config");
    let agent = std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/minicluster.sh"),
    )
    .args(["run", CLUSTER])
    .arg(&bin)
    .args(["run", "-c", &cfg])
    .stdin(std::process::Stdio::null())
    .stdout(std::fs::File::create(log).expect("agent log"))
    .stderr(
        std::fs::OpenOptions::new()
            .append(true)
            .open(log)
            .expect("agent log"),
    )
    .spawn()
    .expect("start rebalancer-agent");
    let t0 = std::time::Instant::now();
    while !std::path::Path::new(&sock).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "agent socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent
}

/// The real `rebalancer-agent` (built by `cargo build -p rebalancer-agent`, as CI's workspace build
/// does) in the cluster's namespace: handshake, `prepare-task` (netns, veth, address, root),
/// `register-task` and `task-exited` with the agent's own peer checks.
#[test]
#[ignore = "needs root, Slurm 22.05 daemons and target/<profile>/rebalancer-agent; .ci/run runs it with --include-ignored"]
fn real_agent_answers_the_plugin() {
    let _l = lock();
    setup("optional", &[]);
    let agent = KillOnDrop(start_real_agent(&format!("{DIR}/agent.log")));
    let out = slurm(&[
        "srun",
        "--migratable",
        "sh",
        "-c",
        "echo pid=$$ addr=$REBALANCER_ADDRESS; ip -br addr show dev eth0",
    ]);
    drop(agent);
    let (so, se) = text(&out);
    assert!(out.status.success(), "{so}{se}");
    assert!(so.contains("pid=1 "), "no container: {so}{se}");
    // The container has the address the agent gave it, from the configured subnet, on the
    // agent's veth.
    let addr = so
        .split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default();
    let octets: Vec<u8> = addr.split('.').filter_map(|o| o.parse().ok()).collect();
    assert!(
        octets.len() == 4 && octets[..2] == [198, 19] && (64..80).contains(&octets[2]),
        "{addr} is not in 198.19.64.0/20: {so}"
    );
    assert!(
        so.contains(&format!("{addr}/32")),
        "eth0 lacks {addr}: {so}"
    );
}

/// An agent killed and started again while a migratable task runs (a crash, or an upgrade):
/// the task keeps running, and when it ends its waiter, whose connection died with the old
/// agent, reports to the new one from the same process. srun exits with the task's code and
/// the new agent takes the report (it re-adopted the task and releases its namespace).
#[test]
#[ignore = "needs root, Slurm 22.05 daemons and target/<profile>/rebalancer-agent; .ci/run runs it with --include-ignored"]
fn a_task_reports_its_end_to_a_restarted_agent() {
    let _l = lock();
    setup("optional", &[]);
    let log = format!("{DIR}/agent-restart.log");
    let agent = KillOnDrop(start_real_agent(&log));
    let srun = spawn_slurm(&["srun", "--migratable", "sh", "-c", "sleep 5; exit 7"]);
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("task registered")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the task never registered:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGKILL: the agent writes nothing more; its container records stay.
    drop(agent);
    std::thread::sleep(Duration::from_millis(500));
    let agent = KillOnDrop(start_real_agent(&log));
    let out = srun.wait_with_output().expect("srun");
    drop(agent);
    let (so, se) = text(&out);
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(out.status.code(), Some(7), "{so}{se}\n{agent_log}");
    assert!(
        agent_log.contains("on a new connection (the agent restarted since)"),
        "the new agent did not take the report:\n{agent_log}\n{se}"
    );
    assert!(
        !agent_log.contains("refused a task-exited report"),
        "{agent_log}"
    );
}

/// A move between two nodes in Slurm's view: job J holds sp1 and sp2 (`salloc --no-shell -N2`),
/// the task runs as step J.0 on sp1, is dumped, and is restored as step J.1 on sp2 through sp2's
/// agent. While the restored task runs, squeue shows J.0 on sp1 (the waiter) and J.1 on sp2.
#[test]
#[ignore = "needs root, CRIU 4.2, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn task_moves_to_the_other_node_of_its_job() {
    let _l = lock();
    setup("required", &[]);
    let agent = FakeAgent::start(&agent_socket());
    agent.also_listen(&format!("{DIR}/agent-sp2.sock"));
    {
        let mut b = agent.behaviour.lock().unwrap_or_else(|e| e.into_inner());
        b.hold_first_exit = true;
        b.private_root = true;
    }
    let alloc = slurm(&["salloc", "--no-shell", "-p", "two", "-N2", "-J", "rbsp-two"]);
    let (_, ae) = text(&alloc);
    let job: u32 = ae
        .split("Granted job allocation ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|j| j.parse().ok())
        .unwrap_or_else(|| panic!("no allocation: {ae}"));
    let jobs = job.to_string();
    let src = spawn_slurm(&[
        "srun",
        "--jobid",
        &jobs,
        "-w",
        "sp1",
        "-N1",
        "-n1",
        "--migratable",
        "--chdir=/tmp",
        "--input=none",
        "sh",
        "-c",
        "i=0; while [ $i -lt 40 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done; exit 9",
    ]);
    let reg = agent.wait_for("register-task", 1, Duration::from_secs(20));
    assert_eq!(reg.len(), 1, "{:?}", agent.seen());
    let r = reg[0].registration.clone().expect("registration");
    assert_eq!(r.node, "sp1");
    wait_in_loop(r.pid);
    let (img, stdio) = dump(r.pid, job);
    let migration = "5d1e0c4a-2222-4b3c-8d4e-abcdefabcdef";
    agent
        .behaviour
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore_plan = Some(restore_plan(migration, &r, &img, stdio));
    let dst = spawn_slurm(&[
        "srun",
        "--jobid",
        &jobs,
        "-w",
        "sp2",
        "-N1",
        "-n1",
        "--overlap",
        "--chdir=/tmp",
        "--input=none",
        "-J",
        "rebalancer-restore",
        &format!("--rebalancer-restore={migration}"),
        "true",
    ]);
    resume_restored(&agent, 2);
    let regs = agent.wait_for("register-task", 2, Duration::from_secs(20));
    assert_eq!(regs.len(), 2, "{:?}", agent.seen());
    let restored = regs[1].registration.clone().expect("registration");
    assert_eq!(
        restored.node, "sp2",
        "restored through the destination's agent"
    );
    assert_eq!(regs[1].verified, Ok(()));
    let steps = text(&slurm(&["squeue", "-h", "-s", "-j", &jobs, "-o", "%i %N"])).0;
    assert!(steps.contains(&format!("{job}.0 sp1")), "{steps}");
    assert!(steps.contains(&format!("{job}.1 sp2")), "{steps}");
    let dst_out = dst.wait_with_output().expect("restore srun");
    report_final_status(&agent);
    let src_out = src.wait_with_output().expect("source srun");
    let (dso, dse) = text(&dst_out);
    let (sso, sse) = text(&src_out);
    let _ = slurm(&["scancel", &jobs]);
    assert_eq!(dst_out.status.code(), Some(9), "{dso}{dse}");
    assert!(
        dso.contains("tick 39\n") && !dso.contains("tick 0\n"),
        "{dso}"
    );
    assert!(
        sso.contains("tick 0\n") && !sso.contains("tick 39\n"),
        "{sso}"
    );
    assert_eq!(src_out.status.code(), Some(9), "{sso}{sse}");
}

#[test]
#[ignore = "needs root, network namespaces and Slurm 22.05 daemons; .ci/run runs it with --include-ignored"]
fn container_setup_failure_is_reported_and_fails_the_task() {
    let _l = lock();
    setup("optional", &[]);
    let agent = FakeAgent::start(&agent_socket());
    {
        let mut b = agent.behaviour.lock().unwrap_or_else(|e| e.into_inner());
        b.private_root = true;
        b.bad_mount = true;
    }
    let out = slurm(&["srun", "--migratable", "--chdir=/tmp", "true"]);
    let (so, se) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{so}{se}");
    assert!(
        se.contains("cannot bind /nonexistent-rbsp on") && se.contains("No such file or directory"),
        "{se}"
    );
    // Never registered, so never reported as exited.
    assert!(
        agent.seen().iter().all(|s| s.op == "prepare-task"),
        "{:?}",
        agent.seen()
    );
}
