//! The controller's lab isolates its nodes like machines (issue #13): each node and the admin
//! host names itself and has its own /run; from the admin host, where the controller runs, no
//! agent socket is reachable (checked by device and inode, with each node as positive control),
//! and the controller still lists a container of each node, over the TCP control plane. Block
//! [rbz] of the network plan: nodes 198.18.59.0/24, containers 198.19.59.0/24.

use std::time::{Duration, Instant};

use rebalancer_proto::control::{ControlReply, ControlRequest};
use rebalancer_proto::*;

mod common;
use common::lab::ADMIN;
use common::*;

#[test]
#[ignore = "needs root, munge and network namespaces; .ci/run runs it with --include-ignored"]
fn no_agent_socket_is_reachable_from_the_controllers_host() {
    let lab = LabPlan::new("rbz", 59).up();
    let mut hosts: Vec<String> = (0..2).map(|i| lab.node(i)).collect();
    hosts.push(ADMIN.into());

    // Every host names itself and sees only its own /run.
    for h in &hosts {
        let o = lab
            .hosts
            .sh(h, &format!("hostname && echo {h} >/run/rbz-mark"));
        assert!(o.status.success(), "{h}: {o:?}");
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), h.as_str());
    }
    for h in &hosts {
        let o = lab.hosts.sh(h, "cat /run/rbz-mark");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            h.as_str(),
            "{h}'s /run holds another host's file"
        );
    }
    assert!(
        !std::path::Path::new("/run/rbz-mark").exists(),
        "the test's own host sees a lab host's /run"
    );

    // The agent sockets: each on its own node only.
    let admin = lab.sockets_seen_on(ADMIN);
    for i in 0..2 {
        let id = lab.agent_socket_id(i);
        let own = lab.sockets_seen_on(&lab.node(i));
        assert!(
            own.contains(&id),
            "positive control: node{i} does not see its own agent socket {id:?} in {own:?}"
        );
        assert!(
            !admin.contains(&id),
            "the admin host reaches node{i}'s agent socket {id:?}"
        );
        let other = lab.sockets_seen_on(&lab.node(1 - i));
        assert!(
            !other.contains(&id),
            "node{} reaches node{i}'s socket",
            1 - i
        );
    }
    let o = lab
        .hosts
        .sh(ADMIN, &format!("test -e {}", common::lab::AGENT_SOCKET));
    assert!(
        !o.status.success(),
        "the admin host has an agent socket path"
    );

    // The controller there still sees a container of each node.
    for i in 0..2u32 {
        let created = agent_call(
            &lab.sock(i as usize),
            &Request::CreateContainer {
                spec: server(
                    &format!("j{}.s0.t0", 90 + i),
                    90 + i,
                    &format!("198.19.59.{}", 90 + i),
                ),
            },
        );
        assert!(created.is_ok(), "{created:?}\n{}", lab.logs());
    }
    let _ctl = lab.controller(ControllerPlan {
        agents: "poll_interval_ms = 300",
        ..Default::default()
    });
    let t0 = Instant::now();
    let ctl = lab.dir.join("ctl.sock");
    wait_for(
        "the controller did not list a container of each node",
        Duration::from_secs(20),
        || lab.logs(),
        || match ctl_call(
            &ctl,
            &ControlRequest::ShowContainers {
                id: None,
                job_id: None,
            },
        ) {
            Ok(ControlReply::Containers { containers }) => {
                let mut on: Vec<String> = containers.iter().map(|c| c.node.clone()).collect();
                on.sort();
                (on == [lab.node(0), lab.node(1)]).then_some(())
            }
            _ => None,
        },
    );
    eprintln!(
        "controller listed both nodes' containers {:?} after it started",
        t0.elapsed()
    );
}
