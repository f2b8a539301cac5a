//! A file-backed [`crate::scsi::BlockDevice`] (sparse file, positional I/O).
//!
//! - The file is created sparse (`set_len`) and grown, never shrunk.
//! - Reads and writes use `pread`/`pwrite` (`FileExt::read_exact_at` /
//!   `write_all_at`) directly inside the async functions: they hit the page
//!   cache and complete in microseconds, so bouncing them to a blocking pool
//!   would cost more than it saves. Anything that may wait for the disk
//!   (`fdatasync` for FUA and SYNCHRONIZE CACHE, hole punching and the
//!   zero-fill fallback of UNMAP) runs on `tokio::task::spawn_blocking`.
//! - UNMAP punches holes (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), falling back
//!   to writing zeros where the file system cannot; GET LBA STATUS uses
//!   `lseek(SEEK_DATA / SEEK_HOLE)`, falling back to "all mapped".
//!
//! Also here: [`parse_size`] for human-readable sizes and [`identity_for`],
//! which derives a stable serial number and NAA identifier from a name.

// `u64::is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.80.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::scsi::{BlockDevice, DeviceError, DeviceIdentity};

/// Largest zero-fill write when hole punching is not supported.
const ZERO_CHUNK: usize = 1 << 20;

/// A [`BlockDevice`] stored in a (sparse) regular file.
#[derive(Debug)]
pub struct FileDevice {
    file: Arc<File>,
    path: PathBuf,
    block_size: u32,
    blocks: AtomicU64,
    identity: DeviceIdentity,
    /// Serializes [`FileDevice::resize`] calls.
    resize_lock: Mutex<()>,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Write-side error mapping: a full backing store is `NoSpace` (ENOSPC, and
/// EDQUOT which means the same to the host), everything else a write error.
fn write_err(e: io::Error) -> DeviceError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => DeviceError::NoSpace,
        _ => DeviceError::Write(e),
    }
}

fn join_err(e: tokio::task::JoinError) -> DeviceError {
    DeviceError::Other(format!("blocking task failed: {e}"))
}

impl FileDevice {
    /// Open (or create) the backing file.
    ///
    /// `size_bytes` must be a non-zero multiple of `block_size`, and
    /// `block_size` a power of two from 512 to 65536.
    ///
    /// A missing file is created sparse; an existing smaller file is grown
    /// to `size_bytes`. An existing **larger** file is never truncated: the
    /// device then exposes the file's size (rounded down to whole blocks),
    /// which is also what a restart after an online [`resize`] with a stale
    /// configured size must do. A partial block at the end of such a file is
    /// left alone and not exposed.
    ///
    /// [`resize`]: FileDevice::resize
    pub fn open(
        path: &Path,
        size_bytes: u64,
        block_size: u32,
        identity: DeviceIdentity,
    ) -> io::Result<Self> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(invalid(format!(
                "block size {block_size} is not a power of two from 512 to 65536"
            )));
        }
        let bs = u64::from(block_size);
        if size_bytes == 0 || !size_bytes.is_multiple_of(bs) {
            return Err(invalid(format!(
                "size {size_bytes} is not a non-zero multiple of the block size {block_size}"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(invalid(format!("{} is not a regular file", path.display())));
        }
        let len = meta.len();
        let effective = if len < size_bytes {
            file.set_len(size_bytes)?;
            size_bytes
        } else {
            if len > size_bytes {
                tracing::warn!(
                    path = %path.display(),
                    file_size = len,
                    configured = size_bytes,
                    "backing file is larger than the configured size; using the file's size"
                );
            }
            len - len % bs
        };
        Ok(FileDevice {
            file: Arc::new(file),
            path: path.to_path_buf(),
            block_size,
            blocks: AtomicU64::new(effective / bs),
            identity,
            resize_lock: Mutex::new(()),
        })
    }

    /// The backing file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grow the device online to `size_bytes` (a multiple of the block
    /// size). Shrinking is refused; the same size is a no-op.
    pub fn resize(&self, size_bytes: u64) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        if !size_bytes.is_multiple_of(bs) {
            return Err(invalid(format!(
                "size {size_bytes} is not a multiple of the block size {bs}"
            )));
        }
        let _guard = self
            .resize_lock
            .lock()
            .map_err(|_| io::Error::other("resize lock poisoned"))?;
        let new_blocks = size_bytes / bs;
        let cur = self.blocks.load(Ordering::Acquire);
        if new_blocks < cur {
            return Err(invalid(format!(
                "cannot shrink from {} to {size_bytes} bytes",
                cur * bs
            )));
        }
        if self.file.metadata()?.len() < size_bytes {
            self.file.set_len(size_bytes)?;
        }
        self.blocks.store(new_blocks, Ordering::Release);
        Ok(())
    }

    /// Byte range of `blocks` blocks at `lba`, checked against the capacity.
    fn range(&self, lba: u64, blocks: u64) -> io::Result<(u64, u64)> {
        let bs = u64::from(self.block_size);
        let end = lba
            .checked_add(blocks)
            .filter(|&end| end <= self.num_blocks())
            .ok_or_else(|| invalid(format!("LBA range {lba}+{blocks} beyond capacity")))?;
        Ok((lba * bs, (end - lba) * bs))
    }

    /// Byte range for a whole-block buffer at `lba`.
    fn buf_range(&self, lba: u64, len: usize) -> io::Result<u64> {
        let bs = u64::from(self.block_size);
        let len = len as u64;
        if !len.is_multiple_of(bs) {
            return Err(invalid(format!(
                "buffer of {len} bytes is not whole blocks"
            )));
        }
        Ok(self.range(lba, len / bs)?.0)
    }

    async fn sync_data_blocking(&self) -> Result<(), DeviceError> {
        let file = self.file.clone();
        blocking(move || file.sync_data()).await?.map_err(write_err)
    }
}

/// Run `f` on tokio's blocking pool; inline when there is no tokio runtime
/// (e.g. a caller driving the future with another executor), so that this
/// never panics.
async fn blocking<T, F>(f: F) -> Result<T, DeviceError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.spawn_blocking(f).await.map_err(join_err),
        Err(_) => Ok(f()),
    }
}

/// Deallocate `len` bytes at `off`; zero-fill where punching holes is not
/// supported. Blocking.
fn punch_or_zero(file: &File, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
            // SAFETY: plain syscall on a valid, open file descriptor.
            let rc = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    o,
                    l,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {}
                _ => return Err(e),
            }
        }
    }
    let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(zeros.get(..n).unwrap_or(&zeros), off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// `lseek` with SEEK_DATA/SEEK_HOLE. `Ok(None)` = ENXIO (no data / no hole
/// after `off`); `Err` = unsupported or failed.
#[cfg(target_os = "linux")]
fn seek(file: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let o = libc::off_t::try_from(off).map_err(|_| invalid("offset too large"))?;
    // SAFETY: plain syscall on a valid, open file descriptor. Positional
    // I/O does not use the file offset this moves.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), o, whence) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(rc as u64))
}

/// Mapped state of block `lba` and how many blocks from it share it, from
/// the file's holes. `None` when the file system cannot tell.
#[cfg(target_os = "linux")]
fn hole_status(file: &File, lba: u64, blocks: u64, bs: u64) -> Option<(bool, u64)> {
    let off = lba.checked_mul(bs)?;
    let remaining = blocks.checked_sub(lba)?;
    let data = match seek(file, off, libc::SEEK_DATA).ok()? {
        // No data from here to the end of the file.
        None => return Some((false, remaining)),
        Some(d) => d,
    };
    let hole_blocks = (data / bs).saturating_sub(lba);
    if hole_blocks > 0 {
        // Blocks lying wholly inside the hole are unmapped.
        return Some((false, hole_blocks.min(remaining)));
    }
    // Block `lba` holds data; the run ends where the next hole begins
    // (a block only partly in that hole still counts as mapped).
    let hole = seek(file, data, libc::SEEK_HOLE)
        .ok()?
        .unwrap_or(blocks * bs);
    let mapped = hole.div_ceil(bs).saturating_sub(lba).max(1);
    Some((true, mapped.min(remaining)))
}

#[cfg(not(target_os = "linux"))]
fn hole_status(_file: &File, _lba: u64, _blocks: u64, _bs: u64) -> Option<(bool, u64)> {
    None
}

#[async_trait]
impl BlockDevice for FileDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    fn identity(&self) -> DeviceIdentity {
        self.identity.clone()
    }

    fn thin(&self) -> bool {
        true
    }

    async fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let off = self.buf_range(lba, buf.len()).map_err(DeviceError::Read)?;
        // Page-cache I/O: done inline (see the module docs). A file that was
        // truncated underneath yields UnexpectedEof, reported as a read error.
        self.file.read_exact_at(buf, off).map_err(DeviceError::Read)
    }

    async fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        let off = self
            .buf_range(lba, data.len())
            .map_err(DeviceError::Write)?;
        self.file.write_all_at(data, off).map_err(write_err)?;
        if fua {
            self.sync_data_blocking().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.sync_data_blocking().await
    }

    async fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        let (off, len) = self.range(lba, blocks).map_err(DeviceError::Write)?;
        let file = self.file.clone();
        blocking(move || punch_or_zero(&file, off, len))
            .await?
            .map_err(write_err)
    }

    async fn lba_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        let blocks = self.num_blocks();
        if lba >= blocks {
            return Err(DeviceError::Read(invalid(format!(
                "LBA {lba} beyond capacity"
            ))));
        }
        // lseek(SEEK_DATA/SEEK_HOLE) only walks the extent tree: inline.
        Ok(
            hole_status(&self.file, lba, blocks, u64::from(self.block_size))
                .unwrap_or((true, blocks - lba)),
        )
    }
}

/// Parse a size: a decimal number of bytes with an optional binary unit,
/// `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`, `P`/`PiB` (case-insensitive,
/// `B` accepted alone; whitespace allowed before the unit). `KB`, `MB`, ...
/// are rejected as ambiguous, as are fractions, signs and overflow.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(format!("invalid size {s:?}: expected a number"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// IEEE company ID used in NAA identifiers: `0A-49-42` ("IB"), a CID-style
/// value (the X bit set, i.e. not an assigned OUI), fixed for ironblock.
pub const NAA_COMPANY_ID: u32 = 0x0A_49_42;

/// 64-bit FNV-1a.
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// A stable identity from a volume name: serial `IB` + 16 upper-case hex
/// digits, and an NAA IEEE Registered Extended (type 6) identifier with
/// company ID [`NAA_COMPANY_ID`] and 100 bits of FNV-1a hashes of the name.
/// The same name always gives the same identity, across versions: do not
/// change this function's output.
pub fn identity_for(name: &str) -> DeviceIdentity {
    let serial_hash = fnv1a64(&[b"ironblock-serial\0", name.as_bytes()]);
    let id_hash = fnv1a64(&[b"ironblock-naa\0", name.as_bytes()]);
    let ext_hash = fnv1a64(&[b"ironblock-naa-ext\0", name.as_bytes()]);
    let serial = format!("IB{serial_hash:016X}");
    // NAA(4) | company ID(24) | vendor specific id(36) | extension(64)
    let vsid = id_hash & ((1u64 << 36) - 1);
    let hi: u64 = (0x6u64 << 60) | (u64::from(NAA_COMPANY_ID) << 36) | vsid;
    let mut naa = [0u8; 16];
    naa[..8].copy_from_slice(&hi.to_be_bytes());
    naa[8..].copy_from_slice(&ext_hash.to_be_bytes());
    DeviceIdentity { serial, naa }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ident() -> DeviceIdentity {
        identity_for("test")
    }

    fn dev(dir: &tempfile::TempDir, size: u64, bs: u32) -> FileDevice {
        FileDevice::open(&dir.path().join("vol"), size, bs, ident()).unwrap()
    }

    #[test]
    fn open_validates_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v");
        for (size, bs) in [
            (0u64, 512u32),
            (1000, 512),
            (4096, 0),
            (4096, 1000),
            (1 << 20, 256),
        ] {
            let e = FileDevice::open(&p, size, bs, ident()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{size} {bs}");
        }
        // A directory is not a backing file.
        assert!(FileDevice::open(dir.path(), 4096, 512, ident()).is_err());
    }

    #[test]
    fn creates_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(&dir, 1 << 30, 512);
        assert_eq!(d.num_blocks(), (1 << 30) / 512);
        assert_eq!(d.block_size(), 512);
        assert!(d.thin());
        let meta = std::fs::metadata(d.path()).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert!(meta.blocks() * 512 < 1 << 20, "allocated {}", meta.blocks());
    }

    #[test]
    fn grows_smaller_file_and_never_shrinks_larger() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v");
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        let d = FileDevice::open(&p, 8192, 512, ident()).unwrap();
        assert_eq!(d.num_blocks(), 16);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8192);
        drop(d);
        // Larger (with a partial tail block) than configured: kept as is.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(10_000)
            .unwrap();
        let d = FileDevice::open(&p, 4096, 512, ident()).unwrap();
        assert_eq!(d.num_blocks(), 10_000 / 512);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 10_000);
        assert_eq!(std::fs::read(&p).unwrap()[..4096], vec![7u8; 4096][..]);
    }

    #[tokio::test]
    async fn read_write_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(&dir, 1 << 20, 512);
        let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        d.write(3, &data, false).await.unwrap();
        d.write(10, &data, true).await.unwrap();
        d.flush().await.unwrap();
        let mut buf = vec![0u8; 1024];
        d.read(3, &mut buf).await.unwrap();
        assert_eq!(buf, data);
        d.read(10, &mut buf).await.unwrap();
        assert_eq!(buf, data);
        // Never written: zeros.
        d.read(100, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // Last block is readable; one past is not.
        let mut one = vec![0u8; 512];
        d.read(2047, &mut one).await.unwrap();
        assert!(d.read(2048, &mut one).await.is_err());
        assert!(d.read(u64::MAX, &mut one).await.is_err());
        assert!(d.write(2047, &data, false).await.is_err());
        // Partial blocks are refused.
        let mut odd = vec![0u8; 100];
        assert!(d.read(0, &mut odd).await.is_err());
        assert!(d.write(0, &odd, false).await.is_err());
    }

    #[tokio::test]
    async fn read_after_truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(&dir, 1 << 20, 512);
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.path())
            .unwrap()
            .set_len(4096)
            .unwrap();
        let mut buf = vec![0u8; 1024];
        assert!(matches!(
            d.read(100, &mut buf).await,
            Err(DeviceError::Read(_))
        ));
        d.read(0, &mut buf).await.unwrap();
    }

    #[tokio::test]
    async fn unmap_reads_zeros_and_reports_unmapped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(&dir, 64 * 4096, 4096);
        // Fresh file: all unmapped.
        assert_eq!(d.lba_status(0).await.unwrap(), (false, 64));
        let data = vec![0xa5u8; 16 * 4096];
        d.write(8, &data, false).await.unwrap();
        d.flush().await.unwrap();
        assert_eq!(d.lba_status(0).await.unwrap(), (false, 8));
        let (mapped, n) = d.lba_status(8).await.unwrap();
        assert!(mapped);
        assert_eq!(n, 16);
        assert_eq!(d.lba_status(30).await.unwrap(), (false, 34));
        // Punch out blocks 12..16.
        d.unmap(12, 4).await.unwrap();
        let mut buf = vec![1u8; 6 * 4096];
        d.read(11, &mut buf).await.unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xa5));
        assert!(buf[4096..5 * 4096].iter().all(|&b| b == 0));
        assert!(buf[5 * 4096..].iter().all(|&b| b == 0xa5));
        assert_eq!(d.lba_status(8).await.unwrap(), (true, 4));
        assert_eq!(d.lba_status(12).await.unwrap(), (false, 4));
        assert_eq!(d.lba_status(16).await.unwrap(), (true, 8));
        assert!(d.lba_status(64).await.is_err());
        assert!(d.unmap(60, 5).await.is_err());
        d.unmap(0, 0).await.unwrap();
    }

    #[test]
    fn zero_fill_fallback_writes_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z");
        std::fs::write(&p, vec![9u8; 3 * ZERO_CHUNK]).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        punch_or_zero(&f, 100, (2 * ZERO_CHUNK) as u64).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert!(got[..100].iter().all(|&b| b == 9));
        assert!(got[100..100 + 2 * ZERO_CHUNK].iter().all(|&b| b == 0));
        assert!(got[100 + 2 * ZERO_CHUNK..].iter().all(|&b| b == 9));
    }

    #[test]
    fn works_without_a_tokio_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(&dir, 1 << 20, 4096);
        futures::executor::block_on(async {
            d.write(1, &[3u8; 4096], true).await.unwrap();
            d.flush().await.unwrap();
            d.unmap(1, 1).await.unwrap();
            let mut buf = vec![1u8; 4096];
            d.read(1, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        });
    }

    #[tokio::test]
    async fn resize_grows_online() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(&dir, 1 << 20, 512);
        let mut one = vec![0u8; 512];
        assert!(d.read(2048, &mut one).await.is_err());
        d.resize(2 << 20).unwrap();
        assert_eq!(d.num_blocks(), 4096);
        assert_eq!(std::fs::metadata(d.path()).unwrap().len(), 2 << 20);
        d.read(2048, &mut one).await.unwrap();
        d.resize(2 << 20).unwrap();
        assert!(d.resize(1 << 20).is_err());
        assert!(d.resize((2 << 20) + 100).is_err());
        assert_eq!(d.num_blocks(), 4096);
    }

    #[test]
    fn enospc_maps_to_no_space() {
        // Provoking a real ENOSPC needs a tiny file system (root); check the
        // mapping instead.
        assert!(matches!(
            write_err(io::Error::from_raw_os_error(28)),
            DeviceError::NoSpace
        ));
        assert!(matches!(
            write_err(io::Error::from_raw_os_error(libc::EIO)),
            DeviceError::Write(_)
        ));
    }

    #[test]
    fn parse_size_cases() {
        let ok = [
            ("4096", 4096u64),
            ("0", 0),
            ("512KiB", 512 << 10),
            ("10MiB", 10 << 20),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("1G", 1 << 30),
            ("1M", 1 << 20),
            ("1k", 1024),
            ("3 gib", 3 << 30),
            (" 8B ", 8),
            ("1PiB", 1 << 50),
            ("16383P", 16383 << 50),
        ];
        for (s, v) in ok {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
        for s in [
            "",
            "abc",
            "G",
            "-1",
            "1.5G",
            "10MB",
            "1KB",
            "10 MiBs",
            "1 2",
            "0x10",
            "18446744073709551616",
            "16384P",
            "20000000T",
            "1GiB!",
        ] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }

    #[test]
    fn identity_is_stable_and_well_formed() {
        let a = identity_for("vol-a");
        assert_eq!(a, identity_for("vol-a"));
        let b = identity_for("vol-b");
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.naa, b.naa);
        for id in [&a, &b, &identity_for(""), &identity_for(&"x".repeat(500))] {
            assert!(id.serial.len() <= 32);
            assert!(id.serial.bytes().all(|c| c.is_ascii_graphic()));
            assert_eq!(id.naa[0] >> 4, 6);
            let cid = (u32::from(id.naa[0] & 0x0f) << 20)
                | (u32::from(id.naa[1]) << 12)
                | (u32::from(id.naa[2]) << 4)
                | u32::from(id.naa[3] >> 4);
            assert_eq!(cid, NAA_COMPANY_ID);
        }
        // Pinned: identities must never change between versions.
        assert_eq!(a.serial, PINNED_SERIAL);
        assert_eq!(hex::encode(a.naa), PINNED_NAA);
    }

    const PINNED_SERIAL: &str = "IBF18376E239933A44";
    const PINNED_NAA: &str = "60a4942b56f20cfe3c04f2b245d7f874";
}
