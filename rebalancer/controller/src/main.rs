//! `rebalancerd` entry point: arguments, configuration, logging, exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use rebalancer_controller::config::{Config, LogFormat, SlurmBackendKind, DEFAULT_CONFIG};
use rebalancer_controller::daemon::{run_loops, Controller};
use rebalancer_controller::journal::Journal;
use rebalancer_controller::libslurm::LibslurmBackend;
use rebalancer_controller::planner::{BuiltinPlanner, Planner};
use rebalancer_controller::policy_adapter::PolicyPlanner;
use rebalancer_controller::slurm_sync::{NoSlurm, ScontrolBackend, SlurmBackend};
use rebalancer_controller::{metrics, server};
use tracing::{error, info, warn};

const EXIT_HELP: &str = "\
Exit status:
  0  normal stop (SIGTERM or SIGINT), or --check-config found the configuration valid
  1  runtime failure (cannot bind the control socket or the metrics address, journal error)
  2  invalid configuration (the message names file:line:column)

Signals: SIGTERM and SIGINT stop the daemon; migrations in flight keep running on the agents and
are picked up from the journal at the next start. SIGHUP reloads the policies (like
`rebalctl policy reload`). See rebalancerd(8).";

/// Slurm rebalancer controller: watches Slurm and the node agents, evaluates the migration
/// policies and drives live migrations of containerized job steps.
#[derive(Parser, Debug)]
#[command(name = "rebalancerd", version, after_help = EXIT_HELP)]
struct Args {
    /// Configuration file (TOML). Without it, /etc/rebalancer/rebalancerd.toml is read when
    /// present, else built-in defaults are used.
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the configuration (and the policies it names), print a summary, and exit.
    #[arg(long)]
    check_config: bool,
}

enum Failure {
    Config(anyhow::Error),
    Runtime(anyhow::Error),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("rebalancerd: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            error!("{e:#}");
            eprintln!("rebalancerd: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    match &args.config {
        Some(p) => Ok(Config::load(p)?),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Ok(Config::load(std::path::Path::new(DEFAULT_CONFIG))?)
        }
        None => Ok(Config::defaults()),
    }
}

fn run(args: Args) -> Result<(), Failure> {
    let cfg = load_config(&args).map_err(Failure::Config)?;
    if args.check_config {
        if cfg.policies.exists() {
            let n = PolicyPlanner::load(&cfg.policies)
                .map_err(|errors| Failure::Config(anyhow::anyhow!("{}", errors.join("\n"))))?
                .policies()
                .len();
            println!("policies valid: {n} in {}", cfg.policies.display());
        } else {
            println!(
                "policies: {} does not exist; the built-in drain policy applies",
                cfg.policies.display()
            );
        }
        println!("configuration valid");
        println!("  control socket  {}", cfg.socket.display());
        println!("  journal         {}", cfg.journal.display());
        println!("  policies        {}", cfg.policies.display());
        println!(
            "  slurm           {} (poll {} ms, reconcile {} s)",
            if cfg.slurm.enabled {
                "watched"
            } else {
                "not watched"
            },
            cfg.slurm.poll_interval.as_millis(),
            cfg.slurm.reconcile_interval.as_secs()
        );
        println!(
            "  migrations      max {} in flight, {} per node, default mode {}",
            cfg.migration.max_in_flight, cfg.migration.max_per_node, cfg.migration.default_mode
        );
        match cfg.metrics_listen {
            Some(a) => println!("  metrics         http://{a}/metrics"),
            None => println!("  metrics         off"),
        }
        return Ok(());
    }
    init_logging(cfg.log_format);
    if let Some(conf) = &cfg.slurm.conf {
        // Before any thread starts: libslurm and scontrol read it from the environment.
        std::env::set_var("SLURM_CONF", conf);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::Runtime)?;
    rt.block_on(daemon(cfg)).map_err(Failure::Runtime)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

async fn daemon(cfg: Config) -> anyhow::Result<()> {
    let journal = Journal::open(&cfg.journal)
        .with_context(|| format!("cannot open the journal {}", cfg.journal.display()))?;
    let slurm: Arc<dyn SlurmBackend> = match (cfg.slurm.enabled, cfg.slurm.backend) {
        (false, _) => Arc::new(NoSlurm),
        (true, SlurmBackendKind::Scontrol) => Arc::new(ScontrolBackend::new()),
        (true, SlurmBackendKind::Libslurm) => Arc::new(
            LibslurmBackend::new(cfg.slurm.conf.as_deref())
                .context("cannot initialise libslurm")?,
        ),
    };
    let planner: Box<dyn Planner> = if cfg.policies.exists() {
        Box::new(
            PolicyPlanner::load(&cfg.policies)
                .map_err(|errors| anyhow::anyhow!("invalid policies:\n{}", errors.join("\n")))?,
        )
    } else {
        warn!(path = %cfg.policies.display(), "no policies; the built-in drain policy applies");
        Box::new(BuiltinPlanner::new(Some(cfg.migration.default_mode)))
    };
    let listener = server::bind(&cfg.socket)
        .with_context(|| format!("cannot bind the control socket {}", cfg.socket.display()))?;
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(
            metrics::bind(a)
                .await
                .with_context(|| format!("cannot bind the metrics address {a}"))?,
        ),
        None => None,
    };
    let socket_path = cfg.socket.clone();
    let ctl = Controller::new(cfg, journal, slurm, planner);
    info!(
        socket = %socket_path.display(),
        slurm = ctl.slurm.name(),
        "rebalancerd {} started",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(l) = metrics_listener {
        info!(addr = ?l.local_addr().ok(), "metrics endpoint up");
        tokio::spawn(metrics::serve(l, ctl.metrics.clone()));
    }
    tokio::spawn(server::serve(listener, ctl.clone()));
    ctl.poll_slurm(true).await;
    ctl.poll_agents().await;
    ctl.recover().await;
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let loops = tokio::spawn(run_loops(ctl.clone(), shutdown.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                if let Err(errors) = ctl.reload_policies() {
                    warn!("SIGHUP: policies not reloaded, the old set stays: {}", errors.join("; "));
                }
            }
        }
    }
    shutdown.notify_one();
    let _ = loops.await;
    let _ = std::fs::remove_file(&socket_path);
    info!(
        "stopped; migrations in flight continue on the agents and are recovered at the next start"
    );
    Ok(())
}
