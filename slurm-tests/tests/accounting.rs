//! Slurm's own accounting after a move, on the real 3-node cluster with the whole product (the
//! fixture of migration.rs): after a task moved node1 → node2, slurmctld must count on node2
//! what a job started there would have and nothing on node1, so that a competing allocation
//! that does not fit is refused (docs/slurm-releases.md: the expansion alone leaves node2 at
//! `CPUAlloc=0`; the controller's holder allocation fills the gap). And a named destination that
//! is DRAIN is refused at once, with its reason.

// The fixture serves several test files; each uses part of it.
#![allow(dead_code)]

include!("common/e2e.rs");

/// `CPUAlloc` and `AllocMem` of `scontrol show node NODE`, and the line the test logs.
fn node_alloc(e: &E2e, node: &str) -> (u32, u64, String) {
    let text = e
        .cluster()
        .scontrol(&["show", "node", node, "-o"])
        .unwrap_or_else(|err| panic!("scontrol show node {node}: {err}"));
    let kv = slurm_tests::parse_key_values(&text);
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok());
    let cpus = num("CPUAlloc")
        .unwrap_or_else(|| panic!("no CPUAlloc in scontrol show node {node}: {text}"));
    let line = ["CPUAlloc", "CPUTot", "AllocMem", "State", "AllocTRES"]
        .iter()
        .map(|k| format!("{k}={}", kv.get(*k).map(String::as_str).unwrap_or("")))
        .collect::<Vec<_>>()
        .join(" ");
    (cpus as u32, num("AllocMem").unwrap_or(0), line)
}

/// Holder allocations Slurm still runs or queues (squeue, every state but the ended ones).
fn holders_in_squeue(e: &E2e) -> Vec<String> {
    let out = e
        .cluster()
        .run_ok("squeue", ["-h", "-o", "%i %j %T %N"])
        .unwrap_or_else(|err| panic!("squeue: {err}"));
    out.lines()
        .filter(|l| l.contains("rebal-hold:"))
        .map(str::to_owned)
        .collect()
}

/// A migratable TCP server as one task of an salloc job on node1; returns the job and the
/// container's id once the controller sees it running there.
/// The test server's job and container id ([`E2e::start_server`]).
fn start_server(e: &mut E2e, name: &str) -> (JobId, String) {
    let (job, c) = e.start_server(name);
    let cid = c["id"].as_str().expect("container id").to_owned();
    (job, cid)
}

/// `salloc --no-shell -N1 -n<cpus> -w NODE --immediate=5`: the granted job, or None when Slurm
/// refused it (it did not fit).
fn compete(e: &mut E2e, node: &str, cpus: u32) -> Option<JobId> {
    let n = format!("-n{cpus}");
    let args = [
        "-N1",
        n.as_str(),
        "-w",
        node,
        "--immediate=5",
        "-J",
        "competitor",
    ];
    let run = e
        .cluster()
        .run("salloc", [&["--no-shell"][..], &args[..]].concat())
        .unwrap_or_else(|err| panic!("salloc: {err}"));
    e.log(&format!(
        "$ salloc --no-shell {}: {}",
        args.join(" "),
        run.stderr.trim()
    ));
    if !run.success {
        return None;
    }
    let job = slurm_tests::granted_job(run).unwrap_or_else(|err| panic!("{err}"));
    e.jobs.push(job);
    Some(job)
}

#[test]
#[ignore = "needs root, CRIU, network namespaces and the Slurm daemons; .ci/run runs it with --include-ignored"]
fn a_moved_task_is_accounted_on_its_destination_only() {
    let mut e = E2e::start("accounting");
    let (job, cid) = start_server(&mut e, "rb-acct");

    // What a job started on a node counts there: this job on node1 before the move (it is
    // alone on the cluster, and node2 is the same kind of node).
    let (started, started_mem, n1) = node_alloc(&e, "node1");
    let (idle2, _, n2) = node_alloc(&e, "node2");
    e.log(&format!("before the move: node1 {n1}"));
    e.log(&format!("before the move: node2 {n2}"));
    assert!(started >= 1, "node1 counts no CPU for job {job}: {n1}");
    assert_eq!(idle2, 0, "node2 is not idle before the move: {n2}");
    let total = e
        .cluster()
        .scontrol(&["show", "node", "node2", "-o"])
        .ok()
        .and_then(|t| slurm_tests::parse_key_values(&t).get("CPUTot").cloned())
        .and_then(|v| v.parse::<u32>().ok())
        .expect("CPUTot of node2");

    let t0 = Instant::now();
    let v = e
        // Without --wait: with --json, --wait streams progress lines, not one document.
        .rebalctl(&["migrate", &format!("container={cid}"), "node=node2"])
        .unwrap_or_else(|err| panic!("{err}\n{}", e.context()));
    e.log(&format!(
        "migrate answered after {} ms: {v}",
        t0.elapsed().as_millis()
    ));
    let m = e.wait_migration(&cid);
    e.assert_migrated(&m, "node1", "node2");
    e.wait_container(job, 0, "node2", SLURM);
    if let Some(d) = m
        .pointer("/record/stats/downtime_ms")
        .and_then(Value::as_u64)
    {
        e.figure(&format!("accounting move: downtime {d} ms"));
    }

    // Slurm counts on node2 what the job started there would have, and node1 is free again.
    let waited = slurm_tests::wait_until("node2's CPUAlloc to count the moved task", SLURM, || {
        let (c, _, line) = node_alloc(&e, "node2");
        Ok(if c == started {
            Poll::Done(line)
        } else {
            Poll::Pending(line)
        })
    });
    let after2 = waited.unwrap_or_else(|err| panic!("{err}\n{}", e.context()));
    let (free1, _, after1) = node_alloc(&e, "node1");
    let (_, mem2, _) = node_alloc(&e, "node2");
    e.log(&format!("after the move: node1 {after1}"));
    e.log(&format!("after the move: node2 {after2}"));
    e.log(&format!(
        "AllocMem: job on node1 before {started_mem} MB, node2 after {mem2} MB"
    ));
    assert_eq!(
        free1,
        0,
        "node1 still counts CPUs: {after1}\n{}",
        e.context()
    );
    assert_eq!(
        e.cluster().job_nodes(job).expect("scontrol show job"),
        "node2",
        "{}",
        e.context()
    );
    let holders = holders_in_squeue(&e);
    e.log(&format!("holders: {holders:?}"));
    let name = format!("rebal-hold:{job}:{cid}");
    assert!(
        holders
            .iter()
            .any(|h| h.contains(&name) && h.ends_with("node2")),
        "no holder {name} on node2 in squeue: {holders:?}\n{}",
        e.context()
    );

    // A job that needs all of node2's CPUs does not fit; on node1 it does.
    if let Some(c) = compete(&mut e, "node2", total) {
        let (_, _, line) = node_alloc(&e, "node2");
        panic!(
            "Slurm granted job {c} all {total} CPUs of node2 while job {job}'s task runs there: {line}\n{}",
            e.context()
        );
    }
    let granted = compete(&mut e, "node1", total)
        .unwrap_or_else(|| panic!("a {total}-CPU job on node1 was refused\n{}", e.context()));
    e.cluster()
        .run_ok("scancel", [granted.to_string()])
        .unwrap_or_else(|err| panic!("scancel {granted}: {err}"));

    // `rebalctl show job` names the holder.
    let shown = e
        .rebalctl(&["show", "job", &job.to_string()])
        .unwrap_or_else(|err| panic!("{err}"));
    let line = shown["migrations"]
        .as_array()
        .and_then(|ms| ms.iter().find_map(|m| m["slurm_holder"].as_str()))
        .unwrap_or_default()
        .to_owned();
    e.log(&format!("rebalctl show job {job}: holder {line:?}"));
    assert!(
        line.contains("holds") && line.contains("node2"),
        "show job does not show the holder: {shown}"
    );

    // A controller restart keeps the live holder and cancels an orphan: a holder of the
    // controller's user that its journal does not know (here made by hand, as a request whose
    // answer a crash lost would leave one).
    let orphan_name = "rebal-hold:999:j999.s0.t0";
    let orphan = e
        .cluster()
        .salloc_no_shell(&["-N1", "-n1", "--mem=1", "-w", "node3", "-J", orphan_name])
        .unwrap_or_else(|err| panic!("salloc the orphan: {err}"));
    e.jobs.push(orphan);
    e.log(&format!("orphan holder {orphan_name} is job {orphan}"));
    if let Some(mut c) = e.controller.take() {
        stop_child(&mut c);
    }
    let t_restart = Instant::now();
    e.start_controller();
    let seen = slurm_tests::wait_until(
        "the restarted controller to cancel the orphaned holder",
        SLURM,
        || {
            let h = holders_in_squeue(&e);
            Ok(if !h.iter().any(|l| l.contains(orphan_name)) {
                Poll::Done(h)
            } else {
                Poll::Pending(format!("{h:?}"))
            })
        },
    );
    let left = seen.unwrap_or_else(|err| {
        panic!(
            "{err}
{}",
            e.context()
        )
    });
    e.log(&format!(
        "{} ms after the restart: orphan gone, holders {left:?}",
        t_restart.elapsed().as_millis()
    ));
    assert!(
        left.iter()
            .any(|h| h.contains(&name) && h.contains("RUNNING")),
        "the live holder did not survive the restart: {left:?}\n{}",
        e.context()
    );
    let (c, _, line) = node_alloc(&e, "node2");
    assert_eq!(c, started, "node2 after the restart: {line}");

    // The job ends: nothing of the holder remains.
    e.cluster()
        .run_ok("scancel", [job.to_string()])
        .unwrap_or_else(|err| panic!("scancel {job}: {err}"));
    let t_end = Instant::now();
    let gone = slurm_tests::wait_until("the holder to end with the job", SLURM, || {
        let h = holders_in_squeue(&e);
        let (c, _, line) = node_alloc(&e, "node2");
        Ok(if h.is_empty() && c == 0 {
            Poll::Done(line)
        } else {
            Poll::Pending(format!("{h:?} node2 {line}"))
        })
    });
    let line = gone.unwrap_or_else(|err| panic!("{err}\n{}", e.context()));
    e.log(&format!(
        "{} ms after the job's end: no holder in squeue, node2 {line}",
        t_end.elapsed().as_millis()
    ));
    // scontrol keeps an ended job for MinJobAge; the holder may show there only as ended.
    let jobs = e
        .cluster()
        .run_ok("scontrol", ["show", "job", "-o"])
        .unwrap_or_default();
    for l in jobs.lines().filter(|l| l.contains(&name)) {
        let kv = slurm_tests::parse_key_values(l);
        let state = kv.get("JobState").map(String::as_str).unwrap_or("");
        assert!(
            matches!(state, "CANCELLED" | "COMPLETED" | "TIMEOUT"),
            "the holder is still {state} after the job ended: {l}"
        );
    }
}

#[test]
#[ignore = "needs root, CRIU, network namespaces and the Slurm daemons; .ci/run runs it with --include-ignored"]
fn a_drained_named_destination_is_refused_at_once_with_its_reason() {
    let mut e = E2e::start("drained-dest");
    let (job, cid) = start_server(&mut e, "rb-drained");
    e.drain("node2", "maintenance test");
    e.cluster()
        .wait_node_state("node2", "drained", SLURM)
        .unwrap_or_else(|err| panic!("{err}\n{}", e.context()));
    // The controller judges the node from its watch's last poll: let it see the drain.
    thread::sleep(Duration::from_secs(2));

    let t0 = Instant::now();
    let out = Command::new(&e.bins.rebalctl)
        .arg("--socket")
        .arg(e.path("ctl.sock"))
        .args([
            "migrate",
            &format!("container={cid}"),
            "node=node2",
            "--wait",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run rebalctl");
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    e.log(&format!(
        "$ rebalctl migrate container={cid} node=node2 --wait: {} after {} ms: {stderr}",
        out.status,
        took.as_millis()
    ));
    e.figure(&format!(
        "drained destination refused after {} ms",
        took.as_millis()
    ));
    // rebalctl's exit code of `no-room` (rebalctl(1)).
    assert_eq!(out.status.code(), Some(8), "{stderr}\n{}", e.context());
    assert!(
        stderr.contains("node2 cannot take") && stderr.contains("DRAIN"),
        "the refusal does not name the node and its state: {stderr}"
    );
    assert!(
        !stderr.contains("did not start within"),
        "refused only after the expansion timed out: {stderr}"
    );
    // Nothing moved, and the job was not expanded onto node2.
    assert_eq!(
        e.cluster().job_nodes(job).expect("scontrol show job"),
        "node1",
        "{}",
        e.context()
    );
    e.wait_container(job, 0, "node1", SLURM);
}
