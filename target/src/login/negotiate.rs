//! Operational key negotiation (RFC 7143 section 13) and the login stage
//! machine.

use super::*;

pub struct Machine {}

impl Machine {
    pub fn new(_config: LoginConfig, _authority: Arc<dyn LoginAuthority>) -> Self {
        Machine {}
    }
    pub fn with_seed(config: LoginConfig, authority: Arc<dyn LoginAuthority>, _seed: u64) -> Self {
        Self::new(config, authority)
    }
    pub fn step(&mut self, _req: &LoginRequestFields, _data: &[u8]) -> LoginStep {
        LoginStep {
            response: LoginResponseFields {
                status_class: 3,
                ..Default::default()
            },
            data: Vec::new(),
            complete: None,
            close: true,
        }
    }
}

/// Temporary stub (replaced by the login branch).
pub fn ffp_text(_pairs: &[(String, String)], _params: &mut SessionParams) -> Vec<(String, String)> {
    Vec::new()
}
