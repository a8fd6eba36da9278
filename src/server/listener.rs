//! Listening addresses (TCP over IPv4/IPv6, Unix sockets) and accepted connections.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};

use crate::access::ClientAddr;
use crate::error::{Error, ErrorKind, Result};

/// Where to listen: `HOST:PORT`, `[V6]:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::msg(
                    ErrorKind::InvalidInput,
                    "unix: needs a socket path",
                ));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let addr = match s.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                // Allow host names such as localhost:10809.
                use std::net::ToSocketAddrs;
                s.to_socket_addrs()
                    .ok()
                    .and_then(|mut it| it.next())
                    .ok_or_else(|| {
                        Error::msg(
                            ErrorKind::InvalidInput,
                            format!("invalid listen address {s:?}: expected HOST:PORT, [V6]:PORT or unix:PATH"),
                        )
                    })?
            }
        };
        Ok(ListenAddr::Tcp(addr))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The reading half of a connection.
pub type ReadHalf = Pin<Box<dyn AsyncRead + Send>>;
/// The writing half of a connection.
pub type WriteHalf = Pin<Box<dyn AsyncWrite + Send>>;

/// An accepted connection, before it is split into halves.
pub enum Stream {
    /// TCP.
    Tcp(tokio::net::TcpStream),
    /// Unix socket.
    Unix(tokio::net::UnixStream),
}

impl Stream {
    /// Splits into owned halves without a shared lock, for the transmission phase.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::pin(r), Box::pin(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::pin(r), Box::pin(w))
            }
        }
    }
}

// The handshake reads and writes the whole stream (and TLS wraps it); only the
// transmission phase splits it.
impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An accepted connection and where it comes from.
pub struct Accepted {
    /// The connection.
    pub stream: Stream,
    /// The client's address, for access rules.
    pub addr: ClientAddr,
    /// A printable name of the peer, for logs.
    pub peer: String,
}

/// A bound listener.
pub enum Listener {
    /// TCP listener.
    Tcp(TcpListener),
    /// Unix listener; the socket file is removed when this is dropped, unless the socket
    /// was inherited.
    Unix(UnixListener, UnixSocketGuard),
}

/// Removes a Unix socket file on drop, if this process created it.
pub struct UnixSocketGuard {
    path: PathBuf,
    /// False for sockets handed over by a service manager, which owns their files.
    remove: bool,
}

impl Drop for UnixSocketGuard {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn bind_error(addr: &ListenAddr, err: io::Error) -> Error {
    Error::from(err)
        .with_op("listen")
        .with_message(format!("cannot listen on {addr}"))
}

/// Removes a stale socket file left by a previous run, but never a live one or a file of
/// another kind.
fn clear_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another server is listening on this socket",
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl Listener {
    /// Binds `addr`.
    pub async fn bind(addr: &ListenAddr) -> Result<Listener> {
        match addr {
            ListenAddr::Tcp(sa) => {
                let socket = match sa {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
                }
                .map_err(|e| bind_error(addr, e))?;
                socket
                    .set_reuseaddr(true)
                    .map_err(|e| bind_error(addr, e))?;
                socket.bind(*sa).map_err(|e| bind_error(addr, e))?;
                let listener = socket.listen(1024).map_err(|e| bind_error(addr, e))?;
                Ok(Listener::Tcp(listener))
            }
            ListenAddr::Unix(path) => {
                clear_stale_socket(path).map_err(|e| bind_error(addr, e))?;
                let listener = UnixListener::bind(path).map_err(|e| bind_error(addr, e))?;
                Ok(Listener::Unix(
                    listener,
                    UnixSocketGuard {
                        path: path.clone(),
                        remove: true,
                    },
                ))
            }
        }
    }

    /// Serves on a listening TCP socket bound by someone else (a service manager's socket
    /// activation). Must be called within the tokio runtime.
    pub fn from_std_tcp(listener: std::net::TcpListener) -> Result<Listener> {
        listener.set_nonblocking(true)?;
        Ok(Listener::Tcp(TcpListener::from_std(listener)?))
    }

    /// Serves on a listening Unix socket bound by someone else. Its file is left in place
    /// when the listener goes: whoever created it removes it. Must be called within the
    /// tokio runtime.
    pub fn from_std_unix(listener: std::os::unix::net::UnixListener) -> Result<Listener> {
        listener.set_nonblocking(true)?;
        let path = listener
            .local_addr()?
            .as_pathname()
            .map_or_else(|| PathBuf::from("(unnamed)"), Path::to_path_buf);
        Ok(Listener::Unix(
            UnixListener::from_std(listener)?,
            UnixSocketGuard {
                path,
                remove: false,
            },
        ))
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
            Listener::Unix(_, guard) => Ok(ListenAddr::Unix(guard.path.clone())),
        }
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                set_keepalive(&s);
                Ok(Accepted {
                    stream: Stream::Tcp(s),
                    addr: ClientAddr::Tcp(peer),
                    peer: peer.to_string(),
                })
            }
            Listener::Unix(l, guard) => {
                let (s, _) = l.accept().await?;
                Ok(Accepted {
                    stream: Stream::Unix(s),
                    addr: ClientAddr::Unix,
                    peer: format!("unix:{}", guard.path.display()),
                })
            }
        }
    }
}

/// Turns on TCP keepalive so that connections of clients that vanished without closing
/// (power loss, cable pulled) are noticed and their slots freed within a few minutes.
fn set_keepalive(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let opts: [(libc::c_int, libc::c_int, libc::c_int); 4] = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        #[cfg(target_os = "linux")]
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60),
        // macOS names the idle time TCP_KEEPALIVE.
        #[cfg(not(target_os = "linux"))]
        (libc::IPPROTO_TCP, libc::TCP_KEEPALIVE, 60),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
    ];
    for (level, name, value) in opts {
        // SAFETY: `fd` is a valid socket owned by `stream` for the duration of the call, and
        // `value` is a live c_int whose size is passed alongside its address.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(
                "setsockopt({level}, {name}) failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "127.0.0.1:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "[::1]:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:10809".parse().unwrap())
        );
        assert_eq!(
            "unix:/tmp/s.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/s.sock".into())
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("nonsense".parse::<ListenAddr>().is_err());
        assert!("1.2.3.4".parse::<ListenAddr>().is_err());
    }

    #[tokio::test]
    async fn inherited_sockets_are_served_and_their_files_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let std_unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let unix = Listener::from_std_unix(std_unix).unwrap();
        assert_eq!(unix.local_addr().unwrap(), ListenAddr::Unix(path.clone()));
        let client = tokio::net::UnixStream::connect(&path);
        let (accepted, connected) = tokio::join!(unix.accept(), client);
        assert!(accepted.is_ok() && connected.is_ok());
        drop(unix);
        assert!(path.exists(), "the socket file belongs to whoever bound it");

        let std_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_tcp.local_addr().unwrap();
        let tcp = Listener::from_std_tcp(std_tcp).unwrap();
        assert_eq!(tcp.local_addr().unwrap(), ListenAddr::Tcp(addr));
        let client = tokio::net::TcpStream::connect(addr);
        let (accepted, connected) = tokio::join!(tcp.accept(), client);
        assert!(accepted.is_ok() && connected.is_ok());
    }

    #[tokio::test]
    async fn bound_unix_sockets_are_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = Listener::bind(&ListenAddr::Unix(path.clone()))
            .await
            .unwrap();
        assert!(path.exists());
        drop(l);
        assert!(!path.exists());
    }
}
