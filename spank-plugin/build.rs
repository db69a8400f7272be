//! Generates bindings for the installed `slurm/spank.h` and links the plugin with a version
//! script that exports only what Slurm's plugin loader looks up.
//!
//! The Slurm version comes from `slurm/slurm_version.h`; `cfg(slurm_ge_23_11)` is set for
//! Slurm 23.11 and later (e.g. `spank_prepend_task_argv`), so the plugin builds against 22.05.

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

fn include_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(d) = env::var("SLURM_INCLUDE_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("/usr/include"));
    dirs.push(PathBuf::from("/usr/local/include"));
    dirs
}

fn find_header(name: &str) -> Option<PathBuf> {
    include_dirs()
        .into_iter()
        .map(|d| d.join("slurm").join(name))
        .find(|p| p.is_file())
}

/// `#define SLURM_VERSION_NUMBER 0x160508` → 0x160508.
fn slurm_version_number(header: &Path) -> Option<u32> {
    let text = fs::read_to_string(header).ok()?;
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        if it.next()? != "#define" || it.next()? != "SLURM_VERSION_NUMBER" {
            return None;
        }
        let v = it.next()?;
        let v = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?;
        u32::from_str_radix(v, 16).ok()
    })
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=SLURM_INCLUDE_DIR");
    println!("cargo::rustc-check-cfg=cfg(slurm_ge_23_11)");

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    let spank_h = find_header("spank.h").unwrap_or_else(|| {
        panic!("slurm/spank.h not found (install libslurm-dev, or set SLURM_INCLUDE_DIR)")
    });
    let version_h = find_header("slurm_version.h")
        .unwrap_or_else(|| panic!("slurm/slurm_version.h not found next to {spank_h:?}"));
    println!("cargo::rerun-if-changed={}", spank_h.display());
    println!("cargo::rerun-if-changed={}", version_h.display());

    let version = slurm_version_number(&version_h)
        .unwrap_or_else(|| panic!("no SLURM_VERSION_NUMBER in {}", version_h.display()));
    let (major, minor) = (version >> 16, (version >> 8) & 0xff);
    if (major, minor) >= (23, 11) {
        println!("cargo::rustc-cfg=slurm_ge_23_11");
    }
    println!("cargo::rustc-env=REBALANCER_SLURM_VERSION={major}.{minor:02}");

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
