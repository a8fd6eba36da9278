//! The handshake driver: runs `proto`'s handshake state machine over a connection's
//! stream, upgrades to TLS when the client asks with `STARTTLS` (the same state machine
//! then continues inside TLS), and hands back the connection ready for its session.
//!
//! The catalog each stretch of the handshake reads is the view of one client
//! ([`super::export::ClientView`]), rebuilt after `STARTTLS`, when the client's
//! certificate is known.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
#[cfg(feature = "tls")]
use tracing::info;

use super::listener::Stream;
use super::{Exports, Shared, TlsSettings, session};
use crate::access::{self, ClientAddr};
use crate::proto::{Negotiated, Progress, ProtocolError, ServerHandshake};

/// True for errors that only mean the peer hung up.
pub(super) fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof
    )
}

/// Why a handshake ended without an export.
#[derive(Debug)]
pub(super) enum HandshakeError {
    Protocol(ProtocolError),
    Io(std::io::Error),
    Closed,
    /// The TLS handshake after `STARTTLS` failed (bad or missing client certificate,
    /// no common protocol version, plaintext where TLS was expected, ...).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Tls(std::io::Error),
    TlsUnavailable,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Protocol(e) => write!(f, "{e}"),
            HandshakeError::Io(e) => write!(f, "{e}"),
            HandshakeError::Closed => f.write_str("client closed the connection"),
            HandshakeError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            HandshakeError::TlsUnavailable => f.write_str("TLS requested but not available"),
        }
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// A connection that finished its handshake, ready for the transmission phase.
pub(super) struct Ready {
    pub(super) conn: session::Connection,
    pub(super) negotiated: Negotiated,
    /// The client as access rules see it, after TLS if it upgraded.
    pub(super) client: access::Client,
}

/// How a stretch of the handshake on one stream ended.
enum Step {
    /// The client chose an export, with any bytes it sent past the handshake.
    Done(Box<Negotiated>, BytesMut),
    /// The client aborted.
    Aborted,
    /// `STARTTLS` was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// Runs the handshake: in plaintext, and after `STARTTLS` over TLS, which then carries
/// the rest of the connection. Returns `None` if the client aborted.
pub(super) async fn negotiate(
    mut stream: Stream,
    addr: ClientAddr,
    shared: &Shared,
) -> std::result::Result<Option<Ready>, HandshakeError> {
    let mut hs = ServerHandshake::new(shared.config.handshake.clone());
    let mut input = BytesMut::with_capacity(4096);
    let client = access::Client {
        addr,
        identity: None,
        tls: false,
    };
    match drive(&mut stream, &mut hs, &mut input, &shared.exports, &client).await? {
        Step::Aborted => Ok(None),
        Step::Done(negotiated, leftover) => {
            // Plaintext keeps the socket's own halves: no lock between reader and writer.
            let (reader, writer) = stream.into_split();
            Ok(Some(Ready {
                conn: session::Connection {
                    reader,
                    writer,
                    leftover,
                    tls: false,
                },
                negotiated: *negotiated,
                client,
            }))
        }
        Step::StartTls => {
            let Some(tls) = &shared.config.tls else {
                return Err(HandshakeError::TlsUnavailable);
            };
            upgrade(stream, tls, hs, client, shared).await
        }
    }
}

#[cfg(feature = "tls")]
async fn upgrade(
    stream: Stream,
    tls: &TlsSettings,
    mut hs: ServerHandshake,
    mut client: access::Client,
    shared: &Shared,
) -> std::result::Result<Option<Ready>, HandshakeError> {
    // The state machine has refused any byte sent behind STARTTLS, so nothing read in
    // plaintext is carried into the TLS session.
    let (mut stream, identity) = tls.accept(stream).await.map_err(HandshakeError::Tls)?;
    match &identity {
        Some(id) => info!(identity = %id, "TLS established with a verified client certificate"),
        None => info!("TLS established"),
    }
    client.identity = identity;
    client.tls = true;
    hs.tls_established();
    let mut input = BytesMut::with_capacity(4096);
    match drive(&mut stream, &mut hs, &mut input, &shared.exports, &client).await? {
        Step::Aborted => {
            let _ = stream.shutdown().await;
            Ok(None)
        }
        Step::Done(negotiated, leftover) => {
            // TLS state is shared by both directions, so the halves share a lock.
            let (reader, writer) = tokio::io::split(stream);
            Ok(Some(Ready {
                conn: session::Connection {
                    reader: Box::pin(reader),
                    writer: Box::pin(writer),
                    leftover,
                    tls: true,
                },
                negotiated: *negotiated,
                client,
            }))
        }
        // The state machine refuses a second STARTTLS.
        Step::StartTls => Err(HandshakeError::TlsUnavailable),
    }
}

#[cfg(not(feature = "tls"))]
async fn upgrade(
    _stream: Stream,
    _tls: &TlsSettings,
    _hs: ServerHandshake,
    _client: access::Client,
    _shared: &Shared,
) -> std::result::Result<Option<Ready>, HandshakeError> {
    Err(HandshakeError::TlsUnavailable)
}

/// Drives the handshake state machine over `io` until the client picks an export, aborts
/// or asks for TLS. The catalog is the one this client may see: what it may open can
/// change when TLS brings a certificate.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    hs: &mut ServerHandshake,
    input: &mut BytesMut,
    exports: &Exports,
    client: &access::Client,
) -> std::result::Result<Step, HandshakeError> {
    let catalog = exports.seen_by(client);
    loop {
        if let Some(out) = hs.poll_transmit() {
            io.write_all(&out).await?;
            io.flush().await?;
        }
        let progress = hs
            .handle_input(input, &catalog)
            .map_err(HandshakeError::Protocol)?;
        match progress {
            Progress::NeedInput => {
                if io.read_buf(input).await? == 0 {
                    return Err(HandshakeError::Closed);
                }
            }
            Progress::Continue => {}
            Progress::StartTls | Progress::Abort | Progress::Done(_) => {
                if let Some(out) = hs.poll_transmit() {
                    io.write_all(&out).await?;
                    io.flush().await?;
                }
                return Ok(match progress {
                    Progress::StartTls => Step::StartTls,
                    Progress::Abort => {
                        let _ = io.shutdown().await;
                        Step::Aborted
                    }
                    Progress::Done(negotiated) => Step::Done(negotiated, input.split()),
                    Progress::NeedInput | Progress::Continue => unreachable!(),
                });
            }
        }
    }
}
