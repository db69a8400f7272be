//! Encrypted page transfer (CRIU's `--tls`) without a site PKI.
//!
//! Each side of a migration makes a fresh key pair and a self-signed certificate for that
//! migration only. The source sends its certificate in Prepare, the destination answers with
//! its own, both over the munge-authenticated agent connection, and each CRIU process trusts
//! exactly the other side's certificate (`--tls-cacert`). CRIU's TLS is mutual: the page
//! server requires a client certificate. So a process on the node network that connects to a
//! page server or lazy-pages port first can neither read nor inject pages: it has neither key.
//! The CN is not checked (`--tls-no-cn-verify`): pinning the exact certificate is stronger than
//! a name, and the container network has no names.
//!
//! The keys live in the migration's run directory (tmpfs, 0700) and go with it.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use crate::error::AgentError;

/// Longest certificate accepted from a peer (an ECDSA P-256 one is about 600 bytes).
pub const MAX_CERT_PEM: usize = 8 * 1024;

/// One side's key pair and certificate for one migration.
pub struct Identity {
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh ECDSA P-256 key and a self-signed certificate valid for a day.
    pub fn generate(node: &str, migration: &str) -> Result<Identity, AgentError> {
        let fail = |e: rcgen::Error| AgentError::Internal(format!("cannot make a TLS key: {e}"));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("rebalancer {node} {migration}"),
        );
        // gnutls accepts a trust anchor only as a CA certificate.
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyCertSign,
        ];
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(300)).into();
        params.not_after = (now + std::time::Duration::from_secs(86_400)).into();
        let cert = params.self_signed(&key).map_err(fail)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Checks the shape of a certificate a peer sent before it is written anywhere: bounded, one
/// PEM certificate block, base64 inside. gnutls parses it for real. Pure.
pub fn check_peer_cert(pem: &str) -> Result<(), AgentError> {
    let bad = |why: &str| {
        Err(AgentError::BadRequest(format!(
            "peer TLS certificate: {why}"
        )))
    };
    if pem.len() > MAX_CERT_PEM {
        return bad("too long");
    }
    let body = pem
        .trim()
        .strip_prefix("-----BEGIN CERTIFICATE-----")
        .and_then(|r| r.strip_suffix("-----END CERTIFICATE-----"));
    let Some(body) = body else {
        return bad("not one PEM certificate");
    };
    if body.trim().is_empty()
        || !body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '\n' | '\r'))
    {
        return bad("not base64");
    }
    Ok(())
}

/// CRIU's options for a TLS transfer whose files are in `dir` (see [`write_files`]). Pure.
pub fn criu_options(dir: &Path) -> Vec<String> {
    let f = |n: &str| dir.join(n).display().to_string();
    vec![
        "--tls".into(),
        "--tls-cert".into(),
        f("cert.pem"),
        "--tls-key".into(),
        f("key.pem"),
        "--tls-cacert".into(),
        f("peer.pem"),
        "--tls-no-cn-verify".into(),
    ]
}

/// Writes `mine` and the peer's certificate into `dir` (created 0700, files 0600) and returns
/// CRIU's options. `trust_self`: CRIU also accepts this side's own certificate (the source's
/// lazy page server, which the agent ends with a handshake of its own on rollback).
pub fn write_files(
    dir: &Path,
    mine: &Identity,
    peer_pem: &str,
    trust_self: bool,
) -> Result<Vec<String>, AgentError> {
    check_peer_cert(peer_pem)?;
    let trusted = if trust_self {
        format!("{}\n{}", peer_pem.trim_end(), mine.cert_pem)
    } else {
        peer_pem.to_string()
    };
    let io = |what: String| move |source| AgentError::Io { what, source };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("mkdir {}", dir.display())))?;
    for (name, text) in [
        ("cert.pem", mine.cert_pem.as_str()),
        ("key.pem", mine.key_pem.as_str()),
        ("peer.pem", trusted.as_str()),
    ] {
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(io(format!("write {}", p.display())))?;
    }
    Ok(criu_options(dir))
}

/// Whether this side will encrypt: it must if it wants to, and it does whenever the peer asks.
/// `Err` names the fix when the peer cannot. Pure.
pub fn agree(want: bool, peer_sent_cert: bool, peer: &str) -> Result<bool, AgentError> {
    match (want, peer_sent_cert) {
        (_, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(AgentError::Unsupported(format!(
            "{peer} does not encrypt page transfers (an agent before encryption, or \
             encrypt_memory = false there); set encrypt_memory = false on both nodes to \
             migrate unencrypted"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_fresh_pem_certificates_that_pass_the_peer_check() {
        let a = Identity::generate("n1", "m1").expect("generate");
        let b = Identity::generate("n1", "m1").expect("generate");
        assert_ne!(a.cert_pem, b.cert_pem);
        check_peer_cert(&a.cert_pem).expect("own certificate is well formed");
        assert!(a.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn peer_certificates_are_bounded_and_shaped() {
        assert!(check_peer_cert("").is_err());
        assert!(check_peer_cert("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----").is_err());
        let long = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----",
            "A".repeat(MAX_CERT_PEM)
        );
        assert!(check_peer_cert(&long).is_err());
        let two = "-----BEGIN CERTIFICATE-----\nQQ==\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nQQ==\n-----END CERTIFICATE-----";
        assert!(check_peer_cert(two).is_err());
        let key = "-----BEGIN PRIVATE KEY-----\nQQ==\n-----END PRIVATE KEY-----";
        assert!(check_peer_cert(key).is_err());
    }

    #[test]
    fn files_are_private_and_named_in_criu_options() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rb-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mine = Identity::generate("n1", "m1").expect("generate");
        let peer = Identity::generate("n2", "m1").expect("generate");
        let opts = write_files(&dir.join("tls"), &mine, &peer.cert_pem, false).expect("write");
        let t = dir.join("tls");
        assert_eq!(opts, criu_options(&t));
        assert!(opts.contains(&"--tls-no-cn-verify".to_string()));
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&t), 0o700);
        assert_eq!(mode(&t.join("key.pem")), 0o600);
        assert_eq!(
            std::fs::read_to_string(t.join("peer.pem")).expect("read"),
            peer.cert_pem
        );
        assert!(write_files(&t, &mine, "junk", false).is_err());
        write_files(&t, &mine, &peer.cert_pem, true).expect("write");
        let both = std::fs::read_to_string(t.join("peer.pem")).expect("read");
        assert!(both.contains(peer.cert_pem.trim()) && both.contains(mine.cert_pem.trim()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn encryption_is_agreed_or_refused_with_the_fix() {
        assert!(agree(true, true, "n2").expect("both"));
        assert!(agree(false, true, "n2").expect("the peer asks"));
        assert!(!agree(false, false, "n2").expect("neither"));
        let e = agree(true, false, "n2").expect_err("peer cannot");
        assert!(e.to_string().contains("encrypt_memory = false"), "{e}");
    }
}
