//! A batch task's job directory in a node-local SlurmdSpoolDir, moved with its images.
//!
//! slurmd writes a batch job's script to `SPOOL/job%05u/slurm_script` on the batch host only,
//! and the shell running it keeps it open. The container binds that directory, so a destination
//! without it could not restore the task. The source reads the directory (regular files only,
//! bounded); the destination recreates it in *its own* spool, at the path slurmd would use for
//! that job and nowhere else: the path is derived from the job id and the configured spool
//! dir, never taken from the message, so a peer cannot make root write a file of its choosing.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rebalancer_proto::peer::{SpoolDir, SpoolFile};

use crate::container::ContainerMeta;
use crate::error::AgentError;

/// Most bytes a job directory may carry (Slurm's default `max_script_size` is 4 MiB).
pub const MAX_SPOOL_BYTES: u64 = 4 << 20;
/// Most files a job directory may carry.
pub const MAX_SPOOL_FILES: usize = 64;

/// slurmd's job directory for `job_id` in `spool`.
pub fn job_dir(spool: &Path, job_id: u32) -> PathBuf {
    spool.join(format!("job{job_id:05}"))
}

/// The job directory of the container's batch task, if the container binds it.
fn bound_job_dir(spool: &Path, meta: &ContainerMeta) -> Option<PathBuf> {
    let task = meta.spec.task.as_ref()?;
    let dir = job_dir(spool, task.job_id);
    meta.spec
        .binds
        .iter()
        .any(|b| Path::new(b) == dir)
        .then_some(dir)
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

/// Source side: the job directory to send with Prepare, or `None` if the task binds none.
pub fn collect(spool: &Path, meta: &ContainerMeta) -> Result<Option<SpoolDir>, AgentError> {
    let Some(dir) = bound_job_dir(spool, meta) else {
        return Ok(None);
    };
    let md = std::fs::symlink_metadata(&dir).map_err(io(format!("stat {}", dir.display())))?;
    if !md.is_dir() {
        return Err(AgentError::Unsupported(format!(
            "the job's spool directory {} is not a directory",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    let mut total = 0u64;
    let rd = std::fs::read_dir(&dir).map_err(io(format!("read {}", dir.display())))?;
    for e in rd {
        let e = e.map_err(io(format!("read {}", dir.display())))?;
        let path = e.path();
        let fm =
            std::fs::symlink_metadata(&path).map_err(io(format!("stat {}", path.display())))?;
        // slurmstepd's sockets and anything that is not a plain file stay: the task holds none.
        if !fm.is_file() {
            continue;
        }
        let name = e.file_name().into_string().map_err(|n| {
            AgentError::Unsupported(format!(
                "spool file {n:?} in {} is not valid UTF-8",
                dir.display()
            ))
        })?;
        total += fm.len();
        if total > MAX_SPOOL_BYTES || files.len() >= MAX_SPOOL_FILES {
            return Err(AgentError::Unsupported(format!(
                "the job's spool directory {} holds more than {MAX_SPOOL_FILES} files or {MAX_SPOOL_BYTES} bytes",
                dir.display()
            )));
        }
        let data = std::fs::read(&path).map_err(io(format!("read {}", path.display())))?;
        files.push(SpoolFile {
            name,
            mode: fm.mode() & 0o7777,
            uid: fm.uid(),
            gid: fm.gid(),
            data,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    tracing::debug!(dir = %dir.display(), files = files.len(), bytes = total, "job spool directory to send");
    Ok(Some(SpoolDir {
        path: dir.display().to_string(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        files,
    }))
}

fn plain_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.contains('\0')
}

/// Destination side: recreates the job directory of `job_id` in `spool`. Returns the
/// directory if it was created here (the caller removes it if the migration fails), `None` if
/// this node already holds the same files.
pub fn install(spool: &Path, job_id: u32, sent: &SpoolDir) -> Result<Option<PathBuf>, AgentError> {
    let dir = job_dir(spool, job_id);
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    // The source's spool may differ; the job directory's name may not.
    if Path::new(&sent.path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        != name
    {
        return Err(AgentError::BadRequest(format!(
            "the spool directory sent, {}, is not job {job_id}'s",
            sent.path
        )));
    }
    if let Some(f) = sent.files.iter().find(|f| !plain_name(&f.name)) {
        return Err(AgentError::BadRequest(format!(
            "bad spool file name {:?} for job {job_id}",
            f.name
        )));
    }
    let total: u64 = sent.files.iter().map(|f| f.data.len() as u64).sum();
    if total > MAX_SPOOL_BYTES || sent.files.len() > MAX_SPOOL_FILES {
        return Err(AgentError::BadRequest(format!(
            "the spool directory sent for job {job_id} is larger than {MAX_SPOOL_FILES} files or {MAX_SPOOL_BYTES} bytes"
        )));
    }
    // The spool must be slurmd's: a root-owned directory nobody else may write to.
    let sm = std::fs::symlink_metadata(spool).map_err(io(format!(
        "slurmd_spool_dir {} on this node",
        spool.display()
    )))?;
    if !sm.is_dir() || sm.uid() != 0 || sm.mode() & 0o022 != 0 {
        return Err(AgentError::NoRoom(format!(
            "slurmd_spool_dir {} is not a directory that only root may write to",
            spool.display()
        )));
    }
    match std::fs::symlink_metadata(&dir) {
        Ok(_) => return same_files(&dir, sent).map(|()| None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("stat {}", dir.display()))(e)),
    }
    // Root's and closed until every file is in place, then the source's owner and mode.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io(format!("mkdir {}", dir.display())))?;
    let r = (|| {
        for f in &sent.files {
            let p = dir.join(&f.name);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p)
                .map_err(io(format!("create {}", p.display())))?;
            file.write_all(&f.data)
                .map_err(io(format!("write {}", p.display())))?;
            std::os::unix::fs::fchown(&file, Some(f.uid), Some(f.gid))
                .map_err(io(format!("chown {}", p.display())))?;
            file.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o777))
                .map_err(io(format!("chmod {}", p.display())))?;
        }
        std::os::unix::fs::chown(&dir, Some(sent.uid), Some(sent.gid))
            .map_err(io(format!("chown {}", dir.display())))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(sent.mode & 0o777))
            .map_err(io(format!("chmod {}", dir.display())))
    })();
    match r {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), files = sent.files.len(), bytes = total, "job spool directory put in place");
            Ok(Some(dir))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// When a task that arrived by migration ends here: removes the copy of its job directory that
/// [`install`] made (slurmd removes only the directories it made, on the batch host). Returns
/// the directory removed.
pub fn remove_arrived(spool: &Path, meta: &ContainerMeta) -> Option<PathBuf> {
    let dir = bound_job_dir(spool, meta)?;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), container = %meta.spec.id, "job spool directory copy removed");
            Some(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), container = %meta.spec.id, error = %e, "could not remove the job spool directory copy");
            None
        }
    }
}

/// An existing job directory is accepted only if it holds the same files.
fn same_files(dir: &Path, sent: &SpoolDir) -> Result<(), AgentError> {
    for f in &sent.files {
        let p = dir.join(&f.name);
        match std::fs::read(&p) {
            Ok(d) if d == f.data => {}
            _ => {
                return Err(AgentError::Busy(format!(
                    "{} exists on this node with other contents than the job's {}",
                    dir.display(),
                    f.name
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebalancer_proto::{ContainerSpec, RootfsSpec, TaskRef};

    fn meta(binds: Vec<String>, job_id: u32) -> ContainerMeta {
        ContainerMeta {
            spec: ContainerSpec {
                id: "c".into(),
                task: Some(TaskRef {
                    job_id,
                    step_id: 0xffff_fffb,
                    task_id: 0,
                }),
                uid: 0,
                gid: 0,
                argv: Vec::new(),
                env: Vec::new(),
                cwd: "/".into(),
                rootfs: RootfsSpec::Host,
                binds,
                memory_limit: None,
                cpus: None,
                class: None,
                address: None,
                stdout: None,
                stderr: None,
            },
            address: "198.19.0.9".parse().expect("address"),
            mounts: Vec::new(),
            symlinks: Vec::new(),
            stdio_keys: Vec::new(),
            stdio_paths: Vec::new(),
            started_at: 0,
        }
    }

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!("rb-spool-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("temp dir");
            TempDir(d)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ids() -> (u32, u32) {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        unsafe { (libc::getuid(), libc::getgid()) }
    }

    /// A spool like slurmd's: owned by this user, 0755 (the test runs without root, so the
    /// root-ownership check is what makes `install` refuse unless run as root).
    fn spool(t: &Path, name: &str) -> PathBuf {
        let s = t.join(name);
        std::fs::create_dir_all(&s).expect("spool");
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        s
    }

    #[test]
    fn the_job_dir_the_task_binds_travels_with_owners_modes_and_bytes() {
        let t = TempDir::new("travel");
        let src = spool(t.path(), "src");
        let jd = job_dir(&src, 42);
        std::fs::create_dir(&jd).expect("job dir");
        std::fs::write(jd.join("slurm_script"), b"#!/bin/sh\nsleep 100\n").expect("script");
        std::fs::set_permissions(
            jd.join("slurm_script"),
            std::fs::Permissions::from_mode(0o500),
        )
        .expect("chmod");
        std::fs::set_permissions(&jd, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        std::os::unix::net::UnixListener::bind(jd.join("sock")).expect("a socket, left behind");
        assert_eq!(jd, src.join("job00042"));

        let m = meta(vec!["/work".into(), jd.display().to_string()], 42);
        let sent = collect(&src, &m).expect("collect").expect("a job dir");
        let (uid, gid) = ids();
        assert_eq!((sent.mode, sent.uid, sent.gid), (0o750, uid, gid));
        assert_eq!(sent.files.len(), 1, "{sent:?}");
        assert_eq!(sent.files[0].name, "slurm_script");
        assert_eq!(sent.files[0].mode, 0o500);
        assert_eq!(sent.files[0].data, b"#!/bin/sh\nsleep 100\n");

        // Another job's dir, or none bound: nothing travels.
        assert!(collect(&src, &meta(vec![jd.display().to_string()], 43))
            .expect("collect")
            .is_none());
        assert!(collect(&src, &meta(vec!["/work".into()], 42))
            .expect("collect")
            .is_none());

        if uid == 0 {
            let dst = spool(t.path(), "dst");
            let made = install(&dst, 42, &sent).expect("install").expect("created");
            assert_eq!(made, dst.join("job00042"));
            let md = std::fs::metadata(&made).expect("stat");
            assert_eq!(md.mode() & 0o777, 0o750);
            let fm = std::fs::metadata(made.join("slurm_script")).expect("stat");
            assert_eq!(fm.mode() & 0o777, 0o500);
            assert_eq!(
                std::fs::read(made.join("slurm_script")).expect("read"),
                b"#!/bin/sh\nsleep 100\n"
            );
            // Again: the same files are there, nothing to create.
            assert!(install(&dst, 42, &sent).expect("install").is_none());
            let mut other = sent.clone();
            other.files[0].data = b"other".to_vec();
            assert!(matches!(
                install(&dst, 42, &other),
                Err(AgentError::Busy(_))
            ));
            // The task ends here: the copy goes, another job's dir stays.
            let keep = job_dir(&dst, 41);
            std::fs::create_dir(&keep).expect("another job's dir");
            // (On a cluster both spools have one path; here the container binds dst's.)
            let arrived = meta(vec![made.display().to_string()], 42);
            assert_eq!(remove_arrived(&dst, &arrived), Some(made.clone()));
            assert!(!made.exists() && keep.exists());
            assert_eq!(remove_arrived(&dst, &arrived), None);
        }
    }

    #[test]
    fn the_destination_writes_only_its_own_spool_for_the_named_job() {
        let t = TempDir::new("own");
        let dst = spool(t.path(), "dst");
        let (uid, gid) = ids();
        let file = |name: &str| SpoolFile {
            name: name.into(),
            mode: 0o700,
            uid,
            gid,
            data: b"x".to_vec(),
        };
        let sent = |path: &str, files: Vec<SpoolFile>| SpoolDir {
            path: path.into(),
            mode: 0o700,
            uid,
            gid,
            files,
        };
        // Another job's directory name.
        let e = install(&dst, 7, &sent("/var/spool/slurmd/job00008", vec![]))
            .expect_err("another job's dir");
        assert!(e.to_string().contains("not job 7's"), "{e}");
        // File names that would leave the directory.
        for bad in ["../x", "a/b", "..", "."] {
            let e = install(&dst, 7, &sent("/x/job00007", vec![file(bad)])).expect_err("bad name");
            assert!(e.to_string().contains("bad spool file name"), "{bad}: {e}");
        }
        assert!(!dst.join("job00007").exists());
        // A spool others may write to is not slurmd's.
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = install(&dst, 7, &sent("/x/job00007", vec![file("slurm_script")]))
            .expect_err("writable spool");
        assert!(e.to_string().contains("only root may write"), "{e}");
        assert!(!dst.join("job00007").exists());
    }
}
