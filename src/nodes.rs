//! Node records (`slurm_load_node`) and node state decoding.

use std::fmt;
use std::ptr::NonNull;

use crate::client::Slurm;
use crate::error::{Error, Result, SlurmErrno};
use crate::ffi::{nonempty_string, split_list};
use crate::sys;

/// Base state of a node (low four bits of `node_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BaseState {
    /// Initial state, slurmd never registered.
    Unknown,
    /// Not usable.
    Down,
    /// Nothing allocated.
    Idle,
    /// Every CPU allocated.
    Allocated,
    /// Unused by Slurm.
    Error,
    /// Some CPUs allocated (derived on the client as scontrol and sinfo do).
    Mixed,
    /// Configured for the future, not in service.
    Future,
    /// A value this crate does not know.
    Other(u32),
}

impl BaseState {
    fn from_raw(raw: u32) -> Self {
        match raw & sys::NODE_STATE_BASE {
            x if x == sys::NODE_STATE_UNKNOWN => BaseState::Unknown,
            x if x == sys::NODE_STATE_DOWN => BaseState::Down,
            x if x == sys::NODE_STATE_IDLE => BaseState::Idle,
            x if x == sys::NODE_STATE_ALLOCATED => BaseState::Allocated,
            x if x == sys::NODE_STATE_ERROR => BaseState::Error,
            x if x == sys::NODE_STATE_MIXED => BaseState::Mixed,
            x if x == sys::NODE_STATE_FUTURE => BaseState::Future,
            x => BaseState::Other(x),
        }
    }

    /// Name as scontrol prints it.
    pub fn name(&self) -> &'static str {
        match self {
            BaseState::Unknown => "UNKNOWN",
            BaseState::Down => "DOWN",
            BaseState::Idle => "IDLE",
            BaseState::Allocated => "ALLOCATED",
            BaseState::Error => "ERROR",
            BaseState::Mixed => "MIXED",
            BaseState::Future => "FUTURE",
            BaseState::Other(_) => "?",
        }
    }
}

/// One state flag (high bits of `node_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeFlag {
    /// Reserved for a job (RESERVED).
    Reserved,
    /// Cloud node.
    Cloud,
    /// Do not allocate new work.
    Drain,
    /// Jobs are completing on the node.
    Completing,
    /// slurmd is not responding.
    NotResponding,
    /// Powered down.
    PoweredDown,
    /// Failing: drain with the intent to take it down.
    Fail,
    /// Powering up.
    PoweringUp,
    /// In a maintenance reservation.
    Maintenance,
    /// Reboot requested (`scontrol reboot`); with [`NodeFlag::Drain`] it is `reboot ASAP`.
    RebootRequested,
    /// Pending reboot cancelled.
    RebootCancel,
    /// Powering down.
    PoweringDown,
    /// Reboot sent to the node.
    RebootIssued,
    /// Planned for a pending job by the backfill scheduler.
    Planned,
    /// Registration was invalid.
    InvalidReg,
    /// Manual power down requested.
    PowerDown,
    /// Manual power up requested.
    PowerUp,
    /// Power down as soon as idle.
    PowerDrain,
    /// Dynamic node, future state.
    DynamicFuture,
    /// Dynamic node.
    DynamicNorm,
}

impl NodeFlag {
    /// Every flag, in scontrol's printing order.
    pub const ALL: [NodeFlag; 20] = [
        NodeFlag::Cloud,
        NodeFlag::Completing,
        NodeFlag::Drain,
        NodeFlag::DynamicFuture,
        NodeFlag::DynamicNorm,
        NodeFlag::InvalidReg,
        NodeFlag::Fail,
        NodeFlag::Maintenance,
        NodeFlag::PowerDown,
        NodeFlag::PowerUp,
        NodeFlag::PoweredDown,
        NodeFlag::RebootRequested,
        NodeFlag::RebootIssued,
        NodeFlag::Reserved,
        NodeFlag::NotResponding,
        NodeFlag::Planned,
        NodeFlag::PoweringUp,
        NodeFlag::PoweringDown,
        NodeFlag::RebootCancel,
        NodeFlag::PowerDrain,
    ];

    /// The bit in `node_state`, from the installed headers.
    pub fn bit(self) -> u32 {
        match self {
            NodeFlag::Reserved => sys::RS_NODE_STATE_RES,
            NodeFlag::Cloud => sys::RS_NODE_STATE_CLOUD,
            NodeFlag::Drain => sys::RS_NODE_STATE_DRAIN,
            NodeFlag::Completing => sys::RS_NODE_STATE_COMPLETING,
            NodeFlag::NotResponding => sys::RS_NODE_STATE_NO_RESPOND,
            NodeFlag::PoweredDown => sys::RS_NODE_STATE_POWERED_DOWN,
            NodeFlag::Fail => sys::RS_NODE_STATE_FAIL,
            NodeFlag::PoweringUp => sys::RS_NODE_STATE_POWERING_UP,
            NodeFlag::Maintenance => sys::RS_NODE_STATE_MAINT,
            NodeFlag::RebootRequested => sys::RS_NODE_STATE_REBOOT_REQUESTED,
            NodeFlag::RebootCancel => sys::RS_NODE_STATE_REBOOT_CANCEL,
            NodeFlag::PoweringDown => sys::RS_NODE_STATE_POWERING_DOWN,
            NodeFlag::RebootIssued => sys::RS_NODE_STATE_REBOOT_ISSUED,
            NodeFlag::Planned => sys::RS_NODE_STATE_PLANNED,
            NodeFlag::InvalidReg => sys::RS_NODE_STATE_INVALID_REG,
            NodeFlag::PowerDown => sys::RS_NODE_STATE_POWER_DOWN,
            NodeFlag::PowerUp => sys::RS_NODE_STATE_POWER_UP,
            NodeFlag::PowerDrain => sys::RS_NODE_STATE_POWER_DRAIN,
            NodeFlag::DynamicFuture => sys::RS_NODE_STATE_DYNAMIC_FUTURE,
            NodeFlag::DynamicNorm => sys::RS_NODE_STATE_DYNAMIC_NORM,
        }
    }

    /// Name as scontrol prints it after a `+`.
    pub fn name(self) -> &'static str {
        match self {
            NodeFlag::Reserved => "RESERVED",
            NodeFlag::Cloud => "CLOUD",
            NodeFlag::Drain => "DRAIN",
            NodeFlag::Completing => "COMPLETING",
            NodeFlag::NotResponding => "NOT_RESPONDING",
            NodeFlag::PoweredDown => "POWERED_DOWN",
            NodeFlag::Fail => "FAIL",
            NodeFlag::PoweringUp => "POWERING_UP",
            NodeFlag::Maintenance => "MAINTENANCE",
            NodeFlag::RebootRequested => "REBOOT_REQUESTED",
            NodeFlag::RebootCancel => "REBOOT_CANCEL",
            NodeFlag::PoweringDown => "POWERING_DOWN",
            NodeFlag::RebootIssued => "REBOOT_ISSUED",
            NodeFlag::Planned => "PLANNED",
            NodeFlag::InvalidReg => "INVALID_REG",
            NodeFlag::PowerDown => "POWER_DOWN",
            NodeFlag::PowerUp => "POWER_UP",
            NodeFlag::PowerDrain => "POWER_DRAIN",
            NodeFlag::DynamicFuture => "DYNAMIC_FUTURE",
            NodeFlag::DynamicNorm => "DYNAMIC_NORM",
        }
    }
}

/// Where a drained node is in draining, as sinfo tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrainPhase {
    /// DRAIN flag set and work still on the node (allocated, mixed or completing).
    Draining,
    /// DRAIN flag set and nothing left running.
    Drained,
}

/// A node's state: base state plus flags, with MIXED derived from allocated CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeState {
    raw: u32,
}

impl NodeState {
    /// Wraps a raw `node_state` as slurmctld sent it.
    pub fn from_raw(raw: u32) -> Self {
        NodeState { raw }
    }

    /// Wraps `raw` and applies scontrol's rule: some but not all effective CPUs allocated is MIXED
    /// (slurmctld itself reports ALLOCATED or IDLE).
    pub fn with_allocation(raw: u32, alloc_cpus: u32, effective_cpus: u32) -> Self {
        if alloc_cpus > 0 && alloc_cpus < effective_cpus {
            NodeState {
                raw: (raw & sys::NODE_STATE_FLAGS) | sys::NODE_STATE_MIXED,
            }
        } else {
            NodeState { raw }
        }
    }

    /// The raw bits.
    pub fn raw(&self) -> u32 {
        self.raw
    }

    /// The base state.
    pub fn base(&self) -> BaseState {
        BaseState::from_raw(self.raw)
    }

    /// True if `flag` is set.
    pub fn has(&self, flag: NodeFlag) -> bool {
        self.raw & flag.bit() != 0
    }

    /// Every known flag that is set, in scontrol's order.
    pub fn flags(&self) -> Vec<NodeFlag> {
        NodeFlag::ALL
            .iter()
            .copied()
            .filter(|f| self.has(*f))
            .collect()
    }

    /// DRAIN flag set (draining or drained).
    pub fn is_drain(&self) -> bool {
        self.has(NodeFlag::Drain)
    }

    /// Draining versus drained, decided like sinfo (`node_state_string`): work left on the node
    /// (ALLOCATED, MIXED or COMPLETING) means draining.
    pub fn drain_phase(&self) -> Option<DrainPhase> {
        if !self.is_drain() {
            return None;
        }
        let busy = self.has(NodeFlag::Completing)
            || matches!(self.base(), BaseState::Allocated | BaseState::Mixed);
        Some(if busy {
            DrainPhase::Draining
        } else {
            DrainPhase::Drained
        })
    }

    /// Base state DOWN.
    pub fn is_down(&self) -> bool {
        self.base() == BaseState::Down
    }

    /// Base state IDLE.
    pub fn is_idle(&self) -> bool {
        self.base() == BaseState::Idle
    }

    /// Base state ALLOCATED.
    pub fn is_allocated(&self) -> bool {
        self.base() == BaseState::Allocated
    }

    /// Base state MIXED.
    pub fn is_mixed(&self) -> bool {
        self.base() == BaseState::Mixed
    }

    /// `scontrol reboot` pending.
    pub fn reboot_requested(&self) -> bool {
        self.has(NodeFlag::RebootRequested)
    }

    /// `scontrol reboot ASAP` pending: slurmctld adds DRAIN to the reboot request.
    pub fn reboot_asap(&self) -> bool {
        self.reboot_requested() && self.is_drain()
    }

    /// slurmd not responding.
    pub fn not_responding(&self) -> bool {
        self.has(NodeFlag::NotResponding)
    }

    /// Whether slurmctld would start new work here: up, responding, not drained, failing, in
    /// maintenance, rebooting or powered off.
    pub fn accepts_work(&self) -> bool {
        matches!(
            self.base(),
            BaseState::Idle | BaseState::Mixed | BaseState::Allocated
        ) && !self.raw_has_any(&[
            NodeFlag::Drain,
            NodeFlag::Fail,
            NodeFlag::NotResponding,
            NodeFlag::Maintenance,
            NodeFlag::RebootRequested,
            NodeFlag::RebootIssued,
            NodeFlag::PoweredDown,
            NodeFlag::PoweringDown,
            NodeFlag::PoweringUp,
            NodeFlag::InvalidReg,
        ])
    }

    fn raw_has_any(&self, flags: &[NodeFlag]) -> bool {
        flags.iter().any(|f| self.has(*f))
    }

    /// sinfo's one-word state (`DRAINED`, `DRAINING`, `MIXED`, `DOWN`, `REBOOT`...), without
    /// sinfo's suffix characters (`*`, `~`, `@`...).
    pub fn summary(&self) -> &'static str {
        if self.has(NodeFlag::InvalidReg) {
            return "INVAL";
        }
        let busy = matches!(self.base(), BaseState::Allocated | BaseState::Mixed);
        if self.has(NodeFlag::Maintenance)
            && !self.is_drain()
            && !busy
            && self.base() != BaseState::Down
        {
            return "MAINT";
        }
        if (self.reboot_requested() || self.has(NodeFlag::RebootIssued)) && !busy {
            return "REBOOT";
        }
        match self.drain_phase() {
            Some(DrainPhase::Draining) => return "DRAINING",
            Some(DrainPhase::Drained) => return "DRAINED",
            None => {}
        }
        if self.has(NodeFlag::Fail) {
            return if self.has(NodeFlag::Completing) || self.is_allocated() {
                "FAILING"
            } else {
                "FAIL"
            };
        }
        if self.is_down() {
            return "DOWN";
        }
        if self.is_allocated() {
            return "ALLOCATED";
        }
        if self.has(NodeFlag::Completing) {
            return "COMPLETING";
        }
        self.base().name()
    }
}

/// scontrol's long form: `IDLE+DRAIN`, `MIXED+REBOOT_REQUESTED`.
impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.base().name())?;
        for flag in self.flags() {
            write!(f, "+{}", flag.name())?;
        }
        Ok(())
    }
}

/// One node as slurmctld reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// NodeName.
    pub name: String,
    /// State with MIXED derived.
    pub state: NodeState,
    /// Reason for DOWN/DRAIN, if set.
    pub reason: Option<String>,
    /// Configured CPUs.
    pub cpus: u32,
    /// CPUs minus specialised cores.
    pub effective_cpus: u32,
    /// CPUs allocated to jobs.
    pub alloc_cpus: u32,
    /// RealMemory in MiB.
    pub real_memory_mb: u64,
    /// Memory allocated to jobs in MiB.
    pub alloc_memory_mb: u64,
    /// Free memory reported by slurmd in MiB (None until reported).
    pub free_memory_mb: Option<u64>,
    /// Load average (None until reported).
    pub cpu_load: Option<f64>,
    /// Available features.
    pub features: Vec<String>,
    /// Active features.
    pub active_features: Vec<String>,
    /// Partitions containing the node.
    pub partitions: Vec<String>,
    /// NodeAddr.
    pub addr: Option<String>,
    /// NodeHostname.
    pub hostname: Option<String>,
}

/// Nodes with the controller's timestamp of that view.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot {
    /// slurmctld's `last_update` (Unix seconds), for [`Slurm::load_nodes_since`].
    pub last_update: i64,
    /// The nodes.
    pub nodes: Vec<Node>,
}

/// Owned `node_info_msg_t`.
struct NodeInfoMsg(NonNull<sys::node_info_msg_t>);

impl NodeInfoMsg {
    /// None: nothing changed since `since` (a previous `last_update`; 0 loads unconditionally).
    fn load(since: libc::time_t) -> Result<Option<Self>> {
        let mut raw: *mut sys::node_info_msg_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; on success libslurm stores an allocated message we
        // then own.
        let rc = unsafe { sys::slurm_load_node(since, &mut raw, sys::RS_SHOW_ALL as u16) };
        if rc != 0 {
            let err = SlurmErrno::last();
            if since != 0 && err.is_no_change() {
                return Ok(None);
            }
            return Err(Error::Api {
                call: "slurm_load_node",
                source: err,
            });
        }
        NonNull::new(raw)
            .map(|p| Some(NodeInfoMsg(p)))
            .ok_or_else(|| Error::Api {
                call: "slurm_load_node",
                source: SlurmErrno::from_code(sys::SLURM_UNEXPECTED_MSG_ERROR as i32),
            })
    }

    fn last_update(&self) -> i64 {
        // SAFETY: live message we own.
        unsafe { self.0.as_ref() }.last_update
    }

    fn records(&self) -> &[sys::node_info_t] {
        // SAFETY: we own the message; node_array holds record_count records (or is NULL when 0).
        unsafe {
            let msg = self.0.as_ref();
            if msg.node_array.is_null() || msg.record_count == 0 {
                &[]
            } else {
                std::slice::from_raw_parts(msg.node_array, msg.record_count as usize)
            }
        }
    }
}

impl Drop for NodeInfoMsg {
    fn drop(&mut self) {
        // SAFETY: allocated by slurm_load_node, freed exactly once (also frees the partitions
        // strings slurm_populate_node_partitions added).
        unsafe { sys::slurm_free_node_info_msg(self.0.as_ptr()) }
    }
}

/// Owned `partition_info_msg_t`.
struct PartitionInfoMsg(NonNull<sys::partition_info_msg_t>);

impl PartitionInfoMsg {
    fn load() -> Result<Self> {
        let mut raw: *mut sys::partition_info_msg_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; on success we own the allocated message.
        let rc = unsafe { sys::slurm_load_partitions(0, &mut raw, sys::RS_SHOW_ALL as u16) };
        if rc != 0 {
            return Err(Error::last("slurm_load_partitions"));
        }
        NonNull::new(raw)
            .map(PartitionInfoMsg)
            .ok_or_else(|| Error::Api {
                call: "slurm_load_partitions",
                source: SlurmErrno::from_code(sys::SLURM_UNEXPECTED_MSG_ERROR as i32),
            })
    }
}

impl Drop for PartitionInfoMsg {
    fn drop(&mut self) {
        // SAFETY: allocated by slurm_load_partitions, freed exactly once.
        unsafe { sys::slurm_free_partition_info_msg(self.0.as_ptr()) }
    }
}

/// (allocated CPUs, allocated memory MiB) of a record.
#[cfg(not(slurm_node_alloc_fields))]
fn allocation(rec: &sys::node_info_t) -> (u32, u64) {
    let mut cpus: u16 = 0;
    let mut mem: u64 = 0;
    if !rec.select_nodeinfo.is_null() {
        // SAFETY: select_nodeinfo belongs to the live message; SUBCNT with ALLOCATED writes a
        // uint16_t and MEM_ALLOC a uint64_t (select plugins' nodeinfo_get). Failures leave 0.
        unsafe {
            sys::slurm_get_select_nodeinfo(
                rec.select_nodeinfo,
                sys::SELECT_NODEDATA_SUBCNT,
                sys::NODE_STATE_ALLOCATED,
                (&mut cpus as *mut u16).cast(),
            );
            sys::slurm_get_select_nodeinfo(
                rec.select_nodeinfo,
                sys::SELECT_NODEDATA_MEM_ALLOC,
                sys::NODE_STATE_ALLOCATED,
                (&mut mem as *mut u64).cast(),
            );
        }
    }
    (u32::from(cpus), mem)
}

#[cfg(slurm_node_alloc_fields)]
fn allocation(rec: &sys::node_info_t) -> (u32, u64) {
    (u32::from(rec.alloc_cpus), rec.alloc_memory)
}

impl Node {
    /// # Safety
    /// `rec` belongs to a live node_info_msg_t (its strings are valid).
    unsafe fn from_record(rec: &sys::node_info_t) -> Option<Node> {
        // SAFETY: string pointers in a record of a live message are NULL or NUL-terminated and
        // owned by the message, which the caller keeps alive for this whole function.
        let s = |p: *const std::ffi::c_char| unsafe { nonempty_string(p) };
        let name = s(rec.name)?;
        let (alloc_cpus, alloc_memory_mb) = allocation(rec);
        let effective_cpus = if rec.cpus_efctv > 0 {
            u32::from(rec.cpus_efctv)
        } else {
            u32::from(rec.cpus)
        };
        let features = s(rec.features);
        let active = s(rec.features_act);
        Some(Node {
            name,
            state: NodeState::with_allocation(rec.node_state, alloc_cpus, effective_cpus),
            reason: s(rec.reason),
            cpus: u32::from(rec.cpus),
            effective_cpus,
            alloc_cpus,
            real_memory_mb: rec.real_memory,
            alloc_memory_mb,
            free_memory_mb: (rec.free_mem != sys::NO_VAL64).then_some(rec.free_mem),
            cpu_load: (rec.cpu_load != sys::NO_VAL).then(|| f64::from(rec.cpu_load) / 100.0),
            active_features: split_list(active.as_deref().or(features.as_deref())),
            features: split_list(features.as_deref()),
            partitions: split_list(s(rec.partitions).as_deref()),
            addr: s(rec.node_addr),
            hostname: s(rec.node_hostname),
        })
    }
}

impl Slurm {
    /// Every node slurmctld knows, with partitions filled in as scontrol does.
    pub fn load_nodes(&self) -> Result<Vec<Node>> {
        Ok(self
            .load_nodes_since(0)?
            .map(|s| s.nodes)
            .unwrap_or_default())
    }

    /// Like [`Slurm::load_nodes`], but None if slurmctld reports no change since `last_update`
    /// (from an earlier [`NodeSnapshot`]; 0 always loads).
    pub fn load_nodes_since(&self, last_update: i64) -> Result<Option<NodeSnapshot>> {
        let since = libc::time_t::try_from(last_update).unwrap_or(0);
        let Some(nodes) = NodeInfoMsg::load(since)? else {
            return Ok(None);
        };
        let parts = PartitionInfoMsg::load()?;
        // SAFETY: both messages are live and owned here; the call only xstrdup()s partition
        // names into node records, which slurm_free_node_info_msg frees.
        unsafe { sys::slurm_populate_node_partitions(nodes.0.as_ptr(), parts.0.as_ptr()) };
        Ok(Some(NodeSnapshot {
            last_update: nodes.last_update(),
            nodes: nodes
                .records()
                .iter()
                // SAFETY: records of the live message `nodes`.
                .filter_map(|rec| unsafe { Node::from_record(rec) })
                .collect(),
        }))
    }

    /// One node by name (None if slurmctld does not know it).
    pub fn load_node(&self, name: &str) -> Result<Option<Node>> {
        Ok(self.load_nodes()?.into_iter().find(|n| n.name == name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: u32 = sys::NODE_STATE_IDLE;
    const ALLOC: u32 = sys::NODE_STATE_ALLOCATED;
    const DOWN: u32 = sys::NODE_STATE_DOWN;

    #[test]
    fn drain_phase_follows_sinfo() {
        let drain = NodeFlag::Drain.bit();
        let s = NodeState::from_raw(IDLE | drain);
        assert_eq!(s.drain_phase(), Some(DrainPhase::Drained));
        assert_eq!(s.summary(), "DRAINED");
        assert_eq!(s.to_string(), "IDLE+DRAIN");

        let s = NodeState::from_raw(ALLOC | drain);
        assert_eq!(s.drain_phase(), Some(DrainPhase::Draining));
        assert_eq!(s.summary(), "DRAINING");

        // Idle but jobs still completing: still draining.
        let s = NodeState::from_raw(IDLE | drain | NodeFlag::Completing.bit());
        assert_eq!(s.drain_phase(), Some(DrainPhase::Draining));

        // Partially allocated node: MIXED is derived, and it is draining.
        let s = NodeState::with_allocation(ALLOC | drain, 1, 4);
        assert!(s.is_mixed());
        assert_eq!(s.drain_phase(), Some(DrainPhase::Draining));
        assert_eq!(s.to_string(), "MIXED+DRAIN");

        assert_eq!(NodeState::from_raw(IDLE).drain_phase(), None);
    }

    #[test]
    fn mixed_only_when_partly_allocated() {
        assert!(NodeState::with_allocation(ALLOC, 2, 4).is_mixed());
        assert!(NodeState::with_allocation(ALLOC, 4, 4).is_allocated());
        assert!(NodeState::with_allocation(IDLE, 0, 4).is_idle());
        // Flags survive the base-state rewrite.
        let s = NodeState::with_allocation(ALLOC | NodeFlag::RebootRequested.bit(), 1, 2);
        assert!(s.is_mixed() && s.reboot_requested());
    }

    #[test]
    fn reboot_requested_and_asap() {
        let reboot = NodeFlag::RebootRequested.bit();
        let s = NodeState::from_raw(IDLE | reboot);
        assert!(s.reboot_requested() && !s.reboot_asap());
        assert_eq!(s.summary(), "REBOOT");
        let s = NodeState::from_raw(ALLOC | reboot | NodeFlag::Drain.bit());
        assert!(s.reboot_asap());
        assert_eq!(s.summary(), "DRAINING");
        assert_eq!(s.to_string(), "ALLOCATED+DRAIN+REBOOT_REQUESTED");
        assert!(!s.accepts_work());
    }

    #[test]
    fn down_and_not_responding() {
        let s = NodeState::from_raw(DOWN | NodeFlag::NotResponding.bit());
        assert!(s.is_down() && s.not_responding());
        assert_eq!(s.summary(), "DOWN");
        assert_eq!(s.to_string(), "DOWN+NOT_RESPONDING");
        assert!(!s.accepts_work());
        assert!(NodeState::from_raw(IDLE).accepts_work());
        assert!(!NodeState::from_raw(IDLE | NodeFlag::Drain.bit()).accepts_work());
    }

    #[test]
    fn flag_bits_are_distinct_and_above_the_base() {
        let mut seen = 0u32;
        for f in NodeFlag::ALL {
            let b = f.bit();
            assert_eq!(b.count_ones(), 1, "{f:?}");
            assert_eq!(b & sys::NODE_STATE_BASE, 0, "{f:?}");
            assert_eq!(seen & b, 0, "{f:?} reuses a bit");
            seen |= b;
            assert!(NodeState::from_raw(IDLE | b).flags().contains(&f));
        }
        // Values from slurm.h 22.05 that scontrol users know by heart.
        assert_eq!(NodeFlag::Drain.bit(), 1 << 9);
        assert_eq!(NodeFlag::RebootRequested.bit(), 1 << 16);
    }
}
