//! Data directory stamping: which cluster and which chunk a directory
//! belongs to.
//!
//! `init` writes the stamp file [`STAMP_FILE`] once; every start calls
//! [`open`], which refuses a directory that is unstamped, carries a corrupt
//! stamp, or belongs to another cluster or chunk. There is no silent reuse of
//! the wrong disk.
//!
//! # Stamp format (version 1)
//!
//! A small UTF-8 `key=value` file, self-checking with a trailing crc32c line:
//!
//! ```text
//! # ironblock chunk data directory stamp; do not edit
//! format=1
//! cluster_id=prod-a
//! chunk_id=3
//! created_unix=1764300000
//! crc32c=1a2b3c4d
//! ```
//!
//! It is written atomically (temp file, fsync, rename, fsync of the
//! directory).
//!
//! # `force`
//!
//! `init(.., force = true)` on a stamped (or non-empty) directory re-stamps it
//! **and wipes every extent in it**: data of the old identity must never be
//! served under the new one. The order is crash-safe: the old stamp is
//! removed first (durably), then the extents are wiped, then the new stamp is
//! written. A crash in between leaves an unstamped directory that refuses to
//! start until `init` is run again.
//!
//! These functions do blocking file I/O; they run once at start-up.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::kv;

/// Name of the stamp file inside the data directory.
pub const STAMP_FILE: &str = "IRONBLOCK_CHUNK";
/// Stamp format version this code writes and reads.
pub const STAMP_FORMAT: u32 = 1;
/// Directory (inside the data directory) that holds the extents.
pub const EXTENTS_DIR: &str = "extents";
/// Directory (inside the data directory) where the files of deleted extents
/// wait for the store's background unlink (see `store/trash.rs`).
pub const TRASH_DIR: &str = "trash";
/// Largest stamp file accepted.
const STAMP_LIMIT: u64 = 4096;
/// Longest cluster or chunk id.
pub const MAX_ID_LEN: usize = 128;

/// The identity recorded in a data directory's stamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: String,
    pub chunk_id: String,
    pub format: u32,
    /// Seconds since the Unix epoch when the directory was stamped.
    pub created_unix: u64,
}

/// Why a data directory was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("directory {dir} is not an ironblock chunk directory (no {STAMP_FILE} stamp); run init first")]
    NotStamped { dir: PathBuf },
    #[error("directory {dir} belongs to cluster {cluster} chunk {chunk}, not cluster {expected_cluster} chunk {}", .expected_chunk.as_deref().unwrap_or("*"))]
    WrongCluster {
        dir: PathBuf,
        cluster: String,
        chunk: String,
        expected_cluster: String,
        expected_chunk: Option<String>,
    },
    #[error("directory {dir} belongs to cluster {cluster} chunk {chunk}, not cluster {cluster} chunk {expected_chunk}")]
    WrongChunk {
        dir: PathBuf,
        cluster: String,
        chunk: String,
        expected_chunk: String,
    },
    #[error("stamp {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("stamp {path} has format {found}; this build understands format {STAMP_FORMAT}")]
    UnsupportedFormat { path: PathBuf, found: u64 },
    #[error("directory {dir} is already stamped for cluster {cluster} chunk {chunk}; use force to wipe and re-stamp it")]
    AlreadyStamped {
        dir: PathBuf,
        cluster: String,
        chunk: String,
    },
    #[error("directory {dir} is not stamped but holds extents; use force to wipe and stamp it")]
    NotEmpty { dir: PathBuf },
    #[error("invalid {what} {value:?}: use 1-{MAX_ID_LEN} characters from A-Z a-z 0-9 . _ : -")]
    InvalidId { what: &'static str, value: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io { op, path, source }
}

/// Check a cluster or chunk id: printable, no separators that would break the
/// stamp format or log lines.
pub fn validate_id(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidId {
            what,
            value: value.to_string(),
        })
    }
}

/// Read the stamp, if there is one. `Ok(None)` means "no stamp file".
pub fn read_stamp(dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let path = dir.join(STAMP_FILE);
    let raw = match kv::read_small(&path, STAMP_LIMIT) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(IdentityError::Corrupt {
                path,
                reason: e.to_string(),
            })
        }
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let corrupt = |reason: String| IdentityError::Corrupt {
        path: path.clone(),
        reason,
    };
    let map = kv::parse(&raw).map_err(corrupt)?;
    let format = kv::get_u64(&map, "format").map_err(corrupt)?;
    if format != u64::from(STAMP_FORMAT) {
        return Err(IdentityError::UnsupportedFormat {
            path,
            found: format,
        });
    }
    let cluster_id = kv::get(&map, "cluster_id").map_err(corrupt)?.to_string();
    let chunk_id = kv::get(&map, "chunk_id").map_err(corrupt)?.to_string();
    let created_unix = kv::get_u64(&map, "created_unix").map_err(corrupt)?;
    validate_id("cluster id", &cluster_id).map_err(|e| corrupt(e.to_string()))?;
    validate_id("chunk id", &chunk_id).map_err(|e| corrupt(e.to_string()))?;
    Ok(Some(Identity {
        cluster_id,
        chunk_id,
        format: STAMP_FORMAT,
        created_unix,
    }))
}

/// Does `dir/extents` exist and hold anything?
fn has_extents(dir: &Path) -> Result<bool, IdentityError> {
    let ext = dir.join(EXTENTS_DIR);
    match std::fs::read_dir(&ext) {
        Ok(mut it) => Ok(it.next().is_some()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("list", &ext)(e)),
    }
}

/// Stamp `dir` (created if missing) for `cluster_id` / `chunk_id`.
///
/// Refuses a stamped directory ([`IdentityError::AlreadyStamped`], or
/// [`IdentityError::Corrupt`] if the existing stamp is unreadable) and an
/// unstamped directory that holds extents ([`IdentityError::NotEmpty`]),
/// unless `force`: then the old stamp is removed, all extents are wiped and
/// the directory is stamped anew (see the module docs).
#[tracing::instrument(level = "info", skip_all, fields(dir = %dir.display(), cluster_id, chunk_id, force))]
pub fn init(
    dir: &Path,
    cluster_id: &str,
    chunk_id: &str,
    force: bool,
) -> Result<Identity, IdentityError> {
    validate_id("cluster id", cluster_id)?;
    validate_id("chunk id", chunk_id)?;
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let stamp = dir.join(STAMP_FILE);
    if !force {
        if let Some(old) = read_stamp(dir)? {
            return Err(IdentityError::AlreadyStamped {
                dir: dir.to_path_buf(),
                cluster: old.cluster_id,
                chunk: old.chunk_id,
            });
        }
        if has_extents(dir)? {
            return Err(IdentityError::NotEmpty {
                dir: dir.to_path_buf(),
            });
        }
    } else {
        match std::fs::remove_file(&stamp) {
            Ok(()) => kv::fsync_dir(dir).map_err(io_err("fsync", dir))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &stamp)(e)),
        }
        let ext = dir.join(EXTENTS_DIR);
        match std::fs::remove_dir_all(&ext) {
            Ok(()) => tracing::warn!(dir = %dir.display(), "force: wiped all extents"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("wipe", &ext)(e)),
        }
        let trash = dir.join(TRASH_DIR);
        match std::fs::remove_dir_all(&trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("wipe", &trash)(e)),
        }
    }
    let ext = dir.join(EXTENTS_DIR);
    std::fs::create_dir_all(&ext).map_err(io_err("create", &ext))?;
    let created_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let text = kv::render(
        "ironblock chunk data directory stamp; do not edit",
        &[
            ("format", STAMP_FORMAT.to_string()),
            ("cluster_id", cluster_id.to_string()),
            ("chunk_id", chunk_id.to_string()),
            ("created_unix", created_unix.to_string()),
        ],
    );
    kv::write_atomic(&stamp, text.as_bytes()).map_err(io_err("write", &stamp))?;
    tracing::info!("data directory stamped");
    Ok(Identity {
        cluster_id: cluster_id.to_string(),
        chunk_id: chunk_id.to_string(),
        format: STAMP_FORMAT,
        created_unix,
    })
}

/// Open a stamped directory, checking it belongs to `expected_cluster` and
/// `expected_chunk` (each `None` = accept any).
#[tracing::instrument(level = "info", skip_all, fields(dir = %dir.display()))]
pub fn open(
    dir: &Path,
    expected_cluster: Option<&str>,
    expected_chunk: Option<&str>,
) -> Result<Identity, IdentityError> {
    let id = read_stamp(dir)?.ok_or_else(|| IdentityError::NotStamped {
        dir: dir.to_path_buf(),
    })?;
    if let Some(want) = expected_cluster {
        if want != id.cluster_id {
            return Err(IdentityError::WrongCluster {
                dir: dir.to_path_buf(),
                cluster: id.cluster_id,
                chunk: id.chunk_id,
                expected_cluster: want.to_string(),
                expected_chunk: expected_chunk.map(str::to_string),
            });
        }
    }
    if let Some(want) = expected_chunk {
        if want != id.chunk_id {
            return Err(IdentityError::WrongChunk {
                dir: dir.to_path_buf(),
                cluster: id.cluster_id,
                chunk: id.chunk_id,
                expected_chunk: want.to_string(),
            });
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_open() {
        let d = tempfile::tempdir().unwrap();
        let id = init(d.path(), "A", "3", false).unwrap();
        assert_eq!(id.cluster_id, "A");
        let got = open(d.path(), Some("A"), Some("3")).unwrap();
        assert_eq!(got, id);
        assert_eq!(open(d.path(), None, None).unwrap(), id);
        assert!(d.path().join(EXTENTS_DIR).is_dir());
        assert!(!kv::tmp_path(&d.path().join(STAMP_FILE)).exists());
    }

    #[test]
    fn refusals() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        assert!(matches!(
            open(dir, None, None),
            Err(IdentityError::NotStamped { .. })
        ));
        init(dir, "A", "3", false).unwrap();
        let e = init(dir, "A", "3", false).unwrap_err();
        assert!(matches!(e, IdentityError::AlreadyStamped { .. }), "{e}");
        let e = open(dir, Some("B"), Some("5")).unwrap_err();
        assert!(matches!(e, IdentityError::WrongCluster { .. }));
        assert_eq!(
            e.to_string(),
            format!(
                "directory {} belongs to cluster A chunk 3, not cluster B chunk 5",
                dir.display()
            )
        );
        let e = open(dir, Some("A"), Some("5")).unwrap_err();
        assert!(matches!(e, IdentityError::WrongChunk { .. }));
        assert!(e
            .to_string()
            .contains("cluster A chunk 3, not cluster A chunk 5"));
        assert!(matches!(
            open(dir, None, Some("4")),
            Err(IdentityError::WrongChunk { .. })
        ));
        assert!(matches!(
            init(dir, "bad id", "3", true),
            Err(IdentityError::InvalidId { .. })
        ));
        assert!(matches!(
            init(dir, "A", "", true),
            Err(IdentityError::InvalidId { .. })
        ));
    }

    #[test]
    fn corrupt_and_unsupported() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        init(dir, "A", "3", false).unwrap();
        let stamp = dir.join(STAMP_FILE);
        let good = std::fs::read(&stamp).unwrap();
        let mut bad = good.clone();
        let i = bad.len() / 2;
        bad[i] ^= 0x20;
        std::fs::write(&stamp, &bad).unwrap();
        assert!(matches!(
            open(dir, None, None),
            Err(IdentityError::Corrupt { .. })
        ));
        // A stamp that is present but corrupt also blocks a plain init.
        assert!(matches!(
            init(dir, "A", "3", false),
            Err(IdentityError::Corrupt { .. })
        ));
        std::fs::write(&stamp, &good[..good.len() / 3]).unwrap();
        assert!(matches!(
            open(dir, None, None),
            Err(IdentityError::Corrupt { .. })
        ));
        std::fs::write(&stamp, vec![b'x'; 10_000]).unwrap();
        assert!(matches!(
            open(dir, None, None),
            Err(IdentityError::Corrupt { .. })
        ));
        std::fs::write(&stamp, b"").unwrap();
        assert!(matches!(
            open(dir, None, None),
            Err(IdentityError::Corrupt { .. })
        ));
        let v2 = kv::render(
            "future",
            &[
                ("format", "2".into()),
                ("cluster_id", "A".into()),
                ("chunk_id", "3".into()),
                ("created_unix", "0".into()),
            ],
        );
        std::fs::write(&stamp, v2).unwrap();
        assert!(matches!(
            open(dir, None, None),
            Err(IdentityError::UnsupportedFormat { found: 2, .. })
        ));
        let missing = kv::render("x", &[("format", "1".into()), ("cluster_id", "A".into())]);
        std::fs::write(&stamp, missing).unwrap();
        assert!(matches!(
            open(dir, None, None),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    #[test]
    fn force_restamps_and_wipes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        init(dir, "A", "3", false).unwrap();
        let leftover = dir.join(EXTENTS_DIR).join("vol.0000000000000000.data");
        std::fs::write(&leftover, b"old data").unwrap();
        std::fs::create_dir_all(dir.join(TRASH_DIR)).unwrap();
        let trashed = dir
            .join(TRASH_DIR)
            .join("0000000000000000.v.0000000000000000.data");
        std::fs::write(&trashed, b"older data").unwrap();
        init(dir, "B", "5", true).unwrap();
        assert!(!leftover.exists());
        assert!(!trashed.exists());
        let id = open(dir, Some("B"), Some("5")).unwrap();
        assert_eq!(id.chunk_id, "5");
        assert!(matches!(
            open(dir, Some("A"), None),
            Err(IdentityError::WrongCluster { .. })
        ));
    }

    #[test]
    fn unstamped_with_extents_needs_force() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::create_dir_all(dir.join(EXTENTS_DIR)).unwrap();
        // An empty extents dir is fine ...
        init(dir, "A", "1", false).unwrap();
        // ... one with content and no stamp is not.
        std::fs::remove_file(dir.join(STAMP_FILE)).unwrap();
        std::fs::write(dir.join(EXTENTS_DIR).join("x"), b"?").unwrap();
        assert!(matches!(
            init(dir, "A", "1", false),
            Err(IdentityError::NotEmpty { .. })
        ));
        init(dir, "A", "1", true).unwrap();
        assert!(!dir.join(EXTENTS_DIR).join("x").exists());
    }
}
