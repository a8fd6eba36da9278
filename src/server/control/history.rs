//! The control API's endpoints for volumes with history: the restore points, serving
//! one read-only, cloning one into a new volume, and the parts of rollbacks and dirty
//! ranges that name a point. A point is named as people name it (a seq, an RFC 3339
//! time, a time ago) and resolved here, once per request.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use tracing::{info, warn};

use super::ControlState;
use super::handlers::{add_served, blocking, export_view, find, serves};
use crate::api::{CloneAt, ExportView, HistoryView, PointRef, ServeAt};
use crate::error::{Error, ErrorKind, Result};
use crate::history::{History, Point, PointSpec};
use crate::names;
use crate::server::export::{Export, Source, open_export};
use crate::server::http::{ApiResult, JsonBody, PathArgs};
use crate::volume::{DirtyRange, Volume};

type Api = State<Arc<ControlState>>;

/// The volume with history an export serves live; other exports have no restore points.
fn history_of(export: &Export) -> Result<(Arc<Volume>, Arc<History>)> {
    if let Some(volume) = export.volume() {
        if let Some(history) = volume.history() {
            return Ok((Arc::clone(volume), Arc::clone(history)));
        }
    }
    Err(Error::msg(
        ErrorKind::InvalidInput,
        format!(
            "export {:?} serves {}: restore points need a volume with history \
             (strata create --history)",
            export.name(),
            serves(export)
        ),
    ))
}

/// Names the point `at` of `volume` (a volume with history) as the snapshot `name`.
pub(super) async fn snapshot_at(
    volume: &Volume,
    name: &str,
    at: &str,
) -> Result<crate::volume::Taken> {
    let history = volume.history().ok_or_else(|| {
        Error::msg(
            ErrorKind::InvalidInput,
            "a snapshot at a restore point needs a volume with history (strata create --history)",
        )
    })?;
    let point = resolve(history, at)?;
    volume.snapshot_at(name, point).await
}

/// The point `text` names in `history`.
fn resolve(history: &History, text: &str) -> Result<Point> {
    history.resolve(PointSpec::parse(text)?)
}

pub(super) async fn list(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<Json<HistoryView>> {
    let (_, history) = history_of(&*find(&state, &name)?)?;
    Ok(Json(blocking(move || Ok(HistoryView::of(&history))).await?))
}

pub(super) async fn serve_at(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    JsonBody(req): JsonBody<ServeAt>,
) -> ApiResult<(StatusCode, Json<ExportView>)> {
    if let Some(as_name) = &req.as_name {
        names::EXPORT.check(as_name)?;
    }
    let live = find(&state, &name)?;
    let (volume, history) = history_of(&live)?;
    let point = resolve(&history, &req.at)?;
    let export_name = (req.as_name).unwrap_or_else(|| format!("{name}@{}", point.seq));
    names::EXPORT.check(&export_name)?;
    state.exports.check_free(&export_name)?;
    let backend = volume.serve_point(point, &export_name)?;
    let export = Export::new(
        export_name.clone(),
        format!("restore point {} of {name}", point.seq),
        backend,
    )
    .with_source(Source::Point {
        volume: Arc::clone(&volume),
        export: name.clone(),
        point,
    });
    let what = format!("restore point {}", point.seq);
    Ok(add_served(&state, export, &live, &volume, &what)?)
}

pub(super) async fn clone(
    State(state): Api,
    PathArgs(name): PathArgs<String>,
    JsonBody(req): JsonBody<CloneAt>,
) -> ApiResult<(StatusCode, Json<ExportView>)> {
    names::EXPORT.check(&req.name)?;
    if req.image.is_empty() {
        return Err(Error::msg(ErrorKind::InvalidInput, "no image directory given").into());
    }
    let live = find(&state, &name)?;
    let (_, history) = history_of(&live)?;
    let point = resolve(&history, &req.at)?;
    state.exports.check_free(&req.name)?;
    let view = history.view(point)?;
    let dir = PathBuf::from(&req.image);
    {
        let dir = dir.clone();
        blocking(move || view.clone_to(&dir).map(drop)).await?;
    }
    let (new, image, access) = (req.name.clone(), req.image.clone(), live.access().clone());
    let description = format!("clone of {name} at restore point {}", point.seq);
    let export = blocking(move || {
        open_export(&new, &image, false, None, &description).map(|e| e.with_access(access))
    })
    .await?;
    let export = match state.exports.try_insert(export) {
        Ok(export) => export,
        Err(e) => {
            // The name was taken meanwhile: the clone nobody can reach goes too.
            let dir = dir.clone();
            if let Err(e) = blocking(move || Ok(std::fs::remove_dir_all(&dir)?)).await {
                warn!("removing the clone {}: {e}", req.image);
            }
            return Err(e.into());
        }
    };
    info!(
        export = req.name,
        seq = point.seq,
        of = name,
        "control API: serving a clone of {}",
        req.image
    );
    Ok((StatusCode::CREATED, Json(export_view(&export))))
}

/// Rolls the live disk of `export` back to the point `at` names; refused with
/// `connected` clients unless `force`.
pub(super) async fn rollback_to_point(
    export: &Export,
    at: &str,
    force: bool,
    connected: usize,
) -> Result<PointRef> {
    let (volume, history) = history_of(export)?;
    let point = resolve(&history, at)?;
    volume.rollback_to(point, force, connected).await?;
    info!(
        export = export.name(),
        seq = point.seq,
        "control API: rolled back to a restore point"
    );
    Ok(PointRef::of(&point))
}

/// The point `at` names, and the ranges of the live disk of `export` changed since.
pub(super) async fn dirty_since_point(
    export: &Export,
    at: &str,
) -> Result<(PointRef, Vec<DirtyRange>)> {
    let (volume, history) = history_of(export)?;
    let point = resolve(&history, at)?;
    let ranges = volume.dirty_since(point).await?;
    Ok((PointRef::of(&point), ranges))
}
