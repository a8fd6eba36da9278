//! A client of the control API (`docs/api.md`): one HTTP/1.1 request per call, over the
//! server's control socket or over TCP with a bearer token. `strata ctl` prints what it
//! answers; the VM launcher ([`crate::vm`]) takes and rolls back disk snapshots with it.

use std::fmt::Write as _;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::{Error, ErrorKind};

/// Where a control API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlTarget {
    /// A Unix socket (`strata serve --control PATH`): no token.
    Unix(PathBuf),
    /// TCP (`strata serve --control-listen`), with the bearer token if one is needed.
    Tcp {
        /// `HOST:PORT`.
        authority: String,
        /// Sent as `Authorization: Bearer TOKEN`.
        token: Option<String>,
    },
}

impl std::fmt::Display for ControlTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlTarget::Unix(p) => write!(f, "unix:{}", p.display()),
            ControlTarget::Tcp { authority, .. } => write!(f, "http://{authority}"),
        }
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::msg(ErrorKind::InvalidInput, message)
}

impl ControlTarget {
    /// Parses `http://HOST:PORT` (the TCP listener; `token` is its bearer token) or a
    /// Unix socket path, given as `unix:PATH` or as a plain path.
    pub fn parse(text: &str, token: Option<String>) -> crate::Result<ControlTarget> {
        if let Some(rest) = text.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') {
                return Err(invalid(format!("{text:?}: expected http://HOST:PORT")));
            }
            return Ok(ControlTarget::Tcp {
                authority: authority.to_owned(),
                token,
            });
        }
        if text.starts_with("https://") {
            return Err(invalid(
                "the control API speaks plain HTTP: use http://, on a trusted network",
            ));
        }
        let path = text.strip_prefix("unix:").unwrap_or(text);
        if path.is_empty() {
            return Err(invalid("an empty control API address"));
        }
        Ok(ControlTarget::Unix(PathBuf::from(path)))
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> Error {
        Error::msg(
            ErrorKind::Io,
            format!("cannot reach the control API at {self}: {e}"),
        )
    }

    /// Sends one request; returns the answer's body when the status is a success, and
    /// the server's message as the error otherwise (403 as [`ErrorKind::PermissionDenied`], 404 as [`ErrorKind::NotFound`], 409
    /// as [`ErrorKind::Busy`], other 4xx as [`ErrorKind::InvalidInput`]).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> crate::Result<Bytes> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::ACCEPT, "application/json");
        request = match self {
            ControlTarget::Unix(_) => request.header(header::HOST, "localhost"),
            ControlTarget::Tcp { authority, token } => {
                let request = request.header(header::HOST, authority.as_str());
                match token {
                    Some(t) => request.header(header::AUTHORIZATION, format!("Bearer {t}")),
                    None => request,
                }
            }
        };
        let payload = match body {
            Some(v) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|e| invalid(format!("cannot build the request: {e}")))?;

        let (status, body) = match self {
            ControlTarget::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                self.exchange(stream, request).await?
            }
            ControlTarget::Tcp { authority, .. } => {
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(|e| self.unreachable(e))?;
                self.exchange(stream, request).await?
            }
        };
        if status.is_success() {
            return Ok(body);
        }
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
        let kind = match status.as_u16() {
            403 => ErrorKind::PermissionDenied,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Busy,
            400..=499 => ErrorKind::InvalidInput,
            _ => ErrorKind::Io,
        };
        Err(Error::msg(kind, format!("{message} (HTTP {status})")))
    }

    async fn exchange<S>(
        &self,
        stream: S,
        request: Request<Full<Bytes>>,
    ) -> crate::Result<(hyper::StatusCode, Bytes)>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        let driver = tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    }

    /// Calls and parses the answer as JSON.
    async fn call_json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> crate::Result<Value> {
        let answer = self.call(method, path, body).await?;
        serde_json::from_slice(&answer).map_err(|e| {
            Error::msg(
                ErrorKind::Io,
                format!("the server's answer is not JSON: {e}"),
            )
        })
    }

    /// Takes snapshot `name` of `export`; returns how long requests waited, in
    /// microseconds.
    pub async fn take_snapshot(&self, export: &str, name: &str) -> crate::Result<u64> {
        let v = self
            .call_json(
                Method::POST,
                &format!("/v1/exports/{}/snapshots", encode(export)),
                Some(json!({ "name": name })),
            )
            .await?;
        Ok(v.get("pause_us").and_then(Value::as_u64).unwrap_or(0))
    }

    /// The names of `export`'s snapshots, newest first.
    pub async fn snapshot_names(&self, export: &str) -> crate::Result<Vec<String>> {
        let v = self
            .call_json(
                Method::GET,
                &format!("/v1/exports/{}/snapshots", encode(export)),
                None,
            )
            .await?;
        Ok(v.get("snapshots")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|s| s.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Deletes snapshot `name` of `export`.
    pub async fn delete_snapshot(&self, export: &str, name: &str) -> crate::Result<()> {
        self.call(
            Method::DELETE,
            &format!("/v1/exports/{}/snapshots/{}", encode(export), encode(name)),
            None,
        )
        .await
        .map(drop)
    }

    /// Rolls `export` back to snapshot `name`.
    pub async fn rollback(
        &self,
        export: &str,
        name: &str,
        force: bool,
        destroy_newer: bool,
    ) -> crate::Result<()> {
        self.call(
            Method::POST,
            &format!("/v1/exports/{}/rollback", encode(export)),
            Some(json!({ "snapshot": name, "force": force, "destroy_newer": destroy_newer })),
        )
        .await
        .map(drop)
    }
}

/// Percent-encodes `s` for use as one path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_as_segments() {
        assert_eq!(encode("vm1@snap-1.a_b~"), "vm1@snap-1.a_b~");
        assert_eq!(encode("a b/c?d"), "a%20b%2Fc%3Fd");
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            ControlTarget::parse("/run/s.sock", None).unwrap(),
            ControlTarget::Unix("/run/s.sock".into())
        );
        assert_eq!(
            ControlTarget::parse("unix:/run/s.sock", None).unwrap(),
            ControlTarget::Unix("/run/s.sock".into())
        );
        assert_eq!(
            ControlTarget::parse("http://127.0.0.1:10810/", Some("t".into())).unwrap(),
            ControlTarget::Tcp {
                authority: "127.0.0.1:10810".into(),
                token: Some("t".into())
            }
        );
        assert!(ControlTarget::parse("https://x:1", None).is_err());
        assert!(ControlTarget::parse("http://x:1/v1", None).is_err());
        assert!(ControlTarget::parse("", None).is_err());
    }
}
