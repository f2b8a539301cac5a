//! Runs libiscsi's `iscsi-test-cu` and parses its CUnit report.
//!
//! The report we read (verbose mode, CUnit 2.1):
//!
//! ```text
//! Suite: GetLBAStatus
//!   Test: Simple ...passed
//!   Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful but ...
//! FAILED
//!     1. test_get_lba_status_beyond_eol.c:38  - CU_ASSERT_EQUAL(_r,0)
//! ...
//! Run Summary:    Type  Total    Ran Passed Failed Inactive
//!               suites     51     51    n/a      0        0
//!                tests    230    230    222      8        0
//!              asserts  55300  55300  55289     11      n/a
//! ```
//!
//! A test's verdict is the bare word `passed` / `FAILED` that CUnit prints
//! after the test's own output (either at the end of the `Test:` line or on
//! a line of its own). `[FAILED] ...` lines are libiscsi's messages and do not
//! decide anything by themselves (some tests print them and still pass).

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// First initiator name passed with `-i`.
pub const INITIATOR_1: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test";
/// Second initiator name passed with `-I` (reservation / multi-nexus tests).
pub const INITIATOR_2: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2";

/// One row of the "Run Summary" table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub ran: u64,
    /// `None` where CUnit prints `n/a` (suites).
    pub passed: Option<u64>,
    pub failed: u64,
    /// `None` where CUnit prints `n/a` (asserts).
    pub inactive: Option<u64>,
}

/// A parsed `iscsi-test-cu` run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CuReport {
    pub suites: Counts,
    pub tests: Counts,
    pub asserts: Counts,
    /// `Suite.Test` names whose verdict was FAILED, in run order.
    pub failed: Vec<String>,
    /// `Suite.Test` names that printed `[SKIPPED]` (CUnit counts them as passed).
    pub skipped: Vec<String>,
}

impl CuReport {
    /// True when the suite ran and nothing failed.
    pub fn all_passed(&self) -> bool {
        self.tests.failed == 0 && self.suites.failed == 0 && self.failed.is_empty()
    }
}

impl fmt::Display for CuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<u64>| v.map_or("n/a".to_string(), |v| v.to_string());
        writeln!(
            f,
            "{:>8} {:>7} {:>7} {:>7} {:>7} {:>8}",
            "type", "total", "ran", "passed", "failed", "inactive"
        )?;
        for (name, c) in [
            ("suites", &self.suites),
            ("tests", &self.tests),
            ("asserts", &self.asserts),
        ] {
            writeln!(
                f,
                "{:>8} {:>7} {:>7} {:>7} {:>7} {:>8}",
                name,
                c.total,
                c.ran,
                opt(c.passed),
                c.failed,
                opt(c.inactive)
            )?;
        }
        writeln!(
            f,
            "skipped (counted as passed by CUnit): {}",
            self.skipped.len()
        )?;
        if !self.failed.is_empty() {
            writeln!(f, "failed tests ({}):", self.failed.len())?;
            for t in &self.failed {
                writeln!(f, "  {t}")?;
            }
        }
        Ok(())
    }
}

fn parse_num(s: &str) -> Option<Option<u64>> {
    if s == "n/a" {
        Some(None)
    } else {
        s.parse().ok().map(Some)
    }
}

fn parse_counts(fields: &[&str]) -> Option<Counts> {
    // fields: Total Ran Passed Failed Inactive
    if fields.len() != 5 {
        return None;
    }
    Some(Counts {
        total: parse_num(fields[0])??,
        ran: parse_num(fields[1])??,
        passed: parse_num(fields[2])?,
        failed: parse_num(fields[3])??,
        inactive: parse_num(fields[4])?,
    })
}

/// Parses the verbose CUnit output of `iscsi-test-cu`. Errors when the
/// "Run Summary" table is missing (the suite did not run to completion) or
/// when the per-test verdicts disagree with the summary's failed count.
pub fn parse(output: &str) -> Result<CuReport, String> {
    let mut report = CuReport::default();
    let mut suite = String::new();
    let mut current: Option<String> = None;
    let mut in_summary = false;
    let mut seen = [false; 3];

    for line in output.lines() {
        let trimmed = line.trim();
        if in_summary {
            let fields: Vec<&str> = trimmed.split_whitespace().collect();
            let idx = match fields.first() {
                Some(&"suites") => 0,
                Some(&"tests") => 1,
                Some(&"asserts") => 2,
                _ => continue,
            };
            let counts = parse_counts(&fields[1..])
                .ok_or_else(|| format!("cannot parse summary row: {trimmed:?}"))?;
            match idx {
                0 => report.suites = counts,
                1 => report.tests = counts,
                _ => report.asserts = counts,
            }
            seen[idx] = true;
            continue;
        }
        if trimmed.starts_with("Run Summary:") {
            in_summary = true;
            current = None;
            continue;
        }
        if let Some(name) = line.strip_prefix("Suite: ") {
            suite = name.trim().to_string();
            current = None;
            continue;
        }
        let mut rest = trimmed;
        if let Some(after) = trimmed.strip_prefix("Test: ") {
            let (name, tail) = after.split_once(" ...").unwrap_or((after, ""));
            current = Some(format!("{suite}.{}", name.trim()));
            rest = tail.trim();
        }
        let Some(test) = current.as_ref() else {
            continue;
        };
        if rest.contains("[SKIPPED]") && report.skipped.last() != Some(test) {
            report.skipped.push(test.clone());
        }
        // The verdict is a bare word at the start of what is left of the
        // line ("...passed", "...FAILED" or a line "FAILED" on its own).
        if (rest == "FAILED" || rest.starts_with("FAILED ")) && report.failed.last() != Some(test) {
            report.failed.push(test.clone());
        }
    }

    if !seen.iter().all(|s| *s) {
        return Err("no complete CUnit \"Run Summary\" table in the output \
                    (iscsi-test-cu did not finish: login failure or crash?)"
            .to_string());
    }
    if report.failed.len() as u64 != report.tests.failed {
        return Err(format!(
            "summary says {} tests failed but {} FAILED verdicts were found: {:?}",
            report.tests.failed,
            report.failed.len(),
            report.failed
        ));
    }
    Ok(report)
}

/// Runs `iscsi-test-cu -d -t TESTS URL` (verbose CUnit output into
/// `log_path`), killing it after `timeout`, and parses the report.
///
/// `-d` allows the data-destroying tests (the LUN is scratch); both
/// initiator names are given explicitly so reservation tests get two I_T
/// nexuses.
pub fn run_iscsi_test_cu(
    url: &str,
    tests: &str,
    log_path: &Path,
    timeout: Duration,
) -> Result<CuReport, String> {
    let bin = crate::require_tool("iscsi-test-cu", "libiscsi-bin");
    let log = File::create(log_path).map_err(|e| format!("create {}: {e}", log_path.display()))?;
    let mut child = Command::new(bin)
        .args([
            "-i",
            INITIATOR_1,
            "-I",
            INITIATOR_2,
            "-d",
            "-v",
            "-t",
            tests,
            url,
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn iscsi-test-cu: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "iscsi-test-cu timed out after {timeout:?}; last output:\n{}",
                crate::log_tail(log_path, 4000)
            ));
        }
        sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(log_path)
        .map_err(|e| format!("read {}: {e}", log_path.display()))?;
    // iscsi-test-cu exits non-zero whenever a test fails, so the exit status
    // only matters when there is no report to read.
    parse(&output).map_err(|e| {
        format!(
            "{e}; iscsi-test-cu exit: {status}; last output:\n{}",
            crate::log_tail(log_path, 4000)
        )
    })
}

/// The whole suite (or `IRONBLOCK_CU_TESTS`) against `url` from async test
/// code: runs [`run_iscsi_test_cu`] on a blocking thread with the suite
/// timeout (15 min, 1 h with `IRONBLOCK_LONG=1`), logs to
/// `build/test-logs/iscsi-test-cu-<name>.log`, prints the summary and panics
/// unless every test ran and passed (`context` is appended to the failure
/// message, e.g. a server log tail).
pub async fn run_suite_and_assert(url: String, name: &str, context: impl Fn() -> String) {
    let tests = std::env::var("IRONBLOCK_CU_TESTS").unwrap_or_else(|_| "ALL".to_string());
    let log = crate::log_dir().join(format!("iscsi-test-cu-{name}.log"));
    let timeout = Duration::from_secs(if crate::long_mode() { 3600 } else { 900 });
    let log2 = log.clone();
    let report =
        tokio::task::spawn_blocking(move || run_iscsi_test_cu(&url, &tests, &log2, timeout))
            .await
            .expect("join the iscsi-test-cu thread")
            .unwrap_or_else(|e| {
                panic!(
                    "iscsi-test-cu did not produce a report: {e} (log {})",
                    log.display()
                )
            });
    println!("{name}: iscsi-test-cu summary:\n{report}");
    assert!(report.tests.ran > 0, "iscsi-test-cu ran no tests");
    assert!(
        report.all_passed(),
        "{} of {} iscsi-test-cu tests failed ({name}):\n  {}\nlog: {}\n{}",
        report.tests.failed,
        report.tests.ran,
        report.failed.join("\n  "),
        log.display(),
        context()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const TGTD: &str = include_str!("../fixtures/tgtd-1.0.85-cunit.txt");

    #[test]
    fn parses_tgtd_run() {
        let r = parse(TGTD).expect("parse");
        assert_eq!(r.suites.total, 51);
        assert_eq!(
            r.tests,
            Counts {
                total: 230,
                ran: 230,
                passed: Some(222),
                failed: 8,
                inactive: Some(0)
            }
        );
        assert_eq!(r.asserts.failed, 11);
        assert_eq!(r.asserts.inactive, None);
        assert_eq!(r.suites.passed, None);
        assert_eq!(
            r.failed,
            [
                "GetLBAStatus.BeyondEol",
                "PrinServiceactionRange.Range",
                "ProutReserve.OwnershipEA",
                "ProutReserve.OwnershipWE",
                "ProutReserve.OwnershipEARO",
                "ProutReserve.OwnershipWERO",
                "Reserve6.2Initiators",
                "iSCSIdatasn.iSCSIDataSnInvalid",
            ]
        );
        // UnmapVPD prints "[FAILED] ..." yet passes.
        assert!(!r.failed.iter().any(|t| t.contains("UnmapVPD")));
        assert!(r.skipped.contains(&"CompareAndWrite.Simple".to_string()));
        assert!(!r.all_passed());
        let text = r.to_string();
        assert!(text.contains("Reserve6.2Initiators"), "{text}");
    }

    #[test]
    fn missing_summary_is_an_error() {
        let cut = &TGTD[..TGTD.find("Run Summary").unwrap()];
        assert!(parse(cut).is_err());
        let login_failure = "Failed to login to target\n";
        assert!(parse(login_failure).is_err());
    }

    #[test]
    fn all_passed_report() {
        let out = "Suite: A\n  Test: X ...passed\n  Test: Y ...    [SKIPPED] no\npassed\n\n\
                   Run Summary:    Type  Total    Ran Passed Failed Inactive\n\
                   \x20             suites      1      1    n/a      0        0\n\
                   \x20              tests      2      2      2      0        0\n\
                   \x20            asserts      5      5      5      0      n/a\n";
        let r = parse(out).expect("parse");
        assert!(r.all_passed());
        assert_eq!(r.skipped, ["A.Y"]);
    }

    #[test]
    fn verdict_count_mismatch_is_an_error() {
        let out = "Suite: A\n  Test: X ...passed\n\n\
                   Run Summary:    Type  Total    Ran Passed Failed Inactive\n\
                   \x20             suites      1      1    n/a      0        0\n\
                   \x20              tests      1      1      0      1        0\n\
                   \x20            asserts      1      1      0      1      n/a\n";
        assert!(parse(out).unwrap_err().contains("summary says 1"));
    }
}
