//! Persistent reservations and SPC-2 RESERVE/RELEASE.
//!
//! STUB: the real implementation is written in parallel by another engineer
//! and replaces this file on merge. It only fixes the API the engine calls.

use std::sync::Arc;

use super::{Nexus, Sense};

/// Reservation state of one logical unit.
#[derive(Debug, Default)]
pub struct Reservations {
    _private: (),
}

/// Side effects of a PERSISTENT RESERVE OUT the engine must apply.
#[derive(Debug, Default)]
pub struct PrEffects {
    /// Unit attentions to queue on other nexuses.
    pub unit_attentions: Vec<(Arc<Nexus>, Sense)>,
}

impl Reservations {
    pub fn new() -> Self {
        Reservations { _private: () }
    }
    /// RESERVATION CONFLICT check for any command.
    pub fn conflicts(&self, _nexus: &Nexus, _cdb: &[u8]) -> bool {
        false
    }
    /// PERSISTENT RESERVE IN (opcode 0x5E).
    pub fn persistent_reserve_in(&self, _nexus: &Nexus, _cdb: &[u8]) -> Result<Vec<u8>, Sense> {
        Err(Sense::new(0x05, 0x20, 0x00))
    }
    /// PERSISTENT RESERVE OUT (0x5F). Err(None) = RESERVATION CONFLICT.
    pub fn persistent_reserve_out(
        &mut self,
        _nexus: &Arc<Nexus>,
        _cdb: &[u8],
        _param: &[u8],
    ) -> Result<PrEffects, Option<Sense>> {
        Err(Some(Sense::new(0x05, 0x20, 0x00)))
    }
    /// RESERVE(6)/(10). Err(()) = RESERVATION CONFLICT.
    #[allow(clippy::result_unit_err)]
    pub fn reserve(&mut self, _nexus: &Arc<Nexus>) -> Result<(), ()> {
        Ok(())
    }
    /// RELEASE(6)/(10).
    pub fn release(&mut self, _nexus: &Nexus) {}
    /// The nexus is gone.
    pub fn nexus_removed(&mut self, _nexus: &Nexus) {}
    /// LU / target reset: drops the SPC-2 reservation.
    pub fn reset(&mut self) {}
}
