//! Length-prefixed JSON frames.
//!
//! A frame is a 4-byte big-endian payload length followed by that many bytes of JSON. JSON keeps
//! the handshake readable in a packet capture and lets a newer peer add optional fields without a
//! version bump; the length prefix lets a reader refuse an oversized frame from its header alone,
//! before it allocates anything.

use serde::{de::DeserializeOwned, Serialize};

/// Size of the length prefix in front of every frame.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest payload either side accepts. A hello with many services stays far below this; anything
/// larger is an attack or a bug, and is refused before a byte of it is buffered.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announced more bytes than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// The limit that was exceeded.
        max: usize,
    },
    /// A zero-length frame carries no message and is never sent by a correct peer.
    #[error("empty frame")]
    Empty,
    /// The payload is not the JSON message the reader expected.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Serializes `msg` into one frame, header included.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; FRAME_HEADER_LEN];
    serde_json::to_writer(&mut out, msg)?;
    let len = out.len() - FRAME_HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // The length fits in u32 because it is at most MAX_FRAME_LEN.
    out[..FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads the payload length from a frame header, refusing empty and oversized frames.
fn payload_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    match len {
        0 => Err(FrameError::Empty),
        len if len > MAX_FRAME_LEN => Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        }),
        len => Ok(len),
    }
}

/// Parses one frame payload (without its header) as a `T`.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(payload)?)
}

/// Incremental frame splitter for byte streams that arrive in arbitrary pieces.
///
/// It never holds more than one header plus [`MAX_FRAME_LEN`] bytes of a pending frame: an
/// oversized length is an error as soon as its header is complete.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. Returns how many were taken: it stops taking once a whole frame
    /// is buffered, so the caller keeps the rest for after [`FrameDecoder::next_frame`].
    pub fn push(&mut self, data: &[u8]) -> Result<usize, FrameError> {
        let mut taken = 0;
        if self.buf.len() < FRAME_HEADER_LEN {
            let want = (FRAME_HEADER_LEN - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..want]);
            taken = want;
        }
        if let Some(total) = self.frame_total()? {
            let want = total.saturating_sub(self.buf.len()).min(data.len() - taken);
            self.buf.extend_from_slice(&data[taken..taken + want]);
            taken += want;
        }
        Ok(taken)
    }

    /// How many more bytes complete the pending frame: the rest of the header, then the rest of
    /// the payload. A reader that must not consume bytes past the frame (raw bytes follow it on
    /// the same stream) reads exactly this many before it pushes again.
    pub fn wanted(&self) -> Result<usize, FrameError> {
        Ok(match self.frame_total()? {
            None => FRAME_HEADER_LEN - self.buf.len(),
            Some(total) => total - self.buf.len(),
        })
    }

    /// Bytes held right now; never more than one header plus [`MAX_FRAME_LEN`].
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Takes the payload of the buffered frame once it is complete.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        match self.frame_total()? {
            Some(total) if self.buf.len() == total => {
                let payload = self.buf.split_off(FRAME_HEADER_LEN);
                self.buf.clear();
                Ok(Some(payload))
            }
            _ => Ok(None),
        }
    }

    /// Header plus payload length of the pending frame, once its header is complete.
    fn frame_total(&self) -> Result<Option<usize>, FrameError> {
        let Some(header) = self.buf.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        Ok(Some(FRAME_HEADER_LEN + payload_len(*header)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Control;
    use proptest::prelude::*;

    #[test]
    fn oversize_header_is_refused_before_payload_arrives() {
        let mut dec = FrameDecoder::new();
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            dec.push(&header),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn wanted_asks_for_the_header_then_exactly_the_payload() {
        let wire = encode(&Control::Ping { seq: 7 }).unwrap();
        let mut dec = FrameDecoder::new();
        assert_eq!(dec.wanted().unwrap(), FRAME_HEADER_LEN);
        assert_eq!(dec.push(&wire[..1]).unwrap(), 1);
        assert_eq!(dec.wanted().unwrap(), FRAME_HEADER_LEN - 1);
        assert_eq!(dec.push(&wire[1..FRAME_HEADER_LEN]).unwrap(), 3);
        assert_eq!(dec.wanted().unwrap(), wire.len() - FRAME_HEADER_LEN);
        assert_eq!(dec.push(&wire[FRAME_HEADER_LEN..]).unwrap(), wire.len() - 4);
        let payload = dec.next_frame().unwrap().unwrap();
        assert_eq!(
            decode::<Control>(&payload).unwrap(),
            Control::Ping { seq: 7 }
        );
        assert_eq!(
            dec.wanted().unwrap(),
            FRAME_HEADER_LEN,
            "ready for the next frame"
        );
        let mut oversized = FrameDecoder::new();
        let _ = oversized.push(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes());
        assert!(oversized.wanted().is_err());
    }

    #[test]
    fn empty_frame_is_refused() {
        assert!(matches!(payload_len([0; 4]), Err(FrameError::Empty)));
    }

    #[test]
    fn encode_refuses_oversized_message() {
        let big = "x".repeat(MAX_FRAME_LEN);
        assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
    }

    proptest! {
        /// However the bytes of several frames are cut, the decoder yields exactly those frames.
        #[test]
        fn frames_survive_arbitrary_splits(
            seqs in proptest::collection::vec(any::<u64>(), 1..8),
            cuts in proptest::collection::vec(1usize..40, 1..64),
        ) {
            let msgs: Vec<Control> = seqs.iter().map(|&seq| Control::Ping { seq }).collect();
            let wire: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            let mut rest: &[u8] = &wire;
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let n = (*cut.next().unwrap()).min(rest.len());
                let mut piece = &rest[..n];
                while !piece.is_empty() {
                    let taken = dec.push(piece).unwrap();
                    piece = &piece[taken..];
                    if let Some(p) = dec.next_frame().unwrap() {
                        got.push(decode::<Control>(&p).unwrap());
                    }
                }
                rest = &rest[n..];
            }
            prop_assert_eq!(got, msgs);
        }

        /// Whatever the headers announce (empty, up to exactly the limit, one byte past it or
        /// anything) and however the bytes are cut, the decoder yields the frames a plain
        /// reading of the stream finds, refuses the first bad header as such, and never
        /// buffers more than one header plus the limit.
        #[test]
        fn arbitrary_streams_up_to_the_limit_are_handled(
            segments in proptest::collection::vec(segment(), 1..4),
            cuts in proptest::collection::vec(1usize..(3 * MAX_FRAME_LEN / 2), 1..8),
        ) {
            let wire: Vec<u8> = segments.iter().flatten().copied().collect();
            let (want_frames, want_error) = model(&wire);
            let mut dec = FrameDecoder::new();
            let (mut got, mut error) = (Vec::new(), None);
            let mut rest: &[u8] = &wire;
            let mut cut = cuts.iter().cycle();
            'feed: while !rest.is_empty() {
                let n = (*cut.next().unwrap()).min(rest.len());
                let mut piece = &rest[..n];
                rest = &rest[n..];
                while !piece.is_empty() {
                    let taken = match dec.push(piece) {
                        Ok(taken) => taken,
                        Err(e) => {
                            error = Some(e);
                            break 'feed;
                        }
                    };
                    piece = &piece[taken..];
                    prop_assert!(dec.buffered_len() <= FRAME_HEADER_LEN + MAX_FRAME_LEN);
                    if let Some(p) = dec.next_frame().unwrap() {
                        got.push(p);
                    }
                }
            }
            prop_assert_eq!(got.len(), want_frames.len());
            prop_assert!(got.iter().zip(&want_frames).all(|(g, w)| g == w));
            match (error, want_error) {
                (None, None) => {}
                (Some(FrameError::Empty), Some(0)) => {}
                (Some(FrameError::TooLarge { len, .. }), Some(want)) => prop_assert_eq!(len, want),
                (got, want) => prop_assert!(false, "decoder said {:?}, expected a bad header of {:?}", got, want),
            }
        }
    }

    /// One header and a body, apart or together: the announced length is often exactly the
    /// limit, one byte under or over it, or zero, and the body as long as announced or not.
    fn segment() -> impl Strategy<Value = Vec<u8>> {
        let max = MAX_FRAME_LEN as u32;
        let announced = prop_oneof![
            3 => Just(max),
            1 => Just(max - 1),
            2 => Just(max + 1),
            1 => Just(0u32),
            2 => 1..=max,
            1 => any::<u32>(),
        ];
        let body = prop_oneof![
            Just(None),                            // exactly as announced
            (0..MAX_FRAME_LEN + 8).prop_map(Some), // anything up to past the limit
        ];
        (announced, body, any::<u8>()).prop_map(|(announced, body, fill)| {
            let len = body.unwrap_or((announced as usize).min(MAX_FRAME_LEN + 8));
            let mut out = announced.to_be_bytes().to_vec();
            out.extend((0..len).map(|i| fill.wrapping_add(i as u8)));
            out
        })
    }

    /// A plain reading of `wire`: its complete frames' payloads, and the announced length of
    /// the first header that is empty or over the limit, if one is reached.
    fn model(wire: &[u8]) -> (Vec<Vec<u8>>, Option<usize>) {
        let mut frames = Vec::new();
        let mut rest = wire;
        while let Some(header) = rest.first_chunk::<FRAME_HEADER_LEN>() {
            let len = u32::from_be_bytes(*header) as usize;
            if len == 0 || len > MAX_FRAME_LEN {
                return (frames, Some(len));
            }
            let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
                break;
            };
            frames.push(payload.to_vec());
            rest = &rest[FRAME_HEADER_LEN + len..];
        }
        (frames, None)
    }
}
