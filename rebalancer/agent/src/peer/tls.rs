//! Peer protocol 3: TLS 1.3 on the agent ↔ agent connection, after the `Hello`s.
//!
//! Each agent has one self-signed certificate (made at first use, in memory only). Neither side
//! trusts a certificate by itself: the connection is authenticated by munge inside it. Each
//! side's bound credential ([`crate::auth::Binding`]) names this TLS session's exporter value
//! (RFC 5705 / RFC 8446 7.5, [`EXPORTER_LABEL`]), which both ends compute and no third party
//! can: a credential taken from one session is refused in any other, so a man in the middle
//! that terminates TLS on both sides holds two sessions and neither side's credential fits the
//! other. The certificate only gives the handshake a key; its signature over the handshake is
//! still checked, so the exporter belongs to whoever holds that key.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::AgentError;

/// Label of the exporter value every bound credential of protocol 3 names.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-slurm-rebalancer-peer-v3";

/// Length of the exporter value (bytes; hexadecimal in the credential).
pub const EXPORTER_LEN: usize = 32;

/// The name the client asks for; certificates are not checked against it (see the module docs).
const SERVER_NAME: &str = "rebalancer-peer";

/// A peer connection's stream: as accepted or connected (protocols 1 and 2), or inside TLS.
pub enum PeerStream<S> {
    Plain(S),
    Tls(Box<tokio_rustls::TlsStream<S>>),
}

impl<S> PeerStream<S> {
    pub fn is_encrypted(&self) -> bool {
        matches!(self, PeerStream::Tls(_))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PeerStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            // A peer that closes without TLS's close_notify ends the stream like a plain close:
            // frames delimit themselves, and the decoder reports a cut inside one as truncated.
            PeerStream::Tls(s) => match Pin::new(s.as_mut()).poll_read(cx, buf) {
                Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(()))
                }
                other => other,
            },
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PeerStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn tls_error(what: &str) -> impl Fn(rustls::Error) -> AgentError + '_ {
    move |e| AgentError::Internal(format!("{what}: {e}"))
}

// ring, as rcgen here; rustls deprecates it for lacking post-quantum key exchange, which
// aws-lc-rs (a C and cmake build) would bring.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This agent's key and self-signed certificate, made once.
struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn identity() -> Result<&'static Identity, AgentError> {
    static ID: OnceLock<Identity> = OnceLock::new();
    if let Some(id) = ID.get() {
        return Ok(id);
    }
    let fail = |e: rcgen::Error| AgentError::Internal(format!("cannot make the peer TLS key: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    let id = Identity {
        cert: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    };
    // Two first uses at once: one identity wins, the other is dropped.
    Ok(ID.get_or_init(|| id))
}

/// Accepts the server's certificate whatever it is, but checks its signature over the
/// handshake: the exporter is then shared with the holder of that key only, and munge says who
/// that is.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Result<Arc<rustls::ClientConfig>, AgentError> {
    static CFG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if let Some(c) = CFG.get() {
        return Ok(c.clone());
    }
    let p = provider();
    let cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error("peer TLS client configuration"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(p)))
        .with_no_client_auth();
    Ok(CFG.get_or_init(|| Arc::new(cfg)).clone())
}

fn server_config() -> Result<Arc<rustls::ServerConfig>, AgentError> {
    static CFG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    if let Some(c) = CFG.get() {
        return Ok(c.clone());
    }
    let id = identity()?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error("peer TLS server configuration"))?
        .with_no_client_auth()
        .with_single_cert(
            vec![id.cert.clone()],
            PrivateKeyDer::Pkcs8(id.key.clone_key()),
        )
        .map_err(tls_error("peer TLS certificate"))?;
    Ok(CFG.get_or_init(|| Arc::new(cfg)).clone())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The exporter value of an established session, hexadecimal.
fn export<D>(conn: &rustls::ConnectionCommon<D>) -> Result<String, AgentError> {
    let v = conn
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .map_err(tls_error("TLS exporter"))?;
    Ok(hex(&v))
}

/// Client side of the upgrade, within `timeout`: the TLS stream and the session's exporter.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    timeout: Duration,
) -> Result<(PeerStream<S>, String), AgentError> {
    let name = ServerName::try_from(SERVER_NAME)
        .map_err(|e| AgentError::Internal(format!("TLS server name: {e}")))?;
    let c = tokio_rustls::TlsConnector::from(client_config()?);
    let tls = tokio::time::timeout(timeout, c.connect(name, s))
        .await
        .map_err(|_| {
            AgentError::Timeout(format!(
                "the TLS handshake with the peer did not finish within {} ms",
                timeout.as_millis()
            ))
        })?
        .map_err(|e| AgentError::Peer(format!("TLS handshake with the peer failed: {e}")))?;
    let e = export(tls.get_ref().1)?;
    Ok((PeerStream::Tls(Box::new(tls.into())), e))
}

/// Server side of the upgrade; see [`connect`].
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    timeout: Duration,
) -> Result<(PeerStream<S>, String), AgentError> {
    let a = tokio_rustls::TlsAcceptor::from(server_config()?);
    let tls = tokio::time::timeout(timeout, a.accept(s))
        .await
        .map_err(|_| {
            AgentError::Timeout(format!(
                "the TLS handshake with the peer did not finish within {} ms",
                timeout.as_millis()
            ))
        })?
        .map_err(|e| AgentError::Peer(format!("TLS handshake with the peer failed: {e}")))?;
    let e = export(tls.get_ref().1)?;
    Ok((PeerStream::Tls(Box::new(tls.into())), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn session() -> (
        (PeerStream<tokio::io::DuplexStream>, String),
        (PeerStream<tokio::io::DuplexStream>, String),
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let t = Duration::from_secs(5);
        let srv = tokio::spawn(accept(b, t));
        let c = connect(a, t).await.expect("client");
        (c, srv.await.expect("task").expect("server"))
    }

    #[tokio::test]
    async fn both_ends_share_an_exporter_that_differs_per_session() {
        let ((mut c, ce), (mut s, se)) = session().await;
        assert_eq!(ce, se);
        assert_eq!(ce.len(), 2 * EXPORTER_LEN);
        assert!(c.is_encrypted() && s.is_encrypted());
        c.write_all(b"hello through tls").await.expect("write");
        c.flush().await.expect("flush");
        let mut buf = [0u8; 17];
        s.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello through tls");
        let ((_, other), _) = session().await;
        assert_ne!(ce, other, "two sessions must not share an exporter");
    }

    #[tokio::test]
    async fn a_close_without_close_notify_reads_as_the_end_of_the_stream() {
        let ((c, _), (mut s, _)) = session().await;
        let PeerStream::Tls(tls) = c else {
            panic!("not in TLS")
        };
        // Drop the TCP side under TLS without sending close_notify.
        let tokio_rustls::TlsStream::Client(client) = *tls else {
            panic!("the connecting side is a client")
        };
        let (raw, _) = client.into_inner();
        drop(raw);
        let mut buf = Vec::new();
        assert_eq!(s.read_to_end(&mut buf).await.expect("clean end"), 0);
    }
}
