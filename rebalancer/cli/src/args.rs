//! scontrol-style `key=value` arguments.

use rebalancer_proto::control::{CancelTarget, MigrateTarget, PolicyState};
use rebalancer_proto::MigrationMode;

use crate::filter::Filter;
pub use crate::kv::{get, parse_job, parse_kv};

/// Arguments of `rebalctl migrate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateArgs {
    pub target: MigrateTarget,
    pub node: Option<String>,
    pub mode: Option<MigrationMode>,
}

pub const MIGRATE_KEYS: &[&[&str]] = &[
    &["job", "jobid"],
    &["step", "stepid"],
    &["container", "id"],
    &["node", "nodename", "destination"],
    &["mode"],
];

pub fn parse_migrate(words: &[String]) -> Result<MigrateArgs, String> {
    let kv = parse_kv(words, MIGRATE_KEYS)?;
    let targets: Vec<&str> = ["job", "step", "container"]
        .into_iter()
        .filter(|k| get(&kv, k).is_some())
        .collect();
    let target = match targets.as_slice() {
        ["job"] => MigrateTarget::Job {
            job_id: parse_job(get(&kv, "job").unwrap_or_default())?,
        },
        ["step"] => {
            let v = get(&kv, "step").unwrap_or_default();
            let (j, s) = v
                .split_once('.')
                .ok_or_else(|| format!("step '{v}' is not JOB.STEP"))?;
            MigrateTarget::Step {
                job_id: parse_job(j)?,
                step_id: s
                    .parse()
                    .map_err(|_| format!("step '{v}' is not JOB.STEP"))?,
            }
        }
        ["container"] => MigrateTarget::Container {
            id: get(&kv, "container").unwrap_or_default().to_string(),
        },
        [] => return Err("name what to migrate: job=J, step=J.S or container=ID".into()),
        _ => return Err("give only one of job=, step= and container=".into()),
    };
    Ok(MigrateArgs {
        target,
        node: get(&kv, "node").map(str::to_string),
        mode: get(&kv, "mode").map(str::parse).transpose()?,
    })
}

/// `cancel migration=ID | job=J`.
pub fn parse_cancel(words: &[String]) -> Result<CancelTarget, String> {
    let kv = parse_kv(
        words,
        &[&["migration", "id", "migrationid"], &["job", "jobid"]],
    )?;
    match (get(&kv, "migration"), get(&kv, "job")) {
        (Some(id), None) => Ok(CancelTarget::Migration { id: id.to_string() }),
        (None, Some(j)) => Ok(CancelTarget::Job {
            job_id: parse_job(j)?,
        }),
        (None, None) => Err("name what to cancel: migration=ID or job=J".into()),
        (Some(_), Some(_)) => Err("give only one of migration= and job=".into()),
    }
}

pub fn parse_evacuate(words: &[String]) -> Result<(String, Option<MigrationMode>), String> {
    let kv = parse_kv(words, &[&["node", "nodename"], &["mode"]])?;
    let node = get(&kv, "node")
        .ok_or("name the node: node=NODE")?
        .to_string();
    Ok((node, get(&kv, "mode").map(str::parse).transpose()?))
}

pub fn parse_update(words: &[String]) -> Result<(String, PolicyState), String> {
    let kv = parse_kv(words, &[&["policy", "policyname", "name"], &["state"]])?;
    let name = get(&kv, "policy").ok_or("name the policy: policy=NAME")?;
    let state = get(&kv, "state").ok_or("give the new state: state=enabled|disabled|dry-run")?;
    Ok((name.to_string(), state.parse()?))
}

/// `history`'s limit=N alone (None: the controller's default).
pub fn parse_history(words: &[String]) -> Result<Option<u32>, String> {
    let f = parse_history_filter(words)?;
    Ok(f.limit.map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
}

/// `history [job=J] [node=N] [policy=P] [outcome=O] [limit=N]`.
pub fn parse_history_filter(words: &[String]) -> Result<Filter, String> {
    Filter::parse(
        words,
        &[
            &["limit", "count"],
            &["job", "jobid"],
            &["node", "nodename"],
            &["policy", "policyname"],
            &["state", "outcome"],
        ],
    )
}

/// `show WHAT [NAME] [KEY=VALUE...]`: the name (or `name=`/`NodeName=`/`id=`) and the filters
/// that apply to WHAT.
pub fn parse_show(what: ShowWhat, words: &[String]) -> Result<(Option<String>, Filter), String> {
    let mut name = None;
    let mut kv = Vec::new();
    for w in words {
        if w.contains('=') {
            kv.push(w.clone());
        } else if name.replace(w.clone()).is_some() {
            return Err(format!("'{w}': give one name, then KEY=VALUE filters"));
        }
    }
    let (name_keys, keys): (&[&'static str], &[&[&'static str]]) = match what {
        ShowWhat::Nodes => (&["name", "nodename"], &[&["state"], &["limit"]]),
        ShowWhat::Containers => (
            &["name", "id", "container"],
            &[
                &["job", "jobid"],
                &["node", "nodename"],
                &["state"],
                &["limit"],
            ],
        ),
        ShowWhat::Migrations => (
            &["name", "id", "migration"],
            &[
                &["job", "jobid"],
                &["node", "nodename"],
                &["state"],
                &["policy", "policyname"],
                &["limit"],
            ],
        ),
        ShowWhat::Policies => (&["name", "policy", "policyname"], &[]),
        ShowWhat::Job => (&["name", "job", "jobid"], &[]),
        // The name is the node whose blocks are shown.
        ShowWhat::Blocks => (&["name", "node", "nodename"], &[]),
    };
    let mut allowed: Vec<&[&'static str]> = vec![name_keys];
    allowed.extend_from_slice(keys);
    let parsed = parse_kv(&kv, &allowed)?;
    if let Some(n) = get(&parsed, "name") {
        if name.replace(n.to_string()).is_some() {
            return Err("the name is given twice (as a word and as a key)".into());
        }
    }
    let rest: Vec<String> = kv
        .into_iter()
        .filter(|w| {
            let k = w.split('=').next().unwrap_or("").to_ascii_lowercase();
            !name_keys.contains(&k.as_str())
        })
        .collect();
    Ok((name, Filter::parse(&rest, keys)?))
}

/// What `show` shows (the CLI's `What`, without clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShowWhat {
    Nodes,
    Containers,
    Migrations,
    Policies,
    Job,
    Blocks,
}

/// `wait migration=ID` (or the id alone).
pub fn parse_wait(words: &[String]) -> Result<String, String> {
    if let [id] = words {
        if !id.contains('=') {
            return Ok(id.clone());
        }
    }
    let kv = parse_kv(words, &[&["migration", "id", "migrationid"]])?;
    get(&kv, "migration")
        .map(str::to_string)
        .ok_or_else(|| "name the migration: migration=ID".into())
}

/// `plan job=J node=NODE`, both optional.
pub fn parse_plan(words: &[String]) -> Result<(Option<u32>, Option<String>), String> {
    let kv = parse_kv(words, &[&["job", "jobid"], &["node", "nodename"]])?;
    Ok((
        get(&kv, "job").map(parse_job).transpose()?,
        get(&kv, "node").map(str::to_string),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn migrate_targets() {
        let a = parse_migrate(&w("job=42 node=node2 mode=post-copy")).expect("job");
        assert_eq!(a.target, MigrateTarget::Job { job_id: 42 });
        assert_eq!(a.node.as_deref(), Some("node2"));
        assert_eq!(a.mode, Some(MigrationMode::PostCopy));
        let a = parse_migrate(&w("StepId=42.1")).expect("step, scontrol spelling");
        assert_eq!(
            a.target,
            MigrateTarget::Step {
                job_id: 42,
                step_id: 1
            }
        );
        let a = parse_migrate(&w("container=j1.s0.t0")).expect("container");
        assert_eq!(
            a.target,
            MigrateTarget::Container {
                id: "j1.s0.t0".into()
            }
        );
        assert!(a.node.is_none());
    }

    #[test]
    fn migrate_errors_say_what_is_wrong() {
        let e = |s: &str| parse_migrate(&w(s)).expect_err(s);
        assert!(e("node=n1").contains("name what to migrate"));
        assert!(e("job=1 step=1.0").contains("only one of"));
        assert!(e("job=x").contains("not a job id"));
        assert!(e("step=5").contains("not JOB.STEP"));
        assert!(e("job=1 mode=live").contains("unknown migration mode 'live'"));
        assert!(e("job=1 colour=red").contains("unknown key 'colour'"));
        assert!(e("job=1 job=2").contains("given twice"));
        assert!(e("job").contains("not KEY=VALUE"));
        assert!(e("job=").contains("needs a value"));
    }

    #[test]
    fn other_commands() {
        assert_eq!(
            parse_evacuate(&w("Node=n3")).expect("evac"),
            ("n3".into(), None)
        );
        assert!(parse_evacuate(&w("")).is_err());
        assert_eq!(
            parse_update(&w("policy=thermal state=dry-run")).expect("update"),
            ("thermal".into(), PolicyState::DryRun)
        );
        assert!(parse_update(&w("policy=thermal state=off")).is_err());
        assert_eq!(parse_history(&w("limit=5")).expect("limit"), Some(5));
        assert_eq!(parse_history(&[]).expect("none"), None);
        assert!(parse_history(&w("limit=0")).is_err());
    }

    #[test]
    fn show_takes_a_name_and_filters() {
        let (n, f) = parse_show(ShowWhat::Nodes, &w("NodeName=node1")).expect("nodename");
        assert_eq!(n.as_deref(), Some("node1"));
        assert!(f.is_empty());
        let (n, f) = parse_show(ShowWhat::Nodes, &w("state=DRAIN")).expect("state");
        assert_eq!((n, f.state.as_deref()), (None, Some("DRAIN")));
        let (n, f) = parse_show(ShowWhat::Migrations, &w("JobId=4 node=n2 limit=3")).expect("m");
        assert_eq!(
            (n, f.job, f.node.as_deref(), f.limit),
            (None, Some(4), Some("n2"), Some(3))
        );
        let (n, _) = parse_show(ShowWhat::Migrations, &w("3f2a")).expect("id");
        assert_eq!(n.as_deref(), Some("3f2a"));
        let e = parse_show(ShowWhat::Policies, &w("job=4")).expect_err("no filters");
        assert!(e.contains("unknown key 'job'"), "{e}");
        let e = parse_show(ShowWhat::Nodes, &w("node1 node2")).expect_err("two names");
        assert!(e.contains("one name"), "{e}");
        let e = parse_show(ShowWhat::Nodes, &w("node1 NodeName=node2")).expect_err("twice");
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn values_are_case_insensitive_like_scontrols() {
        let a = parse_migrate(&w("JobId=7 Mode=Stop-And-Copy")).expect("mode");
        assert_eq!(a.mode, Some(MigrationMode::StopAndCopy));
        assert_eq!(
            parse_update(&w("Policy=thermal State=Dry-Run"))
                .expect("state")
                .1,
            PolicyState::DryRun
        );
    }
}
