//! CHAP with MD5 (RFC 1994) as used by iSCSI (RFC 7143 section 12.1.3).
