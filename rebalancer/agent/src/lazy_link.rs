//! Post-copy, peer protocol 4: the connection that carries lazy pages, established by the two
//! agents before the dump, so that no CRIU process ever listens.
//!
//! The source agent binds a port of its own ([`listen`]) and sends its address and a fresh
//! random token over the authenticated peer connection (`lazy-link`). The destination agent
//! connects and writes the token as the connection's first bytes ([`connect`]). The source
//! accepts connections from the destination's address only, reads each one's first
//! [`LAZY_TOKEN_LEN`] bytes, and keeps the first whose token matches; every other connection is
//! closed with nothing written to it (and nothing past the token read). The listener is closed
//! then. The source's end goes to `criu dump --lazy-pages --ps-socket`, which runs its TLS
//! server on it.
//!
//! On the destination, `criu lazy-pages --ps-socket` would skip TLS: CRIU's client side
//! (`connect_to_page_server` in criu/page-xfer.c, 4.2) runs `tls_x509_init` only on a socket it
//! connected itself. A plain transfer hands the daemon the linked socket; an encrypted one
//! lets the daemon connect to a loopback port the agent bound ([`relay`]), admits only a
//! connection owned by root, and relays the TLS bytes between the two sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use rebalancer_proto::peer::LAZY_TOKEN_LEN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::AgentError;

/// A link's secret: proves on the new connection that it comes from the destination agent.
pub type Token = [u8; LAZY_TOKEN_LEN];

/// How long the destination may take to open the link (connect and write the token).
pub const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// How long the destination's relay waits for its lazy-pages daemon to connect (the daemon
/// connects once the restore hands it the tree's userfaultfds).
pub const RELAY_WITHIN: Duration = Duration::from_secs(600);

/// How long one accepted connection may take to send its token before it is dropped.
pub const TOKEN_WITHIN: Duration = Duration::from_secs(5);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// A fresh random token (two v4 UUIDs: 244 random bits from the OS).
pub fn token() -> Token {
    let mut t = [0u8; LAZY_TOKEN_LEN];
    t[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    t[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    t
}

/// The token as the `lazy-link` request carries it. Pure.
pub fn to_hex(t: &Token) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a token from `lazy-link`; the error names what is wrong. Pure.
pub fn from_hex(s: &str) -> Result<Token, AgentError> {
    let bad = || {
        AgentError::BadRequest(format!(
            "lazy-link token must be {} hex digits, got {} characters",
            LAZY_TOKEN_LEN * 2,
            s.len()
        ))
    };
    if s.len() != LAZY_TOKEN_LEN * 2 || !s.is_ascii() {
        return Err(bad());
    }
    let mut t = [0u8; LAZY_TOKEN_LEN];
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(t)
}

/// Compares without an early exit, so that the time taken tells a guesser nothing. Pure.
fn same(a: &Token, b: &Token) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Binds the source's link port on `ip` (kept bound: no window in which another process could
/// take it). Returns the listener and its port.
pub fn listen(ip: Ipv4Addr) -> Result<(TcpListener, u16), AgentError> {
    let l = std::net::TcpListener::bind((ip, 0)).map_err(io(format!("bind {ip}:0")))?;
    l.set_nonblocking(true).map_err(io("set_nonblocking"))?;
    let port = l.local_addr().map_err(io("local_addr"))?.port();
    let l = TcpListener::from_std(l).map_err(io("register the lazy-link listener"))?;
    Ok((l, port))
}

/// Reads one connection's token within [`TOKEN_WITHIN`]; `Ok(false)`: wrong or incomplete.
async fn check_token(stream: &mut TcpStream, want: &Token) -> bool {
    let mut got = [0u8; LAZY_TOKEN_LEN];
    matches!(
        tokio::time::timeout(TOKEN_WITHIN, stream.read_exact(&mut got)).await,
        Ok(Ok(_)) if same(&got, want)
    )
}

/// Accepts on `listener` until a connection from `from` sends `token` first, within `within`;
/// returns it as a blocking socket for CRIU and closes the listener. Strangers (another
/// address, a wrong or missing token) are closed without a byte written to them, each checked
/// on its own so that a silent one does not hold the others up.
pub async fn accept(
    listener: TcpListener,
    from: IpAddr,
    token: Token,
    within: Duration,
) -> Result<std::net::TcpStream, AgentError> {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut checks = tokio::task::JoinSet::new();
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    let stream = loop {
        tokio::select! {
            a = listener.accept() => {
                let (mut stream, peer) = a.map_err(io(format!("accept on lazy-link port {port}")))?;
                if peer.ip() != from {
                    tracing::warn!(peer = %peer, expected = %from, port, "lazy-link connection from another address refused");
                    continue;
                }
                checks.spawn(async move {
                    let ok = check_token(&mut stream, &token).await;
                    (ok, stream, peer)
                });
            }
            Some(Ok((ok, stream, peer))) = checks.join_next(), if !checks.is_empty() => {
                if ok {
                    tracing::debug!(peer = %peer, port, "lazy-link connection accepted");
                    break stream;
                }
                tracing::warn!(peer = %peer, port, "lazy-link connection without the link's token refused");
            }
            _ = &mut deadline => {
                return Err(AgentError::Timeout(format!(
                    "the destination did not open the lazy-page link to port {port} within {} s",
                    within.as_secs()
                )));
            }
        }
    };
    drop(listener);
    checks.abort_all();
    blocking(stream)
}

/// The destination's end: connects to the source agent's `to` within `within` and writes the
/// token.
pub async fn connect(
    to: SocketAddr,
    token: Token,
    within: Duration,
) -> Result<std::net::TcpStream, AgentError> {
    let r = tokio::time::timeout(within, async {
        let mut s = TcpStream::connect(to)
            .await
            .map_err(io(format!("connect the lazy-page link to {to}")))?;
        s.write_all(&token)
            .await
            .map_err(io(format!("write the lazy-page link token to {to}")))?;
        Ok::<_, AgentError>(s)
    })
    .await
    .map_err(|_| {
        AgentError::Timeout(format!(
            "lazy-page link to {to} not open within {} s",
            within.as_secs()
        ))
    })??;
    blocking(r)
}

/// CRIU does blocking I/O on the socket.
fn blocking(s: TcpStream) -> Result<std::net::TcpStream, AgentError> {
    let _ = s.set_nodelay(true);
    let s = s.into_std().map_err(io("lazy-link socket"))?;
    s.set_nonblocking(false).map_err(io("set_blocking"))?;
    Ok(s)
}

/// The owner uid of the TCP socket whose local address is `local` and remote `remote`, from
/// /proc/net/tcp text. Pure.
pub fn socket_uid(proc_net_tcp: &str, local: SocketAddrV4, remote: SocketAddrV4) -> Option<u32> {
    let hex = |a: SocketAddrV4| {
        format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        )
    };
    let (l, r) = (hex(local), hex(remote));
    proc_net_tcp.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == l && f[2] == r)
            .then(|| f[7].parse().ok())
            .flatten()
    })
}

/// Encrypted post-copy on the destination: binds a loopback port for the lazy-pages daemon and
/// relays between the daemon's connection and `link` (the daemon's TLS runs end to end with
/// the source's dump; the relay sees only ciphertext). Only a connection whose socket belongs
/// to root is admitted (the daemon runs as root; any other local user is closed unserved); the
/// listener closes after it. Returns the port and the relay's handle (aborting it closes both
/// sockets); the relay ends by itself when either side closes.
pub fn relay(
    link: std::net::TcpStream,
    within: Duration,
) -> Result<(u16, tokio::task::AbortHandle), AgentError> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io("bind 127.0.0.1:0 for the lazy-pages daemon"))?;
    l.set_nonblocking(true).map_err(io("set_nonblocking"))?;
    let port = l.local_addr().map_err(io("local_addr"))?.port();
    let l = TcpListener::from_std(l).map_err(io("register the relay listener"))?;
    link.set_nonblocking(true).map_err(io("set_nonblocking"))?;
    let mut link = TcpStream::from_std(link).map_err(io("register the lazy-page link"))?;
    let task = tokio::spawn(async move {
        let accepted = tokio::time::timeout(within, async {
            loop {
                let (s, peer) = l.accept().await?;
                let SocketAddr::V4(peer4) = peer else {
                    continue;
                };
                let me = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
                let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
                match socket_uid(&table, peer4, me) {
                    Some(0) => return Ok::<_, std::io::Error>(s),
                    uid => {
                        tracing::warn!(peer = %peer, uid = ?uid, port, "lazy-pages relay: a connection not owned by root refused")
                    }
                }
            }
        })
        .await;
        drop(l);
        let mut daemon = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::error!(port, error = %e, "lazy-pages relay: accept failed");
                return;
            }
            Err(_) => {
                tracing::error!(
                    port,
                    "lazy-pages relay: the lazy-pages daemon never connected"
                );
                return;
            }
        };
        let _ = daemon.set_nodelay(true);
        match tokio::io::copy_bidirectional(&mut daemon, &mut link).await {
            Ok((up, down)) => {
                tracing::debug!(
                    port,
                    to_source = up,
                    from_source = down,
                    "lazy-pages relay ended"
                )
            }
            Err(e) => tracing::warn!(port, error = %e, "lazy-pages relay ended with an error"),
        }
    });
    Ok((port, task.abort_handle()))
}

/// Encrypted post-copy on the source: CRIU's lazy dump gets one end of a loopback connection
/// instead of the link itself, and the agent relays between the other end and the link. A
/// destination that goes away before it said a word (its agent killed, or the arrival undone
/// before its lazy-pages daemon started) would leave CRIU's TLS server with a handshake cut
/// short, and CRIU's error path resumes the tree while its sockets are still in TCP repair mode
/// and its network still locked. So when the link ends before the destination sent anything,
/// the relay completes a TLS handshake with CRIU as the source itself ([`tls_poke`], the
/// migration's TLS directory `tls_dir`) and closes: CRIU ends normally, the tree stays stopped,
/// and the agent's rollback resumes it properly. Returns CRIU's end (blocking).
pub async fn source_relay(
    link: std::net::TcpStream,
    tls_dir: std::path::PathBuf,
) -> Result<std::net::TcpStream, AgentError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(io("bind 127.0.0.1:0 for the lazy dump's relay"))?;
    let at = l.local_addr().map_err(io("local_addr"))?;
    let ours = TcpStream::connect(at)
        .await
        .map_err(io("connect the lazy dump's relay"))?;
    let me = ours.local_addr().map_err(io("local_addr"))?;
    // Only our own connection: a stranger's in the same instant is dropped.
    let criu_end = tokio::time::timeout(TOKEN_WITHIN, async {
        loop {
            let (s, peer) = l.accept().await?;
            if peer == me {
                return Ok::<_, std::io::Error>(s);
            }
            tracing::warn!(peer = %peer, "lazy dump relay: a stranger's connection refused");
        }
    })
    .await
    .map_err(|_| AgentError::Timeout("the lazy dump's relay did not connect".into()))?
    .map_err(io("accept the lazy dump's relay"))?;
    drop(l);
    link.set_nonblocking(true).map_err(io("set_nonblocking"))?;
    let link = TcpStream::from_std(link).map_err(io("register the lazy-page link"))?;
    let _ = link.set_nodelay(true);
    let _ = ours.set_nodelay(true);
    tokio::spawn(async move {
        let (mut lr, mut lw) = link.into_split();
        let (mut or, mut ow) = ours.into_split();
        // TLS: the client (the destination's daemon) speaks first; CRIU waits for it.
        let mut first = vec![0u8; 16 << 10];
        let n = lr.read(&mut first).await.unwrap_or(0);
        if n == 0 {
            tracing::info!("the destination left the lazy-page link before speaking; ending the lazy dump cleanly");
            let ours = match or.reunite(ow) {
                Ok(s) => s,
                Err(_) => return,
            };
            tls_poke(ours, &tls_dir).await;
            return;
        }
        if ow.write_all(&first[..n]).await.is_err() {
            return;
        }
        let up = async {
            let r = tokio::io::copy(&mut lr, &mut ow).await;
            let _ = ow.shutdown().await;
            r
        };
        let down = async {
            let r = tokio::io::copy(&mut or, &mut lw).await;
            let _ = lw.shutdown().await;
            r
        };
        let (a, b) = tokio::join!(up, down);
        tracing::debug!(to_criu = ?a.ok(), from_criu = ?b.ok(), "lazy dump relay ended");
    });
    blocking(criu_end)
}

/// Completes a TLS handshake with CRIU's lazy dump on `criu` as the source itself (`openssl
/// s_client` with the migration's certificate, through a loopback port only it reaches in
/// time), then hangs up, so that CRIU's page server ends normally.
pub async fn tls_poke(mut criu: TcpStream, dir: &std::path::Path) {
    let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await else {
        return;
    };
    let Ok(at) = l.local_addr() else { return };
    let f = |n: &str| dir.join(n);
    let child = tokio::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(at.to_string())
        .arg("-cert")
        .arg(f("cert.pem"))
        .arg("-key")
        .arg(f("key.pem"))
        .arg("-CAfile")
        .arg(f("cert.pem"))
        .args(["-verify_return_error", "-brief", "-no_ign_eof"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot run openssl to end the lazy dump");
            return;
        }
    };
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let (mut s, _) = l.accept().await?;
        tokio::io::copy_bidirectional(&mut s, &mut criu).await
    })
    .await;
    if r.is_err() {
        tracing::warn!("openssl did not end the lazy dump within 5 s");
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_hex_and_bad_ones_are_named() {
        let t = token();
        assert_ne!(t, token(), "two tokens alike");
        assert_eq!(from_hex(&to_hex(&t)).expect("parses"), t);
        let e = from_hex("abc").expect_err("short");
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        assert!(from_hex(&"zz".repeat(32)).is_err());
        assert!(from_hex(&"é".repeat(32)).is_err());
        assert!(same(&t, &t) && !same(&t, &token()));
    }

    #[test]
    fn socket_owner_is_read_from_proc_net_tcp() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                 \x20  0: 0100007F:9CBB 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 1 1\n\
                 \x20  1: 0100007F:1F90 0100007F:9CBB 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        let a = |p| SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
        assert_eq!(socket_uid(t, a(0x9CBB), a(0x1F90)), Some(1000));
        assert_eq!(socket_uid(t, a(0x1F90), a(0x9CBB)), Some(0));
        assert_eq!(socket_uid(t, a(1), a(2)), None);
    }

    #[tokio::test]
    async fn only_the_connection_with_the_token_from_the_peer_address_is_kept() {
        let (l, port) = listen(Ipv4Addr::LOCALHOST).expect("listen");
        let tok = token();
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        // From another address (127.0.0.2 is loopback too): closed unread.
        let stranger_addr = tokio::spawn(async move {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            s.bind((Ipv4Addr::new(127, 0, 0, 2), 0).into())
                .expect("bind");
            let mut c = s.connect(to).await.expect("connect");
            c.write_all(&tok).await.ok();
            let mut b = [0u8; 1];
            // Closed unread: EOF, or a reset for the unread token.
            matches!(c.read(&mut b).await, Ok(0) | Err(_))
        });
        // Right address, wrong token: closed with nothing written.
        let mut wrong = TcpStream::connect(to).await.expect("connect");
        wrong.write_all(&token()).await.expect("write");
        // Right address, silent: must not hold the real one up.
        let _silent = TcpStream::connect(to).await.expect("connect");
        let accepted = tokio::spawn(accept(
            l,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            tok,
            Duration::from_secs(10),
        ));
        let mut b = [0u8; 1];
        assert!(
            matches!(wrong.read(&mut b).await, Ok(0) | Err(_)),
            "stranger got data"
        );
        assert!(
            stranger_addr.await.expect("task"),
            "stranger from another address got data"
        );
        let mine = connect(to, tok, Duration::from_secs(5))
            .await
            .expect("connect");
        let mut theirs = accepted.await.expect("task").expect("accepted");
        // The kept one is ours: bytes cross, and the token is not among them.
        use std::io::{Read, Write};
        (&mine).write_all(b"page").expect("write");
        let mut got = [0u8; 4];
        theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"page");
        // The listener is gone.
        assert!(TcpStream::connect(to).await.is_err(), "still listening");
    }

    /// A linked pair of sockets through `listen`/`connect`: (source's end, destination's end).
    async fn linked() -> (std::net::TcpStream, std::net::TcpStream) {
        let (l, port) = listen(Ipv4Addr::LOCALHOST).expect("listen");
        let tok = token();
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let acc = tokio::spawn(accept(
            l,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            tok,
            Duration::from_secs(5),
        ));
        let dest = connect(to, tok, Duration::from_secs(5))
            .await
            .expect("connect");
        (acc.await.expect("task").expect("accepted"), dest)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_source_relay_forwards_and_ends_a_silent_link_with_a_handshake() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("rb-relay-{}", std::process::id()));
        let mine = crate::tls::Identity::generate("n0", "m").expect("identity");
        let peer = crate::tls::Identity::generate("n1", "m").expect("identity");
        crate::tls::write_files(&dir, &mine, &peer.cert_pem, true).expect("tls files");

        // The destination speaks: its bytes reach CRIU's end, CRIU's reach it.
        let (src, dest) = linked().await;
        let mut criu = source_relay(src, dir.clone()).await.expect("relay");
        (&dest).write_all(b"\x16hello").expect("write");
        let mut got = [0u8; 6];
        criu.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"\x16hello");
        criu.write_all(b"pages").expect("write");
        let mut back = [0u8; 5];
        (&dest).read_exact(&mut back).expect("read");
        assert_eq!(&back, b"pages");

        // The destination leaves before a word: CRIU's end gets a TLS ClientHello (a handshake
        // record, 0x16) from the relay's own client instead of a bare end of file.
        let (src, dest) = linked().await;
        let mut criu = source_relay(src, dir.clone()).await.expect("relay");
        drop(dest);
        criu.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut b = [0u8; 1];
        let n = criu.read(&mut b).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!((n, b[0]), (1, 0x16), "no TLS handshake towards CRIU");
    }

    #[tokio::test]
    async fn no_link_within_the_limit_is_a_timeout_naming_the_port() {
        let (l, port) = listen(Ipv4Addr::LOCALHOST).expect("listen");
        let e = accept(
            l,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            token(),
            Duration::from_millis(50),
        )
        .await
        .expect_err("nobody linked");
        assert!(e.to_string().contains(&port.to_string()), "{e}");
    }

    // Two workers: the test's blocking reads must not stop the relay's task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_carries_both_directions() {
        let (l, port) = listen(Ipv4Addr::LOCALHOST).expect("listen");
        let tok = token();
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let acc = tokio::spawn(accept(
            l,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            tok,
            Duration::from_secs(5),
        ));
        let dest = connect(to, tok, Duration::from_secs(5))
            .await
            .expect("connect");
        let src = acc.await.expect("task").expect("accepted");
        let (rport, _relay) = relay(dest, Duration::from_secs(5)).expect("relay");
        let mut daemon = TcpStream::connect((Ipv4Addr::LOCALHOST, rport))
            .await
            .expect("connect relay");
        use std::io::{Read, Write};
        if !nix::unistd::Uid::effective().is_root() {
            // Not root: the relay must refuse this connection (closed, nothing relayed).
            let mut b = [0u8; 1];
            assert!(
                matches!(daemon.read(&mut b).await, Ok(0) | Err(_)),
                "relayed for a non-root socket"
            );
            return;
        }
        daemon.write_all(b"get").await.expect("write");
        let mut got = [0u8; 3];
        (&src).read_exact(&mut got).expect("read");
        assert_eq!(&got, b"get");
        (&src).write_all(b"pages").expect("write");
        let mut back = [0u8; 5];
        daemon.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"pages");
    }
}
