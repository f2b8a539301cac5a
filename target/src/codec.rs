//! PDU framing on a byte stream.
