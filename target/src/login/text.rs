//! Text data segment: NUL-terminated `key=value` pairs (RFC 7143 section 6).

/// Temporary stub (replaced by the login branch).
#[derive(Debug)]
pub struct TextError;
pub fn parse(_data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    Err(TextError)
}
pub fn encode(pairs: &[(impl AsRef<str>, impl AsRef<str>)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_ref().as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_ref().as_bytes());
        v.push(0);
    }
    v
}
