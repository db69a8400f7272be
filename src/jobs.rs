//! Job records (`slurm_load_jobs`) and job steps (`slurm_get_job_steps`).

use std::fmt;
use std::ptr::NonNull;

use crate::client::Slurm;
use crate::error::{Error, Result, SlurmErrno};
use crate::ffi::nonempty_string;
use crate::hostlist;
use crate::sys;

/// Base state of a job or step (low byte of `job_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStateBase {
    /// Queued.
    Pending,
    /// Allocated and running.
    Running,
    /// Allocated, execution suspended.
    Suspended,
    /// Finished with exit code 0.
    Complete,
    /// Cancelled.
    Cancelled,
    /// Finished with a non-zero exit code.
    Failed,
    /// Hit its time limit.
    Timeout,
    /// A node failed.
    NodeFail,
    /// Preempted.
    Preempted,
    /// A node failed to boot.
    BootFail,
    /// Missed its deadline.
    Deadline,
    /// Out of memory.
    OutOfMemory,
    /// A value this crate does not know.
    Other(u32),
}

impl JobStateBase {
    fn from_raw(raw: u32) -> Self {
        match raw & sys::JOB_STATE_BASE {
            x if x == sys::JOB_PENDING => JobStateBase::Pending,
            x if x == sys::JOB_RUNNING => JobStateBase::Running,
            x if x == sys::JOB_SUSPENDED => JobStateBase::Suspended,
            x if x == sys::JOB_COMPLETE => JobStateBase::Complete,
            x if x == sys::JOB_CANCELLED => JobStateBase::Cancelled,
            x if x == sys::JOB_FAILED => JobStateBase::Failed,
            x if x == sys::JOB_TIMEOUT => JobStateBase::Timeout,
            x if x == sys::JOB_NODE_FAIL => JobStateBase::NodeFail,
            x if x == sys::JOB_PREEMPTED => JobStateBase::Preempted,
            x if x == sys::JOB_BOOT_FAIL => JobStateBase::BootFail,
            x if x == sys::JOB_DEADLINE => JobStateBase::Deadline,
            x if x == sys::JOB_OOM => JobStateBase::OutOfMemory,
            x => JobStateBase::Other(x),
        }
    }

    /// Name as scontrol prints it.
    pub fn name(&self) -> &'static str {
        match self {
            JobStateBase::Pending => "PENDING",
            JobStateBase::Running => "RUNNING",
            JobStateBase::Suspended => "SUSPENDED",
            JobStateBase::Complete => "COMPLETED",
            JobStateBase::Cancelled => "CANCELLED",
            JobStateBase::Failed => "FAILED",
            JobStateBase::Timeout => "TIMEOUT",
            JobStateBase::NodeFail => "NODE_FAIL",
            JobStateBase::Preempted => "PREEMPTED",
            JobStateBase::BootFail => "BOOT_FAIL",
            JobStateBase::Deadline => "DEADLINE",
            JobStateBase::OutOfMemory => "OUT_OF_MEMORY",
            JobStateBase::Other(_) => "?",
        }
    }
}

/// A job's state word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobState {
    raw: u32,
}

impl JobState {
    /// Wraps a raw `job_state`.
    pub fn from_raw(raw: u32) -> Self {
        JobState { raw }
    }

    /// The raw bits.
    pub fn raw(&self) -> u32 {
        self.raw
    }

    /// The base state.
    pub fn base(&self) -> JobStateBase {
        JobStateBase::from_raw(self.raw)
    }

    /// Pending.
    pub fn is_pending(&self) -> bool {
        self.base() == JobStateBase::Pending
    }

    /// Running (possibly still configuring or completing).
    pub fn is_running(&self) -> bool {
        self.base() == JobStateBase::Running
    }

    /// Ended in any way.
    pub fn is_finished(&self) -> bool {
        !matches!(
            self.base(),
            JobStateBase::Pending | JobStateBase::Running | JobStateBase::Suspended
        )
    }

    /// Epilogs still running.
    pub fn is_completing(&self) -> bool {
        self.raw & sys::RS_JOB_COMPLETING != 0
    }

    /// Nodes still booting / prolog running.
    pub fn is_configuring(&self) -> bool {
        self.raw & sys::RS_JOB_CONFIGURING != 0
    }

    /// A size change is being applied.
    pub fn is_resizing(&self) -> bool {
        self.raw & sys::RS_JOB_RESIZING != 0
    }
}

/// Like scontrol's `JobState=`: a transient flag wins over the base state.
impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.is_completing() {
            "COMPLETING"
        } else if self.is_configuring() {
            "CONFIGURING"
        } else if self.is_resizing() {
            "RESIZING"
        } else {
            self.base().name()
        };
        f.write_str(s)
    }
}

/// One job as slurmctld reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// JobId.
    pub id: u32,
    /// Name.
    pub name: Option<String>,
    /// Owner uid.
    pub user_id: u32,
    /// Owner name (from slurmctld, else the local passwd database).
    pub user_name: Option<String>,
    /// Owner's group id for the job.
    pub group_id: u32,
    /// Account.
    pub account: Option<String>,
    /// Partition.
    pub partition: Option<String>,
    /// QOS.
    pub qos: Option<String>,
    /// State.
    pub state: JobState,
    /// Numeric `enum job_state_reason` (why pending, or why it ended).
    pub state_reason: u32,
    /// Allocated nodes as a hostlist expression (None while pending).
    pub nodes: Option<String>,
    /// `nodes` expanded.
    pub node_names: Vec<String>,
    /// A batch job (sbatch). Only then is `batch_host` a node the job can never leave.
    pub is_batch: bool,
    /// slurmctld's BatchHost: the batch script's node for batch jobs; for salloc/srun allocations
    /// (22.05) the first allocated node, not updated when the job is resized.
    pub batch_host: Option<String>,
    /// Node count (allocated when running, requested when pending).
    pub num_nodes: u32,
    /// CPU count (allocated when running, requested when pending).
    pub num_cpus: u32,
    /// Job this one is an expansion of (`expand:` dependency target), or None.
    pub dependency: Option<String>,
    /// Time limit in minutes; None when unlimited (`INFINITE`) or not set (`NO_VAL`).
    pub time_limit_min: Option<u32>,
    /// When the job ends at the latest (Unix seconds; the start plus the time limit while it
    /// runs), 0 when unknown.
    pub end_time: i64,
}

impl Job {
    /// # Safety
    /// `rec` belongs to a live job_info_msg_t.
    unsafe fn from_record(rec: &sys::slurm_job_info_t) -> Result<Job> {
        // SAFETY: string pointers in a record of a live message are NULL or NUL-terminated and
        // owned by the message, which the caller keeps alive for this whole function.
        let s = |p: *const std::ffi::c_char| unsafe { nonempty_string(p) };
        let nodes = s(rec.nodes);
        let node_names = match &nodes {
            Some(n) => hostlist::expand(n)?,
            None => Vec::new(),
        };
        let user_name = s(rec.user_name).or_else(|| user_name(rec.user_id));
        // u16 up to 25.11, u32 later.
        #[allow(clippy::useless_conversion)]
        let state_reason = u32::from(rec.state_reason);
        Ok(Job {
            id: rec.job_id,
            name: s(rec.name),
            user_id: rec.user_id,
            user_name,
            group_id: rec.group_id,
            account: s(rec.account),
            partition: s(rec.partition),
            qos: s(rec.qos),
            state: JobState::from_raw(rec.job_state),
            state_reason,
            nodes,
            node_names,
            is_batch: rec.batch_flag != 0,
            batch_host: s(rec.batch_host),
            num_nodes: rec.num_nodes,
            num_cpus: rec.num_cpus,
            dependency: s(rec.dependency),
            time_limit_min: (rec.time_limit != sys::INFINITE && rec.time_limit != sys::NO_VAL)
                .then_some(rec.time_limit),
            // time_t is i64 on every target this crate builds for.
            #[allow(clippy::useless_conversion)]
            end_time: i64::from(rec.end_time),
        })
    }

    /// True if the pending reason says the dependency can never be satisfied.
    pub fn dependency_never_satisfied(&self) -> bool {
        self.state_reason == sys::WAIT_DEP_INVALID
    }
}

/// Looks `uid` up in the local passwd database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: all-zero is a valid `struct passwd` (pointers NULL, ints 0).
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: buffers are valid and sized as passed; getpwuid_r writes only into them.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points into `buf`, NUL-terminated.
    unsafe { crate::ffi::opt_string(pwd.pw_name) }
}

/// Jobs with the controller's timestamp of that view.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSnapshot {
    /// slurmctld's `last_update` (Unix seconds), for [`Slurm::load_jobs_since`].
    pub last_update: i64,
    /// The jobs.
    pub jobs: Vec<Job>,
}

/// Owned `job_info_msg_t`.
struct JobInfoMsg(NonNull<sys::job_info_msg_t>);

impl JobInfoMsg {
    /// None: nothing changed since `since` (0 loads unconditionally).
    fn load(since: libc::time_t) -> Result<Option<Self>> {
        let mut raw: *mut sys::job_info_msg_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; on success we own the allocated message.
        let rc = unsafe { sys::slurm_load_jobs(since, &mut raw, sys::RS_SHOW_ALL as u16) };
        if rc != 0 {
            let err = SlurmErrno::last();
            if since != 0 && err.is_no_change() {
                return Ok(None);
            }
            return Err(Error::Api {
                call: "slurm_load_jobs",
                source: err,
            });
        }
        NonNull::new(raw)
            .map(|p| Some(JobInfoMsg(p)))
            .ok_or_else(|| Error::Api {
                call: "slurm_load_jobs",
                source: SlurmErrno::from_code(sys::SLURM_UNEXPECTED_MSG_ERROR as i32),
            })
    }

    fn all() -> Result<Self> {
        Self::load(0)?.ok_or_else(|| Error::Api {
            call: "slurm_load_jobs",
            source: SlurmErrno::from_code(sys::SLURM_UNEXPECTED_MSG_ERROR as i32),
        })
    }

    fn last_update(&self) -> i64 {
        // SAFETY: live message we own.
        unsafe { self.0.as_ref() }.last_update
    }

    fn records(&self) -> &[sys::slurm_job_info_t] {
        // SAFETY: we own the message; job_array holds record_count records.
        unsafe {
            let msg = self.0.as_ref();
            if msg.job_array.is_null() || msg.record_count == 0 {
                &[]
            } else {
                std::slice::from_raw_parts(msg.job_array, msg.record_count as usize)
            }
        }
    }
}

impl Drop for JobInfoMsg {
    fn drop(&mut self) {
        // SAFETY: allocated by slurm_load_jobs, freed exactly once.
        unsafe { sys::slurm_free_job_info_msg(self.0.as_ptr()) }
    }
}

/// A step id, with Slurm's special steps named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepId {
    /// `srun` step number.
    Numbered(u32),
    /// The batch script (`J.batch`).
    Batch,
    /// The extern step (`J.extern`).
    Extern,
    /// The interactive step (`J.interactive`).
    Interactive,
    /// A step not yet started (`J.TBD`).
    Pending,
}

impl StepId {
    /// Decodes a raw `step_id`.
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            sys::SLURM_BATCH_SCRIPT => StepId::Batch,
            sys::SLURM_EXTERN_CONT => StepId::Extern,
            sys::SLURM_INTERACTIVE_STEP => StepId::Interactive,
            sys::SLURM_PENDING_STEP => StepId::Pending,
            n => StepId::Numbered(n),
        }
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepId::Numbered(n) => write!(f, "{n}"),
            StepId::Batch => f.write_str("batch"),
            StepId::Extern => f.write_str("extern"),
            StepId::Interactive => f.write_str("interactive"),
            StepId::Pending => f.write_str("TBD"),
        }
    }
}

/// One job step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Job the step belongs to.
    pub job_id: u32,
    /// Step id.
    pub step_id: StepId,
    /// Heterogeneous component, None if not a het step.
    pub het_component: Option<u32>,
    /// Name.
    pub name: Option<String>,
    /// State.
    pub state: JobState,
    /// Nodes as a hostlist expression.
    pub nodes: Option<String>,
    /// `nodes` expanded.
    pub node_names: Vec<String>,
    /// Task count.
    pub num_tasks: u32,
    /// CPUs used.
    pub num_cpus: u32,
}

/// Owned `job_step_info_response_msg_t`.
struct StepInfoMsg(NonNull<sys::job_step_info_response_msg_t>);

impl StepInfoMsg {
    fn load(job_id: u32) -> Result<Option<Self>> {
        let mut raw: *mut sys::job_step_info_response_msg_t = std::ptr::null_mut();
        let rc = get_job_steps(job_id, &mut raw);
        if rc != 0 {
            let err = SlurmErrno::last();
            if err.is_invalid_job_id() {
                return Err(Error::JobNotFound { job: job_id });
            }
            return Err(Error::Api {
                call: "slurm_get_job_steps",
                source: err,
            });
        }
        Ok(NonNull::new(raw).map(StepInfoMsg))
    }

    fn records(&self) -> &[sys::job_step_info_t] {
        // SAFETY: we own the message; job_steps holds job_step_count records.
        unsafe {
            let msg = self.0.as_ref();
            if msg.job_steps.is_null() || msg.job_step_count == 0 {
                &[]
            } else {
                std::slice::from_raw_parts(msg.job_steps, msg.job_step_count as usize)
            }
        }
    }
}

#[cfg(not(slurm_steps_by_step_id))]
fn get_job_steps(job_id: u32, out: &mut *mut sys::job_step_info_response_msg_t) -> i32 {
    // SAFETY: valid out-pointer; on success we own the allocated message.
    unsafe { sys::slurm_get_job_steps(0, job_id, sys::NO_VAL, out, sys::RS_SHOW_ALL as u16) }
}

#[cfg(slurm_steps_by_step_id)]
fn get_job_steps(job_id: u32, out: &mut *mut sys::job_step_info_response_msg_t) -> i32 {
    // SAFETY: slurm_step_id_t is plain data; zero then set the fields we mean.
    let mut id: sys::slurm_step_id_t = unsafe { std::mem::zeroed() };
    id.job_id = job_id;
    id.step_id = sys::NO_VAL;
    id.step_het_comp = sys::NO_VAL;
    // SAFETY: `id` lives across the call; valid out-pointer; we own the result on success.
    unsafe { sys::slurm_get_job_steps(&mut id, out, sys::RS_SHOW_ALL as u16) }
}

impl Drop for StepInfoMsg {
    fn drop(&mut self) {
        // slurm_free_job_step_info_members() forgets submit_line and cpus_per_tres (22.05 up to at
        // least 26.x): free them first. xfree NULLs the pointers, so a fixed libslurm will not
        // free them twice.
        // SAFETY: we own the message; job_steps holds job_step_count records whose string fields
        // are NULL or xmalloc()ed by the unpacker.
        unsafe {
            let msg = self.0.as_mut();
            if !msg.job_steps.is_null() {
                for i in 0..msg.job_step_count as usize {
                    let step = &mut *msg.job_steps.add(i);
                    sys::slurm_xfree((&mut step.submit_line as *mut *mut std::ffi::c_char).cast());
                    sys::slurm_xfree(
                        (&mut step.cpus_per_tres as *mut *mut std::ffi::c_char).cast(),
                    );
                }
            }
        }
        // SAFETY: allocated by slurm_get_job_steps, freed exactly once.
        unsafe { sys::slurm_free_job_step_info_response_msg(self.0.as_ptr()) }
    }
}

impl Slurm {
    /// Every job slurmctld still holds (pending, running and recently finished).
    pub fn load_jobs(&self) -> Result<Vec<Job>> {
        let msg = JobInfoMsg::all()?;
        msg.records()
            .iter()
            // SAFETY: records of the live message `msg`.
            .map(|rec| unsafe { Job::from_record(rec) })
            .collect()
    }

    /// Like [`Slurm::load_jobs`], but None if slurmctld reports no change since `last_update`
    /// (from an earlier [`JobSnapshot`]; 0 always loads).
    pub fn load_jobs_since(&self, last_update: i64) -> Result<Option<JobSnapshot>> {
        let since = libc::time_t::try_from(last_update).unwrap_or(0);
        let Some(msg) = JobInfoMsg::load(since)? else {
            return Ok(None);
        };
        let jobs = msg
            .records()
            .iter()
            // SAFETY: records of the live message `msg`.
            .map(|rec| unsafe { Job::from_record(rec) })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(JobSnapshot {
            last_update: msg.last_update(),
            jobs,
        }))
    }

    /// One job by id.
    pub fn load_job(&self, job_id: u32) -> Result<Job> {
        let msg = JobInfoMsg::all()?;
        let rec = msg
            .records()
            .iter()
            .find(|r| r.job_id == job_id)
            .ok_or(Error::JobNotFound { job: job_id })?;
        // SAFETY: record of the live message `msg`.
        unsafe { Job::from_record(rec) }
    }

    /// Running jobs that have `node` in their allocation.
    pub fn jobs_on_node(&self, node: &str) -> Result<Vec<Job>> {
        Ok(self
            .load_jobs()?
            .into_iter()
            .filter(|j| j.state.is_running() && j.node_names.iter().any(|n| n == node))
            .collect())
    }

    /// The steps of `job_id` (batch and extern steps included).
    pub fn job_steps(&self, job_id: u32) -> Result<Vec<Step>> {
        let Some(msg) = StepInfoMsg::load(job_id)? else {
            return Ok(Vec::new());
        };
        msg.records()
            .iter()
            .map(|rec| {
                // SAFETY: record of the live message `msg`; strings NULL or NUL-terminated.
                let nodes = unsafe { nonempty_string(rec.nodes) };
                let node_names = match &nodes {
                    Some(n) => hostlist::expand(n)?,
                    None => Vec::new(),
                };
                Ok(Step {
                    job_id: rec.step_id.job_id,
                    step_id: StepId::from_raw(rec.step_id.step_id),
                    het_component: (rec.step_id.step_het_comp != sys::NO_VAL)
                        .then_some(rec.step_id.step_het_comp),
                    // SAFETY: as above.
                    name: unsafe { nonempty_string(rec.name) },
                    state: JobState::from_raw(rec.state),
                    nodes,
                    node_names,
                    num_tasks: rec.num_tasks,
                    num_cpus: rec.num_cpus,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_state_base_and_flags() {
        let s = JobState::from_raw(sys::JOB_RUNNING);
        assert!(s.is_running() && !s.is_finished());
        assert_eq!(s.to_string(), "RUNNING");
        let s = JobState::from_raw(sys::JOB_RUNNING | sys::RS_JOB_CONFIGURING);
        assert!(s.is_running() && s.is_configuring());
        assert_eq!(s.to_string(), "CONFIGURING");
        let s = JobState::from_raw(sys::JOB_COMPLETE | sys::RS_JOB_COMPLETING);
        assert!(s.is_finished());
        assert_eq!(s.to_string(), "COMPLETING");
        assert_eq!(
            JobState::from_raw(sys::JOB_CANCELLED).to_string(),
            "CANCELLED"
        );
    }

    #[test]
    fn special_step_ids_have_names() {
        assert_eq!(StepId::from_raw(0), StepId::Numbered(0));
        assert_eq!(StepId::from_raw(0xffff_fffb).to_string(), "batch");
        assert_eq!(StepId::from_raw(0xffff_fffc).to_string(), "extern");
        assert_eq!(StepId::from_raw(7).to_string(), "7");
    }

    #[test]
    fn uid_zero_is_root() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
