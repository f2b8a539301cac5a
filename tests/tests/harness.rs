//! Checks of the test harness itself against a private tgtd (Debian `tgt`):
//! the `Tgtd` guard starts, serves a LUN to libiscsi, enforces CHAP, and
//! several instances run side by side. These keep the benchmark's and
//! conformance-compare's tgtd set-up honest while ironblock is young.

use std::process::Command;

use ironblock_tests::{iscsi_url, require_tool, Tgtd, TgtdOptions};

fn iscsi_inq(url: &str) -> (bool, String) {
    let inq = require_tool("iscsi-inq", "libiscsi-bin");
    let out = Command::new(inq).arg(url).output().expect("run iscsi-inq");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn tgtd_serves_a_lun() {
    let a = Tgtd::start(TgtdOptions::default());
    let b = Tgtd::start(TgtdOptions {
        lun_size: 8 << 20,
        ..TgtdOptions::default()
    });
    assert_ne!(a.port(), b.port());
    for t in [&a, &b] {
        let (ok, text) = iscsi_inq(&iscsi_url(t.addr(), t.iqn(), 1, None, &[]));
        assert!(ok, "iscsi-inq failed:\n{text}");
        assert!(text.contains("DIRECT_ACCESS"), "{text}");
    }
}

#[test]
fn tgtd_enforces_chap_and_digests() {
    let t = Tgtd::start(TgtdOptions {
        chap: Some(("user".into(), "secretsecret12".into())),
        header_digest: true,
        ..TgtdOptions::default()
    });
    let good = iscsi_url(
        t.addr(),
        t.iqn(),
        1,
        Some(("user", "secretsecret12")),
        &[("header_digest", "crc32c")],
    );
    let (ok, text) = iscsi_inq(&good);
    assert!(ok, "CHAP + header digest login failed:\n{text}");
    let (ok, text) = iscsi_inq(&iscsi_url(t.addr(), t.iqn(), 1, None, &[]));
    assert!(!ok, "login without CHAP must fail:\n{text}");
    let (ok, text) = iscsi_inq(&iscsi_url(
        t.addr(),
        t.iqn(),
        1,
        Some(("user", "wrong-secret")),
        &[],
    ));
    assert!(!ok, "login with a wrong secret must fail:\n{text}");
}
