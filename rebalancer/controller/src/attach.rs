//! `rebalctl wait migration=ID`: attaches a connection to a running migration, whoever started
//! it. The in-flight entry is the controller's live view (updated from the source agent's
//! progress stream or by polling it); each change is sent as an event, as to the connection
//! that started the migration, and the final journaled entry is the answer.

use std::sync::Arc;
use std::time::Duration;

use rebalancer_proto::channel::AsyncChannel;
use rebalancer_proto::control::{ControlReply, MigrationEntry};
use rebalancer_proto::frame::FrameKind;
use rebalancer_proto::{ErrorCode, ErrorReply, Event};
use tokio::net::UnixStream;

use crate::auth::Caller;
use crate::daemon::{err, Controller};

/// How often the live entry is looked at: phases last tens of milliseconds to minutes.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Handles [`rebalancer_proto::control::ControlRequest::Watch`].
pub async fn watch(
    ctl: &Arc<Controller>,
    caller: &Caller,
    want: &str,
    sock: &mut AsyncChannel<UnixStream>,
    id: u32,
) -> Result<ControlReply, ErrorReply> {
    let first = find(ctl, caller, want)?;
    let mid = first.record.id.clone();
    let mut last = None;
    loop {
        match live(ctl, &mid) {
            Some(e) if !e.record.state.is_terminal() => {
                if last.as_ref() != Some(&e.record) {
                    let ev = Event::MigrationProgress {
                        migration: e.record.clone(),
                        progress_bytes: None,
                    };
                    sock.send(FrameKind::Event, id, &ev)
                        .await
                        .map_err(|e| err(ErrorCode::Internal, format!("client went away: {e}")))?;
                    last = Some(e.record);
                }
            }
            // Ended (or never in flight): the journal has its final entry.
            _ => break,
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
    let end = find(ctl, caller, &mid)?;
    Ok(ControlReply::Migrations {
        migrations: vec![end],
    })
}

/// The live in-flight entry of migration `mid`.
fn live(ctl: &Controller, mid: &str) -> Option<MigrationEntry> {
    ctl.state()
        .in_flight
        .values()
        .filter_map(|f| f.entry.as_ref())
        .find(|e| e.record.id == mid)
        .cloned()
}

/// The migration `want` names (its id or a unique prefix) that the caller may see.
fn find(ctl: &Controller, caller: &Caller, want: &str) -> Result<MigrationEntry, ErrorReply> {
    let mut found: Vec<MigrationEntry> = ctl
        .migrations()?
        .into_iter()
        .filter(|m| ctl.access.sees(caller, m.uid))
        .filter(|m| m.record.id == want || m.record.id.starts_with(want))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(err(
            ErrorCode::NotFound,
            format!("no migration '{want}' (or not yours)"),
        )),
        n => Err(err(
            ErrorCode::BadRequest,
            format!("'{want}' names {n} migrations; give more of the id"),
        )),
    }
}
