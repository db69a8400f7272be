use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Node agent of slurm-rebalancer: runs job containers and live-migrates them with CRIU.
#[derive(Parser)]
#[command(name = "rebalancer-agent", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (as root).
    Run {
        /// TOML configuration file.
        #[arg(long, short = 'c', default_value = "/etc/rebalancer/agent.toml")]
        config: PathBuf,
    },
    /// Print this node's migration capabilities (CRIU version, kernel features, modes).
    Check {
        /// CRIU binary to probe.
        #[arg(long, default_value = "/usr/local/sbin/criu")]
        criu: PathBuf,
        /// Take the CRIU path and node name from this configuration instead.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file and print the result.
    CheckConfig {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    #[command(name = "__container-init", hide = true)]
    ContainerInit { spec: String },
    /// Copies a container's stdout or stderr pipe (stdin) to its log file (stdout).
    #[command(name = "__stdio-relay", hide = true)]
    StdioRelay,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REBALANCER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r: anyhow::Result<()> = match cli.cmd {
        Cmd::ContainerInit { spec } => rebalancer_agent::container::init::run(&spec),
        Cmd::StdioRelay => rebalancer_agent::container::relay_main().map_err(Into::into),
        Cmd::Run { config } => (|| {
            init_tracing();
            let cfg = rebalancer_agent::config::AgentConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(rebalancer_agent::daemon::run(cfg))?;
            Ok(())
        })(),
        Cmd::Check { criu, config, json } => (|| {
            let (node, criu) = match config {
                Some(p) => {
                    let c = rebalancer_agent::config::AgentConfig::load(&p)?;
                    (c.node, c.criu)
                }
                None => (
                    nix::unistd::gethostname()?.to_string_lossy().into_owned(),
                    criu,
                ),
            };
            let rt = tokio::runtime::Runtime::new()?;
            let caps = rt.block_on(rebalancer_agent::caps::probe(&node, &criu));
            if json {
                println!("{}", serde_json::to_string_pretty(&caps)?);
            } else {
                println!("node:            {}", caps.node);
                println!(
                    "criu:            {} ({})",
                    caps.criu_version.as_deref().unwrap_or("unusable"),
                    criu.display()
                );
                println!("userfaultfd:     {}", caps.uffd);
                println!("tcp repair:      {}", caps.tcp_established);
                println!("nftables lock:   {}", caps.nftables_lock);
                println!("dirty tracking:  {}", caps.dirty_tracking);
                let modes: Vec<&str> = caps.modes.iter().map(|m| m.as_str()).collect();
                println!(
                    "modes:           {}",
                    if modes.is_empty() {
                        "none".into()
                    } else {
                        modes.join(", ")
                    }
                );
                for n in &caps.notes {
                    println!("note: {n}");
                }
            }
            Ok(())
        })(),
        Cmd::CheckConfig { config } => (|| {
            let c = rebalancer_agent::config::AgentConfig::load(&config)?;
            println!(
                "{config:?}: ok (node {}, listen {}, subnet {})",
                c.node, c.listen, c.container_subnet
            );
            Ok(())
        })(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rebalancer-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}
