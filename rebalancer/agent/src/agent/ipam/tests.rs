use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rebalancer_proto::{BlockLease, ContainerState, IpamMode, RootfsSpec};

use super::*;
use crate::agent::Agent;
use crate::store::{ContainerRecord, Store};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    Dir(std::env::temp_dir().join(format!("rb-ipam-{tag}-{:08x}", crate::agent::random_u32())))
}

fn agent(d: &Path, extra: &str) -> Arc<Agent> {
    let toml = format!(
        "node = \"n1\"\nlisten = \"198.18.0.1:7878\"\ncontainer_subnet = \"198.19.0.0/20\"\n{extra}\
         run_dir = \"{}\"\nstate_dir = \"{}\"\n[auth]\nmethod = \"none\"\n",
        d.join("run").display(),
        d.join("state").display(),
    );
    let cfg = crate::config::AgentConfig::from_toml(&toml, Path::new("t.toml")).expect("config");
    let caps = rebalancer_proto::NodeCapabilities {
        node: "n1".into(),
        criu_version: None,
        criu_path: None,
        uffd: false,
        tcp_established: false,
        nftables_lock: false,
        dirty_tracking: false,
        modes: vec![],
        notes: vec![],
    };
    let mut a = Agent::new(cfg, caps);
    Arc::get_mut(&mut a).expect("sole owner").cgroups = None;
    let store = Store::open(&d.join("state")).expect("store");
    load(&a, &store);
    a.store.set(store).expect("store set once");
    a
}

fn lease(blocks: &[u32], prefix: u8, released: &[Ipv4Addr], low_water: u32) -> BlockLease {
    BlockLease {
        pool: "198.19.0.0/20".into(),
        block_prefix: prefix,
        blocks: blocks.to_vec(),
        released: released.iter().map(|a| a.to_string()).collect(),
        low_water,
    }
}

/// A container holding `address`, in `state`.
fn put_container(a: &Agent, id: &str, address: Ipv4Addr, state: ContainerState) {
    let rec = ContainerRecord {
        version: crate::store::RECORD_VERSION,
        meta: crate::container::ContainerMeta {
            spec: rebalancer_proto::ContainerSpec {
                id: id.into(),
                task: None,
                uid: 1000,
                gid: 1000,
                argv: vec!["/bin/true".into()],
                env: vec![],
                cwd: "/".into(),
                rootfs: RootfsSpec::Host,
                binds: vec![],
                memory_limit: None,
                cpus: None,
                class: None,
                address: Some(address.to_string()),
                stdout: None,
                stderr: None,
            },
            address,
            mounts: vec![],
            symlinks: vec![],
            stdio_keys: vec![],
            stdio_paths: vec![],
            started_at: 1,
        },
        netns: format!("rb-n1-{id}"),
        veth: "rbv0".into(),
        address,
        root: "/nonexistent".into(),
        dir: "/nonexistent".into(),
        pid: 1,
        pid_start: 1,
        state,
        external: true,
        arrived_from: None,
        cgroup: vec![],
        runs_in: None,
        waiter: None,
    };
    a.adopt_container(rec.container(state));
}

fn set_state(a: &Agent, id: &str, state: ContainerState) {
    if let Some(c) = a.containers().get_mut(id) {
        c.state = state;
    }
}

#[test]
fn without_a_block_a_task_is_refused_with_what_to_do() {
    let d = dir("none");
    let a = agent(&d.0, "");
    let e = allocate(&a).expect_err("no block yet");
    let msg = e.to_string();
    assert_eq!(e.code(), rebalancer_proto::ErrorCode::NoRoom);
    assert!(
        msg.contains("n1 has no container address block yet"),
        "{msg}"
    );
    assert!(msg.contains("ipam = \"local\""), "{msg}");
}

/// A task started before its node's first lease waits for it and gets an address of the
/// leased block as soon as the lease arrives.
#[tokio::test]
async fn a_task_started_before_the_first_lease_waits_for_it() {
    let d = dir("wait");
    let a = agent(&d.0, "");
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let r = allocate_waiting(&a, Duration::from_secs(20)).await;
            (r, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "answered before any lease");
    lease_ok(&a, lease(&[3], 26, &[], 4));
    let (r, took) = waiter.await.expect("join");
    let addr = r.expect("an address once leased");
    let pool = Pool::new(Ipv4Addr::new(198, 19, 0, 0), 20, 26).expect("pool");
    assert_eq!(pool.block_of(addr), Some(3), "{addr} is not of block 3");
    eprintln!("allocation answered {took:?} after it started (lease sent at 300 ms)");
}

/// With no lease coming (the controller down on a new node), the wait ends in the refusal,
/// which says what is missing and how long it waited.
#[tokio::test]
async fn with_no_lease_coming_the_wait_ends_in_a_clear_refusal() {
    let d = dir("nolease");
    let a = agent(&d.0, "");
    let t0 = std::time::Instant::now();
    let e = allocate_waiting(&a, Duration::from_millis(400))
        .await
        .expect_err("no lease came");
    let took = t0.elapsed();
    let msg = e.to_string();
    assert_eq!(e.code(), rebalancer_proto::ErrorCode::NoRoom);
    assert!(
        msg.contains("n1 has no container address block yet"),
        "{msg}"
    );
    assert!(msg.contains("waited 0.4 s for a lease"), "{msg}");
    assert!(took >= Duration::from_millis(400), "{took:?}");
}

/// `ipam = "local"` never waits: it has no lease to wait for.
#[tokio::test]
async fn local_mode_does_not_wait() {
    let d = dir("localwait");
    let a = agent(&d.0, "ipam = \"local\"\n");
    let t0 = std::time::Instant::now();
    allocate_waiting(&a, Duration::from_secs(20))
        .await
        .expect("a local address");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn addresses_come_from_the_leased_blocks_and_survive_a_restart() {
    let d = dir("lease");
    let a = agent(&d.0, "");
    let st = lease_ok(&a, lease(&[2], 26, &[], 70));
    assert_eq!(st.blocks, vec![2]);
    assert_eq!(st.free, 64);
    assert!(st.want_block, "64 free < low water 70");
    // Two tasks prepared back to back get two addresses of 198.19.0.128/26, with no container
    // record yet for either.
    let x = allocate(&a).expect("x");
    let y = allocate(&a).expect("y");
    assert_ne!(x, y);
    for ip in [x, y] {
        assert_eq!(
            u32::from(ip) & !63,
            u32::from(Ipv4Addr::new(198, 19, 0, 128)),
            "{ip}"
        );
    }
    put_container(&a, "c1", x, ContainerState::Running);
    // The lease is on disk before it was answered; a restarted agent allocates from it at once
    // (the controller down), never the adopted container's address.
    drop(a);
    let b = agent(&d.0, "");
    assert_eq!(b.ipam.blocks(), vec![2]);
    put_container(&b, "c1", x, ContainerState::Running);
    for _ in 0..10 {
        let z = allocate(&b).expect("z");
        assert_ne!(z, x, "the adopted container's address");
        assert_eq!(
            u32::from(z) & !63,
            u32::from(Ipv4Addr::new(198, 19, 0, 128))
        );
    }
}

fn lease_ok(a: &Agent, l: BlockLease) -> rebalancer_proto::BlockState {
    super::lease(a, l).expect("lease")
}

#[test]
fn a_moved_container_keeps_its_address_lent_until_the_controller_releases_it() {
    let d = dir("lent");
    let a = agent(&d.0, "");
    // A /30 block: 198.19.0.5 and .6 usable here, .4 and .7 too (only the pool's own network
    // and broadcast addresses are excluded).
    lease_ok(&a, lease(&[1], 30, &[], 0));
    let x = allocate(&a).expect("x");
    put_container(&a, "c1", x, ContainerState::Running);
    sync(&a);
    set_state(&a, "c1", ContainerState::MigratedAway);
    sync(&a);
    assert!(a.ipam.lent().contains(&x));
    let st = lease_ok(&a, lease(&[1], 30, &[], 0));
    assert_eq!(st.lent.len(), 1);
    assert_eq!(st.lent[0].address, x.to_string());
    assert_eq!(st.lent[0].container, "c1");
    // Every other address of the block can be handed out, never x.
    let mut got = Vec::new();
    while let Ok(ip) = allocate(&a) {
        got.push(ip);
    }
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(!got.contains(&x));
    // The controller saw c1 end elsewhere: x is released, and the record of the move that is
    // still here does not lend it again.
    let st = lease_ok(&a, lease(&[1], 30, &[x], 0));
    assert!(st.lent.is_empty());
    sync(&a);
    assert!(!a.ipam.lent().contains(&x));
}

#[test]
fn an_arrival_from_another_block_is_used_here_and_not_ours() {
    let d = dir("arrive");
    let a = agent(&d.0, "");
    lease_ok(&a, lease(&[0], 26, &[], 0));
    let foreign = Ipv4Addr::new(198, 19, 3, 10);
    a.incoming().insert(("c9".into(), foreign));
    let st = lease_ok(&a, lease(&[0], 26, &[], 0));
    assert_eq!(st.used, 1);
    assert_eq!(
        st.free, 63,
        "an address of another block takes none of ours"
    );
    a.incoming().clear();
    put_container(&a, "c9", foreign, ContainerState::Running);
    sync(&a);
    set_state(&a, "c9", ContainerState::MigratedAway);
    sync(&a);
    assert!(a.ipam.lent().is_empty(), "not ours to lend");
}

#[test]
fn a_lease_of_another_pool_or_block_is_refused_naming_it() {
    let d = dir("bad");
    let a = agent(&d.0, "");
    let mut l = lease(&[0], 26, &[], 0);
    l.pool = "198.18.0.0/16".into();
    let e = super::lease(&a, l).expect_err("outside");
    assert!(
        e.to_string()
            .contains("198.18.0.0/16 is not inside this node's container_subnet 198.19.0.0/20"),
        "{e}"
    );
    let e = super::lease(&a, lease(&[64], 26, &[], 0)).expect_err("block 64");
    assert!(
        e.to_string()
            .contains("block 64 is not a block of 198.19.0.0/20"),
        "{e}"
    );
    let mut l = lease(&[0], 26, &[], 0);
    l.released = vec!["x".into()];
    assert!(super::lease(&a, l).is_err());
    assert!(
        a.ipam.blocks().is_empty(),
        "nothing adopted from a refused lease"
    );
}

#[test]
fn local_mode_picks_alone_and_takes_no_block() {
    let d = dir("local");
    let a = agent(&d.0, "ipam = \"local\"\n");
    assert_eq!(a.cfg.ipam, IpamMode::Local);
    let st = lease_ok(&a, lease(&[0], 26, &[], 8));
    assert_eq!(st.mode, IpamMode::Local);
    assert!(st.blocks.is_empty() && !st.want_block);
    let x = allocate(&a).expect("x");
    assert!(a.cfg.container_subnet.contains(x));
}

#[test]
fn an_unknown_mode_is_refused_with_the_choices() {
    let e = crate::config::AgentConfig::from_toml(
        "node = \"n1\"\nlisten = \"198.18.0.1:7878\"\nipam = \"dhcp\"\n[auth]\nmethod = \"none\"\n",
        Path::new("t.toml"),
    )
    .expect_err("dhcp");
    let msg = e.to_string();
    assert!(msg.contains("leased") && msg.contains("local"), "{msg}");
}
