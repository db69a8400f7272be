//! Benchmark client: sends `inc` every interval to the workload, records the largest gap
//! between answers, every error, and whether the counter ever went backwards. Prints `ready`
//! once the workload has touched its memory; prints a JSON `ClientReport` after a `stop` line
//! (or end of file) on stdin.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rebalancer_bench::wire::{unix_us, ClientReport, ServerStats};

#[derive(Parser, Debug)]
#[command(about = "Benchmark client of bench-workload")]
struct Args {
    #[arg(long)]
    server: SocketAddr,
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// How long to keep trying to reach the workload at start.
    #[arg(long, default_value_t = 120)]
    connect_timeout_s: u64,
    /// An answer that takes longer than this is an error.
    #[arg(long, default_value_t = 60)]
    read_timeout_s: u64,
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(addr: SocketAddr, read_timeout: Duration) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(read_timeout))?;
        Ok(Conn {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    fn call(&mut self, req: &str) -> std::io::Result<String> {
        self.writer.write_all(format!("{req}\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by the workload",
            ));
        }
        Ok(line.trim().to_string())
    }

    fn stats(&mut self) -> anyhow::Result<ServerStats> {
        let line = self.call("stats")?;
        serde_json::from_str(&line).context("parse workload stats")
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let read_timeout = Duration::from_secs(args.read_timeout_s);
    let deadline = Instant::now() + Duration::from_secs(args.connect_timeout_s);
    let mut conn = loop {
        match Conn::open(args.server, read_timeout) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("connect to {}", args.server))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    loop {
        if conn.stats()?.ready {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("workload not ready after {} s", args.connect_timeout_s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    conn.call("reset")?;

    let stop = Arc::new(AtomicBool::new(false));
    let stop_in = Arc::clone(&stop);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.lock().read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.trim() == "stop" => break,
                Ok(_) => {}
            }
        }
        stop_in.store(true, Ordering::SeqCst);
    });
    println!("ready");
    std::io::stdout().flush()?;

    let interval = Duration::from_millis(args.interval_ms);
    let mut rep = ClientReport::default();
    let mut last_answer: Option<u64> = None;
    let mut broken = false;
    while !stop.load(Ordering::SeqCst) {
        let tick = Instant::now();
        if broken {
            match Conn::open(args.server, read_timeout) {
                Ok(c) => {
                    conn = c;
                    broken = false;
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        match conn.call("inc").map(|l| l.parse::<u64>()) {
            Ok(Ok(n)) => {
                let now = unix_us();
                rep.requests += 1;
                if rep.first_counter == 0 {
                    rep.first_counter = n;
                } else if n <= rep.last_counter {
                    rep.counter_went_backwards = true;
                }
                rep.last_counter = n;
                if let Some(prev) = last_answer {
                    let gap = now.saturating_sub(prev);
                    if gap > rep.max_gap_us {
                        rep.max_gap_us = gap;
                        rep.max_gap_end_unix_us = now;
                    }
                }
                last_answer = Some(now);
            }
            Ok(Err(e)) => rep.errors.push(format!("bad answer: {e}")),
            Err(e) => {
                rep.errors.push(format!("{:?}: {e}", e.kind()));
                broken = true;
            }
        }
        if let Some(rest) = interval.checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    rep.server = if broken { None } else { conn.stats().ok() };
    println!("{}", serde_json::to_string(&rep)?);
    Ok(())
}
