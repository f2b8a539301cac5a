//! Parses every manifest in `deploy/kubernetes/` and checks that they fit
//! together: the driver name everywhere, the sidecars' socket paths against
//! the driver's endpoint and the volumes they mount, service accounts and
//! RBAC names, the node plugin's kubelet paths, StorageClass parameters the
//! controller accepts, topology (the provisioner's feature gate, the node's
//! source of the cluster id).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use ironblock_csi::DRIVER_NAME;
use serde::Deserialize;
use serde_yaml::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// (file, document) for every YAML document.
fn load() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("deploy/kubernetes exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "manifests missing: {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if v.is_null() {
                continue;
            }
            out.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    out
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> Vec<&'a Value> {
    let mut cur = v;
    for p in path {
        match cur.get(*p) {
            Some(c) => cur = c,
            None => return Vec::new(),
        }
    }
    cur.as_sequence()
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

fn kind(docs: &[(String, Value)], k: &str) -> Vec<Value> {
    docs.iter()
        .filter(|(_, d)| s(d, &["kind"]) == Some(k))
        .map(|(_, d)| d.clone())
        .collect()
}

fn name(d: &Value) -> &str {
    s(d, &["metadata", "name"]).expect("metadata.name")
}

fn ns(d: &Value) -> &str {
    s(d, &["metadata", "namespace"]).unwrap_or("")
}

fn args(c: &Value) -> Vec<String> {
    seq(c, &["args"])
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

fn flag(c: &Value, f: &str) -> Option<String> {
    let prefix = format!("{f}=");
    args(c)
        .iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
}

fn env(c: &Value, k: &str) -> Option<String> {
    seq(c, &["env"])
        .iter()
        .find(|e| s(e, &["name"]) == Some(k))
        .and_then(|e| s(e, &["value"]).map(str::to_string))
}

/// The volume a container mounts `file` from: (volume name, path inside the
/// volume).
fn mount_of(c: &Value, file: &str) -> Option<(String, String)> {
    seq(c, &["volumeMounts"]).iter().find_map(|m| {
        let mp = s(m, &["mountPath"])?;
        let rest = Path::new(file).strip_prefix(mp).ok()?;
        Some((
            s(m, &["name"])?.to_string(),
            rest.to_string_lossy().into_owned(),
        ))
    })
}

fn containers(w: &Value) -> Vec<&Value> {
    seq(w, &["spec", "template", "spec", "containers"])
}

fn image_has(c: &Value, what: &str) -> bool {
    s(c, &["image"]).is_some_and(|i| i.contains(what))
}

#[test]
fn every_manifest_parses_and_names_itself() {
    for (f, d) in load() {
        assert!(s(&d, &["apiVersion"]).is_some(), "{f}: no apiVersion");
        assert!(s(&d, &["kind"]).is_some(), "{f}: no kind");
        assert!(
            s(&d, &["metadata", "name"]).is_some(),
            "{f}: no metadata.name"
        );
    }
}

#[test]
fn the_driver_name_is_the_same_everywhere() {
    let docs = load();
    let drivers = kind(&docs, "CSIDriver");
    assert_eq!(drivers.len(), 1);
    assert_eq!(name(&drivers[0]), DRIVER_NAME);
    assert_eq!(
        drivers[0]["spec"]["attachRequired"],
        Value::Bool(true),
        "ControllerPublish does the LUN masking"
    );
    let classes = kind(&docs, "StorageClass");
    assert!(!classes.is_empty());
    for sc in &classes {
        assert_eq!(s(sc, &["provisioner"]), Some(DRIVER_NAME));
        assert_eq!(sc["allowVolumeExpansion"], Value::Bool(true));
        let params: HashMap<String, String> = sc
            .get("parameters")
            .and_then(|p| serde_yaml::from_value(p.clone()).ok())
            .unwrap_or_default();
        ironblock_csi::controller::check_parameters(&params)
            .unwrap_or_else(|e| panic!("StorageClass {} parameters refused: {e}", name(sc)));
    }
    let snaps = kind(&docs, "VolumeSnapshotClass");
    assert_eq!(snaps.len(), 1);
    assert_eq!(s(&snaps[0], &["driver"]), Some(DRIVER_NAME));
}

#[test]
fn namespaces_service_accounts_and_rbac_resolve() {
    let docs = load();
    let namespaces: BTreeSet<String> = kind(&docs, "Namespace")
        .iter()
        .map(|d| name(d).to_string())
        .collect();
    for (f, d) in &docs {
        let n = ns(d);
        assert!(
            n.is_empty() || namespaces.contains(n),
            "{f}: namespace {n} is not defined"
        );
    }
    let sas: BTreeSet<(String, String)> = kind(&docs, "ServiceAccount")
        .iter()
        .map(|d| (ns(d).to_string(), name(d).to_string()))
        .collect();
    let workloads: Vec<Value> = [kind(&docs, "Deployment"), kind(&docs, "DaemonSet")].concat();
    assert_eq!(workloads.len(), 2);
    for w in &workloads {
        let sa =
            s(w, &["spec", "template", "spec", "serviceAccountName"]).expect("serviceAccountName");
        assert!(
            sas.contains(&(ns(w).to_string(), sa.to_string())),
            "{}: service account {sa} missing",
            name(w)
        );
    }
    let cluster_roles: BTreeSet<String> = kind(&docs, "ClusterRole")
        .iter()
        .map(|d| name(d).to_string())
        .collect();
    let roles: BTreeSet<(String, String)> = kind(&docs, "Role")
        .iter()
        .map(|d| (ns(d).to_string(), name(d).to_string()))
        .collect();
    for b in [
        kind(&docs, "ClusterRoleBinding"),
        kind(&docs, "RoleBinding"),
    ]
    .concat()
    {
        let rk = s(&b, &["roleRef", "kind"]).unwrap();
        let rn = s(&b, &["roleRef", "name"]).unwrap().to_string();
        match rk {
            "ClusterRole" => assert!(
                cluster_roles.contains(&rn),
                "{}: ClusterRole {rn} missing",
                name(&b)
            ),
            "Role" => assert!(
                roles.contains(&(ns(&b).to_string(), rn.clone())),
                "{}: Role {rn} missing",
                name(&b)
            ),
            other => panic!("roleRef kind {other}"),
        }
        for sub in seq(&b, &["subjects"]) {
            assert_eq!(s(sub, &["kind"]), Some("ServiceAccount"));
            let key = (
                s(sub, &["namespace"]).unwrap_or("").to_string(),
                s(sub, &["name"]).unwrap().to_string(),
            );
            assert!(sas.contains(&key), "{}: subject {key:?} missing", name(&b));
        }
    }
    // The controller's account can do what its sidecars need.
    let controller = kind(&docs, "Deployment").remove(0);
    let sa = s(
        &controller,
        &["spec", "template", "spec", "serviceAccountName"],
    )
    .unwrap()
    .to_string();
    let mut granted: BTreeSet<(String, String)> = BTreeSet::new();
    for b in [
        kind(&docs, "ClusterRoleBinding"),
        kind(&docs, "RoleBinding"),
    ]
    .concat()
    {
        if !seq(&b, &["subjects"])
            .iter()
            .any(|x| s(x, &["name"]) == Some(sa.as_str()))
        {
            continue;
        }
        let rn = s(&b, &["roleRef", "name"]).unwrap();
        for r in [kind(&docs, "ClusterRole"), kind(&docs, "Role")].concat() {
            if name(&r) != rn {
                continue;
            }
            for rule in seq(&r, &["rules"]) {
                for res in seq(rule, &["resources"]) {
                    for verb in seq(rule, &["verbs"]) {
                        granted
                            .insert((res.as_str().unwrap().into(), verb.as_str().unwrap().into()));
                    }
                }
            }
        }
    }
    for (res, verb) in [
        ("persistentvolumes", "create"),
        ("persistentvolumes", "delete"),
        ("volumeattachments", "patch"),
        ("volumeattachments/status", "patch"),
        ("volumesnapshotcontents", "update"),
        ("volumesnapshotcontents/status", "update"),
        ("persistentvolumeclaims/status", "patch"),
        ("leases", "create"),
        ("leases", "update"),
        ("volumeattributesclasses", "watch"),
    ] {
        assert!(
            granted.contains(&(res.into(), verb.into())),
            "controller cannot {verb} {res}"
        );
    }
}

#[test]
fn controller_sidecars_share_the_driver_socket() {
    let docs = load();
    let d = kind(&docs, "Deployment").remove(0);
    let cs = containers(&d);
    let driver = cs
        .iter()
        .find(|c| image_has(c, "ironblock-csi"))
        .expect("driver container");
    assert!(args(driver).iter().any(|a| a == "--mode=controller"));
    let endpoint = env(driver, "CSI_ENDPOINT").expect("CSI_ENDPOINT");
    let sock = ironblock_csi::server::socket_path(&endpoint).unwrap();
    let sock = sock.to_str().unwrap();
    assert!(
        env(driver, "IRONBLOCK_META").is_some(),
        "controller needs meta's address"
    );
    let driver_vol = mount_of(driver, sock).expect("driver socket on a volume");
    let emptydirs: BTreeSet<String> = seq(&d, &["spec", "template", "spec", "volumes"])
        .iter()
        .filter(|v| v.get("emptyDir").is_some())
        .map(|v| s(v, &["name"]).unwrap().to_string())
        .collect();
    assert!(emptydirs.contains(&driver_vol.0));
    for side in [
        "csi-provisioner",
        "csi-attacher",
        "csi-snapshotter",
        "csi-resizer",
        "livenessprobe",
    ] {
        let c = cs
            .iter()
            .find(|c| image_has(c, side))
            .unwrap_or_else(|| panic!("sidecar {side} missing"));
        let addr = flag(c, "--csi-address").unwrap_or_else(|| panic!("{side}: no --csi-address"));
        assert_eq!(
            mount_of(c, &addr),
            Some(driver_vol.clone()),
            "{side} does not reach the driver's socket"
        );
        if side != "livenessprobe" {
            assert!(
                args(c).iter().any(|a| a == "--leader-election"),
                "{side}: no leader election (2 replicas)"
            );
        }
    }
    let attacher = cs.iter().find(|c| image_has(c, "csi-attacher")).unwrap();
    let workers: u32 = flag(attacher, "--worker-threads")
        .expect("--worker-threads")
        .parse()
        .unwrap();
    assert!(
        workers >= 50,
        "attacher worker threads {workers}: too few for 100 volumes"
    );
    // The liveness probe's port is the one the driver's probe checks.
    let lp = cs.iter().find(|c| image_has(c, "livenessprobe")).unwrap();
    let port: u64 = flag(lp, "--health-port").unwrap().parse().unwrap();
    assert!(seq(driver, &["ports"])
        .iter()
        .any(|p| p["containerPort"].as_u64() == Some(port)));
}

#[test]
fn node_plugin_paths_match_the_kubelet() {
    let docs = load();
    let d = kind(&docs, "DaemonSet").remove(0);
    let spec = &d["spec"]["template"]["spec"];
    assert_eq!(
        spec["hostNetwork"],
        Value::Bool(true),
        "iscsiadm must reach the host's iscsid"
    );
    let volumes: HashMap<String, String> = seq(&d, &["spec", "template", "spec", "volumes"])
        .iter()
        .filter_map(|v| {
            Some((
                s(v, &["name"])?.to_string(),
                s(v, &["hostPath", "path"])?.to_string(),
            ))
        })
        .collect();
    let cs = containers(&d);
    let driver = cs
        .iter()
        .find(|c| image_has(c, "ironblock-csi"))
        .expect("driver container");
    assert!(args(driver).iter().any(|a| a == "--mode=node"));
    assert_eq!(driver["securityContext"]["privileged"], Value::Bool(true));
    let sock = ironblock_csi::server::socket_path(&env(driver, "CSI_ENDPOINT").unwrap()).unwrap();
    let (vol, rel) = mount_of(driver, sock.to_str().unwrap()).expect("socket on a volume");
    let host_sock = Path::new(&volumes[&vol]).join(rel);
    assert_eq!(
        volumes[&vol],
        format!("/var/lib/kubelet/plugins/{DRIVER_NAME}")
    );
    let reg = cs
        .iter()
        .find(|c| image_has(c, "node-driver-registrar"))
        .expect("registrar");
    assert_eq!(
        flag(reg, "--kubelet-registration-path").map(PathBuf::from),
        Some(host_sock)
    );
    assert_eq!(
        mount_of(reg, &flag(reg, "--csi-address").unwrap()).map(|m| m.0),
        Some(vol.clone())
    );
    let (rv, _) = mount_of(reg, "/registration/x").expect("registration dir mounted");
    assert_eq!(volumes[&rv], "/var/lib/kubelet/plugins_registry");
    // Mounts made in the container reach the kubelet (and pods).
    let kubelet = seq(driver, &["volumeMounts"])
        .into_iter()
        .find(|m| s(m, &["mountPath"]) == Some("/var/lib/kubelet"))
        .expect("kubelet dir mounted");
    assert_eq!(s(kubelet, &["mountPropagation"]), Some("Bidirectional"));
    for p in ["/dev", "/sys", "/etc/iscsi"] {
        let (v, _) =
            mount_of(driver, &format!("{p}/x")).unwrap_or_else(|| panic!("{p} not mounted"));
        assert_eq!(volumes[&v], p);
    }
    // The state dir survives restarts (on the host).
    let state = env(driver, "IRONBLOCK_CSI_STATE_DIR").expect("state dir");
    let (sv, _) = mount_of(driver, &state).expect("state dir on a host volume");
    assert!(volumes.contains_key(&sv));
    let lp = cs
        .iter()
        .find(|c| image_has(c, "livenessprobe"))
        .expect("livenessprobe");
    assert_eq!(
        mount_of(lp, &flag(lp, "--csi-address").unwrap()).map(|m| m.0),
        Some(vol)
    );
}

/// The driver reports VOLUME_ACCESSIBILITY_CONSTRAINTS and returns the
/// cluster segment as every volume's topology: the provisioner must have
/// its Topology feature on (else the PVs get no node affinity and the
/// requirements are never sent), RBAC must let it read nodes and CSINodes
/// (the topology keys), and every node plugin must know its cluster id
/// (NodeGetInfo reports it; the binary refuses node mode without it):
/// `IRONBLOCK_CLUSTER_ID`, or meta's address, the controller's.
#[test]
fn topology_is_wired_from_the_node_to_the_provisioner() {
    let docs = load();
    let d = kind(&docs, "Deployment").remove(0);
    let cs = containers(&d);
    let prov = cs
        .iter()
        .find(|c| image_has(c, "csi-provisioner"))
        .expect("provisioner");
    let gates = flag(prov, "--feature-gates").expect("--feature-gates on the provisioner");
    assert!(
        gates.split(',').any(|g| g.trim() == "Topology=true"),
        "provisioner feature gates {gates:?} lack Topology=true"
    );
    let controller = cs
        .iter()
        .find(|c| image_has(c, "ironblock-csi"))
        .expect("driver container");
    let controller_meta = env(controller, "IRONBLOCK_META").expect("controller meta");

    let mut provisioner_reads: BTreeSet<String> = BTreeSet::new();
    for r in kind(&docs, "ClusterRole") {
        if name(&r) != "ironblock-csi-provisioner" {
            continue;
        }
        for rule in seq(&r, &["rules"]) {
            let verbs: Vec<&str> = seq(rule, &["verbs"])
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            if ["get", "list", "watch"].iter().all(|v| verbs.contains(v)) {
                for res in seq(rule, &["resources"]) {
                    provisioner_reads.insert(res.as_str().unwrap().to_string());
                }
            }
        }
    }
    for res in ["nodes", "csinodes"] {
        assert!(
            provisioner_reads.contains(res),
            "the provisioner cannot get/list/watch {res} (topology keys)"
        );
    }

    let ds = kind(&docs, "DaemonSet").remove(0);
    let node = containers(&ds)
        .into_iter()
        .find(|c| image_has(c, "ironblock-csi"))
        .expect("node driver container");
    let has_arg = |f: &str| args(node).iter().any(|a| a.starts_with(f));
    match (
        env(node, "IRONBLOCK_CLUSTER_ID"),
        env(node, "IRONBLOCK_META"),
    ) {
        (Some(id), _) => assert!(
            ironblock_csi::topology::canonical_cluster_id(&id).is_some(),
            "IRONBLOCK_CLUSTER_ID {id:?} is no cluster id"
        ),
        (None, Some(meta)) => assert_eq!(
            meta, controller_meta,
            "the node learns the cluster id from another meta than the controller's"
        ),
        (None, None) => assert!(
            has_arg("--cluster-id") || has_arg("--meta"),
            "the node plugin has no cluster id source (IRONBLOCK_CLUSTER_ID or IRONBLOCK_META)"
        ),
    }
}

/// The commented VolumeAttributesClass example in storageclass.yaml, with
/// its comment markers stripped, is a class for this driver whose
/// parameters ControllerModifyVolume accepts; the sidecars' gate is there
/// to enable.
#[test]
fn the_volume_attributes_class_example_is_one_the_driver_takes() {
    let text = std::fs::read_to_string(dir().join("storageclass.yaml")).unwrap();
    let block: String = text
        .lines()
        .skip_while(|l| !l.starts_with("# --- begin VolumeAttributesClass"))
        .skip(1)
        .take_while(|l| !l.starts_with("# --- end"))
        .map(|l| {
            format!(
                "{}\n",
                l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#'))
            )
        })
        .collect();
    assert!(!block.is_empty(), "example missing from storageclass.yaml");
    let vac: Value = serde_yaml::from_str(&block).expect("the example parses");
    assert_eq!(s(&vac, &["kind"]), Some("VolumeAttributesClass"));
    assert!(s(&vac, &["apiVersion"]).is_some_and(|v| v.starts_with("storage.k8s.io/")));
    assert_eq!(s(&vac, &["driverName"]), Some(DRIVER_NAME));
    let params: HashMap<String, String> =
        serde_yaml::from_value(vac["parameters"].clone()).expect("string parameters");
    ironblock_csi::controller::check_mutable_parameters(&params)
        .unwrap_or_else(|e| panic!("example parameters refused: {e}"));
    // And the StorageClass's other keys are not mutable.
    let mut thin = params.clone();
    thin.insert("thin".into(), "false".into());
    assert!(ironblock_csi::controller::check_mutable_parameters(&thin).is_err());
    // The gate the resizer needs is named in controller.yaml.
    let controller = std::fs::read_to_string(dir().join("controller.yaml")).unwrap();
    assert!(controller.contains("--feature-gates=VolumeAttributesClass=true"));
}

#[test]
fn the_meta_group_names_every_replica_and_the_driver_finds_it() {
    let docs = load();
    let sts = kind(&docs, "StatefulSet");
    let meta = sts
        .iter()
        .find(|d| name(d) == "ironblock-meta")
        .expect("the meta StatefulSet");
    let replicas = meta["spec"]["replicas"].as_u64().expect("replicas");
    assert!(
        replicas >= 3 && replicas % 2 == 1,
        "an odd group of 3+: {replicas}"
    );
    let headless = s(meta, &["spec", "serviceName"]).expect("serviceName");
    let services = kind(&docs, "Service");
    let svc = |n: &str| services.iter().find(|d| name(d) == n).cloned();
    let peers_svc = svc(headless).expect("the headless Service");
    assert_eq!(s(&peers_svc, &["spec", "clusterIP"]), Some("None"));
    let c = containers(meta)[0];
    let peers = env(c, "IRONBLOCK_META_PEERS").expect("IRONBLOCK_META_PEERS");
    let want: Vec<String> = (0..replicas)
        .map(|i| {
            format!(
                "{}={}-{i}.{headless}.{}.svc:7000",
                i + 1,
                name(meta),
                ns(meta)
            )
        })
        .collect();
    assert_eq!(peers, want.join(","));
    // The driver's meta address is the client Service, in the same namespace.
    let client = svc("ironblock-meta").expect("the client Service");
    assert_eq!(ns(&client), ns(meta));
    for w in [kind(&docs, "Deployment"), kind(&docs, "DaemonSet")].concat() {
        for c in containers(&w) {
            if let Some(m) = env(c, "IRONBLOCK_META") {
                assert_eq!(
                    m,
                    format!("ironblock-meta.{}.svc:7000", ns(meta)),
                    "{}",
                    name(&w)
                );
            }
        }
    }
}
