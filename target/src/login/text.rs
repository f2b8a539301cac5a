//! Text data segment: NUL-terminated `key=value` pairs (RFC 7143 section 6).
