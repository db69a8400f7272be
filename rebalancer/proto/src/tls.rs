//! TLS 1.3 after the hellos, for both TCP channels of the agent: agent ↔ agent (peer protocol 3)
//! and controller ↔ agent (TCP control protocol 2, [`crate::messages::CONTROL_TCP_VERSIONS`]).
//!
//! Each process has one self-signed certificate (made at first use, in memory only). Neither
//! side trusts a certificate by itself: the connection is authenticated by munge inside it.
//! Each side's bound credential ([`crate::auth::Binding::session`]) names this TLS session's
//! exporter value (RFC 5705 / RFC 8446 7.5, under the channel's own label, [`Purpose`]), which
//! both ends compute and no third party can: a credential taken from one session is refused in
//! any other, so a man in the middle that terminates TLS on both sides holds two sessions and
//! neither side's credential fits the other. The certificate only gives the handshake a key;
//! its signature over the handshake is still checked, so the exporter belongs to whoever holds
//! that key.
//!
//! [`upgrade`] moves a channel whose hellos were exchanged in clear onto TLS, keeping its state
//! (negotiated version, request ids, limits).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::channel::AsyncChannel;

/// Length of the exporter value (bytes; hexadecimal in credentials).
pub const EXPORTER_LEN: usize = 32;

/// Which channel a TLS session serves: its exporter label (so that an exporter value of one
/// channel never passes on the other), the name the client asks for (not checked, see the
/// module docs), and what each end calls the other in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purpose {
    pub label: &'static [u8],
    pub server_name: &'static str,
    /// The server, in the client's errors.
    pub server: &'static str,
    /// The client, in the server's errors.
    pub client: &'static str,
}

/// Agent ↔ agent, peer protocol 3.
pub const PEER: Purpose = Purpose {
    label: b"EXPORTER-slurm-rebalancer-peer-v3",
    server_name: "rebalancer-peer",
    server: "peer",
    client: "peer",
};

/// Controller → agent's TCP control port, control protocol 2.
pub const CONTROL: Purpose = Purpose {
    label: b"EXPORTER-slurm-rebalancer-control-v2",
    server_name: "rebalancer-control",
    server: "agent",
    client: "controller",
};

/// Why a TLS session could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("cannot set up TLS: {0}")]
    Setup(String),
    #[error("the TLS handshake with the {with} did not finish within {ms} ms")]
    Timeout { with: &'static str, ms: u128 },
    #[error("TLS handshake with the {with} failed: {reason}")]
    Handshake { with: &'static str, reason: String },
}

/// A connection's stream: as accepted or connected (the versions in clear), or inside TLS.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<tokio_rustls::TlsStream<S>>),
}

impl<S> MaybeTls<S> {
    pub fn is_encrypted(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            // A peer that closes without TLS's close_notify ends the stream like a plain close:
            // frames delimit themselves, and the decoder reports a cut inside one as truncated.
            MaybeTls::Tls(s) => match Pin::new(s.as_mut()).poll_read(cx, buf) {
                Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(()))
                }
                other => other,
            },
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn setup(what: &str) -> impl Fn(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Setup(format!("{what}: {e}"))
}

// ring, as rcgen here; rustls deprecates it for lacking post-quantum key exchange, which
// aws-lc-rs (a C and cmake build) would bring.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This process's key and self-signed certificate, made once.
struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn identity() -> Result<&'static Identity, TlsError> {
    static ID: OnceLock<Identity> = OnceLock::new();
    if let Some(id) = ID.get() {
        return Ok(id);
    }
    let fail = |e: rcgen::Error| TlsError::Setup(format!("cannot make the TLS key: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let names = vec![
        PEER.server_name.to_string(),
        CONTROL.server_name.to_string(),
    ];
    let params = rcgen::CertificateParams::new(names).map_err(fail)?;
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

fn client_config() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    static CFG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if let Some(c) = CFG.get() {
        return Ok(c.clone());
    }
    let p = provider();
    let cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup("TLS client configuration"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(p)))
        .with_no_client_auth();
    Ok(CFG.get_or_init(|| Arc::new(cfg)).clone())
}

fn server_config() -> Result<Arc<rustls::ServerConfig>, TlsError> {
    static CFG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    if let Some(c) = CFG.get() {
        return Ok(c.clone());
    }
    let id = identity()?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup("TLS server configuration"))?
        .with_no_client_auth()
        .with_single_cert(
            vec![id.cert.clone()],
            PrivateKeyDer::Pkcs8(id.key.clone_key()),
        )
        .map_err(setup("TLS certificate"))?;
    Ok(CFG.get_or_init(|| Arc::new(cfg)).clone())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The exporter value of an established session under `label`, hexadecimal.
fn export<D>(conn: &rustls::ConnectionCommon<D>, label: &[u8]) -> Result<String, TlsError> {
    let v = conn
        .export_keying_material([0u8; EXPORTER_LEN], label, None)
        .map_err(setup("TLS exporter"))?;
    Ok(hex(&v))
}

fn timed_out(with: &'static str, timeout: Duration) -> TlsError {
    TlsError::Timeout {
        with,
        ms: timeout.as_millis(),
    }
}

fn failed(with: &'static str) -> impl Fn(std::io::Error) -> TlsError {
    move |e| TlsError::Handshake {
        with,
        reason: e.to_string(),
    }
}

/// Client side of the handshake, within `timeout`: the TLS stream and the session's exporter.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    timeout: Duration,
    purpose: Purpose,
) -> Result<(MaybeTls<S>, String), TlsError> {
    let name = ServerName::try_from(purpose.server_name)
        .map_err(|e| TlsError::Setup(format!("TLS server name: {e}")))?;
    let c = tokio_rustls::TlsConnector::from(client_config()?);
    let tls = tokio::time::timeout(timeout, c.connect(name, s))
        .await
        .map_err(|_| timed_out(purpose.server, timeout))?
        .map_err(failed(purpose.server))?;
    let e = export(tls.get_ref().1, purpose.label)?;
    Ok((MaybeTls::Tls(Box::new(tls.into())), e))
}

/// Server side of the handshake; see [`connect`].
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    timeout: Duration,
    purpose: Purpose,
) -> Result<(MaybeTls<S>, String), TlsError> {
    let a = tokio_rustls::TlsAcceptor::from(server_config()?);
    let tls = tokio::time::timeout(timeout, a.accept(s))
        .await
        .map_err(|_| timed_out(purpose.client, timeout))?
        .map_err(failed(purpose.client))?;
    let e = export(tls.get_ref().1, purpose.label)?;
    Ok((MaybeTls::Tls(Box::new(tls.into())), e))
}

/// Which end of the handshake this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// Moves a channel whose hellos were exchanged in clear onto TLS (refused mid-frame): the same
/// channel state on the TLS stream, and the session's exporter.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    ch: AsyncChannel<S>,
    side: Side,
    timeout: Duration,
    purpose: Purpose,
) -> Result<(AsyncChannel<MaybeTls<S>>, String), TlsError> {
    let (raw, core) = ch
        .into_parts()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let (s, exporter) = match side {
        Side::Client => connect(raw, timeout, purpose).await?,
        Side::Server => accept(raw, timeout, purpose).await?,
    };
    Ok((AsyncChannel::from_parts(s, core), exporter))
}

/// The channel as it is, in clear (an older version, or a local socket), with the stream type
/// of an upgraded one.
pub fn plain<S: AsyncRead + AsyncWrite + Unpin>(
    ch: AsyncChannel<S>,
) -> Result<AsyncChannel<MaybeTls<S>>, TlsError> {
    let (raw, core) = ch
        .into_parts()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok(AsyncChannel::from_parts(MaybeTls::Plain(raw), core))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Ends = (
        (MaybeTls<tokio::io::DuplexStream>, String),
        (MaybeTls<tokio::io::DuplexStream>, String),
    );

    async fn session(purpose: Purpose) -> Ends {
        let (a, b) = tokio::io::duplex(1 << 16);
        let t = Duration::from_secs(5);
        let srv = tokio::spawn(accept(b, t, purpose));
        let c = connect(a, t, purpose).await.expect("client");
        (c, srv.await.expect("task").expect("server"))
    }

    #[tokio::test]
    async fn both_ends_share_an_exporter_that_differs_per_session() {
        let ((mut c, ce), (mut s, se)) = session(PEER).await;
        assert_eq!(ce, se);
        assert_eq!(ce.len(), 2 * EXPORTER_LEN);
        assert!(c.is_encrypted() && s.is_encrypted());
        c.write_all(b"hello through tls").await.expect("write");
        c.flush().await.expect("flush");
        let mut buf = [0u8; 17];
        s.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello through tls");
        let ((_, other), _) = session(PEER).await;
        assert_ne!(ce, other, "two sessions must not share an exporter");
    }

    #[tokio::test]
    async fn the_two_channels_export_under_their_own_labels() {
        // One session, both labels: a peer session's value never passes as a control one.
        let ((c, _), _) = session(CONTROL).await;
        let MaybeTls::Tls(tls) = c else {
            panic!("not in TLS")
        };
        let tokio_rustls::TlsStream::Client(client) = *tls else {
            panic!("the connecting side is a client")
        };
        let conn = client.get_ref().1;
        let control = export(conn, CONTROL.label).expect("control");
        let peer = export(conn, PEER.label).expect("peer");
        assert_ne!(control, peer);
    }

    #[tokio::test]
    async fn a_close_without_close_notify_reads_as_the_end_of_the_stream() {
        let ((c, _), (mut s, _)) = session(PEER).await;
        let MaybeTls::Tls(tls) = c else {
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

    #[tokio::test]
    async fn a_handshake_against_a_silent_end_times_out_naming_it() {
        let (a, _b) = tokio::io::duplex(1 << 16);
        let e = connect(a, Duration::from_millis(50), CONTROL)
            .await
            .err()
            .expect("no server");
        assert_eq!(
            e,
            TlsError::Timeout {
                with: "agent",
                ms: 50
            }
        );
    }
}
