//! Runs libiscsi's `iscsi-test-cu -t ALL` against a standalone
//! `ironblock-target` and a private `tgtd`, each with a fresh LUN, and prints
//! the pass counts side by side plus the tests that fail on only one side.
//! Run through `bench/conformance-compare`. Exit status 0 whenever both runs
//! produced a report; this is a comparison, not a gate.

use std::collections::BTreeSet;
use std::time::Duration;

use ironblock_tests::cunit::{self, CuReport};
use ironblock_tests::{
    iscsi_url, log_dir, long_mode, parse_size, scratch_dir, TargetProcess, Tgtd, TgtdOptions,
    TEST_IQN,
};

fn run(label: &str, url: &str) -> Result<CuReport, String> {
    let tests = std::env::var("IRONBLOCK_CU_TESTS").unwrap_or_else(|_| "ALL".to_string());
    let log = log_dir().join(format!("compare-{label}.log"));
    eprintln!(
        "==> {label}: iscsi-test-cu -t {tests} {url} (log {})",
        log.display()
    );
    cunit::run_iscsi_test_cu(url, &tests, &log, Duration::from_secs(3600))
}

fn main() {
    let size = if long_mode() { "1GiB" } else { "64MiB" };

    let dir = scratch_dir("compare-ironblock-");
    let lun = dir.path().join("lun1.img");
    let args = [
        "--iqn".to_string(),
        TEST_IQN.to_string(),
        "--lun".to_string(),
        format!("1={}:{size}", lun.display()),
    ];
    let ironblock = match std::env::var("COMPARE_SELF_TEST_TGTD") {
        Ok(v) if v == "1" => None,
        _ => Some(TargetProcess::spawn_in(dir, &args)),
    };
    let left = match &ironblock {
        Some(t) => run("ironblock", &iscsi_url(t.addr(), TEST_IQN, 1, None, &[])),
        None => {
            let t = Tgtd::start(TgtdOptions {
                lun_size: parse_size(size).expect("size"),
                ..TgtdOptions::default()
            });
            run(
                "tgtd-as-ironblock",
                &iscsi_url(t.addr(), t.iqn(), 1, None, &[]),
            )
        }
    };
    if let (Err(_), Some(t)) = (&left, &ironblock) {
        eprintln!(
            "--- ironblock-target stderr (tail) ---\n{}",
            t.stderr_tail()
        );
    }
    drop(ironblock);

    let tgtd = Tgtd::start(TgtdOptions {
        lun_size: parse_size(size).expect("size"),
        ..TgtdOptions::default()
    });
    let right = run("tgtd", &iscsi_url(tgtd.addr(), tgtd.iqn(), 1, None, &[]));
    drop(tgtd);

    let cell = |r: &Result<CuReport, String>| match r {
        Ok(r) => format!(
            "{:>4}/{:<4} failed {:<3} skipped {}",
            r.tests.passed.unwrap_or(0),
            r.tests.ran,
            r.tests.failed,
            r.skipped.len()
        ),
        Err(_) => "no report (see error above)".to_string(),
    };
    println!();
    println!("iscsi-test-cu -t ALL, {size} file-backed LUN");
    println!("  ironblock: {}", cell(&left));
    println!("  tgtd:      {}", cell(&right));
    for (name, r) in [("ironblock", &left), ("tgtd", &right)] {
        if let Err(e) = r {
            println!("\n{name} error: {e}");
        }
    }
    if let (Ok(l), Ok(r)) = (&left, &right) {
        let lf: BTreeSet<_> = l.failed.iter().collect();
        let rf: BTreeSet<_> = r.failed.iter().collect();
        let show = |title: &str, set: Vec<&&String>| {
            println!("\n{title} ({}):", set.len());
            for t in set {
                println!("  {t}");
            }
        };
        show("fail on ironblock only", lf.difference(&rf).collect());
        show("fail on tgtd only", rf.difference(&lf).collect());
        show("fail on both", lf.intersection(&rf).collect());
    }
    if left.is_err() || right.is_err() {
        std::process::exit(1);
    }
}
