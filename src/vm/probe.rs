//! Asks an NBD server, before a VM starts on it, whether it answers and has the export,
//! so that a wrong URL is reported in plain words instead of as a guest that cannot
//! find its disk.
//!
//! The probe is an ordinary fixed-newstyle client: it reads the greeting, asks
//! `NBD_OPT_INFO` for the export (unless the URL asks for TLS, which the probe does not
//! speak: then the greeting is all it checks), and leaves with `NBD_OPT_ABORT`.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::url::{Endpoint, NbdUrl};
use crate::error::{Error, ErrorKind, Result};
use crate::proto::consts::{
    CLISERV_MAGIC, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, client_flags, handshake_flags, info,
    opt, rep, transmission_flags,
};

/// What the probe learnt about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes; `None` when it was not asked (TLS).
    pub size: Option<u64>,
    /// The server serves it read-only.
    pub read_only: bool,
}

/// Probes the server of `url`, giving up after `timeout`.
pub async fn probe(url: &NbdUrl, timeout: Duration) -> Result<ExportInfo> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::msg(
            ErrorKind::Io,
            format!("cannot reach the NBD server of {url}: {e}"),
        )
    };
    let work = async {
        match &url.endpoint {
            Endpoint::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| unreachable(&e))?;
                handshake(s, url).await
            }
            Endpoint::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| unreachable(&e))?;
                handshake(s, url).await
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(&format!("no answer within {timeout:?}"))),
    }
}

fn protocol(url: &NbdUrl, why: impl std::fmt::Display) -> Error {
    Error::msg(ErrorKind::Io, format!("the server of {url} {why}"))
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    url: &NbdUrl,
) -> Result<ExportInfo> {
    let io = |e: std::io::Error| protocol(url, format!("broke off the handshake: {e}"));
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting[..16]).await.map_err(io)?;
    let magic = u64::from_be_bytes(greeting[..8].try_into().expect("8 bytes"));
    let second = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
    if magic != NBDMAGIC {
        return Err(protocol(url, "is not an NBD server (no NBDMAGIC greeting)"));
    }
    if second == CLISERV_MAGIC {
        return Err(protocol(
            url,
            "speaks only the oldstyle handshake, which has no export names",
        ));
    }
    if second != IHAVEOPT {
        return Err(protocol(url, "sent an unknown greeting"));
    }
    s.read_exact(&mut greeting[16..]).await.map_err(io)?;
    let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(protocol(url, "does not speak fixed newstyle"));
    }
    let mut ours = client_flags::FIXED_NEWSTYLE;
    if flags & handshake_flags::NO_ZEROES != 0 {
        ours |= client_flags::NO_ZEROES;
    }
    s.write_all(&ours.to_be_bytes()).await.map_err(io)?;

    let found = if url.tls {
        ExportInfo {
            size: None,
            read_only: false,
        }
    } else {
        let mut payload = Vec::with_capacity(url.export.len() + 6);
        let name_len = u32::try_from(url.export.len()).expect("export names are short");
        payload.extend_from_slice(&name_len.to_be_bytes());
        payload.extend_from_slice(url.export.as_bytes());
        payload.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut s, opt::INFO, &payload).await.map_err(io)?;
        read_info(&mut s, url).await?
    };
    // Leaving politely; a server that already closed is fine too.
    let _ = send_option(&mut s, opt::ABORT, &[]).await;
    Ok(found)
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(16 + payload.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    let len = u32::try_from(payload.len()).expect("option payloads are short");
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(payload);
    s.write_all(&msg).await?;
    s.flush().await
}

async fn read_info<S: AsyncRead + Unpin>(s: &mut S, url: &NbdUrl) -> Result<ExportInfo> {
    let io = |e: std::io::Error| protocol(url, format!("broke off the handshake: {e}"));
    let mut found = ExportInfo {
        size: None,
        read_only: false,
    };
    loop {
        let mut header = [0u8; 20];
        s.read_exact(&mut header).await.map_err(io)?;
        let magic = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        let kind = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
        if magic != OPTION_REPLY_MAGIC {
            return Err(protocol(url, "sent a malformed option reply"));
        }
        if len > 64 * 1024 {
            return Err(protocol(url, "sent an oversized option reply"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.map_err(io)?;
        let text = || String::from_utf8_lossy(&data).trim().to_owned();
        let export = if url.export.is_empty() {
            "no default export".to_owned()
        } else {
            format!("no export named {:?}", url.export)
        };
        match kind {
            rep::ACK => return Ok(found),
            rep::INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == info::EXPORT =>
            {
                found.size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8")));
                let flags = u16::from_be_bytes([data[10], data[11]]);
                found.read_only = flags & transmission_flags::READ_ONLY != 0;
            }
            rep::ERR_UNKNOWN => {
                return Err(Error::msg(
                    ErrorKind::NotFound,
                    format!("the server of {url} has {export}"),
                ));
            }
            rep::ERR_TLS_REQD => {
                return Err(Error::msg(
                    ErrorKind::InvalidInput,
                    format!("the server of {url} requires TLS: use nbds:// (or nbds+unix://)"),
                ));
            }
            rep::ERR_UNSUP => {
                // An old server without NBD_OPT_INFO: the greeting is all we can check.
                return Ok(found);
            }
            k if k & (1 << 31) != 0 => {
                return Err(protocol(
                    url,
                    format!(
                        "refused the export (error {:#x}): {}",
                        k & 0x7fff_ffff,
                        text()
                    ),
                ));
            }
            _ => {}
        }
    }
}
