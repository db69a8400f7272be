//! Agent ↔ agent messages (the peer protocol): wire types of their own, not agent internals.
//!
//! The JSON shape of every type here is frozen by fixtures (`tests/fixtures/peer/`, captured from
//! the agents of the previous release): a change that alters what an older agent sends or
//! accepts fails `tests/peer_fixtures.rs`. New fields must be optional (`#[serde(default)]`)
//! and, where an older agent would refuse them, sent only from the version that knows them.
//! The conversations are drawn in `PROTOCOL.md` (section "Agent ↔ agent").

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorReply, VersionRange};
use crate::models::{
    ContainerSpec, MigrationId, MigrationMode, Millis, MountSpec, NodeCapabilities,
};

/// Versions of the agent ↔ agent protocol this build speaks.
///
/// 1: the hello's munge credential names only its sender (replayable to another node, and the
/// destination proves nothing). 2: mutual authentication: each side's credential names sender,
/// receiver and the other side's nonce for this connection (the server's in its hello, the
/// client's in [`PeerRequest::Authenticate`]). 3: after the hellos the connection continues
/// inside TLS 1.3; the server's hello carries no credential, the client's `authenticate` and the
/// server's `authenticated` each carry one that also names the TLS session's exporter value, so
/// that it is valid inside that session only. 4: post-copy pages move on a connection the two
/// agents established before the dump ([`PeerRequest::LazyLink`]); no CRIU process listens.
pub const PEER_VERSIONS: VersionRange = VersionRange::new(1, 4);

/// First peer protocol version with [`PeerRequest::LazyLink`].
pub const LAZY_LINK_VERSION: u16 = 4;

/// Length in bytes of a [`PeerRequest::LazyLink`] token (sent hex-encoded in the request, raw
/// on the linked connection).
pub const LAZY_TOKEN_LEN: usize = 32;

/// A migration's fencing token, carried in Prepare, Commit and Outcome.
pub type Epoch = u64;

/// Upper bound of one peer frame, checked before anything is allocated. Image chunks are
/// [`CHUNK`] bytes; a Prepare with a large environment stays far below it.
pub const PEER_MAX_FRAME: u32 = 4 << 20;

/// Size of one data frame of a CRIU image file ([`PeerRequest::Images`]).
pub const CHUNK: usize = 1 << 20;

/// Most image files one [`PeerRequest::Images`] may announce (CRIU writes a few dozen per
/// process tree; the bound keeps a hostile announcement from reserving a huge table).
pub const MAX_IMAGE_FILES: usize = 65_536;

/// One non-memory CRIU image file announced by [`PeerRequest::Images`]; its bytes follow in data
/// frames of at most [`CHUNK`] bytes, in announcement order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    pub name: String,
    pub size: u64,
}

/// The container being moved: what the destination needs to rebuild its surroundings (root
/// file system, mounts, address, stdio) before CRIU restores its processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigratingContainer {
    /// The container's spec as it was started (identity, user, program, limits).
    pub spec: ContainerSpec,
    /// The container's address; it keeps it on the destination.
    pub address: Ipv4Addr,
    /// The container's mount table, in mount order.
    pub mounts: Vec<MountSpec>,
    /// Symlinks at the root of the container (link path, target), e.g. merged-/usr links.
    pub symlinks: Vec<(String, String)>,
    /// CRIU identities of pid 1's stdio descriptors 0, 1, 2 (`pipe:[INO]`, or `file[MNT:INO]`
    /// for a file opened outside the container and dumped as external), for `--inherit-fd`.
    pub stdio_keys: Vec<String>,
    /// Paths of those that are files, index for index (empty for pipes and sockets).
    #[serde(default)]
    pub stdio_paths: Vec<String>,
    /// When the container first started (on whichever node), milliseconds since the epoch.
    pub started_at: Millis,
}

/// A batch task's job directory in the source's node-local SlurmdSpoolDir (slurmd's
/// `job%05u`, holding `slurm_script`), which the destination's spool does not have. It travels
/// in Prepare; the destination recreates it in its own spool, with these owners and modes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolDir {
    /// The directory's path on the source (the destination checks it names the job's).
    pub path: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Its regular files (not sockets, not subdirectories).
    pub files: Vec<SpoolFile>,
}

/// One regular file of a [`SpoolDir`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolFile {
    /// A plain file name, no `/`.
    pub name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum PeerRequest {
    /// Version 2, first request: the client's credential bound to the server's nonce.
    Authenticate {
        credential: Option<String>,
    },
    Capabilities,
    Prepare {
        migration: MigrationId,
        mode: MigrationMode,
        source_node: String,
        /// The field name is the previous release's; it carries the container being moved.
        meta: Box<MigratingContainer>,
        /// A Slurm task: restored by a restore step on this node (`prepare-restore`), not by
        /// the agent, so that it becomes part of the job.
        #[serde(default)]
        restore_step: bool,
        /// The source agent's peer address, told the task's final status later.
        #[serde(default)]
        source_addr: Option<String>,
        /// Resident memory of the container, for the destination's room check.
        #[serde(default)]
        rss_bytes: u64,
        /// The source's certificate for this migration's encrypted page transfer; absent: the
        /// source does not encrypt.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_cert: Option<String>,
        /// The migration's fencing token (nonzero): the destination accepts Commit only for the
        /// epoch it prepared, and never once it answered `outcome` "not committed" or undid
        /// the arrival. Absent from sources of the previous release.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
        /// The source's whole-migration limit in milliseconds; the destination bounds its waits
        /// for the source by it. Absent: the destination's own `migration_timeout_ms`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        /// The batch task's job directory of the source's node-local spool; absent: the task
        /// needs none (or an older source).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spool: Option<SpoolDir>,
        /// The source's heartbeat interval in milliseconds: the source sends [`PeerEvent`]
        /// heartbeats while it dumps and understands the destination's. Absent: an older
        /// source (timeouts only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_ms: Option<u64>,
        /// The source guards each page-server port of this migration on its own node and then
        /// sends [`PeerRequest::OpenPageServer`]: the destination binds each page server's port
        /// but does not listen before that, so that no connection can be made to it before the
        /// guard is in place. Absent (false): an older source, page servers listen at once.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        opens_page_servers: bool,
    },
    /// Announces the non-memory image files; their bytes follow in data frames with this
    /// request's id.
    Images {
        files: Vec<ImageFile>,
    },
    Restore {
        /// Post-copy before version 4: the source's lazy page server (CRIU's own listener).
        /// Version 4: absent, the pages come over the connection of [`PeerRequest::LazyLink`].
        lazy_pages: Option<(Ipv4Addr, u16)>,
    },
    /// Version 4, post-copy, before the source freezes: connect to the source agent's listener
    /// `to` and write `token` (hex of [`LAZY_TOKEN_LEN`] bytes) as the connection's first bytes.
    /// The source agent accepts that one connection from this node's address with this token
    /// (others are closed unread) and hands it to its `criu dump --lazy-pages`; this node's
    /// `criu lazy-pages` gets the other end at `restore`.
    LazyLink {
        to: (Ipv4Addr, u16),
        token: String,
    },
    /// Between agents that agreed on `opens_page_servers` at prepare: the source has guarded
    /// the page server on `port` (the one prepare or the last pre-copy round announced); the
    /// destination starts listening there and answers `ack` once it does.
    OpenPageServer {
        port: u16,
    },
    /// Pre-copy: start a page server for round `round` (`last`: the final, frozen dump, whose
    /// images are the ones restored; its parent is round `round - 1`).
    PrecopyRound {
        round: u32,
        last: bool,
    },
    /// The source's point of no return. `migration`/`epoch` (absent from sources of the
    /// previous release) must name the prepared arrival; a fenced epoch is refused.
    Commit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migration: Option<MigrationId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
    },
    /// Destination → source, after commit: the migrated task ended (`node` is where).
    TaskEnded {
        container: String,
        wait_status: i32,
        node: String,
    },
    Abort {
        reason: String,
    },
    /// Source → destination, from a source whose Commit went unanswered (or a restarted source
    /// agent whose journal shows that Commit may have been sent): did this node commit
    /// `migration`? Sent on a connection of its own. With `epoch` (this release's sources) the
    /// question fences: an arrival not committed yet is refused Commit from then on, for good,
    /// so that "not committed" stays true; without it an arrival in progress is `busy`.
    Outcome {
        migration: MigrationId,
        container: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
    },
    /// Source → destination, after a committed post-copy migration's lazy dump ended: did every
    /// page arrive? Sent on a connection of its own. The source's CRIU cannot tell: its page
    /// server ends without an error when the destination's `criu lazy-pages` dies. A
    /// destination whose daemon still runs waits for it (bounded), then answers `busy`; one
    /// of an earlier release refuses the unknown op, and the source keeps its record.
    LazyEnd {
        migration: MigrationId,
    },
}

impl PeerRequest {
    /// The request's name on the wire (`op`), for logs and errors.
    pub fn op(&self) -> &'static str {
        match self {
            PeerRequest::Authenticate { .. } => "authenticate",
            PeerRequest::Capabilities => "capabilities",
            PeerRequest::Prepare { .. } => "prepare",
            PeerRequest::Images { .. } => "images",
            PeerRequest::Restore { .. } => "restore",
            PeerRequest::PrecopyRound { .. } => "precopy-round",
            PeerRequest::Commit { .. } => "commit",
            PeerRequest::TaskEnded { .. } => "task-ended",
            PeerRequest::Abort { .. } => "abort",
            PeerRequest::Outcome { .. } => "outcome",
            PeerRequest::LazyLink { .. } => "lazy-link",
            PeerRequest::LazyEnd { .. } => "lazy-end",
            PeerRequest::OpenPageServer { .. } => "open-page-server",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PeerReply {
    Authenticated {
        /// Version 3: the server's credential, bound to the client's nonce and the TLS session
        /// (versions 1 and 2: absent, the server's credential was in its hello).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential: Option<String>,
    },
    Capabilities {
        capabilities: NodeCapabilities,
    },
    Prepared {
        page_server: Option<(Ipv4Addr, u16)>,
        /// The destination's certificate, sent when the source sent one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_cert: Option<String>,
        /// The heartbeat interval the destination agreed to (the source's): it answers the
        /// source's heartbeats and sends its own while it serves a long request. Absent: an
        /// older destination, or a source that sent none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_ms: Option<u64>,
        /// The destination agreed to the source's `opens_page_servers`: its page servers wait
        /// for [`PeerRequest::OpenPageServer`]. Absent (false): an older destination, they
        /// listen at once.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        opens_page_servers: bool,
    },
    ImagesReceived {
        bytes: u64,
    },
    Restored {
        pid: i32,
        restore_ms: u64,
        pages_restored: u64,
    },
    Committed {
        resumed_at: u64,
    },
    RoundReady {
        page_server: (Ipv4Addr, u16),
    },
    Aborted,
    Ack,
    /// Answer to `lazy-link`: connected, token written.
    LazyLinked,
    /// Answer to `outcome`: whether this node received Commit for the migration (and may run
    /// the container). An arrival still in progress is answered with a `busy` error.
    Outcome {
        committed: bool,
    },
    /// Answer to `lazy-end`. `lost`: the destination's page supply ended before every page
    /// arrived, so the container there was killed (why, in a sentence); absent: every page
    /// arrived, or the container ended on its own first.
    LazyEnded {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lost: Option<String>,
    },
}

/// The payload of an event frame on a peer connection: progress that proves the sender is
/// alive while a long phase runs. Event frames need no new message: the channel already lets
/// a server send events of the request it serves, and a receiver that cannot decode an event
/// drops it (an older source ignores these). The source sends them with request id 0 between
/// requests (its own dump, pre-copy round); the destination answers each with one of its own
/// (id 0) and sends them with the request's id while it serves a long request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum PeerEvent {
    Heartbeat {
        /// What the sender is doing (`dump`, `pre-copy-round`, `restore`, `prepare`, `wait`).
        phase: String,
        /// Bytes the sender moved so far in that phase, when it knows (else 0).
        #[serde(default)]
        bytes: u64,
    },
}

/// The payload of every peer response frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerResponse {
    Ok(PeerReply),
    Error(ErrorReply),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_match_the_wire_tag() {
        let reqs = [
            PeerRequest::Authenticate { credential: None },
            PeerRequest::Capabilities,
            PeerRequest::Images { files: vec![] },
            PeerRequest::Restore { lazy_pages: None },
            PeerRequest::PrecopyRound {
                round: 1,
                last: false,
            },
            PeerRequest::Commit {
                migration: None,
                epoch: None,
            },
            PeerRequest::TaskEnded {
                container: "c".into(),
                wait_status: 0,
                node: "n".into(),
            },
            PeerRequest::Abort { reason: "r".into() },
            PeerRequest::Outcome {
                migration: "m".into(),
                container: "c".into(),
                epoch: Some(7),
            },
            PeerRequest::LazyLink {
                to: (Ipv4Addr::new(198, 18, 0, 1), 4000),
                token: "00".into(),
            },
            PeerRequest::LazyEnd {
                migration: "m".into(),
            },
            PeerRequest::OpenPageServer { port: 4001 },
        ];
        for r in reqs {
            let v = serde_json::to_value(&r).expect("serialize");
            assert_eq!(v["op"], r.op(), "{r:?}");
        }
    }

    #[test]
    fn an_unknown_op_is_refused_naming_it() {
        let e =
            serde_json::from_str::<PeerRequest>(r#"{"op":"format-disk"}"#).expect_err("unknown op");
        assert!(e.to_string().contains("format-disk"), "{e}");
    }
}
