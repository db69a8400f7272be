//! Connection-bound munge credentials, shared by every process that authenticates a peer.
//!
//! A bound credential's payload names its sender, its receiver and the *receiver's* fresh
//! nonce for this connection, under a domain word that says which channel it is for:
//! `DOMAIN from=A to=B nonce=N`. A credential captured on one connection is refused on any
//! other (another nonce), by any other receiver (another `to`), and on another channel
//! (another domain: a controller credential never passes as an agent's, nor the reverse).
//!
//! This module is pure (no I/O): [`crate::munge`] runs munge and unmunge.

/// Domain of the controller ↔ agent TCP control channel (docs/security.md).
pub const CONTROL_DOMAIN: &str = "rebalancer-control/1";

/// Longest munge credential accepted (a payload of a few hundred bytes encodes to well under
/// 1 KiB).
pub const MAX_CREDENTIAL_LEN: usize = 4096;

/// Why a credential was refused, or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("invalid {what} {value:?} for a credential (1-256 characters, no spaces)")]
    BadField { what: &'static str, value: String },
    #[error("the peer sent no munge credential")]
    Missing,
    #[error("munge credential of {len} bytes exceeds the limit of {MAX_CREDENTIAL_LEN}")]
    TooLong { len: usize },
    #[error("credential of uid {uid}, which may not act here (allowed: {allowed})")]
    Uid { uid: u32, allowed: String },
    #[error("credential is not a {want} credential")]
    Domain { want: &'static str },
    #[error("malformed credential payload {0:?}")]
    Malformed(String),
    #[error("credential is for {to}, this is {me} (replayed?)")]
    OtherReceiver { to: String, me: String },
    #[error("credential is bound to another connection (replayed?)")]
    OtherConnection,
    #[error("credential is from {from}, expected {want}")]
    OtherSender { from: String, want: String },
    #[error("unreadable unmunge output")]
    Unreadable,
    #[error("munge refused the credential: {0}")]
    Invalid(String),
    #[error("munge failed: {0}")]
    Munge(String),
    #[error("{0} credential checks are already running; try again")]
    Busy(usize),
    #[error("{program} did not answer within {ms} ms")]
    Timeout { program: &'static str, ms: u128 },
}

/// What a bound credential says: who sends it, who may accept it, and the receiver's nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub domain: &'static str,
    pub from: String,
    pub to: String,
    pub nonce: String,
}

fn field(what: &'static str, v: &str) -> Result<(), AuthError> {
    if v.is_empty() || v.len() > 256 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AuthError::BadField {
            what,
            value: v.to_string(),
        });
    }
    Ok(())
}

impl Binding {
    /// The credential's payload; refuses names that could forge a field.
    pub fn payload(&self) -> Result<String, AuthError> {
        field("sender", &self.from)?;
        field("receiver", &self.to)?;
        field("nonce", &self.nonce)?;
        Ok(format!(
            "{} from={} to={} nonce={}",
            self.domain, self.from, self.to, self.nonce
        ))
    }
}

/// What a receiver expects of a decoded credential on this connection.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub domain: &'static str,
    /// Uids whose credentials are accepted.
    pub uids: &'a [u32],
    /// The sender this side meant to reach; `None`: any (the name is learnt from it).
    pub from: Option<&'a str>,
    /// This side's name.
    pub to: &'a str,
    /// The nonce this side sent on this connection.
    pub nonce: &'a str,
}

impl Expect<'_> {
    /// Checks a decoded credential (`uid`, `payload`); returns the sender it names.
    pub fn check(&self, uid: u32, payload: &str) -> Result<String, AuthError> {
        if !self.uids.contains(&uid) {
            let allowed = self
                .uids
                .iter()
                .map(|u| u.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(AuthError::Uid { uid, allowed });
        }
        let mut words = payload.split(' ');
        if words.next() != Some(self.domain) {
            return Err(AuthError::Domain { want: self.domain });
        }
        let (mut from, mut to, mut nonce) = (None, None, None);
        for w in words {
            match w.split_once('=') {
                Some(("from", v)) if from.is_none() => from = Some(v),
                Some(("to", v)) if to.is_none() => to = Some(v),
                Some(("nonce", v)) if nonce.is_none() => nonce = Some(v),
                _ => return Err(AuthError::Malformed(payload.to_string())),
            }
        }
        let (Some(f), Some(t), Some(n)) = (from, to, nonce) else {
            return Err(AuthError::Malformed(payload.to_string()));
        };
        if t != self.to {
            return Err(AuthError::OtherReceiver {
                to: t.to_string(),
                me: self.to.to_string(),
            });
        }
        if n != self.nonce {
            return Err(AuthError::OtherConnection);
        }
        if let Some(want) = self.from {
            if f != want {
                return Err(AuthError::OtherSender {
                    from: f.to_string(),
                    want: want.to_string(),
                });
            }
        }
        Ok(f.to_string())
    }
}

/// A fresh nonce for one connection: 128 random bits, hexadecimal.
pub fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(from: &str, to: &str, nonce: &str) -> String {
        Binding {
            domain: CONTROL_DOMAIN,
            from: from.into(),
            to: to.into(),
            nonce: nonce.into(),
        }
        .payload()
        .expect("payload")
    }

    fn expect<'a>(uids: &'a [u32], from: Option<&'a str>, to: &'a str) -> Expect<'a> {
        Expect {
            domain: CONTROL_DOMAIN,
            uids,
            from,
            to,
            nonce: "n-server",
        }
    }

    #[test]
    fn a_control_credential_passes_only_for_its_receiver_connection_and_uids() {
        let p = bind("admin", "node1", "n-server");
        assert_eq!(
            expect(&[0], None, "node1").check(0, &p).expect("ok"),
            "admin"
        );
        // The SlurmUser, when the agent allows it.
        assert_eq!(
            expect(&[0, 64030], Some("admin"), "node1")
                .check(64030, &p)
                .expect("slurm user"),
            "admin"
        );
        assert_eq!(
            expect(&[0], None, "node2").check(0, &p),
            Err(AuthError::OtherReceiver {
                to: "node1".into(),
                me: "node2".into()
            })
        );
        let mut other = expect(&[0], None, "node1");
        other.nonce = "n-later";
        assert_eq!(other.check(0, &p), Err(AuthError::OtherConnection));
        assert_eq!(
            expect(&[0], None, "node1").check(1000, &p),
            Err(AuthError::Uid {
                uid: 1000,
                allowed: "0".into()
            })
        );
        assert_eq!(
            expect(&[0], Some("node9"), "node1").check(0, &p),
            Err(AuthError::OtherSender {
                from: "admin".into(),
                want: "node9".into()
            })
        );
    }

    #[test]
    fn other_domains_and_malformed_payloads_are_refused() {
        let e = expect(&[0], None, "node1");
        for bad in [
            "rebalancer-agent/2 from=n1 to=node1 nonce=n-server",
            "rebalancer-agent node=n1",
            "rebalancer-control/1 from=a to=node1 nonce=n-server to=node2",
            "rebalancer-control/1 from=a to=node1 nonce=n-server x=1",
            "rebalancer-control/1 from=a to=node1",
            "",
        ] {
            assert!(e.check(0, bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            e.check(0, "rebalancer-agent/2 from=n1 to=node1 nonce=n-server"),
            Err(AuthError::Domain { .. })
        ));
    }

    #[test]
    fn names_that_could_forge_fields_make_no_payload() {
        let b = |from: &str, nonce: &str| Binding {
            domain: CONTROL_DOMAIN,
            from: from.into(),
            to: "node1".into(),
            nonce: nonce.into(),
        };
        assert!(b("a to=node9", "x").payload().is_err());
        assert!(b("", "x").payload().is_err());
        assert!(b("a", "x\ny").payload().is_err());
        assert_ne!(nonce(), nonce());
        assert_eq!(nonce().len(), 32);
    }

    #[test]
    fn unmunge_output_parses() {
        let out = "STATUS:          Success (0)\nUID:             slurm (64030)\nGID:             slurm (64030)\nLENGTH:          5\n\nhello\n";
        assert_eq!(parse_unmunge(out), Some((64030, "hello".into())));
        assert_eq!(parse_unmunge("STATUS: Success (0)\n"), None);
    }
}
