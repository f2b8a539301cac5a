//! Sense data (SPC-4 section 4.5).

use bytes::Bytes;

/// Sense key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }
    /// Fixed-format sense data (response code 0x70), 18 bytes.
    pub fn to_fixed(&self) -> Bytes {
        let mut b = vec![0u8; 18];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        Bytes::from(b)
    }
}
