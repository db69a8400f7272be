//! The seeded migration simulation (`rebalancer_agent::migration::simrun`).
//!
//! `cargo run -p rebalancer-agent --example sim -- --seeds N [--from K]` runs seeds K..K+N and
//! prints seeds per second and every failing seed; `--seed S` replays one seed and prints what
//! it did. Exit status 1 when a seed failed, 2 on bad arguments.

use std::process::ExitCode;

use rebalancer_agent::migration::simrun::{run_seed, run_seeds};

const USAGE: &str = "usage: sim --seeds N [--from K] | --seed S";

fn number(args: &[String], i: usize, flag: &str) -> Result<u64, String> {
    let v = args
        .get(i + 1)
        .ok_or_else(|| format!("{flag} needs a number\n{USAGE}"))?;
    v.parse()
        .map_err(|_| format!("{flag} {v:?} is not a number\n{USAGE}"))
}

fn parse(args: &[String]) -> Result<(Option<u64>, u64, u64), String> {
    let (mut one, mut n, mut from) = (None, 100, 0);
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--seed" => one = Some(number(args, i, "--seed")?),
            "--seeds" => n = number(args, i, "--seeds")?,
            "--from" => from = number(args, i, "--from")?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
        i += 2;
    }
    Ok((one, n, from))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (one, n, from) = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // One thread: the same seed gives the same interleaving.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(seed) = one {
        return match rt.block_on(run_seed(seed)) {
            Ok(r) => {
                println!(
                    "seed {seed}: {} (task: {}), faults {:?}: ended {:?}, resolved {:?}, {} steps",
                    r.mode, r.task, r.faults, r.state, r.resolved, r.steps
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e}");
                ExitCode::from(1)
            }
        };
    }
    let t = std::time::Instant::now();
    let (ok, failed) = rt.block_on(run_seeds(from, n));
    let secs = t.elapsed().as_secs_f64();
    let count =
        |s: rebalancer_proto::MigrationState| ok.iter().filter(|r| r.state == Some(s)).count();
    println!(
        "{n} seeds ({from}..{}) in {secs:.1} s: {:.1} seeds/s; succeeded {}, rolled back {}, failed after commit {}, unknown then resolved {}, refused at pre-flight {}; {} failing",
        from + n,
        n as f64 / secs.max(1e-9),
        count(rebalancer_proto::MigrationState::Succeeded),
        count(rebalancer_proto::MigrationState::RolledBack),
        count(rebalancer_proto::MigrationState::Failed),
        ok.iter().filter(|r| r.resolved.is_some()).count(),
        ok.iter().filter(|r| r.state.is_none()).count(),
        failed.len()
    );
    for (seed, e) in &failed {
        println!(
            "FAILED seed {seed}: {}\n  replay: cargo run -p rebalancer-agent --example sim -- --seed {seed}",
            e.lines().next().unwrap_or_default()
        );
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
