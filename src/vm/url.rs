//! NBD URLs (the NBD project's URI format, which qemu, libnbd and Apple's
//! Virtualization.framework take): `nbd://HOST[:PORT]/EXPORT`, `nbds://...` with TLS,
//! and `nbd+unix:///EXPORT?socket=PATH` / `nbds+unix://...` over a Unix socket.
//!
//! [`NbdUrl::parse`] is pure: it checks everything that can be checked without a
//! network, and names what is wrong with a malformed URL.

use std::fmt;
use std::path::PathBuf;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::error::{Error, ErrorKind, Result};
use crate::proto::consts::{DEFAULT_PORT, MAX_STRING as MAX_EXPORT_NAME};

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP: a host name or address (IPv6 without brackets) and a port.
    Tcp {
        /// Host name, IPv4 address or IPv6 address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix socket on this machine.
    Unix(PathBuf),
}

/// A parsed, validated NBD URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    /// `nbds`: the connection is upgraded to TLS before anything else.
    pub tls: bool,
    /// Where the server listens.
    pub endpoint: Endpoint,
    /// The export's name; empty for the server's default export.
    pub export: String,
    /// `tls-certificates=DIR`: the client's certificate directory (libnbd, qemu).
    pub tls_certificates: Option<PathBuf>,
    /// `tls-hostname=NAME`: the name the server's certificate must carry.
    pub tls_hostname: Option<String>,
}

fn bad(url: &str, why: impl fmt::Display) -> Error {
    Error::msg(
        ErrorKind::InvalidInput,
        format!("malformed NBD URL {url:?}: {why}"),
    )
}

/// What stays as it is in a path segment or a query value: letters, digits, RFC 3986's
/// unreserved marks and sub-delimiters (but `&` and `=`, which split the query), `:`
/// and `@`. Everything else, and every byte outside ASCII, is %-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b':')
    .remove(b'@');

/// [`SEGMENT`] and `/`: an export name or a file path, whose slashes stay readable.
const PATH: &AsciiSet = &SEGMENT.remove(b'/');

/// Decodes `%XX` escapes; refuses bad escapes, raw spaces and control characters, and
/// what does not decode to UTF-8.
fn percent_decode(url: &str, what: &str, s: &str) -> Result<String> {
    if s.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad(
            url,
            format!("the {what} holds a space or control character; %-encode it"),
        ));
    }
    // The decoder passes a `%` without two hex digits through as it is; here it is an
    // error.
    let escapes_whole = s.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_whole {
        return Err(bad(url, format!("bad %-escape in the {what}")));
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| bad(url, format!("the {what} is not UTF-8")))
}

impl NbdUrl {
    /// Parses and validates `url`.
    pub fn parse(url: &str) -> Result<NbdUrl> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad(
                url,
                "expected nbd://, nbds://, nbd+unix:// or nbds+unix://",
            ));
        };
        let (tls, unix) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            "nbd+vsock" | "nbds+vsock" => {
                return Err(bad(url, "vsock endpoints are not supported"));
            }
            other => {
                return Err(bad(
                    url,
                    format!("unknown scheme {other:?}: expected nbd, nbds, nbd+unix or nbds+unix"),
                ));
            }
        };
        if rest.contains('#') {
            return Err(bad(url, "a fragment (#...) has no meaning here"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        if authority.contains('@') {
            return Err(bad(url, "user names (TLS-PSK) are not supported"));
        }
        let export = percent_decode(url, "export name", path)?;
        if export.len() > MAX_EXPORT_NAME {
            return Err(bad(
                url,
                format!("the export name is longer than {MAX_EXPORT_NAME} bytes"),
            ));
        }

        let mut socket = None;
        let mut tls_certificates = None;
        let mut tls_hostname = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(url, &format!("{key} parameter"), value)?;
            let slot = match key {
                "socket" => &mut socket,
                "tls-certificates" => &mut tls_certificates,
                "tls-hostname" => &mut tls_hostname,
                other => {
                    return Err(bad(url, format!("unknown query parameter {other:?}")));
                }
            };
            if slot.is_some() {
                return Err(bad(url, format!("{key} is given twice")));
            }
            if value.is_empty() {
                return Err(bad(url, format!("{key} is empty")));
            }
            *slot = Some(value);
        }
        if !tls && (tls_certificates.is_some() || tls_hostname.is_some()) {
            return Err(bad(
                url,
                "tls-certificates and tls-hostname need nbds:// or nbds+unix://",
            ));
        }

        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    url,
                    format!(
                        "a Unix-socket URL has no host (got {authority:?}): nbd+unix:///EXPORT?socket=PATH"
                    ),
                ));
            }
            let Some(socket) = socket else {
                return Err(bad(
                    url,
                    "the socket is missing: nbd+unix:///EXPORT?socket=PATH",
                ));
            };
            Endpoint::Unix(PathBuf::from(socket))
        } else {
            if socket.is_some() {
                return Err(bad(
                    url,
                    "socket= needs nbd+unix:// (or nbds+unix://), not a TCP URL",
                ));
            }
            let (host, port) = split_host_port(url, authority)?;
            Endpoint::Tcp { host, port }
        };
        Ok(NbdUrl {
            tls,
            endpoint,
            export,
            tls_certificates: tls_certificates.map(PathBuf::from),
            tls_hostname,
        })
    }

    /// The URL for a Unix socket at `socket` and export `export`.
    pub fn unix(socket: impl Into<PathBuf>, export: &str) -> NbdUrl {
        NbdUrl {
            tls: false,
            endpoint: Endpoint::Unix(socket.into()),
            export: export.to_owned(),
            tls_certificates: None,
            tls_hostname: None,
        }
    }
}

fn split_host_port(url: &str, authority: &str) -> Result<(String, u16)> {
    if authority.is_empty() {
        return Err(bad(url, "the host is missing: nbd://HOST[:PORT]/EXPORT"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(bad(url, "an IPv6 address without its closing ]"));
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad(url, format!("{host:?} is not an IPv6 address")));
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(bad(url, "expected :PORT after the IPv6 address")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(bad(url, "an IPv6 address must be in brackets: [::1]"));
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad(url, "the host is missing: nbd://HOST[:PORT]/EXPORT"));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
    {
        return Err(bad(url, format!("{host:?} is not a host name or address")));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(bad(
                    url,
                    format!("the port {p:?} is not a number from 1 to 65535"),
                ));
            }
            Ok(n) => n,
        },
    };
    Ok((host.to_owned(), port))
}

impl fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "s" } else { "" };
        let export = utf8_percent_encode(&self.export, PATH);
        let mut query = Vec::new();
        match &self.endpoint {
            Endpoint::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                write!(f, "nbd{s}://{host}:{port}/{export}")?;
            }
            Endpoint::Unix(path) => {
                write!(f, "nbd{s}+unix:///{export}")?;
                query.push(format!(
                    "socket={}",
                    utf8_percent_encode(&path.to_string_lossy(), PATH)
                ));
            }
        }
        if let Some(dir) = &self.tls_certificates {
            query.push(format!(
                "tls-certificates={}",
                utf8_percent_encode(&dir.to_string_lossy(), PATH)
            ));
        }
        if let Some(h) = &self.tls_hostname {
            query.push(format!("tls-hostname={}", utf8_percent_encode(h, SEGMENT)));
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

impl std::str::FromStr for NbdUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        NbdUrl::parse(s)
    }
}

impl serde::Serialize for NbdUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NbdUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NbdUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn tcp_urls() {
        let u = NbdUrl::parse("nbd://nas.local:10900/vm1").unwrap();
        assert_eq!(u.endpoint, tcp("nas.local", 10900));
        assert_eq!(u.export, "vm1");
        assert!(!u.tls);
        let u = NbdUrl::parse("nbd://127.0.0.1").unwrap();
        assert_eq!(u.endpoint, tcp("127.0.0.1", DEFAULT_PORT));
        assert_eq!(u.export, "");
        let u = NbdUrl::parse("nbds://[::1]:1/a%20b/c?tls-certificates=/etc/pki").unwrap();
        assert_eq!(u.endpoint, tcp("::1", 1));
        assert_eq!(u.export, "a b/c");
        assert!(u.tls);
        assert_eq!(u.tls_certificates, Some(PathBuf::from("/etc/pki")));
        let u = NbdUrl::parse("NBD://[fe80::1]/x").unwrap();
        assert_eq!(u.endpoint, tcp("fe80::1", DEFAULT_PORT));
    }

    #[test]
    fn unix_urls() {
        let u = NbdUrl::parse("nbd+unix:///disk?socket=/run/strata/nbd.sock").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/run/strata/nbd.sock".into()));
        assert_eq!(u.export, "disk");
        let u = NbdUrl::parse("nbds+unix:///?socket=%2Ftmp%2Fa%20b.sock&tls-hostname=nas").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/tmp/a b.sock".into()));
        assert_eq!(u.export, "");
        assert_eq!(u.tls_hostname.as_deref(), Some("nas"));
    }

    #[test]
    fn urls_print_back_to_themselves() {
        for text in [
            "nbd://nas.local:10809/vm1",
            "nbds://[::1]:7/a%20b/c?tls-certificates=/etc/pki",
            "nbd+unix:///disk?socket=/run/a%20b.sock",
            "nbds+unix:///?socket=/s&tls-hostname=nas",
        ] {
            let u = NbdUrl::parse(text).unwrap();
            assert_eq!(u.to_string(), text);
            assert_eq!(NbdUrl::parse(&u.to_string()).unwrap(), u);
        }
        let u = NbdUrl::unix("/b/nbd.sock", "disk");
        assert_eq!(u.to_string(), "nbd+unix:///disk?socket=/b/nbd.sock");
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(serde_json::from_str::<NbdUrl>(&json).unwrap(), u);
    }

    #[test]
    fn malformed_urls_say_why() {
        let cases = [
            ("nas.local:10809/vm1", "expected nbd://"),
            ("http://nas/vm1", "unknown scheme \"http\""),
            ("nbd+vsock://2/x", "vsock"),
            ("nbd:///vm1", "the host is missing"),
            ("nbd://nas:0/vm1", "not a number from 1 to 65535"),
            ("nbd://nas:99999/vm1", "not a number from 1 to 65535"),
            ("nbd://nas:http/vm1", "not a number"),
            ("nbd://::1/vm1", "must be in brackets"),
            ("nbd://[::1/vm1", "closing ]"),
            ("nbd://[nas]/vm1", "not an IPv6 address"),
            ("nbd://[::1]x/vm1", "expected :PORT"),
            ("nbd://na s/vm1", "not a host name"),
            ("nbd://user@nas/vm1", "user names"),
            ("nbd://nas/vm 1", "space or control character"),
            ("nbd://nas/vm%zz", "bad %-escape"),
            ("nbd://nas/vm%ff", "not UTF-8"),
            ("nbd://nas/vm1#frag", "fragment"),
            ("nbd://nas/vm1?socket=/s", "needs nbd+unix"),
            ("nbd://nas/vm1?tls-certificates=/d", "need nbds"),
            (
                "nbd://nas/vm1?timeout=5",
                "unknown query parameter \"timeout\"",
            ),
            ("nbd+unix:///vm1", "the socket is missing"),
            ("nbd+unix://nas/vm1?socket=/s", "has no host"),
            ("nbd+unix:///vm1?socket=", "socket is empty"),
            ("nbd+unix:///vm1?socket=/a&socket=/b", "given twice"),
        ];
        for (url, want) in cases {
            let err = NbdUrl::parse(url).expect_err(url).to_string();
            assert!(err.contains(want), "{url}: {err:?} should mention {want:?}");
            assert!(err.contains(url), "{url}: {err:?} should quote the URL");
        }
        let long = format!("nbd://nas/{}", "x".repeat(4097));
        assert!(
            NbdUrl::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("longer than 4096")
        );
    }
}
