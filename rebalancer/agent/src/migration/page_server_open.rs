//! The source's side of a stop-and-copy or pre-copy page server: before its CRIU connects, the
//! port is guarded on this node so that only root's sockets reach it ([`crate::ps_guard`]),
//! then a destination that waits for it is told to listen (`open-page-server`,
//! [`super::page_server`]).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::heartbeat::{watched_call, Heartbeat};
use super::host::Host;
use crate::error::AgentError;
use crate::peer::{PeerReply, PeerRequest};

/// One migration's page-server openings on the source.
#[derive(Debug, Default)]
pub struct Openings {
    /// The destination's page servers wait for `open-page-server` (it agreed at prepare).
    pub waits: bool,
    /// Page servers guarded here whose guard is still to be removed.
    guarded: Vec<(Ipv4Addr, u16)>,
}

/// What [`Openings::open`] needs of the migration.
pub struct Migration<'a> {
    pub id: &'a str,
    pub deadline: Instant,
    pub encrypted: bool,
    pub heartbeat: Option<Heartbeat>,
}

impl Openings {
    pub fn new(waits: bool) -> Openings {
        Openings {
            waits,
            guarded: Vec::new(),
        }
    }

    /// Guards the page server at `ps`, then opens it when the destination waits for that.
    /// Without a guard an encrypted transfer goes on (a stranger could only make it fail); a
    /// plain one is refused (a stranger could write pages into the job).
    pub async fn open<H: Host>(
        &mut self,
        host: &H,
        conn: &mut H::Link,
        m: &Migration<'_>,
        ps: (Ipv4Addr, u16),
    ) -> Result<(), AgentError> {
        let left = m.deadline.saturating_duration_since(host.now());
        match host
            .guard_page_server(ps, left.max(Duration::from_secs(1)))
            .await
        {
            Ok(()) => self.guarded.push(ps),
            Err(e) if m.encrypted => {
                tracing::warn!(migration = %m.id, page_server = %format!("{}:{}", ps.0, ps.1), error = %e.chain(), "page server unguarded (pages stay encrypted)")
            }
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "refusing an unencrypted transfer to a page server that any user of this \
                     node could reach first: {}",
                    e.chain()
                )))
            }
        }
        if !self.waits {
            // An older destination listens already: the guard narrows the window, no more.
            return Ok(());
        }
        let req = PeerRequest::OpenPageServer { port: ps.1 };
        let r = match watched_call(host, conn, m.heartbeat, &req).await {
            Ok(PeerReply::Ack) => Ok(()),
            Ok(other) => Err(AgentError::Peer(format!(
                "unexpected answer to open-page-server: {other:?}"
            ))),
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.unguard(host, ps).await;
        }
        r
    }

    /// Removes the guard of `ps` once its transfer is over, if [`Self::open`] installed one.
    pub async fn unguard<H: Host>(&mut self, host: &H, ps: (Ipv4Addr, u16)) {
        if let Some(i) = self.guarded.iter().position(|g| *g == ps) {
            self.guarded.swap_remove(i);
            host.unguard_page_server(ps).await;
        }
    }

    /// Removes every guard left (a migration cut before its transfer ended).
    pub async fn unguard_all<H: Host>(&mut self, host: &H) {
        for ps in std::mem::take(&mut self.guarded) {
            host.unguard_page_server(ps).await;
        }
    }
}
