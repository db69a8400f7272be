//! `rebalancer-agent drain`: the explicit way to empty a node. Stopping, restarting or
//! upgrading the agent never touches its containers (docs/deploy.md, "Agent restart"); a drain
//! migrates each live container to another node (`--to`), or signals it (`--signal`), through
//! the running agent's control socket.

use std::path::Path;
use std::time::Duration;

use rebalancer_proto::channel::{Channel, ChannelConfig};
use rebalancer_proto::{
    ContainerInfo, ContainerState, ErrorReply, Hello, MigrateRequest, MigrationMode,
    MigrationState, ProtoError, Reply, Request, Response, Role,
};

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("cannot connect to the agent at {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control protocol")]
    Proto(#[from] ProtoError),
    #[error("the agent refused: {0}")]
    Refused(ErrorReply),
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
}

/// An action and how it ended (`Err`: why it failed).
pub type Outcome = (Action, Result<(), String>);

/// What a drain does to one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Migrate { id: String, to: String },
    Signal { id: String, signal: i32 },
}

/// The actions for the containers an agent lists: every running container is migrated to `to`,
/// or sent `signal` without one. Containers that are migrating, gone or exited are left. Pure.
pub fn plan(containers: &[ContainerInfo], to: Option<&str>, signal: i32) -> Vec<Action> {
    containers
        .iter()
        .filter(|c| c.state == ContainerState::Running)
        .map(|c| match to {
            Some(to) => Action::Migrate {
                id: c.id.clone(),
                to: to.to_string(),
            },
            None => Action::Signal {
                id: c.id.clone(),
                signal,
            },
        })
        .collect()
}

fn call(
    ch: &mut Channel<std::os::unix::net::UnixStream>,
    req: &Request,
) -> Result<Reply, DrainError> {
    let r: Response = ch.call(req)?;
    r.into_result().map_err(DrainError::Refused)
}

/// Drains the agent listening on `socket`. Returns each action with its outcome (`Err`: why it
/// failed); a failure of one container does not stop the others.
pub fn run(
    socket: &Path,
    to: Option<&str>,
    mode: MigrationMode,
    signal: i32,
) -> Result<Vec<Outcome>, DrainError> {
    let s =
        std::os::unix::net::UnixStream::connect(socket).map_err(|source| DrainError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    // A migration may take minutes (large containers, post-copy).
    let cfg = ChannelConfig::default().call_timeout(Some(Duration::from_secs(900)));
    let mut ch = Channel::connect(s, cfg, Hello::new(Role::Cli, crate::SOFTWARE))?;
    let containers = match call(&mut ch, &Request::ListContainers)? {
        Reply::Containers { containers } => containers,
        other => return Err(DrainError::Unexpected(format!("{other:?}"))),
    };
    let mut out = Vec::new();
    for a in plan(&containers, to, signal) {
        let r = match &a {
            Action::Migrate { id, to } => call(
                &mut ch,
                &Request::Migrate {
                    request: MigrateRequest {
                        container: id.clone(),
                        destination: to.clone(),
                        destination_addr: None,
                        mode,
                        max_downtime_ms: None,
                        timeout_ms: None,
                    },
                    watch: true,
                },
            )
            .and_then(|r| match r {
                Reply::Migration { migration } if migration.state == MigrationState::Succeeded => {
                    Ok(())
                }
                Reply::Migration { migration } => Err(DrainError::Unexpected(format!(
                    "migration {} ended {}: {}",
                    migration.id,
                    migration.state,
                    migration.error.unwrap_or_default()
                ))),
                other => Err(DrainError::Unexpected(format!("{other:?}"))),
            }),
            Action::Signal { id, signal } => call(
                &mut ch,
                &Request::KillContainer {
                    id: id.clone(),
                    signal: *signal,
                },
            )
            .map(|_| ()),
        };
        out.push((a, r.map_err(|e| e.to_string())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, state: ContainerState) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            task: None,
            uid: 0,
            gid: 0,
            node: "n1".into(),
            address: "198.18.4.1".into(),
            pid: Some(1),
            state,
            rss_bytes: 0,
            cpus: None,
            class: None,
            exit_status: None,
            started_at: 0,
            runs_in: None,
        }
    }

    #[test]
    fn only_running_containers_are_drained() {
        let cs = [
            info("a", ContainerState::Running),
            info("b", ContainerState::Migrating),
            info("c", ContainerState::Exited),
            info("d", ContainerState::MigratedAway),
            info("e", ContainerState::Running),
        ];
        assert_eq!(
            plan(&cs, Some("n2"), 15),
            vec![
                Action::Migrate {
                    id: "a".into(),
                    to: "n2".into()
                },
                Action::Migrate {
                    id: "e".into(),
                    to: "n2".into()
                }
            ]
        );
        assert_eq!(
            plan(&cs, None, 15),
            vec![
                Action::Signal {
                    id: "a".into(),
                    signal: 15
                },
                Action::Signal {
                    id: "e".into(),
                    signal: 15
                }
            ]
        );
    }
}
