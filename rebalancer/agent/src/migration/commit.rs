//! What commit and rollback do: on the source, resuming its frozen copy (rollback); on the
//! destination, undoing an incoming migration that did not commit.

use rebalancer_proto::ContainerState;

use super::destination::Incoming;
use super::source::Prepared;
use crate::agent::Agent;
use crate::container;
use crate::netns;

impl Incoming {
    pub(super) async fn undo(&mut self, agent: &Agent, why: &str) {
        tracing::warn!(migration = %self.migration, container = %self.meta.spec.id, reason = why, "incoming migration aborted");
        agent.restore_steps().remove(&self.migration);
        if let Some(mut c) = self.step_child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        if let Some(pid) = self.restored_pid.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Pid 1 of a restored tree is our child (subreaper): reap it.
            let _ = tokio::task::spawn_blocking(move || {
                nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
            })
            .await;
        }
        for c in [self.page_server.take(), self.lazy_daemon.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        netns::destroy(&self.net).await;
        if let Some(cg) = self.cgroup.take() {
            cg.remove().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.mig_dir);
        agent
            .incoming()
            .remove(&(self.meta.spec.id.clone(), self.meta.address));
    }
}

/// Resumes the frozen source tree after a failure before Commit.
pub(super) async fn resume_source(agent: &Agent, p: &Prepared) {
    match netns::unlock_criu_tables(&p.net).await {
        Ok(n) => tracing::info!(migration = %p.rec.id, tables = n, "network lock removed"),
        Err(e) => {
            tracing::error!(migration = %p.rec.id, error = %e.chain(), "cannot remove CRIU's network lock")
        }
    }
    let n = container::release_tcp_repair(p.pid);
    tracing::info!(migration = %p.rec.id, sockets = n, "TCP repair mode turned off");
    container::signal_tree(p.pid, nix::sys::signal::Signal::SIGCONT);
    if let Some(c) = agent.containers().get_mut(&p.rec.container) {
        c.state = ContainerState::Running;
    }
}
