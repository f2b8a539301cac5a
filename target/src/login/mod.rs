//! Login phase: text keys, operational negotiation, CHAP, and the login state
//! machine (RFC 7143 sections 6, 12 and 13). Everything here is pure: the
//! connection layer feeds decoded Login Request fields in and writes the
//! returned Login Response out.

pub mod chap;
pub mod negotiate;
pub mod text;

use std::sync::Arc;

/// Session type requested by the initiator (`SessionType` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionType {
    Discovery,
    #[default]
    Normal,
}

/// Operational parameters in force after a successful login.
/// Names follow RFC 7143 section 13. Lengths are in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// Empty for discovery sessions.
    pub target_name: String,
    pub header_digest: bool,
    pub data_digest: bool,
    /// MaxRecvDataSegmentLength we declared: the most the initiator may send
    /// us in one PDU.
    pub our_max_recv_data_segment_length: u32,
    /// MaxRecvDataSegmentLength the initiator declared: the most we may send
    /// in one PDU.
    pub initiator_max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub error_recovery_level: u32,
    pub max_connections: u32,
}

/// Target-side limits and preferences offered during negotiation.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// Our MaxRecvDataSegmentLength (declared to the initiator).
    pub max_recv_data_segment_length: u32,
    /// Upper bounds we accept for the negotiated values.
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub max_connections: u32,
    /// Whether we allow digests if the initiator offers them.
    pub allow_header_digest: bool,
    pub allow_data_digest: bool,
    /// Accept only CRC32C (refuse None). RFC 7143 has the target pick the
    /// first value of the initiator's list it supports, so an initiator
    /// offering "None,CRC32C" gets digests only from a target that
    /// requires them.
    pub require_header_digest: bool,
    pub require_data_digest: bool,
    /// TargetPortalGroupTag reported on normal sessions.
    pub target_portal_group_tag: u16,
    pub target_alias: Option<String>,
    /// Our DefaultTime2Wait offer (RFC 7143 section 13.15: the result is
    /// the larger of both offers). 0 lets an initiator whose connection
    /// dropped reconnect at once (the cluster's chunks use 0); the
    /// standalone default is the RFC's 2.
    pub default_time2wait: u32,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            max_outstanding_r2t: 16,
            max_connections: 1,
            allow_header_digest: true,
            allow_data_digest: true,
            require_header_digest: false,
            require_data_digest: false,
            target_portal_group_tag: 1,
            target_alias: None,
            default_time2wait: negotiate::DEFAULT_TIME2WAIT,
        }
    }
}

/// CHAP credentials a target requires (RFC 7143 section 12.1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    /// The name and secret the initiator must prove (one-way CHAP).
    pub user: String,
    pub secret: Vec<u8>,
    /// Mutual CHAP: the name and secret the target answers with when the
    /// initiator challenges it. `None` means mutual CHAP is refused.
    pub mutual: Option<(String, Vec<u8>)>,
}

/// The policy's answer to "may this initiator log in to this target?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginDecision {
    /// Go on; require CHAP with these credentials when `Some`.
    Accept { chap: Option<ChapCredentials> },
    /// Answer with a login redirect (status class 0x01, TargetAddress).
    /// `address` is `host:port` (optionally `,tpgt`). `permanent` selects
    /// detail 0x02 instead of 0x01 ("moved temporarily").
    Redirect { address: String, permanent: bool },
    /// Target name unknown: status 0x02/0x03 (Not found).
    NotFound,
    /// Initiator may not use this target: status 0x02/0x02 (Authorization failure).
    Forbidden,
}

/// Decides logins. Implemented by the server's policy (standalone exports,
/// the chunk server, the redirector).
pub trait LoginAuthority: Send + Sync {
    /// `target_name` is `None` for a discovery session.
    fn decide(&self, initiator_name: &str, target_name: Option<&str>) -> LoginDecision;
}

/// The fields of a Login Request PDU the state machine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoginRequestFields {
    pub transit: bool,
    pub cont: bool,
    /// Current stage: 0 security, 1 operational, 3 full feature (invalid as CSG).
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cid: u16,
}

/// The fields of the Login Response PDU to send (sequence numbers, ITT,
/// ISID/TSIH are filled in by the connection layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoginResponseFields {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub status_class: u8,
    pub status_detail: u8,
}

/// What to do after one login step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginStep {
    pub response: LoginResponseFields,
    /// Text data segment of the response (NUL-separated key=value pairs).
    pub data: Vec<u8>,
    /// Set when this response completes the login (T=1, NSG=3, status 0):
    /// the parameters that are now in force.
    pub complete: Option<SessionParams>,
    /// Close the connection after sending the response (any non-zero status).
    pub close: bool,
}

/// Status classes/details (RFC 7143 section 11.13.5).
pub mod status {
    pub const SUCCESS: (u8, u8) = (0x00, 0x00);
    pub const TARGET_MOVED_TEMPORARILY: (u8, u8) = (0x01, 0x01);
    pub const TARGET_MOVED_PERMANENTLY: (u8, u8) = (0x01, 0x02);
    pub const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub const AUTHENTICATION_FAILURE: (u8, u8) = (0x02, 0x01);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (0x02, 0x02);
    pub const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub const TARGET_REMOVED: (u8, u8) = (0x02, 0x04);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub const TOO_MANY_CONNECTIONS: (u8, u8) = (0x02, 0x06);
    pub const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub const CANT_INCLUDE_IN_SESSION: (u8, u8) = (0x02, 0x08);
    pub const SESSION_TYPE_NOT_SUPPORTED: (u8, u8) = (0x02, 0x09);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0a);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (0x02, 0x0b);
    pub const TARGET_ERROR: (u8, u8) = (0x03, 0x00);
    pub const SERVICE_UNAVAILABLE: (u8, u8) = (0x03, 0x01);
    pub const OUT_OF_RESOURCES: (u8, u8) = (0x03, 0x02);
}

/// The per-connection login state machine. One instance per connection, fed
/// every Login Request PDU in order until it returns `complete` or `close`.
pub struct LoginMachine {
    inner: negotiate::Machine,
}

impl LoginMachine {
    pub fn new(config: LoginConfig, authority: Arc<dyn LoginAuthority>) -> Self {
        LoginMachine {
            inner: negotiate::Machine::new(config, authority),
        }
    }

    /// Seeded variant so CHAP challenges are reproducible in simulation.
    pub fn with_seed(config: LoginConfig, authority: Arc<dyn LoginAuthority>, seed: u64) -> Self {
        LoginMachine {
            inner: negotiate::Machine::with_seed(config, authority, seed),
        }
    }

    /// Process one Login Request PDU (`data` is its text data segment, with
    /// any padding already removed). Never panics on any input.
    pub fn step(&mut self, req: &LoginRequestFields, data: &[u8]) -> LoginStep {
        self.inner.step(req, data)
    }
}
