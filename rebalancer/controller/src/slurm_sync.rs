//! Slurm's side: reading nodes and jobs, and moving a job's allocation after a migration.
//!
//! Everything goes through [`SlurmBackend`], so the daemon logic and its tests do not depend on
//! how Slurm is reached. `crate::libslurm::LibslurmBackend` is the default; [`ScontrolBackend`]
//! shells out to `scontrol`/`salloc` (`[slurm] backend = "scontrol"`, and the end-to-end tests use
//! it with a fake `scontrol`); [`NoSlurm`] is used when `[slurm] enabled = false`.

use std::process::Command;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("cannot run {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("unexpected output from {cmd}: {detail}")]
    Output { cmd: String, detail: String },
    #[error("libslurm: {0}")]
    Libslurm(String),
    #[error("Slurm is not watched (slurm.enabled = false)")]
    Disabled,
}

/// Node state flags the controller reacts to (parsed by [`NodeFlags::from_state`]).
pub use rebalancer_proto::NodeFlags;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlurmNode {
    pub name: String,
    pub state: String,
    pub flags: NodeFlags,
    pub cpus_total: u32,
    pub cpus_alloc: u32,
    pub mem_total_mb: u64,
    pub mem_alloc_mb: u64,
    pub partitions: Vec<String>,
    pub features: Vec<String>,
    pub addr: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlurmJob {
    pub job_id: u32,
    pub name: String,
    pub user: String,
    pub uid: u32,
    pub account: String,
    pub partition: String,
    pub state: String,
    pub nodes: Vec<String>,
    pub batch_host: Option<String>,
}

pub trait SlurmBackend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Current nodes, or `None` when nothing changed since the last answer (cheap to call often).
    /// `force` always answers.
    fn poll_nodes(&self, force: bool) -> Result<Option<Vec<SlurmNode>>, SlurmError>;
    fn jobs(&self) -> Result<Vec<SlurmJob>, SlurmError>;
    /// One job, if Slurm knows it.
    fn job(&self, job_id: u32) -> Result<Option<SlurmJob>, SlurmError> {
        Ok(self.jobs()?.into_iter().find(|j| j.job_id == job_id))
    }
    /// Adds `node` to a running job's allocation.
    fn expand_job(&self, job_id: u32, node: &str) -> Result<(), SlurmError>;
    /// Sets a running job's node list to `nodes` (which no longer holds the node left behind).
    fn set_job_nodes(&self, job_id: u32, nodes: &[String]) -> Result<(), SlurmError>;
    /// Records a move (a [`move_note`]) on the job where Slurm's tools show it. Backends that
    /// cannot do so record nothing.
    fn record_move(&self, _job_id: u32, _note: &str) -> Result<(), SlurmError> {
        Ok(())
    }
    /// Allocates a holder ([`HoldRequest`]) now or not at all; returns its job id.
    fn hold(&self, _req: &HoldRequest) -> Result<u32, SlurmError> {
        Err(SlurmError::Disabled)
    }
    /// Ends a job (a holder).
    fn cancel_job(&self, _job_id: u32) -> Result<(), SlurmError> {
        Err(SlurmError::Disabled)
    }
    /// CPUs slurmctld's core bitmap gives job `job_id` on `node` (the `CPU_IDs` of
    /// `scontrol show job -d`): what `CPUAlloc` counts for the job there.
    fn credited_cpus(&self, _job_id: u32, _node: &str) -> Result<u32, SlurmError> {
        Err(SlurmError::Disabled)
    }
}

/// Job name prefix of holder allocations: `rebal-hold:<job>:<container>`.
pub const HOLDER_PREFIX: &str = "rebal-hold:";

/// A holder's job name, which an admin reads in squeue as "held for job J's task C". Pure.
pub fn holder_name(job_id: u32, container: &str) -> String {
    format!("{HOLDER_PREFIX}{job_id}:{container}")
}

/// The job and container of a holder's job name, None for any other name. Pure.
pub fn parse_holder_name(name: &str) -> Option<(u32, &str)> {
    let (job, container) = name.strip_prefix(HOLDER_PREFIX)?.split_once(':')?;
    let job = job.parse().ok()?;
    (!container.is_empty()).then_some((job, container))
}

/// A holder allocation: `cpus` CPUs on `node`, for the moved task `container` of running job
/// `job_id`, in that job's partition, for at most the job's remaining time, under the
/// controller's user and `account` (None: the user's default), with 1 MB of memory (the job's
/// own memory on the node is already counted, per node, by the merge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub job_id: u32,
    pub container: String,
    pub node: String,
    pub cpus: u32,
    pub account: Option<String>,
}

impl HoldRequest {
    pub fn name(&self) -> String {
        holder_name(self.job_id, &self.container)
    }
    pub fn comment(&self) -> String {
        format!(
            "slurm-rebalancer: holds the CPUs of job {}'s moved task {} on {} (Slurm does not count them after a job expansion)",
            self.job_id, self.container, self.node
        )
    }
}

/// Minutes of a holder's time limit for a job that ends at `end_time` (Unix seconds) with a
/// time limit (`limited`), seen at `now`: the remaining time rounded down, so the holder never
/// outlives the job; None for an unlimited job; Err when less than a minute is left. Pure.
pub fn holder_minutes(limited: bool, end_time: i64, now: i64) -> Result<Option<u32>, String> {
    if !limited {
        return Ok(None);
    }
    let left = (end_time - now) / 60;
    if left < 1 {
        return Err(format!(
            "the job has {}s left, less than a holder's minute",
            (end_time - now).max(0)
        ));
    }
    Ok(Some(u32::try_from(left).unwrap_or(u32::MAX)))
}

/// CPUs in a `CPU_IDs=` list such as `0-1,3`. Pure.
fn count_cpu_ids(ids: &str) -> u32 {
    ids.split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(r.parse::<u32>().is_ok()),
        })
        .sum()
}

/// The CPUs `scontrol show job -d J` lists for the job on `node` (its `Nodes=... CPU_IDs=...`
/// lines; none when the node has no line). Pure.
pub fn parse_credited_cpus(text: &str, node: &str) -> u32 {
    text.lines()
        .filter_map(|l| {
            let f = fields(l.trim());
            let nodes = expand_hostlist(f.get("Nodes")?);
            nodes
                .iter()
                .any(|n| n == node)
                .then(|| count_cpu_ids(f.get("CPU_IDs").copied().unwrap_or("")))
        })
        .sum()
}

/// Minutes of squeue's `%L` (time left: `[D-]HH:MM:SS`, `MM:SS`, `UNLIMITED`, `NOT_SET`):
/// None when unlimited. Pure.
pub fn parse_time_left(s: &str) -> Result<Option<u32>, String> {
    let s = s.trim();
    if matches!(s, "UNLIMITED" | "NOT_SET" | "INFINITE") {
        return Ok(None);
    }
    let bad = || format!("cannot read squeue's time left {s:?}");
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().map_err(|_| bad())?, r),
        None => (0, s),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let secs = match parts.as_slice() {
        [h, m, sec] => h * 3600 + m * 60 + sec,
        [m, sec] => m * 60 + sec,
        [sec] => *sec,
        _ => return Err(bad()),
    } + days * 86_400;
    Ok(Some(u32::try_from(secs / 60).unwrap_or(u32::MAX)))
}

/// Longest AdminComment the rebalancer writes: slurmctld refuses longer comments (1024 bytes is
/// Slurm's limit for job comments), and other notes on the job must keep room.
pub const ADMIN_COMMENT_MAX: usize = 1000;
/// Prefix of the rebalancer's notes in AdminComment.
pub const NOTE_PREFIX: &str = "rebalancer:";
const NOTE_SEP: &str = "; ";

/// The AdminComment note of one move: `rebalancer: task T of step J.S moved A -> B (downtime N
/// ms)`. Pure.
pub fn move_note(
    task: &rebalancer_proto::TaskRef,
    source: &str,
    destination: &str,
    downtime_ms: Option<u64>,
) -> String {
    let step = match task.step_id {
        0xffff_fffb => "batch".to_string(),
        s => s.to_string(),
    };
    let mut n = format!(
        "{NOTE_PREFIX} task {} of step {}.{step} moved {source} -> {destination}",
        task.task_id, task.job_id
    );
    if let Some(d) = downtime_ms {
        n.push_str(&format!(" (downtime {d} ms)"));
    }
    n
}

/// `existing` AdminComment with `note` appended, at most `limit` bytes: the oldest rebalancer
/// notes go first; other text is never removed (if it leaves no room, the note is dropped).
/// Pure.
pub fn append_note(existing: &str, note: &str, limit: usize) -> String {
    let mut parts: Vec<&str> = existing
        .split(NOTE_SEP)
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    parts.push(note);
    while parts.join(NOTE_SEP).len() > limit {
        match parts.iter().position(|p| p.starts_with(NOTE_PREFIX)) {
            Some(i) if i + 1 < parts.len() => {
                parts.remove(i);
            }
            _ => return existing.trim().to_string(),
        }
    }
    parts.join(NOTE_SEP)
}

/// The AdminComment of `scontrol show job J` (multi-line form: the value may hold spaces).
pub fn parse_admin_comment(text: &str) -> String {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("AdminComment="))
        .map(|c| c.trim_end().to_string())
        .filter(|c| c != "(null)")
        .unwrap_or_default()
}

/// What the allocation needs after a container of `job` moved from `source` to `destination`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationChange {
    pub expand_to: Option<String>,
    /// New node list when the source can be released.
    pub shrink_to: Option<Vec<String>>,
    /// Why the source stays in the allocation.
    pub keep_reason: Option<String>,
}

/// Decides the allocation change: expand to the destination unless it is already in the job,
/// shrink from the source once nothing of the job remains there (never the batch host, which
/// Slurm cannot remove from a job). `step_elsewhere` names a node where another task of the moved
/// task's step runs: Slurm ends a step on all its nodes when one of them leaves the job, so the
/// source then stays.
pub fn allocation_change(
    job: &SlurmJob,
    source: &str,
    destination: &str,
    remaining_on_source: usize,
    step_elsewhere: Option<&str>,
) -> AllocationChange {
    let expand_to = (!job.nodes.iter().any(|n| n == destination)).then(|| destination.to_string());
    let (shrink_to, keep_reason) = if remaining_on_source > 0 {
        (
            None,
            Some(format!(
                "{remaining_on_source} container(s) of the job remain on {source}"
            )),
        )
    } else if let Some(other) = step_elsewhere {
        (
            None,
            Some(format!(
                "the moved task's step also runs on {other}; releasing {source} would end that step there too"
            )),
        )
    } else if job.batch_host.as_deref() == Some(source) {
        (None, Some(format!("{source} is the job's batch host")))
    } else if !job.nodes.iter().any(|n| n == source) {
        (None, None)
    } else {
        let mut nodes: Vec<String> = job.nodes.iter().filter(|n| *n != source).cloned().collect();
        if !nodes.iter().any(|n| n == destination) {
            nodes.push(destination.to_string());
        }
        (Some(nodes), None)
    };
    AllocationChange {
        expand_to,
        shrink_to,
        keep_reason,
    }
}

/// Whether a reason [`allocation_change`] gave for keeping the source can go away while the job
/// runs (its containers there end or move, the rest of the step ends); a batch host stays. Pure.
pub fn kept_source_may_change(reason: &str) -> bool {
    reason.contains(" remain on ") || reason.contains("step also runs on ")
}

/// Used when `[slurm] enabled = false`.
pub struct NoSlurm;

impl SlurmBackend for NoSlurm {
    fn name(&self) -> &'static str {
        "none"
    }
    fn poll_nodes(&self, _force: bool) -> Result<Option<Vec<SlurmNode>>, SlurmError> {
        Ok(None)
    }
    fn jobs(&self) -> Result<Vec<SlurmJob>, SlurmError> {
        Ok(vec![])
    }
    fn expand_job(&self, _job_id: u32, _node: &str) -> Result<(), SlurmError> {
        Err(SlurmError::Disabled)
    }
    fn set_job_nodes(&self, _job_id: u32, _nodes: &[String]) -> Result<(), SlurmError> {
        Err(SlurmError::Disabled)
    }
}

/// Reaches Slurm through its command-line tools.
pub struct ScontrolBackend {
    last: Mutex<Option<String>>,
}

impl Default for ScontrolBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl ScontrolBackend {
    pub fn new() -> Self {
        ScontrolBackend {
            last: Mutex::new(None),
        }
    }
}

fn run(prog: &str, args: &[&str]) -> Result<String, SlurmError> {
    run_env(prog, args, None)
}

fn run_env(
    prog: &str,
    args: &[&str],
    conf: Option<&std::path::Path>,
) -> Result<String, SlurmError> {
    let cmd = format!("{prog} {}", args.join(" "));
    let mut command = Command::new(prog);
    if let Some(c) = conf {
        command.env("SLURM_CONF", c);
    }
    let out = command
        .args(args)
        .output()
        .map_err(|source| SlurmError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(SlurmError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    // salloc reports the granted job on stderr.
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(s)
}

/// `key=value` tokens of one line of `scontrol show ... -o`.
fn fields(line: &str) -> std::collections::HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .collect()
}

fn list(v: Option<&&str>) -> Vec<String> {
    match v {
        None | Some(&"(null)") | Some(&"") => vec![],
        Some(s) => s.split(',').map(str::to_string).collect(),
    }
}

pub fn parse_nodes(text: &str) -> Vec<SlurmNode> {
    text.lines()
        .filter(|l| l.starts_with("NodeName="))
        .map(|l| {
            let f = fields(l);
            let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let state = f.get("State").copied().unwrap_or("UNKNOWN").to_string();
            SlurmNode {
                name: f.get("NodeName").copied().unwrap_or_default().to_string(),
                flags: NodeFlags::from_state(&state),
                state,
                cpus_total: num("CPUTot") as u32,
                cpus_alloc: num("CPUAlloc") as u32,
                mem_total_mb: num("RealMemory"),
                mem_alloc_mb: num("AllocMem"),
                partitions: list(f.get("Partitions")),
                features: list(f.get("ActiveFeatures")),
                addr: f.get("NodeAddr").map(|s| s.to_string()),
            }
        })
        .collect()
}

/// Expands a Slurm host list such as `node[1-3,5],gpu7`.
pub fn expand_hostlist(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    let bytes: Vec<char> = s.chars().collect();
    let mut parts = Vec::new();
    for (i, c) in bytes.iter().enumerate() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(bytes[start..i].iter().collect::<String>());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(bytes[start..].iter().collect::<String>());
    for p in parts.into_iter().filter(|p| !p.is_empty() && p != "(null)") {
        match (p.find('['), p.rfind(']')) {
            (Some(a), Some(b)) if b > a => {
                let (prefix, suffix) = (&p[..a], &p[b + 1..]);
                for r in p[a + 1..b].split(',') {
                    match r.split_once('-') {
                        Some((lo, hi)) => {
                            let width = lo.len();
                            if let (Ok(l), Ok(h)) = (lo.parse::<u64>(), hi.parse::<u64>()) {
                                for n in l..=h {
                                    out.push(format!("{prefix}{n:0width$}{suffix}"));
                                }
                            }
                        }
                        None => out.push(format!("{prefix}{r}{suffix}")),
                    }
                }
            }
            _ => out.push(p),
        }
    }
    out
}

pub fn parse_jobs(text: &str) -> Vec<SlurmJob> {
    text.lines()
        .filter(|l| l.starts_with("JobId="))
        .filter_map(|l| {
            let f = fields(l);
            let job_id = f.get("JobId")?.parse().ok()?;
            // UserId=alice(1000)
            let (user, uid) = f
                .get("UserId")
                .and_then(|u| {
                    let (n, rest) = u.split_once('(')?;
                    Some((n.to_string(), rest.trim_end_matches(')').parse().ok()?))
                })
                .unwrap_or_default();
            Some(SlurmJob {
                job_id,
                name: f.get("JobName").copied().unwrap_or_default().to_string(),
                user,
                uid,
                account: f.get("Account").copied().unwrap_or_default().to_string(),
                partition: f.get("Partition").copied().unwrap_or_default().to_string(),
                state: f.get("JobState").copied().unwrap_or_default().to_string(),
                nodes: expand_hostlist(f.get("NodeList").copied().unwrap_or_default()),
                batch_host: f
                    .get("BatchHost")
                    .filter(|b| **b != "(null)")
                    .map(|s| s.to_string()),
            })
        })
        .collect()
}

impl SlurmBackend for ScontrolBackend {
    fn name(&self) -> &'static str {
        "scontrol"
    }

    fn poll_nodes(&self, force: bool) -> Result<Option<Vec<SlurmNode>>, SlurmError> {
        let text = run("scontrol", &["show", "node", "-o"])?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // The output carries no update time; an unchanged text is "no change". Drop volatile
        // fields (load, free memory) first so that they do not count as changes.
        let stable: String = text
            .split_whitespace()
            .filter(|t| !t.starts_with("CPULoad=") && !t.starts_with("FreeMem="))
            .collect::<Vec<_>>()
            .join(" ");
        if !force && last.as_deref() == Some(stable.as_str()) {
            return Ok(None);
        }
        *last = Some(stable);
        Ok(Some(parse_nodes(&text)))
    }

    fn jobs(&self) -> Result<Vec<SlurmJob>, SlurmError> {
        Ok(parse_jobs(&run("scontrol", &["show", "job", "-o"])?))
    }

    fn expand_job(&self, job_id: u32, node: &str) -> Result<(), SlurmError> {
        // Needs SchedulerParameters=permit_job_expansion (see FIELD-NOTES): a helper allocation
        // on the node with an expand dependency, emptied into the job.
        let dep = format!("--dependency=expand:{job_id}");
        let out = run(
            "salloc",
            &[
                "--no-shell",
                "-N1",
                "-w",
                node,
                &dep,
                "--immediate=10",
                "-J",
                "rebalancer-expand",
            ],
        )?;
        let helper = out
            .split_whitespace()
            .skip_while(|w| *w != "allocation")
            .nth(1)
            .and_then(|w| w.parse::<u32>().ok())
            .ok_or_else(|| SlurmError::Output {
                cmd: "salloc".into(),
                detail: format!("no job id in {out:?}"),
            })?;
        run(
            "scontrol",
            &["update", &format!("jobid={helper}"), "NumNodes=0"],
        )?;
        run(
            "scontrol",
            &["update", &format!("jobid={job_id}"), "NumNodes=ALL"],
        )?;
        Ok(())
    }

    fn set_job_nodes(&self, job_id: u32, nodes: &[String]) -> Result<(), SlurmError> {
        run(
            "scontrol",
            &[
                "update",
                &format!("jobid={job_id}"),
                &format!("NodeList={}", nodes.join(",")),
            ],
        )?;
        Ok(())
    }

    fn record_move(&self, job_id: u32, note: &str) -> Result<(), SlurmError> {
        record_move_with_scontrol(None, job_id, note)
    }

    fn hold(&self, req: &HoldRequest) -> Result<u32, SlurmError> {
        let job = req.job_id.to_string();
        let Some(j) = self.job(req.job_id)? else {
            return Err(SlurmError::Output {
                cmd: "scontrol show job".into(),
                detail: format!("job {job} is not running"),
            });
        };
        let left = run("squeue", &["-h", "-j", &job, "-o", "%L"])?;
        let minutes = parse_time_left(&left).map_err(|detail| SlurmError::Output {
            cmd: "squeue".into(),
            detail,
        })?;
        if minutes == Some(0) {
            return Err(SlurmError::Output {
                cmd: "squeue".into(),
                detail: format!("job {job} has less than a minute left"),
            });
        }
        let (cpus, name, comment) = (
            req.cpus.to_string(),
            format!("--job-name={}", req.name()),
            format!("--comment={}", req.comment()),
        );
        let time = format!(
            "--time={}",
            minutes.map_or("UNLIMITED".into(), |m| m.to_string())
        );
        let partition = format!("--partition={}", j.partition);
        let mut args = vec![
            "--no-shell",
            "--immediate=1",
            "-N1",
            "-n1",
            "-c",
            &cpus,
            "--mem=1",
            "-w",
            &req.node,
            &name,
            &comment,
            &time,
        ];
        if !j.partition.is_empty() {
            args.push(&partition);
        }
        let account = req.account.as_ref().map(|a| format!("--account={a}"));
        if let Some(a) = &account {
            args.push(a);
        }
        let out = run("salloc", &args)?;
        out.split_whitespace()
            .skip_while(|w| *w != "allocation")
            .nth(1)
            .and_then(|w| w.parse::<u32>().ok())
            .ok_or_else(|| SlurmError::Output {
                cmd: "salloc".into(),
                detail: format!("no job id in {out:?}"),
            })
    }

    fn cancel_job(&self, job_id: u32) -> Result<(), SlurmError> {
        run("scancel", &[&job_id.to_string()])?;
        Ok(())
    }

    fn credited_cpus(&self, job_id: u32, node: &str) -> Result<u32, SlurmError> {
        credited_cpus_with_scontrol(None, job_id, node)
    }
}

/// [`SlurmBackend::credited_cpus`] with `scontrol show job -d` (libslurm keeps a job's core
/// bitmap opaque); `conf` sets `SLURM_CONF` for it.
pub fn credited_cpus_with_scontrol(
    conf: Option<&std::path::Path>,
    job_id: u32,
    node: &str,
) -> Result<u32, SlurmError> {
    let text = run_env(
        "scontrol",
        &["show", "job", "-d", &job_id.to_string()],
        conf,
    )?;
    Ok(parse_credited_cpus(&text, node))
}

/// [`SlurmBackend::record_move`] with `scontrol` (libslurm's job update has no AdminComment in
/// this project's bindings); `conf` sets `SLURM_CONF` for it.
pub fn record_move_with_scontrol(
    conf: Option<&std::path::Path>,
    job_id: u32,
    note: &str,
) -> Result<(), SlurmError> {
    let with_conf = |args: &[&str]| -> Result<String, SlurmError> {
        match conf {
            Some(c) => run_env("scontrol", args, Some(c)),
            None => run("scontrol", args),
        }
    };
    let job = job_id.to_string();
    let existing = parse_admin_comment(&with_conf(&["show", "job", &job])?);
    let comment = append_note(&existing, note, ADMIN_COMMENT_MAX);
    if comment == existing {
        return Ok(());
    }
    with_conf(&[
        "update",
        &format!("jobid={job}"),
        &format!("AdminComment={comment}"),
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_flags() {
        let f = NodeFlags::from_state("MIXED+DRAIN");
        assert!(f.drain && f.draining && !f.drained && !f.down);
        assert_eq!(f.evacuate_reason(), Some("DRAINING"));
        let f = NodeFlags::from_state("IDLE+DRAIN");
        assert!(f.drained && !f.draining);
        assert!(NodeFlags::from_state("DOWN*").down);
        assert!(NodeFlags::from_state("MIXED+REBOOT_REQUESTED").reboot_asap);
        assert_eq!(NodeFlags::from_state("IDLE").evacuate_reason(), None);
    }

    #[test]
    fn parses_scontrol_lines() {
        let nodes = parse_nodes(
            "NodeName=node1 Arch=x86_64 CPUAlloc=1 CPUTot=2 CPULoad=0.1 AvailableFeatures=(null) ActiveFeatures=ssd,fast NodeAddr=198.18.0.11 RealMemory=1000 AllocMem=100 State=MIXED+DRAIN Partitions=debug Reason=maint [root@2026-11-24]\n",
        );
        assert_eq!(nodes.len(), 1);
        let n = &nodes[0];
        assert_eq!(
            (n.name.as_str(), n.cpus_total, n.cpus_alloc, n.mem_total_mb),
            ("node1", 2, 1, 1000)
        );
        assert_eq!(n.features, ["ssd", "fast"]);
        assert!(n.flags.draining);
        let jobs = parse_jobs("JobId=12 JobName=x UserId=alice(1000) GroupId=alice(1000) Account=phys JobState=RUNNING Partition=debug NodeList=node[1-2,4] BatchHost=node1\n");
        assert_eq!(jobs[0].uid, 1000);
        assert_eq!(jobs[0].nodes, ["node1", "node2", "node4"]);
        assert_eq!(jobs[0].batch_host.as_deref(), Some("node1"));
    }

    #[test]
    fn moves_are_noted_in_the_admin_comment_within_its_limit() {
        let t = rebalancer_proto::TaskRef {
            job_id: 12,
            step_id: 0,
            task_id: 1,
        };
        let n = move_note(&t, "node1", "node2", Some(185));
        assert_eq!(
            n,
            "rebalancer: task 1 of step 12.0 moved node1 -> node2 (downtime 185 ms)"
        );
        assert_eq!(append_note("", &n, 1000), n);
        let two = append_note(&format!("site note; {n}"), "rebalancer: x", 1000);
        assert_eq!(two, format!("site note; {n}; rebalancer: x"));
        // Full: the oldest rebalancer note goes, the site's note stays.
        let full = append_note(&two, "rebalancer: y", two.len());
        assert_eq!(full, "site note; rebalancer: x; rebalancer: y");
        // No room even for the note alone next to the site's text: unchanged.
        assert_eq!(append_note("site note", &n, 12), "site note");
        let shown = "JobId=12 JobName=x\n   AdminComment=site note; rebalancer: a b \n   Power=\n";
        assert_eq!(parse_admin_comment(shown), "site note; rebalancer: a b");
        assert_eq!(parse_admin_comment("JobId=12\n"), "");
    }

    #[test]
    fn holder_names_times_and_credited_cpus() {
        let n = holder_name(4, "j4.s0.t0");
        assert_eq!(n, "rebal-hold:4:j4.s0.t0");
        assert_eq!(parse_holder_name(&n), Some((4, "j4.s0.t0")));
        assert_eq!(parse_holder_name("rebal-hold:x:j4.s0.t0"), None);
        assert_eq!(parse_holder_name("rebal-hold:4:"), None);
        assert_eq!(parse_holder_name("server"), None);
        // Rounded down: a holder never outlives its job.
        assert_eq!(holder_minutes(true, 1000 + 90, 1000), Ok(Some(1)));
        assert_eq!(holder_minutes(true, 1000 + 3600, 1000), Ok(Some(60)));
        assert!(holder_minutes(true, 1000 + 59, 1000).is_err());
        assert_eq!(holder_minutes(false, 0, 1000), Ok(None));
        assert_eq!(parse_time_left("UNLIMITED"), Ok(None));
        assert_eq!(parse_time_left("1-02:03:04"), Ok(Some(26 * 60 + 3)));
        assert_eq!(parse_time_left("5:30"), Ok(Some(5)));
        assert!(parse_time_left("soon").is_err());
        // scontrol show job -d after the merge: node1 has core 0, node2 none.
        let merged =
            "JobId=1 JobName=x\n   NodeList=node[1-2]\n     Nodes=node1 CPU_IDs=0 Mem=0 GRES=\n";
        assert_eq!(parse_credited_cpus(merged, "node1"), 1);
        assert_eq!(parse_credited_cpus(merged, "node2"), 0);
        let two =
            "     Nodes=node[1-2] CPU_IDs=0-1 Mem=0 GRES=\n     Nodes=node3 CPU_IDs=0,3-5 Mem=0\n";
        assert_eq!(parse_credited_cpus(two, "node2"), 2);
        assert_eq!(parse_credited_cpus(two, "node3"), 4);
    }

    #[test]
    fn hostlists() {
        assert_eq!(
            expand_hostlist("n[08-10],gpu1"),
            ["n08", "n09", "n10", "gpu1"]
        );
        assert!(expand_hostlist("(null)").is_empty());
    }

    #[test]
    fn allocation_changes() {
        let job = SlurmJob {
            job_id: 3,
            nodes: vec!["node1".into(), "node2".into()],
            batch_host: Some("node1".into()),
            ..Default::default()
        };
        let c = allocation_change(&job, "node2", "node3", 0, None);
        assert_eq!(c.expand_to.as_deref(), Some("node3"));
        assert_eq!(
            c.shrink_to,
            Some(vec!["node1".to_string(), "node3".to_string()])
        );
        let c = allocation_change(&job, "node2", "node3", 1, None);
        assert!(c.shrink_to.is_none());
        assert!(c
            .keep_reason
            .as_deref()
            .unwrap_or("")
            .contains("remain on node2"));
        let c = allocation_change(&job, "node1", "node2", 0, None);
        assert!(c.expand_to.is_none());
        assert!(c
            .keep_reason
            .as_deref()
            .unwrap_or("")
            .contains("batch host"));
        // A two-node step: its other task on node1 would die with the step if node2 left.
        let c = allocation_change(&job, "node2", "node3", 0, Some("node1"));
        assert_eq!(c.expand_to.as_deref(), Some("node3"));
        assert!(c.shrink_to.is_none());
        assert!(c
            .keep_reason
            .as_deref()
            .unwrap_or("")
            .contains("also runs on node1"));
        assert!(kept_source_may_change(
            c.keep_reason.as_deref().unwrap_or("")
        ));
        let batch = allocation_change(&job, "node1", "node2", 0, None);
        assert!(!kept_source_may_change(
            batch.keep_reason.as_deref().unwrap_or("")
        ));
    }
}
