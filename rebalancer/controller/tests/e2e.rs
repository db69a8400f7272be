//! End to end: the real `rebalancerd` binary against fake node agents speaking the real protocol
//! over Unix sockets, and a fake `scontrol`/`salloc` on PATH standing in for Slurm. No root needed
//! (except the SO_PEERCRED test, which connects as another uid).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rebalancer_proto::control::{
    ControlReply, ControlRequest, ControlResponse, DecisionOutcome, MigrateTarget,
};
use rebalancer_proto::frame::{read_frame_async, write_frame_async, Frame, FrameKind};
use rebalancer_proto::*;
use tokio::net::{UnixListener, UnixStream};

// ---- fake agents ------------------------------------------------------------------------------

#[derive(Default)]
struct Fake {
    containers: BTreeMap<String, Vec<ContainerInfo>>,
    migrations: BTreeMap<String, MigrationRecord>,
    requests: Vec<(String, String)>,
    delay: Duration,
    /// Refuse every migration (a start that fails).
    refuse: bool,
}

type Shared = Arc<Mutex<Fake>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Fake> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn container(id: &str, node: &str, job: u32) -> ContainerInfo {
    ContainerInfo {
        id: id.into(),
        task: Some(TaskRef {
            job_id: job,
            step_id: 0,
            task_id: 0,
        }),
        uid: 1000,
        gid: 1000,
        node: node.into(),
        address: "198.19.48.10".into(),
        pid: Some(4242),
        state: ContainerState::Running,
        rss_bytes: 50 << 20,
        cpus: Some(1.0),
        class: None,
        exit_status: None,
        started_at: now_millis(),
        runs_in: None,
    }
}

async fn send<T: serde::Serialize>(s: &mut UnixStream, kind: FrameKind, id: u32, m: &T) {
    let f = Frame::json(kind, id, m).expect("frame");
    let _ = write_frame_async(s, &f).await;
}

fn spawn_agent(dir: &Path, node: &str, fake: Shared) {
    let path = dir.join(format!("{node}.sock"));
    let l = UnixListener::bind(&path).expect("bind agent");
    let node = node.to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(agent_conn(s, node.clone(), fake.clone()));
        }
    });
}

async fn agent_conn(mut s: UnixStream, node: String, fake: Shared) {
    let Ok(f) = read_frame_async(&mut s, MAX_FRAME_LEN).await else {
        return;
    };
    assert_eq!(f.header.kind, FrameKind::Hello);
    send(
        &mut s,
        FrameKind::Hello,
        0,
        &Hello::new(Role::Agent, "fake-agent"),
    )
    .await;
    while let Ok(f) = read_frame_async(&mut s, MAX_FRAME_LEN).await {
        let id = f.header.id;
        let req: Request = f.decode(FrameKind::Request, "request").expect("request");
        let op = serde_json::to_value(&req).expect("json")["op"]
            .as_str()
            .unwrap_or("")
            .to_string();
        lock(&fake).requests.push((node.clone(), op));
        let resp = match req {
            Request::Metrics => Response::Ok(Reply::Metrics {
                metrics: NodeMetrics {
                    node: node.clone(),
                    at: now_millis(),
                    load1: 0.5,
                    cpus: 4,
                    mem_total_bytes: 4 << 30,
                    mem_available_bytes: 3 << 30,
                    temperature_c: Some(45.0),
                    containers: 0,
                },
            }),
            Request::Capabilities => Response::Ok(Reply::Capabilities {
                capabilities: NodeCapabilities {
                    node: node.clone(),
                    criu_version: Some("4.2.1".into()),
                    criu_path: None,
                    uffd: true,
                    tcp_established: true,
                    nftables_lock: true,
                    dirty_tracking: false,
                    modes: vec![MigrationMode::StopAndCopy, MigrationMode::PostCopy],
                    notes: vec![],
                },
            }),
            Request::ListContainers => Response::Ok(Reply::Containers {
                containers: lock(&fake)
                    .containers
                    .get(&node)
                    .cloned()
                    .unwrap_or_default(),
            }),
            Request::GetMigration { id: mid } => match lock(&fake).migrations.get(&mid) {
                Some(m) => Response::Ok(Reply::Migration {
                    migration: m.clone(),
                }),
                None => Response::error(ErrorCode::NotFound, format!("no migration {mid}")),
            },
            // Like the real source: accepted before the commit point (network-switch), and
            // the migration then ends rolled back, naming who cancelled it.
            Request::CancelMigration { id: mid, by } => {
                match lock(&fake).migrations.get_mut(&mid) {
                    Some(m) if m.state.is_terminal() => {
                        Response::error(ErrorCode::NotFound, format!("no running migration {mid}"))
                    }
                    Some(m) if m.phases.iter().any(|p| p.phase == Phase::NetworkSwitch) => {
                        Response::error(
                            ErrorCode::Busy,
                            format!("too late: migration {mid} is committing"),
                        )
                    }
                    Some(m) => {
                        m.state = MigrationState::RolledBack;
                        m.error = Some(format!("cancelled by {by}"));
                        m.cancelled_by = Some(by);
                        m.ended_at = Some(now_millis());
                        Response::Ok(Reply::Migration {
                            migration: m.clone(),
                        })
                    }
                    None => Response::error(ErrorCode::NotFound, format!("no migration {mid}")),
                }
            }
            Request::Migrate { .. } if lock(&fake).refuse => {
                Response::error(ErrorCode::Busy, "fake agent refuses the migration")
            }
            Request::Migrate { request, watch } => {
                let Some(mid) = start_migration(&fake, &node, &request) else {
                    let r = Response::error(ErrorCode::NotFound, "no such container");
                    send(&mut s, FrameKind::Response, id, &r).await;
                    continue;
                };
                // Like the real agent: events until the end, then the final record (or an
                // error for a rollback).
                let mut last = None;
                loop {
                    let rec = lock(&fake).migrations.get(&mid).cloned().expect("rec");
                    if rec.state.is_terminal() {
                        let r = match rec.state {
                            MigrationState::Succeeded => {
                                Response::Ok(Reply::Migration { migration: rec })
                            }
                            _ => Response::error(ErrorCode::RolledBack, "rolled back"),
                        };
                        if watch {
                            send(&mut s, FrameKind::Response, id, &r).await;
                        }
                        break;
                    }
                    if !watch {
                        send(
                            &mut s,
                            FrameKind::Response,
                            id,
                            &Response::Ok(Reply::Migration { migration: rec }),
                        )
                        .await;
                        break;
                    }
                    if last.as_ref() != Some(&rec) {
                        let ev = Event::MigrationProgress {
                            migration: rec.clone(),
                            progress_bytes: Some(1 << 20),
                        };
                        send(&mut s, FrameKind::Event, id, &ev).await;
                        last = Some(rec);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                continue;
            }
            other => Response::error(ErrorCode::Unsupported, format!("fake agent: {other:?}")),
        };
        send(&mut s, FrameKind::Response, id, &resp).await;
    }
}

/// Runs a migration in the background (it outlives the controller's connection).
fn start_migration(fake: &Shared, node: &str, req: &MigrateRequest) -> Option<String> {
    let mut f = lock(fake);
    let c = f
        .containers
        .get(node)?
        .iter()
        .find(|c| c.id == req.container)?
        .clone();
    let id = uuid::Uuid::new_v4().to_string();
    let rec = MigrationRecord {
        id: id.clone(),
        container: c.id.clone(),
        task: c.task.clone(),
        source: node.into(),
        destination: req.destination.clone(),
        requested_mode: req.mode,
        mode: Some(MigrationMode::StopAndCopy),
        mode_reason: Some("fake".into()),
        state: MigrationState::Running,
        phases: vec![PhaseRecord {
            phase: Phase::Prepare,
            started_at: now_millis(),
            ended_at: None,
        }],
        stats: MigrationStats::default(),
        error: None,
        started_at: now_millis(),
        ended_at: None,
        cancelled_by: None,
    };
    f.migrations.insert(id.clone(), rec);
    let delay = f.delay;
    drop(f);
    let fake = fake.clone();
    let (mid, node) = (id.clone(), node.to_string());
    tokio::spawn(async move {
        for p in [Phase::Freeze, Phase::Dump, Phase::Transfer, Phase::Restore] {
            tokio::time::sleep(delay / 4).await;
            let mut f = lock(&fake);
            // A test may "restart" the agent, which forgets its migrations; a cancel ends one.
            let Some(r) = f
                .migrations
                .get_mut(&mid)
                .filter(|r| !r.state.is_terminal())
            else {
                return;
            };
            r.phases.push(PhaseRecord {
                phase: p,
                started_at: now_millis(),
                ended_at: None,
            });
        }
        let mut f = lock(&fake);
        let rec = f.migrations.get(&mid).cloned().expect("rec");
        if rec.state.is_terminal() {
            return;
        }
        let fail = rec.container.contains("fail");
        if !fail {
            let list = f.containers.entry(node.clone()).or_default();
            let mut moved = list
                .iter()
                .find(|c| c.id == rec.container)
                .cloned()
                .expect("c");
            list.retain(|c| c.id != rec.container);
            moved.node = rec.destination.clone();
            f.containers
                .entry(rec.destination.clone())
                .or_default()
                .push(moved);
        }
        let r = f.migrations.get_mut(&mid).expect("rec");
        r.state = if fail {
            MigrationState::RolledBack
        } else {
            MigrationState::Succeeded
        };
        r.stats.downtime_ms = Some(120);
        r.stats.bytes_sent = 50 << 20;
        r.ended_at = Some(now_millis());
    });
    Some(id)
}

// ---- fake Slurm and the daemon ------------------------------------------------------------

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn fake_slurm(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let d = dir.display();
    let scontrol = format!(
        "#!/bin/sh\ncase \"$1 $2\" in\n  'show node') cat {d}/nodes.txt ;;\n  'show job') cat {d}/jobs.txt ;;\n  *) echo \"$*\" >> {d}/updates.log ;;\nesac\n"
    );
    let salloc = format!(
        "#!/bin/sh\necho \"salloc $*\" >> {d}/updates.log\necho 'salloc: Granted job allocation 99' >&2\n"
    );
    for (name, text) in [("scontrol", scontrol), ("salloc", salloc)] {
        let p = bin.join(name);
        std::fs::write(&p, text).expect("script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    bin
}

fn node_line(name: &str, state: &str) -> String {
    format!("NodeName={name} Arch=x86_64 CPUAlloc=1 CPUTot=4 CPULoad=0.10 ActiveFeatures=(null) NodeAddr={name} RealMemory=4000 AllocMem=0 FreeMem=3000 State={state} Partitions=debug\n")
}

struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon(dir: &Path, config: &str, path_prefix: Option<&Path>) -> Daemon {
    let cfg = dir.join("rebalancerd.toml");
    std::fs::write(&cfg, config).expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rebalancerd"));
    cmd.arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info,rebalancer_controller=debug");
    if let Some(p) = path_prefix {
        cmd.env(
            "PATH",
            format!(
                "{}:{}",
                p.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("rebalancerd.log"))
        .expect("log");
    cmd.stderr(Stdio::from(log)).stdout(Stdio::null());
    Daemon {
        child: cmd.spawn().expect("spawn rebalancerd"),
    }
}

struct Ctl {
    s: UnixStream,
    next: u32,
}

impl Ctl {
    async fn connect(path: &Path) -> Ctl {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = UnixStream::connect(path).await {
                send(&mut s, FrameKind::Hello, 0, &Hello::new(Role::Cli, "e2e")).await;
                if let Ok(f) = read_frame_async(&mut s, MAX_FRAME_LEN).await {
                    if f.header.kind == FrameKind::Hello {
                        return Ctl { s, next: 0 };
                    }
                }
            }
            assert!(Instant::now() < deadline, "rebalancerd did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn call(
        &mut self,
        req: &ControlRequest,
    ) -> (Result<ControlReply, ErrorReply>, Vec<Event>) {
        self.next += 1;
        send(&mut self.s, FrameKind::Request, self.next, req).await;
        let mut events = vec![];
        loop {
            let f = read_frame_async(&mut self.s, MAX_FRAME_LEN)
                .await
                .expect("frame");
            assert_eq!(f.header.id, self.next);
            if f.header.kind == FrameKind::Event {
                events.push(f.decode(FrameKind::Event, "event").expect("event"));
                continue;
            }
            let r: ControlResponse = f.decode(FrameKind::Response, "response").expect("response");
            return (r.into_result(), events);
        }
    }

    /// The journal entry of migration `id` once it ended (10 s at most).
    async fn wait_ended(
        &mut self,
        id: &str,
        what: &str,
    ) -> rebalancer_proto::control::MigrationEntry {
        wait_for(what, 10, async || {
            match self
                .call(&ControlRequest::ShowMigrations {
                    id: Some(id.to_string()),
                    active: false,
                })
                .await
                .0
            {
                Ok(ControlReply::Migrations { migrations }) => migrations
                    .into_iter()
                    .find(|m| m.record.state.is_terminal()),
                _ => None,
            }
        })
        .await
    }
}

async fn wait_for<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn operators() -> String {
    // The test runs as whoever runs cargo; a non-root runner must be an operator.
    let uid = nix::unistd::getuid().as_raw();
    if uid == 0 {
        "[]".into()
    } else {
        format!("[{uid}]")
    }
}

async fn metrics_text(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("get");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The metrics port the daemon bound (it was given port 0), from its log.
async fn metrics_port(dir: &Path) -> u16 {
    wait_for("the metrics endpoint", 10, async || {
        let log = tail_log(dir);
        let line = log.lines().find(|l| l.contains("metrics endpoint up"))?;
        let addr = line.split("Some(").nth(1)?.split(')').next()?;
        addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
    })
    .await
}

fn tail_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("rebalancerd.log")).unwrap_or_default()
}

// ---- tests ----------------------------------------------------------------------------------

/// Two fake agents (job 7's container on node1), a fake Slurm with both nodes healthy, the
/// shipped drain policy, and the daemon, up with both agents reachable.
async fn drain_setup(dir: &Path) -> (Shared, Daemon, Ctl) {
    let fake: Shared = Arc::default();
    {
        let mut f = lock(&fake);
        f.delay = Duration::from_millis(200);
        f.containers
            .insert("node1".into(), vec![container("j7.s0.t0", "node1", 7)]);
        f.containers.insert("node2".into(), vec![]);
    }
    spawn_agent(dir, "node1", fake.clone());
    spawn_agent(dir, "node2", fake.clone());
    let bin = fake_slurm(dir);
    write_atomic(
        &dir.join("nodes.txt"),
        &(node_line("node1", "MIXED") + &node_line("node2", "IDLE")),
    );
    write_atomic(
        &dir.join("jobs.txt"),
        "JobId=7 JobName=sim UserId=alice(1000) GroupId=alice(1000) Account=phys JobState=RUNNING Partition=debug NodeList=node[1-2] BatchHost=node2\n",
    );
    // The shipped drain policy, through the rebalancer-policy planner.
    std::fs::create_dir_all(dir.join("policies")).expect("policies");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/drain.toml");
    std::fs::copy(&shipped, dir.join("policies/drain.toml")).expect("copy drain.toml");
    let d = dir.display();
    let daemon = start_daemon(
        dir,
        &format!(
            "[controller]\nsocket = \"{d}/ctl.sock\"\njournal = \"{d}/journal.redb\"\npolicies = \"{d}/policies\"\noperators = {}\nevaluate_interval_s = 1\n\
             [slurm]\nbackend = \"scontrol\"\npoll_interval_ms = 500\n\
             [agents]\nsocket_template = \"{d}/{{node}}.sock\"\npoll_interval_ms = 300\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n",
            operators()
        ),
        Some(&bin),
    );
    let mut ctl = Ctl::connect(&dir.join("ctl.sock")).await;
    wait_for("both agents up", 10, async || {
        match ctl.call(&ControlRequest::ShowNodes { name: None }).await.0 {
            Ok(ControlReply::Nodes { nodes })
                if nodes.len() == 2
                    && nodes.iter().all(|n| n.agent == control::AgentHealth::Up) =>
            {
                Some(())
            }
            _ => None,
        }
    })
    .await;
    (fake, daemon, ctl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_evacuates_and_updates_slurm() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let (fake, _daemon, mut ctl) = drain_setup(dir).await;
    // Nothing moves while the node is healthy: at least one whole evaluation ran with both
    // agents up and found nothing to do.
    let idle = |dir: &Path| tail_log(dir).matches("evaluation: nothing to do").count();
    let before = idle(dir);
    wait_for("an evaluation of the healthy cluster", 10, async || {
        (idle(dir) > before).then_some(())
    })
    .await;
    assert!(!lock(&fake).requests.iter().any(|(_, op)| op == "migrate"));

    let t0 = Instant::now();
    write_atomic(
        &dir.join("nodes.txt"),
        &(node_line("node1", "MIXED+DRAIN") + &node_line("node2", "IDLE")),
    );
    let fake2 = fake.clone();
    wait_for("a migrate request", 5, async || {
        lock(&fake2)
            .requests
            .iter()
            .any(|(n, op)| n == "node1" && op == "migrate")
            .then_some(())
    })
    .await;
    // About one Slurm poll (500 ms) on an idle machine; a figure, not asserted on a shared one.
    let reaction = t0.elapsed();
    eprintln!("evacuation started {reaction:?} after the drain");

    let entry = wait_for("the migration to succeed", 10, async || {
        match ctl
            .call(&ControlRequest::ShowMigrations {
                id: None,
                active: false,
            })
            .await
            .0
        {
            Ok(ControlReply::Migrations { migrations }) => migrations
                .into_iter()
                .find(|m| m.record.state == MigrationState::Succeeded && m.slurm_synced),
            _ => None,
        }
    })
    .await;
    assert_eq!(entry.record.container, "j7.s0.t0");
    assert_eq!(
        (
            entry.record.source.as_str(),
            entry.record.destination.as_str()
        ),
        ("node1", "node2")
    );
    assert_eq!(entry.policy, "drain");
    // node2 already belongs to the job; node1 holds nothing of it any more: shrink to node2.
    let updates = std::fs::read_to_string(dir.join("updates.log")).unwrap_or_default();
    assert!(
        updates.contains("update jobid=7 NodeList=node2"),
        "updates: {updates}"
    );
    assert!(
        !updates.contains("salloc"),
        "no expansion needed: {updates}"
    );

    let (h, _) = ctl.call(&ControlRequest::History { limit: Some(10) }).await;
    let Ok(ControlReply::History { decisions }) = h else {
        panic!("history: {h:?}")
    };
    let d = decisions
        .iter()
        .find(|d| d.policy == "drain")
        .expect("decision");
    assert_eq!(d.outcome, DecisionOutcome::Started);
    assert_eq!(d.migration.as_deref(), Some(entry.record.id.as_str()));
    assert!(
        d.why.contains("node1") && d.why.to_lowercase().contains("drain"),
        "{}",
        d.why
    );

    let m = metrics_text(metrics_port(dir).await).await;
    assert!(
        m.contains("rebalancer_migrations_total{outcome=\"succeeded\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("rebalancer_migration_downtime_seconds_count 1"),
        "{m}"
    );
    assert!(
        m.contains("rebalancer_migration_bytes_total 52428800"),
        "{m}"
    );
    assert!(m.contains("policy=\"drain\",outcome=\"started\"} 1"), "{m}");
    // The log explains the decision with structured fields.
    let log = tail_log(dir);
    assert!(
        log.contains(&format!("decision: {}", d.why)) && log.contains("container=j7.s0.t0"),
        "{log}"
    );
}

fn agents_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "[controller]\nsocket = \"{d}/ctl.sock\"\njournal = \"{d}/journal.redb\"\npolicies = \"{d}/policies\"\noperators = {}\n\
         [slurm]\nenabled = false\n\
         [agents]\npoll_interval_ms = 200\n\
         [agents.nodes]\nnode1 = {{ socket = \"{d}/node1.sock\" }}\nnode2 = {{ socket = \"{d}/node2.sock\" }}\n",
        operators()
    )
}

async fn wait_agents(ctl: &mut Ctl) {
    wait_for("agents up with containers", 10, async || {
        match ctl
            .call(&ControlRequest::ShowContainers {
                id: None,
                job_id: None,
            })
            .await
            .0
        {
            Ok(ControlReply::Containers { containers }) if !containers.is_empty() => Some(()),
            _ => None,
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_migration_with_wait_and_recovery_after_a_crash() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let fake: Shared = Arc::default();
    {
        let mut f = lock(&fake);
        f.delay = Duration::from_millis(400);
        f.containers.insert(
            "node1".into(),
            vec![
                container("j8.s0.t0", "node1", 8),
                container("j9.s0.fail", "node1", 9),
            ],
        );
        f.containers.insert("node2".into(), vec![]);
    }
    spawn_agent(dir, "node1", fake.clone());
    spawn_agent(dir, "node2", fake.clone());
    let daemon = start_daemon(dir, &agents_config(dir), None);
    let mut ctl = Ctl::connect(&dir.join("ctl.sock")).await;
    wait_agents(&mut ctl).await;

    // Unknown job: not found (exit code 3 in rebalctl).
    let (r, _) = ctl
        .call(&ControlRequest::Migrate {
            target: MigrateTarget::Job { job_id: 999 },
            destination: None,
            mode: None,
            watch: false,
        })
        .await;
    assert_eq!(r.expect_err("unknown job").code, ErrorCode::NotFound);

    // Watched migration: progress events, then the final record.
    let (r, events) = ctl
        .call(&ControlRequest::Migrate {
            target: MigrateTarget::Step {
                job_id: 8,
                step_id: 0,
            },
            destination: Some("node2".into()),
            mode: Some(MigrationMode::PostCopy),
            watch: true,
        })
        .await;
    let Ok(ControlReply::Migrated { migrations, .. }) = r else {
        panic!("migrate: {r:?}\n{}", tail_log(dir))
    };
    assert_eq!(migrations.len(), 1);
    assert_eq!(migrations[0].record.state, MigrationState::Succeeded);
    assert!(migrations[0].policy.starts_with("operator:"));
    let phases: Vec<usize> = events
        .iter()
        .map(|Event::MigrationProgress { migration, .. }| migration.phases.len())
        .collect();
    assert!(
        phases.len() >= 3 && phases.windows(2).all(|w| w[0] <= w[1]),
        "{phases:?}"
    );

    // A rollback is reported with its own code (exit 10).
    let (r, _) = ctl
        .call(&ControlRequest::Migrate {
            target: MigrateTarget::Container {
                id: "j9.s0.fail".into(),
            },
            destination: Some("node2".into()),
            mode: None,
            watch: true,
        })
        .await;
    assert_eq!(r.expect_err("rolled back").code, ErrorCode::RolledBack);

    // Start one more without waiting, then kill the controller mid-flight.
    wait_agents(&mut ctl).await;
    let (r, _) = ctl
        .call(&ControlRequest::Migrate {
            target: MigrateTarget::Job { job_id: 8 },
            destination: Some("node1".into()),
            mode: None,
            watch: false,
        })
        .await;
    let Ok(ControlReply::Migrated { migrations, .. }) = r else {
        panic!("migrate: {r:?}")
    };
    let mid = migrations[0].record.id.clone();
    assert!(!migrations[0].record.state.is_terminal());
    drop(ctl);
    drop(daemon); // SIGKILL: no chance to clean up
    let fake2 = fake.clone();
    let mid2 = mid.clone();
    wait_for("the agent to finish on its own", 5, async || {
        lock(&fake2)
            .migrations
            .get(&mid2)
            .filter(|m| m.state.is_terminal())
            .map(|_| ())
    })
    .await;

    let daemon = start_daemon(dir, &agents_config(dir), None);
    let mut ctl = Ctl::connect(&dir.join("ctl.sock")).await;
    let entry = ctl
        .wait_ended(&mid, "recovery to finish the migration")
        .await;
    assert_eq!(
        entry.record.state,
        MigrationState::Succeeded,
        "{}",
        tail_log(dir)
    );
    assert!(tail_log(dir).contains("recovering a migration"));
    // The journal kept all three decisions across the crash.
    let (h, _) = ctl.call(&ControlRequest::History { limit: None }).await;
    let Ok(ControlReply::History { decisions }) = h else {
        panic!("history")
    };
    assert_eq!(decisions.len(), 3, "{decisions:?}");
    // Policy state changes are journaled too.
    let (r, _) = ctl
        .call(&ControlRequest::UpdatePolicy {
            name: "builtin-drain".into(),
            state: control::PolicyState::DryRun,
        })
        .await;
    assert!(r.is_ok(), "{r:?}");
    let (r, _) = ctl
        .call(&ControlRequest::UpdatePolicy {
            name: "nope".into(),
            state: control::PolicyState::DryRun,
        })
        .await;
    assert_eq!(r.expect_err("unknown policy").code, ErrorCode::NotFound);

    // Policies appear: `policy reload` swaps the built-in drain policy for the files; a broken
    // file is refused and the loaded set stays; SIGHUP reloads too.
    let (r, _) = ctl.call(&ControlRequest::PolicyReload).await;
    assert_eq!(
        r.expect_err("no policy dir yet").code,
        ErrorCode::BadRequest
    );
    let pdir = dir.join("policies");
    std::fs::create_dir_all(&pdir).expect("policies");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    std::fs::copy(shipped.join("drain.toml"), pdir.join("drain.toml")).expect("copy");
    let names = |r: Result<ControlReply, ErrorReply>| match r {
        Ok(ControlReply::Policies { policies }) => {
            policies.into_iter().map(|p| p.name).collect::<Vec<_>>()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        names(ctl.call(&ControlRequest::PolicyReload).await.0),
        ["drain"]
    );
    std::fs::write(pdir.join("broken.toml"), "kind = \"drain\"\nacton = 1\n").expect("write");
    let (r, _) = ctl.call(&ControlRequest::PolicyReload).await;
    let e = r.expect_err("broken");
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("broken.toml:2:1"), "{}", e.message);
    assert_eq!(
        names(
            ctl.call(&ControlRequest::ShowPolicies { name: None })
                .await
                .0
        ),
        ["drain"]
    );
    std::fs::remove_file(pdir.join("broken.toml")).expect("rm");
    std::fs::copy(shipped.join("thermal.toml"), pdir.join("thermal.toml")).expect("copy");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    wait_for("SIGHUP to reload", 5, async || {
        let n = names(
            ctl.call(&ControlRequest::ShowPolicies { name: None })
                .await
                .0,
        );
        (n.len() == 2).then_some(())
    })
    .await;
}

/// `rebalctl cancel`: the controller forwards the cancel to the source agent; accepted, the
/// migration ends rolled back naming who cancelled; a migration past its commit point is
/// refused as too late; an ended or unknown one is not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_source_agent_and_the_record_says_who() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let fake: Shared = Arc::default();
    {
        let mut f = lock(&fake);
        f.delay = Duration::from_secs(8);
        f.containers.insert(
            "node1".into(),
            vec![
                container("j8.s0.t0", "node1", 8),
                container("j9.s0.t0", "node1", 9),
            ],
        );
        f.containers.insert("node2".into(), vec![]);
    }
    spawn_agent(dir, "node1", fake.clone());
    spawn_agent(dir, "node2", fake.clone());
    let _daemon = start_daemon(dir, &agents_config(dir), None);
    let mut ctl = Ctl::connect(&dir.join("ctl.sock")).await;
    wait_agents(&mut ctl).await;
    let start = async |ctl: &mut Ctl, job_id| {
        let (r, _) = ctl
            .call(&ControlRequest::Migrate {
                target: MigrateTarget::Job { job_id },
                destination: Some("node2".into()),
                mode: None,
                watch: false,
            })
            .await;
        let Ok(ControlReply::Migrated { migrations, .. }) = r else {
            panic!("migrate: {r:?}")
        };
        migrations[0].record.id.clone()
    };
    let cancel = async |ctl: &mut Ctl, target| ctl.call(&ControlRequest::Cancel { target }).await.0;

    let (r, _) = ctl
        .call(&ControlRequest::Cancel {
            target: control::CancelTarget::Job { job_id: 77 },
        })
        .await;
    let e = r.expect_err("no migration of job 77");
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(e.message, "job 77 has no running migration");

    // Before the commit point: accepted by a prefix of the id, rolled back, who is recorded.
    let mid = start(&mut ctl, 8).await;
    // Another connection attaches to it (`rebalctl wait`): progress, then the final entry.
    let mut watcher = Ctl::connect(&dir.join("ctl.sock")).await;
    let wid = mid.clone();
    let watched = tokio::spawn(async move {
        watcher
            .call(&ControlRequest::Watch {
                id: wid[..6].to_string(),
            })
            .await
    });
    let fake2 = fake.clone();
    let mid2 = mid.clone();
    wait_for("the migration to reach its dump", 5, async || {
        lock(&fake2).migrations[&mid2]
            .phases
            .iter()
            .any(|p| p.phase == Phase::Freeze)
            .then_some(())
    })
    .await;
    let r = cancel(
        &mut ctl,
        control::CancelTarget::Migration {
            id: mid[..8].to_string(),
        },
    )
    .await;
    let Ok(ControlReply::Cancelled { cancels }) = r else {
        panic!("cancel: {r:?}\n{}", tail_log(dir))
    };
    assert_eq!(cancels.len(), 1);
    assert!(cancels[0].accepted, "{cancels:?}");
    assert_eq!(
        (cancels[0].migration.as_str(), cancels[0].source.as_str()),
        (mid.as_str(), "node1")
    );
    assert!(lock(&fake)
        .requests
        .contains(&("node1".into(), "cancel-migration".into())));
    let entry = ctl.wait_ended(&mid, "the cancelled migration to end").await;
    assert_eq!(entry.record.state, MigrationState::RolledBack);
    let by = entry.record.cancelled_by.clone().unwrap_or_default();
    assert!(
        by.starts_with(&format!("uid {}", nix::unistd::getuid())),
        "{by}"
    );
    let (r, events) = tokio::time::timeout(Duration::from_secs(10), watched)
        .await
        .expect("the watch ends with the migration")
        .expect("watch task");
    let Ok(ControlReply::Migrations { migrations }) = r else {
        panic!("watch: {r:?}")
    };
    assert_eq!(migrations.len(), 1);
    assert_eq!(migrations[0].record.id, mid);
    assert_eq!(
        migrations[0].record.cancelled_by.as_deref(),
        Some(by.as_str())
    );
    assert!(!events.is_empty(), "no progress while attached");
    assert!(events.iter().all(
        |Event::MigrationProgress { migration, .. }| migration.id == mid
            && !migration.state.is_terminal()
    ));
    // Attaching to an ended migration answers at once; an unknown one is not found.
    let (r, events) = ctl.call(&ControlRequest::Watch { id: mid.clone() }).await;
    assert!(
        matches!(&r, Ok(ControlReply::Migrations { migrations }) if migrations[0].record.state == MigrationState::RolledBack),
        "{r:?}"
    );
    assert!(events.is_empty());
    let (r, _) = ctl.call(&ControlRequest::Watch { id: "zz".into() }).await;
    assert_eq!(r.expect_err("unknown").code, ErrorCode::NotFound);
    // Ended: nothing to cancel any more, and the answer says how it ended.
    let e = cancel(
        &mut ctl,
        control::CancelTarget::Migration { id: mid.clone() },
    )
    .await
    .expect_err("ended");
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.message.contains("it ended rolled-back"), "{}", e.message);

    // At the commit point: too late, and the migration goes on.
    let mid = start(&mut ctl, 9).await;
    lock(&fake)
        .migrations
        .get_mut(&mid)
        .expect("fake record")
        .phases
        .push(PhaseRecord {
            phase: Phase::NetworkSwitch,
            started_at: now_millis(),
            ended_at: None,
        });
    let e = cancel(&mut ctl, control::CancelTarget::Job { job_id: 9 })
        .await
        .expect_err("too late");
    assert_eq!(e.code, ErrorCode::Busy);
    assert_eq!(
        e.message,
        format!("too late: migration {mid} is committing")
    );
    assert!(!lock(&fake).migrations[&mid].state.is_terminal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to connect to the control socket as another uid (SO_PEERCRED); .ci/run runs it with --include-ignored"]
async fn other_users_cannot_change_things_and_see_only_their_jobs() {
    // The client half runs in a child: this same test, re-run as uid 1000 with E2E_SOCKET set.
    if let Some(sock) = std::env::var_os(USER_CLIENT_SOCKET) {
        return as_user_client(Path::new(&sock)).await;
    }
    assert!(nix::unistd::getuid().is_root(), "run as root");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let fake: Shared = Arc::default();
    {
        let mut f = lock(&fake);
        let mut theirs = container("j11.s0.t0", "node1", 11);
        theirs.uid = 1001;
        f.containers.insert(
            "node1".into(),
            vec![container("j10.s0.t0", "node1", 10), theirs],
        );
    }
    spawn_agent(dir, "node1", fake.clone());
    spawn_agent(dir, "node2", fake.clone());
    let _daemon = start_daemon(dir, &agents_config(dir), None);
    let mut ctl = Ctl::connect(&dir.join("ctl.sock")).await;
    wait_agents(&mut ctl).await;
    drop(ctl);

    // A child that is uid 1000 connects and tries: show containers, then migrate.
    let sock = dir.join("ctl.sock");
    // The target dir may sit where uid 1000 cannot read (a clone under /root): run a copy.
    let exe = dir.join("e2e-client");
    std::fs::copy(std::env::current_exe().expect("exe"), &exe).expect("copy test binary");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = tokio::task::spawn_blocking(move || {
        use std::os::unix::process::CommandExt;
        Command::new(&exe)
            .args([
                "--exact",
                "other_users_cannot_change_things_and_see_only_their_jobs",
                "--ignored",
                "--nocapture",
            ])
            .env(USER_CLIENT_SOCKET, &sock)
            .uid(1000)
            .gid(1000)
            .output()
            .expect("child")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("containers=[\"j10.s0.t0\"]"), "{text}");
    assert!(text.contains("migrate=permission_denied"), "{text}");
    assert!(text.contains("migrate_own=permission_denied"), "{text}");
    assert!(text.contains("evacuate=permission_denied"), "{text}");
    assert!(lock(&fake).requests.iter().all(|(_, op)| op != "migrate"));
}

/// Names the control socket to the child that runs the client half of
/// `other_users_cannot_change_things_and_see_only_their_jobs`.
const USER_CLIENT_SOCKET: &str = "E2E_SOCKET";

/// Client half of the test above, run in a child process as uid 1000: it prints what it saw,
/// and the parent asserts on that.
async fn as_user_client(sock: &Path) {
    assert_eq!(
        nix::unistd::getuid().as_raw(),
        1000,
        "the client half runs as uid 1000"
    );
    let mut ctl = Ctl::connect(sock).await;
    let (r, _) = ctl
        .call(&ControlRequest::ShowContainers {
            id: None,
            job_id: None,
        })
        .await;
    let Ok(ControlReply::Containers { containers }) = r else {
        panic!("{r:?}")
    };
    let ids: Vec<&str> = containers.iter().map(|c| c.id.as_str()).collect();
    println!("containers={ids:?}");
    let code = |r: Result<ControlReply, ErrorReply>, what: &str| {
        let e = match r {
            Err(e) => e,
            Ok(ok) => panic!("{what} was accepted: {ok:?}"),
        };
        serde_json::to_value(e.code)
            .expect("json")
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    // Another user's container (uid 1001), then its own: an unprivileged uid moves neither.
    for (key, id) in [("migrate", "j11.s0.t0"), ("migrate_own", "j10.s0.t0")] {
        let (r, _) = ctl
            .call(&ControlRequest::Migrate {
                target: MigrateTarget::Container { id: id.into() },
                destination: Some("node2".into()),
                mode: None,
                watch: false,
            })
            .await;
        println!("{key}={}", code(r, key));
    }
    let (r, _) = ctl
        .call(&ControlRequest::Evacuate {
            node: "node1".into(),
            mode: None,
            watch: false,
        })
        .await;
    println!("evacuate={}", code(r, "evacuate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_policy_journals_and_plans_but_does_not_migrate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let (fake, _daemon, mut ctl) = drain_setup(dir).await;
    let (r, _) = ctl
        .call(&ControlRequest::UpdatePolicy {
            name: "drain".into(),
            state: control::PolicyState::DryRun,
        })
        .await;
    assert!(r.is_ok(), "{r:?}");
    let (r, _) = ctl.call(&ControlRequest::Plan).await;
    assert!(
        matches!(r, Ok(ControlReply::Plan { ref moves }) if moves.is_empty()),
        "{r:?}"
    );

    write_atomic(
        &dir.join("nodes.txt"),
        &(node_line("node1", "MIXED+DRAIN") + &node_line("node2", "IDLE")),
    );
    let d = wait_for("a dry-run decision", 5, async || {
        match ctl.call(&ControlRequest::History { limit: None }).await.0 {
            Ok(ControlReply::History { decisions }) => decisions
                .into_iter()
                .find(|d| d.outcome == DecisionOutcome::DryRun),
            _ => None,
        }
    })
    .await;
    assert_eq!(
        (d.policy.as_str(), d.container.as_str()),
        ("drain", "j7.s0.t0")
    );
    assert!(d.migration.is_none());
    // Evaluations repeat every second; the same advice is journaled once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (r, _) = ctl.call(&ControlRequest::History { limit: None }).await;
    let Ok(ControlReply::History { decisions }) = r else {
        panic!("history")
    };
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    let (r, _) = ctl.call(&ControlRequest::Plan).await;
    let Ok(ControlReply::Plan { moves }) = r else {
        panic!("plan: {r:?}")
    };
    assert_eq!(moves.len(), 1);
    assert_eq!(
        (moves[0].action.as_str(), moves[0].destination.as_str()),
        ("dry-run", "node2")
    );
    assert!(!lock(&fake).requests.iter().any(|(_, op)| op == "migrate"));

    // Enabled again: the drain is acted on.
    let (r, _) = ctl
        .call(&ControlRequest::UpdatePolicy {
            name: "drain".into(),
            state: control::PolicyState::Enabled,
        })
        .await;
    assert!(r.is_ok(), "{r:?}");
    let fake2 = fake.clone();
    wait_for("the migration after re-enabling", 5, async || {
        lock(&fake2)
            .requests
            .iter()
            .any(|(_, op)| op == "migrate")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_the_agent_forgot_is_marked_failed_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let fake: Shared = Arc::default();
    {
        let mut f = lock(&fake);
        f.delay = Duration::from_millis(2000);
        f.containers
            .insert("node1".into(), vec![container("j12.s0.t0", "node1", 12)]);
        f.containers.insert("node2".into(), vec![]);
    }
    spawn_agent(dir, "node1", fake.clone());
    spawn_agent(dir, "node2", fake.clone());
    let daemon = start_daemon(dir, &agents_config(dir), None);
    let mut ctl = Ctl::connect(&dir.join("ctl.sock")).await;
    wait_agents(&mut ctl).await;
    let (r, _) = ctl
        .call(&ControlRequest::Migrate {
            target: MigrateTarget::Job { job_id: 12 },
            destination: Some("node2".into()),
            mode: None,
            watch: false,
        })
        .await;
    let Ok(ControlReply::Migrated { migrations, .. }) = r else {
        panic!("migrate: {r:?}")
    };
    let mid = migrations[0].record.id.clone();
    drop(ctl);
    drop(daemon);
    // The agent restarts too and loses its migration records.
    lock(&fake).migrations.clear();

    let _daemon = start_daemon(dir, &agents_config(dir), None);
    let mut ctl = Ctl::connect(&dir.join("ctl.sock")).await;
    let entry = ctl
        .wait_ended(&mid, "the lost migration to be closed")
        .await;
    assert_eq!(entry.record.state, MigrationState::Failed);
    let why = entry.record.error.unwrap_or_default();
    assert!(why.contains("no record"), "{why}");
    // Nothing is left in flight.
    let (r, _) = ctl
        .call(&ControlRequest::ShowMigrations {
            id: None,
            active: true,
        })
        .await;
    assert!(
        matches!(r, Ok(ControlReply::Migrations { ref migrations }) if migrations.is_empty()),
        "{r:?}"
    );
}

/// Why work does not move: a job without a container, a start that failed (held back, and
/// until when), no destination (naming the node rejected); an operator's failed start does not
/// hold back the drain policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmoved_work_is_explained_and_an_operators_failure_does_not_hold_back_a_policy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let (fake, _daemon, mut ctl) = drain_setup(dir).await;
    write_atomic(
        &dir.join("jobs.txt"),
        "JobId=7 JobName=sim UserId=alice(1000) GroupId=alice(1000) Account=phys JobState=RUNNING Partition=debug NodeList=node[1-2] BatchHost=node2\n\
         JobId=9 JobName=plain UserId=alice(1000) GroupId=alice(1000) Account=phys JobState=RUNNING Partition=debug NodeList=node2 BatchHost=node2\n",
    );
    // Job 9 runs without a container: migrate and evacuate say so.
    // Jobs are re-read at each reconcile (every 30 s).
    let msg = wait_for("job 9 in the controller's view", 40, async || {
        match ctl
            .call(&ControlRequest::Migrate {
                target: MigrateTarget::Job { job_id: 9 },
                destination: None,
                mode: None,
                watch: false,
            })
            .await
            .0
        {
            Err(e) if e.message.contains("--migratable") => Some(e),
            _ => None,
        }
    })
    .await;
    assert_eq!(msg.code, ErrorCode::NotFound, "{msg:?}");
    let (r, _) = ctl
        .call(&ControlRequest::Evacuate {
            node: "node2".into(),
            mode: None,
            watch: false,
        })
        .await;
    let Ok(ControlReply::Migrated {
        decisions,
        migrations,
    }) = r
    else {
        panic!("evacuate: {r:?}")
    };
    assert!(migrations.is_empty());
    assert!(
        decisions.iter().any(|d| d.container == "job 9"
            && d.detail
                .as_deref()
                .is_some_and(|x| x.contains("--migratable"))),
        "{decisions:?}"
    );

    // An operator's start fails: the drain policy is not held back by it.
    lock(&fake).refuse = true;
    let (r, _) = ctl
        .call(&ControlRequest::Migrate {
            target: MigrateTarget::Job { job_id: 7 },
            destination: Some("node2".into()),
            mode: None,
            watch: false,
        })
        .await;
    assert!(r.is_err(), "{r:?}");
    let migrates = |f: &Shared| {
        lock(f)
            .requests
            .iter()
            .filter(|(_, op)| op == "migrate")
            .count()
    };
    assert_eq!(migrates(&fake), 1);
    write_atomic(
        &dir.join("nodes.txt"),
        &(node_line("node1", "MIXED+DRAIN") + &node_line("node2", "IDLE")),
    );
    let fake2 = fake.clone();
    wait_for("the drain policy's own attempt", 10, async || {
        (migrates(&fake2) >= 2).then_some(())
    })
    .await;

    // The policy's failed start holds the move back for a while: plan says until when, and
    // history journals it once.
    let held = wait_for("the held move in the plan", 10, async || {
        match ctl
            .call(&ControlRequest::Explain {
                job_id: Some(7),
                node: None,
            })
            .await
            .0
        {
            Ok(ControlReply::Explanation { moves, .. }) => moves
                .into_iter()
                .find_map(|m| m.held.filter(|h| h.contains("backing off"))),
            _ => None,
        }
    })
    .await;
    assert!(
        held.contains("until 20") && held.contains("refuses"),
        "{held}"
    );
    let backoff = wait_for("the back-off in history", 10, async || {
        match ctl.call(&ControlRequest::History { limit: None }).await.0 {
            Ok(ControlReply::History { decisions }) => decisions.into_iter().find(|d| {
                d.outcome == DecisionOutcome::Skipped
                    && d.detail
                        .as_deref()
                        .is_some_and(|x| x.contains("backing off"))
            }),
            _ => None,
        }
    })
    .await;
    assert_eq!(backoff.policy, "drain");
    assert_eq!(migrates(&fake), 2, "the back-off holds");

    // No destination left: the plan names the node and why it was rejected.
    write_atomic(
        &dir.join("nodes.txt"),
        &(node_line("node1", "MIXED+DRAIN") + &node_line("node2", "IDLE+DRAIN")),
    );
    let u = wait_for("a no-destination explanation", 10, async || {
        match ctl
            .call(&ControlRequest::Explain {
                job_id: None,
                node: Some("node1".into()),
            })
            .await
            .0
        {
            Ok(ControlReply::Explanation { unmoved, .. }) => {
                unmoved.into_iter().find(|u| u.code == "no-destination")
            }
            _ => None,
        }
    })
    .await;
    assert_eq!(u.container.as_deref(), Some("j7.s0.t0"));
    assert_eq!(u.job_id, Some(7));
    assert!(u.reason.contains("node2"), "{}", u.reason);
    let (r, _) = ctl
        .call(&ControlRequest::Explain {
            job_id: None,
            node: Some("node9".into()),
        })
        .await;
    assert_eq!(r.expect_err("no such node").code, ErrorCode::NotFound);
    wait_for("the skip in history", 10, async || {
        match ctl.call(&ControlRequest::History { limit: None }).await.0 {
            Ok(ControlReply::History { decisions }) => decisions
                .into_iter()
                .find(|d| d.detail.as_deref() == Some("no-destination")),
            _ => None,
        }
    })
    .await;
}
