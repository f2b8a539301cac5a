//! Unit tests of copy-on-write resolution, copy-up, commit and snapshot GC.

use std::time::{Duration, Instant};

use super::super::{ChunkRegistration, Options, State, EXTENT_SIZE};
use super::*;

const GIB: u64 = 1 << 30;
const T0: u64 = 1_800_000_000_000;

fn state(chunks: u16) -> (tempfile::TempDir, State) {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let mut st = State::open(
        dir.path(),
        Options {
            seed: Some(7),
            sync: false,
            ..Options::default()
        },
        now,
    )
    .unwrap();
    for n in 1..=chunks {
        st.register_chunk(
            &ChunkRegistration {
                portal: format!("127.0.0.{n}:3260"),
                data_addr: format!("127.0.0.{n}:7100"),
                capacity_bytes: 100 * GIB,
                ..Default::default()
            },
            now,
            T0,
        )
        .unwrap();
    }
    (dir, st)
}

fn keys(st: &State, vol: &str) -> Vec<(u64, u64, bool)> {
    st.extents(vol)
        .unwrap()
        .1
        .iter()
        .map(|e| (e.index, e.generation, e.pending))
        .collect()
}

#[test]
fn store_keys_round_trip() {
    let id = Uuid::parse("0f0e0d0c-0b0a-4908-8706-050403020100").unwrap();
    assert_eq!(store_key(&id, 0), id.to_string());
    assert_eq!(store_key(&id, 3), format!("{id}.g3"));
    for g in [0, 1, 77] {
        assert_eq!(parse_store_key(&store_key(&id, g)).unwrap(), (id, g));
    }
    for bad in ["", "x", &format!("{id}.g0"), &format!("{id}.gx"), "x.g1"] {
        assert_eq!(
            parse_store_key(bad).unwrap_err().code(),
            tonic::Code::InvalidArgument,
            "{bad}"
        );
    }
}

#[test]
fn thin_volumes_are_placed_lazily_and_ensure_is_idempotent() {
    let (_d, mut st) = state(2);
    let v = st.create_volume("v", 4 * EXTENT_SIZE, 2, true, T0).unwrap();
    let id = v.id.to_string();
    assert!(keys(&st, &id).is_empty());
    let r = st.resolve_extent(&id, 2).unwrap();
    assert_eq!((r.read, r.own), (None, None));
    let e = st.ensure_extent(&id, 2).unwrap();
    assert_eq!((e.index, e.generation, e.pending), (2, 0, false));
    assert_eq!(e.replicas.len(), 2);
    assert_eq!(e.store_key(), id);
    assert_eq!(st.ensure_extent(&id, 2).unwrap(), e);
    let r = st.resolve_extent(&id, 2).unwrap();
    assert_eq!(r.own.as_ref(), Some(&e));
    assert_eq!(r.read.as_ref(), Some(&e));
    assert_eq!(keys(&st, &id), vec![(2, 0, false)]);
    // Out of range.
    assert_eq!(
        st.ensure_extent(&id, 4).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // Thick volumes stay eager.
    let t = st
        .create_volume("t", 3 * EXTENT_SIZE, 1, false, T0)
        .unwrap();
    assert_eq!(keys(&st, &t.id.to_string()).len(), 3);
}

#[test]
fn snapshot_then_write_needs_a_copy_up_that_commits() {
    let (_d, mut st) = state(3);
    let v = st
        .create_volume("v", 2 * EXTENT_SIZE, 2, false, T0)
        .unwrap();
    let id = v.id.to_string();
    let base = st.resolve_extent(&id, 0).unwrap().own.unwrap();
    let ops_before = st.status().committed_ops;
    let snap = st.create_snapshot(&id, "s1", T0).unwrap();
    assert_eq!(snap.generation, 0);
    // O(1): the snapshot, the volume, the cluster record.
    assert_eq!(st.status().committed_ops - ops_before, 3);
    // The volume still reads generation 0 but owns nothing writable.
    let r = st.resolve_extent(&id, 0).unwrap();
    assert_eq!(r.read.as_ref(), Some(&base));
    assert_eq!(r.own, None);
    let e = st.ensure_extent(&id, 0).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.to_string().contains("CopyUpExtent"), "{e}");

    let (src, dst) = st.copy_up_extent(&id, 0).unwrap();
    assert_eq!(src.as_ref(), Some(&base));
    assert!(dst.pending);
    assert_eq!(dst.generation, 1);
    assert_eq!(dst.store_key(), format!("{id}.g1"));
    assert_eq!(dst.replicas, base.replicas, "copies stay chunk-local");
    // Idempotent while pending; reads still resolve to the source.
    assert_eq!(
        st.copy_up_extent(&id, 0).unwrap(),
        (Some(base.clone()), dst.clone())
    );
    assert_eq!(
        st.resolve_extent(&id, 0).unwrap().read.as_ref(),
        Some(&base)
    );
    assert_eq!(
        st.ensure_extent(&id, 0).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    // Pending extents get no recovery tasks.
    assert!(st.recovery_tasks(None).is_empty());

    // Commit: epoch bump, reads and writes go to the new generation.
    let done = st.commit_copy_up(&id, 0, &dst.store_key()).unwrap();
    assert!(!done.pending);
    assert_eq!(done.epoch, dst.epoch + 1);
    assert_eq!(st.commit_copy_up(&id, 0, &dst.store_key()).unwrap(), done);
    let r = st.resolve_extent(&id, 0).unwrap();
    assert_eq!(r.own.as_ref(), Some(&done));
    assert_eq!(r.read.as_ref(), Some(&done));
    assert_eq!(st.ensure_extent(&id, 0).unwrap(), done);
    // A copy-up of an owned extent returns it, not pending.
    let (_, again) = st.copy_up_extent(&id, 0).unwrap();
    assert_eq!(again, done);
    // Extent 1 was untouched.
    assert_eq!(
        keys(&st, &id),
        vec![(0, 0, false), (0, 1, false), (1, 0, false)]
    );
    // Bad commits.
    assert_eq!(
        st.commit_copy_up(&id, 1, &format!("{id}.g1"))
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    let other = st.create_volume("o", EXTENT_SIZE, 1, true, T0).unwrap();
    assert_eq!(
        st.commit_copy_up(&id, 0, &other.id.to_string())
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
}

#[test]
fn clones_read_the_snapshot_view_and_copy_up_from_the_parent() {
    let (_d, mut st) = state(3);
    let v = st.create_volume("v", 2 * EXTENT_SIZE, 2, true, T0).unwrap();
    let id = v.id.to_string();
    let g0 = st.ensure_extent(&id, 0).unwrap();
    let s1 = st.create_snapshot(&id, "s1", T0).unwrap();
    // The volume rewrites extent 0 after the snapshot.
    let (_, d) = st.copy_up_extent(&id, 0).unwrap();
    let g1 = st.commit_copy_up(&id, 0, &d.store_key()).unwrap();
    let c = st
        .clone_volume(&s1.id.to_string(), "c", 3 * EXTENT_SIZE, 1, true, T0)
        .unwrap();
    let cid = c.id.to_string();
    assert!(keys(&st, &cid).is_empty(), "clones are placed lazily");
    // The clone sees the snapshot (generation 0), not the volume's rewrite.
    let r = st.resolve_extent(&cid, 0).unwrap();
    assert_eq!(r.read.as_ref(), Some(&g0));
    assert_eq!(r.own, None);
    assert_ne!(r.read.as_ref(), Some(&g1));
    // Never written in the snapshot, and beyond the snapshot: zeros.
    assert_eq!(st.resolve_extent(&cid, 1).unwrap().read, None);
    assert_eq!(st.resolve_extent(&cid, 2).unwrap().read, None);
    // A write to extent 1 of the clone is a plain placement.
    let e1 = st.ensure_extent(&cid, 1).unwrap();
    assert_eq!((e1.volume, e1.generation), (c.id, 0));
    // Extent 0 is copied up from the parent's generation 0 onto its chunks
    // (truncated to the clone's replication factor).
    let (src, dst) = st.copy_up_extent(&cid, 0).unwrap();
    assert_eq!(src.as_ref(), Some(&g0));
    assert_eq!(dst.replicas, g0.replicas[..1].to_vec());
    assert_eq!(dst.store_key(), cid);
    let own = st.commit_copy_up(&cid, 0, &cid).unwrap();
    assert_eq!(st.resolve_extent(&cid, 0).unwrap().read, Some(own));
    // The parent is unaffected.
    assert_eq!(st.resolve_extent(&id, 0).unwrap().read, Some(g1));

    // A clone of a snapshot of the clone resolves through both parents.
    let s2 = st.create_snapshot(&cid, "s2", T0).unwrap();
    let cc = st
        .clone_volume(&s2.id.to_string(), "cc", 0, 0, true, T0)
        .unwrap();
    let ccid = cc.id.to_string();
    assert_eq!(
        st.resolve_extent(&ccid, 0).unwrap().read.unwrap().volume,
        c.id
    );
    assert_eq!(st.resolve_extent(&ccid, 1).unwrap().read, Some(e1));
    assert_eq!(st.resolve_extent(&ccid, 2).unwrap().read, None);
}

#[test]
fn deleting_snapshots_drops_only_unreachable_records() {
    let (_d, mut st) = state(2);
    let v = st
        .create_volume("v", 2 * EXTENT_SIZE, 1, false, T0)
        .unwrap();
    let id = v.id.to_string();
    let rewrite = |st: &mut State, i: u64| {
        let (_, d) = st.copy_up_extent(&id, i).unwrap();
        st.commit_copy_up(&id, i, &d.store_key()).unwrap()
    };
    let s1 = st.create_snapshot(&id, "s1", T0).unwrap(); // freezes g0
    rewrite(&mut st, 0); // (0, g1)
    let s2 = st.create_snapshot(&id, "s2", T0).unwrap(); // freezes g1
    rewrite(&mut st, 0); // (0, g2)
                         // A stale pending copy-up of an older generation (its writer crashed).
    let (_, stale) = st.copy_up_extent(&id, 1).unwrap();
    assert_eq!(stale.generation, 2);
    let s3 = st.create_snapshot(&id, "s3", T0).unwrap(); // freezes g2
    assert_eq!(
        keys(&st, &id),
        vec![
            (0, 0, false),
            (0, 1, false),
            (0, 2, false),
            (1, 0, false),
            (1, 2, true)
        ]
    );
    // Deleting the middle snapshot drops (0, g1): nothing resolves to it.
    assert!(st.delete_snapshot(&s2.id.to_string()).unwrap());
    assert_eq!(
        keys(&st, &id),
        vec![(0, 0, false), (0, 2, false), (1, 0, false)]
    );
    // A snapshot with a clone cannot go; the clone keeps g0 alive.
    let c = st
        .clone_volume(&s1.id.to_string(), "c", 0, 0, true, T0)
        .unwrap();
    assert_eq!(
        st.delete_snapshot(&s1.id.to_string()).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        st.delete_volume(VolumeKey::Id(&id)).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    st.delete_volume(VolumeKey::Id(&c.id.to_string())).unwrap();
    // s1 gone: (0, g0) is still the view of s3? No: s3 froze g2, which
    // has (0, g2); extent 1 is only at g0, so (1, g0) stays.
    assert!(st.delete_snapshot(&s1.id.to_string()).unwrap());
    assert_eq!(keys(&st, &id), vec![(0, 2, false), (1, 0, false)]);
    assert!(st.delete_snapshot(&s3.id.to_string()).unwrap());
    assert_eq!(keys(&st, &id), vec![(0, 2, false), (1, 0, false)]);
    assert!(st.delete_volume(VolumeKey::Id(&id)).unwrap());
    assert_eq!(st.status().extents, 0);
}

#[test]
fn snapshot_barrier_tracks_applied_revisions() {
    // Taken before the chunks register, so their registration leases run
    // past it whatever the machine's speed.
    let t = Instant::now();
    let (_d, mut st) = state(2);
    let v = st.create_volume("v", EXTENT_SIZE, 1, true, T0).unwrap();
    let waiting = |st: &State, rev: u64, now: Instant| st.in_force_waiting(rev, now).waiting;
    // Freshly registered chunks are current as of their registration.
    assert!(waiting(&st, 2, t).is_empty());
    st.create_snapshot(&v.id.to_string(), "s", T0).unwrap();
    let rev = st.revision();
    assert_eq!(waiting(&st, rev, t), vec!["chunk 1", "chunk 2"]);
    st.note_applied_revision(1, rev);
    assert_eq!(waiting(&st, rev, t), vec!["chunk 2"]);
    // Only forward.
    st.note_applied_revision(1, 1);
    st.note_applied_revision(2, rev + 5);
    assert!(waiting(&st, rev, t).is_empty());
    // Once a chunk's lease has run out it is fenced out, not waited for.
    let later = t + Duration::from_secs(60);
    let w = st.in_force_waiting(u64::MAX, later);
    assert!(w.waiting.is_empty());
    assert_eq!(w.fenced_out, vec!["chunk 1", "chunk 2"]);
    // A dead chunk no longer counts at all.
    st.check_liveness(later).unwrap();
    assert_eq!(st.in_force_waiting(u64::MAX, later), Default::default());
}
