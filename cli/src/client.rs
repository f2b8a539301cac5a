//! Talking to meta: connecting with a timeout, one-line error messages for
//! gRPC failures, and resolving volumes and snapshots named by name or id.

use std::time::Duration;

use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use ironblock_proto::MetaChannel;
use tonic::{Code, Status};

/// A connection to meta.
pub struct Meta {
    /// The generated client (it follows the meta group's leader).
    pub client: MetaClient<MetaChannel>,
    /// The same members, for the group calls (`MetaRaft`).
    pub group: ironblock_proto::v1::meta_raft_client::MetaRaftClient<MetaChannel>,
    /// The address as given (for messages).
    pub addr: String,
    timeout: Duration,
}

/// `host:port` or `http://host:port` as a URL tonic accepts.
pub fn meta_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// `e` and its sources joined with ": " on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl Meta {
    /// A client of the meta group at `addr` (comma-separated members; it
    /// follows the leader). Connects lazily; every call, with its retries
    /// across members, is bounded by `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<Meta> {
        let connect = timeout.min(Duration::from_secs(1));
        let channel = |retry: Duration| {
            MetaChannel::new(addr, retry, move |e| {
                e.connect_timeout(connect).timeout(timeout)
            })
            .map_err(|e| anyhow::anyhow!("invalid meta address {:?}: {}", e.addr, e.reason))
        };
        Ok(Meta {
            client: MetaClient::new(channel(timeout)?),
            group: ironblock_proto::v1::meta_raft_client::MetaRaftClient::new(channel(timeout)?),
            addr: addr.to_string(),
            timeout,
        })
    }

    /// A one-line error for a failed call. `what` names the operation
    /// ("create volume \"x\""); `not_found` is the message for NOT_FOUND.
    pub fn error(&self, what: &str, not_found: Option<&str>, s: &Status) -> anyhow::Error {
        let msg = s.message().trim();
        match s.code() {
            Code::Unavailable => {
                anyhow::anyhow!("cannot reach meta at {}: {}", self.addr, status_detail(s))
            }
            Code::DeadlineExceeded | Code::Cancelled => anyhow::anyhow!(
                "{what}: meta at {} did not answer within {:?}",
                self.addr,
                self.timeout
            ),
            Code::NotFound => match not_found {
                Some(m) => anyhow::anyhow!("{m}"),
                None => anyhow::anyhow!("{what}: {msg}"),
            },
            _ if msg.is_empty() => anyhow::anyhow!("{what}: {}", s.code().description()),
            _ => anyhow::anyhow!("{what}: {msg}"),
        }
    }

    /// The volume named `r` (a name, or an id).
    pub async fn volume(&mut self, r: &str) -> anyhow::Result<pb::Volume> {
        match self.find_volume(r).await? {
            Some(v) => Ok(v),
            None => anyhow::bail!("volume {r:?} not found"),
        }
    }

    /// Like [`Meta::volume`], `None` if there is no such volume.
    pub async fn find_volume(&mut self, r: &str) -> anyhow::Result<Option<pb::Volume>> {
        let mut refs = vec![pb::volume_ref::Ref::Name(r.to_string())];
        if ironblock_meta::Uuid::parse(r).is_ok() {
            refs.push(pb::volume_ref::Ref::Id(r.to_string()));
        }
        for rr in refs {
            let req = pb::VolumeRef { r#ref: Some(rr) };
            match self.client.get_volume(req).await {
                Ok(resp) => {
                    if let Some(v) = resp.into_inner().volume {
                        return Ok(Some(v));
                    }
                }
                // Names meta refuses as names are not volumes either.
                Err(s) if matches!(s.code(), Code::NotFound | Code::InvalidArgument) => {}
                Err(s) => return Err(self.error(&format!("look up volume {r:?}"), None, &s)),
            }
        }
        Ok(None)
    }

    /// Every snapshot, or those of one volume id.
    pub async fn snapshots(&mut self, volume_id: &str) -> anyhow::Result<Vec<pb::Snapshot>> {
        let req = pb::ListSnapshotsRequest {
            volume_id: volume_id.to_string(),
        };
        match self.client.list_snapshots(req).await {
            Ok(r) => Ok(r.into_inner().snapshots),
            Err(s) => Err(self.error("list snapshots", None, &s)),
        }
    }

    /// The snapshot named `r` (name or id), `None` if there is none.
    pub async fn find_snapshot(&mut self, r: &str) -> anyhow::Result<Option<pb::Snapshot>> {
        let all = self.snapshots("").await?;
        Ok(all
            .iter()
            .find(|s| s.id == r)
            .or_else(|| all.iter().find(|s| s.name == r))
            .cloned())
    }

    /// The snapshot named `r` (name or id).
    pub async fn snapshot(&mut self, r: &str) -> anyhow::Result<pb::Snapshot> {
        match self.find_snapshot(r).await? {
            Some(s) => Ok(s),
            None => anyhow::bail!("snapshot {r:?} not found"),
        }
    }

    /// Every chunk.
    pub async fn chunks(&mut self) -> anyhow::Result<Vec<pb::Chunk>> {
        match self.client.list_chunks(pb::ListChunksRequest {}).await {
            Ok(r) => Ok(r.into_inner().chunks),
            Err(s) => Err(self.error("list chunks", None, &s)),
        }
    }
}

/// The status message, or the transport cause when tonic left it generic.
fn status_detail(s: &Status) -> String {
    let msg = s.message().trim().to_string();
    match std::error::Error::source(s) {
        Some(src) => {
            let c = chain(src);
            if msg.is_empty() || c.contains(&msg) {
                c
            } else {
                format!("{msg}: {c}")
            }
        }
        None if msg.is_empty() => s.code().description().to_string(),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(meta_url("127.0.0.1:7000"), "http://127.0.0.1:7000");
        assert_eq!(meta_url("http://127.0.0.1:7000"), "http://127.0.0.1:7000");
    }
}
