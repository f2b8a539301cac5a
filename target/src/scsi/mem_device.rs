//! An in-memory, thin-provisioned [`BlockDevice`] for tests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{BlockDevice, DeviceError, DeviceIdentity};

/// Which error the next I/O calls should fail with (for tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedError {
    Read,
    Write,
    NoSpace,
    Unavailable,
    Other,
}

impl InjectedError {
    fn to_error(self) -> DeviceError {
        let io = || std::io::Error::other("injected");
        match self {
            InjectedError::Read => DeviceError::Read(io()),
            InjectedError::Write => DeviceError::Write(io()),
            InjectedError::NoSpace => DeviceError::NoSpace,
            InjectedError::Unavailable => DeviceError::Unavailable("injected".into()),
            InjectedError::Other => DeviceError::Other("injected".into()),
        }
    }
}

/// Sparse in-memory device: only written blocks use memory; unmapped blocks
/// read as zeros. Capacity can be changed with [`MemDevice::resize`].
pub struct MemDevice {
    block_size: u32,
    blocks: AtomicU64,
    thin: bool,
    write_cache: bool,
    identity: DeviceIdentity,
    data: Mutex<BTreeMap<u64, Box<[u8]>>>,
    error: Mutex<Option<InjectedError>>,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
    fail_all: AtomicBool,
}

impl MemDevice {
    /// A thin device of `blocks` blocks of `block_size` bytes (a power of two, >= 512).
    pub fn new(block_size: u32, blocks: u64) -> Self {
        let mut naa = [0u8; 16];
        naa[0] = 0x60;
        naa[1..8].copy_from_slice(&[0x01, 0x40, 0x5f, 0xaa, 0xbb, 0xcc, 0xdd]);
        naa[8..16].copy_from_slice(&blocks.to_be_bytes());
        MemDevice {
            block_size,
            blocks: AtomicU64::new(blocks),
            thin: true,
            write_cache: true,
            identity: DeviceIdentity {
                serial: "MEM0001".into(),
                naa,
            },
            data: Mutex::new(BTreeMap::new()),
            error: Mutex::new(None),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            fail_all: AtomicBool::new(false),
        }
    }
    /// Builder: whether the device reports itself thin (UNMAP supported).
    pub fn with_thin(mut self, thin: bool) -> Self {
        self.thin = thin;
        self
    }
    /// Builder: whether the device has a volatile write cache.
    pub fn with_write_cache(mut self, wc: bool) -> Self {
        self.write_cache = wc;
        self
    }
    /// Builder: the identity shown in VPD pages.
    pub fn with_identity(mut self, id: DeviceIdentity) -> Self {
        self.identity = id;
        self
    }
    /// Change the capacity (online resize). Shrinking drops blocks past the end.
    pub fn resize(&self, blocks: u64) {
        self.blocks.store(blocks, Ordering::SeqCst);
        if let Ok(mut d) = self.data.lock() {
            let _ = d.split_off(&blocks);
        }
    }
    /// Fail the next I/O call (or all of them when `sticky`) with `e`.
    pub fn inject_error(&self, e: Option<InjectedError>, sticky: bool) {
        if let Ok(mut g) = self.error.lock() {
            *g = e;
        }
        self.fail_all.store(sticky, Ordering::SeqCst);
    }
    /// Number of blocks currently allocated.
    pub fn mapped_blocks(&self) -> usize {
        self.data.lock().map(|d| d.len()).unwrap_or(0)
    }
    /// Number of `flush` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
    /// Number of writes made with `fua` so far.
    pub fn fua_count(&self) -> u64 {
        self.fua_writes.load(Ordering::SeqCst)
    }

    fn check_error(&self) -> Result<(), DeviceError> {
        let mut g = self
            .error
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?;
        match *g {
            Some(e) => {
                if !self.fail_all.load(Ordering::SeqCst) {
                    *g = None;
                }
                Err(e.to_error())
            }
            None => Ok(()),
        }
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks.load(Ordering::SeqCst) => Ok(()),
            _ => Err(DeviceError::Other("out of range".into())),
        }
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.blocks.load(Ordering::SeqCst)
    }
    fn identity(&self) -> DeviceIdentity {
        self.identity.clone()
    }
    fn thin(&self) -> bool {
        self.thin
    }
    fn write_cache(&self) -> bool {
        self.write_cache
    }

    async fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check_error()?;
        let bs = self.block_size as usize;
        if buf.len().checked_rem(bs) != Some(0) {
            return Err(DeviceError::Other("partial block".into()));
        }
        self.check_range(lba, (buf.len() / bs) as u64)?;
        let d = self
            .data
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?;
        for (i, chunk) in buf.chunks_mut(bs).enumerate() {
            match d.get(&(lba + i as u64)) {
                Some(b) => chunk.copy_from_slice(b),
                None => chunk.fill(0),
            }
        }
        Ok(())
    }

    async fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.check_error()?;
        let bs = self.block_size as usize;
        if data.len().checked_rem(bs) != Some(0) {
            return Err(DeviceError::Other("partial block".into()));
        }
        self.check_range(lba, (data.len() / bs) as u64)?;
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        let mut d = self
            .data
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?;
        for (i, chunk) in data.chunks(bs).enumerate() {
            d.insert(lba + i as u64, chunk.into());
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.check_error()?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        self.check_error()?;
        self.check_range(lba, blocks)?;
        let mut d = self
            .data
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?;
        let keys: Vec<u64> = d.range(lba..lba + blocks).map(|(k, _)| *k).collect();
        for k in keys {
            d.remove(&k);
        }
        Ok(())
    }

    async fn lba_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        self.check_error()?;
        let end = self.num_blocks();
        if lba >= end {
            return Err(DeviceError::Other("out of range".into()));
        }
        let d = self
            .data
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?;
        let mapped = d.contains_key(&lba);
        let n = if mapped {
            let mut n = 0u64;
            for (k, _) in d.range(lba..end) {
                if *k != lba + n {
                    break;
                }
                n += 1;
            }
            n
        } else {
            d.range(lba..end)
                .next()
                .map(|(k, _)| *k - lba)
                .unwrap_or(end - lba)
        };
        Ok((mapped, n))
    }
}
