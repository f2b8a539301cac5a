//! Topology (CSI VOLUME_ACCESSIBILITY_CONSTRAINTS): one segment, the
//! cluster.
//!
//! Every ironblock volume is reachable from any node that reaches its
//! cluster's VIP, so a volume is accessible exactly from the nodes of its
//! cluster: the segment `topology.ironblock.io/cluster = <cluster id>`
//! (meta's cluster id, a UUID in lowercase dashed form, which is a valid
//! Kubernetes label value). NodeGetInfo reports it (the kubelet labels the
//! node with it), CreateVolume / ListVolumes / ControllerGetVolume return it
//! as the volume's accessible topology (the external-provisioner turns it
//! into the PV's node affinity), CreateVolume refuses requisite topologies
//! of another cluster, GetCapacity has nothing for another cluster.
//!
//! The controller learns the cluster id from meta (`ClusterStatus`); the
//! node from `--cluster-id`, or from meta when it is given `--meta`
//! instead. A configured id the controller's meta contradicts fails the
//! calls that need it (FAILED_PRECONDITION) rather than label volumes with
//! a cluster no node is in.

use std::collections::HashMap;

use ironblock_proto::csi;
use ironblock_proto::v1 as pb;
use ironblock_proto::v1::meta_client::MetaClient;
use ironblock_proto::MetaChannel;
use tokio::sync::OnceCell;

use crate::error::{CsiError, Result};

/// The topology key of the cluster segment.
pub const CLUSTER_KEY: &str = "topology.ironblock.io/cluster";

/// The canonical form of a cluster id (lowercase, dashed 8-4-4-4-12), or
/// None when `id` is no UUID (32 hex digits, dashed or not).
pub fn canonical_cluster_id(id: &str) -> Option<String> {
    let id = id.trim();
    if !crate::names::is_uuid(id) {
        return None;
    }
    let hex = crate::names::serial_of(id);
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// The one topology a volume of cluster `cluster_id` is accessible from.
pub fn segment(cluster_id: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(CLUSTER_KEY.to_string(), cluster_id.to_string())]),
    }
}

/// Whether a volume of cluster `cluster_id` is accessible from topology
/// `t`: `t` names this cluster. Other keys in `t` describe finer domains
/// (a zone, a rack) whose nodes are in this cluster too, so they do not
/// matter; a topology without the cluster key is not one this driver can
/// vouch for.
pub fn reaches(t: &csi::Topology, cluster_id: &str) -> bool {
    t.segments.get(CLUSTER_KEY).map(String::as_str) == Some(cluster_id)
}

/// Why CreateVolume's `accessibility_requirements` cannot be met by a
/// volume of cluster `cluster_id`, or None when they can.
///
/// CSI spec (TopologyRequirement): the volume MUST be accessible from at
/// least one requisite topology, so a requisite list that does not name
/// this cluster cannot be met. Preferred topologies are a wish: "if the
/// list of requisite topologies is not specified, then the SP MAY choose
/// from the list of all possible topologies", and the only possible one is
/// this cluster, so a preferred list alone never fails the call (nor does a
/// requirement with both lists empty, which the CO must not send).
pub fn unsatisfiable(req: Option<&csi::TopologyRequirement>, cluster_id: &str) -> Option<String> {
    let req = req?;
    if req.requisite.is_empty() || req.requisite.iter().any(|t| reaches(t, cluster_id)) {
        return None;
    }
    let named: Vec<String> = req
        .requisite
        .iter()
        .map(|t| match t.segments.get(CLUSTER_KEY) {
            Some(c) => format!("{CLUSTER_KEY}={c}"),
            None => format!("{:?} (no {CLUSTER_KEY})", sorted(&t.segments)),
        })
        .collect();
    Some(format!(
        "volumes of this driver are accessible only from {CLUSTER_KEY}={cluster_id}; \
         the requisite topologies are {named:?}"
    ))
}

fn sorted(m: &HashMap<String, String>) -> Vec<(&String, &String)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort();
    v
}

/// Where this process gets its cluster id: configured (`--cluster-id`),
/// learned from meta (cached after the first answer), or both (meta's
/// answer must then be the configured one).
#[derive(Debug)]
pub struct ClusterId {
    configured: Option<String>,
    meta: Option<MetaClient<MetaChannel>>,
    learned: OnceCell<String>,
}

impl ClusterId {
    /// A configured id (checked against meta when `meta` is given) and/or
    /// meta to ask. INVALID_ARGUMENT for an id that is no UUID, or for
    /// neither source.
    pub fn new(
        configured: Option<&str>,
        meta: Option<MetaClient<MetaChannel>>,
    ) -> Result<ClusterId> {
        let configured = match configured {
            Some(c) => Some(canonical_cluster_id(c).ok_or_else(|| {
                CsiError::InvalidArgument(format!(
                    "cluster id {c:?} is not a cluster id (a UUID, see `ironblock status`)"
                ))
            })?),
            None => None,
        };
        if configured.is_none() && meta.is_none() {
            return Err(CsiError::InvalidArgument(
                "the cluster id needs --cluster-id or --meta".into(),
            ));
        }
        Ok(ClusterId {
            configured,
            meta,
            learned: OnceCell::new(),
        })
    }

    /// The cluster id: meta's (asked once; the configured one must match
    /// it: FAILED_PRECONDITION otherwise), else the configured one. Meta
    /// unreachable: its code (UNAVAILABLE), asked again on the next call.
    pub async fn get(&self) -> Result<String> {
        let Some(meta) = &self.meta else {
            return self
                .configured
                .clone()
                .ok_or_else(|| CsiError::Internal("no cluster id source".into()));
        };
        let learned = self
            .learned
            .get_or_try_init(|| async {
                let st = meta
                    .clone()
                    .cluster_status(pb::ClusterStatusRequest {})
                    .await
                    .map_err(|s| CsiError::from_meta("cluster status", &s))?
                    .into_inner();
                canonical_cluster_id(&st.cluster_id).ok_or_else(|| {
                    CsiError::Internal(format!(
                        "meta answered cluster id {:?}, not a UUID",
                        st.cluster_id
                    ))
                })
            })
            .await?;
        match &self.configured {
            Some(c) if c != learned => Err(CsiError::FailedPrecondition(format!(
                "meta serves cluster {learned}, but the cluster id is configured as {c} \
                 (--cluster-id / IRONBLOCK_CLUSTER_ID)"
            ))),
            _ => Ok(learned.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0f1e2d3c-4b5a-4697-8877-665544332211";
    const OTHER: &str = "11111111-2222-4333-8444-555555555555";

    fn topo(pairs: &[(&str, &str)]) -> csi::Topology {
        csi::Topology {
            segments: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn req(
        requisite: Vec<csi::Topology>,
        preferred: Vec<csi::Topology>,
    ) -> csi::TopologyRequirement {
        csi::TopologyRequirement {
            requisite,
            preferred,
        }
    }

    #[test]
    fn canonical_ids() {
        assert_eq!(canonical_cluster_id(ID).as_deref(), Some(ID));
        assert_eq!(
            canonical_cluster_id(&ID.to_ascii_uppercase()).as_deref(),
            Some(ID)
        );
        assert_eq!(
            canonical_cluster_id(&ID.replace('-', "")).as_deref(),
            Some(ID)
        );
        assert_eq!(
            canonical_cluster_id(&format!(" {ID}\n")).as_deref(),
            Some(ID)
        );
        for bad in [
            "",
            "prod",
            "0f1e2d3c-4b5a-4697-8877-66554433221",
            "0f1e2d3c4b5a-4697-8877-665544332211x",
        ] {
            assert_eq!(canonical_cluster_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_segment_is_the_cluster() {
        let s = segment(ID);
        assert_eq!(s.segments.len(), 1);
        assert_eq!(s.segments[CLUSTER_KEY], ID);
        assert!(reaches(&s, ID));
        assert!(!reaches(&s, OTHER));
        // A finer domain inside this cluster is reached; a topology that
        // does not name the cluster is not.
        assert!(reaches(
            &topo(&[(CLUSTER_KEY, ID), ("topology.kubernetes.io/zone", "z1")]),
            ID
        ));
        assert!(!reaches(
            &topo(&[("topology.kubernetes.io/zone", "z1")]),
            ID
        ));
        assert!(!reaches(&topo(&[]), ID));
        assert!(!reaches(
            &topo(&[(CLUSTER_KEY, &ID.to_ascii_uppercase())]),
            ID
        ));
    }

    #[test]
    fn requirements_per_spec() {
        let ours = topo(&[(CLUSTER_KEY, ID)]);
        let theirs = topo(&[(CLUSTER_KEY, OTHER)]);
        let zone = topo(&[("topology.kubernetes.io/zone", "z1")]);
        assert_eq!(unsatisfiable(None, ID), None);
        assert_eq!(unsatisfiable(Some(&req(vec![], vec![])), ID), None);
        // Requisite: at least one must be this cluster.
        assert_eq!(
            unsatisfiable(Some(&req(vec![ours.clone()], vec![])), ID),
            None
        );
        assert_eq!(
            unsatisfiable(
                Some(&req(vec![theirs.clone(), ours.clone()], vec![ours.clone()])),
                ID
            ),
            None
        );
        let why = unsatisfiable(Some(&req(vec![theirs.clone()], vec![])), ID).expect("refused");
        assert!(why.contains(OTHER) && why.contains(ID), "{why}");
        let why = unsatisfiable(Some(&req(vec![zone.clone()], vec![])), ID).expect("refused");
        assert!(why.contains("no topology.ironblock.io/cluster"), "{why}");
        assert!(
            unsatisfiable(Some(&req(vec![theirs.clone()], vec![theirs.clone()])), ID).is_some()
        );
        // Preferred alone is a wish: the SP may choose any topology.
        assert_eq!(
            unsatisfiable(Some(&req(vec![], vec![theirs.clone()])), ID),
            None
        );
        assert_eq!(unsatisfiable(Some(&req(vec![], vec![zone])), ID), None);
    }

    #[tokio::test]
    async fn sources() {
        assert!(matches!(
            ClusterId::new(None, None),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            ClusterId::new(Some("prod-a"), None),
            Err(CsiError::InvalidArgument(_))
        ));
        let c = ClusterId::new(Some(&ID.to_ascii_uppercase()), None).unwrap();
        assert_eq!(c.get().await.unwrap(), ID);
        // Meta unreachable: UNAVAILABLE (not cached), whatever is configured.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let meta = crate::controller::meta_client(
            &format!("127.0.0.1:{port}"),
            std::time::Duration::from_secs(2),
        )
        .unwrap();
        let c = ClusterId::new(Some(ID), Some(meta)).unwrap();
        assert!(matches!(c.get().await, Err(CsiError::Unavailable(_))));
        assert!(matches!(c.get().await, Err(CsiError::Unavailable(_))));
    }
}
