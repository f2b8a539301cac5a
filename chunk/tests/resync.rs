//! Extent store resync (filling a learner): begin_resync / resync_write /
//! end_resync, and the race that matters: copy data read before a
//! concurrent normal write must never overwrite it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ironblock_chunk::identity;
use ironblock_chunk::store::{ExtentId, ExtentStore, StoreConfig, StoreError, BLOCK_SIZE};

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

/// `blocks` blocks, each filled with its own byte derived from `seed`.
fn blocks(seed: u8, first: u64, blocks: u64) -> Bytes {
    let mut v = Vec::with_capacity(blocks as usize * BS);
    for b in first..first + blocks {
        v.extend(std::iter::repeat_n(seed.wrapping_add(b as u8) | 1, BS));
    }
    Bytes::from(v)
}

fn block_of(data: &[u8], b: u64) -> &[u8] {
    &data[b as usize * BS..(b as usize + 1) * BS]
}

fn info_resyncing(s: &ExtentStore, id: &ExtentId) -> bool {
    s.extent_info()
        .into_iter()
        .find(|i| &i.id == id)
        .map(|i| i.resyncing)
        .expect("extent listed")
}

#[tokio::test]
async fn begin_discards_an_old_copy_and_copies_untouched_blocks_only() {
    let (_d, s) = setup();
    let id = ExtentId::new("vol-a", 0);
    // A stale copy from an earlier life at epoch 3.
    s.create_extent(&id, 3).await.unwrap();
    s.write(&id, 3, 0, blocks(9, 0, 256), false).await.unwrap();

    s.begin_resync(&id, 5).await.unwrap();
    assert_eq!(s.extent_epoch(&id).unwrap(), 5);
    assert!(info_resyncing(&s, &id));
    assert!(s.resyncing(&id).unwrap());
    // Discarded: reads as zeros now.
    assert!(s.read(&id, 0, EXT).await.unwrap().iter().all(|b| *b == 0));

    // Normal traffic at the learner epoch: a write to block 10, an unmap of
    // block 20.
    let w = blocks(100, 10, 1);
    s.write(&id, 5, 10 * BLOCK_SIZE, w.clone(), false)
        .await
        .unwrap();
    s.unmap(&id, 5, 20 * BLOCK_SIZE, BLOCK_SIZE).await.unwrap();

    // The copy (older data for every block) skips both, and zero blocks.
    let mut copy = blocks(200, 0, 256).to_vec();
    copy[30 * BS..31 * BS].fill(0);
    let written = s
        .resync_write(&id, 0, Bytes::from(copy.clone()))
        .await
        .unwrap();
    assert_eq!(written, (256 - 3) * BLOCK_SIZE);
    let now = s.read(&id, 0, EXT).await.unwrap();
    for b in 0..256u64 {
        let want: &[u8] = match b {
            10 => &w,
            20 | 30 => &[0u8; BS],
            _ => block_of(&copy, b),
        };
        assert_eq!(block_of(&now, b), want, "block {b}");
    }
    s.flush(Some(&id)).await.unwrap();
    s.end_resync(&id).await.unwrap();
    assert!(!info_resyncing(&s, &id));
    // Outside a resync, resync_write is refused.
    assert!(matches!(
        s.resync_write(&id, 0, blocks(1, 0, 1)).await,
        Err(StoreError::ResyncConflict { .. })
    ));
    assert!(
        s.metrics()
            .resync_written_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test]
async fn writes_that_reach_the_learner_before_the_copy_starts_are_kept() {
    let (_d, s) = setup();
    // 1. The learner never had the extent: the first normal write at the
    //    learner epoch creates it (as LocalPeer does).
    let fresh = ExtentId::new("vol-a", 1);
    s.create_extent(&fresh, 7).await.unwrap();
    let w = blocks(50, 4, 2);
    s.write(&fresh, 7, 4 * BLOCK_SIZE, w.clone(), false)
        .await
        .unwrap();
    s.begin_resync(&fresh, 7).await.unwrap();
    s.resync_write(&fresh, 0, blocks(60, 0, 256)).await.unwrap();
    let now = s.read(&fresh, 0, EXT).await.unwrap();
    assert_eq!(&now[4 * BS..6 * BS], &w[..]);
    assert_eq!(block_of(&now, 3), block_of(&blocks(60, 0, 256), 3));

    // 2. A stale copy (epoch 2) that a normal write at the learner epoch
    //    fenced up to 4 before the copy started: the written block is
    //    kept, the stale rest is cleared (and then copied).
    let stale = ExtentId::new("vol-a", 2);
    s.create_extent(&stale, 2).await.unwrap();
    s.write(&stale, 2, 0, blocks(1, 0, 256), false)
        .await
        .unwrap();
    let w = blocks(77, 8, 1);
    s.write(&stale, 4, 8 * BLOCK_SIZE, w.clone(), false)
        .await
        .unwrap();
    s.begin_resync(&stale, 4).await.unwrap();
    let now = s.read(&stale, 0, EXT).await.unwrap();
    for b in 0..256u64 {
        if b == 8 {
            assert_eq!(block_of(&now, b), &w[..]);
        } else {
            assert!(block_of(&now, b).iter().all(|x| *x == 0), "block {b}");
        }
    }
    // Epoch moves during the resync do not forget what was written.
    s.set_epoch(&stale, 5).await.unwrap();
    s.resync_write(&stale, 0, blocks(90, 0, 256)).await.unwrap();
    assert_eq!(block_of(&s.read(&stale, 0, EXT).await.unwrap(), 8), &w[..]);
}

#[tokio::test]
async fn begin_refuses_what_it_cannot_judge() {
    let (d, s) = setup();
    let id = ExtentId::new("vol-a", 0);
    s.create_extent(&id, 9).await.unwrap();
    // The local copy is past the learner epoch: the task is outdated.
    assert!(matches!(
        s.begin_resync(&id, 8).await,
        Err(StoreError::StaleEpoch { have: 9, got: 8 })
    ));
    assert!(!s.resyncing(&id).unwrap());
    // After a restart the history of a copy at the learner epoch is
    // unknown: refused rather than guessing which blocks are new.
    drop(s);
    let s = reopen(d.path());
    assert!(matches!(
        s.begin_resync(&id, 9).await,
        Err(StoreError::ResyncConflict { .. })
    ));
    // A newer epoch is fine: the old copy is discarded.
    s.begin_resync(&id, 10).await.unwrap();
    assert_eq!(s.extent_epoch(&id).unwrap(), 10);
    assert!(s.resyncing(&id).unwrap());
    // Not resyncing an unknown extent.
    assert!(matches!(
        s.end_resync(&ExtentId::new("vol-b", 0)).await,
        Err(StoreError::NotFound(_))
    ));
}

/// The race: copy pieces read "before" concurrent normal writes are
/// applied after them; the normal writes must win every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_data_older_than_a_concurrent_write_always_loses() {
    let (_d, s) = setup();
    let id = ExtentId::new("vol-a", 0);
    s.begin_resync(&id, 1).await.unwrap();
    let s = Arc::new(s);
    let old = blocks(11, 0, 256);
    // Writer: every block gets new data at some point, in random order,
    // interleaved with the copier.
    let writer = {
        let s = s.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut order: Vec<u64> = (0..256).collect();
            // Deterministic shuffle.
            for i in 0..order.len() {
                let j = (i * 7919 + 13) % order.len();
                order.swap(i, j);
            }
            for b in order {
                s.write(&id, 1, b * BLOCK_SIZE, blocks(222, b, 1), false)
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    // Copier: repeatedly applies the old data (read "before" the writes),
    // in 16-block pieces, until the writer is done.
    let copier = {
        let s = s.clone();
        let id = id.clone();
        let old = old.clone();
        tokio::spawn(async move {
            let mut rounds = 0;
            while rounds < 200 {
                for p in 0..16u64 {
                    let at = (p * 16) as usize * BS;
                    s.resync_write(&id, p * 16 * BLOCK_SIZE, old.slice(at..at + 16 * BS))
                        .await
                        .unwrap();
                }
                rounds += 1;
                tokio::task::yield_now().await;
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("writer finished")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), copier)
        .await
        .expect("copier finished")
        .unwrap();
    // One more copy pass after everything: still nothing overwritten.
    s.resync_write(&id, 0, old.clone()).await.unwrap();
    let now = s.read(&id, 0, EXT).await.unwrap();
    for b in 0..256u64 {
        assert_eq!(block_of(&now, b), &blocks(222, b, 1)[..], "block {b}");
    }
    s.end_resync(&id).await.unwrap();
}

#[tokio::test]
async fn touched_blocks_are_remembered_only_for_the_tracking_window() {
    let d = tempfile::tempdir().unwrap();
    identity::init(d.path(), "test-cluster", "1", false).unwrap();
    let s = ExtentStore::open(
        d.path(),
        StoreConfig {
            resync_track_window: Duration::from_millis(50),
            ..cfg()
        },
    )
    .unwrap();
    let (a, b) = (ExtentId::new("vol-a", 0), ExtentId::new("vol-a", 1));
    for id in [&a, &b] {
        s.create_extent(id, 3).await.unwrap();
        s.write(id, 3, 0, blocks(5, 0, 4), false).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    // A write after the window stops the tracking for good at this epoch.
    s.write(&a, 3, 8 * BLOCK_SIZE, blocks(6, 8, 1), false)
        .await
        .unwrap();
    for id in [&a, &b] {
        assert!(
            matches!(
                s.begin_resync(id, 3).await,
                Err(StoreError::ResyncConflict { .. })
            ),
            "{id}"
        );
    }
    // The next epoch starts a new window.
    s.write(&a, 4, 0, blocks(7, 0, 1), false).await.unwrap();
    s.begin_resync(&a, 4).await.unwrap();
    let now = s.read(&a, 0, 16 * BLOCK_SIZE).await.unwrap();
    assert_eq!(block_of(&now, 0), block_of(&blocks(7, 0, 1), 0));
    assert!(now[BS..].iter().all(|x| *x == 0));
    // While resyncing nothing expires.
    tokio::time::sleep(Duration::from_millis(120)).await;
    s.write(&a, 4, 2 * BLOCK_SIZE, blocks(8, 2, 1), false)
        .await
        .unwrap();
    s.resync_write(&a, 0, blocks(9, 0, 4)).await.unwrap();
    let now = s.read(&a, 0, 4 * BLOCK_SIZE).await.unwrap();
    assert_eq!(block_of(&now, 0), block_of(&blocks(7, 0, 1), 0));
    assert_eq!(block_of(&now, 1), block_of(&blocks(9, 0, 4), 1));
    assert_eq!(block_of(&now, 2), block_of(&blocks(8, 2, 1), 0));
    s.end_resync(&a).await.unwrap();
}

/// Writes at the learner epoch reached an old local copy before the copy
/// started, so `begin_resync` keeps them and clears the rest of the old
/// copy in place. That clear is made slow (3 s for the whole extent, as
/// freeing a large fragmented file on a busy disk can be); writes of the
/// extent meanwhile must each finish promptly, and end up kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clearing_an_old_copy_in_place_does_not_stall_writes() {
    const BIG: u64 = 16 << 20; // 4096 blocks
    let d = tempfile::tempdir().unwrap();
    identity::init(d.path(), "test-cluster", "1", false).unwrap();
    let s = ExtentStore::open(
        d.path(),
        StoreConfig {
            extent_size: BIG,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    let id = ExtentId::new("vol-big", 0);
    s.create_extent(&id, 1).await.unwrap();
    s.write(&id, 1, 0, Bytes::from(vec![0x5au8; BIG as usize]), true)
        .await
        .unwrap();
    // A write at the learner epoch 2 gets here before the copy starts.
    s.write(&id, 2, 5 * BLOCK_SIZE, blocks(1, 5, 1), false)
        .await
        .unwrap();
    let slow = Duration::from_secs(3);
    s.set_delete_delay(slow);
    let begin = {
        let s = s.clone();
        let id = id.clone();
        tokio::spawn(async move { s.begin_resync(&id, 2).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut worst = Duration::ZERO;
    let mut written = Vec::new();
    for b in [4000u64, 3000, 2000, 1000, 7] {
        let t = std::time::Instant::now();
        s.write(&id, 2, b * BLOCK_SIZE, blocks(2, b, 1), false)
            .await
            .unwrap();
        worst = worst.max(t.elapsed());
        written.push(b);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("slowest write during the in-place clear: {worst:?} (clear made to take {slow:?})");
    assert!(
        worst < Duration::from_secs(1),
        "a write during the learner's setup took {worst:?}"
    );
    assert!(
        !begin.is_finished(),
        "the clear was not slow: the test proves nothing"
    );
    tokio::time::timeout(Duration::from_secs(20), begin)
        .await
        .expect("begin_resync finishes")
        .unwrap()
        .unwrap();
    assert!(s.resyncing(&id).unwrap());
    let all = s.read(&id, 0, BIG).await.unwrap();
    for b in 0..BIG / BLOCK_SIZE {
        let got = block_of(&all, b);
        if b == 5 {
            assert_eq!(got, &blocks(1, 5, 1)[..], "block {b}");
        } else if written.contains(&b) {
            assert_eq!(got, &blocks(2, b, 1)[..], "block {b}");
        } else {
            assert!(got.iter().all(|x| *x == 0), "block {b} not cleared");
        }
    }
}
