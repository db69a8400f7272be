//! The agent's container record to and from the peer protocol's [`MigratingContainer`].
//!
//! The source converts its [`ContainerMeta`] before Prepare; the destination converts what
//! arrived back and, on the way, refuses mount paths that could not have come from an honest
//! source (relative, or with `..`), before any of them names a directory on this node.

use std::path::{Component, Path, PathBuf};

use rebalancer_proto::peer::MigratingContainer;
use rebalancer_proto::MountSpec;

use crate::container::{ContainerMeta, MountPlan};
use crate::error::AgentError;

/// Why a container cannot cross the peer protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerWireError {
    /// JSON carries text: a node path that is not UTF-8 cannot be sent without changing it.
    #[error("container {container}: mount source {path:?} is not valid UTF-8")]
    NonUtf8Path { container: String, path: PathBuf },
    #[error("container {container}: {what} {path:?} must be an absolute path without '..'")]
    BadPath {
        container: String,
        what: &'static str,
        path: String,
    },
}

impl From<ContainerWireError> for AgentError {
    fn from(e: ContainerWireError) -> Self {
        AgentError::BadRequest(e.to_string())
    }
}

fn plain_absolute(p: &str) -> bool {
    let p = Path::new(p);
    p.is_absolute() && !p.components().any(|c| matches!(c, Component::ParentDir))
}

impl TryFrom<&ContainerMeta> for MigratingContainer {
    type Error = ContainerWireError;

    fn try_from(m: &ContainerMeta) -> Result<Self, Self::Error> {
        let mounts = m
            .mounts
            .iter()
            .map(|p| {
                Ok(match p {
                    MountPlan::Bind {
                        source,
                        target,
                        readonly,
                    } => MountSpec::Bind {
                        source: source
                            .to_str()
                            .ok_or_else(|| ContainerWireError::NonUtf8Path {
                                container: m.spec.id.clone(),
                                path: source.clone(),
                            })?
                            .to_string(),
                        target: target.clone(),
                        readonly: *readonly,
                    },
                    MountPlan::Tmpfs { target, options } => MountSpec::Tmpfs {
                        target: target.clone(),
                        options: options.clone(),
                    },
                    MountPlan::Dev => MountSpec::Dev,
                    MountPlan::Proc => MountSpec::Proc,
                })
            })
            .collect::<Result<Vec<_>, ContainerWireError>>()?;
        Ok(MigratingContainer {
            spec: m.spec.clone(),
            address: m.address,
            mounts,
            symlinks: m.symlinks.clone(),
            stdio_keys: m.stdio_keys.clone(),
            stdio_paths: m.stdio_paths.clone(),
            started_at: m.started_at,
        })
    }
}

impl TryFrom<MigratingContainer> for ContainerMeta {
    type Error = ContainerWireError;

    fn try_from(m: MigratingContainer) -> Result<Self, Self::Error> {
        let bad = |what: &'static str, path: &str| ContainerWireError::BadPath {
            container: m.spec.id.clone(),
            what,
            path: path.to_string(),
        };
        let mut mounts = Vec::with_capacity(m.mounts.len());
        for s in &m.mounts {
            mounts.push(match s {
                MountSpec::Bind {
                    source,
                    target,
                    readonly,
                } => {
                    if !plain_absolute(source) {
                        return Err(bad("bind mount source", source));
                    }
                    if !plain_absolute(target) {
                        return Err(bad("bind mount target", target));
                    }
                    MountPlan::Bind {
                        source: PathBuf::from(source),
                        target: target.clone(),
                        readonly: *readonly,
                    }
                }
                MountSpec::Tmpfs { target, options } => {
                    if !plain_absolute(target) {
                        return Err(bad("tmpfs target", target));
                    }
                    MountPlan::Tmpfs {
                        target: target.clone(),
                        options: options.clone(),
                    }
                }
                MountSpec::Dev => MountPlan::Dev,
                MountSpec::Proc => MountPlan::Proc,
            });
        }
        if let Some((link, _)) = m.symlinks.iter().find(|(l, _)| !plain_absolute(l)) {
            return Err(bad("root symlink", link));
        }
        Ok(ContainerMeta {
            spec: m.spec,
            address: m.address,
            mounts,
            symlinks: m.symlinks,
            stdio_keys: m.stdio_keys,
            stdio_paths: m.stdio_paths,
            started_at: m.started_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rebalancer_proto::{ContainerSpec, RootfsSpec};

    use super::*;

    fn meta() -> ContainerMeta {
        ContainerMeta {
            spec: ContainerSpec {
                id: "web-1".into(),
                task: None,
                uid: 1000,
                gid: 1000,
                argv: vec!["/bin/sleep".into(), "100".into()],
                env: vec![],
                cwd: "/".into(),
                rootfs: RootfsSpec::Host,
                binds: vec!["/srv/work".into()],
                memory_limit: Some(1 << 28),
                cpus: Some(0.5),
                class: None,
                address: None,
                stdout: None,
                stderr: None,
            },
            address: Ipv4Addr::new(198, 18, 10, 7),
            mounts: vec![
                MountPlan::Bind {
                    source: "/usr".into(),
                    target: "/usr".into(),
                    readonly: true,
                },
                MountPlan::Bind {
                    source: "/srv/work".into(),
                    target: "/srv/work".into(),
                    readonly: false,
                },
                MountPlan::Tmpfs {
                    target: "/tmp".into(),
                    options: "mode=1777".into(),
                },
                MountPlan::Proc,
                MountPlan::Dev,
            ],
            symlinks: vec![("/bin".into(), "usr/bin".into())],
            stdio_keys: vec!["pipe:[1]".into(), "pipe:[2]".into(), "pipe:[3]".into()],
            stdio_paths: vec![],
            started_at: 17,
        }
    }

    #[test]
    fn a_container_survives_the_round_trip_and_keeps_the_old_json() {
        let m = meta();
        let wire = MigratingContainer::try_from(&m).expect("to wire");
        // The previous release serialized ContainerMeta itself: the shape must not change.
        assert_eq!(
            serde_json::to_value(&wire).expect("json"),
            serde_json::to_value(&m).expect("json")
        );
        assert_eq!(ContainerMeta::try_from(wire).expect("from wire"), m);
    }

    #[test]
    fn a_non_utf8_bind_source_is_refused_naming_it() {
        use std::os::unix::ffi::OsStrExt;
        let mut m = meta();
        let odd = PathBuf::from(std::ffi::OsStr::from_bytes(b"/srv/\xff"));
        m.mounts[1] = MountPlan::Bind {
            source: odd.clone(),
            target: "/srv/x".into(),
            readonly: false,
        };
        let e = MigratingContainer::try_from(&m).expect_err("non-UTF-8");
        assert_eq!(
            e,
            ContainerWireError::NonUtf8Path {
                container: "web-1".into(),
                path: odd
            }
        );
    }

    #[test]
    fn relative_or_dotdot_paths_from_a_source_are_refused() {
        let cases: [(usize, MountSpec, &str); 4] = [
            (
                1,
                MountSpec::Bind {
                    source: "/srv/../etc".into(),
                    target: "/srv/work".into(),
                    readonly: false,
                },
                "bind mount source",
            ),
            (
                1,
                MountSpec::Bind {
                    source: "/srv/work".into(),
                    target: "srv/work".into(),
                    readonly: false,
                },
                "bind mount target",
            ),
            (
                2,
                MountSpec::Tmpfs {
                    target: "../tmp".into(),
                    options: String::new(),
                },
                "tmpfs target",
            ),
            (
                0,
                MountSpec::Bind {
                    source: "etc".into(),
                    target: "/etc".into(),
                    readonly: true,
                },
                "bind mount source",
            ),
        ];
        for (i, spec, what) in cases {
            let mut wire = MigratingContainer::try_from(&meta()).expect("to wire");
            wire.mounts[i] = spec.clone();
            let e = ContainerMeta::try_from(wire).expect_err("refused");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("container web-1: {what}")),
                "{spec:?}: {msg}"
            );
        }
        let mut wire = MigratingContainer::try_from(&meta()).expect("to wire");
        wire.symlinks.push(("lib".into(), "usr/lib".into()));
        let e = ContainerMeta::try_from(wire).expect_err("relative link");
        assert!(e.to_string().contains("root symlink \"lib\""), "{e}");
        // What reaches the caller is a bad-request error with the same sentence.
        let a: AgentError = e.clone().into();
        assert!(matches!(a, AgentError::BadRequest(ref m) if *m == e.to_string()));
    }
}
