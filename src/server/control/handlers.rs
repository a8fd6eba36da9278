//! The control API's endpoints: each takes its path, query and body through the
//! extractors of `server::http`, acts on the exports or a volume, and answers with the
//! wire types of [`crate::api`]. Blocking work (opening images, reading metadata) runs off
//! the network threads.

use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use tracing::{info, warn};

use super::ControlState;
use super::history::{dirty_since_point, rollback_to_point};
use crate::api::{
    AddExport, Deleted, Dirty, DirtyQuery, DirtyRange, ExportList, ExportView, HistorySummary,
    PointOf, PointRef, RemoveQuery, Removed, Rollback, RolledBack, ServeSnapshot, ServerView,
    Snapshot, SnapshotList, SnapshotOf, TakeSnapshot, Taken,
};
use crate::error::{Error, ErrorKind, Result};
use crate::names;
use crate::server::export::{CLOSE_WAIT, Export, Source, open_export};
use crate::server::http::{ApiResult, JsonBody, PathArgs, QueryArgs};
use crate::server::metrics_listener::metrics_response;
use crate::volume::{self, RollbackOptions, Volume};

/// What the API shows of an export.
pub(super) fn export_view(export: &Export) -> ExportView {
    let snapshot_of = match export.source() {
        Source::Snapshot {
            export, snapshot, ..
        } => Some(SnapshotOf {
            export: export.clone(),
            snapshot: snapshot.clone(),
        }),
        _ => None,
    };
    let point_of = match export.source() {
        Source::Point { export, point, .. } => Some(PointOf {
            export: export.clone(),
            point: PointRef::of(point),
        }),
        _ => None,
    };
    let history = (export.volume().and_then(|v| v.history())).map(|h| HistorySummary::of(h));
    ExportView {
        name: export.name().to_owned(),
        description: export.description().to_owned(),
        size: export.backend().size(),
        read_only: export.read_only(),
        kind: export.kind().to_owned(),
        image: export.image_path().map(Path::to_path_buf),
        snapshot_of,
        point_of,
        history,
        stats: export.stats().snapshot(),
    }
}

/// What the API shows of a snapshot.
fn snapshot_view(info: volume::SnapshotInfo) -> Snapshot {
    Snapshot {
        name: info.name,
        created: info.created,
        path: info.path,
        allocated: info.allocated,
        exported_as: info.exported_as,
    }
}

type Api = State<Arc<ControlState>>;

pub(super) async fn server_info(State(state): Api) -> Json<ServerView> {
    Json(ServerView {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: state.started.elapsed().as_secs(),
        listen: state.listen.clone(),
        control: state.control.clone(),
        connections: state.connections.open() as u64,
        max_connections: state.connections.max() as u64,
        exports: state.exports.all().len() as u64,
    })
}

pub(super) async fn metrics(State(state): Api) -> Response {
    metrics_response(&state.connections, &state.exports)
}

pub(super) async fn list_exports(State(state): Api) -> Json<ExportList> {
    let exports = state.exports.all().iter().map(|e| export_view(e)).collect();
    Json(ExportList { exports })
}

/// The export `name`, which must exist.
pub(super) fn find(state: &ControlState, name: &str) -> Result<Arc<Export>> {
    // The empty name would find the default export; the API names exports exactly.
    state
        .exports
        .get(name)
        .filter(|_| !name.is_empty())
        .ok_or_else(|| no_export(name))
}

fn no_export(name: &str) -> Error {
    Error::msg(ErrorKind::NotFound, format!("no export named {name:?}"))
}

pub(super) async fn get_export(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<Json<ExportView>> {
    let export = find(&state, &name)?;
    Ok(Json(export_view(&export)))
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
) -> ApiResult<(StatusCode, Json<ExportView>)> {
    names::EXPORT.check(&req.name)?;
    state.exports.check_free(&req.name)?;
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
    Ok((StatusCode::CREATED, Json(export_view(&export))))
}

pub(super) async fn remove_export(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    QueryArgs(query): QueryArgs<RemoveQuery>,
) -> ApiResult<Json<Removed>> {
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
        return Err(no_export(&name).into());
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
    if let Some(volume) = export.source().served_from() {
        volume.unserve(&name);
    }
    info!(
        export = name,
        disconnected = connected,
        "control API: export removed"
    );
    Ok(Json(Removed {
        removed: name,
        disconnected: connected,
    }))
}

/// What an export serves, in a few words, for refusals of what it cannot do.
pub(super) fn serves(export: &Export) -> String {
    if let Some(volume) = export.volume() {
        let what = if volume.history().is_some() {
            "the volume with history"
        } else {
            "the Strata image"
        };
        return format!("{what} {}", volume.path().display());
    }
    match export.source() {
        Source::Snapshot {
            export, snapshot, ..
        } => format!("snapshot {snapshot:?} of export {export:?}"),
        Source::Point { export, point, .. } => {
            format!("restore point {} of export {export:?}", point.seq)
        }
        Source::Raw(path) => format!("the raw file {}", path.display()),
        Source::Memory => "an in-memory disk".to_owned(),
        Source::Backend => "a backend without snapshots".to_owned(),
    }
}

/// The volume of an image export; other exports have no snapshots.
pub(super) fn volume_of(export: &Export) -> Result<Arc<Volume>> {
    if let Some(volume) = export.volume() {
        return Ok(volume.clone());
    }
    Err(Error::msg(
        ErrorKind::InvalidInput,
        format!(
            "export {:?} serves {}: snapshots need a Strata image",
            export.name(),
            serves(export)
        ),
    ))
}

/// Adds `export`, which serves `what` (a snapshot or restore point of `volume`, which
/// `live` serves) with the access rules of `live`, and answers with its view; if it
/// cannot be added, `volume` forgets it was served.
pub(super) fn add_served(
    state: &ControlState,
    export: Export,
    live: &Export,
    volume: &Volume,
    what: &str,
) -> Result<(StatusCode, Json<ExportView>)> {
    let name = export.name().to_owned();
    let export = export.with_access(live.access().clone());
    let export = state.exports.try_insert(export).inspect_err(|_| {
        volume.unserve(&name);
    })?;
    info!(
        export = name,
        of = live.name(),
        "control API: serving {what}"
    );
    Ok((StatusCode::CREATED, Json(export_view(&export))))
}

/// The volume of the export `name`, which must exist and have one.
fn find_volume(state: &ControlState, name: &str) -> Result<Arc<Volume>> {
    volume_of(&*find(state, name)?)
}

pub(super) async fn list_snapshots(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<Json<SnapshotList>> {
    let volume = find_volume(&state, &name)?;
    let snapshots = blocking(move || volume.snapshots()).await?;
    let snapshots = snapshots.into_iter().map(snapshot_view).collect();
    Ok(Json(SnapshotList { snapshots }))
}

pub(super) async fn take_snapshot(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    JsonBody(req): JsonBody<TakeSnapshot>,
) -> ApiResult<(StatusCode, Json<Taken>)> {
    names::SNAPSHOT.check(&req.name)?;
    let volume = find_volume(&state, &name)?;
    let taken = match &req.at {
        Some(at) => super::history::snapshot_at(&volume, &req.name, at).await?,
        None => volume.snapshot(&req.name).await?,
    };
    let pause_us = u64::try_from(taken.pause.as_micros()).unwrap_or(u64::MAX);
    info!(
        export = name,
        snapshot = req.name,
        pause_us,
        "control API: snapshot taken"
    );
    let snapshot = snapshot_view(taken.snapshot);
    Ok((StatusCode::CREATED, Json(Taken { snapshot, pause_us })))
}

pub(super) async fn delete_snapshot(
    State(state): Api,
    PathArgs((name, snap)): PathArgs<(String, String)>,
) -> ApiResult<Json<Deleted>> {
    names::SNAPSHOT.check(&snap)?;
    let volume = find_volume(&state, &name)?;
    let copied = volume.delete_snapshot(&snap).await?;
    info!(
        export = name,
        snapshot = snap,
        copied,
        "control API: snapshot deleted"
    );
    Ok(Json(Deleted { copied }))
}

pub(super) async fn rollback(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    JsonBody(req): JsonBody<Rollback>,
) -> ApiResult<Json<RolledBack>> {
    let (snapshot, at) = match (req.snapshot, req.at) {
        (Some(snapshot), None) => (snapshot, None),
        (None, Some(at)) => (String::new(), Some(at)),
        _ => return Err(one_of("snapshot", "at").into()),
    };
    let export = find(&state, &name)?;
    let connected = usize::try_from(export.stats().connections()).unwrap_or(usize::MAX);
    if let Some(at) = at {
        if req.destroy_newer {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "destroy_newer applies to snapshots of Strata images: a rollback to a \
                 restore point loses no point",
            )
            .into());
        }
        let point = rollback_to_point(&export, &at, req.force, connected).await?;
        return Ok(Json(RolledBack {
            export: name,
            snapshot: None,
            point: Some(point),
        }));
    }
    names::SNAPSHOT.check(&snapshot)?;
    let volume = volume_of(&export)?;
    let options = RollbackOptions {
        force: req.force,
        destroy_newer: req.destroy_newer,
    };
    volume.rollback(&snapshot, options, connected).await?;
    info!(export = name, snapshot, "control API: rolled back");
    Ok(Json(RolledBack {
        export: name,
        snapshot: Some(snapshot),
        point: None,
    }))
}

/// The refusal of a request that must name exactly one of `a` and `b`.
fn one_of(a: &str, b: &str) -> Error {
    Error::msg(
        ErrorKind::InvalidInput,
        format!("give exactly one of {a:?} and {b:?}"),
    )
}

pub(super) async fn export_snapshot(
    State(state): Api,
    PathArgs((name, snap)): PathArgs<(String, String)>,
    JsonBody(req): JsonBody<ServeSnapshot>,
) -> ApiResult<(StatusCode, Json<ExportView>)> {
    names::SNAPSHOT.check(&snap)?;
    let export_name = req.name.unwrap_or_else(|| format!("{name}@{snap}"));
    names::EXPORT.check(&export_name)?;
    let live = find(&state, &name)?;
    let volume = volume_of(&live)?;
    state.exports.check_free(&export_name)?;
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
    });
    Ok(add_served(
        &state,
        export,
        &live,
        &volume,
        &format!("snapshot {snap}"),
    )?)
}

pub(super) async fn dirty(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    QueryArgs(query): QueryArgs<DirtyQuery>,
) -> ApiResult<Json<Dirty>> {
    let (since, point, ranges, volume) = match (query.since, query.since_point) {
        (Some(since), None) => {
            names::SNAPSHOT.check(&since)?;
            let volume = find_volume(&state, &name)?;
            let ranges = volume.dirty(&since).await?;
            (since, None, ranges, volume)
        }
        (None, Some(at)) => {
            let export = find(&state, &name)?;
            let (point, ranges) = dirty_since_point(&export, &at).await?;
            (at, Some(point), ranges, volume_of(&export)?)
        }
        _ => return Err(one_of("since", "since_point").into()),
    };
    let ranges: Vec<DirtyRange> = (ranges.into_iter())
        .map(|r| DirtyRange {
            offset: r.offset,
            length: r.length,
        })
        .collect();
    let cluster_size = if volume.history().is_some() {
        Some(crate::history::index::BLOCK)
    } else {
        let path = volume.path().to_path_buf();
        blocking(move || crate::image::tools::header(&path))
            .await
            .ok()
            .map(|h| h.cluster_size())
    };
    let bytes = ranges.iter().map(|r| r.length).sum();
    Ok(Json(Dirty {
        since,
        point,
        cluster_size,
        ranges,
        bytes,
    }))
}
