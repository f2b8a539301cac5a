//! The meta group's transport: openraft's three RPCs over gRPC
//! (`ironblock.v1.MetaRaft`, on meta's own port), each payload an openraft
//! message in bincode. The client keeps one lazy channel per peer.

use std::time::Duration;

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_raft_client::MetaRaftClient;
use ironblock_proto::v1::meta_raft_server::MetaRaft;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::{Group, NodeId, NotServing, Raft, TypeConfig};

/// Dials peers.
#[derive(Clone, Default)]
pub struct Network;

/// One peer.
pub struct Peer {
    target: NodeId,
    client: Option<MetaRaftClient<Channel>>,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        let client = Endpoint::from_shared(format!("http://{}", node.addr))
            .ok()
            .map(|e| {
                e.connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(Duration::from_secs(2))
                    .connect_lazy()
            })
            .map(MetaRaftClient::new);
        Peer {
            target,
            client,
            addr: node.addr.clone(),
        }
    }
}

fn encode<T: Serialize>(v: &T) -> Result<pb::RaftPayload, bincode::Error> {
    Ok(pb::RaftPayload {
        data: bincode::serialize(v)?,
    })
}

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

impl Peer {
    /// Send `req` with `call`; decode the peer's `Result<Resp, Err>`.
    async fn call<Req, Resp, E>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        which: u8,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(format!("peer address {:?} is not usable", self.addr)),
            )));
        };
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::from(any(e))))?;
        let mut request = Request::new(payload);
        request.set_timeout(option.hard_ttl());
        let res = match which {
            0 => client.append_entries(request).await,
            1 => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = match res {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::from(any(format!(
                    "{}: {}",
                    self.addr,
                    s.message()
                )))))
            }
            Err(s) => {
                return Err(RPCError::Network(NetworkError::from(any(format!(
                    "{}: {s}",
                    self.addr
                )))))
            }
        };
        let decoded: Result<Resp, RaftError<NodeId, E>> = bincode::deserialize(&reply.data)
            .map_err(|e| RPCError::Network(NetworkError::from(any(e))))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, &option, 0).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(&rpc, &option, 2).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, &option, 1).await
    }
}

/// The server side: hands each RPC to the local Raft, and serves the
/// membership calls.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    group: Group,
}

impl RaftService {
    /// Serves `group`.
    pub fn new(group: Group) -> Self {
        RaftService {
            raft: group.raft.clone(),
            group,
        }
    }

    fn members(&self) -> pb::ListMetasResponse {
        let m = self.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let matched: std::collections::BTreeMap<NodeId, u64> = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let members = self
            .group
            .members()
            .into_iter()
            .map(|(id, addr, voter)| {
                let idx = matched.get(&id).copied();
                pb::MetaMember {
                    id,
                    addr,
                    voter,
                    lag: idx.map(|i| last.saturating_sub(i)).unwrap_or(0),
                    matched_index: idx.unwrap_or(0),
                }
            })
            .collect();
        let standing = self.group.standing();
        let (leader_id, leader_addr) = standing.leader.unwrap_or((0, String::new()));
        pb::ListMetasResponse {
            members,
            leader_id,
            leader_addr,
            term: m.current_term,
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            node_id: self.group.id,
            quorum_ack_ms_ago: m.millis_since_quorum_ack.unwrap_or(0),
        }
    }
}

/// A membership change's failure as a status (the leader hint when this
/// node does not lead).
fn change_failed<E: std::fmt::Display>(
    e: RaftError<NodeId, openraft::error::ClientWriteError<NodeId, BasicNode>>,
    what: E,
) -> Status {
    match e {
        RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(f)) => {
            crate::service::not_serving(match f.leader_node {
                Some(n) => NotServing::Leader(n.addr),
                None => NotServing::NoLeader,
            })
        }
        RaftError::APIError(openraft::error::ClientWriteError::ChangeMembershipError(c)) => {
            Status::failed_precondition(format!("{what}: {c}"))
        }
        e => Status::unavailable(format!("{what}: {e}")),
    }
}

fn decode<T: DeserializeOwned>(p: &pb::RaftPayload) -> Result<T, Status> {
    bincode::deserialize(&p.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

fn reply<T: Serialize>(v: &T) -> Result<Response<pb::RaftPayload>, Status> {
    encode(v)
        .map(Response::new)
        .map_err(|e| Status::internal(format!("encoding a raft reply: {e}")))
}

#[tonic::async_trait]
impl MetaRaft for RaftService {
    async fn append_entries(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn list_metas(
        &self,
        _req: Request<pb::ListMetasRequest>,
    ) -> Result<Response<pb::ListMetasResponse>, Status> {
        Ok(Response::new(self.members()))
    }

    #[tracing::instrument(skip_all, fields(id = req.get_ref().id, addr = %req.get_ref().addr))]
    async fn add_meta(
        &self,
        req: Request<pb::AddMetaRequest>,
    ) -> Result<Response<pb::ListMetasResponse>, Status> {
        let r = req.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument("meta node ids start at 1"));
        }
        if r.addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(Status::invalid_argument(format!(
                "meta address {:?} is not host:port",
                r.addr
            )));
        }
        let members = self.group.members();
        if let Some((_, addr, voter)) = members.iter().find(|(id, _, _)| *id == r.id) {
            if *addr != r.addr {
                return Err(Status::already_exists(format!(
                    "meta node {} is a member at {addr}; remove it first to move it",
                    r.id
                )));
            }
            if *voter {
                return Ok(Response::new(self.members()));
            }
        }
        // A learner first: it catches up (a snapshot if the log is
        // compacted) before it counts towards any quorum.
        self.raft
            .add_learner(r.id, BasicNode::new(&r.addr), true)
            .await
            .map_err(|e| change_failed(e, "adding the learner"))?;
        let voters: std::collections::BTreeSet<NodeId> = members
            .iter()
            .filter(|(_, _, v)| *v)
            .map(|(id, _, _)| *id)
            .chain([r.id])
            .collect();
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| change_failed(e, "making it a voter"))?;
        tracing::info!(id = r.id, addr = %r.addr, "meta node added");
        Ok(Response::new(self.members()))
    }

    #[tracing::instrument(skip_all, fields(id = req.get_ref().id))]
    async fn remove_meta(
        &self,
        req: Request<pb::RemoveMetaRequest>,
    ) -> Result<Response<pb::ListMetasResponse>, Status> {
        let r = req.into_inner();
        let members = self.group.members();
        if !members.iter().any(|(id, _, _)| *id == r.id) {
            return Ok(Response::new(self.members()));
        }
        let voters: std::collections::BTreeSet<NodeId> = members
            .iter()
            .filter(|(id, _, v)| *v && *id != r.id)
            .map(|(id, _, _)| *id)
            .collect();
        if voters.is_empty() {
            return Err(Status::failed_precondition(
                "that is the last voter: the group cannot remove itself",
            ));
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| change_failed(e, "removing the voter"))?;
        tracing::info!(id = r.id, "meta node removed");
        Ok(Response::new(self.members()))
    }
}
