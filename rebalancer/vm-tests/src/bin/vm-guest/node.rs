//! `vm-guest node`: one guest of the two-guest lab (`tests/two_guests.rs`). The guest is the
//! node: its NIC `eth0` on the host's tap bridge, a munged with the lab's shared key (unless
//! `rbv.auth=none`), an agent in the guest's own network namespace. Then it reads commands
//! (`pair::GuestCommand`) from the serial console and carries them out through its agent's
//! control socket, the role a controller plays; results go back as `@@vmtest` lines. A failed
//! command ends the guest with `Done { ok: false }` and the agent's log tail.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rebalancer_proto::*;
use rebalancer_vm_tests::pair::{self, Auth, GuestCommand, Identity};
use rebalancer_vm_tests::report::GuestEvent;

use super::{criu_log_errors, emit, finish, log_tail, sh, spawn_agent, spec, Client, IP};

const DIR: &str = "/run/rbv";
const MUNGE_SOCKET: &str = "/run/munge/munge.socket.2";

pub fn main() -> ExitCode {
    let node = match std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| e.to_string())
        .and_then(|c| Identity::parse(&c))
    {
        Ok(id) => id,
        Err(e) => {
            emit(&GuestEvent::Done {
                ok: false,
                error: Some(format!("guest identity: {e}")),
            });
            return ExitCode::from(2);
        }
    };
    let name = node.node();
    finish(run(node).with_context(|| name.to_string()), || {
        log_tail(name, &Path::new(DIR).join(format!("{name}.log")), 60);
        log_tail("munged", Path::new("/run/munge/munged.log"), 10);
        criu_log_errors(Path::new(DIR), Path::new(DIR));
    })
}

fn uptime_s() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn agent_config(id: Identity) -> String {
    let k = id.index;
    let peer = 1 - k;
    let auth = match id.auth {
        Auth::Munge => format!("method = \"munge\"\nmunge_socket = \"{MUNGE_SOCKET}\""),
        Auth::None => "method = \"none\"".into(),
    };
    // `encrypt_memory` off by default (`rbv.encrypt=1` turns it on): less work for the
    // emulated CPUs; the peer protocol itself is TLS + munge either way.
    format!(
        "node = \"{n}\"\nlisten = \"{ip}:{port}\"\ncontrol_socket = \"{DIR}/{n}.sock\"\n\
         container_subnet = \"{subnet}\"\nstate_dir = \"{DIR}/state\"\nrun_dir = \"{DIR}/run\"\n\
         uplink = \"eth0\"\nmigration_timeout_ms = 900000\n\
         host_dirs = [\"/usr\", \"/etc\", \"/bin\", \"/lib\", \"/lib64\", \"/sbin\"]\n\
         encrypt_memory = {enc}\n[auth]\n{auth}\n[peers]\n{pn} = \"{pip}:{port}\"\n",
        n = id.node(),
        ip = pair::node_ip(k),
        port = pair::PEER_PORT,
        subnet = pair::CONTAINER_SUBNET,
        pn = pair::NODES[peer],
        pip = pair::node_ip(peer),
        enc = id.encrypt_memory,
    )
}

fn start_munged(id: Identity) -> anyhow::Result<()> {
    sh(
        "mkdir -p /run/munge /var/lib/munge /var/log/munge && chmod 0700 /run/munge /var/lib/munge",
    )?;
    // --force: root runs it, and the initramfs' directories are not what munged's packaging
    // checks for; --origin: the node's address (no resolver in the guest).
    let st = Command::new("/usr/sbin/munged")
        .arg("--force")
        .arg(format!("--socket={MUNGE_SOCKET}"))
        .arg("--key-file=/etc/munge/munge.key")
        .arg("--log-file=/run/munge/munged.log")
        .arg("--pid-file=/run/munge/munged.pid")
        .arg("--seed-file=/run/munge/munged.seed")
        .arg(format!("--origin={}", pair::node_ip(id.index)))
        .stdin(Stdio::null())
        .status()
        .context("run munged")?;
    if !st.success() {
        bail!("munged exited with {st}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(MUNGE_SOCKET).exists() {
        if Instant::now() > deadline {
            bail!("munged made no socket at {MUNGE_SOCKET} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A credential made and decoded here proves the key and the daemon before the agent needs
    // them.
    sh(&format!(
        "echo probe | munge --socket={MUNGE_SOCKET} | unmunge --socket={MUNGE_SOCKET} >/dev/null"
    ))
}

/// The guest's NIC: the virtio driver was loaded by `/init`; the device may take a moment.
fn bring_up_nic(k: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new("/sys/class/net/eth0").exists() {
        if Instant::now() > deadline {
            bail!("no eth0 after 60 s (virtio_net not loaded? no -device virtio-net-pci?)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    sh(&format!(
        "{IP} addr add {}/{} dev eth0 && {IP} link set eth0 up",
        pair::node_ip(k),
        pair::PREFIX
    ))
}

fn run(id: Identity) -> anyhow::Result<()> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    emit(&GuestEvent::Kernel { release });
    // The console echoes what the host types; the host's lines would mix with ours.
    let _ = Command::new("stty").arg("-echo").status();
    std::fs::create_dir_all(DIR).context("create the lab dir")?;
    bring_up_nic(id.index)?;
    if id.auth == Auth::Munge {
        start_munged(id)?;
    }
    let agent = Path::new("/usr/local/bin/rebalancer-agent");
    spawn_agent(agent, Path::new(DIR), id.node(), &agent_config(id), None)?;
    emit(&GuestEvent::NodeUp {
        node: id.node().into(),
        uptime_s: uptime_s(),
        auth: match id.auth {
            Auth::Munge => "munge".into(),
            Auth::None => "none".into(),
        },
    });
    let sock = Path::new(DIR).join(format!("{}.sock", id.node()));
    for line in std::io::stdin().lock().lines() {
        let line = line.context("read the serial console")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cmd = GuestCommand::parse(line).map_err(anyhow::Error::msg)?;
        match cmd {
            GuestCommand::Create { mem_mib } => create(&sock, mem_mib)?,
            GuestCommand::Migrate {
                destination,
                mode,
                label,
            } => migrate(&sock, &destination, mode, &label)?,
            GuestCommand::Report => report(&sock, id)?,
            GuestCommand::Exit => return Ok(()),
        }
    }
    bail!("the serial console closed before `exit`")
}

fn container(sock: &Path) -> anyhow::Result<ContainerInfo> {
    match Client::connect(sock)?.call(&Request::GetContainer {
        id: pair::CONTAINER_ID.into(),
    })? {
        Reply::Container { container } => Ok(container),
        other => bail!("unexpected answer {other:?}"),
    }
}

fn create(sock: &Path, mem_mib: u64) -> anyhow::Result<()> {
    // 1% of the pages rewritten per second: the memory is live, not a frozen copy.
    let spec = spec(
        pair::CONTAINER_ID,
        mem_mib,
        1.0,
        &pair::CONTAINER_IP.to_string(),
    );
    Client::connect(sock)?
        .call(&Request::CreateContainer { spec })
        .context("create the container")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = container(sock)?;
        if c.state == ContainerState::Running && c.rss_bytes >= mem_mib << 20 {
            emit(&GuestEvent::Created { container: c });
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the container did not reach {mem_mib} MiB running within 120 s: {c:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn migrate(sock: &Path, destination: &str, mode: MigrationMode, label: &str) -> anyhow::Result<()> {
    let req = Request::Migrate {
        request: MigrateRequest {
            container: pair::CONTAINER_ID.into(),
            destination: destination.into(),
            destination_addr: None,
            mode,
            max_downtime_ms: None,
            timeout_ms: None,
        },
        watch: true,
    };
    let record = match Client::connect(sock)?
        .call(&req)
        .context(label.to_string())?
    {
        Reply::Migration { migration } => migration,
        other => bail!("unexpected answer {other:?}"),
    };
    emit(&GuestEvent::Migrated {
        label: label.into(),
        record: Box::new(record),
    });
    Ok(())
}

/// Pids of this kernel's `vm-guest workload` processes, from /proc (not from the agent).
fn workload_pids() -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let mut argv = cmd.split(|b| *b == 0);
            let exe = argv.next()?;
            (exe.ends_with(b"vm-guest") && argv.next() == Some(b"workload".as_slice()))
                .then_some(pid)
        })
        .collect()
}

fn report(sock: &Path, id: Identity) -> anyhow::Result<()> {
    let containers = match Client::connect(sock)?.call(&Request::ListContainers)? {
        Reply::Containers { containers } => containers,
        other => bail!("unexpected answer {other:?}"),
    };
    emit(&GuestEvent::NodeState {
        node: id.node().into(),
        containers,
        workload_pids: workload_pids(),
    });
    Ok(())
}
