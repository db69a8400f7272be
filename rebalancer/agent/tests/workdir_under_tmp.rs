//! A container whose working directory is a node directory under /tmp writes there (not into
//! its private /tmp), before and after migrations in both modes.

mod common;
use common::*;
use rebalancer_proto::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Waits until the file has grown past `after` lines.
fn grows(p: &Path, after: usize, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if lines(p) > after + 5 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
#[ignore = "needs root, CRIU 4.2, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn workdir_under_tmp_is_the_nodes_directory_across_migrations() {
    let _ = REASON;
    let lab = Lab::new(6, 2);
    let dir = std::env::temp_dir().join(format!("rb-workdir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir work dir");
    let d = dir.to_string_lossy().to_string();
    let ticks = dir.join("ticks");

    let mut spec = server_spec("wd1", "198.19.22.10", 0);
    spec.cwd = d.clone();
    spec.binds = vec![d.clone()];
    // A relative path: only the working directory decides where it lands.
    spec.argv = vec![
        "python3".into(),
        "-u".into(),
        "-c".into(),
        "import time\nf = open('ticks', 'a')\nn = 0\nwhile True:\n    n += 1\n    f.write('%d\\n' % n); f.flush()\n    time.sleep(0.05)\n".into(),
    ];
    let mut c0 = lab.client(0);
    c0.call(&Request::CreateContainer { spec }).expect("create");
    assert!(
        grows(&ticks, 0, Duration::from_secs(15)),
        "nothing written to {} (the work dir under /tmp is hidden?)\n{}",
        ticks.display(),
        lab.log(0)
    );

    for (from, to, mode) in [
        (0, 1, MigrationMode::StopAndCopy),
        (1, 0, MigrationMode::PostCopy),
    ] {
        let rec = lab
            .client(from)
            .migrate("wd1", &lab.nodes[to].name, mode)
            .unwrap_or_else(|e| panic!("{mode} failed: {e}\n{}\n{}", lab.log(0), lab.log(1)));
        assert_eq!(rec.state, MigrationState::Succeeded);
        let n = lines(&ticks);
        assert!(
            grows(&ticks, n, Duration::from_secs(15)),
            "the restored container stopped writing to {} after {mode}",
            ticks.display()
        );
    }
    let mut c0 = lab.client(0);
    let _ = c0.call(&Request::KillContainer {
        id: "wd1".into(),
        signal: 9,
    });
    let _ = std::fs::remove_dir_all(&dir);
}
