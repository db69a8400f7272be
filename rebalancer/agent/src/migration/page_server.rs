//! The destination's stop-and-copy and pre-copy page server: CRIU's page server on a port its
//! agent binds, admitting the source's address only and, with a gate, listening only once the
//! source opened it ([`super::page_server_open`], docs/security.md §2.2).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use tokio::sync::oneshot;

use crate::criu;
use crate::error::AgentError;

/// Opens a page server bound with a gate ([`super::host::Criu::page_server`]): the page server sends,
/// through the sender it receives, whether it listens.
pub type PageServerGate = oneshot::Receiver<oneshot::Sender<Result<(), String>>>;

/// One connection is served; a few more may knock (and are closed unserved).
const PAGE_SERVER_BACKLOG: u32 = 8;

fn listen(
    socket: tokio::net::TcpSocket,
    ip: Ipv4Addr,
    port: u16,
) -> Result<tokio::net::TcpListener, AgentError> {
    socket
        .listen(PAGE_SERVER_BACKLOG)
        .map_err(|source| AgentError::Io {
            what: format!("listen on {ip}:{port}"),
            source,
        })
}

/// The page server's task: accepts the source's connection, then runs CRIU on it.
pub type Pending = tokio::task::JoinHandle<Result<tokio::process::Child, AgentError>>;

/// Binds a port of `ip` for a page server receiving into `dir` (`--prev-images-dir parent`),
/// listening at once or once `gate` opens, and serving the first connection from `from` with
/// `criu page-server --ps-socket`.
pub async fn serve(
    criu_path: &Path,
    dir: &Path,
    ip: Ipv4Addr,
    parent: Option<&str>,
    tls: &[String],
    from: Option<std::net::IpAddr>,
    gate: Option<PageServerGate>,
) -> Result<((Ipv4Addr, u16), Pending), AgentError> {
    let io = |what: String| move |source| AgentError::Io { what, source };
    // Bound here and kept: no window in which another process could take the port.
    let socket = tokio::net::TcpSocket::new_v4().map_err(io("page-server socket".into()))?;
    socket
        .bind((ip, 0).into())
        .map_err(io(format!("bind {ip}:0")))?;
    let port = socket.local_addr().map_err(io("local_addr".into()))?.port();
    // Listening at once, or in the task below once the gate opens.
    enum Start {
        Now(tokio::net::TcpListener),
        Gated(PageServerGate, tokio::net::TcpSocket),
    }
    let start = match gate {
        None => Start::Now(listen(socket, ip, port)?),
        Some(g) => Start::Gated(g, socket),
    };
    let (criu_path, dir, parent, tls) = (
        criu_path.to_path_buf(),
        dir.to_path_buf(),
        parent.map(str::to_string),
        tls.to_vec(),
    );
    let pending = tokio::spawn(async move {
        let listener = match start {
            Start::Now(l) => l,
            Start::Gated(gate, socket) => {
                let answer = gate.await.map_err(|_| {
                    AgentError::Peer(format!(
                        "page server on port {port} closed before it was opened"
                    ))
                })?;
                let r = listen(socket, ip, port);
                let _ = answer.send(r.as_ref().map(|_| ()).map_err(|e| e.chain()));
                r?
            }
        };
        let stream = loop {
            let (stream, peer) = listener
                .accept()
                .await
                .map_err(io(format!("accept on page-server port {port}")))?;
            if from.is_some_and(|f| f != peer.ip()) {
                tracing::warn!(peer = %peer, expected = ?from, port, "page-server connection from another address refused");
                continue;
            }
            tracing::debug!(peer = %peer, port, "page-server connection accepted");
            break stream;
        };
        drop(listener);
        let stream = stream.into_std().map_err(io("page-server socket".into()))?;
        // CRIU does blocking I/O on it.
        stream
            .set_nonblocking(false)
            .map_err(io("set_blocking".into()))?;
        let sock = OwnedFd::from(stream);
        let fd = sock.as_raw_fd();
        let child = criu::spawn_ready(
            &criu_path,
            |status| {
                criu::page_server_on_socket_args(
                    &dir,
                    ip,
                    port,
                    status,
                    fd,
                    parent.as_deref(),
                    &tls,
                )
            },
            "page-server",
            &dir,
            "page-server.log",
            criu::SpawnOpts {
                ready_within: Some(criu::READY_WITHIN),
                keep_fds: &[fd],
                detach: false,
                private_run: None,
            },
        )
        .await;
        // criu has its own copy of the socket now.
        drop(sock);
        child
    });
    Ok(((ip, port), pending))
}
