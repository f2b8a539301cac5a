//! `ironblock dev`: the supervisor of real meta and chunk processes (all
//! children of the `ironblock` binary itself).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// `n` consecutive free ports on 127.0.0.1 (bounded search).
///
/// In 10000..20000: below Linux's ephemeral range (32768+), so no port 0
/// socket of another test takes one, and below the ports
/// `ironblock_tests::free_port` draws (20000..32768); test processes started one after another have nearby
/// pids, so the pid is spread out before it picks the block.
fn free_ports(n: u16) -> u16 {
    let mut base = 10_000 + ((std::process::id().wrapping_mul(7919)) % 9_900) as u16;
    for _ in 0..200 {
        let ok: Vec<_> = (0..n)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if ok.len() == n as usize {
            return base;
        }
        base = 10_000 + (base - 10_000 + 97 * n) % 9_900;
    }
    panic!("no {n} consecutive free ports");
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// A running `ironblock dev`.
struct Dev {
    /// The first port of the block the cluster runs on.
    base: u16,
    child: Child,
    stdout: Vec<String>,
    stderr: tokio::task::JoinHandle<String>,
}

impl Dev {
    /// Starts `exe dev ...` on a free block of ports and waits (bounded)
    /// for its summary.
    async fn start(exe: &Path, data: &Path, chunks: u16) -> Dev {
        // One block of ports: portals, data, metrics, then the three metas
        // and the VIP (on 127.0.0.100).
        Dev::start_at(exe, data, chunks, free_ports(3 * chunks + 4)).await
    }

    /// Starts `exe dev ...` on the block of ports from `base` (a directory
    /// started again keeps its ports: the meta group it formed knows its
    /// members by address, as an operator reusing the same flags does).
    async fn start_at(exe: &Path, data: &Path, chunks: u16, base: u16) -> Dev {
        let meta = base + 3 * chunks;
        let vip = format!("127.0.0.100:{}", base + 3 * chunks + 3);
        let mut child = Command::new(exe)
            .arg("dev")
            .arg("--data")
            .arg(data)
            .args(["--chunks", &chunks.to_string()])
            .args(["--meta-listen", &format!("127.0.0.1:{meta}")])
            .args(["--portal-base", &base.to_string()])
            .args(["--data-port-base", &(base + chunks).to_string()])
            .args(["--metrics-port-base", &(base + 2 * chunks).to_string()])
            .args(["--liveness-timeout", "2s"])
            .args(["--vip", &vip])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ironblock dev");
        let mut err = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s).await;
            s
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(l))) => {
                    let done = l.starts_with("export IRONBLOCK_META=");
                    stdout.push(l);
                    if done {
                        break;
                    }
                }
                Ok(_) => {
                    let _ = child.kill().await;
                    let e = stderr.await.unwrap();
                    let metas: String = ["meta", "meta-2", "meta-3"]
                        .iter()
                        .map(|n| {
                            let log = std::fs::read_to_string(data.join(format!("logs/{n}.log")))
                                .unwrap_or_default();
                            let tail = &log[log.len().saturating_sub(2500)..];
                            format!("--- {n}.log (tail) ---\n{tail}\n")
                        })
                        .collect();
                    panic!("dev ended before its summary: {stdout:?}\nstderr: {e}\n{metas}");
                }
                Err(_) => panic!("no dev summary within 90s: {stdout:?}"),
            }
        }
        // Keep draining stdout so the supervisor never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Dev {
            base,
            child,
            stdout,
            stderr,
        }
    }

    fn vip(&self) -> String {
        self.stdout
            .iter()
            .find_map(|l| l.strip_prefix("vip "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_string()
    }

    fn meta_addr(&self) -> String {
        self.stdout
            .iter()
            .find_map(|l| l.strip_prefix("export IRONBLOCK_META="))
            .unwrap()
            .to_string()
    }

    /// SIGTERM, then the exit code and stderr (bounded).
    async fn stop(mut self) -> (i32, String) {
        signal(self.child.id().unwrap(), libc::SIGTERM);
        let st = tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .expect("dev did not stop within 40s")
            .unwrap();
        let err = self.stderr.await.unwrap();
        (st.code().unwrap_or(-1), err)
    }
}

/// The pids file as (name, pid).
fn read_pids(data: &Path) -> Vec<(String, i32)> {
    let text = std::fs::read_to_string(data.join("pids")).expect("pids file");
    text.lines()
        .map(|l| {
            let (n, p) = l.split_once(' ').expect("name pid");
            (n.to_string(), p.parse().expect("pid"))
        })
        .collect()
}

async fn wait_gone(pids: &[(String, i32)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|(_, p)| alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (n, p) in pids {
        assert!(!alive(*p), "{n} (pid {p}) still running");
    }
}

async fn ib(meta: &str, args: &[&str]) -> std::process::Output {
    let fut = Command::new(env!("CARGO_BIN_EXE_ironblock"))
        .args(args)
        .env("IRONBLOCK_META", meta)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("ironblock hung")
        .expect("run ironblock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_supervises_meta_and_chunk_processes() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_ironblock"));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cluster");

    let dev = Dev::start(&exe, &data, 3).await;
    let meta = dev.meta_addr();
    let pids = read_pids(&data);
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "meta",
            "meta-2",
            "meta-3",
            "chunk-1",
            "chunk-2",
            "chunk-3",
            "redirector-1",
            "redirector-2"
        ]
    );
    for (n, p) in &pids {
        assert!(alive(*p), "{n} not running");
    }
    assert!(
        dev.stdout.iter().any(|l| l.starts_with("vip ")),
        "no vip line: {:?}",
        dev.stdout
    );
    for (i, (_, pid)) in pids.iter().enumerate().skip(3).take(3) {
        let i = i - 2;
        assert!(data.join(format!("chunk-{i}/IRONBLOCK_CHUNK")).exists());
        let line = dev
            .stdout
            .iter()
            .find(|l| l.starts_with(&format!("chunk-{i} ")))
            .unwrap_or_else(|| panic!("no chunk-{i} line: {:?}", dev.stdout));
        assert!(line.contains(&format!("id {i} ")), "{line}");
        assert!(line.contains(&format!("pid {pid}")), "{line}");
        assert!(line.contains("portal 127.0.0.1:"), "{line}");
    }
    assert!(data.join("logs/meta.log").exists());
    assert!(data.join("logs/chunk-2.log").exists());

    // Meta really runs and the three chunks registered with it.
    let st = ib(&meta, &["status", "--output", "json"]).await;
    assert!(st.status.success(), "{st:?}");
    let j: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(j["health"], "ok");
    assert_eq!(j["chunks_alive"], 3, "{j}");
    // The three metas form one group (meta 1 formed it, 2 and 3 joined).
    let members = j["meta"]["members"].as_array().expect("meta members");
    assert_eq!(members.len(), 3, "{j}");
    assert!(members.iter().all(|m| m["role"] != "learner"), "{j}");
    assert!(j["meta"]["leader_id"].as_u64().unwrap_or(0) >= 1, "{j}");
    assert!(data.join("meta-3").exists());

    // A second dev on the same directory is refused.
    let second = Command::new(&exe)
        .arg("dev")
        .arg("--data")
        .arg(&data)
        .args(["--meta-listen", "127.0.0.1:1"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let e = String::from_utf8_lossy(&second.stderr);
    assert!(e.contains("already running"), "{e}");

    // A chunk killed with SIGKILL is reported, not restarted.
    signal(pids[4].1 as u32, libc::SIGKILL);
    wait_gone(&pids[4..5]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(read_pids(&data), pids, "pids file rewritten");

    let base = dev.base;
    let (code, err) = dev.stop().await;
    assert_eq!(code, 0, "stderr: {err}");
    assert!(
        err.contains("chunk-2") && err.contains("signal 9") && err.contains("not restarting"),
        "{err}"
    );
    assert!(!data.join("pids").exists(), "pids file left behind");
    wait_gone(&pids).await;

    // The directory can be started again (stamps kept: no second init), on
    // the same ports: its meta group knows its members by address. (A new
    // block, picked while the old ports sat in TIME_WAIT, left the three
    // metas unable to find each other: no leader.)
    let dev = Dev::start_at(&exe, &data, 3, base).await;
    let again = read_pids(&data);
    let (code, err) = dev.stop().await;
    assert_eq!(code, 0, "stderr: {err}");
    wait_gone(&again).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_a_two_chunk_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cluster");
    let dev = Dev::start(Path::new(env!("CARGO_BIN_EXE_ironblock")), &data, 2).await;
    let meta = dev.meta_addr();
    let pids = read_pids(&data);
    assert_eq!(pids.len(), 7, "3 metas, 2 chunks, 2 redirectors: {pids:?}");
    let portals = dev
        .stdout
        .iter()
        .filter(|l| l.starts_with("chunk-") && l.contains("portal 127.0.0.1:"))
        .count();
    assert_eq!(portals, 2, "{:?}", dev.stdout);

    let st = ib(&meta, &["status", "--output", "json"]).await;
    assert!(st.status.success(), "{st:?}");
    let j: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(j["chunks_alive"], 2, "{j}");
    let v = ib(&meta, &["volume", "create", "v", "--size", "64MiB"]).await;
    assert!(v.status.success(), "{v:?}");

    // Discovery and login through the VIP (redirected to a chunk) see the
    // LUN once the ACL lets this initiator in.
    let iqn = "iqn.2026-11.dev.ironblock:dev-test";
    let a = ib(&meta, &["acl", "add", "v", iqn]).await;
    assert!(a.status.success(), "{a:?}");
    let vip = dev.vip();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("iscsi-ls")
            .args(["-i", iqn, "-s", &format!("iscsi://{vip}")])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), out)
            .await
            .expect("iscsi-ls hung")
            .expect("run iscsi-ls: install libiscsi-bin (apt-get install -y libiscsi-bin)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("Lun:1") {
            assert!(text.contains(&format!("Portal:{vip}")), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "iscsi-ls through the VIP {vip} never listed the LUN: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let (code, err) = dev.stop().await;
    assert_eq!(code, 0, "stderr: {err}");
    assert!(!data.join("pids").exists());
    wait_gone(&pids).await;
}
