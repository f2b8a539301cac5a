//! Cross-crate integration, conformance, chaos and benchmark harnesses.

pub mod initiator;
