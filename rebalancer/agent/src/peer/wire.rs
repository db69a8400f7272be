//! The agent ↔ agent wire types: plain data, no logic (serde shape is the wire format).

use std::net::Ipv4Addr;

use rebalancer_proto::{ErrorReply, MigrationId, MigrationMode, NodeCapabilities, VersionRange};
use serde::{Deserialize, Serialize};

use crate::container::ContainerMeta;

/// Versions of the agent ↔ agent protocol this build speaks. 1: the hello's munge credential
/// names only its sender (replayable to another node, and the destination proves nothing).
/// 2: mutual authentication: each side's credential names sender, receiver and the other
/// side's nonce for this connection (the server's in its hello, the client's in
/// [`PeerRequest::Authenticate`]).
pub const PEER_VERSIONS: VersionRange = VersionRange::new(1, 2);

/// Upper bound of one peer frame (image chunks are 1 MiB).
pub const PEER_MAX_FRAME: u32 = 4 << 20;
pub const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    pub name: String,
    pub size: u64,
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
        meta: Box<ContainerMeta>,
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
        /// The source's certificate for this migration's encrypted page transfer
        /// ([`crate::tls`]); absent: the source does not encrypt.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_cert: Option<String>,
    },
    Images {
        files: Vec<ImageFile>,
    },
    Restore {
        /// Post-copy: the source's lazy page server.
        lazy_pages: Option<(Ipv4Addr, u16)>,
    },
    /// Pre-copy: start a page server for round `round` (`last`: the final, frozen dump, whose
    /// images are the ones restored; its parent is round `round - 1`).
    PrecopyRound {
        round: u32,
        last: bool,
    },
    Commit,
    /// Destination → source, after commit: the migrated task ended (`node` is where).
    TaskEnded {
        container: String,
        wait_status: i32,
        node: String,
    },
    Abort {
        reason: String,
    },
    /// Source → destination, from a restarted source agent whose journal shows that Commit may
    /// have been sent: did this node commit `migration`? Sent on a connection of its own.
    Outcome {
        migration: MigrationId,
        container: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PeerReply {
    Authenticated,
    Capabilities {
        capabilities: NodeCapabilities,
    },
    Prepared {
        page_server: Option<(Ipv4Addr, u16)>,
        /// The destination's certificate, sent when the source sent one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_cert: Option<String>,
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
    /// Answer to `outcome`: whether this node received Commit for the migration (and may run
    /// the container). An arrival still in progress is answered with a `busy` error.
    Outcome {
        committed: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerResponse {
    Ok(PeerReply),
    Error(ErrorReply),
}
