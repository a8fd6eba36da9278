//! Readiness notifications to a service manager (systemd's `sd_notify` protocol), sent
//! by the `sd-notify` crate to the socket `NOTIFY_SOCKET` names.
//!
//! The server says `READY=1` once it listens, `RELOADING=1` and then `READY=1` around a
//! reload, and `STOPPING=1` when it begins to shut down, so `systemctl start` returns
//! only once clients can connect and `systemctl reload` only once the reload is done.
//!
//! `NOTIFY_SOCKET` must be a path, as current systemd versions give; an abstract socket
//! name (`@...`), which some old versions used, is reported at start-up and otherwise
//! ignored.

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Where notifications go; does nothing without `NOTIFY_SOCKET`.
#[derive(Debug, Default)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// A notifier for the socket named by `NOTIFY_SOCKET`, if set.
    pub fn from_env() -> Notifier {
        let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::default();
        };
        if socket.as_encoded_bytes().starts_with(b"@") {
            warn!(
                "NOTIFY_SOCKET={}: abstract sockets are not supported, the service \
                 manager will not hear when the server is ready",
                socket.to_string_lossy()
            );
        }
        Notifier { enabled: true }
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
        if let Err(e) = sd_notify::notify(states) {
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
