//! The control API: HTTP/JSON for operators and VM launchers to inspect and manage a
//! running server (exports, their counters, snapshots). `docs/api.md` documents every
//! endpoint.
//!
//! It listens on a Unix socket, created with mode 0600 so that only the server's user can
//! connect (no token needed), and optionally on TCP, where every request must carry
//! `Authorization: Bearer TOKEN`. It stops when the NBD server shuts down.
//!
//! Every failure is answered `{"error": "message"}`: errors of the crate get their
//! status from their [`ErrorKind`] in [`status_for`], and nowhere else; requests the HTTP
//! layer rejects (bad JSON, wrong content type, bodies over [`BODY_LIMIT`], unknown
//! routes or methods) get the status that layer chose, with the same JSON shape.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::export::{CLOSE_WAIT, Export, Source, StatsSnapshot, open_export};
use super::listener::{Accepted, ListenAddr, Listener, Stream};
use super::volume::RollbackOptions;
use super::{ConnectionGauge, Exports, ShutdownHandle, Volume};
use crate::access::Access;
use crate::error::{Error, ErrorKind, Result};
use crate::names;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// How long shutdown waits for control requests in progress.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// A client must send a request's headers within this, also while a kept-alive
/// connection waits for its next request, so that idle and slow connections (anyone
/// can open one to the TCP listener, token or not) do not pile up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections one control listener serves at once; further ones are closed on accept,
/// so the control API cannot use up the descriptors the NBD listeners need.
pub const MAX_CONNECTIONS: usize = 64;

/// Where the control API listens.
#[derive(Debug, Default)]
pub struct ControlConfig {
    /// The Unix socket; created with mode 0600, a stale one replaced.
    pub socket: Option<PathBuf>,
    /// A TCP address, which needs [`ControlConfig::token`].
    pub tcp: Option<SocketAddr>,
    /// The bearer token TCP clients must send.
    pub token: Option<Token>,
}

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

/// What the control API manages and reports: the server's exports and its state.
#[derive(Debug)]
pub struct ControlState {
    exports: Arc<Exports>,
    started: Instant,
    listen: Vec<String>,
    control: Vec<String>,
    connections: ConnectionGauge,
    /// Who may use exports added through the API (those given at start-up have the
    /// same rules); a snapshot's export takes its volume export's rules.
    access: Access,
}

impl ControlState {
    /// Applies `access` to exports added through the API.
    #[must_use]
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// State for a server of `exports` listening on `listen` (reported as given), whose
    /// connections `gauge` counts.
    pub fn new(exports: Arc<Exports>, listen: &[ListenAddr], gauge: ConnectionGauge) -> Self {
        ControlState {
            exports,
            started: Instant::now(),
            listen: listen.iter().map(ToString::to_string).collect(),
            control: Vec::new(),
            connections: gauge,
            access: Access::open(),
        }
    }
}

/// The bound control listeners, ready to serve.
pub struct ControlServer {
    unix: Option<Listener>,
    tcp: Option<(Listener, Token)>,
    addrs: Vec<ListenAddr>,
    state: ControlState,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Binds the listeners of `config`. A TCP listener without a token is refused.
    pub async fn bind(config: ControlConfig, mut state: ControlState) -> Result<ControlServer> {
        let mut addrs = Vec::new();
        let unix = match &config.socket {
            Some(path) => {
                let listener = bind_private_socket(path).await?;
                addrs.push(ListenAddr::Unix(path.clone()));
                Some(listener)
            }
            None => None,
        };
        let tcp = match config.tcp {
            Some(addr) => {
                let Some(token) = config.token else {
                    return Err(Error::msg(
                        ErrorKind::InvalidInput,
                        format!("the control API on TCP ({addr}) needs a token file"),
                    ));
                };
                let listener = Listener::bind(&ListenAddr::Tcp(addr)).await?;
                addrs.push(listener.local_addr()?);
                Some((listener, token))
            }
            None => None,
        };
        state.control = addrs
            .iter()
            .map(|a| match a {
                ListenAddr::Tcp(a) => format!("http://{a}"),
                ListenAddr::Unix(_) => a.to_string(),
            })
            .collect();
        Ok(ControlServer {
            unix,
            tcp,
            addrs,
            state,
        })
    }

    /// The bound addresses (with the real port when port 0 was asked for).
    pub fn local_addrs(&self) -> &[ListenAddr] {
        &self.addrs
    }

    /// Serves until `shutdown` is asked for, then finishes the requests in progress (at
    /// most a few seconds) and removes the Unix socket.
    pub async fn serve(self, shutdown: ShutdownHandle) {
        let state = Arc::new(self.state);
        let unix = self
            .unix
            .map(|listener| serve_http(listener, router(state.clone()), shutdown.clone()));
        let tcp = self.tcp.map(|(listener, token)| {
            let app =
                router(state.clone()).layer(middleware::from_fn_with_state(token, require_token));
            serve_http(listener, app, shutdown.clone())
        });
        let maybe = |f: Option<_>| async move {
            if let Some(f) = f {
                f.await;
            }
        };
        tokio::join!(maybe(unix), maybe(tcp));
    }
}

/// Accepts HTTP/1.1 connections on `listener` until shutdown, then lets each finish the
/// request it is serving (idle ones are closed at once), for at most [`SHUTDOWN_WAIT`].
async fn serve_http(listener: Listener, app: Router, shutdown: ShutdownHandle) {
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
async fn bind_private_socket(path: &Path) -> Result<Listener> {
    // SAFETY: umask(2) only swaps the process's file creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = Listener::bind(&ListenAddr::Unix(path.to_path_buf())).await;
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound
}

fn router(state: Arc<ControlState>) -> Router {
    Router::new()
        .route("/v1/server", get(server_info))
        .route("/v1/metrics", get(metrics))
        .route("/v1/exports", get(list_exports).post(add_export))
        .route("/v1/exports/{name}", get(get_export).delete(remove_export))
        .route(
            "/v1/exports/{name}/snapshots",
            get(list_snapshots).post(take_snapshot),
        )
        .route(
            "/v1/exports/{name}/snapshots/{snap}",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/v1/exports/{name}/snapshots/{snap}/export",
            post(export_snapshot),
        )
        .route("/v1/exports/{name}/rollback", post(rollback))
        .route("/v1/exports/{name}/dirty", get(dirty))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

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

type ApiResult<T> = std::result::Result<T, ApiError>;

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
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
struct JsonBody<T>(T);

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
struct PathArgs<T>(T);

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
struct QueryArgs<T>(T);

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

// ---------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
struct ServerView {
    version: &'static str,
    uptime_s: u64,
    listen: Vec<String>,
    control: Vec<String>,
    connections: usize,
    max_connections: usize,
    exports: usize,
}

#[derive(Serialize)]
struct ExportView {
    name: String,
    description: String,
    size: u64,
    read_only: bool,
    kind: &'static str,
    image: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_of: Option<SnapshotOf>,
    stats: StatsSnapshot,
}

#[derive(Serialize)]
struct SnapshotOf {
    export: String,
    snapshot: String,
}

impl ExportView {
    fn of(export: &Export) -> Self {
        let snapshot_of = match export.source() {
            Source::Snapshot {
                export, snapshot, ..
            } => Some(SnapshotOf {
                export: export.clone(),
                snapshot: snapshot.clone(),
            }),
            _ => None,
        };
        ExportView {
            name: export.name().to_owned(),
            description: export.description().to_owned(),
            size: export.backend().size(),
            read_only: export.read_only(),
            kind: export.kind(),
            image: export.image_path().map(Path::to_path_buf),
            snapshot_of,
            stats: export.stats().snapshot(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

type Api = State<Arc<ControlState>>;

async fn server_info(State(state): Api) -> axum::Json<ServerView> {
    axum::Json(ServerView {
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: state.started.elapsed().as_secs(),
        listen: state.listen.clone(),
        control: state.control.clone(),
        connections: state.connections.open(),
        max_connections: state.connections.max(),
        exports: state.exports.all().len(),
    })
}

async fn metrics(State(state): Api) -> Response {
    metrics_response(&state.connections, &state.exports)
}

/// The server's metrics as an HTTP response, for the control API and the metrics
/// listener alike.
fn metrics_response(gauge: &ConnectionGauge, exports: &Exports) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(super::metrics::CONTENT_TYPE),
        )],
        gauge.render_metrics(exports),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// The metrics listener
// ---------------------------------------------------------------------------------------

/// A listener that serves `GET /metrics` (Prometheus text format) and nothing else, on
/// TCP or a Unix socket (`strata serve --metrics`). It needs no token: metrics reveal
/// export names and counters, not data, so bind it where only the scraper can reach it.
pub struct MetricsServer {
    listener: Listener,
    exports: Arc<Exports>,
    gauge: ConnectionGauge,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer").finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Binds `addr` for the metrics of `exports` and the server `gauge` belongs to.
    pub async fn bind(
        addr: &ListenAddr,
        exports: Arc<Exports>,
        gauge: ConnectionGauge,
    ) -> Result<MetricsServer> {
        Ok(MetricsServer {
            listener: Listener::bind(addr).await?,
            exports,
            gauge,
        })
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> Result<ListenAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is asked for.
    pub async fn serve(self, shutdown: ShutdownHandle) {
        let state = Arc::new((self.exports, self.gauge));
        let app = Router::new()
            .route(
                "/metrics",
                get(
                    |State(state): State<Arc<(Arc<Exports>, ConnectionGauge)>>| async move {
                        metrics_response(&state.1, &state.0)
                    },
                ),
            )
            .fallback(no_route)
            .method_not_allowed_fallback(wrong_method)
            .with_state(state);
        serve_http(self.listener, app, shutdown).await;
    }
}

#[derive(Serialize)]
struct ExportList {
    exports: Vec<ExportView>,
}

async fn list_exports(State(state): Api) -> axum::Json<ExportList> {
    let exports = state
        .exports
        .all()
        .iter()
        .map(|e| ExportView::of(e))
        .collect();
    axum::Json(ExportList { exports })
}

/// The export `name`, which must exist.
fn find(state: &ControlState, name: &str) -> Result<Arc<Export>> {
    // The empty name would find the default export; the API names exports exactly.
    state
        .exports
        .get(name)
        .filter(|_| !name.is_empty())
        .ok_or_else(|| Error::msg(ErrorKind::NotFound, format!("no export named {name:?}")))
}

async fn get_export(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<axum::Json<ExportView>> {
    let export = find(&state, &name)?;
    Ok(axum::Json(ExportView::of(&export)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddExport {
    name: String,
    image: String,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    format: crate::image::FormatChoice,
    #[serde(default)]
    description: String,
}

/// Runs blocking work (opening files, reading metadata) off the network threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::msg(ErrorKind::Io, format!("background task failed: {e}")))?
}

async fn add_export(
    State(state): Api,
    JsonBody(req): JsonBody<AddExport>,
) -> ApiResult<(StatusCode, axum::Json<ExportView>)> {
    names::EXPORT.check(&req.name)?;
    if state.exports.get(&req.name).is_some() {
        return Err(Error::msg(
            ErrorKind::AlreadyExists,
            format!("an export named {:?} exists already", req.name),
        )
        .into());
    }
    if req.image.is_empty() {
        return Err(Error::msg(ErrorKind::InvalidInput, "no image given").into());
    }
    if !req.image.starts_with("memory:") && !Path::new(&req.image).exists() {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!("image {:?} does not exist", req.image),
        )
        .into());
    }
    let format = req.format.forced();
    let (name, image) = (req.name.clone(), req.image.clone());
    let access = state.access.clone();
    let export = blocking(move || {
        open_export(&name, &image, req.read_only, format, &req.description)
            .map(|e| e.with_access(access))
    })
    .await?;
    let export = state.exports.try_insert(export)?;
    info!(
        export = export.name(),
        size = export.backend().size(),
        read_only = export.read_only(),
        "control API: serving {}",
        req.image
    );
    Ok((StatusCode::CREATED, axum::Json(ExportView::of(&export))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

#[derive(Serialize)]
struct Removed {
    removed: String,
    disconnected: u64,
}

async fn remove_export(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    QueryArgs(query): QueryArgs<RemoveQuery>,
) -> ApiResult<axum::Json<Removed>> {
    let export = find(&state, &name)?;
    let connected = export.stats().connections();
    if connected > 0 && !query.force {
        return Err(Error::msg(
            ErrorKind::Busy,
            format!(
                "export {name:?} has {connected} client(s) connected; remove it with \
                 force=true to disconnect them"
            ),
        )
        .into());
    }
    if state.exports.remove(&name).is_none() {
        return Err(Error::msg(ErrorKind::NotFound, format!("no export named {name:?}")).into());
    }
    // Also ends sessions that started between the check above and the removal.
    export.close();
    if !export.wait_idle(CLOSE_WAIT).await {
        warn!(
            export = name,
            "clients still connected {CLOSE_WAIT:?} after the export was removed"
        );
    }
    if let Err(e) = export.backend().flush().await {
        warn!(export = name, "flush after removal failed: {e}");
    }
    if let Source::Snapshot { volume, .. } = export.source() {
        volume.unserve(&name);
    }
    info!(
        export = name,
        disconnected = connected,
        "control API: export removed"
    );
    Ok(axum::Json(Removed {
        removed: name,
        disconnected: connected,
    }))
}

/// The volume of an image export; other exports have no snapshots.
fn volume_of(export: &Export) -> Result<Arc<Volume>> {
    if let Some(volume) = export.volume() {
        return Ok(volume.clone());
    }
    let serves = match export.source() {
        Source::Snapshot {
            export, snapshot, ..
        } => format!("snapshot {snapshot:?} of export {export:?}"),
        Source::Raw(path) => format!("the raw file {}", path.display()),
        Source::Memory => "an in-memory disk".to_owned(),
        Source::Backend => "a backend without snapshots".to_owned(),
    };
    Err(Error::msg(
        ErrorKind::InvalidInput,
        format!(
            "export {:?} serves {serves}: snapshots need a Strata image",
            export.name()
        ),
    ))
}

#[derive(Serialize)]
struct SnapshotList {
    snapshots: Vec<super::volume::SnapshotInfo>,
}

async fn list_snapshots(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<axum::Json<SnapshotList>> {
    let volume = volume_of(&*find(&state, &name)?)?;
    let snapshots = blocking(move || volume.snapshots()).await?;
    Ok(axum::Json(SnapshotList { snapshots }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TakeSnapshot {
    name: String,
}

async fn take_snapshot(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    JsonBody(req): JsonBody<TakeSnapshot>,
) -> ApiResult<(StatusCode, axum::Json<super::volume::Taken>)> {
    names::SNAPSHOT.check(&req.name)?;
    let volume = volume_of(&*find(&state, &name)?)?;
    let taken = volume.snapshot(&req.name).await?;
    info!(
        export = name,
        snapshot = req.name,
        pause_us = u64::try_from(taken.pause.as_micros()).unwrap_or(u64::MAX),
        "control API: snapshot taken"
    );
    Ok((StatusCode::CREATED, axum::Json(taken)))
}

#[derive(Serialize)]
struct Deleted {
    copied: u64,
}

async fn delete_snapshot(
    State(state): Api,
    PathArgs((name, snap)): PathArgs<(String, String)>,
) -> ApiResult<axum::Json<Deleted>> {
    names::SNAPSHOT.check(&snap)?;
    let volume = volume_of(&*find(&state, &name)?)?;
    let copied = volume.delete_snapshot(&snap).await?;
    info!(
        export = name,
        snapshot = snap,
        copied,
        "control API: snapshot deleted"
    );
    Ok(axum::Json(Deleted { copied }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rollback {
    snapshot: String,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    destroy_newer: bool,
}

#[derive(Serialize)]
struct RolledBack {
    export: String,
    snapshot: String,
}

async fn rollback(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    JsonBody(req): JsonBody<Rollback>,
) -> ApiResult<axum::Json<RolledBack>> {
    names::SNAPSHOT.check(&req.snapshot)?;
    let export = find(&state, &name)?;
    let volume = volume_of(&export)?;
    let connected = usize::try_from(export.stats().connections()).unwrap_or(usize::MAX);
    let options = RollbackOptions {
        force: req.force,
        destroy_newer: req.destroy_newer,
    };
    volume.rollback(&req.snapshot, options, connected).await?;
    info!(
        export = name,
        snapshot = req.snapshot,
        "control API: rolled back"
    );
    Ok(axum::Json(RolledBack {
        export: name,
        snapshot: req.snapshot,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportSnapshot {
    #[serde(default)]
    name: Option<String>,
}

async fn export_snapshot(
    State(state): Api,
    PathArgs((name, snap)): PathArgs<(String, String)>,
    JsonBody(req): JsonBody<ExportSnapshot>,
) -> ApiResult<(StatusCode, axum::Json<ExportView>)> {
    names::SNAPSHOT.check(&snap)?;
    let export_name = req.name.unwrap_or_else(|| format!("{name}@{snap}"));
    names::EXPORT.check(&export_name)?;
    let live = find(&state, &name)?;
    let volume = volume_of(&live)?;
    if state.exports.get(&export_name).is_some() {
        return Err(Error::msg(
            ErrorKind::AlreadyExists,
            format!("an export named {export_name:?} exists already"),
        )
        .into());
    }
    let backend = {
        let (volume, snap, export_name) = (volume.clone(), snap.clone(), export_name.clone());
        blocking(move || volume.serve_snapshot(&snap, &export_name)).await?
    };
    let export = Export::new(
        export_name.clone(),
        format!("snapshot {snap} of {name}"),
        backend,
    )
    .with_source(Source::Snapshot {
        volume: volume.clone(),
        export: name.clone(),
        snapshot: snap.clone(),
    })
    .with_access(live.access().clone());
    let export = match state.exports.try_insert(export) {
        Ok(export) => export,
        Err(e) => {
            volume.unserve(&export_name);
            return Err(e.into());
        }
    };
    info!(
        export = export_name,
        snapshot = snap,
        of = name,
        "control API: serving a snapshot"
    );
    Ok((StatusCode::CREATED, axum::Json(ExportView::of(&export))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirtyQuery {
    since: String,
}

#[derive(Serialize)]
struct Dirty {
    since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    ranges: Vec<super::volume::DirtyRange>,
    bytes: u64,
}

async fn dirty(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    QueryArgs(query): QueryArgs<DirtyQuery>,
) -> ApiResult<axum::Json<Dirty>> {
    names::SNAPSHOT.check(&query.since)?;
    let volume = volume_of(&*find(&state, &name)?)?;
    let ranges = volume.dirty(&query.since).await?;
    let path = volume.path().to_path_buf();
    let cluster_size = blocking(move || crate::image::tools::header(&path))
        .await
        .ok()
        .map(|h| h.cluster_size());
    let bytes = ranges.iter().map(|r| r.length).sum();
    Ok(axum::Json(Dirty {
        since: query.since,
        cluster_size,
        ranges,
        bytes,
    }))
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

    #[tokio::test]
    async fn tcp_needs_a_token() {
        let exports = Arc::new(Exports::new());
        let server = super::super::Server::new(exports.clone(), Default::default());
        let state = ControlState::new(exports, &[], server.connection_gauge());
        let config = ControlConfig {
            socket: None,
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            token: None,
        };
        let e = ControlServer::bind(config, state).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("needs a token"), "{e}");
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
