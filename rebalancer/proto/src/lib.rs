//! Wire protocol and shared models of slurm-rebalancer.
//!
//! Every process boundary (SPANK plugin → agent, CLI/controller → agent, agent ↔ agent,
//! CLI → controller) speaks the same framing ([`frame`]) and the same messages ([`messages`]).
//! See `PROTOCOL.md` next to this file for the byte layout and the receiver state machine.

pub mod auth;
pub mod channel;
pub mod control;
pub mod error;
pub mod estimate;
pub mod frame;
pub mod gate;
mod kind;
pub mod messages;
pub mod models;
#[cfg(feature = "async")]
pub mod munge;
pub mod peer;
pub mod position;
#[cfg(feature = "tls")]
pub mod tls;

pub use channel::{ChannelConfig, Negotiated};
pub use error::{ErrorCode, ErrorReply, ProtoError, VersionRange};
pub use estimate::DowntimeModel;
/// The incremental frame decoder, part of the framing layer.
pub use frame::codec;
pub use frame::{FrameHeader, FrameKind, HEADER_LEN, MAGIC, MAX_FRAME_LEN, PROTOCOL_VERSION};
pub use messages::*;
pub use models::*;
