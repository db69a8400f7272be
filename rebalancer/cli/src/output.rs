//! How replies are shown: tables, detail views and JSON (`--json`), and `show job`'s view.

use std::collections::HashMap;

use rebalancer_proto::control::{ControlReply, ControlRequest};
use rebalancer_proto::{ErrorCode, ErrorReply};

use crate::{args, bad, client, filter, print_json, render, Cli, Cmd, Fail};

/// `show job J`: what the job runs where, how it moved, and what was decided about it.
pub(crate) async fn show_job(cli: &Cli, client: &mut client::Client, job: u32) -> Result<(), Fail> {
    let f = filter::Filter {
        job: Some(job),
        ..Default::default()
    };
    let containers = match client
        .call(
            &ControlRequest::ShowContainers {
                id: None,
                job_id: Some(job),
            },
            |_| {},
        )
        .await?
    {
        ControlReply::Containers { containers } => containers,
        _ => vec![],
    };
    let migrations = match f.apply(
        client
            .call(
                &ControlRequest::ShowMigrations {
                    id: None,
                    active: false,
                },
                |_| {},
            )
            .await?,
    ) {
        ControlReply::Migrations { migrations } => migrations,
        _ => vec![],
    };
    let decisions = match f.apply(
        client
            .call(
                &ControlRequest::History {
                    limit: Some(filter::HISTORY_SCAN),
                },
                |_| {},
            )
            .await?,
    ) {
        ControlReply::History { decisions } => decisions,
        _ => vec![],
    };
    if containers.is_empty() && migrations.is_empty() && decisions.is_empty() {
        return Err(Fail::Error(ErrorReply {
            code: ErrorCode::NotFound,
            message: format!(
                "job {job}: no container, migration or decision (not migratable, ended, or not yours)"
            ),
        }));
    }
    let extra = Extra {
        migrations: migrations
            .iter()
            .map(|m| (m.record.id.clone(), m.record.clone()))
            .collect(),
    };
    if cli.json {
        print_json(&serde_json::json!({
            "job_id": job,
            "containers": containers,
            "migrations": migrations,
            "decisions": history_json(&decisions, &extra),
        }))?;
        return Ok(());
    }
    outln!(
        "JobId={job} Containers={} Moves={}",
        containers.len(),
        migrations.len()
    );
    if !containers.is_empty() {
        outln!("\nContainers:");
        out!("{}", render::containers(&containers));
    }
    if !migrations.is_empty() {
        outln!("\nMoves:");
        out!("{}", render::migrations(&migrations));
    }
    // The holder allocations that make Slurm count moved tasks' CPUs (docs/controller.md).
    let holders: Vec<_> = migrations
        .iter()
        .filter_map(|m| Some((m.record.id.as_str(), m.slurm_holder.as_deref()?)))
        .collect();
    if !holders.is_empty() {
        outln!("\nHolders:");
        for (id, h) in holders {
            outln!("  {id}: {h}");
        }
    }
    if !decisions.is_empty() {
        outln!("\nDecisions:");
        out!("{}", render::history(&decisions, &extra.migrations));
    }
    Ok(())
}

/// What a reply is shown with besides itself.
#[derive(Default)]
pub(crate) struct Extra {
    /// Migration records by id, for `history`.
    pub(crate) migrations: HashMap<String, rebalancer_proto::MigrationRecord>,
}

pub(crate) fn output(cli: &Cli, reply: ControlReply, extra: &Extra) -> Result<(), Fail> {
    if cli.json {
        // A policy check with errors still prints its report, then fails.
        let failed = match &reply {
            ControlReply::PolicyCheck { report } if !report.ok => Some(ErrorCode::BadRequest),
            ControlReply::Cancelled { cancels } => cancels
                .iter()
                .find(|c| !c.accepted)
                .map(|c| c.code.unwrap_or(ErrorCode::Internal)),
            _ => None,
        };
        let payload = match &reply {
            ControlReply::History { decisions } => history_json(decisions, extra),
            _ => json_payload(&reply),
        };
        if matches!(
            cli.cmd,
            Cmd::Migrate { wait: true, .. }
                | Cmd::Evacuate { wait: true, .. }
                | Cmd::Wait { .. }
                | Cmd::Show { wait: true, .. }
        ) {
            // After the streamed events: one JSON document per line throughout.
            outln!("{payload}");
        } else {
            print_json(&payload)?;
        }
        return match failed {
            Some(code) => Err(Fail::Reported(code)),
            None => Ok(()),
        };
    }
    // A named object gets the detail view; filters keep the table.
    let single = match &cli.cmd {
        Cmd::Show { what, args, .. } => {
            matches!(args::parse_show(what.plain(), args), Ok((Some(_), _)))
        }
        _ => false,
    };
    match reply {
        ControlReply::Pong { software } => outln!("{software} is up"),
        ControlReply::Nodes { nodes } if single => nodes
            .iter()
            .for_each(|n| print_detail("NodeName", &n.name, n)),
        ControlReply::Nodes { nodes } => out!("{}", render::nodes(&nodes)),
        ControlReply::Containers { containers } if single => containers
            .iter()
            .for_each(|c| print_detail("Container", &c.id, c)),
        ControlReply::Containers { containers } => out!("{}", render::containers(&containers)),
        ControlReply::Migrations { migrations } if single => migrations
            .iter()
            .for_each(|m| out!("{}", render::migration_detail(m))),
        ControlReply::Migrations { migrations } => out!("{}", render::migrations(&migrations)),
        ControlReply::Policies { policies } if single || matches!(cli.cmd, Cmd::Update { .. }) => {
            policies
                .iter()
                .for_each(|p| print_detail("PolicyName", &p.name, p))
        }
        ControlReply::Policies { policies } => out!("{}", render::policies(&policies)),
        ControlReply::PolicyCheck { report } => {
            for e in &report.errors {
                eprintln!("{e}");
            }
            if !report.ok {
                return Err(bad(format!(
                    "policy check found {} error(s)",
                    report.errors.len()
                ))
                .into());
            }
            if report.policies.is_empty() {
                outln!("policies valid");
            } else {
                outln!("policies valid: {}", report.policies.join(", "));
            }
        }
        ControlReply::Migrated {
            decisions,
            migrations,
        } => {
            if migrations.is_empty() {
                outln!("nothing to migrate");
            } else {
                out!("{}", render::migrations(&migrations));
            }
            for d in decisions.iter().filter(|d| d.migration.is_none()) {
                let detail = d.detail.as_deref().unwrap_or(&d.why);
                if d.policy == "-" {
                    // Work that cannot move (the controller's `unmovable`).
                    outln!("stays on {}: {detail}", d.source);
                } else {
                    outln!("{}: {} ({detail})", d.container, d.outcome.as_str());
                }
            }
        }
        ControlReply::History { decisions } => {
            out!("{}", render::history(&decisions, &extra.migrations))
        }
        ControlReply::Plan { moves } if moves.is_empty() => outln!("no moves planned"),
        ControlReply::Plan { moves } => out!("{}", render::plan(&moves)),
        ControlReply::Explanation { moves, unmoved } => {
            if moves.is_empty() {
                outln!("no moves planned");
            } else {
                out!("{}", render::plan(&moves));
            }
            if !unmoved.is_empty() {
                outln!();
                out!("{}", render::unmoved(&unmoved));
            }
        }
        ControlReply::Done => outln!("done"),
        ControlReply::Blocks { blocks } => out!("{}", crate::blocks::render(&blocks)),
        ControlReply::Cancelled { cancels } => {
            for c in &cancels {
                outln!(
                    "migration {} ({} on {}): {}",
                    render::short_id(&c.migration),
                    c.container,
                    c.source,
                    c.message
                );
            }
            // A job's cancel that some of its migrations refused fails like one refusal.
            if let Some(c) = cancels.iter().find(|c| !c.accepted) {
                return Err(Fail::Reported(c.code.unwrap_or(ErrorCode::Internal)));
            }
        }
    }
    Ok(())
}

/// `history --json`: the decisions, each with `result` and `result_reason` as the table shows
/// them (a started decision takes its migration's end).
pub(crate) fn history_json(
    ds: &[rebalancer_proto::control::DecisionRecord],
    extra: &Extra,
) -> serde_json::Value {
    let items = ds
        .iter()
        .map(|d| {
            let m = d.migration.as_ref().and_then(|id| extra.migrations.get(id));
            let (result, reason) = render::decision_result(d, m);
            let mut v = serde_json::to_value(d).unwrap_or(serde_json::Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("result".into(), result.into());
                o.insert("result_reason".into(), reason.into());
            }
            v
        })
        .collect();
    serde_json::Value::Array(items)
}

/// The reply without its envelope: `show nodes --json` prints the list of nodes, `policy check`
/// its report, `ping` an object; replies with several parts stay objects.
pub(crate) fn json_payload(reply: &ControlReply) -> serde_json::Value {
    let mut v = serde_json::to_value(reply).unwrap_or(serde_json::Value::Null);
    let keep_object = matches!(reply, ControlReply::Pong { .. });
    if let Some(m) = v.as_object_mut() {
        m.remove("kind");
        if m.len() == 1 && !keep_object {
            if let Some((_, inner)) = m.iter().next() {
                return inner.clone();
            }
        }
    }
    v
}

pub(crate) fn print_detail<T: serde::Serialize>(label: &str, name: &str, v: &T) {
    outln!("{label}={name}");
    if let Ok(j) = serde_json::to_value(v) {
        out!("{}", render::detail(&j));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_drops_the_envelope() {
        let v = json_payload(&ControlReply::Policies { policies: vec![] });
        assert_eq!(v, serde_json::json!([]));
        let v = json_payload(&ControlReply::Migrated {
            decisions: vec![],
            migrations: vec![],
        });
        assert_eq!(v, serde_json::json!({"decisions": [], "migrations": []}));
        let v = json_payload(&ControlReply::Done);
        assert_eq!(v, serde_json::json!({}));
    }
}
