use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rebalancer_proto::{BlockState, IpamMode, LentAddress};

use super::*;
use crate::journal::Journal;

fn cfg(toml_text: &str) -> Result<IpamConfig, Invalid> {
    let raw: RawIpam = toml::from_str(toml_text).expect("toml");
    raw.validate()
}

fn journal(dir: &tempfile::TempDir) -> Journal {
    Journal::open(&dir.path().join("j.redb")).expect("journal")
}

fn leases(j: &Journal) -> Leases {
    Leases::load(cfg("").expect("defaults"), j).expect("load")
}

fn state(blocks: &[u32], want: bool, lent: &[(Ipv4Addr, &str)]) -> BlockState {
    BlockState {
        mode: IpamMode::Leased,
        blocks: blocks.to_vec(),
        free: 10,
        used: 0,
        lent: lent
            .iter()
            .map(|(a, c)| LentAddress {
                address: a.to_string(),
                container: c.to_string(),
            })
            .collect(),
        want_block: want,
    }
}

/// A round in which `answered` answered, of `polled`, with these live containers.
fn round(answered: &[&str], polled: &[&str], live: &[(&str, Ipv4Addr, &str)]) -> Round {
    let mut by: BTreeMap<String, Vec<(Ipv4Addr, String)>> = BTreeMap::new();
    for (n, a, c) in live {
        by.entry(n.to_string())
            .or_default()
            .push((*a, c.to_string()));
    }
    Round {
        answered: answered.iter().map(|s| s.to_string()).collect(),
        members: Some(polled.iter().map(|s| s.to_string()).collect()),
        polled: polled.iter().map(|s| s.to_string()).collect(),
        live: by,
        in_flight: BTreeSet::new(),
    }
}

#[test]
fn the_section_has_defaults_and_names_what_is_wrong() {
    let c = cfg("").expect("defaults");
    assert!(c.enabled);
    assert_eq!(c.pool.to_string(), "198.19.0.0/20");
    assert_eq!((c.pool.block, c.low_water), (26, 8));
    assert_eq!(c.grace, Duration::from_secs(600));
    let e = cfg("subnet = \"198.19.0.1/20\"\n").expect_err("host bits");
    assert_eq!(e.1, "ipam.subnet");
    assert!(e.2.contains("host bits"), "{}", e.2);
    let e = cfg("subnet = \"198.19.0.0/24\"\nblock_prefix = 20\n").expect_err("block");
    assert_eq!(e.1, "ipam.block_prefix");
    let e = cfg("low_water = 64\n").expect_err("low water");
    assert!(e.2.contains("not below the 64 addresses"), "{}", e.2);
    let e = cfg("grace_s = 1\n").expect_err("grace");
    assert_eq!(e.1, "ipam.grace_s");
    assert!(toml::from_str::<RawIpam>("blocks = 3\n").is_err());
}

#[test]
fn a_configuration_file_positions_an_ipam_error() {
    let text = "[ipam]\nsubnet = \"10.0.0.0/40\"\n";
    let e =
        crate::config::Config::from_str_at(text, std::path::Path::new("c.toml")).expect_err("bad");
    let msg = e.to_string();
    assert!(msg.contains("c.toml:2"), "{msg}");
    assert!(msg.contains("ipam.subnet"), "{msg}");
}

#[test]
fn a_block_is_journaled_when_an_agent_asks_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = journal(&dir);
    let l = leases(&j);
    let now = Instant::now();
    let plan = l.plan(&round(&["n1"], &["n1"], &[]), &j, now);
    assert!(
        plan["n1"].blocks.is_empty(),
        "nothing leased before it asks"
    );
    let again = l
        .answered("n1", state(&[], true, &[]), &BTreeSet::new(), &j)
        .expect("a lease to send");
    assert_eq!(again.blocks, vec![0]);
    assert_eq!(j.block_leases().expect("journal")[&0], "n1");
    // A block with a live address (a container that moved off a reclaimed block) is skipped.
    let live: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(198, 19, 0, 70)].into();
    let more = l
        .answered("n2", state(&[], true, &[]), &live, &j)
        .expect("lease");
    assert_eq!(more.blocks, vec![2]);
    assert!(l
        .answered("n1", state(&[0], false, &[]), &live, &j)
        .is_none());
    drop(l);
    let back = leases(&j);
    assert_eq!(back.blocks_of("n1"), vec![0]);
    assert_eq!(back.blocks_of("n2"), vec![2]);
    let v = back.view();
    assert_eq!(v[0].blocks, vec!["198.19.0.0/26".to_string()]);
    // Each poll re-sends the whole set: a restarted agent has its blocks at once.
    let plan = back.plan(
        &round(&["n1", "n2"], &["n1", "n2"], &[]),
        &j,
        Instant::now(),
    );
    assert_eq!(plan["n2"].blocks, vec![2]);
}

#[test]
fn a_lent_address_is_released_after_two_complete_quiet_rounds_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = journal(&dir);
    let l = leases(&j);
    let a = Ipv4Addr::new(198, 19, 0, 5);
    l.answered("n1", state(&[], true, &[]), &BTreeSet::new(), &j);
    l.answered("n1", state(&[0], false, &[(a, "c1")]), &BTreeSet::new(), &j);
    let both = ["n1", "n2"];
    let t = Instant::now();
    // c1 runs on n2: never released.
    for _ in 0..3 {
        let p = l.plan(&round(&both, &both, &[("n2", a, "c1")]), &j, t);
        assert!(p["n1"].released.is_empty());
    }
    // c1 ended, but n2 did not answer: not a complete round.
    let p = l.plan(&round(&["n1"], &both, &[]), &j, t);
    assert!(p["n1"].released.is_empty());
    // In flight (between the source's commit and the destination's listing): held.
    let mut r = round(&both, &both, &[]);
    r.in_flight.insert("c1".into());
    assert!(l.plan(&r, &j, t)["n1"].released.is_empty());
    // Two complete rounds without it: released in the second.
    assert!(l.plan(&round(&both, &both, &[]), &j, t)["n1"]
        .released
        .is_empty());
    let p = l.plan(&round(&both, &both, &[]), &j, t);
    assert_eq!(p["n1"].released, vec![a.to_string()]);
    // The agent no longer reports it lent: nothing more to release.
    l.answered("n1", state(&[0], false, &[]), &BTreeSet::new(), &j);
    assert!(l.plan(&round(&both, &both, &[]), &j, t)["n1"]
        .released
        .is_empty());
}

#[test]
fn blocks_of_a_node_that_left_are_reclaimed_once_nothing_live_holds_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = journal(&dir);
    let l = leases(&j);
    l.answered("n1", state(&[], true, &[]), &BTreeSet::new(), &j);
    l.answered("n1", state(&[0], true, &[]), &BTreeSet::new(), &j);
    assert_eq!(l.blocks_of("n1"), vec![0, 1]);
    let t = Instant::now();
    // n1 removed from Slurm and the config; a container that moved to n2 keeps 198.19.0.9.
    let moved = Ipv4Addr::new(198, 19, 0, 9);
    let p = l.plan(&round(&["n2"], &["n2"], &[("n2", moved, "c1")]), &j, t);
    assert!(!p.contains_key("n1"));
    assert_eq!(l.blocks_of("n1"), vec![0], "block 1 was empty");
    assert_eq!(j.block_leases().expect("journal").len(), 1);
    // It ended: block 0 goes back too, and the journal says so.
    l.plan(&round(&["n2"], &["n2"], &[]), &j, t);
    assert!(l.blocks_of("n1").is_empty());
    assert!(j.block_leases().expect("journal").is_empty());
}

#[test]
fn an_agent_silent_past_the_grace_loses_its_empty_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = journal(&dir);
    let l = leases(&j);
    l.answered("n1", state(&[], true, &[]), &BTreeSet::new(), &j);
    let t = Instant::now();
    let both = ["n1", "n2"];
    l.plan(&round(&both, &both, &[]), &j, t);
    // Unreachable, still a member: kept within the grace, reclaimed after it.
    l.plan(
        &round(&["n2"], &both, &[]),
        &j,
        t + Duration::from_secs(300),
    );
    assert_eq!(l.blocks_of("n1"), vec![0]);
    l.plan(
        &round(&["n2"], &both, &[]),
        &j,
        t + Duration::from_secs(601),
    );
    assert!(l.blocks_of("n1").is_empty());
}

#[test]
fn a_journal_of_another_pool_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = journal(&dir);
    j.put_block_lease(100, "n1").expect("lease");
    let e = Leases::load(cfg("").expect("defaults"), &j).expect_err("block 100 of 64");
    assert!(e.contains("another [ipam] subnet"), "{e}");
}

#[test]
fn a_local_agent_takes_no_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = journal(&dir);
    let l = leases(&j);
    let mut s = state(&[], true, &[]);
    s.mode = IpamMode::Local;
    assert!(l.answered("n1", s, &BTreeSet::new(), &j).is_none());
    assert!(l.blocks_of("n1").is_empty());
}

#[test]
fn the_blocks_view_counts_live_and_lent_addresses_per_block_and_keeps_the_lease_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = journal(&dir);
    let l = leases(&j);
    let before = rebalancer_proto::now_millis();
    l.answered("n1", state(&[], true, &[]), &BTreeSet::new(), &j)
        .expect("a lease for n1");
    l.answered("n2", state(&[], true, &[]), &BTreeSet::new(), &j)
        .expect("a lease for n2");
    let after = rebalancer_proto::now_millis();
    // n1's block 0 holds .5 (live on n1) and .9, lent: its container moved to n2, where it is
    // live with that address; n2's block 1 holds .70.
    let (a5, a9, a70) = (
        Ipv4Addr::new(198, 19, 0, 5),
        Ipv4Addr::new(198, 19, 0, 9),
        Ipv4Addr::new(198, 19, 0, 70),
    );
    assert!(l
        .answered(
            "n1",
            state(&[0], false, &[(a9, "j1.s0.t0")]),
            &BTreeSet::new(),
            &j
        )
        .is_none());
    let live: BTreeSet<Ipv4Addr> = [a5, a9, a70].into();
    let v = l.statuses(&live);
    let rows: Vec<(&str, &str, u32, u32, u32)> = v
        .iter()
        .map(|b| {
            (
                b.block.as_str(),
                b.node.as_str(),
                b.addresses,
                b.live,
                b.lent,
            )
        })
        .collect();
    // The subnet's own network address is no container's: the first block has 63.
    assert_eq!(
        rows,
        vec![
            ("198.19.0.0/26", "n1", 63, 2, 1),
            ("198.19.0.64/26", "n2", 64, 1, 0)
        ]
    );
    for b in &v {
        let at = b.leased_at.expect("a lease time");
        assert!(
            (before..=after).contains(&at),
            "{at} not in {before}..={after}"
        );
    }
    // The time is journaled with the lease: a restarted controller shows the same.
    drop(l);
    let back = leases(&j);
    assert_eq!(back.statuses(&live)[0].leased_at, v[0].leased_at);
}
