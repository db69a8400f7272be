//! `/proc/PID/stat`, split in one place. The command name (field 2) may hold spaces and
//! parentheses, so the fields are counted after its last ')'.

use std::path::Path;

/// The fields of a `/proc/PID/stat` line the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `T`, `t`, `Z`, `X`...
    pub state: char,
    /// Field 4.
    pub ppid: i32,
    /// Field 9: the kernel's `PF_*` flags.
    pub flags: u64,
    /// Fields 14-17 (utime + stime + cutime + cstime), clock ticks: reaped children's time moves
    /// into their parent's cutime/cstime, so a tree's sum only grows.
    pub cpu_ticks: u64,
    /// Field 22: clock ticks after boot; with the pid, it names one process for good.
    pub start_time: u64,
}

/// `PF_EXITING`: the task is inside `do_exit`.
const PF_EXITING: u64 = 0x4;

impl ProcStat {
    /// Parses one line; `None` when a field up to the 22nd is missing or not a number.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.get(line.rfind(')')? + 1..)?;
        // `f[0]` is field 3.
        let f: Vec<&str> = rest.split_whitespace().take(20).collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok());
        let mut cpu_ticks = 0u64;
        for i in 11..15 {
            // cutime and cstime are signed in the kernel's format.
            cpu_ticks = cpu_ticks.checked_add(num(i)?.max(0) as u64)?;
        }
        Some(Self {
            state: f.first()?.chars().next()?,
            ppid: f.get(1)?.parse().ok()?,
            flags: f.get(6)?.parse().ok()?,
            cpu_ticks,
            start_time: f.get(19)?.parse().ok()?,
        })
    }

    /// The stat of `pid` under `/proc`; `None` when it does not exist (any more).
    pub fn of(pid: i32) -> Option<Self> {
        Self::read(Path::new("/proc"), &pid.to_string())
    }

    /// The stat of `pid` under `proc_root`.
    pub fn read(proc_root: &Path, pid: &str) -> Option<Self> {
        // A stat line is a few hundred bytes: the kernel bounds it, not the process.
        let line = std::fs::read_to_string(proc_root.join(pid).join("stat")).ok()?;
        Self::parse(&line)
    }

    /// Exited: a zombie, or dead and being reaped.
    pub fn ended(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// Ended or inside `do_exit`: it may still be listed in (and hold) its cgroup.
    pub fn exiting(&self) -> bool {
        self.ended() || self.flags & PF_EXITING != 0
    }

    /// Stopped by a signal (`T`) or by a tracer (`t`).
    pub fn stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

/// The start time of `pid`, `None` if it does not exist or has ended.
pub fn live_start_time(pid: i32) -> Option<u64> {
    ProcStat::of(pid)
        .filter(|s| !s.ended())
        .map(|s| s.start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    /// stime cutime cstime priority nice threads itrealvalue starttime vsize rss
    const ODD: &str =
        "42 (a) (b c)) S 7 42 42 0 -1 4194564 100 0 0 0 300 20 5 7 20 0 1 0 777 1000 10";

    #[test]
    fn fields_are_counted_after_the_last_parenthesis() {
        let s = ProcStat::parse(ODD).expect("parses");
        assert_eq!(
            s,
            ProcStat {
                state: 'S',
                ppid: 7,
                flags: 4194564,
                cpu_ticks: 332,
                start_time: 777,
            }
        );
        assert!(s.exiting(), "flags hold PF_EXITING");
        assert!(!s.ended() && !s.stopped());
    }

    #[test]
    fn states_and_short_or_garbage_lines() {
        let with = |state: &str| ProcStat::parse(&ODD.replacen(" S ", &format!(" {state} "), 1));
        assert!(with("Z").expect("zombie").ended());
        assert!(with("X").expect("dead").ended());
        assert!(with("t").expect("traced").stopped());
        assert!(!with("R").expect("running").ended());
        // Negative child times count as nothing.
        let neg = ODD.replacen(" 5 7 ", " -5 7 ", 1);
        assert_eq!(ProcStat::parse(&neg).map(|s| s.cpu_ticks), Some(327));
        for bad in ["", "garbage", "42 (x) R 1", "42 (x) R one 42 42 0 -1 0"] {
            assert_eq!(ProcStat::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn our_own_process() {
        let me = std::process::id() as i32;
        let s = ProcStat::of(me).expect("own stat");
        assert_eq!(s.ppid as u32, std::os::unix::process::parent_id());
        assert!(!s.ended());
        assert_eq!(live_start_time(me), Some(s.start_time));
        assert_eq!(ProcStat::of(-1), None);
    }
}
