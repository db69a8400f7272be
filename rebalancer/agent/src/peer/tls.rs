//! Peer protocol 3: TLS 1.3 on the agent ↔ agent connection, after the `Hello`s.
//!
//! The TLS machinery (the process's self-signed certificate, the verifier that checks only the
//! handshake signature, the exporter every bound credential names) is
//! [`rebalancer_proto::tls`], shared with the TCP control port; this module gives it the peer
//! channel's purpose and the agent's error type.

use std::time::Duration;

use rebalancer_proto::tls::{self, TlsError, PEER};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::AgentError;

/// Label of the exporter value every bound credential of protocol 3 names.
pub const EXPORTER_LABEL: &[u8] = PEER.label;

/// Length of the exporter value (bytes; hexadecimal in the credential).
pub const EXPORTER_LEN: usize = tls::EXPORTER_LEN;

/// A peer connection's stream: as accepted or connected (protocols 1 and 2), or inside TLS.
pub type PeerStream<S> = tls::MaybeTls<S>;

/// The agent's error for a failed TLS set-up (the messages name the peer).
pub fn agent_error(e: TlsError) -> AgentError {
    match e {
        TlsError::Setup(_) => AgentError::Internal(e.to_string()),
        TlsError::Timeout { .. } => AgentError::Timeout(e.to_string()),
        TlsError::Handshake { .. } => AgentError::Peer(e.to_string()),
    }
}

/// Client side of the upgrade, within `timeout`: the TLS stream and the session's exporter.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    timeout: Duration,
) -> Result<(PeerStream<S>, String), AgentError> {
    tls::connect(s, timeout, PEER).await.map_err(agent_error)
}

/// Server side of the upgrade; see [`connect`].
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    timeout: Duration,
) -> Result<(PeerStream<S>, String), AgentError> {
    tls::accept(s, timeout, PEER).await.map_err(agent_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_handshake_that_times_out_is_the_agents_timeout_naming_the_peer() {
        let (a, _b) = tokio::io::duplex(1 << 16);
        let e = connect(a, Duration::from_millis(50))
            .await
            .err()
            .expect("no server");
        assert!(matches!(e, AgentError::Timeout(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("the TLS handshake with the peer did not finish within 50 ms"),
            "{e}"
        );
    }
}
