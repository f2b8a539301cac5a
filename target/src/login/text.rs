//! Text data segment: NUL-terminated `key=value` pairs (RFC 7143 section 6).
//!
//! Limits enforced (RFC 7143 sections 6.1 and 12.1.3):
//! - key names are 1..=63 bytes of `A-Z a-z 0-9 . - + @ _` (plus the `X#`
//!   prefix of IANA-registered extension keys);
//! - values are at most 255 bytes, except the large binary values of the
//!   authentication keys (`CHAP_C`, `CHAP_R`, SRP/Kerberos keys), which may be
//!   up to [`MAX_LARGE_VALUE_LEN`] encoded bytes (a 1024-byte binary value is
//!   2050 bytes of `0x`-hex);
//! - everything must be UTF-8.

use thiserror::Error;

/// Longest key name (RFC 7143 section 6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest ordinary value (RFC 7143 section 6.1).
pub const MAX_VALUE_LEN: usize = 255;
/// Longest encoded large-binary value we accept (CHAP_C/CHAP_R etc.).
pub const MAX_LARGE_VALUE_LEN: usize = 8192;

/// A malformed text data segment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextError {
    #[error("text pair {index} has no '='")]
    MissingEquals { index: usize },
    #[error("text pair {index} has an empty key")]
    EmptyKey { index: usize },
    #[error("text pair {index}: key of {len} bytes exceeds {MAX_KEY_LEN}")]
    KeyTooLong { index: usize, len: usize },
    #[error("text pair {index}: key contains an invalid character")]
    InvalidKey { index: usize },
    #[error("value of key {key} is {len} bytes, more than {max}")]
    ValueTooLong { key: String, len: usize, max: usize },
    #[error("text pair {index} is not valid UTF-8")]
    NotUtf8 { index: usize },
}

/// Maximum value length (in bytes, encoded) allowed for `key`.
pub fn max_value_len(key: &str) -> usize {
    match key {
        "CHAP_C" | "CHAP_R" | "SRP_A" | "SRP_B" | "SRP_M" | "SRP_HM" | "SRP_s" | "KRB_AP_REQ"
        | "KRB_AP_REP" => MAX_LARGE_VALUE_LEN,
        _ => MAX_VALUE_LEN,
    }
}

fn valid_key(key: &str) -> bool {
    let body = key.strip_prefix("X#").unwrap_or(key);
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_'))
}

/// Parse a text data segment into ordered `(key, value)` pairs.
///
/// Pairs are separated by NUL; a missing final NUL is tolerated, and empty
/// segments (e.g. trailing padding zeros) are skipped. Duplicate keys are
/// *not* rejected here: that is a negotiation-level decision.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for (index, seg) in data.split(|&b| b == 0).enumerate() {
        if seg.is_empty() {
            continue;
        }
        let eq = seg
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TextError::MissingEquals { index })?;
        let (kb, vb) = (&seg[..eq], &seg[eq + 1..]);
        if kb.is_empty() {
            return Err(TextError::EmptyKey { index });
        }
        if kb.len() > MAX_KEY_LEN {
            return Err(TextError::KeyTooLong {
                index,
                len: kb.len(),
            });
        }
        let key = std::str::from_utf8(kb).map_err(|_| TextError::NotUtf8 { index })?;
        if !valid_key(key) {
            return Err(TextError::InvalidKey { index });
        }
        let max = max_value_len(key);
        if vb.len() > max {
            return Err(TextError::ValueTooLong {
                key: key.to_string(),
                len: vb.len(),
                max,
            });
        }
        let value = std::str::from_utf8(vb).map_err(|_| TextError::NotUtf8 { index })?;
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

/// Encode pairs as a text data segment: each pair becomes `key=value\0`.
pub fn encode(pairs: &[(impl AsRef<str>, impl AsRef<str>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn parse_basic_and_roundtrip() {
        let data = b"InitiatorName=iqn.2000-01.com.example:x\0SessionType=Normal\0";
        let pairs = parse(data).unwrap();
        assert_eq!(
            pairs,
            vec![
                p("InitiatorName", "iqn.2000-01.com.example:x"),
                p("SessionType", "Normal")
            ]
        );
        assert_eq!(encode(&pairs), data.to_vec());
    }

    #[test]
    fn missing_final_nul_and_padding_tolerated() {
        assert_eq!(parse(b"A=1\0B=2").unwrap(), vec![p("A", "1"), p("B", "2")]);
        assert_eq!(parse(b"A=1\0\0\0\0").unwrap(), vec![p("A", "1")]);
        assert_eq!(parse(b"").unwrap(), vec![]);
    }

    #[test]
    fn empty_value_and_equals_in_value() {
        assert_eq!(
            parse(b"SendTargets=\0X-a=b=c\0").unwrap(),
            vec![p("SendTargets", ""), p("X-a", "b=c")]
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse(b"A=1\0Bogus\0"),
            Err(TextError::MissingEquals { index: 1 })
        );
        assert_eq!(parse(b"=x\0"), Err(TextError::EmptyKey { index: 0 }));
        assert_eq!(parse(b"A B=x\0"), Err(TextError::InvalidKey { index: 0 }));
        assert_eq!(parse(b"X#=x\0"), Err(TextError::InvalidKey { index: 0 }));
        assert!(parse(b"X#vendor.key=x\0").is_ok());
        let long_key = format!("{}=1", "K".repeat(64));
        assert!(matches!(
            parse(long_key.as_bytes()),
            Err(TextError::KeyTooLong { len: 64, .. })
        ));
        let ok_key = format!("{}=1", "K".repeat(63));
        assert!(parse(ok_key.as_bytes()).is_ok());
        let long_val = format!("TargetName={}", "a".repeat(256));
        assert!(matches!(
            parse(long_val.as_bytes()),
            Err(TextError::ValueTooLong { max: 255, .. })
        ));
        let ok_val = format!("TargetName={}", "a".repeat(255));
        assert!(parse(ok_val.as_bytes()).is_ok());
        assert_eq!(parse(b"A=\xff\xfe\0"), Err(TextError::NotUtf8 { index: 0 }));
        assert_eq!(parse(b"\xc3=1\0"), Err(TextError::NotUtf8 { index: 0 }));
    }

    #[test]
    fn large_binary_values() {
        let c = format!("CHAP_C=0x{}", "ab".repeat(1024));
        assert!(parse(c.as_bytes()).is_ok());
        let too_big = format!("CHAP_R=0x{}", "a".repeat(MAX_LARGE_VALUE_LEN));
        assert!(matches!(
            parse(too_big.as_bytes()),
            Err(TextError::ValueTooLong { .. })
        ));
    }
}
