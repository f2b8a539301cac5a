//! Fuzz the PDU decoder: arbitrary bytes, with and without digests, must
//! decode to PDUs or a clean error, never a panic, and every decoded PDU
//! must re-encode to a frame that decodes to the same PDU.
#![no_main]

use bytes::BytesMut;
use ironblock_target::codec::{Inbound, PduCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut codec = PduCodec::new(1 << 16);
    codec.set_digests(mode & 1 != 0, mode & 2 != 0);
    let mut buf = BytesMut::from(rest);
    for _ in 0..64 {
        match codec.decode(&mut buf) {
            Ok(Some(Inbound::Pdu(p))) | Ok(Some(Inbound::DataDigestError(p))) => {
                // Touch every accessor the connection layer uses.
                let _ = (p.opcode(), p.immediate(), p.lun(), p.itt(), p.ttt(), p.cmd_sn(), p.edtl());
                let _ = (p.cdb(), p.isid(), p.tsih(), p.cid(), p.buffer_offset(), p.tmf_function());
                let mut out = BytesMut::new();
                let mut enc = codec.clone();
                enc.encode(p.clone(), &mut out).expect("encoding to memory cannot fail");
                match enc.decode(&mut out) {
                    Ok(Some(Inbound::Pdu(q))) => {
                        assert_eq!(q.data, p.data);
                        assert_eq!(q.ahs, p.ahs);
                    }
                    other => panic!("re-encoded PDU did not decode: {other:?}"),
                }
            }
            Ok(Some(Inbound::Oversized(p))) => assert!(p.data_segment_len() > 1 << 16),
            Ok(None) | Err(_) => break,
        }
    }
});
