//! The trash: how the store gets rid of extent files without waiting for
//! the file system to free their blocks.
//!
//! Unlinking (or truncating) a large, allocated file frees all its blocks
//! inside the system call, and on a busy disk that took seconds. The store
//! deletes under its admin lock and, for an extent being deleted, under the
//! extent's own lock, so a slow unlink there stalls every write that needs
//! the extent (a learner's setup discarding an old copy held up the writes
//! of the extent until the replica timeout). So deleting is split:
//!
//! 1. [`Trash::discard`], on the caller's path: each file is *renamed* into
//!    `<dir>/trash/` (`rename(2)` within one file system: atomic and O(1),
//!    whatever the file's size), then the extents directory and the trash
//!    directory are fsynced, so the files' absence from `extents/` is
//!    durable before the caller goes on (e.g. creates the extent again under
//!    the same names). The caller passes the `.meta` file first, which keeps
//!    the store's commit point: once `.meta` is gone the extent does not
//!    exist.
//! 2. A background thread (one per store) unlinks what was moved, in order,
//!    and closes the last handles of the old files after the unlink, so the
//!    blocks are freed on that thread and never on an I/O path.
//!
//! A crash at any point leaks nothing: when the store opens, everything
//! still in `trash/` is queued for the background thread (the store opens
//! without waiting for it). Files in the trash are never read: their names
//! (`<seq:016x>.<original name>`) are not extent names.
//!
//! If the rename fails with `EXDEV` (an operator mounted `extents/` and
//! `trash/` separately), the file is unlinked in place as before.

use std::any::Any;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::kv;

/// One batch of moved files, deleted in order.
struct Job {
    paths: Vec<PathBuf>,
    /// Open handles of the files, dropped (closed) after the unlinks.
    hold: Option<Box<dyn Any + Send>>,
}

/// Counters shared with the background thread.
#[derive(Debug, Default)]
struct Shared {
    /// Files moved into the trash and not yet unlinked.
    pending: AtomicU64,
    /// Files unlinked by the background thread (cumulative).
    deleted: AtomicU64,
    /// Fault injection: extra time per batch before unlinking, in µs.
    delay_us: AtomicU64,
}

/// See the module docs.
pub(super) struct Trash {
    dir: PathBuf,
    seq: AtomicU64,
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Trash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trash")
            .field("dir", &self.dir)
            .field("pending", &self.shared.pending.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Trash {
    /// Open (create) the trash directory `dir`, start the background thread
    /// and queue whatever an earlier run left in it.
    pub(super) fn open(dir: &Path) -> io::Result<Trash> {
        std::fs::create_dir_all(dir)?;
        let mut leftovers = Vec::new();
        let mut next = 0u64;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if let Some(seq) = name
                .to_str()
                .and_then(|n| n.split_once('.'))
                .and_then(|(hex, _)| u64::from_str_radix(hex, 16).ok())
            {
                next = next.max(seq.saturating_add(1));
            }
            leftovers.push(entry.path());
        }
        leftovers.sort();
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = shared.clone();
        let trash_dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("ironblock-trash".into())
            .spawn(move || run(rx, &worker, &trash_dir))?;
        let trash = Trash {
            dir: dir.to_path_buf(),
            seq: AtomicU64::new(next),
            tx,
            shared,
        };
        if !leftovers.is_empty() {
            tracing::info!(files = leftovers.len(), dir = %dir.display(),
                "emptying the trash left by an earlier run in the background");
            trash.queue(leftovers, None);
        }
        Ok(trash)
    }

    fn queue(&self, paths: Vec<PathBuf>, hold: Option<Box<dyn Any + Send>>) {
        self.shared
            .pending
            .fetch_add(paths.len() as u64, Ordering::Relaxed);
        let n = paths.len() as u64;
        if let Err(mpsc::SendError(job)) = self.tx.send(Job { paths, hold }) {
            // The thread is gone (it never exits while we hold the sender,
            // short of a panic): delete here rather than leak.
            self.shared.pending.fetch_sub(n, Ordering::Relaxed);
            tracing::warn!("trash thread gone; deleting in place");
            for p in &job.paths {
                unlink(p);
            }
        }
    }

    /// Move the existing ones of `paths` (all in `from`, the commit point
    /// first) into the trash and make that durable; they are unlinked in
    /// the background, after which `hold` (their open handles) is dropped.
    /// Missing files are skipped. Returns how many files were moved.
    pub(super) fn discard(
        &self,
        from: &Path,
        paths: &[&Path],
        hold: Option<Box<dyn Any + Send>>,
    ) -> Result<usize, (PathBuf, &'static str, io::Error)> {
        let mut moved = Vec::new();
        let mut removed = false;
        let mut result = Ok(());
        for p in paths {
            let Some(name) = p.file_name() else {
                continue;
            };
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let mut trash_name = std::ffi::OsString::from(format!("{seq:016x}."));
            trash_name.push(name);
            let to = self.dir.join(trash_name);
            match std::fs::rename(p, &to) {
                Ok(()) => moved.push(to),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => match std::fs::remove_file(p) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        result = Err((p.to_path_buf(), "remove", e));
                        break;
                    }
                },
                Err(e) => {
                    result = Err((p.to_path_buf(), "move to the trash", e));
                    break;
                }
            }
        }
        if result.is_ok() && (removed || !moved.is_empty()) {
            // The names are gone from `from` and (for a clean restart) are
            // in the trash: durable before the caller goes on. (On ext4 and
            // XFS one rename is one journal transaction, so the second
            // fsync finds nothing left to commit.)
            result = kv::fsync_dir(from)
                .map_err(|e| (from.to_path_buf(), "fsync", e))
                .and_then(|()| {
                    if moved.is_empty() {
                        Ok(())
                    } else {
                        kv::fsync_dir(&self.dir).map_err(|e| (self.dir.clone(), "fsync", e))
                    }
                });
        }
        let n = moved.len();
        // Queued even after an error: what was moved goes either way.
        if !moved.is_empty() || hold.is_some() {
            self.queue(moved, hold);
        }
        result.map(|()| n)
    }

    /// Files moved into the trash and not yet unlinked.
    pub(super) fn pending(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// Files the background thread unlinked so far.
    pub(super) fn deleted(&self) -> u64 {
        self.shared.deleted.load(Ordering::Relaxed)
    }

    /// The fault-injection delay (see [`Trash::set_delay`]).
    pub(super) fn delay(&self) -> Duration {
        Duration::from_micros(self.shared.delay_us.load(Ordering::Relaxed))
    }

    /// Fault injection: every batch waits `delay` before its unlinks.
    pub(super) fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_us.store(us, Ordering::Relaxed);
    }
}

fn unlink(p: &Path) -> bool {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        _ => std::fs::remove_file(p),
    };
    match r {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => {
            // Left for the next start to retry.
            tracing::warn!(path = %p.display(), error = %e, "could not delete a file in the trash");
            false
        }
    }
}

/// The background thread: runs until the store (the sender) is dropped and
/// the queue is empty.
fn run(rx: mpsc::Receiver<Job>, shared: &Shared, dir: &Path) {
    for job in rx {
        let delay = shared.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        for p in &job.paths {
            if unlink(p) {
                shared.deleted.fetch_add(1, Ordering::Relaxed);
            }
            shared.pending.fetch_sub(1, Ordering::Relaxed);
        }
        drop(job.hold);
        tracing::debug!(files = job.paths.len(), dir = %dir.display(), "trash emptied");
    }
}
