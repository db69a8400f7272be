//! Recovery at start-up: the journal's unfinished migrations followed to their end, and
//! allocation updates that a stop interrupted done again.

use std::sync::Arc;

use rebalancer_proto::control::{DecisionOutcome, DecisionRecord, MigrationEntry};
use rebalancer_proto::MigrationState;
use tracing::{error, info};

use crate::daemon::{write, Controller};
use crate::inflight::InFlight;

impl Controller {
    /// Start-up: finish or clean up what the journal says was in flight.
    pub async fn recover(self: &Arc<Self>) {
        let unfinished = match self.journal.unfinished() {
            Ok(u) => u,
            Err(e) => {
                error!("cannot read the journal: {e}");
                return;
            }
        };
        for entry in unfinished {
            let decision = self
                .journal
                .decisions(usize::MAX)
                .ok()
                .and_then(|ds| ds.into_iter().find(|d| d.seq == entry.decision))
                .unwrap_or_else(|| recovered_decision(&entry));
            info!(migration = %entry.record.id, container = %entry.record.container, source = %entry.record.source, "recovering a migration that was in flight at the last stop");
            write(&self.state).in_flight.adopt(InFlight {
                decision: decision.clone(),
                entry: Some(entry.clone()),
                cpus: 1,
                rss_mb: entry.record.stats.rss_bytes >> 20,
                started: entry.record.started_at,
            });
            let this = self.clone();
            tokio::spawn(async move { this.follow(entry, decision, None).await });
        }
        // Unknown outcomes: the job keeps both nodes, the container its slot, until resolved.
        match self.journal.unresolved() {
            Ok(all) => {
                for u in all {
                    info!(migration = %u.migration, container = %u.container, "resolving an unknown migration outcome from before the last stop");
                    if let Ok(Some(entry)) = self.journal.migration(&u.migration) {
                        let decision = recovered_decision(&entry);
                        write(&self.state).in_flight.adopt(InFlight {
                            decision,
                            entry: Some(entry.clone()),
                            cpus: 1,
                            rss_mb: entry.record.stats.rss_bytes >> 20,
                            started: entry.record.started_at,
                        });
                    }
                    let this = self.clone();
                    tokio::spawn(async move { this.resolve_later(u).await });
                }
            }
            Err(e) => error!("cannot read the journal's unknown outcomes: {e}"),
        }
        // Successful migrations whose allocation update was interrupted.
        if let Ok(all) = self.journal.migrations() {
            for mut e in all.into_iter().filter(|e| {
                e.record.state == MigrationState::Succeeded
                    && !e.slurm_synced
                    && e.slurm_error.is_none()
            }) {
                let this = self.clone();
                tokio::spawn(async move {
                    this.sync_slurm(&mut e).await;
                    if let Err(err) = this.journal.put_migration(&e) {
                        error!(migration = %e.record.id, "cannot journal: {err}");
                    }
                });
            }
        }
    }
}

fn recovered_decision(entry: &MigrationEntry) -> DecisionRecord {
    DecisionRecord {
        seq: entry.decision,
        at: entry.record.started_at,
        policy: entry.policy.clone(),
        container: entry.record.container.clone(),
        task: entry.record.task.clone(),
        uid: entry.uid,
        source: entry.record.source.clone(),
        destination: entry.record.destination.clone(),
        mode: entry.record.requested_mode,
        why: "recovered after a controller restart".into(),
        outcome: DecisionOutcome::Started,
        detail: None,
        migration: Some(entry.record.id.clone()),
    }
}
