//! The local extent store: fixed-size extents on a stamped data directory,
//! with a crc32c per 4 KiB block and a persisted, forward-only epoch per
//! extent.
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/IRONBLOCK_CHUNK                     stamp (see crate::identity)
//! <dir>/extents/<volume>.<index:016x>.meta  extent metadata (key=value + crc)
//! <dir>/extents/<volume>.<index:016x>.data  extent data, sparse, exactly extent_size bytes
//! <dir>/extents/<volume>.<index:016x>.csum  checksum table, 4 bytes (LE) per block
//! <dir>/trash/<seq:016x>.<file name>        files of deleted extents, unlinked in the background
//! ```
//!
//! - `.meta` holds `format`, `volume`, `index`, `extent_size`, `block_size`
//!   and `epoch`, with a crc32c line; it is only ever replaced atomically
//!   (temp + fsync + rename + fsync dir). **The `.meta` file is the commit
//!   point**: an extent exists iff its `.meta` exists. Creation writes
//!   `.data` and `.csum` first; deletion removes `.meta` first. `.data` /
//!   `.csum` without `.meta` are leftovers of an interrupted create or delete
//!   and are moved to the trash when the store opens.
//! - Checksum table entry for block `b` at byte `4 * b` of `.csum`:
//!   `crc32c(block) XOR crc32c(4096 zero bytes)`. So an all-zero block has
//!   entry 0: a block that was never written (a hole in `.data`, zeros in
//!   `.csum`) or was unmapped reads as zeros **and verifies**, with no
//!   special case and no ambiguity. The table is fully allocated at create
//!   (zeros written, not sparse), so later checksum updates never need new
//!   disk space.
//! - An extent whose `.meta` is corrupt or whose `.data` / `.csum` have the
//!   wrong length is *quarantined* at open: it is not served, it is listed
//!   by [`ExtentStore::quarantined`], and recovery re-replicates it (creating
//!   it again removes the bad files).
//!
//! # Write ordering and crashes
//!
//! A write stores data first, then the checksums. A crash (or an I/O error)
//! between the two leaves blocks whose checksum does not match their data:
//! they read as [`StoreError::Checksum`] and the caller repairs them from a
//! replica, which is the designed recovery path (that write was never
//! acknowledged, so any replica's content is acceptable). ENOSPC while
//! writing data is different: the store re-reads what actually landed and
//! rewrites the checksums to match before returning [`StoreError::NoSpace`],
//! so a full disk never turns into apparent corruption.
//!
//! Unmap punches the hole first, then zeroes the checksum entries; a crash
//! in between likewise shows up as checksum errors that repair fixes.
//!
//! # Epochs (fencing)
//!
//! Every extent carries an epoch that only moves forward. A write (or unmap)
//! carrying an epoch below the stored one fails with
//! [`StoreError::StaleEpoch`]; one carrying a newer epoch first persists the
//! new epoch, so from then on the old access point is fenced off even across
//! restarts. [`ExtentStore::set_epoch`] bumps it explicitly.
//!
//! # Resync (filling a learner)
//!
//! A recovery copy must never overwrite data that a normal write put on
//! the learner after the copy read its source. So every extent tracks, in
//! memory, which 4 KiB blocks normal writes and unmaps touched since the
//! extent's epoch last moved (since creation for a new extent; unknown for
//! an extent loaded at open). [`ExtentStore::begin_resync`] at the learner
//! epoch E (re)creates the extent empty at E, discarding an older copy
//! (into the trash, see "Deleting"); if the extent already reached E (an
//! access point wrote to the learner before the copy started) the blocks
//! written at E are kept and everything else is cleared, 1 MiB per hold of
//! the extent's lock so the learner's writes are never held up for the
//! whole clear. From then on the touched set only grows (epoch moves do
//! not reset it) and [`ExtentStore::resync_write`] writes only untouched
//! blocks, under the same extent lock as normal writes: whichever of a copy
//! piece and a normal write of a block comes second, the normal write's
//! data is what stays. [`ExtentStore::end_resync`] ends it. Outside a
//! resync the touched set is kept only for
//! [`StoreConfig::resync_track_window`] after the epoch moved (one bit per
//! block while it lasts).
//!
//! # Deleting
//!
//! Deleting an extent (garbage collection, a learner's setup discarding an
//! old copy, replacing a quarantined copy) never unlinks on the caller's
//! path: unlinking a large allocated file frees its blocks inside the
//! system call, which took seconds on a busy disk while the store's admin
//! lock and the extent's lock were held, stalling every write to the
//! extent. Instead the files are *renamed* into `<dir>/trash/` (`.meta`
//! first, the commit point) and the extents and trash directories are
//! fsynced; a background thread unlinks them and closes the old handles
//! afterwards. The store opens with whatever an earlier run left in the
//! trash queued for that thread, so a crash anywhere in a delete leaks
//! nothing and never resurrects an extent: the renames are prefix-durable
//! (one journal transaction each on ext4/XFS), and each prefix is a state
//! the store already handles (old extent intact; `.data`/`.csum` without
//! `.meta`: leftovers; nothing left). See `store/trash.rs`.
//!
//! Garbage collection of a copy meta no longer places here *retires* it
//! ([`ExtentStore::retire_extent_if_unchanged`]): deleted as above, and
//! remembered for a while as fenced at meta's epoch, so an access point on
//! an old view gets [`StoreError::StaleEpoch`] (and refreshes) instead of
//! reading zeros from the missing copy. See `store/retired.rs`.
//!
//! # Concurrency
//!
//! Each extent has its own lock: writes, unmaps, repairs and epoch changes of
//! one extent are exclusive, reads of it are shared; nothing of one extent
//! ever waits for another. The extent table is behind a read-mostly lock held
//! only for the lookup, never across I/O. fdatasync for FUA happens after the
//! extent lock is released. All disk I/O runs on tokio's blocking pool.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tracing::Instrument;

use crate::identity::{self, Identity, IdentityError, EXTENTS_DIR, TRASH_DIR};
use crate::kv;

mod copy;
mod retired;
mod trash;

pub use retired::RETIRED_TTL;

/// Block size: the unit of alignment and of checksumming.
pub const BLOCK_SIZE: u64 = 4096;
/// Default extent size (64 MiB).
pub const DEFAULT_EXTENT_SIZE: u64 = 64 << 20;
/// Largest extent size accepted (the checksum table of one extent is read
/// and written in pieces, but keep the numbers sane).
pub const MAX_EXTENT_SIZE: u64 = 1 << 40;
/// Longest volume id.
pub const MAX_VOLUME_LEN: usize = 128;
/// Format version of `.meta` files.
const META_FORMAT: u64 = 1;
const META_LIMIT: u64 = 4096;
/// Bytes of one checksum table entry.
const CSUM_BYTES: u64 = 4;
/// Blocks verified per scrub step (1 MiB of data).
const SCRUB_WINDOW_BLOCKS: u64 = 256;
/// Reads and non-FUA writes up to this size run on the calling task
/// ([`ExtentStore::inline`]); larger ones on the blocking pool.
const INLINE_IO_MAX: usize = 64 * 1024;
/// Largest zero-fill write (checksum table creation, unmap fallback).
const ZERO_CHUNK: usize = 1 << 20;
/// Blocks a learner's in-place clear of an old copy frees per hold of the
/// extent's lock (1 MiB; see `Inner::clear_untouched`).
const CLEAR_STEP_BLOCKS: u64 = 256;

/// Identifies an extent: the `index`-th extent-sized piece of `volume`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentId {
    pub volume: String,
    pub index: u64,
}

impl ExtentId {
    pub fn new(volume: impl Into<String>, index: u64) -> Self {
        ExtentId {
            volume: volume.into(),
            index,
        }
    }

    /// Volume ids become file names: 1-128 characters from `A-Z a-z 0-9 . _
    /// -`, not starting with `.`.
    pub fn validate(&self) -> Result<(), StoreError> {
        let v = &self.volume;
        let ok = !v.is_empty()
            && v.len() <= MAX_VOLUME_LEN
            && !v.starts_with('.')
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(())
        } else {
            Err(StoreError::InvalidId(v.clone()))
        }
    }

    fn stem(&self) -> String {
        format!("{}.{:016x}", self.volume, self.index)
    }

    /// Inverse of `stem` (None for names that are not ours).
    fn from_stem(stem: &str) -> Option<ExtentId> {
        let (volume, hex) = stem.rsplit_once('.')?;
        if hex.len() != 16 {
            return None;
        }
        let index = u64::from_str_radix(hex, 16).ok()?;
        let id = ExtentId::new(volume, index);
        id.validate().ok()?;
        Some(id)
    }
}

impl fmt::Display for ExtentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume, self.index)
    }
}

/// Errors of the extent store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("extent {0} not found")]
    NotFound(ExtentId),
    #[error("extent {0} already exists")]
    Exists(ExtentId),
    #[error("invalid volume id {0:?}: use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with '.')")]
    InvalidId(String),
    #[error(
        "I/O at offset {offset} length {len} is not a non-empty multiple of {BLOCK_SIZE} bytes"
    )]
    Unaligned { offset: u64, len: u64 },
    #[error("I/O at offset {offset} length {len} is beyond the extent size {extent_size}")]
    OutOfRange {
        offset: u64,
        len: u64,
        extent_size: u64,
    },
    #[error("stale epoch: extent is at epoch {have}, request carries {got}")]
    StaleEpoch { have: u64, got: u64 },
    #[error("resync of extent {extent}: {reason}")]
    ResyncConflict { extent: ExtentId, reason: String },
    #[error("checksum mismatch in extent {extent} block {block}")]
    Checksum { extent: ExtentId, block: u64 },
    #[error("no space left on the data disk")]
    NoSpace,
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("bad store configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("store task failed: {0}")]
    TaskFailed(String),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Map an I/O error: ENOSPC / EDQUOT are [`StoreError::NoSpace`]; a short
/// read (file shorter than it must be) is [`StoreError::Corrupt`].
fn io_err(op: &'static str, path: &Path, e: io::Error) -> StoreError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace,
        _ if e.kind() == io::ErrorKind::UnexpectedEof => StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{op}: file is shorter than expected"),
        },
        _ => StoreError::Io {
            op,
            path: path.to_path_buf(),
            source: e,
        },
    }
}

fn zero_block_crc() -> u32 {
    static CRC: OnceLock<u32> = OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0u8; BLOCK_SIZE as usize]))
}

/// Checksum table entry for one block (0 for an all-zero block).
pub fn block_checksum(block: &[u8]) -> u32 {
    crc32c::crc32c(block) ^ zero_block_crc()
}

fn checksums(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / BLOCK_SIZE as usize * CSUM_BYTES as usize);
    for block in data.chunks(BLOCK_SIZE as usize) {
        out.extend_from_slice(&block_checksum(block).to_le_bytes());
    }
    out
}

/// First block of `data` (relative index) whose checksum differs from `table`.
fn verify(data: &[u8], table: &[u8]) -> Option<u64> {
    data.chunks(BLOCK_SIZE as usize)
        .zip(table.chunks_exact(CSUM_BYTES as usize))
        .position(|(block, entry)| {
            let want = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
            block_checksum(block) != want
        })
        .map(|i| i as u64)
}

/// All failing blocks (relative indices).
fn verify_all(data: &[u8], table: &[u8]) -> Vec<u64> {
    data.chunks(BLOCK_SIZE as usize)
        .zip(table.chunks_exact(CSUM_BYTES as usize))
        .enumerate()
        .filter(|(_, (block, entry))| {
            let want = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
            block_checksum(block) != want
        })
        .map(|(i, _)| i as u64)
        .collect()
}

/// Store configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Size of extents created from now on (existing extents keep the size
    /// recorded in their `.meta`). A non-zero multiple of [`BLOCK_SIZE`].
    pub extent_size: u64,
    /// Refuse a directory stamped for another cluster.
    pub expected_cluster: Option<String>,
    /// Refuse a directory stamped for another chunk.
    pub expected_chunk: Option<String>,
    /// How long after an extent's epoch moves (or it is created) the blocks
    /// touched by normal writes are remembered for a resync that may start
    /// at that epoch (see "Resync"). Bounds the memory of the tracking (one
    /// bit per block) to recently changed extents; a resync starting later
    /// than this at the same epoch is refused and meta retries it.
    pub resync_track_window: Duration,
}

/// Default [`StoreConfig::resync_track_window`].
pub const DEFAULT_RESYNC_TRACK_WINDOW: Duration = Duration::from_secs(600);

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            extent_size: DEFAULT_EXTENT_SIZE,
            expected_cluster: None,
            expected_chunk: None,
            resync_track_window: DEFAULT_RESYNC_TRACK_WINDOW,
        }
    }
}

/// Counters of the store (monotonic; export them as Prometheus counters).
#[derive(Debug, Default)]
pub struct StoreMetrics {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub unmaps: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub repairs: AtomicU64,
    pub stale_epoch_rejects: AtomicU64,
    pub no_space_errors: AtomicU64,
    /// Bytes written by [`ExtentStore::resync_write`] (blocks skipped as
    /// touched or zero not counted).
    pub resync_written_bytes: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// An extent found broken when the store opened; not served.
#[derive(Clone, Debug)]
pub struct Quarantined {
    pub id: ExtentId,
    pub reason: String,
}

/// Result of [`ExtentStore::repair`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairOutcome {
    /// The block was bad and now holds the given data.
    Repaired,
    /// The block verified by the time the repair ran (a newer write fixed
    /// it); it was left alone so the newer data is not overwritten.
    AlreadyGood,
}

/// Summary of one extent, as listed by [`ExtentStore::extent_info`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentInfo {
    pub id: ExtentId,
    pub epoch: u64,
    pub size: u64,
    /// A resync (recovery copy) is in progress: between
    /// [`ExtentStore::begin_resync`] and [`ExtentStore::end_resync`].
    pub resyncing: bool,
}

/// Capacity of the data file system, from `statvfs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    pub total_bytes: u64,
    /// Free for unprivileged writers (`f_bavail`).
    pub available_bytes: u64,
}

fn disk_space(dir: &Path) -> Result<DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| StoreError::Io {
        op: "statvfs",
        path: dir.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"),
    })?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized,
    // zero-initialised out parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io_err("statvfs", dir, io::Error::last_os_error()));
    }
    let frsize = st.f_frsize as u64;
    Ok(DiskSpace {
        total_bytes: (st.f_blocks as u64).saturating_mul(frsize),
        available_bytes: (st.f_bavail as u64).saturating_mul(frsize),
    })
}

struct Paths {
    meta: PathBuf,
    data: PathBuf,
    csum: PathBuf,
}

impl Paths {
    fn new(extents_dir: &Path, id: &ExtentId) -> Paths {
        let stem = id.stem();
        Paths {
            meta: extents_dir.join(format!("{stem}.meta")),
            data: extents_dir.join(format!("{stem}.data")),
            csum: extents_dir.join(format!("{stem}.csum")),
        }
    }
}

struct Files {
    data: File,
    csum: File,
}

struct State {
    epoch: u64,
    deleted: bool,
    track: Track,
    /// Store-wide sequence number of the last change (creation, write,
    /// unmap, epoch move, resync): see [`ExtentStore::change_stamps`].
    changed: u64,
}

/// Blocks touched by normal writes and unmaps (see "Resync" above).
#[derive(Default)]
struct Track {
    /// The epoch tracking started at (the extent's epoch then) and when;
    /// `None`: history unknown (loaded at open, or the tracking window
    /// passed).
    since: Option<(u64, Instant)>,
    /// One bit per block, allocated on the first touch.
    bits: Vec<u64>,
    /// A resync is in progress: `bits` only grows and never expires.
    resyncing: bool,
}

impl Track {
    fn fresh(epoch: u64, resyncing: bool) -> Track {
        Track {
            since: Some((epoch, Instant::now())),
            bits: Vec::new(),
            resyncing,
        }
    }

    /// The extent's epoch moved to `epoch`: start over, unless resyncing.
    fn advanced(&mut self, epoch: u64) {
        if !self.resyncing {
            self.since = Some((epoch, Instant::now()));
            self.bits = Vec::new();
        }
    }

    /// Whether every block touched at `epoch` is known: tracking started at
    /// exactly `epoch`, within `window`.
    fn covers(&self, epoch: u64, window: Duration) -> bool {
        self.since
            .is_some_and(|(e, at)| e == epoch && (self.resyncing || at.elapsed() <= window))
    }

    fn mark(&mut self, first: u64, blocks: u64, total: u64, window: Duration) {
        match self.since {
            None => return,
            Some((_, at)) if !self.resyncing && at.elapsed() > window => {
                // Nobody resynced at this epoch in time: stop remembering.
                self.since = None;
                self.bits = Vec::new();
                return;
            }
            Some(_) => {}
        }
        if self.bits.is_empty() {
            self.bits = vec![0u64; total.div_ceil(64) as usize];
        }
        for b in first..first + blocks {
            if let Some(w) = self.bits.get_mut((b / 64) as usize) {
                *w |= 1 << (b % 64);
            }
        }
    }

    fn touched(&self, block: u64) -> bool {
        self.bits
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }
}

struct Extent {
    id: ExtentId,
    size: u64,
    paths: Paths,
    state: RwLock<State>,
    /// Opened on first use and kept open.
    files: Mutex<Option<Arc<Files>>>,
}

impl Extent {
    fn blocks(&self) -> u64 {
        self.size / BLOCK_SIZE
    }

    fn files(&self) -> Result<Arc<Files>> {
        let mut g = self.files.lock();
        if let Some(f) = &*g {
            return Ok(f.clone());
        }
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| match e.kind() {
                    // Deleted under us (a concurrent delete_extent).
                    io::ErrorKind::NotFound => StoreError::NotFound(self.id.clone()),
                    _ => io_err("open", p, e),
                })
        };
        let data = open(&self.paths.data)?;
        advise_random(&data);
        let f = Arc::new(Files {
            data,
            csum: open(&self.paths.csum)?,
        });
        *g = Some(f.clone());
        Ok(f)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 || !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(StoreError::Unaligned { offset, len });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                extent_size: self.size,
            }),
        }
    }

    fn write_meta(&self, epoch: u64) -> Result<()> {
        let text = meta_text(&self.id, self.size, epoch);
        kv::write_atomic(&self.paths.meta, text.as_bytes())
            .map_err(|e| io_err("write", &self.paths.meta, e))
    }

    fn read_csums(&self, files: &Files, first_block: u64, blocks: u64) -> Result<Vec<u8>> {
        let mut table = vec![0u8; (blocks * CSUM_BYTES) as usize];
        files
            .csum
            .read_exact_at(&mut table, first_block * CSUM_BYTES)
            .map_err(|e| io_err("read", &self.paths.csum, e))?;
        Ok(table)
    }

    fn read_data(&self, files: &Files, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        files
            .data
            .read_exact_at(&mut buf, offset)
            .map_err(|e| io_err("read", &self.paths.data, e))?;
        Ok(buf)
    }

    fn write_csums(&self, files: &Files, first_block: u64, table: &[u8]) -> Result<()> {
        files
            .csum
            .write_all_at(table, first_block * CSUM_BYTES)
            .map_err(|e| io_err("write", &self.paths.csum, e))
    }

    fn sync(&self, files: &Files) -> Result<()> {
        files
            .data
            .sync_data()
            .map_err(|e| io_err("fdatasync", &self.paths.data, e))?;
        files
            .csum
            .sync_data()
            .map_err(|e| io_err("fdatasync", &self.paths.csum, e))
    }
}

fn meta_text(id: &ExtentId, size: u64, epoch: u64) -> String {
    kv::render(
        "ironblock extent metadata; do not edit",
        &[
            ("format", META_FORMAT.to_string()),
            ("volume", id.volume.clone()),
            ("index", id.index.to_string()),
            ("extent_size", size.to_string()),
            ("block_size", BLOCK_SIZE.to_string()),
            ("epoch", epoch.to_string()),
        ],
    )
}

fn check_extent_size(size: u64) -> Result<(), String> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) || size > MAX_EXTENT_SIZE {
        Err(format!(
            "extent size {size} must be a non-zero multiple of {BLOCK_SIZE} up to {MAX_EXTENT_SIZE}"
        ))
    } else {
        Ok(())
    }
}

/// Parse and validate a `.meta` file; returns (size, epoch).
fn load_meta(path: &Path, id: &ExtentId) -> Result<(u64, u64), String> {
    let raw = kv::read_small(path, META_LIMIT).map_err(|e| e.to_string())?;
    let map = kv::parse(&raw)?;
    let format = kv::get_u64(&map, "format")?;
    if format != META_FORMAT {
        return Err(format!("unsupported format {format}"));
    }
    let volume = kv::get(&map, "volume")?;
    let index = kv::get_u64(&map, "index")?;
    if volume != id.volume || index != id.index {
        return Err(format!(
            "file name says extent {id}, content says {volume}/{index}"
        ));
    }
    let block_size = kv::get_u64(&map, "block_size")?;
    if block_size != BLOCK_SIZE {
        return Err(format!("unsupported block size {block_size}"));
    }
    let size = kv::get_u64(&map, "extent_size")?;
    check_extent_size(size)?;
    let epoch = kv::get_u64(&map, "epoch")?;
    Ok((size, epoch))
}

fn file_len(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path, e)),
    }
}

/// Punch a hole; `Ok(false)` if the file system cannot.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(false);
    };
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
        _ => Err(e),
    }
}

/// Largest single `pwrite` into an extent's `.data` file (64 KiB).
///
/// The page cache builds its folios from the writes it is given: one
/// 1 MiB `pwrite` becomes one 1 MiB folio (up to 2 MiB ones on current
/// kernels), and ext4 then walks every block of a folio for each later
/// 4 KiB write into it (`ext4_block_write_begin`). After a bulk fill (a
/// `qemu-img convert`, a recovery or locality copy) that made each small
/// write of the volume several times dearer: in the bench rig a chunk
/// spent 67 µs of CPU per 4 KiB random write against 17.5 µs with the
/// same extents in small folios. Writing in 64 KiB pieces keeps folios
/// small (a 4 KiB `pwrite` into 64 KiB folios costs what it costs into
/// 4 KiB ones, measured 2.3 against 4.9 µs for 1 MiB and 10 µs for 2 MiB
/// folios) for 16 syscalls per MiB of bulk data.
const DATA_WRITE_PIECE: usize = 64 << 10;

/// `write_all_at` into a `.data` file in pieces of at most
/// [`DATA_WRITE_PIECE`].
fn write_data_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut at = offset;
    for piece in data.chunks(DATA_WRITE_PIECE) {
        file.write_all_at(piece, at)?;
        at += piece.len() as u64;
    }
    Ok(())
}

/// Tell the kernel that reads of `file` are random: no readahead. The
/// initiators do their own readahead and send it as commands; the kernel's
/// on top would also fill the page cache with large folios, which make
/// later small writes dear (see [`DATA_WRITE_PIECE`]). Advice only: a
/// failure changes nothing else.
fn advise_random(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is
    // open for the duration of the call (borrowed from `file`).
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if rc != 0 {
        tracing::debug!(rc, "posix_fadvise(RANDOM) failed");
    }
}

fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

struct Inner {
    extents_dir: PathBuf,
    identity: Identity,
    extent_size: u64,
    extents: RwLock<HashMap<ExtentId, Arc<Extent>>>,
    /// Serializes create and delete (never taken on the I/O path).
    admin: Mutex<()>,
    quarantined: Mutex<HashMap<ExtentId, String>>,
    metrics: StoreMetrics,
    /// [`StoreConfig::resync_track_window`].
    track_window: Duration,
    /// Source of [`State::changed`].
    changes: AtomicU64,
    /// Where deleted files go (see "Deleting" in the module docs).
    trash: trash::Trash,
    /// Tombstones of extents garbage collection retired (see
    /// `store/retired.rs`).
    retired: retired::Retired,
}

/// The extent store of one chunk. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct ExtentStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for ExtentStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtentStore")
            .field("dir", &self.inner.extents_dir)
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

impl ExtentStore {
    /// Open the store on a stamped data directory (see
    /// [`crate::identity::init`]). Refuses an unstamped directory or one of
    /// another cluster / chunk. Loads every extent's metadata; broken extents
    /// are quarantined, leftovers of interrupted creates and deletes are
    /// removed. Blocking: call at start-up or from `spawn_blocking`.
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<ExtentStore> {
        let span = tracing::info_span!("store_open", dir = %dir.display());
        let _e = span.enter();
        check_extent_size(cfg.extent_size).map_err(StoreError::Config)?;
        let identity = identity::open(
            dir,
            cfg.expected_cluster.as_deref(),
            cfg.expected_chunk.as_deref(),
        )?;
        let extents_dir = dir.join(EXTENTS_DIR);
        std::fs::create_dir_all(&extents_dir).map_err(|e| io_err("create", &extents_dir, e))?;
        let trash_dir = dir.join(TRASH_DIR);
        let trash = trash::Trash::open(&trash_dir).map_err(|e| io_err("open", &trash_dir, e))?;
        let mut metas = Vec::new();
        let mut others: HashMap<ExtentId, Vec<PathBuf>> = HashMap::new();
        let rd = std::fs::read_dir(&extents_dir).map_err(|e| io_err("list", &extents_dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| io_err("list", &extents_dir, e))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                tracing::warn!(path = %path.display(), "ignoring non-UTF-8 file name");
                continue;
            };
            if name.ends_with(".tmp") {
                tracing::info!(path = %path.display(), "removing leftover temp file");
                remove_if_exists(&path)?;
                continue;
            }
            let parsed = name
                .rsplit_once('.')
                .and_then(|(stem, ext)| Some((ExtentId::from_stem(stem)?, ext)));
            match parsed {
                Some((id, "meta")) => metas.push(id),
                Some((id, "data" | "csum")) => others.entry(id).or_default().push(path),
                _ => tracing::warn!(path = %path.display(), "ignoring unknown file"),
            }
        }
        let mut extents = HashMap::new();
        let mut quarantined = HashMap::new();
        for id in metas {
            others.remove(&id);
            let paths = Paths::new(&extents_dir, &id);
            let checked = load_meta(&paths.meta, &id).and_then(|(size, epoch)| {
                let data_len = file_len(&paths.data)?;
                if data_len != size {
                    return Err(format!("data file is {data_len} bytes, expected {size}"));
                }
                let want = size / BLOCK_SIZE * CSUM_BYTES;
                let csum_len = file_len(&paths.csum)?;
                if csum_len != want {
                    return Err(format!(
                        "checksum file is {csum_len} bytes, expected {want}"
                    ));
                }
                Ok((size, epoch))
            });
            match checked {
                Ok((size, epoch)) => {
                    let ext = Extent {
                        id: id.clone(),
                        size,
                        paths,
                        state: RwLock::new(State {
                            epoch,
                            deleted: false,
                            changed: 0,
                            track: Track::default(),
                        }),
                        files: Mutex::new(None),
                    };
                    extents.insert(id, Arc::new(ext));
                }
                Err(reason) => {
                    tracing::error!(extent = %id, %reason, "quarantining broken extent");
                    quarantined.insert(id, reason);
                }
            }
        }
        for (id, paths) in others {
            tracing::info!(extent = %id, "removing leftovers of an interrupted create/delete");
            let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            trash
                .discard(&extents_dir, &paths, None)
                .map_err(|(p, op, e)| io_err(op, &p, e))?;
        }
        tracing::info!(
            extents = extents.len(),
            quarantined = quarantined.len(),
            cluster = %identity.cluster_id,
            chunk = %identity.chunk_id,
            "extent store open"
        );
        Ok(ExtentStore {
            inner: Arc::new(Inner {
                extents_dir,
                identity,
                extent_size: cfg.extent_size,
                extents: RwLock::new(extents),
                admin: Mutex::new(()),
                quarantined: Mutex::new(quarantined),
                metrics: StoreMetrics::default(),
                track_window: cfg.resync_track_window,
                changes: AtomicU64::new(0),
                trash,
                retired: retired::Retired::new(RETIRED_TTL),
            }),
        })
    }

    /// The identity of the data directory.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// Size of newly created extents.
    pub fn extent_size(&self) -> u64 {
        self.inner.extent_size
    }

    /// Fault injection for tests: from now on, freeing the blocks of an
    /// extent takes `delay` longer (as unlinking or punching a large,
    /// fragmented file on a busy disk can take seconds): a deleted extent's
    /// unlink, and a learner's in-place clear of an old copy (spread over
    /// its steps). For a deleted extent the delay is spent on the trash's
    /// background thread, never on the caller's path (see "Deleting" in the
    /// module docs); for the in-place clear, inside its steps, with the
    /// extent's lock released between them.
    pub fn set_delete_delay(&self, delay: Duration) {
        self.inner.trash.set_delay(delay);
    }

    /// Files of deleted extents waiting in the trash for the background
    /// unlink (including what an earlier run left there).
    pub fn trash_pending(&self) -> u64 {
        self.inner.trash.pending()
    }

    /// Files the trash's background thread unlinked since the store opened.
    pub fn trash_deleted(&self) -> u64 {
        self.inner.trash.deleted()
    }

    /// Counters.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    /// Extents found broken at open (not served; to be re-replicated).
    pub fn quarantined(&self) -> Vec<Quarantined> {
        let mut v: Vec<_> = self
            .inner
            .quarantined
            .lock()
            .iter()
            .map(|(id, reason)| Quarantined {
                id: id.clone(),
                reason: reason.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// All extents, sorted.
    pub fn list_extents(&self) -> Vec<ExtentId> {
        let mut v: Vec<_> = self.inner.extents.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// All extents with epoch and size, sorted.
    pub fn extent_info(&self) -> Vec<ExtentInfo> {
        let exts: Vec<_> = self.inner.extents.read().values().cloned().collect();
        let mut v: Vec<_> = exts
            .iter()
            .map(|e| {
                let st = e.state.read();
                ExtentInfo {
                    id: e.id.clone(),
                    epoch: st.epoch,
                    size: e.size,
                    resyncing: st.track.resyncing,
                }
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Current epoch of an extent.
    pub fn extent_epoch(&self, id: &ExtentId) -> Result<u64> {
        let ext = self.inner.get(id)?;
        let st = ext.state.read();
        if st.deleted {
            return Err(StoreError::NotFound(id.clone()));
        }
        Ok(st.epoch)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| f(&inner)))
            .await
            .map_err(|e| StoreError::TaskFailed(e.to_string()))?
    }

    /// Run a small, page-cache-sized operation (see [`INLINE_IO_MAX`]) on
    /// the calling task: a hop to the blocking pool and back costs two
    /// thread wake-ups, several times the pread/pwrite itself. Anything
    /// that may wait for the disk (fsync, large transfers) uses
    /// [`ExtentStore::blocking`].
    fn inline<T>(&self, f: impl FnOnce(&Inner) -> Result<T>) -> Result<T> {
        f(&self.inner)
    }

    /// Create an empty extent (reads as zeros) at `epoch`, durably.
    pub async fn create_extent(&self, id: &ExtentId, epoch: u64) -> Result<()> {
        let id = id.clone();
        let span = tracing::debug_span!("create_extent", extent = %id, epoch);
        self.blocking(move |s| s.create_extent(id, epoch))
            .instrument(span)
            .await
    }

    /// Start filling this chunk's copy of `id` as a learner at `epoch`
    /// (see "Resync" in the module docs): (re)creates the extent empty at
    /// `epoch`, discarding an older local copy, and from now on tracks the
    /// blocks normal writes and unmaps touch. If the extent is already at
    /// `epoch` (normal writes reached the learner first) what they wrote is
    /// kept and the rest cleared. Refused with [`StoreError::StaleEpoch`] if
    /// the extent is already past `epoch` and with
    /// [`StoreError::ResyncConflict`] if it is at `epoch` with an unknown
    /// history (loaded at open): which of its blocks are new cannot be told.
    pub async fn begin_resync(&self, id: &ExtentId, epoch: u64) -> Result<()> {
        let id = id.clone();
        let span = tracing::info_span!("begin_resync", extent = %id, epoch);
        self.blocking(move |s| s.begin_resync(&id, epoch))
            .instrument(span)
            .await
    }

    /// Write a piece of a recovery copy: `data` (4096-aligned, within the
    /// extent) at `offset`, but only the blocks no normal write or unmap
    /// touched since [`ExtentStore::begin_resync`] and only the non-zero
    /// ones (the resync started from an empty extent). Atomic with respect
    /// to normal writes of the extent. Not fenced by epoch; not durable
    /// until [`ExtentStore::flush`]. Returns the bytes actually written.
    /// [`StoreError::ResyncConflict`] if no resync is in progress.
    pub async fn resync_write(&self, id: &ExtentId, offset: u64, data: Bytes) -> Result<u64> {
        let id = id.clone();
        let span = tracing::trace_span!("resync_write", extent = %id, offset, len = data.len());
        self.blocking(move |s| s.resync_write(&id, offset, &data))
            .instrument(span)
            .await
    }

    /// End the resync of `id` (the copy is complete or abandoned).
    pub async fn end_resync(&self, id: &ExtentId) -> Result<()> {
        let ext = self.inner.get(id)?;
        let mut st = ext.state.write();
        if st.deleted {
            return Err(StoreError::NotFound(id.clone()));
        }
        if st.track.resyncing {
            st.track.resyncing = false;
            tracing::info!(extent = %id, epoch = st.epoch, "resync ended");
        }
        Ok(())
    }

    /// Whether a resync of `id` is in progress.
    pub fn resyncing(&self, id: &ExtentId) -> Result<bool> {
        let ext = self.inner.get(id)?;
        let st = ext.state.read();
        Ok(!st.deleted && st.track.resyncing)
    }

    /// Every extent with its change stamp, sorted. The stamp moves on every
    /// creation, write, unmap, epoch move and resync step of the extent;
    /// [`ExtentStore::delete_extent_if_unchanged`] deletes only an extent
    /// whose stamp is still the one read here. Garbage collection reads the
    /// stamps *before* asking meta what this chunk holds, so an extent that
    /// became a learner (or was written, or resynced) after meta answered
    /// is never deleted on the strength of that older answer.
    pub fn change_stamps(&self) -> Vec<(ExtentId, u64)> {
        let exts: Vec<_> = self.inner.extents.read().values().cloned().collect();
        let mut v: Vec<_> = exts
            .iter()
            .filter_map(|e| {
                let st = e.state.read();
                (!st.deleted).then(|| (e.id.clone(), st.changed))
            })
            .collect();
        v.sort();
        v
    }

    /// Delete `id` (as [`ExtentStore::delete_extent`]) only if its change
    /// stamp is still `stamp`. `Ok(false)`: changed since, or gone.
    pub async fn delete_extent_if_unchanged(&self, id: &ExtentId, stamp: u64) -> Result<bool> {
        let id = id.clone();
        let span = tracing::debug_span!("delete_extent_if_unchanged", extent = %id, stamp);
        self.blocking(move |s| s.delete_if_unchanged(&id, stamp, None))
            .instrument(span)
            .await
    }

    /// Delete an extent and its files, durably. Waits for in-flight I/O on
    /// it; later I/O gets [`StoreError::NotFound`].
    pub async fn delete_extent(&self, id: &ExtentId) -> Result<()> {
        let id = id.clone();
        let span = tracing::debug_span!("delete_extent", extent = %id);
        self.blocking(move |s| s.delete_extent(&id))
            .instrument(span)
            .await
    }

    /// Move an extent's epoch forward (persisted before returning). Equal is
    /// a no-op; lower is [`StoreError::StaleEpoch`].
    pub async fn set_epoch(&self, id: &ExtentId, epoch: u64) -> Result<()> {
        let id = id.clone();
        let span = tracing::debug_span!("set_epoch", extent = %id, epoch);
        self.blocking(move |s| s.set_epoch(&id, epoch))
            .instrument(span)
            .await
    }

    /// Write `data` at `offset` (both 4096-aligned, within the extent).
    /// Refused with [`StoreError::StaleEpoch`] if `epoch` is below the
    /// extent's; a newer `epoch` is persisted first. With `fua` the data and
    /// checksums are on stable storage when this returns.
    pub async fn write(
        &self,
        id: &ExtentId,
        epoch: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<()> {
        let id = id.clone();
        let span =
            tracing::trace_span!("write", extent = %id, epoch, offset, len = data.len(), fua);
        if !fua && data.len() <= INLINE_IO_MAX {
            return span.in_scope(|| self.inline(|s| s.write(&id, epoch, offset, &data, false)));
        }
        self.blocking(move |s| s.write(&id, epoch, offset, &data, fua))
            .instrument(span)
            .await
    }

    /// Read and verify `len` bytes at `offset` (both 4096-aligned). A block
    /// failing its checksum gives [`StoreError::Checksum`] with its index in
    /// the extent (the first such block).
    pub async fn read(&self, id: &ExtentId, offset: u64, len: u64) -> Result<Bytes> {
        let id = id.clone();
        let span = tracing::trace_span!("read", extent = %id, offset, len);
        if len <= INLINE_IO_MAX as u64 {
            return span.in_scope(|| self.inline(|s| s.read(&id, offset, len)));
        }
        self.blocking(move |s| s.read(&id, offset, len))
            .instrument(span)
            .await
    }

    /// Replace block `block` with `good` (4096 bytes, e.g. fetched from a
    /// replica) if it still fails its checksum; durable on return. A block
    /// that verifies by now (a newer write landed) is left alone.
    pub async fn repair(&self, id: &ExtentId, block: u64, good: Bytes) -> Result<RepairOutcome> {
        let id = id.clone();
        let span = tracing::debug_span!("repair", extent = %id, block);
        self.blocking(move |s| s.repair(&id, block, &good))
            .instrument(span)
            .await
    }

    /// Deallocate `len` bytes at `offset` (aligned): they read as zeros.
    /// Fenced by `epoch` like a write.
    pub async fn unmap(&self, id: &ExtentId, epoch: u64, offset: u64, len: u64) -> Result<()> {
        let id = id.clone();
        let span = tracing::debug_span!("unmap", extent = %id, epoch, offset, len);
        self.blocking(move |s| s.unmap(&id, epoch, offset, len))
            .instrument(span)
            .await
    }

    /// fdatasync one extent (`Some`) or every extent (`None`).
    pub async fn flush(&self, id: Option<&ExtentId>) -> Result<()> {
        let id = id.cloned();
        let span = tracing::debug_span!("flush", extent = ?id.as_ref().map(|i| i.to_string()));
        self.blocking(move |s| s.flush(id.as_ref()))
            .instrument(span)
            .await
    }

    /// Verify every block of an extent; returns the indices of the blocks
    /// that fail. Works in 1 MiB steps, releasing the extent lock and
    /// yielding to the runtime between steps.
    pub async fn scrub(&self, id: &ExtentId) -> Result<Vec<u64>> {
        let span = tracing::debug_span!("scrub", extent = %id);
        async {
            let blocks = self.inner.get(id)?.blocks();
            let mut bad = Vec::new();
            let mut first = 0;
            while first < blocks {
                let n = SCRUB_WINDOW_BLOCKS.min(blocks - first);
                let id2 = id.clone();
                bad.extend(
                    self.blocking(move |s| s.scrub_window(&id2, first, n))
                        .await?,
                );
                first += n;
                tokio::task::yield_now().await;
            }
            if !bad.is_empty() {
                tracing::warn!(bad = bad.len(), "scrub found bad blocks");
            }
            Ok(bad)
        }
        .instrument(span)
        .await
    }

    /// Bytes of extent data actually allocated on disk (holes excluded;
    /// checksum tables and metadata not counted).
    pub async fn used_bytes(&self) -> Result<u64> {
        self.blocking(|s| s.used_bytes()).await
    }

    /// Size and free space of the file system holding the data directory.
    pub async fn disk_space(&self) -> Result<DiskSpace> {
        self.blocking(|s| disk_space(&s.extents_dir)).await
    }
}

impl Inner {
    /// A fresh change stamp (never 0).
    fn next_change(&self) -> u64 {
        self.changes.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn get(&self, id: &ExtentId) -> Result<Arc<Extent>> {
        self.extents
            .read()
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(id.clone()))
    }

    fn create_extent(&self, id: ExtentId, epoch: u64) -> Result<()> {
        id.validate()?;
        let _admin = self.admin.lock();
        self.create_locked(id, epoch, false)
    }

    /// Create with the admin lock held.
    fn create_locked(&self, id: ExtentId, epoch: u64, resyncing: bool) -> Result<()> {
        if self.extents.read().contains_key(&id) {
            return Err(StoreError::Exists(id));
        }
        // A copy garbage collection retired is fenced at the epoch meta
        // dropped this chunk with: only a newer one places it here again.
        self.retired.check_create(&id, epoch)?;
        let size = self.extent_size;
        let paths = Paths::new(&self.extents_dir, &id);
        // Leftovers (a quarantined extent, an interrupted create) go first.
        self.discard(&[&paths.meta, &paths.data, &paths.csum], None)?;
        let ext = Extent {
            id: id.clone(),
            size,
            paths,
            state: RwLock::new(State {
                epoch,
                deleted: false,
                changed: self.next_change(),
                track: Track::fresh(epoch, resyncing),
            }),
            files: Mutex::new(None),
        };
        let made = (|| {
            let create = |p: &Path| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(p)
                    .map_err(|e| io_err("create", p, e))
            };
            let data = create(&ext.paths.data)?;
            data.set_len(size)
                .map_err(|e| io_err("set_len", &ext.paths.data, e))?;
            let csum = create(&ext.paths.csum)?;
            write_zeros(&csum, 0, size / BLOCK_SIZE * CSUM_BYTES)
                .map_err(|e| io_err("write", &ext.paths.csum, e))?;
            data.sync_all()
                .map_err(|e| io_err("fsync", &ext.paths.data, e))?;
            csum.sync_all()
                .map_err(|e| io_err("fsync", &ext.paths.csum, e))?;
            // The commit point.
            ext.write_meta(epoch)?;
            advise_random(&data);
            *ext.files.lock() = Some(Arc::new(Files { data, csum }));
            Ok(())
        })();
        if let Err(e) = made {
            for p in [&ext.paths.meta, &ext.paths.data, &ext.paths.csum] {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        self.quarantined.lock().remove(&id);
        self.extents.write().insert(id, Arc::new(ext));
        tracing::debug!("extent created");
        Ok(())
    }

    fn delete_extent(&self, id: &ExtentId) -> Result<()> {
        let _admin = self.admin.lock();
        self.delete_locked(id)
    }

    /// Delete `id` only if nothing changed it since `stamp` was read (see
    /// [`ExtentStore::change_stamps`]); with `retire`, also leave a
    /// tombstone at that epoch (see `store/retired.rs`). Returns whether
    /// it was deleted.
    fn delete_if_unchanged(&self, id: &ExtentId, stamp: u64, retire: Option<u64>) -> Result<bool> {
        let _admin = self.admin.lock();
        let Some(ext) = self.extents.read().get(id).cloned() else {
            return Ok(false);
        };
        {
            // Held across the map removal: a mutation either stamped the
            // extent before (kept) or finds it deleted after.
            let mut st = ext.state.write();
            if st.deleted || st.changed != stamp {
                return Ok(false);
            }
            st.deleted = true;
            self.extents.write().remove(id);
            if let Some(epoch) = retire {
                self.tombstone(id, epoch);
            }
        }
        self.remove_files(&ext)?;
        Ok(true)
    }

    /// Move `paths` (in the extents directory, `.meta` first) into the
    /// trash, durably; the background thread unlinks them and then drops
    /// `hold`. O(1) in the files' sizes.
    fn discard(&self, paths: &[&Path], hold: Option<Arc<Files>>) -> Result<usize> {
        let hold = hold.map(|f| Box::new(f) as Box<dyn std::any::Any + Send>);
        self.trash
            .discard(&self.extents_dir, paths, hold)
            .map_err(|(p, op, e)| io_err(op, &p, e))
    }

    /// Remove the files of an extent already taken out of the table and
    /// marked deleted: renamed into the trash (`.meta` first: once it is
    /// gone the extent no longer exists), unlinked in the background. The
    /// open handles go along and are closed after the unlink, so the
    /// blocks are freed on the trash's thread.
    fn remove_files(&self, ext: &Extent) -> Result<()> {
        let hold = ext.files.lock().take();
        self.discard(&[&ext.paths.meta, &ext.paths.data, &ext.paths.csum], hold)?;
        tracing::debug!(extent = %ext.id, "extent deleted (files in the trash)");
        Ok(())
    }

    /// Delete with the admin lock held.
    fn delete_locked(&self, id: &ExtentId) -> Result<()> {
        let Some(ext) = self.extents.write().remove(id) else {
            // Deleting a quarantined extent removes its files.
            if self.quarantined.lock().remove(id).is_some() {
                let paths = Paths::new(&self.extents_dir, id);
                self.discard(&[&paths.meta, &paths.data, &paths.csum], None)?;
                return Ok(());
            }
            return Err(StoreError::NotFound(id.clone()));
        };
        let mut st = ext.state.write();
        st.deleted = true;
        self.remove_files(&ext)
    }

    fn set_epoch(&self, id: &ExtentId, epoch: u64) -> Result<()> {
        let ext = self.get(id)?;
        let mut st = ext.state.write();
        if st.deleted {
            return Err(StoreError::NotFound(id.clone()));
        }
        if epoch < st.epoch {
            bump(&self.metrics.stale_epoch_rejects, 1);
            return Err(StoreError::StaleEpoch {
                have: st.epoch,
                got: epoch,
            });
        }
        st.changed = self.next_change();
        if epoch > st.epoch {
            ext.write_meta(epoch)?;
            tracing::info!(extent = %id, from = st.epoch, to = epoch, "epoch advanced");
            st.epoch = epoch;
            st.track.advanced(epoch);
        }
        Ok(())
    }

    /// Under the extent's write lock: refuse a stale epoch, persist a newer one.
    fn fence(&self, ext: &Extent, st: &mut State, epoch: u64) -> Result<()> {
        if st.deleted {
            return Err(StoreError::NotFound(ext.id.clone()));
        }
        st.changed = self.next_change();
        if epoch < st.epoch {
            bump(&self.metrics.stale_epoch_rejects, 1);
            tracing::warn!(extent = %ext.id, have = st.epoch, got = epoch, "stale epoch refused");
            return Err(StoreError::StaleEpoch {
                have: st.epoch,
                got: epoch,
            });
        }
        if epoch > st.epoch {
            ext.write_meta(epoch)?;
            tracing::info!(extent = %ext.id, from = st.epoch, to = epoch, "epoch advanced by write");
            st.epoch = epoch;
            st.track.advanced(epoch);
        }
        Ok(())
    }

    fn write(&self, id: &ExtentId, epoch: u64, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let ext = self.get(id)?;
        ext.check_range(offset, data.len() as u64)?;
        let files = ext.files()?;
        let table = checksums(data);
        let first = offset / BLOCK_SIZE;
        {
            let mut st = ext.state.write();
            self.fence(&ext, &mut st, epoch)?;
            if let Err(e) = write_data_at(&files.data, data, offset) {
                let err = io_err("write", &ext.paths.data, e);
                if matches!(err, StoreError::NoSpace) {
                    bump(&self.metrics.no_space_errors, 1);
                    self.reconcile(&ext, &files, offset, data.len() as u64);
                }
                return Err(err);
            }
            ext.write_csums(&files, first, &table)?;
            st.track.mark(
                first,
                data.len() as u64 / BLOCK_SIZE,
                ext.blocks(),
                self.track_window,
            );
        }
        if fua {
            ext.sync(&files)?;
        }
        bump(&self.metrics.writes, 1);
        bump(&self.metrics.written_bytes, data.len() as u64);
        Ok(())
    }

    /// After a failed data write: make the checksums match whatever landed,
    /// so a full disk does not look like corruption. Best effort; if this
    /// fails too, the blocks read as checksum errors and get repaired.
    fn reconcile(&self, ext: &Extent, files: &Files, offset: u64, len: u64) {
        let res = ext
            .read_data(files, offset, len)
            .and_then(|now| ext.write_csums(files, offset / BLOCK_SIZE, &checksums(&now)));
        if let Err(e) = res {
            tracing::error!(extent = %ext.id, offset, len, error = %e,
                "could not reconcile checksums after a failed write; blocks will need repair");
        }
    }

    fn read(&self, id: &ExtentId, offset: u64, len: u64) -> Result<Bytes> {
        let ext = self.get(id)?;
        ext.check_range(offset, len)?;
        let files = ext.files()?;
        let first = offset / BLOCK_SIZE;
        let (data, table) = {
            let st = ext.state.read();
            if st.deleted {
                return Err(StoreError::NotFound(id.clone()));
            }
            (
                ext.read_data(&files, offset, len)?,
                ext.read_csums(&files, first, len / BLOCK_SIZE)?,
            )
        };
        if let Some(bad) = verify(&data, &table) {
            bump(&self.metrics.checksum_errors, 1);
            let block = first + bad;
            tracing::warn!(extent = %id, block, "checksum mismatch on read");
            return Err(StoreError::Checksum {
                extent: id.clone(),
                block,
            });
        }
        bump(&self.metrics.reads, 1);
        bump(&self.metrics.read_bytes, len);
        Ok(Bytes::from(data))
    }

    fn repair(&self, id: &ExtentId, block: u64, good: &[u8]) -> Result<RepairOutcome> {
        let ext = self.get(id)?;
        if block >= ext.blocks() {
            return Err(StoreError::OutOfRange {
                offset: block.saturating_mul(BLOCK_SIZE),
                len: BLOCK_SIZE,
                extent_size: ext.size,
            });
        }
        let offset = block * BLOCK_SIZE;
        if good.len() as u64 != BLOCK_SIZE {
            return Err(StoreError::Unaligned {
                offset,
                len: good.len() as u64,
            });
        }
        ext.check_range(offset, BLOCK_SIZE)?;
        let files = ext.files()?;
        {
            let st = ext.state.write();
            if st.deleted {
                return Err(StoreError::NotFound(id.clone()));
            }
            let now = ext.read_data(&files, offset, BLOCK_SIZE)?;
            let table = ext.read_csums(&files, block, 1)?;
            if verify(&now, &table).is_none() {
                tracing::info!(extent = %id, block, "block already good; repair skipped");
                return Ok(RepairOutcome::AlreadyGood);
            }
            files
                .data
                .write_all_at(good, offset)
                .map_err(|e| io_err("write", &ext.paths.data, e))?;
            ext.write_csums(&files, block, &checksums(good))?;
            ext.sync(&files)?;
        }
        bump(&self.metrics.repairs, 1);
        tracing::info!(extent = %id, block, "block repaired");
        Ok(RepairOutcome::Repaired)
    }

    fn unmap(&self, id: &ExtentId, epoch: u64, offset: u64, len: u64) -> Result<()> {
        let ext = self.get(id)?;
        ext.check_range(offset, len)?;
        let files = ext.files()?;
        let mut st = ext.state.write();
        self.fence(&ext, &mut st, epoch)?;
        let punched = punch_hole(&files.data, offset, len)
            .map_err(|e| io_err("punch hole", &ext.paths.data, e))?;
        if !punched {
            write_zeros(&files.data, offset, len)
                .map_err(|e| io_err("write", &ext.paths.data, e))?;
        }
        write_zeros(
            &files.csum,
            offset / BLOCK_SIZE * CSUM_BYTES,
            len / BLOCK_SIZE * CSUM_BYTES,
        )
        .map_err(|e| io_err("write", &ext.paths.csum, e))?;
        st.track.mark(
            offset / BLOCK_SIZE,
            len / BLOCK_SIZE,
            ext.blocks(),
            self.track_window,
        );
        bump(&self.metrics.unmaps, 1);
        Ok(())
    }

    fn begin_resync(&self, id: &ExtentId, epoch: u64) -> Result<()> {
        id.validate()?;
        let _admin = self.admin.lock();
        let existing = self.extents.read().get(id).cloned();
        if let Some(ext) = existing {
            let mut st = ext.state.write();
            if !st.deleted {
                if st.epoch > epoch {
                    return Err(StoreError::StaleEpoch {
                        have: st.epoch,
                        got: epoch,
                    });
                }
                if st.epoch == epoch {
                    if !st.track.covers(epoch, self.track_window) {
                        return Err(StoreError::ResyncConflict {
                            extent: id.clone(),
                            reason: format!(
                                "the local copy is at epoch {epoch} already but its history is unknown"
                            ),
                        });
                    }
                    // Normal writes at the learner epoch got here first:
                    // keep them, clear everything else. The touched set
                    // only grows from here (resyncing), and the clearing
                    // runs in steps that release the extent's lock, so
                    // writes of the extent interleave with it instead of
                    // waiting for the whole old copy to be freed.
                    st.track.resyncing = true;
                    st.changed = self.next_change();
                    drop(st);
                    let kept = self.clear_untouched(&ext)?;
                    tracing::info!(kept_blocks = kept, "resync started on the existing copy");
                    return Ok(());
                }
                // An older copy: discard it. It is marked deleted under the
                // same hold of its lock that judged its epoch, so no write
                // at the learner epoch can land on it in between (and be
                // lost with it, while its twin on a member may still be
                // in flight when the copy reads that block); later writes
                // find it gone and wait for the fresh copy below.
                tracing::info!(old_epoch = st.epoch, "discarding the old local copy");
                st.deleted = true;
                self.extents.write().remove(id);
                drop(st);
                self.remove_files(&ext)?;
            } else {
                drop(st);
                match self.delete_locked(id) {
                    Ok(()) | Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        } else if self.quarantined.lock().contains_key(id) {
            tracing::info!("replacing a quarantined copy");
        }
        self.create_locked(id.clone(), epoch, true)?;
        tracing::info!("resync started on an empty copy");
        Ok(())
    }

    /// Zero every block the extent's touched set does not mark (hole + zero
    /// checksum), [`CLEAR_STEP_BLOCKS`] at a time under the extent's write
    /// lock, released between steps: a normal write waits for one step at
    /// most, and a block it touches between steps is marked before the step
    /// that would clear it looks. Returns the number of marked (kept)
    /// blocks.
    fn clear_untouched(&self, ext: &Extent) -> Result<u64> {
        let files = ext.files()?;
        let total = ext.blocks();
        let delay = self.trash.delay();
        let mut kept = 0;
        let mut first = 0;
        while first < total {
            let end = first.saturating_add(CLEAR_STEP_BLOCKS).min(total);
            let mut st = ext.state.write();
            if st.deleted {
                return Err(StoreError::NotFound(ext.id.clone()));
            }
            st.changed = self.next_change();
            if !delay.is_zero() {
                // Fault injection: freeing the old copy's blocks is slow.
                std::thread::sleep(delay.mul_f64((end - first) as f64 / total as f64));
            }
            kept += Self::clear_range(ext, &files, &st.track, first, end)?;
            drop(st);
            first = end;
        }
        Ok(kept)
    }

    /// Zero the unmarked blocks in `first..end`; returns the marked ones.
    fn clear_range(
        ext: &Extent,
        files: &Files,
        track: &Track,
        first: u64,
        end: u64,
    ) -> Result<u64> {
        let mut kept = 0;
        let mut b = first;
        while b < end {
            if track.touched(b) {
                kept += 1;
                b += 1;
                continue;
            }
            let start = b;
            while b < end && !track.touched(b) {
                b += 1;
            }
            let (offset, len) = (start * BLOCK_SIZE, (b - start) * BLOCK_SIZE);
            let punched = punch_hole(&files.data, offset, len)
                .map_err(|e| io_err("punch hole", &ext.paths.data, e))?;
            if !punched {
                write_zeros(&files.data, offset, len)
                    .map_err(|e| io_err("write", &ext.paths.data, e))?;
            }
            write_zeros(&files.csum, start * CSUM_BYTES, (b - start) * CSUM_BYTES)
                .map_err(|e| io_err("write", &ext.paths.csum, e))?;
        }
        Ok(kept)
    }

    fn resync_write(&self, id: &ExtentId, offset: u64, data: &[u8]) -> Result<u64> {
        let ext = self.get(id)?;
        ext.check_range(offset, data.len() as u64)?;
        let files = ext.files()?;
        let first = offset / BLOCK_SIZE;
        let blocks = data.len() as u64 / BLOCK_SIZE;
        let bs = BLOCK_SIZE as usize;
        let mut st = ext.state.write();
        if st.deleted {
            return Err(StoreError::NotFound(id.clone()));
        }
        st.changed = self.next_change();
        if !st.track.resyncing {
            return Err(StoreError::ResyncConflict {
                extent: id.clone(),
                reason: "no resync in progress".into(),
            });
        }
        let skip = |b: u64| {
            st.track.touched(first + b)
                || data[b as usize * bs..(b as usize + 1) * bs]
                    .iter()
                    .all(|x| *x == 0)
        };
        let mut written = 0u64;
        let mut b = 0;
        while b < blocks {
            if skip(b) {
                b += 1;
                continue;
            }
            let start = b;
            while b < blocks && !skip(b) {
                b += 1;
            }
            let piece = &data[start as usize * bs..b as usize * bs];
            let at = offset + start * BLOCK_SIZE;
            if let Err(e) = write_data_at(&files.data, piece, at) {
                let err = io_err("write", &ext.paths.data, e);
                if matches!(err, StoreError::NoSpace) {
                    bump(&self.metrics.no_space_errors, 1);
                    self.reconcile(&ext, &files, at, piece.len() as u64);
                }
                return Err(err);
            }
            ext.write_csums(&files, first + start, &checksums(piece))?;
            written += piece.len() as u64;
        }
        drop(st);
        bump(&self.metrics.resync_written_bytes, written);
        Ok(written)
    }

    fn flush(&self, id: Option<&ExtentId>) -> Result<()> {
        let exts: Vec<Arc<Extent>> = match id {
            Some(id) => vec![self.get(id)?],
            None => self.extents.read().values().cloned().collect(),
        };
        for ext in exts {
            let files = ext.files.lock().clone();
            if let Some(files) = files {
                ext.sync(&files)?;
            }
        }
        Ok(())
    }

    fn scrub_window(&self, id: &ExtentId, first: u64, blocks: u64) -> Result<Vec<u64>> {
        let ext = self.get(id)?;
        ext.check_range(first * BLOCK_SIZE, blocks * BLOCK_SIZE)?;
        let files = ext.files()?;
        let (data, table) = {
            let st = ext.state.read();
            if st.deleted {
                return Err(StoreError::NotFound(id.clone()));
            }
            (
                ext.read_data(&files, first * BLOCK_SIZE, blocks * BLOCK_SIZE)?,
                ext.read_csums(&files, first, blocks)?,
            )
        };
        let bad: Vec<u64> = verify_all(&data, &table)
            .into_iter()
            .map(|b| first + b)
            .collect();
        if !bad.is_empty() {
            bump(&self.metrics.checksum_errors, bad.len() as u64);
        }
        Ok(bad)
    }

    fn used_bytes(&self) -> Result<u64> {
        let exts: Vec<Arc<Extent>> = self.extents.read().values().cloned().collect();
        let mut total = 0u64;
        for ext in exts {
            match std::fs::metadata(&ext.paths.data) {
                Ok(m) => total = total.saturating_add(m.blocks().saturating_mul(512)),
                // Deleted meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("stat", &ext.paths.data, e)),
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_block_checksum_is_zero() {
        assert_eq!(block_checksum(&[0u8; 4096]), 0);
        assert_ne!(block_checksum(&[1u8; 4096]), 0);
    }

    #[test]
    fn stem_round_trip() {
        let id = ExtentId::new("vol.with.dots-1", 0xdead_beef);
        assert_eq!(ExtentId::from_stem(&id.stem()), Some(id));
        assert_eq!(ExtentId::from_stem("vol.12"), None);
        assert_eq!(ExtentId::from_stem(".x.0000000000000000"), None);
        assert_eq!(ExtentId::from_stem("v.000000000000000g"), None);
        assert!(ExtentId::new("a/b", 0).validate().is_err());
        assert!(ExtentId::new("", 0).validate().is_err());
        assert!(ExtentId::new("x".repeat(129), 0).validate().is_err());
    }

    #[test]
    fn errno_mapping() {
        let p = Path::new("/x");
        assert!(matches!(
            io_err("write", p, io::Error::from_raw_os_error(libc::ENOSPC)),
            StoreError::NoSpace
        ));
        assert!(matches!(
            io_err("write", p, io::Error::from_raw_os_error(libc::EDQUOT)),
            StoreError::NoSpace
        ));
        assert!(matches!(
            io_err("read", p, io::Error::from(io::ErrorKind::UnexpectedEof)),
            StoreError::Corrupt { .. }
        ));
        assert!(matches!(
            io_err("read", p, io::Error::from_raw_os_error(libc::EIO)),
            StoreError::Io { .. }
        ));
    }

    #[test]
    fn verify_finds_blocks() {
        let mut data = vec![0u8; 4 * 4096];
        data[4096..8192].fill(7);
        let table = checksums(&data);
        assert_eq!(verify(&data, &table), None);
        data[3 * 4096 + 5] ^= 1;
        data[4096] ^= 1;
        assert_eq!(verify(&data, &table), Some(1));
        assert_eq!(verify_all(&data, &table), vec![1, 3]);
    }

    #[test]
    fn data_writes_go_in_pieces_and_land_whole() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("d"))
            .unwrap();
        advise_random(&f);
        // Not a multiple of the piece, starting off a piece boundary.
        let len = 3 * DATA_WRITE_PIECE + 5 * 4096;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        write_data_at(&f, &data, 8192).unwrap();
        let mut back = vec![0u8; len];
        f.read_exact_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);
        assert_eq!(f.metadata().unwrap().len(), 8192 + len as u64);
        write_data_at(&f, &[], 0).unwrap();
    }
}
