//! Copy-up: a chunk-local copy of one extent onto another (a newer
//! copy-on-write generation, or a clone's first write).
//!
//! Only the source's allocated ranges are read (`SEEK_DATA`/`SEEK_HOLE`,
//! falling back to the whole extent where the file system cannot say), each
//! window is verified against the source's checksums, and the data and its
//! checksum entries are written to the destination; everything else of the
//! destination is deallocated first, so the result is exactly the source
//! whatever the destination held. Durable before it returns.
//!
//! The destination is created at `epoch` if missing and fenced by it like a
//! write: a destination already at a newer epoch (its copy-up was committed
//! and written to) refuses a late copy with [`StoreError::StaleEpoch`], so a
//! slow or repeated copier can never overwrite newer writes. Repeating a
//! copy at the same epoch is harmless (idempotent).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use super::{
    io_err, punch_hole, verify, write_zeros, ExtentId, ExtentStore, Inner, Result, StoreError,
    BLOCK_SIZE, CSUM_BYTES, ZERO_CHUNK,
};
use tracing::Instrument;

impl ExtentStore {
    /// Make `dst` a copy of `src` (both on this store): see the module docs.
    /// A missing `src` (never written here) copies as all zeros; one
    /// garbage collection retired is [`StoreError::NotFound`]. A source
    /// block failing its checksum aborts with [`StoreError::Checksum`] naming
    /// the source block; the destination is then incomplete and must be
    /// copied again.
    pub async fn copy_extent(&self, src: &ExtentId, dst: &ExtentId, epoch: u64) -> Result<()> {
        let (src, dst) = (src.clone(), dst.clone());
        let span = tracing::debug_span!("copy_extent", %src, %dst, epoch);
        self.blocking(move |s| s.copy_extent(&src, &dst, epoch))
            .instrument(span)
            .await
    }
}

/// Allocated, block-aligned ranges of `file` within `[0, size)`.
fn data_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let whole = vec![(0, size)];
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let Ok(at) = libc::off_t::try_from(pos) else {
            return Ok(whole);
        };
        // SAFETY: plain syscall on an fd we own; no memory is passed. All
        // I/O on these files is positional, so moving the offset is harmless.
        let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data after `pos`.
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(whole),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Ok(whole);
        }
        let (start, end) = (start as u64, (end as u64).min(size));
        if end <= pos || start >= end {
            // No progress: do not trust the answers.
            return Ok(whole);
        }
        let a = start - start % BLOCK_SIZE;
        let b = end.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        out.push((a, b.min(size)));
        pos = end;
    }
    Ok(out)
}

impl Inner {
    pub(super) fn copy_extent(&self, src: &ExtentId, dst: &ExtentId, epoch: u64) -> Result<()> {
        src.validate()?;
        dst.validate()?;
        if src == dst {
            return Err(StoreError::InvalidId(format!(
                "{} (copy onto itself)",
                dst.volume
            )));
        }
        let source = match self.get(src) {
            Ok(e) => Some(e),
            // Retired by garbage collection: not "never written", so it
            // must not copy as zeros.
            Err(StoreError::NotFound(_)) if self.retired.epoch_now(src).is_some() => {
                return Err(StoreError::NotFound(src.clone()))
            }
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        match self.create_extent(dst.clone(), epoch) {
            Ok(()) | Err(StoreError::Exists(_)) => {}
            Err(e) => return Err(e),
        }
        let d = self.get(dst)?;
        let dfiles = d.files()?;
        let mut dst_state = d.state.write();
        self.fence(&d, &mut dst_state, epoch)?;
        // Start from nothing: deallocate every block, zero every checksum.
        let punched = punch_hole(&dfiles.data, 0, d.size)
            .map_err(|e| io_err("punch hole", &d.paths.data, e))?;
        if !punched {
            write_zeros(&dfiles.data, 0, d.size).map_err(|e| io_err("write", &d.paths.data, e))?;
        }
        write_zeros(&dfiles.csum, 0, d.blocks() * CSUM_BYTES)
            .map_err(|e| io_err("write", &d.paths.csum, e))?;
        let mut copied = 0u64;
        if let Some(s) = source {
            if s.size != d.size {
                return Err(StoreError::Corrupt {
                    path: s.paths.meta.clone(),
                    reason: format!(
                        "source extent is {} bytes, destination {} bytes",
                        s.size, d.size
                    ),
                });
            }
            let sfiles = s.files()?;
            let src_state = s.state.read();
            if src_state.deleted {
                return Err(StoreError::NotFound(src.clone()));
            }
            let ranges =
                data_ranges(&sfiles.data, s.size).map_err(|e| io_err("seek", &s.paths.data, e))?;
            for (start, end) in ranges {
                let mut at = start;
                while at < end {
                    let len = (end - at).min(ZERO_CHUNK as u64);
                    let first = at / BLOCK_SIZE;
                    let data = s.read_data(&sfiles, at, len)?;
                    let table = s.read_csums(&sfiles, first, len / BLOCK_SIZE)?;
                    if let Some(bad) = verify(&data, &table) {
                        super::bump(&self.metrics.checksum_errors, 1);
                        return Err(StoreError::Checksum {
                            extent: src.clone(),
                            block: first + bad,
                        });
                    }
                    super::write_data_at(&dfiles.data, &data, at)
                        .map_err(|e| io_err("write", &d.paths.data, e))?;
                    d.write_csums(&dfiles, first, &table)?;
                    copied += len;
                    at += len;
                }
            }
        }
        d.sync(&dfiles)?;
        tracing::info!(%src, %dst, epoch, copied, "extent copied");
        Ok(())
    }
}
