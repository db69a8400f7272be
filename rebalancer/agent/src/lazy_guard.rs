//! Post-copy with a destination of peer protocol 3 or older: only the destination may reach
//! the source's lazy page server. (From peer protocol 4 CRIU listens nowhere: the agents link
//! the connection themselves, [`crate::lazy_link`]; this guard is for older peers only.)
//!
//! `criu dump --lazy-pages` listens on a port the agent picked and accepts exactly **one**
//! connection, then closes its listener (criu/page-xfer.c `cr_page_server`, util.c
//! `run_tcp_server`): whoever connects first is served. With encryption that is a denial of
//! service (the stranger fails the TLS handshake and CRIU takes its error path, the migration
//! rolls back); without encryption it is a leak (the stranger reads the job's memory). The
//! destination's lazy-pages daemon connects only after the dump, so the agent cannot accept for
//! CRIU and hand it the socket, as it does for the destination's page server.
//!
//! So for the migration's lifetime the source installs an nftables table of its own that resets
//! every connection to that address and port that does not come from the destination's
//! address. It is removed once CRIU's listener has come and gone (the single accept happened),
//! or at the migration's deadline, whichever is first. A table left by a killed agent is
//! removed by the next agent's start ([`sweep`]).

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::error::AgentError;

/// The table's name: one per lazy port (ports are unique while they listen).
pub fn table(port: u16) -> String {
    format!("rebalancer_lazy_{port}")
}

/// The `nft -f` script admitting only `peer` to `listen`. Idempotent: an older table of the
/// same name (left by a crashed agent) is emptied first. Pure: unit-tested.
pub fn script(listen: (Ipv4Addr, u16), peer: Ipv4Addr) -> String {
    let (ip, port) = listen;
    let t = table(port);
    // Priority -300: before conntrack and any site filter, so an established-state accept
    // elsewhere cannot let a stranger's SYN through. Connections from this node itself arrive
    // on lo: those are judged on the way out instead, where the socket's owner is known, so
    // that the agent (root) can still end CRIU's listener on a rollback and no local user can.
    format!(
        "add table ip {t}\n\
         flush table ip {t}\n\
         table ip {t} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -300; policy accept;\n\
         \t\tiifname != \"lo\" ip daddr {ip} tcp dport {port} ip saddr != {peer} counter reject with tcp reset\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority -300; policy accept;\n\
         \t\tip daddr {ip} tcp dport {port} meta skuid != 0 counter reject with tcp reset\n\
         \t}}\n\
         }}\n"
    )
}

/// Whether /proc/net/tcp text shows a socket listening on `port` (state 0A). Pure.
pub fn listening(proc_net_tcp: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    proc_net_tcp.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or("");
        let state = f.nth(1).unwrap_or("");
        local.ends_with(&want) && state == "0A"
    })
}

/// Runs `nft -f -` on `script` (bounded to 10 s); the error names `what` was refused.
pub(crate) async fn nft_script(script: &str, what: &str) -> Result<(), AgentError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| AgentError::Io {
            what: "run nft".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|source| AgentError::Io {
                what: "write the nft script".into(),
                source,
            })?;
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| AgentError::Timeout("nft did not finish within 10 s".into()))?
        .map_err(|source| AgentError::Io {
            what: "wait for nft".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(AgentError::Internal(format!(
            "nft refused the {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Installs the guard for `listen` (before CRIU listens there) and leaves a task that removes
/// it when CRIU's listener is gone again, or after `within`. An error means nothing was
/// installed; the caller decides whether to migrate unguarded.
pub async fn admit_only(
    listen: (Ipv4Addr, u16),
    peer: Ipv4Addr,
    within: Duration,
) -> Result<(), AgentError> {
    nft_script(&script(listen, peer), "lazy-port guard").await?;
    let port = listen.1;
    tracing::info!(port, peer = %peer, "lazy page server admits only the destination");
    tokio::spawn(remove_when_gone(port, within, false));
    Ok(())
}

/// Ports of the guard tables in `nft list tables` output. Pure.
pub fn guarded_ports(nft_tables: &str) -> Vec<u16> {
    nft_tables
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip rebalancer_lazy_"))
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// At agent start: removes every guard table whose port no longer has a listener (left by an
/// agent killed mid-migration: no migration owns it now). A table whose port still listens
/// guards a lazy dump that outlived its agent; it is removed once that listener is gone, as
/// [`admit_only`] would have. Failures are logged: a stale table only resets connections to a
/// port nothing listens on.
pub async fn sweep(within: Duration) {
    let Some(out) = list_tables("lazy-port guards").await else {
        return;
    };
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    for port in guarded_ports(&out) {
        if listening(&tcp, port) {
            tracing::warn!(
                port,
                "a lazy dump of a previous agent still listens: its guard stays until it is gone"
            );
            tokio::spawn(remove_when_gone(port, within, true));
            continue;
        }
        remove(port).await;
        tracing::info!(port, "stale lazy-port guard removed");
    }
}

/// `nft list tables`, or `None` (logged, naming the `guards` not swept) without nft.
pub(crate) async fn list_tables(guards: &str) -> Option<String> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("nft")
            .args(["list", "tables"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    {
        Ok(Ok(o)) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(Ok(o)) => {
            tracing::debug!(stderr = %String::from_utf8_lossy(&o.stderr).trim(), "nft list tables failed: no {guards} swept");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "no nft: no {guards} swept");
            None
        }
        Err(_) => {
            tracing::warn!("nft list tables did not finish within 10 s: no {guards} swept");
            None
        }
    }
}

async fn remove(port: u16) {
    let t = table(port);
    match nft_script(&format!("delete table ip {t}\n"), "lazy-port guard removal").await {
        Ok(()) => tracing::debug!(port, "lazy-port guard removed"),
        Err(e) => tracing::warn!(port, error = %e, "could not remove the lazy-port guard"),
    }
}

/// Removes the guard of `port` once its listener, seen (or `seen` already), is gone, or after
/// `within`.
async fn remove_when_gone(port: u16, within: Duration, mut seen: bool) {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        let up = std::fs::read_to_string("/proc/net/tcp")
            .map(|t| listening(&t, port))
            .unwrap_or(false);
        if seen && !up {
            break;
        }
        seen |= up;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    remove(port).await;
}

/// The guard as the source's migration wants it. Without the destination's address (a
/// migration to an address not in `[peers]`) or without nft, an encrypted migration goes on
/// unguarded with a warning (a stranger can only make it fail), a plain one is refused (a
/// stranger could read the job's memory).
pub async fn guard(
    listen: (Ipv4Addr, u16),
    peer: Option<Ipv4Addr>,
    within: Duration,
    encrypted: bool,
) -> Result<(), AgentError> {
    let r = match peer {
        Some(peer) => admit_only(listen, peer, within).await,
        None => Err(AgentError::BadRequest(
            "the destination's address is not in [peers], so the lazy page server cannot be \
             restricted to it"
                .into(),
        )),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if encrypted => {
            tracing::warn!(port = listen.1, error = %e.chain(), "lazy page server unguarded (pages stay encrypted)");
            Ok(())
        }
        Err(e) => Err(AgentError::Internal(format!(
            "refusing an unencrypted post-copy whose lazy page server anyone could read: {}",
            e.chain()
        ))),
    }
}

/// The destination's address, as configured in `[peers]`.
pub fn peer_ip(cfg: &crate::config::AgentConfig, node: &str) -> Option<Ipv4Addr> {
    match cfg.peers.get(node).map(|a| a.ip()) {
        Some(std::net::IpAddr::V4(v4)) => Some(v4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_resets_everyone_but_the_destination() {
        let s = script(
            (Ipv4Addr::new(198, 18, 16, 2), 40123),
            Ipv4Addr::new(198, 18, 16, 3),
        );
        assert!(
            s.starts_with(
                "add table ip rebalancer_lazy_40123\nflush table ip rebalancer_lazy_40123\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("iifname != \"lo\" ip daddr 198.18.16.2 tcp dport 40123 ip saddr != 198.18.16.3 counter reject with tcp reset"),
            "{s}"
        );
        assert!(
            s.contains("hook input priority -300; policy accept;"),
            "{s}"
        );
        // The node itself: only root (the agent ending CRIU's listener on a rollback).
        assert!(
            s.contains("ip daddr 198.18.16.2 tcp dport 40123 meta skuid != 0 counter reject with tcp reset"),
            "{s}"
        );
    }

    #[test]
    fn the_sweep_finds_only_guard_tables() {
        let out = "table inet filter\ntable ip rebalancer_lazy_40123\ntable ip rebalancer_lazy_x\ntable ip6 rebalancer_lazy_9\ntable ip rebalancer_lazy_7\n";
        assert_eq!(guarded_ports(out), vec![40123, 7]);
        assert!(guarded_ports("").is_empty());
    }

    #[test]
    fn listeners_are_found_by_port_and_state() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                 \x20  0: 0210A8C6:9CBB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
                 \x20  1: 0210A8C6:1EC6 0310A8C6:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        assert!(listening(t, 0x9CBB));
        // Established, not listening.
        assert!(!listening(t, 0x1EC6));
        assert!(!listening(t, 80));
        assert!(!listening("", 80));
    }
}
