//! Command dispatch: the LUN table and per-LU state.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;

/// Strings shown in standard INQUIRY data.
#[derive(Debug, Clone)]
pub struct LuConfig {
    /// T10 vendor identification, up to 8 ASCII chars.
    pub vendor: String,
    /// Product identification, up to 16 ASCII chars.
    pub product: String,
    /// Product revision level, up to 4 ASCII chars.
    pub revision: String,
}

impl Default for LuConfig {
    fn default() -> Self {
        LuConfig {
            vendor: "IRONBLK".into(),
            product: "ironblock".into(),
            revision: "0001".into(),
        }
    }
}

/// One logical unit: a device plus SCSI state.
pub struct LogicalUnit {
    dev: Arc<dyn BlockDevice>,
    #[allow(dead_code)]
    config: LuConfig,
}

impl LogicalUnit {
    pub fn new(dev: Arc<dyn BlockDevice>, config: LuConfig) -> Self {
        LogicalUnit { dev, config }
    }
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }
    /// Execute one command addressed to this LU.
    pub async fn execute(&self, _cmd: &ScsiCommand) -> ScsiResult {
        ScsiResult::check(Sense::new(0x05, 0x20, 0x00))
    }
    /// A new I_T nexus appeared (session login): it gets a POWER ON, RESET,
    /// OR BUS DEVICE RESET OCCURRED unit attention.
    pub fn nexus_added(&self, _nexus: &Nexus) {}
    /// An I_T nexus is gone (session ended).
    pub fn nexus_removed(&self, _nexus: &Nexus) {}
    /// LOGICAL UNIT RESET task management function from `by`.
    pub fn lun_reset(&self, _by: &Nexus) {}
    /// TARGET WARM/COLD RESET task management function from `by`.
    pub fn target_reset(&self, _by: &Nexus) {}
}

/// The LUNs of one target.
#[derive(Default, Clone)]
pub struct LunTable {
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
}

impl LunTable {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, lun: u64, lu: Arc<LogicalUnit>) {
        self.luns.insert(lun, lu);
    }
    pub fn remove(&mut self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.luns.remove(&lun)
    }
    pub fn get(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Arc<LogicalUnit>)> {
        self.luns.iter().map(|(k, v)| (*k, v))
    }
    /// Execute a command. `visible` says which LUNs this nexus may see (LUN
    /// masking): REPORT LUNS lists only those, and others behave as absent.
    pub async fn execute(
        &self,
        cmd: &ScsiCommand,
        visible: &(dyn Fn(u64) -> bool + Sync),
    ) -> ScsiResult {
        match self.luns.get(&cmd.lun) {
            Some(lu) if visible(cmd.lun) => lu.execute(cmd).await,
            _ => ScsiResult::check(Sense::new(0x05, 0x25, 0x00)),
        }
    }
}
