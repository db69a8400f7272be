//! The frame kind enum: a leaf module so that both [`crate::error`] and [`crate::frame`] can use
//! it without depending on each other.

/// What a frame carries. The zero value is invalid so that a zeroed buffer is never accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    Invalid = 0,
    /// JSON [`crate::Hello`]: always the first frame in each direction.
    Hello = 1,
    /// JSON [`crate::Request`] or [`crate::PeerRequest`].
    Request = 2,
    /// JSON [`crate::Response`].
    Response = 3,
    /// JSON [`crate::Event`], pushed by the server (progress of a migration).
    Event = 4,
    /// Raw bytes (a chunk of a CRIU image file), following a request that announced it.
    Data = 5,
}

impl FrameKind {
    /// The kind a wire value names; `None` for 0 (invalid) and unknown values.
    pub fn from_wire(v: u16) -> Option<Self> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::Request,
            3 => FrameKind::Response,
            4 => FrameKind::Event,
            5 => FrameKind::Data,
            _ => return None,
        })
    }
}
