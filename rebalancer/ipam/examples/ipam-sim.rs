//! Prints the figures of the simulated cluster (`rebalancer_ipam::sim`): containers started,
//! moved and ended over the nodes, blocks leased and reclaimed, collisions, time.
//!
//! `cargo run --release -p rebalancer-ipam --example ipam-sim -- [--nodes N] [--containers N]
//! [--seed S] [--seeds K] [--block PREFIX] [--churn-every N]`

use std::process::ExitCode;

use rebalancer_ipam::sim::{run, SimConfig};
use rebalancer_ipam::Pool;

fn main() -> ExitCode {
    let mut cfg = SimConfig::standard(1);
    let mut seeds = 3u64;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            eprintln!("ipam-sim: {flag} needs a value");
            return ExitCode::from(2);
        };
        let n = match value.parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("ipam-sim: {flag} {value:?} is not a number");
                return ExitCode::from(2);
            }
        };
        match flag.as_str() {
            "--nodes" => cfg.nodes = n as usize,
            "--containers" => cfg.containers = n,
            "--seed" => {
                cfg.seed = n;
                seeds = 1;
            }
            "--seeds" => seeds = n,
            "--churn-every" => cfg.churn_every = n,
            "--block" => match Pool::new(cfg.pool.base, cfg.pool.prefix, n as u8) {
                Ok(p) => cfg.pool = p,
                Err(e) => {
                    eprintln!("ipam-sim: --block {n}: {e}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("ipam-sim: unknown option {flag}");
                return ExitCode::from(2);
            }
        }
    }
    if cfg.nodes < 3 {
        eprintln!("ipam-sim: --nodes must be at least 3");
        return ExitCode::from(2);
    }
    let first = cfg.seed;
    let mut failed = false;
    println!(
        "pool {} in /{} blocks, {} nodes, {} containers per run, low water {}",
        cfg.pool, cfg.pool.block, cfg.nodes, cfg.containers, cfg.low_water
    );
    for seed in first..first + seeds {
        cfg.seed = seed;
        let f = run(cfg);
        println!("seed {seed}: {f}");
        for v in f.violations.iter().take(5) {
            println!("  violation: {v}");
        }
        failed |= f.collisions > 0 || !f.violations.is_empty();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
