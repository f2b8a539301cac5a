//! Static SPC/SBC data: the supported-command table (REPORT SUPPORTED
//! OPERATION CODES), standard INQUIRY data, mode pages and LUN encoding.

use super::engine::LuConfig;

/// One supported command: opcode, optional service action and the CDB
/// usage mask (byte 0 is the opcode) reported by REPORT SUPPORTED
/// OPERATION CODES. The masks mark every bit the engine evaluates.
pub(crate) struct OpInfo {
    pub op: u8,
    pub sa: Option<u16>,
    pub usage: &'static [u8],
}

const fn op(op: u8, usage: &'static [u8]) -> OpInfo {
    OpInfo {
        op,
        sa: None,
        usage,
    }
}
const fn op_sa(op: u8, sa: u16, usage: &'static [u8]) -> OpInfo {
    OpInfo {
        op,
        sa: Some(sa),
        usage,
    }
}

const FF8: u8 = 0xff;

/// Every command the engine accepts, sorted by opcode then service action.
pub(crate) static COMMANDS: &[OpInfo] = &[
    op(0x00, &[0x00, 0, 0, 0, 0, 0]),
    op(0x03, &[0x03, 0x01, 0, 0, FF8, 0]),
    op(0x08, &[0x08, 0x1f, FF8, FF8, FF8, 0]),
    op(0x0a, &[0x0a, 0x1f, FF8, FF8, FF8, 0]),
    op(0x12, &[0x12, 0x01, FF8, FF8, FF8, 0]),
    op(0x15, &[0x15, 0x11, 0, 0, FF8, 0]),
    op(0x16, &[0x16, 0, 0, 0, 0, 0]),
    op(0x17, &[0x17, 0, 0, 0, 0, 0]),
    op(0x1a, &[0x1a, 0x08, FF8, FF8, FF8, 0]),
    op(0x1b, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0]),
    op(0x1e, &[0x1e, 0, 0, 0, 0x03, 0]),
    op(0x25, &[0x25, 0, FF8, FF8, FF8, FF8, 0, 0, 0x01, 0]),
    op(0x28, &[0x28, 0xfc, FF8, FF8, FF8, FF8, 0x1f, FF8, FF8, 0]),
    op(0x2a, &[0x2a, 0xf8, FF8, FF8, FF8, FF8, 0x1f, FF8, FF8, 0]),
    op(0x2e, &[0x2e, 0xf2, FF8, FF8, FF8, FF8, 0x1f, FF8, FF8, 0]),
    op(0x2f, &[0x2f, 0xf6, FF8, FF8, FF8, FF8, 0x1f, FF8, FF8, 0]),
    op(0x34, &[0x34, 0x02, FF8, FF8, FF8, FF8, 0x1f, FF8, FF8, 0]),
    op(0x35, &[0x35, 0x02, FF8, FF8, FF8, FF8, 0x1f, FF8, FF8, 0]),
    op(0x41, &[0x41, 0xf8, FF8, FF8, FF8, FF8, 0x1f, FF8, FF8, 0]),
    op(0x42, &[0x42, 0x01, 0, 0, 0, 0, 0x1f, FF8, FF8, 0]),
    op(0x55, &[0x55, 0x11, 0, 0, 0, 0, 0, FF8, FF8, 0]),
    op(0x56, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    op(0x57, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    op(0x5a, &[0x5a, 0x18, FF8, FF8, 0, 0, 0, FF8, FF8, 0]),
    op_sa(0x5e, 0x00, PRIN),
    op_sa(0x5e, 0x01, PRIN),
    op_sa(0x5e, 0x02, PRIN),
    op_sa(0x5e, 0x03, PRIN),
    op_sa(0x5f, 0x00, PROUT),
    op_sa(0x5f, 0x01, PROUT),
    op_sa(0x5f, 0x02, PROUT),
    op_sa(0x5f, 0x03, PROUT),
    op_sa(0x5f, 0x04, PROUT),
    op_sa(0x5f, 0x05, PROUT),
    op_sa(0x5f, 0x06, PROUT),
    op(
        0x88,
        &[
            0x88, 0xfc, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0,
        ],
    ),
    op(
        0x89,
        &[
            0x89, 0xf8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0, 0, 0, FF8, 0x1f, 0,
        ],
    ),
    op(
        0x8a,
        &[
            0x8a, 0xf8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0,
        ],
    ),
    op(
        0x8e,
        &[
            0x8e, 0xf2, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0,
        ],
    ),
    op(
        0x8f,
        &[
            0x8f, 0xf6, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0,
        ],
    ),
    op(
        0x90,
        &[
            0x90, 0x02, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0,
        ],
    ),
    op(
        0x91,
        &[
            0x91, 0x02, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0,
        ],
    ),
    op(
        0x93,
        &[
            0x93, 0xf9, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0,
        ],
    ),
    op_sa(
        0x9e,
        0x10,
        &[0x9e, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, FF8, FF8, FF8, FF8, 0, 0],
    ),
    op_sa(
        0x9e,
        0x12,
        &[
            0x9e, 0x1f, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0, 0,
        ],
    ),
    op(0xa0, &[0xa0, 0, FF8, 0, 0, 0, FF8, FF8, FF8, FF8, 0, 0]),
    op_sa(
        0xa3,
        0x0c,
        &[0xa3, 0x1f, 0x87, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0, 0],
    ),
    op_sa(
        0xa3,
        0x0d,
        &[0xa3, 0x1f, 0x80, 0, 0, 0, FF8, FF8, FF8, FF8, 0, 0],
    ),
    op(
        0xa8,
        &[0xa8, 0xfc, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0],
    ),
    op(
        0xaa,
        &[0xaa, 0xf8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0],
    ),
    op(
        0xae,
        &[0xae, 0xf2, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0],
    ),
    op(
        0xaf,
        &[0xaf, 0xf6, FF8, FF8, FF8, FF8, FF8, FF8, FF8, FF8, 0x1f, 0],
    ),
];

static PRIN: &[u8] = &[0x5e, 0x1f, 0, 0, 0, 0, 0, FF8, FF8, 0];
static PROUT: &[u8] = &[0x5f, 0x1f, FF8, 0, 0, FF8, FF8, FF8, FF8, 0];

/// Whether `op` is a command with service actions in [`COMMANDS`].
pub(crate) fn has_service_actions(op: u8) -> bool {
    COMMANDS.iter().any(|c| c.op == op && c.sa.is_some())
}

/// Command timeouts descriptor (SPC-4 6.35.4): nominal 1 s, recommended 30 s.
pub(crate) const TIMEOUTS: [u8; 12] = [0x00, 0x0a, 0, 0, 0, 0, 0, 1, 0, 0, 0, 30];

/// Standard INQUIRY data (96 bytes) with the given peripheral byte.
pub(crate) fn standard_inquiry(cfg: &LuConfig, peripheral: u8) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = peripheral;
    d[1] = 0; // not removable
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HiSup, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[7] = 0x02; // CmdQue
    put_ascii(&mut d[8..16], &cfg.vendor);
    put_ascii(&mut d[16..32], &cfg.product);
    put_ascii(&mut d[32..36], &cfg.revision);
    // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
    for (i, v) in [0x00a0u16, 0x0460, 0x04c0, 0x0960].iter().enumerate() {
        let o = 58 + 2 * i;
        d[o..o + 2].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Space-padded printable ASCII (non-printable bytes become spaces).
pub(crate) fn put_ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst.iter_mut().zip(s.bytes()) {
        *d = if (0x20..0x7f).contains(&c) { c } else { b' ' };
    }
}

/// Current mode parameters that MODE SELECT may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModeParams {
    /// Caching page WCE.
    pub wce: bool,
    /// Control page SWP (software write protect).
    pub swp: bool,
}

/// Mode page codes the engine implements, in ascending order.
pub(crate) const MODE_PAGES: [u8; 3] = [0x08, 0x0a, 0x1c];

/// Mode page `code` for page control `pc` (0 current, 1 changeable, 2
/// default). `default` gives the default parameters and `wce_changeable`
/// whether the device has a write cache to toggle.
pub(crate) fn mode_page(
    code: u8,
    pc: u8,
    cur: ModeParams,
    default: ModeParams,
    wce_changeable: bool,
) -> Option<Vec<u8>> {
    let p = if pc == 2 { default } else { cur };
    match code {
        0x08 => {
            let mut d = vec![0u8; 20];
            d[0] = 0x08;
            d[1] = 0x12;
            if pc == 1 {
                if wce_changeable {
                    d[2] = 0x04;
                }
            } else if p.wce {
                d[2] = 0x04;
            }
            Some(d)
        }
        0x0a => {
            let mut d = vec![0u8; 12];
            d[0] = 0x0a;
            d[1] = 0x0a;
            if pc == 1 {
                d[4] = 0x08;
            } else {
                d[3] = 0x10; // unrestricted reordering allowed
                if p.swp {
                    d[4] = 0x08;
                }
                d[8] = 0xff; // busy timeout: unlimited
                d[9] = 0xff;
            }
            Some(d)
        }
        0x1c => {
            let mut d = vec![0u8; 12];
            d[0] = 0x1c;
            d[1] = 0x0a;
            Some(d)
        }
        _ => None,
    }
}

/// Encode a LUN for REPORT LUNS: peripheral addressing below 256, flat
/// addressing (0x40) up to 16383.
pub(crate) fn encode_lun(lun: u64) -> [u8; 8] {
    let mut e = [0u8; 8];
    if lun < 256 {
        e[1] = lun as u8;
    } else {
        e[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        e[1] = lun as u8;
    }
    e
}
