//! Socket activation: listening sockets a service manager (systemd) bound and passed
//! down, as its `sd_listen_fds` protocol describes.
//!
//! The manager sets `LISTEN_PID` to the pid of the process meant to take the sockets,
//! `LISTEN_FDS` to their number, and optionally `LISTEN_FDNAMES` to their names, colon
//! separated; the sockets are descriptors 3, 4, ... in order. The variables are removed
//! once read, so that no child process takes the sockets for its own, and the
//! descriptors are marked close-on-exec.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::error::{Error, ErrorKind, Result};
use crate::server::Listener;

/// The first descriptor passed.
pub const FIRST_FD: RawFd = 3;

/// What the environment says about passed sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenEnv {
    /// How many descriptors, from [`FIRST_FD`] on.
    pub count: usize,
    /// Their names, one per descriptor (empty when `LISTEN_FDNAMES` is absent).
    pub names: Vec<String>,
}

/// Reads the protocol's variables (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`) for the
/// process `own_pid`. `None` when no sockets were passed, or when they were meant for
/// another process (a parent that did not clear the variables).
pub fn parse_listen_env(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Option<ListenEnv>> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    let bad = |what: String| Error::msg(ErrorKind::InvalidInput, what);
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| bad(format!("LISTEN_PID={pid:?} is not a process id")))?;
    if pid != own_pid {
        return Ok(None);
    }
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| bad(format!("LISTEN_FDS={fds:?} is not a number")))?;
    // Far more than any unit passes; a larger number is a mistake, not sockets.
    if count > 1024 {
        return Err(bad(format!("LISTEN_FDS={count} is too many descriptors")));
    }
    let names: Vec<String> = match names {
        None => Vec::new(),
        Some(text) => {
            let names: Vec<String> = text.split(':').map(str::to_owned).collect();
            if names.len() != count {
                return Err(bad(format!(
                    "LISTEN_FDNAMES names {} sockets but LISTEN_FDS passes {count}",
                    names.len()
                )));
            }
            names
        }
    };
    Ok(Some(ListenEnv { count, names }))
}

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
/// checks each descriptor and marks it close-on-exec.
///
/// # Safety
///
/// Must be called while the process has a single thread (before any runtime starts):
/// it removes environment variables, which other threads may be reading. It must be
/// called at most once, since it takes ownership of the descriptors.
pub unsafe fn take() -> Result<Vec<Inherited>> {
    let var = |name| std::env::var(name).ok();
    let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the caller guarantees that no other thread exists.
        unsafe { std::env::remove_var(name) };
    }
    let Some(env) = parse_listen_env(
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(env.count);
    for i in 0..env.count {
        let number = FIRST_FD + RawFd::try_from(i).expect("at most 1024 descriptors");
        let family = check_socket(number)?;
        // SAFETY: the protocol hands descriptors FIRST_FD.. to this process, which is
        // their only user; check_socket showed this one is open, and each number is
        // taken once, here.
        let fd = unsafe { OwnedFd::from_raw_fd(number) };
        out.push(Inherited {
            fd,
            number,
            name: env.names.get(i).cloned().filter(|n| !n.is_empty()),
            family,
        });
    }
    Ok(out)
}

/// Sets close-on-exec on `fd` and checks that it is a listening stream socket, TCP
/// (IPv4 or IPv6) or Unix.
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
    // SAFETY: fcntl on a descriptor number only reads and sets its flags; a closed
    // number fails with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(fail("not open"));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(fail("cannot set close-on-exec"));
    }
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
    fn reads_the_variables_for_this_process_only() {
        assert_eq!(parse_listen_env(None, None, None, 7).unwrap(), None);
        assert_eq!(parse_listen_env(Some("7"), None, None, 7).unwrap(), None);
        assert_eq!(
            parse_listen_env(Some("8"), Some("2"), None, 7).unwrap(),
            None,
            "meant for another process"
        );
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), None, 7).unwrap(),
            Some(ListenEnv {
                count: 2,
                names: vec![]
            })
        );
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), Some("nbd:nbd-unix"), 7).unwrap(),
            Some(ListenEnv {
                count: 2,
                names: vec!["nbd".into(), "nbd-unix".into()]
            })
        );
        assert_eq!(
            parse_listen_env(Some("7"), Some("0"), None, 7).unwrap(),
            Some(ListenEnv {
                count: 0,
                names: vec![]
            })
        );
    }

    #[test]
    fn refuses_malformed_variables() {
        for (pid, fds, names) in [
            ("x", "1", None),
            ("7", "one", None),
            ("7", "-1", None),
            ("7", "5000", None),
            ("7", "2", Some("only-one")),
        ] {
            assert!(
                parse_listen_env(Some(pid), Some(fds), names, 7).is_err(),
                "{pid} {fds} {names:?}"
            );
        }
    }

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
