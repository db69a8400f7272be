//! Benchmark workload: a TCP counter server that holds N MiB of touched memory and keeps
//! dirtying a fraction of it. Protocol: `rebalancer_bench::wire`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rebalancer_bench::wire::{unix_us, ServerStats};

const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;

#[derive(Parser, Debug)]
#[command(about = "TCP counter server holding N MiB of dirtied memory (benchmark workload)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7000")]
    listen: String,
    /// Memory to allocate and touch, in MiB.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Share of the pages written per second, in percent.
    #[arg(long, default_value_t = 2.0)]
    dirty_percent_per_sec: f64,
    /// Start a new session, reopen stdin/stdout/stderr on /dev/null and close every other
    /// inherited descriptor: CRIU refuses a session leader outside the dumped pid namespace and
    /// files opened in the parent's mount namespace.
    #[arg(long)]
    detach_stdio: bool,
}

struct State {
    mem: Vec<AtomicU64>,
    ready: AtomicBool,
    counter: AtomicU64,
    pages_dirtied: AtomicU64,
    gap: Mutex<(u64, u64)>,
}

impl State {
    fn stats(&self, mib: u64) -> ServerStats {
        let (gap, end) = self.gap.lock().map(|g| *g).unwrap_or((0, 0));
        ServerStats {
            ready: self.ready.load(Ordering::Acquire),
            mib,
            counter: self.counter.load(Ordering::SeqCst),
            max_heartbeat_gap_us: gap,
            max_gap_end_unix_us: end,
            pages_dirtied: self.pages_dirtied.load(Ordering::Relaxed),
        }
    }
}

fn detach_stdio() -> anyhow::Result<()> {
    // SAFETY: setsid has no preconditions; failing (already a group leader) is harmless.
    unsafe { libc::setsid() };
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?;
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors with a valid open descriptor.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("dup2 /dev/null");
        }
    }
    let keep = null.as_raw_fd();
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .context("list /proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: closing an inherited descriptor this program does not use.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// xorshift64*: cheap page picker for the dirtying thread.
fn next_rand(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn serve(state: Arc<State>, stream: TcpStream, mib: u64) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let reply = match line.trim() {
            "inc" => format!("{}\n", state.counter.fetch_add(1, Ordering::SeqCst) + 1),
            "stats" => {
                let s = serde_json::to_string(&state.stats(mib)).unwrap_or_else(|_| "{}".into());
                format!("{s}\n")
            }
            "reset" => {
                if let Ok(mut g) = state.gap.lock() {
                    *g = (0, 0);
                }
                "ok\n".to_string()
            }
            _ => "error\n".to_string(),
        };
        out.write_all(reply.as_bytes())?;
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.detach_stdio {
        detach_stdio()?;
    }
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("bind {}", args.listen))?;
    let words = (args.mib as usize) * (1 << 20) / 8;
    let state = Arc::new(State {
        mem: (0..words).map(|i| AtomicU64::new(i as u64 | 1)).collect(),
        ready: AtomicBool::new(false),
        counter: AtomicU64::new(0),
        pages_dirtied: AtomicU64::new(0),
        gap: Mutex::new((0, 0)),
    });
    state.ready.store(true, Ordering::Release);

    // Heartbeat: the largest interval between 1 ms ticks is the freeze the process lived through.
    let hb = Arc::clone(&state);
    std::thread::spawn(move || {
        let mut last = unix_us();
        loop {
            std::thread::sleep(Duration::from_millis(1));
            let now = unix_us();
            let gap = now.saturating_sub(last);
            last = now;
            if let Ok(mut g) = hb.gap.lock() {
                if gap > g.0 {
                    *g = (gap, now);
                }
            }
        }
    });

    // Dirtier: every 10 ms writes one word in each of a share of random pages.
    let pages = (words / WORDS_PER_PAGE).max(1);
    let per_tick = ((pages as f64) * args.dirty_percent_per_sec / 100.0 / 100.0).ceil() as usize;
    let dirt = Arc::clone(&state);
    std::thread::spawn(move || {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut tick = 0u64;
        loop {
            tick += 1;
            for _ in 0..per_tick {
                let page = (next_rand(&mut seed) as usize) % pages;
                if let Some(w) = dirt.mem.get(page * WORDS_PER_PAGE) {
                    w.store(tick, Ordering::Relaxed);
                }
            }
            dirt.pages_dirtied
                .fetch_add(per_tick as u64, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        }
    });

    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let st = Arc::clone(&state);
        let mib = args.mib;
        std::thread::spawn(move || {
            let _ = serve(st, stream, mib);
        });
    }
    Ok(())
}
