//! Readiness notifications to a service manager (systemd's `sd_notify` protocol), sent
//! by the `sd-notify` crate to the socket `NOTIFY_SOCKET` names.
//!
//! The server says `READY=1` once it listens, `RELOADING=1` and then `READY=1` around a
//! reload, and `STOPPING=1` when it begins to shut down, so `systemctl start` returns
//! only once clients can connect and `systemctl reload` only once the reload is done.
//!
//! `NOTIFY_SOCKET` is normally a path, which the crate handles; an abstract socket name
//! (`@...`), which some service managers give, is sent to here on Linux, in the same
//! message format.

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Where notifications go; does nothing without `NOTIFY_SOCKET`.
#[derive(Debug, Default)]
pub struct Notifier {
    enabled: bool,
    /// The name of an abstract socket (`NOTIFY_SOCKET=@name`), without the `@`.
    abstract_name: Option<Vec<u8>>,
}

impl Notifier {
    /// A notifier for the socket named by `NOTIFY_SOCKET`, if set.
    pub fn from_env() -> Notifier {
        let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::default();
        };
        let abstract_name = socket
            .as_encoded_bytes()
            .strip_prefix(b"@")
            .map(<[u8]>::to_vec);
        if abstract_name.is_some() && !cfg!(target_os = "linux") {
            warn!(
                "NOTIFY_SOCKET={}: abstract sockets exist only on Linux, the service \
                 manager will not hear when the server is ready",
                socket.to_string_lossy()
            );
        }
        Notifier {
            enabled: true,
            abstract_name,
        }
    }

    /// True when a service manager listens.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Sends `states` as one message. Failures are logged and otherwise ignored: the
    /// server works without a manager.
    fn notify(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        let sent = match &self.abstract_name {
            Some(name) => send_abstract(name, states),
            None => sd_notify::notify(states),
        };
        if let Err(e) = sent {
            debug!("cannot notify the service manager ({states:?}): {e}");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `RELOADING=1`, with the monotonic time systemd asks reloading services to send.
    pub fn reloading(&self) {
        let status = NotifyState::Status("reloading the configuration");
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.notify(&[NotifyState::Reloading, now, status]),
            Err(e) => {
                debug!("cannot read the monotonic clock: {e}");
                self.notify(&[NotifyState::Reloading, status]);
            }
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
    }
}

/// Sends `states` to the abstract socket `name`, one `KEY=VALUE` line each, as
/// `sd_notify::notify` does to a path.
#[cfg(target_os = "linux")]
fn send_abstract(name: &[u8], states: &[NotifyState<'_>]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    let addr = SocketAddr::from_abstract_name(name)?;
    UnixDatagram::unbound()?.send_to_addr(message.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_name: &[u8], _states: &[NotifyState<'_>]) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}
