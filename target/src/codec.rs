//! PDU framing on a byte stream: BHS, AHS, header digest, data segment,
//! padding to 4 bytes, data digest (RFC 7143 sections 11.2 and 13.1).
//!
//! Digests are CRC32C, sent least significant byte first (the RFC 7143
//! appendix test vectors). They start after the login completes; the
//! connection flips them on with [`PduCodec::set_digests`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::pdu::{Pdu, BHS_LEN};

/// Framing errors. Any of them ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("header digest mismatch (got {got:#010x}, computed {want:#010x})")]
    HeaderDigest { got: u32, want: u32 },
}

/// What the decoder yields.
#[derive(Debug)]
pub enum Inbound {
    Pdu(Pdu),
    /// The header was fine but the data digest did not match: the PDU must
    /// be rejected (reason 0x02) and its data discarded.
    DataDigestError(Pdu),
    /// The header declares a data segment beyond the limit. Only the BHS
    /// was consumed (no data): the stream cannot be resynchronised, so the
    /// connection must Reject it (protocol error) and close.
    Oversized(Pdu),
}

/// Encoder/decoder for PDUs.
#[derive(Debug, Clone)]
pub struct PduCodec {
    header_digest: bool,
    data_digest: bool,
    max_data: usize,
}

impl PduCodec {
    /// `max_data` bounds the data segment the decoder accepts (memory guard;
    /// the connection checks the negotiated MaxRecvDataSegmentLength itself).
    pub fn new(max_data: usize) -> Self {
        PduCodec {
            header_digest: false,
            data_digest: false,
            max_data,
        }
    }

    /// Change the largest data segment accepted.
    pub fn set_max_data(&mut self, max_data: usize) {
        self.max_data = max_data;
    }

    pub fn set_digests(&mut self, header: bool, data: bool) {
        self.header_digest = header;
        self.data_digest = data;
    }

    fn pad(n: usize) -> usize {
        (4 - n % 4) % 4
    }
}

fn digest_of(parts: &[&[u8]]) -> u32 {
    parts
        .iter()
        .fold(0u32, |crc, p| crc32c::crc32c_append(crc, p))
}

fn read_le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl Decoder for PduCodec {
    type Item = Inbound;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, CodecError> {
        if src.len() < BHS_LEN {
            src.reserve(BHS_LEN);
            return Ok(None);
        }
        let ahs_len = src[4] as usize * 4;
        let data_len = ((src[5] as usize) << 16) | ((src[6] as usize) << 8) | src[7] as usize;
        if data_len > self.max_data {
            let mut bhs = [0u8; BHS_LEN];
            bhs.copy_from_slice(&src[..BHS_LEN]);
            src.advance(BHS_LEN);
            return Ok(Some(Inbound::Oversized(Pdu {
                bhs,
                ahs: Bytes::new(),
                data: Bytes::new(),
            })));
        }
        let hd = if self.header_digest { 4 } else { 0 };
        let dd = if self.data_digest && data_len > 0 {
            4
        } else {
            0
        };
        let padded = data_len + Self::pad(data_len);
        let total = BHS_LEN + ahs_len + hd + padded + dd;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total);
        if hd == 4 {
            let got = read_le32(&frame[BHS_LEN + ahs_len..]);
            let want = digest_of(&[&frame[..BHS_LEN + ahs_len]]);
            if got != want {
                return Err(CodecError::HeaderDigest { got, want });
            }
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&frame[..BHS_LEN]);
        frame.advance(BHS_LEN);
        let ahs = frame.split_to(ahs_len).freeze();
        frame.advance(hd);
        let mut data_bad = false;
        if dd == 4 {
            let got = read_le32(&frame[padded..]);
            let want = digest_of(&[&frame[..padded]]);
            data_bad = got != want;
        }
        let data = frame.split_to(data_len).freeze();
        let pdu = Pdu { bhs, ahs, data };
        Ok(Some(if data_bad {
            Inbound::DataDigestError(pdu)
        } else {
            Inbound::Pdu(pdu)
        }))
    }
}

impl Encoder<Pdu> for PduCodec {
    type Error = CodecError;

    fn encode(&mut self, mut pdu: Pdu, dst: &mut BytesMut) -> Result<(), CodecError> {
        pdu.fix_lengths();
        encode_parts(
            self.header_digest,
            self.data_digest,
            &pdu.bhs,
            &pdu.ahs,
            &pdu.data,
            dst,
        );
        Ok(())
    }
}

/// Append one PDU's wire form to `dst` (header fields must already be final).
pub fn encode_parts(
    header_digest: bool,
    data_digest: bool,
    bhs: &[u8; BHS_LEN],
    ahs: &[u8],
    data: &[u8],
    dst: &mut BytesMut,
) {
    let pad = PduCodec::pad(data.len());
    dst.reserve(BHS_LEN + ahs.len() + 8 + data.len() + pad);
    dst.put_slice(bhs);
    dst.put_slice(ahs);
    if header_digest {
        dst.put_u32_le(digest_of(&[bhs, ahs]));
    }
    if !data.is_empty() {
        dst.put_slice(data);
        let zeros = [0u8; 3];
        dst.put_slice(&zeros[..pad]);
        if data_digest {
            dst.put_u32_le(digest_of(&[data, &zeros[..pad]]));
        }
    }
}

/// Convenience for tests and tools: encode one PDU into fresh bytes.
pub fn to_bytes(codec: &mut PduCodec, pdu: Pdu) -> Bytes {
    let mut b = BytesMut::new();
    // Encoding cannot fail: it only appends to memory.
    let _ = codec.encode(pdu, &mut b);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::op;

    #[test]
    fn crc32c_matches_rfc_vector() {
        // RFC 7143 appendix: 32 bytes of zeros -> aa 36 91 8a on the wire.
        let c = digest_of(&[&[0u8; 32]]);
        assert_eq!(c.to_le_bytes(), [0xaa, 0x36, 0x91, 0x8a]);
    }

    fn round_trip(hd: bool, dd: bool) {
        let mut codec = PduCodec::new(1 << 20);
        codec.set_digests(hd, dd);
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.set_itt(7);
        p.data = Bytes::from_static(b"hello");
        let wire = to_bytes(&mut codec, p.clone());
        assert_eq!(
            wire.len(),
            48 + 8 + if hd { 4 } else { 0 } + if dd { 4 } else { 0 }
        );
        // Feed it byte by byte to exercise partial frames.
        let mut buf = BytesMut::new();
        let mut out = None;
        for b in wire.iter() {
            buf.put_u8(*b);
            if let Some(x) = codec.decode(&mut buf).unwrap() {
                out = Some(x);
            }
        }
        match out {
            Some(Inbound::Pdu(q)) => {
                assert_eq!(q.itt(), 7);
                assert_eq!(&q.data[..], b"hello");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn round_trips_with_and_without_digests() {
        round_trip(false, false);
        round_trip(true, false);
        round_trip(false, true);
        round_trip(true, true);
    }

    #[test]
    fn bad_header_digest_is_an_error() {
        let mut codec = PduCodec::new(1 << 20);
        codec.set_digests(true, false);
        let mut wire = BytesMut::from(&to_bytes(&mut codec, Pdu::new(op::NOP_OUT))[..]);
        wire[20] ^= 1;
        assert!(matches!(
            codec.decode(&mut wire),
            Err(CodecError::HeaderDigest { .. })
        ));
    }

    #[test]
    fn bad_data_digest_is_reported_not_fatal() {
        let mut codec = PduCodec::new(1 << 20);
        codec.set_digests(false, true);
        let mut p = Pdu::new(op::NOP_OUT);
        p.data = Bytes::from_static(b"abcd");
        let mut wire = BytesMut::from(&to_bytes(&mut codec, p)[..]);
        wire[49] ^= 1;
        assert!(matches!(
            codec.decode(&mut wire),
            Ok(Some(Inbound::DataDigestError(_)))
        ));
    }

    #[test]
    fn oversized_data_segment_is_refused() {
        let mut codec = PduCodec::new(1024);
        let mut p = Pdu::new(op::NOP_OUT);
        p.data = Bytes::from(vec![0u8; 2048]);
        let mut wire = BytesMut::from(&to_bytes(&mut PduCodec::new(1 << 20), p)[..]);
        match codec.decode(&mut wire) {
            Ok(Some(Inbound::Oversized(p))) => assert_eq!(p.data_segment_len(), 2048),
            other => panic!("unexpected {other:?}"),
        }
    }
}
