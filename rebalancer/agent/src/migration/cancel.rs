//! Cancelling a running migration (`cancel-migration`, from `rebalctl cancel` through the
//! controller). The source registers each migration it runs; a cancel wins only while the
//! migration is before its commit point, and the source then rolls back exactly as on any
//! failure before Commit (the destination undoes its side on Abort/EOF, the source resumes).
//! The commit point is taken under the same lock a cancel looks at, so either the cancel is
//! accepted and Commit is never sent, or the cancel is refused as too late, never both.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rebalancer_proto::MigrationId;
use tokio::sync::Notify;

/// Why a cancel was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    /// No migration of that id runs here (unknown, not this node's, or ended).
    #[error("no running migration {0} on this node")]
    NotRunning(MigrationId),
    /// The source reached its commit point: the destination's answer decides now.
    #[error("too late: migration {0} is committing")]
    Committing(MigrationId),
    /// It failed on its own and is being rolled back already.
    #[error("migration {0} is already rolling back")]
    RollingBack(MigrationId),
}

#[derive(Debug)]
enum Stage {
    /// Before the commit point: a cancel is accepted.
    Open,
    /// Cancelled by `by`; the source rolls back at its next step.
    Cancelled { by: String },
    /// At or past the commit point.
    Committing,
    /// Rolling back after a failure of its own.
    RollingBack,
}

#[derive(Debug)]
struct Switch {
    stage: Mutex<Stage>,
    wake: Notify,
}

impl Switch {
    fn stage(&self) -> MutexGuard<'_, Stage> {
        // Plain data: a panic elsewhere while holding it leaves nothing half-done.
        self.stage.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The source's running migrations that a cancel can reach, by id.
#[derive(Debug, Default)]
pub struct Cancels {
    running: Mutex<BTreeMap<MigrationId, Arc<Switch>>>,
}

impl Cancels {
    fn running(&self) -> MutexGuard<'_, BTreeMap<MigrationId, Arc<Switch>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes migration `id` cancellable until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, id: &str) -> CancelGuard {
        let sw = Arc::new(Switch {
            stage: Mutex::new(Stage::Open),
            wake: Notify::new(),
        });
        self.running().insert(id.to_string(), sw.clone());
        CancelGuard {
            owner: self.clone(),
            id: id.to_string(),
            sw,
        }
    }

    /// Cancels migration `id` on behalf of `by`. `Ok`: accepted (also when it was already
    /// cancelled: the first caller is the one recorded).
    pub fn cancel(&self, id: &str, by: &str) -> Result<(), CancelRefused> {
        let sw = self
            .running()
            .get(id)
            .cloned()
            .ok_or_else(|| CancelRefused::NotRunning(id.to_string()))?;
        let mut st = sw.stage();
        match &*st {
            Stage::Open => {
                *st = Stage::Cancelled { by: by.to_string() };
                drop(st);
                // A stored permit: a source not waiting yet still sees it.
                sw.wake.notify_one();
                Ok(())
            }
            Stage::Cancelled { .. } => Ok(()),
            Stage::Committing => Err(CancelRefused::Committing(id.to_string())),
            Stage::RollingBack => Err(CancelRefused::RollingBack(id.to_string())),
        }
    }

    /// The migrations registered here.
    #[cfg(test)]
    pub fn ids(&self) -> Vec<MigrationId> {
        self.running().keys().cloned().collect()
    }

    /// Whether migration `id` is registered here (running on this source).
    pub fn contains(&self, id: &str) -> bool {
        self.running().contains_key(id)
    }
}

/// A registered migration: the source's side of the switch.
#[derive(Debug)]
pub struct CancelGuard {
    owner: Arc<Cancels>,
    id: MigrationId,
    sw: Arc<Switch>,
}

impl CancelGuard {
    /// Resolves with who cancelled, once someone does (never, if nobody does).
    pub async fn cancelled(&self) -> String {
        loop {
            if let Stage::Cancelled { by } = &*self.sw.stage() {
                return by.clone();
            }
            self.sw.wake.notified().await;
        }
    }

    /// The commit point: from now on a cancel is refused. `Err(by)`: a cancel came first, and
    /// the migration must roll back instead of committing.
    pub fn commit_point(&self) -> Result<(), String> {
        let mut st = self.sw.stage();
        match &*st {
            Stage::Cancelled { by } => Err(by.clone()),
            _ => {
                *st = Stage::Committing;
                Ok(())
            }
        }
    }

    /// The source rolls back: a later cancel is refused (unless it was the cause).
    pub fn rolling_back(&self) {
        let mut st = self.sw.stage();
        if matches!(*st, Stage::Open) {
            *st = Stage::RollingBack;
        }
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let mut running = self.owner.running();
        // Only this guard's switch (a stale id reused later is another switch).
        if running
            .get(&self.id)
            .is_some_and(|s| Arc::ptr_eq(s, &self.sw))
        {
            running.remove(&self.id);
        }
    }
}

/// The rollback reason a cancel leaves in the record.
pub fn reason(by: &str) -> String {
    format!("cancelled by {by} before the commit point; the container runs on the source again")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_before_the_commit_point_wins_and_names_who() {
        let c = Arc::new(Cancels::default());
        let g = c.register("m1");
        assert_eq!(c.cancel("m1", "uid 1000"), Ok(()));
        // A second cancel is accepted too, the first caller stays recorded.
        assert_eq!(c.cancel("m1", "uid 0"), Ok(()));
        assert_eq!(g.cancelled().await, "uid 1000");
        assert_eq!(g.commit_point(), Err("uid 1000".to_string()));
    }

    #[tokio::test]
    async fn a_cancel_wakes_a_waiting_source() {
        let c = Arc::new(Cancels::default());
        let g = c.register("m1");
        let c2 = c.clone();
        let t = tokio::spawn(async move {
            tokio::task::yield_now().await;
            c2.cancel("m1", "uid 7")
        });
        assert_eq!(g.cancelled().await, "uid 7");
        assert_eq!(t.await.expect("task"), Ok(()));
    }

    #[test]
    fn after_the_commit_point_a_cancel_is_too_late() {
        let c = Arc::new(Cancels::default());
        let g = c.register("m1");
        assert_eq!(g.commit_point(), Ok(()));
        let e = c.cancel("m1", "uid 0").expect_err("refused");
        assert_eq!(e.to_string(), "too late: migration m1 is committing");
    }

    #[test]
    fn a_migration_rolling_back_on_its_own_refuses_a_cancel() {
        let c = Arc::new(Cancels::default());
        let g = c.register("m1");
        g.rolling_back();
        assert_eq!(
            c.cancel("m1", "uid 0"),
            Err(CancelRefused::RollingBack("m1".into()))
        );
        // A cancel that came first stays the reason.
        let g2 = c.register("m2");
        c.cancel("m2", "uid 5").expect("accepted");
        g2.rolling_back();
        assert_eq!(g2.commit_point(), Err("uid 5".to_string()));
    }

    #[test]
    fn an_ended_or_unknown_migration_cannot_be_cancelled() {
        let c = Arc::new(Cancels::default());
        assert_eq!(
            c.cancel("nope", "uid 0"),
            Err(CancelRefused::NotRunning("nope".into()))
        );
        let g = c.register("m1");
        assert!(c.contains("m1"));
        drop(g);
        assert!(!c.contains("m1"));
        assert!(matches!(
            c.cancel("m1", "uid 0"),
            Err(CancelRefused::NotRunning(_))
        ));
    }
}
