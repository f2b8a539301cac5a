//! CHAP with MD5 (RFC 1994) as used by iSCSI (RFC 7143 section 12.1.3).
//!
//! Helpers only: value encodings (`0x` hex, `0b` base64), the MD5 response
//! computation and a constant-time comparison. The exchange itself lives in
//! the login state machine ([`super::negotiate`]).

use md5::{Digest, Md5};
use thiserror::Error;

/// `CHAP_A` value for MD5, the only algorithm we support.
pub const CHAP_MD5: u32 = 5;
/// Length in bytes of the challenges we send.
pub const CHALLENGE_LEN: usize = 16;
/// Largest binary length of `CHAP_C`/`CHAP_R` (RFC 7143 section 12.1.3).
pub const MAX_BINARY_LEN: usize = 1024;

/// A malformed CHAP value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChapError {
    #[error("binary value has no 0x/0b prefix")]
    NoPrefix,
    #[error("invalid hex digit in binary value")]
    BadHex,
    #[error("invalid base64 in binary value")]
    BadBase64,
    #[error("binary value is empty")]
    Empty,
    #[error("binary value longer than {MAX_BINARY_LEN} bytes")]
    TooLong,
    #[error("CHAP identifier is not a number in 0..=255")]
    BadIdentifier,
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode_hex(digits: &str) -> Result<Vec<u8>, ChapError> {
    let b = digits.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 2 + 1);
    // An odd number of digits is read as if it had a leading zero.
    let (head, rest) = if b.len() % 2 == 1 {
        (Some(b[0]), &b[1..])
    } else {
        (None, b)
    };
    if let Some(h) = head {
        out.push(hex_val(h).ok_or(ChapError::BadHex)?);
    }
    for pair in rest.chunks_exact(2) {
        let hi = hex_val(pair[0]).ok_or(ChapError::BadHex)?;
        let lo = hex_val(pair[1]).ok_or(ChapError::BadHex)?;
        out.push((hi << 4) | lo);
    }
    Ok(out)
}

fn b64_val(b: u8) -> Option<u32> {
    match b {
        b'A'..=b'Z' => Some(u32::from(b - b'A')),
        b'a'..=b'z' => Some(u32::from(b - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(b - b'0') + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

fn decode_base64(s: &str) -> Result<Vec<u8>, ChapError> {
    let trimmed = s.trim_end_matches('=');
    if s.len() - trimmed.len() > 2 {
        return Err(ChapError::BadBase64);
    }
    let b = trimmed.as_bytes();
    if b.len() % 4 == 1 {
        return Err(ChapError::BadBase64);
    }
    let mut out = Vec::with_capacity(b.len() * 3 / 4);
    for chunk in b.chunks(4) {
        let mut acc: u32 = 0;
        for &c in chunk {
            acc = (acc << 6) | b64_val(c).ok_or(ChapError::BadBase64)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
            2 => out.push((acc >> 4) as u8),
            _ => return Err(ChapError::BadBase64),
        }
    }
    Ok(out)
}

/// Decode a CHAP binary value: `0x`/`0X` followed by hex digits, or
/// `0b`/`0B` followed by base64. Empty and over-long values are rejected.
pub fn decode_binary(value: &str) -> Result<Vec<u8>, ChapError> {
    let bytes = if let Some(h) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        decode_hex(h)?
    } else if let Some(b) = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))
    {
        decode_base64(b)?
    } else {
        return Err(ChapError::NoPrefix);
    };
    if bytes.is_empty() {
        return Err(ChapError::Empty);
    }
    if bytes.len() > MAX_BINARY_LEN {
        return Err(ChapError::TooLong);
    }
    Ok(bytes)
}

/// Encode binary data as `0x` followed by lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// Parse a `CHAP_I` identifier: decimal or `0x` hex, in `0..=255`.
pub fn parse_identifier(value: &str) -> Result<u8, ChapError> {
    let n = if let Some(h) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        if h.is_empty() || h.len() > 8 {
            return Err(ChapError::BadIdentifier);
        }
        u32::from_str_radix(h, 16).map_err(|_| ChapError::BadIdentifier)?
    } else {
        if value.is_empty() || value.len() > 8 || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ChapError::BadIdentifier);
        }
        value.parse::<u32>().map_err(|_| ChapError::BadIdentifier)?
    };
    u8::try_from(n).map_err(|_| ChapError::BadIdentifier)
}

/// The CHAP MD5 response: `MD5(identifier || secret || challenge)`.
pub fn md5_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Compare two byte strings without an early exit on the first difference.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decoding() {
        assert_eq!(decode_binary("0x0aFf"), Ok(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0XabC"), Ok(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0x"), Err(ChapError::Empty));
        assert_eq!(decode_binary("0xzz"), Err(ChapError::BadHex));
        assert_eq!(decode_binary("abcd"), Err(ChapError::NoPrefix));
        let big = format!("0x{}", "00".repeat(MAX_BINARY_LEN + 1));
        assert_eq!(decode_binary(&big), Err(ChapError::TooLong));
        let max = format!("0x{}", "00".repeat(MAX_BINARY_LEN));
        assert_eq!(decode_binary(&max).map(|v| v.len()), Ok(MAX_BINARY_LEN));
    }

    #[test]
    fn base64_decoding() {
        assert_eq!(decode_binary("0bAQID"), Ok(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Ok(vec![1, 2]));
        assert_eq!(decode_binary("0bAQ=="), Ok(vec![1]));
        assert_eq!(decode_binary("0BAQ"), Ok(vec![1]));
        assert_eq!(decode_binary("0b/+/+"), Ok(vec![0xff, 0xef, 0xfe]));
        assert_eq!(decode_binary("0bA"), Err(ChapError::BadBase64));
        assert_eq!(decode_binary("0bA!=="), Err(ChapError::BadBase64));
        assert_eq!(decode_binary("0bAQ==="), Err(ChapError::BadBase64));
    }

    #[test]
    fn identifiers() {
        assert_eq!(parse_identifier("0"), Ok(0));
        assert_eq!(parse_identifier("255"), Ok(255));
        assert_eq!(parse_identifier("0x1f"), Ok(31));
        assert_eq!(parse_identifier("256"), Err(ChapError::BadIdentifier));
        assert_eq!(parse_identifier("-1"), Err(ChapError::BadIdentifier));
        assert_eq!(parse_identifier(""), Err(ChapError::BadIdentifier));
        assert_eq!(parse_identifier("+5"), Err(ChapError::BadIdentifier));
    }

    #[test]
    fn md5_response_matches_rfc1994_layout() {
        // Independent computation: MD5 over the concatenated bytes.
        let mut bytes = vec![7u8];
        bytes.extend_from_slice(b"secret");
        bytes.extend_from_slice(&[1, 2, 3]);
        let expected: [u8; 16] = Md5::digest(&bytes).into();
        assert_eq!(md5_response(7, b"secret", &[1, 2, 3]), expected);
        assert_eq!(encode_hex(&[0xab, 0x01]), "0xab01");
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
