//! The gRPC `Meta` service: translates protobuf requests into [`State`]
//! calls and [`MetaError`]s into `tonic::Status` codes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_server::Meta;
use tokio::sync::{watch, Mutex, MutexGuard};
use tonic::{Request, Response, Status};

mod data_path;
mod settled;

pub use settled::Settled;

use crate::clock::Clock;
use crate::ids::vpd_identity;
use crate::raft::commit::{CommitError, Ticket};
use crate::raft::{Group, NotServing};
use crate::state::{
    store_key, AclMode, AclView, ChunkRegistration, ChunkState, ChunkView, ExtentRecord, Health,
    LeaseView, RecoveryTask, SharedPulse, SnapshotRecord, State, VolumeKey, VolumeRecord,
    VolumeState, EXTENT_SIZE,
};

/// The longest an in-force wait sleeps between checks when no
/// acknowledgement wakes it (a lease end wakes it on time anyway).
const IN_FORCE_POLL: Duration = Duration::from_millis(50);

/// Shared handle on the state. An async lock, held only while a call
/// decides: in a meta group the change then goes through the log without
/// it (group commit, see `raft/commit.rs`).
pub type SharedState = Arc<Mutex<State>>;

/// The response header naming the leader's address (see meta.proto).
pub const LEADER_HEADER: &str = "ironblock-meta-leader";

/// UNAVAILABLE with the leader hint, for a call this node does not serve.
pub fn not_serving(why: NotServing) -> Status {
    match why {
        NotServing::Leader(addr) => {
            let mut s = Status::unavailable(format!("not the meta leader; the leader is {addr}"));
            if let Ok(v) = addr.parse() {
                s.metadata_mut().insert(LEADER_HEADER, v);
            }
            s
        }
        NotServing::NoLeader => {
            Status::unavailable("the meta group has no leader (an election, or no quorum); retry")
        }
    }
}

/// What a change that did not go through the log answers: UNAVAILABLE
/// (with the leader hint when another node leads). Every mutation is
/// idempotent, so the caller retries.
pub fn commit_failed(e: CommitError) -> Status {
    match e {
        CommitError::NotLeader(Some(addr)) => not_serving(NotServing::Leader(addr)),
        CommitError::NotLeader(None) => not_serving(NotServing::NoLeader),
        e => Status::unavailable(format!("meta group: {e}")),
    }
}

/// Take the state lock as a member of `group` must: reload memory first
/// if a change failed to go through the log since the last holder, then
/// catch up with what the log applied. Also gives the newest submission
/// memory may hold (an answer built from memory waits for it).
pub async fn lock_state<'a>(
    state: &'a SharedState,
    group: Option<&Group>,
    now: Instant,
) -> Result<(MutexGuard<'a, State>, Option<Ticket>), Status> {
    let mut st = state.lock().await;
    let mut latest = None;
    if let Some(g) = group {
        let b = g.committer.begin();
        if b.reload {
            if let Err(e) = st.replicated_failed(now) {
                g.committer.reload_pending();
                return Err(e.into());
            }
        }
        latest = b.latest;
    }
    st.catch_up(now)?;
    Ok((st, latest))
}

/// Queue what `st` committed in memory since the last call for the log
/// (call under the state lock; wait on the ticket without it). None when
/// nothing is pending.
pub fn submit(group: &Group, st: &mut State) -> Option<Ticket> {
    let batches = st.take_pending();
    (!batches.is_empty()).then(|| group.committer.submit(batches))
}

tokio::task_local! {
    /// The submissions the current call's reads of memory may hold (see
    /// [`Settled`]).
    static SEEN: Arc<std::sync::Mutex<Vec<Ticket>>>;
}

/// Note that the current call's view of memory may hold `ticket`'s
/// changes. A no-op outside a [`Settled`] call (background tasks wait on
/// their own tickets).
fn saw(ticket: Option<Ticket>) {
    let Some(t) = ticket else { return };
    if matches!(t.peek(), Some(Ok(()))) {
        return;
    }
    let _ = SEEN.try_with(|seen| {
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.iter().any(|s| s.same(&t)) {
            seen.push(t);
        }
    });
}

/// Wait until every submission the current call's view may hold went
/// through the log; the first that did not fails the call.
async fn settle() -> Result<(), Status> {
    let pending = SEEN
        .try_with(|seen| std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner())))
        .unwrap_or_default();
    for t in pending {
        t.wait().await.map_err(commit_failed)?;
    }
    Ok(())
}

/// How often a VIP holder's watch checks this node still leads.
const LEADER_CHECK: Duration = Duration::from_millis(200);

/// One open revision watch of a VIP lease holder; watches are counted
/// per holder, so a holder that reconnected keeps its leases when its old
/// stream's end is noticed late.
struct VipWatch {
    watches: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    holder: String,
}

impl VipWatch {
    /// Count a watch naming `holder` (none for an empty name).
    fn open(watches: &Arc<std::sync::Mutex<HashMap<String, usize>>>, holder: &str) -> Option<Self> {
        if holder.is_empty() {
            return None;
        }
        let mut w = watches.lock().unwrap_or_else(|e| e.into_inner());
        *w.entry(holder.to_string()).or_default() += 1;
        Some(VipWatch {
            watches: watches.clone(),
            holder: holder.to_string(),
        })
    }

    /// The watch ended; `gone`: from the watcher's side. Returns the holder
    /// whose leases to free: gone, and its last open watch.
    fn close(self, gone: bool) -> Option<String> {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let left = match w.get_mut(&self.holder) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            w.remove(&self.holder);
        }
        (gone && left == 0).then(|| self.holder.clone())
    }
}

/// The `Meta` gRPC service.
#[derive(Clone)]
pub struct MetaService {
    state: SharedState,
    /// What heartbeats need, off the state lock (see `state/pulse.rs`).
    pulse: SharedPulse,
    clock: Arc<dyn Clock>,
    heartbeat_interval: Duration,
    /// Bumped on every acknowledgement of an applied revision (heartbeat,
    /// VIP lease renewal): wakes the in-force waits.
    acks: Arc<watch::Sender<u64>>,
    /// True once the server shuts down: open streams end.
    ending: watch::Receiver<bool>,
    /// The meta group (none: a standalone state written directly).
    group: Option<Group>,
    /// Open revision watches per VIP lease holder that named itself
    /// (`WatchRevisionsRequest.vip_holder`).
    vip_watches: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

impl MetaService {
    /// A service over `state` and its `pulse` ([`State::pulse`]). Chunks
    /// are told to heartbeat every `heartbeat_interval`.
    pub fn new(
        state: SharedState,
        pulse: SharedPulse,
        clock: Arc<dyn Clock>,
        heartbeat_interval: Duration,
    ) -> Self {
        MetaService {
            state,
            pulse,
            clock,
            heartbeat_interval,
            acks: Arc::new(watch::channel(0).0),
            ending: watch::channel(false).1,
            group: None,
            vip_watches: Arc::default(),
        }
    }

    /// Serve as a member of `group`: only while leading, committing
    /// through its log.
    pub fn in_group(mut self, group: Group) -> Self {
        self.group = Some(group);
        self
    }

    /// Turn the call away unless this node serves (see
    /// [`Group::serving`]): with the leader hint when another node leads.
    /// While no leader is known, or this node is starting to lead, wait a
    /// little (as long as an election takes) for it instead: a call
    /// that arrives during one then just takes longer.
    async fn gate(&self) -> Result<(), Status> {
        let Some(g) = &self.group else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + g.timing.election_min * 4;
        loop {
            match g.serving(self.clock.now()) {
                Ok(()) => return Ok(()),
                Err(why @ NotServing::Leader(_)) => return Err(not_serving(why)),
                Err(why) if tokio::time::Instant::now() >= deadline => {
                    return Err(not_serving(why))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Queue what `st` committed for the log (see [`submit`]); the call
    /// answers once it went through ([`Settled`]).
    fn finish(&self, st: &mut State) {
        if let Some(g) = &self.group {
            saw(submit(g, st));
        }
    }

    /// End every open stream (`WatchRevisions`) once `ending` turns true.
    pub fn ending_streams_on(mut self, ending: watch::Receiver<bool>) -> Self {
        self.ending = ending;
        self
    }

    fn acked(&self) {
        self.acks.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The state, caught up with what the log applied (and with any
    /// commit an earlier holder left behind put through it).
    async fn lock(&self) -> Result<MutexGuard<'_, State>, Status> {
        self.gate().await?;
        let (mut st, latest) =
            lock_state(&self.state, self.group.as_ref(), self.clock.now()).await?;
        saw(latest);
        self.finish(&mut st);
        Ok(st)
    }

    /// Wait, without holding the state lock, until `revision` is in force:
    /// every alive chunk and VIP holder has acknowledged applying it, or its
    /// lease (which meta stopped extending past the in-force bound the
    /// moment the revision was required) has run out, so it serves nothing
    /// on an older view. Ends within the bound whatever the participants
    /// do; `what` names the call for the logs.
    async fn in_force(&self, revision: u64, what: &str) -> Result<(), Status> {
        let started = tokio::time::Instant::now();
        let mut acks = self.acks.subscribe();
        // Belt and braces: the leases end the wait; this only turns a bug
        // into an error instead of a hung call.
        let give_up = started + self.lock().await?.in_force_bound() * 2 + Duration::from_secs(1);
        loop {
            let now = self.clock.now();
            let w = self.lock().await?.in_force_waiting(revision, now);
            if w.waiting.is_empty() {
                let waited = started.elapsed();
                let lapsed = !w.fenced_out.is_empty();
                self.lock().await?.note_in_force_wait(waited, lapsed);
                if lapsed {
                    tracing::warn!(revision, call = what, fenced_out = ?w.fenced_out, ?waited,
                        "in force: these did not acknowledge the revision within the bound; their leases ran out, so they serve nothing until they catch up");
                } else {
                    tracing::debug!(revision, call = what, ?waited, "in force");
                }
                return Ok(());
            }
            let tnow = tokio::time::Instant::now();
            if tnow >= give_up {
                return Err(Status::unavailable(format!(
                    "{what}: committed at revision {revision}, but {} did not confirm it and their \
                     leases did not run out within {:?}; retry (the call is idempotent)",
                    w.waiting.join(", "),
                    tnow - started
                )));
            }
            let soonest = w.soonest;
            let wake = soonest
                .map(|s| tnow + s.saturating_duration_since(now) + Duration::from_millis(1))
                .unwrap_or(tnow + IN_FORCE_POLL)
                .min(tnow + IN_FORCE_POLL);
            tokio::select! {
                _ = acks.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Run `change` under the state lock, require the revision it leaves
    /// in force under that same lock (so no heartbeat after the commit
    /// escapes the lease rule), then wait for it (see [`Self::in_force`]).
    /// A no-op change waits for the current revision: a retried call
    /// returns only once what it asked for is in force.
    async fn in_force_after<T>(
        &self,
        what: &str,
        change: impl FnOnce(&mut State) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let (value, revision) = {
            let mut st = self.lock().await?;
            let value = change(&mut st);
            // Whatever the change committed goes through the log, even if
            // it then failed.
            self.finish(&mut st);
            (value?, st.require_in_force(self.clock.now()))
        };
        // Durable first: nobody can acknowledge a revision before.
        settle().await?;
        self.in_force(revision, what).await?;
        Ok(value)
    }

    /// Apply a chunk state change (drain, remove) and answer with the
    /// chunk as it is afterwards.
    async fn change_chunk(
        &self,
        id: u64,
        change: fn(&mut State, u64) -> crate::error::Result<crate::state::ChunkRecord>,
    ) -> Rpc<pb::ChunkResponse> {
        let mut st = self.lock().await?;
        let r = change(&mut st, id);
        self.finish(&mut st);
        r?;
        let view = st.get_chunk(id, self.clock.now())?;
        Ok(Response::new(pb::ChunkResponse {
            chunk: Some(chunk_pb(&view)),
        }))
    }
}

fn lease_pb(v: &LeaseView) -> pb::VipLeaseResponse {
    pb::VipLeaseResponse {
        held: v.held,
        holder: v.holder.clone(),
        token: v.token,
        expires_in_ms: v.expires_in.as_millis() as u64,
    }
}

fn chunk_state(s: ChunkState) -> pb::ChunkState {
    match s {
        ChunkState::Alive => pb::ChunkState::Alive,
        ChunkState::Dead => pb::ChunkState::Dead,
        ChunkState::Draining => pb::ChunkState::Draining,
        ChunkState::Removed => pb::ChunkState::Removed,
    }
}

fn chunk_pb(c: &ChunkView) -> pb::Chunk {
    pb::Chunk {
        id: c.record.id,
        portal: c.record.portal.clone(),
        data_addr: c.record.data_addr.clone(),
        capacity_bytes: c.record.capacity_bytes,
        used_bytes: c.used_bytes,
        state: chunk_state(c.record.state) as i32,
        last_heartbeat_ms_ago: c.since_heartbeat.map(|d| d.as_millis() as u64).unwrap_or(0),
        extents: c.extents,
    }
}

fn volume_pb(st: &State, v: &VolumeRecord) -> pb::Volume {
    let (serial, naa) = vpd_identity(&v.id);
    pb::Volume {
        id: v.id.to_string(),
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        replicas: v.replicas,
        thin: v.thin,
        target_iqn: st.target_iqn(v.target),
        lun: u32::from(v.lun),
        created_at_unix_ms: v.created_at_unix_ms,
        parent_snapshot_id: v.parent_snapshot.map(|s| s.to_string()).unwrap_or_default(),
        state: match v.state {
            VolumeState::Ready => pb::VolumeState::Ready as i32,
        },
        capacity_generation: v.capacity_generation,
        generation: v.generation,
        vpd_serial: serial,
        naa_id: naa.to_vec(),
        acl: st.acl(&v.id).into_iter().collect(),
        acl_read_only: st.acl_read_only(&v.id).into_iter().collect(),
        home_chunk: st.volume_home(&v.id).unwrap_or(0),
    }
}

fn acl_pb(view: AclView) -> pb::AclResponse {
    pb::AclResponse {
        initiators: view.initiators.into_iter().collect(),
        read_only_initiators: view.read_only.into_iter().collect(),
    }
}

fn snapshot_pb(s: &SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        id: s.id.to_string(),
        name: s.name.clone(),
        volume_id: s.volume.to_string(),
        size_bytes: s.size_bytes,
        created_at_unix_ms: s.created_at_unix_ms,
        generation: s.generation,
    }
}

fn extent_pb(e: &ExtentRecord) -> pb::Extent {
    pb::Extent {
        index: e.index,
        replicas: e.replicas.clone(),
        epoch: e.epoch,
        degraded: (e.replicas.len() as u32) < e.replication,
        learners: e.learners.clone(),
        generation: e.generation,
        volume_id: e.volume.to_string(),
        store_key: e.store_key(),
        pending: e.pending,
        replication_factor: e.replication,
    }
}

fn task_pb(t: &RecoveryTask) -> pb::RecoveryTask {
    pb::RecoveryTask {
        id: t.id,
        volume_id: t.volume.to_string(),
        extent_index: t.index,
        target_chunk: t.target_chunk,
        sources: t.sources.clone(),
        replaces_chunk: t.replaces.unwrap_or(0),
        epoch: t.epoch,
        store_key: store_key(&t.volume, t.generation),
        generation: t.generation,
    }
}

fn volume_key(r: &Option<pb::VolumeRef>) -> Result<VolumeKey<'_>, Status> {
    match r.as_ref().and_then(|r| r.r#ref.as_ref()) {
        Some(pb::volume_ref::Ref::Id(id)) => Ok(VolumeKey::Id(id)),
        Some(pb::volume_ref::Ref::Name(n)) => Ok(VolumeKey::Name(n)),
        None => Err(Status::invalid_argument("a volume id or name is required")),
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Meta for MetaService {
    #[tracing::instrument(skip_all, fields(chunk = req.get_ref().chunk_id, portal = %req.get_ref().portal))]
    async fn register_chunk(
        &self,
        req: Request<pb::RegisterChunkRequest>,
    ) -> Rpc<pb::RegisterChunkResponse> {
        let r = req.into_inner();
        let reg = ChunkRegistration {
            cluster_id: r.cluster_id,
            chunk_id: r.chunk_id,
            portal: r.portal,
            data_addr: r.data_addr,
            capacity_bytes: r.capacity_bytes,
            used_bytes: r.used_bytes,
            request_id: r.request_id,
        };
        let mut st = self.lock().await?;
        let res = st.register_chunk(&reg, self.clock.now(), self.clock.unix_ms());
        self.finish(&mut st);
        let rec = res?;
        Ok(Response::new(pb::RegisterChunkResponse {
            cluster_id: st.cluster_id().to_string(),
            chunk_id: rec.id,
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
            liveness_timeout_ms: st.options().liveness_timeout.as_millis() as u64,
        }))
    }

    /// Answered from the pulse alone: never behind the state lock (a long
    /// mutation, a commit waiting on the log), so a busy meta never fences
    /// a chunk. Only a serving leader answers, as for every call.
    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Rpc<pb::HeartbeatResponse> {
        self.gate().await?;
        let r = req.into_inner();
        let io: Vec<(String, u64)> = r.io.into_iter().map(|v| (v.volume_id, v.bytes)).collect();
        let beat = crate::state::pulse::lock(&self.pulse).heartbeat(
            &r.cluster_id,
            r.chunk_id,
            r.used_bytes,
            r.applied_revision,
            io,
            self.clock.now(),
        )?;
        self.acked();
        Ok(Response::new(pb::HeartbeatResponse {
            state: chunk_state(beat.state) as i32,
            revision: beat.revision,
            lease_ms: Some(beat.lease.as_millis() as u64),
        }))
    }

    type WatchRevisionsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::RevisionEvent, Status>> + Send>,
    >;

    #[tracing::instrument(skip_all, fields(watcher = %req.get_ref().watcher))]
    async fn watch_revisions(
        &self,
        req: Request<pb::WatchRevisionsRequest>,
    ) -> Rpc<Self::WatchRevisionsStream> {
        let mut rx = self.lock().await?.watch_revisions();
        let mut ending = self.ending.clone();
        tracing::debug!(watcher = %req.get_ref().watcher, "revision watch opened");
        let holder = VipWatch::open(&self.vip_watches, &req.get_ref().vip_holder);
        // A holder's watch lives only as long as this node leads (the term
        // it serves now): the holder then reconnects to the new leader,
        // which is the one that can free its leases.
        let term = self.group.as_ref().and_then(|g| g.standing().serving_term);
        let mut leading = tokio::time::interval(LEADER_CHECK);
        let svc = self.clone();
        // A task per watcher forwards the revision (current first, then
        // every change; quick ones fold) until the watcher goes away or
        // the server shuts down.
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let gone = loop {
                let revision = *rx.borrow_and_update();
                if tx.send(Ok(pb::RevisionEvent { revision })).await.is_err() {
                    break true;
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break false },
                    _ = ending.wait_for(|e| *e) => break false,
                    _ = tx.closed() => break true,
                    _ = leading.tick(), if holder.is_some() => {
                        if let (Some(g), Some(t)) = (&svc.group, term) {
                            if !g.leads_term(t) {
                                break false;
                            }
                        }
                    }
                }
            };
            // The watcher's side went away: a VIP holder with no other
            // watch open died (or closed it); free its leases now.
            if let Some(holder) = holder.and_then(|h| h.close(gone)) {
                if let Ok(mut st) = svc.lock().await {
                    st.release_vip_leases(&holder, svc.clock.now());
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn list_chunks(
        &self,
        _req: Request<pb::ListChunksRequest>,
    ) -> Rpc<pb::ListChunksResponse> {
        let st = self.lock().await?;
        let chunks = st
            .list_chunks(self.clock.now())
            .iter()
            .map(chunk_pb)
            .collect();
        Ok(Response::new(pb::ListChunksResponse { chunks }))
    }

    #[tracing::instrument(skip_all, fields(chunk = req.get_ref().chunk_id))]
    async fn drain_chunk(&self, req: Request<pb::DrainChunkRequest>) -> Rpc<pb::ChunkResponse> {
        self.change_chunk(req.into_inner().chunk_id, State::drain_chunk)
            .await
    }

    #[tracing::instrument(skip_all, fields(chunk = req.get_ref().chunk_id))]
    async fn remove_chunk(&self, req: Request<pb::RemoveChunkRequest>) -> Rpc<pb::ChunkResponse> {
        self.change_chunk(req.into_inner().chunk_id, State::remove_chunk)
            .await
    }

    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Rpc<pb::VolumeResponse> {
        let r = req.into_inner();
        let unix_ms = self.clock.unix_ms();
        let volume = self
            .in_force_after("CreateVolume", |st| {
                let v = st.create_volume(&r.name, r.size_bytes, r.replicas, r.thin, unix_ms)?;
                Ok(volume_pb(st, &v))
            })
            .await?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn get_volume(&self, req: Request<pb::VolumeRef>) -> Rpc<pb::VolumeResponse> {
        let r = Some(req.into_inner());
        let st = self.lock().await?;
        let v = st.get_volume(volume_key(&r)?)?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(volume_pb(&st, &v)),
        }))
    }

    async fn list_volumes(
        &self,
        _req: Request<pb::ListVolumesRequest>,
    ) -> Rpc<pb::ListVolumesResponse> {
        let st = self.lock().await?;
        let volumes = st
            .list_volumes()
            .iter()
            .map(|v| volume_pb(&st, v))
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_volume(&self, req: Request<pb::VolumeRef>) -> Rpc<pb::DeleteVolumeResponse> {
        let r = Some(req.into_inner());
        let deleted = self
            .in_force_after("DeleteVolume", |st| Ok(st.delete_volume(volume_key(&r)?)?))
            .await?;
        Ok(Response::new(pb::DeleteVolumeResponse { deleted }))
    }

    #[tracing::instrument(skip_all, fields(size = req.get_ref().new_size_bytes))]
    async fn resize_volume(
        &self,
        req: Request<pb::ResizeVolumeRequest>,
    ) -> Rpc<pb::VolumeResponse> {
        let r = req.into_inner();
        let volume = self
            .in_force_after("ResizeVolume", |st| {
                let v = st.resize_volume(volume_key(&r.volume)?, r.new_size_bytes)?;
                Ok(volume_pb(st, &v))
            })
            .await?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(volume),
        }))
    }

    #[tracing::instrument(skip_all, fields(replicas = req.get_ref().replicas))]
    async fn set_volume_replicas(
        &self,
        req: Request<pb::SetVolumeReplicasRequest>,
    ) -> Rpc<pb::VolumeResponse> {
        let r = req.into_inner();
        let mut st = self.lock().await?;
        let res = st.set_replicas(volume_key(&r.volume)?, r.replicas);
        self.finish(&mut st);
        let v = res?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(volume_pb(&st, &v)),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, name = %req.get_ref().name))]
    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Rpc<pb::SnapshotResponse> {
        let r = req.into_inner();
        // For a repeated call the revision waited for is newer than the
        // snapshot's own commit: stricter, never weaker. In force, no chunk
        // acknowledges a write on a view from before the snapshot (a
        // lagging one is fenced out by its lease).
        let unix_ms = self.clock.unix_ms();
        let s = self
            .in_force_after("CreateSnapshot", |st| {
                Ok(st.create_snapshot(&r.volume_id, &r.name, unix_ms)?)
            })
            .await?;
        Ok(Response::new(pb::SnapshotResponse {
            snapshot: Some(snapshot_pb(&s)),
        }))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Rpc<pb::ListSnapshotsResponse> {
        let r = req.into_inner();
        let st = self.lock().await?;
        let filter = (!r.volume_id.is_empty()).then_some(r.volume_id.as_str());
        let snapshots = st.list_snapshots(filter)?.iter().map(snapshot_pb).collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    #[tracing::instrument(skip_all, fields(snapshot = %req.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Rpc<pb::DeleteSnapshotResponse> {
        let r = req.into_inner();
        let mut st = self.lock().await?;
        let res = st.delete_snapshot(&r.snapshot_id);
        self.finish(&mut st);
        let deleted = res?;
        Ok(Response::new(pb::DeleteSnapshotResponse { deleted }))
    }

    #[tracing::instrument(skip_all, fields(snapshot = %req.get_ref().snapshot_id, name = %req.get_ref().name))]
    async fn clone_volume(&self, req: Request<pb::CloneVolumeRequest>) -> Rpc<pb::VolumeResponse> {
        let r = req.into_inner();
        let mut st = self.lock().await?;
        let res = st.clone_volume(
            &r.snapshot_id,
            &r.name,
            r.size_bytes,
            r.replicas,
            r.thin,
            self.clock.unix_ms(),
        );
        self.finish(&mut st);
        let v = res?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(volume_pb(&st, &v)),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, initiator = %req.get_ref().initiator_iqn))]
    async fn acl_add(&self, req: Request<pb::AclRequest>) -> Rpc<pb::AclResponse> {
        let r = req.into_inner();
        let mode = AclMode::from_read_only(r.read_only);
        let view = self
            .in_force_after("AclAdd", |st| {
                Ok(st.acl_add_mode(&r.volume_id, &r.initiator_iqn, mode, r.change_mode)?)
            })
            .await?;
        Ok(Response::new(acl_pb(view)))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, initiator = %req.get_ref().initiator_iqn))]
    async fn acl_remove(&self, req: Request<pb::AclRequest>) -> Rpc<pb::AclResponse> {
        let r = req.into_inner();
        let view = self
            .in_force_after("AclRemove", |st| {
                Ok(st.acl_remove_view(&r.volume_id, &r.initiator_iqn)?)
            })
            .await?;
        Ok(Response::new(acl_pb(view)))
    }

    async fn get_extents(
        &self,
        req: Request<pb::GetExtentsRequest>,
    ) -> Rpc<pb::GetExtentsResponse> {
        let r = req.into_inner();
        let st = self.lock().await?;
        let (v, es) = st.extents(&r.volume_id)?;
        Ok(Response::new(pb::GetExtentsResponse {
            extent_size_bytes: EXTENT_SIZE,
            replicas: v.replicas,
            extents: es.iter().map(extent_pb).collect(),
        }))
    }

    async fn list_recovery_tasks(
        &self,
        req: Request<pb::ListRecoveryTasksRequest>,
    ) -> Rpc<pb::ListRecoveryTasksResponse> {
        let r = req.into_inner();
        let st = self.lock().await?;
        let filter = (r.target_chunk != 0).then_some(r.target_chunk);
        let tasks = st.recovery_tasks(filter).iter().map(task_pb).collect();
        Ok(Response::new(pb::ListRecoveryTasksResponse { tasks }))
    }

    #[tracing::instrument(skip_all, fields(task = req.get_ref().task_id, success = req.get_ref().success))]
    async fn complete_recovery(
        &self,
        req: Request<pb::CompleteRecoveryRequest>,
    ) -> Rpc<pb::CompleteRecoveryResponse> {
        let r = req.into_inner();
        let mut st = self.lock().await?;
        let res = st.complete_recovery(r.task_id, r.success, &r.error);
        self.finish(&mut st);
        let e = res?;
        let extent = e.as_ref().map(extent_pb);
        Ok(Response::new(pb::CompleteRecoveryResponse { extent }))
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Rpc<pb::ClusterStatusResponse> {
        let st = self.lock().await?;
        let s = st.status();
        Ok(Response::new(pb::ClusterStatusResponse {
            cluster_id: s.cluster_id.to_string(),
            health: match s.health {
                Health::Ok => pb::Health::Ok,
                Health::Degraded => pb::Health::Degraded,
                Health::Critical => pb::Health::Critical,
            } as i32,
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
            rebalance_moves: s.rebalance_moves,
            revision: s.revision,
        }))
    }

    async fn list_exports(
        &self,
        _req: Request<pb::ListExportsRequest>,
    ) -> Rpc<pb::ListExportsResponse> {
        let st = self.lock().await?;
        let targets = st
            .exports()
            .into_iter()
            .map(|t| pb::ExportedTarget {
                iqn: t.iqn,
                luns: t
                    .luns
                    .into_iter()
                    .map(|l| {
                        let (serial, naa) = vpd_identity(&l.volume.id);
                        pb::ExportedLun {
                            lun: u32::from(l.lun),
                            volume_id: l.volume.id.to_string(),
                            volume_name: l.volume.name,
                            size_bytes: l.volume.size_bytes,
                            capacity_generation: l.volume.capacity_generation,
                            vpd_serial: serial,
                            naa_id: naa.to_vec(),
                            allowed_initiators: l.acl.into_iter().collect(),
                            read_only_initiators: l.read_only.into_iter().collect(),
                            fully_provisioned: !l.volume.thin,
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListExportsResponse {
            targets,
            revision: st.revision(),
        }))
    }

    #[tracing::instrument(skip_all, fields(vip = %req.get_ref().vip, holder = %req.get_ref().holder))]
    async fn acquire_vip_lease(
        &self,
        req: Request<pb::AcquireVipLeaseRequest>,
    ) -> Rpc<pb::VipLeaseResponse> {
        let r = req.into_inner();
        let mut st = self.lock().await?;
        let res = st.acquire_vip_lease_applied(
            &r.vip,
            &r.holder,
            Duration::from_millis(r.ttl_ms),
            r.token,
            r.applied_revision,
            self.clock.now(),
        );
        self.finish(&mut st);
        drop(st);
        let v = res?;
        self.acked();
        Ok(Response::new(lease_pb(&v)))
    }

    async fn get_vip_lease(
        &self,
        req: Request<pb::GetVipLeaseRequest>,
    ) -> Rpc<pb::VipLeaseResponse> {
        let r = req.into_inner();
        let st = self.lock().await?;
        Ok(Response::new(lease_pb(
            &st.vip_lease(&r.vip, self.clock.now()),
        )))
    }

    // ---- data path: stubs until the cluster slice lands ----

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, index = req.get_ref().index, chunk = req.get_ref().chunk_id))]
    async fn report_replica_failure(
        &self,
        req: Request<pb::ReportReplicaFailureRequest>,
    ) -> Rpc<pb::ExtentResponse> {
        self.do_report_replica_failure(req).await
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, index = req.get_ref().index))]
    async fn ensure_extent(&self, req: Request<pb::ExtentRequest>) -> Rpc<pb::ExtentResponse> {
        let r = req.into_inner();
        let mut st = self.lock().await?;
        let res = st.ensure_extent(&r.volume_id, r.index);
        self.finish(&mut st);
        let e = res?;
        Ok(Response::new(pb::ExtentResponse {
            extent: Some(extent_pb(&e)),
        }))
    }

    async fn list_chunk_extents(
        &self,
        req: Request<pb::ListChunkExtentsRequest>,
    ) -> Rpc<pb::ListChunkExtentsResponse> {
        self.do_list_chunk_extents(req).await
    }

    async fn resolve_extent(
        &self,
        req: Request<pb::ExtentRequest>,
    ) -> Rpc<pb::ResolveExtentResponse> {
        let r = req.into_inner();
        let st = self.lock().await?;
        let res = st.resolve_extent(&r.volume_id, r.index)?;
        Ok(Response::new(pb::ResolveExtentResponse {
            read: res.read.map(|e| extent_pb(&e)),
            own: res.own.map(|e| extent_pb(&e)),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, index = req.get_ref().index))]
    async fn copy_up_extent(
        &self,
        req: Request<pb::ExtentRequest>,
    ) -> Rpc<pb::CopyUpExtentResponse> {
        let r = req.into_inner();
        let mut st = self.lock().await?;
        let res = st.copy_up_extent(&r.volume_id, r.index);
        self.finish(&mut st);
        let (source, dst) = res?;
        Ok(Response::new(pb::CopyUpExtentResponse {
            source: source.map(|e| extent_pb(&e)),
            destination: Some(extent_pb(&dst)),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume_id, index = req.get_ref().index, extent = %req.get_ref().store_key))]
    async fn commit_copy_up(
        &self,
        req: Request<pb::CommitCopyUpRequest>,
    ) -> Rpc<pb::ExtentResponse> {
        let r = req.into_inner();
        let mut st = self.lock().await?;
        let res = st.commit_copy_up(&r.volume_id, r.index, &r.store_key);
        self.finish(&mut st);
        let e = res?;
        Ok(Response::new(pb::ExtentResponse {
            extent: Some(extent_pb(&e)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_is_freed_only_when_its_last_watch_goes_away_from_its_side() {
        let w = Arc::default();
        assert!(VipWatch::open(&w, "").is_none(), "no holder named");
        let first = VipWatch::open(&w, "a").unwrap();
        let second = VipWatch::open(&w, "a").unwrap();
        // It reconnected: the old stream's end frees nothing.
        assert_eq!(first.close(true), None);
        // Meta ending the last stream frees nothing either.
        assert_eq!(second.close(false), None);
        assert!(w.lock().unwrap().is_empty());
        let only = VipWatch::open(&w, "a").unwrap();
        assert_eq!(only.close(true).as_deref(), Some("a"));
        assert!(w.lock().unwrap().is_empty());
    }
}
