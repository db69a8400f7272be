//! The shared object Slurm loads exports exactly the SPANK symbols (linker version script).

use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn only_spank_symbols_are_exported() {
    let exe = std::env::current_exe().expect("test path");
    let so = exe
        .parent()
        .map(|d| d.join("libslurm_rebalancer_spank.so"))
        .expect("deps dir");
    assert!(so.is_file(), "{} not built", so.display());
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&so)
        .output()
        .expect("run nm (binutils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(String::from))
        .collect();
    let want: BTreeSet<String> = [
        "plugin_name",
        "plugin_type",
        "plugin_version",
        "spank_plugin_version",
        "slurm_spank_init",
        "slurm_spank_init_post_opt",
        "slurm_spank_local_user_init",
        "slurm_spank_user_init",
        "slurm_spank_task_init_privileged",
        "slurm_spank_task_init",
        "slurm_spank_task_exit",
        "slurm_spank_exit",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, want);
    // Slurm's symbols stay undefined: resolved from srun/slurmstepd at dlopen time.
    let undef = Command::new("nm")
        .args(["-D", "--undefined-only"])
        .arg(&so)
        .output()
        .expect("run nm");
    let undef = String::from_utf8_lossy(&undef.stdout);
    for s in ["spank_option_register", "spank_get_item", "slurm_error"] {
        assert!(undef.contains(s), "{s} not imported:\n{undef}");
    }
}
