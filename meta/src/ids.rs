//! Identifiers (UUID form) and the VPD identity of a volume.

use std::fmt;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::{MetaError, Result};

/// A 128-bit random id shown in UUID (version 4) form. Used for the cluster,
/// volumes and snapshots.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A fresh random id (version 4, RFC 4122 variant) from the given RNG.
    pub fn random(rng: &mut dyn RngCore) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Uuid(b)
    }

    /// Parses the dashed form (`8-4-4-4-12`) or 32 bare hex digits.
    pub fn parse(s: &str) -> Result<Self> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        let dashed_ok = !s.contains('-')
            || (s.len() == 36 && [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-'));
        if hex.len() != 32 || !dashed_ok || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(MetaError::InvalidArgument(format!(
                "malformed id {s:?} (expected a UUID)"
            )));
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| MetaError::InvalidArgument(format!("malformed id {s:?}")))?;
        }
        Ok(Uuid(b))
    }

    /// 32 lowercase hex digits, no dashes.
    pub fn simple(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The id as a big-endian integer.
    pub fn as_u128(&self) -> u128 {
        u128::from_be_bytes(self.0)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.simple();
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &s[0..8],
            &s[8..12],
            &s[12..16],
            &s[16..20],
            &s[20..32]
        )
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The 24-bit IEEE company id placed in every NAA identifier ironblock
/// hands out. `0x0AB10C` is in the locally assigned (CID) space: its first
/// octet has the X bit set and the M bit clear.
pub const NAA_COMPANY_ID: u32 = 0x0A_B1_0C;

/// Number of volume-id bits carried in the NAA identifier (the top bits).
pub const NAA_ID_BITS: u32 = 100;

/// The SCSI identity of a volume's LUN, deterministic from its id, so a host
/// can prove which volume a block device is:
///
/// - `serial`: VPD page 0x80 unit serial number: the id as 32 hex digits.
/// - `naa`: VPD page 0x83 designator, NAA type 6 (IEEE Registered Extended):
///   4-bit NAA `6`, the 24-bit [`NAA_COMPANY_ID`], then the top 100 bits of
///   the volume id (vendor specific id + extension). See
///   [`volume_prefix_from_naa`] for the way back.
pub fn vpd_identity(volume_id: &Uuid) -> (String, [u8; 16]) {
    let v = (6u128 << 124)
        | (u128::from(NAA_COMPANY_ID) << NAA_ID_BITS)
        | (volume_id.as_u128() >> (128 - NAA_ID_BITS));
    (volume_id.simple(), v.to_be_bytes())
}

/// Reads an ironblock NAA identifier back: the first 25 hex digits of the
/// volume id (its top 100 bits), or `None` if `naa` is not one of ours.
pub fn volume_prefix_from_naa(naa: &[u8; 16]) -> Option<String> {
    let v = u128::from_be_bytes(*naa);
    if v >> 124 != 6 || ((v >> NAA_ID_BITS) & 0xff_ffff) as u32 != NAA_COMPANY_ID {
        return None;
    }
    let bits = v & ((1u128 << NAA_ID_BITS) - 1);
    Some(format!("{bits:025x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn uuid_roundtrip() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let id = Uuid::random(&mut rng);
        let s = id.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert_eq!(Uuid::parse(&s).unwrap(), id);
        assert_eq!(Uuid::parse(&id.simple()).unwrap(), id);
        assert!(Uuid::parse("nope").is_err());
        assert!(Uuid::parse("0123456789abcdef0123456789abcdeg").is_err());
        assert!(Uuid::parse("01234567-89ab-cdef-0123-456789abcdef-").is_err());
    }

    #[test]
    fn vpd_identity_is_deterministic_and_reversible() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..100 {
            let id = Uuid::random(&mut rng);
            let (serial, naa) = vpd_identity(&id);
            assert_eq!(vpd_identity(&id), (serial.clone(), naa));
            assert_eq!(serial, id.simple());
            assert_eq!(naa[0] >> 4, 6, "NAA type 6");
            assert_eq!(
                (u32::from(naa[0] & 0x0f) << 20)
                    | (u32::from(naa[1]) << 12)
                    | (u32::from(naa[2]) << 4)
                    | u32::from(naa[3] >> 4),
                NAA_COMPANY_ID
            );
            let prefix = volume_prefix_from_naa(&naa).unwrap();
            assert_eq!(prefix.len(), 25);
            assert!(id.simple().starts_with(&prefix));
        }
        assert_eq!(volume_prefix_from_naa(&[0u8; 16]), None);
    }
}
