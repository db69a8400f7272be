//! Test-only support for the privileged harnesses (agent, controller): one network lab of node
//! namespaces on a bridge with a private munged ([`NetLab`]), hosts isolated like machines on
//! it (own mount and UTS namespace, /run, state and munged: [`Hosts`]), and one TCP probe of the test
//! counter servers ([`TcpProbe`]). Needs root; nothing here is product code.

pub mod capture;
pub mod hosts;
pub mod net;
pub mod probe;

pub use capture::{recorded, recording_proxy, Recording};
pub use hosts::{HostPlan, Hosts, HOST_MUNGE, HOST_STATE};
pub use net::{NetLab, NetPlan};
pub use probe::{ProbeStats, TcpProbe};

use std::process::Command;

/// Runs `cmd` with `sh -c`.
pub fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh")
}

/// Runs `cmd` with `sh -c`; panics with its stderr when it fails.
pub fn must(cmd: &str) {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
