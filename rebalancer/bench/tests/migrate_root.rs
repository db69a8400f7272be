//! A short real benchmark: 64 MiB, plain CRIU and runc, both modes. Needs root.

use rebalancer_bench::report::{Outcome, RunReport};

#[test]
#[ignore = "needs root, CRIU 4.2, runc, nftables and network namespaces; run with --include-ignored"]
fn criu_and_runc_migrate_64_mib_without_losing_the_connection() {
    let json = std::env::temp_dir().join(format!("rbb-bench-test-{}.json", std::process::id()));
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_rebalancer-bench"))
        .args([
            "--sizes",
            "64M",
            "--toolchains",
            "criu,runc",
            "--modes",
            "stop-and-copy,post-copy,pre-copy",
        ])
        .arg("--json")
        .arg(&json)
        .status()
        .expect("run benchmark");
    assert!(st.success(), "{st}");
    let run: RunReport =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    let _ = std::fs::remove_file(&json);
    assert_eq!(run.rows.len(), 6);
    for r in &run.rows {
        if r.mode == "pre-copy" {
            // This machine's kernel has no soft-dirty tracking (FIELD-NOTES).
            assert!(
                matches!(r.outcome, Outcome::Unsupported(_) | Outcome::Ok),
                "{r:?}"
            );
            // A kernel with soft-dirty runs it: then it is checked like the other rows.
            if let Outcome::Unsupported(why) = &r.outcome {
                assert!(
                    why.contains("soft-dirty") || why.contains("SOFT_DIRTY"),
                    "{r:?}"
                );
                continue;
            }
        }
        assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
        assert_eq!(r.counter_ok, Some(true), "{r:?}");
        let d = r.downtime_ms.expect("downtime");
        assert!(d > 1.0 && d < 30_000.0, "{r:?}");
        // At least the workload's memory crossed the bridge.
        assert!(r.bytes_between_nodes.unwrap_or(0) >= 64 << 20, "{r:?}");
    }
}
