//! An allocation that starts at once or not at all and runs no process: the API form of
//! `salloc --no-shell --immediate -N1 -w NODE -n1 -c CPUS --mem=MB -t MIN -J NAME`.
//!
//! The rebalancer uses it to make slurmctld count CPUs that its own accounting misses after a
//! job expansion (docs/slurm-releases.md, "Why Slurm's CPU accounting goes wrong").

use crate::client::Slurm;
use crate::error::{Error, Result};
use crate::expand::allocate;
use crate::sys;
use crate::update::JobDesc;

/// What [`Slurm::allocate_now`] asks for: one node, `cpus` CPUs for one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImmediateAllocation {
    /// Job name (what squeue shows).
    pub name: String,
    /// The one node.
    pub node: String,
    /// CPUs of the one task (at least 1).
    pub cpus: u32,
    /// Memory per node in MB (at least 1: 0 would mean "all of the node's memory" to Slurm).
    pub mem_mb: u64,
    /// Partition; None: slurmctld's default.
    pub partition: Option<String>,
    /// Account; None: the user's default account.
    pub account: Option<String>,
    /// Time limit in minutes (at least 1); None: unlimited.
    pub time_limit_min: Option<u32>,
    /// The job's comment (who asked for it and why).
    pub comment: Option<String>,
}

impl Slurm {
    /// Allocates `req` for the calling user, now or not at all (`immediate`: slurmctld refuses
    /// the request instead of queueing it when the node cannot take it at once), and returns
    /// the new job's id. The allocation has no step and no process; it ends at its time limit
    /// or when cancelled ([`Slurm::cancel_job`]).
    pub fn allocate_now(&self, req: &ImmediateAllocation) -> Result<u32> {
        if req.cpus == 0 {
            return Err(Error::InvalidRequest(format!(
                "allocation {}: 0 CPUs",
                req.name
            )));
        }
        let cpus = u16::try_from(req.cpus).map_err(|_| {
            Error::InvalidRequest(format!(
                "allocation {}: {} CPUs exceed one task's limit",
                req.name, req.cpus
            ))
        })?;
        let mut d = JobDesc::new();
        d.desc.name = d.string(&req.name, "job name")?;
        d.desc.req_nodes = d.string(&req.node, "node list")?;
        d.desc.min_nodes = 1;
        d.desc.max_nodes = 1;
        d.desc.num_tasks = 1;
        d.desc.cpus_per_task = cpus;
        d.desc.min_cpus = req.cpus;
        d.desc.pn_min_memory = req.mem_mb.max(1);
        d.desc.time_limit = match req.time_limit_min {
            Some(m) => m.max(1),
            None => sys::INFINITE,
        };
        d.desc.immediate = 1;
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        d.desc.user_id = unsafe { libc::getuid() };
        // SAFETY: as above.
        d.desc.group_id = unsafe { libc::getgid() };
        d.desc.work_dir = d.string("/", "work dir")?;
        if let Some(p) = &req.partition {
            d.desc.partition = d.string(p, "partition")?;
        }
        if let Some(a) = &req.account {
            d.desc.account = d.string(a, "account")?;
        }
        if let Some(c) = &req.comment {
            d.desc.comment = d.string(c, "comment")?;
        }
        allocate(&mut d)
    }
}
