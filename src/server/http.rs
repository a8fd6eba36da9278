//! The HTTP plumbing shared by the control API and the metrics listener: accept loops
//! with a connection cap and a header timeout, graceful shutdown, the bearer-token
//! check, extractors whose rejections keep the API's error shape, and the one mapping
//! from an error's kind to an HTTP status ([`status_for`]).
//!
//! Every failure is answered `{"error": "message"}`, whether a handler raised it or the
//! HTTP layer refused the request (bad JSON, wrong content type, bodies over the limit,
//! unknown routes or methods, a missing token), which keeps the status it chose.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::ShutdownHandle;
use super::listener::{Accepted, ListenAddr, Listener, Stream};
use crate::error::{Error, ErrorKind, Result};

/// How long shutdown waits for control requests in progress.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// A client must send a request's headers within this, also while a kept-alive
/// connection waits for its next request, so that idle and slow connections (anyone
/// can open one to the TCP listener, token or not) do not pile up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections one control listener serves at once; further ones are closed on accept,
/// so the control API cannot use up the descriptors the NBD listeners need.
pub const MAX_CONNECTIONS: usize = 64;

/// A bearer token. Its `Debug` output hides it.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A token from its text; surrounding whitespace is dropped, and an empty token or
    /// one with inner whitespace or control characters is refused.
    pub fn new(text: &str) -> Result<Token> {
        let text = text.trim();
        if text.is_empty() {
            return Err(Error::msg(ErrorKind::InvalidInput, "the token is empty"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "the token must be printable ASCII without spaces",
            ));
        }
        Ok(Token(text.as_bytes().into()))
    }

    /// Reads a token from a file (its whole content, surrounding whitespace dropped).
    /// Warns when other users may read the file.
    pub fn from_file(path: &Path) -> Result<Token> {
        use std::os::unix::fs::PermissionsExt;
        let read_error = |e: std::io::Error| {
            Error::from(e)
                .with_message("cannot read the control token file")
                .with_path(path)
        };
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let mode = std::fs::metadata(path)
            .map_err(read_error)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            warn!(
                "the control token file {} can be read by other users (mode {:o})",
                path.display(),
                mode & 0o777
            );
        }
        Token::new(&text).map_err(|e| e.with_path(path))
    }

    /// Compares in time that depends only on the length of `given`, never on where it
    /// first differs from the token or on the token's length.
    fn matches(&self, given: &[u8]) -> bool {
        let expected = &self.0;
        // Lengths differ: still walk `given` so that the time does not tell.
        let mut diff = u8::from(given.len() != expected.len());
        for (i, &b) in given.iter().enumerate() {
            diff |= b ^ expected[i % expected.len()];
        }
        std::hint::black_box(diff) == 0
    }
}

/// Accepts HTTP/1.1 connections on `listener` until shutdown, then lets each finish the
/// request it is serving (idle ones are closed at once), for at most [`SHUTDOWN_WAIT`].
pub(super) async fn serve_http(listener: Listener, app: Router, shutdown: ShutdownHandle) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.requested() => break,
            r = listener.accept() => r,
        };
        let Accepted { stream, peer, .. } = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!("control API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "control API: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        match stream {
            Stream::Tcp(s) => serve_connection(s, &app, &graceful, slot),
            Stream::Unix(s) => serve_connection(s, &app, &graceful, slot),
        }
    }
    // The Unix socket file goes with its listener: no new client finds it.
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_WAIT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("control API requests still running at shutdown; dropping them");
    }
}

fn serve_connection<S>(
    stream: S,
    app: &Router,
    graceful: &GracefulShutdown,
    slot: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let connection =
        http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!("control API connection: {e}");
        }
        drop(slot);
    });
}

/// Binds a Unix socket that only this user may connect to. The mode is set through the
/// umask while binding, so the socket never exists with a wider mode, even briefly; this
/// runs at start-up, before anything else creates files.
pub(super) async fn bind_private_socket(path: &Path) -> Result<Listener> {
    // SAFETY: umask(2) only swaps the process's file creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = Listener::bind(&ListenAddr::Unix(path.to_path_buf())).await;
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound
}

/// The HTTP status for an error of `kind`: the only place errors are mapped.
///
/// - `ReadOnly` is 409: the request is well-formed and allowed, but conflicts with the
///   state of its target (a read-only export or volume), as `Busy` does.
/// - `NotSupported` is 501: the server cannot do this at all (a feature not built yet, a
///   file system without the operation). Requests that cannot apply to their target,
///   such as snapshots of a raw export, are `InvalidInput` instead.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::AlreadyExists | ErrorKind::Busy | ErrorKind::ReadOnly => StatusCode::CONFLICT,
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::NotSupported => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A failed request: its status and the message sent as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::new(status_for(e.kind()), e.to_string())
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            warn!("control API: {}", self.message);
        }
        let mut response = (
            self.status,
            axum::Json(ErrorBody {
                error: &self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// What a handler returns: its answer, or an error answered in the API's format.
pub(super) type ApiResult<T> = std::result::Result<T, ApiError>;

/// The answer for a path no route has.
pub(super) async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

/// The answer for a route asked with a method it does not take.
pub(super) async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// Lets through only requests with `Authorization: Bearer TOKEN`; answers 401 otherwise.
pub(super) async fn require_token(
    State(token): State<Token>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match given {
        Some(given) if token.matches(given) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong bearer token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs an Authorization: Bearer TOKEN header",
        )
        .into_response(),
    }
}

/// A JSON body; rejections are answered in the API's error format.
pub(super) struct JsonBody<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> ApiResult<Self> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(JsonBody(value)),
            Err(r) => Err(rejected(&r)),
        }
    }
}

/// Path parameters; rejections are answered in the API's error format.
pub(super) struct PathArgs<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(PathArgs(value)),
            Err(r) => Err(rejected(&r)),
        }
    }
}

/// A query string; rejections are answered in the API's error format.
pub(super) struct QueryArgs<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(QueryArgs(value)),
            Err(r) => Err(rejected(&r)),
        }
    }
}

/// The HTTP layer's own rejections, which carry their status and text.
trait Rejection {
    fn status(&self) -> StatusCode;
    fn body_text(&self) -> String;
}

macro_rules! rejection {
    ($($t:ty),*) => {$(
        impl Rejection for $t {
            fn status(&self) -> StatusCode {
                <$t>::status(self)
            }
            fn body_text(&self) -> String {
                <$t>::body_text(self)
            }
        }
    )*};
}
rejection!(JsonRejection, PathRejection, QueryRejection);

fn rejected(r: &impl Rejection) -> ApiError {
    ApiError::new(r.status(), r.body_text())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        let t = Token::new(" s3cret\n").unwrap();
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cre"));
        assert!(!t.matches(b"s3cret!"));
        assert!(!t.matches(b"S3cret"));
        assert!(!t.matches(b""));
        assert!(Token::new("  \n").is_err());
        assert!(Token::new("two words").is_err());
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn every_kind_has_a_status() {
        assert_eq!(status_for(ErrorKind::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            status_for(ErrorKind::PermissionDenied),
            StatusCode::FORBIDDEN
        );
        assert_eq!(status_for(ErrorKind::AlreadyExists), StatusCode::CONFLICT);
        assert_eq!(status_for(ErrorKind::Busy), StatusCode::CONFLICT);
        assert_eq!(status_for(ErrorKind::ReadOnly), StatusCode::CONFLICT);
        assert_eq!(status_for(ErrorKind::InvalidInput), StatusCode::BAD_REQUEST);
        assert_eq!(
            status_for(ErrorKind::NotSupported),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(
            status_for(ErrorKind::NoSpace),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            status_for(ErrorKind::Corrupt),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(status_for(ErrorKind::Io), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
