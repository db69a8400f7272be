//! Agent errors to and from the wire's error replies.

use rebalancer_proto::ErrorReply;

use super::wire::PeerResponse;
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
        C::Version => AgentError::Version(m),
        _ => AgentError::Peer(m),
    }
}
