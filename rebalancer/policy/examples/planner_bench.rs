//! Times `plan()` on synthetic clusters (1k nodes / 10k containers and 10k / 100k).
//!
//! `cargo run --release -p rebalancer-policy --example planner_bench [-- ITERATIONS]`
//!
//! Scenarios per size:
//! - quiet: nothing triggers (the common evaluation);
//! - busy: 1 % of nodes draining, 3 % hot, 5 % overloaded, all policies automatic, hysteresis
//!   already satisfied, so every policy plans up to its limits;
//! - wide: as busy, with every rate limit raised to 1000, so hundreds of decisions are planned;
//! - no-fit: the same triggers but every node is full, so each policy exhausts its
//!   destination-search budget scanning the whole cluster (the worst case).

use std::path::Path;
use std::time::{Duration, Instant};

use rebalancer_policy::{
    load_dir, load_sources, plan, ClusterView, ContainerView, MigrationMode, NodeFlags, NodeView,
    PolicySet, PolicyState,
};

/// Small deterministic generator so runs are comparable.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 31) as f64
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Quiet,
    Busy,
    NoFit,
}

fn cluster(nodes: usize, per_node: usize, scenario: Scenario, now: u64) -> ClusterView {
    let mut rng = Lcg(42);
    let partitions = ["batch", "long", "gpu"];
    let mut view = ClusterView {
        nodes: Vec::with_capacity(nodes),
        containers: Vec::with_capacity(nodes * per_node),
        in_flight: Vec::new(),
        now,
    };
    for i in 0..nodes {
        let name = format!("node{i:05}");
        let part = partitions[i % partitions.len()].to_owned();
        let triggered = scenario != Scenario::Quiet;
        let pick = rng.below(100);
        let mut flags = NodeFlags::default();
        let mut temp = 50.0 + rng.unit() * 15.0;
        let mut load = 8.0 + rng.unit() * 8.0;
        if triggered && pick < 1 {
            flags.drain = true;
        } else if triggered && pick < 4 {
            temp = 88.0 + rng.unit() * 5.0;
        } else if triggered && pick < 9 {
            load = 60.0;
        }
        let full = scenario == Scenario::NoFit;
        view.nodes.push(NodeView {
            name: name.clone(),
            flags,
            partitions: vec![part.clone()],
            features: vec!["ib".into()],
            cpus_total: 64,
            cpus_alloc: if full { 64 } else { 16 + rng.below(24) as u32 },
            mem_total_mb: 256 * 1024,
            mem_alloc_mb: 64 * 1024,
            load,
            temperature_c: Some(temp),
            modes: vec![MigrationMode::StopAndCopy, MigrationMode::PostCopy],
        });
        for c in 0..per_node {
            let job = (i * per_node + c) as u64 / 2;
            view.containers.push(ContainerView {
                id: format!("ct-{i:05}-{c:02}"),
                job_id: job,
                step_id: c as u64 % 2,
                user: format!("user{}", job % 50),
                account: format!("acct{}", job % 7),
                partition: part.clone(),
                node: name.clone(),
                cpus: 1 + rng.below(4) as u32,
                rss_mb: 256 + rng.below(4096),
                class: None,
                migratable: rng.below(10) != 0,
                last_moved: None,
            });
        }
    }
    view
}

fn automatic_policies(wide: bool) -> PolicySet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let mut files = Vec::new();
    for name in ["drain.toml", "thermal.toml", "load.toml"] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            eprintln!("{}: {e}", path.display());
            std::process::exit(1)
        });
        let mut text = text.replace("action = \"recommend\"", "action = \"automatic\"");
        if wide {
            let mut out = String::new();
            for line in text.lines() {
                let key = line.split('=').next().unwrap_or("").trim();
                if matches!(key, "max_concurrent" | "max_per_source" | "max_per_cycle") {
                    out.push_str(&format!("{key} = 1000\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            text = out;
        }
        files.push((path, text));
    }
    load_sources(&files).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    })
}

fn stats(mut t: Vec<Duration>) -> String {
    t.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "min {:7.2} ms  median {:7.2} ms  max {:7.2} ms",
        ms(t[0]),
        ms(t[t.len() / 2]),
        ms(t[t.len() - 1])
    )
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20)
        .max(1);
    let shipped = load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies"))
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        });
    let auto = automatic_policies(false);
    let wide = automatic_policies(true);
    println!(
        "planner_bench: {} rayon threads, {iterations} iterations per case",
        rayon::current_num_threads()
    );
    for (nodes, per_node) in [(1_000, 10), (10_000, 10)] {
        for (label, scenario, set) in [
            ("quiet", Scenario::Quiet, &shipped),
            ("busy", Scenario::Busy, &auto),
            ("wide", Scenario::Busy, &wide),
            ("no-fit", Scenario::NoFit, &auto),
        ] {
            // Warm the hysteresis: the shipped triggers need 3 samples over 120 s.
            let mut state = PolicyState::default();
            let mut view = cluster(nodes, per_node, scenario, 0);
            for now in [0, 60, 120, 180] {
                view.now = now;
                let _ = plan(set, &view, &mut state);
            }
            let mut times = Vec::with_capacity(iterations);
            let mut last = None;
            for i in 0..iterations {
                // A fresh copy of the state each time, so cooldowns from the previous
                // iteration do not turn later iterations into quiet ones.
                let mut s = state.clone();
                view.now = 240 + i as u64;
                let t0 = Instant::now();
                let p = plan(set, &view, &mut s);
                times.push(t0.elapsed());
                last = Some(p);
            }
            let p = last.unwrap_or_default();
            println!(
                "{nodes:>6} nodes {:>7} containers  {label:<7} {}  ({} decisions, {} skips)",
                view.containers.len(),
                stats(times),
                p.decisions.len(),
                p.skips.len()
            );
        }
    }
}
