//! The control API's endpoints: each takes its path, query and body through the
//! extractors of [`super::super::http`], acts on the exports or a volume, and answers
//! JSON. Blocking work (opening images, reading metadata) runs off the network threads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::ControlState;
use crate::error::{Error, ErrorKind, Result};
use crate::server::Volume;
use crate::server::export::{Export, Source, StatsSnapshot, open_export};
use crate::server::http::{ApiResult, JsonBody, PathArgs, QueryArgs};
use crate::server::metrics_listener::metrics_response;
use crate::server::volume::{RollbackOptions, valid_name};

/// How long a removal waits for the sessions it closed to finish their requests.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

#[derive(Serialize)]
pub(super) struct ServerView {
    version: &'static str,
    uptime_s: u64,
    listen: Vec<String>,
    control: Vec<String>,
    connections: usize,
    max_connections: usize,
    exports: usize,
}

#[derive(Serialize)]
pub(super) struct ExportView {
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
pub(super) struct SnapshotOf {
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

type Api = State<Arc<ControlState>>;

pub(super) async fn server_info(State(state): Api) -> axum::Json<ServerView> {
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

pub(super) async fn metrics(State(state): Api) -> Response {
    metrics_response(&state.connections, &state.exports)
}

#[derive(Serialize)]
pub(super) struct ExportList {
    exports: Vec<ExportView>,
}

pub(super) async fn list_exports(State(state): Api) -> axum::Json<ExportList> {
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

pub(super) async fn get_export(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<axum::Json<ExportView>> {
    let export = find(&state, &name)?;
    Ok(axum::Json(ExportView::of(&export)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddExport {
    name: String,
    image: String,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    format: crate::image::FormatChoice,
    #[serde(default)]
    description: String,
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if valid_name(name) {
        return Ok(());
    }
    Err(Error::msg(
        ErrorKind::InvalidInput,
        format!(
            "invalid {what} name {name:?}: use 1 to 64 ASCII letters, digits, '.', '_', '-' \
             and '@', not starting with '.' or '-'"
        ),
    ))
}

/// Runs blocking work (opening files, reading metadata) off the network threads.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::msg(ErrorKind::Io, format!("background task failed: {e}")))?
}

pub(super) async fn add_export(
    State(state): Api,
    JsonBody(req): JsonBody<AddExport>,
) -> ApiResult<(StatusCode, axum::Json<ExportView>)> {
    check_name("export", &req.name)?;
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
pub(super) struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

#[derive(Serialize)]
pub(super) struct Removed {
    removed: String,
    disconnected: u64,
}

pub(super) async fn remove_export(
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
pub(super) struct SnapshotList {
    snapshots: Vec<crate::server::volume::SnapshotInfo>,
}

pub(super) async fn list_snapshots(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<axum::Json<SnapshotList>> {
    let volume = volume_of(&*find(&state, &name)?)?;
    let snapshots = blocking(move || volume.snapshots()).await?;
    Ok(axum::Json(SnapshotList { snapshots }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TakeSnapshot {
    name: String,
}

pub(super) async fn take_snapshot(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    JsonBody(req): JsonBody<TakeSnapshot>,
) -> ApiResult<(StatusCode, axum::Json<crate::server::volume::Taken>)> {
    check_name("snapshot", &req.name)?;
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
pub(super) struct Deleted {
    copied: u64,
}

pub(super) async fn delete_snapshot(
    State(state): Api,
    PathArgs((name, snap)): PathArgs<(String, String)>,
) -> ApiResult<axum::Json<Deleted>> {
    check_name("snapshot", &snap)?;
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
pub(super) struct Rollback {
    snapshot: String,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    destroy_newer: bool,
}

#[derive(Serialize)]
pub(super) struct RolledBack {
    export: String,
    snapshot: String,
}

pub(super) async fn rollback(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    JsonBody(req): JsonBody<Rollback>,
) -> ApiResult<axum::Json<RolledBack>> {
    check_name("snapshot", &req.snapshot)?;
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
pub(super) struct ExportSnapshot {
    #[serde(default)]
    name: Option<String>,
}

pub(super) async fn export_snapshot(
    State(state): Api,
    PathArgs((name, snap)): PathArgs<(String, String)>,
    JsonBody(req): JsonBody<ExportSnapshot>,
) -> ApiResult<(StatusCode, axum::Json<ExportView>)> {
    check_name("snapshot", &snap)?;
    let export_name = req.name.unwrap_or_else(|| format!("{name}@{snap}"));
    check_name("export", &export_name)?;
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
pub(super) struct DirtyQuery {
    since: String,
}

#[derive(Serialize)]
pub(super) struct Dirty {
    since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    ranges: Vec<crate::server::volume::DirtyRange>,
    bytes: u64,
}

pub(super) async fn dirty(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    QueryArgs(query): QueryArgs<DirtyQuery>,
) -> ApiResult<axum::Json<Dirty>> {
    check_name("snapshot", &query.since)?;
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
