//! The admin commands: each is one or a few meta calls, then output.

use std::io::Write;

use ironblock_proto::v1 as pb;
use tracing::debug;

use crate::args::{AclCmd, AclModeArg, Output, SnapshotCmd, VolumeCmd};
use crate::client::Meta;
use crate::output::{
    self, human_duration_ms, human_size, key_values, utc_time, AclJson, ChunkJson, DeletedJson,
    MetaGroupJson, ReplicationJson, SetReplicasJson, SnapshotJson, StatusJson, Table,
    VolumeDetailJson, VolumeJson,
};

/// A connection plus the output format.
pub struct Admin {
    /// Meta.
    pub meta: Meta,
    /// Output format.
    pub output: Output,
}

fn by_id(id: &str) -> pb::VolumeRef {
    pb::VolumeRef {
        r#ref: Some(pb::volume_ref::Ref::Id(id.to_string())),
    }
}

fn print(s: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    if !s.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

impl Admin {
    fn emit<T: serde::Serialize>(
        &self,
        json: &T,
        table: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        match self.output {
            Output::Json => print(&output::json(json)?),
            Output::Table => print(&table()),
        }
    }

    fn volume_kv(v: &pb::Volume) -> Vec<(&'static str, String)> {
        let mut kv = vec![
            ("name", v.name.clone()),
            ("id", v.id.clone()),
            (
                "size",
                format!("{} ({} bytes)", human_size(v.size_bytes), v.size_bytes),
            ),
            ("replicas", v.replicas.to_string()),
            ("thin", v.thin.to_string()),
            ("target", v.target_iqn.clone()),
            ("lun", v.lun.to_string()),
            ("vpd serial", v.vpd_serial.clone()),
            ("naa id", hex::encode(&v.naa_id)),
            (
                "acl",
                if v.acl.is_empty() {
                    "(none: no initiator sees the LUN)".to_string()
                } else {
                    output::acl_entries(&v.acl, &v.acl_read_only)
                        .iter()
                        .map(|e| format!("{} ({})", e.initiator, e.mode))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ),
            ("created", utc_time(v.created_at_unix_ms)),
            (
                "home chunk",
                if v.home_chunk == 0 {
                    "(not learned yet)".to_string()
                } else {
                    v.home_chunk.to_string()
                },
            ),
        ];
        if !v.parent_snapshot_id.is_empty() {
            kv.push(("parent snapshot", v.parent_snapshot_id.clone()));
        }
        kv
    }

    fn emit_volume(&self, v: &pb::Volume) -> anyhow::Result<()> {
        self.emit(&VolumeJson::from(v), || key_values(&Self::volume_kv(v)))
    }

    /// Where the volume's extents stand against their factors.
    async fn replication(&mut self, v: &pb::Volume) -> anyhow::Result<ReplicationJson> {
        let req = pb::GetExtentsRequest {
            volume_id: v.id.clone(),
        };
        match self.meta.client.get_extents(req).await {
            Ok(r) => Ok(ReplicationJson::of(&r.into_inner().extents)),
            Err(s) => {
                let nf = format!("volume {:?} not found", v.name);
                Err(self
                    .meta
                    .error(&format!("extents of volume {:?}", v.name), Some(&nf), &s))
            }
        }
    }

    /// `volume set-replicas`: the call, then (with `wait`) polling the
    /// extents until none is off its factor or `wait_timeout` passed.
    async fn set_replicas(
        &mut self,
        volume: &str,
        replicas: u32,
        wait: Option<std::time::Duration>,
    ) -> anyhow::Result<()> {
        let before = self.meta.volume(volume).await?;
        let req = pb::SetVolumeReplicasRequest {
            volume: Some(by_id(&before.id)),
            replicas,
        };
        let v = match self.meta.client.set_volume_replicas(req).await {
            Ok(r) => r.into_inner().volume,
            Err(s) => {
                let nf = format!("volume {volume:?} not found");
                return Err(self.meta.error(
                    &format!("set the replication factor of {volume:?} to {replicas}"),
                    Some(&nf),
                    &s,
                ));
            }
        };
        let v = v.ok_or_else(|| anyhow::anyhow!("meta returned no volume"))?;
        let mut progress = self.replication(&v).await?;
        if let Some(limit) = wait {
            let deadline = tokio::time::Instant::now() + limit;
            while !progress.complete {
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "volume {volume:?}: {} of {} extents still off the replication factor {} after {limit:?}; recovery goes on in the background",
                        progress.extents_off_factor,
                        progress.extents,
                        v.replicas
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                progress = self.replication(&v).await?;
            }
        }
        let json = SetReplicasJson {
            volume: VolumeJson::from(&v),
            previous_replicas: before.replicas,
            replication: progress,
        };
        self.emit(&json, || {
            let mut kv = Self::volume_kv(&v);
            kv.push(("previous replicas", before.replicas.to_string()));
            kv.push(("replication", progress.describe()));
            key_values(&kv)
        })
    }

    /// `ironblock volume ...`
    pub async fn volume(&mut self, cmd: VolumeCmd) -> anyhow::Result<()> {
        match cmd {
            VolumeCmd::Create {
                name,
                size,
                replicas,
                thin,
            } => {
                let req = pb::CreateVolumeRequest {
                    name: name.clone(),
                    size_bytes: size,
                    replicas,
                    thin,
                };
                let v = match self.meta.client.create_volume(req).await {
                    Ok(r) => r.into_inner().volume,
                    Err(s) => {
                        return Err(self
                            .meta
                            .error(&format!("create volume {name:?}"), None, &s))
                    }
                };
                let v = v.ok_or_else(|| anyhow::anyhow!("meta returned no volume"))?;
                self.emit_volume(&v)
            }
            VolumeCmd::List => {
                let vols = match self
                    .meta
                    .client
                    .list_volumes(pb::ListVolumesRequest {})
                    .await
                {
                    Ok(r) => r.into_inner().volumes,
                    Err(s) => return Err(self.meta.error("list volumes", None, &s)),
                };
                let json: Vec<VolumeJson> = vols.iter().map(VolumeJson::from).collect();
                self.emit(&json, || {
                    let mut t = Table::new(&[
                        "NAME", "ID", "SIZE", "REPLICAS", "THIN", "TARGET", "LUN", "ACL", "PARENT",
                    ]);
                    for v in &vols {
                        t.row(vec![
                            v.name.clone(),
                            v.id.clone(),
                            human_size(v.size_bytes),
                            v.replicas.to_string(),
                            if v.thin { "yes" } else { "no" }.to_string(),
                            v.target_iqn.clone(),
                            v.lun.to_string(),
                            v.acl.len().to_string(),
                            if v.parent_snapshot_id.is_empty() {
                                "-".to_string()
                            } else {
                                v.parent_snapshot_id.clone()
                            },
                        ]);
                    }
                    t.render()
                })
            }
            VolumeCmd::Show { volume } => {
                let v = self.meta.volume(&volume).await?;
                let snaps = self.meta.snapshots(&v.id).await?;
                // The alive chunks' portals; the redirector's VIP joins (or
                // replaces) these once it exists.
                let portals: Vec<String> = self
                    .meta
                    .chunks()
                    .await?
                    .iter()
                    .filter(|c| c.state == pb::ChunkState::Alive as i32)
                    .map(|c| c.portal.clone())
                    .collect();
                let replication = self.replication(&v).await?;
                let json = VolumeDetailJson {
                    volume: VolumeJson::from(&v),
                    portals: portals.clone(),
                    snapshots: snaps.iter().map(SnapshotJson::from).collect(),
                    replication,
                };
                self.emit(&json, || {
                    let mut kv = Self::volume_kv(&v);
                    kv.push((
                        "portals",
                        if portals.is_empty() {
                            "(no alive chunk)".to_string()
                        } else {
                            portals.join(", ")
                        },
                    ));
                    kv.push(("replication", replication.describe()));
                    kv.push((
                        "snapshots",
                        if snaps.is_empty() {
                            "-".to_string()
                        } else {
                            snaps
                                .iter()
                                .map(|s| format!("{} ({})", s.name, s.id))
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                    ));
                    key_values(&kv)
                })
            }
            VolumeCmd::Resize { volume, size } => {
                let v = self.meta.volume(&volume).await?;
                let req = pb::ResizeVolumeRequest {
                    volume: Some(by_id(&v.id)),
                    new_size_bytes: size,
                };
                let v = match self.meta.client.resize_volume(req).await {
                    Ok(r) => r.into_inner().volume,
                    Err(s) => {
                        let nf = format!("volume {volume:?} not found");
                        return Err(self.meta.error(
                            &format!("resize volume {volume:?}"),
                            Some(&nf),
                            &s,
                        ));
                    }
                };
                let v = v.ok_or_else(|| anyhow::anyhow!("meta returned no volume"))?;
                self.emit_volume(&v)
            }
            VolumeCmd::SetReplicas {
                volume,
                replicas,
                wait,
                wait_timeout,
            } => {
                self.set_replicas(&volume, replicas, wait.then_some(wait_timeout))
                    .await
            }
            VolumeCmd::Delete {
                volume,
                ignore_missing,
            } => {
                let Some(v) = self.meta.find_volume(&volume).await? else {
                    if !ignore_missing {
                        anyhow::bail!("volume {volume:?} not found");
                    }
                    let json = DeletedJson {
                        deleted: false,
                        id: String::new(),
                        name: volume.clone(),
                    };
                    return self.emit(&json, || format!("volume {volume:?} does not exist"));
                };
                let deleted = match self.meta.client.delete_volume(by_id(&v.id)).await {
                    Ok(r) => r.into_inner().deleted,
                    Err(s) => {
                        return Err(self
                            .meta
                            .error(&format!("delete volume {volume:?}"), None, &s))
                    }
                };
                let json = DeletedJson {
                    deleted,
                    id: v.id.clone(),
                    name: v.name.clone(),
                };
                self.emit(&json, || format!("deleted volume {} ({})", v.name, v.id))
            }
            VolumeCmd::Clone {
                snapshot,
                new_name,
                size,
                replicas,
                thin,
            } => {
                let s = self.meta.snapshot(&snapshot).await?;
                let req = pb::CloneVolumeRequest {
                    snapshot_id: s.id.clone(),
                    name: new_name.clone(),
                    size_bytes: size.unwrap_or(0),
                    replicas: replicas.unwrap_or(0),
                    thin,
                };
                let v = match self.meta.client.clone_volume(req).await {
                    Ok(r) => r.into_inner().volume,
                    Err(st) => {
                        let nf = format!("snapshot {snapshot:?} not found");
                        return Err(self.meta.error(
                            &format!("clone {snapshot:?} to {new_name:?}"),
                            Some(&nf),
                            &st,
                        ));
                    }
                };
                let v = v.ok_or_else(|| anyhow::anyhow!("meta returned no volume"))?;
                self.emit_volume(&v)
            }
        }
    }

    fn emit_snapshots(
        &self,
        snaps: &[pb::Snapshot],
        names: &[(String, String)],
    ) -> anyhow::Result<()> {
        let json: Vec<SnapshotJson> = snaps.iter().map(SnapshotJson::from).collect();
        self.emit(&json, || {
            let mut t = Table::new(&["NAME", "ID", "VOLUME", "SIZE", "CREATED"]);
            for s in snaps {
                let vol = names
                    .iter()
                    .find(|(id, _)| *id == s.volume_id)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_else(|| s.volume_id.clone());
                t.row(vec![
                    s.name.clone(),
                    s.id.clone(),
                    vol,
                    human_size(s.size_bytes),
                    utc_time(s.created_at_unix_ms),
                ]);
            }
            t.render()
        })
    }

    /// `ironblock snapshot ...`
    pub async fn snapshot(&mut self, cmd: SnapshotCmd) -> anyhow::Result<()> {
        match cmd {
            SnapshotCmd::Create { volume, name } => {
                let v = self.meta.volume(&volume).await?;
                let req = pb::CreateSnapshotRequest {
                    volume_id: v.id.clone(),
                    name: name.clone(),
                };
                let s = match self.meta.client.create_snapshot(req).await {
                    Ok(r) => r.into_inner().snapshot,
                    Err(st) => {
                        let nf = format!("volume {volume:?} not found");
                        return Err(self.meta.error(
                            &format!("create snapshot {name:?} of {volume:?}"),
                            Some(&nf),
                            &st,
                        ));
                    }
                };
                let s = s.ok_or_else(|| anyhow::anyhow!("meta returned no snapshot"))?;
                self.emit(&SnapshotJson::from(&s), || {
                    key_values(&[
                        ("name", s.name.clone()),
                        ("id", s.id.clone()),
                        ("volume", format!("{} ({})", v.name, v.id)),
                        ("size", human_size(s.size_bytes)),
                        ("created", utc_time(s.created_at_unix_ms)),
                    ])
                })
            }
            SnapshotCmd::List { volume } => {
                let (filter, mut names) = match volume {
                    Some(r) => {
                        let v = self.meta.volume(&r).await?;
                        (v.id.clone(), vec![(v.id, v.name)])
                    }
                    None => (String::new(), Vec::new()),
                };
                let snaps = self.meta.snapshots(&filter).await?;
                if names.is_empty() && !snaps.is_empty() && self.output == Output::Table {
                    match self
                        .meta
                        .client
                        .list_volumes(pb::ListVolumesRequest {})
                        .await
                    {
                        Ok(r) => {
                            names = r
                                .into_inner()
                                .volumes
                                .into_iter()
                                .map(|v| (v.id, v.name))
                                .collect()
                        }
                        Err(s) => debug!(error = %s, "volume names unavailable"),
                    }
                }
                self.emit_snapshots(&snaps, &names)
            }
            SnapshotCmd::Delete {
                snapshot,
                ignore_missing,
            } => {
                let Some(s) = self.meta.find_snapshot(&snapshot).await? else {
                    if !ignore_missing {
                        anyhow::bail!("snapshot {snapshot:?} not found");
                    }
                    let json = DeletedJson {
                        deleted: false,
                        id: String::new(),
                        name: snapshot.clone(),
                    };
                    return self.emit(&json, || format!("snapshot {snapshot:?} does not exist"));
                };
                let req = pb::DeleteSnapshotRequest {
                    snapshot_id: s.id.clone(),
                };
                let deleted = match self.meta.client.delete_snapshot(req).await {
                    Ok(r) => r.into_inner().deleted,
                    Err(st) => {
                        return Err(self.meta.error(
                            &format!("delete snapshot {snapshot:?}"),
                            None,
                            &st,
                        ))
                    }
                };
                let json = DeletedJson {
                    deleted,
                    id: s.id.clone(),
                    name: s.name.clone(),
                };
                self.emit(&json, || format!("deleted snapshot {} ({})", s.name, s.id))
            }
        }
    }

    /// `ironblock acl ...`
    pub async fn acl(&mut self, cmd: AclCmd) -> anyhow::Result<()> {
        // (add?, iqn, read_only, change_mode)
        let (volume, change) = match cmd {
            AclCmd::Add {
                volume,
                iqn,
                read_only,
            } => (volume, Some((true, iqn, read_only, false))),
            AclCmd::SetMode { volume, iqn, mode } => (
                volume,
                Some((true, iqn, mode == AclModeArg::ReadOnly, true)),
            ),
            AclCmd::Remove { volume, iqn } => (volume, Some((false, iqn, false, false))),
            AclCmd::List { volume } => (volume, None),
        };
        let v = self.meta.volume(&volume).await?;
        let (acl, read_only) = match change {
            None => (v.acl.clone(), v.acl_read_only.clone()),
            Some((add, iqn, read_only, change_mode)) => {
                let req = pb::AclRequest {
                    volume_id: v.id.clone(),
                    initiator_iqn: iqn.clone(),
                    read_only,
                    change_mode,
                };
                let res = if add {
                    self.meta.client.acl_add(req).await
                } else {
                    self.meta.client.acl_remove(req).await
                };
                match res {
                    Ok(r) => {
                        let r = r.into_inner();
                        (r.initiators, r.read_only_initiators)
                    }
                    Err(s) => {
                        let what = if add {
                            format!("allow {iqn:?} on {volume:?}")
                        } else {
                            format!("revoke {iqn:?} on {volume:?}")
                        };
                        if s.code() == tonic::Code::AlreadyExists {
                            return Err(anyhow::anyhow!(
                                "{what}: {} (change it with `ironblock acl set-mode`)",
                                s.message().trim()
                            ));
                        }
                        let nf = format!("volume {volume:?} not found");
                        return Err(self.meta.error(&what, Some(&nf), &s));
                    }
                }
            }
        };
        let entries = output::acl_entries(&acl, &read_only);
        let json = AclJson {
            volume_id: v.id.clone(),
            volume: v.name.clone(),
            acl: acl.clone(),
            acl_read_only: read_only,
            acl_entries: entries.clone(),
        };
        self.emit(&json, || {
            let mut t = Table::new(&["INITIATOR", "MODE"]);
            for e in &entries {
                t.row(vec![e.initiator.clone(), e.mode.to_string()]);
            }
            t.render()
        })
    }

    fn emit_chunks(&self, chunks: &[pb::Chunk]) -> anyhow::Result<()> {
        let json: Vec<ChunkJson> = chunks.iter().map(ChunkJson::from).collect();
        self.emit(&json, || {
            let mut t = Table::new(&[
                "ID",
                "STATE",
                "PORTAL",
                "DATA",
                "CAPACITY",
                "USED",
                "EXTENTS",
                "LAST HEARTBEAT",
            ]);
            for c in chunks {
                t.row(vec![
                    c.id.to_string(),
                    output::chunk_state(c.state).to_string(),
                    c.portal.clone(),
                    c.data_addr.clone(),
                    human_size(c.capacity_bytes),
                    human_size(c.used_bytes),
                    c.extents.to_string(),
                    if c.last_heartbeat_ms_ago == 0 && c.state != pb::ChunkState::Alive as i32 {
                        "-".to_string()
                    } else {
                        format!("{} ago", human_duration_ms(c.last_heartbeat_ms_ago))
                    },
                ]);
            }
            t.render()
        })
    }

    /// `ironblock chunk list`.
    pub async fn chunk_list(&mut self) -> anyhow::Result<()> {
        let chunks = self.meta.chunks().await?;
        self.emit_chunks(&chunks)
    }

    /// `ironblock chunk drain|remove ID`.
    pub async fn chunk_change(&mut self, id: u64, drain: bool) -> anyhow::Result<()> {
        let res = if drain {
            self.meta
                .client
                .drain_chunk(pb::DrainChunkRequest { chunk_id: id })
                .await
        } else {
            self.meta
                .client
                .remove_chunk(pb::RemoveChunkRequest { chunk_id: id })
                .await
        };
        let what = if drain { "drain" } else { "remove" };
        let c = match res {
            Ok(r) => r.into_inner().chunk,
            Err(s) => {
                let nf = format!("chunk {id} not found");
                return Err(self
                    .meta
                    .error(&format!("{what} chunk {id}"), Some(&nf), &s));
            }
        };
        let c = c.ok_or_else(|| anyhow::anyhow!("meta returned no chunk"))?;
        self.emit_chunks(std::slice::from_ref(&c))
    }

    /// `ironblock status`.
    /// The meta group as a member sees it.
    async fn meta_group(&mut self) -> Result<MetaGroupJson, tonic::Status> {
        let r = self.meta.group.list_metas(pb::ListMetasRequest {}).await?;
        Ok(MetaGroupJson::from(&r.into_inner()))
    }

    /// `meta list`.
    pub async fn meta_list(&mut self) -> anyhow::Result<()> {
        let g = match self.meta_group().await {
            Ok(g) => g,
            Err(e) => return Err(self.meta.error("list meta members", None, &e)),
        };
        self.emit(&g, || format!("{}\n{}", g.summary(), g.table()))
    }

    /// `meta add ID ADDR` / `meta remove ID`.
    pub async fn meta_change(&mut self, id: u64, addr: Option<String>) -> anyhow::Result<()> {
        let r = match &addr {
            Some(a) => {
                let req = pb::AddMetaRequest {
                    id,
                    addr: a.clone(),
                };
                self.meta.group.add_meta(req).await
            }
            None => {
                self.meta
                    .group
                    .remove_meta(pb::RemoveMetaRequest { id })
                    .await
            }
        };
        let what = match &addr {
            Some(a) => format!("add meta node {id} at {a}"),
            None => format!("remove meta node {id}"),
        };
        match r {
            Ok(r) => {
                let g = MetaGroupJson::from(&r.into_inner());
                self.emit(&g, || format!("{}\n{}", g.summary(), g.table()))
            }
            Err(e) => Err(self.meta.error(&what, None, &e)),
        }
    }

    pub async fn status(&mut self) -> anyhow::Result<()> {
        let group = self.meta_group().await.ok();
        let s = match self
            .meta
            .client
            .cluster_status(pb::ClusterStatusRequest {})
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => {
                // No quorum: say so, with what the members that answer know.
                if let Some(g) = group.filter(|g| g.leader_id == 0) {
                    anyhow::bail!(
                        "the meta group has no leader (an election, or no quorum: fewer than half \
                         of its voters answer); the data path fences itself until it has one. \
                         Member {} sees: {}",
                        g.node_id,
                        g.summary()
                    );
                }
                return Err(self.meta.error("cluster status", None, &e));
            }
        };
        let mut j = StatusJson::from(&s);
        j.meta = group.clone();
        self.emit(&j, || {
            let done = s.recovery_completed + s.recovery_failed;
            let total = done + s.recovery_queued;
            let progress = if s.recovery_queued > 0 && total > 0 {
                format!(" ({}% done)", done * 100 / total)
            } else {
                String::new()
            };
            key_values(&[
                ("cluster", s.cluster_id.clone()),
                ("health", j.health.to_string()),
                (
                    "chunks",
                    format!(
                        "{} alive, {} dead, {} draining, {} removed",
                        s.chunks_alive, s.chunks_dead, s.chunks_draining, s.chunks_removed
                    ),
                ),
                ("volumes", s.volumes.to_string()),
                ("snapshots", s.snapshots.to_string()),
                ("targets", s.targets.to_string()),
                (
                    "extents",
                    format!(
                        "{} ({} degraded, {} unavailable)",
                        s.extents, s.degraded_extents, s.unavailable_extents
                    ),
                ),
                (
                    "recovery",
                    format!(
                        "{} queued, {} completed, {} failed{progress}",
                        s.recovery_queued, s.recovery_completed, s.recovery_failed
                    ),
                ),
                ("revision", s.revision.to_string()),
                (
                    "meta",
                    group.as_ref().map(|g| g.summary()).unwrap_or_default(),
                ),
            ]) + &group.as_ref().map(|g| g.table()).unwrap_or_default()
        })
    }
}
