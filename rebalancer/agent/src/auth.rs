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
//! Every `munge`/`unmunge` run is bounded in time, and at most [`MAX_CONCURRENT_CHECKS`] run at
//! once: a flood of connections gets a clear refusal instead of a fork storm.

use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::config::AuthMethod;
use crate::error::AgentError;

const PAYLOAD_PREFIX: &str = "rebalancer-agent node=";
/// Payload prefix of a bound credential (see [`Binding`]).
const BOUND_PREFIX: &str = "rebalancer-agent/2";
/// Longest a munge or unmunge run may take (munged answers in milliseconds).
const MUNGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many munge/unmunge processes may run at once.
pub const MAX_CONCURRENT_CHECKS: usize = 8;
/// How long a check waits for a free slot before it is refused.
const SLOT_WAIT: Duration = Duration::from_secs(2);

fn slots() -> &'static Semaphore {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| Semaphore::new(MAX_CONCURRENT_CHECKS))
}

/// Runs munge or unmunge with `input` on stdin, within a slot and [`MUNGE_TIMEOUT`].
async fn run_munge(
    program: &str,
    socket: Option<&Path>,
    args: &[String],
    input: &[u8],
) -> Result<std::process::Output, AgentError> {
    let _slot = tokio::time::timeout(SLOT_WAIT, slots().acquire())
        .await
        .map_err(|_| {
            AgentError::Busy(format!(
                "{MAX_CONCURRENT_CHECKS} credential checks are already running; try again"
            ))
        })?
        .map_err(|_| AgentError::Internal("credential check slots closed".into()))?;
    let mut cmd = tokio::process::Command::new(program);
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| AgentError::Io {
            what: format!("cannot run {program}"),
            source,
        })?;
    let work = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input)
                .await
                .map_err(|source| AgentError::Io {
                    what: format!("write to {program}"),
                    source,
                })?;
        }
        child
            .wait_with_output()
            .await
            .map_err(|source| AgentError::Io {
                what: format!("wait for {program}"),
                source,
            })
    };
    tokio::time::timeout(MUNGE_TIMEOUT, work)
        .await
        .map_err(|_| {
            AgentError::Timeout(format!("{program} did not answer within {MUNGE_TIMEOUT:?}"))
        })?
}

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
}

impl Binding {
    /// The credential's payload. Node names and nonces never contain spaces (checked). Pure.
    pub fn payload(&self) -> Result<String, AgentError> {
        for (what, v) in [
            ("node", &self.from),
            ("node", &self.to),
            ("nonce", &self.nonce),
        ] {
            if v.is_empty()
                || v.len() > 256
                || v.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(AgentError::BadRequest(format!(
                    "invalid {what} {v:?} for a credential"
                )));
            }
        }
        if let Some(t) = &self.session {
            if t.is_empty() || t.len() > 256 || !t.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(AgentError::BadRequest(format!(
                    "invalid TLS session value {t:?} for a credential"
                )));
            }
        }
        let mut p = format!(
            "{BOUND_PREFIX} from={} to={} nonce={}",
            self.from, self.to, self.nonce
        );
        if let Some(t) = &self.session {
            p.push_str(&format!(" tls={t}"));
        }
        Ok(p)
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
        Self::check_in_session(uid, payload, from, to, nonce, None)
    }

    /// As [`Binding::check`], inside the TLS session whose exporter is `session` (protocol 3):
    /// the credential must name exactly that session; outside TLS it must name none.
    pub fn check_in_session(
        uid: u32,
        payload: &str,
        from: Option<&str>,
        to: &str,
        nonce: &str,
        session: Option<&str>,
    ) -> Result<String, AgentError> {
        let deny = |m: String| Err(AgentError::PermissionDenied(m));
        if uid != 0 {
            return deny(format!("credential of uid {uid}, agents run as root"));
        }
        let mut words = payload.split(' ');
        if words.next() != Some(BOUND_PREFIX) {
            return deny("credential is not an agent credential of this protocol".into());
        }
        let (mut got_from, mut got_to, mut got_nonce, mut got_tls) = (None, None, None, None);
        for w in words {
            match w.split_once('=') {
                Some(("from", v)) if got_from.is_none() => got_from = Some(v),
                Some(("to", v)) if got_to.is_none() => got_to = Some(v),
                Some(("nonce", v)) if got_nonce.is_none() => got_nonce = Some(v),
                Some(("tls", v)) if got_tls.is_none() => got_tls = Some(v),
                _ => return deny(format!("malformed agent credential {payload:?}")),
            }
        }
        let (Some(f), Some(t), Some(n)) = (got_from, got_to, got_nonce) else {
            return deny(format!("incomplete agent credential {payload:?}"));
        };
        if t != to {
            return deny(format!(
                "credential is for node {t}, this is {to} (replayed?)"
            ));
        }
        if n != nonce {
            return deny("credential is bound to another connection (replayed?)".into());
        }
        match (got_tls, session) {
            (Some(got), Some(want)) if got == want => {}
            (None, None) => {}
            (Some(_), Some(_)) => {
                return deny(
                    "credential is bound to another TLS session (relayed by a man in the middle?)"
                        .into(),
                )
            }
            (None, Some(_)) => {
                return deny("credential names no TLS session; protocol 3 requires it".into())
            }
            (Some(_), None) => {
                return deny("credential names a TLS session; this connection has none".into())
            }
        }
        if let Some(want) = from {
            if f != want {
                return deny(format!("credential is from node {f}, expected {want}"));
            }
        }
        Ok(f.to_string())
    }
}

/// A fresh nonce for one connection: 128 random bits, hexadecimal.
pub fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
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
    let payload = binding.payload()?;
    encode(socket, &[], payload.as_bytes()).await.map(Some)
}

/// Runs munge (payload from `args` or stdin) and returns the credential.
async fn encode(
    socket: Option<&Path>,
    args: &[String],
    input: &[u8],
) -> Result<String, AgentError> {
    let out = run_munge("munge", socket, args, input).await?;
    if !out.status.success() {
        return Err(AgentError::Internal(format!(
            "munge could not create a credential: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
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
    verify_bound_in(method, socket, cred, (from, to, nonce), None).await
}

/// As [`verify_bound`], inside the TLS session whose exporter is `session` (protocol 3).
pub async fn verify_bound_in(
    method: AuthMethod,
    socket: Option<&Path>,
    cred: Option<&str>,
    (from, to, nonce): (Option<&str>, &str, &str),
    session: Option<&str>,
) -> Result<Option<String>, AgentError> {
    if method == AuthMethod::None {
        return Ok(None);
    }
    let (uid, payload) = decode(socket, cred).await?;
    Binding::check_in_session(uid, &payload, from, to, nonce, session).map(Some)
}

/// Decodes a peer's munge credential: (uid, payload), munge having checked key, TTL and replay.
async fn decode(socket: Option<&Path>, cred: Option<&str>) -> Result<(u32, String), AgentError> {
    let cred =
        cred.ok_or_else(|| AgentError::PermissionDenied("peer sent no munge credential".into()))?;
    if cred.len() > MAX_CREDENTIAL_LEN {
        return Err(AgentError::PermissionDenied(
            "munge credential too long".into(),
        ));
    }
    let out = run_munge("unmunge", socket, &[], cred.as_bytes()).await?;
    if !out.status.success() {
        return Err(AgentError::PermissionDenied(format!(
            "invalid munge credential: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_unmunge(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| AgentError::PermissionDenied("unreadable munge credential".into()))
}

/// Longest munge credential accepted (a payload of a few hundred bytes encodes to well under 1 KiB).
const MAX_CREDENTIAL_LEN: usize = 4096;

/// A version-1 credential naming only this node (see the module docs).
pub async fn credential(
    method: AuthMethod,
    socket: Option<&Path>,
    node: &str,
) -> Result<Option<String>, AgentError> {
    if method == AuthMethod::None {
        return Ok(None);
    }
    let args = ["--string".to_string(), format!("{PAYLOAD_PREFIX}{node}")];
    encode(socket, &args, b"").await.map(Some)
}

/// Parses `unmunge` output into (uid, payload).
pub fn parse_unmunge(out: &str) -> Option<(u32, String)> {
    let mut uid = None;
    let mut payload = String::new();
    let mut in_payload = false;
    for line in out.lines() {
        if in_payload {
            payload.push_str(line);
            continue;
        }
        if let Some(v) = line.strip_prefix("UID:") {
            // "UID:              root (0)"
            uid = v
                .rsplit_once('(')
                .and_then(|(_, n)| n.trim_end_matches(')').trim().parse().ok());
        } else if line.is_empty() {
            in_payload = true;
        }
    }
    Some((uid?, payload.trim().to_string()))
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
    let (uid, payload) = decode(socket, cred).await?;
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
        assert_eq!(
            parse_unmunge(out),
            Some((0, "rebalancer-agent node=n1".into()))
        );
        assert_eq!(parse_unmunge("STATUS: Success (0)\n"), None);
    }

    fn b(from: &str, to: &str, nonce: &str) -> Binding {
        Binding {
            from: from.into(),
            to: to.into(),
            nonce: nonce.into(),
            session: None,
        }
    }

    #[test]
    fn a_credential_from_another_tls_session_is_refused() {
        let mut bound = b("n1", "n2", "abc");
        bound.session = Some("00ff".repeat(16));
        let p = bound.payload().expect("payload");
        let this = "00ff".repeat(16);
        assert_eq!(
            Binding::check_in_session(0, &p, Some("n1"), "n2", "abc", Some(&this)).expect("ok"),
            "n1"
        );
        let other = "11aa".repeat(16);
        let e = Binding::check_in_session(0, &p, Some("n1"), "n2", "abc", Some(&other))
            .expect_err("other session");
        assert!(e.to_string().contains("another TLS session"), "{e}");
        // A protocol-2 credential (no session) is refused inside TLS, and the other way round.
        let plain = b("n1", "n2", "abc").payload().expect("payload");
        let e = Binding::check_in_session(0, &plain, None, "n2", "abc", Some(&this))
            .expect_err("no session named");
        assert!(e.to_string().contains("names no TLS session"), "{e}");
        let e = Binding::check(0, &p, None, "n2", "abc").expect_err("session outside TLS");
        assert!(e.to_string().contains("this connection has none"), "{e}");
        // Named twice, or not hexadecimal: refused.
        let twice = format!("{p} tls={this}");
        assert!(Binding::check_in_session(0, &twice, None, "n2", "abc", Some(&this)).is_err());
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
