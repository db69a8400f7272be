//! Agent ↔ agent protocol (TCP, rebalancer-proto framing).
//!
//! One connection per migration, opened by the source:
//! ```text
//! source                                   destination
//! Hello{role=agent, node, munge cred} ──→  verify credential (before anything else)
//!                                     ←──  Hello
//!   (protocol 3: TLS 1.3 from here on, then authenticate ⇄ authenticated{credential}, both
//!    credentials bound to the nonces and the TLS session's exporter; see `tls`)
//! Capabilities                        ──→  ← capabilities
//! Prepare{migration, mode, meta}      ──→  check room/features; netns (no route yet), root
//!                                          skeleton; stop-and-copy: criu page-server
//!                                     ←──  Prepared{page_server_port}
//!   (criu dump streams pages to the page server)
//! Images{files}  + Data frames        ──→  write non-memory images into the tmpfs dir
//!                                     ←──  ImagesReceived
//! Restore{lazy}                       ──→  post-copy: criu lazy-pages; criu restore
//!                                          --leave-stopped (tree stays stopped)
//!                                     ←──  Restored{pid, stats}
//! Commit  (source's point of no return)──→ route + SIGCONT + gratuitous ARP
//!                                     ←──  Committed
//! ```
//! Abort, EOF, an error or the timeout before Commit make the destination kill whatever it
//! restored and remove the netns, images and reservation: the source resumes its copy.
//!
//! A source whose Commit went unanswered, or one restarted after its journal reached
//! network-switch, opens a connection of its own and asks `Outcome{migration, container,
//! epoch}`; the destination answers `Outcome{committed}` from its commit mark and, if not
//! committed, fences the migration so that a late Commit is refused for good (`store.rs`).
//! Without `epoch` (previous release) an arrival still in progress is answered `busy`.
//!
//! The wire types are [`rebalancer_proto::peer`]'s (re-exported by [`wire`]); this module holds
//! the conversions of the agent's container record ([`convert`]), the client ([`client`]), the
//! server's handshake ([`server`]) and the error mapping ([`errors`]). Both ends speak through
//! `rebalancer_proto::channel::AsyncChannel`. The destination's request loop is in the migration
//! module (`destination.rs`), which uses this one; this module uses nothing of it.

pub mod client;
pub mod convert;
pub mod errors;
pub mod listener;
pub mod server;
pub mod tls;
pub mod wire;

pub use client::PeerConn;
pub use convert::ContainerWireError;
pub use errors::{error_from_reply, reply_error};
pub use wire::*;
