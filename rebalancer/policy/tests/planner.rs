//! Planner behaviour: hysteresis, cooldowns, limits, priorities, actions, scope, fit, determinism.

mod common;

use common::{container, node, set as policies, view, DRAIN, LOAD, THERMAL};
use rebalancer_policy::{
    plan, ClusterView, DecisionAction, InFlight, MigrationMode, Plan, PolicyState, RejectCode,
    SkipCode,
};

fn moves(p: &Plan) -> Vec<(String, String, String)> {
    p.decisions
        .iter()
        .map(|d| (d.container.clone(), d.source.clone(), d.destination.clone()))
        .collect()
}

fn skip_codes(p: &Plan, container: &str) -> Vec<SkipCode> {
    p.skips
        .iter()
        .filter(|s| s.container.as_deref() == Some(container))
        .map(|s| s.code)
        .collect()
}

/// n1 runs hot at `temp`; n2 and n3 are cool; one container on n1.
fn thermal_view(temp: f64, now: u64) -> ClusterView {
    let mut n1 = node("n1");
    n1.temperature_c = Some(temp);
    let mut n2 = node("n2");
    n2.temperature_c = Some(60.0);
    let mut n3 = node("n3");
    n3.temperature_c = Some(55.0);
    view(vec![n1, n2, n3], vec![container("c1", 1, "n1")], now)
}

#[test]
fn hysteresis_does_not_flap_on_oscillation_inside_the_band() {
    let set = policies(&[("thermal.toml", THERMAL)]);
    let mut state = PolicyState::default();
    // Alternates across `high` (85) but never holds there for the 2 samples required.
    for (i, t) in [86.0, 84.0, 87.0, 80.0, 85.5, 79.0, 86.0, 83.0]
        .iter()
        .enumerate()
    {
        let p = plan(&set, &thermal_view(*t, 100 + i as u64 * 10), &mut state);
        assert!(
            p.decisions.is_empty(),
            "sample {i} ({t} °C) produced {:?}",
            moves(&p)
        );
    }
    // Inside the band only: nothing either, and the node is reported as in band.
    for (i, t) in [80.0, 84.9, 79.0, 84.0].iter().enumerate() {
        let p = plan(&set, &thermal_view(*t, 200 + i as u64 * 10), &mut state);
        assert!(p.decisions.is_empty());
        assert!(p
            .skips
            .iter()
            .any(|s| s.code == SkipCode::InBand && s.node == "n1"));
    }
}

#[test]
fn hysteresis_acts_after_n_samples_and_holds_until_below_low() {
    let set = policies(&[("thermal.toml", THERMAL)]);
    let mut state = PolicyState::default();
    let p = plan(&set, &thermal_view(90.0, 100), &mut state);
    assert!(p.decisions.is_empty());
    assert!(p
        .skips
        .iter()
        .any(|s| s.code == SkipCode::HysteresisPending));
    // Same timestamp again does not count as a second sample.
    let p = plan(&set, &thermal_view(90.0, 100), &mut state);
    assert!(p.decisions.is_empty());
    let p = plan(&set, &thermal_view(90.0, 110), &mut state);
    assert_eq!(p.decisions.len(), 1, "second sample above high triggers");
    assert_eq!(state.track("thermal", "n1").map(|t| t.active), Some(true));
    // Falls into the band: still active (keeps relieving the node).
    let p = plan(&set, &thermal_view(80.0, 120), &mut state);
    assert_eq!(
        p.decisions.len(),
        1,
        "active node inside the band keeps acting"
    );
    // Below low: released.
    let p = plan(&set, &thermal_view(77.0, 130), &mut state);
    assert!(p.decisions.is_empty());
    assert!(state.track("thermal", "n1").is_none());
}

#[test]
fn min_duration_delays_action() {
    let text = THERMAL
        .replace("samples = 2", "samples = 1")
        .replace("min_duration_s = 0", "min_duration_s = 60");
    let set = policies(&[("thermal.toml", &text)]);
    let mut state = PolicyState::default();
    assert!(plan(&set, &thermal_view(90.0, 1000), &mut state)
        .decisions
        .is_empty());
    assert!(plan(&set, &thermal_view(90.0, 1059), &mut state)
        .decisions
        .is_empty());
    assert_eq!(
        plan(&set, &thermal_view(90.0, 1060), &mut state)
            .decisions
            .len(),
        1
    );
}

#[test]
fn thermal_moves_to_the_coolest_node_that_fits() {
    let set = policies(&[("thermal.toml", THERMAL)]);
    let mut n1 = node("n1");
    n1.temperature_c = Some(92.0);
    let mut coolest_full = node("a-cold-but-full");
    coolest_full.temperature_c = Some(30.0);
    coolest_full.cpus_alloc = 30;
    let mut cool = node("n2");
    cool.temperature_c = Some(45.0);
    let mut warmer = node("n3");
    warmer.temperature_c = Some(50.0);
    let mut too_warm = node("n4");
    too_warm.temperature_c = Some(74.0); // above low (78) - headroom (5)
    let v = view(
        vec![n1, coolest_full, warmer, cool, too_warm],
        vec![container("c1", 1, "n1")],
        0,
    );
    let mut state = PolicyState::default();
    let _ = plan(&set, &v, &mut state);
    let mut v2 = v.clone();
    v2.now = 10;
    let p = plan(&set, &v2, &mut state);
    assert_eq!(moves(&p), [("c1".into(), "n1".into(), "n2".into())]);
    let d = &p.decisions[0];
    assert_eq!(d.action, DecisionAction::Migrate);
    assert_eq!(d.mode, MigrationMode::PostCopy);
    let s = &d.why.destination;
    assert_eq!(s.candidates, 4);
    assert_eq!(s.fitting, 2);
    assert_eq!(
        s.ranked.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(),
        ["n2", "n3"]
    );
    assert_eq!(s.rejected.get(&RejectCode::InsufficientCpus), Some(&1));
    assert_eq!(s.rejected.get(&RejectCode::TooHot), Some(&1));
    assert!(s
        .rejected_examples
        .iter()
        .any(|r| r.node == "n4" && r.reason.contains("74.0 °C")));
    assert!(d.why.summary.contains("coolest"), "{}", d.why.summary);
}

#[test]
fn destination_fit_rejects_draining_full_and_hot_nodes() {
    let set = policies(&[("drain.toml", DRAIN)]);
    let mut src = node("src");
    src.flags.drain = true;
    let mut draining = node("d1");
    draining.flags.draining = true;
    let mut down = node("d2");
    down.flags.down = true;
    let mut reboot = node("d3");
    reboot.flags.reboot_asap = true;
    let mut full_cpu = node("f1");
    full_cpu.cpus_alloc = 30;
    let mut full_mem = node("f2");
    full_mem.mem_alloc_mb = full_mem.mem_total_mb - 1000;
    let mut other_part = node("p1");
    other_part.partitions = vec!["debug".into()];
    let mut no_mode = node("m1");
    no_mode.modes = vec![MigrationMode::PreCopy];
    let v = view(
        vec![
            src, draining, down, reboot, full_cpu, full_mem, other_part, no_mode,
        ],
        vec![container("c1", 1, "src")],
        0,
    );
    let p = plan(&set, &v, &mut PolicyState::default());
    assert!(p.decisions.is_empty());
    let skip = p
        .skips
        .iter()
        .find(|s| s.code == SkipCode::NoDestination)
        .expect("a no-destination skip");
    let search = skip.search.as_ref().expect("search details");
    assert_eq!(search.fitting, 0);
    assert_eq!(search.rejected.get(&RejectCode::Unavailable), Some(&3));
    assert_eq!(search.rejected.get(&RejectCode::InsufficientCpus), Some(&1));
    assert_eq!(
        search.rejected.get(&RejectCode::InsufficientMemory),
        Some(&1)
    );
    assert_eq!(search.rejected.get(&RejectCode::WrongPartition), Some(&1));
    assert_eq!(search.rejected.get(&RejectCode::NoCommonMode), Some(&1));
    assert!(
        skip.reason.starts_with("no destination fits"),
        "{}",
        skip.reason
    );

    // A hot node is rejected when the policy caps destination temperature.
    let capped = DRAIN.to_owned() + "[destination]\nmax_temperature_c = 70\n";
    let set = policies(&[("drain.toml", &capped)]);
    let mut src = node("src");
    src.flags.drain = true;
    let mut hot = node("hot");
    hot.temperature_c = Some(75.0);
    let ok = node("ok");
    let v = view(vec![src, hot, ok], vec![container("c1", 1, "src")], 0);
    let p = plan(&set, &v, &mut PolicyState::default());
    assert_eq!(moves(&p), [("c1".into(), "src".into(), "ok".into())]);
    assert_eq!(
        p.decisions[0]
            .why
            .destination
            .rejected
            .get(&RejectCode::TooHot),
        Some(&1)
    );
}

#[test]
fn load_moves_from_an_overloaded_node_to_the_least_loaded() {
    let set = policies(&[("load.toml", LOAD)]);
    let mut busy = node("busy");
    busy.load = 48.0; // 1.5 per CPU
    let mut mid = node("mid");
    mid.load = 16.0;
    let mut idle = node("idle");
    idle.load = 2.0;
    let mut quiet = node("quiet");
    quiet.load = 8.0;
    let mut big = container("big", 1, "busy");
    big.cpus = 8;
    let v = view(
        vec![busy, mid, idle, quiet],
        vec![container("small", 2, "busy"), big],
        0,
    );
    let p = plan(&set, &v, &mut PolicyState::default());
    assert_eq!(
        moves(&p),
        [("big".into(), "busy".into(), "idle".into())],
        "most CPUs first, to the least loaded"
    );
    let why = &p.decisions[0].why;
    assert!(why.summary.contains("load per CPU 1.50"), "{}", why.summary);
    assert!(why.selection.contains("candidate 1 of 2"));
    // max_per_node = 1: the other container waits.
    assert_eq!(skip_codes(&p, "small"), [SkipCode::NodeQuotaReached]);
}

#[test]
fn job_and_node_cooldowns_hold() {
    let text = LOAD.replace("job_cooldown_s = 0", "job_cooldown_s = 600");
    let set = policies(&[("load.toml", &text)]);
    let mut busy = node("busy");
    busy.load = 48.0;
    let mut recently_moved = container("c1", 7, "busy");
    recently_moved.last_moved = Some(1000);
    let v = view(vec![busy, node("idle")], vec![recently_moved], 1300);
    let p = plan(&set, &v, &mut PolicyState::default());
    assert!(p.decisions.is_empty());
    assert_eq!(skip_codes(&p, "c1"), [SkipCode::JobCooldown]);
    let mut v = v;
    v.now = 1600;
    assert_eq!(
        plan(&set, &v, &mut PolicyState::default()).decisions.len(),
        1
    );

    // Node cooldown from the planner's own automatic moves, kept in the state.
    let text = LOAD.replace("node_cooldown_s = 0", "node_cooldown_s = 300");
    let set = policies(&[("load.toml", &text)]);
    let mut busy = node("busy");
    busy.load = 64.0;
    let mut state = PolicyState::default();
    let v = view(
        vec![busy, node("idle1"), node("idle2")],
        vec![container("c1", 1, "busy"), container("c2", 2, "busy")],
        0,
    );
    let p = plan(&set, &v, &mut state);
    assert_eq!(p.decisions.len(), 1);
    let mut later = v.clone();
    later
        .containers
        .retain(|c| c.id != p.decisions[0].container);
    later.now = 100;
    let p = plan(&set, &later, &mut state);
    assert!(p.decisions.is_empty(), "source in cooldown");
    assert!(p
        .skips
        .iter()
        .any(|s| s.code == SkipCode::SourceCooldown && s.node == "busy"));
    later.now = 300;
    let p = plan(&set, &later, &mut state);
    assert_eq!(p.decisions.len(), 1, "cooldown over");
    // idle1 received the first move at t=0 and its cooldown ended too; both are candidates.
    assert_eq!(p.decisions[0].why.destination.fitting, 2);
}

#[test]
fn rate_limits_hold() {
    let text = DRAIN.to_owned()
        + "[limits]\nmax_concurrent = 5\nmax_per_source = 2\nmax_per_destination = 1\nmax_per_cycle = 3\n";
    let set = policies(&[("drain.toml", &text)]);
    let mut nodes = Vec::new();
    let mut containers = Vec::new();
    for s in 0..3 {
        let mut n = node(&format!("src{s}"));
        n.flags.drain = true;
        nodes.push(n);
        for c in 0..3 {
            containers.push(container(
                &format!("c{s}{c}"),
                (s * 10 + c) as u64,
                &format!("src{s}"),
            ));
        }
    }
    for d in 0..10 {
        nodes.push(node(&format!("dst{d}")));
    }
    let mut v = view(nodes, containers, 0);
    let p = plan(&set, &v, &mut PolicyState::default());
    assert_eq!(p.decisions.len(), 3, "max_per_cycle");
    let per_src0 = p.decisions.iter().filter(|d| d.source == "src0").count();
    assert_eq!(per_src0, 2, "max_per_source");
    let mut dests: Vec<_> = p.decisions.iter().map(|d| d.destination.clone()).collect();
    dests.dedup();
    assert_eq!(
        dests.len(),
        3,
        "max_per_destination = 1: all destinations differ"
    );
    assert!(p.skips.iter().any(|s| s.code == SkipCode::SourceLimit));
    assert!(p.skips.iter().any(|s| s.code == SkipCode::CycleLimit));

    // Two migrations in flight (one to dst0): concurrency allows 3 more; dst0 is full.
    v.in_flight = vec![
        InFlight {
            container: "x".into(),
            job_id: 99,
            source: "elsewhere".into(),
            destination: "dst0".into(),
            cpus: 4,
            rss_mb: 100,
            started: 0,
        },
        InFlight {
            container: "c00".into(),
            job_id: 0,
            source: "src0".into(),
            destination: "dst1".into(),
            cpus: 4,
            rss_mb: 100,
            started: 0,
        },
    ];
    let p = plan(&set, &v, &mut PolicyState::default());
    assert_eq!(p.decisions.len(), 3);
    assert_eq!(skip_codes(&p, "c00"), [SkipCode::InFlight]);
    assert!(p
        .decisions
        .iter()
        .all(|d| d.destination != "dst0" && d.destination != "dst1"));
    assert_eq!(
        p.decisions.iter().filter(|d| d.source == "src0").count(),
        1,
        "one of src0's two slots is in flight"
    );
    let text = DRAIN.to_owned() + "[limits]\nmax_concurrent = 3\n";
    let p = plan(
        &policies(&[("drain.toml", &text)]),
        &v,
        &mut PolicyState::default(),
    );
    assert_eq!(
        p.decisions.len(),
        1,
        "max_concurrent counts in-flight migrations"
    );
    assert!(p.skips.iter().any(|s| s.code == SkipCode::ConcurrencyLimit));
}

fn drain_avoiding_hot() -> String {
    DRAIN.to_owned() + "[destination]\nmax_temperature_c = 85\n"
}

/// One node draining, one hot, one overloaded; plenty of room elsewhere.
fn mixed_view(now: u64) -> ClusterView {
    let mut drained = node("a-drain");
    drained.flags.drain = true;
    let mut hot = node("b-hot");
    hot.temperature_c = Some(95.0);
    let mut busy = node("c-busy");
    busy.load = 60.0;
    let mut nodes = vec![drained, hot, busy];
    for i in 0..4 {
        nodes.push(node(&format!("free{i}")));
    }
    let containers = vec![
        container("load-c", 3, "c-busy"),
        container("hot-c", 2, "b-hot"),
        container("drain-c", 1, "a-drain"),
    ];
    view(nodes, containers, now)
}

#[test]
fn priorities_order_decisions_drain_then_thermal_then_load() {
    // Listed in reverse on purpose: order must come from kind, not file order.
    let thermal = THERMAL.replace("samples = 2", "samples = 1");
    let set = policies(&[
        ("z-load.toml", LOAD),
        ("y-thermal.toml", &thermal),
        ("x-drain.toml", DRAIN),
    ]);
    let p = plan(&set, &mixed_view(0), &mut PolicyState::default());
    let order: Vec<_> = p.decisions.iter().map(|d| d.policy.as_str()).collect();
    assert_eq!(order, ["drain", "thermal", "load"]);

    // Within a kind, higher priority first and it claims the container.
    let hi = DRAIN.replace("name = \"drain\"", "name = \"urgent\"\npriority = 10");
    let set = policies(&[("a.toml", DRAIN), ("b.toml", &hi)]);
    let p = plan(&set, &mixed_view(0), &mut PolicyState::default());
    assert_eq!(p.decisions.len(), 1);
    assert_eq!(p.decisions[0].policy, "urgent");
    assert!(p
        .skips
        .iter()
        .any(|s| s.policy == "drain" && s.code == SkipCode::AlreadyPlanned));
}

#[test]
fn dry_run_and_recommend_never_migrate() {
    for (action, expected) in [
        ("dry-run", DecisionAction::DryRun),
        ("recommend", DecisionAction::Recommend),
    ] {
        let files: Vec<(String, String)> = [("drain", DRAIN), ("thermal", THERMAL), ("load", LOAD)]
            .iter()
            .map(|(n, t)| {
                (
                    format!("{n}.toml"),
                    t.replace("action = \"automatic\"", &format!("action = \"{action}\""))
                        .replace("samples = 2", "samples = 1"),
                )
            })
            .collect();
        let set = rebalancer_policy::load_sources(&files).unwrap_or_else(|e| panic!("{e}"));
        let mut state = PolicyState::default();
        let p = plan(&set, &mixed_view(0), &mut state);
        assert_eq!(p.decisions.len(), 3);
        assert!(p.decisions.iter().all(|d| d.action == expected));
        assert_eq!(p.migrations().count(), 0);
        assert!(
            state.job_moved.is_empty() && state.node_moved.is_empty(),
            "no cooldown for moves that did not happen"
        );
    }
}

#[test]
fn trial_policies_do_not_take_capacity_from_automatic_ones() {
    // A dry-run drain and an automatic thermal policy compete for the single free slot.
    let dry = drain_avoiding_hot().replace("automatic", "dry-run");
    let thermal = THERMAL.replace("samples = 2", "samples = 1");
    let set = policies(&[("drain.toml", &dry), ("thermal.toml", &thermal)]);
    let mut v = mixed_view(0);
    v.nodes
        .retain(|n| n.name != "c-busy" && (n.name == "free0" || !n.name.starts_with("free")));
    v.containers.retain(|c| c.id != "load-c");
    let p = plan(&set, &v, &mut PolicyState::default());
    let got: Vec<_> = p
        .decisions
        .iter()
        .map(|d| (d.action, d.destination.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (DecisionAction::DryRun, "free0"),
            (DecisionAction::Migrate, "free0")
        ]
    );
}

#[test]
fn disabled_policies_do_nothing() {
    let off = DRAIN
        .to_owned()
        .replace("kind = \"drain\"", "kind = \"drain\"\nenabled = false");
    let set = policies(&[("drain.toml", &off)]);
    let p = plan(&set, &mixed_view(0), &mut PolicyState::default());
    assert!(p.decisions.is_empty());
    assert!(!p.reports[0].enabled);
}

#[test]
fn scope_include_and_exclude() {
    let scoped = DRAIN.to_owned()
        + "[scope]\nnodes = [\"src[1-3]\"]\nexclude_nodes = [\"src2\"]\nexclude_users = [\"bob\"]\naccounts = [\"physics\", \"chem\"]\n";
    let set = policies(&[("drain.toml", &scoped)]);
    let mut nodes = Vec::new();
    let mut containers = Vec::new();
    for i in 1..=4 {
        let mut n = node(&format!("src{i}"));
        n.flags.drain = true;
        nodes.push(n);
        containers.push(container(&format!("c{i}"), i, &format!("src{i}")));
    }
    let mut bob = container("bob-c", 10, "src1");
    bob.user = "bob".into();
    let mut bio = container("bio-c", 11, "src3");
    bio.account = "bio".into();
    containers.extend([bob, bio]);
    for i in 0..6 {
        nodes.push(node(&format!("dst{i}")));
    }
    let p = plan(
        &set,
        &view(nodes, containers, 0),
        &mut PolicyState::default(),
    );
    let mut moved: Vec<_> = p.decisions.iter().map(|d| d.container.as_str()).collect();
    moved.sort();
    assert_eq!(moved, ["c1", "c3"], "src2 excluded, src4 not included");
    assert_eq!(skip_codes(&p, "bob-c"), [SkipCode::OutOfScope]);
    assert_eq!(skip_codes(&p, "bio-c"), [SkipCode::OutOfScope]);
    assert!(p
        .skips
        .iter()
        .any(|s| s.container.as_deref() == Some("bio-c") && s.reason.contains("account bio")));
    assert_eq!(p.reports[0].nodes_in_scope, 2);
}

#[test]
fn non_migratable_containers_and_downtime_limits_are_skipped_with_reasons() {
    let text =
        DRAIN.to_owned() + "[migration]\nmodes = [\"stop-and-copy\"]\nmax_downtime_ms = 1000\n";
    let set = policies(&[("drain.toml", &text)]);
    let mut src = node("src");
    src.flags.drain = true;
    let mut pinned = container("pinned", 1, "src");
    pinned.migratable = false;
    let mut huge = container("huge", 2, "src");
    huge.rss_mb = 4096; // 200 ms + 4096/700 s > 1 s frozen
    let small = container("small", 3, "src"); // 2048 MiB: 200 + 2926 ms... also too slow
    let mut tiny = container("tiny", 4, "src");
    tiny.rss_mb = 256;
    let v = view(vec![src, node("dst")], vec![pinned, huge, small, tiny], 0);
    let p = plan(&set, &v, &mut PolicyState::default());
    assert_eq!(moves(&p), [("tiny".into(), "src".into(), "dst".into())]);
    assert_eq!(p.decisions[0].mode, MigrationMode::StopAndCopy);
    assert_eq!(p.decisions[0].estimated_downtime_ms, 200 + 366);
    assert_eq!(p.decisions[0].timeout_s, 60 + 30);
    assert_eq!(skip_codes(&p, "pinned"), [SkipCode::NotMigratable]);
    assert_eq!(skip_codes(&p, "huge"), [SkipCode::NoSourceMode]);
}

#[test]
fn deviation_basis_compares_with_the_cluster_mean() {
    let text = LOAD
        .replace("high = 1.2", "basis = \"deviation\"\nhigh = 0.5")
        .replace("low = 0.9", "low = 0.2");
    let set = policies(&[("load.toml", &text)]);
    // Mean load per CPU 0.5; busy at 1.0 is +0.5 above it.
    let mut nodes = Vec::new();
    for (name, load) in [("busy", 32.0), ("a", 16.0), ("b", 8.0), ("c", 8.0)] {
        let mut n = node(name);
        n.load = load;
        nodes.push(n);
    }
    let p = plan(
        &set,
        &view(nodes, vec![container("c1", 1, "busy")], 0),
        &mut PolicyState::default(),
    );
    assert_eq!(p.reports[0].mean, Some(0.5));
    // Destinations must stay at or below mean + low = 0.7 after the move: a would reach
    // (16 + 4) / 32 = 0.625 and fits, but b and c (0.375) rank first; b wins the tie on name.
    assert_eq!(moves(&p), [("c1".into(), "busy".into(), "b".into())]);
}

#[test]
fn plans_are_deterministic_and_independent_of_input_order() {
    let thermal = THERMAL.replace("samples = 2", "samples = 1");
    let drain = drain_avoiding_hot();
    let set = policies(&[
        ("drain.toml", &drain),
        ("thermal.toml", &thermal),
        ("load.toml", LOAD),
    ]);
    let v = mixed_view(5);
    let a = plan(&set, &v, &mut PolicyState::default());
    let b = plan(&set, &v, &mut PolicyState::default());
    assert_eq!(a, b);
    let mut shuffled = v.clone();
    shuffled.nodes.reverse();
    shuffled.containers.reverse();
    let c = plan(&set, &shuffled, &mut PolicyState::default());
    assert_eq!(moves(&a), moves(&c));
    // Ties between identical destinations break on name.
    assert_eq!(a.decisions[0].destination, "free0");
    let json_a = serde_json::to_string(&a).expect("serialize");
    let json_b = serde_json::to_string(&b).expect("serialize");
    assert_eq!(json_a, json_b);
}

#[test]
fn state_round_trips_through_json_and_drops_removed_policies() {
    let set1 = policies(&[("thermal.toml", THERMAL)]);
    let mut state = PolicyState::default();
    let _ = plan(&set1, &thermal_view(90.0, 0), &mut state);
    assert!(state.track("thermal", "n1").is_some());
    let json = serde_json::to_string(&state).expect("serialize");
    let mut back: PolicyState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, state);
    let p = plan(&set1, &thermal_view(90.0, 10), &mut back);
    assert_eq!(p.decisions.len(), 1, "progress survived the round trip");
    let empty = policies(&[("drain.toml", DRAIN)]);
    let _ = plan(&empty, &thermal_view(90.0, 20), &mut back);
    assert!(back.hysteresis.is_empty());
}

#[test]
fn run_time_overrides_switch_policies_without_reloading() {
    let mut set = policies(&[("drain.toml", DRAIN)]);
    assert!(set.set_action("drain", rebalancer_policy::Action::DryRun));
    let p = plan(&set, &mixed_view(0), &mut PolicyState::default());
    assert_eq!(p.decisions.len(), 1);
    assert_eq!(p.decisions[0].action, DecisionAction::DryRun);
    assert!(set.set_enabled("drain", false));
    assert!(plan(&set, &mixed_view(0), &mut PolicyState::default())
        .decisions
        .is_empty());
    assert!(!set.set_enabled("nope", true));
}

#[test]
fn a_recent_arrival_puts_its_node_in_cooldown() {
    let text = LOAD.replace("node_cooldown_s = 0", "node_cooldown_s = 300");
    let set = policies(&[("load.toml", &text)]);
    let mut busy = node("busy");
    busy.load = 64.0;
    let mut arrived = container("arrived", 5, "fresh");
    arrived.last_moved = Some(900);
    let v = view(
        vec![busy, node("fresh"), node("older")],
        vec![container("c1", 1, "busy"), arrived],
        1000,
    );
    let p = plan(&set, &v, &mut PolicyState::default());
    assert_eq!(moves(&p), [("c1".into(), "busy".into(), "older".into())]);
    let search = &p.decisions[0].why.destination;
    assert_eq!(search.rejected.get(&RejectCode::NodeCooldown), Some(&1));
    assert_eq!(search.rejected_examples[0].node, "fresh");
    assert_eq!(
        search.rejected_examples[0].reason,
        "node cooldown, 200 s left"
    );
}

#[test]
fn nodes_being_relieved_receive_no_work() {
    let thermal = THERMAL.replace("samples = 2", "samples = 1");
    let mut hot = node("a-hot");
    hot.temperature_c = Some(92.0);
    let mut draining = node("b-drain");
    draining.flags.drain = true;
    let v = view(
        vec![hot, draining, node("c-cool")],
        vec![container("h1", 1, "a-hot"), container("d1", 2, "b-drain")],
        0,
    );
    let set = policies(&[("drain.toml", DRAIN), ("thermal.toml", &thermal)]);
    let p = plan(&set, &v, &mut PolicyState::default());
    let d = &p.decisions[0];
    assert_eq!(
        (d.container.as_str(), d.destination.as_str()),
        ("d1", "c-cool")
    );
    assert_eq!(
        d.why.destination.rejected.get(&RejectCode::BeingRelieved),
        Some(&1)
    );
    let ex = &d.why.destination.rejected_examples[0];
    assert_eq!(
        (ex.node.as_str(), ex.reason.as_str()),
        ("a-hot", "being relieved by policy thermal")
    );

    // A trial thermal policy does not steer the automatic drain.
    let trial = thermal.replace("automatic", "dry-run");
    let set = policies(&[("drain.toml", DRAIN), ("thermal.toml", &trial)]);
    let p = plan(&set, &v, &mut PolicyState::default());
    let d = &p.decisions[0];
    assert_eq!(d.action, DecisionAction::Migrate);
    assert_eq!(
        d.why.destination.fitting, 2,
        "a-hot is a candidate for the automatic drain"
    );
}

#[test]
fn inconsistent_views_are_reported_not_fatal() {
    let set = policies(&[("drain.toml", DRAIN)]);
    let mut src = node("src");
    src.flags.drain = true;
    let v = view(
        vec![src, node("dst"), node("dst")],
        vec![container("c1", 1, "src"), container("ghost", 2, "gone")],
        0,
    );
    let p = plan(&set, &v, &mut PolicyState::default());
    assert_eq!(moves(&p), [("c1".into(), "src".into(), "dst".into())]);
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert!(p.warnings[1].contains("(first: ghost)"));
}

#[test]
fn parallel_scan_matches_a_sequential_ranking_on_a_large_cluster() {
    // Enough nodes for several parallel chunks, listed out of name order.
    let thermal = THERMAL.replace("samples = 2", "samples = 1");
    let set = policies(&[("thermal.toml", &thermal)]);
    let mut nodes = Vec::new();
    for i in 0..3000u32 {
        let mut n = node(&format!("n{:04}", (i * 7919) % 3000));
        // Deterministic spread of temperatures; every third node is full.
        n.temperature_c = Some(40.0 + f64::from((i * 37) % 300) / 10.0);
        if i % 3 == 0 {
            n.cpus_alloc = 32;
        }
        nodes.push(n);
    }
    nodes[0].temperature_c = Some(95.0);
    let src = nodes[0].name.clone();
    let v = view(nodes.clone(), vec![container("c1", 1, &src)], 0);
    let a = plan(&set, &v, &mut PolicyState::default());
    let d = &a.decisions[0];

    // Sequential reference: fitting = not full and at most 73 °C; coolest, then name.
    let mut fit: Vec<(f64, String)> = nodes
        .iter()
        .filter(|n| {
            n.name != src && n.cpus_alloc == 0 && n.temperature_c.is_some_and(|t| t <= 73.0)
        })
        .map(|n| (n.temperature_c.unwrap_or(f64::MAX), n.name.clone()))
        .collect();
    fit.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let ranked: Vec<&str> = d
        .why
        .destination
        .ranked
        .iter()
        .map(|r| r.node.as_str())
        .collect();
    let expected: Vec<&str> = fit.iter().take(3).map(|f| f.1.as_str()).collect();
    assert_eq!(ranked, expected);
    assert_eq!(d.why.destination.fitting, fit.len());
    assert_eq!(d.why.destination.candidates, 2999);
    let mut rejected: Vec<&str> = nodes
        .iter()
        .filter(|n| n.name != src && !fit.iter().any(|f| f.1 == n.name))
        .map(|n| n.name.as_str())
        .collect();
    rejected.sort();
    let examples: Vec<&str> = d
        .why
        .destination
        .rejected_examples
        .iter()
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(examples, rejected[..8]);
    let total: u32 = d.why.destination.rejected.values().sum();
    assert_eq!(total as usize, rejected.len());

    // Same answer whatever the input order.
    let mut reversed = v.clone();
    reversed.nodes.reverse();
    assert_eq!(
        plan(&set, &reversed, &mut PolicyState::default()).decisions,
        a.decisions
    );
}

#[test]
fn node_cooldown_applies_within_one_evaluation() {
    let text = LOAD
        .replace("node_cooldown_s = 0", "node_cooldown_s = 300")
        .replace("[limits]", "[limits]\nmax_per_destination = 5");
    let set = policies(&[("load.toml", &text)]);
    let mut b1 = node("busy1");
    b1.load = 64.0;
    let mut b2 = node("busy2");
    b2.load = 60.0;
    let mut spare = node("spare");
    spare.cpus_total = 256;
    let v = view(
        vec![b1, b2, spare],
        vec![container("c1", 1, "busy1"), container("c2", 2, "busy2")],
        1000,
    );
    let p = plan(&set, &v, &mut PolicyState::default());
    assert_eq!(moves(&p), [("c1".into(), "busy1".into(), "spare".into())]);
    let skip = p
        .skips
        .iter()
        .find(|s| s.container.as_deref() == Some("c2"))
        .expect("c2 skipped");
    assert_eq!(skip.code, SkipCode::NoDestination);
    let search = skip.search.as_ref().expect("search");
    assert_eq!(
        search.rejected.get(&RejectCode::NodeCooldown),
        Some(&1),
        "{:?}",
        search.rejected
    );
}
