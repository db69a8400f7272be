//! Peer authentication with munge.
//!
//! Version 1 (today's hello): the credential's payload names the sending node only, so it can be
//! replayed to another node within its lifetime (munge's replay cache is per node).
//!
//! Mutual, bound credentials ([`Binding`]): each side's payload names the sender, the receiver
//! and the *other* side's fresh nonce for this connection, so a credential captured on one
//! connection is refused on any other connection and by any other receiver. Both directions are
//! checked: the source knows whom it hands a job's memory to.
//!
//! The payloads, their checks and the bounded munge/unmunge runs (at most
//! [`rebalancer_proto::munge::MAX_CONCURRENT`] at once, each within a time limit) are
//! [`rebalancer_proto::auth`] and [`rebalancer_proto::munge`], shared with the TCP control port
//! and the controller; this module gives them the peer channel's domain and the agent's errors.

use std::path::Path;

use rebalancer_proto::auth::{self as proto_auth, AuthError, Expect, PEER_DOMAIN};
use rebalancer_proto::munge;
use rebalancer_proto::VersionRange;

use crate::config::AuthMethod;
use crate::error::AgentError;

const PAYLOAD_PREFIX: &str = "rebalancer-agent node=";

/// What a bound credential must say: who sends it, who may accept it, the receiver's nonce
/// for this connection and, with peer protocol 3, the TLS session's exporter value
/// ([`crate::peer::tls`]), so that it is valid inside that one TLS session only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub from: String,
    pub to: String,
    pub nonce: String,
    /// The TLS exporter of the session the credential travels in (hexadecimal); `None`
    /// outside TLS (protocol 2).
    pub session: Option<String>,
    /// The peer protocol range this side's hello offered, stated when the receiver's nonce
    /// states its own (downgrade protection, [`rebalancer_proto::auth`]).
    pub offer: Option<VersionRange>,
}

/// The agent's error for a refused or failed credential (messages name nodes, as the peer
/// channel's callers expect).
fn agent_error(e: AuthError) -> AgentError {
    let deny = |m: String| AgentError::PermissionDenied(m);
    match e {
        AuthError::BadField { what, value } => {
            AgentError::BadRequest(format!("invalid {what} {value:?} for a credential"))
        }
        AuthError::Missing => deny("peer sent no munge credential".into()),
        AuthError::TooLong { .. } => deny("munge credential too long".into()),
        AuthError::Uid { uid, .. } => deny(format!("credential of uid {uid}, agents run as root")),
        AuthError::Domain { .. } => {
            deny("credential is not an agent credential of this protocol".into())
        }
        AuthError::Malformed(p) => deny(format!("malformed agent credential {p:?}")),
        AuthError::OtherReceiver { to, me } => deny(format!(
            "credential is for node {to}, this is {me} (replayed?)"
        )),
        AuthError::OtherConnection => {
            deny("credential is bound to another connection (replayed?)".into())
        }
        AuthError::OtherSession => deny(
            "credential is bound to another TLS session (relayed by a man in the middle?)".into(),
        ),
        AuthError::NoSession => {
            deny("credential names no TLS session; protocol 3 requires it".into())
        }
        AuthError::UnexpectedSession => {
            deny("credential names a TLS session; this connection has none".into())
        }
        AuthError::OtherSender { from, want } => {
            deny(format!("credential is from node {from}, expected {want}"))
        }
        AuthError::Unreadable => deny("unreadable munge credential".into()),
        AuthError::Invalid(m) => deny(format!("invalid munge credential: {m}")),
        AuthError::Munge(m) => {
            AgentError::Internal(format!("munge could not create a credential: {m}"))
        }
        e @ AuthError::Busy(_) => AgentError::Busy(e.to_string()),
        e @ AuthError::Timeout { .. } => AgentError::Timeout(e.to_string()),
        e @ AuthError::Downgrade(_) => deny(e.to_string()),
    }
}

impl Binding {
    fn shared(&self) -> proto_auth::Binding {
        proto_auth::Binding {
            domain: PEER_DOMAIN,
            from: self.from.clone(),
            to: self.to.clone(),
            nonce: self.nonce.clone(),
            session: self.session.clone(),
            offer: self.offer,
        }
    }

    /// The credential's payload. Node names and nonces never contain spaces (checked). Pure.
    pub fn payload(&self) -> Result<String, AgentError> {
        self.shared().payload().map_err(agent_error)
    }

    /// Checks a decoded credential's uid and payload against what this connection expects.
    /// `from` is `None` when the receiver accepts any sender (it learns the name from it). Pure.
    pub fn check(
        uid: u32,
        payload: &str,
        from: Option<&str>,
        to: &str,
        nonce: &str,
    ) -> Result<String, AgentError> {
        Self::check_in_session(uid, payload, (from, to, nonce), None, None)
    }

    /// As [`Binding::check`], inside the TLS session whose exporter is `session` (protocol 3):
    /// the credential must name exactly that session; outside TLS it must name none. Agents
    /// run as root: only root's credentials pass. `offer`: the range the sender's hello
    /// stated as received, which a credential stating its offer must match (`None`: the
    /// receiver is the client, whose peer states none).
    pub fn check_in_session(
        uid: u32,
        payload: &str,
        (from, to, nonce): (Option<&str>, &str, &str),
        session: Option<&str>,
        offer: Option<VersionRange>,
    ) -> Result<String, AgentError> {
        Expect {
            domain: PEER_DOMAIN,
            uids: &[0],
            from,
            to,
            nonce,
            session,
            offer,
        }
        .check(uid, payload)
        .map_err(agent_error)
    }
}

/// A fresh nonce for one connection: 128 random bits, hexadecimal.
pub fn nonce() -> String {
    proto_auth::nonce()
}

/// A bound credential for `binding` (`None` with `auth = "none"`).
pub async fn bound_credential(
    method: AuthMethod,
    socket: Option<&Path>,
    binding: &Binding,
) -> Result<Option<String>, AgentError> {
    if method == AuthMethod::None {
        return Ok(None);
    }
    munge::bound_credential(socket, &binding.shared())
        .await
        .map(Some)
        .map_err(agent_error)
}

/// Verifies a peer's bound credential; returns the node it proves.
pub async fn verify_bound(
    method: AuthMethod,
    socket: Option<&Path>,
    cred: Option<&str>,
    from: Option<&str>,
    to: &str,
    nonce: &str,
) -> Result<Option<String>, AgentError> {
    if method == AuthMethod::None {
        return Ok(None);
    }
    verify_bound_in(method, socket, cred, (from, to, nonce), None, None).await
}

/// As [`verify_bound`], inside the TLS session whose exporter is `session` (protocol 3), and
/// (the server) requiring a stated offer to be `offer`, the client hello's range.
pub async fn verify_bound_in(
    method: AuthMethod,
    socket: Option<&Path>,
    cred: Option<&str>,
    (from, to, nonce): (Option<&str>, &str, &str),
    session: Option<&str>,
    offer: Option<VersionRange>,
) -> Result<Option<String>, AgentError> {
    if method == AuthMethod::None {
        return Ok(None);
    }
    let (uid, payload) = munge::decode(socket, cred).await.map_err(agent_error)?;
    Binding::check_in_session(uid, &payload, (from, to, nonce), session, offer).map(Some)
}

/// A version-1 credential naming only this node (see the module docs).
pub async fn credential(
    method: AuthMethod,
    socket: Option<&Path>,
    node: &str,
) -> Result<Option<String>, AgentError> {
    if method == AuthMethod::None {
        return Ok(None);
    }
    munge::credential(socket, &format!("{PAYLOAD_PREFIX}{node}"))
        .await
        .map(Some)
        .map_err(agent_error)
}

/// Verifies a peer's version-1 credential.
pub async fn verify(
    method: AuthMethod,
    socket: Option<&Path>,
    claimed_node: Option<&str>,
    cred: Option<&str>,
) -> Result<(), AgentError> {
    if method == AuthMethod::None {
        return Ok(());
    }
    let (uid, payload) = munge::decode(socket, cred).await.map_err(agent_error)?;
    check_v1(uid, &payload, claimed_node)
}

/// Checks a decoded version-1 credential: root's, naming the node the hello claims. Pure.
fn check_v1(uid: u32, payload: &str, claimed_node: Option<&str>) -> Result<(), AgentError> {
    if uid != 0 {
        return Err(AgentError::PermissionDenied(format!(
            "credential of uid {uid}, agents run as root"
        )));
    }
    let node = payload.strip_prefix(PAYLOAD_PREFIX).ok_or_else(|| {
        AgentError::PermissionDenied("credential is not an agent credential".into())
    })?;
    if let Some(c) = claimed_node {
        if c != node {
            return Err(AgentError::PermissionDenied(format!(
                "credential is for node {node}, hello claims {c}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmunge_output_parses() {
        let out = "STATUS:          Success (0)\nENCODE_HOST:     h (127.0.0.1)\nUID:             root (0)\nGID:             root (0)\nLENGTH:          27\n\nrebalancer-agent node=n1\n";
        let (uid, payload) = proto_auth::parse_unmunge(out).expect("parsed");
        assert_eq!((uid, payload.as_str()), (0, "rebalancer-agent node=n1"));
        assert_eq!(proto_auth::parse_unmunge("STATUS: Success (0)\n"), None);
        // A version-1 payload as it decodes: root's, naming the node the hello claims.
        assert!(check_v1(uid, &payload, Some("n1")).is_ok());
        let e = check_v1(uid, &payload, Some("n2")).expect_err("other node");
        assert!(
            e.to_string().contains("for node n1, hello claims n2"),
            "{e}"
        );
        assert!(check_v1(1000, &payload, None).is_err());
        assert!(check_v1(0, "rebalancer-agent/2 from=n1 to=n2 nonce=x", None).is_err());
    }

    #[tokio::test]
    async fn a_missing_or_oversized_credential_is_refused_before_unmunge_runs() {
        // The socket does not exist: reaching unmunge would fail otherwise.
        let sock = Some(Path::new("/nonexistent/munge.sock"));
        let munge = AuthMethod::Munge;
        let e = verify(munge, sock, None, None).await.expect_err("missing");
        assert!(
            e.to_string().contains("peer sent no munge credential"),
            "{e}"
        );
        let long = "M".repeat(proto_auth::MAX_CREDENTIAL_LEN + 1);
        let e = verify_bound(munge, sock, Some(&long), None, "n2", "abc")
            .await
            .expect_err("too long");
        assert!(e.to_string().contains("munge credential too long"), "{e}");
        // With auth = "none" nothing is made or checked.
        assert_eq!(
            credential(AuthMethod::None, sock, "n1").await.ok(),
            Some(None)
        );
    }

    fn b(from: &str, to: &str, nonce: &str) -> Binding {
        Binding {
            from: from.into(),
            to: to.into(),
            nonce: nonce.into(),
            session: None,
            offer: None,
        }
    }

    #[test]
    fn a_credential_from_another_tls_session_is_refused() {
        let mut bound = b("n1", "n2", "abc");
        bound.session = Some("00ff".repeat(16));
        let p = bound.payload().expect("payload");
        let this = "00ff".repeat(16);
        assert_eq!(
            Binding::check_in_session(0, &p, (Some("n1"), "n2", "abc"), Some(&this), None)
                .expect("ok"),
            "n1"
        );
        let other = "11aa".repeat(16);
        let e = Binding::check_in_session(0, &p, (Some("n1"), "n2", "abc"), Some(&other), None)
            .expect_err("other session");
        assert!(e.to_string().contains("another TLS session"), "{e}");
        // A protocol-2 credential (no session) is refused inside TLS, and the other way round.
        let plain = b("n1", "n2", "abc").payload().expect("payload");
        let e = Binding::check_in_session(0, &plain, (None, "n2", "abc"), Some(&this), None)
            .expect_err("no session named");
        assert!(e.to_string().contains("names no TLS session"), "{e}");
        let e = Binding::check(0, &p, None, "n2", "abc").expect_err("session outside TLS");
        assert!(e.to_string().contains("this connection has none"), "{e}");
        // Named twice, or not hexadecimal: refused.
        let twice = format!("{p} tls={this}");
        assert!(
            Binding::check_in_session(0, &twice, (None, "n2", "abc"), Some(&this), None).is_err()
        );
        bound.session = Some("not hex".into());
        assert!(bound.payload().is_err());
    }

    #[test]
    fn a_bound_credential_is_accepted_only_by_its_receiver_on_its_connection() {
        let p = b("n1", "n2", "abc").payload().expect("payload");
        assert_eq!(
            Binding::check(0, &p, Some("n1"), "n2", "abc").expect("ok"),
            "n1"
        );
        assert_eq!(
            Binding::check(0, &p, None, "n2", "abc").expect("any sender"),
            "n1"
        );
        // Replayed to another node, or on another connection (another nonce).
        let e = Binding::check(0, &p, None, "n3", "abc").expect_err("other receiver");
        assert!(e.to_string().contains("for node n2, this is n3"), "{e}");
        let e = Binding::check(0, &p, None, "n2", "xyz").expect_err("other nonce");
        assert!(e.to_string().contains("another connection"), "{e}");
        // From someone else than expected, or not root.
        let e = Binding::check(0, &p, Some("n4"), "n2", "abc").expect_err("other sender");
        assert!(e.to_string().contains("from node n1, expected n4"), "{e}");
        assert!(Binding::check(1000, &p, None, "n2", "abc").is_err());
        // A version-1 credential, or a payload with a field twice or an extra one.
        for bad in [
            "rebalancer-agent node=n1",
            "rebalancer-agent/2 from=n1 to=n2 nonce=abc to=n3",
            "rebalancer-agent/2 from=n1 to=n2 nonce=abc x=1",
            "rebalancer-agent/2 from=n1 to=n2",
        ] {
            assert!(Binding::check(0, bad, None, "n2", "abc").is_err(), "{bad}");
        }
    }

    #[test]
    fn bindings_refuse_names_that_could_forge_fields() {
        assert!(b("n1 to=n9", "n2", "abc").payload().is_err());
        assert!(b("n1", "", "abc").payload().is_err());
        assert!(b("n1", "n2", "a\nb").payload().is_err());
        assert_ne!(nonce(), nonce());
        assert_eq!(nonce().len(), 32);
    }
}
