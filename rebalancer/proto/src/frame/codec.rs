//! Sans-io frame decoder shared by the blocking and async readers and by [`crate::channel`].
//!
//! The decoder never reads past the frame it is decoding (callers read at most
//! [`Decoder::read_buf`]'s length), so a stream can change hands between frames. The header's
//! length is checked against the limit before anything is allocated, and the payload buffer
//! grows in bounded steps as bytes actually arrive: a peer announcing 16 MiB and sending
//! nothing costs nothing.

use std::io::Read;

use super::{Frame, FrameHeader, HEADER_LEN};
use crate::error::ProtoError;

/// Largest single read into a payload: bounds the memory a slow peer can make us commit.
pub const DEFAULT_CHUNK: usize = 64 * 1024;

#[derive(Debug)]
enum State {
    Header {
        buf: [u8; HEADER_LEN],
        filled: usize,
    },
    Payload {
        header: FrameHeader,
        buf: Vec<u8>,
        filled: usize,
    },
}

/// Decodes one frame at a time from bytes handed to it.
#[derive(Debug)]
pub struct Decoder {
    max: u32,
    chunk: usize,
    state: State,
}

impl Decoder {
    /// A decoder accepting payloads of at most `max` bytes.
    pub fn new(max: u32) -> Self {
        Self::with_chunk(max, DEFAULT_CHUNK)
    }

    /// As [`Decoder::new`], growing the payload buffer by at most `chunk` bytes per read.
    pub fn with_chunk(max: u32, chunk: usize) -> Self {
        Decoder {
            max,
            chunk: chunk.max(1),
            state: State::Header {
                buf: [0; HEADER_LEN],
                filled: 0,
            },
        }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// True between frames (no byte of the next frame received yet).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header { filled: 0, .. })
    }

    /// Where the next read goes; never empty, never past the end of the current frame.
    pub fn read_buf(&mut self) -> &mut [u8] {
        let chunk = self.chunk;
        match &mut self.state {
            State::Header { buf, filled } => &mut buf[*filled..],
            State::Payload {
                header,
                buf,
                filled,
            } => {
                let total = header.len as usize;
                if *filled == buf.len() {
                    let add = chunk.min(total - *filled);
                    let want = *filled + add;
                    if buf.capacity() < want {
                        // Double as data arrives, but never past the announced length.
                        let target = (buf.capacity() * 2).max(want).min(total);
                        buf.reserve_exact(target - buf.len());
                    }
                    buf.resize(want, 0);
                }
                &mut buf[*filled..]
            }
        }
    }

    /// Records that `n` bytes were written into [`Decoder::read_buf`]; returns the frame once
    /// complete. A framing error resets the decoder, but the stream should then be closed.
    pub fn advance(&mut self, n: usize) -> Result<Option<Frame>, ProtoError> {
        match &mut self.state {
            State::Header { buf, filled } => {
                *filled = (*filled + n).min(HEADER_LEN);
                if *filled < HEADER_LEN {
                    return Ok(None);
                }
                let raw = *buf;
                self.reset();
                let header = FrameHeader::decode(&raw, self.max)?;
                if header.len == 0 {
                    return Ok(Some(Frame {
                        header,
                        payload: Vec::new(),
                    }));
                }
                self.state = State::Payload {
                    header,
                    buf: Vec::new(),
                    filled: 0,
                };
                Ok(None)
            }
            State::Payload {
                header,
                buf,
                filled,
            } => {
                *filled = (*filled + n).min(buf.len());
                if *filled < header.len as usize {
                    return Ok(None);
                }
                let frame = Frame {
                    header: *header,
                    payload: std::mem::take(buf),
                };
                self.reset();
                Ok(Some(frame))
            }
        }
    }

    /// Feeds bytes from a buffer; consumes at most up to the end of one frame and returns how
    /// many bytes it took.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(usize, Option<Frame>), ProtoError> {
        let mut used = 0;
        while !input.is_empty() {
            let dst = self.read_buf();
            let n = dst.len().min(input.len());
            dst[..n].copy_from_slice(&input[..n]);
            input = &input[n..];
            used += n;
            if let Some(f) = self.advance(n)? {
                return Ok((used, Some(f)));
            }
        }
        Ok((used, None))
    }

    /// The error for an end of stream now: clean between frames, truncated inside one.
    pub fn eof(&self) -> ProtoError {
        if self.is_idle() {
            ProtoError::Closed
        } else {
            ProtoError::Truncated
        }
    }

    /// Bytes reserved for the payload being received (for tests and metrics).
    pub fn allocated(&self) -> usize {
        match &self.state {
            State::Header { .. } => 0,
            State::Payload { buf, .. } => buf.capacity(),
        }
    }

    fn reset(&mut self) {
        self.state = State::Header {
            buf: [0; HEADER_LEN],
            filled: 0,
        };
    }
}

/// Reads one frame from a blocking reader. Read timeouts of the underlying socket surface as
/// `ProtoError::Io` with kind `WouldBlock`/`TimedOut`; the decoder keeps its partial frame.
pub fn read_blocking<R: Read + ?Sized>(d: &mut Decoder, r: &mut R) -> Result<Frame, ProtoError> {
    loop {
        if let Some(f) = read_once(d, r)? {
            return Ok(f);
        }
    }
}

/// One `read` call into the decoder: the frame if it completed. Lets a caller check its own
/// deadline between reads.
pub fn read_once<R: Read + ?Sized>(
    d: &mut Decoder,
    r: &mut R,
) -> Result<Option<Frame>, ProtoError> {
    match r.read(d.read_buf()) {
        Ok(0) => Err(d.eof()),
        Ok(n) => d.advance(n),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads one frame from an async reader. Cancel-safe: dropping the future between reads
/// loses no byte, the decoder keeps the partial frame.
#[cfg(feature = "async")]
pub async fn read_async<R: tokio::io::AsyncRead + Unpin + ?Sized>(
    d: &mut Decoder,
    r: &mut R,
) -> Result<Frame, ProtoError> {
    use tokio::io::AsyncReadExt;
    loop {
        let n = match r.read(d.read_buf()).await {
            Ok(0) => return Err(d.eof()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(f) = d.advance(n)? {
            return Ok(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FrameKind, MAX_FRAME_LEN};
    use super::*;
    use proptest::prelude::*;

    fn data_frame(len: usize) -> Frame {
        Frame::data(9, (0..len).map(|i| i as u8).collect()).expect("frame")
    }

    #[test]
    fn oversized_header_rejected_before_allocation() {
        let mut d = Decoder::new(1024);
        let h = FrameHeader {
            kind: FrameKind::Data,
            len: 1_000_000,
            id: 1,
        };
        let err = d.feed(&h.encode()).expect_err("too large");
        assert!(matches!(
            err,
            ProtoError::TooLarge {
                len: 1_000_000,
                max: 1024
            }
        ));
        assert_eq!(d.allocated(), 0);
    }

    #[test]
    fn announced_length_is_not_allocated_up_front() {
        let mut d = Decoder::with_chunk(MAX_FRAME_LEN, 4096);
        let h = FrameHeader {
            kind: FrameKind::Data,
            len: MAX_FRAME_LEN,
            id: 1,
        };
        assert!(d.feed(&h.encode()).expect("header").1.is_none());
        // Ten bytes arrive: the buffer holds one chunk, not 16 MiB.
        assert!(d.feed(&[7; 10]).expect("bytes").1.is_none());
        assert!(d.allocated() <= 4096, "allocated {}", d.allocated());
        assert!(matches!(d.eof(), ProtoError::Truncated));
    }

    #[test]
    fn byte_by_byte_payload_is_reassembled() {
        let f = data_frame(300);
        let bytes = f.to_bytes();
        let mut d = Decoder::with_chunk(MAX_FRAME_LEN, 7);
        let mut out = None;
        for b in &bytes {
            let (used, got) = d.feed(std::slice::from_ref(b)).expect("feed");
            assert_eq!(used, 1);
            if got.is_some() {
                out = got;
            }
        }
        assert_eq!(out, Some(f));
        assert!(d.is_idle());
    }

    #[test]
    fn feed_stops_at_the_frame_boundary() {
        let a = data_frame(5);
        let b = Frame::json(FrameKind::Request, 2, &"x").expect("frame");
        let mut bytes = a.to_bytes();
        bytes.extend(b.to_bytes());
        let mut d = Decoder::new(MAX_FRAME_LEN);
        let (used, got) = d.feed(&bytes).expect("first");
        assert_eq!(used, HEADER_LEN + 5);
        assert_eq!(got, Some(a));
        let (_, got) = d.feed(&bytes[used..]).expect("second");
        assert_eq!(got, Some(b));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_nor_overallocate(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            max in 0u32..2048,
            chunk in 1usize..512,
        ) {
            let mut d = Decoder::with_chunk(max, chunk);
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                match d.feed(rest) {
                    Ok((used, frame)) => {
                        prop_assert!(used > 0);
                        if let Some(f) = frame {
                            prop_assert!(f.payload.len() <= max as usize);
                            prop_assert_eq!(f.payload.len(), f.header.len as usize);
                        }
                        rest = &rest[used..];
                    }
                    Err(_) => break,
                }
                prop_assert!(d.allocated() <= max as usize);
            }
        }

        #[test]
        fn round_trip_in_arbitrary_pieces(
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
            id in any::<u32>(),
            cuts in proptest::collection::vec(1usize..700, 1..20),
        ) {
            let f = Frame::data(id, payload).expect("frame");
            let bytes = f.to_bytes();
            let mut d = Decoder::with_chunk(MAX_FRAME_LEN, 256);
            let mut pos = 0;
            let mut got = None;
            for c in cuts.iter().cycle() {
                if pos >= bytes.len() { break; }
                let end = (pos + c).min(bytes.len());
                let (used, frame) = d.feed(&bytes[pos..end]).expect("valid bytes");
                pos += used;
                if frame.is_some() { got = frame; break; }
            }
            prop_assert_eq!(pos, bytes.len());
            prop_assert_eq!(got, Some(f));
        }

        #[test]
        fn header_round_trip(kind in 1u16..=5, len in 0u32..=MAX_FRAME_LEN, id in any::<u32>()) {
            let h = FrameHeader { kind: FrameKind::try_from(kind).expect("kind"), len, id };
            prop_assert_eq!(FrameHeader::decode(&h.encode(), MAX_FRAME_LEN).expect("decode"), h);
        }
    }
}
