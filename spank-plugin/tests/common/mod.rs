//! Test support: a private one-node Slurm cluster (tests/minicluster.sh) loading the plugin
//! built by this crate, and a stand-in agent speaking the real protocol on the control socket.

#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rebalancer_proto::frame::{read_frame, write_frame, Frame, FrameKind};
use rebalancer_proto::{
    ContainerInfo, ContainerState, ErrorCode, Hello, MountSpec, PreparedTask, Reply, Request,
    Response, RestorePlan, Role, TaskRegistration,
};
use slurm_rebalancer_spank::verify::{verify_task_request, RealProc, TaskRequest};

pub const DIR: &str = "/tmp/rbsp-tests";
pub const CLUSTER: &str = "/tmp/rbsp-tests/cluster";
pub const FRAGMENT: &str = "/tmp/rbsp-tests/plugstack-fragment.conf";
pub const NODE: &str = "sp1";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/minicluster.sh")
}

/// The plugin: the cdylib cargo built for this test run. `cargo test` refreshes the copy in
/// `deps/` (next to the test executable), not the one in `target/<profile>/`.
pub fn plugin_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("target/<profile>/deps");
    let so = deps.join("libslurm_rebalancer_spank.so");
    assert!(so.is_file(), "plugin not built at {}", so.display());
    so
}

pub fn agent_socket() -> String {
    format!("{DIR}/agent-{NODE}.sock")
}

/// Serialises the tests of one binary: they share the cluster and its plugstack fragment.
pub fn lock() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn take_down() {
    let _ = Command::new(script()).args(["down", CLUSTER]).output();
    // Images and container roots of this run (nothing is mounted on the node side).
    let _ = std::fs::remove_dir_all(DIR);
}

/// Brings the private cluster up once per test binary; it goes down when the binary exits.
pub fn cluster() {
    cluster_with("linuxproc", "none")
}

/// Same, with `ProctrackType=proctrack/<proctrack>` and `TaskPlugin=task/<task>`.
pub fn cluster_with(proctrack: &str, task: &str) {
    static UP: OnceLock<()> = OnceLock::new();
    UP.get_or_init(|| {
        std::fs::create_dir_all(DIR).expect("test dir");
        set_plugstack("optional", &[]);
        let out = Command::new(script())
            .args(["up", CLUSTER, FRAGMENT])
            .env("RBSP_PROCTRACK", proctrack)
            .env("RBSP_TASK", task)
            .output()
            .expect("run minicluster.sh");
        assert!(
            out.status.success(),
            "minicluster up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe { libc::atexit(take_down) };
    });
}

/// Writes the plugstack line srun and slurmstepd read for the next step.
pub fn set_plugstack(kind: &str, args: &[&str]) {
    let mut line = format!("{kind} {}", plugin_path().display());
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    std::fs::write(FRAGMENT, line + "\n").expect("write plugstack fragment");
}

/// Default plugin arguments of the tests (socket of the stand-in agent).
pub fn default_args() -> Vec<String> {
    vec![format!("socket={DIR}/agent-%n.sock"), "timeout=5".into()]
}

/// Runs a Slurm command inside the cluster's namespace.
pub fn slurm(args: &[&str]) -> Output {
    Command::new(script())
        .args(["run", CLUSTER])
        .args(args)
        .output()
        .expect("run a Slurm command")
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

// ----- stand-in agent ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Seen {
    pub op: &'static str,
    pub peer_pid: i32,
    pub peer_uid: u32,
    pub registration: Option<TaskRegistration>,
    pub wait_status: Option<i32>,
    /// Result of the registration check the real agent applies.
    pub verified: Result<(), String>,
}

#[derive(Default)]
pub struct Behaviour {
    /// Answer task-exited as if the container had moved and ended there with this status.
    pub migrated_exit: Option<(i32, String)>,
    /// Refuse prepare-task with this message.
    pub refuse_prepare: Option<String>,
    /// Answer prepare-restore with this plan.
    pub restore_plan: Option<RestorePlan>,
    /// Give containers a private root like the agent's own: /usr and /etc bound read-only,
    /// /proc, /dev and /tmp of their own.
    pub private_root: bool,
    /// Add a bind mount of a path that does not exist to the private root.
    pub bad_mount: bool,
    /// The first task-exited (the dumped source's) waits until the test sets `migrated_exit`:
    /// the test plays the destination reporting the moved container's final status. Later ones
    /// (the restored copy's) are answered as ended here.
    pub hold_first_exit: bool,
}

pub struct FakeAgent {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    path: PathBuf,
    netns: Arc<Mutex<Vec<String>>>,
}

fn peer_cred(s: &UnixStream) -> (i32, u32) {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid out pointers of the right size for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_PEERCRED");
    (cred.pid, cred.uid)
}

impl FakeAgent {
    pub fn start(path: &str) -> FakeAgent {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the agent socket");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let netns = Arc::new(Mutex::new(Vec::new()));
        let (s2, b2, n2) = (seen.clone(), behaviour.clone(), netns.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (s3, b3, n3) = (s2.clone(), b2.clone(), n2.clone());
                thread::spawn(move || serve(conn, s3, b3, n3));
            }
        });
        FakeAgent {
            seen,
            behaviour,
            path: path.into(),
            netns,
        }
    }

    /// Serves a second node's socket with the same records and behaviour (one "cluster" of
    /// agents, so the source's held `task-exited` sees the destination's).
    pub fn also_listen(&self, path: &str) {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the second agent socket");
        let (s2, b2, n2) = (
            self.seen.clone(),
            self.behaviour.clone(),
            self.netns.clone(),
        );
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (s3, b3, n3) = (s2.clone(), b2.clone(), n2.clone());
                thread::spawn(move || serve(conn, s3, b3, n3));
            }
        });
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until `op` has been seen `n` times.
    pub fn wait_for(&self, op: &str, n: usize, timeout: Duration) -> Vec<Seen> {
        let t0 = Instant::now();
        loop {
            let all: Vec<Seen> = self.seen().into_iter().filter(|s| s.op == op).collect();
            if all.len() >= n || t0.elapsed() > timeout {
                return all;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        for ns in self.netns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
    }
}

fn send(s: &mut UnixStream, kind: FrameKind, id: u32, v: &impl serde::Serialize) {
    let f = Frame::json(kind, id, v).expect("encode");
    let _ = write_frame(s, &f);
}

fn serve(
    mut s: UnixStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    netns: Arc<Mutex<Vec<String>>>,
) {
    let (peer_pid, peer_uid) = peer_cred(&s);
    let Ok(f) = read_frame(&mut s, 1 << 20) else {
        return;
    };
    let Ok(hello) = f.decode::<Hello>(FrameKind::Hello, "hello") else {
        return;
    };
    assert_eq!(hello.role, Role::Spank);
    send(
        &mut s,
        FrameKind::Hello,
        0,
        &Hello::new(Role::Agent, "fake-agent"),
    );
    loop {
        let Ok(f) = read_frame(&mut s, 1 << 20) else {
            return;
        };
        let id = f.header.id;
        let req: Request = match f.decode(FrameKind::Request, "request") {
            Ok(r) => r,
            Err(e) => {
                send(
                    &mut s,
                    FrameKind::Response,
                    id,
                    &Response::error(ErrorCode::BadRequest, e.to_string()),
                );
                continue;
            }
        };
        let record = |op, registration: Option<TaskRegistration>, wait_status, kind| {
            let verified = match (&registration, kind) {
                (Some(r), Some(k)) => verify_task_request(&RealProc, peer_pid, peer_uid, k, r)
                    .map_err(|e| e.to_string()),
                _ => Ok(()),
            };
            seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                op,
                peer_pid,
                peer_uid,
                registration,
                wait_status,
                verified: verified.clone(),
            });
            verified
        };
        let resp = match req {
            Request::PrepareTask { registration } => {
                let c = registration.task.container_id();
                let v = record(
                    "prepare-task",
                    Some(registration),
                    None,
                    Some(TaskRequest::Prepare),
                );
                let refuse = behaviour
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .refuse_prepare
                    .clone();
                if let Err(e) = v {
                    Response::error(ErrorCode::PermissionDenied, e)
                } else if let Some(msg) = refuse {
                    Response::error(ErrorCode::NoRoom, msg)
                } else {
                    let private_root = behaviour
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .private_root;
                    let bad_mount = behaviour
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .bad_mount;
                    let (root, mounts) = if private_root {
                        let (root, mut mounts) = private_root_for(&c);
                        if bad_mount {
                            mounts.push(MountSpec::Bind {
                                source: "/nonexistent-rbsp".into(),
                                target: "/data".into(),
                                readonly: false,
                            });
                        }
                        (Some(root), mounts)
                    } else {
                        (None, Vec::new())
                    };
                    let name = format!("rbsp-{}", c.replace('.', "-"));
                    let _ = Command::new("ip").args(["netns", "add", &name]).output();
                    netns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(name.clone());
                    Response::Ok(Reply::TaskPrepared {
                        prepared: PreparedTask {
                            container: c.clone(),
                            netns: format!("/run/netns/{name}"),
                            address: "198.18.64.100".into(),
                            hostname: Some(c),
                            root,
                            mounts,
                        },
                    })
                }
            }
            Request::RegisterTask { registration } => {
                let r = registration.clone();
                match record(
                    "register-task",
                    Some(registration),
                    None,
                    Some(TaskRequest::Register),
                ) {
                    Err(e) => Response::error(ErrorCode::PermissionDenied, e),
                    Ok(()) => Response::Ok(Reply::Container {
                        container: ContainerInfo {
                            id: r.container.clone().unwrap_or_default(),
                            task: Some(r.task.clone()),
                            uid: r.uid,
                            gid: r.gid,
                            node: r.node.clone(),
                            address: r.address.clone().unwrap_or_default(),
                            pid: Some(r.pid),
                            state: ContainerState::Running,
                            rss_bytes: r.rss_bytes.unwrap_or(0),
                            cpus: r.cpus,
                            class: r.class.clone(),
                            exit_status: None,
                            started_at: 0,
                            runs_in: None,
                        },
                    }),
                }
            }
            Request::TaskExited {
                wait_status,
                container,
            } => {
                let _ = record("task-exited", None, Some(wait_status), None);
                let first = seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|s| s.op == "task-exited")
                    .count()
                    == 1;
                let hold = first
                    && behaviour
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .hold_first_exit;
                let t0 = Instant::now();
                let migrated = loop {
                    let m = behaviour
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .migrated_exit
                        .clone();
                    if m.is_some() || !hold || t0.elapsed() > Duration::from_secs(60) {
                        break m;
                    }
                    thread::sleep(Duration::from_millis(50));
                };
                let _ = container;
                match migrated {
                    Some((st, node)) => Response::Ok(Reply::TaskFinished {
                        wait_status: st,
                        migrated_to: Some(node),
                    }),
                    None if hold => Response::error(
                        ErrorCode::Unreachable,
                        "the test never reported the moved container's final status",
                    ),
                    None => Response::Ok(Reply::TaskFinished {
                        wait_status,
                        migrated_to: None,
                    }),
                }
            }
            Request::PrepareRestore { registration, .. } => {
                let v = record(
                    "prepare-restore",
                    Some(registration),
                    None,
                    Some(TaskRequest::Prepare),
                );
                let plan = behaviour
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restore_plan
                    .clone();
                match (v, plan) {
                    (Err(e), _) => Response::error(ErrorCode::PermissionDenied, e),
                    (Ok(()), Some(plan)) => Response::Ok(Reply::RestorePlan { plan }),
                    (Ok(()), None) => Response::error(ErrorCode::NotFound, "no such migration"),
                }
            }
            Request::KillContainer { signal, .. } => {
                let _ = record("kill-container", None, Some(signal), None);
                Response::Ok(Reply::Done)
            }
            _ => Response::error(ErrorCode::Unsupported, "not in the fake agent"),
        };
        send(&mut s, FrameKind::Response, id, &resp);
    }
}

/// Mount plan of a private root (the shape the agent uses for its host-rootfs containers).
pub fn private_root_for(container: &str) -> (String, Vec<MountSpec>) {
    let root = format!("{DIR}/root-{container}");
    let _ = std::fs::create_dir_all(&root);
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        let p = Path::new(&root).join(link);
        if std::fs::symlink_metadata(&p).is_err() && Path::new("/").join(to).exists() {
            let _ = std::os::unix::fs::symlink(to, &p);
        }
    }
    for d in ["usr", "etc", "proc", "dev", "tmp"] {
        let _ = std::fs::create_dir_all(Path::new(&root).join(d));
    }
    let bind = |p: &str| MountSpec::Bind {
        source: p.into(),
        target: p.into(),
        readonly: true,
    };
    let mounts = vec![
        bind("/usr"),
        bind("/etc"),
        MountSpec::Proc,
        MountSpec::Dev,
        MountSpec::Tmpfs {
            target: "/tmp".into(),
            options: "mode=1777,size=64m".into(),
        },
    ];
    (root, mounts)
}
