//! The `GET /metrics` HTTP server shared by the node agent and the controller.
//!
//! Each daemon keeps its own registry and hands the server a [`Render`] closure that produces
//! the OpenMetrics text for one request. The server reads at most [`MAX_REQUEST`] bytes of
//! request head within [`REQUEST_TIMEOUT`], answers `GET /metrics` with the exposition and
//! anything else with 404, and closes the connection.

pub mod names;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Request head limit: anything longer is answered without reading further.
pub const MAX_REQUEST: usize = 8192;
/// A client gets this long to send its request head (slow clients never hold a task forever).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The OpenMetrics text exposition's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Produces the exposition text for one request (refreshes gauges, then renders).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` until the task is dropped; one task per connection.
pub async fn serve(listener: TcpListener, render: Render) {
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                tokio::spawn(answer(sock, peer, render.clone()));
            }
            Err(e) => {
                // Out of descriptors, typically: back off instead of spinning on accept.
                tracing::warn!(error = %e, "accept on metrics listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut sock: TcpStream, peer: SocketAddr, render: Render) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let (status, ctype, body) = match route(&buf) {
        Route::Metrics => ("200 OK", CONTENT_TYPE, render()),
        Route::NotFound => (
            "404 Not Found",
            "text/plain",
            "not found; try /metrics\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = sock.write_all(resp.as_bytes()).await {
        tracing::debug!(%peer, "metrics client went away: {e}");
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
}

/// What a request head asks for, from its request line.
fn route(head: &[u8]) -> Route {
    let head = String::from_utf8_lossy(head);
    let first = head.lines().next().unwrap_or("");
    let mut words = first.split(' ');
    match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics")) => Route::Metrics,
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_only_get_metrics() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics"), Route::Metrics);
        assert_eq!(route(b"GET /metricsx HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b""), Route::NotFound);
    }

    /// One request on a fresh connection; the whole answer up to the server's close.
    async fn exchange(addr: SocketAddr, request: Vec<u8>) -> String {
        let mut sock = TcpStream::connect(addr).await.expect("connect");
        sock.write_all(&request).await.expect("send");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        String::from_utf8(answer).expect("text")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renders_per_request_and_answers_an_oversized_head() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = calls.clone();
        let render: Render = Arc::new(move || {
            let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            format!("requests {n}\n# EOF\n")
        });
        let server = tokio::spawn(serve(listener, render));

        for n in 1..=2 {
            let out = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
            let (head, body) = out.split_once("\r\n\r\n").expect("head");
            assert!(head.contains(CONTENT_TYPE), "{head}");
            assert_eq!(body, format!("requests {n}\n# EOF\n"));
        }
        // A head without its blank line that reaches the limit: answered, not waited on.
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_REQUEST, b'a');
        let out = exchange(addr, big).await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
        server.abort();
    }
}
