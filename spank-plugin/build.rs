//! Generates bindings for the installed `slurm/spank.h` and links the plugin with a version
//! script that exports only what Slurm's plugin loader looks up.
//!
//! The headers and their version are found by `build-support/slurm_version.rs`, shared with the
//! root crate's build script, which sets the same version cfgs for both crates (the plugin's
//! SPANK calls exist unchanged from 22.05 to 26.05, so it reads none today).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

/// Symbols Slurm's loader resolves with dlsym (plugin.c `_verify_syms`, plugstack.c).
const EXPORTS: &[&str] = &[
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
];

#[path = "../build-support/slurm_version.rs"]
mod slurm_version;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=../build-support/slurm_version.rs");

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    let headers = slurm_version::detect(&["spank.h"])
        .unwrap_or_else(|msg| panic!("slurm-rebalancer-spank build: {msg}"));
    let spank_h = headers.include_dir.join("slurm/spank.h");
    let include_root = spank_h
        .parent()
        .and_then(Path::parent)
        .expect("header lives in <dir>/slurm/");
    let bindings = bindgen::Builder::default()
        .header(spank_h.to_string_lossy())
        .clang_arg(format!("-I{}", include_root.display()))
        .allowlist_function("spank_context")
        .allowlist_function("spank_option_register")
        .allowlist_function("spank_option_getopt")
        .allowlist_function("spank_get_item")
        .allowlist_function("spank_getenv")
        .allowlist_function("spank_setenv")
        .allowlist_function("spank_strerror")
        .allowlist_function("slurm_error")
        .allowlist_function("slurm_info")
        .allowlist_function("slurm_verbose")
        .allowlist_function("slurm_debug")
        .allowlist_function("slurm_spank_log")
        .allowlist_type("spank_t")
        .allowlist_type("spank_option")
        .allowlist_type("spank_item")
        .allowlist_type("spank_context")
        .allowlist_var("SLURM_VERSION_NUMBER")
        .allowlist_var("ESPANK_SUCCESS")
        .allowlist_var("ESPANK_.*")
        .rustified_enum("spank_context")
        .constified_enum_module("spank_item")
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen could not parse slurm/spank.h (is libclang-dev installed?)");
    bindings
        .write_to_file(out.join("spank_bindings.rs"))
        .expect("write spank_bindings.rs");

    // Only the SPANK symbols leave the shared object (like pyxis' pyxis.lds): Rust's own
    // exported symbols and the statically linked std stay local.
    let mut script = String::from("{\n  global:\n");
    for s in EXPORTS {
        script.push_str(&format!("    {s};\n"));
    }
    script.push_str("  local: *;\n};\n");
    let script_path = out.join("spank-exports.map");
    fs::write(&script_path, script).expect("write version script");
    println!(
        "cargo::rustc-cdylib-link-arg=-Wl,--version-script={}",
        script_path.display()
    );
}
