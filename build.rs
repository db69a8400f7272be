//! Generates the libslurm bindings from the installed `slurm/slurm.h` and links libslurm.
//!
//! Environment:
//! - `SLURM_INCLUDE_DIR`: directory holding `slurm/slurm.h` (default: `/usr/include`,
//!   `/usr/local/include`, `/opt/slurm/include`, first that has it).
//! - `SLURM_LIB_DIR`: directory holding `libslurm.so` (default: the linker's search path, plus
//!   `<prefix>/lib` when the headers were found under `<prefix>/include`).
//!
//! The headers and their version are found by `build-support/slurm_version.rs`, shared with the
//! SPANK plugin's build script: `SLURM_VERSION_NUMBER` (rustc env) and cfg flags for the API
//! differences this crate papers over (its `VERSION_CFGS`).

use std::env;
use std::path::{Path, PathBuf};

#[path = "build-support/slurm_version.rs"]
mod slurm_version;

use slurm_version::version_string;

const FUNCTIONS: &[&str] = &[
    "slurm_init",
    "slurm_strerror",
    "slurm_load_node",
    "slurm_free_node_info_msg",
    "slurm_load_partitions",
    "slurm_free_partition_info_msg",
    "slurm_populate_node_partitions",
    "slurm_get_select_nodeinfo",
    "slurm_load_jobs",
    "slurm_free_job_info_msg",
    "slurm_get_job_steps",
    "slurm_free_job_step_info_response_msg",
    "slurm_init_update_node_msg",
    "slurm_update_node",
    "slurm_init_job_desc_msg",
    "slurm_update_job",
    "slurm_allocate_resources",
    "slurm_free_resource_allocation_response_msg",
    "slurm_kill_job2",
    "slurm_hostlist_create",
    "slurm_hostlist_destroy",
    "slurm_hostlist_count",
    "slurm_hostlist_push",
    "slurm_hostlist_shift",
    "slurm_hostlist_uniq",
    "slurm_hostlist_ranged_string",
];

const TYPES: &[&str] = &[
    "node_info_t",
    "node_info_msg_t",
    "partition_info_msg_t",
    "job_info_t",
    "slurm_job_info_t",
    "job_info_msg_t",
    "job_step_info_t",
    "job_step_info_response_msg_t",
    "slurm_step_id_t",
    "update_node_msg_t",
    "job_desc_msg_t",
    "resource_allocation_response_msg_t",
    "hostlist_t",
    "node_states",
    "job_states",
    "select_nodedata_type",
    "slurm_err_t",
    "job_state_reason",
];

/// Plain literal macros: bindgen evaluates these itself.
const VARS: &[&str] = &[
    "SLURM_VERSION_NUMBER",
    "SLURM_SUCCESS",
    "SLURM_ERROR",
    "NO_VAL",
    "NO_VAL16",
    "NO_VAL64",
    "INFINITE",
    "NODE_STATE_BASE",
    "NODE_STATE_FLAGS",
    "JOB_STATE_BASE",
    "JOB_STATE_FLAGS",
    "SLURM_BATCH_SCRIPT",
    "SLURM_EXTERN_CONT",
    "SLURM_INTERACTIVE_STEP",
    "SLURM_PENDING_STEP",
];

/// Flags defined (in some releases) through the function-like macro `SLURM_BIT(n)`, which bindgen
/// cannot evaluate: the wrapper header re-exports them as enumerators `RS_<name>` so clang computes
/// the values.
const BIT_FLAGS: &[&str] = &[
    "SHOW_ALL",
    "SHOW_DETAIL",
    "NODE_STATE_NET",
    "NODE_STATE_RES",
    "NODE_STATE_UNDRAIN",
    "NODE_STATE_CLOUD",
    "NODE_RESUME",
    "NODE_STATE_DRAIN",
    "NODE_STATE_COMPLETING",
    "NODE_STATE_NO_RESPOND",
    "NODE_STATE_POWERED_DOWN",
    "NODE_STATE_FAIL",
    "NODE_STATE_POWERING_UP",
    "NODE_STATE_MAINT",
    "NODE_STATE_REBOOT_REQUESTED",
    "NODE_STATE_REBOOT_CANCEL",
    "NODE_STATE_POWERING_DOWN",
    "NODE_STATE_REBOOT_ISSUED",
    "NODE_STATE_PLANNED",
    "NODE_STATE_INVALID_REG",
    "NODE_STATE_POWER_DOWN",
    "NODE_STATE_POWER_UP",
    "NODE_STATE_POWER_DRAIN",
    "NODE_STATE_DYNAMIC_FUTURE",
    "NODE_STATE_DYNAMIC_NORM",
    "JOB_COMPLETING",
    "JOB_CONFIGURING",
    "JOB_RESIZING",
    "JOB_REQUEUE",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build-support/slurm_version.rs");
    println!("cargo:rerun-if-env-changed=SLURM_LIB_DIR");

    let headers = match slurm_version::detect(&["slurm.h", "slurm_errno.h"]) {
        Ok(h) => h,
        Err(msg) => fail(&msg),
    };
    link_libslurm(&headers.include_dir);
    generate_bindings(&headers.include_dir, headers.version);
}

fn fail(msg: &str) -> ! {
    panic!("rebalancer-slurm build: {msg}");
}

fn link_libslurm(include_dir: &Path) {
    if let Some(dir) = env::var_os("SLURM_LIB_DIR") {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            fail(&format!(
                "SLURM_LIB_DIR={} is not a directory",
                dir.display()
            ));
        }
        println!("cargo:rustc-link-search=native={}", dir.display());
    } else if let Some(prefix) = include_dir.parent() {
        // A from-source install (`--prefix=/opt/slurm`) keeps headers and library side by side;
        // /usr is already on the linker's path.
        for lib in ["lib", "lib64"] {
            let dir = prefix.join(lib);
            if include_dir != Path::new("/usr/include") && dir.join("libslurm.so").exists() {
                println!("cargo:rustc-link-search=native={}", dir.display());
            }
        }
    }
    println!("cargo:rustc-link-lib=dylib=slurm");
}

/// cexpr reads `#define NO_VAL64 (0xfffffffffffffffe)` as the i64 -2; typed as u64 the same bits
/// are right again.
#[derive(Debug)]
struct MacroTypes;

impl bindgen::callbacks::ParseCallbacks for MacroTypes {
    fn int_macro(&self, name: &str, _value: i64) -> Option<bindgen::callbacks::IntKind> {
        (name == "NO_VAL64").then_some(bindgen::callbacks::IntKind::U64)
    }
}

fn generate_bindings(include_dir: &Path, version: u32) {
    let mut wrapper = String::from(
        "#include <stdint.h>\n#include <stdio.h>\n#include <sys/types.h>\n\
         #include <slurm/slurm.h>\n#include <slurm/slurm_errno.h>\n\
         #include <slurm/slurm_version.h>\n",
    );
    // One enum per flag: a missing flag in some future release then fails only its own line.
    for flag in BIT_FLAGS {
        wrapper.push_str(&format!(
            "#ifdef {flag}\nenum {{ RS_{flag} = {flag} }};\n#endif\n"
        ));
    }

    let mut builder = bindgen::Builder::default()
        .header_contents("rebalancer_slurm_wrapper.h", &wrapper)
        .clang_arg(format!("-I{}", include_dir.display()))
        .allowlist_recursively(true)
        .layout_tests(false)
        .derive_default(false)
        .generate_comments(false)
        .prepend_enum_name(false)
        .raw_line(format!(
            "/// `SLURM_VERSION_NUMBER` of the headers these bindings came from ({}).",
            version_string(version)
        ))
        .raw_line(format!(
            "pub const BINDINGS_SLURM_VERSION: u32 = {version:#x};"
        ))
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .parse_callbacks(Box::new(MacroTypes));
    for f in FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    for t in TYPES {
        builder = builder.allowlist_type(t);
    }
    for v in VARS {
        builder = builder.allowlist_var(v);
    }
    for flag in BIT_FLAGS {
        builder = builder.allowlist_var(format!("RS_{flag}"));
    }
    // Structures we only touch through pointers stay opaque so that unrelated header changes in a
    // newer Slurm do not break the build.
    for opaque in [
        "dynamic_plugin_data_t",
        "dynamic_plugin_data",
        "job_resources_t",
        "job_resources",
        "acct_gather_energy_t",
        "ext_sensors_data_t",
        "power_mgmt_data_t",
        "slurm_addr_t",
        "sockaddr_storage",
        "cron_entry_t",
        "list_t",
        "xlist",
        "partition_info_t",
        "partition_info",
    ] {
        builder = builder.opaque_type(opaque);
    }

    let bindings = match builder.generate() {
        Ok(b) => b,
        Err(e) => fail(&format!(
            "bindgen failed on {}/slurm/slurm.h: {e}",
            include_dir.display()
        )),
    };
    let out = match env::var_os("OUT_DIR") {
        Some(dir) => PathBuf::from(dir).join("slurm_bindings.rs"),
        None => fail("OUT_DIR is not set"),
    };
    if let Err(e) = bindings.write_to_file(&out) {
        fail(&format!("cannot write {}: {e}", out.display()));
    }
}
