//! The SPANK path without Slurm: a process named `slurmstepd` (a copy of python) runs a task
//! process that does what the SPANK plugin does (prepare-task, fork pid 1 into the agent's root
//! and netns, register-task, task-exited). The container migrates; on the destination the
//! agent's `restore_command` starts a fake restore step (prepare-restore, criu restore
//! --restore-sibling, register-task), and the TCP client never notices.

mod common;
use common::*;
use rebalancer_proto::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spank");

fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, within: Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return l,
            Ok(l) => eprintln!("waiter: {l}"),
            Err(e) => panic!("no '{prefix}' line from the waiter: {e}"),
        }
    }
}

#[test]
#[ignore = "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn slurm_task_migrates_through_a_restore_step() {
    let stepd_dir = std::path::PathBuf::from("/tmp/rbt4-stepd");
    std::fs::create_dir_all(&stepd_dir).expect("dir");
    let stepd = stepd_dir.join("slurmstepd");
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    std::fs::copy(&python, &stepd).expect("copy python as slurmstepd");
    let n1_sock = "/tmp/rbt4-lab/rbt4n1.sock";
    let restore_cmd = format!(
        "restore_command = [\"{}\", \"{SCRIPTS}/stepd.py\", \"[7.1]\", \"{SCRIPTS}/restore_waiter.py\", \"{n1_sock}\", \"{{migration}}\", \"rbt4n1\"]",
        stepd.display()
    );
    let lab = Lab::with_config(4, 2, vec![String::new(), restore_cmd]);
    assert_eq!(lab.nodes[1].socket.to_string_lossy(), n1_sock);
    let addr = "198.19.20.10";

    let mut task = Command::new(&stepd)
        .arg(format!("{SCRIPTS}/stepd.py"))
        .arg("[7.0]")
        .arg(format!("{SCRIPTS}/waiter.py"))
        .arg(&lab.nodes[0].socket)
        .arg(env!("CARGO_BIN_EXE_rebalancer-agent"))
        .arg(&lab.nodes[0].name)
        .arg(addr)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fake slurmstepd");
    let rx = lines_of(&mut task);
    wait_line(&rx, "registered", Duration::from_secs(20));
    let mut c0 = lab.client(0);
    let info = c0.container("j7.s0.t0").expect("task container");
    assert_eq!(info.state, ContainerState::Running);
    assert_eq!(info.task.as_ref().map(|t| t.job_id), Some(7));

    let probe = TcpProbe::start(&lab.client_ns, addr);
    assert!(
        probe.advance(30, Duration::from_secs(20)),
        "no answers: {:?}",
        probe.stats.lock().map(|s| s.errors.clone())
    );
    let rec = c0
        .migrate("j7.s0.t0", &lab.nodes[1].name, MigrationMode::StopAndCopy)
        .unwrap_or_else(|e| {
            panic!(
                "migration failed: {e}\n--- n0\n{}\n--- n1\n{}",
                lab.log(0),
                lab.log(1)
            )
        });
    eprintln!("slurm task: {}", summary(&rec));
    assert!(
        probe.advance(50, Duration::from_secs(20)),
        "client stalled: {:?}\n{}",
        probe.stats.lock().map(|s| s.errors.clone()),
        lab.log(1)
    );
    let mut c1 = lab.client(1);
    let there = c1.container("j7.s0.t0").expect("on n1");
    assert_eq!(there.state, ContainerState::Running);
    let stats = probe.stop();
    assert!(stats.errors.is_empty(), "client errors: {:?}", stats.errors);
    // The source's task waits for the task's real end, which happens on rbt4n1.
    assert!(
        rx.recv_timeout(Duration::from_secs(2)).is_err(),
        "source task ended before the container did"
    );
    c1.call(&Request::KillContainer {
        id: "j7.s0.t0".into(),
        signal: 9,
    })
    .expect("kill");
    let fin = wait_line(&rx, "finished", Duration::from_secs(20));
    assert!(fin.contains("\"migrated_to\": \"rbt4n1\""), "{fin}");
    assert!(fin.contains("\"wait_status\": 9"), "{fin}");
    let _ = task.wait();
}
