//! SCSI commands sent straight to a disk with the SG_IO ioctl: READ
//! CAPACITY(16) (does an unmapped block read as zeros: LBPRZ) and GET LBA
//! STATUS (is any block mapped). Together they prove that a device has never
//! been written ([`never_written`]), which lets a stage skip reading the
//! device to find it blank and lets mkfs skip zeroing what already is zero.
//!
//! Hand-written (a few dozen lines of `ioctl`) rather than a crate: the SG
//! crates on crates.io are unmaintained or pull in a whole SCSI stack, and
//! sg3-utils' `sg_get_lba_status` would cost a fork+exec per call, which is
//! what this replaces.

use std::os::fd::AsRawFd;
use std::path::Path;

/// `SG_IO` from <scsi/sg.h>.
const SG_IO: libc::c_ulong = 0x2285;
/// `sg_io_hdr.dxfer_direction`: data from the device.
const SG_DXFER_FROM_DEV: libc::c_int = -3;
/// SERVICE ACTION IN(16) and its service actions.
const SERVICE_ACTION_IN_16: u8 = 0x9e;
const SA_READ_CAPACITY_16: u8 = 0x10;
const SA_GET_LBA_STATUS: u8 = 0x12;
/// GET LBA STATUS calls per device before giving up on a proof.
const MAX_CALLS: usize = 4096;

/// `struct sg_io_hdr` from <scsi/sg.h> (interface 'S').
#[repr(C)]
struct SgIoHdr {
    interface_id: libc::c_int,
    dxfer_direction: libc::c_int,
    cmd_len: u8,
    mx_sb_len: u8,
    iovec_count: u16,
    dxfer_len: u32,
    dxferp: *mut libc::c_void,
    cmdp: *const u8,
    sbp: *mut u8,
    timeout: u32,
    flags: u32,
    pack_id: libc::c_int,
    usr_ptr: *mut libc::c_void,
    status: u8,
    masked_status: u8,
    msg_status: u8,
    sb_len_wr: u8,
    host_status: u16,
    driver_status: u16,
    resid: libc::c_int,
    duration: u32,
    info: u32,
}

/// Runs a data-in command; returns the bytes the device sent.
fn data_in(f: &std::fs::File, cdb: &[u8; 16], len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut sense = [0u8; 32];
    let mut h = SgIoHdr {
        interface_id: libc::c_int::from(b'S'),
        dxfer_direction: SG_DXFER_FROM_DEV,
        cmd_len: 16,
        mx_sb_len: sense.len() as u8,
        iovec_count: 0,
        dxfer_len: u32::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        dxferp: buf.as_mut_ptr().cast(),
        cmdp: cdb.as_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: 10_000,
        flags: 0,
        pack_id: 0,
        usr_ptr: std::ptr::null_mut(),
        status: 0,
        masked_status: 0,
        msg_status: 0,
        sb_len_wr: 0,
        host_status: 0,
        driver_status: 0,
        resid: 0,
        duration: 0,
        info: 0,
    };
    // SAFETY: SG_IO on an open descriptor with a fully initialised
    // sg_io_hdr whose buffers (cdb: 16 bytes, data: `len`, sense: 32) live
    // until the synchronous ioctl returns.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), SG_IO as _, &mut h as *mut SgIoHdr) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if h.status != 0 || h.host_status != 0 || (h.driver_status & 0x0f) != 0 {
        return Err(std::io::Error::other(format!(
            "SCSI status {:#x} host {:#x} driver {:#x} sense key {:#x}",
            h.status,
            h.host_status,
            h.driver_status,
            sense.get(2).map_or(0, |k| k & 0x0f)
        )));
    }
    let got = len.saturating_sub(usize::try_from(h.resid.max(0)).unwrap_or(0));
    buf.truncate(got);
    Ok(buf)
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
}

/// READ CAPACITY(16): (number of blocks, unmapped blocks read as zeros).
fn read_capacity(f: &std::fs::File) -> std::io::Result<(u64, bool)> {
    let mut cdb = [0u8; 16];
    cdb[0] = SERVICE_ACTION_IN_16;
    cdb[1] = SA_READ_CAPACITY_16;
    cdb[13] = 32;
    let b = data_in(f, &cdb, 32)?;
    let last = be_u64(&b, 0).ok_or_else(|| std::io::Error::other("short READ CAPACITY(16)"))?;
    let lbprz = b.get(14).is_some_and(|v| v & 0x40 != 0);
    Ok((last.saturating_add(1), lbprz))
}

/// One GET LBA STATUS response: the descriptors as (first LBA, blocks,
/// provisioning status), or `None` when it is malformed.
pub fn parse_lba_status(b: &[u8]) -> Option<Vec<(u64, u64, u8)>> {
    let len = usize::try_from(be_u32(b, 0)?).ok()?;
    // Parameter data length counts the bytes after itself.
    let end = (len + 4).min(b.len());
    let mut out = Vec::new();
    let mut at = 8;
    while at + 16 <= end {
        let lba = be_u64(b, at)?;
        let n = u64::from(be_u32(b, at + 8)?);
        out.push((lba, n, b[at + 12] & 0x0f));
        at += 16;
    }
    Some(out)
}

/// Whether every block of `device` is deallocated and reads as zeros,
/// asked of the device itself. `Ok(false)` when it cannot say (no thin
/// provisioning, LBPRZ clear, GET LBA STATUS unsupported, a malformed
/// answer), so the caller falls back to reading the device.
pub fn never_written(device: &Path) -> std::io::Result<bool> {
    let f = std::fs::File::open(device)?;
    let Ok((blocks, lbprz)) = read_capacity(&f) else {
        return Ok(false);
    };
    if !lbprz || blocks == 0 {
        return Ok(false);
    }
    let mut lba = 0u64;
    for _ in 0..MAX_CALLS {
        if lba >= blocks {
            return Ok(true);
        }
        let mut cdb = [0u8; 16];
        cdb[0] = SERVICE_ACTION_IN_16;
        cdb[1] = SA_GET_LBA_STATUS;
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&4096u32.to_be_bytes());
        let Ok(b) = data_in(&f, &cdb, 4096) else {
            return Ok(false);
        };
        let Some(descs) = parse_lba_status(&b) else {
            return Ok(false);
        };
        // The first descriptor must start at the LBA asked for; every one
        // must be deallocated (1); no progress means no proof.
        let mut next = lba;
        for (start, n, status) in descs {
            if start != next || status != 1 || n == 0 {
                return Ok(false);
            }
            next = start.saturating_add(n);
        }
        if next == lba {
            return Ok(false);
        }
        lba = next;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(lba: u64, n: u32, status: u8) -> Vec<u8> {
        let mut d = lba.to_be_bytes().to_vec();
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&[status, 0, 0, 0]);
        d
    }

    #[test]
    fn lba_status_descriptors() {
        let mut b = (4u32 + 32).to_be_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        b.extend(desc(0, 2048, 1));
        b.extend(desc(2048, 16, 0));
        // Padding past the parameter data length is ignored.
        b.extend(desc(2064, 1, 1));
        assert_eq!(
            parse_lba_status(&b).unwrap(),
            vec![(0, 2048, 1), (2048, 16, 0)]
        );
        // Truncated: only whole descriptors.
        assert_eq!(parse_lba_status(&b[..30]).unwrap(), vec![(0, 2048, 1)]);
        assert_eq!(parse_lba_status(&b[..3]), None);
    }

    #[test]
    fn a_file_is_not_a_scsi_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        // SG_IO fails on a regular file: no proof, no error.
        assert!(!never_written(&p).unwrap());
        assert!(never_written(&dir.path().join("missing")).is_err());
    }
}
