//! Growing a running job onto more nodes, the API form of
//! `salloc --no-shell -w NODES --dependency=expand:J`, `scontrol update JobId=NEW NumNodes=0`,
//! `scontrol update JobId=J NumNodes=ALL`.
//!
//! Needs `SchedulerParameters=permit_job_expansion`. slurmctld accepts the helper allocation only in
//! J's partition and QOS, and merges it only while the helper has no steps.

use std::thread;
use std::time::{Duration, Instant};

use crate::client::Slurm;
use crate::error::{Error, Result, SlurmErrno};
use crate::hostlist;
use crate::jobs::Job;
use crate::sys;
use crate::update::{JobDesc, JobUpdate, NodeCount};

/// How long a merged job may refuse updates because its accounting index is unset.
const DB_INDEX_PATIENCE: Duration = Duration::from_secs(3);

/// How [`Slurm::expand_job`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpandOptions {
    /// Longest wait for the helper allocation to start, and for the merged job to accept updates.
    pub timeout: Duration,
    /// Interval between job-state polls.
    pub poll: Duration,
}

impl Default for ExpandOptions {
    fn default() -> Self {
        ExpandOptions {
            timeout: Duration::from_secs(30),
            poll: Duration::from_millis(200),
        }
    }
}

/// What an expansion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    /// The expanded job.
    pub job_id: u32,
    /// The helper allocation that was merged into it (now ended).
    pub helper_job_id: u32,
    /// The job's node list after the merge, expanded.
    pub node_names: Vec<String>,
    /// Why the closing `NumNodes=ALL` update was refused, if it was. The merge itself had already
    /// succeeded. Under `accounting_storage/none` (Slurm < 24.11) it is always refused with
    /// ESLURM_JOB_SETTING_DB_INX, and so is every later update of the job.
    pub refresh_refused: Option<SlurmErrno>,
}

impl Slurm {
    /// Adds `nodes` (a hostlist expression) to running job `job_id`.
    ///
    /// Requests a helper allocation on `nodes` that depends on `expand:job_id` (same user, group,
    /// partition, QOS and account as the job, which requires root or SlurmUser for another user's
    /// job), waits for it to run, merges it with `NumNodes=0`, then sends `NumNodes=ALL` to the
    /// job. The helper is cancelled if anything fails before the merge.
    pub fn expand_job(&self, job_id: u32, nodes: &str, opts: &ExpandOptions) -> Result<Expansion> {
        let target = self.load_job(job_id)?;
        if !target.state.is_running() {
            return Err(Error::InvalidRequest(format!(
                "job {job_id} is {}, only running jobs can be expanded",
                target.state
            )));
        }
        let wanted = hostlist::expand(nodes)?;
        if wanted.is_empty() {
            return Err(Error::InvalidRequest("no nodes to expand onto".into()));
        }
        if let Some(n) = wanted.iter().find(|n| target.node_names.contains(n)) {
            return Err(Error::InvalidRequest(format!(
                "job {job_id} already has node {n}"
            )));
        }

        let helper = self.allocate_expansion(&target, nodes, wanted.len())?;
        tracing::info!(
            job = job_id,
            helper,
            nodes,
            "expansion allocation requested"
        );
        if let Err(e) = self
            .wait_running(job_id, helper, opts)
            .and_then(|()| self.update_job(helper, &JobUpdate::num_nodes(NodeCount::Zero)))
        {
            if let Err(cancel) = self.cancel_job(helper) {
                tracing::warn!(job = job_id, helper, error = %cancel, "cannot cancel expansion allocation");
            }
            return Err(e);
        }
        tracing::info!(job = job_id, helper, "expansion allocation merged");

        let refresh_refused = self.refresh_after_merge(job_id, opts);
        let merged = self.load_job(job_id)?;
        Ok(Expansion {
            job_id,
            helper_job_id: helper,
            node_names: merged.node_names,
            refresh_refused,
        })
    }

    fn allocate_expansion(&self, target: &Job, nodes: &str, count: usize) -> Result<u32> {
        let count = u32::try_from(count)
            .map_err(|_| Error::InvalidRequest(format!("too many nodes in {nodes}")))?;
        let mut d = JobDesc::new();
        d.desc.name = d.string(&format!("expand-{}", target.id), "job name")?;
        d.desc.dependency = d.string(&format!("expand:{}", target.id), "dependency")?;
        d.desc.req_nodes = d.string(nodes, "node list")?;
        d.desc.min_nodes = count;
        d.desc.max_nodes = count;
        d.desc.user_id = target.user_id;
        d.desc.group_id = target.group_id;
        d.desc.work_dir = d.string("/", "work dir")?;
        if let Some(p) = &target.partition {
            d.desc.partition = d.string(p, "partition")?;
        }
        if let Some(q) = &target.qos {
            d.desc.qos = d.string(q, "qos")?;
        }
        if let Some(a) = &target.account {
            d.desc.account = d.string(a, "account")?;
        }
        allocate(&mut d)
    }

    fn wait_running(&self, job_id: u32, helper: u32, opts: &ExpandOptions) -> Result<()> {
        let start = Instant::now();
        loop {
            let job = self.load_job(helper)?;
            if job.state.is_running() && !job.state.is_configuring() {
                return Ok(());
            }
            if job.state.is_finished() {
                return Err(Error::AllocationFailed {
                    job: job_id,
                    allocation: helper,
                    state: job.state.to_string(),
                });
            }
            if job.dependency_never_satisfied() {
                return Err(Error::AllocationFailed {
                    job: job_id,
                    allocation: helper,
                    state: "PENDING (DependencyNeverSatisfied)".into(),
                });
            }
            if start.elapsed() >= opts.timeout {
                return Err(Error::AllocationTimeout {
                    job: job_id,
                    allocation: helper,
                    waited: start.elapsed(),
                });
            }
            thread::sleep(opts.poll);
        }
    }

    /// `NumNodes=ALL` on the merged job, retried briefly while slurmctld says its DB index is being
    /// set (transient with slurmdbd, permanent without accounting).
    fn refresh_after_merge(&self, job_id: u32, opts: &ExpandOptions) -> Option<SlurmErrno> {
        let start = Instant::now();
        let give_up = opts.timeout.min(DB_INDEX_PATIENCE);
        loop {
            match self.update_job(job_id, &JobUpdate::num_nodes(NodeCount::All)) {
                Ok(()) => return None,
                Err(Error::Api { source, .. })
                    if source.is_setting_db_index() && start.elapsed() < give_up =>
                {
                    thread::sleep(opts.poll);
                }
                Err(e) => {
                    tracing::warn!(job = job_id, error = %e, cause = ?e.slurm_errno(), "NumNodes=ALL refused after merge");
                    return Some(
                        e.slurm_errno()
                            .cloned()
                            .unwrap_or_else(|| SlurmErrno::from_code(sys::SLURM_ERROR)),
                    );
                }
            }
        }
    }
}

/// Sends allocation request `d` to slurmctld and returns the new job's id.
pub(crate) fn allocate(d: &mut JobDesc) -> Result<u32> {
    let mut resp: *mut sys::resource_allocation_response_msg_t = std::ptr::null_mut();
    // SAFETY: the descriptor and its strings (owned by `d`) outlive the call; `resp` is a valid
    // out-pointer. No response port is set, so slurmctld sends nothing back later.
    let rc = unsafe { sys::slurm_allocate_resources(&mut *d.desc, &mut resp) };
    if rc != 0 {
        return Err(Error::last("slurm_allocate_resources"));
    }
    let resp = AllocResponse(resp);
    resp.job_id().ok_or_else(|| Error::Api {
        call: "slurm_allocate_resources",
        source: SlurmErrno::from_code(sys::SLURM_UNEXPECTED_MSG_ERROR as i32),
    })
}

/// Owned `resource_allocation_response_msg_t` (may be NULL).
struct AllocResponse(*mut sys::resource_allocation_response_msg_t);

impl AllocResponse {
    fn job_id(&self) -> Option<u32> {
        // SAFETY: NULL or a live response we own.
        let resp = unsafe { self.0.as_ref() }?;
        #[cfg(not(slurm_job_id_in_step_id))]
        let id = resp.job_id;
        #[cfg(slurm_job_id_in_step_id)]
        let id = resp.step_id.job_id;
        Some(id)
    }
}

impl Drop for AllocResponse {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: allocated by slurm_allocate_resources, freed exactly once.
            unsafe { sys::slurm_free_resource_allocation_response_msg(self.0) }
        }
    }
}
