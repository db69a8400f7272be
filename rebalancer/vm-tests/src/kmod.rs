//! Kernel modules for the guest: finds `.ko` / `.ko.xz` files by name in an extracted Debian
//! kernel package and orders them so that every module follows its `depends=` (from the
//! `.modinfo` section), so that plain `insmod` loads them (no depmod or modprobe in the guest).
//! Compressed modules (Debian's 6.12 kernels) are decompressed with `xz`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("xz -dc {path} failed: {message}")]
    Xz { path: PathBuf, message: String },
    #[error("no module {name} under {dir} (built in? not in this kernel?)")]
    Missing { name: String, dir: PathBuf },
}

/// Module names use `_` where file names may use `-`.
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

fn modinfo<'a>(ko: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let pos = ko.windows(key.len()).position(|w| w == key)?;
    let rest = &ko[pos + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The comma-separated `depends=` value of a module's `.modinfo` strings.
pub fn depends(ko: &[u8]) -> Vec<String> {
    let Some(v) = modinfo(ko, b"\0depends=") else {
        return Vec::new();
    };
    String::from_utf8_lossy(v)
        .split(',')
        .filter(|s| !s.is_empty())
        .map(norm)
        .collect()
}

/// The `pre:` names of a module's `softdep=` (e.g. libcrc32c wants crc32c loaded first).
pub fn soft_pre(ko: &[u8]) -> Vec<String> {
    let Some(v) = modinfo(ko, b"\0softdep=") else {
        return Vec::new();
    };
    let v = String::from_utf8_lossy(v);
    let Some(pre) = v.split("pre:").nth(1) else {
        return Vec::new();
    };
    pre.split("post:")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(norm)
        .collect()
}

fn index(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<(), ModError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ModError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            index(&p, out)?;
        } else if let Some(stem) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko").or_else(|| n.strip_suffix(".ko.xz")))
        {
            out.insert(norm(stem), p);
        }
    }
    Ok(())
}

/// One module to load: its name and its uncompressed ELF image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub data: Vec<u8>,
}

fn read_module(path: &Path) -> Result<Vec<u8>, ModError> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = std::process::Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .map_err(|source| ModError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if !out.status.success() {
            return Err(ModError::Xz {
                path: path.to_path_buf(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        return Ok(out.stdout);
    }
    std::fs::read(path).map_err(|source| ModError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The modules needed for `names` under `moddir` (`lib/modules/<version>`), dependencies
/// first. Names listed in `modules.builtin` are skipped.
pub fn resolve(moddir: &Path, names: &[&str]) -> Result<Vec<Module>, ModError> {
    let mut all = BTreeMap::new();
    index(&moddir.join("kernel"), &mut all)?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(norm))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for n in names {
        visit(&norm(n), &all, &builtin, moddir, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    all: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    moddir: &Path,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<Module>,
) -> Result<(), ModError> {
    if builtin.contains(name) || !seen.insert(name.to_string()) {
        return Ok(());
    }
    let path = all.get(name).ok_or_else(|| ModError::Missing {
        name: name.to_string(),
        dir: moddir.to_path_buf(),
    })?;
    let data = read_module(path)?;
    // Soft dependencies may name an alias (crc32c = crc32c_generic): try both, skip if absent.
    for d in soft_pre(&data) {
        for cand in [d.clone(), format!("{d}_generic")] {
            if all.contains_key(&cand) || builtin.contains(&cand) {
                visit(&cand, all, builtin, moddir, seen, order)?;
                break;
            }
        }
    }
    for d in depends(&data) {
        visit(&d, all, builtin, moddir, seen, order)?;
    }
    order.push(Module {
        name: name.to_string(),
        data,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_come_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=stp,llc,nf-tables\0name=bridge\0";
        assert_eq!(depends(ko), vec!["stp", "llc", "nf_tables"]);
        assert!(depends(b"\0depends=\0name=veth\0").is_empty());
        assert!(depends(b"no modinfo").is_empty());
        assert_eq!(soft_pre(b"\0softdep=pre: crc32c\0"), vec!["crc32c"]);
        assert_eq!(soft_pre(b"\0softdep=pre: a b post: c\0"), vec!["a", "b"]);
    }

    #[test]
    fn resolve_orders_dependencies_first() {
        let d = std::env::temp_dir().join(format!("vmt-kmod-{}", std::process::id()));
        let k = d.join("kernel/net");
        std::fs::create_dir_all(&k).expect("mkdir");
        std::fs::write(k.join("bridge.ko"), b"\0depends=stp,llc\0").expect("w");
        std::fs::write(k.join("stp.ko"), b"\0depends=llc\0").expect("w");
        std::fs::write(k.join("llc.ko"), b"\0depends=\0softdep=pre: crc\0").expect("w");
        std::fs::write(k.join("crc_generic.ko"), b"\0depends=\0").expect("w");
        std::fs::write(d.join("modules.builtin"), "kernel/net/unix.ko\n").expect("w");
        let got: Vec<String> = resolve(&d, &["bridge", "unix", "llc"])
            .expect("resolve")
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(got, vec!["crc_generic", "llc", "stp", "bridge"]);
        assert!(matches!(
            resolve(&d, &["nope"]),
            Err(ModError::Missing { .. })
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
