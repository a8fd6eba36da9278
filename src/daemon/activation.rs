//! Socket activation: listening sockets a service manager (systemd) bound and passed
//! down, as its `sd_listen_fds` protocol describes.
//!
//! The `sd-notify` crate reads the protocol's variables (`LISTEN_PID`, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`), ignores sockets meant for another process, marks the descriptors
//! close-on-exec and removes the variables, so that no child process takes the sockets
//! for its own. What is checked here is what the server needs of each descriptor: a
//! listening stream socket, TCP or Unix.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::error::{Error, ErrorKind, Result};
use crate::server::Listener;

/// A passed descriptor, checked to be a listening stream socket.
#[derive(Debug)]
pub struct Inherited {
    /// The descriptor, owned from now on.
    fd: OwnedFd,
    /// Its number, for messages.
    pub number: RawFd,
    /// Its name from `LISTEN_FDNAMES`, if any.
    pub name: Option<String>,
    /// TCP or Unix.
    family: Family,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Tcp,
    Unix,
}

/// Takes the sockets passed to this process, if any: reads and removes the variables,
/// and checks each descriptor.
///
/// # Safety
///
/// Must be called while the process has a single thread (before any runtime starts):
/// it removes environment variables, which other threads may be reading. It must be
/// called at most once, since it takes ownership of the descriptors.
pub unsafe fn take() -> Result<Vec<Inherited>> {
    // SAFETY: the caller guarantees that no other thread exists.
    let passed = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(|e| Error::from(e).with_message("socket activation"))?;
    let mut out = Vec::with_capacity(passed.len());
    for (number, name) in passed {
        let family = check_socket(number)?;
        // SAFETY: the protocol hands descriptors 3.. to this process, which is their only
        // user; check_socket showed this one is an open socket, and each number is
        // taken once, here.
        let fd = unsafe { OwnedFd::from_raw_fd(number) };
        out.push(Inherited {
            fd,
            number,
            // The protocol's stand-in when the manager named no socket.
            name: Some(name).filter(|n| !n.is_empty() && n != "unknown"),
            family,
        });
    }
    Ok(out)
}

/// Checks that `fd` is a listening stream socket, TCP (IPv4 or IPv6) or Unix.
fn check_socket(fd: RawFd) -> Result<Family> {
    let fail = |what: &str| {
        Error::from(std::io::Error::last_os_error())
            .with_message(format!("socket activation: descriptor {fd}: {what}"))
    };
    let refuse = |what: String| {
        Error::msg(
            ErrorKind::InvalidInput,
            format!("socket activation: descriptor {fd} {what}"),
        )
    };
    let int_opt = |name: libc::c_int| -> Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are live locals whose addresses and size are passed
        // together; getsockopt writes at most `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        if rc < 0 {
            Err(fail("is not a socket"))
        } else {
            Ok(value)
        }
    };
    if int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(refuse("is not a stream socket".to_owned()));
    }
    if int_opt(libc::SO_ACCEPTCONN)? == 0 {
        return Err(refuse(
            "is not listening (a service's sockets need Accept=no)".to_owned(),
        ));
    }
    match address_family(fd).map_err(|_| fail("is not a socket"))? {
        libc::AF_INET | libc::AF_INET6 => Ok(Family::Tcp),
        libc::AF_UNIX => Ok(Family::Unix),
        other => Err(refuse(format!(
            "has address family {other}, not TCP or Unix"
        ))),
    }
}

/// The address family of the socket `fd` (`getsockname` has it everywhere, where
/// `SO_DOMAIN` is Linux's).
fn address_family(fd: std::os::fd::RawFd) -> std::io::Result<libc::c_int> {
    // SAFETY: an all-zero sockaddr_storage is a valid value of the type.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` is writable for `len` bytes, which getsockname does not exceed.
    let rc = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &raw mut len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(libc::c_int::from(addr.ss_family))
}

impl Inherited {
    /// Turns the descriptor into a listener. Must be called within the tokio runtime.
    pub fn into_listener(self) -> Result<Listener> {
        match self.family {
            Family::Tcp => Listener::from_std_tcp(std::net::TcpListener::from(self.fd)),
            Family::Unix => {
                Listener::from_std_unix(std::os::unix::net::UnixListener::from(self.fd))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_descriptors() {
        use std::os::fd::AsRawFd;
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(check_socket(tcp.as_raw_fd()).unwrap(), Family::Tcp);
        // SAFETY: F_GETFD only reads the flags of a descriptor `tcp` keeps open.
        let flags = unsafe { libc::fcntl(tcp.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);

        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        assert_eq!(check_socket(unix.as_raw_fd()).unwrap(), Family::Unix);

        let file = std::fs::File::open("/dev/null").unwrap();
        let e = check_socket(file.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = check_socket(udp.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a stream socket"), "{e}");

        let connected = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let e = check_socket(connected.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not listening"), "{e}");
    }
}
