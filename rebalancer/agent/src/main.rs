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
    /// Empty this node explicitly: migrate every running container to NODE (`--to`), or send
    /// it a signal. Stopping or restarting the agent never does this.
    Drain {
        #[arg(long, short = 'c', default_value = "/etc/rebalancer/agent.toml")]
        config: PathBuf,
        /// Destination node; without it the containers are signalled instead.
        #[arg(long)]
        to: Option<String>,
        /// Migration mode (stop-and-copy, post-copy, pre-copy, auto).
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Signal sent without `--to` (default SIGTERM).
        #[arg(long, default_value_t = 15)]
        signal: i32,
    },
    /// Validate a configuration file and print the result. Exit status 0 if valid, 2 if not
    /// (the message names file:line:column), as `rebalancerd --check-config`.
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
        Cmd::Drain {
            config,
            to,
            mode,
            signal,
        } => (|| {
            let c = rebalancer_agent::config::AgentConfig::load(&config)?;
            let mode: rebalancer_proto::MigrationMode =
                serde_json::from_value(serde_json::Value::String(mode.clone()))
                    .map_err(|_| anyhow::anyhow!("unknown migration mode {mode:?}"))?;
            let results =
                rebalancer_agent::drain::run(&c.control_socket, to.as_deref(), mode, signal)?;
            let mut failed = 0;
            for (action, r) in &results {
                match r {
                    Ok(()) => println!("{action:?}: done"),
                    Err(e) => {
                        failed += 1;
                        println!("{action:?}: failed: {e}");
                    }
                }
            }
            println!("{} container(s), {failed} failed", results.len());
            if failed > 0 {
                anyhow::bail!("{failed} container(s) could not be drained");
            }
            Ok(())
        })(),
        Cmd::CheckConfig { config } => {
            match rebalancer_agent::config::AgentConfig::load(&config) {
                Ok(c) => {
                    println!(
                        "{config:?}: ok (node {}, listen {}, subnet {})",
                        c.node, c.listen, c.container_subnet
                    );
                    Ok(())
                }
                Err(e) => {
                    // As rebalancerd --check-config: 2 = invalid configuration.
                    eprintln!("rebalancer-agent: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rebalancer-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}
