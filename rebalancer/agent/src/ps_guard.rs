//! Stop-and-copy and pre-copy, on the source: only root on this node may reach the
//! destination's page server.
//!
//! The destination's page server serves the first connection from the source node's address
//! (`migration::host`, `page_server`). Any process on the source node has that address, so a
//! user's process there that connected first would be served: with encryption a denial of
//! service (it fails CRIU's TLS handshake and the migration rolls back), without encryption an
//! injection of pages into the job. So before CRIU connects, the source installs an nftables
//! table of its own that resets every connection to the page server's address and port made by
//! a socket not owned by root (output hook) or forwarded from another namespace of this host
//! (forward hook: a container's traffic, NATed or not). With a destination of this release the
//! page server does not even listen before the guard is in place (`opens_page_servers`,
//! `open-page-server`): no connection can exist that the guard did not judge.
//!
//! Without nft, an encrypted transfer goes on unguarded with a warning (a stranger can only
//! make it fail), a plain one is refused (a stranger could write the job's memory). The table
//! is removed when the transfer is over, or at the migration's deadline; an agent removes every
//! such table when it starts (no migration outlives its agent's dump).

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::error::AgentError;
use crate::lazy_guard::{list_tables, nft_script};

const PREFIX: &str = "rebalancer_ps_";

/// The table's name: one per destination address and port (unique while a page server waits
/// there; two destinations may use the same port at once).
pub fn table(to: (Ipv4Addr, u16)) -> String {
    let [a, b, c, d] = to.0.octets();
    format!("{PREFIX}{a}_{b}_{c}_{d}_{}", to.1)
}

/// The `nft -f` script. Idempotent: an older table of the same name is emptied first. Pure.
pub fn script(to: (Ipv4Addr, u16)) -> String {
    let (ip, port) = to;
    let t = table(to);
    // Priority -300: before conntrack, NAT and any site filter.
    format!(
        "add table ip {t}\n\
         flush table ip {t}\n\
         table ip {t} {{\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority -300; policy accept;\n\
         \t\tip daddr {ip} tcp dport {port} meta skuid != 0 counter reject with tcp reset\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority -300; policy accept;\n\
         \t\tip daddr {ip} tcp dport {port} counter reject with tcp reset\n\
         \t}}\n\
         }}\n"
    )
}

/// Names of the guard tables in `nft list tables` output. Pure.
pub fn guard_tables(nft_tables: &str) -> Vec<String> {
    nft_tables
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .map(str::trim)
        .filter(|t| {
            t.strip_prefix(PREFIX).is_some_and(|rest| {
                !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit() || b == b'_')
            })
        })
        .map(str::to_string)
        .collect()
}

/// Installs the guard for the page server at `to` and removes it after `within` if nobody did
/// first. An error means nothing was installed; the migration decides whether to go on
/// unguarded (`migration::source`).
pub async fn install(to: (Ipv4Addr, u16), within: Duration) -> Result<(), AgentError> {
    nft_script(&script(to), "page-server guard").await?;
    tracing::debug!(to = %format!("{}:{}", to.0, to.1), "page server guarded: only root on this node reaches it");
    tokio::spawn(async move {
        tokio::time::sleep(within).await;
        remove(to).await;
    });
    Ok(())
}

/// Removes the guard of `to`, if it is still there.
pub async fn remove(to: (Ipv4Addr, u16)) {
    let t = table(to);
    // `destroy table` would not fail on a missing table but needs nft 1.0.8 (Debian 12 has
    // 1.0.6): an `add` first makes the `delete` always find one.
    let script = format!("add table ip {t}\ndelete table ip {t}\n");
    if let Err(e) = nft_script(&script, "page-server guard removal").await {
        tracing::warn!(table = %t, error = %e.chain(), "could not remove the page-server guard");
    }
}

/// At agent start: every guard table is stale (the transfers of a killed agent's dumps are
/// over: its migrations are rolled back or resolved by the adoption).
pub async fn sweep() {
    let Some(out) = list_tables("page-server guards").await else {
        return;
    };
    for t in guard_tables(&out) {
        match nft_script(
            &format!("delete table ip {t}\n"),
            "page-server guard removal",
        )
        .await
        {
            Ok(()) => tracing::info!(table = %t, "stale page-server guard removed"),
            Err(e) => {
                tracing::warn!(table = %t, error = %e.chain(), "could not remove a stale page-server guard")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 18, 16, 3), 40123);

    #[test]
    fn the_rules_reset_everyone_but_root_of_this_node() {
        let s = script(TO);
        let t = "rebalancer_ps_198_18_16_3_40123";
        assert!(
            s.starts_with(&format!("add table ip {t}\nflush table ip {t}\n")),
            "{s}"
        );
        assert!(
            s.contains("hook output priority -300; policy accept;\n\t\tip daddr 198.18.16.3 tcp dport 40123 meta skuid != 0 counter reject with tcp reset"),
            "{s}"
        );
        assert!(
            s.contains("hook forward priority -300; policy accept;\n\t\tip daddr 198.18.16.3 tcp dport 40123 counter reject with tcp reset"),
            "{s}"
        );
    }

    #[test]
    fn the_sweep_finds_only_guard_tables() {
        let out = "table inet filter\ntable ip rebalancer_ps_198_18_16_3_40123\n\
                   table ip rebalancer_lazy_40123\ntable ip rebalancer_ps_\n\
                   table ip rebalancer_ps_x\ntable ip6 rebalancer_ps_1_2_3_4_5\n";
        assert_eq!(guard_tables(out), vec!["rebalancer_ps_198_18_16_3_40123"]);
        assert!(guard_tables("").is_empty());
    }
}
