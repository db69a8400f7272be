//! The identity the restore step's command runs as (the job's user), shared by the host seam
//! that spawns it and the restore-step logic that plans it.

/// Who the restore step's command runs as: the job's user, with the user's groups and login
/// variables. slurmctld refuses root's step in a user's job, and srun lost `--uid`/`--gid` after
/// 22.05, so on every release the agent drops to the user itself between fork and exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's, from the group database; `[gid]` for a uid without a
    /// passwd entry).
    pub groups: Vec<u32>,
    /// `HOME`, `USER` and `LOGNAME` of the user, when the passwd entry exists.
    pub env: Vec<(String, String)>,
}

impl StepUser {
    /// The job's user `(uid, gid)` as the name service knows it. Never fails: a user missing
    /// from it runs with `gid` as its only group (slurmctld checks only the uid and gid).
    pub fn of_job(uid: u32, gid: u32) -> StepUser {
        use nix::unistd::{getgrouplist, Gid, Uid, User};
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        let groups = user
            .as_ref()
            .and_then(|u| std::ffi::CString::new(u.name.as_str()).ok())
            .and_then(|name| getgrouplist(&name, Gid::from_raw(gid)).ok())
            .map(|g| g.into_iter().map(Gid::as_raw).collect::<Vec<_>>())
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| vec![gid]);
        let env = user
            .map(|u| {
                vec![
                    ("HOME".to_string(), u.dir.display().to_string()),
                    ("USER".to_string(), u.name.clone()),
                    ("LOGNAME".to_string(), u.name),
                ]
            })
            .unwrap_or_default();
        StepUser {
            uid,
            gid,
            groups,
            env,
        }
    }

    /// Whether this process must change identity to run as the user: it is root and the user
    /// is not (an unprivileged agent, as in tests, runs the command as itself).
    pub fn needs_switch(&self, own_uid: u32) -> bool {
        own_uid == 0 && self.uid != 0
    }

    /// Becomes the user: groups, then gid, then uid (after setresuid nothing else could be
    /// changed). Async-signal-safe (three syscalls on memory allocated before the fork), so it
    /// may run in a `pre_exec` hook.
    pub fn switch(&self) -> std::io::Result<()> {
        // SAFETY: plain syscalls; `groups` is a live slice whose length is passed with it.
        let failed = unsafe {
            libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setresgid(self.gid, self.gid, self.gid) != 0
                || libc::setresuid(self.uid, self.uid, self.uid) != 0
        };
        if failed {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
