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

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, mut rest)) = data.split_first() else { return };
    let cut = usize::from(cut_seed % 64) + 1;
    let mut dec = FrameDecoder::new();
    while !rest.is_empty() {
        let n = cut.min(rest.len());
        let mut piece = &rest[..n];
        rest = &rest[n..];
        while !piece.is_empty() {
            let Ok(taken) = dec.push(piece) else { return };
            assert!(dec.buffered_len() <= FRAME_HEADER_LEN + MAX_FRAME_LEN);
            piece = &piece[taken..];
            match dec.next_frame() {
                Ok(Some(payload)) => {
                    roundtrip::<VersionProbe>(&payload);
                    roundtrip::<AgentHello>(&payload);
                    roundtrip::<RelayHello>(&payload);
                    roundtrip::<Control>(&payload);
                    roundtrip::<StreamOpen>(&payload);
                    roundtrip::<StreamReply>(&payload);
                }
                Ok(None) if taken == 0 => return,
                Ok(None) => {}
                Err(_) => return,
            }
        }
    }
});
