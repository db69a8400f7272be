//! The agent ↔ agent wire types now live in [`rebalancer_proto::peer`]; this re-export keeps the
//! agent's own paths (`crate::peer::PeerRequest`, ...) working. The conversions between the
//! agent's container record and the wire's [`MigratingContainer`] are in [`super::convert`].

pub use rebalancer_proto::peer::{
    ImageFile, MigratingContainer, PeerReply, PeerRequest, PeerResponse, CHUNK, MAX_IMAGE_FILES,
    PEER_MAX_FRAME, PEER_VERSIONS,
};
