//! Agent ↔ agent protocol (TCP, rebalancer-proto framing).
//!
//! One connection per migration, opened by the source:
//! ```text
//! source                                   destination
//! Hello{role=agent, node, munge cred} ──→  verify credential (before anything else)
//!                                     ←──  Hello
//! Capabilities                        ──→  ← capabilities
//! Prepare{migration, mode, meta}      ──→  check room/features; netns (no route yet), root
//!                                          skeleton; stop-and-copy: criu page-server
//!                                     ←──  Prepared{page_server_port}
//!   (criu dump streams pages to the page server)
//! Images{files}  + Data frames        ──→  write non-memory images into the tmpfs dir
//!                                     ←──  ImagesReceived
//! Restore{lazy}                       ──→  post-copy: criu lazy-pages; criu restore
//!                                          --leave-stopped (tree stays stopped)
//!                                     ←──  Restored{pid, stats}
//! Commit  (source's point of no return)──→ route + SIGCONT + gratuitous ARP
//!                                     ←──  Committed
//! ```
//! Abort, EOF, an error or the timeout before Commit make the destination kill whatever it

pub mod client;
pub mod wire;

pub use client::PeerConn;
pub use wire::*;

use rebalancer_proto::ErrorReply;

use crate::error::AgentError;

pub fn reply_error(e: &AgentError) -> PeerResponse {
    PeerResponse::Error(ErrorReply {
        code: e.code(),
        message: e.chain(),
    })
}

pub fn error_from_reply(e: ErrorReply) -> AgentError {
    use rebalancer_proto::ErrorCode as C;
    let m = e.message;
    match e.code {
        C::NotFound => AgentError::NotFound(m),
        C::Busy => AgentError::Busy(m),
        C::BadRequest => AgentError::BadRequest(m),
        C::PermissionDenied => AgentError::PermissionDenied(m),
        C::Unsupported => AgentError::Unsupported(m),
        C::NoRoom => AgentError::NoRoom(m),
        C::Timeout => AgentError::Timeout(m),
        C::Unreachable => AgentError::Unreachable(m),
        _ => AgentError::Peer(m),
    }
}
