//! Readiness notifications to a service manager (systemd's `sd_notify` protocol): one
//! datagram of `KEY=VALUE` lines to the Unix socket named by `NOTIFY_SOCKET`, a path or,
//! starting with `@`, a name in the abstract namespace.
//!
//! The server says `READY=1` once it listens, `RELOADING=1` and then `READY=1` around a
//! reload, and `STOPPING=1` when it begins to shut down, so `systemctl start` returns
//! only once clients can connect and `systemctl reload` only once the reload is done.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use tracing::debug;

/// Where notifications go; does nothing without `NOTIFY_SOCKET`.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// A notifier for the socket named by `NOTIFY_SOCKET`, if set.
    pub fn from_env() -> Notifier {
        Notifier {
            target: std::env::var_os("NOTIFY_SOCKET")
                .and_then(|v| parse_target(v.as_encoded_bytes())),
        }
    }

    /// True when a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (`READY=1`, ...). Failures are logged and otherwise ignored: the
    /// server works without a manager.
    pub fn notify(&self, state: &str) {
        let Some(target) = &self.target else {
            return;
        };
        if let Err(e) = send(target, state) {
            debug!("cannot notify the service manager ({state:?}): {e}");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1`, with the monotonic time systemd asks reloading services to send.
    pub fn reloading(&self) {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
            monotonic_usec()
        ));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=shutting down");
    }
}

fn parse_target(value: &[u8]) -> Option<Target> {
    match value {
        [] => None,
        [b'@', name @ ..] => Some(Target::Abstract(name.to_vec())),
        [b'/', ..] => {
            use std::os::unix::ffi::OsStrExt;
            Some(Target::Path(PathBuf::from(std::ffi::OsStr::from_bytes(
                value,
            ))))
        }
        // Other forms (vsock:...) are not for a server on a NAS.
        _ => None,
    }
}

fn send(target: &Target, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    match target {
        Target::Path(path) => socket.send_to(state.as_bytes(), path)?,
        #[cfg(target_os = "linux")]
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?
        }
        // Abstract socket names are Linux's (and so is systemd).
        #[cfg(not(target_os = "linux"))]
        Target::Abstract(_) => return Err(std::io::ErrorKind::Unsupported.into()),
    };
    Ok(())
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local passed to it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_paths_and_abstract_names() {
        assert_eq!(parse_target(b""), None);
        assert_eq!(parse_target(b"relative"), None);
        assert_eq!(
            parse_target(b"/run/systemd/notify"),
            Some(Target::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            parse_target(b"@/org/freedesktop/systemd1/notify/1"),
            Some(Target::Abstract(
                b"/org/freedesktop/systemd1/notify/1".to_vec()
            ))
        );
    }

    #[test]
    fn sends_one_datagram_per_notification() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Target::Path(path)),
        };
        assert!(n.enabled());
        n.ready("serving 2 exports");
        n.stopping();
        let mut buf = [0u8; 256];
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving 2 exports");
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=shutting down");
        n.reloading();
        let len = manager.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");

        let name = format!("strata-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            target: parse_target(format!("@{name}").as_bytes()),
        };
        n.notify("READY=1");
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        // Without a manager nothing happens.
        Notifier::default().notify("READY=1");
    }
}
