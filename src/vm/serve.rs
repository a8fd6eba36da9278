//! The Strata server a launcher runs in its own process, for a VM whose disk is a local
//! image: NBD on a private Unix socket in the bundle, and the control API beside it,
//! through which the launcher takes and rolls back disk snapshots exactly as it does
//! with a server elsewhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use super::url::NbdUrl;
use crate::api::client::ControlTarget;
use crate::error::{Error, ErrorKind, Result};
use crate::server::control::{ControlConfig, ControlServer, ControlState};
use crate::server::export::open_export;
use crate::server::{Exports, ListenAddr, Listener, Server, ServerConfig, ShutdownHandle};

/// The export name the in-process server gives the disk.
pub const EXPORT: &str = "disk";

/// Longest Unix socket path (`sun_path` holds 108 bytes on Linux, 104 on macOS).
const MAX_SOCKET_PATH: usize = 100;

/// A running in-process server.
#[derive(Debug)]
pub struct LocalServer {
    shutdown: ShutdownHandle,
    served: tokio::task::JoinHandle<Result<()>>,
    control_task: tokio::task::JoinHandle<()>,
    /// The disk's URL, for the VM.
    pub url: NbdUrl,
    /// The control API, for snapshots.
    pub control: ControlTarget,
    sockets: [PathBuf; 2],
}

fn check_socket_path(path: &Path) -> Result<()> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "the bundle's path is too long for a Unix socket in it ({}, more than \
                 {MAX_SOCKET_PATH} bytes): keep bundles in a shorter directory (--bundles)",
                path.display()
            ),
        ));
    }
    Ok(())
}

impl LocalServer {
    /// Serves `image` (a Strata image or a raw file) as export [`EXPORT`] on the Unix
    /// socket `nbd`, with the control API on `control`.
    pub async fn start(
        image: &Path,
        nbd: &Path,
        control: &Path,
        read_only: bool,
    ) -> Result<LocalServer> {
        check_socket_path(nbd)?;
        check_socket_path(control)?;
        let spec = image.to_string_lossy().into_owned();
        let export = open_export(EXPORT, &spec, read_only, None, "")?;
        let exports = Arc::new(Exports::new());
        exports.insert(export);
        let addr = ListenAddr::Unix(nbd.to_path_buf());
        let listener = Listener::bind(&addr).await?;
        let server = Server::new(exports.clone(), ServerConfig::default());
        let shutdown = server.shutdown_handle();
        let state = ControlState::new(exports, &[addr], server.connection_gauge());
        let config = ControlConfig {
            socket: Some(control.to_path_buf()),
            ..ControlConfig::default()
        };
        let control_server = match ControlServer::bind(config, state).await {
            Ok(c) => c,
            Err(e) => {
                shutdown.shutdown();
                return Err(e);
            }
        };
        let control_task = tokio::spawn(control_server.serve(shutdown.clone()));
        let served = tokio::spawn(server.serve(vec![listener]));
        Ok(LocalServer {
            shutdown,
            served,
            control_task,
            url: NbdUrl::unix(nbd, EXPORT),
            control: ControlTarget::Unix(control.to_path_buf()),
            sockets: [nbd.to_path_buf(), control.to_path_buf()],
        })
    }

    /// Shuts the server down: requests in flight finish, the export is flushed.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.shutdown();
        let _ = self.control_task.await;
        let result = match self.served.await {
            Ok(r) => r,
            Err(e) => Err(Error::msg(
                ErrorKind::Io,
                format!("the disk server failed: {e}"),
            )),
        };
        for socket in &self.sockets {
            if let Err(e) = std::fs::remove_file(socket) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!("cannot remove {}: {e}", socket.display());
                }
            }
        }
        result
    }
}
