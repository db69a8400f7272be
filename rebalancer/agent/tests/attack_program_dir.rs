//! Issue #11 hole 4: the directory of a task's argv[0] (a batch script in slurmd's spool) was
//! bound into the container read-write by root. It is now read-only; the working directory
//! stays writable. Writes go through `/proc/PID1/root`, so they meet the container's own mounts.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spank");

#[test]
#[ignore = "needs root, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn the_program_directory_is_read_only_inside_the_task() {
    let stepd_dir = std::path::PathBuf::from("/tmp/rbt15-stepd");
    std::fs::create_dir_all(&stepd_dir).expect("dir");
    let stepd = stepd_dir.join("slurmstepd");
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    std::fs::copy(&python, &stepd).expect("copy python as slurmstepd");
    // Stands in for slurmd's spool directory of the job: outside every host dir and the cwd.
    let spool = std::path::PathBuf::from("/var/tmp/rbt15-spool/job00023");
    std::fs::create_dir_all(&spool).expect("spool dir");
    std::fs::write(spool.join("slurm_script"), "#!/bin/sh\n").expect("script");
    let lab = Lab::new(15, 1);
    let mut task = Command::new(&stepd)
        .arg(format!("{SCRIPTS}/stepd.py"))
        .arg("[23.0]")
        .arg(format!("{SCRIPTS}/waiter.py"))
        .arg(&lab.nodes[0].socket)
        .arg(env!("CARGO_BIN_EXE_rebalancer-agent"))
        .arg(&lab.nodes[0].name)
        .arg("198.19.31.10")
        .env("RB_JOB", "23")
        .env("RB_PROGRAM", spool.join("slurm_script"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fake slurmstepd");
    let out = task.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines().map_while(Result::ok);
    let pid1: i32 = lines
        .find_map(|l| l.strip_prefix("registered ").map(|p| p.trim().to_string()))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("task never registered\n{}", lab.log(0)));
    let root = std::path::PathBuf::from(format!("/proc/{pid1}/root"));
    let inside = root.join(spool.strip_prefix("/").expect("absolute"));
    // The program is there (slurmstepd must be able to exec it) ...
    assert!(
        inside.join("slurm_script").is_file(),
        "script not visible in the container"
    );
    // ... but nothing can be written next to it, not even by root in the container.
    let e = std::fs::write(inside.join("planted"), "x").expect_err("program dir is writable");
    eprintln!("write into the program dir: {e}");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(!spool.join("planted").exists());
    // The working directory (/tmp for this task) is still writable.
    let ok = root.join("tmp/rbt15-cwd-probe");
    std::fs::write(&ok, "x").expect("cwd stays writable");
    let _ = std::fs::remove_file(&ok);

    let mut c0 = lab.client(0);
    c0.call(&rebalancer_proto::Request::KillContainer {
        id: "j23.s0.t0".into(),
        signal: 9,
    })
    .expect("kill");
    let fin = lines.find(|l| l.starts_with("finished"));
    assert!(fin.is_some_and(|f| f.contains("\"wait_status\": 9")));
    let _ = task.wait();
    let _ = std::fs::remove_dir_all("/var/tmp/rbt15-spool");
}
