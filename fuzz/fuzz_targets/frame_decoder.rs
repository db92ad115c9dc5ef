//! Arbitrary bytes, cut into arbitrary pieces, through the frame decoder and every message type:
//! no panic, never more buffered than one maximal frame, and whatever decodes re-encodes to the
//! same value.
#![no_main]

use jumpgate_proto::frame::{FrameDecoder, FRAME_HEADER_LEN, MAX_FRAME_LEN};
use jumpgate_proto::{decode, encode, AgentHello, Control, RelayHello, StreamOpen, StreamReply, VersionProbe};
use libfuzzer_sys::fuzz_target;

fn roundtrip<T>(payload: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = decode::<T>(payload) {
        if let Ok(wire) = encode(&msg) {
            let again: T = decode(&wire[FRAME_HEADER_LEN..]).expect("re-encoded message must decode");
            assert_eq!(again, msg);
        }
    }
}

/// The frames a reader that never reads past a frame gets (the relay's and the agent's
/// `read_payload`): exactly `wanted()` bytes at a time.
fn exact_reads(mut input: &[u8]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut dec = FrameDecoder::new();
    loop {
        match dec.next_frame() {
            Ok(Some(payload)) => frames.push(payload),
            Ok(None) => {}
            Err(_) => return frames,
        }
        let Ok(wanted) = dec.wanted() else { return frames };
        assert!(wanted > 0, "an incomplete frame always wants more");
        if input.len() < wanted {
            return frames;
        }
        let (piece, rest) = input.split_at(wanted);
        match dec.push(piece) {
            Ok(taken) => assert_eq!(taken, wanted, "exactly what was wanted is taken"),
            Err(_) => return frames,
        }
        input = rest;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, mut rest)) = data.split_first() else { return };
    let exact = exact_reads(rest);
    let mut chunked = Vec::new();
    let cut = usize::from(cut_seed % 64) + 1;
    let mut dec = FrameDecoder::new();
    'feed: while !rest.is_empty() {
        let n = cut.min(rest.len());
        let mut piece = &rest[..n];
        rest = &rest[n..];
        while !piece.is_empty() {
            let Ok(taken) = dec.push(piece) else { break 'feed };
            assert!(dec.buffered_len() <= FRAME_HEADER_LEN + MAX_FRAME_LEN);
            piece = &piece[taken..];
            match dec.next_frame() {
                Ok(Some(payload)) => {
                    chunked.push(payload.clone());
                    roundtrip::<VersionProbe>(&payload);
                    roundtrip::<AgentHello>(&payload);
                    roundtrip::<RelayHello>(&payload);
                    roundtrip::<Control>(&payload);
                    roundtrip::<StreamOpen>(&payload);
                    roundtrip::<StreamReply>(&payload);
                }
                Ok(None) if taken == 0 => break 'feed,
                Ok(None) => {}
                Err(_) => break 'feed,
            }
        }
    }
    // However the bytes arrive, the same frames come out, up to where either reader stopped.
    let common = exact.len().min(chunked.len());
    assert_eq!(exact[..common], chunked[..common]);
});
