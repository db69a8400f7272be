//! Holding a migrating container's inbound packets on the source node during the freeze
//! (`hold_inbound`, on by default), so that a client's segment sent while the tree is frozen is
//! delayed, not dropped: without it, CRIU's network lock drops it and the client waits for its
//! retransmission timeout (200 ms at least on Linux, doubling after each loss).
//!
//! How (this kernel has no `sch_plug` or `netem`; docs/benchmarks.md has the lab run):
//! - Before the dump ([`prepare`]): an IFB device of its own per migration whose root `tbf`
//!   is *plugged*: its token bucket is spent by one frame and a second frame it cannot pay for
//!   (at 800 bit/s, 14 s) sits at the head of its queue, so every packet behind it waits. The
//!   frames are dropped by the IFB when they leave (they did not come from a redirect). An
//!   `ingress` qdisc on the uplink, if there is none.
//! - At the freeze: CRIU runs the action script [`script`] at `network-lock`, just before it
//!   installs its own lock (the tree is already seized; anything that reached the socket until
//!   then is in the dumped queues). The script adds a u32 filter on the uplink's ingress that
//!   redirects every IPv4 packet to the container's address into the IFB. One `tc` process
//!   inside the freeze.
//! - After the switch ([`release`]): `tc qdisc change` to line rate keeps the queue but does not
//!   dequeue it (measured), so a third frame kicks it; the IFB hands each held packet back to
//!   the uplink's receive path, and the node routes it as it routes now: to the destination
//!   after a commit (the source's route is withdrawn, the destination answers ARP for the
//!   address), into the resumed container after a rollback. Then the filter, the IFB (with its
//!   qdisc) and, if it created it and no other hold needs it, the ingress qdisc go.
//!
//! The hold is best effort: when it cannot be prepared the migration goes on without it. A
//! hold longer than the client's RTO still draws a retransmission (queued behind the original);
//! nothing is lost either way.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{run_cmd, AgentError};

/// Rate of the plugged `tbf`: 100 bytes/s, so the frame at its head leaves after 14 s.
const PLUG_RATE: &str = "800bit";
/// Bucket of the plugged `tbf`: the largest frame it takes (a bigger packet would be dropped,
/// not queued); one full frame spends it.
const PLUG_BURST: &str = "1600";
/// Bytes held at most; a client sending more during the freeze loses the excess (and
/// retransmits it after its RTO, as without the hold).
const HOLD_LIMIT: &str = "4mb";
/// Payload of a plug frame: a full 1514-byte Ethernet frame.
const PLUG_PAYLOAD: usize = 1500;
/// EtherType of the plug frames (IEEE local experimental).
const ETH_P_PLUG: u16 = 0x88b5;
/// Longest wait for the released queue to drain before its IFB is deleted.
const DRAIN_WITHIN: Duration = Duration::from_millis(100);

/// One migration's hold: the names it uses on the node. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The node's uplink, where the container's inbound packets arrive.
    pub uplink: String,
    /// The container's address.
    pub address: Ipv4Addr,
    /// The IFB device holding them (`rbh` + the address in hex: 11 characters).
    pub ifb: String,
    /// Priority of the uplink ingress filter, one per address (so that holds of several
    /// migrations from one node do not meet).
    pub prio: u16,
}

impl Hold {
    pub fn new(uplink: &str, address: Ipv4Addr) -> Result<Hold, AgentError> {
        // The names go into a shell script: refuse anything but an interface name's usual set.
        if uplink.is_empty()
            || uplink.len() > 15
            || !uplink
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        {
            return Err(AgentError::BadRequest(format!(
                "uplink {uplink:?} is not an interface name the hold can use"
            )));
        }
        let a = u32::from(address);
        Ok(Hold {
            uplink: uplink.to_string(),
            address,
            ifb: format!("rbh{a:08x}"),
            // 1..=65000, leaving the top of the range to anyone else's filters.
            prio: (a % 65000) as u16 + 1,
        })
    }

    /// `tc` arguments of the filter that diverts the address into the IFB.
    pub fn filter_args(&self) -> Vec<String> {
        let mut a = self.filter_key();
        a.splice(1..2, ["add".to_string()]);
        a.extend(
            [
                "u32",
                "match",
                "ip",
                "dst",
                &format!("{}/32", self.address),
                "action",
                "mirred",
                "egress",
                "redirect",
                "dev",
                &self.ifb,
            ]
            .map(String::from),
        );
        a
    }

    /// `tc filter VERB dev UPLINK parent ffff: protocol ip prio P` with VERB a placeholder.
    fn filter_key(&self) -> Vec<String> {
        [
            "filter",
            "-",
            "dev",
            &self.uplink,
            "parent",
            "ffff:",
            "protocol",
            "ip",
            "prio",
            &self.prio.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }
}

/// The CRIU action script that starts the hold at `network-lock`; errors of its `tc` go to
/// `log`. It never fails the dump: a hold that did not start only loses its benefit. Pure.
pub fn script(h: &Hold, log: &Path) -> String {
    format!(
        "#!/bin/sh\n\
         # rebalancer-agent: divert {addr}'s inbound packets into {ifb} from CRIU's network lock\n\
         # on (migration/hold.rs). Other actions are not ours.\n\
         [ \"$CRTOOLS_SCRIPT_ACTION\" = network-lock ] || exit 0\n\
         tc {args} 2>>'{log}' || true\n\
         exit 0\n",
        addr = h.address,
        ifb = h.ifb,
        args = h.filter_args().join(" "),
        log = log.display().to_string().replace('\'', ""),
    )
}

/// What a released hold held, for the logs and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Packets the filter diverted into the hold (0 if the freeze never started it).
    pub packets: u64,
    pub bytes: u64,
    /// Whether the held queue was seen empty before its IFB went (else the rest was lost).
    pub drained: bool,
    /// From the release's start to the last held packet handed on.
    pub release_ms: u64,
}

/// The action script of a prepared hold, or `None` (logged: the migration goes on without).
pub fn prepared(
    r: Result<PathBuf, AgentError>,
    rec: &rebalancer_proto::MigrationRecord,
) -> Option<PathBuf> {
    r.map_err(|e| {
        tracing::warn!(migration = %rec.id, container = %rec.container, error = %e.chain(), "cannot hold the inbound packets; CRIU's lock drops them during the freeze");
    })
    .ok()
}

/// `(bytes, packets)` of the first `Sent N bytes M pkt` in `tc -s` output. Pure.
pub fn sent(tc_stats: &str) -> Option<(u64, u64)> {
    let rest = &tc_stats[tc_stats.find("Sent ")? + 5..];
    let mut w = rest.split_whitespace();
    let bytes = w.next()?.parse().ok()?;
    (w.next()? == "bytes").then_some(())?;
    let pkts = w.next()?.parse().ok()?;
    Some((bytes, pkts))
}

/// Packets waiting in the first `backlog Nb Mp` of `tc -s qdisc` output. Pure.
pub fn backlog_packets(tc_stats: &str) -> Option<u64> {
    let rest = &tc_stats[tc_stats.find("backlog ")? + 8..];
    rest.split_whitespace()
        .nth(1)?
        .strip_suffix('p')?
        .parse()
        .ok()
}

/// Uplinks whose ingress qdisc holds use: (holds active, whether a hold created it).
static INGRESS: Mutex<BTreeMap<String, (usize, bool)>> = Mutex::new(BTreeMap::new());

fn ingress() -> std::sync::MutexGuard<'static, BTreeMap<String, (usize, bool)>> {
    INGRESS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets the hold up (plugged, not yet diverting) and writes the action script into `dir`;
/// returns its path, for `criu dump --action-script`. Undoes what it did on failure.
pub async fn prepare(h: &Hold, dir: &Path) -> Result<PathBuf, AgentError> {
    // CRIU execs the script: a noexec directory would fail the dump, not just the hold.
    let noexec = nix::sys::statvfs::statvfs(dir)
        .map(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
        .map_err(|e| AgentError::Io {
            what: format!("statvfs {}", dir.display()),
            source: e.into(),
        })?;
    if noexec {
        return Err(AgentError::Unsupported(format!(
            "{} is mounted noexec: CRIU could not run the hold's action script",
            dir.display()
        )));
    }
    // Left by a migration of this address whose agent died: a fresh start.
    remove(h).await;
    let r = async {
        run_cmd("ip", &["link", "add", &h.ifb, "type", "ifb"]).await?;
        // No IPv6 on it: its router solicitations would queue behind the plug, counted as held.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", h.ifb),
            "1",
        );
        run_cmd("ip", &["link", "set", &h.ifb, "up"]).await?;
        run_cmd(
            "tc",
            &[
                "qdisc", "add", "dev", &h.ifb, "root", "tbf", "rate", PLUG_RATE, "burst",
                PLUG_BURST, "limit", HOLD_LIMIT,
            ],
        )
        .await?;
        let ifb = h.ifb.clone();
        // The first frame spends the bucket, the second waits at the head.
        tokio::task::spawn_blocking(move || send_plug_frames(&ifb, 2))
            .await
            .map_err(|e| AgentError::Internal(format!("plug task: {e}")))??;
        let stats = run_cmd("tc", &["-s", "qdisc", "show", "dev", &h.ifb]).await?;
        if backlog_packets(&stats) != Some(1) {
            return Err(AgentError::Internal(format!(
                "the hold on {} is not plugged (expected one frame waiting): {}",
                h.ifb,
                stats.trim()
            )));
        }
        ensure_ingress(&h.uplink).await?;
        let path = dir.join("hold.sh");
        let text = script(h, &dir.join("hold.log"));
        write_script(&path, &text)?;
        Ok::<_, AgentError>(path)
    }
    .await;
    if r.is_err() {
        remove(h).await;
    }
    r
}

fn write_script(path: &Path, text: &str) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| AgentError::Io {
            what: format!("write {}", path.display()),
            source,
        })
}

async fn ensure_ingress(uplink: &str) -> Result<(), AgentError> {
    let known = ingress().get(uplink).copied();
    match known {
        Some((n, created)) => {
            ingress().insert(uplink.to_string(), (n + 1, created));
        }
        None => {
            let shown = run_cmd("tc", &["qdisc", "show", "dev", uplink, "ingress"]).await?;
            let created = if shown.contains("ingress") {
                false
            } else {
                run_cmd("tc", &["qdisc", "add", "dev", uplink, "ingress"]).await?;
                true
            };
            let mut m = ingress();
            let e = m.entry(uplink.to_string()).or_insert((0, created));
            e.0 += 1;
        }
    }
    Ok(())
}

/// Hands on what the hold holds and removes it, whatever state it is in (also when it was
/// never prepared or never started). Errors are logged.
pub async fn release(h: &Hold) -> Released {
    let started = Instant::now();
    let mut out = Released::default();
    let exists = run_cmd("ip", &["link", "show", "dev", &h.ifb])
        .await
        .is_ok();
    if exists {
        if let Err(e) = run_cmd(
            "tc",
            &[
                "qdisc", "change", "dev", &h.ifb, "root", "tbf", "rate", "10gbit", "burst", "1mb",
                "limit", HOLD_LIMIT,
            ],
        )
        .await
        {
            tracing::warn!(ifb = %h.ifb, error = %e.chain(), "cannot open the hold; its packets are dropped");
        }
        let ifb = h.ifb.clone();
        // `change` keeps the queue but nothing dequeues it until the next frame arrives.
        match tokio::task::spawn_blocking(move || send_plug_frames(&ifb, 1)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(ifb = %h.ifb, error = %e.chain(), "cannot kick the released hold")
            }
            Err(e) => tracing::warn!(ifb = %h.ifb, error = %e, "cannot kick the released hold"),
        }
        while started.elapsed() < DRAIN_WITHIN {
            let stats = run_cmd("tc", &["-s", "qdisc", "show", "dev", &h.ifb])
                .await
                .unwrap_or_default();
            if backlog_packets(&stats) == Some(0) {
                out.drained = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        out.release_ms = started.elapsed().as_millis() as u64;
    }
    let mut show = h.filter_key();
    show[1] = "show".into();
    show.insert(0, "-s".into());
    let show: Vec<&str> = show.iter().map(String::as_str).collect();
    if let Ok(stats) = run_cmd("tc", &show).await {
        if let Some((bytes, packets)) = sent(&stats) {
            out.bytes = bytes;
            out.packets = packets;
        }
    }
    remove(h).await;
    if exists && last_hold_on(&h.uplink) {
        let _ = run_cmd("tc", &["qdisc", "del", "dev", &h.uplink, "ingress"]).await;
    }
    out
}

/// Counts a hold on `uplink` off; whether it was the last one and the ingress qdisc is a
/// hold's (so that it goes too).
fn last_hold_on(uplink: &str) -> bool {
    let mut m = ingress();
    let Some(e) = m.get_mut(uplink) else {
        return false;
    };
    e.0 = e.0.saturating_sub(1);
    if e.0 > 0 {
        return false;
    }
    let created = e.1;
    m.remove(uplink);
    created
}

/// Addresses of the holds whose IFBs `ip -o link show type ifb` lists. Pure.
pub fn held_addresses(links: &str) -> Vec<Ipv4Addr> {
    links
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|n| n.trim_end_matches(':').split('@').next())
        .filter_map(|n| n.strip_prefix("rbh"))
        .filter(|h| h.len() == 8)
        .filter_map(|h| u32::from_str_radix(h, 16).ok())
        .map(Ipv4Addr::from)
        .collect()
}

/// Releases every hold left on this node (an agent killed mid-migration): at start, before
/// anything is adopted. The packets go wherever the node routes their addresses now.
pub async fn sweep(uplink: &str) {
    let links = run_cmd("ip", &["-o", "link", "show", "type", "ifb"])
        .await
        .unwrap_or_default();
    for a in held_addresses(&links) {
        if let Ok(h) = Hold::new(uplink, a) {
            // Not counted by this process: its ingress qdisc stays (it may be anyone's).
            let r = release(&h).await;
            tracing::warn!(address = %a, ifb = %h.ifb, held_packets = r.packets, "released an inbound hold left by an earlier agent");
        }
    }
}

/// The filter and the IFB (its qdisc goes with it); absent ones are fine.
async fn remove(h: &Hold) {
    let mut del = h.filter_key();
    del[1] = "del".into();
    let del: Vec<&str> = del.iter().map(String::as_str).collect();
    let _ = run_cmd("tc", &del).await;
    let _ = run_cmd("ip", &["link", "del", "dev", &h.ifb]).await;
}

/// A plug frame: broadcast, a locally administered source, [`ETH_P_PLUG`], zeros. Pure.
pub fn plug_frame() -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + PLUG_PAYLOAD);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ETH_P_PLUG.to_be_bytes());
    f.resize(14 + PLUG_PAYLOAD, 0);
    f
}

/// Sends `count` plug frames into `ifname`'s qdisc (blocking; call off the runtime).
fn send_plug_frames(ifname: &str, count: u32) -> Result<(), AgentError> {
    crate::garp::broadcast(
        ifname,
        ETH_P_PLUG,
        &plug_frame(),
        count,
        Duration::ZERO,
        "a plug frame",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_distinct_and_shell_safe() {
        let a = Hold::new("eth0", Ipv4Addr::new(198, 19, 16, 5)).expect("hold");
        let b = Hold::new("eth0", Ipv4Addr::new(198, 19, 16, 6)).expect("hold");
        assert_eq!(a.ifb, "rbhc6131005");
        assert!(a.ifb.len() <= 15);
        assert_ne!(a.ifb, b.ifb);
        assert_ne!(a.prio, b.prio);
        assert!((1..=65000).contains(&a.prio));
        assert!(Hold::new("eth0'; rm -rf /", Ipv4Addr::LOCALHOST).is_err());
        assert!(Hold::new("", Ipv4Addr::LOCALHOST).is_err());
        assert!(Hold::new("a-very-long-name0", Ipv4Addr::LOCALHOST).is_err());
    }

    #[test]
    fn the_script_diverts_at_the_network_lock_only_and_never_fails_the_dump() {
        let h = Hold::new("up0", Ipv4Addr::new(198, 19, 16, 5)).expect("hold");
        let s = script(&h, Path::new("/run/x/hold.log"));
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("[ \"$CRTOOLS_SCRIPT_ACTION\" = network-lock ] || exit 0"));
        let expect = format!(
            "tc filter add dev up0 parent ffff: protocol ip prio {} u32 match ip dst \
             198.19.16.5/32 action mirred egress redirect dev rbhc6131005 2>>'/run/x/hold.log' || true",
            h.prio
        );
        assert!(s.contains(&expect), "{s}");
        assert!(s.trim_end().ends_with("exit 0"));
    }

    #[test]
    fn tc_statistics_are_read() {
        let qdisc = "qdisc tbf 8003: root refcnt 2 rate 800bit burst 1600b lat 3.78e+03s \n \
                     Sent 5404 bytes 12 pkt (dropped 0, overlimits 4 requeues 0) \n \
                     backlog 1784b 4p requeues 0\n";
        assert_eq!(sent(qdisc), Some((5404, 12)));
        assert_eq!(backlog_packets(qdisc), Some(4));
        assert_eq!(backlog_packets(" backlog 0b 0p requeues 0"), Some(0));
        assert_eq!(sent("nothing"), None);
        assert_eq!(backlog_packets("backlog x"), None);
    }

    #[test]
    fn left_holds_are_found_by_their_ifb_names() {
        let links =
            "7: rbhc6131005: <BROADCAST,NOARP,UP,LOWER_UP> mtu 1500 qdisc tbf state UNKNOWN\n\
                     8: ifb0: <BROADCAST,NOARP> mtu 1500 qdisc noop state DOWN\n\
                     9: rbhzz: <BROADCAST,NOARP> mtu 1500\n";
        assert_eq!(held_addresses(links), [Ipv4Addr::new(198, 19, 16, 5)]);
        assert!(held_addresses("").is_empty());
    }

    #[test]
    fn a_plug_frame_is_a_full_frame_no_stack_takes() {
        let f = plug_frame();
        assert_eq!(f.len(), 1514);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        assert_eq!(f[6] & 0x02, 0x02, "locally administered source");
    }
}
