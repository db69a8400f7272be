//! [`SlurmBackend`] over libslurm (root crate `rebalancer-slurm`): node polls use slurmctld's
//! `last_update`, so an unchanged cluster costs one small RPC answered "no change".

use std::path::Path;
use std::sync::Mutex;

use rebalancer_slurm::{ExpandOptions, ImmediateAllocation, Slurm};

use crate::slurm_sync::{
    holder_minutes, HoldRequest, NodeFlags, SlurmBackend, SlurmError, SlurmJob, SlurmNode,
};

pub struct LibslurmBackend {
    slurm: Slurm,
    last_update: Mutex<i64>,
    /// For the `scontrol` calls libslurm's bindings lack (AdminComment).
    conf: Option<std::path::PathBuf>,
}

fn api(e: rebalancer_slurm::Error) -> SlurmError {
    SlurmError::Libslurm(e.to_string())
}

impl LibslurmBackend {
    /// Initialises libslurm (once per process) with `conf`, or libslurm's own lookup.
    pub fn new(conf: Option<&Path>) -> Result<Self, SlurmError> {
        Ok(LibslurmBackend {
            slurm: Slurm::init(conf).map_err(api)?,
            last_update: Mutex::new(0),
            conf: conf.map(Path::to_path_buf),
        })
    }
}

fn node(n: rebalancer_slurm::Node) -> SlurmNode {
    let st = n.state;
    let phase = st.drain_phase();
    SlurmNode {
        state: st.to_string(),
        flags: NodeFlags {
            drain: st.is_drain(),
            draining: matches!(phase, Some(rebalancer_slurm::DrainPhase::Draining)),
            drained: matches!(phase, Some(rebalancer_slurm::DrainPhase::Drained)),
            down: st.is_down(),
            reboot_asap: st.reboot_requested(),
        },
        cpus_total: n.cpus,
        cpus_alloc: n.alloc_cpus,
        mem_total_mb: n.real_memory_mb,
        mem_alloc_mb: n.alloc_memory_mb,
        partitions: n.partitions,
        features: n.active_features,
        addr: n.addr,
        name: n.name,
    }
}

impl SlurmBackend for LibslurmBackend {
    fn name(&self) -> &'static str {
        "libslurm"
    }

    fn poll_nodes(&self, force: bool) -> Result<Option<Vec<SlurmNode>>, SlurmError> {
        let mut last = self.last_update.lock().unwrap_or_else(|p| p.into_inner());
        let since = if force { 0 } else { *last };
        match self.slurm.load_nodes_since(since).map_err(api)? {
            None => Ok(None),
            Some(snap) => {
                *last = snap.last_update;
                Ok(Some(snap.nodes.into_iter().map(node).collect()))
            }
        }
    }

    fn jobs(&self) -> Result<Vec<SlurmJob>, SlurmError> {
        Ok(self
            .slurm
            .load_jobs()
            .map_err(api)?
            .into_iter()
            .filter(|j| j.state.is_running())
            .map(|j| SlurmJob {
                job_id: j.id,
                name: j.name.unwrap_or_default(),
                user: j.user_name.unwrap_or_default(),
                uid: j.user_id,
                account: j.account.unwrap_or_default(),
                partition: j.partition.unwrap_or_default(),
                state: j.state.base().name().to_string(),
                nodes: j.node_names,
                // slurmctld names a BatchHost for every allocation (salloc too); only a batch
                // script pins its node.
                batch_host: if j.is_batch { j.batch_host } else { None },
            })
            .collect())
    }

    fn expand_job(&self, job_id: u32, node: &str) -> Result<(), SlurmError> {
        let x = self
            .slurm
            .expand_job(job_id, node, &ExpandOptions::default())
            .map_err(api)?;
        tracing::info!(job = job_id, helper = x.helper_job_id, nodes = ?x.node_names, "job expanded");
        Ok(())
    }

    fn set_job_nodes(&self, job_id: u32, nodes: &[String]) -> Result<(), SlurmError> {
        self.slurm.shrink_job(job_id, &nodes.join(",")).map_err(api)
    }

    fn record_move(&self, job_id: u32, note: &str) -> Result<(), SlurmError> {
        crate::slurm_sync::record_move_with_scontrol(self.conf.as_deref(), job_id, note)
    }

    fn hold(&self, req: &HoldRequest) -> Result<u32, SlurmError> {
        let job = self.slurm.load_job(req.job_id).map_err(api)?;
        if !job.state.is_running() {
            return Err(SlurmError::Libslurm(format!(
                "job {} is {}",
                req.job_id, job.state
            )));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let minutes = holder_minutes(job.time_limit_min.is_some(), job.end_time, now)
            .map_err(|e| SlurmError::Libslurm(format!("no holder for job {}: {e}", req.job_id)))?;
        let alloc = ImmediateAllocation {
            name: req.name(),
            node: req.node.clone(),
            cpus: req.cpus,
            mem_mb: 1,
            partition: job.partition,
            account: req.account.clone(),
            time_limit_min: minutes,
            comment: Some(req.comment()),
        };
        self.slurm.allocate_now(&alloc).map_err(api)
    }

    fn cancel_job(&self, job_id: u32) -> Result<(), SlurmError> {
        match self.slurm.cancel_job(job_id) {
            // Already gone: what a release wants.
            Err(rebalancer_slurm::Error::JobNotFound { .. }) => Ok(()),
            r => r.map_err(api),
        }
    }

    fn credited_cpus(&self, job_id: u32, node: &str) -> Result<u32, SlurmError> {
        crate::slurm_sync::credited_cpus_with_scontrol(self.conf.as_deref(), job_id, node)
    }
}
