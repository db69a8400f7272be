//! Node and job updates (`slurm_update_node`, `slurm_update_job`), the API behind
//! `scontrol update`.

use std::ffi::CString;
use std::mem::MaybeUninit;

use crate::client::Slurm;
use crate::error::{check, Error, Result};
use crate::ffi::cstring;
use crate::sys;

/// A node state change, as `scontrol update NodeName=... State=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeStateChange {
    /// `State=DRAIN Reason=...`: no new work; running jobs continue.
    Drain {
        /// Required by slurmctld.
        reason: String,
    },
    /// `State=RESUME`: clear DRAIN/DOWN/FAIL.
    Resume,
    /// `State=UNDRAIN`: clear DRAIN only.
    Undrain,
    /// `State=DOWN Reason=...`: jobs on the node are killed.
    Down {
        /// Required by slurmctld.
        reason: String,
    },
}

impl NodeStateChange {
    fn state_bits(&self) -> u32 {
        match self {
            NodeStateChange::Drain { .. } => sys::RS_NODE_STATE_DRAIN,
            NodeStateChange::Resume => sys::RS_NODE_RESUME,
            NodeStateChange::Undrain => sys::RS_NODE_STATE_UNDRAIN,
            NodeStateChange::Down { .. } => sys::NODE_STATE_DOWN,
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            NodeStateChange::Drain { reason } | NodeStateChange::Down { reason } => Some(reason),
            NodeStateChange::Resume | NodeStateChange::Undrain => None,
        }
    }
}

/// A node count for `NumNodes=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeCount {
    /// `NumNodes=0` on a running `expand:` job: hand its nodes to the job it expands and end it.
    Zero,
    /// `NumNodes=ALL` (`min_nodes = INFINITE`). slurmctld (22.05) treats it as "no change"; scontrol
    /// sends it to the expanded job after the merge to refresh its view.
    All,
    /// Shrink a running job to this many nodes (slurmctld picks which to release, never the batch
    /// host); for a pending job, the minimum node count.
    Exactly(u32),
}

/// Fields of `scontrol update JobId=...` that resizing needs. Unset fields are left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobUpdate {
    /// `NodeList=`: for a running job, the nodes to keep (others are released).
    pub node_list: Option<String>,
    /// `NumNodes=`.
    pub num_nodes: Option<NodeCount>,
}

impl JobUpdate {
    /// `NodeList=nodes`.
    pub fn node_list(nodes: impl Into<String>) -> Self {
        JobUpdate {
            node_list: Some(nodes.into()),
            num_nodes: None,
        }
    }

    /// `NumNodes=count`.
    pub fn num_nodes(count: NodeCount) -> Self {
        JobUpdate {
            node_list: None,
            num_nodes: Some(count),
        }
    }
}

/// A `job_desc_msg_t` set to "no change" by libslurm, plus the C strings it points to.
pub(crate) struct JobDesc {
    pub(crate) desc: Box<sys::job_desc_msg_t>,
    strings: Vec<CString>,
}

impl JobDesc {
    pub(crate) fn new() -> Self {
        let mut desc = Box::new(MaybeUninit::<sys::job_desc_msg_t>::zeroed());
        // SAFETY: the pointer is to writable, properly aligned storage of the right size;
        // slurm_init_job_desc_msg memsets and fills every field.
        unsafe { sys::slurm_init_job_desc_msg(desc.as_mut_ptr()) };
        // SAFETY: fully initialised by slurm_init_job_desc_msg (and zeroed before that).
        let desc = unsafe { Box::from_raw(Box::into_raw(desc).cast::<sys::job_desc_msg_t>()) };
        JobDesc {
            desc,
            strings: Vec::new(),
        }
    }

    /// Sets the job the descriptor refers to.
    pub(crate) fn set_job_id(&mut self, job_id: u32) {
        #[cfg(not(slurm_job_id_in_step_id))]
        {
            self.desc.job_id = job_id;
        }
        #[cfg(slurm_job_id_in_step_id)]
        {
            self.desc.step_id.job_id = job_id;
        }
    }

    /// The job the descriptor refers to (NO_VAL: none).
    #[cfg(test)]
    pub(crate) fn job_id(&self) -> u32 {
        #[cfg(not(slurm_job_id_in_step_id))]
        {
            self.desc.job_id
        }
        #[cfg(slurm_job_id_in_step_id)]
        {
            self.desc.step_id.job_id
        }
    }

    /// Keeps `s` alive as long as the descriptor and returns the pointer to store in it.
    pub(crate) fn string(&mut self, s: &str, what: &'static str) -> Result<*mut libc::c_char> {
        let c = cstring(s, what)?;
        // The CString's heap buffer does not move when the CString itself moves into the Vec.
        let ptr = c.as_ptr().cast_mut();
        self.strings.push(c);
        Ok(ptr)
    }
}

impl Slurm {
    /// Changes the state of `nodes` (a hostlist expression).
    pub fn update_node(&self, nodes: &str, change: &NodeStateChange) -> Result<()> {
        if nodes.trim().is_empty() {
            return Err(Error::InvalidRequest("empty node list".into()));
        }
        if change.reason().is_some_and(|r| r.trim().is_empty()) {
            return Err(Error::InvalidRequest(
                "drain and down need a non-empty reason".into(),
            ));
        }
        let c_nodes = cstring(nodes, "node list")?;
        let c_reason: Option<CString> =
            change.reason().map(|r| cstring(r, "reason")).transpose()?;

        let mut msg = MaybeUninit::<sys::update_node_msg_t>::zeroed();
        // SAFETY: writable storage of the right size; the call initialises every field.
        unsafe { sys::slurm_init_update_node_msg(msg.as_mut_ptr()) };
        // SAFETY: initialised just above.
        let mut msg = unsafe { msg.assume_init() };
        msg.node_names = c_nodes.as_ptr().cast_mut();
        msg.node_state = change.state_bits();
        if let Some(r) = &c_reason {
            msg.reason = r.as_ptr().cast_mut();
        }
        // SAFETY: `msg` and the strings it points to outlive the call; libslurm only reads them
        // (packs them into an RPC) and frees nothing.
        let rc = unsafe { sys::slurm_update_node(&mut msg) };
        check(rc, "slurm_update_node")
    }

    /// `State=DRAIN Reason=reason` on `nodes`.
    pub fn drain_nodes(&self, nodes: &str, reason: &str) -> Result<()> {
        self.update_node(
            nodes,
            &NodeStateChange::Drain {
                reason: reason.to_owned(),
            },
        )
    }

    /// `State=RESUME` on `nodes`.
    pub fn resume_nodes(&self, nodes: &str) -> Result<()> {
        self.update_node(nodes, &NodeStateChange::Resume)
    }

    /// Applies `update` to job `job_id`.
    pub fn update_job(&self, job_id: u32, update: &JobUpdate) -> Result<()> {
        if update.node_list.is_none() && update.num_nodes.is_none() {
            return Err(Error::InvalidRequest("job update changes nothing".into()));
        }
        let mut d = JobDesc::new();
        d.set_job_id(job_id);
        if let Some(nodes) = &update.node_list {
            if nodes.trim().is_empty() {
                return Err(Error::InvalidRequest("empty NodeList".into()));
            }
            d.desc.req_nodes = d.string(nodes, "node list")?;
        }
        match update.num_nodes {
            None => {}
            Some(NodeCount::Zero) => d.desc.min_nodes = 0,
            Some(NodeCount::All) => d.desc.min_nodes = sys::INFINITE,
            Some(NodeCount::Exactly(0)) => {
                return Err(Error::InvalidRequest(
                    "NumNodes=0 is only meaningful as NodeCount::Zero".into(),
                ))
            }
            // Only min_nodes: slurmctld refuses a max_nodes change once the job runs
            // (ESLURM_JOB_NOT_PENDING), and min_nodes alone is what shrinks a running job.
            Some(NodeCount::Exactly(n)) => d.desc.min_nodes = n,
        }
        // SAFETY: the descriptor and every string it points to (owned by `d`) outlive the call;
        // slurm_update_job only reads it.
        let rc = unsafe { sys::slurm_update_job(&mut *d.desc) };
        if rc != 0 {
            let err = Error::last("slurm_update_job");
            if err.slurm_errno().is_some_and(|e| e.is_invalid_job_id()) {
                return Err(Error::JobNotFound { job: job_id });
            }
            return Err(err);
        }
        Ok(())
    }

    /// `NodeList=keep` on a running job: keeps only those nodes, ending the job's steps on the
    /// others. A batch job cannot leave its batch host; that is refused here with
    /// [`Error::BatchHostPinned`] (slurmctld would say "Invalid node name specified").
    pub fn shrink_job(&self, job_id: u32, keep: &str) -> Result<()> {
        let kept = crate::hostlist::expand(keep)?;
        if kept.is_empty() {
            return Err(Error::InvalidRequest("empty NodeList".into()));
        }
        let job = self.load_job(job_id)?;
        if job.is_batch {
            if let Some(host) = job.batch_host.filter(|h| !kept.contains(h)) {
                return Err(Error::BatchHostPinned { job: job_id, host });
            }
        }
        self.update_job(job_id, &JobUpdate::node_list(keep))
    }

    /// Cancels a job (SIGKILL to all steps, as `scancel`).
    pub fn cancel_job(&self, job_id: u32) -> Result<()> {
        let id = cstring(&job_id.to_string(), "job id")?;
        // SAFETY: `id` is a valid C string for the call; sibling NULL means "this cluster".
        let rc =
            unsafe { sys::slurm_kill_job2(id.as_ptr(), libc::SIGKILL as u16, 0, std::ptr::null()) };
        if rc != 0 {
            let err = Error::last("slurm_kill_job2");
            if err.slurm_errno().is_some_and(|e| e.is_invalid_job_id()) {
                return Err(Error::JobNotFound { job: job_id });
            }
            return Err(err);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_desc_starts_as_no_change() {
        let d = JobDesc::new();
        assert_eq!(d.desc.min_nodes, sys::NO_VAL);
        assert_eq!(d.desc.max_nodes, sys::NO_VAL);
        assert_eq!(d.job_id(), sys::NO_VAL);
        assert!(d.desc.req_nodes.is_null());
        assert!(d.desc.dependency.is_null());
    }

    #[test]
    fn job_desc_keeps_its_strings_alive() {
        let mut d = JobDesc::new();
        d.desc.req_nodes = d.string("node2", "node list").unwrap();
        d.desc.dependency = d.string("expand:7", "dependency").unwrap();
        // SAFETY: pointers into strings owned by `d`, which is alive.
        let (nodes, dep) = unsafe {
            (
                crate::ffi::opt_string(d.desc.req_nodes),
                crate::ffi::opt_string(d.desc.dependency),
            )
        };
        assert_eq!(nodes.as_deref(), Some("node2"));
        assert_eq!(dep.as_deref(), Some("expand:7"));
    }

    #[test]
    fn requests_that_cannot_work_are_refused_before_any_rpc() {
        // No slurm_init here: these must fail before reaching libslurm's RPC layer.
        let s = Slurm::for_tests();
        assert!(matches!(
            s.drain_nodes("node1", "  "),
            Err(Error::InvalidRequest(_))
        ));
        assert!(matches!(
            s.update_job(1, &JobUpdate::default()),
            Err(Error::InvalidRequest(_))
        ));
        assert!(matches!(
            s.update_job(1, &JobUpdate::num_nodes(NodeCount::Exactly(0))),
            Err(Error::InvalidRequest(_))
        ));
        assert!(matches!(
            s.update_node(
                "n1",
                &NodeStateChange::Drain {
                    reason: "a\0b".into()
                }
            ),
            Err(Error::InteriorNul { what: "reason" })
        ));
    }
}
