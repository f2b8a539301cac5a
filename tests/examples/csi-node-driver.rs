//! `csi-node-driver`: a CSI client that runs INSIDE the initiator QEMU guest
//! (`../shared/tools/initiator-vm --share DIR`), next to `ironblock-csi
//! --mode node`, and drives the node plugin over its unix socket while the
//! controller side (CreateVolume, ControllerPublish = LUN ACL add,
//! ControllerExpand) is served by an `ironblock-csi --mode controller` on the
//! host, reached over TCP through a portal mapping of the guest.
//!
//! ```text
//! csi-node-driver guest-test --controller http://127.0.0.1:PORT --node /run/csi/csi.sock --node-id IQN
//!     the node sequence of tests/tests/csi_node_guest.rs (exit 0 = all checks
//!     passed; every step prints "STEP <name> ok <ms>")
//! csi-node-driver bench --controller URL --node SOCK --node-id IQN --count N
//!     [--label L] [--size-mib M] [--replicas R] [--iscsiadm-log FILE] [--out FILE]
//!     N volumes concurrently through Create -> ControllerPublish -> NodeStage
//!     -> NodePublish, then back down; prints one RESULT line
//! csi-node-driver compare FILE_A FILE_B
//!     the ratio of two bench RESULT files (baseline second)
//! ```
//!
//! Only for tests and benchmarks: it panics with a message on any failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ironblock_proto::csi;
use ironblock_proto::csi::controller_client::ControllerClient;
use ironblock_proto::csi::node_client::NodeClient;
use ironblock_proto::csi::volume_capability::access_mode::Mode;
use ironblock_tests::csi::capability;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const MIB: i64 = 1 << 20;

type Ctl = ControllerClient<Channel>;
type Node = NodeClient<Channel>;

fn args() -> (String, HashMap<String, String>, Vec<String>) {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_default();
    let mut kv = HashMap::new();
    let mut pos = Vec::new();
    let rest: Vec<String> = it.collect();
    let mut i = 0;
    while i < rest.len() {
        if let Some(k) = rest[i].strip_prefix("--") {
            let v = rest.get(i + 1).cloned().unwrap_or_default();
            kv.insert(k.to_string(), v);
            i += 2;
        } else {
            pos.push(rest[i].clone());
            i += 1;
        }
    }
    (cmd, kv, pos)
}

fn cap(access: &str) -> csi::VolumeCapability {
    capability(access, Mode::SingleNodeWriter)
}

async fn connect(controller: &str, node_sock: &str) -> (Ctl, Node) {
    let ch = Endpoint::from_shared(controller.to_string())
        .expect("controller URL")
        .timeout(Duration::from_secs(600))
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the controller at {controller}: {e}"));
    let sock = PathBuf::from(node_sock);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "node socket {node_sock} not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No short per-call deadline: under the --global-lock baseline a call
    // queues for minutes, and a CO would wait for it too.
    let n = Endpoint::from_static("http://localhost")
        .timeout(Duration::from_secs(1800))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap_or_else(|e| panic!("connect to the node socket {node_sock}: {e}"));
    (ControllerClient::new(ch), NodeClient::new(n))
}

/// One step: runs `f`, prints `STEP name ok ms` (or panics with the error).
macro_rules! step {
    ($name:expr, $e:expr) => {{
        let t = Instant::now();
        let v = $e;
        println!("STEP {} ok {}", $name, t.elapsed().as_millis());
        v
    }};
}

fn sh(cmd: &str) -> String {
    let o = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// (source, fstype) of the topmost mount at `path`.
fn mount_of(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut found = None;
    for line in text.lines() {
        let Some((l, r)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = l.split(' ').collect();
        let r: Vec<&str> = r.split(' ').collect();
        if l.len() > 4 && r.len() > 1 && Path::new(l[4]) == path {
            found = Some((r[1].to_string(), r[0].to_string()));
        }
    }
    found
}

/// The /dev/sdX whose VPD page 0x80 serial is `serial`.
fn device_with_serial(serial: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("sd") {
            continue;
        }
        if let Ok(b) = std::fs::read(e.path().join("device/vpd_pg80")) {
            if b.len() > 4
                && String::from_utf8_lossy(&b[4..])
                    .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                    .eq_ignore_ascii_case(serial)
            {
                return Some(Path::new("/dev").join(name));
            }
        }
    }
    None
}

fn fs_uuid(dev: &Path) -> String {
    sh(&format!("blkid -p -o value -s UUID {}", dev.display()))
}

async fn create(c: &mut Ctl, name: &str, size: i64, access: &str, replicas: &str) -> csi::Volume {
    c.create_volume(csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap(access)],
        parameters: HashMap::from([("replicas".to_string(), replicas.to_string())]),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
    .into_inner()
    .volume
    .expect("a volume")
}

async fn controller_publish(
    c: &mut Ctl,
    v: &csi::Volume,
    node_id: &str,
    access: &str,
) -> HashMap<String, String> {
    c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node_id.into(),
        volume_capability: Some(cap(access)),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("ControllerPublish {}: {e}", v.volume_id))
    .into_inner()
    .publish_context
}

fn stage_req(
    v: &csi::Volume,
    pc: &HashMap<String, String>,
    staging: &Path,
    access: &str,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        publish_context: pc.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap(access)),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    }
}

fn publish_req(
    v: &csi::Volume,
    pc: &HashMap<String, String>,
    staging: &Path,
    target: &Path,
    access: &str,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        publish_context: pc.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap(access)),
        readonly: false,
        volume_context: v.volume_context.clone(),
        ..Default::default()
    }
}

async fn unpublish(n: &mut Node, id: &str, target: &Path) {
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap_or_else(|e| panic!("NodeUnpublish {id}: {e}"));
}

async fn unstage(n: &mut Node, id: &str, staging: &Path) {
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap_or_else(|e| panic!("NodeUnstage {id}: {e}"));
}

async fn stats(n: &mut Node, id: &str, path: &Path) -> csi::NodeGetVolumeStatsResponse {
    n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("NodeGetVolumeStats {id}: {e}"))
    .into_inner()
}

fn usage(s: &csi::NodeGetVolumeStatsResponse, unit: csi::volume_usage::Unit) -> csi::VolumeUsage {
    s.usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .cloned()
        .unwrap_or_else(|| panic!("no {unit:?} usage in {s:?}"))
}

fn paths(name: &str) -> (PathBuf, PathBuf) {
    (
        PathBuf::from(format!(
            "/var/lib/kubelet/plugins/kubernetes.io/csi/csi.ironblock.dev/{name}/globalmount"
        )),
        PathBuf::from(format!(
            "/var/lib/kubelet/pods/pod-{name}/volumes/kubernetes.io~csi/{name}/mount"
        )),
    )
}

async fn guest_test(kv: &HashMap<String, String>) {
    let node_id = kv.get("node-id").expect("--node-id").clone();
    let (mut c, mut n) = connect(&kv["controller"], &kv["node"]).await;

    // NodeGetInfo / capabilities.
    let info = step!("NodeGetInfo", {
        n.node_get_info(csi::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner()
    });
    assert_eq!(info.node_id, node_id, "NodeGetInfo node id");
    let caps = n
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .expect("NodeGetCapabilities")
        .into_inner();
    let has = |t: csi::node_service_capability::rpc::Type| {
        caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(csi::node_service_capability::Type::Rpc(r)) if r.r#type == t as i32)
        })
    };
    use csi::node_service_capability::rpc::Type as Cap;
    assert!(has(Cap::StageUnstageVolume) && has(Cap::ExpandVolume) && has(Cap::GetVolumeStats));

    // Volume A: mount, ext4.
    let a = create(&mut c, "guest-a", 64 * MIB, "ext4", "2").await;
    let pca = step!(
        "ControllerPublish(a)",
        controller_publish(&mut c, &a, &info.node_id, "ext4").await
    );
    let (sa, ta) = paths("guest-a");
    step!("NodeStage(a) mkfs", {
        n.node_stage_volume(stage_req(&a, &pca, &sa, "ext4"))
            .await
            .unwrap_or_else(|e| panic!("NodeStage(a): {e}"))
    });
    let (dev_a, fs) = mount_of(&sa).expect("staging path of a is a mount");
    assert_eq!(fs, "ext4", "staged filesystem");
    let serial_a = pca
        .get("vpdSerial")
        .cloned()
        .unwrap_or_else(|| a.volume_id.replace('-', ""));
    assert_eq!(
        device_with_serial(&serial_a).as_deref(),
        Some(Path::new(&dev_a)),
        "the staged device is volume a's LUN"
    );
    let uuid_a = fs_uuid(Path::new(&dev_a));
    println!("a: device {dev_a} ext4 uuid {uuid_a}");
    step!("NodeStage(a) again (idempotent)", {
        n.node_stage_volume(stage_req(&a, &pca, &sa, "ext4"))
            .await
            .expect("repeated NodeStage(a)")
    });
    step!("NodePublish(a)", {
        n.node_publish_volume(publish_req(&a, &pca, &sa, &ta, "ext4"))
            .await
            .expect("NodePublish(a)")
    });
    assert!(mount_of(&ta).is_some(), "target path of a is a mount");
    let payload: String = (0..4096)
        .map(|i| char::from(b'a' + ((i * 7 + 3) % 26) as u8))
        .collect();
    std::fs::write(ta.join("hello.txt"), &payload).expect("write a file");
    sh("sync");
    println!("STEP write ok 0");
    step!(
        "NodeUnpublish(a)",
        unpublish(&mut n, &a.volume_id, &ta).await
    );
    assert!(mount_of(&ta).is_none(), "a still mounted at the target");
    step!("NodeUnstage(a)", unstage(&mut n, &a.volume_id, &sa).await);
    assert!(mount_of(&sa).is_none(), "a still mounted at staging");
    assert!(
        device_with_serial(&serial_a).is_none(),
        "a's SCSI device is still there after NodeUnstage"
    );
    // Idempotent teardown.
    unpublish(&mut n, &a.volume_id, &ta).await;
    unstage(&mut n, &a.volume_id, &sa).await;

    // Stage again: no reformat, data intact.
    step!("NodeStage(a) again, no mkfs", {
        n.node_stage_volume(stage_req(&a, &pca, &sa, "ext4"))
            .await
            .unwrap_or_else(|e| panic!("second NodeStage(a): {e}"))
    });
    let (dev_a2, _) = mount_of(&sa).expect("a staged again");
    assert_eq!(
        fs_uuid(Path::new(&dev_a2)),
        uuid_a,
        "the filesystem was recreated on the second stage"
    );
    step!("NodePublish(a) again", {
        n.node_publish_volume(publish_req(&a, &pca, &sa, &ta, "ext4"))
            .await
            .expect("NodePublish(a) again")
    });
    let back = std::fs::read_to_string(ta.join("hello.txt")).expect("read the file back");
    assert!(back == payload, "file content changed across unstage/stage");
    println!("STEP data-intact ok 0");

    // Stats.
    let st = step!(
        "NodeGetVolumeStats(a)",
        stats(&mut n, &a.volume_id, &ta).await
    );
    let bytes = usage(&st, csi::volume_usage::Unit::Bytes);
    let inodes = usage(&st, csi::volume_usage::Unit::Inodes);
    println!("a stats: {bytes:?} {inodes:?}");
    assert!(
        bytes.total > 40 * MIB && bytes.total <= 64 * MIB,
        "{bytes:?}"
    );
    assert!(bytes.used > 0 && bytes.available > 0, "{bytes:?}");
    assert!(inodes.total > 0 && inodes.used > 0 && inodes.available > 0);
    assert!(!st.volume_condition.expect("volume condition").abnormal);

    // Expansion: controller on the host, filesystem on the node.
    let ce = step!("ControllerExpand(a) 128 MiB", {
        c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: a.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap("ext4")),
            ..Default::default()
        })
        .await
        .expect("ControllerExpandVolume")
        .into_inner()
    });
    assert!(ce.capacity_bytes >= 128 * MIB && ce.node_expansion_required);
    // Right after ControllerExpand: the node waits for the LUN to show the
    // new capacity (the chunks apply it with their next heartbeat).
    let ne = step!("NodeExpandVolume(a)", {
        n.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: a.volume_id.clone(),
            volume_path: ta.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            staging_target_path: sa.display().to_string(),
            volume_capability: Some(cap("ext4")),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("NodeExpandVolume: {e}"))
        .into_inner()
    });
    assert!(ne.capacity_bytes >= 128 * MIB, "{ne:?}");
    let st2 = stats(&mut n, &a.volume_id, &ta).await;
    let bytes2 = usage(&st2, csi::volume_usage::Unit::Bytes);
    println!("a stats after expand: {bytes2:?}");
    assert!(
        bytes2.total > bytes.total + 50 * MIB,
        "filesystem did not grow: {} -> {}",
        bytes.total,
        bytes2.total
    );
    assert!(std::fs::read_to_string(ta.join("hello.txt")).expect("read") == payload);

    // Raw block volume b.
    let b = create(&mut c, "guest-b", 32 * MIB, "block", "1").await;
    let pcb = controller_publish(&mut c, &b, &info.node_id, "block").await;
    let (sb, tb) = paths("guest-b");
    step!("NodeStage(b) block", {
        n.node_stage_volume(stage_req(&b, &pcb, &sb, "block"))
            .await
            .unwrap_or_else(|e| panic!("NodeStage(b): {e}"))
    });
    step!("NodePublish(b) block", {
        n.node_publish_volume(publish_req(&b, &pcb, &sb, &tb, "block"))
            .await
            .unwrap_or_else(|e| panic!("NodePublish(b): {e}"))
    });
    {
        use std::os::unix::fs::FileTypeExt;
        let ft = std::fs::metadata(&tb)
            .expect("stat block target")
            .file_type();
        assert!(ft.is_block_device(), "block target is not a block device");
    }
    let serial_b = pcb
        .get("vpdSerial")
        .cloned()
        .unwrap_or_else(|| b.volume_id.replace('-', ""));
    let dev_b = device_with_serial(&serial_b).expect("b's device");
    assert_eq!(
        sh(&format!("blockdev --getsize64 {}", tb.display())),
        (32 * MIB).to_string(),
        "size of the published block device"
    );
    let stb = stats(&mut n, &b.volume_id, &tb).await;
    assert_eq!(usage(&stb, csi::volume_usage::Unit::Bytes).total, 32 * MIB);
    // A pattern through the published path, read back through the device.
    sh(&format!(
        "dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null && \
         dd if=/tmp/pat of={} bs=64k count=16 seek=8 oflag=direct conv=notrunc 2>/dev/null && \
         dd if={} bs=64k count=16 skip=8 iflag=direct 2>/dev/null | cmp - /tmp/pat",
        tb.display(),
        dev_b.display()
    ));
    println!("STEP raw-block-io ok 0");
    // Put volume a's filesystem (its first 4 MiB: superblock, group
    // descriptors) onto b: b's device now carries ANOTHER volume's ext4.
    sh(&format!(
        "dd if={dev_a2} of={} bs=1M count=4 oflag=direct conv=notrunc 2>/dev/null",
        tb.display()
    ));
    assert_eq!(fs_uuid(&dev_b), uuid_a, "copy of a's superblock on b");
    unpublish(&mut n, &b.volume_id, &tb).await;
    unstage(&mut n, &b.volume_id, &sb).await;
    println!("STEP raw-block-teardown ok 0");

    // Refusals: a device carrying another volume's filesystem.
    // (1) b staged as xfs: b's device carries ext4 -> refused, not formatted.
    let e = n
        .node_stage_volume(stage_req(&b, &pcb, &sb, "xfs"))
        .await
        .expect_err("staging b (carrying a's ext4) as xfs must be refused");
    println!("b as xfs: {} {}", e.code(), e.message());
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("signature"), "{e}");
    let dev_b2 = device_with_serial(&serial_b).expect("b's device after the refusal");
    assert_eq!(fs_uuid(&dev_b2), uuid_a, "b's device was touched");
    assert!(mount_of(&sb).is_none(), "refused stage left a mount");
    println!("STEP refuse-foreign-signature ok 0");
    // (2) Volume c staged with the publish context of a (the LUN that
    // carries a's filesystem): the identity check refuses it.
    let cvol = create(&mut c, "guest-c", 32 * MIB, "ext4", "1").await;
    let _pcc = controller_publish(&mut c, &cvol, &info.node_id, "ext4").await;
    let (sc, _tc) = paths("guest-c");
    let e = n
        .node_stage_volume(stage_req(&cvol, &pca, &sc, "ext4"))
        .await
        .expect_err("staging c onto a's device must be refused");
    println!("c on a's LUN: {} {}", e.code(), e.message());
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("is not volume"), "{e}");
    assert!(mount_of(&sc).is_none(), "refused stage left a mount");
    assert_eq!(
        fs_uuid(Path::new(&dev_a2)),
        uuid_a,
        "a's filesystem touched"
    );
    println!("STEP refuse-identity-mismatch ok 0");

    // Teardown.
    unpublish(&mut n, &a.volume_id, &ta).await;
    unstage(&mut n, &a.volume_id, &sa).await;
    unstage(&mut n, &b.volume_id, &sb).await;
    unstage(&mut n, &cvol.volume_id, &sc).await;
    for v in [&a, &b, &cvol] {
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: info.node_id.clone(),
            ..Default::default()
        })
        .await
        .expect("ControllerUnpublish");
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
    }
    println!("STEP teardown ok 0");
    println!("CSI-NODE-GUEST PASS");
}

/// Retries a CSI call the way a CO does: on ABORTED (operation in flight),
/// UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED, with backoff.
macro_rules! co_retry {
    ($retries:expr, $what:expr, $call:expr) => {{
        let mut delay = Duration::from_millis(100);
        let mut tries = 0;
        loop {
            match $call.await {
                Ok(r) => break r.into_inner(),
                Err(e)
                    if tries < 20
                        && matches!(
                            e.code(),
                            Code::Aborted
                                | Code::Unavailable
                                | Code::DeadlineExceeded
                                | Code::ResourceExhausted
                        ) =>
                {
                    tries += 1;
                    $retries += 1;
                    eprintln!("{}: {} (retry {tries})", $what, e);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => panic!("{}: {e}", $what),
            }
        }
    }};
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

/// Peak concurrency and count of the wrapper log ("+ pid" / "- pid" lines).
fn iscsiadm_peak(log: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (mut cur, mut peak, mut runs) = (0i64, 0i64, 0u64);
    for l in text.lines() {
        if l.starts_with('+') {
            cur += 1;
            runs += 1;
            peak = peak.max(cur);
        } else if l.starts_with('-') {
            cur -= 1;
        }
    }
    (peak.max(0) as u64, runs)
}

async fn bench(kv: &HashMap<String, String>) {
    let node_id = kv.get("node-id").expect("--node-id").clone();
    let count: usize = kv.get("count").map_or(100, |c| c.parse().expect("--count"));
    let label = kv.get("label").cloned().unwrap_or_else(|| "run".into());
    let size = kv
        .get("size-mib")
        .map_or(64, |s| s.parse::<i64>().expect("--size-mib"))
        * MIB;
    let replicas = kv.get("replicas").cloned().unwrap_or_else(|| "1".into());
    let log = kv.get("iscsiadm-log").map(PathBuf::from);
    let (c, n) = connect(&kv["controller"], &kv["node"]).await;
    if let Some(l) = &log {
        let _ = std::fs::write(l, "");
    }

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..count {
        let (mut c, mut n) = (c.clone(), n.clone());
        let node_id = node_id.clone();
        let name = format!("bench-{label}-{i:03}");
        let replicas = replicas.clone();
        tasks.push(tokio::spawn(async move {
            let mut retries = 0u32;
            let t = Instant::now();
            let mut phases = [0f64; 4];
            let mut lap = Instant::now();
            let mut mark = |i: usize| {
                phases[i] = lap.elapsed().as_secs_f64();
                lap = Instant::now();
            };
            let v = co_retry!(
                retries,
                format!("CreateVolume {name}"),
                c.create_volume(csi::CreateVolumeRequest {
                    name: name.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![cap("ext4")],
                    parameters: HashMap::from([("replicas".to_string(), replicas.clone())]),
                    ..Default::default()
                })
            )
            .volume
            .expect("volume");
            mark(0);
            let pc = co_retry!(
                retries,
                format!("ControllerPublish {name}"),
                c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    node_id: node_id.clone(),
                    volume_capability: Some(cap("ext4")),
                    volume_context: v.volume_context.clone(),
                    ..Default::default()
                })
            )
            .publish_context;
            mark(1);
            let (s, tp) = paths(&name);
            co_retry!(
                retries,
                format!("NodeStage {name}"),
                n.node_stage_volume(stage_req(&v, &pc, &s, "ext4"))
            );
            mark(2);
            co_retry!(
                retries,
                format!("NodePublish {name}"),
                n.node_publish_volume(publish_req(&v, &pc, &s, &tp, "ext4"))
            );
            mark(3);
            let up = t.elapsed();
            let done = t0.elapsed();
            (v, s, tp, up, done, retries, phases)
        }));
    }
    let mut vols = Vec::new();
    for t in tasks {
        vols.push(t.await.expect("bench task"));
    }
    let up_total = t0.elapsed();
    let (peak_up, runs_up) = log.as_deref().map_or((0, 0), iscsiadm_peak);
    for (_, _, tp, ..) in &vols {
        assert!(mount_of(tp).is_some(), "{} is not mounted", tp.display());
    }
    let retries_up: u32 = vols.iter().map(|v| v.5).sum();

    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for (v, s, tp, ..) in &vols {
        let (mut c, mut n) = (c.clone(), n.clone());
        let (v, s, tp, node_id) = (v.clone(), s.clone(), tp.clone(), node_id.clone());
        tasks.push(tokio::spawn(async move {
            let mut retries = 0u32;
            let t = Instant::now();
            co_retry!(
                retries,
                "NodeUnpublish",
                n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    target_path: tp.display().to_string(),
                })
            );
            co_retry!(
                retries,
                "NodeUnstage",
                n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    staging_target_path: s.display().to_string(),
                })
            );
            co_retry!(
                retries,
                "ControllerUnpublish",
                c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    node_id: node_id.clone(),
                    ..Default::default()
                })
            );
            co_retry!(
                retries,
                "DeleteVolume",
                c.delete_volume(csi::DeleteVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    ..Default::default()
                })
            );
            (t.elapsed(), retries)
        }));
    }
    let mut downs = Vec::new();
    for t in tasks {
        downs.push(t.await.expect("teardown task"));
    }
    let down_total = t1.elapsed();
    let (peak_all, runs_all) = log.as_deref().map_or((0, 0), iscsiadm_peak);

    let mut ups: Vec<f64> = vols.iter().map(|v| v.3.as_secs_f64()).collect();
    ups.sort_by(f64::total_cmp);
    let mut dn: Vec<f64> = downs.iter().map(|d| d.0.as_secs_f64()).collect();
    dn.sort_by(f64::total_cmp);
    let retries_down: u32 = downs.iter().map(|d| d.1).sum();
    let line = format!(
        "RESULT label={label} count={count} up_total_s={:.2} up_p50_s={:.2} up_p99_s={:.2} \
         down_total_s={:.2} down_p50_s={:.2} down_p99_s={:.2} iscsiadm_peak_up={peak_up} \
         iscsiadm_runs_up={runs_up} iscsiadm_peak={peak_all} iscsiadm_runs={runs_all} \
         retries_up={retries_up} retries_down={retries_down}",
        up_total.as_secs_f64(),
        pct(&ups, 50.0),
        pct(&ups, 99.0),
        down_total.as_secs_f64(),
        pct(&dn, 50.0),
        pct(&dn, 99.0),
    );
    println!("{line}");
    // Where the time of one volume's way up went (p50 and mean per call).
    let mut phases = format!("PHASES label={label}");
    for (i, name) in ["create", "ctl_publish", "stage", "node_publish"]
        .iter()
        .enumerate()
    {
        let mut v: Vec<f64> = vols.iter().map(|x| x.6[i]).collect();
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        phases += &format!(" {name}_p50_s={:.2} {name}_mean_s={mean:.2}", pct(&v, 50.0));
    }
    println!("{phases}");
    if let Some(out) = kv.get("out") {
        std::fs::write(out, format!("{line}\n")).expect("write --out");
    }
}

fn parse_result(path: &str) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn compare(pos: &[String]) {
    let (a, b) = (parse_result(&pos[0]), parse_result(&pos[1]));
    let f = |m: &HashMap<String, String>, k: &str| -> f64 {
        m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    let up = f(&b, "up_total_s") / f(&a, "up_total_s").max(1e-9);
    let down = f(&b, "down_total_s") / f(&a, "down_total_s").max(1e-9);
    let p50 = f(&b, "up_p50_s") / f(&a, "up_p50_s").max(1e-9);
    println!(
        "RATIO {} vs {}: up_total x{up:.1}, up_p50 x{p50:.1}, down_total x{down:.1} (count {})",
        a.get("label").map_or("?", String::as_str),
        b.get("label").map_or("?", String::as_str),
        a.get("count").map_or("?", String::as_str),
    );
}

#[tokio::main]
async fn main() {
    let (cmd, kv, pos) = args();
    match cmd.as_str() {
        "guest-test" => guest_test(&kv).await,
        "bench" => bench(&kv).await,
        "compare" if pos.len() == 2 => compare(&pos),
        _ => {
            eprintln!("usage: csi-node-driver guest-test|bench|compare ... (see the module doc)");
            std::process::exit(2);
        }
    }
}
