//! The agent's persistent state: one JSON record per live container under
//! `<state_dir>/containers/`, written atomically (temporary file, fsync, rename, fsync of the
//! directory), so that a restarted or upgraded agent re-adopts what its predecessor ran
//! (`adopt.rs`). A record exists while its container is live on this node (Running, Migrating);
//! it is removed once the container exited or moved away. `ipam.json` holds the node's address
//! blocks and lent addresses (`agent/ipam.rs`).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use rebalancer_proto::{ContainerState, MigrationRecord};
use serde::{Deserialize, Serialize};

use crate::container::{Container, ContainerMeta};
use crate::netns::ContainerNet;

/// Version of [`ContainerRecord`]'s layout; a newer agent reads older versions.
pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("record {path} is not valid")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("record {path} has version {version}, newer than this agent's {RECORD_VERSION}")]
    TooNew { path: PathBuf, version: u32 },
    /// Commit refused: this node answered "not committed" for the migration, or undid it.
    #[error("migration {migration} is fenced on this node (epoch {epoch}): it answered \"not committed\" or undid the arrival, so a late Commit is refused")]
    Fenced { migration: String, epoch: u64 },
    /// Commit refused: it names another epoch than the arrival prepared here.
    #[error(
        "commit for epoch {got} of migration {migration}, which was prepared with epoch {live}"
    )]
    WrongEpoch {
        migration: String,
        live: u64,
        got: u64,
    },
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { what, source }
}

/// What a restarted agent needs to take a container back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub version: u32,
    pub meta: ContainerMeta,
    pub netns: String,
    pub veth: String,
    pub address: Ipv4Addr,
    pub root: PathBuf,
    pub dir: PathBuf,
    pub pid: i32,
    /// Pid 1's start time (`/proc/PID/stat` field 22, clock ticks since boot): a pid reused
    /// by another process after the container ended has another start time.
    pub pid_start: u64,
    pub state: ContainerState,
    pub external: bool,
    #[serde(default)]
    pub arrived_from: Option<(String, String)>,
    /// Cgroup directories (empty: none).
    #[serde(default)]
    pub cgroup: Vec<PathBuf>,
    /// The restore step it runs in on this node (`Container::runs_in`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_in: Option<rebalancer_proto::TaskRef>,
    /// The task process that registered it (`Container::waiter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiter: Option<(i32, u64)>,
}

impl ContainerRecord {
    /// The record of a container, `None` when it is not live (nothing to adopt later) or its
    /// pid 1 is already gone.
    pub fn of(c: &Container, pid_start: &dyn Fn(i32) -> Option<u64>) -> Option<ContainerRecord> {
        if !matches!(c.state, ContainerState::Running | ContainerState::Migrating)
            || c.exit_status.is_some()
        {
            return None;
        }
        Some(ContainerRecord {
            version: RECORD_VERSION,
            meta: c.meta.clone(),
            netns: c.net.name.clone(),
            veth: c.net.veth.clone(),
            address: c.net.address,
            root: c.root.clone(),
            dir: c.dir.clone(),
            pid: c.pid,
            pid_start: pid_start(c.pid)?,
            state: c.state,
            external: c.external,
            arrived_from: c.arrived_from.clone(),
            runs_in: c.runs_in.clone(),
            waiter: c.waiter,
            cgroup: c
                .cgroup
                .as_ref()
                .map(|g| g.dirs.clone())
                .unwrap_or_default(),
        })
    }

    /// The container this record describes, in state `state`.
    pub fn container(&self, state: ContainerState) -> Container {
        Container {
            meta: self.meta.clone(),
            net: ContainerNet {
                name: self.netns.clone(),
                veth: self.veth.clone(),
                address: self.address,
            },
            root: self.root.clone(),
            dir: self.dir.clone(),
            pid: self.pid,
            state,
            exit_status: None,
            external: self.external,
            migrated_to: None,
            arrived_from: self.arrived_from.clone(),
            final_status: None,
            cgroup: (!self.cgroup.is_empty()).then(|| crate::cgroup::Cgroup {
                dirs: self.cgroup.clone(),
            }),
            runs_in: self.runs_in.clone(),
            waiter: self.waiter,
        }
    }
}

/// The record directories: `containers/` (one file per container id) and `migrations/` (the
/// journal: one file per migration this node is the source of, until it ends).
#[derive(Debug, Clone)]
pub struct Store {
    /// The state directory itself (`ipam.json`).
    root: PathBuf,
    containers: PathBuf,
    migrations: PathBuf,
    committed: PathBuf,
    fenced: PathBuf,
    /// Serialises the commit/fence decision of a migration ([`Store::commit_gate`],
    /// [`Store::fence`]): one of them wins, the other sees its mark.
    gate: std::sync::Arc<std::sync::Mutex<()>>,
}

/// The destination's note that a migration will never commit here (`fenced/<id>.json`): written
/// when it answered `outcome` "not committed" or undid the arrival, before either is visible to
/// the source, and checked by [`Store::commit_gate`]. Pruned after [`COMMIT_MARK_TTL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceMark {
    pub migration: String,
    pub epoch: u64,
    pub at: rebalancer_proto::Millis,
}

/// The destination's note that it received Commit for a migration (`committed/<id>.json`),
/// written before the restored tree is resumed; a restarted source asks for it
/// (`PeerRequest::Outcome`). Pruned after [`COMMIT_MARK_TTL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitMark {
    pub migration: String,
    pub container: String,
    pub netns: String,
    pub at: rebalancer_proto::Millis,
}

/// How long commit marks are kept: far longer than any source agent stays down.
pub const COMMIT_MARK_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let containers = state_dir.join("containers");
        let migrations = state_dir.join("migrations");
        let committed = state_dir.join("committed");
        let fenced = state_dir.join("fenced");
        for d in [&containers, &migrations, &committed, &fenced] {
            std::fs::create_dir_all(d).map_err(io(format!("mkdir {}", d.display())))?;
        }
        Ok(Store {
            root: state_dir.to_path_buf(),
            containers,
            migrations,
            committed,
            fenced,
            gate: Default::default(),
        })
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_mark<T: serde::de::DeserializeOwned>(dir: &Path, migration: &str) -> Option<T> {
        let b = std::fs::read(dir.join(format!("{migration}.json"))).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The destination's commit decision: writes the commit mark unless the migration is
    /// fenced. Atomic with [`Store::fence`]: after a "not committed" answer this always fails.
    pub fn commit_gate(
        &self,
        migration: &str,
        epoch: u64,
        container: &str,
        netns: &str,
    ) -> Result<(), StoreError> {
        let _g = self.gate();
        if self.is_fenced(migration) {
            // A mark that cannot be read still fences (never commit on doubt).
            let epoch =
                Self::read_mark::<FenceMark>(&self.fenced, migration).map_or(epoch, |f| f.epoch);
            return Err(StoreError::Fenced {
                migration: migration.into(),
                epoch,
            });
        }
        self.mark_committed(migration, container, netns)
    }

    /// Fences `migration` unless it committed here: returns whether it committed. Once this
    /// returned `false`, [`Store::commit_gate`] refuses the migration for good (journaled).
    pub fn fence(&self, migration: &str, epoch: u64) -> Result<bool, StoreError> {
        let _g = self.gate();
        if self.committed.join(format!("{migration}.json")).exists() {
            return Ok(true);
        }
        if !self.fenced.join(format!("{migration}.json")).exists() {
            let m = FenceMark {
                migration: migration.into(),
                epoch,
                at: rebalancer_proto::now_millis(),
            };
            put_json(&self.fenced, migration, &m)?;
        }
        Ok(false)
    }

    /// Whether `migration` is fenced here.
    pub fn is_fenced(&self, migration: &str) -> bool {
        self.fenced.join(format!("{migration}.json")).exists()
    }

    /// Removes fence marks older than [`COMMIT_MARK_TTL`]; returns how many are kept.
    pub fn prune_fences(&self) -> usize {
        let now = rebalancer_proto::now_millis();
        let ttl = COMMIT_MARK_TTL.as_millis() as u64;
        let (marks, _) = load_json::<FenceMark>(&self.fenced);
        let mut kept = 0;
        for (path, m) in marks {
            if now.saturating_sub(m.at) > ttl {
                let _ = std::fs::remove_file(path);
            } else {
                kept += 1;
            }
        }
        kept
    }

    pub fn mark_committed(
        &self,
        migration: &str,
        container: &str,
        netns: &str,
    ) -> Result<(), StoreError> {
        let m = CommitMark {
            migration: migration.into(),
            container: container.into(),
            netns: netns.into(),
            at: rebalancer_proto::now_millis(),
        };
        put_json(&self.committed, migration, &m)
    }

    /// Commit marks younger than [`COMMIT_MARK_TTL`]; older ones are removed.
    pub fn commit_marks(&self) -> Vec<CommitMark> {
        let now = rebalancer_proto::now_millis();
        let ttl = COMMIT_MARK_TTL.as_millis() as u64;
        let (marks, _) = load_json::<CommitMark>(&self.committed);
        marks
            .into_iter()
            .filter_map(|(path, m)| {
                if now.saturating_sub(m.at) > ttl {
                    let _ = std::fs::remove_file(path);
                    None
                } else {
                    Some(m)
                }
            })
            .collect()
    }

    /// Writes `rec` so that a crash leaves either the old or the new record, never a torn one.
    pub fn put(&self, rec: &ContainerRecord) -> Result<(), StoreError> {
        put_json(&self.containers, &rec.meta.spec.id, rec)
    }

    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        remove_json(&self.containers, id)
    }

    /// Every container record, and the files that could not be read (left in place for
    /// inspection, not adopted).
    pub fn load(&self) -> (Vec<ContainerRecord>, Vec<StoreError>) {
        let (recs, mut bad) = load_json::<ContainerRecord>(&self.containers);
        let recs = recs
            .into_iter()
            .filter_map(|(path, r)| {
                if r.version > RECORD_VERSION {
                    bad.push(StoreError::TooNew {
                        path,
                        version: r.version,
                    });
                    None
                } else {
                    Some(r)
                }
            })
            .collect();
        (recs, bad)
    }

    /// Journals a migration's record (synchronously: the source's journal must say
    /// `network-switch` before Commit can be sent, see `adopt::judge`).
    pub fn put_migration(&self, rec: &MigrationRecord) -> Result<(), StoreError> {
        put_json(&self.migrations, &rec.id, rec)
    }

    pub fn remove_migration(&self, id: &str) -> Result<(), StoreError> {
        remove_json(&self.migrations, id)
    }

    /// Writes the node's address blocks (`ipam.json`, see `agent/ipam.rs`), atomically.
    pub fn put_ipam<T: Serialize>(&self, v: &T) -> Result<(), StoreError> {
        put_json(&self.root, "ipam", v)
    }

    /// The node's address blocks as last written; `None` before the first lease.
    pub fn load_ipam<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, StoreError> {
        let path = self.root.join("ipam.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io {
                what: format!("read {}", path.display()),
                source: e,
            }),
        }
    }

    pub fn load_migrations(&self) -> (Vec<MigrationRecord>, Vec<StoreError>) {
        let (recs, bad) = load_json::<MigrationRecord>(&self.migrations);
        (recs.into_iter().map(|(_, r)| r).collect(), bad)
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("fsync {}", dir.display())))
}

/// `name` is a validated container or migration id (letters, digits, '.', '-', '_', no
/// leading '.'), so it is a plain file name.
fn put_json<T: Serialize>(dir: &Path, name: &str, v: &T) -> Result<(), StoreError> {
    let path = dir.join(format!("{name}.json"));
    let tmp = dir.join(format!(".{name}.tmp"));
    let json = serde_json::to_vec_pretty(v).map_err(|source| StoreError::Corrupt {
        path: path.clone(),
        source,
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("rename to {}", path.display())))?;
    sync_dir(dir)
}

fn remove_json(dir: &Path, name: &str) -> Result<(), StoreError> {
    let path = dir.join(format!("{name}.json"));
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Io {
            what: format!("remove {}", path.display()),
            source: e,
        }),
    }
}

fn load_json<T: serde::de::DeserializeOwned>(dir: &Path) -> (Vec<(PathBuf, T)>, Vec<StoreError>) {
    let mut recs = Vec::new();
    let mut bad = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            bad.push(StoreError::Io {
                what: format!("read {}", dir.display()),
                source: e,
            });
            return (recs, bad);
        }
    };
    // Temporary files (".NAME.tmp") are torn writes of a crash: skipped.
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let r = std::fs::read(&path)
            .map_err(io(format!("read {}", path.display())))
            .and_then(|b| {
                serde_json::from_slice::<T>(&b).map_err(|source| StoreError::Corrupt {
                    path: path.clone(),
                    source,
                })
            });
        match r {
            Ok(r) => recs.push((path, r)),
            Err(e) => bad.push(e),
        }
    }
    (recs, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(tag: &str) -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "rb-store-{tag}-{}-{:08x}",
            std::process::id(),
            crate::agent::random_u32()
        ));
        (Store::open(&dir).expect("open"), dir)
    }

    #[test]
    fn a_fenced_migration_never_commits_and_a_committed_one_is_never_fenced() {
        let (s, dir) = temp_store("fence");
        assert!(!s.fence("m1", 7).expect("fence"), "not committed");
        assert!(s.is_fenced("m1"));
        let e = s.commit_gate("m1", 7, "c", "n").expect_err("late commit");
        assert!(matches!(e, StoreError::Fenced { epoch: 7, .. }), "{e}");
        assert!(e.to_string().contains("late Commit is refused"), "{e}");
        // The other order: the commit wins and the question then says so.
        s.commit_gate("m2", 8, "c", "n").expect("commit");
        assert!(s.fence("m2", 8).expect("ask"), "committed");
        assert!(!s.is_fenced("m2"));
        // Journaled: a new process (a restarted agent) sees the same.
        let again = Store::open(&dir).expect("reopen");
        assert!(again.commit_gate("m1", 7, "c", "n").is_err());
        assert!(again.fence("m2", 8).expect("ask"));
        assert_eq!(again.prune_fences(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
