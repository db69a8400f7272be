//! The `rebalctl` binary against an in-process controller that speaks the real control protocol:
//! output, progress lines, and the exit codes scripts rely on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use rebalancer_proto::control::*;
use rebalancer_proto::frame::{read_frame_async, write_frame_async, Frame, FrameKind};
use rebalancer_proto::*;
use tokio::net::{UnixListener, UnixStream};

type Seen = Arc<Mutex<Vec<ControlRequest>>>;

fn record(id: &str, state: MigrationState, phases: &[Phase]) -> MigrationRecord {
    MigrationRecord {
        id: id.into(),
        container: "j7.s0.t0".into(),
        task: None,
        source: "n1".into(),
        destination: "n2".into(),
        requested_mode: MigrationMode::Auto,
        mode: Some(MigrationMode::PostCopy),
        mode_reason: None,
        state,
        phases: phases
            .iter()
            .map(|p| PhaseRecord {
                phase: p.clone(),
                started_at: 1,
                ended_at: None,
            })
            .collect(),
        stats: MigrationStats {
            downtime_ms: state.is_terminal().then_some(170),
            bytes_sent: 3 << 20,
            ..Default::default()
        },
        error: None,
        started_at: 1_795_550_462_000,
        ended_at: None,
        cancelled_by: None,
    }
}

/// A stop-and-copy move that failed at restore and rolled back, with a multi-line error.
fn rolled_back() -> MigrationRecord {
    let t0 = 1_795_550_462_000;
    let mut r = record("feedface0001", MigrationState::RolledBack, &[]);
    r.task = Some(TaskRef {
        job_id: 7,
        step_id: 0,
        task_id: 0,
    });
    r.mode = Some(MigrationMode::StopAndCopy);
    r.phases = [
        (Phase::Prepare, 0, 12),
        (Phase::Freeze, 12, 15),
        (Phase::Dump, 15, 240),
        (Phase::Restore, 240, 325),
        (Phase::Rollback, 325, 330),
    ]
    .into_iter()
    .map(|(phase, a, b)| PhaseRecord {
        phase,
        started_at: t0 + a,
        ended_at: Some(t0 + b),
    })
    .collect();
    r.error = Some(
        "criu restore failed: srun exited with status 168 before registering:\nline two".into(),
    );
    r.ended_at = Some(t0 + 330);
    r
}

fn entry(r: MigrationRecord) -> MigrationEntry {
    MigrationEntry {
        record: r,
        decision: 1,
        policy: "operator:0".into(),
        uid: Some(0),
        slurm_synced: true,
        slurm_error: None,
        slurm_kept_source: None,
        slurm_holder: None,
    }
}

fn thermal_move(held: Option<String>) -> PlanItem {
    PlanItem {
        policy: "thermal".into(),
        container: "j7.s0.t0".into(),
        job_id: Some(7),
        source: "n1".into(),
        destination: "n2".into(),
        mode: MigrationMode::PostCopy,
        action: "recommend".into(),
        why: "n1 at 91 C above 85 C".into(),
        held,
    }
}

async fn send<T: serde::Serialize>(s: &mut UnixStream, kind: FrameKind, id: u32, m: &T) {
    let _ = write_frame_async(s, &Frame::json(kind, id, m).expect("frame")).await;
}

async fn conn(mut s: UnixStream, seen: Seen) {
    if read_frame_async(&mut s, MAX_FRAME_LEN).await.is_err() {
        return;
    }
    send(
        &mut s,
        FrameKind::Hello,
        0,
        &Hello::new(Role::Controller, "fake"),
    )
    .await;
    while let Ok(f) = read_frame_async(&mut s, MAX_FRAME_LEN).await {
        let id = f.header.id;
        let req: ControlRequest = f.decode(FrameKind::Request, "request").expect("request");
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req.clone());
        let err = |code, m: &str| ControlResponse::error(code, m);
        let resp = match req {
            ControlRequest::Ping => ControlResponse::Ok(ControlReply::Pong {
                software: "fake".into(),
            }),
            ControlRequest::ShowNodes { .. } => ControlResponse::Ok(ControlReply::Nodes {
                nodes: vec![NodeStatus {
                    name: "n1".into(),
                    slurm_state: "MIXED+DRAIN".into(),
                    cpus_total: 4,
                    cpus_alloc: 1,
                    mem_total_mb: 1000,
                    mem_alloc_mb: 0,
                    partitions: vec![],
                    agent: AgentHealth::Up,
                    agent_address: None,
                    agent_error: None,
                    metrics: None,
                    capabilities: None,
                    containers: 1,
                    in_flight: 0,
                    address_blocks: vec!["198.19.0.64/26".into()],
                }],
            }),
            ControlRequest::Migrate {
                target: MigrateTarget::Job { job_id: 99 },
                ..
            } => err(ErrorCode::NotFound, "job 99: no running container"),
            ControlRequest::Migrate { watch, .. } => {
                if watch {
                    for phases in [&[Phase::Prepare][..], &[Phase::Prepare, Phase::Freeze][..]] {
                        let ev = Event::MigrationProgress {
                            migration: record("0123456789ab", MigrationState::Running, phases),
                            progress_bytes: Some(1 << 20),
                        };
                        send(&mut s, FrameKind::Event, id, &ev).await;
                    }
                }
                let state = if watch {
                    MigrationState::Succeeded
                } else {
                    MigrationState::Running
                };
                ControlResponse::Ok(ControlReply::Migrated {
                    decisions: vec![],
                    migrations: vec![entry(record(
                        "0123456789ab",
                        state,
                        &[Phase::Prepare, Phase::Freeze],
                    ))],
                })
            }
            ControlRequest::Plan => ControlResponse::Ok(ControlReply::Plan {
                moves: vec![thermal_move(None)],
            }),
            // Job 8 asks for the held move and what stays.
            ControlRequest::Explain {
                job_id: Some(8), ..
            } => ControlResponse::Ok(ControlReply::Explanation {
                moves: vec![PlanItem {
                    container: "j8.s0.t0".into(),
                    job_id: Some(8),
                    action: "automatic".into(),
                    ..thermal_move(Some(
                        "backing off after a failed start until 2026-11-24T20:02:02Z: agent on n2 refused".into(),
                    ))
                }],
                unmoved: vec![Unmoved {
                    policy: "drain".into(),
                    node: "n1".into(),
                    container: Some("j8.s1.t0".into()),
                    job_id: Some(8),
                    code: "no-destination".into(),
                    reason: "no destination fits: n2: not enough free CPUs; n3: node state DRAIN"
                        .into(),
                    until: None,
                }],
            }),
            ControlRequest::Explain { .. } => ControlResponse::Ok(ControlReply::Explanation {
                moves: vec![thermal_move(None)],
                unmoved: vec![],
            }),
            ControlRequest::Evacuate { .. } => {
                err(ErrorCode::PermissionDenied, "uid 1000 may not evacuate")
            }
            ControlRequest::UpdatePolicy { .. } => err(ErrorCode::RolledBack, "odd but distinct"),
            ControlRequest::PolicyCheck { sources } => {
                let errors: Vec<String> = sources
                    .iter()
                    .filter(|s| s.text.contains("bad"))
                    .map(|s| format!("{}:1:1: bad policy", s.path))
                    .collect();
                ControlResponse::Ok(ControlReply::PolicyCheck {
                    report: PolicyCheckReport {
                        ok: errors.is_empty(),
                        policies: sources.iter().map(|_| "p".to_string()).collect(),
                        errors,
                    },
                })
            }
            ControlRequest::ShowContainers { job_id, .. } => {
                let c: ContainerInfo = serde_json::from_value(serde_json::json!({
                    "id": "j7.s0.t0", "task": {"job_id": 7, "step_id": 0, "task_id": 0},
                    "uid": 0, "gid": 0, "node": "n1", "address": "198.19.0.5", "pid": 4242,
                    "state": "running", "rss_bytes": 3145728, "cpus": 1.0, "class": null,
                    "exit_status": null, "started_at": 1_795_550_462_000u64,
                }))
                .expect("container");
                ControlResponse::Ok(ControlReply::Containers {
                    containers: if job_id.is_none_or(|j| j == 7) { vec![c] } else { vec![] },
                })
            }
            ControlRequest::ShowMigrations { id, .. } => {
                let all = vec![
                    entry(rolled_back()),
                    entry(record(
                        "0123456789ab",
                        MigrationState::Succeeded,
                        &[Phase::Prepare],
                    )),
                ];
                let ms: Vec<_> = all
                    .into_iter()
                    .filter(|m| {
                        id.as_ref()
                            .is_none_or(|i| m.record.id.starts_with(i.as_str()))
                    })
                    .collect();
                if ms.is_empty() {
                    err(ErrorCode::NotFound, "no migration 'zz' (or not yours)")
                } else {
                    ControlResponse::Ok(ControlReply::Migrations { migrations: ms })
                }
            }
            ControlRequest::History { .. } => ControlResponse::Ok(ControlReply::History {
                decisions: vec![DecisionRecord {
                    seq: 4,
                    at: 1_795_550_462_000,
                    policy: "drain".into(),
                    container: "j7.s0.t0".into(),
                    task: Some(TaskRef {
                        job_id: 7,
                        step_id: 0,
                        task_id: 0,
                    }),
                    uid: Some(0),
                    source: "n1".into(),
                    destination: "n2".into(),
                    mode: MigrationMode::StopAndCopy,
                    why: "n1 is DRAIN".into(),
                    outcome: DecisionOutcome::Started,
                    detail: None,
                    migration: Some("feedface0001".into()),
                }],
            }),
            ControlRequest::Watch { id: want } if want == "zz" => {
                err(ErrorCode::NotFound, "no migration 'zz' (or not yours)")
            }
            ControlRequest::Watch { id: want } => {
                let mid = format!("{want}0001");
                for phases in [&[Phase::Prepare][..], &[Phase::Prepare, Phase::Dump][..]] {
                    let ev = Event::MigrationProgress {
                        migration: record(&mid, MigrationState::Running, phases),
                        progress_bytes: None,
                    };
                    send(&mut s, FrameKind::Event, id, &ev).await;
                }
                if want.starts_with("slow") {
                    // Runs on past the test: only Ctrl-C ends rebalctl's wait.
                    tokio::time::sleep(std::time::Duration::from_secs(120)).await;
                }
                let mut end = record(&mid, MigrationState::Succeeded, &[Phase::Cleanup]);
                if want.starts_with("cancel") {
                    end.state = MigrationState::RolledBack;
                    end.cancelled_by = Some("uid 0 (root)".into());
                    end.error = Some("cancelled by uid 0 (root) before the commit point".into());
                }
                ControlResponse::Ok(ControlReply::Migrations {
                    migrations: vec![entry(end)],
                })
            }
            ControlRequest::Cancel { target } => {
                let one = |id: &str, accepted: bool| CancelOutcome {
                    migration: id.into(),
                    container: "j5.s0.t0".into(),
                    source: "n1".into(),
                    accepted,
                    message: if accepted {
                        "cancel accepted; n1 rolls it back".into()
                    } else {
                        format!("too late: migration {id} is committing")
                    },
                    code: (!accepted).then_some(ErrorCode::Busy),
                };
                match target {
                    CancelTarget::Migration { id } if id == "zz" => {
                        err(ErrorCode::NotFound, "no running migration 'zz'")
                    }
                    CancelTarget::Migration { id } if id.starts_with("late") => err(
                        ErrorCode::Busy,
                        "too late: migration late0001 is committing",
                    ),
                    CancelTarget::Migration { .. } => {
                        ControlResponse::Ok(ControlReply::Cancelled {
                            cancels: vec![one("feedface0001", true)],
                        })
                    }
                    CancelTarget::Job { .. } => ControlResponse::Ok(ControlReply::Cancelled {
                        cancels: vec![one("aaaa00001111", true), one("bbbb00002222", false)],
                    }),
                }
            }
            _ => err(ErrorCode::Unsupported, "fake"),
        };
        send(&mut s, FrameKind::Response, id, &resp).await;
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn rebalctl(sock: &Path, args: &[&str]) -> Out {
    let sock = sock.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let o = Command::new(env!("CARGO_BIN_EXE_rebalctl"))
            .arg("--socket")
            .arg(&sock)
            .args(&args)
            .output()
            .expect("run rebalctl");
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    })
    .await
    .expect("join")
}

fn start() -> (tempfile::TempDir, PathBuf, Seen) {
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("ctl.sock");
    let l = UnixListener::bind(&sock).expect("bind");
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(conn(s, s2.clone()));
        }
    });
    (dir, sock, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_and_exit_codes() {
    let (dir, sock, seen) = start();

    let o = rebalctl(&sock, &["show", "nodes"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.starts_with("NODE  STATE        AGENT  CPUS(A/T)"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("n1    MIXED+DRAIN  up     1/4"),
        "{}",
        o.stdout
    );

    let o = rebalctl(&sock, &["--json", "show", "nodes"]).await;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(v[0]["name"], "n1");

    // --wait: one progress line per phase on a non-terminal stderr, the final table on stdout.
    let o = rebalctl(
        &sock,
        &["migrate", "JobId=7", "node=n2", "mode=post-copy", "--wait"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{}", o.stderr);
    assert!(
        lines[0].starts_with("01234567 j7.s0.t0 n1->n2 [post-copy] prepare"),
        "{}",
        o.stderr
    );
    assert!(lines[1].contains("] freeze, 3.0MiB sent"), "{}", o.stderr);
    assert!(
        lines[2].contains("] succeeded, 3.0MiB sent, downtime 170 ms"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.contains("succeeded"), "{}", o.stdout);
    {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        assert!(seen.iter().any(|r| matches!(r,
            ControlRequest::Migrate { target: MigrateTarget::Job { job_id: 7 }, destination: Some(d), mode: Some(MigrationMode::PostCopy), watch: true } if d == "n2")));
    }

    let o = rebalctl(&sock, &["plan"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains(
            "thermal  recommend  j7.s0.t0   7    n1->n2  post-copy  n1 at 91 C above 85 C"
        ),
        "{}",
        o.stdout
    );

    let o = rebalctl(&sock, &["migrate", "job=99"]).await;
    assert_eq!(
        (o.code, o.stderr.trim()),
        (3, "rebalctl: job 99: no running container")
    );
    assert_eq!(rebalctl(&sock, &["evacuate", "node=n1"]).await.code, 4);
    assert_eq!(
        rebalctl(&sock, &["update", "policy=x", "state=disabled"])
            .await
            .code,
        10
    );

    // Argument errors never reach the controller.
    let before = seen.lock().unwrap_or_else(|p| p.into_inner()).len();
    let o = rebalctl(&sock, &["migrate", "job=x"]).await;
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("job 'x' is not a job id"), "{}", o.stderr);
    assert_eq!(rebalctl(&sock, &["show", "jobs"]).await.code, 2);
    assert_eq!(seen.lock().unwrap_or_else(|p| p.into_inner()).len(), before);

    // Policy files are checked by rebalctl itself, with no daemon (the socket does not exist).
    let nowhere = Path::new("/nonexistent/ctl.sock");
    let good = dir.path().join("good.toml");
    let bad = dir.path().join("bad.toml");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/drain.toml");
    std::fs::copy(shipped, &good).expect("copy the shipped drain policy");
    std::fs::write(&bad, "name = \"b\"\nkind = \"drain\"\nbogus_key = 1\n").expect("write");
    let before = seen.lock().unwrap_or_else(|p| p.into_inner()).len();
    let o = rebalctl(nowhere, &["policy", "check", &good.display().to_string()]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("drain"), "{}", o.stdout);
    let o = rebalctl(nowhere, &["policy", "check", &bad.display().to_string()]).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!("{}:3:1: ", bad.display())) && o.stderr.contains("bogus_key"),
        "{}",
        o.stderr
    );
    let o = rebalctl(
        nowhere,
        &["--json", "policy", "check", &bad.display().to_string()],
    )
    .await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("a JSON report");
    assert_eq!(v["ok"], false, "{v}");
    let o = rebalctl(nowhere, &["policy", "check", "/nonexistent/p.toml"]).await;
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert_eq!(seen.lock().unwrap_or_else(|p| p.into_inner()).len(), before);
    // Without a path, the running controller checks its own policy files.
    let o = rebalctl(&sock, &["policy", "check"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        seen.lock().unwrap_or_else(|p| p.into_inner()).len(),
        before + 1
    );

    let o = rebalctl(Path::new("/nonexistent/ctl.sock"), &["ping"]).await;
    assert_eq!(o.code, 6);
    assert!(
        o.stderr.contains("cannot reach rebalancerd"),
        "{}",
        o.stderr
    );

    // --json: errors are one JSON object on stdout, with the same exit status.
    let o = rebalctl(&sock, &["--json", "migrate", "job=99"]).await;
    assert_eq!(o.code, 3, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("a JSON error");
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    assert_eq!(v["error"]["exit_status"], 3, "{v}");
    assert_eq!(v["error"]["message"], "job 99: no running container", "{v}");
    let o = rebalctl(&sock, &["--json", "migrate", "job=x"]).await;
    assert_eq!(o.code, 2);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("a JSON error");
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    let o = rebalctl(&sock, &["--json", "ping"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(v, serde_json::json!({"software": "fake"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_read_as_outcomes_and_details() {
    let (_dir, sock, _seen) = start();
    // A started decision whose migration rolled back reads rolled-back, with the reason.
    let o = rebalctl(&sock, &["history"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let row = o.stdout.lines().nth(1).expect("a row");
    assert!(row.contains(" rolled-back "), "{}", o.stdout);
    assert!(!row.contains(" started "), "{}", o.stdout);
    assert!(row.contains("srun exited with status 168"), "{}", o.stdout);
    let o = rebalctl(&sock, &["--json", "history"]).await;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(v[0]["result"], "rolled-back", "{v}");
    assert_eq!(v[0]["outcome"], "started", "{v}");

    // The table has a reason column, one line per migration.
    let o = rebalctl(&sock, &["show", "migrations"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.lines().next().expect("header").ends_with("REASON"),
        "{}",
        o.stdout
    );
    assert_eq!(o.stdout.lines().count(), 3, "{}", o.stdout);

    // The detail view: ISO-8601 times with milliseconds and a phase table, no flattened dump.
    let o = rebalctl(&sock, &["show", "migration", "feedface"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let d = &o.stdout;
    assert!(d.starts_with("Migration=feedface0001\n"), "{d}");
    assert!(d.contains("State=rolled-back"), "{d}");
    assert!(d.contains("Started=2026-11-24T20:01:02.000Z"), "{d}");
    assert!(d.contains("Total=330 ms"), "{d}");
    assert!(
        d.contains(
            "Error=criu restore failed: srun exited with status 168 before registering: line two\n"
        ),
        "{d}"
    );
    assert!(!d.contains("phases["), "{d}");
    let dump = d
        .lines()
        .find(|l| l.trim_start().starts_with("dump "))
        .expect("a dump row");
    assert!(
        dump.contains("2026-11-24T20:01:02.015Z") && dump.ends_with("225 ms"),
        "{dump}"
    );
    assert!(
        d.lines().any(|l| l.trim_start().starts_with("PHASE")),
        "{d}"
    );

    // plan explains: why a move is held back, what stays and why, for one job.
    let o = rebalctl(&sock, &["plan", "JobId=8"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert!(lines[0].contains(" HELD "), "{}", o.stdout);
    assert!(
        lines[1].contains("backing off after a failed start until 2026-11-24T20:02:02Z"),
        "{}",
        o.stdout
    );
    let stays = lines
        .iter()
        .position(|l| l.starts_with("POLICY") && l.contains("NOT MOVED"))
        .expect("a not-moved table");
    assert!(
        lines[stays + 1].contains("j8.s1.t0")
            && lines[stays + 1].contains("no-destination")
            && lines[stays + 1].contains("n2: not enough free CPUs; n3: node state DRAIN"),
        "{}",
        o.stdout
    );
    let o = rebalctl(&sock, &["plan", "colour=red"]).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_view_and_filters() {
    let (_dir, sock, _seen) = start();
    // scontrol's spelling: the job's containers, moves and decisions.
    let o = rebalctl(&sock, &["show", "job=7"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.starts_with("JobId=7 Containers=1 Moves=1\n"),
        "{}",
        o.stdout
    );
    let moves = o.stdout.split("Moves:").nth(1).expect("a moves table");
    assert!(
        moves.contains("feedface") && !moves.contains("01234567"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("Decisions:"), "{}", o.stdout);
    let o = rebalctl(&sock, &["--json", "show", "job", "7"]).await;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(v["job_id"], 7, "{v}");
    assert_eq!(v["migrations"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["decisions"][0]["result"], "rolled-back", "{v}");
    let o = rebalctl(&sock, &["show", "JobId=99"]).await;
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("job 99: no container, migration or decision"),
        "{}",
        o.stderr
    );

    // Filters narrow tables; values are case-insensitive.
    let o = rebalctl(&sock, &["show", "migrations", "State=Succeeded"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.lines().count(), 2, "{}", o.stdout);
    assert!(o.stdout.contains("01234567"), "{}", o.stdout);
    let o = rebalctl(&sock, &["show", "migrations", "job=7", "node=n2"]).await;
    assert_eq!(o.stdout.lines().count(), 2, "{}", o.stdout);
    assert!(o.stdout.contains("feedface"), "{}", o.stdout);
    let o = rebalctl(&sock, &["--json", "history", "policy=thermal"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), "[]");
    let o = rebalctl(&sock, &["--json", "history", "job=7", "outcome=started"]).await;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    let o = rebalctl(&sock, &["show", "nodes", "NodeName=n1"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("NodeName=n1"), "{}", o.stdout);
    let o = rebalctl(&sock, &["show", "containers", "colour=red"]).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("unknown key 'colour'"), "{}", o.stderr);

    // --json --wait streams each event as a JSON line, then the result as the last line.
    let o = rebalctl(&sock, &["--json", "migrate", "job=7", "node=n2", "--wait"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let docs: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON document per line"))
        .collect();
    assert!(docs.len() >= 2, "{}", o.stdout);
    let (last, events) = docs.split_last().expect("lines");
    assert!(
        events.iter().all(|e| e["event"] == "migration-progress"),
        "{}",
        o.stdout
    );
    assert_eq!(
        last["migrations"][0]["record"]["state"], "succeeded",
        "{last}"
    );
    assert!(o.stderr.is_empty(), "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_says_what_became_of_each_migration_and_exits_as_documented() {
    let (_dir, sock, seen) = start();
    let o = rebalctl(&sock, &["cancel", "migration=feedface"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout,
        "migration feedface (j5.s0.t0 on n1): cancel accepted; n1 rolls it back\n"
    );
    assert_eq!(
        seen.lock().unwrap_or_else(|p| p.into_inner()).last(),
        Some(&ControlRequest::Cancel {
            target: CancelTarget::Migration {
                id: "feedface".into()
            }
        })
    );
    // scontrol spellings; too late is busy (5), not running is not found (3).
    let o = rebalctl(&sock, &["cancel", "MigrationId=late"]).await;
    assert_eq!(o.code, 5, "{}", o.stderr);
    assert_eq!(
        o.stderr,
        "rebalctl: too late: migration late0001 is committing\n"
    );
    let o = rebalctl(&sock, &["cancel", "migration=zz"]).await;
    assert_eq!(o.code, 3, "{}", o.stderr);
    // A job's cancel that one of its migrations refused: both listed, the refusal's status.
    let o = rebalctl(&sock, &["cancel", "JobId=5"]).await;
    assert_eq!(o.code, 5, "{}", o.stderr);
    assert_eq!(o.stdout.lines().count(), 2, "{}", o.stdout);
    assert!(
        o.stdout.contains("bbbb0000 (j5.s0.t0 on n1): too late"),
        "{}",
        o.stdout
    );
    let o = rebalctl(&sock, &["--json", "cancel", "job=5"]).await;
    assert_eq!(o.code, 5, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(v[0]["accepted"], true, "{v}");
    assert_eq!(v[1]["accepted"], false, "{v}");
    assert_eq!(v[1]["code"], "busy", "{v}");
    // Bad arguments never reach the controller.
    let before = seen.lock().unwrap_or_else(|p| p.into_inner()).len();
    for args in [
        &["cancel", "job=5", "migration=x"][..],
        &["cancel", "job=abc"],
        &["cancel", "node=n1"],
    ] {
        let o = rebalctl(&sock, args).await;
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
    }
    let o = rebalctl(&sock, &["cancel", "job=5", "migration=x"]).await;
    assert!(
        o.stderr.contains("give only one of migration= and job="),
        "{}",
        o.stderr
    );
    assert_eq!(seen.lock().unwrap_or_else(|p| p.into_inner()).len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_a_migration_and_exits_with_its_outcome() {
    let (_dir, sock, seen) = start();
    // Succeeded: the progress lines, the table, exit 0.
    let o = rebalctl(&sock, &["wait", "migration=ok"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("ok0001 j7.s0.t0 n1->n2 [post-copy] dump"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("succeeded"), "{}", o.stderr);
    assert!(o.stdout.starts_with("MIGRATION "), "{}", o.stdout);
    assert_eq!(
        seen.lock().unwrap_or_else(|p| p.into_inner()).last(),
        Some(&ControlRequest::Watch { id: "ok".into() })
    );
    // Cancelled: exit 10 like any rollback, naming the outcome.
    let o = rebalctl(&sock, &["wait", "cancel"]).await;
    assert_eq!(o.code, 10, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("migration cancel0001 of j7.s0.t0 ended cancelled: cancelled by uid 0"),
        "{}",
        o.stderr
    );
    // `show migration ID --wait` is the same request; JSON: one document per line.
    let o = rebalctl(&sock, &["--json", "show", "migration", "ok", "--wait"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{}", o.stdout);
    assert_eq!(lines[0]["event"], "migration-progress");
    assert_eq!(lines[2][0]["record"]["state"], "succeeded");
    let o = rebalctl(&sock, &["show", "migrations", "--wait"]).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    let o = rebalctl(&sock, &["wait", "migration=zz"]).await;
    assert_eq!(o.code, 3, "{}", o.stderr);

    // Ctrl-C detaches: the migration is left alone and the user told how to find it again.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rebalctl"))
        .arg("--socket")
        .arg(&sock)
        .args(["--json", "wait", "migration=slow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut first)
        .await
        .expect("a progress line");
    assert!(first.contains("slow0001"), "{first}");
    let pid = child.id().expect("pid").to_string();
    let k = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(k.success());
    let o = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("rebalctl ends at Ctrl-C")
        .expect("wait");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(
            "detached; migration slow0001 goes on (rebalctl wait migration=slow0001 re-attaches"
        ),
        "{stderr}"
    );
    // Nothing was cancelled.
    assert!(!seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|r| matches!(r, ControlRequest::Cancel { .. })));
}
