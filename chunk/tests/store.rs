//! Extent store behaviour through its public API, with the on-disk files
//! poked directly where a test needs corruption.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use ironblock_chunk::identity;
use ironblock_chunk::scrub::{BadBlock, ScrubConfig, Scrubber};
use ironblock_chunk::store::{
    ExtentId, ExtentStore, RepairOutcome, StoreConfig, StoreError, BLOCK_SIZE,
};
use rand::{Rng, SeedableRng};

mod common;
use common::flip_byte;

const EXT: u64 = 1 << 20; // 256 blocks
const BS: usize = BLOCK_SIZE as usize;

fn cfg() -> StoreConfig {
    StoreConfig {
        extent_size: EXT,
        ..StoreConfig::default()
    }
}

fn setup() -> (tempfile::TempDir, ExtentStore) {
    let d = tempfile::tempdir().unwrap();
    identity::init(d.path(), "test-cluster", "1", false).unwrap();
    let s = ExtentStore::open(d.path(), cfg()).unwrap();
    (d, s)
}

fn reopen(dir: &Path) -> ExtentStore {
    ExtentStore::open(dir, cfg()).unwrap()
}

fn file(dir: &Path, id: &ExtentId, ext: &str) -> PathBuf {
    dir.join("extents")
        .join(format!("{}.{:016x}.{ext}", id.volume, id.index))
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn round_trip_and_zeros() {
    let (_d, s) = setup();
    let id = ExtentId::new("vol-a", 0);
    s.create_extent(&id, 1).await.unwrap();
    // Never written: zeros, and they verify.
    let z = s.read(&id, 0, EXT).await.unwrap();
    assert!(z.iter().all(|&b| b == 0));
    let data = pattern(7, 3 * BS);
    s.write(&id, 1, 8 * BLOCK_SIZE, data.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        s.read(&id, 8 * BLOCK_SIZE, 3 * BLOCK_SIZE).await.unwrap(),
        data
    );
    // Partial overlap and neighbours.
    let r = s.read(&id, 7 * BLOCK_SIZE, 5 * BLOCK_SIZE).await.unwrap();
    assert!(r[..BS].iter().all(|&b| b == 0));
    assert_eq!(&r[BS..4 * BS], &data[..]);
    assert!(r[4 * BS..].iter().all(|&b| b == 0));
    // Last block of the extent.
    s.write(&id, 1, EXT - BLOCK_SIZE, pattern(1, BS), true)
        .await
        .unwrap();
    assert_eq!(
        s.read(&id, EXT - BLOCK_SIZE, BLOCK_SIZE).await.unwrap(),
        pattern(1, BS)
    );
    // Writing zeros over data reads back as zeros and verifies.
    s.write(&id, 1, 8 * BLOCK_SIZE, Bytes::from(vec![0u8; BS]), false)
        .await
        .unwrap();
    let r = s.read(&id, 8 * BLOCK_SIZE, BLOCK_SIZE).await.unwrap();
    assert!(r.iter().all(|&b| b == 0));
    let m = s.metrics();
    assert_eq!(m.writes.load(Ordering::Relaxed), 3);
    assert!(m.read_bytes.load(Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn bad_ranges_rejected() {
    let (_d, s) = setup();
    let id = ExtentId::new("v", 0);
    s.create_extent(&id, 1).await.unwrap();
    for (off, len) in [(1, 4096), (0, 4095), (0, 0), (512, 512), (4096, 8191)] {
        let e = s.read(&id, off, len).await.unwrap_err();
        assert!(
            matches!(e, StoreError::Unaligned { .. }),
            "{off},{len}: {e}"
        );
        let e = s
            .write(&id, 1, off, Bytes::from(vec![1u8; len as usize]), false)
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::Unaligned { .. }),
            "{off},{len}: {e}"
        );
        let e = s.unmap(&id, 1, off, len).await.unwrap_err();
        assert!(
            matches!(e, StoreError::Unaligned { .. }),
            "{off},{len}: {e}"
        );
    }
    for (off, len) in [(EXT, 4096), (EXT - 4096, 8192), (u64::MAX - 4095, 4096)] {
        let e = s.read(&id, off, len).await.unwrap_err();
        assert!(
            matches!(e, StoreError::OutOfRange { .. }),
            "{off},{len}: {e}"
        );
        let e = s
            .write(&id, 1, off, Bytes::from(vec![1u8; len as usize]), false)
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::OutOfRange { .. }),
            "{off},{len}: {e}"
        );
    }
    let e = s.repair(&id, 256, pattern(0, BS)).await.unwrap_err();
    assert!(matches!(e, StoreError::OutOfRange { .. }), "{e}");
    let e = s.repair(&id, 0, pattern(0, 100)).await.unwrap_err();
    assert!(matches!(e, StoreError::Unaligned { .. }), "{e}");
    // Nothing of that landed.
    assert!(s.read(&id, 0, EXT).await.unwrap().iter().all(|&b| b == 0));
    // Unknown extents and bad ids.
    let other = ExtentId::new("v", 1);
    assert!(matches!(
        s.read(&other, 0, 4096).await,
        Err(StoreError::NotFound(_))
    ));
    for bad in ["", "a/b", "../x", ".hidden", "sp ace"] {
        assert!(matches!(
            s.create_extent(&ExtentId::new(bad, 0), 1).await,
            Err(StoreError::InvalidId(_))
        ));
    }
}

#[tokio::test]
async fn epochs_fence_and_persist() {
    let (d, s) = setup();
    let id = ExtentId::new("v", 3);
    s.create_extent(&id, 5).await.unwrap();
    assert_eq!(s.extent_epoch(&id).unwrap(), 5);
    let e = s.write(&id, 4, 0, pattern(1, BS), false).await.unwrap_err();
    assert!(
        matches!(e, StoreError::StaleEpoch { have: 5, got: 4 }),
        "{e}"
    );
    assert!(s.read(&id, 0, 4096).await.unwrap().iter().all(|&b| b == 0));
    // Same epoch fine, newer epoch accepted and becomes the extent's epoch.
    s.write(&id, 5, 0, pattern(1, BS), false).await.unwrap();
    s.write(&id, 7, 4096, pattern(2, BS), false).await.unwrap();
    assert_eq!(s.extent_epoch(&id).unwrap(), 7);
    let e = s.write(&id, 5, 0, pattern(3, BS), false).await.unwrap_err();
    assert!(matches!(e, StoreError::StaleEpoch { have: 7, got: 5 }));
    let e = s.unmap(&id, 6, 0, 4096).await.unwrap_err();
    assert!(matches!(e, StoreError::StaleEpoch { have: 7, got: 6 }));
    // set_epoch: forward only.
    assert!(matches!(
        s.set_epoch(&id, 6).await,
        Err(StoreError::StaleEpoch { have: 7, got: 6 })
    ));
    s.set_epoch(&id, 7).await.unwrap();
    s.set_epoch(&id, 9).await.unwrap();
    assert_eq!(s.metrics().stale_epoch_rejects.load(Ordering::Relaxed), 4);
    drop(s);
    let s = reopen(d.path());
    assert_eq!(s.extent_epoch(&id).unwrap(), 9);
    assert!(matches!(
        s.write(&id, 8, 0, pattern(3, BS), false).await,
        Err(StoreError::StaleEpoch { have: 9, got: 8 })
    ));
    assert_eq!(s.read(&id, 0, 4096).await.unwrap(), pattern(1, BS));
    assert_eq!(s.read(&id, 4096, 4096).await.unwrap(), pattern(2, BS));
    let info = s.extent_info();
    assert_eq!(info.len(), 1);
    assert_eq!((info[0].epoch, info[0].size), (9, EXT));
}

#[tokio::test]
async fn flipped_byte_detected_and_repaired() {
    let (d, s) = setup();
    let id = ExtentId::new("v", 0);
    s.create_extent(&id, 1).await.unwrap();
    let data = pattern(9, 16 * BS);
    s.write(&id, 1, 0, data.clone(), true).await.unwrap();
    flip_byte(&file(d.path(), &id, "data"), 5 * BLOCK_SIZE + 123);
    match s.read(&id, 0, 16 * BLOCK_SIZE).await {
        Err(StoreError::Checksum { extent, block }) => {
            assert_eq!(extent, id);
            assert_eq!(block, 5);
        }
        other => panic!("expected checksum error, got {other:?}"),
    }
    // Reads not covering the bad block are fine.
    assert_eq!(
        s.read(&id, 0, 5 * BLOCK_SIZE).await.unwrap(),
        data.slice(..5 * BS)
    );
    assert!(s.read(&id, 5 * BLOCK_SIZE, BLOCK_SIZE).await.is_err());
    assert_eq!(s.metrics().checksum_errors.load(Ordering::Relaxed), 2);
    // Repair with the good copy (as a replica would send it).
    let good = data.slice(5 * BS..6 * BS);
    assert_eq!(
        s.repair(&id, 5, good.clone()).await.unwrap(),
        RepairOutcome::Repaired
    );
    assert_eq!(s.read(&id, 0, 16 * BLOCK_SIZE).await.unwrap(), data);
    // A repair of a block that verifies does not overwrite it.
    assert_eq!(
        s.repair(&id, 5, pattern(0, BS)).await.unwrap(),
        RepairOutcome::AlreadyGood
    );
    assert_eq!(s.read(&id, 0, 16 * BLOCK_SIZE).await.unwrap(), data);
    assert_eq!(s.metrics().repairs.load(Ordering::Relaxed), 1);

    // A flipped checksum entry is caught too, and so is garbage in a hole.
    flip_byte(&file(d.path(), &id, "csum"), 2 * 4 + 1);
    flip_byte(&file(d.path(), &id, "data"), 100 * BLOCK_SIZE);
    assert!(matches!(
        s.read(&id, 0, EXT).await,
        Err(StoreError::Checksum { block: 2, .. })
    ));
    assert!(matches!(
        s.read(&id, 50 * BLOCK_SIZE, 100 * BLOCK_SIZE).await,
        Err(StoreError::Checksum { block: 100, .. })
    ));
}

#[tokio::test]
async fn scrub_finds_unread_damage() {
    let (d, s) = setup();
    let a = ExtentId::new("v", 0);
    let b = ExtentId::new("w", 7);
    s.create_extent(&a, 1).await.unwrap();
    s.create_extent(&b, 1).await.unwrap();
    s.write(&a, 1, 0, pattern(1, 64 * BS), false).await.unwrap();
    s.write(&b, 1, 0, pattern(2, 64 * BS), false).await.unwrap();
    assert!(s.scrub(&a).await.unwrap().is_empty());
    flip_byte(&file(d.path(), &a, "data"), 3 * BLOCK_SIZE);
    flip_byte(&file(d.path(), &a, "data"), 200 * BLOCK_SIZE + 9); // in a hole
    flip_byte(&file(d.path(), &b, "data"), 63 * BLOCK_SIZE + 4095);
    assert_eq!(s.scrub(&a).await.unwrap(), vec![3, 200]);
    assert_eq!(s.scrub(&b).await.unwrap(), vec![63]);

    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let scrubber = Scrubber::new(
        s.clone(),
        ScrubConfig {
            pause_between_extents: Duration::from_millis(1),
            pause_between_passes: Duration::from_secs(3600),
        },
    )
    .with_reports(tx);
    let pass = scrubber.run_pass().await;
    assert_eq!(pass.extents, 2);
    assert!(pass.errors.is_empty());
    let want = vec![
        BadBlock {
            extent: a.clone(),
            block: 3,
        },
        BadBlock {
            extent: a.clone(),
            block: 200,
        },
        BadBlock {
            extent: b.clone(),
            block: 63,
        },
    ];
    assert_eq!(pass.bad, want);
    for w in &want {
        assert_eq!(rx.recv().await.as_ref(), Some(w));
    }
    let m = scrubber.metrics();
    assert_eq!(m.passes.load(Ordering::Relaxed), 1);
    assert_eq!(m.extents_scrubbed.load(Ordering::Relaxed), 2);
    assert_eq!(m.bad_blocks_found.load(Ordering::Relaxed), 3);

    // Repair what the scrubber found; the next pass is clean.
    s.repair(&a, 3, pattern(1, 64 * BS).slice(3 * BS..4 * BS))
        .await
        .unwrap();
    s.repair(&a, 200, Bytes::from(vec![0u8; BS])).await.unwrap();
    s.repair(&b, 63, pattern(2, 64 * BS).slice(63 * BS..))
        .await
        .unwrap();
    assert!(scrubber.run_pass().await.bad.is_empty());

    // The background loop stops on shutdown.
    let (stop, rx) = tokio::sync::watch::channel(false);
    let h = tokio::spawn(scrubber.run(rx));
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn unmap_and_capacity() {
    let (_d, s) = setup();
    let id = ExtentId::new("v", 0);
    s.create_extent(&id, 1).await.unwrap();
    let empty = s.used_bytes().await.unwrap();
    s.write(&id, 1, 0, pattern(3, 64 * BS), true).await.unwrap();
    let full = s.used_bytes().await.unwrap();
    assert!(full >= empty + 64 * BLOCK_SIZE, "{empty} -> {full}");
    s.unmap(&id, 1, 16 * BLOCK_SIZE, 32 * BLOCK_SIZE)
        .await
        .unwrap();
    let r = s.read(&id, 0, 64 * BLOCK_SIZE).await.unwrap();
    assert_eq!(&r[..16 * BS], &pattern(3, 64 * BS)[..16 * BS]);
    assert!(r[16 * BS..48 * BS].iter().all(|&b| b == 0));
    assert_eq!(&r[48 * BS..], &pattern(3, 64 * BS)[48 * BS..]);
    assert!(s.scrub(&id).await.unwrap().is_empty());
    let after = s.used_bytes().await.unwrap();
    assert!(after <= full, "{full} -> {after}");
    s.flush(Some(&id)).await.unwrap();
    s.flush(None).await.unwrap();
    assert_eq!(s.metrics().unmaps.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn reopen_keeps_everything() {
    let (d, s) = setup();
    let mut model = HashMap::new();
    for (i, vol) in ["a", "b", "c"].iter().enumerate() {
        let id = ExtentId::new(*vol, i as u64);
        s.create_extent(&id, 10 + i as u64).await.unwrap();
        let data = pattern(i as u8, 8 * BS);
        s.write(&id, 10 + i as u64, 4 * BLOCK_SIZE, data.clone(), false)
            .await
            .unwrap();
        model.insert(id, data);
    }
    s.flush(None).await.unwrap();
    drop(s);
    let s = reopen(d.path());
    assert_eq!(s.list_extents().len(), 3);
    assert!(s.quarantined().is_empty());
    for (id, data) in &model {
        assert_eq!(
            s.read(id, 4 * BLOCK_SIZE, 8 * BLOCK_SIZE).await.unwrap(),
            *data
        );
        assert_eq!(s.extent_epoch(id).unwrap(), 10 + id.index);
        assert!(s.scrub(id).await.unwrap().is_empty());
    }
    // Checksums survive too: damage made while the store was down is found.
    let a = ExtentId::new("a", 0);
    drop(s);
    flip_byte(&file(d.path(), &a, "data"), 6 * BLOCK_SIZE + 1);
    let s = reopen(d.path());
    assert!(matches!(
        s.read(&a, 0, EXT).await,
        Err(StoreError::Checksum { block: 6, .. })
    ));
}

#[tokio::test]
async fn store_refuses_foreign_directories() {
    let d = tempfile::tempdir().unwrap();
    assert!(matches!(
        ExtentStore::open(d.path(), cfg()),
        Err(StoreError::Identity(
            identity::IdentityError::NotStamped { .. }
        ))
    ));
    identity::init(d.path(), "A", "3", false).unwrap();
    let c = StoreConfig {
        expected_cluster: Some("B".into()),
        ..cfg()
    };
    assert!(matches!(
        ExtentStore::open(d.path(), c),
        Err(StoreError::Identity(
            identity::IdentityError::WrongCluster { .. }
        ))
    ));
    let c = StoreConfig {
        expected_cluster: Some("A".into()),
        expected_chunk: Some("4".into()),
        ..cfg()
    };
    assert!(matches!(
        ExtentStore::open(d.path(), c),
        Err(StoreError::Identity(
            identity::IdentityError::WrongChunk { .. }
        ))
    ));
    let c = StoreConfig {
        expected_cluster: Some("A".into()),
        expected_chunk: Some("3".into()),
        ..cfg()
    };
    let s = ExtentStore::open(d.path(), c).unwrap();
    assert_eq!(s.identity().chunk_id, "3");
    for size in [0, 4095, 4097] {
        let c = StoreConfig {
            extent_size: size,
            ..cfg()
        };
        assert!(matches!(
            ExtentStore::open(d.path(), c),
            Err(StoreError::Config(_))
        ));
    }
}

#[tokio::test]
async fn broken_files_are_errors_not_panics() {
    let (d, s) = setup();
    let ids: Vec<_> = (0..5).map(|i| ExtentId::new("v", i)).collect();
    for id in &ids {
        s.create_extent(id, 1).await.unwrap();
        s.write(id, 1, 0, pattern(1, 4 * BS), false).await.unwrap();
    }
    // While open: a checksum file truncated under the store.
    std::fs::OpenOptions::new()
        .write(true)
        .open(file(d.path(), &ids[0], "csum"))
        .unwrap()
        .set_len(2)
        .unwrap();
    let e = s.read(&ids[0], 0, 4096).await.unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(matches!(
        s.scrub(&ids[0]).await,
        Err(StoreError::Corrupt { .. })
    ));
    drop(s);
    // While closed: corrupt meta, truncated data, unparsable meta, missing
    // csum; orphans and temp files lying around.
    flip_byte(&file(d.path(), &ids[1], "meta"), 20);
    std::fs::OpenOptions::new()
        .write(true)
        .open(file(d.path(), &ids[2], "data"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    std::fs::write(file(d.path(), &ids[3], "meta"), [0xff, 0, 1]).unwrap();
    let orphan = ExtentId::new("orphan", 1);
    std::fs::write(file(d.path(), &orphan, "data"), b"x").unwrap();
    let tmp = d.path().join("extents").join("v.0000000000000004.meta.tmp");
    std::fs::write(&tmp, b"half").unwrap();
    std::fs::write(d.path().join("extents").join("README"), b"?").unwrap();
    let s = reopen(d.path());
    let q: Vec<_> = s.quarantined().into_iter().map(|q| q.id).collect();
    assert_eq!(q, ids[..4].to_vec());
    assert_eq!(s.list_extents(), vec![ids[4].clone()]);
    assert_eq!(
        s.read(&ids[4], 0, 4 * BLOCK_SIZE).await.unwrap(),
        pattern(1, 4 * BS)
    );
    assert!(!file(d.path(), &orphan, "data").exists());
    assert!(!tmp.exists());
    assert!(matches!(
        s.read(&ids[1], 0, 4096).await,
        Err(StoreError::NotFound(_))
    ));
    // A quarantined extent can be recreated (recovery) or deleted.
    s.create_extent(&ids[1], 2).await.unwrap();
    assert!(s
        .read(&ids[1], 0, EXT)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    s.delete_extent(&ids[2]).await.unwrap();
    assert!(!file(d.path(), &ids[2], "data").exists());
    assert_eq!(s.quarantined().len(), 2);
    drop(s);
    let s = reopen(d.path());
    assert_eq!(s.list_extents(), vec![ids[1].clone(), ids[4].clone()]);
}

#[tokio::test]
async fn create_delete_lifecycle() {
    let (d, s) = setup();
    let id = ExtentId::new("v", 0);
    s.create_extent(&id, 1).await.unwrap();
    assert!(matches!(
        s.create_extent(&id, 1).await,
        Err(StoreError::Exists(_))
    ));
    s.write(&id, 1, 0, pattern(1, BS), false).await.unwrap();
    s.delete_extent(&id).await.unwrap();
    for ext in ["meta", "data", "csum"] {
        assert!(!file(d.path(), &id, ext).exists());
    }
    assert!(matches!(
        s.read(&id, 0, 4096).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.write(&id, 1, 0, pattern(1, BS), false).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.delete_extent(&id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(s.extent_epoch(&id), Err(StoreError::NotFound(_))));
    // Re-created: empty again.
    s.create_extent(&id, 2).await.unwrap();
    assert!(s.read(&id, 0, EXT).await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(s.list_extents(), vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_to_different_extents() {
    let (_d, s) = setup();
    let n = 8u64;
    for i in 0..n {
        s.create_extent(&ExtentId::new("v", i), 1).await.unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..n {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = ExtentId::new("v", i);
            for blk in 0..32u64 {
                let data = pattern((i * 32 + blk) as u8, BS);
                s.write(&id, 1, blk * BLOCK_SIZE, data, blk % 8 == 0)
                    .await
                    .unwrap();
                // Interleave reads of the same extent.
                let got = s.read(&id, blk * BLOCK_SIZE, BLOCK_SIZE).await.unwrap();
                assert_eq!(got, pattern((i * 32 + blk) as u8, BS));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..n {
        let id = ExtentId::new("v", i);
        let all = s.read(&id, 0, 32 * BLOCK_SIZE).await.unwrap();
        for blk in 0..32usize {
            assert_eq!(
                &all[blk * BS..(blk + 1) * BS],
                &pattern((i as usize * 32 + blk) as u8, BS)[..]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_and_reads_same_extent_never_see_torn_checksums() {
    let (_d, s) = setup();
    let id = ExtentId::new("v", 0);
    s.create_extent(&id, 1).await.unwrap();
    let w = {
        let s = s.clone();
        let id = id.clone();
        tokio::spawn(async move {
            for round in 0..200u32 {
                let data = pattern(round as u8, 4 * BS);
                s.write(&id, 1, 0, data, false).await.unwrap();
            }
        })
    };
    let r = {
        let s = s.clone();
        let id = id.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                // Any checksum error here would be a false corruption report.
                s.read(&id, 0, 4 * BLOCK_SIZE).await.unwrap();
            }
        })
    };
    w.await.unwrap();
    r.await.unwrap();
}

/// Random aligned writes, unmaps and reads against an in-memory model,
/// with reopens in between. Seeded and bounded.
#[tokio::test]
async fn random_ops_match_model() {
    for seed in [1u64, 2, 3] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (d, mut s) = setup();
        let ids: Vec<_> = (0..3).map(|i| ExtentId::new("fz", i)).collect();
        let mut model: HashMap<ExtentId, Vec<u8>> = HashMap::new();
        for id in &ids {
            s.create_extent(id, 1).await.unwrap();
            model.insert(id.clone(), vec![0u8; EXT as usize]);
        }
        let blocks = EXT / BLOCK_SIZE;
        for step in 0..300 {
            let id = &ids[rng.gen_range(0..ids.len())];
            let first = rng.gen_range(0..blocks);
            let n = rng.gen_range(1..=(blocks - first).min(16));
            let (off, len) = (first * BLOCK_SIZE, n * BLOCK_SIZE);
            let m = model.get_mut(id).unwrap();
            match rng.gen_range(0..10) {
                0..=4 => {
                    let mut data = vec![0u8; len as usize];
                    rng.fill(&mut data[..]);
                    if rng.gen_bool(0.2) {
                        data[..BS].fill(0);
                    }
                    s.write(id, 1, off, Bytes::from(data.clone()), rng.gen_bool(0.1))
                        .await
                        .unwrap();
                    m[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                5 => {
                    s.unmap(id, 1, off, len).await.unwrap();
                    m[off as usize..(off + len) as usize].fill(0);
                }
                6 if step % 50 == 0 => {
                    drop(s);
                    s = reopen(d.path());
                }
                _ => {
                    let got = s.read(id, off, len).await.unwrap();
                    assert_eq!(
                        &got[..],
                        &m[off as usize..(off + len) as usize],
                        "seed {seed} step {step}"
                    );
                }
            }
        }
        for id in &ids {
            assert_eq!(&s.read(id, 0, EXT).await.unwrap()[..], &model[id][..]);
            assert!(s.scrub(id).await.unwrap().is_empty());
        }
    }
}

/// ENOSPC from the disk: the write fails with `NoSpace` (no panic), and the
/// blocks it touched do not read back as corruption afterwards. The data file
/// is swapped for `/dev/full` (writes fail with ENOSPC, reads give zeros)
/// between open and first use.
#[tokio::test]
async fn no_space_is_an_error_not_corruption() {
    if !Path::new("/dev/full").exists() {
        eprintln!("no /dev/full; skipping");
        return;
    }
    let (d, s) = setup();
    let id = ExtentId::new("v", 0);
    s.create_extent(&id, 1).await.unwrap();
    s.write(&id, 1, 0, pattern(1, 4 * BS), true).await.unwrap();
    drop(s);
    let s = reopen(d.path()); // files are opened lazily, on first use
    let data = file(d.path(), &id, "data");
    std::fs::remove_file(&data).unwrap();
    std::os::unix::fs::symlink("/dev/full", &data).unwrap();
    // The "disk" lost blocks 0..4 (reads zeros): they no longer verify.
    assert!(matches!(
        s.read(&id, 0, 4 * BLOCK_SIZE).await,
        Err(StoreError::Checksum { block: 0, .. })
    ));
    let e = s
        .write(&id, 1, 0, pattern(2, 4 * BS), true)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NoSpace), "{e}");
    assert_eq!(s.metrics().no_space_errors.load(Ordering::Relaxed), 1);
    // The failed write reconciled the checksums with what is on "disk" now
    // (zeros): no false corruption.
    let got = s.read(&id, 0, 8 * BLOCK_SIZE).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    assert!(s.scrub(&id).await.unwrap().is_empty());
    let space = s.disk_space().await.unwrap();
    assert!(space.total_bytes >= space.available_bytes);
    assert!(space.total_bytes > 0);
}

/// Deleting an extent while tasks write and read it: every operation either
/// succeeds or reports `NotFound`; nothing else, no panic, no hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_during_io() {
    let (d, s) = setup();
    let id = ExtentId::new("v", 0);
    let keep = ExtentId::new("v", 1);
    s.create_extent(&id, 1).await.unwrap();
    s.create_extent(&keep, 1).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let s = s.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100u64 {
                let off = ((t * 100 + i) % 256) * BLOCK_SIZE;
                let r = if i % 2 == 0 {
                    s.write(&id, 1, off, pattern(i as u8, BS), false).await
                } else {
                    s.read(&id, off, BLOCK_SIZE).await.map(|_| ())
                };
                match r {
                    Ok(()) | Err(StoreError::NotFound(_)) => {}
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.delete_extent(&id).await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.list_extents(), vec![keep.clone()]);
    for ext in ["meta", "data", "csum"] {
        assert!(!file(d.path(), &id, ext).exists());
    }
}

/// Extents keep the size they were created with when the configured size
/// changes.
#[tokio::test]
async fn extent_size_is_per_extent() {
    let (d, s) = setup();
    let small = ExtentId::new("v", 0);
    s.create_extent(&small, 1).await.unwrap();
    drop(s);
    let s = ExtentStore::open(
        d.path(),
        StoreConfig {
            extent_size: 2 * EXT,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    let big = ExtentId::new("v", 1);
    s.create_extent(&big, 1).await.unwrap();
    assert!(matches!(
        s.read(&small, EXT, BLOCK_SIZE).await,
        Err(StoreError::OutOfRange { .. })
    ));
    s.write(&big, 1, 2 * EXT - BLOCK_SIZE, pattern(4, BS), false)
        .await
        .unwrap();
    let sizes: Vec<_> = s.extent_info().into_iter().map(|i| i.size).collect();
    assert_eq!(sizes, vec![EXT, 2 * EXT]);
}

/// Garbage collection deletes by change stamp: an extent touched after the
/// stamps were read (written, its epoch moved, a resync started) is kept;
/// an untouched one goes.
#[tokio::test]
async fn delete_if_unchanged_keeps_what_changed_since_the_stamp() {
    let (_d, s) = setup();
    let ids: Vec<ExtentId> = (0..5).map(|i| ExtentId::new("vol-gc", i)).collect();
    for id in &ids {
        s.create_extent(id, 1).await.unwrap();
    }
    let stamps: HashMap<ExtentId, u64> = s.change_stamps().into_iter().collect();
    assert_eq!(stamps.len(), 5);
    s.write(&ids[0], 1, 0, pattern(3, BS), false).await.unwrap();
    s.set_epoch(&ids[1], 2).await.unwrap();
    s.begin_resync(&ids[2], 5).await.unwrap();
    s.unmap(&ids[3], 1, 0, BLOCK_SIZE).await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        let deleted = s.delete_extent_if_unchanged(id, stamps[id]).await.unwrap();
        assert_eq!(deleted, i == 4, "extent {i}");
    }
    let left: Vec<ExtentId> = s.list_extents();
    assert_eq!(left, ids[..4].to_vec());
    // The data written after the stamp is intact.
    assert_eq!(
        s.read(&ids[0], 0, BLOCK_SIZE).await.unwrap(),
        pattern(3, BS)
    );
    // A fresh stamp deletes; a gone extent is not an error.
    let now: HashMap<ExtentId, u64> = s.change_stamps().into_iter().collect();
    assert!(s
        .delete_extent_if_unchanged(&ids[0], now[&ids[0]])
        .await
        .unwrap());
    assert!(!s
        .delete_extent_if_unchanged(&ids[0], now[&ids[0]])
        .await
        .unwrap());
    // A re-created extent has a new stamp.
    s.create_extent(&ids[0], 1).await.unwrap();
    assert!(!s
        .delete_extent_if_unchanged(&ids[0], now[&ids[0]])
        .await
        .unwrap());
}

/// Garbage collection *retires* a copy meta dropped this chunk from: it is
/// deleted like `delete_extent_if_unchanged` (only if unchanged), and
/// remembered as fenced at meta's epoch: creating it again (a stale write's
/// create, a fence, a copy-up) at that epoch or older is StaleEpoch, a
/// newer epoch re-creates it and forgets the tombstone, and a copy-up from
/// it is refused instead of copying zeros.
#[tokio::test]
async fn retired_extents_are_fenced_at_the_epoch_meta_dropped_them_with() {
    let (d, s) = setup();
    let id = ExtentId::new("vol-ret", 0);
    let other = ExtentId::new("vol-ret", 1);
    s.create_extent(&id, 3).await.unwrap();
    s.write(&id, 3, 0, pattern(5, BS), false).await.unwrap();
    s.create_extent(&other, 3).await.unwrap();
    let stamps: HashMap<ExtentId, u64> = s.change_stamps().into_iter().collect();
    // Changed since the stamp: kept, no tombstone.
    s.write(&other, 3, 0, pattern(6, BS), false).await.unwrap();
    assert!(!s
        .retire_extent_if_unchanged(&other, stamps[&other], 9)
        .await
        .unwrap());
    assert_eq!(s.retired_epoch(&other), None);
    // Unchanged: gone from the table and the extents directory, fenced at 5.
    assert!(s
        .retire_extent_if_unchanged(&id, stamps[&id], 5)
        .await
        .unwrap());
    assert!(!file(d.path(), &id, "meta").exists());
    assert!(!file(d.path(), &id, "data").exists());
    assert_eq!(s.list_extents(), vec![other.clone()]);
    assert_eq!(s.retired_epoch(&id), Some(5));
    assert_eq!(s.retired_count(), 1);
    assert!(matches!(s.extent_epoch(&id), Err(StoreError::NotFound(_))));
    for epoch in [3, 5] {
        let e = s.create_extent(&id, epoch).await.unwrap_err();
        assert!(
            matches!(e, StoreError::StaleEpoch { have: 5, got } if got == epoch),
            "create at {epoch}: {e}"
        );
        let e = s.begin_resync(&id, epoch).await.unwrap_err();
        assert!(matches!(e, StoreError::StaleEpoch { have: 5, .. }), "{e}");
    }
    // A copy-up from it or onto it at an old epoch.
    let dst = ExtentId::new("vol-ret.g1", 0);
    let e = s.copy_extent(&id, &dst, 6).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e}");
    let e = s.copy_extent(&other, &id, 4).await.unwrap_err();
    assert!(matches!(e, StoreError::StaleEpoch { have: 5, .. }), "{e}");
    assert_eq!(s.list_extents(), vec![other.clone()]);
    // Placed here again at a newer epoch: created empty, tombstone gone.
    s.create_extent(&id, 6).await.unwrap();
    assert_eq!(s.retired_epoch(&id), None);
    assert_eq!(s.extent_epoch(&id).unwrap(), 6);
    assert_eq!(s.read(&id, 0, BLOCK_SIZE).await.unwrap(), vec![0u8; BS]);
    // Tombstones are in memory only: a reopened store has none (start-up
    // garbage collection runs before anything is served).
    drop(s);
    let s = reopen(d.path());
    assert_eq!(s.retired_count(), 0);
}

fn trash_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join(identity::TRASH_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Wait (bounded) until the trash's background thread has nothing left.
async fn wait_trash_empty(s: &ExtentStore, limit: Duration) -> Duration {
    let t = std::time::Instant::now();
    while s.trash_pending() > 0 {
        assert!(
            t.elapsed() < limit,
            "the trash still holds {} files after {limit:?}",
            s.trash_pending()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

/// Deleting an extent renames its files into the trash and returns; the
/// unlink (made slow here) happens on the trash's thread. The same extent
/// can be created again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_moves_files_to_the_trash_and_unlinks_them_in_the_background() {
    let (d, s) = setup();
    let id = ExtentId::new("v-trash", 0);
    s.create_extent(&id, 1).await.unwrap();
    s.write(&id, 1, 0, pattern(3, EXT as usize), true)
        .await
        .unwrap();
    let slow = Duration::from_secs(2);
    s.set_delete_delay(slow);
    let t = std::time::Instant::now();
    s.delete_extent(&id).await.unwrap();
    let took = t.elapsed();
    println!("delete_extent took {took:?} with a {slow:?} unlink");
    assert!(took < Duration::from_secs(1), "delete took {took:?}");
    for ext in ["meta", "data", "csum"] {
        assert!(
            !file(d.path(), &id, ext).exists(),
            "{ext} still in extents/"
        );
    }
    let names = trash_names(d.path());
    assert_eq!(names.len(), 3, "{names:?}");
    for ext in ["meta", "data", "csum"] {
        let want = format!(".v-trash.0000000000000000.{ext}");
        assert!(names.iter().any(|n| n.ends_with(&want)), "{names:?}");
    }
    assert_eq!(s.trash_pending(), 3);
    // The extent is gone for I/O and can be made again right away.
    assert!(matches!(
        s.read(&id, 0, 4096).await,
        Err(StoreError::NotFound(_))
    ));
    let t = std::time::Instant::now();
    s.create_extent(&id, 2).await.unwrap();
    s.write(&id, 2, 0, pattern(4, BS), false).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(s.read(&id, 0, 4096).await.unwrap(), pattern(4, BS));
    assert!(s.trash_pending() > 0, "the slow unlink already ran");
    wait_trash_empty(&s, slow + Duration::from_secs(10)).await;
    assert!(trash_names(d.path()).is_empty());
    assert_eq!(s.trash_deleted(), 3);
    // The new extent is untouched by the background unlink.
    assert_eq!(s.read(&id, 0, 4096).await.unwrap(), pattern(4, BS));
    drop(s);
    let s = reopen(d.path());
    assert_eq!(s.list_extents(), vec![id.clone()]);
    assert_eq!(s.extent_epoch(&id).unwrap(), 2);
}

/// A crash (here: the store dropped while its trash thread is still
/// waiting) leaves files in the trash, and an interrupted delete leaves
/// `.data`/`.csum` without `.meta` in `extents/`. The next open queues all
/// of it for the background thread and returns at once; the trash ends up
/// empty and live extents are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trash_is_emptied_after_a_restart() {
    let (d, s) = setup();
    let ids: Vec<ExtentId> = (0..3).map(|i| ExtentId::new("v-restart", i)).collect();
    for (i, id) in ids.iter().enumerate() {
        s.create_extent(id, 1).await.unwrap();
        s.write(id, 1, 0, pattern(i as u8, EXT as usize), true)
            .await
            .unwrap();
    }
    // Never unlinked before the "crash".
    s.set_delete_delay(Duration::from_secs(600));
    s.delete_extent(&ids[0]).await.unwrap();
    s.delete_extent(&ids[1]).await.unwrap();
    assert_eq!(trash_names(d.path()).len(), 6);
    drop(s);
    // An interrupted delete of another extent: `.meta` gone, the rest not.
    let orphan = ExtentId::new("v-orphan", 7);
    std::fs::write(file(d.path(), &orphan, "data"), vec![5u8; 64 << 10]).unwrap();
    std::fs::write(file(d.path(), &orphan, "csum"), b"x").unwrap();

    let t = std::time::Instant::now();
    let s = reopen(d.path());
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "open took {took:?}");
    for ext in ["data", "csum"] {
        assert!(!file(d.path(), &orphan, ext).exists());
    }
    let waited = wait_trash_empty(&s, Duration::from_secs(20)).await;
    println!("reopened in {took:?}; trash emptied {waited:?} later");
    assert!(
        trash_names(d.path()).is_empty(),
        "{:?}",
        trash_names(d.path())
    );
    assert_eq!(s.trash_deleted(), 8);
    assert_eq!(s.list_extents(), vec![ids[2].clone()]);
    assert_eq!(
        s.read(&ids[2], 0, EXT).await.unwrap(),
        pattern(2, EXT as usize)
    );
    // Trash names of the new run do not collide with the old ones.
    s.delete_extent(&ids[2]).await.unwrap();
    wait_trash_empty(&s, Duration::from_secs(20)).await;
    assert!(trash_names(d.path()).is_empty());
    assert!(s.list_extents().is_empty());
}
