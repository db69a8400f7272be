//! The one place that finds the Slurm headers and reads their version, for the build scripts of
//! the root crate (the libslurm bindings) and of the SPANK plugin, which include this file as a
//! module (`#[path]`). Both then build against the same headers and get the same version cfgs
//! for the API differences between releases (`VERSION_CFGS`).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

/// Where the headers are looked for when `SLURM_INCLUDE_DIR` is not set, first that has them.
pub const DEFAULT_INCLUDE_DIRS: &[&str] =
    &["/usr/include", "/usr/local/include", "/opt/slurm/include"];

/// Oldest release the bindings and the plugin were written against.
pub const MIN_VERSION: u32 = version_num(22, 5, 0);

/// (cfg name, set for versions in `from..until`, what it means). Bounds checked against the
/// SchedMD/slurm release tags. A new difference between releases gets its cfg here, whichever
/// crate reads it.
pub const VERSION_CFGS: &[(&str, u32, u32, &str)] = &[
    (
        "slurm_node_alloc_fields",
        version_num(25, 5, 0),
        u32::MAX,
        "node_info_t carries alloc_cpus/alloc_memory; select_nodeinfo is gone",
    ),
    (
        "slurm_steps_by_step_id",
        version_num(25, 11, 0),
        u32::MAX,
        "slurm_get_job_steps takes a slurm_step_id_t *",
    ),
    (
        "slurm_job_id_in_step_id",
        version_num(25, 11, 0),
        u32::MAX,
        "job_desc_msg_t and the allocation response carry the job id in step_id.job_id",
    ),
    (
        "slurm_db_inx_errno",
        0,
        version_num(24, 11, 0),
        "ESLURM_JOB_SETTING_DB_INX exists",
    ),
];

pub const fn version_num(major: u32, minor: u32, micro: u32) -> u32 {
    (major << 16) | (minor << 8) | micro
}

/// `24.11.5` for 0x180b05.
pub fn version_string(v: u32) -> String {
    format!("{}.{:02}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff)
}

/// The Slurm headers a build uses and their version.
pub struct SlurmHeaders {
    /// The directory holding `slurm/` (e.g. `/usr/include`).
    pub include_dir: PathBuf,
    /// `SLURM_VERSION_NUMBER` of its `slurm/slurm_version.h` (the plugin's build reads only
    /// the cfgs and the rustc env).
    #[allow(dead_code)]
    pub version: u32,
}

/// Finds the headers (`SLURM_INCLUDE_DIR`, else [`DEFAULT_INCLUDE_DIRS`]) that hold every one of
/// `headers` (names under `slurm/`), reads their version, refuses one older than
/// [`MIN_VERSION`], and tells cargo: what to rerun on, `SLURM_VERSION_NUMBER` and
/// `SLURM_VERSION_STRING` (rustc env) and the [`VERSION_CFGS`] that apply.
pub fn detect(headers: &[&str]) -> Result<SlurmHeaders, String> {
    println!("cargo:rerun-if-env-changed=SLURM_INCLUDE_DIR");
    for (cfg, _, _, _) in VERSION_CFGS {
        println!("cargo:rustc-check-cfg=cfg({cfg})");
    }
    let has_all = |dir: &Path| headers.iter().all(|h| dir.join("slurm").join(h).is_file());
    let include_dir = match env::var_os("SLURM_INCLUDE_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if !has_all(&dir) {
                return Err(format!(
                    "SLURM_INCLUDE_DIR={} lacks one of slurm/{{{}}}",
                    dir.display(),
                    headers.join(",")
                ));
            }
            dir
        }
        None => DEFAULT_INCLUDE_DIRS
            .iter()
            .map(PathBuf::from)
            .find(|d| has_all(d))
            .ok_or_else(|| {
                format!(
                    "slurm/{{{}}} not found in {DEFAULT_INCLUDE_DIRS:?}; install libslurm-dev or \
                     set SLURM_INCLUDE_DIR",
                    headers.join(",")
                )
            })?,
    };
    let version_h = include_dir.join("slurm/slurm_version.h");
    for h in headers.iter().chain(std::iter::once(&"slurm_version.h")) {
        println!(
            "cargo:rerun-if-changed={}",
            include_dir.join("slurm").join(h).display()
        );
    }
    let text = fs::read_to_string(&version_h)
        .map_err(|e| format!("cannot read {}: {e}", version_h.display()))?;
    let version = parse_version(&text).ok_or_else(|| {
        format!(
            "no `#define SLURM_VERSION_NUMBER 0x...` in {}",
            version_h.display()
        )
    })?;
    if version < MIN_VERSION {
        return Err(format!(
            "Slurm {} in {} is older than {}",
            version_string(version),
            include_dir.display(),
            version_string(MIN_VERSION)
        ));
    }
    println!("cargo:rustc-env=SLURM_VERSION_NUMBER={version}");
    println!(
        "cargo:rustc-env=SLURM_VERSION_STRING={}",
        version_string(version)
    );
    for (cfg, from, until, _) in VERSION_CFGS {
        if (*from..*until).contains(&version) {
            println!("cargo:rustc-cfg={cfg}");
        }
    }
    Ok(SlurmHeaders {
        include_dir,
        version,
    })
}

/// `#define SLURM_VERSION_NUMBER 0x160508` (or `(0x160508)`) → 0x160508.
pub fn parse_version(header: &str) -> Option<u32> {
    header.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "#define" || words.next()? != "SLURM_VERSION_NUMBER" {
            return None;
        }
        let value = words.next()?.trim_start_matches('(').trim_end_matches(')');
        let hex = value
            .strip_prefix("0x")
            .or_else(|| value.strip_prefix("0X"))?;
        u32::from_str_radix(hex, 16).ok()
    })
}
