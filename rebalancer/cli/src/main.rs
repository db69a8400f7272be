//! `rebalctl`: scontrol-style admin command for slurm-rebalancer. See rebalctl(1).

mod args;
mod client;
mod filter;
mod render;

/// print!/println! that ignore a closed stdout (`rebalctl ... | head` must not panic).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($t)*);
    }};
}
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rebalancer_proto::control::{ControlReply, ControlRequest, PolicySource};
use rebalancer_proto::{ErrorCode, ErrorReply, Event};

const DEFAULT_SOCKET: &str = "/run/rebalancer/controller.sock";

const EXIT_HELP: &str = "\
Exit status (scripts can rely on it; ErrorCode::exit_code in rebalancer-proto):
   0  success
   1  internal error (also: a migration failed after the point of no return)
   2  bad request: unknown command, bad KEY=VALUE, invalid policy file
   3  not found: no such job, step, container, node, migration or policy
   4  permission denied: only root, the SlurmUser and operators may change things
   5  busy: the container is already migrating, or no slot freed up in time
   6  unreachable: rebalancerd or the agent cannot be reached
   7  unsupported: a node lacks a kernel or CRIU feature the migration needs
   8  no room: no destination has the CPUs or memory
   9  timeout
  10  rolled back: the migration failed and the container still runs on its source
  11  protocol version mismatch between rebalctl and rebalancerd

See rebalctl(1) and docs/admin-cli.md.";

/// Show and steer slurm-rebalancer: nodes, containers, migrations, policies.
///
/// Arguments follow scontrol: `KEY=VALUE` words, keys case-insensitive.
#[derive(Parser, Debug)]
#[command(name = "rebalctl", version, after_help = EXIT_HELP, propagate_version = true)]
struct Cli {
    /// Control socket of rebalancerd.
    #[arg(long, global = true, env = "REBALANCER_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    /// Print JSON instead of tables (one document on stdout).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum What {
    #[value(alias = "node")]
    Nodes,
    #[value(alias = "container")]
    Containers,
    #[value(alias = "migration")]
    Migrations,
    #[value(alias = "policy")]
    Policies,
    /// One job: its containers, its moves and the decisions about it (`show job J`, or
    /// scontrol's `show job=J`).
    Job,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show nodes, containers, migrations or policies; with NAME, one of them in detail.
    ///
    /// Users other than root, the SlurmUser and operators see their own containers,
    /// migrations and decisions only.
    #[command(
        after_help = "Examples:\n  rebalctl show nodes\n  rebalctl show node node3\n  rebalctl show nodes NodeName=node3\n  rebalctl show containers job=42\n  rebalctl show containers node=node2 state=running\n  rebalctl show migrations job=42 state=rolled-back limit=5\n  rebalctl show migrations --active\n  rebalctl show migration 3f2a9c1e --json\n  rebalctl show policies"
    )]
    Show {
        what: What,
        /// Node, container id, migration id (a prefix is enough) or policy name (also as
        /// `NodeName=`, `id=`, `name=`), then filters: nodes `state=`; containers `job=`,
        /// `node=`, `state=`; migrations `job=`, `node=` (source or destination), `state=`,
        /// `policy=`; all but policies `limit=N` (the newest N).
        #[arg(value_name = "NAME|KEY=VALUE")]
        args: Vec<String>,
        /// Migrations only: those not ended yet.
        #[arg(long)]
        active: bool,
    },
    /// Live-migrate a job, a step or one container.
    ///
    /// Keys: job=J | step=J.S | container=ID (exactly one), node=NODE (destination; chosen by
    /// the controller when absent), mode=stop-and-copy|post-copy|pre-copy|auto.
    /// Without --wait, returns once the migrations have started (or are queued behind the
    /// in-flight limits) and prints their ids.
    #[command(
        after_help = "Examples:\n  rebalctl migrate job=42 node=node3\n  rebalctl migrate step=42.0 mode=post-copy --wait\n  rebalctl migrate container=j42.s0.t1 node=node2 --wait"
    )]
    Migrate {
        /// job=J | step=J.S | container=ID, node=NODE, mode=MODE.
        #[arg(value_name = "KEY=VALUE", required = true)]
        args: Vec<String>,
        /// Follow the migrations (phases, bytes) until they end; the exit status reflects
        /// the worst outcome.
        #[arg(long)]
        wait: bool,
    },
    /// Migrate every container off a node (Slurm's state is not changed; use
    /// `scontrol update nodename=N state=drain` to also stop new work).
    ///
    /// Keys: node=NODE, mode=MODE.
    #[command(after_help = "Example:\n  rebalctl evacuate node=node2 --wait")]
    Evacuate {
        /// node=NODE, mode=MODE.
        #[arg(value_name = "KEY=VALUE", required = true)]
        args: Vec<String>,
        /// Follow the migrations until they end; the exit status reflects the worst outcome.
        #[arg(long)]
        wait: bool,
    },
    /// Check or reload the policy files.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Change a policy's run-time state: policy=NAME state=enabled|disabled|dry-run.
    ///
    /// The state is journaled and survives controller restarts and policy reloads.
    #[command(after_help = "Example:\n  rebalctl update policy=thermal state=dry-run")]
    Update {
        /// policy=NAME state=enabled|disabled|dry-run.
        #[arg(value_name = "KEY=VALUE", required = true)]
        args: Vec<String>,
    },
    /// Decisions taken by policies and operators, newest last: limit=N (default 50), and
    /// filters job=J, node=NODE (source or destination), policy=NAME, outcome=OUTCOME (these
    /// look at the newest 10000 decisions).
    #[command(
        after_help = "Examples:\n  rebalctl history limit=20\n  rebalctl history job=42\n  rebalctl history policy=drain outcome=failed limit=5"
    )]
    History {
        /// limit=N, job=J, node=NODE, policy=NAME, outcome=OUTCOME.
        #[arg(value_name = "KEY=VALUE")]
        args: Vec<String>,
    },
    /// What the policies would do now: moves with their policy, action and why, why the
    /// controller holds a move back (migrating, back-off after a failed start, limits), and
    /// what the policies leave where it is and why (no destination and why each node was
    /// rejected, not migratable, cooldown, limits, agent unreachable). Keys: job=J, node=NODE.
    /// Nothing is executed and the policies' memory (hysteresis, cooldowns) does not advance.
    #[command(
        after_help = "Examples:\n  rebalctl plan\n  rebalctl plan job=42\n  rebalctl plan NodeName=node3"
    )]
    Plan {
        /// job=J, node=NODE.
        #[arg(value_name = "KEY=VALUE")]
        args: Vec<String>,
    },
    /// Check that rebalancerd answers.
    Ping,
    /// Print a shell completion script (needs no daemon).
    #[command(
        after_help = "Examples:\n  rebalctl completion bash > /usr/share/bash-completion/completions/rebalctl\n  rebalctl completion zsh > \"${fpath[1]}/_rebalctl\""
    )]
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Validate policy files: PATH is a file or a directory of *.toml files, checked here
    /// without a daemon; without PATH, the running controller checks its configured policy
    /// path. Errors are printed as file:line:column; exit status 2 if any.
    Check {
        /// Policy file or directory.
        path: Option<PathBuf>,
    },
    /// Reload the controller's policy files; on any error the old set stays.
    Reload,
}

fn bad(m: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code: ErrorCode::BadRequest,
        message: m.into(),
    }
}

/// Why rebalctl fails: an error still to print, or one whose report is already on stdout
/// (`policy check --json` with errors).
enum Fail {
    Error(ErrorReply),
    Reported(ErrorCode),
}

impl From<ErrorReply> for Fail {
    fn from(e: ErrorReply) -> Self {
        Fail::Error(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(scontrol_spellings(std::env::args().collect()));
    let json = cli.json;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rebalctl: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Reported(code)) => ExitCode::from(code.exit_code() as u8),
        Err(Fail::Error(e)) => {
            if json {
                // Scripts read one JSON document on stdout whatever happens; people read stderr.
                outln!("{}", error_json(&e));
            }
            eprintln!("rebalctl: {}", e.message);
            ExitCode::from(e.code.exit_code() as u8)
        }
    }
}

/// `{"error": {"code": "not_found", "exit_status": 3, "message": "..."}}`.
fn error_json(e: &ErrorReply) -> serde_json::Value {
    serde_json::json!({
        "error": {
            "code": e.code,
            "exit_status": e.code.exit_code(),
            "message": e.message,
        }
    })
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), ErrorReply> {
    let s = serde_json::to_string_pretty(v).map_err(|e| ErrorReply {
        code: ErrorCode::Internal,
        message: e.to_string(),
    })?;
    outln!("{s}");
    Ok(())
}

/// Reads policy texts the way the controller does (file, or sorted *.toml of a directory).
fn read_sources(path: &Path) -> Result<Vec<PolicySource>, ErrorReply> {
    let files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(bad(format!("{}: no *.toml policy files", path.display())));
    }
    files
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(&p)
                .map(|text| PolicySource {
                    path: p.display().to_string(),
                    text,
                })
                .map_err(|e| ErrorReply {
                    code: ErrorCode::NotFound,
                    message: format!("{}: {e}", p.display()),
                })
        })
        .collect()
}

async fn run(cli: Cli) -> Result<(), Fail> {
    if let Cmd::Completion { shell } = &cli.cmd {
        outln!("{}", completion(*shell));
        return Ok(());
    }
    if let Cmd::Policy {
        cmd: PolicyCmd::Check { path: Some(p) },
    } = &cli.cmd
    {
        // No daemon needed: the policy crate is the one rebalancerd loads.
        let report = rebalancer_policy::check_sources(&read_sources(p)?);
        return output(
            &cli,
            ControlReply::PolicyCheck { report },
            &Extra::default(),
        );
    }
    let (req, wait) = build(&cli.cmd)?;
    let mut client = client::Client::connect(&cli.socket).await?;
    if let Cmd::Show {
        what: What::Job,
        args,
        ..
    } = &cli.cmd
    {
        let name = args::parse_show(args::ShowWhat::Job, args).map_err(bad)?.0;
        return show_job(&cli, &mut client, job_of(name.as_deref())?).await;
    }
    let mut watch = Watch::new(wait, cli.json);
    let reply = client.call(&req, |ev| watch.event(ev)).await;
    if let (false, Ok(ControlReply::Migrated { migrations, .. })) = (cli.json, &reply) {
        // The final records: the last phase event precedes the end.
        for m in migrations {
            watch.event(Event::MigrationProgress {
                migration: m.record.clone(),
                progress_bytes: None,
            });
        }
    }
    watch.finish();
    let reply = filters(&cli.cmd)?.apply(reply?);
    let mut extra = Extra::default();
    if matches!(reply, ControlReply::History { .. }) {
        // How each started decision ended: the journal keeps the migration apart from the
        // decision. A controller that cannot answer leaves the outcome as journaled.
        let req = ControlRequest::ShowMigrations {
            id: None,
            active: false,
        };
        if let Ok(ControlReply::Migrations { migrations }) = client.call(&req, |_| {}).await {
            extra.migrations = migrations
                .into_iter()
                .map(|m| (m.record.id.clone(), m.record))
                .collect();
        }
    }
    output(&cli, reply, &extra)
}

fn job_of(name: Option<&str>) -> Result<u32, ErrorReply> {
    args::parse_job(name.ok_or_else(|| bad("name the job: show job J (or show job=J)"))?)
        .map_err(bad)
}

/// `show job J`: what the job runs where, how it moved, and what was decided about it.
async fn show_job(cli: &Cli, client: &mut client::Client, job: u32) -> Result<(), Fail> {
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
    if !decisions.is_empty() {
        outln!("\nDecisions:");
        out!("{}", render::history(&decisions, &extra.migrations));
    }
    Ok(())
}

/// scontrol's spelling `show job=J` as `show job J` (clap takes WHAT as one word).
fn scontrol_spellings(mut argv: Vec<String>) -> Vec<String> {
    if let Some(i) = argv.iter().position(|a| a == "show") {
        if let Some((k, v)) = argv.get(i + 1).and_then(|w| w.split_once('=')) {
            if k.eq_ignore_ascii_case("job") || k.eq_ignore_ascii_case("jobid") {
                let v = v.to_string();
                argv[i + 1] = "job".into();
                argv.insert(i + 2, v);
            }
        }
    }
    argv
}

/// The client-side filters of `show` and `history`.
fn filters(cmd: &Cmd) -> Result<filter::Filter, ErrorReply> {
    Ok(match cmd {
        Cmd::Show {
            what: What::Job, ..
        } => filter::Filter::default(),
        Cmd::Show { what, args, .. } => args::parse_show(what.plain(), args).map_err(bad)?.1,
        Cmd::History { args } => args::parse_history_filter(args).map_err(bad)?,
        _ => filter::Filter::default(),
    })
}

impl What {
    fn plain(self) -> args::ShowWhat {
        match self {
            What::Nodes => args::ShowWhat::Nodes,
            What::Containers => args::ShowWhat::Containers,
            What::Migrations => args::ShowWhat::Migrations,
            What::Policies => args::ShowWhat::Policies,
            What::Job => args::ShowWhat::Job,
        }
    }
}

fn completion(shell: clap_complete::Shell) -> String {
    use clap::CommandFactory;
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "rebalctl", &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// What a reply is shown with besides itself.
#[derive(Default)]
struct Extra {
    /// Migration records by id, for `history`.
    migrations: HashMap<String, rebalancer_proto::MigrationRecord>,
}

fn build(cmd: &Cmd) -> Result<(ControlRequest, bool), ErrorReply> {
    Ok(match cmd {
        Cmd::Ping => (ControlRequest::Ping, false),
        Cmd::Completion { .. } => return Err(bad("completion needs no controller")),
        Cmd::Plan { args } => {
            let (job_id, node) = args::parse_plan(args).map_err(bad)?;
            (ControlRequest::Explain { job_id, node }, false)
        }
        Cmd::Show { what, args, active } => {
            let (name, f) = args::parse_show(what.plain(), args).map_err(bad)?;
            (
                match what {
                    What::Nodes => ControlRequest::ShowNodes { name },
                    What::Containers => ControlRequest::ShowContainers {
                        job_id: if name.is_none() { f.job } else { None },
                        id: name,
                    },
                    What::Migrations => ControlRequest::ShowMigrations {
                        id: name,
                        active: *active,
                    },
                    What::Policies => ControlRequest::ShowPolicies { name },
                    What::Job => ControlRequest::ShowContainers {
                        id: None,
                        job_id: Some(job_of(name.as_deref())?),
                    },
                },
                false,
            )
        }
        Cmd::Migrate { args, wait } => {
            let a = args::parse_migrate(args).map_err(bad)?;
            (
                ControlRequest::Migrate {
                    target: a.target,
                    destination: a.node,
                    mode: a.mode,
                    watch: *wait,
                },
                *wait,
            )
        }
        Cmd::Evacuate { args, wait } => {
            let (node, mode) = args::parse_evacuate(args).map_err(bad)?;
            (
                ControlRequest::Evacuate {
                    node,
                    mode,
                    watch: *wait,
                },
                *wait,
            )
        }
        Cmd::Policy {
            cmd: PolicyCmd::Check { path },
        } => {
            let sources = match path {
                Some(p) => read_sources(p)?,
                None => vec![],
            };
            (ControlRequest::PolicyCheck { sources }, false)
        }
        Cmd::Policy {
            cmd: PolicyCmd::Reload,
        } => (ControlRequest::PolicyReload, false),
        Cmd::Update { args } => {
            let (name, state) = args::parse_update(args).map_err(bad)?;
            (ControlRequest::UpdatePolicy { name, state }, false)
        }
        Cmd::History { args } => {
            let f = args::parse_history_filter(args).map_err(bad)?;
            let only_limit = filter::Filter {
                limit: None,
                ..f.clone()
            }
            .is_empty();
            let limit = if only_limit {
                args::parse_history(args).map_err(bad)?
            } else {
                Some(filter::HISTORY_SCAN)
            };
            (ControlRequest::History { limit }, false)
        }
    })
}

fn output(cli: &Cli, reply: ControlReply, extra: &Extra) -> Result<(), Fail> {
    if cli.json {
        // A policy check with errors still prints its report, then fails.
        let failed = matches!(&reply, ControlReply::PolicyCheck { report } if !report.ok);
        let payload = match &reply {
            ControlReply::History { decisions } => history_json(decisions, extra),
            _ => json_payload(&reply),
        };
        if matches!(
            cli.cmd,
            Cmd::Migrate { wait: true, .. } | Cmd::Evacuate { wait: true, .. }
        ) {
            // After the streamed events: one JSON document per line throughout.
            outln!("{payload}");
        } else {
            print_json(&payload)?;
        }
        return if failed {
            Err(Fail::Reported(ErrorCode::BadRequest))
        } else {
            Ok(())
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
    }
    Ok(())
}

/// `history --json`: the decisions, each with `result` and `result_reason` as the table shows
/// them (a started decision takes its migration's end).
fn history_json(
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
fn json_payload(reply: &ControlReply) -> serde_json::Value {
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

fn print_detail<T: serde::Serialize>(label: &str, name: &str, v: &T) {
    outln!("{label}={name}");
    if let Ok(j) = serde_json::to_value(v) {
        out!("{}", render::detail(&j));
    }
}

/// Live progress of watched migrations: one spinner per migration on a terminal, one line per
/// phase change otherwise.
/// Progress of watched migrations: a live line per migration on a terminal, a line per phase
/// otherwise, or (`--json`) each event as one JSON line on stdout.
struct Watch {
    on: bool,
    json: bool,
    tty: bool,
    mp: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    last: HashMap<String, String>,
    /// When each migration was first seen and its bytes then, for the rate.
    first: HashMap<String, (std::time::Instant, u64)>,
}

impl Watch {
    fn new(on: bool, json: bool) -> Self {
        use std::io::IsTerminal;
        Watch {
            on,
            json,
            tty: std::io::stderr().is_terminal(),
            mp: MultiProgress::new(),
            bars: HashMap::new(),
            last: HashMap::new(),
            first: HashMap::new(),
        }
    }

    fn event(&mut self, ev: Event) {
        if !self.on {
            return;
        }
        if self.json {
            if let Ok(line) = serde_json::to_string(&ev) {
                outln!("{line}");
            }
            return;
        }
        let Event::MigrationProgress {
            migration: r,
            progress_bytes,
        } = ev;
        let phase = if r.state.is_terminal() {
            render::state_str(r.state).to_string()
        } else {
            r.phases
                .last()
                .map(|p| p.phase.to_string())
                .unwrap_or_else(|| "pending".into())
        };
        let sent_bytes = progress_bytes
            .unwrap_or(r.stats.bytes_sent)
            .max(r.stats.bytes_sent);
        let sent = render::bytes(sent_bytes);
        let now = std::time::Instant::now();
        let (t0, b0) = *self.first.entry(r.id.clone()).or_insert((now, sent_bytes));
        let rate = rate_and_eta(
            now.duration_since(t0),
            sent_bytes.saturating_sub(b0),
            r.stats.rss_bytes.saturating_sub(sent_bytes),
        )
        .filter(|_| !r.state.is_terminal())
        .unwrap_or_default();
        let mode = r.mode.unwrap_or(r.requested_mode);
        let msg = format!(
            "{} {} {}->{} [{mode}] {phase}, {sent} sent{rate}{}",
            render::short_id(&r.id),
            r.container,
            r.source,
            r.destination,
            r.stats
                .downtime_ms
                .map(|d| format!(", downtime {d} ms"))
                .unwrap_or_default()
        );
        if self.tty {
            let bar = self.bars.entry(r.id.clone()).or_insert_with(|| {
                let b = self.mp.add(ProgressBar::new_spinner());
                if let Ok(s) = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
                    b.set_style(s);
                }
                b.enable_steady_tick(std::time::Duration::from_millis(120));
                b
            });
            bar.set_message(msg.clone());
            if r.state.is_terminal() {
                bar.finish_with_message(msg);
            }
        } else if self.last.get(&r.id) != Some(&phase) {
            eprintln!("{msg}");
            self.last.insert(r.id.clone(), phase);
        }
    }

    fn finish(&mut self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.finish();
            }
        }
    }
}

/// `, 120.0MiB/s, ETA 3 s` once bytes have moved for a while; the ETA when what is left is known.
fn rate_and_eta(elapsed: std::time::Duration, moved: u64, left: u64) -> Option<String> {
    let secs = elapsed.as_secs_f64();
    if secs < 0.5 || moved == 0 {
        return None;
    }
    let bps = moved as f64 / secs;
    let eta = if left > 0 {
        format!(", ETA {} s", (left as f64 / bps).ceil() as u64)
    } else {
        String::new()
    };
    Some(format!(", {}/s{eta}", render::bytes(bps as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_stable() {
        // Documented in --help and rebalctl(1); scripts depend on them.
        let codes: Vec<(ErrorCode, i32)> = vec![
            (ErrorCode::Internal, 1),
            (ErrorCode::BadRequest, 2),
            (ErrorCode::NotFound, 3),
            (ErrorCode::PermissionDenied, 4),
            (ErrorCode::Busy, 5),
            (ErrorCode::Unreachable, 6),
            (ErrorCode::Unsupported, 7),
            (ErrorCode::NoRoom, 8),
            (ErrorCode::Timeout, 9),
            (ErrorCode::RolledBack, 10),
            (ErrorCode::Version, 11),
        ];
        for (c, n) in codes {
            assert_eq!(c.exit_code(), n, "{c:?}");
            assert!(
                EXIT_HELP.contains(&format!("\n  {n:>2}  ")),
                "{n} undocumented"
            );
        }
    }

    #[test]
    fn commands_build_requests() {
        let cli = Cli::try_parse_from(["rebalctl", "migrate", "JobId=7", "node=n2", "--wait"])
            .expect("parse");
        let (req, wait) = build(&cli.cmd).expect("build");
        assert!(wait);
        assert!(
            matches!(req, ControlRequest::Migrate { watch: true, destination: Some(ref d), .. } if d == "n2")
        );
        let cli = Cli::try_parse_from(["rebalctl", "show", "container", "job=9"]).expect("parse");
        assert!(matches!(
            build(&cli.cmd).expect("b").0,
            ControlRequest::ShowContainers {
                job_id: Some(9),
                id: None
            }
        ));
        let cli = Cli::try_parse_from(["rebalctl", "evacuate", "nodes=x"]).expect("parse");
        assert_eq!(build(&cli.cmd).expect_err("bad key").code.exit_code(), 2);
        assert!(Cli::try_parse_from(["rebalctl", "show", "jobs"]).is_err());
    }

    #[test]
    fn completion_knows_the_commands_and_options() {
        let bash = completion(clap_complete::Shell::Bash);
        for word in [
            "evacuate",
            "history",
            "plan",
            "--json",
            "nodes",
            "migrations",
        ] {
            assert!(
                bash.contains(word),
                "{word} missing from the bash completion"
            );
        }
        assert!(completion(clap_complete::Shell::Zsh).contains("#compdef rebalctl"));
    }

    #[test]
    fn show_job_takes_scontrols_spelling() {
        let argv = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        for words in [
            "rebalctl show job=42",
            "rebalctl show JobId=42",
            "rebalctl show job 42",
        ] {
            let cli = Cli::try_parse_from(scontrol_spellings(argv(words))).expect(words);
            assert!(
                matches!(
                    build(&cli.cmd).expect("build").0,
                    ControlRequest::ShowContainers {
                        job_id: Some(42),
                        id: None
                    }
                ),
                "{words}"
            );
        }
        // Other commands keep their words.
        let a = argv("rebalctl show containers job=42");
        assert_eq!(scontrol_spellings(a.clone()), a);
        let cli = Cli::try_parse_from(argv("rebalctl show job")).expect("parse");
        assert_eq!(build(&cli.cmd).expect_err("no job").code.exit_code(), 2);
    }

    #[test]
    fn progress_shows_rate_and_eta_once_bytes_move() {
        use std::time::Duration;
        assert_eq!(rate_and_eta(Duration::from_millis(100), 1 << 20, 0), None);
        assert_eq!(rate_and_eta(Duration::from_secs(2), 0, 1 << 20), None);
        assert_eq!(
            rate_and_eta(Duration::from_secs(2), 200 << 20, 300 << 20).as_deref(),
            Some(", 100.0MiB/s, ETA 3 s")
        );
        assert_eq!(
            rate_and_eta(Duration::from_secs(1), 64 << 20, 0).as_deref(),
            Some(", 64.0MiB/s")
        );
    }

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

    #[test]
    fn policy_check_reads_a_directory_in_order() {
        let dir = std::env::temp_dir().join(format!("rebalctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("b.toml"), "x = 1").expect("w");
        std::fs::write(dir.join("a.toml"), "y = 2").expect("w");
        std::fs::write(dir.join("notes.txt"), "z").expect("w");
        let s = read_sources(&dir).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(s.len(), 2);
        assert!(s[0].path.ends_with("a.toml") && s[1].path.ends_with("b.toml"));
    }
}
