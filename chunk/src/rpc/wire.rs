//! The replica transport's framing: what one request or response looks like
//! on the TCP stream. Pure (no I/O), so it is tested and fuzzed on its own.
//!
//! Every frame is a 4-byte big-endian body length followed by the body
//! (`tokio_util`'s `LengthDelimitedCodec` reads them). The body is:
//!
//! ```text
//! request:   id u64 BE | op u8     | prost message (replica.proto Replica*Request)
//! response:  id u64 BE | status u8 | payload
//!              status 0 OK        payload = the Replica*Response message
//!              status 1 REPLICA   payload = ReplicaError (the replica's verdict)
//!              status 2 INVALID   payload = UTF-8 reason (malformed request)
//! ```
//!
//! The first frame each way is a hello: the body [`HELLO`] (version 1), so a
//! connection to anything else (an iSCSI portal, an older chunk) fails at
//! once instead of misreading bytes. Ids are the client's: responses may
//! come in any order.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// The hello both sides send first.
pub const HELLO: &[u8] = b"ironblock-replica/1";

/// Bytes of the id + op/status header of a body.
pub const HEADER_LEN: usize = 9;

/// Status byte of a response.
pub const STATUS_OK: u8 = 0;
pub const STATUS_REPLICA: u8 = 1;
pub const STATUS_INVALID: u8 = 2;

/// The operations (`op` byte of a request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Write = 1,
    Read = 2,
    Flush = 3,
    Unmap = 4,
    Repair = 5,
    Fence = 6,
    CopyExtent = 7,
    Ping = 8,
}

impl Op {
    pub fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Write,
            2 => Op::Read,
            3 => Op::Flush,
            4 => Op::Unmap,
            5 => Op::Repair,
            6 => Op::Fence,
            7 => Op::CopyExtent,
            8 => Op::Ping,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Read => "read",
            Op::Flush => "flush",
            Op::Unmap => "unmap",
            Op::Repair => "repair",
            Op::Fence => "fence",
            Op::CopyExtent => "copy_extent",
            Op::Ping => "ping",
        }
    }
}

/// A whole frame (length prefix included) with `id`, the `kind` byte (op or
/// status) and `payload` encoded by `put`.
fn frame(id: u64, kind: u8, payload_len: usize, put: impl FnOnce(&mut BytesMut)) -> Bytes {
    let body = HEADER_LEN + payload_len;
    let mut b = BytesMut::with_capacity(4 + body);
    // Bodies are bounded by the codec's max frame length (far below 4 GiB).
    b.put_u32(u32::try_from(body).unwrap_or(u32::MAX));
    b.put_u64(id);
    b.put_u8(kind);
    put(&mut b);
    b.freeze()
}

/// A request frame.
pub fn request<M: Message>(id: u64, op: Op, msg: &M) -> Bytes {
    frame(id, op as u8, msg.encoded_len(), |b| {
        // Capacity was reserved for the message: encoding cannot fail.
        let _ = msg.encode(b);
    })
}

/// An OK response frame.
pub fn ok<M: Message>(id: u64, msg: &M) -> Bytes {
    frame(id, STATUS_OK, msg.encoded_len(), |b| {
        let _ = msg.encode(b);
    })
}

/// A response frame carrying the replica's error.
pub fn replica_error(id: u64, e: &ironblock_proto::v1::ReplicaError) -> Bytes {
    frame(id, STATUS_REPLICA, e.encoded_len(), |b| {
        let _ = e.encode(b);
    })
}

/// A response frame refusing a malformed request.
pub fn invalid(id: u64, reason: &str) -> Bytes {
    frame(id, STATUS_INVALID, reason.len(), |b| {
        b.put_slice(reason.as_bytes())
    })
}

/// A hello frame.
pub fn hello() -> Bytes {
    let mut b = BytesMut::with_capacity(4 + HELLO.len());
    b.put_u32(HELLO.len() as u32);
    b.put_slice(HELLO);
    b.freeze()
}

/// Split a received body into (id, op-or-status byte, payload); `None` if it
/// is shorter than the header.
pub fn split(mut body: Bytes) -> Option<(u64, u8, Bytes)> {
    if body.len() < HEADER_LEN {
        return None;
    }
    let id = body.get_u64();
    let kind = body.get_u8();
    Some((id, kind, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironblock_proto::v1 as pb;

    #[test]
    fn request_round_trips() {
        let req = pb::ReplicaWriteRequest {
            extent: Some(pb::ExtentRef {
                volume: "v".into(),
                index: 3,
            }),
            epoch: 9,
            offset: 4096,
            data: Bytes::from(vec![5u8; 4096]),
            fua: true,
        };
        let f = request(77, Op::Write, &req);
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let (id, op, payload) = split(f.slice(4..)).unwrap();
        assert_eq!((id, Op::from_u8(op)), (77, Some(Op::Write)));
        assert_eq!(pb::ReplicaWriteRequest::decode(payload).unwrap(), req);
    }

    #[test]
    fn short_bodies_and_unknown_ops_are_refused() {
        assert!(split(Bytes::from_static(&[0; 8])).is_none());
        assert!(Op::from_u8(0).is_none());
        assert!(Op::from_u8(9).is_none());
        for op in 1..=8 {
            assert_eq!(Op::from_u8(op).map(|o| o as u8), Some(op));
        }
        let f = invalid(5, "bad");
        let (id, st, p) = split(f.slice(4..)).unwrap();
        assert_eq!((id, st, &p[..]), (5, STATUS_INVALID, &b"bad"[..]));
    }
}
