//! Copies an image directory between node namespaces over TCP, so that the copy is counted on
//! the bridge like any other migration traffic. Stream: per file a u32 path length, the relative
//! path, a u64 size and the bytes; a zero path length ends it.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const MAX_PATH: u32 = 4096;

fn files(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir.join(rel)).with_context(|| format!("list {}", dir.display()))? {
        let e = e?;
        let r = rel.join(e.file_name());
        let ft = e.file_type()?;
        if ft.is_dir() {
            files(dir, &r, out)?;
        } else if ft.is_file() {
            out.push(r);
        }
    }
    Ok(())
}

pub fn send(dir: &Path, to: &str) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match TcpStream::connect(to) {
            Ok(s) => break s,
            Err(e) if Instant::now() > end => {
                return Err(e).with_context(|| format!("connect {to}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let mut w = BufWriter::with_capacity(1 << 20, stream);
    let mut list = Vec::new();
    files(dir, Path::new(""), &mut list)?;
    for rel in list {
        let name = rel.to_string_lossy();
        let mut f = std::fs::File::open(dir.join(&rel))?;
        let len = f.metadata()?.len();
        w.write_all(&(name.len() as u32).to_be_bytes())?;
        w.write_all(name.as_bytes())?;
        w.write_all(&len.to_be_bytes())?;
        let copied = std::io::copy(&mut (&mut f).take(len), &mut w)?;
        if copied != len {
            bail!("{} shrank while being sent", rel.display());
        }
    }
    w.write_all(&0u32.to_be_bytes())?;
    w.flush()?;
    Ok(())
}

pub fn receive(listen: &str, dir: &Path) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    let (s, _) = l.accept()?;
    let mut r = BufReader::with_capacity(1 << 20, s);
    loop {
        let mut b4 = [0u8; 4];
        r.read_exact(&mut b4)?;
        let n = u32::from_be_bytes(b4);
        if n == 0 {
            return Ok(());
        }
        if n > MAX_PATH {
            bail!("path length {n} over the limit");
        }
        let mut name = vec![0u8; n as usize];
        r.read_exact(&mut name)?;
        let rel = PathBuf::from(String::from_utf8(name).context("path is not UTF-8")?);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            bail!("refusing path {}", rel.display());
        }
        let mut b8 = [0u8; 8];
        r.read_exact(&mut b8)?;
        let len = u64::from_be_bytes(b8);
        let path = dir.join(&rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let copied = std::io::copy(&mut (&mut r).take(len), &mut f)?;
        if copied != len {
            bail!("stream ended inside {}", rel.display());
        }
    }
}

/// Bandwidth sink: accepts one connection, reads it to its end and prints `BYTES MICROS`
/// (first byte to last).
pub fn sink(listen: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut first: Option<Instant> = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let us = first.map(|f| f.elapsed().as_micros()).unwrap_or(0);
    println!("{total} {us}");
    Ok(())
}

/// Bandwidth source: `mib` MiB over one TCP connection to `to`.
pub fn blast(to: &str, mib: u64) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(to).with_context(|| format!("connect {to}"))?;
    let buf = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        s.write_all(&buf)?;
    }
    Ok(())
}

/// MB/s (10^6 bytes) from a sink's `BYTES MICROS` line.
pub fn rate_mb_s(line: &str) -> Option<f64> {
    let mut it = line.split_whitespace();
    let bytes: f64 = it.next()?.parse().ok()?;
    let us: f64 = it.next()?.parse().ok()?;
    (us > 0.0).then(|| bytes / us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_round_trip_over_loopback() {
        let base = std::env::temp_dir().join(format!("rbb-xfer-{}", std::process::id()));
        let (src, dst) = (base.join("src"), base.join("dst"));
        std::fs::create_dir_all(src.join("sub")).expect("mkdir");
        std::fs::create_dir_all(&dst).expect("mkdir");
        std::fs::write(src.join("a.img"), vec![7u8; 300_000]).expect("write");
        std::fs::write(src.join("sub/b.img"), b"bee").expect("write");
        std::fs::write(src.join("empty.img"), b"").expect("write");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let addr = format!("127.0.0.1:{port}");
        let (a2, d2) = (addr.clone(), dst.clone());
        let rx = std::thread::spawn(move || receive(&a2, &d2).map_err(|e| e.to_string()));
        send(&src, &addr).expect("send");
        rx.join().expect("join").expect("receive");
        assert_eq!(
            std::fs::read(dst.join("a.img")).expect("a"),
            vec![7u8; 300_000]
        );
        assert_eq!(std::fs::read(dst.join("sub/b.img")).expect("b"), b"bee");
        assert!(dst.join("empty.img").exists());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn bandwidth_over_loopback() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let addr = format!("127.0.0.1:{port}");
        let a2 = addr.clone();
        let rx = std::thread::spawn(move || sink(&a2).map_err(|e| e.to_string()));
        let end = Instant::now() + Duration::from_secs(5);
        while blast(&addr, 8).is_err() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        rx.join().expect("join").expect("sink");
        assert_eq!(rate_mb_s("1000000 500000"), Some(2.0));
        assert_eq!(rate_mb_s("1000 0"), None);
        assert_eq!(rate_mb_s("garbage"), None);
    }
}
