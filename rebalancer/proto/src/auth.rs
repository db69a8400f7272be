//! Connection-bound munge credentials, shared by every process that authenticates a peer.
//!
//! A bound credential's payload names its sender, its receiver and the *receiver's* fresh
//! nonce for this connection, under a domain word that says which channel it is for:
//! `DOMAIN from=A to=B nonce=N`, and inside TLS also the session's exporter value:
//! `... tls=HEX` ([`crate::tls`]). A credential captured on one connection is refused on any
//! other (another nonce), by any other receiver (another `to`), in any other TLS session
//! (another exporter: a man in the middle holds two sessions), and on another channel
//! (another domain: a controller credential never passes as an agent's, nor the reverse).
//!
//! **Downgrade protection** (as TLS 1.3's): the hellos that negotiate the version travel in
//! clear, so someone on the path could rewrite both ranges and push two current ends down to
//! an older protocol. A current server's nonce also states the range it offered
//! ([`ranged_nonce`], `HEX.vMIN-MAX`; an older peer echoes it as an opaque value), and a
//! client's credential answering such a nonce states the range the client offered
//! ([`Binding::offer`], ` offer=MIN-MAX`). Both are covered by munge: the server's range comes
//! back inside the client's credential (the nonce must be exactly the one sent), and the
//! client's inside its own. The client checks that the version the server agreed to is the
//! best of both ranges ([`check_agreed`]), the server that the client's signed range is the one
//! its hello stated ([`Expect::offer`]); a mismatch is [`AuthError::Downgrade`]. A peer of an
//! earlier release sends a plain nonce and no `offer`, and is accepted as it was; an attacker
//! cannot make a current end look old, since stripping the range from the server's nonce
//! changes the nonce the client's credential names, and a current client always answers a
//! ranged nonce with its `offer`.
//!
//! This module is pure (no I/O): [`crate::munge`] runs munge and unmunge.

use crate::error::VersionRange;

/// Domain of the controller ↔ agent TCP control channel (docs/security.md), both versions.
pub const CONTROL_DOMAIN: &str = "rebalancer-control/1";

/// Domain of the agent ↔ agent peer channel's bound credentials (peer protocols 2 and 3).
pub const PEER_DOMAIN: &str = "rebalancer-agent/2";

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
    #[error("credential is bound to another TLS session (relayed by a man in the middle?)")]
    OtherSession,
    #[error("credential names no TLS session; this connection is in TLS and requires it")]
    NoSession,
    #[error("credential names a TLS session; this connection has none")]
    UnexpectedSession,
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
    #[error("protocol downgrade: {0} (the hellos were rewritten on the way)")]
    Downgrade(String),
}

/// What a bound credential says: who sends it, who may accept it, the receiver's nonce and,
/// inside TLS, the session's exporter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub domain: &'static str,
    pub from: String,
    pub to: String,
    pub nonce: String,
    /// The TLS exporter of the session the credential travels in (hexadecimal); `None`
    /// outside TLS.
    pub session: Option<String>,
    /// The version range the sender's hello offered, stated when the receiver's nonce states
    /// one (a current peer: see the module docs); `None` towards a peer of an earlier release,
    /// whose strict parser would refuse the field.
    pub offer: Option<VersionRange>,
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
        let mut p = format!(
            "{} from={} to={} nonce={}",
            self.domain, self.from, self.to, self.nonce
        );
        if let Some(t) = &self.session {
            field("TLS session", t)?;
            if !t.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(AuthError::BadField {
                    what: "TLS session",
                    value: t.clone(),
                });
            }
            p.push_str(" tls=");
            p.push_str(t);
        }
        if let Some(r) = self.offer {
            p.push_str(&format!(" offer={}-{}", r.min, r.max));
        }
        Ok(p)
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
    /// This connection's TLS exporter value; `None` outside TLS.
    pub session: Option<&'a str>,
    /// The range the sender's hello stated, as this side received it. A credential that
    /// states its `offer` must state exactly this one; one without (a sender of an earlier
    /// release) passes, since a current sender always states it when `nonce` is ranged.
    pub offer: Option<VersionRange>,
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
        let (mut from, mut to, mut nonce, mut tls, mut offer) = (None, None, None, None, None);
        for w in words {
            match w.split_once('=') {
                Some(("from", v)) if from.is_none() => from = Some(v),
                Some(("to", v)) if to.is_none() => to = Some(v),
                Some(("nonce", v)) if nonce.is_none() => nonce = Some(v),
                Some(("tls", v)) if tls.is_none() => tls = Some(v),
                Some(("offer", v)) if offer.is_none() => {
                    offer = Some(
                        parse_range(v).ok_or_else(|| AuthError::Malformed(payload.to_string()))?,
                    )
                }
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
            // The same random part with another (or no) range: the sender saw our hello with
            // its range rewritten.
            if nonce_base(n) == nonce_base(self.nonce) {
                return Err(AuthError::Downgrade(format!(
                    "the peer received this side's nonce as {n:?}, it was sent as {:?}",
                    self.nonce
                )));
            }
            return Err(AuthError::OtherConnection);
        }
        match (offer, self.offer) {
            (None, _) => {}
            (Some(got), Some(want)) if got == want => {}
            (Some(got), Some(want)) => {
                return Err(AuthError::Downgrade(format!(
                    "the peer offered {got}, its hello arrived stating {want}"
                )))
            }
            (Some(_), None) => return Err(AuthError::Malformed(payload.to_string())),
        }
        match (tls, self.session) {
            (Some(got), Some(want)) if got == want => {}
            (None, None) => {}
            (Some(_), Some(_)) => return Err(AuthError::OtherSession),
            (None, Some(_)) => return Err(AuthError::NoSession),
            (Some(_), None) => return Err(AuthError::UnexpectedSession),
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

/// A fresh nonce that also states the range this side offered: `HEX.vMIN-MAX` (module docs).
pub fn ranged_nonce(offered: VersionRange) -> String {
    format!("{}.v{}-{}", nonce(), offered.min, offered.max)
}

fn nonce_base(n: &str) -> &str {
    n.split_once(".v").map_or(n, |(base, _)| base)
}

fn parse_range(v: &str) -> Option<VersionRange> {
    let (lo, hi) = v.split_once('-')?;
    let (lo, hi) = (lo.parse().ok()?, hi.parse().ok()?);
    (lo <= hi).then_some(VersionRange::new(lo, hi))
}

/// The range a nonce states: `None` for a plain nonce (a peer of an earlier release); a
/// malformed range is refused.
pub fn nonce_range(n: &str) -> Result<Option<VersionRange>, AuthError> {
    match n.split_once(".v") {
        None => Ok(None),
        Some((_, r)) => parse_range(r)
            .map(Some)
            .ok_or_else(|| AuthError::Malformed(format!("nonce {n:?}"))),
    }
}

/// The client's check of the server's hello: the version it agreed to (`agreed`) must be the
/// highest that both this side's range (`ours`, as sent) and the range the server's nonce
/// states have in common. A plain nonce (or none: peer protocol 1) is a peer of an earlier
/// release, which agreed by its own range.
pub fn check_agreed(
    ours: VersionRange,
    agreed: u16,
    server_nonce: Option<&str>,
) -> Result<(), AuthError> {
    let Some(theirs) = server_nonce.map(nonce_range).transpose()?.flatten() else {
        return Ok(());
    };
    match ours.highest_common(&theirs) {
        Some(best) if best == agreed => Ok(()),
        best => Err(AuthError::Downgrade(format!(
            "the peer offers {theirs} and this side {ours}, but version {agreed} was agreed{}",
            best.map_or(String::new(), |b| format!(" instead of {b}"))
        ))),
    }
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
            session: None,
            offer: None,
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
            session: None,
            offer: None,
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
    fn a_credential_is_valid_in_its_own_tls_session_only() {
        let this = "00ff".repeat(16);
        let other = "11aa".repeat(16);
        let inside = Binding {
            domain: CONTROL_DOMAIN,
            from: "admin".into(),
            to: "node1".into(),
            nonce: "n-server".into(),
            session: Some(this.clone()),
            offer: None,
        }
        .payload()
        .expect("payload");
        assert!(inside.ends_with(&format!(" tls={this}")), "{inside}");
        let mut e = expect(&[0], Some("admin"), "node1");
        e.session = Some(&this);
        assert_eq!(e.check(0, &inside).expect("same session"), "admin");
        e.session = Some(&other);
        assert_eq!(e.check(0, &inside), Err(AuthError::OtherSession));
        // A credential made outside TLS does not pass inside, nor the reverse.
        e.session = Some(&this);
        let outside = bind("admin", "node1", "n-server");
        assert_eq!(e.check(0, &outside), Err(AuthError::NoSession));
        e.session = None;
        assert_eq!(e.check(0, &inside), Err(AuthError::UnexpectedSession));
        // Named twice: malformed.
        e.session = Some(&this);
        let twice = format!("{inside} tls={this}");
        assert!(matches!(e.check(0, &twice), Err(AuthError::Malformed(_))));
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
            session: None,
            offer: None,
        };
        assert!(b("a to=node9", "x").payload().is_err());
        let mut s = b("a", "x");
        s.session = Some("00ff tls=11".into());
        assert!(s.payload().is_err(), "a session value with a space");
        s.session = Some("not-hex".into());
        assert!(
            s.payload().is_err(),
            "a session value that is not hexadecimal"
        );
        assert!(b("", "x").payload().is_err());
        assert!(b("a", "x\ny").payload().is_err());
        assert_ne!(nonce(), nonce());
        assert_eq!(nonce().len(), 32);
    }

    #[test]
    fn a_rewritten_range_is_a_downgrade_on_either_side() {
        let (cur, old) = (VersionRange::new(1, 2), VersionRange::new(1, 1));
        let server_nonce = ranged_nonce(cur);
        assert_eq!(nonce_range(&server_nonce), Ok(Some(cur)));
        assert_eq!(nonce_range("00ff"), Ok(None));
        assert!(nonce_range("00ff.v2").is_err());
        assert!(nonce_range("00ff.v3-1").is_err());
        // The client: a server whose nonce offers 1..=2 agreed to 1 with a client offering
        // 1..=2: its hello was rewritten, or ours was.
        assert_eq!(check_agreed(cur, 2, Some(&server_nonce)), Ok(()));
        assert!(matches!(
            check_agreed(cur, 1, Some(&server_nonce)),
            Err(AuthError::Downgrade(m)) if m.contains("instead of 2")
        ));
        // An old server (plain nonce, or none) agreed by its own range.
        assert_eq!(check_agreed(cur, 1, Some("00ff")), Ok(()));
        assert_eq!(check_agreed(cur, 1, None), Ok(()));
        // The server: the client's credential states the range it sent.
        let cred = |offer, nonce: &str| {
            Binding {
                domain: CONTROL_DOMAIN,
                from: "admin".into(),
                to: "node1".into(),
                nonce: nonce.into(),
                session: None,
                offer,
            }
            .payload()
            .expect("payload")
        };
        let mut e = expect(&[0], None, "node1");
        e.nonce = &server_nonce;
        e.offer = Some(cur);
        assert_eq!(
            e.check(0, &cred(Some(cur), &server_nonce))
                .expect("as sent"),
            "admin"
        );
        // The client's hello arrived stating 1..=1.
        e.offer = Some(old);
        assert!(matches!(
            e.check(0, &cred(Some(cur), &server_nonce)),
            Err(AuthError::Downgrade(m)) if m.contains("1..=2")
        ));
        // A client of an earlier release states nothing and passes.
        assert_eq!(
            e.check(0, &cred(None, &server_nonce)).expect("old"),
            "admin"
        );
        // Our nonce reached the client stripped of its range (we were made to look old), or
        // with another range.
        let base = server_nonce.split_once(".v").expect("ranged").0.to_string();
        for seen in [base.clone(), format!("{base}.v1-1")] {
            assert!(matches!(
                e.check(0, &cred(None, &seen)),
                Err(AuthError::Downgrade(_))
            ));
        }
        // An unrelated nonce is still another connection.
        assert_eq!(
            e.check(0, &cred(None, "1234")),
            Err(AuthError::OtherConnection)
        );
        // An offer the receiver does not expect, or a malformed one, is malformed.
        e.offer = None;
        assert!(matches!(
            e.check(0, &cred(Some(cur), &server_nonce)),
            Err(AuthError::Malformed(_))
        ));
        let bad = format!("{} offer=2", cred(None, &server_nonce));
        e.offer = Some(cur);
        assert!(matches!(e.check(0, &bad), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn unmunge_output_parses() {
        let out = "STATUS:          Success (0)\nUID:             slurm (64030)\nGID:             slurm (64030)\nLENGTH:          5\n\nhello\n";
        assert_eq!(parse_unmunge(out), Some((64030, "hello".into())));
        assert_eq!(parse_unmunge("STATUS: Success (0)\n"), None);
    }
}
