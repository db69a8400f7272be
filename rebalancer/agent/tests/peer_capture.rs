//! What crosses the agent ↔ agent connection: a container holds a TCP connection whose receive
//! queue holds a marker it never reads; CRIU dumps the queue into a non-memory image, which
//! travels over the peer connection. A TCP proxy in the source node's namespace (so the
//! destination still sees the source's address) records every byte of that connection. Under
//! peer protocol 3 the marker must not appear in the recording; under protocol 2 (in clear) it
//! must, which shows the recording sees what the images carry.

mod common;
use common::*;
use rebalancer_proto::*;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Moves the calling thread into the network namespace `/run/netns/NAME`.
fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).expect("open netns");
    // SAFETY: setns on a valid namespace fd; it changes only this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// A container that accepts one connection on :8000 and never reads from it.
fn holder_spec(id: &str, address: &str) -> ContainerSpec {
    let prog = r#"
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
print("accepted", flush=True)
while True:
    time.sleep(3600)
"#;
    let mut spec = server_spec(id, address, 0);
    spec.argv = vec!["python3".into(), "-u".into(), "-c".into(), prog.into()];
    spec
}

/// Runs one migration through the proxy; returns whether the marker crossed in clear.
fn marker_in_clear(k: u8, subnet_octet: u8, peer_protocol: &str) -> bool {
    let cfg = format!("peer_protocol = {peer_protocol}");
    let lab = Lab::with_config(k, 2, vec![cfg.clone(), cfg]);
    let addr = format!("198.19.{subnet_octet}.10");
    lab.client(0)
        .call(&Request::CreateContainer {
            spec: holder_spec("cap1", &addr),
        })
        .expect("create");
    let marker = format!("RBMARKER-{}", uuid::Uuid::new_v4().simple());
    // The client, in the lab's client namespace, sends the marker and keeps the connection.
    let (ctx, crx) = std::sync::mpsc::channel();
    {
        let (ns, addr, marker) = (lab.client_ns.clone(), addr.clone(), marker.clone());
        std::thread::spawn(move || {
            enter_netns(&ns);
            let mut s = None;
            for _ in 0..100 {
                match TcpStream::connect((addr.as_str(), 8000)) {
                    Ok(c) => {
                        s = Some(c);
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
            let mut s = s.expect("connect to the container");
            s.write_all(marker.as_bytes()).expect("send marker");
            // The socket keeps its namespace; the test holds it open through the move.
            ctx.send(s).expect("sent");
        });
    }
    let _client = crx
        .recv_timeout(Duration::from_secs(30))
        .expect("marker sent");
    // The marker is in the container's receive queue once it was acknowledged; a moment for it.
    std::thread::sleep(Duration::from_millis(300));
    let dest = format!("{}:{}", lab.nodes[1].ip, lab.nodes[1].port);
    let (port, seen) = rebalancer_testkit::recording_proxy(Some(&lab.nodes[0].netns), &dest);
    let req = Request::Migrate {
        request: MigrateRequest {
            container: "cap1".into(),
            destination: lab.nodes[1].name.clone(),
            destination_addr: Some(format!("127.0.0.1:{port}")),
            mode: MigrationMode::StopAndCopy,
            max_downtime_ms: None,
            timeout_ms: None,
        },
        watch: true,
    };
    let rec = match lab.client(0).call(&req) {
        Ok(Reply::Migration { migration }) => migration,
        other => panic!(
            "migration through the proxy: {other:?}\n--- n0\n{}\n--- n1\n{}",
            lab.log(0),
            lab.log(1)
        ),
    };
    assert_eq!(rec.state, MigrationState::Succeeded, "{:?}", rec.error);
    let info = lab.client(1).container("cap1").expect("on n1");
    assert_eq!(info.state, ContainerState::Running);
    let bytes = seen.lock().expect("log").clone();
    println!(
        "peer protocol {peer_protocol}: {} bytes crossed the peer connection",
        bytes.len()
    );
    assert!(bytes.len() > 1000, "the proxy saw almost nothing");
    // The images do carry the queue: the restored socket on n1 holds it (checked by the
    // protocol-2 run below finding it on the wire).
    bytes.windows(marker.len()).any(|w| w == marker.as_bytes())
}

#[test]
#[ignore = "needs root, CRIU 4.2, munge, nftables and network namespaces; .ci/run runs it with --include-ignored"]
fn a_tcp_queue_marker_crosses_in_clear_under_protocol_2_and_not_under_3() {
    assert!(
        marker_in_clear(7, 23, "[1, 2]"),
        "under protocol 2 the marker of the container's TCP receive queue should cross in clear \
         (else this recording shows nothing)"
    );
    assert!(
        !marker_in_clear(8, 24, "[3, 3]"),
        "under protocol 3 the marker crossed the peer connection in clear"
    );
}
