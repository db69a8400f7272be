//! SPANK plugin of slurm-rebalancer: tasks of `--migratable` steps run in containers that the
//! node agent can live-migrate. Enable with a plugstack.conf line such as
//! `required /usr/lib/slurm-rebalancer/spank_rebalancer.so socket=/run/slurm-rebalancer/agent.sock`.
//!
//! Layout (like pyxis): [`dispatch`] maps each SPANK callback to the file of its context —
//! [`local`] (srun), [`allocator`] (sbatch/salloc), [`remote`] (slurmstepd). Slurm-independent
//! parts: [`config`] (arguments and options), [`agent`] (socket client), [`verify`] (the rules
//! the agent applies to the plugin's requests).

pub mod agent;
pub mod allocator;
pub mod cgroups;
pub mod config;
pub mod container;
pub mod dispatch;
pub mod ffi;
pub mod follow;
pub mod local;
pub mod quiet;
pub mod remote;
pub mod restore;
pub mod state;
pub mod sys;
pub mod user_file;
pub mod verify;

use std::ffi::c_uint;

// Symbols Slurm's plugin loader reads (SPANK_PLUGIN in spank.h). Slurm checks plugin_version's
// major and minor against its own, so the plugin must be built against the running Slurm.
#[no_mangle]
#[used]
pub static plugin_name: [u8; 11] = *b"rebalancer\0";
#[no_mangle]
#[used]
pub static plugin_type: [u8; 6] = *b"spank\0";
#[no_mangle]
#[used]
pub static plugin_version: c_uint = ffi::SLURM_VERSION_NUMBER;
#[no_mangle]
#[used]
pub static spank_plugin_version: c_uint = 1;

/// The error and all its causes on one line: "a: b: c".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_symbols_are_c_strings() {
        assert_eq!(
            std::ffi::CStr::from_bytes_with_nul(&plugin_name).ok(),
            Some(c"rebalancer")
        );
        assert_eq!(
            std::ffi::CStr::from_bytes_with_nul(&plugin_type).ok(),
            Some(c"spank")
        );
        assert!(
            plugin_version >> 16 >= 20,
            "{plugin_version:#x} is not a Slurm version number"
        );
    }

    #[test]
    fn chain_joins_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = agent::AgentError::Connect {
            path: "/run/x.sock".into(),
            source: io,
        };
        assert_eq!(
            chain(&e),
            "cannot connect to the node agent at /run/x.sock: no such file"
        );
    }
}
