//! Pure helpers shared by the services: CSI names to meta names, volume
//! capability checks, capacity ranges, pagination tokens.

use ironblock_proto::csi;
use ironblock_proto::csi::volume_capability::access_mode::Mode;
use ironblock_proto::csi::volume_capability::AccessType;

use crate::error::{CsiError, Result};

/// meta's limit on names.
const META_NAME_MAX: usize = 253;

/// Size granularity meta accepts.
pub const BLOCK: u64 = 4096;

/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Maps a CSI name (any Unicode without control characters, the CO's
/// idempotency key) to a meta name (ASCII letters, digits, `-.:`, `_`).
/// Injective: bytes outside `[A-Za-z0-9-.:]` (including `_`) become `_HH`.
pub fn meta_name(csi_name: &str) -> Result<String> {
    if csi_name.is_empty() {
        return Err(CsiError::InvalidArgument("name is required".into()));
    }
    if csi_name
        .chars()
        .any(|c| matches!(c as u32, 0..=8 | 0x0b | 0x0c | 0x0e..=0x1f | 0x7f..=0x9f))
    {
        return Err(CsiError::InvalidArgument(format!(
            "name {csi_name:?} contains a control character"
        )));
    }
    let mut out = String::with_capacity(csi_name.len());
    for b in csi_name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    if out.len() > META_NAME_MAX {
        return Err(CsiError::InvalidArgument(format!(
            "name {csi_name:?} is too long ({} bytes encoded, at most {META_NAME_MAX})",
            out.len()
        )));
    }
    Ok(out)
}

/// Whether `id` has the form of a meta id (a UUID, dashed or 32 hex digits).
pub fn is_uuid(id: &str) -> bool {
    let hex: String = id.chars().filter(|c| *c != '-').collect();
    let dashed_ok = !id.contains('-')
        || (id.len() == 36 && [8, 13, 18, 23].iter().all(|&i| id.as_bytes()[i] == b'-'));
    hex.len() == 32 && dashed_ok && hex.chars().all(|c| c.is_ascii_hexdigit())
}

/// The VPD serial a volume id maps to (32 lowercase hex digits).
pub fn serial_of(volume_id: &str) -> String {
    volume_id
        .chars()
        .filter(|c| *c != '-')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The IEEE company id in every NAA identifier ironblock hands out (meta's
/// `ids::NAA_COMPANY_ID`).
pub const NAA_COMPANY_ID: u128 = 0x0A_B1_0C;
/// Volume-id bits carried in the NAA identifier (its top 100 bits).
pub const NAA_ID_BITS: u32 = 100;

/// The volume-id prefix (first 25 hex digits) an ironblock NAA-6 WWN
/// (`naa.6...`, 32 hex digits) carries; None for a WWN that is not
/// ironblock's.
pub fn naa_volume_prefix(wwn: &str) -> Option<String> {
    let hex = wwn.strip_prefix("naa.").unwrap_or(wwn);
    if hex.len() != 32 {
        return None;
    }
    let v = u128::from_str_radix(hex, 16).ok()?;
    if v >> 124 != 6 || (v >> NAA_ID_BITS) & 0xff_ffff != NAA_COMPANY_ID {
        return None;
    }
    Some(format!("{:025x}", v & ((1u128 << NAA_ID_BITS) - 1)))
}

/// Whether a node id / initiator name has the form of an iSCSI name.
pub fn is_iscsi_name(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    (l.starts_with("iqn.") || l.starts_with("eui.") || l.starts_with("naa."))
        && s.len() <= 223
        && s.len() > 4
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The access type of a capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Raw block device.
    Block,
    /// Mounted filesystem.
    Mount,
}

/// Checks one capability; returns its access type and mode, or why it is
/// not supported (INVALID_ARGUMENT). iSCSI LUNs can be shared as raw block
/// devices, but a filesystem is single-writer: mount + MULTI_NODE_MULTI_WRITER
/// or MULTI_NODE_SINGLE_WRITER is refused.
pub fn check_capability(c: &csi::VolumeCapability) -> Result<(Access, Mode)> {
    let access = match &c.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && !SUPPORTED_FS.contains(&m.fs_type.as_str()) {
                return Err(CsiError::InvalidArgument(format!(
                    "fs_type {:?} is not supported (ext4, xfs)",
                    m.fs_type
                )));
            }
            Access::Mount
        }
        None => {
            return Err(CsiError::InvalidArgument(
                "volume capability without access type (block or mount)".into(),
            ))
        }
    };
    let mode = c
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    let ok = match mode {
        Mode::Unknown => false,
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter
        | Mode::MultiNodeReaderOnly => true,
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => access == Access::Block,
    };
    if !ok {
        return Err(CsiError::InvalidArgument(format!(
            "access mode {} is not supported for {access:?} volumes",
            mode.as_str_name()
        )));
    }
    Ok((access, mode))
}

/// Filesystems the node can create and grow.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs"];

/// Whether a mode lets the volume be published on more than one node.
pub fn multi_node(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter
    )
}

/// Whether a mode only ever reads: the publication is read-only (the LUN
/// is write-protected for the node) whatever the `readonly` flag says.
pub fn reader_only(mode: Mode) -> bool {
    matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
}

/// Checks a list of capabilities (REQUIRED, non-empty).
pub fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<Vec<(Access, Mode)>> {
    if caps.is_empty() {
        return Err(CsiError::InvalidArgument(
            "volume_capabilities is required".into(),
        ));
    }
    caps.iter().map(check_capability).collect()
}

/// The size to create for a capacity range: the smallest multiple of 4 KiB
/// at or above `required_bytes` (when unset: `min`, the source's size, or
/// else [`DEFAULT_SIZE`] capped by the limit), at least `min`. INVALID_ARGUMENT for negative bounds,
/// OUT_OF_RANGE when no size fits.
pub fn size_for(range: Option<&csi::CapacityRange>, min: u64) -> Result<u64> {
    let (req, lim) = match range {
        Some(r) => (r.required_bytes, r.limit_bytes),
        None => (0, 0),
    };
    if req < 0 || lim < 0 {
        return Err(CsiError::InvalidArgument(
            "capacity_range bounds must not be negative".into(),
        ));
    }
    let (req, lim) = (req as u64, lim as u64);
    if lim != 0 && req > lim {
        return Err(CsiError::InvalidArgument(format!(
            "capacity_range required_bytes {req} exceeds limit_bytes {lim}"
        )));
    }
    let mut size = if req == 0 {
        if min > 0 {
            // From a source: the source's size.
            min.div_ceil(BLOCK).saturating_mul(BLOCK)
        } else if lim != 0 {
            DEFAULT_SIZE.min(lim / BLOCK * BLOCK)
        } else {
            DEFAULT_SIZE
        }
    } else {
        req.div_ceil(BLOCK).saturating_mul(BLOCK)
    };
    size = size.max(min).max(BLOCK);
    if lim != 0 && size > lim {
        return Err(CsiError::OutOfRange(format!(
            "no size of whole 4 KiB blocks of at least {} fits limit_bytes {lim}",
            req.max(min)
        )));
    }
    Ok(size)
}

/// Whether an existing size satisfies a range.
pub fn size_fits(size: u64, range: Option<&csi::CapacityRange>) -> bool {
    match range {
        None => true,
        Some(r) => {
            (r.required_bytes <= 0 || size >= r.required_bytes as u64)
                && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64)
        }
    }
}

/// One page of the sorted `ids` after `token` (the last id of the previous
/// page; empty: from the start), at most `max_entries` (0: all). Returns the
/// range and the next token (empty: no more). A token that is not an id
/// this driver could have handed out is ABORTED, as the spec asks; ids
/// deleted or added between pages never shift the rest.
pub fn page_after(
    ids: &[&str],
    token: &str,
    max_entries: i32,
) -> Result<(std::ops::Range<usize>, String)> {
    if max_entries < 0 {
        return Err(CsiError::InvalidArgument(
            "max_entries must not be negative".into(),
        ));
    }
    let start = if token.is_empty() {
        0
    } else if is_uuid(token) {
        ids.partition_point(|id| *id <= token)
    } else {
        return Err(CsiError::Aborted(format!(
            "starting_token {token:?} is not valid"
        )));
    };
    let len = ids.len();
    let end = if max_entries == 0 {
        len
    } else {
        start.saturating_add(max_entries as usize).min(len)
    };
    let next = if end < len && end > start {
        ids[end - 1].to_string()
    } else {
        String::new()
    };
    Ok((start..end, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(req: i64, lim: i64) -> csi::CapacityRange {
        csi::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        }
    }

    #[test]
    fn names_are_injective_and_valid() {
        assert_eq!(meta_name("pvc-1234").unwrap(), "pvc-1234");
        assert_eq!(meta_name("a_b").unwrap(), "a_5fb");
        assert_ne!(meta_name("a b").unwrap(), meta_name("a_20b").unwrap());
        assert_eq!(meta_name("é").unwrap(), "_c3_a9");
        assert!(meta_name("").is_err());
        assert!(meta_name("a\u{1}b").is_err());
        assert!(meta_name(&"x".repeat(254)).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(size_for(None, 0).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(None, 4 << 20).unwrap(), 4 << 20);
        assert_eq!(size_for(Some(&range(1, 0)), 0).unwrap(), 4096);
        assert_eq!(size_for(Some(&range(5000, 0)), 0).unwrap(), 8192);
        assert_eq!(size_for(Some(&range(0, 1 << 20)), 0).unwrap(), 1 << 20);
        assert_eq!(size_for(Some(&range(4096, 4096)), 0).unwrap(), 4096);
        assert_eq!(
            size_for(Some(&range(5000, 6000)), 0).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&range(0, 8192)), 1 << 20).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&range(-1, 0)), 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(size_fits(8192, Some(&range(5000, 0))));
        assert!(!size_fits(8192, Some(&range(0, 4096))));
    }

    #[test]
    fn pages() {
        let a = "00000000-0000-4000-8000-000000000001";
        let b = "00000000-0000-4000-8000-000000000002";
        let c = "00000000-0000-4000-8000-000000000003";
        let ids = [a, b, c];
        assert_eq!(page_after(&ids, "", 0).unwrap(), (0..3, String::new()));
        assert_eq!(page_after(&ids, "", 2).unwrap(), (0..2, b.to_string()));
        assert_eq!(page_after(&ids, b, 2).unwrap(), (2..3, String::new()));
        // The token's own entry was deleted: the page starts after it.
        assert_eq!(page_after(&[a, c], b, 2).unwrap(), (1..2, String::new()));
        assert_eq!(
            page_after(&ids, "x", 1).unwrap_err().code(),
            tonic::Code::Aborted
        );
        assert!(page_after(&ids, "", -1).is_err());
    }

    #[test]
    fn naa_carries_the_volume_id() {
        let id = "0123abcd-0000-4000-8000-00000000beef";
        let bits = u128::from_str_radix(&serial_of(id), 16).unwrap();
        let v = (6u128 << 124) | (NAA_COMPANY_ID << NAA_ID_BITS) | (bits >> (128 - NAA_ID_BITS));
        let wwn = format!("naa.{v:032x}");
        assert_eq!(naa_volume_prefix(&wwn).unwrap(), serial_of(id)[..25]);
        assert_eq!(naa_volume_prefix("naa.5000c500a1b2c3d4"), None);
        assert_eq!(
            naa_volume_prefix(&format!("naa.{:032x}", v ^ (1 << 110))),
            None
        );
    }

    #[test]
    fn iscsi_names_and_serials() {
        assert!(is_iscsi_name("iqn.2026-11.dev.ironblock:node1"));
        assert!(!is_iscsi_name("node1"));
        assert_eq!(
            serial_of("0123ABCD-0000-4000-8000-000000000000"),
            "0123abcd000040008000000000000000"
        );
        assert!(is_uuid("0123abcd-0000-4000-8000-000000000000"));
        assert!(!is_uuid("nope"));
    }
}
