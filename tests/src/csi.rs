//! A running `ironblock-csi` process on a unix socket, and gRPC clients of
//! its three services over that socket.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use ironblock_proto::csi;
use ironblock_proto::csi::controller_client::ControllerClient;
use ironblock_proto::csi::identity_client::IdentityClient;
use ironblock_proto::csi::node_client::NodeClient;
use ironblock_proto::csi::volume_capability::access_mode::Mode;
use ironblock_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{bin_path, log_tail, terminate, READY_TIMEOUT};

/// A volume capability: raw `"block"` access, or a filesystem of that name
/// mounted; `mode` the access mode.
pub fn capability(access: &str, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(match access {
            "block" => AccessType::Block(BlockVolume {}),
            fs => AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            }),
        }),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// `ironblock-csi` serving on `DIR/csi.sock`; SIGTERMed on drop.
pub struct CsiProcess {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl CsiProcess {
    /// Starts `ironblock-csi --endpoint unix://DIR/csi.sock --mode MODE
    /// ARGS...` and waits until the socket accepts connections.
    pub fn start(dir: &Path, mode: &str, args: &[&str]) -> CsiProcess {
        let endpoint = format!("unix://{}", dir.join("csi.sock").display());
        let mut all = vec!["--endpoint", &endpoint, "--mode", mode];
        all.extend_from_slice(args);
        Self::spawn(dir, &all, &[])
    }

    /// Starts `ironblock-csi ARGS...` with extra environment variables; the
    /// endpoint must be `DIR/csi.sock` (by flag or `CSI_ENDPOINT`).
    pub fn spawn(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> CsiProcess {
        std::fs::create_dir_all(dir).expect("create csi dir");
        let socket = dir.join("csi.sock");
        let log = dir.join("csi.log");
        let child = Command::new(bin_path("ironblock-csi"))
            .args(args)
            .envs(envs.iter().copied())
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LIB_BACKTRACE", "0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create csi log"))
            .spawn()
            .expect("spawn ironblock-csi");
        let mut p = CsiProcess { child, socket, log };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!(
                    "ironblock-csi exited at start ({st}); log:\n{}",
                    p.log_tail()
                );
            }
            if std::os::unix::net::UnixStream::connect(&p.socket).is_ok() {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "ironblock-csi socket not ready; log:\n{}",
                p.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The end of the driver's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 8000)
    }

    /// A gRPC channel over the unix socket.
    pub async fn channel(&self) -> Channel {
        uds_channel(&self.socket).await
    }

    /// Identity client.
    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    /// Controller client.
    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    /// Node client.
    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }
}

impl Drop for CsiProcess {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// A tonic channel to a gRPC server on a unix socket.
pub async fn uds_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .expect("connect to the CSI socket")
}
