//! A client of the control API (`docs/api.md`): one HTTP/1.1 request per call, over the
//! server's control socket or over TCP with a bearer token. `strata ctl` prints what it
//! answers; the VM launcher takes and rolls back disk snapshots with it.
//!
//! Each endpoint is a [`Call`], which knows its method, its path (names percent-encoded
//! as path segments) and its body, and the type its answer decodes to. A caller either
//! decodes the answer ([`ControlTarget::send`]) or takes it as the server sent it
//! ([`ControlTarget::send_raw`], which `strata ctl --json` prints).

use std::marker::PhantomData;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    AddExport, CloneAt, Deleted, Dirty, DirtyQuery, ErrorBody, ExportList, ExportView, HistoryView,
    RemoveQuery, Removed, Rollback, RolledBack, ServeAt, ServeSnapshot, ServerView, Snapshot,
    SnapshotList, TakeSnapshot, Taken,
};
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

/// One request of the control API, and the type its answer decodes to.
#[derive(Debug, Clone)]
pub struct Call<A> {
    method: Method,
    path: String,
    /// The JSON body, for the calls that send one.
    body: Option<Bytes>,
    answer: PhantomData<fn() -> A>,
}

impl<A> Call<A> {
    fn new(method: Method, path: String, body: Option<&impl Serialize>) -> Self {
        // The bodies are structs of strings, numbers and booleans: they always encode.
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("bodies encode")));
        Call {
            method,
            path,
            body,
            answer: PhantomData,
        }
    }

    fn get(path: String) -> Self {
        Call::new(Method::GET, path, None::<&()>)
    }

    /// The HTTP method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The path, with its query string.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Characters a name keeps in a path segment or a query value; everything else is
/// percent-encoded. The unreserved characters of RFC 3986, and `@`, which snapshot
/// exports' names (`EXPORT@SNAP`) hold and which a path segment may carry as it is.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@');

/// `name` percent-encoded for use as one path segment or query value.
fn encode(name: &str) -> String {
    utf8_percent_encode(name, SEGMENT).to_string()
}

/// The path of export `name`.
fn export_path(name: &str) -> String {
    format!("/v1/exports/{}", encode(name))
}

impl Call<ServerView> {
    /// `GET /v1/server`
    pub fn server() -> Self {
        Call::get("/v1/server".to_owned())
    }
}

impl Call<ExportList> {
    /// `GET /v1/exports`
    pub fn exports() -> Self {
        Call::get("/v1/exports".to_owned())
    }
}

impl Call<ExportView> {
    /// `GET /v1/exports/{name}`
    pub fn export(name: &str) -> Self {
        Call::get(export_path(name))
    }

    /// `POST /v1/exports`
    pub fn add_export(body: &AddExport) -> Self {
        Call::new(Method::POST, "/v1/exports".to_owned(), Some(body))
    }

    /// `POST /v1/exports/{export}/snapshots/{snapshot}/export`
    pub fn serve_snapshot(export: &str, snapshot: &str, body: &ServeSnapshot) -> Self {
        let path = format!(
            "{}/snapshots/{}/export",
            export_path(export),
            encode(snapshot)
        );
        Call::new(Method::POST, path, Some(body))
    }

    /// `POST /v1/exports/{export}/serve-at`
    pub fn serve_at(export: &str, body: &ServeAt) -> Self {
        let path = format!("{}/serve-at", export_path(export));
        Call::new(Method::POST, path, Some(body))
    }

    /// `POST /v1/exports/{export}/clone`
    pub fn clone_at(export: &str, body: &CloneAt) -> Self {
        let path = format!("{}/clone", export_path(export));
        Call::new(Method::POST, path, Some(body))
    }
}

impl Call<HistoryView> {
    /// `GET /v1/exports/{export}/history`
    pub fn history(export: &str) -> Self {
        Call::get(format!("{}/history", export_path(export)))
    }
}

impl Call<Removed> {
    /// `DELETE /v1/exports/{name}?force=...`
    pub fn remove_export(name: &str, query: RemoveQuery) -> Self {
        let path = format!("{}?force={}", export_path(name), query.force);
        Call::new(Method::DELETE, path, None::<&()>)
    }
}

impl Call<SnapshotList> {
    /// `GET /v1/exports/{export}/snapshots`
    pub fn snapshots(export: &str) -> Self {
        Call::get(format!("{}/snapshots", export_path(export)))
    }
}

impl Call<Taken> {
    /// `POST /v1/exports/{export}/snapshots`
    pub fn take_snapshot(export: &str, body: &TakeSnapshot) -> Self {
        let path = format!("{}/snapshots", export_path(export));
        Call::new(Method::POST, path, Some(body))
    }
}

impl Call<Deleted> {
    /// `DELETE /v1/exports/{export}/snapshots/{snapshot}`
    pub fn delete_snapshot(export: &str, snapshot: &str) -> Self {
        let path = format!("{}/snapshots/{}", export_path(export), encode(snapshot));
        Call::new(Method::DELETE, path, None::<&()>)
    }
}

impl Call<RolledBack> {
    /// `POST /v1/exports/{export}/rollback`
    pub fn rollback(export: &str, body: &Rollback) -> Self {
        let path = format!("{}/rollback", export_path(export));
        Call::new(Method::POST, path, Some(body))
    }
}

impl Call<Dirty> {
    /// `GET /v1/exports/{export}/dirty?since=...` or `?since_point=...`
    pub fn dirty(export: &str, query: &DirtyQuery) -> Self {
        let params: Vec<String> = [("since", &query.since), ("since_point", &query.since_point)]
            .into_iter()
            .filter_map(|(key, value)| Some(format!("{key}={}", encode(value.as_ref()?))))
            .collect();
        Call::get(format!(
            "{}/dirty?{}",
            export_path(export),
            params.join("&")
        ))
    }
}

/// Decodes an answer the server sent for a call answered with `A`.
pub fn decode<A: DeserializeOwned>(answer: &[u8]) -> crate::Result<A> {
    serde_json::from_slice(answer).map_err(|e| {
        Error::msg(
            ErrorKind::Io,
            format!("the server's answer is not the JSON expected: {e}"),
        )
    })
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

    /// Sends `call` and decodes its answer.
    pub async fn send<A: DeserializeOwned>(&self, call: &Call<A>) -> crate::Result<A> {
        decode(&self.send_raw(call).await?)
    }

    /// Sends `call`; returns the answer's body as the server sent it when the status is a
    /// success, and the server's message as the error otherwise (403 as
    /// [`ErrorKind::PermissionDenied`], 404 as [`ErrorKind::NotFound`], 409 as
    /// [`ErrorKind::Busy`], other 4xx as [`ErrorKind::InvalidInput`]).
    pub async fn send_raw<A>(&self, call: &Call<A>) -> crate::Result<Bytes> {
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(call.path.as_str())
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
        let payload = match &call.body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                body.clone()
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
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
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

    /// Takes snapshot `name` of `export`.
    pub async fn take_snapshot(&self, export: &str, name: &str) -> crate::Result<Taken> {
        let body = TakeSnapshot {
            name: name.to_owned(),
            at: None,
        };
        self.send(&Call::take_snapshot(export, &body)).await
    }

    /// The snapshots of `export`, newest first.
    pub async fn snapshots(&self, export: &str) -> crate::Result<Vec<Snapshot>> {
        Ok(self.send(&Call::snapshots(export)).await?.snapshots)
    }

    /// Deletes snapshot `name` of `export`.
    pub async fn delete_snapshot(&self, export: &str, name: &str) -> crate::Result<Deleted> {
        self.send(&Call::delete_snapshot(export, name)).await
    }

    /// Rolls `export` back to snapshot `name`.
    pub async fn rollback(
        &self,
        export: &str,
        name: &str,
        force: bool,
        destroy_newer: bool,
    ) -> crate::Result<RolledBack> {
        let body = Rollback {
            snapshot: Some(name.to_owned()),
            at: None,
            force,
            destroy_newer,
        };
        self.send(&Call::rollback(export, &body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_as_segments() {
        assert_eq!(encode("vm1@snap-1.a_b~"), "vm1@snap-1.a_b~");
        assert_eq!(encode("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(encode("é%"), "%C3%A9%25");
    }

    #[test]
    fn calls_know_their_method_path_and_body() {
        let c = Call::remove_export("a b", RemoveQuery { force: true });
        assert_eq!(
            (c.method(), c.path()),
            (&Method::DELETE, "/v1/exports/a%20b?force=true")
        );
        assert!(c.body.is_none());
        let c = Call::dirty(
            "vm1",
            &DirtyQuery {
                since: Some("mon day".into()),
                since_point: None,
            },
        );
        assert_eq!(c.path(), "/v1/exports/vm1/dirty?since=mon%20day");
        let c = Call::dirty(
            "vm1",
            &DirtyQuery {
                since: None,
                since_point: Some("2026-01-01T00:00:00+01:00".into()),
            },
        );
        assert_eq!(
            c.path(),
            "/v1/exports/vm1/dirty?since_point=2026-01-01T00%3A00%3A00%2B01%3A00"
        );
        assert_eq!(Call::history("vm1").path(), "/v1/exports/vm1/history");
        let at = ServeAt {
            at: "-10m".into(),
            as_name: None,
        };
        let c = Call::serve_at("vm1", &at);
        assert_eq!(c.path(), "/v1/exports/vm1/serve-at");
        assert_eq!(c.body.as_deref(), Some(&br#"{"at":"-10m"}"#[..]));
        let c = Call::serve_snapshot("vm1", "s/1", &ServeSnapshot::default());
        assert_eq!(c.method(), &Method::POST);
        assert_eq!(c.path(), "/v1/exports/vm1/snapshots/s%2F1/export");
        assert_eq!(c.body.as_deref(), Some(&b"{}"[..]));
        let c = Call::take_snapshot(
            "vm1",
            &TakeSnapshot {
                name: "s".into(),
                at: None,
            },
        );
        assert_eq!(c.body.as_deref(), Some(&br#"{"name":"s"}"#[..]));
        assert_eq!(Call::server().path(), "/v1/server");
        assert_eq!(Call::exports().path(), "/v1/exports");
        assert_eq!(Call::export("vm1@s").path(), "/v1/exports/vm1@s");
        assert_eq!(
            Call::delete_snapshot("vm1", "s").path(),
            "/v1/exports/vm1/snapshots/s"
        );
        assert_eq!(Call::snapshots("vm1").path(), "/v1/exports/vm1/snapshots");
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
