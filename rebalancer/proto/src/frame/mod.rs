//! Length-prefixed, versioned framing.
//!
//! ```text
//!  0        4        6        8           12          16
//!  +--------+--------+--------+-----------+-----------+----------------+
//!  | magic  | version| kind   | length    | request id| payload ...    |
//!  | "SRBL" | u16 BE | u16 BE | u32 BE    | u32 BE    | `length` bytes |
//!  +--------+--------+--------+-----------+-----------+----------------+
//! ```
//! The length is checked against the receiver's limit before any allocation.

pub mod codec;

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Serialize};

use crate::error::ProtoError;

/// "SRBL" in big-endian.
pub const MAGIC: u32 = 0x5352_424c;
/// Version of the *framing* (this header layout), carried in every header and matched exactly.
/// The message set is versioned separately and negotiated in the `Hello`
/// ([`crate::MESSAGE_VERSIONS`]).
pub const PROTOCOL_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
/// Default upper bound for one frame's payload (control messages and image chunks).
pub const MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;

pub use crate::kind::FrameKind;

impl TryFrom<u16> for FrameKind {
    type Error = ProtoError;
    fn try_from(v: u16) -> Result<Self, ProtoError> {
        FrameKind::from_wire(v).ok_or(ProtoError::BadKind(v))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub len: u32,
    pub id: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_be_bytes());
        b[8..12].copy_from_slice(&self.len.to_be_bytes());
        b[12..16].copy_from_slice(&self.id.to_be_bytes());
        b
    }

    /// Decodes and validates a header; `max` bounds the payload the caller is willing to read.
    pub fn decode(b: &[u8; HEADER_LEN], max: u32) -> Result<Self, ProtoError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let version = u16::from_be_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::Version {
                got: version,
                want: PROTOCOL_VERSION,
            });
        }
        let kind = FrameKind::try_from(u16::from_be_bytes([b[6], b[7]]))?;
        let len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        if len > max {
            return Err(ProtoError::TooLarge { len, max });
        }
        let id = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        Ok(FrameHeader { kind, len, id })
    }
}

/// One received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Builds a JSON frame.
    pub fn json<T: Serialize>(kind: FrameKind, id: u32, msg: &T) -> Result<Self, ProtoError> {
        let payload = serde_json::to_vec(msg).map_err(|source| ProtoError::Payload {
            what: "outgoing",
            source,
        })?;
        let len = u32::try_from(payload.len()).map_err(|_| ProtoError::TooLarge {
            len: u32::MAX,
            max: MAX_FRAME_LEN,
        })?;
        if len > MAX_FRAME_LEN {
            return Err(ProtoError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        Ok(Frame {
            header: FrameHeader { kind, len, id },
            payload,
        })
    }

    pub fn data(id: u32, bytes: Vec<u8>) -> Result<Self, ProtoError> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME_LEN)
            .ok_or(ProtoError::TooLarge {
                len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
                max: MAX_FRAME_LEN,
            })?;
        Ok(Frame {
            header: FrameHeader {
                kind: FrameKind::Data,
                len,
                id,
            },
            payload: bytes,
        })
    }

    /// Decodes the JSON payload, checking the frame kind first.
    pub fn decode<T: DeserializeOwned>(
        &self,
        expected: FrameKind,
        what: &'static str,
    ) -> Result<T, ProtoError> {
        if self.header.kind != expected {
            return Err(ProtoError::Unexpected {
                expected: what,
                got: self.header.kind,
            });
        }
        serde_json::from_slice(&self.payload).map_err(|source| ProtoError::Payload { what, source })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Blocking write, for the SPANK plugin and simple clients.
pub fn write_frame<W: Write>(w: &mut W, frame: &Frame) -> Result<(), ProtoError> {
    w.write_all(&frame.header.encode())?;
    w.write_all(&frame.payload)?;
    w.flush()?;
    Ok(())
}

/// Blocking read; `max` bounds the payload before anything is allocated, and the payload
/// buffer grows only as bytes arrive (see [`codec::Decoder`]).
pub fn read_frame<R: Read>(r: &mut R, max: u32) -> Result<Frame, ProtoError> {
    codec::read_blocking(&mut codec::Decoder::new(max), r)
}

#[cfg(feature = "async")]
mod nonblocking {
    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

    use super::*;

    pub async fn write_frame_async<W: AsyncWrite + Unpin>(
        w: &mut W,
        frame: &Frame,
    ) -> Result<(), ProtoError> {
        w.write_all(&frame.header.encode()).await?;
        w.write_all(&frame.payload).await?;
        w.flush().await?;
        Ok(())
    }

    /// Async read with the same limits as [`super::read_frame`].
    pub async fn read_frame_async<R: AsyncRead + Unpin>(
        r: &mut R,
        max: u32,
    ) -> Result<Frame, ProtoError> {
        codec::read_async(&mut codec::Decoder::new(max), r).await
    }
}

#[cfg(feature = "async")]
pub use nonblocking::{read_frame_async, write_frame_async};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = FrameHeader {
            kind: FrameKind::Request,
            len: 42,
            id: 7,
        };
        let back = FrameHeader::decode(&h.encode(), MAX_FRAME_LEN).expect("valid header");
        assert_eq!(back, h);
    }

    #[test]
    fn rejects_oversized_length_before_allocating() {
        let h = FrameHeader {
            kind: FrameKind::Data,
            len: 1024,
            id: 0,
        };
        let err = FrameHeader::decode(&h.encode(), 512).expect_err("too large");
        assert!(matches!(
            err,
            ProtoError::TooLarge {
                len: 1024,
                max: 512
            }
        ));
    }

    #[test]
    fn rejects_garbage_and_zero_kind() {
        let garbage = *b"GET / HTTP/1.1\r\n";
        assert!(matches!(
            FrameHeader::decode(&garbage, MAX_FRAME_LEN),
            Err(ProtoError::BadMagic(_))
        ));
        let mut zero_kind = FrameHeader {
            kind: FrameKind::Hello,
            len: 0,
            id: 0,
        }
        .encode();
        zero_kind[6] = 0;
        zero_kind[7] = 0;
        assert!(matches!(
            FrameHeader::decode(&zero_kind, MAX_FRAME_LEN),
            Err(ProtoError::BadKind(0))
        ));
    }

    #[test]
    fn rejects_other_versions() {
        let mut b = FrameHeader {
            kind: FrameKind::Hello,
            len: 0,
            id: 0,
        }
        .encode();
        b[5] = 99;
        assert!(matches!(
            FrameHeader::decode(&b, MAX_FRAME_LEN),
            Err(ProtoError::Version { got: 99, .. })
        ));
    }

    #[test]
    fn blocking_round_trip_and_truncation() {
        let f = Frame::json(FrameKind::Request, 3, &serde_json::json!({"a": 1})).expect("encode");
        let bytes = f.to_bytes();
        let back = read_frame(&mut &bytes[..], MAX_FRAME_LEN).expect("decode");
        assert_eq!(back, f);
        let truncated = &bytes[..bytes.len() - 1];
        assert!(read_frame(&mut &truncated[..], MAX_FRAME_LEN).is_err());
        assert!(matches!(
            read_frame(&mut &[][..], MAX_FRAME_LEN),
            Err(ProtoError::Closed)
        ));
    }

    #[test]
    fn decode_checks_kind() {
        let f = Frame::json(FrameKind::Event, 0, &1u32).expect("encode");
        assert!(matches!(
            f.decode::<u32>(FrameKind::Response, "response"),
            Err(ProtoError::Unexpected { .. })
        ));
        assert_eq!(f.decode::<u32>(FrameKind::Event, "event").expect("ok"), 1);
    }
}
