//! Engine tests over [`MemDevice`].

use std::sync::Arc;

use bytes::Bytes;

use super::mem_device::InjectedError;
use super::*;

const BS: u32 = 512;
const BLOCKS: u64 = 1024;

fn nexus(name: &str) -> Arc<Nexus> {
    Arc::new(Nexus {
        initiator_name: Arc::from(name),
        isid: [0x80, 0, 0, 0, 0, 1],
        target_name: Arc::from("iqn.2024-01.io.ironblock:t1"),
        tpgt: 1,
    })
}

struct Env {
    dev: Arc<MemDevice>,
    lu: Arc<LogicalUnit>,
    table: LunTable,
    n: Arc<Nexus>,
}

fn env_with(dev: MemDevice) -> Env {
    let dev = Arc::new(dev);
    let lu = Arc::new(LogicalUnit::new(dev.clone(), LuConfig::default()));
    let mut table = LunTable::new();
    table.insert(0, lu.clone());
    Env {
        dev,
        lu,
        table,
        n: nexus("iqn.test:a"),
    }
}

fn env() -> Env {
    env_with(MemDevice::new(BS, BLOCKS))
}

fn cmd(n: &Arc<Nexus>, lun: u64, cdb: &[u8], data: &[u8]) -> ScsiCommand {
    let mut c = cdb.to_vec();
    if c.len() < 16 {
        c.resize(16, 0);
    }
    ScsiCommand {
        cdb: Bytes::from(c),
        lun,
        nexus: n.clone(),
        attr: TaskAttr::Simple,
        expected_data_in: 65536,
        data_out: Bytes::copy_from_slice(data),
        write_protected: false,
    }
}

impl Env {
    async fn run(&self, cdb: &[u8], data: &[u8]) -> ScsiResult {
        self.run_as(&self.n, 0, cdb, data).await
    }
    async fn run_as(&self, n: &Arc<Nexus>, lun: u64, cdb: &[u8], data: &[u8]) -> ScsiResult {
        self.table.execute(&cmd(n, lun, cdb, data), &|_| true).await
    }
    async fn ok(&self, cdb: &[u8], data: &[u8]) -> Bytes {
        let r = self.run(cdb, data).await;
        assert_eq!(
            r.status,
            status::GOOD,
            "cdb {cdb:02x?} sense {:02x?}",
            r.sense
        );
        r.data_in
    }
}

/// (key, asc, ascq) of a CHECK CONDITION.
fn sense_of(r: &ScsiResult) -> (u8, u8, u8) {
    assert_eq!(
        r.status,
        status::CHECK_CONDITION,
        "expected CHECK CONDITION"
    );
    let s = r.sense.as_ref().expect("sense");
    (s[2] & 0xf, s[12], s[13])
}

fn info_of(r: &ScsiResult) -> u32 {
    let s = r.sense.as_ref().expect("sense");
    assert!(s[0] & 0x80 != 0, "VALID bit");
    u32::from_be_bytes([s[3], s[4], s[5], s[6]])
}

const INVALID_CDB: (u8, u8, u8) = (5, 0x24, 0);
const OOR: (u8, u8, u8) = (5, 0x21, 0);

fn read10(lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}
fn write10(lba: u32, n: u16) -> Vec<u8> {
    let mut c = read10(lba, n);
    c[0] = 0x2a;
    c
}
fn rw16(op: u8, lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}
fn rw12(op: u8, lba: u32, n: u32) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn pattern(blocks: usize, v: u8) -> Vec<u8> {
    vec![v; blocks * BS as usize]
}

#[tokio::test]
async fn ua_lifecycle() {
    let e = env();
    e.lu.nexus_added(&e.n);
    // INQUIRY, REPORT LUNS don't consume it.
    e.ok(&[0x12, 0, 0, 0, 36, 0], &[]).await;
    e.ok(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await;
    let r = e.run(&[0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(sense_of(&r), (6, 0x29, 0));
    e.ok(&[0, 0, 0, 0, 0, 0], &[]).await;

    // LU reset: 29/03 for every other nexus; the issuer gets no UA (its
    // TMF response already told it).
    let other = nexus("iqn.test:b");
    e.lu.nexus_added(&other);
    let r = e.run_as(&other, 0, &[0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(sense_of(&r), (6, 0x29, 0), "power-on UA of the new nexus");
    e.lu.lun_reset(&e.n);
    let r = e.run(&[0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(r.status, status::GOOD, "issuer sees no reset UA");
    // REQUEST SENSE returns (and clears) the pending UA.
    let d = e
        .table
        .execute(&cmd(&other, 0, &[0x03, 0, 0, 0, 252, 0], &[]), &|_| true)
        .await;
    assert_eq!(d.status, status::GOOD);
    assert_eq!((d.data_in[2], d.data_in[12], d.data_in[13]), (6, 0x29, 3));
    let r = e.run_as(&other, 0, &[0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(r.status, status::GOOD);
    // No UA left: NO SENSE; DESC bit gives descriptor format.
    let d = e.ok(&[0x03, 1, 0, 0, 252, 0], &[]).await;
    assert_eq!(&d[..4], &[0x72, 0, 0, 0]);

    // Target reset.
    e.lu.target_reset(&e.n);
    let r = e.run(&[0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(sense_of(&r).0, 6);
    // Removed nexus: re-registered lazily without a UA.
    e.lu.nexus_removed(&other);
    let r = e.run_as(&other, 0, &[0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(r.status, status::GOOD);
}

#[tokio::test]
async fn capacity_change_ua() {
    let e = env();
    e.ok(&[0, 0, 0, 0, 0, 0], &[]).await;
    let other = nexus("iqn.test:b");
    e.run_as(&other, 0, &[0, 0, 0, 0, 0, 0], &[]).await;
    e.dev.resize(BLOCKS * 2);
    let r = e.run(&[0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(sense_of(&r), (6, 0x2a, 9));
    let r = e
        .run_as(&other, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
        .await;
    assert_eq!(sense_of(&r), (6, 0x2a, 9));
    let d = e.ok(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(
        u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64,
        BLOCKS * 2 - 1
    );
}

#[tokio::test]
async fn standard_inquiry() {
    let e = env();
    let d = e.ok(&[0x12, 0, 0, 0, 255, 0], &[]).await;
    assert_eq!(d.len(), 96);
    assert_eq!(d[0], 0);
    assert_eq!(d[2], 6);
    assert_eq!(d[3], 0x12);
    assert_eq!(d[4] as usize + 5, d.len());
    assert_eq!(d[7] & 2, 2);
    assert_eq!(&d[8..16], b"IRONBLK ");
    assert_eq!(&d[16..25], b"ironblock");
    assert_eq!(&d[32..36], b"0001");
    assert!(d[58..74].chunks(2).any(|v| v == [0x04, 0x60]));
    assert!(d[58..74].chunks(2).any(|v| v == [0x04, 0xc0]));
    // allocation length truncation
    assert_eq!(e.ok(&[0x12, 0, 0, 0, 5, 0], &[]).await.len(), 5);
    assert_eq!(e.ok(&[0x12, 0, 0, 0, 0, 0], &[]).await.len(), 0);
    // EVPD=0 with a page code, CMDDT
    assert_eq!(
        sense_of(&e.run(&[0x12, 0, 0x80, 0, 255, 0], &[]).await),
        INVALID_CDB
    );
    assert_eq!(
        sense_of(&e.run(&[0x12, 2, 0, 0, 255, 0], &[]).await),
        INVALID_CDB
    );
    assert_eq!(
        sense_of(&e.run(&[0x12, 1, 0x42, 0, 255, 0], &[]).await),
        INVALID_CDB
    );
}

#[tokio::test]
async fn vpd_pages() {
    let e = env();
    let d = e.ok(&[0x12, 1, 0, 0, 255, 0], &[]).await;
    assert_eq!(&d[..], &[0, 0, 0, 6, 0, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    for p in &d[4..] {
        let v = e.ok(&[0x12, 1, *p, 0, 255, 0], &[]).await;
        assert_eq!(v[1], *p);
        assert_eq!(
            u16::from_be_bytes([v[2], v[3]]) as usize + 4,
            v.len(),
            "page {p:x}"
        );
    }
    let d = e.ok(&[0x12, 1, 0x80, 0, 255, 0], &[]).await;
    assert_eq!(&d[4..], b"MEM0001");

    let d = e.ok(&[0x12, 1, 0x83, 0, 255, 0], &[]).await;
    let id = e.dev.identity();
    assert_eq!(&d[4..8], &[0x01, 0x03, 0, 16]);
    assert_eq!(&d[8..24], &id.naa);
    assert_eq!(d[8] >> 4, 6);
    // walk designators
    let mut o = 4;
    let mut types = vec![];
    while o + 4 <= d.len() {
        types.push((d[o + 1] & 0x30, d[o + 1] & 0x0f));
        o += 4 + d[o + 3] as usize;
    }
    assert_eq!(o, d.len());
    assert!(types.contains(&(0x00, 1)), "T10 vendor id");
    assert!(types.contains(&(0x10, 8)), "target port name");
    assert!(types.contains(&(0x10, 4)), "relative target port");
    let s = String::from_utf8_lossy(&d);
    assert!(s.contains("iqn.2024-01.io.ironblock:t1,t,0x0001"));

    let d = e.ok(&[0x12, 1, 0xb0, 0, 255, 0], &[]).await;
    assert_eq!(d[3], 0x3c);
    assert_eq!(d[5] as u64, engine::MAX_COMPARE_AND_WRITE);
    let max_unmap = u32::from_be_bytes([d[20], d[21], d[22], d[23]]);
    assert!(max_unmap > 0 && max_unmap <= 1024 * 1024);
    assert!(u32::from_be_bytes([d[24], d[25], d[26], d[27]]) > 0);

    let d = e.ok(&[0x12, 1, 0xb1, 0, 255, 0], &[]).await;
    assert_eq!(u16::from_be_bytes([d[4], d[5]]), 1);
    let d = e.ok(&[0x12, 1, 0xb2, 0, 255, 0], &[]).await;
    assert_eq!(d[5] & 0xe4, 0xe4);
    assert_eq!(d[6] & 7, 2);

    // thick device: no LBP, no unmap limits
    let t = env_with(MemDevice::new(BS, BLOCKS).with_thin(false));
    let d = t.ok(&[0x12, 1, 0xb2, 0, 255, 0], &[]).await;
    assert_eq!(d[5], 0);
    let d = t.ok(&[0x12, 1, 0xb0, 0, 255, 0], &[]).await;
    assert_eq!(&d[20..28], &[0; 8]);
    let r = t.run(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24]).await;
    assert_eq!(sense_of(&r), (5, 0x20, 0));
    // WRITE SAME with UNMAP on a thick device is refused; without it writes
    let r = t.run(&ws(0x41, 0x08, 0, 1), &pattern(1, 1)).await;
    assert_eq!(sense_of(&r), INVALID_CDB);
    t.ok(&ws(0x41, 0, 0, 1), &pattern(1, 1)).await;
    // RC16 without LBPME/LBPRZ
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    assert_eq!(t.ok(&c, &[]).await[14], 0);
}

#[tokio::test]
async fn report_luns_and_masking() {
    let mut e = env();
    let dev2 = Arc::new(MemDevice::new(BS, 16));
    e.table.insert(
        300,
        Arc::new(LogicalUnit::new(dev2.clone(), LuConfig::default())),
    );
    e.table
        .insert(5, Arc::new(LogicalUnit::new(dev2, LuConfig::default())));
    let vis = |l: u64| l != 5;
    let r = e
        .table
        .execute(
            &cmd(&e.n, 0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]),
            &vis,
        )
        .await;
    let d = r.data_in;
    assert_eq!(&d[..4], &[0, 0, 0, 16]);
    assert_eq!(&d[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&d[16..24], &[0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
    // select report 1: well-known only
    let r = e
        .table
        .execute(
            &cmd(&e.n, 0, &[0xa0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]),
            &vis,
        )
        .await;
    assert_eq!(&r.data_in[..], &[0; 8]);
    let r = e
        .table
        .execute(
            &cmd(&e.n, 0, &[0xa0, 0, 7, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]),
            &vis,
        )
        .await;
    assert_eq!(sense_of(&r), INVALID_CDB);
    // truncation
    let r = e
        .table
        .execute(
            &cmd(&e.n, 0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0], &[]),
            &vis,
        )
        .await;
    assert_eq!(r.data_in.len(), 12);
    // masked LUN 5 behaves as absent; REPORT LUNS works through it
    let r = e
        .table
        .execute(&cmd(&e.n, 5, &[0, 0, 0, 0, 0, 0], &[]), &vis)
        .await;
    assert_eq!(sense_of(&r), (5, 0x25, 0));
    let r = e
        .table
        .execute(&cmd(&e.n, 5, &[0x12, 0, 0, 0, 96, 0], &[]), &vis)
        .await;
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data_in[0], 0x7f);
    let r = e
        .table
        .execute(&cmd(&e.n, 5, &[0x03, 0, 0, 0, 18, 0], &[]), &vis)
        .await;
    assert_eq!(r.status, status::GOOD);
    assert_eq!((r.data_in[12], r.data_in[13]), (0x25, 0));
    let r = e
        .table
        .execute(
            &cmd(&e.n, 5, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]),
            &vis,
        )
        .await;
    assert_eq!(r.status, status::GOOD);
    // absent LUN 9
    let r = e.run_as(&e.n, 9, &read10(0, 1), &[]).await;
    assert_eq!(sense_of(&r), (5, 0x25, 0));
}

#[tokio::test]
async fn read_capacity() {
    let e = env();
    let d = e.ok(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&d[..], &[0, 0, 3, 0xff, 0, 0, 2, 0]);
    let r = e.run(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[]).await;
    assert_eq!(sense_of(&r), INVALID_CDB);
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    let d = e.ok(&c, &[]).await;
    assert_eq!(d.len(), 32);
    assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(&d[8..12], &[0, 0, 2, 0]);
    assert_eq!(d[14] & 0xc0, 0xc0, "LBPME, LBPRZ");
    assert_eq!(d[13] & 0x0f, 0);
    c[13] = 12;
    assert_eq!(e.ok(&c, &[]).await.len(), 12);
    // big device: RC10 says 0xFFFFFFFF
    let big = env_with(MemDevice::new(BS, 1 << 33));
    let d = big.ok(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&d[..4], &[0xff; 4]);
    // unknown 0x9E service action
    c[1] = 0x11;
    assert_eq!(sense_of(&e.run(&c, &[]).await), INVALID_CDB);
}

#[tokio::test]
async fn read_write_all_sizes() {
    let e = env();
    // WRITE(6)/READ(6)
    let d = pattern(2, 0x11);
    e.ok(&[0x0a, 0, 0, 4, 2, 0], &d).await;
    assert_eq!(&e.ok(&[0x08, 0, 0, 4, 2, 0], &[]).await[..], &d[..]);
    // READ(6) 0 means 256 blocks
    assert_eq!(e.ok(&[0x08, 0, 0, 0, 0, 0], &[]).await.len(), 256 * 512);
    let r = e.run(&[0x08, 0, 0x03, 0xff, 2, 0], &[]).await;
    assert_eq!(sense_of(&r), OOR);
    // 10
    let d = pattern(3, 0x22);
    e.ok(&write10(10, 3), &d).await;
    assert_eq!(&e.ok(&read10(10, 3), &[]).await[..], &d[..]);
    // 12
    let d = pattern(2, 0x33);
    e.ok(&rw12(0xaa, 20, 2), &d).await;
    assert_eq!(&e.ok(&rw12(0xa8, 20, 2), &[]).await[..], &d[..]);
    // 16
    let d = pattern(1, 0x44);
    e.ok(&rw16(0x8a, BLOCKS - 1, 1), &d).await;
    assert_eq!(&e.ok(&rw16(0x88, BLOCKS - 1, 1), &[]).await[..], &d[..]);
    // zero length: GOOD, no data
    assert!(e.ok(&read10(0, 0), &[]).await.is_empty());
    e.ok(&write10(0, 0), &[]).await;
    e.ok(&rw16(0x88, BLOCKS, 0), &[]).await;
    // beyond end of LUN, LBA overflow
    for c in [
        read10(BLOCKS as u32, 1),
        read10(BLOCKS as u32 - 1, 2),
        read10(BLOCKS as u32 + 1, 0),
        read10(u32::MAX, 1),
        rw16(0x88, u64::MAX, 2),
        rw16(0x8a, u64::MAX, 1),
        rw12(0xa8, 0x8000_0000, 1),
        write10(BLOCKS as u32, 1),
    ] {
        let r = e.run(&c, &pattern(1, 0)).await;
        assert_eq!(sense_of(&r), OOR, "{c:02x?}");
    }
    // RDPROTECT / WRPROTECT
    for op in [0x28u8, 0x2a, 0xa8, 0xaa, 0x88, 0x8a] {
        let mut c = if op >> 5 == 1 {
            read10(0, 1)
        } else if op >> 5 == 5 {
            rw12(op, 0, 1)
        } else {
            rw16(op, 0, 1)
        };
        c[0] = op;
        c[1] = 0x20;
        assert_eq!(sense_of(&e.run(&c, &pattern(1, 0)).await), INVALID_CDB);
        // DPO/FUA accepted
        c[1] = 0x18;
        e.ok(&c, &pattern(1, 0)).await;
    }
    // FUA reaches the device
    let before = e.dev.fua_count();
    let mut c = write10(0, 1);
    c[1] = 0x08;
    e.ok(&c, &pattern(1, 0)).await;
    assert_eq!(e.dev.fua_count(), before + 1);
    // too long a transfer
    let big = env_with(MemDevice::new(BS, 1 << 20));
    let r = big.run(&rw16(0x88, 0, 1 << 16), &[]).await;
    assert_eq!(sense_of(&r), INVALID_CDB);
}

#[tokio::test]
async fn write_residual_policy() {
    let e = env();
    e.ok(&write10(0, 2), &pattern(2, b'a')).await;
    // EDTL 0: nothing written, GOOD
    e.ok(&write10(0, 1), &[]).await;
    // more data than the CDB: only the CDB's blocks
    e.ok(&write10(0, 1), &pattern(2, b'b')).await;
    let d = e.ok(&read10(0, 2), &[]).await;
    assert!(d[..512].iter().all(|b| *b == b'b'));
    assert!(d[512..].iter().all(|b| *b == b'a'));
    // fewer whole blocks than the CDB: those are written
    e.ok(&write10(0, 2), &pattern(2, b'a')).await;
    e.ok(&write10(0, 2), &pattern(1, b'c')).await;
    let d = e.ok(&read10(0, 2), &[]).await;
    assert!(d[..512].iter().all(|b| *b == b'c'));
    assert!(d[512..].iter().all(|b| *b == b'a'));
    // a partial block: 0E/03, nothing written
    let r = e.run(&write10(0, 1), &[b'z'; 200]).await;
    assert_eq!(sense_of(&r), (5, 0x0e, 3));
    assert_eq!(e.ok(&read10(0, 1), &[]).await[0], b'c');
    // expected_data_out helper
    assert_eq!(e.lu.expected_data_out(&write10(0, 2)), Some(1024));
    assert_eq!(
        e.lu.expected_data_out(&[0x0a, 0, 0, 0, 0, 0]),
        Some(256 * 512)
    );
    assert_eq!(
        e.lu.expected_data_out(&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
        Some(2048)
    );
    assert_eq!(e.lu.expected_data_out(&read10(0, 2)), Some(0));
    assert_eq!(e.lu.expected_data_out(&[0xc0]), None);
}

#[tokio::test]
async fn write_and_verify_and_verify() {
    let e = env();
    let d = pattern(2, 7);
    for op in [0x2eu8, 0xae, 0x8e] {
        let mut c = match op {
            0x2e => write10(4, 2),
            0xae => rw12(op, 4, 2),
            _ => rw16(op, 4, 2),
        };
        c[0] = op;
        e.ok(&c, &d).await;
        c[1] = 0x02; // BYTCHK 1
        e.ok(&c, &d).await;
        c[1] = 0x04; // BYTCHK 2: invalid
        assert_eq!(sense_of(&e.run(&c, &d).await), INVALID_CDB);
        c[1] = 0x20;
        assert_eq!(sense_of(&e.run(&c, &d).await), INVALID_CDB);
    }
    for op in [0x2fu8, 0xaf, 0x8f] {
        let mk = |lba: u64, n: u32| {
            let mut c = match op {
                0x2f => read10(lba as u32, n as u16),
                0xaf => rw12(op, lba as u32, n),
                _ => rw16(op, lba, n),
            };
            c[0] = op;
            c
        };
        let mut c = mk(4, 2);
        e.ok(&c, &[]).await; // BYTCHK 0: medium verify
        c[1] = 0x02;
        e.ok(&c, &d).await;
        let mut bad = d.clone();
        bad[700] = 9;
        let r = e.run(&c, &bad).await;
        assert_eq!(sense_of(&r), (0xe, 0x1d, 0));
        assert_eq!(info_of(&r), 700);
        c[1] = 0x06; // BYTCHK 3: one block compared to each
        e.ok(&c, &d[..512]).await;
        let r = e.run(&c, &bad[512..1024]).await;
        assert_eq!(info_of(&r), 188);
        c[1] = 0x04;
        assert_eq!(sense_of(&e.run(&c, &d).await), INVALID_CDB);
        c[1] = 0x20;
        assert_eq!(sense_of(&e.run(&c, &[]).await), INVALID_CDB);
        // beyond end, zero blocks
        assert_eq!(sense_of(&e.run(&mk(BLOCKS, 1), &[]).await), OOR);
        e.ok(&mk(0, 0), &[]).await;
        // wrong data size with BYTCHK 1
        let mut c = mk(4, 2);
        c[1] = 0x02;
        assert_eq!(sense_of(&e.run(&c, &d[..512]).await), (5, 0x0e, 3));
    }
}

#[tokio::test]
async fn compare_and_write() {
    let e = env();
    e.ok(&write10(8, 1), &pattern(1, 1)).await;
    let caw = |lba: u64, n: u8| {
        let mut c = vec![0x89, 0];
        c.extend_from_slice(&lba.to_be_bytes());
        c.extend_from_slice(&[0, 0, 0, n, 0, 0]);
        c
    };
    let mut data = pattern(1, 1);
    data.extend(pattern(1, 2));
    e.ok(&caw(8, 1), &data).await;
    assert_eq!(e.ok(&read10(8, 1), &[]).await[0], 2);
    // miscompare: offset of first differing byte
    let mut data = pattern(1, 2);
    data[37] = 0;
    data.extend(pattern(1, 3));
    let r = e.run(&caw(8, 1), &data).await;
    assert_eq!(sense_of(&r), (0xe, 0x1d, 0));
    assert_eq!(info_of(&r), 37);
    assert_eq!(e.ok(&read10(8, 1), &[]).await[0], 2);
    // wrong Data-Out sizes
    assert_eq!(sense_of(&e.run(&caw(8, 1), &pattern(4, 2)).await).0, 5);
    assert_eq!(sense_of(&e.run(&caw(8, 3), &pattern(4, 2)).await).0, 5);
    // limits, range, zero blocks, WRPROTECT
    let n = engine::MAX_COMPARE_AND_WRITE as u8 + 1;
    assert_eq!(sense_of(&e.run(&caw(0, n), &[]).await), INVALID_CDB);
    assert_eq!(sense_of(&e.run(&caw(BLOCKS, 1), &pattern(2, 0)).await), OOR);
    e.ok(&caw(0, 0), &[]).await;
    // 0 blocks but Data-Out present (libiscsi sends TL 256 wrapped to 0)
    assert_eq!(
        sense_of(&e.run(&caw(0, 0), &pattern(2, 0)).await),
        INVALID_CDB
    );
    let mut c = caw(8, 1);
    c[1] = 0x20;
    assert_eq!(sense_of(&e.run(&c, &pattern(2, 2)).await), INVALID_CDB);
}

#[tokio::test]
async fn concurrent_compare_and_write_is_atomic() {
    let e = env();
    e.ok(&write10(0, 1), &pattern(1, 0)).await;
    // 8 initiators race to swap 0 -> i; exactly one wins.
    let mut handles = vec![];
    for i in 1..=8u8 {
        let table = e.table.clone();
        let n = nexus(&format!("iqn.test:{i}"));
        handles.push(tokio::spawn(async move {
            let mut c = vec![0x89, 0];
            c.extend_from_slice(&0u64.to_be_bytes());
            c.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
            let mut data = pattern(1, 0);
            data.extend(pattern(1, i));
            table
                .execute(&cmd(&n, 0, &c, &data), &|_| true)
                .await
                .status
        }));
    }
    let mut wins = 0;
    for h in handles {
        if h.await.unwrap() == status::GOOD {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
}

fn ws(op: u8, flags: u8, lba: u64, n: u32) -> Vec<u8> {
    if op == 0x41 {
        let mut c = vec![0x41, flags];
        c.extend_from_slice(&(lba as u32).to_be_bytes());
        c.push(0);
        c.extend_from_slice(&(n as u16).to_be_bytes());
        c.push(0);
        c
    } else {
        let mut c = rw16(0x93, lba, n);
        c[1] = flags;
        c
    }
}

#[tokio::test]
async fn write_same_unmap_and_lba_status() {
    let e = env();
    for op in [0x41u8, 0x93] {
        e.ok(&ws(op, 0, 100, 20), &pattern(1, 0x5a)).await;
        let d = e.ok(&read10(100, 20), &[]).await;
        assert!(d.iter().all(|b| *b == 0x5a));
        assert_eq!(e.dev.mapped_blocks(), 20);
        // UNMAP bit deallocates
        e.ok(&ws(op, 0x08, 100, 20), &pattern(1, 0xff)).await;
        assert_eq!(e.dev.mapped_blocks(), 0);
        assert!(e.ok(&read10(100, 20), &[]).await.iter().all(|b| *b == 0));
        // 0 blocks (WSNZ), past end, anchor, wrprotect, data size
        assert_eq!(
            sense_of(&e.run(&ws(op, 0, 0, 0), &pattern(1, 0)).await),
            INVALID_CDB
        );
        assert_eq!(
            sense_of(&e.run(&ws(op, 0, BLOCKS + 1, 0), &pattern(1, 0)).await),
            OOR
        );
        assert_eq!(
            sense_of(&e.run(&ws(op, 0, BLOCKS - 1, 2), &pattern(1, 0)).await),
            OOR
        );
        assert_eq!(
            sense_of(&e.run(&ws(op, 0x10, 0, 1), &pattern(1, 0)).await),
            INVALID_CDB
        );
        assert_eq!(
            sense_of(&e.run(&ws(op, 0x20, 0, 1), &pattern(1, 0)).await),
            INVALID_CDB
        );
        assert_eq!(sense_of(&e.run(&ws(op, 0x08, 0, 1), &[0; 256]).await).0, 5);
        assert_eq!(
            sense_of(&e.run(&ws(op, 0x08, 0, 1), &pattern(2, 0)).await).0,
            5
        );
        // whole chunks: more than one device write
        e.ok(&ws(op, 0, 0, BLOCKS as u32), &pattern(1, 1)).await;
        assert_eq!(e.dev.mapped_blocks(), BLOCKS as usize);
        e.ok(&ws(op, 0x08, 0, BLOCKS as u32), &pattern(1, 1)).await;
    }
    // longer than MAXIMUM WRITE SAME LENGTH
    let big = env_with(MemDevice::new(BS, 1 << 17));
    let n = engine::MAX_WRITE_SAME as u32 + 1;
    let r = big.run(&ws(0x93, 0x08, 0, n), &pattern(1, 0)).await;
    assert_eq!(sense_of(&r), INVALID_CDB);
    big.ok(&ws(0x93, 0x08, 0, n - 1), &pattern(1, 0)).await;
    // NDOB: no data, zeros / unmap
    e.ok(&write10(3, 1), &pattern(1, 9)).await;
    e.ok(&ws(0x93, 0x01, 3, 1), &[]).await;
    assert!(e.ok(&read10(3, 1), &[]).await.iter().all(|b| *b == 0));

    // UNMAP command
    e.ok(&write10(0, 10), &pattern(10, 3)).await;
    let mut p = vec![0, 22, 0, 16, 0, 0, 0, 0];
    p.extend_from_slice(&2u64.to_be_bytes());
    p.extend_from_slice(&4u32.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    e.ok(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p).await;
    assert_eq!(e.dev.mapped_blocks(), 6);

    // GET LBA STATUS
    let gls = |lba: u64, alloc: u32| {
        let mut c = vec![0x9e, 0x12];
        c.extend_from_slice(&lba.to_be_bytes());
        c.extend_from_slice(&alloc.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    };
    let d = e.ok(&gls(0, 1000), &[]).await;
    assert_eq!(
        u32::from_be_bytes(d[..4].try_into().unwrap()) as usize,
        d.len() - 4
    );
    let descs: Vec<(u64, u32, u8)> = d[8..]
        .chunks(16)
        .map(|x| {
            (
                u64::from_be_bytes(x[..8].try_into().unwrap()),
                u32::from_be_bytes(x[8..12].try_into().unwrap()),
                x[12],
            )
        })
        .collect();
    assert_eq!(
        descs,
        vec![(0, 2, 0), (2, 4, 1), (6, 4, 0), (10, BLOCKS as u32 - 10, 1)]
    );
    let d = e.ok(&gls(3, 24), &[]).await;
    assert_eq!(d.len(), 24);
    assert_eq!(&d[8..20], &[0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 3]);
    assert_eq!(d[20], 1);
    assert_eq!(sense_of(&e.run(&gls(BLOCKS, 24), &[]).await), OOR);
    assert_eq!(sense_of(&e.run(&gls(u64::MAX, 24), &[]).await), OOR);
}

#[tokio::test]
async fn unmap_validation() {
    let e = env();
    let desc = |lba: u64, n: u32| {
        let mut d = lba.to_be_bytes().to_vec();
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        d
    };
    let list = |ds: &[Vec<u8>]| {
        let bd: usize = ds.len() * 16;
        let mut p = ((bd + 6) as u16).to_be_bytes().to_vec();
        p.extend_from_slice(&(bd as u16).to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        for d in ds {
            p.extend_from_slice(d);
        }
        p
    };
    let cdb = |len: u16| {
        let mut c = vec![0x42, 0, 0, 0, 0, 0, 0];
        c.extend_from_slice(&len.to_be_bytes());
        c.push(0);
        c
    };
    // zero length list, zero-block descriptor
    e.ok(&cdb(0), &[]).await;
    let p = list(&[desc(0, 0)]);
    e.ok(&cdb(p.len() as u16), &p).await;
    // short list
    assert_eq!(sense_of(&e.run(&cdb(4), &[0; 4]).await), (5, 0x1a, 0));
    // out of range
    let p = list(&[desc(BLOCKS - 1, 2)]);
    assert_eq!(sense_of(&e.run(&cdb(p.len() as u16), &p).await), OOR);
    // too many LBAs in a descriptor
    let p = list(&[desc(0, engine::MAX_UNMAP_LBA_COUNT as u32 + 1)]);
    assert_eq!(
        sense_of(&e.run(&cdb(p.len() as u16), &p).await),
        (5, 0x26, 0)
    );
    // too many descriptors
    let many: Vec<_> = (0..engine::MAX_UNMAP_DESCRIPTORS as u64 + 1)
        .map(|i| desc(i, 1))
        .collect();
    let p = list(&many);
    assert_eq!(
        sense_of(&e.run(&cdb(p.len() as u16), &p).await),
        (5, 0x26, 0)
    );
    // ANCHOR
    let mut c = cdb(0);
    c[1] = 1;
    assert_eq!(sense_of(&e.run(&c, &[]).await), INVALID_CDB);
}

#[tokio::test]
async fn sync_cache_prefetch() {
    let e = env();
    let n0 = e.dev.flush_count();
    e.ok(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    e.ok(&[0x35, 2, 0, 0, 0, 0, 0, 0, 8, 0], &[]).await;
    e.ok(&rw16(0x91, 0, 0), &[]).await;
    assert_eq!(e.dev.flush_count(), n0 + 3);
    assert_eq!(sense_of(&e.run(&rw16(0x91, BLOCKS, 1), &[]).await), OOR);
    e.ok(&[0x34, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[]).await;
    e.ok(&rw16(0x90, BLOCKS - 1, 1), &[]).await;
    assert_eq!(sense_of(&e.run(&rw16(0x90, BLOCKS, 1), &[]).await), OOR);
}

fn mode_sense6(pc: u8, page: u8, alloc: u8, dbd: bool) -> Vec<u8> {
    vec![0x1a, if dbd { 8 } else { 0 }, (pc << 6) | page, 0, alloc, 0]
}

#[tokio::test]
async fn mode_sense_pages() {
    let e = env();
    let d = e.ok(&mode_sense6(0, 0x3f, 255, false), &[]).await;
    assert_eq!(d[0] as usize + 1, d.len());
    assert_eq!(d[2] & 0x10, 0x10); // DPOFUA
    assert_eq!(d[3], 8);
    assert_eq!(&d[4..8], &(BLOCKS as u32).to_be_bytes());
    assert_eq!(&d[9..12], &[0, 2, 0]);
    // pages 08, 0a, 1c
    let mut o = 12;
    let mut codes = vec![];
    while o < d.len() {
        codes.push(d[o]);
        o += 2 + d[o + 1] as usize;
    }
    assert_eq!(codes, vec![0x08, 0x0a, 0x1c]);
    assert_eq!(d[12 + 2] & 0x04, 0x04, "WCE");
    // residuals: alloc 4
    assert_eq!(e.ok(&mode_sense6(0, 0x3f, 4, false), &[]).await.len(), 4);
    // changeable
    let d = e.ok(&mode_sense6(1, 0x0a, 255, true), &[]).await;
    assert_eq!(d[3], 0);
    assert_eq!(d[4], 0x0a);
    assert_eq!(d[8], 0x08, "SWP changeable");
    // saved -> 39/00; unknown page; subpage
    assert_eq!(
        sense_of(&e.run(&mode_sense6(3, 0x08, 255, true), &[]).await),
        (5, 0x39, 0)
    );
    assert_eq!(
        sense_of(&e.run(&mode_sense6(0, 0x19, 255, true), &[]).await),
        INVALID_CDB
    );
    let r = e.run(&[0x1a, 0, 0x08, 0x05, 255, 0], &[]).await;
    assert_eq!(sense_of(&r), INVALID_CDB);
    e.ok(&[0x1a, 0, 0x3f, 0xff, 255, 0], &[]).await;
    // MODE SENSE(10) with LLBAA
    let d = e.ok(&[0x5a, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0], &[]).await;
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize + 2, d.len());
    assert_eq!(d[4] & 1, 1);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
    assert_eq!(&d[8..16], &BLOCKS.to_be_bytes());
    assert_eq!(d[24], 0x08);
    // no write cache device: WCE 0, not changeable
    let nc = env_with(MemDevice::new(BS, BLOCKS).with_write_cache(false));
    let d = nc.ok(&mode_sense6(0, 0x08, 255, true), &[]).await;
    assert_eq!(d[6] & 4, 0);
    let d = nc.ok(&mode_sense6(1, 0x08, 255, true), &[]).await;
    assert_eq!(d[6] & 4, 0);
}

#[tokio::test]
async fn mode_select_swp_wce() {
    let e = env();
    let other = nexus("iqn.test:b");
    e.run_as(&other, 0, &[0, 0, 0, 0, 0, 0], &[]).await;
    // read the control page with DBD, set SWP, select it back (as libiscsi's set_swp)
    let d = e.ok(&mode_sense6(0, 0x0a, 255, true), &[]).await;
    let mut p = d.to_vec();
    p[0] = 0;
    p[4 + 4] |= 0x08;
    e.ok(&[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).await;
    let d = e.ok(&mode_sense6(0, 0x0a, 255, true), &[]).await;
    assert_eq!(d[8] & 0x08, 0x08);
    assert_eq!(d[2] & 0x80, 0x80, "WP in header");
    // writes are now refused, reads work
    assert_eq!(
        sense_of(&e.run(&write10(0, 1), &pattern(1, 0)).await),
        (7, 0x27, 0)
    );
    e.ok(&read10(0, 1), &[]).await;
    // the other nexus sees MODE PARAMETERS CHANGED
    let r = e.run_as(&other, 0, &[0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(sense_of(&r), (6, 0x2a, 1));
    // clear it
    p[8] &= !0x08;
    e.ok(&[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).await;
    e.ok(&write10(0, 1), &pattern(1, 0)).await;

    // WCE off via MODE SELECT(10) -> writes become FUA
    let d = e.ok(&[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0], &[]).await;
    let mut p = d.to_vec();
    p[0] = 0;
    p[1] = 0;
    p[8 + 2] &= !0x04;
    e.ok(&[0x55, 0x10, 0, 0, 0, 0, 0, 0, p.len() as u8, 0], &p)
        .await;
    let before = e.dev.fua_count();
    e.ok(&write10(0, 1), &pattern(1, 0)).await;
    assert_eq!(e.dev.fua_count(), before + 1);

    // changing a non-changeable field
    let d = e.ok(&mode_sense6(0, 0x0a, 255, true), &[]).await;
    let mut p = d.to_vec();
    p[0] = 0;
    p[4 + 2] |= 0x04; // D_SENSE
    let r = e.run(&[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).await;
    assert_eq!(sense_of(&r), (5, 0x26, 0));
    // wrong page length, unknown page
    let r = e
        .run(&[0x15, 0x10, 0, 0, 8, 0], &[0, 0, 0, 0, 0x0a, 2, 0, 0])
        .await;
    assert_eq!(sense_of(&r), (5, 0x26, 0));
    let r = e
        .run(&[0x15, 0x10, 0, 0, 8, 0], &[0, 0, 0, 0, 0x19, 2, 0, 0])
        .await;
    assert_eq!(sense_of(&r), (5, 0x26, 0));
    // SP, PF=0, short list, data shorter than the length
    assert_eq!(
        sense_of(&e.run(&[0x15, 0x11, 0, 0, 4, 0], &[0; 4]).await),
        INVALID_CDB
    );
    assert_eq!(
        sense_of(&e.run(&[0x15, 0x00, 0, 0, 4, 0], &[0; 4]).await),
        INVALID_CDB
    );
    assert_eq!(
        sense_of(&e.run(&[0x15, 0x10, 0, 0, 2, 0], &[0; 2]).await),
        (5, 0x1a, 0)
    );
    assert_eq!(
        sense_of(&e.run(&[0x15, 0x10, 0, 0, 20, 0], &[0; 4]).await),
        (5, 0x1a, 0)
    );
    // block descriptor with the right block length is fine, a wrong one is not
    let bd_ok = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 2, 0];
    e.ok(&[0x15, 0x10, 0, 0, 12, 0], &bd_ok).await;
    let bd_bad = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 16, 0];
    let r = e.run(&[0x15, 0x10, 0, 0, 12, 0], &bd_bad).await;
    assert_eq!(sense_of(&r), (5, 0x26, 0));
    e.ok(&[0x15, 0x10, 0, 0, 0, 0], &[]).await;
    // LU reset restores defaults
    e.lu.lun_reset(&e.n);
    let _ = e.run(&[0, 0, 0, 0, 0, 0], &[]).await;
    let d = e.ok(&mode_sense6(0, 0x08, 255, true), &[]).await;
    assert_eq!(d[6] & 4, 4);
}

#[tokio::test]
async fn start_stop_and_prevent() {
    let e = env();
    // LOEJ on a non-removable unit fails
    assert_eq!(
        sense_of(&e.run(&[0x1b, 1, 0, 0, 0x02, 0], &[]).await),
        INVALID_CDB
    );
    // stop: media access NOT READY 04/02, TUR too, INQUIRY fine
    e.ok(&[0x1b, 0, 0, 0, 0x00, 0], &[]).await;
    assert_eq!(sense_of(&e.run(&read10(0, 1), &[]).await), (2, 4, 2));
    assert_eq!(sense_of(&e.run(&[0, 0, 0, 0, 0, 0], &[]).await), (2, 4, 2));
    e.ok(&[0x12, 0, 0, 0, 36, 0], &[]).await;
    let d = e.ok(&[0x03, 0, 0, 0, 18, 0], &[]).await;
    assert_eq!((d[2], d[12], d[13]), (2, 4, 2));
    // start again
    e.ok(&[0x1b, 0, 0, 0, 0x01, 0], &[]).await;
    e.ok(&read10(0, 1), &[]).await;
    // power condition accepted
    e.ok(&[0x1b, 0, 0, 0, 0x30, 0], &[]).await;
    e.ok(&[0, 0, 0, 0, 0, 0], &[]).await;
    // PREVENT ALLOW
    e.ok(&[0x1e, 0, 0, 0, 1, 0], &[]).await;
    e.ok(&[0x1e, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(
        sense_of(&e.run(&[0x1e, 0, 0, 0, 2, 0], &[]).await),
        INVALID_CDB
    );
}

#[tokio::test]
async fn report_supported_opcodes() {
    let e = env();
    let rsoc = |opts: u8, op: u8, sa: u16| {
        let mut c = vec![0xa3, 0x0c, opts, op];
        c.extend_from_slice(&sa.to_be_bytes());
        c.extend_from_slice(&[0, 0, 0xff, 0xff, 0, 0]);
        c
    };
    let d = e.ok(&rsoc(0, 0, 0), &[]).await;
    let len = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, d.len());
    let descs: Vec<&[u8]> = d[4..].chunks(8).collect();
    assert!(descs.len() > 40);
    for ds in &descs {
        let (op, sa, servactv) = (ds[0], u16::from_be_bytes([ds[2], ds[3]]), ds[5] & 1 != 0);
        let cdb_len = u16::from_be_bytes([ds[6], ds[7]]);
        // every listed command is really accepted by the engine dispatcher
        let opts = if servactv { 2 } else { 1 };
        let one = e.ok(&rsoc(opts, op, sa), &[]).await;
        assert_eq!(one[1] & 7, 3);
        assert_eq!(u16::from_be_bytes([one[2], one[3]]), cdb_len);
        assert_eq!(one[4], op);
        if servactv {
            assert_eq!(one[5] & 0x1f, 0x1f);
            assert_eq!(sense_of(&e.run(&rsoc(1, op, sa), &[]).await), INVALID_CDB);
        } else {
            assert_eq!(sense_of(&e.run(&rsoc(2, op, sa), &[]).await), INVALID_CDB);
        }
        e.ok(&rsoc(3, op, sa), &[]).await;
    }
    // RCTD: 20-byte descriptors with CTDP
    let d = e.ok(&rsoc(0x80, 0, 0), &[]).await;
    assert_eq!((d.len() - 4) % 20, 0);
    assert_eq!(d[4 + 5] & 2, 2);
    assert_eq!(&d[12..14], &[0, 0x0a]);
    let one = e.ok(&rsoc(0x81, 0x28, 0), &[]).await;
    assert_eq!(one[1], 0x83);
    assert_eq!(one.len(), 4 + 10 + 12);
    // unsupported opcode: support = 001b
    let one = e.ok(&rsoc(1, 0xc1, 0), &[]).await;
    assert_eq!(one[1] & 7, 1);
    assert_eq!(sense_of(&e.run(&rsoc(5, 0, 0), &[]).await), INVALID_CDB);
    // TMF report
    let d = e
        .ok(&[0xa3, 0x0d, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[])
        .await;
    assert_eq!(d.len(), 4);
    assert_eq!(d[0] & 0x08, 0x08);
    let d = e
        .ok(&[0xa3, 0x0d, 0x80, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[])
        .await;
    assert_eq!(d.len(), 16);
}

#[tokio::test]
async fn unknown_and_short_cdbs() {
    let e = env();
    assert_eq!(sense_of(&e.run(&[0xc0], &[]).await), (5, 0x20, 0));
    assert_eq!(sense_of(&e.run(&[0x9e, 0x1f], &[]).await), INVALID_CDB);
    assert_eq!(sense_of(&e.run(&[0xa3, 0x05], &[]).await), INVALID_CDB);
    let c = ScsiCommand {
        cdb: Bytes::from_static(&[0x28, 0, 0]),
        ..cmd(&e.n, 0, &[0], &[])
    };
    let r = e.table.execute(&c, &|_| true).await;
    assert_eq!(sense_of(&r), INVALID_CDB);
    let c = ScsiCommand {
        cdb: Bytes::new(),
        ..cmd(&e.n, 0, &[0], &[])
    };
    assert_eq!(sense_of(&e.table.execute(&c, &|_| true).await).0, 5);
}

#[tokio::test]
async fn fuzz_no_panics() {
    let e = env();
    // Every opcode with a few CDB/parameter shapes must answer without panicking.
    let mut seed = 0x1234_5678_u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for op in 0..=255u8 {
        for _ in 0..6 {
            let mut cdb: Vec<u8> = (0..16).map(|_| rnd() as u8).collect();
            cdb[0] = op;
            if rnd() % 2 == 0 {
                // keep lengths small so real I/O stays cheap
                for b in cdb.iter_mut().skip(2) {
                    *b &= 0x03;
                }
            }
            let dlen = (rnd() % 2048) as usize;
            let data: Vec<u8> = (0..dlen).map(|_| rnd() as u8).collect();
            let r = e.run(&cdb, &data).await;
            assert!(r.status != status::GOOD || r.sense.is_none());
            if r.status == status::CHECK_CONDITION {
                assert!(r.sense.is_some());
            }
        }
    }
}

#[tokio::test]
async fn device_errors_map_to_sense() {
    let e = env();
    let cases = [
        (InjectedError::Read, read10(0, 1), (3, 0x11, 0)),
        (InjectedError::Write, write10(0, 1), (3, 0x0c, 0)),
        (InjectedError::NoSpace, write10(0, 1), (7, 0x27, 7)),
        (InjectedError::Unavailable, read10(0, 1), (2, 0x04, 1)),
        (InjectedError::Other, write10(0, 1), (4, 0x44, 0)),
    ];
    for (err, cdb, want) in cases {
        e.dev.inject_error(Some(err), false);
        let r = e.run(&cdb, &pattern(1, 0)).await;
        assert_eq!(sense_of(&r), want);
    }
    e.ok(&read10(0, 1), &[]).await;
}

#[tokio::test]
async fn reserve_release_route_to_pr() {
    // With the stub pr.rs, RESERVE/RELEASE succeed and PR IN/OUT report
    // whatever pr.rs answers; here we only check routing doesn't break.
    let e = env();
    e.ok(&[0x16, 0, 0, 0, 0, 0], &[]).await;
    e.ok(&[0x17, 0, 0, 0, 0, 0], &[]).await;
    e.ok(&[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    e.ok(&[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    let r = e.run(&[0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(sense_of(&r), INVALID_CDB);
    let r = e.run(&[0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]).await;
    assert!(r.status == status::GOOD || r.status == status::CHECK_CONDITION);
}

/// A nexus the transport write-protects (a read-only export) reads, sees
/// WP in MODE SENSE(6) and (10), and every medium or mode-page change
/// fails with DATA PROTECT / WRITE PROTECTED, while another nexus of the
/// same LU writes as before and sees no WP.
#[tokio::test]
async fn write_protected_nexus() {
    const WP: (u8, u8, u8) = (7, 0x27, 0);
    let e = env();
    let ro = nexus("iqn.test:reader");
    let table = &e.table;
    let run_ro = |cdb: &[u8], data: &[u8]| {
        let c = ScsiCommand {
            write_protected: true,
            ..cmd(&ro, 0, cdb, data)
        };
        async move { table.execute(&c, &|_| true).await }
    };
    assert_eq!(run_ro(&[0, 0, 0, 0, 0, 0], &[]).await.status, status::GOOD);
    e.ok(&write10(4, 2), &pattern(2, 0x5a)).await;

    let r = run_ro(&read10(4, 2), &[]).await;
    assert_eq!(r.status, status::GOOD);
    assert_eq!(&r.data_in[..], &pattern(2, 0x5a)[..]);
    let r = run_ro(&mode_sense6(0, 0x3f, 255, false), &[]).await;
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data_in[2] & 0x80, 0x80, "WP in MODE SENSE(6)");
    let r = run_ro(&[0x5a, 0, 0x3f, 0, 0, 0, 0, 0x10, 0, 0], &[]).await;
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data_in[3] & 0x80, 0x80, "WP in MODE SENSE(10)");
    // SYNCHRONIZE CACHE only flushes.
    assert_eq!(
        run_ro(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await.status,
        status::GOOD
    );

    let mut unmap = vec![0, 22, 0, 16, 0, 0, 0, 0];
    unmap.extend_from_slice(&4u64.to_be_bytes());
    unmap.extend_from_slice(&1u32.to_be_bytes());
    unmap.extend_from_slice(&[0; 4]);
    let mut caw = vec![0x89, 0];
    caw.extend_from_slice(&4u64.to_be_bytes());
    caw.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
    let mut caw_data = pattern(1, 0x5a);
    caw_data.extend(pattern(1, 1));
    let ms = e.ok(&mode_sense6(0, 0x0a, 255, true), &[]).await;
    let mut select = ms.to_vec();
    select[0] = 0;
    let refused: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (vec![0x0a, 0, 0, 4, 1, 0], pattern(1, 1)),
        (write10(4, 1), pattern(1, 1)),
        (rw12(0xaa, 4, 1), pattern(1, 1)),
        (rw16(0x8a, 4, 1), pattern(1, 1)),
        (write10(4, 0), vec![]),
        (
            {
                let mut c = write10(4, 1);
                c[0] = 0x2e; // WRITE AND VERIFY(10)
                c
            },
            pattern(1, 1),
        ),
        (ws(0x41, 0, 4, 1), pattern(1, 1)),
        (ws(0x93, 0x08, 4, 1), pattern(1, 0)),
        (vec![0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], unmap),
        (caw, caw_data),
        (vec![0x15, 0x10, 0, 0, select.len() as u8, 0], select),
    ];
    for (cdb, data) in &refused {
        assert_eq!(sense_of(&run_ro(cdb, data).await), WP, "cdb {cdb:02x?}");
    }
    // Nothing changed; the read-write nexus still writes and sees no WP.
    assert_eq!(
        &run_ro(&read10(4, 2), &[]).await.data_in[..],
        &pattern(2, 0x5a)[..]
    );
    e.ok(&write10(4, 1), &pattern(1, 7)).await;
    assert_eq!(run_ro(&read10(4, 1), &[]).await.data_in[0], 7);
    let d = e.ok(&mode_sense6(0, 0x3f, 255, false), &[]).await;
    assert_eq!(d[2] & 0x80, 0, "no WP for the read-write nexus");
}

/// PERSISTENT RESERVE OUT CDB with a 24-byte basic parameter list.
fn prout(action: u8, ptype: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
    let c = vec![0x5f, action, ptype & 0x0f, 0, 0, 0, 0, 0, 24, 0];
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    (c, p)
}

/// PERSISTENT RESERVE IN READ KEYS / READ RESERVATION parameter data.
async fn prin(e: &Env, action: u8) -> Bytes {
    e.ok(&[0x5e, action, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]).await
}

/// A write-protected nexus takes no reservation that would restrict the
/// LU's writers: RESERVE(6)/(10), PR OUT RESERVE, PREEMPT, PREEMPT AND
/// ABORT, CLEAR and REGISTER AND MOVE fail with DATA PROTECT / WRITE
/// PROTECTED and change nothing, while it may register, release what it
/// holds alone (a reservation from before it became read-only, SPC-2 or
/// persistent) and read under the writers' registrants-only reservation.
#[tokio::test]
async fn write_protected_nexus_takes_no_reservation() {
    const WP: (u8, u8, u8) = (7, 0x27, 0);
    const CONFLICT: u8 = 0x18;
    let e = env();
    let ro = nexus("iqn.test:reader");
    let table = &e.table;
    let run_as = |wp: bool, cdb: &[u8], data: &[u8]| {
        let c = ScsiCommand {
            write_protected: wp,
            ..cmd(&ro, 0, cdb, data)
        };
        async move { table.execute(&c, &|_| true).await }
    };
    let run_ro = |cdb: &[u8], data: &[u8]| run_as(true, cdb, data);
    assert_eq!(run_ro(&[0, 0, 0, 0, 0, 0], &[]).await.status, status::GOOD);
    e.ok(&[0, 0, 0, 0, 0, 0], &[]).await;

    // SPC-2: no RESERVE from the reader; its RESERVE before it became
    // read-only it may RELEASE, freeing the writer.
    for cdb in [
        vec![0x16, 0, 0, 0, 0, 0],
        vec![0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ] {
        assert_eq!(sense_of(&run_ro(&cdb, &[]).await), WP, "{cdb:02x?}");
        e.ok(&write10(0, 1), &pattern(1, 1)).await;
    }
    assert_eq!(
        run_as(false, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        status::GOOD
    );
    assert_eq!(e.run(&write10(0, 1), &pattern(1, 2)).await.status, CONFLICT);
    assert_eq!(
        run_ro(&[0x17, 0, 0, 0, 0, 0], &[]).await.status,
        status::GOOD
    );
    e.ok(&write10(0, 1), &pattern(1, 2)).await;

    // Persistent: the reader registers (allowed), but reserves nothing.
    let (c, p) = prout(0x06, 0, 0, 0xbb);
    assert_eq!(run_ro(&c, &p).await.status, status::GOOD, "REGISTER");
    for t in [1u8, 3, 5, 6, 7, 8] {
        let (c, p) = prout(0x01, t, 0xbb, 0);
        assert_eq!(sense_of(&run_ro(&c, &p).await), WP, "RESERVE type {t}");
    }
    assert_eq!(&prin(&e, 1).await[4..8], &[0, 0, 0, 0], "no reservation");
    e.ok(&write10(0, 1), &pattern(1, 3)).await;

    // The writer registers and holds Exclusive Access - Registrants Only;
    // the registered reader reads under it, and cannot preempt, clear or
    // move it.
    let (c, p) = prout(0x06, 0, 0, 0xaa);
    e.ok(&c, &p).await;
    let (c, p) = prout(0x01, 6, 0xaa, 0);
    e.ok(&c, &p).await;
    assert_eq!(run_ro(&read10(0, 1), &[]).await.status, status::GOOD);
    // To the writer's I_T nexus (TransportID format 01b).
    let mut body = b"iqn.test:a,i,0x800000000001".to_vec();
    body.resize(32, 0);
    let mut tid = vec![0x45, 0, 0, body.len() as u8];
    tid.extend_from_slice(&body);
    let mut mv = vec![0u8; 24];
    mv[0..8].copy_from_slice(&0xbbu64.to_be_bytes());
    mv[8..16].copy_from_slice(&0xccu64.to_be_bytes());
    mv[18..20].copy_from_slice(&1u16.to_be_bytes());
    mv[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
    mv.extend_from_slice(&tid);
    let mut mv_cdb = vec![0x5f, 0x07, 6, 0, 0, 0, 0, 0, 0, 0];
    mv_cdb[5..9].copy_from_slice(&(mv.len() as u32).to_be_bytes());
    let refused = [
        prout(0x04, 6, 0xbb, 0xaa), // PREEMPT the writer
        prout(0x05, 6, 0xbb, 0xaa), // PREEMPT AND ABORT
        prout(0x04, 6, 0xbb, 0xbb), // PREEMPT itself (a reservation for it)
        prout(0x03, 0, 0xbb, 0),    // CLEAR
        (mv_cdb, mv),               // REGISTER AND MOVE
    ];
    for (c, p) in &refused {
        assert_eq!(sense_of(&run_ro(c, p).await), WP, "{c:02x?}");
    }
    let keys = prin(&e, 0).await;
    assert_eq!(&keys[4..8], &[0, 0, 0, 16], "both registrations stand");
    let res = prin(&e, 1).await;
    assert_eq!(&res[8..16], &0xaau64.to_be_bytes(), "the writer holds it");
    assert_eq!(res[21] & 0x0f, 6);
    e.ok(&write10(0, 1), &pattern(1, 4)).await;
    // Its RELEASE as a non-holder changes nothing.
    let (c, p) = prout(0x02, 6, 0xbb, 0);
    assert_eq!(run_ro(&c, &p).await.status, status::GOOD);
    assert_eq!(&prin(&e, 1).await[8..16], &0xaau64.to_be_bytes());

    // An all-registrants reservation the reader is registered under: it
    // may not release it for every registrant; the writer may. (Releasing
    // either reservation tells the reader: RESERVATIONS RELEASED.)
    let released = || async {
        let r = run_ro(&[0, 0, 0, 0, 0, 0], &[]).await;
        assert_eq!(sense_of(&r), (6, 0x2a, 0x04), "RESERVATIONS RELEASED");
    };
    let (c, p) = prout(0x02, 6, 0xaa, 0);
    e.ok(&c, &p).await;
    released().await;
    let (c, p) = prout(0x01, 7, 0xaa, 0);
    e.ok(&c, &p).await;
    let (c, p) = prout(0x02, 7, 0xbb, 0);
    assert_eq!(sense_of(&run_ro(&c, &p).await), WP, "RELEASE of WE-AR");
    assert_eq!(prin(&e, 1).await[21] & 0x0f, 7, "still reserved");
    let (c, p) = prout(0x02, 7, 0xaa, 0);
    e.ok(&c, &p).await;
    released().await;

    // A persistent reservation the reader took before it became read-only
    // (Write Exclusive, blocking the writer): it may release it.
    let (c, p) = prout(0x01, 1, 0xbb, 0);
    assert_eq!(run_as(false, &c, &p).await.status, status::GOOD);
    let r = e.run(&write10(0, 1), &pattern(1, 5)).await;
    assert_eq!(r.status, CONFLICT, "the reader's old reservation");
    let (c, p) = prout(0x02, 1, 0xbb, 0);
    assert_eq!(run_ro(&c, &p).await.status, status::GOOD, "RELEASE");
    e.ok(&write10(0, 1), &pattern(1, 5)).await;
    // And unregister.
    let (c, p) = prout(0x00, 0, 0xbb, 0);
    assert_eq!(run_ro(&c, &p).await.status, status::GOOD, "unregister");
    assert_eq!(&prin(&e, 0).await[4..8], &[0, 0, 0, 8]);
    assert_eq!(&e.ok(&read10(0, 1), &[]).await[..], &pattern(1, 5)[..]);
}
