//! Helpers shared by the chunk integration tests (each test binary uses a
//! subset, hence the allow).
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use ironblock_chunk::volume::VolumeDevice;
use ironblock_target::scsi::BlockDevice;
use rand::{Rng, SeedableRng};

/// `len` seeded random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

/// Read `bytes` from `lba` through the device.
pub async fn read_all(v: &VolumeDevice, lba: u64, bytes: usize) -> Vec<u8> {
    let mut buf = vec![0u8; bytes];
    BlockDevice::read(v, lba, &mut buf).await.unwrap();
    buf
}

/// Corrupt one byte of a file on disk, behind the store's back.
pub fn flip_byte(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
}
