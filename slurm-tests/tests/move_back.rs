//! Issue #14: a move straight back to the node a task just left. It used to roll back with
//! `Task launch for StepId=J.S failed on node node1: Job credential revoked`: slurmd refuses a
//! credential created at or before the job's last revocation on that node, which it records
//! when the job leaves the node (docs/slurm-releases.md, "The move straight back"). Here an
//! operator moves a task node1 -> node2 and, as soon as that move is done, back to node1; the
//! second move must succeed like the first, with the client connected throughout.

// The fixture serves several test files; each uses part of it.
#![allow(dead_code)]

include!("common/e2e.rs");

/// The newest migration of CONTAINER that left SOURCE, once it has ended (as
/// [`E2e::wait_migration`], but for a container that has moved before).
fn wait_migration_from(e: &E2e, container: &str, source: &str) -> Value {
    let r = slurm_tests::wait_until(
        &format!("the migration of {container} from {source} to end"),
        MIGRATION,
        || {
            let list = match e.rebalctl(&["show", "migrations"]) {
                Ok(v) => v.as_array().cloned().unwrap_or_default(),
                Err(err) => return Ok(Poll::Pending(err)),
            };
            let found = list.iter().rev().find(|m| {
                m.pointer("/record/container").and_then(Value::as_str) == Some(container)
                    && m.pointer("/record/source").and_then(Value::as_str) == Some(source)
            });
            Ok(match found {
                Some(m) => {
                    let state = m
                        .pointer("/record/state")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let synced = m.get("slurm_synced").and_then(Value::as_bool) == Some(true);
                    let slurm_error = m.get("slurm_error").is_some_and(|v| !v.is_null());
                    if matches!(state, "rolled-back" | "failed")
                        || (state == "succeeded" && (synced || slurm_error))
                    {
                        Poll::Done(m.clone())
                    } else {
                        Poll::Pending(m.to_string())
                    }
                }
                None => Poll::Pending(format!("no migration of {container} from {source} yet")),
            })
        },
    );
    r.unwrap_or_else(|err| panic!("{err}\n{}", e.context()))
}

#[test]
#[ignore = "needs root, CRIU, network namespaces and the Slurm daemons; .ci/run runs it with --include-ignored"]
fn a_task_moves_straight_back_to_the_node_it_left() {
    let mut e = E2e::start("move-back");
    let (job, before) = e.start_server("rb-back");
    let cid = before["id"].as_str().expect("container id").to_owned();
    let addr = before["address"].as_str().expect("address").to_owned();
    let client_job = e.salloc(&["-N1", "-n1", "-c2", "-w", "node3", "-J", "rb-client"]);
    e.start_client(client_job, "2", "client", &addr);

    e.rebalctl(&["migrate", &format!("container={cid}"), "node=node2"])
        .unwrap_or_else(|err| panic!("{err}\n{}", e.context()));
    let there = wait_migration_from(&e, &cid, "node1");
    e.assert_migrated(&there, "node1", "node2");
    e.wait_container(job, 0, "node2", SLURM);
    assert_eq!(e.squeue_nodes(job), "node2", "{}", e.context());
    let left = Instant::now();

    // Back at once: node1 left the job a moment ago, so slurmd there holds a fresh revocation.
    let asked_after = left.elapsed();
    e.rebalctl(&["migrate", &format!("container={cid}"), "node=node1"])
        .unwrap_or_else(|err| panic!("{err}\n{}", e.context()));
    let back = wait_migration_from(&e, &cid, "node2");
    e.figure(&format!(
        "move back: asked {} ms after the move to node2 was seen in Slurm; its downtime {} ms",
        asked_after.as_millis(),
        back.pointer("/record/stats/downtime_ms")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    ));
    e.assert_migrated(&back, "node2", "node1");

    let after = e.wait_container(job, 0, "node1", SLURM);
    assert_eq!(after["address"].as_str(), Some(addr.as_str()));
    let pid = after["pid"].as_i64().expect("pid") as i32;
    placement(pid, job, "node1")
        .unwrap_or_else(|err| panic!("the server is not back under node1's slurmstepd: {err}"));
    assert_eq!(e.squeue_nodes(job), "node1", "{}", e.context());
    e.assert_client_undisturbed("client");

    let bye = e.quit_client("client");
    let code = e.wait_srun_exit("server-srun", SLURM);
    assert_whole_output(&e, "server.out", &bye);
    assert_eq!(
        code,
        3,
        "the user's srun exited {code}, not with the server's code 3\n{}\n{}",
        tail(&e.path("server-srun.log"), 30),
        e.context()
    );
}
