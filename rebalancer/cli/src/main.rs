//! `rebalctl`: scontrol-style admin command for slurm-rebalancer. See rebalctl(1).

mod args;
mod blocks;
mod client;
mod filter;
mod kv;
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

// After the macros, which they use.
mod output;
mod watch;

use output::{output, show_job, Extra};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
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
   5  busy: the container is already migrating, no slot freed up in time, or too
      late to cancel (the migration is committing)
   6  unreachable: rebalancerd or the agent cannot be reached
   7  unsupported: a node lacks a kernel or CRIU feature the migration needs
   8  no room: no destination has the CPUs or memory
   9  timeout
  10  rolled back: the migration failed and the container still runs on its source
  11  protocol version mismatch between rebalctl and rebalancerd
 130  interrupted (Ctrl-C) while following migrations, which go on

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
    /// The container address blocks leased to the nodes (`show blocks [node=NODE]`).
    #[value(alias = "block")]
    Blocks,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show nodes, containers, migrations, policies or address blocks; with NAME, one of them
    /// in detail.
    ///
    /// Users other than root, the SlurmUser and operators see their own containers,
    /// migrations and decisions only.
    #[command(
        after_help = "Examples:\n  rebalctl show nodes\n  rebalctl show node node3\n  rebalctl show nodes NodeName=node3\n  rebalctl show containers job=42\n  rebalctl show containers node=node2 state=running\n  rebalctl show migrations job=42 state=rolled-back limit=5\n  rebalctl show migrations --active\n  rebalctl show migration 3f2a9c1e --json\n  rebalctl show policies\n  rebalctl show blocks node=node2"
    )]
    Show {
        what: What,
        /// Node, container id, migration id (a prefix is enough) or policy name (also as
        /// `NodeName=`, `id=`, `name=`), then filters: nodes `state=`; containers `job=`,
        /// `node=`, `state=`; migrations `job=`, `node=` (source or destination), `state=`,
        /// `policy=`; all but policies and blocks `limit=N` (the newest N); blocks: the node
        /// (`node=`).
        #[arg(value_name = "NAME|KEY=VALUE")]
        args: Vec<String>,
        /// Migrations only: those not ended yet.
        #[arg(long)]
        active: bool,
        /// `show migration ID --wait`: like `wait migration=ID`.
        #[arg(long)]
        wait: bool,
    },
    /// Attach to a running migration and follow it to its end.
    ///
    /// Shows its progress as `--wait` does (JSON lines with --json), whoever started it, and
    /// exits with its outcome: 0 succeeded, 10 rolled back or cancelled, 1 failed or unknown.
    /// Ctrl-C detaches and leaves the migration running (exit 130).
    #[command(
        after_help = "Examples:\n  rebalctl wait migration=3f2a9c1e\n  rebalctl --json wait migration=3f2a9c1e | jq -c .migration.phases[-1]?"
    )]
    Wait {
        /// migration=ID (a unique prefix is enough), or the ID alone.
        #[arg(value_name = "migration=ID", required = true)]
        args: Vec<String>,
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
    /// Cancel running migrations: migration=ID (a unique prefix is enough) or job=J (every
    /// running migration of the job).
    ///
    /// The source node rolls a migration back if it has not reached its commit point yet: the
    /// container keeps running on the source, the destination cleans up, the job's allocation
    /// is undone, and the record ends `cancelled` with who cancelled it. At the commit point
    /// or after, the cancel is refused (`too late: migration M is committing`, exit 5).
    #[command(
        after_help = "Examples:\n  rebalctl cancel migration=3f2a9c1e\n  rebalctl cancel job=42"
    )]
    Cancel {
        /// migration=ID | job=J.
        #[arg(value_name = "KEY=VALUE", required = true)]
        args: Vec<String>,
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
    /// Ctrl-C while following these migrations: they keep running.
    Detached(Vec<String>),
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
        Err(Fail::Detached(ids)) => {
            for id in &ids {
                let id = render::short_id(id);
                eprintln!(
                    "rebalctl: detached; migration {id} goes on (rebalctl wait migration={id} \
                     re-attaches, rebalctl cancel migration={id} cancels it)"
                );
            }
            if ids.is_empty() {
                eprintln!(
                    "rebalctl: detached; the migrations go on (rebalctl show migrations --active)"
                );
            }
            // 128 + SIGINT, as a shell reports an interrupted command.
            ExitCode::from(130)
        }
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
    let mut watch = watch::Watch::new(wait, cli.json);
    // While following migrations, Ctrl-C detaches: they go on (the controller and the agents
    // run them, not this connection), and the user is told how to find them again.
    // Installed before the request goes out, so that no Ctrl-C after it is lost.
    let mut sigint = if wait {
        use tokio::signal::unix::{signal, SignalKind};
        Some(signal(SignalKind::interrupt()).map_err(|e| ErrorReply {
            code: ErrorCode::Internal,
            message: format!("cannot catch SIGINT: {e}"),
        })?)
    } else {
        None
    };
    let interrupted = async {
        match sigint.as_mut() {
            Some(s) => s.recv().await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        r = client.call(&req, |ev| watch.event(ev)) => Some(r),
        _ = interrupted => None,
    };
    let Some(reply) = ended else {
        watch.finish();
        let mut ids = watch.running();
        if let (true, ControlRequest::Watch { id }) = (ids.is_empty(), &req) {
            ids.push(id.clone());
        }
        return Err(Fail::Detached(ids));
    };
    if let (ControlRequest::Watch { .. }, Ok(ControlReply::Migrations { migrations })) =
        (&req, &reply)
    {
        if let Some(m) = migrations.first() {
            if !cli.json {
                watch.event(Event::MigrationProgress {
                    migration: m.record.clone(),
                    progress_bytes: None,
                });
            }
            watch.finish();
            if let Some(e) = outcome_error(&m.record) {
                return Err(e.into());
            }
        }
    }
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

/// A watched migration that did not succeed, as the error `rebalctl wait` exits with (the
/// codes of `migrate --wait`: 10 rolled back or cancelled, 1 failed or unknown).
fn outcome_error(r: &rebalancer_proto::MigrationRecord) -> Option<ErrorReply> {
    use rebalancer_proto::MigrationState as S;
    let code = match r.state {
        S::Succeeded | S::Pending | S::Running => return None,
        S::RolledBack => ErrorCode::RolledBack,
        S::Failed | S::Unknown => ErrorCode::Internal,
    };
    Some(ErrorReply {
        code,
        message: format!(
            "migration {} of {} ended {}: {}",
            r.id,
            r.container,
            render::outcome(r),
            r.error.as_deref().unwrap_or("no detail")
        ),
    })
}

fn job_of(name: Option<&str>) -> Result<u32, ErrorReply> {
    args::parse_job(name.ok_or_else(|| bad("name the job: show job J (or show job=J)"))?)
        .map_err(bad)
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
            What::Blocks => args::ShowWhat::Blocks,
        }
    }
}

fn completion(shell: clap_complete::Shell) -> String {
    use clap::CommandFactory;
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "rebalctl", &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn build(cmd: &Cmd) -> Result<(ControlRequest, bool), ErrorReply> {
    Ok(match cmd {
        Cmd::Ping => (ControlRequest::Ping, false),
        Cmd::Completion { .. } => return Err(bad("completion needs no controller")),
        Cmd::Plan { args } => {
            let (job_id, node) = args::parse_plan(args).map_err(bad)?;
            (ControlRequest::Explain { job_id, node }, false)
        }
        Cmd::Show {
            what,
            args,
            active,
            wait,
        } => {
            let (name, f) = args::parse_show(what.plain(), args).map_err(bad)?;
            if *wait {
                return match (what, name) {
                    (What::Migrations, Some(id)) => Ok((ControlRequest::Watch { id }, true)),
                    _ => Err(bad(
                        "--wait goes with one migration: show migration ID --wait",
                    )),
                };
            }
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
                    What::Blocks => blocks::request(name),
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
        Cmd::Wait { args } => (
            ControlRequest::Watch {
                id: args::parse_wait(args).map_err(bad)?,
            },
            true,
        ),
        Cmd::Cancel { args } => (
            ControlRequest::Cancel {
                target: args::parse_cancel(args).map_err(bad)?,
            },
            false,
        ),
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
