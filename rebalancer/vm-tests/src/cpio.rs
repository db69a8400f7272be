//! An in-memory initramfs: a tree of directories, files and symlinks written as a `newc` cpio
//! archive (the format the kernel unpacks, see the kernel's `early_userspace_support`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} conflicts with an entry already in the image")]
    Conflict { path: String },
    #[error("ldd {path} failed: {message}")]
    Ldd { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// Paths are kept without the leading `/`; a `BTreeMap` orders every parent before its children.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

fn rel(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

impl Initramfs {
    pub fn new() -> Initramfs {
        Initramfs::default()
    }

    /// Adds `path` and every missing parent as directories.
    pub fn dir(&mut self, path: &str) -> Result<(), ImageError> {
        let p = rel(path);
        let mut acc = String::new();
        for part in p.split('/').filter(|s| !s.is_empty()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            match self.entries.get(&acc) {
                None => {
                    self.entries.insert(acc.clone(), Entry::Dir);
                }
                Some(Entry::Dir) => {}
                Some(_) => return Err(ImageError::Conflict { path: acc }),
            }
        }
        Ok(())
    }

    fn parent(&mut self, p: &str) -> Result<(), ImageError> {
        match p.rsplit_once('/') {
            Some((dir, _)) => self.dir(dir),
            None => Ok(()),
        }
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), ImageError> {
        let p = rel(path);
        self.parent(&p)?;
        if let Some(Entry::Dir | Entry::Symlink(_)) = self.entries.get(&p) {
            return Err(ImageError::Conflict { path: p });
        }
        self.entries.insert(p, Entry::File { data, mode });
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), ImageError> {
        let p = rel(path);
        self.parent(&p)?;
        match self.entries.get(&p) {
            None => {
                self.entries.insert(p, Entry::Symlink(target.to_string()));
                Ok(())
            }
            Some(Entry::Symlink(t)) if t == target => Ok(()),
            Some(_) => Err(ImageError::Conflict { path: p }),
        }
    }

    /// A character device node (the kernel opens `/dev/console` of the initramfs for init).
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> Result<(), ImageError> {
        let p = rel(path);
        self.parent(&p)?;
        if self.entries.contains_key(&p) {
            return Err(ImageError::Conflict { path: p });
        }
        self.entries.insert(p, Entry::CharDev { major, minor });
        Ok(())
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&rel(path))
    }

    /// Copies a host file to `dest`, keeping its permission bits.
    pub fn host_file(&mut self, host: &Path, dest: &str) -> Result<(), ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |source| ImageError::Read {
            path: host.to_path_buf(),
            source,
        };
        let data = std::fs::read(host).map_err(read)?;
        let mode = std::fs::metadata(host).map_err(read)?.permissions().mode() & 0o7777;
        self.file(dest, data, mode)
    }

    /// Copies a dynamically linked host binary to `dest` with the shared libraries `ldd` lists,
    /// each at its host path with the directory's symlinks resolved (the image mirrors the
    /// host's merged-/usr links, see [`Initramfs::mirror_root_links`]).
    pub fn binary(&mut self, host: &Path, dest: &str) -> Result<(), ImageError> {
        self.host_file(host, dest)?;
        for lib in ldd(host)? {
            let dir = lib.parent().unwrap_or(Path::new("/"));
            let real_dir = std::fs::canonicalize(dir).map_err(|source| ImageError::Read {
                path: dir.to_path_buf(),
                source,
            })?;
            let name = lib.file_name().unwrap_or_default();
            let d = real_dir.join(name).display().to_string();
            if !self.contains(&d) {
                self.host_file(&lib, &d)?;
            }
        }
        Ok(())
    }

    /// Recreates the host's top-level symlinks (`/bin -> usr/bin` on merged-/usr systems).
    pub fn mirror_root_links(&mut self, names: &[&str]) -> Result<(), ImageError> {
        for n in names {
            let p = Path::new("/").join(n);
            match std::fs::read_link(&p) {
                Ok(t) => self.symlink(n, &t.display().to_string())?,
                Err(_) => self.dir(n)?,
            }
        }
        Ok(())
    }

    /// The archive in `newc` format.
    pub fn to_newc(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, e)) in (1u32..).zip(self.entries.iter()) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match e {
                Entry::Dir => (0o040755, &[], (0, 0)),
                Entry::File { data, mode } => (0o100000 | mode, data, (0, 0)),
                Entry::Symlink(t) => (0o120777, t.as_bytes(), (0, 0)),
                Entry::CharDev { major, minor } => (0o020600, &[], (*major, *minor)),
            };
            let nlink = if matches!(e, Entry::Dir) { 2 } else { 1 };
            push_entry(&mut out, ino, mode, nlink, path, data, rdev);
        }
        push_entry(&mut out, 0, 0, 1, "TRAILER!!!", &[], (0, 0));
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn push_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// Parses `ldd` output into the absolute paths of the libraries (and the dynamic loader).
pub fn parse_ldd(out: &str) -> Vec<PathBuf> {
    let mut libs = Vec::new();
    for l in out.lines() {
        let l = l.trim();
        let path = match l.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => l.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs
}

fn ldd(bin: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|source| ImageError::Read {
            path: bin.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static binaries: "not a dynamic executable" (exit status 1), nothing to copy.
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic") || err.contains("not a dynamic") {
            return Ok(Vec::new());
        }
        return Err(ImageError::Ldd {
            path: bin.to_path_buf(),
            message: err.trim().to_string(),
        });
    }
    Ok(parse_ldd(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_what_the_kernel_reads() {
        let mut i = Initramfs::new();
        i.file("/usr/bin/x", b"hello".to_vec(), 0o755)
            .expect("file");
        i.symlink("bin", "usr/bin").expect("link");
        i.char_dev("dev/console", 5, 1).expect("console");
        let a = i.to_newc();
        // Entries: bin, dev, dev/console, usr, usr/bin, usr/bin/x, trailer.
        assert_eq!(a.len() % 4, 0);
        assert_eq!(&a[..6], b"070701");
        let text = String::from_utf8_lossy(&a);
        assert_eq!(text.matches("070701").count(), 7);
        // dev/console: char device 5:1 in the rdev fields.
        let c = text.find("dev/console").expect("console entry") - 110;
        assert_eq!(&a[c + 14..c + 22], b"00002180");
        assert_eq!(&a[c + 78..c + 94], b"0000000500000001");
        let first_name = &a[110..113];
        assert_eq!(first_name, b"bin");
        // Symlink mode and target as data.
        assert_eq!(&a[14..22], b"0000a1ff");
        assert!(text.contains("usr/bin\0"));
        assert!(text.contains("hello"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn a_file_under_a_symlink_is_a_conflict() {
        let mut i = Initramfs::new();
        i.symlink("lib", "usr/lib").expect("link");
        assert!(matches!(
            i.file("/lib/x.so", vec![], 0o644),
            Err(ImageError::Conflict { .. })
        ));
        i.file("/usr/lib/x.so", vec![], 0o644).expect("real path");
        assert!(i.symlink("lib", "usr/lib").is_ok());
        assert!(i.symlink("lib", "elsewhere").is_err());
    }

    #[test]
    fn ldd_output_parses() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n\tlibfoo.so => not found\n";
        assert_eq!(
            parse_ldd(out),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
