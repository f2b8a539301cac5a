//! Serving the CSI services on a unix socket.

use std::future::Future;
use std::path::PathBuf;

use ironblock_proto::csi::controller_server::ControllerServer;
use ironblock_proto::csi::identity_server::IdentityServer;
use ironblock_proto::csi::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::controller::ControllerService;
use crate::identity::IdentityService;
use crate::node::NodeService;

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint is not `unix://PATH` (or a path).
    #[error("endpoint {0:?} must be unix:///PATH")]
    Endpoint(String),
    /// Binding the socket failed.
    #[error("bind {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The socket path of an endpoint: `unix:///csi/csi.sock`, `unix:/x`, or a
/// bare absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let p = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if p.is_empty() || endpoint.contains("://") && !endpoint.starts_with("unix://") {
        return Err(ServeError::Endpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(p))
}

/// Binds `endpoint` (a stale socket file is replaced) and serves Identity
/// plus the given services until `shutdown` completes; removes the socket
/// afterwards. `ready` is called once the socket accepts connections.
pub async fn serve(
    endpoint: &str,
    identity: IdentityService,
    controller: Option<ControllerService>,
    node: Option<NodeService>,
    ready: impl FnOnce(&std::path::Path),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let path = socket_path(endpoint)?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| ServeError::Bind {
        path: path.clone(),
        source,
    })?;
    ready(&path);
    // The sidecars keep their connections open for good, so a graceful
    // stop waits for in-flight calls at most SHUTDOWN_GRACE.
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let mut rx2 = rx.clone();
    let server = tonic::transport::Server::builder()
        .layer(crate::metrics::CallMetricsLayer)
        .add_service(IdentityServer::new(identity))
        .add_optional_service(controller.map(ControllerServer::new))
        .add_optional_service(node.map(NodeServer::new))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            let _ = rx.wait_for(|v| *v).await;
        });
    let trigger = async move {
        shutdown.await;
        let _ = tx.send(true);
        // Keep the sender alive while the grace period runs.
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        drop(tx);
    };
    let res = tokio::select! {
        r = server => r.map_err(ServeError::from),
        _ = async {
            tokio::join!(trigger, async { let _ = rx2.wait_for(|v| *v).await; });
        } => Ok(()),
    };
    let _ = std::fs::remove_file(&path);
    res
}

/// How long a stopping server waits for in-flight calls.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(socket_path("/x.sock").unwrap(), PathBuf::from("/x.sock"));
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://").is_err());
    }
}
