//! Durable journal of decisions, migrations and policy state overrides in one redb file.
//!
//! Every decision is written before it is acted on, and every migration record each time its
//! state changes, so a restarted controller knows what was in flight (see `recovery`).

use std::collections::BTreeMap;
use std::path::Path;

use rebalancer_proto::control::{DecisionRecord, MigrationEntry, PolicyState};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

const DECISIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("decisions");
const MIGRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("migrations");
const POLICY_STATES: TableDefinition<&str, &str> = TableDefinition::new("policy_states");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Migrations whose outcome is unknown, by migration id: the job's allocation is kept on both
/// nodes until [`Unresolved`] is resolved (`execute.rs`).
const UNRESOLVED: TableDefinition<&str, &[u8]> = TableDefinition::new("unresolved");
/// Container address blocks leased to nodes (rebalancer-ipam's `BlockTable`): block → node.
const BLOCK_LEASES: TableDefinition<u32, &str> = TableDefinition::new("block_leases");
/// When each block of `block_leases` was leased (unix ms; `rebalctl show blocks`). A table of
/// its own, so that journals written before it keep their leases (shown without a time).
const BLOCK_LEASE_TIMES: TableDefinition<u32, u64> = TableDefinition::new("block_lease_times");
/// Holder allocations (`holder.rs`), by moved container: journaled before the controller asks
/// Slurm for one, so a restarted controller finds and reconciles them.
const HOLDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("holders");
/// Jobs expanded onto a migration's destination (`slurm_watch.rs`), by container: journaled
/// before Slurm is asked, removed once the migration's end is journaled, so that a controller
/// killed in between knows which allocation to undo or to keep (with its holder).
const EXPANSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("expansions");
const DECISION_SEQ: &str = "decision_seq";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal store error")]
    Store(#[from] redb::Error),
    #[error("cannot create the journal directory {0}")]
    Dir(String, #[source] std::io::Error),
    #[error("corrupt journal entry {key}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode a journal entry")]
    Encode(#[source] serde_json::Error),
}

macro_rules! store {
    ($e:expr) => {
        $e.map_err(|e| JournalError::Store(e.into()))
    };
}

pub struct Journal {
    db: Database,
}

/// A job expanded onto a migration's destination, journaled before Slurm is asked (the
/// expansion may or may not have happened when the controller stops).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JournaledExpansion {
    pub container: String,
    pub job_id: u32,
    /// The job's nodes before the expansion: what a failed migration gives back.
    pub nodes_before: Vec<String>,
    pub source: String,
    pub destination: String,
    /// The decision the migration was started for.
    pub decision: u64,
    pub since: rebalancer_proto::Millis,
}

/// A migration whose outcome is unknown (Commit may have reached the destination, or the
/// controller lost track after the point of no return): the job keeps both nodes until it is
/// known where the task runs. Journaled, so that a restarted controller resolves it too (the
/// expansion to undo, `nodes_before`, lives nowhere else).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unresolved {
    pub migration: String,
    pub container: String,
    pub job_id: Option<u32>,
    pub source: String,
    pub destination: String,
    /// The job's nodes before it was expanded onto the destination for this migration (absent:
    /// it already held the destination, or it is no Slurm task).
    pub nodes_before: Option<Vec<String>>,
    /// When the outcome was found unknown.
    pub since: rebalancer_proto::Millis,
    /// The decision the migration was started for (0 in records from before it was kept).
    #[serde(default)]
    pub decision: u64,
}

impl Journal {
    /// Opens (or creates) the journal file and its tables.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| JournalError::Dir(dir.display().to_string(), e))?;
        }
        let db = store!(Database::create(path))?;
        let tx = store!(db.begin_write())?;
        {
            store!(tx.open_table(DECISIONS))?;
            store!(tx.open_table(MIGRATIONS))?;
            store!(tx.open_table(POLICY_STATES))?;
            store!(tx.open_table(META))?;
            store!(tx.open_table(UNRESOLVED))?;
            store!(tx.open_table(BLOCK_LEASES))?;
            store!(tx.open_table(BLOCK_LEASE_TIMES))?;
            store!(tx.open_table(HOLDERS))?;
            store!(tx.open_table(EXPANSIONS))?;
        }
        store!(tx.commit())?;
        Ok(Journal { db })
    }

    /// Appends a decision, assigning its sequence number, and returns it.
    pub fn record_decision(&self, mut d: DecisionRecord) -> Result<DecisionRecord, JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(DECISIONS))?;
            let mut meta = store!(tx.open_table(META))?;
            // The high-water mark outlives pruning, so sequence numbers are never reused.
            let last = store!(t.last())?.map(|(k, _)| k.value()).unwrap_or(0);
            let mark = store!(meta.get(DECISION_SEQ))?
                .and_then(|v| v.value().parse::<u64>().ok())
                .unwrap_or(0);
            d.seq = last.max(mark) + 1;
            store!(meta.insert(DECISION_SEQ, d.seq.to_string().as_str()))?;
            let bytes = serde_json::to_vec(&d).map_err(JournalError::Encode)?;
            store!(t.insert(d.seq, bytes.as_slice()))?;
        }
        store!(tx.commit())?;
        Ok(d)
    }

    /// Rewrites a decision already recorded (outcome or migration id changed).
    pub fn update_decision(&self, d: &DecisionRecord) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(DECISIONS))?;
            let bytes = serde_json::to_vec(d).map_err(JournalError::Encode)?;
            store!(t.insert(d.seq, bytes.as_slice()))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    /// The newest `limit` decisions, oldest first.
    pub fn decisions(&self, limit: usize) -> Result<Vec<DecisionRecord>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(DECISIONS))?;
        let mut out = Vec::new();
        for item in store!(t.iter())?.rev().take(limit) {
            let (k, v) = store!(item)?;
            out.push(decode(&k.value().to_string(), v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    pub fn put_migration(&self, m: &MigrationEntry) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(MIGRATIONS))?;
            let bytes = serde_json::to_vec(m).map_err(JournalError::Encode)?;
            store!(t.insert(m.record.id.as_str(), bytes.as_slice()))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    pub fn migration(&self, id: &str) -> Result<Option<MigrationEntry>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(MIGRATIONS))?;
        match store!(t.get(id))? {
            Some(v) => Ok(Some(decode(id, v.value())?)),
            None => Ok(None),
        }
    }

    pub fn put_unresolved(&self, u: &Unresolved) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(UNRESOLVED))?;
            let bytes = serde_json::to_vec(u).map_err(JournalError::Encode)?;
            store!(t.insert(u.migration.as_str(), bytes.as_slice()))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    pub fn remove_unresolved(&self, migration: &str) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(UNRESOLVED))?;
            store!(t.remove(migration))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    pub fn put_holder(&self, h: &crate::holder::Holder) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(HOLDERS))?;
            let bytes = serde_json::to_vec(h).map_err(JournalError::Encode)?;
            store!(t.insert(h.container.as_str(), bytes.as_slice()))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    pub fn remove_holder(&self, container: &str) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(HOLDERS))?;
            store!(t.remove(container))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    pub fn put_expansion(&self, x: &JournaledExpansion) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(EXPANSIONS))?;
            let bytes = serde_json::to_vec(x).map_err(JournalError::Encode)?;
            store!(t.insert(x.container.as_str(), bytes.as_slice()))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    pub fn remove_expansion(&self, container: &str) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(EXPANSIONS))?;
            store!(t.remove(container))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    /// Every journaled expansion whose migration's end is not journaled yet.
    pub fn expansions(&self) -> Result<Vec<JournaledExpansion>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(EXPANSIONS))?;
        let mut out = Vec::new();
        for item in store!(t.iter())? {
            let (k, v) = store!(item)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Every journaled holder, by container.
    pub fn holders(&self) -> Result<Vec<crate::holder::Holder>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(HOLDERS))?;
        let mut out = Vec::new();
        for item in store!(t.iter())? {
            let (k, v) = store!(item)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Migrations whose outcome is still unknown, oldest first.
    pub fn unresolved(&self) -> Result<Vec<Unresolved>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(UNRESOLVED))?;
        let mut out: Vec<Unresolved> = Vec::new();
        for item in store!(t.iter())? {
            let (k, v) = store!(item)?;
            out.push(decode(k.value(), v.value())?);
        }
        out.sort_by_key(|u| u.since);
        Ok(out)
    }

    /// Every journaled migration, oldest first.
    pub fn migrations(&self) -> Result<Vec<MigrationEntry>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(MIGRATIONS))?;
        let mut out: Vec<MigrationEntry> = Vec::new();
        for item in store!(t.iter())? {
            let (k, v) = store!(item)?;
            out.push(decode(k.value(), v.value())?);
        }
        out.sort_by(|a, b| {
            a.record
                .started_at
                .cmp(&b.record.started_at)
                .then(a.record.id.cmp(&b.record.id))
        });
        Ok(out)
    }

    /// Migrations whose record has not reached a terminal state, or whose Slurm allocation
    /// update is still owed.
    pub fn unfinished(&self) -> Result<Vec<MigrationEntry>, JournalError> {
        Ok(self
            .migrations()?
            .into_iter()
            .filter(|m| !m.record.state.is_terminal())
            .collect())
    }

    pub fn set_policy_state(&self, name: &str, state: PolicyState) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(POLICY_STATES))?;
            store!(t.insert(name, state.as_str()))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    pub fn policy_states(&self) -> Result<BTreeMap<String, PolicyState>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(POLICY_STATES))?;
        let mut out = BTreeMap::new();
        for item in store!(t.iter())? {
            let (k, v) = store!(item)?;
            if let Ok(s) = v.value().parse::<PolicyState>() {
                out.insert(k.value().to_string(), s);
            }
        }
        Ok(out)
    }
}

impl Journal {
    /// Small named values (the planner's memory).
    pub fn put_meta(&self, key: &str, value: &str) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(META))?;
            store!(t.insert(key, value))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(META))?;
        Ok(store!(t.get(key))?.map(|v| v.value().to_string()))
    }
}

impl Journal {
    /// Records that `block` of the container pool is leased to `node` (before the node hears
    /// of it, so that a restarted controller never leases it twice).
    pub fn put_block_lease(&self, block: u32, node: &str) -> Result<(), JournalError> {
        self.put_block_lease_at(block, node, rebalancer_proto::now_millis())
    }

    /// [`Journal::put_block_lease`] with the lease's time (unix ms), in the same transaction.
    pub fn put_block_lease_at(&self, block: u32, node: &str, at: u64) -> Result<(), JournalError> {
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(BLOCK_LEASES))?;
            store!(t.insert(block, node))?;
            let mut times = store!(tx.open_table(BLOCK_LEASE_TIMES))?;
            store!(times.insert(block, at))?;
        }
        store!(tx.commit())?;
        Ok(())
    }

    /// Records that `block` went back to the pool (a reclaimed block of a node that left).
    /// Returns whether it was leased.
    pub fn remove_block_lease(&self, block: u32) -> Result<bool, JournalError> {
        let tx = store!(self.db.begin_write())?;
        let was = {
            let mut t = store!(tx.open_table(BLOCK_LEASES))?;
            let old = store!(t.remove(block))?;
            let mut times = store!(tx.open_table(BLOCK_LEASE_TIMES))?;
            store!(times.remove(block))?;
            old.is_some()
        };
        store!(tx.commit())?;
        Ok(was)
    }

    /// Every leased block and its node, for rebuilding the lease table at start-up
    /// (`rebalancer_ipam::BlockTable::from_leases`).
    pub fn block_leases(&self) -> Result<BTreeMap<u32, String>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(BLOCK_LEASES))?;
        let mut out = BTreeMap::new();
        for item in store!(t.iter())? {
            let (k, v) = store!(item)?;
            out.insert(k.value(), v.value().to_string());
        }
        Ok(out)
    }

    /// When each leased block was leased (unix ms); blocks leased before the journal kept
    /// times are absent.
    pub fn block_lease_times(&self) -> Result<BTreeMap<u32, u64>, JournalError> {
        let tx = store!(self.db.begin_read())?;
        let t = store!(tx.open_table(BLOCK_LEASE_TIMES))?;
        let mut out = BTreeMap::new();
        for item in store!(t.iter())? {
            let (k, v) = store!(item)?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }
}

impl Journal {
    /// Keeps the newest `keep` decisions and the newest `keep` ended migrations; migrations not
    /// ended are always kept. Returns how many entries went.
    pub fn prune(&self, keep: usize) -> Result<usize, JournalError> {
        let mut removed = 0;
        let ended: Vec<String> = {
            let mut all = self.migrations()?;
            // An unknown outcome still to resolve keeps its entry (its resolution reads it).
            let unresolved: Vec<String> = self
                .unresolved()?
                .into_iter()
                .map(|u| u.migration)
                .collect();
            all.retain(|m| m.record.state.is_terminal() && !unresolved.contains(&m.record.id));
            let excess = all.len().saturating_sub(keep);
            all.into_iter().take(excess).map(|m| m.record.id).collect()
        };
        let tx = store!(self.db.begin_write())?;
        {
            let mut t = store!(tx.open_table(DECISIONS))?;
            let n = store!(t.len())? as usize;
            if n > keep {
                // Keys are sequence numbers: drop everything below the first one kept.
                let first_kept = match store!(t.iter())?.nth(n - keep) {
                    Some(item) => Some(store!(item)?.0.value()),
                    None => None,
                };
                match first_kept {
                    Some(k) => store!(t.retain_in(..k, |_, _| false))?,
                    None => store!(t.retain(|_, _| false))?,
                }
                removed += n - keep;
            }
            let mut m = store!(tx.open_table(MIGRATIONS))?;
            for id in &ended {
                store!(m.remove(id.as_str()))?;
            }
            removed += ended.len();
        }
        store!(tx.commit())?;
        Ok(removed)
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, JournalError> {
    serde_json::from_slice(bytes).map_err(|source| JournalError::Corrupt {
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rebalancer_proto::control::DecisionOutcome;
    use rebalancer_proto::{MigrationMode, MigrationRecord, MigrationState, MigrationStats};

    pub(crate) fn record(id: &str, state: MigrationState) -> MigrationRecord {
        MigrationRecord {
            id: id.into(),
            container: "j5.s0.t0".into(),
            task: None,
            source: "node1".into(),
            destination: "node2".into(),
            requested_mode: MigrationMode::Auto,
            mode: None,
            mode_reason: None,
            state,
            phases: vec![],
            stats: MigrationStats::default(),
            error: None,
            started_at: 10,
            ended_at: None,
            cancelled_by: None,
        }
    }

    pub(crate) fn decision(policy: &str) -> DecisionRecord {
        DecisionRecord {
            seq: 0,
            at: 1,
            policy: policy.into(),
            container: "j5.s0.t0".into(),
            task: None,
            uid: Some(1000),
            source: "node1".into(),
            destination: "node2".into(),
            mode: MigrationMode::Auto,
            why: "node1 is DRAINING".into(),
            outcome: DecisionOutcome::Started,
            detail: None,
            migration: Some("m1".into()),
        }
    }

    #[test]
    fn holders_are_kept_across_a_restart_until_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.redb");
        let h = |c: &str, id| crate::holder::Holder {
            container: c.into(),
            job_id: 4,
            node: "node2".into(),
            cpus: 1,
            migration: "m1".into(),
            holder_job: id,
            since: 5,
            refused: None,
        };
        {
            let j = Journal::open(&path).expect("open");
            j.put_holder(&h("j4.s0.t0", None)).expect("put intent");
            j.put_holder(&h("j4.s0.t0", Some(9))).expect("put granted");
            j.put_holder(&h("j4.s0.t1", Some(10))).expect("put");
        }
        let j = Journal::open(&path).expect("reopen");
        assert_eq!(
            j.holders().expect("list"),
            vec![h("j4.s0.t0", Some(9)), h("j4.s0.t1", Some(10))]
        );
        j.remove_holder("j4.s0.t0").expect("remove");
        j.remove_holder("absent").expect("removing nothing is fine");
        assert_eq!(j.holders().expect("list"), vec![h("j4.s0.t1", Some(10))]);
    }

    #[test]
    fn expansions_are_kept_across_a_restart_until_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.redb");
        let x = |c: &str, job| JournaledExpansion {
            container: c.into(),
            job_id: job,
            nodes_before: vec!["node1".into()],
            source: "node1".into(),
            destination: "node2".into(),
            decision: 7,
            since: 1,
        };
        {
            let j = Journal::open(&path).expect("open");
            j.put_expansion(&x("j6.s0.t0", 6)).expect("put");
            j.put_expansion(&x("j7.s0.t0", 7)).expect("put");
        }
        let j = Journal::open(&path).expect("reopen");
        assert_eq!(
            j.expansions().expect("list"),
            vec![x("j6.s0.t0", 6), x("j7.s0.t0", 7)]
        );
        j.remove_expansion("j6.s0.t0").expect("remove");
        j.remove_expansion("absent")
            .expect("removing nothing is fine");
        assert_eq!(j.expansions().expect("list"), vec![x("j7.s0.t0", 7)]);
    }

    #[test]
    fn unknown_outcomes_are_kept_across_a_restart_until_resolved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.redb");
        let u = |id: &str, since| Unresolved {
            migration: id.into(),
            container: "j5.s0.t0".into(),
            job_id: Some(5),
            source: "node1".into(),
            destination: "node2".into(),
            nodes_before: Some(vec!["node1".into()]),
            since,
            decision: 0,
        };
        {
            let j = Journal::open(&path).expect("open");
            j.put_unresolved(&u("m2", 20)).expect("put");
            j.put_unresolved(&u("m1", 10)).expect("put");
        }
        let j = Journal::open(&path).expect("reopen");
        let all = j.unresolved().expect("list");
        assert_eq!(all, vec![u("m1", 10), u("m2", 20)]);
        // Pruning spares the entry of an unresolved migration.
        let mut e = MigrationEntry {
            record: record("m1", MigrationState::Unknown),
            decision: 1,
            policy: "drain".into(),
            uid: None,
            slurm_synced: false,
            slurm_error: None,
            slurm_kept_source: None,
            slurm_holder: None,
        };
        j.put_migration(&e).expect("put");
        e.record = record("m9", MigrationState::Succeeded);
        j.put_migration(&e).expect("put");
        j.prune(0).expect("prune");
        let left: Vec<String> = j
            .migrations()
            .expect("all")
            .into_iter()
            .map(|m| m.record.id)
            .collect();
        assert_eq!(left, ["m1"]);
        j.remove_unresolved("m1").expect("remove");
        j.remove_unresolved("absent")
            .expect("removing nothing is fine");
        assert_eq!(j.unresolved().expect("list"), vec![u("m2", 20)]);
    }

    #[test]
    fn block_leases_survive_a_reopen_and_removal_is_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open(&path).expect("open");
            assert!(j.block_leases().expect("leases").is_empty());
            j.put_block_lease(0, "node1").expect("lease");
            j.put_block_lease(1, "node2").expect("lease");
            j.put_block_lease(2, "node1").expect("lease");
            assert!(j.remove_block_lease(1).expect("remove"));
            assert!(!j.remove_block_lease(7).expect("remove unknown"));
        }
        let j = Journal::open(&path).expect("reopen");
        let leases = j.block_leases().expect("leases");
        assert_eq!(
            leases.into_iter().collect::<Vec<_>>(),
            vec![(0, "node1".to_string()), (2, "node1".to_string())]
        );
    }

    #[test]
    fn lease_times_survive_a_reopen_and_go_with_their_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open(&path).expect("open");
            j.put_block_lease_at(3, "node1", 1_000).expect("lease");
            j.put_block_lease_at(4, "node2", 2_000).expect("lease");
            assert!(j.remove_block_lease(3).expect("remove"));
        }
        let j = Journal::open(&path).expect("reopen");
        assert_eq!(
            j.block_lease_times()
                .expect("times")
                .into_iter()
                .collect::<Vec<_>>(),
            vec![(4, 2_000)]
        );
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/journal.redb");
        {
            let j = Journal::open(&path).expect("open");
            let d1 = j.record_decision(decision("drain")).expect("d1");
            let d2 = j.record_decision(decision("thermal")).expect("d2");
            assert_eq!((d1.seq, d2.seq), (1, 2));
            j.put_migration(&MigrationEntry {
                record: record("m1", MigrationState::Running),
                decision: 1,
                policy: "drain".into(),
                uid: Some(1000),
                slurm_synced: false,
                slurm_error: None,
                slurm_kept_source: None,
                slurm_holder: None,
            })
            .expect("put");
            j.put_migration(&MigrationEntry {
                record: record("m0", MigrationState::Succeeded),
                decision: 1,
                policy: "drain".into(),
                uid: Some(1000),
                slurm_synced: true,
                slurm_error: None,
                slurm_kept_source: None,
                slurm_holder: None,
            })
            .expect("put");
            j.set_policy_state("thermal", PolicyState::DryRun)
                .expect("state");
            j.put_meta("planner_state", "{}").expect("meta");
        }
        let j = Journal::open(&path).expect("reopen");
        let ds = j.decisions(10).expect("decisions");
        assert_eq!(
            ds.iter().map(|d| d.policy.as_str()).collect::<Vec<_>>(),
            ["drain", "thermal"]
        );
        assert_eq!(j.decisions(1).expect("last")[0].seq, 2);
        let unfinished = j.unfinished().expect("unfinished");
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].record.id, "m1");
        assert_eq!(j.migrations().expect("all").len(), 2);
        assert_eq!(
            j.policy_states().expect("states").get("thermal"),
            Some(&PolicyState::DryRun)
        );
        assert_eq!(
            j.meta("planner_state").expect("meta").as_deref(),
            Some("{}")
        );
        assert_eq!(j.meta("other").expect("meta"), None);
        // Pruning keeps the newest entries and every migration still in flight.
        assert_eq!(j.prune(1).expect("prune"), 1);
        assert_eq!(
            j.decisions(10)
                .expect("d")
                .iter()
                .map(|d| d.seq)
                .collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(j.migrations().expect("m").len(), 2);
        assert_eq!(j.prune(0).expect("prune"), 2);
        assert!(j.decisions(10).expect("d").is_empty());
        assert_eq!(j.unfinished().expect("u").len(), 1);
        // Sequence numbers continue after a restart.
        assert_eq!(j.record_decision(decision("load")).expect("d3").seq, 3);
    }
}
