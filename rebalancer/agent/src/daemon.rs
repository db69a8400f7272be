//! `rebalancer-agent run`: start-up checks, listeners, the reaper, shutdown.

use std::sync::Arc;
use std::time::Duration;

use crate::agent::Agent;
use crate::config::AgentConfig;
use crate::error::AgentError;

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

/// How long start-up waits for the killed trees of the sweep to leave their cgroups.
const STALE_CGROUP_WAIT: Duration = Duration::from_secs(10);

/// Mount options of the images tmpfs: at most half the node's memory (what the kernel would
/// default to, written out so that the bound is a decision, not an accident).
pub const IMAGES_TMPFS_OPTIONS: &str = "mode=700,size=50%";

/// Makes `dir` a tmpfs so that migration images never touch a disk. Returns whether it
/// mounted one (and so unmounts it at shutdown).
fn ensure_tmpfs(dir: &std::path::Path) -> Result<bool, AgentError> {
    std::fs::create_dir_all(dir).map_err(io(format!("mkdir {}", dir.display())))?;
    let st = nix::sys::statfs::statfs(dir).map_err(|e| AgentError::Io {
        what: format!("statfs {}", dir.display()),
        source: e.into(),
    })?;
    if st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
        return Ok(false);
    }
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        // Bounded: a destination refuses announced images that exceed its free space.
        Some(IMAGES_TMPFS_OPTIONS),
    )
    .map_err(|e| AgentError::Io {
        what: format!("mount tmpfs on {}", dir.display()),
        source: e.into(),
    })?;
    Ok(true)
}

pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    // Restored trees (criu --restore-detached) and container pid 1s are re-parented to us.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(AgentError::Io {
            what: "PR_SET_CHILD_SUBREAPER".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let caps = crate::caps::probe(&cfg.node, &cfg.criu).await;
    tracing::info!(node = %cfg.node, modes = ?caps.modes, criu = ?caps.criu_version, "capabilities");
    for n in &caps.notes {
        tracing::warn!(node = %cfg.node, "{n}");
    }
    if cfg.auth == crate::config::AuthMethod::None {
        tracing::warn!(
            "peer authentication is OFF (auth.method = \"none\"): any host can send migrations"
        );
    }
    crate::netns::prepare_node(&cfg.uplink, cfg.container_subnet).await?;
    // Holds a killed agent left would keep their addresses' packets forever.
    crate::migration::hold::sweep(&cfg.uplink).await;
    let images = cfg.run_dir.join("images");
    let mounted_images = ensure_tmpfs(&images)?;
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(io(format!("mkdir {}", cfg.state_dir.display())))?;
    let tcp = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(io(format!("listen on {}", cfg.listen)))?;
    if let Some(p) = cfg.control_socket.parent() {
        std::fs::create_dir_all(p).map_err(io(format!("mkdir {}", p.display())))?;
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    let unix = tokio::net::UnixListener::bind(&cfg.control_socket)
        .map_err(io(format!("bind {}", cfg.control_socket.display())))?;
    // Everyone may connect; SO_PEERCRED decides what they may do.
    {
        use std::os::unix::fs::PermissionsExt;
        let _ =
            std::fs::set_permissions(&cfg.control_socket, std::fs::Permissions::from_mode(0o666));
    }
    // The controller's TCP control listener (munge-authenticated; see control.rs).
    let control_tcp = match cfg.control.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("TCP control listener on {addr}")))?,
        ),
        None => None,
    };
    let prom = match cfg.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("metrics listener on {addr}")))?,
        ),
        None => None,
    };
    let agent = Agent::new(cfg, caps);
    match crate::detach::init(&agent.cfg.node) {
        Ok(dirs) if dirs.is_empty() => {}
        Ok(dirs) => {
            tracing::info!(node = %agent.cfg.node, cgroups = ?dirs, "containers, stdio relays and lazy-pages daemons start outside the agent's own cgroups")
        }
        Err(e) => {
            tracing::warn!(node = %agent.cfg.node, error = %e.chain(), "cannot leave the agent's own cgroups (all or some): a kill of its unit (systemctl kill) would reach its containers there")
        }
    }
    match &agent.cgroups {
        // Stale cgroups are removed after the adoption (below), which may kill trees of its own.
        Some(h) => tracing::info!(node = %agent.cfg.node, "container cgroups: {h}"),
        None => {
            tracing::warn!(node = %agent.cfg.node, "no cgroup hierarchy with memory and cpu controllers: containers with limits are refused")
        }
    }
    let store = crate::store::Store::open(&agent.cfg.state_dir).map_err(|e| {
        AgentError::Internal(format!(
            "state store in {}: {e}",
            agent.cfg.state_dir.display()
        ))
    })?;
    let _ = agent.store.set(store.clone());
    // Before the listeners: no request may see a half-adopted node or reuse an adopted address.
    crate::adopt::adopt(&agent, &store).await;
    if let Some(h) = &agent.cgroups {
        // The cgroups of containers that ended while the agent was down, and of trees the
        // adoption swept (an arrival cut before commit) once their killed tasks have left them.
        let s = crate::cgroup::sweep_stale(h, &agent.cfg.node, STALE_CGROUP_WAIT).await;
        if s.removed > 0 {
            tracing::info!(node = %agent.cfg.node, removed = s.removed, "stale container cgroups removed");
        }
        for (dir, pids) in &s.busy {
            tracing::warn!(node = %agent.cfg.node, cgroup = %dir.display(), pids = ?pids, "cgroup of a swept tree still busy after {} s; left behind", STALE_CGROUP_WAIT.as_secs());
        }
        for (dir, pids) in &s.kept {
            tracing::debug!(node = %agent.cfg.node, cgroup = %dir.display(), pids = ?pids, "cgroup kept: it has live tasks");
        }
    }
    sweep_images(&images);
    // Lazy-port guards of a killed agent: no migration of this one owns them.
    crate::lazy_guard::sweep(std::time::Duration::from_millis(
        agent.cfg.migration_timeout_ms.max(1000),
    ))
    .await;
    // Page-server guards of a killed agent's dumps.
    crate::ps_guard::sweep().await;
    tracing::info!(node = %agent.cfg.node, listen = %agent.cfg.listen, control = %agent.cfg.control_socket.display(), "agent ready");

    let a = agent.clone();
    tokio::spawn(crate::peer::listener::run(
        tcp,
        agent.cfg.node.clone(),
        agent.cfg.peer_limits,
        move |s| crate::migration::destination::serve(a.clone(), s),
    ));
    if let Some(listener) = prom {
        tracing::info!(node = %agent.cfg.node, listen = ?agent.cfg.metrics_listen, "Prometheus metrics on /metrics");
        let a = agent.clone();
        let render: crate::prom::Render = Arc::new(move || {
            let running = a
                .containers()
                .values()
                .filter(|c| {
                    matches!(
                        c.state,
                        rebalancer_proto::ContainerState::Running
                            | rebalancer_proto::ContainerState::Migrating
                    )
                })
                .count();
            a.prom.containers.set(running as i64);
            a.prom.render()
        });
        tokio::spawn(crate::prom::serve(listener, render));
    }
    let gates = crate::control::Gates::new(&agent.cfg.control);
    let a = agent.clone();
    let gate = gates.local.clone();
    tokio::spawn(async move {
        loop {
            match unix.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(crate::control::serve(a.clone(), s, gate.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept on control socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    if let Some(listener) = control_tcp {
        tracing::info!(node = %agent.cfg.node, listen = ?agent.cfg.control.listen, uids = ?agent.cfg.control.controller_uids, "TCP control listener for the controller");
        let a = agent.clone();
        let gate = gates.tcp.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, peer)) => {
                        tokio::spawn(crate::control::serve_tcp(a.clone(), s, peer, gate.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept on TCP control listener");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    let a: Arc<Agent> = agent.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            a.reap().await;
            a.persist();
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("SIGTERM handler".into()))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Containers are left running: a restart or an upgrade re-adopts them. The images tmpfs
    // stays mounted too (a surviving `criu lazy-pages` may still read from it); the next start
    // reuses it and sweeps what is left.
    agent.shutdown();
    let _ = std::fs::remove_file(&agent.cfg.control_socket);
    tracing::info!(node = %agent.cfg.node, images_mounted_here = mounted_images, "agent stopped");
    Ok(())
}

/// Removes migration images a previous agent left, unless a CRIU process still runs (a
/// post-copy `criu lazy-pages` serving a committed container reads them).
fn sweep_images(images: &std::path::Path) {
    let criu_running = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten().any(|e| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "criu")
            })
        })
        .unwrap_or(false);
    if criu_running {
        tracing::info!(images = %images.display(), "a CRIU process runs: leftover images kept");
        return;
    }
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(images) {
        for e in rd.flatten() {
            if std::fs::remove_dir_all(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    if n > 0 {
        tracing::info!(images = %images.display(), removed = n, "leftover migration images removed");
    }
}
