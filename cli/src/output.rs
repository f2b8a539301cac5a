//! Human tables and the JSON views.
//!
//! `--output json` prints one JSON value per command; the field names below
//! are stable (new fields may be added, none renamed or removed):
//!
//! - volume (`volume create|resize|clone`, an element of `volume list`):
//!   `id`, `name`, `size_bytes`, `replicas`, `thin`, `target_iqn`, `lun`,
//!   `vpd_serial`, `naa_id` (32 lowercase hex digits), `acl` (IQNs, every
//!   initiator whatever its mode), `acl_read_only` (the read-only subset),
//!   `acl_entries` (`[{initiator, mode}]`, mode `read-write`|`read-only`),
//!   `parent_snapshot_id` (null unless a clone), `created_at_unix_ms`,
//!   `capacity_generation`, `generation`, `home_chunk` (the chunk meta
//!   learned serves most of the volume's I/O, where an RF=1 volume's data
//!   moves; null until learned).
//! - `volume show`: the volume fields plus `portals` (`host:port` of the
//!   alive chunks), `snapshots` (snapshot objects) and `replication`
//!   (below).
//! - `volume set-replicas`: the volume fields plus `previous_replicas` and
//!   `replication`.
//! - replication (of one volume): `extents` (its extent records, snapshot
//!   generations included), `extents_off_factor` (fewer members than the
//!   extent's factor, or more: being recovered or trimmed), `extents_copying`
//!   (a recovery copy in flight), `complete` (`extents_off_factor` is 0).
//! - snapshot: `id`, `name`, `volume_id`, `size_bytes`, `created_at_unix_ms`,
//!   `generation`.
//! - `volume delete` / `snapshot delete`: `deleted` (bool), `id`, `name`.
//! - `acl add|set-mode|remove|list`: `volume_id`, `volume`, `acl` (IQNs),
//!   `acl_read_only`, `acl_entries` (as for a volume).
//! - chunk (`chunk list` elements, `chunk drain|remove`): `id`, `state`
//!   (`alive`, `dead`, `draining`, `removed`, `unknown`), `portal`,
//!   `data_addr`, `capacity_bytes`, `used_bytes`, `extents`,
//!   `last_heartbeat_ms_ago`.
//! - `status`: `cluster_id`, `health` (`ok`, `degraded`, `critical`,
//!   `unknown`), `chunks_alive`, `chunks_dead`, `chunks_draining`,
//!   `chunks_removed`, `volumes`, `snapshots`, `targets`, `extents`,
//!   `degraded_extents`, `unavailable_extents`, `recovery_queued`,
//!   `recovery_completed`, `recovery_failed`, `revision`.

use std::fmt::Write as _;

use ironblock_proto::v1 as pb;
use serde::Serialize;

/// A volume in JSON.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct VolumeJson {
    /// Volume id (UUID form).
    pub id: String,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Replication factor.
    pub replicas: u32,
    /// Thin provisioned.
    pub thin: bool,
    /// The iSCSI target the LUN lives on.
    pub target_iqn: String,
    /// LUN number on that target.
    pub lun: u32,
    /// VPD page 0x80 serial.
    pub vpd_serial: String,
    /// VPD page 0x83 NAA identifier, hex.
    pub naa_id: String,
    /// Initiators allowed to see the LUN.
    pub acl: Vec<String>,
    /// The read-only subset of `acl`.
    pub acl_read_only: Vec<String>,
    /// `acl` with each initiator's mode.
    pub acl_entries: Vec<AclEntryJson>,
    /// The snapshot a clone was made from.
    pub parent_snapshot_id: Option<String>,
    /// Creation time.
    pub created_at_unix_ms: u64,
    /// Bumped by each resize.
    pub capacity_generation: u64,
    /// Copy-on-write generation.
    pub generation: u64,
    /// The chunk that serves most of the volume's I/O (data locality).
    pub home_chunk: Option<u64>,
}

impl From<&pb::Volume> for VolumeJson {
    fn from(v: &pb::Volume) -> Self {
        VolumeJson {
            id: v.id.clone(),
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            replicas: v.replicas,
            thin: v.thin,
            target_iqn: v.target_iqn.clone(),
            lun: v.lun,
            vpd_serial: v.vpd_serial.clone(),
            naa_id: hex::encode(&v.naa_id),
            acl: v.acl.clone(),
            acl_read_only: v.acl_read_only.clone(),
            acl_entries: acl_entries(&v.acl, &v.acl_read_only),
            parent_snapshot_id: (!v.parent_snapshot_id.is_empty())
                .then(|| v.parent_snapshot_id.clone()),
            created_at_unix_ms: v.created_at_unix_ms,
            capacity_generation: v.capacity_generation,
            generation: v.generation,
            home_chunk: (v.home_chunk != 0).then_some(v.home_chunk),
        }
    }
}

/// `volume show` in JSON.
#[derive(Serialize, Debug, Clone)]
pub struct VolumeDetailJson {
    /// The volume.
    #[serde(flatten)]
    pub volume: VolumeJson,
    /// Portals of the alive chunks.
    pub portals: Vec<String>,
    /// The volume's snapshots.
    pub snapshots: Vec<SnapshotJson>,
    /// How far its extents are from their replication factors.
    pub replication: ReplicationJson,
}

/// How far one volume's extents are from their replication factors.
#[derive(Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationJson {
    /// Extent records (every generation).
    pub extents: u64,
    /// With fewer members than the extent's factor, or more.
    pub extents_off_factor: u64,
    /// With a recovery copy in flight (a learner).
    pub extents_copying: u64,
    /// No extent below (or above) its factor.
    pub complete: bool,
}

impl ReplicationJson {
    /// From GetExtents.
    pub fn of(extents: &[pb::Extent]) -> Self {
        let off = extents
            .iter()
            .filter(|e| e.degraded || e.replicas.len() > e.replication_factor.max(1) as usize)
            .count() as u64;
        ReplicationJson {
            extents: extents.len() as u64,
            extents_off_factor: off,
            extents_copying: extents.iter().filter(|e| !e.learners.is_empty()).count() as u64,
            complete: off == 0,
        }
    }

    /// One line for the tables.
    pub fn describe(&self) -> String {
        if self.complete {
            format!("complete ({} extents)", self.extents)
        } else {
            format!(
                "{} of {} extents off their replication factor, {} being copied (recovery goes on in the background)",
                self.extents_off_factor, self.extents, self.extents_copying
            )
        }
    }
}

/// `volume set-replicas` in JSON.
#[derive(Serialize, Debug, Clone)]
pub struct SetReplicasJson {
    /// The volume after the change.
    #[serde(flatten)]
    pub volume: VolumeJson,
    /// Its factor before.
    pub previous_replicas: u32,
    /// Where its extents stand.
    pub replication: ReplicationJson,
}

/// A snapshot in JSON.
#[derive(Serialize, Debug, Clone)]
pub struct SnapshotJson {
    /// Snapshot id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The volume it was taken of.
    pub volume_id: String,
    /// Size of the volume when taken.
    pub size_bytes: u64,
    /// Creation time.
    pub created_at_unix_ms: u64,
    /// The volume generation it froze.
    pub generation: u64,
}

impl From<&pb::Snapshot> for SnapshotJson {
    fn from(s: &pb::Snapshot) -> Self {
        SnapshotJson {
            id: s.id.clone(),
            name: s.name.clone(),
            volume_id: s.volume_id.clone(),
            size_bytes: s.size_bytes,
            created_at_unix_ms: s.created_at_unix_ms,
            generation: s.generation,
        }
    }
}

/// A deletion in JSON.
#[derive(Serialize, Debug, Clone)]
pub struct DeletedJson {
    /// False if there was nothing to delete.
    pub deleted: bool,
    /// Id of the deleted object (empty if there was none).
    pub id: String,
    /// Name as given or known.
    pub name: String,
}

/// One ACL entry in JSON.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct AclEntryJson {
    /// Initiator IQN.
    pub initiator: String,
    /// `read-write` or `read-only`.
    pub mode: &'static str,
}

/// The entries of an ACL: every initiator of `acl` with its mode
/// (`read-only` if it is in `read_only`), in `acl`'s order.
pub fn acl_entries(acl: &[String], read_only: &[String]) -> Vec<AclEntryJson> {
    acl.iter()
        .map(|i| AclEntryJson {
            initiator: i.clone(),
            mode: if read_only.iter().any(|r| r.eq_ignore_ascii_case(i)) {
                "read-only"
            } else {
                "read-write"
            },
        })
        .collect()
}

/// An ACL in JSON.
#[derive(Serialize, Debug, Clone)]
pub struct AclJson {
    /// Volume id.
    pub volume_id: String,
    /// Volume name.
    pub volume: String,
    /// Allowed initiators.
    pub acl: Vec<String>,
    /// The read-only subset of `acl`.
    pub acl_read_only: Vec<String>,
    /// `acl` with each initiator's mode.
    pub acl_entries: Vec<AclEntryJson>,
}

/// A chunk in JSON.
#[derive(Serialize, Debug, Clone)]
pub struct ChunkJson {
    /// Chunk id.
    pub id: u64,
    /// `alive`, `dead`, `draining`, `removed` or `unknown`.
    pub state: &'static str,
    /// iSCSI portal.
    pub portal: String,
    /// Replica transport address.
    pub data_addr: String,
    /// Capacity.
    pub capacity_bytes: u64,
    /// Used.
    pub used_bytes: u64,
    /// Extent replicas placed on it.
    pub extents: u64,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms_ago: u64,
}

/// The name of a chunk state.
pub fn chunk_state(s: i32) -> &'static str {
    match pb::ChunkState::try_from(s) {
        Ok(pb::ChunkState::Alive) => "alive",
        Ok(pb::ChunkState::Dead) => "dead",
        Ok(pb::ChunkState::Draining) => "draining",
        Ok(pb::ChunkState::Removed) => "removed",
        _ => "unknown",
    }
}

impl From<&pb::Chunk> for ChunkJson {
    fn from(c: &pb::Chunk) -> Self {
        ChunkJson {
            id: c.id,
            state: chunk_state(c.state),
            portal: c.portal.clone(),
            data_addr: c.data_addr.clone(),
            capacity_bytes: c.capacity_bytes,
            used_bytes: c.used_bytes,
            extents: c.extents,
            last_heartbeat_ms_ago: c.last_heartbeat_ms_ago,
        }
    }
}

/// `status` in JSON.
#[derive(Serialize, Debug, Clone)]
pub struct StatusJson {
    /// Cluster id.
    pub cluster_id: String,
    /// `ok`, `degraded`, `critical` or `unknown`.
    pub health: &'static str,
    /// Alive chunks.
    pub chunks_alive: u64,
    /// Dead chunks.
    pub chunks_dead: u64,
    /// Draining chunks.
    pub chunks_draining: u64,
    /// Removed chunks.
    pub chunks_removed: u64,
    /// Volumes.
    pub volumes: u64,
    /// Snapshots.
    pub snapshots: u64,
    /// Targets in use.
    pub targets: u64,
    /// Extents.
    pub extents: u64,
    /// Extents below their replication factor.
    pub degraded_extents: u64,
    /// Extents without a live copy.
    pub unavailable_extents: u64,
    /// Recovery tasks waiting or running.
    pub recovery_queued: u64,
    /// Recovery tasks done.
    pub recovery_completed: u64,
    /// Recovery tasks failed.
    pub recovery_failed: u64,
    /// Metadata revision.
    pub revision: u64,
    /// The meta group (members, leader, term).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<MetaGroupJson>,
}

/// One meta group member in JSON.
#[derive(Serialize, Debug, Clone)]
pub struct MetaMemberJson {
    /// Node id.
    pub id: u64,
    /// gRPC address.
    pub addr: String,
    /// `leader`, `voter` or `learner`.
    pub role: &'static str,
    /// Log entries behind the leader (0 when unknown).
    pub lag: u64,
}

/// `meta list` and the `meta` part of `status` in JSON.
#[derive(Serialize, Debug, Clone)]
pub struct MetaGroupJson {
    /// The member that answered.
    pub node_id: u64,
    /// The leader's id (0: none known).
    pub leader_id: u64,
    /// The leader's address.
    pub leader_addr: String,
    /// Raft term.
    pub term: u64,
    /// The answering member's last applied log index.
    pub applied_index: u64,
    /// Every member.
    pub members: Vec<MetaMemberJson>,
}

impl From<&pb::ListMetasResponse> for MetaGroupJson {
    fn from(r: &pb::ListMetasResponse) -> Self {
        MetaGroupJson {
            node_id: r.node_id,
            leader_id: r.leader_id,
            leader_addr: r.leader_addr.clone(),
            term: r.term,
            applied_index: r.applied_index,
            members: r
                .members
                .iter()
                .map(|m| MetaMemberJson {
                    id: m.id,
                    addr: m.addr.clone(),
                    role: if m.id == r.leader_id {
                        "leader"
                    } else if m.voter {
                        "voter"
                    } else {
                        "learner"
                    },
                    lag: m.lag,
                })
                .collect(),
        }
    }
}

impl MetaGroupJson {
    /// The members as a table.
    pub fn table(&self) -> String {
        let mut t = Table::new(&["ID", "ADDRESS", "ROLE", "LAG"]);
        for m in &self.members {
            t.row(vec![
                m.id.to_string(),
                m.addr.clone(),
                m.role.to_string(),
                m.lag.to_string(),
            ]);
        }
        t.render()
    }

    /// One line: the members, the leader, the term.
    pub fn summary(&self) -> String {
        let voters = self.members.iter().filter(|m| m.role != "learner").count();
        let leader = if self.leader_id == 0 {
            "no leader".to_string()
        } else {
            format!("leader {} ({})", self.leader_id, self.leader_addr)
        };
        format!(
            "{} members ({voters} voters), {leader}, term {}, applied index {}",
            self.members.len(),
            self.term,
            self.applied_index
        )
    }
}

impl From<&pb::ClusterStatusResponse> for StatusJson {
    fn from(s: &pb::ClusterStatusResponse) -> Self {
        StatusJson {
            cluster_id: s.cluster_id.clone(),
            health: match pb::Health::try_from(s.health) {
                Ok(pb::Health::Ok) => "ok",
                Ok(pb::Health::Degraded) => "degraded",
                Ok(pb::Health::Critical) => "critical",
                _ => "unknown",
            },
            chunks_alive: s.chunks_alive,
            chunks_dead: s.chunks_dead,
            chunks_draining: s.chunks_draining,
            chunks_removed: s.chunks_removed,
            volumes: s.volumes,
            snapshots: s.snapshots,
            targets: s.targets,
            extents: s.extents,
            degraded_extents: s.degraded_extents,
            unavailable_extents: s.unavailable_extents,
            recovery_queued: s.recovery_queued,
            recovery_completed: s.recovery_completed,
            recovery_failed: s.recovery_failed,
            revision: s.revision,
            meta: None,
        }
    }
}

/// Pretty JSON text of `v`.
pub fn json<T: Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)?)
}

/// `bytes` in binary units: `512 B`, `4 KiB`, `1.5 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round() as u64, UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// Milliseconds as `850ms`, `3.2s`, `5m10s`, `2h3m`.
pub fn human_duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}h{}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// A Unix time in milliseconds as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn utc_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// A text table: a header row and left-aligned columns two spaces apart.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells are empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The rendered table, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                let _ = write!(line, "{c:<w$}  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key  value` lines with the keys aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = writeln!(out, "{k:<w$}  {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(3 << 29), "1.50 GiB");
        assert_eq!(human_size(10 << 30), "10 GiB");
        assert_eq!(human_size(1 << 40), "1 TiB");
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration_ms(850), "850ms");
        assert_eq!(human_duration_ms(3200), "3.2s");
        assert_eq!(human_duration_ms(310_000), "5m10s");
        assert_eq!(human_duration_ms(7_380_000), "2h3m");
    }

    #[test]
    fn times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_700_000_000_123), "2023-11-14 22:13:20");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["NAME", "SIZE"]);
        t.row(vec!["a-long-name".into(), "1 GiB".into()]);
        t.row(vec!["b".into(), "10 GiB".into()]);
        let s = t.render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "NAME         SIZE");
        assert_eq!(lines[1], "a-long-name  1 GiB");
        assert_eq!(lines[2], "b            10 GiB");
    }

    #[test]
    fn replication_progress() {
        let e = |replicas: Vec<u64>, learners: Vec<u64>, factor: u32| pb::Extent {
            degraded: (replicas.len() as u32) < factor,
            replicas,
            learners,
            replication_factor: factor,
            ..Default::default()
        };
        let done = ReplicationJson::of(&[e(vec![1, 2], vec![], 2), e(vec![3], vec![], 1)]);
        assert_eq!(
            done,
            ReplicationJson {
                extents: 2,
                extents_off_factor: 0,
                extents_copying: 0,
                complete: true
            }
        );
        assert_eq!(done.describe(), "complete (2 extents)");
        // Short and copying, short and waiting for a spare, a surplus.
        let mid = ReplicationJson::of(&[
            e(vec![1], vec![2], 2),
            e(vec![1], vec![], 3),
            e(vec![1, 2, 3], vec![], 2),
            e(vec![2, 3], vec![], 2),
        ]);
        assert_eq!(
            (
                mid.extents,
                mid.extents_off_factor,
                mid.extents_copying,
                mid.complete
            ),
            (4, 3, 1, false)
        );
        assert!(
            mid.describe().starts_with("3 of 4 extents"),
            "{}",
            mid.describe()
        );
        let j = serde_json::to_value(SetReplicasJson {
            volume: VolumeJson::from(&pb::Volume::default()),
            previous_replicas: 1,
            replication: mid,
        })
        .unwrap();
        assert_eq!(j["previous_replicas"], 1);
        assert_eq!(j["replication"]["extents_off_factor"], 3);
        assert_eq!(j["replication"]["complete"], false);
        assert!(j.get("replicas").is_some(), "volume fields flattened");
    }

    #[test]
    fn volume_json_names() {
        let v = pb::Volume {
            id: "i".into(),
            name: "n".into(),
            naa_id: vec![0x6a, 0x01],
            ..Default::default()
        };
        let j = serde_json::to_value(VolumeJson::from(&v)).unwrap();
        assert_eq!(j["naa_id"], "6a01");
        assert!(j["parent_snapshot_id"].is_null());
        for k in [
            "id",
            "name",
            "size_bytes",
            "replicas",
            "thin",
            "target_iqn",
            "lun",
            "acl",
        ] {
            assert!(j.get(k).is_some(), "missing {k}");
        }
    }
}
