//! What the node has staged, kept as one JSON file per volume in the state
//! directory so it survives a restart of the plugin (the shared-session
//! logout decision needs every staged volume, not just this process's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CsiError, Result};

/// One staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    /// CSI volume id.
    pub volume_id: String,
    /// Portal logged in to.
    pub portal: String,
    /// Target IQN.
    pub target: String,
    /// LUN number.
    pub lun: u32,
    /// The device (canonical path) verified at stage time.
    pub device: PathBuf,
    /// The staging path.
    pub staging_path: PathBuf,
    /// "block" or "mount".
    pub access: String,
    /// The filesystem (mount access).
    pub fs_type: String,
    /// Staged for a read-only publication (a write-protected LUN, mounted
    /// ro). `None`: recorded by a plugin that did not keep it (the staging
    /// mount's flags are all that tell).
    #[serde(default)]
    pub read_only: Option<bool>,
    /// Publish targets -> read-only.
    #[serde(default)]
    pub published: BTreeMap<PathBuf, bool>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn io(what: &str, p: &Path, e: std::io::Error) -> CsiError {
    CsiError::Internal(format!("{what} {}: {e}", p.display()))
}

impl StateDir {
    /// Uses (and creates) `dir`.
    pub fn open(dir: &Path) -> Result<StateDir> {
        std::fs::create_dir_all(dir).map_err(|e| io("create state dir", dir, e))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, volume_id: &str, ext: &str) -> PathBuf {
        let safe: String = volume_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{safe}.{ext}"))
    }

    /// The staged record of a volume.
    pub fn get(&self, volume_id: &str) -> Result<Option<Staged>> {
        let p = self.path(volume_id, "json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CsiError::Internal(format!("corrupt state {}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &p, e)),
        }
    }

    /// Writes a record (atomically: temp file + rename).
    pub fn put(&self, s: &Staged) -> Result<()> {
        let p = self.path(&s.volume_id, "json");
        let tmp = self.path(&s.volume_id, "json.tmp");
        let b = serde_json::to_vec_pretty(s)
            .map_err(|e| CsiError::Internal(format!("encode state: {e}")))?;
        std::fs::write(&tmp, b).map_err(|e| io("write", &tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| io("rename", &p, e))
    }

    /// Removes a record (absent: Ok).
    pub fn remove(&self, volume_id: &str) -> Result<()> {
        let p = self.path(volume_id, "json");
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &p, e)),
        }
    }

    /// Every staged record.
    pub fn all(&self) -> Result<Vec<Staged>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| io("read", &self.dir, e))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                if let Ok(b) = std::fs::read(&p) {
                    if let Ok(s) = serde_json::from_slice::<Staged>(&b) {
                        out.push(s);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Marks that formatting the volume's device failed: the node never
    /// retries a format by itself; an operator removes the marker.
    pub fn mark_format_failed(&self, volume_id: &str, why: &str) -> Result<()> {
        let p = self.path(volume_id, "format-failed");
        std::fs::write(&p, why).map_err(|e| io("write", &p, e))
    }

    /// The reason a format failed earlier, if it did.
    pub fn format_failed(&self, volume_id: &str) -> Option<(PathBuf, String)> {
        let p = self.path(volume_id, "format-failed");
        std::fs::read_to_string(&p).ok().map(|s| (p, s))
    }
}
