//! Issue #11: downgrade of the TCP control protocol by rewriting the hellos. A man in the
//! middle between the controller and an agent's control port rewrites the hellos so that two
//! current ends would agree on protocol 1 (in clear). Both ends refuse: the controller when the
//! agent's signed range says 2 was possible, the agent when the controller's credential names
//! its nonce stripped of its range (the agent made to look old) or states another range than
//! the controller's hello arrived with. The same proxy, rewriting nothing, passes the listing.
//! Block [rbd] of the network plan: node 198.18.61.0/24, containers 198.19.61.0/24.

mod common;
#[path = "../../agent/tests/common/rewrite_proxy.rs"]
mod rewrite_proxy;

use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rebalancer_controller::agents::{AgentClient, TcpIdentity};
use rebalancer_controller::config::AgentAddr;
use rebalancer_proto::*;
use rebalancer_testkit::{NetLab, NetPlan};
use rewrite_proxy::{rewriting_proxy, strip_range, unchanged, From, Rewrite};

const P: &str = "rbd";
const SUBNET: &str = "198.19.61.0/24";

struct Lab {
    dir: PathBuf,
    agent: Child,
    net: NetLab,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

impl Lab {
    fn up() -> Lab {
        let dir = PathBuf::from(format!("/tmp/{P}-downgrade-lab"));
        let net = NetLab::up(NetPlan {
            prefix: P.into(),
            block: 61,
            subnet: SUBNET.into(),
            nodes: 1,
            dir: dir.clone(),
        });
        let (d, ip) = (dir.display(), net.nodes[0].ip.clone());
        let munge = net.munge_socket();
        let cfg = dir.join("node0.toml");
        std::fs::write(
            &cfg,
            format!(
                "node = \"{P}n0\"\nlisten = \"{ip}:7878\"\ncontrol_socket = \"{d}/{P}n0.sock\"\ncontainer_subnet = \"{SUBNET}\"\nipam = \"local\"\n\
                 state_dir = \"{d}/node0/state\"\nrun_dir = \"{d}/node0/run\"\n\
                 [auth]\nmethod = \"munge\"\nmunge_socket = \"{}\"\n[control]\nlisten = \"{ip}:7879\"\n",
                munge.display()
            ),
        )
        .expect("agent config");
        let agent = spawn_agent(&format!("{P}n0"), &cfg, &dir.join("node0.log"));
        let lab = Lab { dir, agent, net };
        wait_agent(&lab.dir.join(format!("{P}n0.sock")), "node0", || lab.log());
        lab
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node0.log")).unwrap_or_default()
    }

    /// Lists the agent's containers as the controller does, through a proxy applying
    /// `rewrite`; the ids, or the error with its causes.
    fn list_through(&self, rewrite: Rewrite) -> Result<Vec<String>, String> {
        let to = format!("{}:7879", self.net.nodes[0].ip);
        let (port, _) = rewriting_proxy(Some(&self.net.client_ns), &to, rewrite);
        let ns = format!("/run/netns/{}", self.net.client_ns);
        let client = AgentClient {
            addr: AgentAddr::Tcp(format!("127.0.0.1:{port}")),
            timeout: Duration::from_secs(10),
            identity: Some(TcpIdentity {
                node: format!("{P}n0"),
                controller: "admin".into(),
                munge_socket: Some(self.net.munge_socket()),
                versions: CONTROL_TCP_VERSIONS,
            }),
        };
        std::thread::spawn(move || {
            // The controller's side runs where a controller would: the lab's client namespace.
            let f = std::fs::File::open(&ns).expect("client netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(client.containers())
                .map(|cs| cs.into_iter().map(|c| c.id).collect())
                .map_err(|e| {
                    let mut s = e.to_string();
                    let mut cause = std::error::Error::source(&e);
                    while let Some(c) = cause {
                        s.push_str(&format!(": {c}"));
                        cause = c.source();
                    }
                    s
                })
        })
        .join()
        .expect("client thread")
    }
}

#[test]
#[ignore = "needs root, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn rewritten_control_hellos_are_refused_by_both_ends() {
    let lab = Lab::up();
    let mut spec = server("dgc1", 61, "198.19.61.20");
    spec.argv = vec!["sleep".into(), "600".into()];
    let created = agent_call(
        &lab.dir.join(format!("{P}n0.sock")),
        &Request::CreateContainer { spec },
    );
    assert!(created.is_ok(), "{created:?}\n{}", lab.log());

    // 1. The controller's range rewritten to 1..=1: the agent agrees to 1, its nonce says it
    //    speaks 1..=2; the controller refuses before it proves anything.
    let lower: Rewrite = Arc::new(|side, h: &mut Hello| {
        if side == From::Client {
            *h = h.clone().with_versions(VersionRange::new(1, 1));
        }
    });
    let e = lab
        .list_through(lower.clone())
        .expect_err("listed over rewritten hellos");
    println!("controller's range rewritten: {e}");
    assert!(e.contains("downgrade") && e.contains("instead of 2"), "{e}");

    // 2. And the agent's nonce stripped of its range, so that it looks like an agent of the
    //    previous release: the controller goes on, but its credential names the stripped
    //    nonce, and the agent refuses.
    let strip: Rewrite = Arc::new(move |side, h: &mut Hello| {
        lower(side, h);
        if side == From::Server {
            h.nonce = h.nonce.as_deref().map(strip_range);
        }
    });
    let e = lab
        .list_through(strip)
        .expect_err("listed with the agent made to look old");
    println!("and the agent made to look old: {e}");
    assert!(
        e.contains("permission denied") && e.contains("downgrade"),
        "{e}"
    );
    assert!(
        lab.log().contains("protocol downgrade"),
        "the agent did not log the refusal:\n{}",
        lab.log()
    );

    // 3. Only the agent's hello rewritten to look old (plain nonce, version 1 agreed) while the
    //    controller's arrives intact: the agent agreed to 2 and expects TLS, so this fails
    //    too; what matters is that nothing is listed.
    let agent_only: Rewrite = Arc::new(|side, h: &mut Hello| {
        if side == From::Server {
            *h = h.clone().with_versions(VersionRange::new(1, 1));
            h.nonce = h.nonce.as_deref().map(strip_range);
        }
    });
    let e = lab
        .list_through(agent_only)
        .expect_err("listed with a rewritten agent hello");
    println!("only the agent's hello rewritten: {e}");

    // 4. The same proxy, changing nothing: the listing works (protocol 2).
    let ids = lab
        .list_through(unchanged())
        .expect("listing through the proxy");
    assert!(ids.iter().any(|i| i == "dgc1"), "{ids:?}");
}
