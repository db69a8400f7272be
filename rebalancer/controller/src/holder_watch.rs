//! Holder allocations driven: asked for after a move, released, reconciled with Slurm and the
//! journal. The record and the rules are `holder.rs`.

use std::sync::Arc;

use rebalancer_proto::control::MigrationEntry;
use rebalancer_proto::now_millis;
use tracing::{error, info, warn};

use crate::daemon::{read, write, Controller};
use crate::holder::{
    container_cpus, holder_action, holder_cpus, orphan_holders, Holder, HolderAction,
};
use crate::slurm_sync::HoldRequest;

impl Controller {
    /// Right after a successful move's allocation update: releases the task's holder on its
    /// previous node and asks for one on the destination, sized by what Slurm misses there.
    pub(crate) async fn hold_after_move(self: &Arc<Self>, entry: &mut MigrationEntry) {
        if !self.cfg.slurm.holder {
            return;
        }
        let Some(job_id) = entry.record.task.as_ref().map(|t| t.job_id) else {
            return;
        };
        let container = entry.record.container.clone();
        let node = entry.record.destination.clone();
        if let Some(old) = self.holder_of(&container) {
            self.release_holder(&old, "the task moved again").await;
        }
        let containers = self.containers();
        let task_cpus = containers
            .iter()
            .find(|c| c.id == container)
            .map(container_cpus)
            .unwrap_or(1);
        let needed: u32 = containers
            .iter()
            .filter(|c| {
                c.node == node
                    && c.state.is_live()
                    && c.task.as_ref().is_some_and(|t| t.job_id == job_id)
            })
            .map(container_cpus)
            .sum::<u32>()
            .max(task_cpus);
        let held: u32 = read(&self.state)
            .holders
            .values()
            .filter(|h| h.job_id == job_id && h.node == node && h.holder_job.is_some())
            .map(|h| h.cpus)
            .sum();
        let slurm = self.slurm.clone();
        let n = node.clone();
        let credited = match tokio::task::spawn_blocking(move || slurm.credited_cpus(job_id, &n))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(job = job_id, node = %node, "cannot read the job's CPUs on the destination, holding all the task's: {e}");
                0
            }
            Err(e) => {
                warn!(job = job_id, "credited-CPUs task failed: {e}");
                0
            }
        };
        let cpus = holder_cpus(task_cpus, needed, credited, held);
        let mut h = Holder {
            container,
            job_id,
            node,
            cpus,
            migration: entry.record.id.clone(),
            holder_job: None,
            since: now_millis(),
            refused: None,
        };
        if cpus == 0 {
            info!(job = job_id, node = %h.node, container = %h.container, credited, needed, "Slurm counts the moved task's CPUs on the destination: no holder");
            self.store_holder(&h);
        } else {
            self.ask_holder(&mut h).await;
        }
        entry.slurm_holder = Some(h.status());
    }

    /// Journals `h` (intent first), asks Slurm for it, and journals the answer.
    async fn ask_holder(self: &Arc<Self>, h: &mut Holder) {
        h.refused = None;
        h.holder_job = None;
        self.store_holder(h);
        let req = HoldRequest {
            job_id: h.job_id,
            container: h.container.clone(),
            node: h.node.clone(),
            cpus: h.cpus,
            account: self.cfg.slurm.holder_account.clone(),
        };
        let slurm = self.slurm.clone();
        match tokio::task::spawn_blocking(move || slurm.hold(&req)).await {
            Ok(Ok(id)) => {
                h.holder_job = Some(id);
                info!(job = h.job_id, node = %h.node, container = %h.container, holder = id, cpus = h.cpus, "holder allocation granted");
            }
            Ok(Err(e)) => {
                self.metrics.holders_refused.inc();
                warn!(job = h.job_id, node = %h.node, container = %h.container, cpus = h.cpus, "holder allocation not granted; Slurm may place another job on the task's CPUs: {e}");
                h.refused = Some(e.to_string());
            }
            Err(e) => {
                self.metrics.holders_refused.inc();
                h.refused = Some(format!("holder task failed: {e}"));
            }
        }
        self.store_holder(h);
    }

    fn store_holder(&self, h: &Holder) {
        if let Err(e) = self.journal.put_holder(h) {
            error!(container = %h.container, job = h.job_id, "cannot journal a holder: {e}");
        }
        let n = {
            let mut st = write(&self.state);
            st.holders.insert(h.container.clone(), h.clone());
            st.holders
                .values()
                .filter(|h| h.holder_job.is_some())
                .count()
        };
        self.metrics.holders.set(n as i64);
    }

    fn forget_holder(&self, h: &Holder) {
        if let Err(e) = self.journal.remove_holder(&h.container) {
            error!(container = %h.container, job = h.job_id, "cannot journal a holder's release: {e}");
        }
        let n = {
            let mut st = write(&self.state);
            st.holders.remove(&h.container);
            st.holders
                .values()
                .filter(|h| h.holder_job.is_some())
                .count()
        };
        self.metrics.holders.set(n as i64);
    }

    /// The journaled holder of a moved container.
    pub fn holder_of(&self, container: &str) -> Option<Holder> {
        read(&self.state).holders.get(container).cloned()
    }

    /// Cancels a holder in Slurm (if granted) and forgets it; notes it on its migration.
    async fn release_holder(self: &Arc<Self>, h: &Holder, why: &str) {
        if let Some(id) = h.holder_job {
            let slurm = self.slurm.clone();
            match tokio::task::spawn_blocking(move || slurm.cancel_job(id)).await {
                Ok(Ok(())) => {
                    info!(job = h.job_id, node = %h.node, container = %h.container, holder = id, "holder released: {why}")
                }
                Ok(Err(e)) => {
                    // Its time limit still ends it with the job; the next reconcile sees it as
                    // an orphan if it runs on.
                    warn!(
                        job = h.job_id,
                        holder = id,
                        "cannot cancel a holder ({why}): {e}"
                    )
                }
                Err(e) => warn!(
                    job = h.job_id,
                    holder = id,
                    "holder cancel task failed: {e}"
                ),
            }
        }
        self.forget_holder(h);
        self.note_holder(&h.migration, format!("released ({why}): {}", h.status()));
    }

    /// Rewrites the holder line of a journaled migration (what `rebalctl show job` shows).
    fn note_holder(&self, migration: &str, text: String) {
        match self.journal.migration(migration) {
            Ok(Some(mut e)) => {
                e.slurm_holder = Some(text);
                if let Err(err) = self.journal.put_migration(&e) {
                    error!(migration, "cannot journal: {err}");
                }
            }
            Ok(None) => {}
            Err(err) => error!(migration, "cannot read the journal: {err}"),
        }
    }

    /// Loads the journal's holders into the controller's state (start-up); the first
    /// reconcile then judges them against Slurm.
    pub(crate) fn load_holders(&self) {
        match self.journal.holders() {
            Ok(all) => {
                let mut st = write(&self.state);
                for h in all {
                    info!(job = h.job_id, node = %h.node, container = %h.container, holder = h.holder_job, "holder from before the last stop");
                    st.holders.insert(h.container.clone(), h);
                }
                let n = st
                    .holders
                    .values()
                    .filter(|h| h.holder_job.is_some())
                    .count();
                self.metrics.holders.set(n as i64);
            }
            Err(e) => error!("cannot read the journal's holders: {e}"),
        }
    }

    /// Makes the holders true (every full Slurm reconcile): releases those whose task or job
    /// is gone, forgets those Slurm ended, asks again for refused ones, cancels orphans.
    pub async fn reconcile_holders(self: &Arc<Self>) {
        if !self.cfg.slurm.enabled || !self.cfg.slurm.sync_allocation {
            return;
        }
        let slurm = self.slurm.clone();
        let jobs = match tokio::task::spawn_blocking(move || slurm.jobs()).await {
            Ok(Ok(j)) => j,
            Ok(Err(e)) => {
                warn!("cannot read Slurm's jobs for the holders: {e}");
                return;
            }
            Err(e) => {
                warn!("holder reconcile task failed: {e}");
                return;
            }
        };
        let running = |id: u32| jobs.iter().any(|j| j.job_id == id && j.state == "RUNNING");
        let holders: Vec<Holder> = read(&self.state).holders.values().cloned().collect();
        for mut h in holders.iter().cloned() {
            let task_here = {
                let st = read(&self.state);
                st.agents
                    .get(&h.node)
                    .filter(|a| matches!(a.health, Some(Ok(()))))
                    .map(|a| {
                        a.containers
                            .iter()
                            .any(|c| c.id == h.container && c.state.is_live())
                    })
            };
            let holder_running = h.holder_job.is_some_and(running);
            match holder_action(&h, running(h.job_id), task_here, holder_running) {
                HolderAction::Keep => {}
                HolderAction::Release(why) => self.release_holder(&h, &why).await,
                HolderAction::Forget(why) => {
                    info!(job = h.job_id, node = %h.node, container = %h.container, "holder forgotten: {why}");
                    self.forget_holder(&h);
                    self.note_holder(&h.migration, format!("ended: {why}"));
                }
                HolderAction::Ask => {
                    // A request a stop interrupted may have been granted: adopt what Slurm runs.
                    let name = crate::slurm_sync::holder_name(h.job_id, &h.container);
                    if let Some(j) = jobs.iter().find(|j| {
                        j.name == name && j.uid == self.uid() && j.nodes.contains(&h.node)
                    }) {
                        info!(job = h.job_id, holder = j.job_id, container = %h.container, "holder adopted after a restart");
                        h.holder_job = Some(j.job_id);
                        h.refused = None;
                        self.store_holder(&h);
                    } else {
                        self.ask_holder(&mut h).await;
                    }
                    self.note_holder(&h.migration, h.status());
                }
            }
        }
        // Holders this pass released are in `jobs` still (the list is from before): known too.
        let mut known: Vec<Holder> = read(&self.state).holders.values().cloned().collect();
        known.extend(holders);
        for j in orphan_holders(&jobs, self.uid(), &known) {
            if j.state != "RUNNING" {
                continue;
            }
            let id = j.job_id;
            let slurm = self.slurm.clone();
            match tokio::task::spawn_blocking(move || slurm.cancel_job(id)).await {
                Ok(Ok(())) => {
                    info!(holder = id, name = %j.name, "orphaned holder cancelled (not in the journal)")
                }
                Ok(Err(e)) => warn!(holder = id, "cannot cancel an orphaned holder: {e}"),
                Err(e) => warn!(holder = id, "orphan cancel task failed: {e}"),
            }
        }
    }

    /// The controller's uid (the holders' owner).
    fn uid(&self) -> u32 {
        nix::unistd::getuid().as_raw()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use rebalancer_proto::{ContainerInfo, ContainerState, MigrationState, TaskRef};

    use super::*;
    use crate::daemon::AgentView;
    use crate::slurm_sync::{SlurmBackend, SlurmError, SlurmJob, SlurmNode};

    /// Slurm as the holder code sees it: grants or refuses holders, lists jobs, records cancels.
    #[derive(Default)]
    struct FakeSlurm {
        grant: Mutex<bool>,
        jobs: Mutex<Vec<SlurmJob>>,
        asked: Mutex<Vec<HoldRequest>>,
        cancelled: Mutex<Vec<u32>>,
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    impl SlurmBackend for FakeSlurm {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn poll_nodes(&self, _force: bool) -> Result<Option<Vec<SlurmNode>>, SlurmError> {
            Ok(None)
        }
        fn jobs(&self) -> Result<Vec<SlurmJob>, SlurmError> {
            Ok(lock(&self.jobs).clone())
        }
        fn expand_job(&self, _job_id: u32, _node: &str) -> Result<(), SlurmError> {
            Err(SlurmError::Disabled)
        }
        fn set_job_nodes(&self, _job_id: u32, _nodes: &[String]) -> Result<(), SlurmError> {
            Err(SlurmError::Disabled)
        }
        fn hold(&self, req: &HoldRequest) -> Result<u32, SlurmError> {
            lock(&self.asked).push(req.clone());
            if *lock(&self.grant) {
                Ok(77)
            } else {
                Err(SlurmError::Libslurm("Requested nodes are busy".into()))
            }
        }
        fn cancel_job(&self, job_id: u32) -> Result<(), SlurmError> {
            lock(&self.cancelled).push(job_id);
            Ok(())
        }
        fn credited_cpus(&self, _job_id: u32, _node: &str) -> Result<u32, SlurmError> {
            Ok(0)
        }
    }

    fn job(id: u32, name: &str) -> SlurmJob {
        SlurmJob {
            job_id: id,
            name: name.into(),
            uid: nix::unistd::getuid().as_raw(),
            state: "RUNNING".into(),
            nodes: vec!["node2".into()],
            ..Default::default()
        }
    }

    /// The whole life of one holder against a fake Slurm: refused at first (never a failure of
    /// the move), granted at the next reconcile, kept while job and task run, an orphan next to
    /// it cancelled, released when the job ends; journal, metrics and `show job`'s line follow.
    #[tokio::test]
    async fn a_refused_holder_is_asked_again_kept_and_released_with_its_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::config::Config::from_str_at("", Path::new("/etc/rebalancerd.toml"))
            .expect("default config");
        let journal = crate::journal::Journal::open(&dir.path().join("j.redb")).expect("journal");
        let fake = Arc::new(FakeSlurm::default());
        let ctl = Controller::new(
            cfg,
            journal,
            fake.clone(),
            Box::new(crate::planner::BuiltinPlanner::new(None)),
        );
        let task = TaskRef {
            job_id: 4,
            step_id: 0,
            task_id: 0,
        };
        write(&ctl.state).agents.insert(
            "node2".into(),
            AgentView {
                health: Some(Ok(())),
                containers: vec![ContainerInfo {
                    task: Some(task.clone()),
                    ..crate::daemon::tests::container_on(
                        "node2",
                        "j4.s0.t0",
                        ContainerState::Running,
                    )
                }],
                ..Default::default()
            },
        );
        let mut record = crate::journal::tests::record("m1", MigrationState::Succeeded);
        record.container = "j4.s0.t0".into();
        record.task = Some(task);
        let mut entry = MigrationEntry {
            record,
            decision: 1,
            policy: "operator:0".into(),
            uid: None,
            slurm_synced: true,
            slurm_error: None,
            slurm_kept_source: None,
            slurm_holder: None,
        };

        ctl.hold_after_move(&mut entry).await;
        let asked = lock(&fake.asked).clone();
        assert_eq!(asked.len(), 1);
        assert_eq!(
            (asked[0].name(), asked[0].node.as_str(), asked[0].cpus),
            ("rebal-hold:4:j4.s0.t0".to_string(), "node2", 1)
        );
        let line = entry.slurm_holder.clone().unwrap_or_default();
        assert!(line.contains("not granted on node2"), "{line}");
        assert_eq!(ctl.metrics.holders_refused.get(), 1);
        let journaled = ctl.journal.holders().expect("holders");
        assert_eq!(journaled.len(), 1);
        assert!(journaled[0].holder_job.is_none() && journaled[0].refused.is_some());
        ctl.journal.put_migration(&entry).expect("journal the move");

        // The next reconcile asks again; Slurm grants it now.
        *lock(&fake.grant) = true;
        *lock(&fake.jobs) = vec![job(4, "server")];
        ctl.reconcile_holders().await;
        assert_eq!(
            ctl.holder_of("j4.s0.t0").and_then(|h| h.holder_job),
            Some(77)
        );
        assert_eq!(ctl.metrics.holders.get(), 1);
        let shown = ctl.journal.migration("m1").expect("read").expect("entry");
        assert_eq!(
            shown.slurm_holder.as_deref(),
            Some("job 77 holds 1 CPU(s) on node2 for j4.s0.t0")
        );

        // Kept while it runs; an orphan of the controller's user next to it is cancelled.
        *lock(&fake.jobs) = vec![
            job(4, "server"),
            job(77, "rebal-hold:4:j4.s0.t0"),
            job(88, "rebal-hold:5:j5.s0.t0"),
        ];
        ctl.reconcile_holders().await;
        assert_eq!(*lock(&fake.cancelled), [88]);
        assert_eq!(ctl.journal.holders().expect("holders").len(), 1);

        // The job ends: the holder is cancelled and forgotten.
        *lock(&fake.jobs) = vec![job(77, "rebal-hold:4:j4.s0.t0")];
        ctl.reconcile_holders().await;
        assert_eq!(*lock(&fake.cancelled), [88, 77]);
        assert!(ctl.journal.holders().expect("holders").is_empty());
        assert!(ctl.holder_of("j4.s0.t0").is_none());
        assert_eq!(ctl.metrics.holders.get(), 0);
        let shown = ctl.journal.migration("m1").expect("read").expect("entry");
        assert!(
            shown
                .slurm_holder
                .as_deref()
                .is_some_and(|h| h.starts_with("released (job 4 ended)")),
            "{shown:?}"
        );
    }
}
