//! Unit tests of the state rules.

use super::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const T0: u64 = 1_800_000_000_000;

fn opts() -> Options {
    Options {
        liveness_timeout: Duration::from_secs(3),
        seed: Some(42),
        sync: false,
        ..Options::default()
    }
}

fn open(dir: &Path, o: Options, now: Instant) -> State {
    State::open(dir, o, now).expect("open state")
}

fn reg(st: &mut State, n: u16, now: Instant) -> u64 {
    reg_with(st, n, 100 * GIB, now)
}

/// Registers chunk `n` (portal 127.0.0.n) with `capacity` bytes.
pub(super) fn reg_with(st: &mut State, n: u16, capacity: u64, now: Instant) -> u64 {
    st.register_chunk(
        &ChunkRegistration {
            portal: format!("127.0.0.{n}:3260"),
            data_addr: format!("127.0.0.{n}:7100"),
            capacity_bytes: capacity,
            ..Default::default()
        },
        now,
        T0,
    )
    .expect("register chunk")
    .id
}

/// A fresh state with `n` chunks of 100 GiB.
pub(super) fn with_chunks(n: u16) -> (tempfile::TempDir, State, Instant, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let mut st = open(dir.path(), opts(), now);
    let ids = (1..=n).map(|i| reg(&mut st, i, now)).collect();
    (dir, st, now, ids)
}

fn code(e: MetaError) -> tonic::Code {
    e.code()
}

#[test]
fn cluster_id_is_generated_once_and_stable() {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let id = open(dir.path(), opts(), now).cluster_id();
    let again = open(
        dir.path(),
        Options {
            seed: Some(7),
            ..opts()
        },
        now,
    )
    .cluster_id();
    assert_eq!(id, again);
    let other = tempfile::tempdir().unwrap();
    assert_ne!(
        open(
            other.path(),
            Options {
                seed: Some(7),
                ..opts()
            },
            now
        )
        .cluster_id(),
        id
    );
}

#[test]
fn volume_argument_errors() {
    let (_d, mut st, _, _) = with_chunks(3);
    let inv = tonic::Code::InvalidArgument;
    assert_eq!(
        code(st.create_volume("v", 0, 1, true, T0).unwrap_err()),
        inv
    );
    assert_eq!(
        code(st.create_volume("v", 4097, 1, true, T0).unwrap_err()),
        inv
    );
    assert_eq!(
        code(st.create_volume("v", 512, 1, true, T0).unwrap_err()),
        inv
    );
    assert_eq!(
        code(
            st.create_volume("v", MAX_VOLUME_SIZE + BLOCK_SIZE, 1, true, T0)
                .unwrap_err()
        ),
        inv
    );
    assert_eq!(
        code(st.create_volume("v", GIB, 0, true, T0).unwrap_err()),
        inv
    );
    assert_eq!(
        code(st.create_volume("v", GIB, 4, true, T0).unwrap_err()),
        inv
    );
    assert_eq!(
        code(st.create_volume("", GIB, 1, true, T0).unwrap_err()),
        inv
    );
    assert_eq!(
        code(st.create_volume("a b", GIB, 1, true, T0).unwrap_err()),
        inv
    );
    let e = st.create_volume("v", 0, 1, true, T0).unwrap_err();
    assert!(e.to_string().contains("size must not be 0"), "{e}");
    assert!(st.list_volumes().is_empty());
}

#[test]
fn create_is_idempotent_by_name() {
    let (_d, mut st, _, _) = with_chunks(3);
    let a = st.create_volume("pvc-1", GIB, 2, true, T0).unwrap();
    let b = st.create_volume("pvc-1", GIB, 2, true, T0 + 5).unwrap();
    assert_eq!(a, b);
    assert_eq!(st.list_volumes().len(), 1);
    for (size, r, thin) in [(2 * GIB, 2, true), (GIB, 3, true), (GIB, 2, false)] {
        let e = st.create_volume("pvc-1", size, r, thin, T0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    }
    assert_eq!(st.list_volumes().len(), 1);
    assert_eq!(st.get_volume(VolumeKey::Name("pvc-1")).unwrap().id, a.id);
    assert_eq!(
        st.get_volume(VolumeKey::Id(&a.id.to_string())).unwrap().id,
        a.id
    );
}

#[test]
fn too_few_alive_chunks_is_failed_precondition() {
    let (_d, mut st, _, _) = with_chunks(2);
    let e = st.create_volume("v", GIB, 3, true, T0).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.to_string().contains("needs 3 alive chunks"), "{e}");
    // Nothing was allocated.
    assert!(st.exports().is_empty());
    st.create_volume("v", GIB, 2, true, T0).unwrap();
}

#[test]
fn thick_volume_needs_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let mut st = open(dir.path(), opts(), now);
    for i in 1..=2u16 {
        st.register_chunk(
            &ChunkRegistration {
                portal: format!("127.0.0.{i}:3260"),
                data_addr: format!("127.0.0.{i}:7100"),
                capacity_bytes: 4 * EXTENT_SIZE,
                ..Default::default()
            },
            now,
            T0,
        )
        .unwrap();
    }
    // rf 2 puts all 5 extents on both 4-extent chunks: no room.
    let e = st
        .create_volume("big2", 5 * EXTENT_SIZE, 2, false, T0)
        .unwrap_err();
    assert!(e.to_string().contains("capacity"), "{e}");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    // Thin volumes are not limited by capacity.
    st.create_volume("thin", 100 * EXTENT_SIZE, 2, true, T0)
        .unwrap();
    // A thick volume that fits.
    st.create_volume("fits", 8 * EXTENT_SIZE, 1, false, T0)
        .unwrap();
    let e = st
        .create_volume("full", EXTENT_SIZE, 1, false, T0)
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
}

#[test]
fn placement_uses_distinct_least_used_chunks() {
    let (_d, mut st, now, ids) = with_chunks(3);
    let v = st
        .create_volume("v", 6 * EXTENT_SIZE, 2, false, T0)
        .unwrap();
    let (_, es) = st.extents(&v.id.to_string()).unwrap();
    assert_eq!(es.len(), 6);
    for (i, e) in es.iter().enumerate() {
        assert_eq!(e.index, i as u64);
        assert_eq!(e.replicas.len(), 2);
        assert_ne!(e.replicas[0], e.replicas[1]);
        assert_eq!(e.epoch, 1);
    }
    // 12 replicas over 3 chunks: 4 each.
    for c in st.list_chunks(now) {
        assert_eq!(c.extents, 4, "chunk {}", c.record.id);
    }
    // A partial last extent still counts.
    let w = st
        .create_volume("w", EXTENT_SIZE + BLOCK_SIZE, 3, false, T0)
        .unwrap();
    let (_, es) = st.extents(&w.id.to_string()).unwrap();
    assert_eq!(es.len(), 2);
    for e in &es {
        let mut r = e.replicas.clone();
        r.sort();
        assert_eq!(r, ids);
    }
    // A new, empty chunk is preferred.
    let c4 = reg(&mut st, 4, now);
    let x = st.create_volume("x", EXTENT_SIZE, 1, false, T0).unwrap();
    assert_eq!(
        st.extents(&x.id.to_string()).unwrap().1[0].replicas,
        vec![c4]
    );
}

#[test]
fn targets_fill_to_255_luns_then_a_new_target_and_luns_are_reused() {
    let (_d, mut st, _, _) = with_chunks(1);
    let short = st.cluster_short();
    let mut vols = Vec::new();
    for i in 0..255 {
        let v = st
            .create_volume(&format!("v{i}"), BLOCK_SIZE, 1, true, T0)
            .unwrap();
        assert_eq!(v.target, 1);
        assert_eq!(v.lun, i as u16 + 1);
        vols.push(v);
    }
    assert_eq!(
        st.target_iqn(1),
        format!("iqn.2026-11.dev.ironblock:{short}:t1")
    );
    let v256 = st.create_volume("v255", BLOCK_SIZE, 1, true, T0).unwrap();
    assert_eq!((v256.target, v256.lun), (2, 1));
    assert_eq!(
        st.target_iqn(2),
        format!("iqn.2026-11.dev.ironblock:{short}:t2")
    );
    // Free LUN 7 of t1: it is not handed out again at once (chunks may
    // still serve the deleted volume there until their next heartbeat)...
    assert!(st.delete_volume(VolumeKey::Name("v6")).unwrap());
    let soon = st.create_volume("soon", BLOCK_SIZE, 1, true, T0).unwrap();
    assert_eq!((soon.target, soon.lun), (2, 2));
    // ...but once two liveness timeouts passed, the next volume takes it.
    for at in st.freed_luns.values_mut() {
        *at -= opts().liveness_timeout * 2;
    }
    let again = st.create_volume("again", BLOCK_SIZE, 1, true, T0).unwrap();
    assert_eq!((again.target, again.lun), (1, 7));
    let next = st.create_volume("next", BLOCK_SIZE, 1, true, T0).unwrap();
    assert_eq!((next.target, next.lun), (2, 3));
    let ex = st.exports();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].luns.len(), 255);
    assert_eq!(ex[1].luns.len(), 3);
    assert_eq!(st.status().targets, 2);
}

#[test]
fn target_limit_is_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let mut st = open(
        dir.path(),
        Options {
            max_targets: 2,
            max_luns_per_target: 2,
            ..opts()
        },
        now,
    );
    reg(&mut st, 1, now);
    for i in 0..4 {
        st.create_volume(&format!("v{i}"), BLOCK_SIZE, 1, true, T0)
            .unwrap();
    }
    let e = st.create_volume("v4", BLOCK_SIZE, 1, true, T0).unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.to_string().contains("targets"), "{e}");
    assert_eq!(st.list_volumes().len(), 4);
    st.delete_volume(VolumeKey::Name("v1")).unwrap();
    let v = st.create_volume("v4", BLOCK_SIZE, 1, true, T0).unwrap();
    assert_eq!((v.target, v.lun), (1, 2));
}

#[test]
fn delete_is_idempotent_and_frees_everything() {
    let (_d, mut st, _, _) = with_chunks(2);
    assert!(!st.delete_volume(VolumeKey::Name("nope")).unwrap());
    assert!(!st
        .delete_volume(VolumeKey::Id("00000000-0000-4000-8000-000000000000"))
        .unwrap());
    assert_eq!(
        st.delete_volume(VolumeKey::Id("garbage"))
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    let v = st.create_volume("v", 3 * EXTENT_SIZE, 2, true, T0).unwrap();
    st.acl_add(&v.id.to_string(), "iqn.2026-01.com.example:host1")
        .unwrap();
    assert!(st.delete_volume(VolumeKey::Id(&v.id.to_string())).unwrap());
    assert!(!st.delete_volume(VolumeKey::Name("v")).unwrap());
    assert_eq!(st.status().extents, 0);
    assert!(st.acl(&v.id).is_empty());
    assert!(st.exports()[0].luns.is_empty());
    assert_eq!(
        st.get_volume(VolumeKey::Name("v")).unwrap_err().code(),
        tonic::Code::NotFound
    );
    // The name is free again.
    st.create_volume("v", GIB, 1, true, T0).unwrap();
}

#[test]
fn resize_only_grows() {
    let (_d, mut st, _, _) = with_chunks(2);
    let v = st.create_volume("v", EXTENT_SIZE, 2, false, T0).unwrap();
    let id = v.id.to_string();
    let k = VolumeKey::Id(&id);
    assert_eq!(
        st.resize_volume(k, EXTENT_SIZE - BLOCK_SIZE)
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        st.resize_volume(k, EXTENT_SIZE + 1).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let same = st.resize_volume(k, EXTENT_SIZE).unwrap();
    assert_eq!(same.capacity_generation, 0);
    let big = st.resize_volume(k, 3 * EXTENT_SIZE + 16 * MIB).unwrap();
    assert_eq!(big.capacity_generation, 1);
    assert_eq!(big.size_bytes, 3 * EXTENT_SIZE + 16 * MIB);
    let (_, es) = st.extents(&id).unwrap();
    assert_eq!(es.len(), 4);
    assert!(es.iter().all(|e| e.replicas.len() == 2));
    assert_eq!(
        st.resize_volume(VolumeKey::Name("nope"), GIB)
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    assert_eq!(st.get_volume(k).unwrap().capacity_generation, 1);
}

#[test]
fn snapshots_and_clones() {
    let (_d, mut st, _, _) = with_chunks(3);
    let v = st.create_volume("v", GIB, 2, true, T0).unwrap();
    let w = st.create_volume("w", GIB, 1, true, T0).unwrap();
    let vid = v.id.to_string();
    let s1 = st.create_snapshot(&vid, "s1", T0 + 1).unwrap();
    assert_eq!(s1.generation, 0);
    assert_eq!(s1.size_bytes, GIB);
    assert_eq!(st.create_snapshot(&vid, "s1", T0 + 2).unwrap(), s1);
    assert_eq!(
        st.create_snapshot(&w.id.to_string(), "s1", T0)
            .unwrap_err()
            .code(),
        tonic::Code::AlreadyExists
    );
    let s2 = st.create_snapshot(&vid, "s2", T0 + 3).unwrap();
    assert_eq!(s2.generation, 1);
    let v_now = st.get_volume(VolumeKey::Id(&vid)).unwrap();
    assert_eq!(v_now.generation, 2);
    assert_eq!(v_now.snapshot_chain, vec![s1.id, s2.id]);
    assert_eq!(
        st.create_snapshot("00000000-0000-4000-8000-000000000000", "s3", T0)
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    assert_eq!(st.list_snapshots(Some(&vid)).unwrap().len(), 2);
    assert_eq!(st.list_snapshots(Some(&w.id.to_string())).unwrap().len(), 0);
    assert_eq!(st.list_snapshots(None).unwrap().len(), 2);

    // A volume with snapshots cannot go.
    assert_eq!(
        st.delete_volume(VolumeKey::Id(&vid)).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );

    // Clones.
    let sid = s1.id.to_string();
    assert_eq!(
        st.clone_volume(&sid, "c", GIB / 2, 0, true, T0)
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    let c = st.clone_volume(&sid, "c", 0, 0, true, T0).unwrap();
    assert_eq!(c.parent_snapshot, Some(s1.id));
    assert_eq!(c.size_bytes, GIB);
    assert_eq!(c.replicas, 2);
    assert_ne!(c.id, v.id);
    assert_eq!(st.clone_volume(&sid, "c", GIB, 2, true, T0).unwrap(), c);
    assert_eq!(
        st.clone_volume(&sid, "c", 2 * GIB, 2, true, T0)
            .unwrap_err()
            .code(),
        tonic::Code::AlreadyExists
    );
    // A plain create under a clone's name conflicts.
    assert_eq!(
        st.create_volume("c", GIB, 2, true, T0).unwrap_err().code(),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        st.clone_volume("00000000-0000-4000-8000-000000000000", "d", 0, 0, true, T0)
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    let big = st.clone_volume(&sid, "big", 2 * GIB, 3, false, T0).unwrap();
    assert_eq!(
        (big.size_bytes, big.replicas, big.thin),
        (2 * GIB, 3, false)
    );

    // A snapshot with clones cannot go; without, it can (idempotently).
    assert_eq!(
        st.delete_snapshot(&sid).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    assert!(st.delete_snapshot(&s2.id.to_string()).unwrap());
    assert!(!st.delete_snapshot(&s2.id.to_string()).unwrap());
    st.delete_volume(VolumeKey::Name("c")).unwrap();
    st.delete_volume(VolumeKey::Name("big")).unwrap();
    assert!(st.delete_snapshot(&sid).unwrap());
    assert!(st
        .get_volume(VolumeKey::Id(&vid))
        .unwrap()
        .snapshot_chain
        .is_empty());
    assert!(st.delete_volume(VolumeKey::Id(&vid)).unwrap());
}

#[test]
fn acl_add_remove_idempotent() {
    let (_d, mut st, _, _) = with_chunks(1);
    let v = st.create_volume("v", GIB, 1, true, T0).unwrap();
    let id = v.id.to_string();
    let a = st.acl_add(&id, "iqn.2026-01.com.Example:Node-1").unwrap();
    assert_eq!(
        a.iter().collect::<Vec<_>>(),
        vec!["iqn.2026-01.com.example:node-1"]
    );
    assert_eq!(
        st.acl_add(&id, "iqn.2026-01.com.example:node-1").unwrap(),
        a
    );
    let rev = st.revision();
    st.acl_add(&id, "iqn.2026-01.com.example:node-1").unwrap();
    assert_eq!(st.revision(), rev, "a no-op does not bump the revision");
    st.acl_add(&id, "iqn.2026-01.com.example:node-2").unwrap();
    assert_eq!(st.exports()[0].luns[0].acl.len(), 2);
    let r = st
        .acl_remove(&id, "iqn.2026-01.com.example:node-1")
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(
        st.acl_remove(&id, "iqn.2026-01.com.example:node-1")
            .unwrap(),
        r
    );
    for bad in [
        "",
        "node-1",
        "iqn.has space",
        &format!("iqn.{}", "a".repeat(230)),
    ] {
        assert_eq!(
            st.acl_add(&id, bad).unwrap_err().code(),
            tonic::Code::InvalidArgument,
            "{bad:?}"
        );
    }
    assert_eq!(
        st.acl_add("00000000-0000-4000-8000-000000000000", "iqn.2026-01.x:y")
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
}

#[test]
fn acl_read_only_mode_rules() {
    let (_d, mut st, _, _) = with_chunks(1);
    let v = st.create_volume("v", GIB, 1, true, T0).unwrap();
    let id = v.id.to_string();
    let ro = "iqn.2026-01.com.example:reader";
    let rw = "iqn.2026-01.com.example:writer";
    let a = st.acl_add_mode(&id, ro, AclMode::ReadOnly, false).unwrap();
    assert_eq!(a.initiators.iter().collect::<Vec<_>>(), vec![ro]);
    assert_eq!(a.read_only.iter().collect::<Vec<_>>(), vec![ro]);
    st.acl_add_mode(&id, rw, AclMode::ReadWrite, false).unwrap();

    // The same mode again is a no-op (case-insensitive IQN).
    let rev = st.revision();
    let again = st
        .acl_add_mode(&id, &ro.to_uppercase(), AclMode::ReadOnly, false)
        .unwrap();
    assert_eq!(st.revision(), rev, "a no-op does not bump the revision");
    assert_eq!(again.read_only.len(), 1);
    assert_eq!(again.initiators.len(), 2);

    // The other mode without a mode change is ALREADY_EXISTS, both ways,
    // and changes nothing.
    let e = st
        .acl_add_mode(&id, ro, AclMode::ReadWrite, false)
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = st.acl_add(&id, ro).unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    let e = st
        .acl_add_mode(&id, rw, AclMode::ReadOnly, false)
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    assert_eq!(st.revision(), rev);
    let lun = &st.exports()[0].luns[0];
    assert_eq!(lun.acl.len(), 2);
    assert_eq!(lun.read_only.iter().collect::<Vec<_>>(), vec![ro]);

    // An explicit mode change switches it.
    let c = st.acl_add_mode(&id, rw, AclMode::ReadOnly, true).unwrap();
    assert_eq!(c.read_only.len(), 2);
    let c = st.acl_add_mode(&id, rw, AclMode::ReadWrite, true).unwrap();
    assert_eq!(c.read_only.iter().collect::<Vec<_>>(), vec![ro]);
    // ... and with a mode change an absent initiator is added.
    let other = "iqn.2026-01.com.example:third";
    let c = st
        .acl_add_mode(&id, other, AclMode::ReadOnly, true)
        .unwrap();
    assert!(c.initiators.contains(other) && c.read_only.contains(other));

    // Removal ignores the mode and clears the read-only entry too.
    let r = st.acl_remove_view(&id, ro).unwrap();
    assert!(!r.initiators.contains(ro) && !r.read_only.contains(ro));
    st.acl_remove(&id, other).unwrap();
    assert!(st.acl_read_only(&v.id).is_empty());
    // Re-adding a removed read-only initiator read-write is not a mismatch.
    st.acl_add(&id, ro).unwrap();
    assert!(st.acl_read_only(&v.id).is_empty());
}

#[test]
fn acl_read_only_mode_survives_reopen_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let ro = "iqn.2026-01.com.example:reader";
    let rw = "iqn.2026-01.com.example:writer";
    let (id, vid) = {
        let mut st = open(dir.path(), opts(), now);
        reg(&mut st, 1, now);
        let v = st.create_volume("v", GIB, 1, true, T0).unwrap();
        let id = v.id.to_string();
        st.acl_add_mode(&id, ro, AclMode::ReadOnly, false).unwrap();
        st.acl_add_mode(&id, rw, AclMode::ReadWrite, false).unwrap();
        (id, v.id)
    };
    {
        let mut st = open(dir.path(), opts(), now);
        let view = st.acl_view(&vid);
        assert_eq!(view.initiators.len(), 2);
        assert_eq!(view.read_only.iter().collect::<Vec<_>>(), vec![ro]);
        assert_eq!(
            st.acl_add(&id, ro).unwrap_err().code(),
            tonic::Code::AlreadyExists,
            "the mode is enforced after a reopen"
        );
        let lun = &st.exports()[0].luns[0];
        assert_eq!(lun.read_only.iter().collect::<Vec<_>>(), vec![ro]);
        // A mode change is persisted too.
        st.acl_add_mode(&id, rw, AclMode::ReadOnly, true).unwrap();
    }
    {
        let mut st = open(dir.path(), opts(), now);
        assert_eq!(st.acl_read_only(&vid).len(), 2);
        assert!(st.delete_volume(VolumeKey::Id(&id)).unwrap());
        assert!(st.acl_read_only(&vid).is_empty());
    }
    let st = open(dir.path(), opts(), now);
    assert!(
        st.acl_view(&vid).read_only.is_empty(),
        "deleted with the volume"
    );
}

#[test]
fn a_retried_first_registration_gets_the_same_chunk() {
    let (dir, mut st, now, _) = with_chunks(2);
    let first = ChunkRegistration {
        portal: "127.0.0.9:3260".into(),
        data_addr: "127.0.0.9:7100".into(),
        capacity_bytes: GIB,
        request_id: "req-9".into(),
        ..Default::default()
    };
    let a = st.register_chunk(&first, now, T0).unwrap();
    let chunks = st.list_chunks(now).len();
    // The answer was lost; the same registration comes again.
    let b = st.register_chunk(&first, now, T0).unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(st.list_chunks(now).len(), chunks, "no second chunk");
    // Another registration for the live portal is still a conflict.
    let other = ChunkRegistration {
        request_id: "req-10".into(),
        ..first.clone()
    };
    assert_eq!(
        st.register_chunk(&other, now, T0).unwrap_err().code(),
        tonic::Code::AlreadyExists
    );
    let long = ChunkRegistration {
        request_id: "x".repeat(MAX_REQUEST_ID_LEN + 1),
        ..first.clone()
    };
    assert_eq!(
        st.register_chunk(&long, now, T0).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // The request id is a record: a restarted meta still knows it.
    drop(st);
    let mut st = open(dir.path(), opts(), now);
    assert_eq!(st.register_chunk(&first, now, T0).unwrap().id, a.id);
    assert_eq!(st.list_chunks(now).len(), chunks);
}

#[test]
fn chunk_identity_rules() {
    let (_d, mut st, now, ids) = with_chunks(2);
    let cid = st.cluster_id().to_string();
    let base = ChunkRegistration {
        portal: "127.0.0.9:3260".into(),
        data_addr: "127.0.0.9:7100".into(),
        capacity_bytes: GIB,
        ..Default::default()
    };
    // Another cluster's stamp is refused.
    let e = st
        .register_chunk(
            &ChunkRegistration {
                cluster_id: "00000000-0000-4000-8000-000000000000".into(),
                chunk_id: 1,
                ..base.clone()
            },
            now,
            T0,
        )
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    // A chunk id without a cluster id.
    let e = st
        .register_chunk(
            &ChunkRegistration {
                chunk_id: 1,
                ..base.clone()
            },
            now,
            T0,
        )
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Unknown id in this cluster.
    let e = st
        .register_chunk(
            &ChunkRegistration {
                cluster_id: cid.clone(),
                chunk_id: 99,
                ..base.clone()
            },
            now,
            T0,
        )
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // Bad addresses.
    for (p, d) in [
        ("nope", "127.0.0.1:1"),
        ("127.0.0.1:1", "127.0.0.1:0"),
        (":3260", "h:1"),
    ] {
        let e = st
            .register_chunk(
                &ChunkRegistration {
                    portal: p.into(),
                    data_addr: d.into(),
                    ..base.clone()
                },
                now,
                T0,
            )
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{p} {d}");
    }
    // A live portal cannot be claimed by a new registration.
    let e = st
        .register_chunk(
            &ChunkRegistration {
                portal: "127.0.0.1:3260".into(),
                ..base.clone()
            },
            now,
            T0,
        )
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    // Re-registration keeps the id and updates the addresses.
    let r = st
        .register_chunk(
            &ChunkRegistration {
                cluster_id: cid.clone(),
                chunk_id: ids[0],
                portal: "127.0.0.1:3261".into(),
                data_addr: "127.0.0.1:7101".into(),
                capacity_bytes: 2 * GIB,
                used_bytes: 5,
                request_id: String::new(),
            },
            now,
            T0,
        )
        .unwrap();
    assert_eq!(r.id, ids[0]);
    assert_eq!(r.portal, "127.0.0.1:3261");
    assert_eq!(st.list_chunks(now).len(), 2);
    // Heartbeats: wrong cluster, unknown chunk.
    assert_eq!(
        st.heartbeat("00000000-0000-4000-8000-000000000000", ids[0], 0, now)
            .unwrap_err()
            .code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        st.heartbeat(&cid, 77, 0, now).unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        st.heartbeat(&cid, ids[0], 9, now).unwrap().0,
        ChunkState::Alive
    );
    // Removed chunks are gone for good.
    st.remove_chunk(ids[1]).unwrap();
    assert_eq!(st.remove_chunk(ids[1]).unwrap().state, ChunkState::Removed);
    let e = st
        .register_chunk(
            &ChunkRegistration {
                cluster_id: cid.clone(),
                chunk_id: ids[1],
                ..base.clone()
            },
            now,
            T0,
        )
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        st.heartbeat(&cid, ids[1], 0, now).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    // Ids are never reused.
    let n = reg(&mut st, 5, now);
    assert_eq!(n, 3);
    assert_eq!(
        st.drain_chunk(42).unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        st.remove_chunk(42).unwrap_err().code(),
        tonic::Code::NotFound
    );
}

#[test]
fn dead_chunk_shrinks_replica_sets_bumps_epochs_and_queues_recovery() {
    let (_d, mut st, t0, ids) = with_chunks(4);
    let cid = st.cluster_id().to_string();
    let v = st
        .create_volume("v", 4 * EXTENT_SIZE, 3, false, T0)
        .unwrap();
    let vid = v.id.to_string();
    let (_, before) = st.extents(&vid).unwrap();
    let victim = ids[0];
    let hit: Vec<u64> = before
        .iter()
        .filter(|e| e.replicas.contains(&victim))
        .map(|e| e.index)
        .collect();
    assert!(!hit.is_empty());

    // Everyone but the victim heartbeats; nothing dies before the timeout.
    let t1 = t0 + Duration::from_millis(2500);
    for c in &ids[1..] {
        st.heartbeat(&cid, *c, 0, t1).unwrap();
    }
    assert!(st
        .check_liveness(t0 + Duration::from_millis(2999))
        .unwrap()
        .is_empty());
    let dead = st.check_liveness(t0 + Duration::from_secs(3)).unwrap();
    assert_eq!(dead, vec![victim]);
    assert_eq!(
        st.get_chunk(victim, t1).unwrap().record.state,
        ChunkState::Dead
    );
    // Idempotent: nothing more happens.
    assert!(st
        .check_liveness(t0 + Duration::from_secs(3))
        .unwrap()
        .is_empty());

    let (_, after) = st.extents(&vid).unwrap();
    for (b, a) in before.iter().zip(&after) {
        if hit.contains(&b.index) {
            assert!(!a.replicas.contains(&victim));
            assert_eq!(a.replicas.len(), 2);
            // Stripped (+1), then the spare became a learner (+1).
            assert_eq!(a.epoch, b.epoch + 2);
            assert_eq!(a.learners.len(), 1);
        } else {
            assert_eq!(a, b);
        }
    }
    let s = st.status();
    assert_eq!(s.health, Health::Degraded);
    assert_eq!(s.degraded_extents, hit.len() as u64);
    assert_eq!(s.chunks_dead, 1);
    let tasks = st.recovery_tasks(None);
    assert_eq!(tasks.len(), hit.len());
    assert_eq!(s.recovery_queued, hit.len() as u64);
    for t in &tasks {
        let e = &after[t.index as usize];
        assert!(!e.replicas.contains(&t.target_chunk));
        assert_eq!(e.learners, vec![t.target_chunk]);
        assert_ne!(t.target_chunk, victim);
        assert_eq!(t.sources, e.replicas);
        assert_eq!(t.epoch, e.epoch);
        assert_eq!(t.replaces, None);
    }
    // The dead chunk must re-register; its heartbeats are refused.
    assert_eq!(
        st.heartbeat(&cid, victim, 0, t1).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );

    // Complete one, fail one.
    let done = st
        .complete_recovery(tasks[0].id, true, "")
        .unwrap()
        .unwrap();
    assert_eq!(done.replicas.len(), 3);
    assert!(done.replicas.contains(&tasks[0].target_chunk));
    assert!(done.learners.is_empty());
    assert_eq!(done.epoch, after[tasks[0].index as usize].epoch + 1);
    assert_eq!(
        st.complete_recovery(tasks[0].id, true, "")
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    if tasks.len() > 1 {
        assert!(st
            .complete_recovery(tasks[1].id, false, "disk full")
            .unwrap()
            .is_none());
        assert_eq!(st.status().recovery_failed, 1);
        // Re-queued for another attempt.
        assert!(st
            .recovery_tasks(None)
            .iter()
            .any(|t| t.index == tasks[1].index));
    }
    // Finish everything.
    while let Some(t) = st.recovery_tasks(None).first().cloned() {
        st.complete_recovery(t.id, true, "").unwrap();
    }
    let s = st.status();
    assert_eq!(s.health, Health::Ok);
    assert_eq!(s.degraded_extents, 0);
    assert_eq!(s.recovery_completed, hit.len() as u64);
    // The dead chunk holds nothing and can be removed.
    st.remove_chunk(victim).unwrap();
}

#[test]
fn no_spare_means_degraded_until_a_chunk_joins() {
    let (_d, mut st, t0, ids) = with_chunks(3);
    let cid = st.cluster_id().to_string();
    let v = st
        .create_volume("v", 2 * EXTENT_SIZE, 3, false, T0)
        .unwrap();
    for c in &ids[1..] {
        st.heartbeat(&cid, *c, 0, t0 + Duration::from_secs(2))
            .unwrap();
    }
    st.check_liveness(t0 + Duration::from_secs(4)).unwrap();
    assert_eq!(st.status().degraded_extents, 2);
    assert!(st.recovery_tasks(None).is_empty());
    // With two chunks alive, rf 3 can no longer be created.
    assert_eq!(
        st.create_volume("w", GIB, 3, false, T0).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    // The dead chunk comes back (same identity): it is a spare now.
    st.register_chunk(
        &ChunkRegistration {
            cluster_id: cid.clone(),
            chunk_id: ids[0],
            portal: "127.0.0.1:3260".into(),
            data_addr: "127.0.0.1:7100".into(),
            capacity_bytes: GIB,
            used_bytes: 0,
            request_id: String::new(),
        },
        t0 + Duration::from_secs(5),
        T0,
    )
    .unwrap();
    let tasks = st.recovery_tasks(Some(ids[0]));
    assert_eq!(tasks.len(), 2);
    assert!(tasks.iter().all(|t| t.volume == v.id));
    // If the target dies before finishing, the tasks are dropped.
    for c in &ids[1..] {
        st.heartbeat(&cid, *c, 0, t0 + Duration::from_secs(8))
            .unwrap();
    }
    st.check_liveness(t0 + Duration::from_secs(9)).unwrap();
    assert!(st.recovery_tasks(None).is_empty());
    assert_eq!(st.status().recovery_failed, 2);
}

#[test]
fn losing_every_replica_is_critical() {
    let (_d, mut st, t0, _) = with_chunks(1);
    st.create_volume("v", EXTENT_SIZE, 1, false, T0).unwrap();
    st.check_liveness(t0 + Duration::from_secs(10)).unwrap();
    let s = st.status();
    assert_eq!(s.health, Health::Critical);
    assert_eq!(s.unavailable_extents, 1);
    assert_eq!(s.recovery_queued, 0);
}

#[test]
fn drain_moves_extents_off_then_remove() {
    let (_d, mut st, now, ids) = with_chunks(3);
    let v = st
        .create_volume("v", 3 * EXTENT_SIZE, 2, false, T0)
        .unwrap();
    let vid = v.id.to_string();
    let victim = ids[0];
    assert_eq!(
        st.remove_chunk(victim).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    st.drain_chunk(victim).unwrap();
    assert_eq!(st.drain_chunk(victim).unwrap().state, ChunkState::Draining);
    // No new placement on a draining chunk.
    let w = st
        .create_volume("w", 2 * EXTENT_SIZE, 2, false, T0)
        .unwrap();
    for e in st.extents(&w.id.to_string()).unwrap().1 {
        assert!(!e.replicas.contains(&victim));
    }
    let tasks = st.recovery_tasks(None);
    assert!(!tasks.is_empty());
    assert!(tasks.iter().all(|t| t.replaces == Some(victim)));
    // Heartbeats still work while draining.
    let cid = st.cluster_id().to_string();
    assert_eq!(
        st.heartbeat(&cid, victim, 0, now).unwrap().0,
        ChunkState::Draining
    );
    for t in tasks {
        let e = st.complete_recovery(t.id, true, "").unwrap().unwrap();
        assert!(!e.replicas.contains(&victim));
        assert_eq!(e.replicas.len(), 2);
    }
    assert!(st
        .extents(&vid)
        .unwrap()
        .1
        .iter()
        .all(|e| !e.replicas.contains(&victim)));
    assert_eq!(st.status().health, Health::Ok);
    assert_eq!(st.remove_chunk(victim).unwrap().state, ChunkState::Removed);
    assert_eq!(st.status().chunks_removed, 1);
}

#[test]
fn everything_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let (cluster, vols, snaps, exports, chunks, extents, status) = {
        let mut st = open(
            dir.path(),
            Options {
                sync: true,
                ..opts()
            },
            now,
        );
        for i in 1..=3 {
            reg(&mut st, i, now);
        }
        let a = st.create_volume("a", GIB, 2, false, T0).unwrap();
        st.create_volume("b", 3 * EXTENT_SIZE, 3, false, T0)
            .unwrap();
        let s = st.create_snapshot(&a.id.to_string(), "snap-a", T0).unwrap();
        st.clone_volume(&s.id.to_string(), "a-clone", 0, 0, true, T0)
            .unwrap();
        st.acl_add(&a.id.to_string(), "iqn.2026-01.com.example:n1")
            .unwrap();
        st.acl_add(&a.id.to_string(), "iqn.2026-01.com.example:n2")
            .unwrap();
        st.resize_volume(VolumeKey::Name("a"), 2 * GIB).unwrap();
        st.drain_chunk(1).unwrap();
        (
            st.cluster_id(),
            st.list_volumes(),
            st.list_snapshots(None).unwrap(),
            st.exports(),
            st.list_chunks(now)
                .into_iter()
                .map(|c| c.record)
                .collect::<Vec<_>>(),
            st.extents(&a.id.to_string()).unwrap().1,
            st.status(),
        )
    };
    let st = open(dir.path(), opts(), now);
    assert_eq!(st.cluster_id(), cluster);
    assert_eq!(st.list_volumes(), vols);
    assert_eq!(st.list_snapshots(None).unwrap(), snaps);
    assert_eq!(st.exports(), exports);
    assert_eq!(
        st.list_chunks(now)
            .into_iter()
            .map(|c| c.record)
            .collect::<Vec<_>>(),
        chunks
    );
    let a = st.get_volume(VolumeKey::Name("a")).unwrap();
    assert_eq!(st.extents(&a.id.to_string()).unwrap().1, extents);
    // committed_ops counts this process's writes only.
    assert_eq!(
        ClusterStatus {
            committed_ops: 0,
            ..st.status()
        },
        ClusterStatus {
            committed_ops: 0,
            ..status.clone()
        }
    );
    assert_eq!(st.acl(&a.id).len(), 2);
    assert_eq!(a.size_bytes, 2 * GIB);
    assert_eq!(a.capacity_generation, 1);
    assert!(status.recovery_queued > 0);
}

/// The one extent of a fresh volume.
fn only_extent(st: &State, vid: &str) -> ExtentRecord {
    let (_, es) = st.extents(vid).unwrap();
    assert_eq!(es.len(), 1);
    es[0].clone()
}

#[test]
fn recovery_target_is_a_learner_until_promoted() {
    let (_d, mut st, now, _ids) = with_chunks(3);
    let v = st.create_volume("v", EXTENT_SIZE, 2, false, T0).unwrap();
    let vid = v.id.to_string();
    let e0 = only_extent(&st, &vid);
    assert_eq!(e0.epoch, 1);
    assert!(e0.learners.is_empty());
    let (failed, survivor) = (e0.replicas[0], e0.replicas[1]);
    let spare = (1..=3).find(|c| !e0.replicas.contains(c)).unwrap();

    // A stale report changes nothing.
    let same = st.remove_replica(&vid, 0, failed, 0, "old view").unwrap();
    assert_eq!(same, e0);
    // The member fails: stripped (2), the spare becomes a learner (3).
    let e = st
        .remove_replica(&vid, 0, failed, 1, "unreachable")
        .unwrap();
    assert_eq!(e.replicas, vec![survivor]);
    assert_eq!(e.learners, vec![spare]);
    assert_eq!(e.epoch, 3);
    let tasks = st.recovery_tasks(Some(spare));
    assert_eq!(tasks.len(), 1);
    let t = tasks[0].clone();
    assert_eq!(
        (t.epoch, t.sources.clone(), t.replaces),
        (3, vec![survivor], None)
    );
    // Degraded counts members only; load counts the learner.
    let s = st.status();
    assert_eq!((s.health, s.degraded_extents), (Health::Degraded, 1));
    assert_eq!(st.get_chunk(spare, now).unwrap().extents, 1);
    // A chunk that is a learner holds a replica: it cannot be removed.
    assert_eq!(
        st.remove_chunk(spare).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    // A later failure report naming the learner at an old epoch is ignored.
    assert_eq!(
        st.remove_learner(&vid, 0, spare, 2, "old")
            .unwrap()
            .learners,
        vec![spare]
    );

    // Success: learner -> member, epoch + 1, healthy.
    let done = st.complete_recovery(t.id, true, "").unwrap().unwrap();
    assert_eq!(done.replicas, vec![survivor, spare]);
    assert!(done.learners.is_empty());
    assert_eq!(done.epoch, 4);
    assert_eq!(only_extent(&st, &vid), done);
    let s = st.status();
    assert_eq!(
        (s.health, s.recovery_completed, s.recovery_queued),
        (Health::Ok, 1, 0)
    );
}

#[test]
fn failed_dying_or_draining_learners_are_dropped_and_requeued() {
    let (_d, mut st, t0, ids) = with_chunks(4);
    let cid = st.cluster_id().to_string();
    let v = st.create_volume("v", EXTENT_SIZE, 2, false, T0).unwrap();
    let vid = v.id.to_string();
    let e0 = only_extent(&st, &vid);
    let e = st
        .remove_replica(&vid, 0, e0.replicas[0], e0.epoch, "gone")
        .unwrap();
    let first = e.learners[0];
    let t1 = st.recovery_tasks(None)[0].clone();
    assert_eq!(t1.target_chunk, first);

    // 1. The learner fails a write: dropped (epoch + 1), task failed,
    //    a new task (new learner epoch) is queued.
    let e = st
        .remove_learner(&vid, 0, first, e.epoch, "write failed")
        .unwrap();
    assert_eq!(st.status().recovery_failed, 1);
    assert!(st.recovery_tasks(None).iter().all(|t| t.id != t1.id));
    assert_eq!(
        st.complete_recovery(t1.id, true, "").unwrap_err().code(),
        tonic::Code::NotFound
    );
    let t2 = st.recovery_tasks(None)[0].clone();
    assert_eq!(e.learners, vec![t2.target_chunk]);
    assert_eq!(t2.epoch, e.epoch);
    assert_eq!(e.epoch, t1.epoch + 2);

    // 2. The copy fails: learner dropped, requeued.
    assert!(st.complete_recovery(t2.id, false, "io").unwrap().is_none());
    let e = only_extent(&st, &vid);
    let t3 = st.recovery_tasks(None)[0].clone();
    assert_eq!(e.learners, vec![t3.target_chunk]);
    assert_eq!(e.epoch, t2.epoch + 2);
    assert_eq!(st.status().recovery_failed, 2);

    // 3. The learner dies: stripped with the dead chunk, task dropped,
    //    requeued on another alive chunk.
    let target = t3.target_chunk;
    let t1s = t0 + Duration::from_secs(2);
    for c in ids.iter().filter(|c| **c != target) {
        st.heartbeat(&cid, *c, 0, t1s).unwrap();
    }
    assert_eq!(
        st.check_liveness(t0 + Duration::from_secs(4)).unwrap(),
        vec![target]
    );
    let e = only_extent(&st, &vid);
    let t4 = st.recovery_tasks(None)[0].clone();
    assert_ne!(t4.target_chunk, target);
    assert_eq!(e.learners, vec![t4.target_chunk]);
    assert_eq!(st.status().recovery_failed, 3);

    // 4. The learner is drained: its copy is abandoned and goes elsewhere
    //    (if a spare is left) or waits.
    st.drain_chunk(t4.target_chunk).unwrap();
    let e = only_extent(&st, &vid);
    assert!(!e.learners.contains(&t4.target_chunk));
    assert!(st.recovery_tasks(Some(t4.target_chunk)).is_empty());
    assert_eq!(st.status().recovery_failed, 4);
    for t in st.recovery_tasks(None) {
        assert_eq!(e.learners, vec![t.target_chunk]);
    }
    // A completion for a task whose learner is gone (target not alive)
    // never promotes.
    if let Some(t) = st.recovery_tasks(None).first().cloned() {
        let done = st.complete_recovery(t.id, true, "").unwrap().unwrap();
        assert!(done.replicas.contains(&t.target_chunk));
        assert_eq!(done.replicas.len(), 2);
    }
}

#[test]
fn drain_move_uses_a_learner_and_the_drained_chunk_leaves() {
    let (_d, mut st, _now, _ids) = with_chunks(3);
    let v = st.create_volume("v", EXTENT_SIZE, 2, false, T0).unwrap();
    let vid = v.id.to_string();
    let e0 = only_extent(&st, &vid);
    let victim = e0.replicas[0];
    st.drain_chunk(victim).unwrap();
    let t = st.recovery_tasks(None)[0].clone();
    assert_eq!(t.replaces, Some(victim));
    let e = only_extent(&st, &vid);
    assert_eq!(e.replicas, e0.replicas);
    assert_eq!(e.learners, vec![t.target_chunk]);
    assert_eq!(e.epoch, 2);
    // Not degraded: the members are complete while the copy runs.
    assert_eq!(st.status().health, Health::Ok);
    let done = st.complete_recovery(t.id, true, "").unwrap().unwrap();
    assert!(!done.replicas.contains(&victim));
    assert!(done.replicas.contains(&t.target_chunk));
    assert!(done.learners.is_empty());
    assert_eq!(done.epoch, 3);
    st.remove_chunk(victim).unwrap();
}

#[test]
fn a_joining_chunk_gets_replicas_moved_to_it_until_balanced() {
    let (_dir, mut st, now, ids) = with_chunks(3);
    // 30 extents at RF=2 on 3 chunks: 20 replicas each.
    st.create_volume("a", 30 * EXTENT_SIZE, 2, false, T0)
        .unwrap();
    let load = |st: &State| st.extents_per_chunk();
    assert!(st.recovery_tasks(None).is_empty(), "balanced: no moves");
    let before = load(&st);
    assert!(ids.iter().all(|c| before.get(c) == Some(&20)), "{before:?}");

    // A fourth chunk joins: moves to it are queued, bounded in flight.
    let new = reg(&mut st, 4, now);
    let mut rounds = 0;
    loop {
        let tasks = st.recovery_tasks(None);
        assert!(
            tasks.len() <= MAX_REBALANCE_MOVES,
            "{} in flight",
            tasks.len()
        );
        if tasks.is_empty() {
            break;
        }
        for t in &tasks {
            assert_eq!(t.target_chunk, new, "moves go to the emptiest chunk");
            let from = t.replaces.expect("a move names the chunk it replaces");
            assert_ne!(from, new);
            let (_, es) = st.extents(&t.volume.to_string()).unwrap();
            let e = es.iter().find(|e| e.index == t.index).unwrap();
            assert!(e.learners.contains(&new) && !e.replicas.contains(&new));
            assert_eq!(e.replicas.len(), 2, "only healthy extents move");
        }
        for t in tasks {
            let e = st.complete_recovery(t.id, true, "").unwrap().unwrap();
            assert!(e.replicas.contains(&new));
            assert!(!e.replicas.contains(&t.replaces.unwrap()));
            assert_eq!(e.replicas.len(), 2);
        }
        rounds += 1;
        assert!(rounds < 50, "rebalancing does not converge");
    }
    let after = load(&st);
    let (max, min) = (
        *after.values().max().unwrap(),
        *after.values().min().unwrap(),
    );
    assert!(max - min <= REBALANCE_SLACK, "still lopsided: {after:?}");
    assert_eq!(after.values().sum::<u64>(), 60, "no replica lost or added");
    assert!(after.get(&new).copied().unwrap_or(0) >= 13, "{after:?}");
    assert!(st.status().rebalance_moves >= 13);
    assert_eq!(st.status().health, Health::Ok);
    // Every extent still has two distinct replicas.
    let (_, es) = st.extents(&st.list_volumes()[0].id.to_string()).unwrap();
    for e in es {
        assert_eq!(e.replicas.len(), 2);
        assert_ne!(e.replicas[0], e.replicas[1]);
    }
}

#[test]
fn no_rebalancing_while_an_extent_is_degraded_or_toward_a_draining_chunk() {
    let (_dir, mut st, now, ids) = with_chunks(3);
    st.create_volume("a", 12 * EXTENT_SIZE, 2, false, T0)
        .unwrap();
    // A new chunk that is drained at once takes no moves.
    let new = reg(&mut st, 4, now);
    for t in st.recovery_tasks(None) {
        st.complete_recovery(t.id, false, "test").unwrap();
    }
    st.drain_chunk(new).unwrap();
    let moves_before = st.status().rebalance_moves;
    for t in st.recovery_tasks(None) {
        assert_ne!(t.target_chunk, new, "a draining chunk is no target");
    }
    // A dead chunk: recovery first, no moves while degraded.
    let later = now + Duration::from_secs(10);
    for c in &ids[..2] {
        st.heartbeat(&st.cluster_id().to_string(), *c, 0, later)
            .unwrap();
    }
    st.check_liveness(later).unwrap();
    assert!(st.status().degraded_extents > 0);
    for t in st.recovery_tasks(None) {
        assert!(
            t.replaces.is_none() || t.replaces == Some(new),
            "no rebalance move while degraded: {t:?}"
        );
    }
    assert_eq!(st.status().rebalance_moves, moves_before);
}

fn rejoin(st: &mut State, id: u64, n: u16, now: Instant) {
    let cid = st.cluster_id().to_string();
    st.register_chunk(
        &ChunkRegistration {
            cluster_id: cid,
            chunk_id: id,
            portal: format!("127.0.0.{n}:3260"),
            data_addr: format!("127.0.0.{n}:7100"),
            capacity_bytes: 100 * GIB,
            used_bytes: 0,
            request_id: String::new(),
        },
        now,
        T0,
    )
    .unwrap();
}

/// The lost-writes race seen in a chaos run: every member of an extent is
/// declared dead in one liveness pass (a stalled host). The set must keep
/// them (their copies hold every acknowledged write), a dead member must
/// still be told it holds the extent (so its garbage collection keeps it),
/// and once one comes back the others leave and recovery starts from it.
#[test]
fn every_member_dead_at_once_keeps_the_members() {
    let (_d, mut st, t0, ids) = with_chunks(3);
    let cid = st.cluster_id().to_string();
    let v = st.create_volume("v", EXTENT_SIZE, 2, false, T0).unwrap();
    let vid = v.id.to_string();
    let e0 = only_extent(&st, &vid);
    let (a, b) = (e0.replicas[0], e0.replicas[1]);
    let other = *ids.iter().find(|c| !e0.replicas.contains(c)).unwrap();
    st.heartbeat(&cid, other, 0, t0 + Duration::from_secs(3))
        .unwrap();
    let dead = st.check_liveness(t0 + Duration::from_secs(4)).unwrap();
    assert_eq!(dead.len(), 2, "both members died: {dead:?}");
    let e = only_extent(&st, &vid);
    assert_eq!(e.replicas, e0.replicas, "members kept");
    assert!(st.recovery_tasks(None).is_empty(), "no source to copy from");
    let s = st.status();
    assert_eq!((s.health, s.unavailable_extents), (Health::Critical, 1));
    // A dead member still holds the extent as far as GC is concerned.
    assert_eq!(st.chunk_extents(a).unwrap().len(), 1);
    assert_eq!(st.chunk_extents(b).unwrap().len(), 1);

    // `a` comes back: `b` (still dead) leaves, recovery copies from `a`.
    let n_a = ids.iter().position(|c| *c == a).unwrap() as u16 + 1;
    rejoin(&mut st, a, n_a, t0 + Duration::from_secs(5));
    let e = only_extent(&st, &vid);
    assert_eq!(e.replicas, vec![a]);
    assert!(e.epoch > e0.epoch);
    let tasks = st.recovery_tasks(None);
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].sources, vec![a]);
    assert_eq!(st.status().unavailable_extents, 0);
    assert!(st.chunk_extents(b).unwrap().is_empty());
}

#[test]
fn the_last_member_is_never_removed_by_a_failure_report() {
    let (_d, mut st, _t0, _ids) = with_chunks(2);
    let v = st.create_volume("v", EXTENT_SIZE, 1, false, T0).unwrap();
    let vid = v.id.to_string();
    let e0 = only_extent(&st, &vid);
    let e = st
        .remove_replica(&vid, 0, e0.replicas[0], e0.epoch, "i/o error")
        .unwrap();
    assert_eq!(e, e0, "the only copy stays in the set");
}

/// A chunk that fails a copy takes no rebalance move for a while: without
/// the cooldown every failed move was queued again at once (a chaos run
/// saw 171 moves and 163 failures in 10 s toward a restarted chunk).
#[test]
fn a_failed_move_cools_its_target_down() {
    let (_dir, mut st, now, _ids) = with_chunks(3);
    st.create_volume("a", 30 * EXTENT_SIZE, 2, false, T0)
        .unwrap();
    let new = reg(&mut st, 4, now);
    let tasks = st.recovery_tasks(Some(new));
    assert!(!tasks.is_empty(), "moves toward the new chunk");
    for t in tasks {
        assert!(st
            .complete_recovery(t.id, false, "connection refused")
            .unwrap()
            .is_none());
    }
    assert!(
        st.recovery_tasks(Some(new)).is_empty(),
        "no move toward a chunk that just failed: {:?}",
        st.recovery_tasks(None)
    );
    assert!(st.status().recovery_failed > 0);
    // A liveness pass before the cooldown ends changes nothing; once it
    // ended, the next pass queues the moves again (a quiet cluster has no
    // other event that would).
    assert!(st.check_liveness(now).unwrap().is_empty());
    assert!(st.recovery_tasks(Some(new)).is_empty());
    for until in st.move_cooldown.values_mut() {
        *until = Instant::now();
    }
    assert!(st.check_liveness(now).unwrap().is_empty());
    assert!(
        !st.recovery_tasks(Some(new)).is_empty(),
        "moves toward the chunk again after its cooldown"
    );
}

// ------------------------------------------------------------ data locality

const W: u64 = DEFAULT_LOCALITY_WINDOW_BYTES;

/// Completes every queued task, round after round, until none is left
/// (bounded). Returns the (target, replaced) pairs seen.
fn run_tasks(st: &mut State) -> Vec<(u64, Option<u64>)> {
    let mut seen = Vec::new();
    for _ in 0..50 {
        let tasks = st.recovery_tasks(None);
        if tasks.is_empty() {
            return seen;
        }
        assert!(
            tasks.len() <= MAX_REBALANCE_MOVES,
            "{} in flight",
            tasks.len()
        );
        for t in tasks {
            seen.push((t.target_chunk, t.replaces));
            st.complete_recovery(t.id, true, "").unwrap();
        }
    }
    panic!("moves do not converge: {seen:?}");
}

fn holders(st: &State, vol: &str) -> Vec<Vec<u64>> {
    let (_, es) = st.extents(vol).unwrap();
    es.into_iter().map(|e| e.replicas).collect()
}

#[test]
fn an_rf1_volume_moves_to_the_chunk_that_serves_its_io_and_stays_there() {
    let (dir, mut st, now, ids) = with_chunks(2);
    let v = st
        .create_volume("a", 8 * EXTENT_SIZE, 1, false, T0)
        .unwrap();
    let vid = v.id.to_string();
    let before = holders(&st, &vid);
    assert_eq!(
        before.iter().filter(|r| r == &&vec![ids[1]]).count(),
        4,
        "{before:?}"
    );

    // Half a window: no decision yet.
    st.note_access(ids[0], &[(vid.clone(), W / 2)]).unwrap();
    assert_eq!(st.volume_home(&v.id), None);
    assert!(st.recovery_tasks(None).is_empty());
    // A little through the other chunk, the rest through the first: it
    // served more than 90% of the window and becomes home.
    st.note_access(ids[1], &[(vid.clone(), W / 50)]).unwrap();
    st.note_access(ids[0], &[(vid.clone(), W)]).unwrap();
    assert_eq!(st.volume_home(&v.id), Some(ids[0]));

    let moves = run_tasks(&mut st);
    assert_eq!(
        moves.len(),
        4,
        "exactly the 4 remote extents move: {moves:?}"
    );
    assert!(
        moves.iter().all(|m| *m == (ids[0], Some(ids[1]))),
        "{moves:?}"
    );
    let after = holders(&st, &vid);
    assert!(after.iter().all(|r| r == &vec![ids[0]]), "{after:?}");
    assert!(st.status().rebalance_moves >= 4);

    // The balancer does not undo it (8 vs 0 is far past the slack), not
    // even toward a chunk that joins.
    st.reconcile().unwrap();
    assert!(
        st.recovery_tasks(None).is_empty(),
        "moved back: {:?}",
        st.recovery_tasks(None)
    );
    let c3 = reg(&mut st, 3, now);
    assert!(
        st.recovery_tasks(None).is_empty(),
        "pinned extents moved to chunk {c3}: {:?}",
        st.recovery_tasks(None)
    );

    // The home survives a meta restart.
    drop(st);
    let st = open(dir.path(), opts(), now);
    assert_eq!(st.volume_home(&v.id), Some(ids[0]));
}

#[test]
fn the_balancer_still_moves_unpinned_replicas_around_a_home() {
    let (_dir, mut st, now, ids) = with_chunks(2);
    let a = st
        .create_volume("a", 8 * EXTENT_SIZE, 1, false, T0)
        .unwrap();
    let b = st
        .create_volume("b", 8 * EXTENT_SIZE, 1, false, T0)
        .unwrap();
    st.note_access(ids[0], &[(a.id.to_string(), W)]).unwrap();
    run_tasks(&mut st);
    // A third chunk joins: only b's replicas (no home) move to it; every
    // extent of a stays on its home.
    let c3 = reg(&mut st, 3, now);
    let moves = run_tasks(&mut st);
    assert!(!moves.is_empty(), "no rebalancing onto chunk {c3}");
    assert!(holders(&st, &a.id.to_string())
        .iter()
        .all(|r| r == &vec![ids[0]]));
    let on3 = holders(&st, &b.id.to_string())
        .iter()
        .filter(|r| r.contains(&c3))
        .count();
    assert!(on3 >= 2, "b gave chunk {c3} only {on3} extents");
}

#[test]
fn io_through_several_chunks_clears_the_home_and_a_full_home_takes_nothing() {
    let (_dir, mut st, now, ids) = with_chunks(2);
    let v = st
        .create_volume("a", 8 * EXTENT_SIZE, 1, false, T0)
        .unwrap();
    let vid = v.id.to_string();
    st.note_access(ids[1], &[(vid.clone(), W)]).unwrap();
    assert_eq!(st.volume_home(&v.id), Some(ids[1]));
    // Counters are cumulative: the next window is what grew since.
    st.note_access(ids[1], &[(vid.clone(), W + W / 2)]).unwrap();
    st.note_access(ids[0], &[(vid.clone(), W / 2)]).unwrap();
    assert_eq!(st.volume_home(&v.id), None, "a 50/50 window has no home");
    // A restarted chunk's counter starts again from zero.
    st.note_access(ids[1], &[(vid.clone(), W)]).unwrap();
    assert_eq!(st.volume_home(&v.id), Some(ids[1]));
    run_tasks(&mut st);

    // Chunk 1 becomes home while above the fill bound: no move to it.
    let cid = st.cluster_id().to_string();
    st.heartbeat(&cid, ids[0], 95 * GIB, now).unwrap();
    st.note_access(ids[0], &[(vid.clone(), 2 * W)]).unwrap();
    assert_eq!(st.volume_home(&v.id), Some(ids[0]));
    assert!(
        st.recovery_tasks(None).is_empty(),
        "moves to a full home: {:?}",
        st.recovery_tasks(None)
    );
    // Room again: the moves come.
    st.heartbeat(&cid, ids[0], GIB, now).unwrap();
    st.reconcile().unwrap();
    assert!(!run_tasks(&mut st).is_empty());
    assert!(holders(&st, &vid).iter().all(|r| r == &vec![ids[0]]));

    // Junk and unknown volumes in a heartbeat are ignored.
    st.note_access(
        ids[0],
        &[("not-a-uuid".into(), W), (Uuid([7; 16]).to_string(), W)],
    )
    .unwrap();
}

#[test]
fn new_extents_of_a_homed_volume_are_placed_on_its_home_and_rf2_never_moves() {
    let (_dir, mut st, _now, ids) = with_chunks(3);
    let thin = st.create_volume("t", 8 * EXTENT_SIZE, 1, true, T0).unwrap();
    st.note_access(ids[2], &[(thin.id.to_string(), W)]).unwrap();
    for i in 0..6 {
        let e = st.ensure_extent(&thin.id.to_string(), i).unwrap();
        assert_eq!(e.replicas, vec![ids[2]], "extent {i}");
    }
    // RF=2: a home is learned but nothing moves for it.
    let r2 = st
        .create_volume("r2", 6 * EXTENT_SIZE, 2, false, T0)
        .unwrap();
    let before = holders(&st, &r2.id.to_string());
    st.note_access(ids[0], &[(r2.id.to_string(), W)]).unwrap();
    assert_eq!(st.volume_home(&r2.id), Some(ids[0]));
    run_tasks(&mut st);
    assert_eq!(holders(&st, &r2.id.to_string()), before);
    // Deleting a volume forgets its home.
    st.delete_volume(VolumeKey::Name("r2")).unwrap();
    assert_eq!(st.volume_home(&r2.id), None);
}

#[test]
fn no_rebalance_move_targets_a_chunk_above_the_fill_bound() {
    let (_dir, mut st, now, _ids) = with_chunks(2);
    st.create_volume("a", 12 * EXTENT_SIZE, 1, false, T0)
        .unwrap();
    let cid = st.cluster_id().to_string();
    // A third chunk joins already 90% full: it gets no replica.
    let c3 = reg(&mut st, 3, now);
    st.heartbeat(&cid, c3, 90 * GIB, now).unwrap();
    // (It registered before its first heartbeat said how full it is, so
    // moves toward it may be queued already: fail them, end the cooldown.)
    for t in st.recovery_tasks(None) {
        st.complete_recovery(t.id, false, "test: copy failed")
            .unwrap();
    }
    for until in st.move_cooldown.values_mut() {
        *until = Instant::now();
    }
    st.reconcile().unwrap();
    assert!(
        st.recovery_tasks(None).is_empty(),
        "{:?}",
        st.recovery_tasks(None)
    );
    // Room again: it takes its share.
    st.heartbeat(&cid, c3, GIB, now).unwrap();
    st.reconcile().unwrap();
    assert!(run_tasks(&mut st).iter().any(|(to, _)| *to == c3));
}
