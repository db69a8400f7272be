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
}
